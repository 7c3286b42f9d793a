//! The `agentvm-image` binary end to end on a generated OCI layout. Needs root and
//! e2fsprogs (ownership in staging, mkfs.ext4); skips with a printed reason otherwise.

use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

fn sha(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn put(dir: &Path, data: &[u8], media: &str) -> serde_json::Value {
    let h = sha(data);
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("blobs/sha256").join(&h), data).unwrap();
    serde_json::json!({"mediaType": media, "digest": format!("sha256:{h}"), "size": data.len()})
}

fn layout(dir: &Path) {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_path("etc/motd").unwrap();
    h.set_size(5);
    h.set_mode(0o644);
    h.set_cksum();
    b.append(&h, &b"hello"[..]).unwrap();
    let layer = b.into_inner().unwrap();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/bin/sh"], "Cmd": ["-c", "true"], "WorkingDir": "/srv", "User": "1000"},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha(&layer))]},
    }))
    .unwrap();
    let c = put(dir, &config, "application/vnd.oci.image.config.v1+json");
    let l = put(dir, &layer, "application/vnd.oci.image.layer.v1.tar");
    let m = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": c, "layers": [l],
    }))
    .unwrap();
    let md = put(dir, &m, "application/vnd.oci.image.manifest.v1+json");
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [md]})).unwrap(),
    )
    .unwrap();
}

fn run(cache: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_agentvm-image"))
        .args(args)
        .env("AGENTVM_IMAGE_CACHE", cache)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn build_ls_inspect_rm_prune() {
    if !nix::unistd::geteuid().is_root()
        || !Path::new("/usr/sbin/mkfs.ext4").exists() && !Path::new("/sbin/mkfs.ext4").exists()
    {
        eprintln!("SKIP build_ls_inspect_rm_prune: needs root and e2fsprogs");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("layout");
    layout(&dir);
    let cache = t.path().join("cache");
    let reference = format!("oci:{}", dir.display());

    let (ok, out, err) = run(&cache, &["build", &reference]);
    assert!(ok, "{err}");
    let path = out.trim().to_owned();
    assert!(path.starts_with(cache.to_str().unwrap()) && path.ends_with("rootfs.ext4"));
    assert!(
        err.contains("building ext4"),
        "plain progress lines off a terminal: {err}"
    );

    let (ok, out2, err) = run(&cache, &["build", "--quiet", &reference]);
    assert!(ok && err.is_empty(), "{err}");
    assert_eq!(out2.trim(), path, "served from the cache");

    let copy = t.path().join("copy.ext4");
    let (ok, out, err) = run(
        &cache,
        &["-q", "build", &reference, "-o", copy.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    assert_eq!(out.trim(), copy.to_str().unwrap());
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&path).unwrap());

    let (ok, out, _) = run(&cache, &["ls"]);
    assert!(ok && out.contains(&reference), "{out}");

    let (ok, out, _) = run(&cache, &["inspect", &reference]);
    assert!(ok, "{out}");
    assert!(out.contains(r#"Entrypoint: ["/bin/sh"]"#), "{out}");
    assert!(
        out.contains("WorkingDir: /srv") && out.contains("User:       1000"),
        "{out}"
    );

    let (ok, _, err) = run(&cache, &["rm", &reference]);
    assert!(ok, "{err}");
    assert!(!Path::new(&path).exists());
    let (ok, _, err) = run(&cache, &["rm", &reference]);
    assert!(!ok && err.contains("not in the cache"), "{err}");
    let (ok, out, _) = run(&cache, &["prune"]);
    assert!(ok && out.starts_with("removed"), "{out}");
}

#[test]
fn hostile_reference_fails_cleanly() {
    let t = tempfile::tempdir().unwrap();
    let (ok, _, err) = run(t.path(), &["build", "oci:/nonexistent/layout"]);
    assert!(!ok);
    assert!(err.contains("not an OCI image layout"), "{err}");
}
