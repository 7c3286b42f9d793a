//! `agentvm run REGISTRY/REPO:TAG` end to end (issue 3): Debian's `docker-registry` on a free
//! loopback port, the test image (hack/make-test-image.py, `AGENTVM_TEST_IMAGE`) pushed to it
//! with `skopeo`, then pulled, converted and booted by `agentvm run` with a private image cache
//! and state root. The registry runs under a guard that kills it whatever the test does.
//! Skips with a printed reason when something is missing, except under
//! `AGENTVM_REQUIRE_VM=1` (CI), where it fails.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentvm_integration::{processes_mentioning, text, wait_with_deadline, VmEnv};

/// Pull + conversion + boot under TCG.
const T: Duration = Duration::from_secs(180);

fn skip_or_fail<T>(test: &str, reason: &str) -> Option<T> {
    if std::env::var("AGENTVM_REQUIRE_VM").as_deref() == Ok("1") {
        panic!("{test}: {reason} (AGENTVM_REQUIRE_VM=1 forbids skipping; run hack/setup.sh)");
    }
    eprintln!("SKIP {test}: {reason}");
    None
}

fn find_bin(test: &str, name: &str, package: &str) -> Option<PathBuf> {
    match ["/usr/bin", "/usr/local/bin", "/usr/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
    {
        Some(p) => Some(p),
        None => skip_or_fail(test, &format!("needs {name} (apt-get install {package})")),
    }
}

/// A running `docker-registry` with a private config and storage dir; killed and reaped on
/// drop, even when the test panics.
struct Registry {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    fn start(bin: &Path) -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("agentvm-test-registry.")
            .tempdir()
            .expect("registry dir");
        // A free port: bind :0, note it, release it for the registry.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free loopback port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: {addr}\n  secret: test-secret\n",
                dir.path().join("data").display()
            ),
        )
        .expect("write registry config");
        let err = std::fs::File::create(dir.path().join("registry.err")).expect("log file");
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn docker-registry");
        let mut reg = Registry { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&reg.addr).is_err() {
            if let Ok(Some(st)) = reg.child.try_wait() {
                panic!("docker-registry exited ({st}): {}", reg.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen on {}: {}",
                reg.addr,
                reg.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        reg
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.err")).unwrap_or_default()
    }
}

#[test]
fn registry_image_boots_with_its_defaults() {
    const TEST: &str = "registry_image_boots_with_its_defaults";
    let Some(env) = VmEnv::get(TEST) else {
        return;
    };
    let Some(image) = env.test_image(TEST) else {
        return;
    };
    let Some(registry_bin) = find_bin(TEST, "docker-registry", "docker-registry") else {
        return;
    };
    let Some(skopeo) = find_bin(TEST, "skopeo", "skopeo") else {
        return;
    };
    let layout = image.strip_prefix("oci:").expect("an oci: reference");

    let registry = Registry::start(&registry_bin);
    let pid = registry.child.id();
    let config = registry.dir.path().join("config.yml");
    let reference = format!("{}/agentvm/busybox:test", registry.addr);

    // skopeo wants a signature policy; ours accepts anything (a loopback test registry).
    let policy = registry.dir.path().join("policy.json");
    std::fs::write(
        &policy,
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )
    .expect("write policy");
    let push = Command::new(&skopeo)
        .arg("--policy")
        .arg(&policy)
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{layout}"))
        .arg(format!("docker://{reference}"))
        .stdin(Stdio::null())
        .output()
        .expect("run skopeo");
    assert!(
        push.status.success(),
        "skopeo copy to {reference}: {:?}\nregistry: {}",
        text(&push),
        registry.stderr()
    );

    let cache = tempfile::Builder::new()
        .prefix("agentvm-test-images.")
        .tempdir()
        .expect("image cache dir");
    let out = wait_with_deadline(
        env.bare_run_cmd(&[&reference])
            .env("AGENTVM_IMAGE_CACHE", cache.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn agentvm"),
        T,
    );
    let (so, se) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {se}\nregistry: {}",
        registry.stderr()
    );
    assert_eq!(so, "hello from an OCI image\n/srv\nimage-env\n");
    // The pull went into the private cache, not the host's.
    assert!(
        std::fs::read_dir(cache.path().join("blobs/sha256"))
            .map(|rd| rd.count() > 0)
            .unwrap_or(false),
        "no layer blobs downloaded into {}",
        cache.path().display()
    );
    env.assert_clean();

    drop(registry);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "docker-registry (pid {pid}) still running after its guard was dropped"
    );
    let left = processes_mentioning(&config.display().to_string());
    assert!(left.is_empty(), "registry processes left: {left:?}");
}
