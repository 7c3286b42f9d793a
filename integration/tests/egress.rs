//! Egress policy on real VMs: `docker run --runtime=agentvm --annotation io.agentvm.egress=...`
//! against servers this test starts in a network namespace of its own on this machine — an
//! "internal" host at 10.231.77.1, a link-local look-alike of the metadata service at
//! 169.254.77.77, a "public" host at 198.51.100.7 (a documentation range, never routed off
//! this machine) — and one on the host itself. No packet goes anywhere else. Needs root and
//! hack/docker-up.sh.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentvm_integration::{agentvm_bin, text, unique_name, DockerEnv};

const T: Duration = Duration::from_secs(180);
const NS: &str = "agentvm-egress-test";
const HOST_VETH: &str = "avm-egt0";
const HOST_PORT: u16 = 18931;

fn sh(cmd: &str) -> (bool, String) {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .stdin(Stdio::null())
        .output()
        .expect("sh");
    let (so, se) = text(&out);
    (out.status.success(), format!("{so}{se}"))
}

/// The test's servers: a namespace with the three addresses, an HTTP server in it, one on
/// the host. Taken down on drop.
struct Servers {
    children: Vec<Child>,
}

impl Servers {
    fn start() -> Servers {
        sh(&format!(
            "ip netns del {NS} 2>/dev/null; ip link del {HOST_VETH} 2>/dev/null"
        ));
        let setup = format!(
            "set -e; ip netns add {NS}; ip link add {HOST_VETH} type veth peer name eth0 netns {NS}; \
             ip addr add 10.231.77.254/24 dev {HOST_VETH}; ip link set {HOST_VETH} up; \
             ip route add 198.51.100.7/32 dev {HOST_VETH}; ip route add 169.254.77.77/32 dev {HOST_VETH}; \
             ip -n {NS} link set lo up; ip -n {NS} link set eth0 up; \
             ip -n {NS} addr add 10.231.77.1/24 dev eth0; \
             ip -n {NS} addr add 198.51.100.7/32 dev eth0; ip -n {NS} addr add 169.254.77.77/32 dev eth0; \
             ip -n {NS} route add default via 10.231.77.254"
        );
        let (ok, out) = sh(&setup);
        assert!(ok, "test namespace: {out}");
        let server = |netns: bool, port: u16| {
            let mut c = if netns {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", NS, "python3"]);
                c
            } else {
                Command::new("python3")
            };
            c.args(["-m", "http.server", "--bind", "0.0.0.0", &port.to_string()])
                .current_dir("/tmp")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("python3 http.server")
        };
        let s = Servers {
            children: vec![server(true, 8080), server(false, HOST_PORT)],
        };
        // Both listen before the test goes on.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(sh(&format!("ip netns exec {NS} python3 -c \"import socket; socket.create_connection(('10.231.77.1', 8080), 1)\"")).0
            && sh(&format!("python3 -c \"import socket; socket.create_connection(('127.0.0.1', {HOST_PORT}), 1)\"")).0)
        {
            assert!(Instant::now() < deadline, "the test's servers never listened");
            std::thread::sleep(Duration::from_millis(200));
        }
        s
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        sh(&format!(
            "ip netns del {NS} 2>/dev/null; ip link del {HOST_VETH} 2>/dev/null"
        ));
    }
}

fn docker(env: &DockerEnv, args: &[&str]) -> (Option<i32>, String) {
    let out = env.docker(args, None, T);
    let (so, se) = text(&out);
    (out.status.code(), format!("{so}{se}"))
}

/// Whether a TCP connection from the container to `addr:port` opens (5 s).
fn reaches(env: &DockerEnv, name: &str, addr: &str, port: u16) -> bool {
    let script = format!("timeout 5 nc {addr} {port} </dev/null && echo OPEN || echo CLOSED");
    let (_, out) = docker(env, &["exec", name, "sh", "-c", &script]);
    assert!(out.contains("OPEN") || out.contains("CLOSED"), "{out}");
    out.contains("OPEN")
}

fn agentvm(args: &[&str]) -> (bool, String) {
    let out = Command::new(agentvm_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("agentvm");
    let (so, se) = text(&out);
    (out.status.success(), format!("{so}{se}"))
}

#[test]
fn egress_policies_block_and_allow_on_a_running_container() {
    let test = "egress_policies_block_and_allow_on_a_running_container";
    let Some(env) = DockerEnv::get(test) else {
        return;
    };
    let _servers = Servers::start();
    let name = unique_name("egress");
    let (code, id) = docker(
        &env,
        &[
            "run",
            "-d",
            "--runtime=agentvm",
            "--annotation",
            "io.agentvm.egress=agent",
            "--name",
            &name,
            &env.image,
            "sleep",
            "600",
        ],
    );
    assert_eq!(code, Some(0), "docker run: {id}");
    let id = id.trim().to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    while docker(&env, &["exec", &name, "true"]).0 != Some(0) {
        assert!(Instant::now() < deadline, "the VM never answered exec");
        std::thread::sleep(Duration::from_millis(500));
    }
    let (_, gw) = docker(
        &env,
        &[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.Gateway}}{{end}}",
            &name,
        ],
    );
    let gw = gw.trim().to_string();

    // `agent`: the public-looking host yes; internal, link-local and the host itself no.
    assert!(
        reaches(&env, &name, "198.51.100.7", 8080),
        "the allowed host"
    );
    assert!(
        !reaches(&env, &name, "10.231.77.1", 8080),
        "an RFC 1918 host"
    );
    assert!(
        !reaches(&env, &name, "169.254.77.77", 8080),
        "link-local (metadata's range)"
    );
    assert!(
        !reaches(&env, &name, &gw, HOST_PORT),
        "a host service on the gateway"
    );
    // Raw sockets change nothing: an ICMP echo to the internal host gets no answer.
    let (_, ping) = docker(
        &env,
        &[
            "exec",
            &name,
            "sh",
            "-c",
            "timeout 5 ping -c 1 -W 2 10.231.77.1 && echo ANSWERED",
        ],
    );
    assert!(!ping.contains("ANSWERED"), "{ping}");
    let (ok, log) = agentvm(&["policy", "log", &id]);
    assert!(ok, "{log}");
    for line in [
        "blocked tcp to 10.231.77.1:8080 (policy \"agent\", rule: private (RFC 1918))",
        "blocked tcp to 169.254.77.77:8080 (policy \"agent\", rule: link-local)",
        "rule: the host's own address",
        "blocked icmp to 10.231.77.1 (policy \"agent\", rule: private (RFC 1918))",
    ] {
        assert!(log.contains(line), "{line} not in the log:\n{log}");
    }
    assert!(!log.contains("198.51.100.7"), "{log}");
    let (ok, show) = agentvm(&["policy", "show", &id[..12]]);
    assert!(ok && show.contains("policy: agent (base agent)"), "{show}");
    assert!(!show.contains("blocked: 0 packets"), "{show}");

    // Changed at run time: `open` lets the internal host through at once...
    let (ok, out) = agentvm(&["policy", "set", &id, "open"]);
    assert!(ok, "{out}");
    assert!(
        reaches(&env, &name, "10.231.77.1", 8080),
        "open: the internal host"
    );
    // ... and `none-but` with one allowed address lets nothing else through.
    let (ok, out) = agentvm(&[
        "policy",
        "set",
        &id,
        "none-but; allow 198.51.100.7 tcp port 8080",
    ]);
    assert!(ok, "{out}");
    assert!(reaches(&env, &name, "198.51.100.7", 8080));
    assert!(!reaches(&env, &name, "10.231.77.1", 8080));
    // A bad policy is refused and the running one stays.
    let (ok, out) = agentvm(&["policy", "set", &id, "strict"]);
    assert!(
        !ok && out.contains("\"strict\" is neither built in"),
        "{out}"
    );
    assert!(reaches(&env, &name, "198.51.100.7", 8080));

    let (code, out) = docker(&env, &["rm", "-f", &name]);
    assert_eq!(code, Some(0), "{out}");
    env.assert_vm_gone(&id);
}

/// An unknown profile in the annotation fails the start with the reason, and leaves nothing.
#[test]
fn an_unknown_egress_profile_fails_the_start() {
    let Some(env) = DockerEnv::get("an_unknown_egress_profile_fails_the_start") else {
        return;
    };
    let name = unique_name("egress-bad");
    let (code, out) = docker(
        &env,
        &[
            "run",
            "--rm",
            "--runtime=agentvm",
            "--annotation",
            "io.agentvm.egress=closed-shop",
            "--name",
            &name,
            &env.image,
            "true",
        ],
    );
    assert_ne!(code, Some(0));
    assert!(out.contains("\"closed-shop\" is neither built in"), "{out}");
    let _ = docker(&env, &["rm", "-f", &name]);
}
