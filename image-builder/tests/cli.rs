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

fn is_root_with_e2fsprogs(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root()
        || !Path::new("/usr/sbin/mkfs.ext4").exists() && !Path::new("/sbin/mkfs.ext4").exists()
    {
        eprintln!("SKIP {test}: needs root and e2fsprogs");
        return false;
    }
    true
}

/// A legacy `docker save` archive with one layer holding `files`.
fn docker_archive(out: &Path, files: &[(&str, Vec<u8>)]) {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_path(name).unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, &data[..]).unwrap();
    }
    let layer = b.into_inner().unwrap();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha(&layer))]},
    }))
    .unwrap();
    let cname = format!("{}.json", sha(&config));
    let manifest = serde_json::to_vec(&serde_json::json!([
        {"Config": cname, "RepoTags": ["app:1"], "Layers": ["l0/layer.tar"]}
    ]))
    .unwrap();
    let mut ar = tar::Builder::new(std::fs::File::create(out).unwrap());
    for (name, data) in [
        (cname.as_str(), &config),
        ("l0/layer.tar", &layer),
        ("manifest.json", &manifest),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_path(name).unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        ar.append(&h, &data[..]).unwrap();
    }
    ar.finish().unwrap();
}

/// Runs the CLI with `PATH` set to `path` only (plus the system dirs the builder needs).
fn run_with_path(cache: &Path, path: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_agentvm-image"))
        .args(args)
        .env("AGENTVM_IMAGE_CACHE", cache)
        .env("PATH", path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn fake_docker(dir: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join("docker");
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn docker_daemon_errors_say_what_to_do() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache");
    let empty = t.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (ok, _, err) = run_with_path(
        &cache,
        empty.to_str().unwrap(),
        &["build", "docker-daemon:alpine:3"],
    );
    assert!(!ok && err.contains("needs the docker CLI"), "{err}");

    let bin = t.path().join("bin");
    fake_docker(
        &bin,
        "echo 'Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?' >&2; exit 1",
    );
    let path = format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bin.display());
    let (ok, _, err) = run_with_path(&cache, &path, &["build", "docker-daemon:alpine:3"]);
    assert!(!ok && err.contains("Docker daemon is not running"), "{err}");

    fake_docker(
        &bin,
        "echo 'Error response from daemon: No such image: nope:1' >&2; exit 1",
    );
    let (ok, _, err) = run_with_path(&cache, &path, &["build", "docker-daemon:nope:1"]);
    assert!(
        !ok && err.contains("pull or build the image first"),
        "{err}"
    );
}

#[test]
fn docker_daemon_builds_through_docker_save() {
    if !is_root_with_e2fsprogs("docker_daemon_builds_through_docker_save") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let fixture = t.path().join("saved.tar");
    docker_archive(&fixture, &[("etc/app", b"from the daemon".to_vec())]);
    let bin = t.path().join("bin");
    // Checks the exact command line: docker save -o FILE NAME.
    fake_docker(
        &bin,
        &format!(
            "[ \"$1\" = save ] && [ \"$2\" = -o ] && [ \"$4\" = app:1 ] && [ $# = 4 ] || exit 3\ncp '{}' \"$3\"",
            fixture.display()
        ),
    );
    let path = format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bin.display());
    let cache = t.path().join("cache");
    let (ok, out, err) = run_with_path(&cache, &path, &["build", "docker-daemon:app:1"]);
    assert!(ok, "{err}");
    let rootfs = out.trim();
    let cat = Command::new("debugfs")
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .args(["-R", "cat /etc/app", rootfs])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "from the daemon");
    assert_eq!(
        std::fs::read_dir(cache.join("tmp")).unwrap().count(),
        0,
        "the saved archive is removed"
    );
    let (ok, out, _) = run_with_path(&cache, &path, &["ls"]);
    assert!(ok && out.contains("docker-daemon:app:1"), "{out}");
}

/// An OCI layout with one uncompressed layer of `files` files of `size` bytes each.
fn big_layout(dir: &Path, files: usize, size: usize) {
    let mut b = tar::Builder::new(Vec::with_capacity(files * (size + 1024)));
    for i in 0..files {
        let mut h = tar::Header::new_gnu();
        h.set_path(format!("d{}/f{i}", i % 16)).unwrap();
        h.set_size(size as u64);
        h.set_mode(0o644);
        h.set_cksum();
        let mut data = vec![i as u8; size];
        data[..8].copy_from_slice(&(i as u64).to_le_bytes());
        b.append(&h, &data[..]).unwrap();
    }
    let layer = b.into_inner().unwrap();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
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

fn fsck(p: &str) -> bool {
    Command::new("e2fsck")
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .args(["-fn", p])
        .output()
        .unwrap()
        .status
        .success()
}

/// Kills a child on drop (a failed assertion must not leave a builder running).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// SIGKILL at two points (while applying the layer, while mkfs.ext4 runs): nothing is
/// published or recorded, no tool is left running, and the next build succeeds and
/// collects the dead work dir.
#[test]
fn sigkill_mid_build_leaves_nothing_served() {
    if !is_root_with_e2fsprogs("sigkill_mid_build_leaves_nothing_served") {
        return;
    }
    use std::io::{BufRead, BufReader};
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("layout");
    big_layout(&dir, 1200, 64 << 10);
    let reference = format!("oci:{}", dir.display());
    for kill_at in ["layer 1/1", "building ext4"] {
        let cache = t
            .path()
            .join(format!("cache-{}", kill_at.replace(' ', "-")));
        let mut child = KillOnDrop(
            Command::new(env!("CARGO_BIN_EXE_agentvm-image"))
                .args(["build", &reference])
                .env("AGENTVM_IMAGE_CACHE", &cache)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let stderr = child.0.stderr.take().unwrap();
        let mut seen = String::new();
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap();
            seen.push_str(&line);
            seen.push('\n');
            if line.starts_with(kill_at) {
                break;
            }
        }
        assert!(seen.contains(kill_at), "never reached {kill_at:?}: {seen}");
        std::thread::sleep(std::time::Duration::from_millis(150));
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "the build finished before the kill at {kill_at:?}; make the layer bigger"
        );
        let pid = child.0.id();
        child.0.kill().unwrap(); // SIGKILL
        child.0.wait().unwrap();
        // No tool outlives the builder (PR_SET_PDEATHSIG).
        std::thread::sleep(std::time::Duration::from_millis(200));
        let orphans = Command::new("pgrep")
            .arg("-f")
            .arg(cache.to_str().unwrap())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        assert!(
            orphans.trim().is_empty(),
            "left running after kill of {pid}: {orphans}"
        );
        assert_eq!(
            std::fs::read_dir(cache.join("images")).unwrap().count(),
            0,
            "nothing published after a kill at {kill_at:?}"
        );
        let (ok, out, _) = run(&cache, &["ls"]);
        assert!(ok && !out.contains(&reference), "{out}");
        assert!(std::fs::read_dir(cache.join("tmp")).unwrap().count() > 0);

        let (ok, out, err) = run(&cache, &["build", "-q", &reference]);
        assert!(ok, "{err}");
        assert!(fsck(out.trim()));
        assert_eq!(
            std::fs::read_dir(cache.join("tmp")).unwrap().count(),
            0,
            "the dead work dir is collected"
        );
    }
}

/// Unmounts on drop.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn full_cache_disk_fails_cleanly() {
    if !is_root_with_e2fsprogs("full_cache_disk_fails_cleanly") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("layout");
    big_layout(&dir, 200, 64 << 10); // 12.5 MiB of content
    let cache = t.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    if let Err(e) = nix::mount::mount(
        Some("tmpfs"),
        &cache,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=4m,mode=0700"),
    ) {
        eprintln!("SKIP full_cache_disk_fails_cleanly: cannot mount a tmpfs here: {e}");
        return;
    }
    let _m = Mount(cache.clone());
    let reference = format!("oci:{}", dir.display());
    let (ok, _, err) = run(&cache, &["build", &reference]);
    assert!(!ok);
    assert!(
        err.contains("is full") && err.contains("nothing was published"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(cache.join("images")).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(cache.join("tmp")).unwrap().count(), 0);
}
