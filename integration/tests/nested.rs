//! Nested Docker (issue 6): an image with Docker Engine inside runs under agentvm, its dockerd
//! starts in the VM with `/var/lib/docker` on a tmpfs (never the 9p share), and inside it
//! `docker run` works, `-p` is reachable from the outer container, nested containers reach each
//! other and, through the VM's NAT, a server outside the VM that the egress policy allows (and
//! not one it does not), `docker stats` shows cgroup v2 figures, and `docker build` builds FROM
//! a loaded local image.
//!
//! Needs hack/docker-up.sh and the image of hack/make-nested-image.sh, named by
//! `AGENTVM_NESTED_IMAGE` (hack/test.sh sets it). Every check runs in one outer container (one
//! VM boot: these are minutes under TCG); the assertions name the step that failed.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::Duration;

use agentvm_integration::{text, unique_name, DockerEnv};

/// One outer container with a nested dockerd doing a dozen nested operations, under TCG on a
/// shared 2-core machine (about 3 minutes when measured).
const NESTED_TIMEOUT: Duration = Duration::from_secs(900);

/// The checks, run by bash in the outer container after the image's entrypoint has started
/// dockerd. Every step prints `STEP <name> ok` or `STEP <name> FAILED` after its output.
const SCRIPT: &str = r#"
set -u
failed=0
check() { # STEP PATTERN COMMAND...: COMMAND succeeds and a line of its output matches PATTERN
  step=$1 want=$2
  shift 2
  got=$("$@" 2>&1)
  rc=$?
  printf '%s\n' "$got" | sed "s/^/[$step] /"
  if [ $rc -eq 0 ] && printf '%s\n' "$got" | grep -Eq -- "$want"; then
    echo "STEP $step ok"
  else
    echo "STEP $step FAILED (exit $rc)"
    failed=1
  fi
}
fetch() { # URL: retried for a minute (the nested server may still be starting)
  for _ in $(seq 1 120); do
    timeout 10 busybox wget -q -O- "$1" && return 0
    sleep 0.5
  done
  return 1
}
check dockerd '^overlay2 2$' docker info --format '{{.Driver}} {{.CgroupVersion}}'
check storage '^tmpfs$' stat -f -c %T /var/lib/docker
check load '^Loaded image: busybox:latest$' docker load -i /opt/agentvm/nested-images.tar
check echo '^nested-ok$' docker run --rm busybox echo nested-ok
check iptables 'addrtype --dst-type LOCAL -j DOCKER' iptables -t nat -S PREROUTING
# Docker's own kernel checklist (Debian ships it): no "Generally Necessary" item missing.
necessary_missing() {
  sh /usr/share/docker.io/contrib/check-config.sh 2>&1 \
    | sed -n '/^Generally Necessary/,/^Optional Features/p' | grep -c missing
  return 0
}
check check-config '^0$' necessary_missing
check publish-start '^[0-9a-f]{64}$' docker run -d --name web -p 8080:80 busybox \
  sh -c 'mkdir -p /www && echo nested-http-ok > /www/index.html && exec httpd -f -p 80 -h /www'
check publish-loopback '^nested-http-ok$' fetch http://127.0.0.1:8080/
ip=$(hostname -i | cut -d' ' -f1)
check publish-eth0 '^nested-http-ok$' fetch "http://$ip:8080/"
web=$(docker inspect -f '{{.NetworkSettings.IPAddress}}' web)
check container-to-container '^nested-http-ok$' \
  docker run --rm busybox timeout 30 wget -q -O- "http://$web/"
if [ -n "${HOST_URL:-}" ]; then
  check nat-out '^host-ok$' docker run --rm busybox timeout 30 wget -q -O- "$HOST_URL"
fi
# The outer container's egress policy allows HOST_URL only: a nested container's connection
# to the host's other port (through the VM's NAT, from the nested bridge) stays blocked.
not_reached() {
  docker run --rm busybox timeout 10 wget -q -O- "$1" && return 1
  echo not-reached
}
if [ -n "${BLOCKED_URL:-}" ]; then
  check nat-blocked '^not-reached$' not_reached "$BLOCKED_URL"
fi
check stats '^[0-9.]+[kKMG]i?B / [0-9.]+[kKMG]i?B$' \
  docker stats --no-stream --format '{{.MemUsage}}' web
docker rm -f web >/dev/null 2>&1
mkdir -p /tmp/ctx
printf 'FROM busybox\nRUN echo built-in-vm > /built\nCMD ["cat", "/built"]\n' >/tmp/ctx/Dockerfile
check build 'Successfully tagged nested-built:latest' docker build -t nested-built /tmp/ctx
check build-run '^built-in-vm$' docker run --rm nested-built
if [ $failed != 0 ]; then
  echo "--- the end of /var/log/dockerd.log"
  tail -n 40 /var/log/dockerd.log
fi
exit $failed
"#;

fn skip_or_fail(test: &str, reason: &str) {
    if std::env::var("AGENTVM_REQUIRE_VM").as_deref() == Ok("1") {
        panic!("{test}: {reason} (AGENTVM_REQUIRE_VM=1 forbids skipping)");
    }
    eprintln!("SKIP {test}: {reason}");
}

/// The Docker environment and the nested image, or `None` after printing why.
fn nested_env(test: &str) -> Option<(DockerEnv, String)> {
    let env = DockerEnv::get(test)?;
    let Some(image) = std::env::var("AGENTVM_NESTED_IMAGE")
        .ok()
        .filter(|s| !s.is_empty())
    else {
        skip_or_fail(
            test,
            "AGENTVM_NESTED_IMAGE unset (hack/test.sh sets it from hack/make-nested-image.sh)",
        );
        return None;
    };
    let present = Command::new("docker")
        .args(["image", "inspect", &image])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !matches!(present, Ok(s) if s.success()) {
        skip_or_fail(
            test,
            &format!("nested image {image} missing (run hack/make-nested-image.sh)"),
        );
        return None;
    }
    Some((env, image))
}

/// An HTTP server on the host side of Docker's default bridge (its gateway address), answering
/// `host-ok` to every request, for the nested containers' way out through the VM's NAT.
/// `None` when the bridge's gateway is unknown.
fn host_server(env: &DockerEnv) -> Option<String> {
    let out = env.docker(
        &[
            "network",
            "inspect",
            "bridge",
            "-f",
            "{{(index .IPAM.Config 0).Gateway}}",
        ],
        None,
        Duration::from_secs(30),
    );
    let gw = text(&out).0.trim().to_string();
    let listener = TcpListener::bind((gw.as_str(), 0)).ok()?;
    let port = listener.local_addr().ok()?.port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(
                b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 8\r\n\r\nhost-ok\n",
            );
        }
    });
    Some(format!("http://{gw}:{port}/"))
}

/// `docker run --runtime=agentvm --rm ARGS` with the nested deadline; the output and the
/// container id.
fn run_outer(env: &DockerEnv, test: &str, args: &[&str]) -> (std::process::Output, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cidfile = dir.path().join("cid");
    let cid = cidfile.to_str().expect("utf-8 path").to_string();
    let name = unique_name(test);
    let mut all = vec![
        "run",
        "--runtime=agentvm",
        "--rm",
        "--name",
        &name,
        "--cidfile",
        &cid,
    ];
    all.extend_from_slice(args);
    let out = env.docker(&all, None, NESTED_TIMEOUT);
    let id = std::fs::read_to_string(&cidfile).unwrap_or_default();
    (out, id)
}

#[test]
fn nested_docker_runs_publishes_and_builds() {
    let test = "nested_docker_runs_publishes_and_builds";
    let Some((env, image)) = nested_env(test) else {
        return;
    };
    let host_url = host_server(&env);
    let blocked_url = host_server(&env);
    let host_env = format!("HOST_URL={}", host_url.as_deref().unwrap_or(""));
    let blocked_env = format!("BLOCKED_URL={}", blocked_url.as_deref().unwrap_or(""));
    // The egress policy allows the first host server only (`none-but` also allows the
    // container's own network and its gateway's DNS), so the second is blocked for nested
    // containers too: their frames leave the VM through the same tap.
    let policy = host_url
        .as_deref()
        .and_then(|u| u.strip_prefix("http://"))
        .and_then(|hp| hp.trim_end_matches('/').rsplit_once(':'))
        .map(|(host, port)| format!("io.agentvm.egress=none-but; allow {host} tcp port {port}"))
        .unwrap_or_else(|| "io.agentvm.egress=open".into());
    // No --privileged, no --cap-add: root in the VM holds every capability
    // (docs/decisions.md, "Nested Docker").
    let args = [
        "-e",
        &host_env,
        "-e",
        &blocked_env,
        "--annotation",
        &policy,
        &image,
        "bash",
        "-c",
        SCRIPT,
    ];
    let (out, id) = run_outer(&env, "nested", &args);
    let (so, se) = text(&out);
    let mut steps = vec![
        "dockerd",
        "storage",
        "load",
        "echo",
        "iptables",
        "check-config",
        "publish-start",
        "publish-loopback",
        "publish-eth0",
        "container-to-container",
    ];
    if host_url.is_some() {
        steps.extend(["nat-out", "nat-blocked"]);
    } else {
        eprintln!("{test}: no address on Docker's bridge to listen on: nat-out not checked");
    }
    steps.extend(["stats", "build", "build-run"]);
    for step in steps {
        assert!(
            so.lines().any(|l| l == format!("STEP {step} ok")),
            "nested step {step:?} failed or did not run (outer exit {:?}).\n\
             stdout:\n{so}\nstderr:\n{se}",
            out.status.code()
        );
    }
    assert_eq!(out.status.code(), Some(0), "{so}\n{se}");
    assert!(
        !se.contains("agentvm-entrypoint:"),
        "the entrypoint complained: {se}"
    );
    env.assert_vm_gone(id.trim());
}
