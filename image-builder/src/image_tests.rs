//! End-to-end builds through the cache. Need root and e2fsprogs; skip otherwise.

use super::*;
use crate::testutil::*;

fn skip(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP {test}: needs root");
        return true;
    }
    if ext4::find_tool("mkfs.ext4").is_err() || ext4::find_tool("e2fsck").is_err() {
        eprintln!("SKIP {test}: e2fsprogs not installed");
        return true;
    }
    false
}

fn fsck_ok(p: &std::path::Path) {
    let out = std::process::Command::new(ext4::find_tool("e2fsck").unwrap())
        .arg("-fn")
        .arg(p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn tmp_entries(cache: &std::path::Path) -> usize {
    std::fs::read_dir(cache.join("tmp")).unwrap().count()
}

#[test]
fn builds_then_serves_from_cache() {
    if skip("builds_then_serves_from_cache") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let layout = t.path().join("layout");
    let layers = vec![
        LayerBuilder::new()
            .file("etc/os-release", b"ID=test")
            .finish(),
        LayerBuilder::new().file("bin/app", b"app").finish(),
    ];
    write_oci_layout(&layout, &layers, "v1");
    let cache = t.path().join("cache");
    let opts = BuildOptions::new(&cache);
    let r = ImageRef::parse(&format!("oci:{}", layout.display())).unwrap();
    let first = build(&r, &opts).unwrap();
    assert!(!first.cached);
    assert!(first.rootfs.starts_with(&cache));
    fsck_ok(&first.rootfs);
    assert_eq!(
        first.config.config.cmd.as_deref(),
        Some(&["single".to_string()][..])
    );
    assert_eq!(
        std::fs::read(&first.config_path).unwrap(),
        crate::source::resolve(&r, None).unwrap().config_raw
    );
    let second = build(&r, &opts).unwrap();
    assert!(second.cached);
    assert_eq!(first.rootfs, second.rootfs);
    assert_eq!(tmp_entries(&cache), 0, "work dirs are removed");

    // The same layers from a docker archive share the ext4.
    let ar = t.path().join("img.tar");
    write_docker_archive(&ar, &layers, "x:1");
    let d = build(
        &ImageRef::parse(&format!("docker-archive:{}", ar.display())).unwrap(),
        &opts,
    )
    .unwrap();
    assert!(d.cached);
    assert_eq!(d.rootfs, first.rootfs);
    assert_eq!(
        d.config.config.cmd.as_deref(),
        Some(&["docker".to_string()][..])
    );

    let (cfg, path) = inspect(&r, &opts).unwrap();
    assert_eq!(cfg.config.cmd.as_deref(), Some(&["single".to_string()][..]));
    assert_eq!(path, Some(first.rootfs.clone()));
}

#[test]
fn concurrent_builds_of_one_key_agree() {
    if skip("concurrent_builds_of_one_key_agree") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let layout = t.path().join("layout");
    let mut l = LayerBuilder::new();
    for i in 0..200 {
        l = l.file(&format!("d{}/f{i}", i % 7), &[i as u8; 3000]);
    }
    write_oci_layout(&layout, &[l.finish()], "v1");
    let cache = t.path().join("cache");
    let r = ImageRef::parse(&format!("oci:{}", layout.display())).unwrap();
    let results: Vec<BuiltImage> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .map(|_| s.spawn(|| build(&r, &BuildOptions::new(&cache)).unwrap()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(results.iter().all(|b| b.rootfs == results[0].rootfs));
    assert_eq!(
        results.iter().filter(|b| !b.cached).count(),
        1,
        "built once"
    );
    fsck_ok(&results[0].rootfs);
    assert_eq!(tmp_entries(&cache), 0);
}

#[test]
fn failed_builds_publish_nothing() {
    if skip("failed_builds_publish_nothing") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let layout = t.path().join("layout");
    let hostile = LayerBuilder::new()
        .raw(
            b"../../escape",
            tar::EntryType::Regular,
            b"",
            b"x",
            0o644,
            0,
            0,
        )
        .finish();
    write_oci_layout(&layout, &[hostile], "v1");
    let cache = t.path().join("cache");
    let r = ImageRef::parse(&format!("oci:{}", layout.display())).unwrap();
    let err = build(&r, &BuildOptions::new(&cache)).unwrap_err();
    assert!(err.is_invalid_archive(), "{err}");
    assert_eq!(std::fs::read_dir(cache.join("images")).unwrap().count(), 0);
    assert_eq!(tmp_entries(&cache), 0);
    assert!(!t.path().join("escape").exists());
}
