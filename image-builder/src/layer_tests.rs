//! Layer application on generated (and hostile) tar streams; reliability cases A1-A16.

use std::io::Read;

use tar::EntryType;

use super::*;
use crate::limits::Limits;
use crate::progress::NoProgress;
use crate::testutil::{gzip, zstd, LayerBuilder};
use crate::tree::{Kind, Tree};

struct Built {
    tree: Tree,
    blobs: BlobStore,
    _dir: tempfile::TempDir,
}

fn apply_with(layers: &[Vec<u8>], limits: Limits) -> Result<Built> {
    let dir = tempfile::tempdir().unwrap();
    let mut blobs = BlobStore::create(&dir.path().join("blobs")).unwrap();
    let mut tree = Tree::new(limits);
    let mut totals = Totals::default();
    for l in layers {
        apply_layer(
            &mut tree,
            &mut blobs,
            &l[..],
            None,
            &mut totals,
            &NoProgress,
        )?;
    }
    Ok(Built {
        tree,
        blobs,
        _dir: dir,
    })
}

fn apply(layers: &[Vec<u8>]) -> Result<Built> {
    apply_with(layers, Limits::default())
}

impl Built {
    fn kind(&mut self, path: &str) -> Option<Kind> {
        let id = self.tree.lookup_path_nofollow(path)?;
        Some(self.tree.node(id).kind.clone())
    }

    fn content(&mut self, path: &str) -> Vec<u8> {
        let id = self.tree.lookup_path_nofollow(path).expect("path exists");
        match self.tree.node(id).kind {
            Kind::File { blob: None, .. } => Vec::new(),
            Kind::File { blob: Some(b), .. } => {
                let mut v = Vec::new();
                self.blobs.open(b).unwrap().read_to_end(&mut v).unwrap();
                v
            }
            ref k => panic!("{path} is not a file: {k:?}"),
        }
    }

    fn paths(&self) -> Vec<String> {
        self.tree.walk_all().into_iter().map(|(p, _)| p).collect()
    }

    fn node_of(&mut self, path: &str) -> usize {
        self.tree.lookup_path_nofollow(path).expect("path exists")
    }
}

fn assert_invalid(r: Result<Built>) {
    match r {
        Err(e) => assert!(e.is_invalid_archive(), "expected invalid archive, got {e}"),
        Ok(b) => panic!("expected rejection, got {:?}", b.paths()),
    }
}

fn assert_limit(r: Result<Built>) {
    match r {
        Err(e) => assert!(e.is_limit(), "expected a limit error, got {e}"),
        Ok(b) => panic!("expected a limit error, got {:?}", b.paths()),
    }
}

#[test]
fn basic_types_and_all_compressions() {
    let tar = LayerBuilder::new()
        .dir("bin")
        .file_owned("bin/sh", b"#!shell", 0o4755, 0, 0)
        .file_owned("home/u/f", b"hello", 0o600, 1000, 1001)
        .symlink("bin/ash", "sh")
        .hardlink("bin/sh2", "bin/sh")
        .device("dev/null", EntryType::Char, 1, 3)
        .device("dev/sda", EntryType::Block, 8, 0)
        .device("run/fifo", EntryType::Fifo, 0, 0)
        .finish();
    for layer in [tar.clone(), gzip(&tar), zstd(&tar)] {
        let mut b = apply(&[layer]).unwrap();
        assert_eq!(b.content("bin/sh"), b"#!shell");
        let sh = b.node_of("bin/sh");
        assert_eq!(b.tree.node(sh).meta.mode, 0o4755);
        assert_eq!(b.tree.node(sh).nlink, 2);
        assert_eq!(sh, b.node_of("bin/sh2"));
        let f = b.node_of("home/u/f");
        assert_eq!(
            (b.tree.node(f).meta.uid, b.tree.node(f).meta.gid),
            (1000, 1001)
        );
        assert_eq!(b.kind("bin/ash"), Some(Kind::Symlink(b"sh".to_vec())));
        assert_eq!(
            b.kind("dev/null"),
            Some(Kind::CharDev { major: 1, minor: 3 })
        );
        assert_eq!(
            b.kind("dev/sda"),
            Some(Kind::BlockDev { major: 8, minor: 0 })
        );
        assert_eq!(b.kind("run/fifo"), Some(Kind::Fifo));
        // Implicit parents are plain directories.
        assert!(matches!(b.kind("home/u"), Some(Kind::Dir(_))));
    }
}

#[test]
fn detects_unsupported_compression() {
    let err = apply(&[b"BZh91AY&SY".to_vec()]).err().unwrap();
    assert!(
        matches!(err, Error::UnsupportedCompression("bzip2")),
        "{err}"
    );
}

#[test]
fn a1_dotdot_escape_is_rejected() {
    for name in [&b"../../tmp/pwn"[..], b"a/../../pwn", b"./../pwn", b"/.."] {
        let tar = LayerBuilder::new()
            .raw(name, EntryType::Regular, b"", b"x", 0o644, 0, 0)
            .finish();
        assert_invalid(apply(&[tar]));
    }
    // A `..` that stays inside is folded lexically.
    let tar = LayerBuilder::new().file("a/../b", b"x").finish();
    let b = apply(&[tar]).unwrap();
    assert_eq!(b.paths(), vec!["/b"]);
}

#[test]
fn a2_absolute_names_land_in_the_image() {
    let tar = LayerBuilder::new()
        .file("/etc/passwd", b"root")
        .file("///etc/shadow", b"x")
        .finish();
    let mut b = apply(&[tar]).unwrap();
    assert_eq!(b.content("etc/passwd"), b"root");
    assert_eq!(b.content("etc/shadow"), b"x");
}

#[test]
fn a3_write_through_absolute_symlink_lands_in_image_etc() {
    let tar = LayerBuilder::new()
        .dir("etc")
        .symlink("localetc", "/etc")
        .file("localetc/unbroken", b"u")
        .finish();
    let mut b = apply(&[tar]).unwrap();
    assert_eq!(b.content("etc/unbroken"), b"u");
    assert_eq!(b.kind("localetc"), Some(Kind::Symlink(b"/etc".to_vec())));
}

#[test]
fn a4_relative_escape_chains_are_clamped() {
    let tar = LayerBuilder::new()
        .symlink("d1", "../../../../tmp")
        .symlink("x", "d1/..")
        .file("x/f", b"f")
        .file("d1/g", b"g")
        // containerd SymlinkUpAndOut / SymlinkMultipleRelative shapes.
        .dir("dir")
        .symlink("dir/loop", "../../../..")
        .file("dir/loop/up", b"up")
        .symlink("dir/rel", "../dir/../../../etc")
        .file("dir/rel/multi", b"m")
        .finish();
    let mut b = apply(&[tar]).unwrap();
    assert_eq!(b.content("f"), b"f");
    assert_eq!(b.content("tmp/g"), b"g");
    assert_eq!(b.content("up"), b"up");
    assert_eq!(b.content("etc/multi"), b"m");
}

#[test]
fn a5_link_then_file_replaces_the_link() {
    let tar = LayerBuilder::new()
        .symlink("victim", "/tmp/canary")
        .file("victim", b"data")
        .file("orig", b"original")
        .hardlink("hl", "orig")
        .file("hl", b"replaced")
        .finish();
    let mut b = apply(&[tar]).unwrap();
    assert_eq!(b.content("victim"), b"data");
    assert!(
        b.kind("tmp").is_none(),
        "nothing is created at the old target"
    );
    assert_eq!(b.content("orig"), b"original");
    assert_eq!(b.content("hl"), b"replaced");
    let orig = b.node_of("orig");
    assert_eq!(b.tree.node(orig).nlink, 1);
    // A hardlink to a path that is not in the image is rejected.
    let tar = LayerBuilder::new().hardlink("v", "/tmp/canary").finish();
    assert_invalid(apply(&[tar]));
}

#[test]
fn a6_hardlink_escapes_resolve_to_the_images_file() {
    let tar = LayerBuilder::new()
        .file("etc/passwd", b"image")
        .hardlink("l1", "/etc/passwd")
        .hardlink("l2", "../../../../etc/passwd")
        .symlink("breakouts/d1", "../../etc")
        .hardlink("l3", "breakouts/d1/passwd")
        .finish();
    let mut b = apply(&[tar]).unwrap();
    let passwd = b.node_of("etc/passwd");
    for l in ["l1", "l2", "l3"] {
        assert_eq!(b.node_of(l), passwd, "{l}");
    }
    assert_eq!(b.tree.node(passwd).nlink, 4);
}

#[test]
fn a7_metadata_through_links_stays_in_the_image() {
    let tar = LayerBuilder::new()
        .symlink("foo", "/tmp/canarydir")
        .dir_mode("foo", 0o777)
        .file_owned("secret", b"s", 0o400, 0, 0)
        .symlink("sl", "secret")
        .hardlink("hl", "sl")
        .finish();
    let mut b = apply(&[tar]).unwrap();
    let foo = b.node_of("foo");
    assert!(matches!(b.tree.node(foo).kind, Kind::Dir(_)));
    assert_eq!(b.tree.node(foo).meta.mode, 0o777);
    assert!(b.kind("tmp").is_none());
    // The hardlink names the symlink itself, not its target.
    assert_eq!(b.node_of("hl"), b.node_of("sl"));
    let secret = b.node_of("secret");
    assert_eq!(b.tree.node(secret).meta.mode, 0o400);
}

#[test]
fn a8_root_replacement_is_rejected() {
    for name in [&b"."[..], b"/", b"./"] {
        let tar = LayerBuilder::new()
            .raw(name, EntryType::Symlink, b"/tmp/x", b"", 0o777, 0, 0)
            .finish();
        assert_invalid(apply(&[tar]));
    }
    let tar = LayerBuilder::new()
        .raw(b"./", EntryType::Directory, b"", b"", 0o700, 0, 0)
        .finish();
    let b = apply(&[tar]).unwrap();
    assert_eq!(b.tree.node(crate::tree::ROOT).meta.mode, 0o700);
}

#[test]
fn a9_bad_whiteouts_are_rejected() {
    for name in [&b".wh.."[..], b".wh...", b"etc/.wh..", b".wh./", b".wh.x/y"] {
        let tar = LayerBuilder::new()
            .raw(name, EntryType::Regular, b"", b"", 0o644, 0, 0)
            .finish();
        assert_invalid(apply(&[tar]));
    }
}

#[test]
fn a9_whiteouts_never_follow_the_last_component() {
    let lower = LayerBuilder::new()
        .file("etc/passwd", b"p")
        .file("etc/group", b"g")
        .symlink("localetc", "/etc")
        .finish();
    let upper = LayerBuilder::new()
        .file("localetc/.wh.passwd", b"")
        .finish();
    let mut b = apply(&[lower.clone(), upper]).unwrap();
    assert!(b.kind("etc/passwd").is_none());
    assert_eq!(b.content("etc/group"), b"g");
    assert!(b.kind("localetc").is_some());

    let upper = LayerBuilder::new().file(".wh.localetc", b"").finish();
    let mut b = apply(&[lower, upper]).unwrap();
    assert!(b.kind("localetc").is_none());
    assert_eq!(b.content("etc/passwd"), b"p");
}

#[test]
fn a10_opaque_applies_to_lower_layers_wherever_it_sits() {
    let lower = LayerBuilder::new()
        .file("d/a", b"a")
        .file("d/b", b"b")
        .file("d/sub/x", b"x")
        .file("keep", b"k")
        .finish();
    let upper = LayerBuilder::new()
        .file("d/c", b"c")
        .file("d/sub/y", b"y")
        .file("d/.wh..wh..opq", b"")
        .finish();
    let b = apply(&[lower, upper]).unwrap();
    assert_eq!(b.paths(), vec!["/d", "/d/c", "/d/sub", "/d/sub/y", "/keep"]);
}

#[test]
fn whiteout_hides_only_lower_layers() {
    let lower = LayerBuilder::new().file("gone", b"1").finish();
    let upper = LayerBuilder::new()
        .file("same", b"2")
        .file(".wh.same", b"")
        .file(".wh.gone", b"")
        .file(".wh.never-existed", b"")
        .finish();
    let b = apply(&[lower, upper]).unwrap();
    assert_eq!(b.paths(), vec!["/same"]);
}

#[test]
fn a11_device_numbers_out_of_range_are_rejected() {
    let tar = LayerBuilder::new()
        .device("dev/big", EntryType::Char, 0o7777777, 1)
        .finish();
    assert_invalid(apply(&[tar]));
    // Base-256 (binary) device fields cannot be parsed as numbers.
    let mut tar = LayerBuilder::new()
        .device("dev/neg", EntryType::Char, 1, 1)
        .finish();
    tar[329] = 0xff;
    let mut h = tar::Header::from_byte_slice(&tar[..512]).clone();
    h.set_cksum();
    tar[..512].copy_from_slice(h.as_bytes());
    assert_invalid(apply(&[tar]));
}

#[test]
fn a12_privileged_metadata_is_kept_and_overlay_xattrs_dropped() {
    let tar = LayerBuilder::new()
        .pax_file(
            "bin/ping",
            &[
                ("SCHILY.xattr.security.capability", &[1, 0, 0, 2, 0, 32][..]),
                ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
                ("SCHILY.xattr.user.note", b"n"),
                ("SCHILY.xattr.bogus.ns", b"z"),
                ("mtime", b"1234567890.5"),
            ],
            b"elf",
        )
        .dir_mode("tmp", 0o1777)
        .file_owned("bin/su", b"su", 0o4755, 0, 0)
        .file_owned("bin/wall", b"w", 0o2755, 0, 5)
        .finish();
    let mut b = apply(&[tar]).unwrap();
    let ping = b.node_of("bin/ping");
    let meta = &b.tree.node(ping).meta;
    let names: Vec<&[u8]> = meta.xattrs.keys().map(|k| k.as_slice()).collect();
    assert_eq!(names, vec![&b"security.capability"[..], b"user.note"]);
    assert_eq!(meta.mtime, 1_234_567_890);
    let tmp = b.node_of("tmp");
    assert_eq!(b.tree.node(tmp).meta.mode, 0o1777);
    let su = b.node_of("bin/su");
    assert_eq!(b.tree.node(su).meta.mode, 0o4755);
    let wall = b.node_of("bin/wall");
    assert_eq!(b.tree.node(wall).meta.mode, 0o2755);

    let big = vec![7u8; 70 << 10];
    let tar = LayerBuilder::new()
        .pax_file("f", &[("SCHILY.xattr.user.big", &big[..])], b"")
        .finish();
    assert_limit(apply(&[tar]));
}

#[test]
fn a13_huge_declared_size_stops_before_reading() {
    let mut h = tar::Header::new_gnu();
    h.set_path("huge").unwrap();
    h.set_size(1 << 40);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    // Only the header and a little data: the builder must refuse on the declared size.
    let mut tar = h.as_bytes().to_vec();
    tar.extend_from_slice(&[0u8; 4096]);
    assert_limit(apply(&[tar]));
}

#[test]
fn a13_total_size_quota() {
    let tar = LayerBuilder::new()
        .file("a", &[1u8; 40_000])
        .file("b", &[2u8; 40_000])
        .finish();
    let limits = Limits {
        max_total_size: 60_000,
        ..Limits::default()
    };
    assert_limit(apply_with(&[tar], limits));
}

#[test]
fn a14_shape_limits() {
    let limits = Limits {
        max_entries: 10,
        ..Limits::default()
    };
    let mut l = LayerBuilder::new();
    for i in 0..20 {
        l = l.file(&format!("f{i}"), b"");
    }
    assert_limit(apply_with(&[l.finish()], limits));

    let limits = Limits {
        max_depth: 8,
        ..Limits::default()
    };
    let deep = "a/".repeat(20) + "f";
    let tar = LayerBuilder::new().file(&deep, b"").finish();
    assert_limit(apply_with(&[tar], limits.clone()));
    // Depth reached through symlinks counts too.
    let tar = LayerBuilder::new()
        .file("a/b/c/d/e/f/g/h", b"")
        .symlink("a/b/c/d/e/f/g/s", "/a/b/c/d/e/f/g")
        .file("a/b/c/d/e/f/g/s/x", b"")
        .finish();
    assert!(apply_with(&[tar], limits).is_err());

    let long = "n".repeat(256);
    let tar = LayerBuilder::new()
        .pax_file("placeholder", &[("path", long.as_bytes())], b"")
        .finish();
    assert_limit(apply(&[tar]));

    let limits = Limits {
        max_links: 5,
        ..Limits::default()
    };
    let mut l = LayerBuilder::new().file("t", b"t");
    for i in 0..10 {
        l = l.hardlink(&format!("l{i}"), "t");
    }
    assert_limit(apply_with(&[l.finish()], limits));

    // A symlink loop fails instead of spinning.
    let tar = LayerBuilder::new()
        .symlink("a", "b")
        .symlink("b", "a")
        .file("a/x", b"")
        .finish();
    assert_invalid(apply(&[tar]));
}

#[test]
fn a15_decompression_bomb_stops_at_the_ratio() {
    let tar = LayerBuilder::new()
        .file("zeros", &vec![0u8; 8 << 20])
        .finish();
    let limits = Limits {
        max_ratio: 50,
        ratio_floor: 1 << 20,
        ..Limits::default()
    };
    assert_limit(apply_with(&[gzip(&tar)], limits.clone()));
    assert_limit(apply_with(&[zstd(&tar)], limits));
}

#[test]
fn a15_corrupt_streams_fail() {
    let tar = LayerBuilder::new().file("f", &[5u8; 100_000]).finish();
    let gz = gzip(&tar);
    let zs = zstd(&tar);
    let truncated_gz = gz[..gz.len() / 2].to_vec();
    let truncated_zs = zs[..zs.len() / 2].to_vec();
    let mut bad_crc = gz.clone();
    let n = bad_crc.len();
    bad_crc[n - 8] ^= 0xff;
    let mut trailing = gz.clone();
    trailing.extend_from_slice(b"garbage after the gzip member");
    let truncated_tar = tar[..1024].to_vec();
    for (what, layer) in [
        ("truncated gzip", truncated_gz),
        ("truncated zstd", truncated_zs),
        ("bad crc", bad_crc),
        ("trailing garbage", trailing),
        ("truncated tar", truncated_tar),
    ] {
        let err = apply(&[layer]).err();
        assert!(
            matches!(err, Some(Error::CorruptStream(_))),
            "{what}: {err:?}"
        );
    }
}

#[test]
fn a16_diff_id_is_verified() {
    let tar = LayerBuilder::new().file("f", b"x").finish();
    let right = crate::digest::sha256(&tar);
    let dir = tempfile::tempdir().unwrap();
    let mut blobs = BlobStore::create(&dir.path().join("b")).unwrap();
    let mut tree = Tree::new(Limits::default());
    let mut totals = Totals::default();
    let stats = apply_layer(
        &mut tree,
        &mut blobs,
        &gzip(&tar)[..],
        Some(&right),
        &mut totals,
        &NoProgress,
    )
    .unwrap();
    assert_eq!(stats.diff_id, right);
    assert_eq!(stats.compression, Compression::Gzip);
    let wrong = crate::digest::sha256(b"other");
    let err = apply_layer(
        &mut tree,
        &mut blobs,
        &tar[..],
        Some(&wrong),
        &mut totals,
        &NoProgress,
    )
    .unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
}

#[test]
fn a16_pax_size_overrides_ustar_size() {
    // ustar size 0 but PAX size=5: the five bytes are the file's content, not headers.
    let mut hidden = tar::Header::new_ustar();
    hidden.set_path("hidden").unwrap();
    hidden.set_size(0);
    hidden.set_mode(0o644);
    hidden.set_cksum();
    let mut payload = hidden.as_bytes().to_vec();
    payload.truncate(5);
    let mut l = LayerBuilder::new();
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("size", &b"5"[..])]).unwrap();
    let pax = b.get_ref().clone();
    let mut h = tar::Header::new_ustar();
    h.set_path("f").unwrap();
    h.set_size(0);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    let mut raw = pax;
    raw.extend_from_slice(h.as_bytes());
    let mut data = payload.clone();
    data.resize(512, 0);
    raw.extend_from_slice(&data);
    l = l.raw_bytes(&raw).file("after", b"a");
    let mut built = apply(&[l.finish()]).unwrap();
    assert_eq!(built.paths(), vec!["/after", "/f"]);
    assert_eq!(built.content("f"), payload);
}

#[test]
fn a16_duplicates_last_wins() {
    let tar = LayerBuilder::new()
        .file("f", b"first")
        .file("f", b"second")
        .dir("d")
        .file("d/x", b"x")
        .file("d", b"now a file")
        .finish();
    let mut b = apply(&[tar]).unwrap();
    assert_eq!(b.content("f"), b"second");
    assert_eq!(b.content("d"), b"now a file");
    assert_eq!(b.paths(), vec!["/d", "/f"]);
}

#[test]
fn replaced_files_free_their_spool() {
    let lower = LayerBuilder::new().file("big", &[1u8; 10_000]).finish();
    let upper = LayerBuilder::new().file(".wh.big", b"").finish();
    let b = apply(&[lower, upper]).unwrap();
    let left = std::fs::read_dir(b.blobs.path()).unwrap().count();
    assert_eq!(left, 0, "the whited-out file's spool was removed");
}

#[test]
fn hardlink_survives_removal_of_the_first_name() {
    let lower = LayerBuilder::new()
        .file("a", b"shared")
        .hardlink("b", "a")
        .finish();
    let upper = LayerBuilder::new().file(".wh.a", b"").finish();
    let mut b = apply(&[lower, upper]).unwrap();
    assert_eq!(b.content("b"), b"shared");
    let id = b.node_of("b");
    assert_eq!(b.tree.node(id).nlink, 1);
}

#[test]
fn empty_numeric_fields_read_as_zero_but_garbage_is_rejected() {
    let mut h = tar::Header::new_gnu();
    h.set_path("f").unwrap();
    h.set_size(0);
    h.set_mode(0o600);
    h.set_cksum(); // uid, gid, mtime left empty, as some writers do
    let mut tar = h.as_bytes().to_vec();
    tar.extend_from_slice(&[0u8; 1024]);
    let mut b = apply(&[tar.clone()]).unwrap();
    let f = b.node_of("f");
    assert_eq!((b.tree.node(f).meta.uid, b.tree.node(f).meta.mtime), (0, 0));

    tar[108..115].copy_from_slice(b"zzzzzzz");
    let mut h = tar::Header::from_byte_slice(&tar[..512]).clone();
    h.set_cksum();
    tar[..512].copy_from_slice(h.as_bytes());
    assert_invalid(apply(&[tar]));
}
