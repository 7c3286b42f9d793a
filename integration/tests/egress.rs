//! Egress policy on real VMs: `docker run --runtime=agentvm --annotation io.agentvm.egress=...`
//! against servers this test starts in a network namespace of its own on this machine — an
//! "internal" host at 10.231.77.1, a link-local look-alike of the metadata service at
//! 169.254.77.77, a "public" host at 198.51.100.7 (a documentation range, never routed off
//! this machine) — and one on the host itself. No packet goes anywhere else. Needs root and
//! hack/docker-up.sh.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentvm_integration::{
    agentvm_bin, await_listening, sh, text, unique_name, DockerEnv, LookalikeNet,
};

const T: Duration = Duration::from_secs(180);
const NS: &str = "agentvm-egress-test";
const HOST_VETH: &str = "avm-egt0";
const HOST_PORT: u16 = 18931;

/// Whose turn it is to hold the test namespace: one test at a time, for its servers' life
/// (a second test's start would tear the first one's namespace down under it).
static SERVERS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The look-alike addresses routed into the test namespace, blackholed behind it.
const LOOKALIKES: [&str; 3] = ["198.51.100.7/32", "198.51.100.8/32", "169.254.77.77/32"];

/// The test's servers: the test namespace ([`LookalikeNet`]) with the test addresses and an
/// HTTP (8080) and a DNS server in it, and an HTTP server on the host ([`HOST_PORT`]). Taken
/// down when the value is dropped.
fn start_servers() -> LookalikeNet {
    let mut net = LookalikeNet::start(NS, HOST_VETH, 77, &LOOKALIKES, &SERVERS);
    let tmp = std::path::Path::new("/tmp");
    net.spawn(
        &["python3", "-m", "http.server", "--bind", "0.0.0.0", "8080"],
        tmp,
    );
    net.spawn(&["python3", "-c", DNS_SERVER], tmp);
    let host = Command::new("python3")
        .args(["-m", "http.server", "--bind", "0.0.0.0"])
        .arg(HOST_PORT.to_string())
        .current_dir(tmp)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 http.server");
    net.adopt(host);
    // Both HTTP servers listen before the test goes on.
    net.await_listening("10.231.77.1", 8080);
    await_listening(None, "127.0.0.1", HOST_PORT);
    net
}

/// The test's DNS zone, served at 10.231.77.1:53: `example.test` (TTL 3 s), `other.test` and
/// `kept.test` (both 198.51.100.8, TTL 60 s), `rebind.test` (the metadata look-alike: a DNS
/// server rebinding an allowed name).
const DNS_SERVER: &str = r#"
import socket, struct
ZONE = {"example.test.": ("198.51.100.7", 3), "other.test.": ("198.51.100.8", 60),
        "kept.test.": ("198.51.100.8", 60), "rebind.test.": ("169.254.77.77", 60)}
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.231.77.1", 53))
while True:
    data, peer = s.recvfrom(512)
    try:
        tid = struct.unpack(">H", data[:2])[0]
        i, labels = 12, []
        while data[i]:
            labels.append(data[i + 1:i + 1 + data[i]].decode().lower())
            i += 1 + data[i]
        name = ".".join(labels) + "."
        qtype = struct.unpack(">H", data[i + 1:i + 3])[0]
        question = data[12:i + 5]
    except Exception:
        continue
    answer, count, rcode = b"", 0, 0
    if name not in ZONE:
        rcode = 3
    elif qtype == 1:
        ip, ttl = ZONE[name]
        answer = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, ttl, 4) + socket.inet_aton(ip)
        count = 1
    s.sendto(struct.pack(">HHHHHH", tid, 0x8180 | rcode, 1, count, 0, 0) + question + answer, peer)
"#;

fn docker(env: &DockerEnv, args: &[&str]) -> (Option<i32>, String) {
    let out = env.docker(args, None, T);
    let (so, se) = text(&out);
    (out.status.code(), format!("{so}{se}"))
}

/// Starts container `name` (`sleep 600` under agentvm, with `args` before the image) and waits
/// until exec works in it; returns its id.
fn start(env: &DockerEnv, name: &str, args: &[&str]) -> String {
    let mut all = vec!["run", "-d", "--runtime=agentvm", "--name", name];
    all.extend_from_slice(args);
    all.extend_from_slice(&[env.image.as_str(), "sleep", "600"]);
    let (code, id) = docker(env, &all);
    assert_eq!(code, Some(0), "docker run: {id}");
    await_exec(env, name, "the VM");
    id.trim().to_string()
}

/// Waits (2 minutes at most) until `docker exec` works in container `name`; `what` names it
/// in the failure.
fn await_exec(env: &DockerEnv, name: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while docker(env, &["exec", name, "true"]).0 != Some(0) {
        assert!(Instant::now() < deadline, "{what} never answered exec");
        std::thread::sleep(Duration::from_millis(500));
    }
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

/// Containers and networks a test made, removed when it ends (also when it fails), so a failed
/// run leaves no network holding its subnet.
struct Leftovers {
    containers: Vec<String>,
    networks: Vec<String>,
}

impl Leftovers {
    fn network(env: &DockerEnv, name: &str, args: &[&str]) -> Leftovers {
        let mut all = vec!["network", "create"];
        all.extend_from_slice(args);
        all.push(name);
        let (code, out) = docker(env, &all);
        assert_eq!(code, Some(0), "{out}");
        Leftovers {
            containers: Vec::new(),
            networks: vec![name.to_string()],
        }
    }
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = Command::new("docker").args(["rm", "-f", c]).output();
        }
        for n in &self.networks {
            let _ = Command::new("docker").args(["network", "rm", n]).output();
        }
    }
}

#[test]
fn egress_policies_block_and_allow_on_a_running_container() {
    let test = "egress_policies_block_and_allow_on_a_running_container";
    let Some(env) = DockerEnv::get(test) else {
        return;
    };
    let _servers = start_servers();
    let name = unique_name("egress");
    let id = start(&env, &name, &["--annotation", "io.agentvm.egress=agent"]);
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

/// Domain rules: on a user-defined network, with the test's DNS server as Docker's upstream,
/// `none-but; allow example.test tcp port 8080` lets the container reach example.test by name;
/// other.test resolves but cannot be reached, nor can an address no allowed name gave; DNS to
/// a server of the guest's choosing is blocked; the address goes when its TTL ends. On the
/// default bridge (no relay) domain rules are refused with the reason.
#[test]
fn domain_rules_allow_what_the_relay_resolved_for_its_ttl() {
    let test = "domain_rules_allow_what_the_relay_resolved_for_its_ttl";
    let Some(env) = DockerEnv::get(test) else {
        return;
    };
    let _servers = start_servers();
    let net = unique_name("egress-net");
    let name = unique_name("egress-dns");
    let mut leftovers = Leftovers::network(&env, &net, &[]);
    leftovers.containers.push(name.clone());
    let policy = "io.agentvm.egress=none-but; allow example.test tcp port 8080";
    let id = start(
        &env,
        &name,
        &[
            "--network",
            &net,
            "--dns",
            "10.231.77.1",
            "--annotation",
            policy,
        ],
    );
    assert!(
        reaches(&env, &name, "example.test", 8080),
        "the allowed name"
    );
    assert!(
        !reaches(&env, &name, "other.test", 8080),
        "a name no rule allows"
    );
    assert!(
        !reaches(&env, &name, "198.51.100.8", 8080),
        "an address no allowed name gave"
    );
    let (_, direct) = docker(
        &env,
        &[
            "exec",
            &name,
            "sh",
            "-c",
            "timeout 5 nslookup example.test 10.231.77.1 && echo RESOLVED",
        ],
    );
    assert!(!direct.contains("RESOLVED"), "DNS past the relay: {direct}");
    // The TTL (3 s, kept at least 5 s) ends: the address is no longer allowed by itself.
    std::thread::sleep(Duration::from_secs(7));
    assert!(
        !reaches(&env, &name, "198.51.100.7", 8080),
        "an expired address"
    );
    assert!(reaches(&env, &name, "example.test", 8080), "resolved again");
    let (ok, log) = agentvm(&["policy", "log", &id]);
    assert!(ok, "{log}");
    // The block names the name the address was resolved from.
    assert!(
        log.contains("blocked tcp to 198.51.100.8:8080 (other.test) (policy"),
        "{log}"
    );
    assert!(
        log.contains("blocked udp to 10.231.77.1:53") && log.contains("DNS past agentvm's relay"),
        "{log}"
    );
    // A policy change keeps what the relay learnt for names the new policy still allows:
    // kept.test's address stays reachable by itself after the change, with no new lookup.
    let (ok, out) = agentvm(&[
        "policy",
        "set",
        &id,
        "none-but; allow kept.test tcp port 8080",
    ]);
    assert!(ok, "{out}");
    assert!(reaches(&env, &name, "kept.test", 8080), "kept.test by name");
    let (ok, out) = agentvm(&[
        "policy",
        "set",
        &id,
        "none-but; allow nothing.test; allow kept.test tcp port 8080",
    ]);
    assert!(ok, "{out}");
    let (ok, show) = agentvm(&["policy", "show", &id]);
    assert!(ok && show.contains("kept.test 198.51.100.8 ("), "{show}");
    assert!(
        reaches(&env, &name, "198.51.100.8", 8080),
        "the address learnt before the change"
    );
    // DNS rebinding: an allowed name answered with the metadata look-alike opens nothing the
    // profile keeps closed.
    let (ok, out) = agentvm(&[
        "policy",
        "set",
        &id,
        "agent; allow rebind.test tcp port 8080",
    ]);
    assert!(ok, "{out}");
    assert!(
        !reaches(&env, &name, "rebind.test", 8080),
        "an allowed name resolved to a link-local address"
    );
    let (ok, log) = agentvm(&["policy", "log", &id]);
    assert!(ok, "{log}");
    assert!(
        log.contains("blocked tcp to 169.254.77.77:8080 (rebind.test) (policy")
            && log.contains("rule: link-local"),
        "{log}"
    );
    let (code, out) = docker(&env, &["rm", "-f", &name]);
    assert_eq!(code, Some(0), "{out}");
    env.assert_vm_gone(&id);
    drop(leftovers);

    // The default bridge has no relay: refused, with the reason.
    let bad = unique_name("egress-dns-bridge");
    let (code, out) = docker(
        &env,
        &[
            "run",
            "--rm",
            "--runtime=agentvm",
            "--annotation",
            policy,
            "--name",
            &bad,
            &env.image,
            "true",
        ],
    );
    assert_ne!(code, Some(0));
    assert!(
        out.contains("domain rules work through agentvm's DNS relay"),
        "{out}"
    );
    let _ = docker(&env, &["rm", "-f", &bad]);
}

/// Compose with two services on the project's network under `agent`: they reach each other by
/// service name (their own network is allowed), the web service's published port answers on
/// the host, the internal host stays blocked; after `docker restart` the policy is there again
/// (the annotation's: a restart is a new task) and `agentvm policy show` says so.
#[test]
fn compose_services_under_the_agent_policy_and_a_restart() {
    let test = "compose_services_under_the_agent_policy_and_a_restart";
    let Some(env) = DockerEnv::get(test) else {
        return;
    };
    let _servers = start_servers();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("compose.yaml");
    let compose = format!(
        r#"services:
  web:
    image: {image}
    runtime: agentvm
    annotations:
      io.agentvm.egress: agent
    ports: ["127.0.0.1::8080"]
    command: ["sh", "-c", "mkdir -p /www && echo hello-policy > /www/index.html && exec httpd -f -p 8080 -h /www"]
  client:
    image: {image}
    runtime: agentvm
    annotations:
      io.agentvm.egress: agent
    command: ["sleep", "600"]
"#,
        image = env.image
    );
    std::fs::write(&file, compose).unwrap();
    let project = unique_name("egress-compose");
    let f = file.to_str().unwrap();
    let compose_cmd = |args: &[&str]| {
        let mut all = vec!["compose", "-p", &project, "-f", f];
        all.extend_from_slice(args);
        let out = env.docker(&all, None, T);
        let (so, se) = text(&out);
        (out.status.code(), format!("{so}{se}"))
    };
    let (code, out) = compose_cmd(&["up", "-d"]);
    let ids: Vec<String> = compose_cmd(&["ps", "-aq"])
        .1
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .map(|i| {
            docker(&env, &["inspect", "-f", "{{.Id}}", &i])
                .1
                .trim()
                .to_string()
        })
        .collect();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_eq!(code, Some(0), "compose up: {out}");
        let client = format!("{project}-client-1");
        await_exec(&env, &client, "the client's VM");
        let fetch =
            "for i in $(seq 100); do wget -qO- http://web:8080/ && exit 0; sleep 0.3; done; exit 1";
        let (code, page) = docker(&env, &["exec", &client, "sh", "-c", fetch]);
        assert_eq!(code, Some(0), "client → web by name: {page}");
        assert!(page.contains("hello-policy"), "{page}");
        let (_, port) = compose_cmd(&["port", "web", "8080"]);
        let port = port.trim().rsplit(':').next().unwrap_or("").to_string();
        let (ok, body) = sh(&format!(
            "for i in $(seq 50); do wget -qO- http://127.0.0.1:{port}/ && exit 0; sleep 0.3; done; exit 1"
        ));
        assert!(
            ok && body.contains("hello-policy"),
            "published port {port}: {body}"
        );
        assert!(
            !reaches(&env, &client, "10.231.77.1", 8080),
            "the internal host"
        );
        // A restart: the new task has the annotation's policy again.
        let (code, out) = docker(&env, &["restart", "-t", "1", &client]);
        assert_eq!(code, Some(0), "docker restart: {out}");
        await_exec(&env, &client, "the restarted VM");
        assert!(
            !reaches(&env, &client, "10.231.77.1", 8080),
            "after the restart"
        );
        assert!(reaches(&env, &client, "web", 8080), "web after the restart");
        let (_, cid) = docker(&env, &["inspect", "-f", "{{.Id}}", &client]);
        let (ok, show) = agentvm(&["policy", "show", cid.trim()]);
        assert!(ok && show.contains("policy: agent (base agent)"), "{show}");
        assert!(!show.contains("blocked: 0 packets"), "{show}");
    }));
    let (code, out) = compose_cmd(&["down", "--timeout", "2"]);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    assert_eq!(code, Some(0), "compose down: {out}");
    assert_eq!(ids.len(), 2, "{ids:?}");
    for id in &ids {
        env.assert_vm_gone(id);
    }
}

/// IPv6 under `agent`: on a Docker network with IPv6 (a ULA subnet of the test's own), a
/// connection to another ULA address is blocked and logged, also through a route the guest
/// adds itself: the table judges every frame on the tap,
/// whatever the guest's routing says. Nothing listens at those addresses; the audit log shows
/// the frames reached the policy's deny chain instead of leaving the namespace.
#[test]
fn ipv6_under_the_agent_policy() {
    let test = "ipv6_under_the_agent_policy";
    let Some(env) = DockerEnv::get(test) else {
        return;
    };
    let net = unique_name("egress-v6");
    let mut leftovers = Leftovers::network(&env, &net, &["--ipv6", "--subnet", "fd77:a9e7:1::/64"]);
    let name = unique_name("egress-v6");
    leftovers.containers.push(name.clone());
    let id = start(
        &env,
        &name,
        &["--network", &net, "--annotation", "io.agentvm.egress=agent"],
    );
    let script = "ip -6 addr show dev eth0 | grep -q 'fd77:a9e7:1::' && echo HAS-V6; \
                  timeout 3 nc fd00:77::1 80 </dev/null; \
                  ip -6 route add fd00:78::/64 via fd77:a9e7:1::1 dev eth0 && echo ROUTED; \
                  timeout 3 nc fd00:78::1 80 </dev/null; true";
    let (_, out) = docker(&env, &["exec", &name, "sh", "-c", script]);
    assert!(out.contains("HAS-V6") && out.contains("ROUTED"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let log = loop {
        let (ok, log) = agentvm(&["policy", "log", &id]);
        assert!(ok, "{log}");
        if log.contains("[fd00:78::1]:80") || Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    for line in [
        "blocked tcp to [fd00:77::1]:80 (policy \"agent\", rule: unique local (ULA))",
        "blocked tcp to [fd00:78::1]:80 (policy \"agent\", rule: unique local (ULA))",
    ] {
        assert!(log.contains(line), "{line} not in the log:\n{log}");
    }
    let (code, out) = docker(&env, &["rm", "-f", &name]);
    assert_eq!(code, Some(0), "{out}");
    env.assert_vm_gone(&id);
}
