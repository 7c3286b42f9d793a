//! containerd's own client: `ctr run --runtime io.containerd.agentvm.v1` with an image from
//! containerd's content store and snapshotter (the shim mounts the snapshot and shares it),
//! `ctr task exec` and `ctr task kill`. Needs hack/docker-up.sh (containerd with the shim on
//! its PATH and the test image in Docker, which is exported to containerd here).

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use agentvm_integration::{text, unique_name, wait_with_deadline, DockerEnv, DOCKER_TIMEOUT};

/// The containerd namespace of these tests (not Docker's `moby`).
const NS: &str = "agentvm-it";
const IMAGE: &str = "docker.io/agentvm-test/busybox:latest";

fn ctr(args: &[&str]) -> Output {
    let mut c = Command::new("ctr");
    c.arg("-n")
        .arg(NS)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    wait_with_deadline(c.spawn().expect("spawn ctr"), DOCKER_TIMEOUT)
}

/// Imports the Docker test image into containerd's store (idempotent).
fn import_image(env: &DockerEnv) {
    if ctr(&["image", "inspect", IMAGE]).status.success() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("img.tar");
    let out = env.docker(
        &["save", "-o", tar.to_str().unwrap(), &env.image],
        None,
        DOCKER_TIMEOUT,
    );
    assert!(out.status.success(), "docker save: {:?}", text(&out));
    let out = ctr(&["image", "import", tar.to_str().unwrap()]);
    assert!(out.status.success(), "ctr image import: {:?}", text(&out));
}

#[test]
fn ctr_run_exec_and_kill_with_containerd_snapshots() {
    let Some(env) = DockerEnv::get("ctr_run_exec_and_kill_with_containerd_snapshots") else {
        return;
    };
    import_image(&env);
    let rt = "io.containerd.agentvm.v1";
    let id = unique_name("ctr");
    let out = ctr(&[
        "run",
        "--runtime",
        rt,
        "--rm",
        IMAGE,
        &id,
        "sh",
        "-c",
        // The snapshotter's layers reach the VM as a disk under the shared writable layer.
        "echo hi from the vm; grep -c lowerdir=/run/agentvm/lower0 /proc/mounts; exit 3",
    ]);
    let (so, se) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{so} {se}");
    assert_eq!(so, "hi from the vm\n1\n");

    let id2 = unique_name("ctrd");
    let out = ctr(&["run", "--runtime", rt, "-d", IMAGE, &id2, "sleep", "1000"]);
    assert!(out.status.success(), "ctr run -d: {:?}", text(&out));
    let exec_id = "e1";
    let out = ctr(&[
        "task",
        "exec",
        "--exec-id",
        exec_id,
        &id2,
        "sh",
        "-c",
        "echo exec-ok; exit 4",
    ]);
    assert_eq!(out.status.code(), Some(4), "{:?}", text(&out));
    assert_eq!(text(&out).0, "exec-ok\n");
    let out = ctr(&["task", "kill", "-s", "SIGKILL", &id2]);
    assert!(out.status.success(), "ctr task kill: {:?}", text(&out));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = ctr(&["task", "ls"]);
        let listing = text(&out).0;
        let line = listing
            .lines()
            .find(|l| l.starts_with(&id2))
            .unwrap_or("")
            .to_string();
        if line.contains("STOPPED") || line.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "task not stopped: {line}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = ctr(&["task", "rm", &id2]);
    assert!(out.status.success(), "ctr task rm: {:?}", text(&out));
    let out = ctr(&["container", "rm", &id2]);
    assert!(out.status.success(), "ctr container rm: {:?}", text(&out));
    // The snapshot the shim mounted is unmounted, and no VM is left.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&id2), "rootfs still mounted");
    for cid in [&id, &id2] {
        env.assert_vm_gone(cid);
    }
}

/// A container whose spec remaps ids (`ctr run --uidmap`: a user namespace with mappings, as
/// dockerd's `--userns-remap` and Kubernetes' `hostUsers: false` make) is refused at create
/// with an error that says what to do, and leaves nothing behind: its root would otherwise
/// write as host root where its engine promised an unprivileged id.
#[test]
fn a_spec_that_remaps_ids_is_refused_and_leaves_nothing() {
    let Some(env) = DockerEnv::get("a_spec_that_remaps_ids_is_refused_and_leaves_nothing") else {
        return;
    };
    import_image(&env);
    let id = unique_name("ctr-remap");
    let out = ctr(&[
        "run",
        "--runtime",
        "io.containerd.agentvm.v1",
        "--rm",
        "--uidmap",
        "0:100000:65536",
        "--gidmap",
        "0:100000:65536",
        IMAGE,
        &id,
        "true",
    ]);
    let (so, se) = text(&out);
    assert!(!out.status.success(), "a remapped container ran: {so} {se}");
    assert!(
        se.contains("remaps user ids") && se.contains("--userns=host"),
        "the error does not say why and what to do: {se}"
    );
    let _ = ctr(&["container", "rm", &id]);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&id), "rootfs still mounted");
    env.assert_vm_gone(&id);
}

/// `ctr task exec` with stdin: runs `sh -c 'cat; echo done'` in container `id` with `input`
/// written to ctr's stdin (`None`: /dev/null), each chunk after `pause`. Bounded: a stdin
/// that never ends fails here rather than hanging the test.
fn exec_with_stdin(id: &str, exec_id: &str, input: Option<&[&[u8]]>, pause: Duration) -> Output {
    use std::io::Write;
    let mut c = Command::new("ctr");
    c.args(["-n", NS, "task", "exec", "--exec-id", exec_id, id])
        .args(["sh", "-c", "cat; echo done"])
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn ctr");
    if let Some(chunks) = input {
        let mut stdin = child.stdin.take().unwrap();
        for chunk in chunks {
            std::thread::sleep(pause);
            stdin.write_all(chunk).unwrap();
        }
    }
    wait_with_deadline(child, Duration::from_secs(60))
}

/// ctr hands an exec's stdin over differently from dockerd: it writes, asks `CloseIO`, then
/// closes its end of the fifo; and with a stdin already at EOF it closes its end before the
/// shim opens the fifo and never asks `CloseIO`. Data must arrive before the EOF, and an
/// empty stdin must end at once.
#[test]
fn ctr_exec_gets_its_stdin() {
    let Some(env) = DockerEnv::get("ctr_exec_gets_its_stdin") else {
        return;
    };
    import_image(&env);
    let rt = "io.containerd.agentvm.v1";
    let id = unique_name("ctr-stdin");
    let out = ctr(&["run", "--runtime", rt, "-d", IMAGE, &id, "sleep", "1000"]);
    assert!(out.status.success(), "ctr run -d: {:?}", text(&out));

    let out = exec_with_stdin(&id, "piped", Some(&[b"a\nb\n"]), Duration::ZERO);
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(text(&out).0, "a\nb\ndone\n");

    let t = std::time::Instant::now();
    let out = exec_with_stdin(&id, "empty", None, Duration::ZERO);
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(text(&out).0, "done\n");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "an empty stdin took {:?} to end",
        t.elapsed()
    );

    // A writer that is slow: its stdin is not ended early.
    let out = exec_with_stdin(
        &id,
        "slow",
        Some(&[b"x\n", b"y\n"]),
        Duration::from_millis(700),
    );
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(text(&out).0, "x\ny\ndone\n");

    let out = ctr(&["task", "kill", "-s", "SIGKILL", &id]);
    assert!(out.status.success(), "ctr task kill: {:?}", text(&out));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !text(&ctr(&["task", "ls"]))
        .0
        .lines()
        .filter(|l| l.starts_with(&id))
        .all(|l| l.contains("STOPPED"))
    {
        assert!(std::time::Instant::now() < deadline, "task not stopped");
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = ctr(&["task", "rm", &id]);
    assert!(out.status.success(), "ctr task rm: {:?}", text(&out));
    let out = ctr(&["container", "rm", &id]);
    assert!(out.status.success(), "ctr container rm: {:?}", text(&out));
    env.assert_vm_gone(&id);
}
