//! Test harness for end-to-end tests: finds the `agentvm` binary and a bootable test rootfs,
//! gives each test a private state root, and checks that nothing is left behind.
//!
//! Tests that need a VM call [`VmEnv::get`]. When something is missing they print why and
//! return early, unless `AGENTVM_REQUIRE_VM=1` (set by CI), in which case they fail: a CI run
//! must never pass by skipping.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// What a VM test needs.
#[derive(Debug)]
pub struct VmEnv {
    pub bin: PathBuf,
    pub rootfs: PathBuf,
    pub state_root: tempfile::TempDir,
}

/// The `agentvm` binary the tests drive: `$AGENTVM_BIN` or the workspace's debug build.
pub fn agentvm_bin() -> PathBuf {
    std::env::var_os("AGENTVM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debug/agentvm"))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration/ sits in the workspace")
        .to_path_buf()
}

/// Prints why a test skips and returns `None`; fails the test instead under
/// `AGENTVM_REQUIRE_VM=1`.
pub fn skip_or_fail<T>(test: &str, reason: String) -> Option<T> {
    if std::env::var("AGENTVM_REQUIRE_VM").as_deref() == Ok("1") {
        panic!("{test}: {reason} (AGENTVM_REQUIRE_VM=1 forbids skipping)");
    }
    eprintln!("SKIP {test}: {reason}");
    None
}

impl VmEnv {
    /// The environment for a VM test, or `None` (after printing why) when this host cannot
    /// boot VMs.
    pub fn get(test: &str) -> Option<VmEnv> {
        let bin = agentvm_bin();
        if !bin.is_file() {
            return skip_or_fail(
                test,
                format!(
                    "{} not built (cargo build -p agentvm, or set AGENTVM_BIN)",
                    bin.display()
                ),
            );
        }
        let rootfs = match std::env::var_os("AGENTVM_TEST_ROOTFS") {
            Some(p) => PathBuf::from(p),
            None => return skip_or_fail(
                test,
                "AGENTVM_TEST_ROOTFS unset (hack/test.sh sets it from hack/make-test-rootfs.sh)"
                    .into(),
            ),
        };
        if !rootfs.is_file() {
            return skip_or_fail(test, format!("test rootfs {} missing", rootfs.display()));
        }
        let check = Command::new(&bin).arg("check").output();
        match check {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                return skip_or_fail(
                    test,
                    format!(
                        "agentvm check says this host cannot run VMs:\n{}",
                        String::from_utf8_lossy(&o.stdout)
                    ),
                )
            }
            Err(e) => return skip_or_fail(test, format!("cannot run agentvm check: {e}")),
        }
        let state_root = tempfile::Builder::new()
            .prefix("agentvm-test-state.")
            .tempdir()
            .expect("temp state root");
        Some(VmEnv {
            bin,
            rootfs,
            state_root,
        })
    }

    /// The OCI layout of the test image (`AGENTVM_TEST_IMAGE`, from hack/make-test-image.py),
    /// or `None` after printing why (failing instead under `AGENTVM_REQUIRE_VM=1`).
    pub fn test_image(&self, test: &str) -> Option<String> {
        match std::env::var("AGENTVM_TEST_IMAGE") {
            Ok(p) if Path::new(&p).join("index.json").is_file() => Some(format!("oci:{p}")),
            _ => skip_or_fail(
                test,
                "AGENTVM_TEST_IMAGE unset or not an OCI layout (hack/test.sh sets it)".into(),
            ),
        }
    }

    /// `agentvm run ARGS...` with this test's private state root.
    pub fn bare_run_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("run")
            .args(args)
            .env("AGENTVM_STATE_ROOT", self.state_root.path())
            .stdin(Stdio::null());
        c
    }

    /// `agentvm run --rootfs <test rootfs> ARGS...` with this test's private state root.
    pub fn run_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("run")
            .arg("--rootfs")
            .arg(&self.rootfs)
            .args(args)
            .env("AGENTVM_STATE_ROOT", self.state_root.path())
            .stdin(Stdio::null());
        c
    }

    /// Runs to completion with a deadline; panics (after killing it) if it hangs.
    pub fn run(&self, args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> Output {
        let mut c = self.run_cmd(args);
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        if stdin.is_some() {
            c.stdin(Stdio::piped());
        }
        let mut child = c.spawn().expect("spawn agentvm");
        if let Some(data) = stdin {
            use std::io::Write;
            let mut s = child.stdin.take().expect("stdin");
            s.write_all(data).expect("write stdin");
        }
        wait_with_deadline(child, timeout)
    }

    /// State directories still present under this test's state root, and sandbox uids still
    /// claimed (`.uids/<n>`; the directory of claims itself stays).
    pub fn leftover_state(&self) -> Vec<String> {
        let list = |dir: &Path| -> Vec<String> {
            std::fs::read_dir(dir)
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut left = Vec::new();
        for name in list(self.state_root.path()) {
            if name == ".tc-drop-sink" {
                // Not a sandbox's: what this kernel's tc lacks, learnt once per state root
                // (runtime/src/netns.rs).
                continue;
            }
            if name == ".uids" {
                let claims = self.state_root.path().join(".uids");
                left.extend(list(&claims).into_iter().map(|c| format!(".uids/{c}")));
            } else {
                left.push(name);
            }
        }
        left
    }

    /// Host processes whose command line mentions this test's state root (QEMU, helpers).
    pub fn leftover_processes(&self) -> Vec<String> {
        processes_mentioning(&self.state_root.path().display().to_string())
    }

    /// Asserts that no state dir and no VM process of this test survive.
    pub fn assert_clean(&self) {
        // Teardown is synchronous in agentvm, but give the kernel a moment to reap.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let (s, p) = (self.leftover_state(), self.leftover_processes());
            if s.is_empty() && p.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                panic!("leaked after the run: state dirs {s:?}, processes {p:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Waits for `child` with a deadline; kills it and panics on timeout.
pub fn wait_with_deadline(child: std::process::Child, timeout: Duration) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.expect("wait for agentvm"),
        Err(_) => {
            // SAFETY: kill(2) on a pid we spawned; at worst it names an exited process.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("agentvm did not finish within {timeout:?}");
        }
    }
}

/// Command lines (from /proc) containing `needle`, excluding our own process.
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.bytes().all(|b| b.is_ascii_digit()) || name == me {
                continue;
            }
            if let Ok(raw) = std::fs::read(e.path().join("cmdline")) {
                let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
                if cmd.contains(needle) {
                    out.push(format!("{name}: {cmd}"));
                }
            }
        }
    }
    out
}

/// Output as text, for assertions and failure messages.
pub fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What a Docker test needs: a dockerd answering, with the `agentvm` runtime registered and
/// the local test image (hack/docker-up.sh sets all of it up).
#[derive(Debug)]
pub struct DockerEnv {
    pub image: String,
}

/// The image hack/docker-up.sh imports from busybox-static.
pub const DOCKER_TEST_IMAGE: &str = "agentvm-test/busybox:latest";

/// Deadline of one docker command in the tests (TCG boots, parallel tests on two cores).
pub const DOCKER_TIMEOUT: Duration = Duration::from_secs(180);

/// A name unique to this test process, so tests can run in parallel and find their objects.
pub fn unique_name(test: &str) -> String {
    format!("agentvm-it-{test}-{}", std::process::id())
}

impl DockerEnv {
    /// The environment for a Docker test, or `None` (after printing why) when this host has
    /// no usable dockerd with the agentvm runtime. Fails instead under AGENTVM_REQUIRE_VM=1.
    pub fn get(test: &str) -> Option<DockerEnv> {
        let fail = |reason: String| -> Option<DockerEnv> {
            if std::env::var("AGENTVM_REQUIRE_VM").as_deref() == Ok("1") {
                panic!("{test}: {reason} (AGENTVM_REQUIRE_VM=1 forbids skipping)");
            }
            eprintln!("SKIP {test}: {reason}");
            None
        };
        let info = Command::new("docker")
            .args(["info", "--format", "{{json .Runtimes}}"])
            .stdin(Stdio::null())
            .output();
        match info {
            Ok(o) if o.status.success() => {
                if !String::from_utf8_lossy(&o.stdout).contains("\"agentvm\"") {
                    return fail(
                        "dockerd does not know the agentvm runtime (run hack/docker-up.sh)".into(),
                    );
                }
            }
            Ok(o) => {
                return fail(format!(
                    "dockerd is not answering (run hack/docker-up.sh): {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ))
            }
            Err(e) => return fail(format!("cannot run docker: {e}")),
        }
        let image = Command::new("docker")
            .args(["image", "inspect", DOCKER_TEST_IMAGE])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !matches!(image, Ok(s) if s.success()) {
            return fail(format!(
                "test image {DOCKER_TEST_IMAGE} missing (run hack/docker-up.sh)"
            ));
        }
        Some(DockerEnv {
            image: DOCKER_TEST_IMAGE.into(),
        })
    }

    /// `docker ARGS...` with a deadline; stdin is `input` (or empty).
    pub fn docker(&self, args: &[&str], input: Option<&[u8]>, timeout: Duration) -> Output {
        let mut c = Command::new("docker");
        c.args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("spawn docker");
        if let Some(data) = input {
            use std::io::Write;
            let mut s = child.stdin.take().expect("stdin");
            s.write_all(data).expect("write stdin");
        }
        wait_with_deadline(child, timeout)
    }

    /// `docker run --runtime=agentvm --name <unique> --cidfile ... ARGS` with [`DOCKER_TIMEOUT`];
    /// returns the output and the container id.
    pub fn run(&self, test: &str, args: &[&str], input: Option<&[u8]>) -> (Output, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let cidfile = dir.path().join("cid");
        let cid = cidfile.to_str().expect("utf-8 path").to_string();
        let n = unique_name(test);
        let mut all = vec!["run", "--runtime=agentvm", "--name", &n, "--cidfile", &cid];
        all.extend_from_slice(args);
        let out = self.docker(&all, input, DOCKER_TIMEOUT);
        let id = std::fs::read_to_string(&cidfile).unwrap_or_default();
        if args.contains(&"--rm") {
            // A container whose task never started stays "Created" despite --rm.
            let mut c = Command::new("docker");
            c.args(["rm", "-f", &n])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let _ = c.status();
        }
        (out, id)
    }

    /// Asserts that no VM of `container_id` survives: no process names its state dir and the
    /// state dir is gone (the shim runs with containerd's default state root).
    pub fn assert_vm_gone(&self, container_id: &str) {
        let dir = format!("/run/agentvm/{container_id}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let procs = processes_mentioning(&dir);
            let exists = Path::new(&dir).exists();
            // The sandbox's uid is given back (runtime/src/sandboxuser.rs).
            let claimed = std::fs::read_dir("/run/agentvm/.uids")
                .map(|rd| {
                    rd.flatten()
                        .any(|e| std::fs::read(e.path()).is_ok_and(|o| o == dir.as_bytes()))
                })
                .unwrap_or(false);
            if procs.is_empty() && !exists && !claimed {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "leaked after the container ended: state dir exists={exists}, uid still \
                     claimed={claimed}, processes {procs:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Runs `cmd` with `sh -c` (stdin empty): whether it succeeded, and its stdout then stderr.
pub fn sh(cmd: &str) -> (bool, String) {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .stdin(Stdio::null())
        .output()
        .expect("sh");
    let (so, se) = text(&out);
    (out.status.success(), format!("{so}{se}"))
}

/// Waits (20 s at most) until `addr:port` accepts TCP connections, from inside network
/// namespace `netns` if given (`ip netns exec`), else from the host; panics otherwise.
pub fn await_listening(netns: Option<&str>, addr: &str, port: u16) {
    let connect =
        format!("python3 -c \"import socket; socket.create_connection(('{addr}', {port}), 1)\"");
    let probe = match netns {
        Some(ns) => format!("ip netns exec {ns} {connect}"),
        None => connect,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sh(&probe).0 {
        assert!(
            Instant::now() < deadline,
            "the test's server at {addr}:{port} (namespace {netns:?}) never listened"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A network namespace of the test's own holding look-alike addresses (documentation-range
/// "public" hosts, a link-local look-alike of a metadata service), so that tests talk only to
/// this machine: a veth from the host (`10.231.N.254/24`) to the namespace's `eth0`
/// (`10.231.N.1/24`, default route back through the host), each look-alike a /32 on that
/// `eth0` with a host route into the veth, and servers the test spawns inside.
///
/// Blackhole routes (metric 4000) sit behind the look-alikes' routes for the whole life of the
/// value, made before the namespace and removed after it: a look-alike never takes the default
/// route off this machine, even while the namespace is being made or taken down.
///
/// The tests of one binary that use the same namespace take turns through one `static`
/// mutex, held for the namespace's life: when a second test's `start` tore the first one's
/// namespace down, the first test's sandbox reached its "public" look-alike over the default
/// route.
///
/// Dropped: the children are killed, then the namespace and veth go, then the blackholes; the
/// turn is given back last.
#[derive(Debug)]
pub struct LookalikeNet {
    ns: &'static str,
    veth: &'static str,
    lookalikes: &'static [&'static str],
    children: Vec<std::process::Child>,
    // Declared last, so dropped after `Drop::drop` took everything down.
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl LookalikeNet {
    /// Waits for the turn, then makes namespace `ns` with veth `veth` on the host side, on
    /// 10.231.`subnet`.0/24, holding `lookalikes` (CIDRs, e.g. `198.51.100.7/32`). Whatever a
    /// crashed earlier run left under those names is removed first. Panics if the namespace
    /// cannot be made (the test needs root).
    pub fn start(
        ns: &'static str,
        veth: &'static str,
        subnet: u8,
        lookalikes: &'static [&'static str],
        turn: &'static std::sync::Mutex<()>,
    ) -> LookalikeNet {
        // A test that panicked while holding the turn poisons it; its drop still tore down.
        let turn = turn.lock().unwrap_or_else(|p| p.into_inner());
        let net = LookalikeNet {
            ns,
            veth,
            lookalikes,
            children: Vec::new(),
            _turn: turn,
        };
        for a in lookalikes {
            sh(&format!("ip route replace blackhole {a} metric 4000"));
        }
        net.remove_ns();
        let mut setup = format!(
            "set -e; ip netns add {ns}; ip link add {veth} type veth peer name eth0 netns {ns}; \
             ip addr add 10.231.{subnet}.254/24 dev {veth}; ip link set {veth} up; \
             ip -n {ns} link set lo up; ip -n {ns} link set eth0 up; \
             ip -n {ns} addr add 10.231.{subnet}.1/24 dev eth0; "
        );
        for a in lookalikes {
            setup.push_str(&format!(
                "ip route add {a} dev {veth}; ip -n {ns} addr add {a} dev eth0; "
            ));
        }
        setup.push_str(&format!(
            "ip -n {ns} route add default via 10.231.{subnet}.254"
        ));
        let (ok, out) = sh(&setup);
        assert!(ok, "test namespace {ns}: {out}");
        net
    }

    /// Spawns `argv` inside the namespace (`ip netns exec`) in directory `dir`, output
    /// discarded; it is killed on drop.
    pub fn spawn(&mut self, argv: &[&str], dir: &Path) {
        let child = Command::new("ip")
            .args(["netns", "exec", self.ns])
            .args(argv)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {argv:?} in {}: {e}", self.ns));
        self.children.push(child);
    }

    /// Takes `child` (a server of the test's outside the namespace) to be killed on drop with
    /// the namespace's own.
    pub fn adopt(&mut self, child: std::process::Child) {
        self.children.push(child);
    }

    /// Waits (20 s at most) until `addr:port` accepts TCP connections from inside the
    /// namespace; panics otherwise.
    pub fn await_listening(&self, addr: &str, port: u16) {
        await_listening(Some(self.ns), addr, port);
    }

    fn remove_ns(&self) {
        sh(&format!(
            "ip netns del {} 2>/dev/null; ip link del {} 2>/dev/null",
            self.ns, self.veth
        ));
    }
}

impl Drop for LookalikeNet {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.remove_ns();
        for a in self.lookalikes {
            sh(&format!(
                "ip route del blackhole {a} metric 4000 2>/dev/null"
            ));
        }
    }
}
