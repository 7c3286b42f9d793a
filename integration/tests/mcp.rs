//! `agentvm mcp` end to end: the official MCP Python SDK (PyPI `mcp`, in the venv of
//! hack/mcp-client.sh) drives the server through a whole session with real VMs
//! (tests/mcp_client.py), and the server must leave nothing behind however the session ends:
//! the client closing, the client SIGKILLed, the server SIGTERMed. Malformed JSON-RPC and
//! `mcp install` need no VM.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use agentvm_integration::{
    agentvm_bin, sh, skip_or_fail, text, wait_with_deadline, LookalikeNet, VmEnv,
};

/// The SDK version hack/mcp-client.sh installs (keep the two in step).
const MCP_SDK: &str = "2.3.0";

/// The venv python with the MCP SDK: `$AGENTVM_MCP_PYTHON`, else hack/mcp-client.sh's.
fn mcp_python(test: &str) -> Option<PathBuf> {
    let p = std::env::var_os("AGENTVM_MCP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache =
                std::env::var("AGENTVM_CACHE").unwrap_or_else(|_| "/var/cache/agentvm".into());
            Path::new(&cache).join(format!("mcp-client-venv-{MCP_SDK}/bin/python"))
        });
    if p.is_file() {
        Some(p)
    } else {
        skip_or_fail(
            test,
            format!(
                "{} missing: run hack/mcp-client.sh (or set AGENTVM_MCP_PYTHON)",
                p.display()
            ),
        )
    }
}

fn client_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mcp_client.py")
}

/// Processes whose environment names `state_root` (the server and anything it started).
fn processes_of(state_root: &Path) -> Vec<String> {
    let needle = format!("AGENTVM_STATE_ROOT={}", state_root.display());
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == std::process::id().to_string() {
            continue;
        }
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        if env.split(|b| *b == 0).any(|v| v == needle.as_bytes()) {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            // The test's own client (python) is not the server's.
            if !cmd.contains("mcp_client.py") {
                found.push(format!("{pid} {cmd}"));
            }
        }
    }
    found
}

/// Waits up to `timeout` for the server and its VMs to be gone, then checks nothing is left.
fn assert_all_gone(env: &VmEnv, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if processes_of(env.state_root.path()).is_empty()
            && env.leftover_processes().is_empty()
            && env.leftover_state().is_empty()
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let left = processes_of(env.state_root.path());
    assert!(left.is_empty(), "still running: {left:?}");
    env.assert_clean();
}

/// The host end of the uplink of the sandbox at `address` (10.232.0.0/16, a /30 each: the
/// sandbox is the third address).
fn uplink_of(address: &str) -> String {
    let ip: std::net::Ipv4Addr = address.parse().expect("an IPv4 address");
    let n = (u32::from(ip) - u32::from(std::net::Ipv4Addr::new(10, 232, 0, 0))) / 4;
    format!("avmu{n}")
}

/// What is left on the host of the uplinks `links`: the links, their nftables tables, their
/// iptables rules.
fn uplinks_left(links: &[String]) -> Vec<String> {
    let tables = sh("nft list tables ip").1;
    let rules = sh("iptables -w -S FORWARD 2>/dev/null").1;
    let mut left = Vec::new();
    for l in links {
        if Path::new("/sys/class/net").join(l).exists() {
            left.push(format!("link {l}"));
        }
        if tables.contains(&format!("agentvm-mcp-{l}\n")) {
            left.push(format!("nft table agentvm-mcp-{l}"));
        }
        if rules.contains(&format!("\"agentvm-mcp {l}\"")) {
            left.push(format!("iptables rule of {l}"));
        }
    }
    left
}

/// The network tests' servers: the test namespace ([`LookalikeNet`]) holding a "public" host
/// (198.51.100.17, a documentation range routed only to it), a "private" one (10.231.78.1)
/// and a look-alike of the cloud metadata service (169.254.78.78), each with an HTTP server on
/// 8080 serving `marker.txt`. No packet leaves this machine. Taken down on drop.
struct NetServers {
    // Declared first: the server is killed and the namespace gone before its directory goes.
    _net: LookalikeNet,
    _dir: tempfile::TempDir,
    marker: String,
}

/// Whose turn it is to hold the test namespace. Held for the servers' life: a second test's
/// `start` tore the first one's namespace down, and the first test's sandbox then reached
/// 198.51.100.17 over the default route.
static NET_TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The look-alike addresses routed into the test namespace, blackholed behind it.
const NET_LOOKALIKES: [&str; 2] = ["198.51.100.17/32", "169.254.78.78/32"];

const NET_NS: &str = "agentvm-mcp-net-test";
const NET_VETH: &str = "avm-mcpt0";

impl NetServers {
    fn start() -> NetServers {
        let mut net = LookalikeNet::start(NET_NS, NET_VETH, 78, &NET_LOOKALIKES, &NET_TURN);
        let dir = tempfile::tempdir().unwrap();
        let marker = format!("mcp-net-{}", std::process::id());
        std::fs::write(dir.path().join("marker.txt"), format!("{marker}\n")).unwrap();
        net.spawn(
            &["python3", "-m", "http.server", "--bind", "0.0.0.0", "8080"],
            dir.path(),
        );
        net.await_listening("10.231.78.1", 8080);
        NetServers {
            _net: net,
            _dir: dir,
            marker,
        }
    }
}

/// Starts the network tests' servers, then runs tests/mcp_client.py in `mode` against them
/// (the look-alikes and the marker in its environment, with `extra_env`) and waits for it
/// (10 minutes at most). Returns the servers, to be held until the test's checks are done,
/// and the client's stdout, after asserting that the client succeeded.
fn net_session(
    env: &VmEnv,
    python: &Path,
    image: &str,
    mode: &str,
    extra_env: &[(&str, &str)],
) -> (NetServers, String) {
    let servers = NetServers::start();
    let child = Command::new(python)
        .arg(client_script())
        .arg(&env.bin)
        .arg(image)
        .arg(mode)
        .env("AGENTVM_STATE_ROOT", env.state_root.path())
        .env("MCP_NET_PUBLIC", "198.51.100.17")
        .env("MCP_NET_PRIVATE", "10.231.78.1")
        .env("MCP_NET_METADATA", "169.254.78.78")
        .env("MCP_NET_MARKER", &servers.marker)
        .envs(extra_env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the MCP client");
    let out = wait_with_deadline(child, Duration::from_secs(600));
    let (so, se) = text(&out);
    eprintln!("{so}");
    assert!(out.status.success(), "client failed:\n{so}\n{se}");
    (servers, so)
}

/// Asserts that the client's output `so` says every one of `steps`.
fn assert_said(so: &str, steps: &[&str]) {
    for step in steps {
        assert!(so.contains(step), "{step} missing:\n{so}");
    }
}

/// The host links of the sandboxes the client named (`NET <address>` lines).
fn uplinks_named(so: &str) -> Vec<String> {
    so.lines()
        .filter_map(|l| l.strip_prefix("NET "))
        .map(|a| uplink_of(a.trim()))
        .collect()
}

#[test]
fn mcp_sandboxes_get_a_network_under_their_egress_policy() {
    let test = "mcp_sandboxes_get_a_network_under_their_egress_policy";
    let Some(env) = VmEnv::get(test) else { return };
    let Some(image) = env.test_image(test) else {
        return;
    };
    let Some(python) = mcp_python(test) else {
        return;
    };
    if !sh("command -v nft").0 {
        skip_or_fail::<()>(test, "nft (nftables) is not installed".into());
        return;
    }
    let (servers, so) = net_session(&env, &python, &image, "net", &[]);
    assert_said(
        &so,
        &[
            "ok agent reaches the public test host",
            "ok agent refuses the private host and the metadata look-alike",
            "ok none has no network",
            "ok none-but allows only its rule",
            "ok session closed",
        ],
    );
    let links = uplinks_named(&so);
    assert_eq!(links.len(), 2, "{so}");
    assert_all_gone(&env, Duration::from_secs(30));
    let left = uplinks_left(&links);
    assert!(left.is_empty(), "left on the host: {left:?}");
    drop(servers);
}

/// containerd mode against the CRI tests' containerd (hack/cri-up.sh, which runs this
/// checkout's shim): sandboxes are containers of the namespace `agentvm-mcp-test`, with a
/// network under their egress policy, and none is left in containerd or on the host after
/// the session.
#[test]
fn mcp_containerd_mode_makes_containers_of_its_own_namespace() {
    let test = "mcp_containerd_mode_makes_containers_of_its_own_namespace";
    let Some(env) = VmEnv::get(test) else { return };
    let Some(image) = env.test_image(test) else {
        return;
    };
    let Some(python) = mcp_python(test) else {
        return;
    };
    let socket = std::env::var("AGENTVM_CRI_SOCKET")
        .unwrap_or_else(|_| "/run/agentvm-cri-test/containerd.sock".into());
    if !Path::new(&socket).exists() {
        skip_or_fail::<()>(
            test,
            format!("no test containerd at {socket} (hack/cri-up.sh, as root)"),
        );
        return;
    }
    if !sh("command -v nft && command -v ctr").0 {
        skip_or_fail::<()>(test, "nft or ctr is not installed".into());
        return;
    }
    let namespace = "agentvm-mcp-test";
    let ctr = |what: &str| {
        sh(&format!(
            "ctr --address {socket} -n {namespace} {what} ls -q"
        ))
        .1
    };
    let server_args = format!("--containerd --address {socket} --namespace {namespace}");
    let (servers, so) = net_session(
        &env,
        &python,
        &image,
        "ctrd",
        &[
            ("MCP_SERVER_ARGS", &server_args),
            ("MCP_CTRD_ADDRESS", &socket),
            ("MCP_CTRD_NAMESPACE", namespace),
        ],
    );
    assert_said(
        &so,
        &[
            "ok the sandbox is a container of agentvm-mcp-test",
            "ok exec and files",
            "ok agent reaches the public test host, not the private one",
            "ok none has no network",
            "ok removed from containerd",
            "ok session closed",
        ],
    );
    let links = uplinks_named(&so);
    assert_eq!(links.len(), 1, "{so}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && !processes_of(env.state_root.path()).is_empty() {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(ctr("containers").trim(), "", "containers left");
    assert_eq!(ctr("tasks").trim(), "", "tasks left");
    let left = uplinks_left(&links);
    assert!(left.is_empty(), "left on the host: {left:?}");
    env.assert_clean();
    drop(servers);
}

#[test]
fn mcp_session_with_the_python_sdk() {
    let test = "mcp_session_with_the_python_sdk";
    let Some(env) = VmEnv::get(test) else { return };
    let Some(image) = env.test_image(test) else {
        return;
    };
    let Some(python) = mcp_python(test) else {
        return;
    };
    // A secret in a store of the test's own.
    let store = tempfile::tempdir().unwrap();
    let value = format!("mcp-secret-{}", std::process::id());
    let mut set = Command::new(&env.bin)
        .args(["secret", "set", "MCP_TOKEN"])
        .env("AGENTVM_SECRETS_DIR", store.path().join("secrets"))
        .env("AGENTVM_SECRETS_KEY", store.path().join("secrets.key"))
        .stdin(Stdio::piped())
        .spawn()
        .expect("agentvm secret set");
    set.stdin
        .take()
        .unwrap()
        .write_all(value.as_bytes())
        .unwrap();
    assert!(set.wait().unwrap().success(), "agentvm secret set failed");
    let child = Command::new(python)
        .arg(client_script())
        .arg(&env.bin)
        .arg(&image)
        .arg("full")
        .env("AGENTVM_STATE_ROOT", env.state_root.path())
        .env("AGENTVM_SECRETS_DIR", store.path().join("secrets"))
        .env("AGENTVM_SECRETS_KEY", store.path().join("secrets.key"))
        .env("MCP_TEST_SECRET_VALUE", &value)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the MCP client");
    let out = wait_with_deadline(child, Duration::from_secs(600));
    let (so, se) = text(&out);
    eprintln!("{so}");
    assert!(out.status.success(), "client failed:\n{so}\n{se}");
    assert_said(
        &so,
        &[
            "ok initialize",
            "ok exec echo, secrets as a file and an env var",
            "ok exec timeout",
            "ok files",
            "ok exec_start/exec_output",
            "ok pause/resume",
            "ok stop/remove",
            "ok left running",
            "ok session closed",
        ],
    );
    // The client closed stdin with a sandbox still running: the server removed it and exited.
    assert_all_gone(&env, Duration::from_secs(30));
}

#[test]
fn mcp_sandboxes_go_when_the_client_is_killed() {
    let test = "mcp_sandboxes_go_when_the_client_is_killed";
    let Some(env) = VmEnv::get(test) else { return };
    let Some(image) = env.test_image(test) else {
        return;
    };
    let Some(python) = mcp_python(test) else {
        return;
    };
    let mut child = Command::new(python)
        .arg(client_script())
        .arg(&env.bin)
        .arg(&image)
        .arg("hold")
        .env("AGENTVM_STATE_ROOT", env.state_root.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the MCP client");
    let ready = read_until(
        child.stdout.take().unwrap(),
        "READY",
        Duration::from_secs(300),
    );
    let Some(line) = ready else {
        let _ = child.kill();
        panic!("the client never reported READY");
    };
    assert!(
        !env.leftover_processes().is_empty() && !env.leftover_state().is_empty(),
        "a VM should run now ({line})"
    );
    assert!(
        !processes_of(env.state_root.path()).is_empty(),
        "no server?"
    );
    // The sandbox has a network (egress "agent" by default): its uplink must go too.
    let link = line
        .split_whitespace()
        .nth(2)
        .filter(|a| *a != "-")
        .map(uplink_of);
    if let Some(l) = &link {
        assert!(
            Path::new("/sys/class/net").join(l).exists(),
            "no uplink {l} ({line})"
        );
    }
    // SIGKILL: the client gets no chance to close anything; the server sees stdin end.
    child.kill().expect("kill the client");
    let _ = child.wait();
    assert_all_gone(&env, Duration::from_secs(30));
    let left = uplinks_left(&link.into_iter().collect::<Vec<_>>());
    assert!(left.is_empty(), "left on the host: {left:?}");
}

#[test]
fn mcp_persistent_sandboxes_outlive_their_session() {
    let test = "mcp_persistent_sandboxes_outlive_their_session";
    let Some(env) = VmEnv::get(test) else { return };
    let Some(image) = env.test_image(test) else {
        return;
    };
    let Some(python) = mcp_python(test) else {
        return;
    };
    let child = Command::new(python)
        .arg(client_script())
        .arg(&env.bin)
        .arg(&image)
        .arg("persist")
        .env("AGENTVM_STATE_ROOT", env.state_root.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the MCP client");
    let out = wait_with_deadline(child, Duration::from_secs(600));
    let (so, se) = text(&out);
    eprintln!("{so}");
    assert!(out.status.success(), "client failed:\n{so}\n{se}");
    assert!(
        so.contains("ok persistent used in a new session and removed"),
        "{so}"
    );
    // The host process went with its sandbox, and the other session's sandbox with its session.
    assert_all_gone(&env, Duration::from_secs(30));
}

/// Reads lines until one starts with `prefix`; returns it, or `None` at the end or deadline.
fn read_until(out: ChildStdout, prefix: &str, timeout: Duration) -> Option<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let prefix = prefix.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            eprintln!("client: {line}");
            if line.starts_with(&prefix) {
                let _ = tx.send(line);
                // Keep draining so the client never blocks on a full pipe.
            }
        }
    });
    rx.recv_timeout(timeout).ok()
}

/// A server spoken to by hand, one JSON-RPC line at a time.
struct Raw {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Raw {
    fn spawn(bin: &Path, state_root: Option<&Path>) -> Raw {
        let mut c = Command::new(bin);
        c.arg("mcp")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(r) = state_root {
            c.env("AGENTVM_STATE_ROOT", r);
        }
        let mut child = c.spawn().expect("spawn agentvm mcp");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Raw { child, lines }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }

    fn recv(&self, timeout: Duration) -> serde_json::Value {
        let l = self
            .lines
            .recv_timeout(timeout)
            .expect("no answer from the server");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))
    }

    fn initialize(&mut self) {
        self.send(
            r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"raw","version":"1"}}}"#,
        );
        let init = self.recv(Duration::from_secs(10));
        assert_eq!(init["result"]["serverInfo"]["name"], "agentvm", "{init}");
        assert!(
            init["result"]["capabilities"]["tools"].is_object(),
            "{init}"
        );
        self.send(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
    }

    /// Waits for the server to exit; panics after `timeout`.
    fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("agentvm mcp did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A server SIGKILLed with sandboxes running leaves their uplinks' host table and iptables
/// rules (the namespace and veth die with it): the next `agentvm mcp` removes those whose link
/// is gone, and keeps those of a link that exists (another server's sandbox).
#[test]
fn mcp_start_sweeps_the_host_rules_of_uplinks_that_are_gone() {
    let test = "mcp_start_sweeps_the_host_rules_of_uplinks_that_are_gone";
    let bin = agentvm_bin();
    if !bin.is_file() {
        skip_or_fail::<()>(test, format!("{} not built", bin.display()));
        return;
    }
    if !sh("nft list tables ip").0 {
        skip_or_fail::<()>(test, "nft (nftables, as root) is not usable".into());
        return;
    }
    // The two highest indexes: a server of this machine would take them last.
    let (gone, live) = ("avmu16383".to_string(), "avmu16382".to_string());
    let table = |l: &str| {
        format!(
            "table ip agentvm-mcp-{l} {{ chain post {{ type nat hook postrouting priority srcnat; policy accept; }}; }}"
        )
    };
    let cleanup = format!(
        "nft delete table ip agentvm-mcp-{gone} 2>/dev/null; nft delete table ip agentvm-mcp-{live} 2>/dev/null; \
         ip link del {live} 2>/dev/null; \
         iptables -w -D FORWARD -i {gone} -m comment --comment 'agentvm-mcp {gone}' -j ACCEPT 2>/dev/null; true"
    );
    sh(&cleanup);
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            sh(&self.0);
        }
    }
    let _cleanup = Cleanup(cleanup);
    let (ok, out) = sh(&format!(
        "set -e; ip link add {live} type veth peer name {live}p; echo '{}' | nft -f -; echo '{}' | nft -f -",
        table(&gone),
        table(&live)
    ));
    assert!(ok, "{out}");
    let iptables = sh("iptables -w -S FORWARD").0;
    if iptables {
        let (ok, out) = sh(&format!(
            "iptables -w -I FORWARD 1 -i {gone} -m comment --comment 'agentvm-mcp {gone}' -j ACCEPT"
        ));
        assert!(ok, "{out}");
    }
    let mut s = Raw::spawn(&bin, None);
    // The sweep is done before the server answers anything.
    s.initialize();
    let left = uplinks_left(std::slice::from_ref(&gone));
    let kept = uplinks_left(std::slice::from_ref(&live));
    drop(s.child.stdin.take());
    let _ = s.child.wait();
    assert!(left.is_empty(), "not swept: {left:?}");
    assert!(
        kept.contains(&format!("nft table agentvm-mcp-{live}")),
        "the table of a live link went: {kept:?}"
    );
}

#[test]
fn mcp_malformed_json_rpc_is_answered_and_the_session_goes_on() {
    let bin = agentvm_bin();
    if !bin.is_file() {
        skip_or_fail::<()>(
            "mcp_malformed_json_rpc_is_answered_and_the_session_goes_on",
            format!("{} not built", bin.display()),
        );
        return;
    }
    let mut s = Raw::spawn(&bin, None);
    s.initialize();
    let t = Duration::from_secs(10);
    s.send("{this is not json");
    let e = s.recv(t);
    assert_eq!(e["error"]["code"], -32700, "{e}");
    assert!(e["id"].is_null(), "{e}");
    s.send(r#"{"jsonrpc":"2.0","id":"x","bogus":true}"#);
    let e = s.recv(t);
    assert_eq!(e["error"]["code"], -32600, "{e}");
    s.send(r#"{"jsonrpc":"2.0","id":7,"method":"no/such/method"}"#);
    let e = s.recv(t);
    assert_eq!(
        (e["id"].as_i64(), e["error"]["code"].as_i64()),
        (Some(7), Some(-32601)),
        "{e}"
    );
    // A tool call with arguments its schema refuses, and one naming no sandbox.
    s.send(r#"{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"exec","arguments":{"sandbox_id":"x","timeout_seconds":"soon"}}}"#);
    let e = s.recv(t);
    assert_eq!(e["id"], 8);
    assert!(
        e["error"].is_object() || e["result"]["isError"] == true,
        "{e}"
    );
    s.send(r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"file_read","arguments":{"sandbox_id":"nope","path":"/etc/passwd"}}}"#);
    let e = s.recv(t);
    assert_eq!(e["result"]["isError"], true, "{e}");
    assert_eq!(
        e["result"]["structuredContent"]["error"]["code"], "unknown_sandbox",
        "{e}"
    );
    // Still serving.
    s.send(r#"{"jsonrpc":"2.0","id":10,"method":"tools/list"}"#);
    let l = s.recv(t);
    assert_eq!(l["id"], 10);
    assert_eq!(
        l["result"]["tools"].as_array().map(Vec::len),
        Some(13),
        "{l}"
    );
    drop(s.child.stdin.take());
    assert!(s.wait(Duration::from_secs(10)).success());
}

#[test]
fn mcp_cancel_kills_the_command_and_sigterm_removes_the_sandboxes() {
    let test = "mcp_cancel_kills_the_command_and_sigterm_removes_the_sandboxes";
    let Some(env) = VmEnv::get(test) else { return };
    let Some(image) = env.test_image(test) else {
        return;
    };
    let mut s = Raw::spawn(&env.bin, Some(env.state_root.path()));
    s.initialize();
    let create = serde_json::json!({
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "sandbox_create", "arguments": {"image": image}}
    });
    s.send(&create.to_string());
    let r = s.recv(Duration::from_secs(300));
    assert_ne!(r["result"]["isError"], true, "{r}");
    assert_eq!(
        r["result"]["structuredContent"]["sandbox"]["state"], "running",
        "{r}"
    );
    assert!(!env.leftover_processes().is_empty(), "no VM runs");
    let id = r["result"]["structuredContent"]["sandbox"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    // A call the client cancels: its command is killed in the sandbox.
    let call = |n: u32, args: serde_json::Value| {
        serde_json::json!({
            "jsonrpc": "2.0", "id": n, "method": "tools/call",
            "params": {"name": "exec", "arguments": args}
        })
        .to_string()
    };
    s.send(&call(
        2,
        serde_json::json!({"sandbox_id": id, "argv": ["sleep", "300"]}),
    ));
    std::thread::sleep(Duration::from_secs(2));
    s.send(r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":2}}"#);
    let mut gone = false;
    for n in 3..30 {
        s.send(&call(
            n,
            serde_json::json!({"sandbox_id": id, "shell": "ps"}),
        ));
        // The cancelled call may still be answered first.
        let mut r = s.recv(Duration::from_secs(30));
        if r["id"] == 2 {
            assert_eq!(
                r["result"]["structuredContent"]["error"]["code"], "cancelled",
                "{r}"
            );
            r = s.recv(Duration::from_secs(30));
        }
        let ps = r["result"]["structuredContent"]["stdout"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if !ps.lines().any(|l| l.trim_end().ends_with("sleep 300")) {
            gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(gone, "the cancelled command still runs");
    // SAFETY: kill(2) on the child we spawned and have not reaped.
    unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
    let st = s.wait(Duration::from_secs(30));
    assert!(st.success(), "{st}");
    assert_all_gone(&env, Duration::from_secs(10));
}

#[test]
fn mcp_session_ending_mid_create_removes_that_sandbox_too() {
    let test = "mcp_session_ending_mid_create_removes_that_sandbox_too";
    let Some(env) = VmEnv::get(test) else { return };
    let Some(image) = env.test_image(test) else {
        return;
    };
    let mut s = Raw::spawn(&env.bin, Some(env.state_root.path()));
    s.initialize();
    let create = serde_json::json!({
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "sandbox_create", "arguments": {"image": image}}
    });
    s.send(&create.to_string());
    // The client goes away while the VM boots.
    std::thread::sleep(Duration::from_millis(500));
    drop(s.child.stdin.take());
    let st = s.wait(Duration::from_secs(300));
    assert!(st.success(), "{st}");
    assert_all_gone(&env, Duration::from_secs(10));
}

#[test]
fn mcp_install_and_uninstall_edit_claude_code_config() {
    let test = "mcp_install_and_uninstall_edit_claude_code_config";
    let bin = agentvm_bin();
    if !bin.is_file() {
        skip_or_fail::<()>(test, format!("{} not built", bin.display()));
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let cfg = home.path().join(".claude.json");
    let run = |args: &[&str]| {
        let out = Command::new(&bin)
            .arg("mcp")
            .args(args)
            .env("HOME", home.path())
            .output()
            .unwrap();
        let (so, se) = text(&out);
        assert!(out.status.success(), "{args:?}: {so}{se}");
        so
    };
    // No Claude Code config: nothing is created.
    assert!(run(&["install"]).contains("does not exist"));
    assert!(!cfg.exists());
    std::fs::write(
        &cfg,
        r#"{"numStartups": 3, "mcpServers": {"other": {"command": "x"}}, "projects": {}}"#,
    )
    .unwrap();
    assert!(run(&["install"]).contains("registered in"));
    assert!(run(&["install"]).contains("already registered"));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    assert_eq!(
        v["mcpServers"]["agentvm"]["args"],
        serde_json::json!(["mcp"])
    );
    assert_eq!(
        v["mcpServers"]["agentvm"]["command"],
        bin.canonicalize().unwrap().to_str().unwrap()
    );
    assert_eq!(v["mcpServers"]["other"]["command"], "x");
    assert_eq!(v["numStartups"], 3);
    assert!(run(&["uninstall"]).contains("removed from"));
    assert!(run(&["uninstall"]).contains("not registered"));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"numStartups": 3, "mcpServers": {"other": {"command": "x"}}, "projects": {}})
    );
}
