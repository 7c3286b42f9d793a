//! Networking of `docker run --runtime=agentvm`: the guest carries the veth's identity, ports
//! publish, names resolve on user-defined networks (Docker's DNS through the relay), `none`
//! has no way out and `host` is refused. Needs hack/docker-up.sh (hack/test.sh runs it).

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use agentvm_integration::{processes_mentioning, text, unique_name, DockerEnv, DOCKER_TIMEOUT};

const T: Duration = DOCKER_TIMEOUT;

/// A detached busybox httpd answering `body` on port 8080.
fn web_server_args(body: &str) -> String {
    format!("mkdir -p /www && echo {body} > /www/index.html && exec httpd -f -p 8080 -h /www")
}

/// `GET /` on 127.0.0.1:`port`, retried until `deadline` (the VM may still be booting).
fn http_get(port: u16, deadline: Instant) -> String {
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut buf = String::new();
            s.read_to_string(&mut buf)?;
            Ok(buf)
        })();
        match attempt {
            Ok(b) if b.contains("200") => return b,
            other if Instant::now() > deadline => panic!("GET / on port {port}: {other:?}"),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Removes containers and a network when dropped, so a failing test cleans up too.
struct Cleanup<'a> {
    env: &'a DockerEnv,
    containers: Vec<String>,
    network: Option<String>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for c in &self.containers {
            self.env.docker(&["rm", "-f", c], None, T);
        }
        if let Some(n) = &self.network {
            self.env.docker(&["network", "rm", n], None, T);
        }
    }
}

#[test]
fn published_port_guest_address_and_names_on_a_user_network() {
    let test = "published_port_guest_address_and_names_on_a_user_network";
    let Some(env) = DockerEnv::get(test) else {
        return;
    };
    let net = unique_name("net");
    let web = unique_name("web");
    let mut cleanup = Cleanup {
        env: &env,
        containers: vec![web.clone()],
        network: Some(net.clone()),
    };
    let out = env.docker(&["network", "create", &net], None, T);
    assert!(out.status.success(), "{:?}", text(&out));
    let script = web_server_args("hello-from-the-vm");
    let out = env.docker(
        &[
            "run",
            "--runtime=agentvm",
            "-d",
            "--name",
            &web,
            "--network",
            &net,
            "-p",
            "127.0.0.1::8080",
            &env.image,
            "sh",
            "-c",
            &script,
        ],
        None,
        T,
    );
    let (web_id, se) = text(&out);
    assert!(out.status.success(), "docker run -d: {se}");
    let web_id = web_id.trim().to_string();

    // The published port reaches the server in the VM from the host's loopback.
    let out = env.docker(&["port", &web, "8080/tcp"], None, T);
    let (port, _) = text(&out);
    let port: u16 = port
        .lines()
        .next()
        .and_then(|l| l.rsplit(':').next())
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("docker port printed {port:?}"));
    let reply = http_get(port, Instant::now() + Duration::from_secs(60));
    assert!(reply.contains("hello-from-the-vm"), "{reply}");

    // The guest's eth0 carries the address Docker assigned.
    let out = env.docker(
        &[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{.MacAddress}}{{end}}",
            &web,
        ],
        None,
        T,
    );
    let (ip_mac, _) = text(&out);
    let (ip, mac) = ip_mac.trim().split_once(' ').expect("ip and mac");
    let out = env.docker(&["exec", &web, "ip", "addr", "show", "eth0"], None, T);
    let (addr, se) = text(&out);
    assert!(out.status.success(), "{se}");
    assert!(addr.contains(&format!("inet {ip}/")), "want {ip} in {addr}");
    assert!(addr.contains(mac), "want {mac} in {addr}");
    // Docker's sysctls (spec) and its per-veth IPv6 switch (namespace) hold in the guest.
    let out = env.docker(
        &[
            "exec",
            &web,
            "cat",
            "/proc/sys/net/ipv4/ip_unprivileged_port_start",
            "/proc/sys/net/ipv6/conf/eth0/disable_ipv6",
        ],
        None,
        T,
    );
    assert_eq!(text(&out).0, "0\n1\n", "{:?}", text(&out));

    // Another container on the network reaches it by name (Docker's DNS via the relay).
    let (out, client_id) = env.run(
        "client",
        &[
            "--rm",
            "--network",
            &net,
            &env.image,
            "sh",
            "-c",
            "grep nameserver /etc/resolv.conf; wget -qO- http://WEB:8080/"
                .replace("WEB", &web)
                .as_str(),
        ],
        None,
    );
    let (so, se) = text(&out);
    assert_eq!(out.status.code(), Some(0), "client: {so} {se}");
    assert!(so.contains("nameserver 127.0.0.11"), "{so}");
    assert!(so.contains("hello-from-the-vm"), "{so}");
    env.assert_vm_gone(&client_id);

    let out = env.docker(&["rm", "-f", &web], None, T);
    assert!(out.status.success());
    cleanup.containers.clear();
    env.assert_vm_gone(&web_id);
    assert!(
        processes_mentioning(&format!("agentvm-netns /run/agentvm/{web_id}")).is_empty(),
        "the namespace holder survived"
    );
}

#[test]
fn network_none_has_loopback_only() {
    let Some(env) = DockerEnv::get("network_none_has_loopback_only") else {
        return;
    };
    let (out, id) = env.run(
        "none",
        &[
            "--rm",
            "--network",
            "none",
            &env.image,
            "sh",
            "-c",
            "echo $(ip -o link | cut -d: -f2 | tr -d ' '); \
             tail -n +2 /proc/net/route | wc -l; wget -T 3 -qO- http://172.17.0.1/ && echo REACHED",
        ],
        None,
    );
    let (so, se) = text(&out);
    assert_eq!(so.lines().next(), Some("lo"), "links: {so} {se}");
    assert_eq!(so.lines().nth(1).map(str::trim), Some("0"), "routes: {so}");
    assert!(!so.contains("REACHED"), "{so}");
    assert_ne!(out.status.code(), Some(0), "wget must fail: {so} {se}");
    env.assert_vm_gone(&id);
}

#[test]
fn network_host_is_refused_with_a_reason() {
    let Some(env) = DockerEnv::get("network_host_is_refused_with_a_reason") else {
        return;
    };
    let (out, id) = env.run(
        "host",
        &["--rm", "--network", "host", &env.image, "true"],
        None,
    );
    let (_, se) = text(&out);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        se.contains("--network host") && se.contains("own VM"),
        "stderr: {se}"
    );
    if !id.is_empty() {
        env.docker(&["rm", "-f", id.trim()], None, T);
        env.assert_vm_gone(id.trim());
    }
}

#[test]
fn dns_add_host_and_hostname_options_apply() {
    let Some(env) = DockerEnv::get("dns_add_host_and_hostname_options_apply") else {
        return;
    };
    let (out, id) = env.run(
        "dnsopts",
        &[
            "--rm",
            "--dns",
            "192.0.2.53",
            "--add-host",
            "db.example:192.0.2.7",
            "--hostname",
            "agent-box",
            &env.image,
            "sh",
            "-c",
            "grep ^nameserver /etc/resolv.conf; grep db.example /etc/hosts; hostname",
        ],
        None,
    );
    let (so, se) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{so} {se}");
    let lines: Vec<&str> = so.lines().collect();
    assert_eq!(lines[0], "nameserver 192.0.2.53", "{so}");
    assert!(
        lines[1].starts_with("192.0.2.7") && lines[1].ends_with("db.example"),
        "{so}"
    );
    assert_eq!(lines[2], "agent-box", "{so}");
    env.assert_vm_gone(&id);
}
