//! ext4 output checked with e2fsck and debugfs. Needs root (ownership in staging) and
//! e2fsprogs; skips with a printed reason otherwise.

use std::process::Command;

use tar::EntryType;

use super::*;
use crate::layer::{apply_layer, Totals};
use crate::limits::Limits;
use crate::progress::NoProgress;
use crate::testutil::{gzip, LayerBuilder};

fn tools_or_skip(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP {test}: needs root to stage ownership");
        return false;
    }
    for t in ["mkfs.ext4", "debugfs", "e2fsck"] {
        if find_tool(t).is_err() {
            eprintln!("SKIP {test}: {t} not installed (apt-get install e2fsprogs)");
            return false;
        }
    }
    true
}

fn debugfs(img: &Path, req: &str) -> String {
    let out = Command::new(find_tool("debugfs").unwrap())
        .arg("-R")
        .arg(req)
        .arg(img)
        .output()
        .unwrap();
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn build_image(layers: &[Vec<u8>]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mut blobs = BlobStore::create(&dir.path().join("blobs")).unwrap();
    let mut tree = Tree::new(Limits::default());
    let mut totals = Totals::default();
    for l in layers {
        apply_layer(
            &mut tree,
            &mut blobs,
            &l[..],
            None,
            &mut totals,
            &NoProgress,
        )
        .unwrap();
    }
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let out = dir.path().join("rootfs.ext4");
    build(&tree, &blobs, &work, &out, &Ext4Options::default()).unwrap();
    (dir, out)
}

#[test]
fn builds_a_clean_ext4_with_every_file_type() {
    if !tools_or_skip("builds_a_clean_ext4_with_every_file_type") {
        return;
    }
    let lower = LayerBuilder::new()
        .dir("bin")
        .file_owned("bin/sh", b"#!shell", 0o4755, 0, 0)
        .hardlink("bin/sh2", "bin/sh")
        .symlink("bin/ash", "sh")
        .file_owned("home/u/f", b"hello", 0o640, 1000, 1001)
        .device("dev/null", EntryType::Char, 1, 3)
        .device("dev/sda", EntryType::Block, 8, 0)
        .device("run/fifo", EntryType::Fifo, 0, 0)
        .dir_mode("tmp", 0o1777)
        .file("gone", b"x")
        .file("d/a", b"a")
        .pax_file(
            "bin/ping",
            &[(
                "SCHILY.xattr.security.capability",
                &[1, 0, 0, 2, 0, 32, 0, 0][..],
            )],
            b"elf",
        )
        .symlink("localetc", "/etc")
        .dir("etc")
        .finish();
    let upper = LayerBuilder::new()
        .file(".wh.gone", b"")
        .file("d/.wh..wh..opq", b"")
        .file("d/b", b"b")
        .file("localetc/hostname", b"vm")
        .finish();
    let (_dir, img) = build_image(&[gzip(&lower), upper]);

    let fsck = Command::new(find_tool("e2fsck").unwrap())
        .arg("-fn")
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );

    let sh = debugfs(&img, "stat /bin/sh");
    assert!(
        sh.contains("Type: regular") && sh.contains("Mode:  04755"),
        "{sh}"
    );
    assert!(sh.contains("Links: 2"), "{sh}");
    let sh2 = debugfs(&img, "stat /bin/sh2");
    let inode = |s: &str| s.split_whitespace().nth(1).map(str::to_owned);
    assert_eq!(inode(&sh), inode(&sh2), "hardlinks share one inode");
    let f = debugfs(&img, "stat /home/u/f");
    assert!(f.contains("User:  1000   Group:  1001"), "{f}");
    assert!(f.contains("Mode:  0640"), "{f}");
    assert_eq!(debugfs(&img, "cat /home/u/f").lines().next(), Some("hello"));
    let null = debugfs(&img, "stat /dev/null");
    assert!(null.contains("Type: character special"), "{null}");
    assert!(null.contains("Mode:  0666"), "{null}");
    assert!(null.contains("major/minor number: 01:03"), "{null}");
    let sda = debugfs(&img, "stat /dev/sda");
    assert!(sda.contains("Type: block special"), "{sda}");
    assert!(debugfs(&img, "stat /run/fifo").contains("Type: FIFO"));
    let ash = debugfs(&img, "stat /bin/ash");
    assert!(
        ash.contains("Type: symlink") && ash.contains("Fast link dest: \"sh\""),
        "{ash}"
    );
    let tmp = debugfs(&img, "stat /tmp");
    assert!(tmp.contains("Mode:  01777"), "{tmp}");
    assert!(debugfs(&img, "stat /gone").contains("File not found"));
    // `ls -p` prints /inode/mode/uid/gid/name/size/ per entry.
    let d = debugfs(&img, "ls -p /d");
    assert!(d.contains("/b/1/"), "{d}");
    assert!(!d.contains("/a/"), "opaque removed lower d/a: {d}");
    assert!(!debugfs(&img, "ls -p /").contains("/lost+found/"));
    let ea = debugfs(&img, "ea_list /bin/ping");
    assert!(ea.contains("security.capability"), "{ea}");
    assert_eq!(
        debugfs(&img, "cat /etc/hostname").lines().next(),
        Some("vm")
    );
    let root = debugfs(&img, "stat /");
    assert!(
        root.contains("Mode:  0755") && root.contains("User:     0"),
        "{root}"
    );
}

#[test]
fn estimate_grows_with_content() {
    let mut tree = Tree::new(Limits::default());
    let (small, _) = estimate(&tree);
    let id = tree.alloc(
        Kind::File {
            blob: None,
            size: 100 << 20,
        },
        Meta::default(),
    );
    tree.link(ROOT, b"big".to_vec(), id).unwrap();
    let (big, _) = estimate(&tree);
    assert!(big >= small + (100 << 20), "{small} {big}");
}

#[test]
fn quoting_doubles_quotes() {
    assert_eq!(quote(b"a\"b c"), "\"a\"\"b c\"");
}

#[test]
fn copies_a_host_directory_with_links_and_ownership() {
    if !tools_or_skip("copies_a_host_directory_with_links_and_ownership") {
        return;
    }
    use std::os::unix::fs::{symlink, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("etc/sub")).unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o750)).unwrap();
    std::fs::write(src.join("etc/hostname"), "layered\n").unwrap();
    std::fs::hard_link(src.join("etc/hostname"), src.join("etc/sub/again")).unwrap();
    symlink("/etc/passwd", src.join("etc/link")).unwrap();
    std::fs::write(src.join("big"), vec![7u8; 3 << 20]).unwrap();
    let out = dir.path().join("layers.ext4");
    let stats = build_from_dir(&src, &out, &Ext4Options::default()).unwrap();
    assert!(stats.size >= 3 << 20, "{stats:?}");
    assert_eq!(
        debugfs(&out, "cat /etc/hostname").lines().next(),
        Some("layered")
    );
    // One inode behind both names.
    let a = debugfs(&out, "stat /etc/hostname");
    assert!(a.contains("Links: 2"), "{a}");
    assert!(debugfs(&out, "stat /etc/link").contains("Fast link dest: \"/etc/passwd\""));
    let root = debugfs(&out, "stat /");
    assert!(root.contains("Mode:  0750"), "{root}");
    assert!(!debugfs(&out, "ls -p /").contains("/lost+found/"));
    assert!(!out.with_extension("debugfs").exists());
    // The estimate covers the content.
    let (size, inodes) = estimate_dir(&src).unwrap();
    assert!(size >= 3 << 20 && inodes >= 6, "{size} {inodes}");
}
