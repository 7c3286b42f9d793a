//! End to end against a real registry: Debian's `docker-registry` (distribution v2),
//! started on a free loopback port with a private storage dir. Needs root, e2fsprogs and
//! docker-registry; skips with a printed reason otherwise, except under
//! `AGENTVM_REQUIRE_VM=1` (CI), where a missing prerequisite fails the test.

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::ext4::find_tool;
use crate::testutil::*;
use crate::{build, BuildOptions, ImageRef, Platform, Progress, RegistryOptions};

fn prerequisites(test: &str) -> Option<PathBuf> {
    let reason = if !nix::unistd::geteuid().is_root() {
        Some("needs root".to_owned())
    } else if ["mkfs.ext4", "debugfs", "e2fsck"]
        .iter()
        .any(|t| find_tool(t).is_err())
    {
        Some("needs e2fsprogs (apt-get install e2fsprogs)".to_owned())
    } else {
        None
    };
    let registry = ["/usr/bin/docker-registry", "/usr/local/bin/docker-registry"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file());
    let reason = reason.or_else(|| {
        registry
            .is_none()
            .then(|| "needs docker-registry (apt-get install docker-registry)".to_owned())
    });
    match reason {
        None => registry,
        Some(r) if std::env::var("AGENTVM_REQUIRE_VM").as_deref() == Ok("1") => {
            panic!("{test}: {r} (AGENTVM_REQUIRE_VM=1: not skipping; run hack/install-deps.sh)")
        }
        Some(r) => {
            eprintln!("SKIP {test}: {r}");
            None
        }
    }
}

/// A running `docker-registry`, killed on drop whatever happens in the test.
struct Registry {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
    log: PathBuf,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    fn start(bin: &Path, htpasswd: Option<&str>) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let auth = match htpasswd {
            Some(line) => {
                let p = dir.path().join("htpasswd");
                std::fs::write(&p, format!("{line}\n")).unwrap();
                format!(
                    "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                    p.display()
                )
            }
            None => String::new(),
        };
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: {addr}\n  secret: test-secret\n{auth}",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let log = dir.path().join("registry.log");
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.path().join("registry.err")).unwrap())
            .spawn()
            .unwrap();
        let mut reg = Registry {
            child,
            addr,
            _dir: dir,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&reg.addr).is_err() {
            if let Ok(Some(st)) = reg.child.try_wait() {
                panic!(
                    "docker-registry exited ({st}): {}",
                    std::fs::read_to_string(reg._dir.path().join("registry.err"))
                        .unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "docker-registry did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = &reg.log;
        reg
    }
}

/// Pushes every blob and manifest of an OCI layout, tagging the top one `reference`.
fn push_layout(layout: &Path, reference: &str, auth: &RegistryAuth) {
    let r: Reference = reference.parse().unwrap();
    crate::registry::install_crypto();
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let top = index["manifests"][0]["digest"].as_str().unwrap().to_owned();
    rt.block_on(async {
        client
            .auth(&r, auth, oci_client::RegistryOperation::Push)
            .await
            .unwrap();
        let mut manifests = Vec::new();
        for e in std::fs::read_dir(layout.join("blobs/sha256")).unwrap() {
            let e = e.unwrap();
            let data = std::fs::read(e.path()).unwrap();
            let d = format!("sha256:{}", e.file_name().to_string_lossy());
            let media = serde_json::from_slice::<serde_json::Value>(&data)
                .ok()
                .and_then(|v| v["mediaType"].as_str().map(str::to_owned))
                .filter(|m| m.contains("manifest") || m.contains("index"));
            match media {
                Some(m) => manifests.push((d, m, data)),
                None => {
                    client.push_blob(&r, data, &d).await.unwrap();
                }
            }
        }
        // Image manifests before the index that names them.
        manifests.sort_by_key(|(_, m, _)| m.contains("index"));
        for (d, m, data) in manifests {
            let target = if d == top {
                r.clone()
            } else {
                r.clone_with_digest(d)
            };
            client
                .push_manifest_raw(&target, data, m.parse().unwrap())
                .await
                .unwrap();
        }
    });
}

/// Every path of an ext4 with its type/mode, owner, size, content and hardlink set.
fn listing(img: &Path) -> BTreeMap<String, String> {
    let debugfs = find_tool("debugfs").unwrap();
    let run = |req: &str| -> String {
        let out = Command::new(&debugfs)
            .arg("-R")
            .arg(req)
            .arg(img)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut entries: Vec<(String, String, String)> = Vec::new(); // (path, inode, attrs)
    let mut dirs = vec!["/".to_owned()];
    while let Some(dir) = dirs.pop() {
        for line in run(&format!("ls -p \"{dir}\"")).lines() {
            // /inode/mode/uid/gid/name/size/
            let f: Vec<&str> = line.split('/').collect();
            if f.len() < 7 || f[5] == "." || f[5] == ".." || f[5].is_empty() {
                continue;
            }
            let path = format!("{}{}", dir, f[5]);
            let mode = u32::from_str_radix(f[2], 8).unwrap();
            let mut attrs = format!("mode={:o} uid={} gid={} size={}", mode, f[3], f[4], f[6]);
            match mode & 0o170000 {
                0o040000 => {
                    attrs = format!("mode={:o} uid={} gid={}", mode, f[3], f[4]);
                    dirs.push(format!("{path}/"));
                }
                0o100000 => {
                    let data = run(&format!("cat \"{path}\""));
                    attrs.push_str(&format!(" sha={}", crate::digest::sha256(data.as_bytes())));
                }
                0o120000 => {
                    let st = run(&format!("stat \"{path}\""));
                    let target = st
                        .lines()
                        .find_map(|l| l.trim().strip_prefix("Fast link dest: "))
                        .unwrap_or("?")
                        .to_owned();
                    attrs.push_str(&format!(" -> {target}"));
                }
                _ => {}
            }
            entries.push((path, f[1].to_owned(), attrs));
        }
    }
    let mut by_inode: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (p, ino, _) in &entries {
        by_inode.entry(ino.clone()).or_default().push(p.clone());
    }
    entries
        .into_iter()
        .map(|(p, ino, attrs)| {
            let mut links = by_inode[&ino].clone();
            links.sort();
            let links = if links.len() > 1 {
                format!(" links={}", links.join(","))
            } else {
                String::new()
            };
            (p, format!("{attrs}{links}"))
        })
        .collect()
}

fn fsck_ok(p: &Path) {
    let out = Command::new(find_tool("e2fsck").unwrap())
        .arg("-fn")
        .arg(p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "e2fsck -fn {}: {}",
        p.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Layers that exercise whiteouts, an opaque dir, hardlinks across layers and owners.
fn test_layers() -> Vec<Vec<u8>> {
    let base = LayerBuilder::new()
        .dir("etc")
        .file("etc/os-release", b"ID=agentvm-test\n")
        .file("etc/gone", b"removed by a whiteout")
        .dir("opq")
        .file("opq/old-a", b"a")
        .file("opq/old-b", b"b")
        .dir("bin")
        .file_owned("bin/busybox", &[7u8; 70_000], 0o4755, 0, 0)
        .hardlink("bin/sh", "bin/busybox")
        .symlink("bin/ls", "busybox")
        .finish();
    let mid = LayerBuilder::new()
        .file(".wh.etc", b"")
        .dir("etc")
        .file("etc/hostname", b"box\n")
        .file_owned("home/u/.profile", b"PS1=x", 0o600, 1000, 1000)
        .finish();
    let top = LayerBuilder::new()
        .file("opq/new", b"n")
        .file("opq/.wh..wh..opq", b"")
        .hardlink("bin/cat", "bin/busybox")
        .file("bin/.wh.ls", b"")
        .file_owned("srv/data", &[1u8; 5000], 0o640, 33, 33)
        .hardlink("srv/data2", "srv/data")
        .finish();
    vec![base, mid, top]
}

#[derive(Default)]
struct Fetches(Mutex<Vec<String>>);

impl Progress for Fetches {
    fn fetch_start(&self, _: usize, _: usize, digest: &str, _: Option<u64>) {
        self.0.lock().unwrap().push(digest.to_owned());
    }
}

#[test]
fn registry_pull_matches_local_sources() {
    let Some(bin) = prerequisites("registry_pull_matches_local_sources") else {
        return;
    };
    let reg = Registry::start(&bin, None);
    let t = tempfile::tempdir().unwrap();
    let layers = test_layers();
    let other = vec![LayerBuilder::new().file("arm", b"arm64").finish()];
    let layout = t.path().join("layout");
    write_multiarch_layout(&layout, &layers, &other);
    let reference = format!("{}/test/img:v1", reg.addr);
    push_layout(&layout, &reference, &RegistryAuth::Anonymous);

    // The registry path, resolving the index to the host platform (amd64 here) with
    // plain HTTP chosen automatically for loopback.
    let cache = t.path().join("cache-registry");
    let fetches = Fetches::default();
    let opts = BuildOptions {
        progress: &fetches,
        ..BuildOptions::new(&cache)
    };
    let r = ImageRef::parse(&reference).unwrap();
    assert_eq!(r.to_string(), reference);
    let pulled = build(&r, &opts).unwrap();
    assert!(!pulled.cached);
    fsck_ok(&pulled.rootfs);
    assert_eq!(
        fetches.0.lock().unwrap().len(),
        3,
        "three layers downloaded"
    );
    assert_eq!(
        pulled.config.config.cmd.as_deref(),
        Some(&["amd64".to_owned()][..])
    );

    // The same image from the OCI layout and from a docker archive, each in its own
    // cache so that each is really built.
    let from_layout = build(
        &ImageRef::parse(&format!("oci:{}", layout.display())).unwrap(),
        &BuildOptions::new(&t.path().join("cache-oci")),
    )
    .unwrap();
    let ar = t.path().join("img.tar");
    write_docker_archive(&ar, &layers, "test/img:v1");
    let from_archive = build(
        &ImageRef::parse(&format!("docker-archive:{}", ar.display())).unwrap(),
        &BuildOptions::new(&t.path().join("cache-archive")),
    )
    .unwrap();
    assert!(!from_layout.cached && !from_archive.cached);
    let want = listing(&pulled.rootfs);
    assert_eq!(listing(&from_layout.rootfs), want);
    assert_eq!(listing(&from_archive.rootfs), want);
    // What the layers promise.
    assert!(!want.contains_key("/etc/gone") && !want.contains_key("/etc/os-release"));
    assert!(want.contains_key("/etc/hostname"));
    assert!(want.contains_key("/opq/new") && !want.contains_key("/opq/old-a"));
    assert!(!want.contains_key("/bin/ls") && !want.keys().any(|k| k.contains(".wh.")));
    assert!(
        want["/bin/busybox"].contains("mode=104755")
            && want["/bin/busybox"].contains("links=/bin/busybox,/bin/cat,/bin/sh"),
        "{}",
        want["/bin/busybox"]
    );
    assert!(want["/srv/data"].contains("uid=33 gid=33") && want["/srv/data"].contains("links="));
    assert!(want["/home/u/.profile"].contains("mode=100600 uid=1000 gid=1000"));

    // A second build is served from the cache without downloading anything.
    let start = Instant::now();
    let again = build(&r, &opts).unwrap();
    assert!(again.cached);
    assert_eq!(again.rootfs, pulled.rootfs);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(fetches.0.lock().unwrap().len(), 3);

    // --platform picks the other manifest of the index.
    let arm = Platform::parse("linux/arm64").unwrap();
    let arm_img = build(
        &r,
        &BuildOptions {
            platform: Some(&arm),
            ..opts
        },
    )
    .unwrap();
    assert_eq!(
        arm_img.config.config.cmd.as_deref(),
        Some(&["arm64".to_owned()][..])
    );
    assert!(listing(&arm_img.rootfs).contains_key("/arm"));

    // An image sharing the two lower layers downloads only its own top layer.
    let mut shared = layers[..2].to_vec();
    shared.push(LayerBuilder::new().file("extra", b"x").finish());
    let layout2 = t.path().join("layout2");
    write_oci_layout(&layout2, &shared, "v2");
    let reference2 = format!("{}/test/other:v2", reg.addr);
    push_layout(&layout2, &reference2, &RegistryAuth::Anonymous);
    fetches.0.lock().unwrap().clear();
    let second = build(&ImageRef::parse(&reference2).unwrap(), &opts).unwrap();
    assert!(!second.cached);
    fsck_ok(&second.rootfs);
    let fetched = fetches.0.lock().unwrap().clone();
    assert_eq!(fetched.len(), 1, "only the new layer: {fetched:?}");
    assert!(listing(&second.rootfs).contains_key("/extra"));

    // Unknown tags and unreachable registries fail with what to do.
    let err = build(
        &ImageRef::parse(&format!("{}/test/img:nope", reg.addr)).unwrap(),
        &opts,
    )
    .unwrap_err();
    assert!(err.to_string().contains("test/img:nope"), "{err}");
}

#[test]
fn registry_basic_auth_from_docker_config() {
    let Some(bin) = prerequisites("registry_basic_auth_from_docker_config") else {
        return;
    };
    // bcrypt of "s3cret" (cost 5), for user "agent".
    let reg = Registry::start(
        &bin,
        Some("agent:$2b$05$vSmrXFg2k2gk8fNJd.LA5eYhR7aWwNQXAqpmVzTdXiu3jInVGLHx6"),
    );
    let t = tempfile::tempdir().unwrap();
    let layout = t.path().join("layout");
    write_oci_layout(
        &layout,
        &[LayerBuilder::new().file("secret", b"x").finish()],
        "v1",
    );
    let reference = format!("{}/private/img:v1", reg.addr);
    push_layout(
        &layout,
        &reference,
        &RegistryAuth::Basic("agent".into(), "s3cret".into()),
    );
    let r = ImageRef::parse(&reference).unwrap();
    let cache = t.path().join("cache");

    let none = RegistryOptions {
        insecure: vec![],
        auth_file: Some(t.path().join("missing.json")),
    };
    let err = build(
        &r,
        &BuildOptions {
            registry: &none,
            ..BuildOptions::new(&cache)
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("docker login"), "{err}");

    let cfg = t.path().join("config.json");
    // base64("agent:s3cret")
    std::fs::write(
        &cfg,
        format!(
            r#"{{"auths": {{"{}": {{"auth": "YWdlbnQ6czNjcmV0"}}}}}}"#,
            reg.addr
        ),
    )
    .unwrap();
    let with = RegistryOptions {
        insecure: vec![],
        auth_file: Some(cfg),
    };
    let img = build(
        &r,
        &BuildOptions {
            registry: &with,
            ..BuildOptions::new(&cache)
        },
    )
    .unwrap();
    fsck_ok(&img.rootfs);
    assert!(listing(&img.rootfs).contains_key("/secret"));
}

/// `agentvm run` calls `build()` from its async main: a registry pull there must not enter
/// (or drop) the registry client's runtime inside the caller's.
#[test]
fn registry_build_from_inside_a_tokio_runtime() {
    let Some(bin) = prerequisites("registry_build_from_inside_a_tokio_runtime") else {
        return;
    };
    let reg = Registry::start(&bin, None);
    let t = tempfile::tempdir().unwrap();
    let layout = t.path().join("layout");
    write_oci_layout(&layout, &test_layers(), "v1");
    let reference = format!("{}/test/in-async:v1", reg.addr);
    push_layout(&layout, &reference, &RegistryAuth::Anonymous);
    let r = ImageRef::parse(&reference).unwrap();
    let cache = t.path().join("cache");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (built, inspected) = rt.block_on(async {
        let opts = BuildOptions::new(&cache);
        let built = build(&r, &opts).unwrap();
        let other_cache = t.path().join("cache-inspect");
        let inspected = crate::inspect(&r, &BuildOptions::new(&other_cache)).unwrap();
        (built, inspected)
    });
    assert!(!built.cached);
    fsck_ok(&built.rootfs);
    assert_eq!(inspected.0.rootfs.diff_ids, built.config.rootfs.diff_ids);
    assert_eq!(inspected.1, None, "nothing built in the inspect cache");
}
