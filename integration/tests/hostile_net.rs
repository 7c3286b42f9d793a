//! A hostile root in the guest on a user-defined Docker network (issue 11 item 5): it takes
//! another IP of the subnet, changes its MAC, claims the gateway's IP by ARP and answers DHCP.
//! A runc container on the same network is the observer: none of it reaches it, and the
//! shim's guard counts the drops (docs/security.md "Network: anti-spoofing"). Router
//! advertisements are not sent here (busybox has no tool that writes raw IPv6 frames): the
//! guard's netns unit test (`namespace_is_created_scanned_and_wired`) writes one into a tap.
//! Needs hack/docker-up.sh.

use std::process::Command;
use std::time::{Duration, Instant};

use agentvm_integration::{text, unique_name, DockerEnv, DOCKER_TIMEOUT};

const T: Duration = DOCKER_TIMEOUT;

/// Removes containers and the network when dropped, so a failing test cleans up too.
struct Cleanup<'a> {
    env: &'a DockerEnv,
    containers: Vec<String>,
    network: String,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for c in &self.containers {
            self.env.docker(&["rm", "-f", c], None, T);
        }
        self.env.docker(&["network", "rm", &self.network], None, T);
    }
}

fn ok(env: &DockerEnv, args: &[&str]) -> String {
    let out = env.docker(args, None, T);
    let (so, se) = text(&out);
    assert!(out.status.success(), "docker {args:?}: {so} {se}");
    so.trim().to_string()
}

/// `docker exec CONTAINER sh -c SCRIPT`: exit status and output.
fn sh(env: &DockerEnv, container: &str, script: &str) -> (bool, String) {
    let out = env.docker(&["exec", container, "sh", "-c", script], None, T);
    let (so, se) = text(&out);
    (out.status.success(), format!("{so}{se}"))
}

/// The echo requests the observer's kernel received (`Icmp: InEchos` of /proc/net/snmp).
fn in_echos(env: &DockerEnv, observer: &str) -> u64 {
    let (done, snmp) = sh(env, observer, "cat /proc/net/snmp");
    assert!(done, "{snmp}");
    let mut icmp = snmp.lines().filter(|l| l.starts_with("Icmp:"));
    let (names, values) = (icmp.next().unwrap(), icmp.next().unwrap());
    let i = names
        .split_whitespace()
        .position(|n| n == "InEchos")
        .expect("InEchos");
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// The observer's neighbour entry for `ip`: its MAC address, if any.
fn neighbour(env: &DockerEnv, observer: &str, ip: &str) -> Option<String> {
    let (_, out) = sh(env, observer, &format!("ip neigh show {ip}"));
    let words: Vec<&str> = out.split_whitespace().collect();
    words
        .iter()
        .position(|w| *w == "lladdr")
        .and_then(|i| words.get(i + 1))
        .map(|m| m.to_string())
}

/// Frames the guard dropped on the attacker's tap so far: the packet counters of the drop
/// filters (`gact` drops, or redirects to the never-up sink tap) in `tc -s filter show`, read
/// in the namespace of the container's task pid.
fn guard_drops(pid: &str) -> u64 {
    let out = Command::new("nsenter")
        .args([
            "-t", pid, "-n", "tc", "-s", "filter", "show", "dev", "avmtap0",
        ])
        .arg("ingress")
        .output()
        .expect("run nsenter tc");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "tc: {shown}");
    let mut dropping = false;
    let mut total = 0;
    for line in shown.lines() {
        let line = line.trim();
        if line.starts_with("action order") {
            dropping = line.contains("gact") || line.contains("device avmsink");
        } else if let Some(rest) = line.strip_prefix("Sent ") {
            if dropping {
                let pkts: Vec<&str> = rest.split_whitespace().collect();
                total += pkts.get(2).and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
            }
            dropping = false;
        }
    }
    total
}

/// The log the shim's warnings land in (containerd's, as hack/docker-up.sh starts it).
fn containerd_log() -> std::path::PathBuf {
    let dir =
        std::env::var("AGENTVM_DOCKER_LOGS").unwrap_or_else(|_| "/tmp/agentvm-docker-logs".into());
    std::path::Path::new(&dir).join("containerd.log")
}

#[test]
fn spoofing_from_the_guest_never_reaches_a_neighbour() {
    let test = "spoofing_from_the_guest_never_reaches_a_neighbour";
    let Some(env) = DockerEnv::get(test) else {
        return;
    };
    let net = unique_name("hostile-net");
    let observer = unique_name("observer");
    let attacker = unique_name("attacker");
    let _cleanup = Cleanup {
        env: &env,
        containers: vec![observer.clone(), attacker.clone()],
        network: net.clone(),
    };
    ok(&env, &["network", "create", &net]);
    let gw = ok(
        &env,
        &[
            "network",
            "inspect",
            "-f",
            "{{range .IPAM.Config}}{{.Gateway}} {{.Subnet}}{{end}}",
            &net,
        ],
    );
    let (gw, subnet) = gw.split_once(' ').expect("gateway and subnet");
    let prefix = subnet.rsplit('/').next().unwrap().to_string();
    let gw = gw.to_string();
    ok(
        &env,
        &[
            "run",
            "-d",
            "--runtime=runc",
            "--name",
            &observer,
            "--network",
            &net,
            &env.image,
            "sleep",
            "600",
        ],
    );
    let attacker_id = ok(
        &env,
        &[
            "run",
            "-d",
            "--runtime=agentvm",
            "--name",
            &attacker,
            "--network",
            &net,
            &env.image,
            "sleep",
            "600",
        ],
    );
    let addr = |c: &str| {
        let s = ok(
            &env,
            &[
                "inspect",
                "-f",
                "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{.MacAddress}}{{end}}",
                c,
            ],
        );
        let (ip, mac) = s.split_once(' ').expect("ip and mac");
        (ip.to_string(), mac.to_string())
    };
    let (obs_ip, obs_mac) = addr(&observer);
    let (att_ip, _att_mac) = addr(&attacker);
    let pid = ok(&env, &["inspect", "-f", "{{.State.Pid}}", &attacker]);
    // An unused address of the subnet (the network is new: gateway, observer, attacker).
    let spoofed = {
        let mut o: Vec<&str> = obs_ip.split('.').collect();
        o[3] = "200";
        o.join(".")
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !sh(&env, &attacker, "true").0 {
        assert!(
            Instant::now() < deadline,
            "the attacker's VM never answered exec"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // The observer knows the gateway's real MAC.
    let (done, out) = sh(&env, &observer, &format!("ping -c 1 -W 5 {gw}"));
    assert!(done, "observer ping gateway: {out}");
    let gw_mac = neighbour(&env, &observer, &gw).expect("the observer resolved the gateway");

    // Control: the guest's own address reaches the observer.
    let before = in_echos(&env, &observer);
    // The guest kernel lacks alarm(2) (issue 15): busybox ping sends one echo per run there.
    let (done, out) = sh(
        &env,
        &attacker,
        &format!("timeout 10 ping -c 1 -W 5 {obs_ip} && timeout 10 ping -c 1 -W 5 {obs_ip}"),
    );
    assert!(done, "honest ping from the guest: {out}");
    assert!(
        in_echos(&env, &observer) >= before + 2,
        "the control ping never arrived"
    );
    let mut drops = guard_drops(&pid);

    // 1. Another IP of the subnet (the observer's MAC pinned, so no ARP is needed).
    let before = in_echos(&env, &observer);
    let (_, out) = sh(
        &env,
        &attacker,
        &format!(
            "ip addr add {spoofed}/{prefix} dev eth0 && arp -s {obs_ip} {obs_mac} && \
             for i in 1 2 3; do timeout 3 ping -c 1 -W 1 -I {spoofed} {obs_ip}; done; \
             ip addr del {spoofed}/{prefix} dev eth0"
        ),
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        in_echos(&env, &observer),
        before,
        "pings from a spoofed source reached the observer: {out}"
    );
    let now = guard_drops(&pid);
    assert!(
        now >= drops + 3,
        "spoofed IP: drops {drops} -> {now}: {out}"
    );
    drops = now;

    // 2. Gratuitous ARP and ARP replies claiming the gateway's IP.
    let (_, out) = sh(
        &env,
        &attacker,
        &format!(
            "sysctl -w net.ipv4.ip_nonlocal_bind=1; \
             timeout 5 arping -U -c 2 -I eth0 -s {gw} {gw}; \
             timeout 5 arping -A -c 2 -I eth0 -s {gw} {gw}"
        ),
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        neighbour(&env, &observer, &gw).as_deref(),
        Some(gw_mac.as_str()),
        "the observer's ARP entry of the gateway changed: {out}"
    );
    let now = guard_drops(&pid);
    assert!(
        now >= drops + 2,
        "gratuitous ARP: drops {drops} -> {now}: {out}"
    );
    drops = now;

    // 3. A DHCP server in the guest: the observer's DHCP client gets no offer.
    let base: Vec<&str> = obs_ip.split('.').collect();
    let (done, out) = sh(
        &env,
        &attacker,
        &format!(
            "printf 'start {p}.100\\nend {p}.150\\ninterface eth0\\nlease_file /tmp/leases\\n' \
             > /tmp/udhcpd.conf && touch /tmp/leases",
            p = base[..3].join(".")
        ),
    );
    assert!(done, "{out}");
    ok(
        &env,
        &["exec", "-d", &attacker, "udhcpd", "-f", "/tmp/udhcpd.conf"],
    );
    std::thread::sleep(Duration::from_secs(1));
    let (leased, out) = sh(
        &env,
        &observer,
        "udhcpc -i eth0 -n -q -f -t 5 -T 2 -s /bin/true 2>&1",
    );
    assert!(!leased, "the observer got a lease from the guest: {out}");
    let now = guard_drops(&pid);
    assert!(now > drops, "DHCP offers: drops {drops} -> {now}: {out}");
    drops = now;

    // 4. Another MAC: the guest's own IP from a MAC Docker did not give it.
    let before = in_echos(&env, &observer);
    let (_, out) = sh(
        &env,
        &attacker,
        &format!(
            "ip link set eth0 down && ip link set eth0 address 02:42:de:ad:be:ef && \
             ip link set eth0 up && arp -s {obs_ip} {obs_mac} && \
             for i in 1 2 3; do timeout 3 ping -c 1 -W 1 {obs_ip}; done"
        ),
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        in_echos(&env, &observer),
        before,
        "pings from another MAC reached the observer: {out}"
    );
    let now = guard_drops(&pid);
    assert!(
        now >= drops + 3,
        "spoofed MAC: drops {drops} -> {now}: {out}"
    );
    assert!(
        !sh(&env, &observer, &format!("ip neigh show {att_ip}"))
            .1
            .contains("02:42:de:ad:be:ef"),
        "the observer learnt the spoofed MAC"
    );

    // The shim reports what it dropped when the sandbox goes.
    ok(&env, &["rm", "-f", &attacker]);
    let log = containerd_log();
    if !log.exists() {
        eprintln!(
            "{test}: no containerd log at {} (set AGENTVM_DOCKER_LOGS): not checking the \
             shim's warning",
            log.display()
        );
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let line = loop {
        let all = std::fs::read_to_string(&log).unwrap_or_default();
        let found = all
            .lines()
            .rev()
            .find(|l| l.contains("guest frames dropped on avmtap0") && l.contains(&attacker_id))
            .filter(|l| l.contains("torn down"))
            .map(str::to_string);
        if let Some(l) = found {
            break l;
        }
        assert!(
            Instant::now() < deadline,
            "no drop warning for {attacker_id} in {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    for what in [
        "spoofed source MAC",
        "spoofed source IP",
        "ARP",
        "DHCP server",
    ] {
        assert!(line.contains(what), "{what} missing in {line}");
    }
}
