//! `agentvm run` end to end: a real VM under QEMU (TCG on these machines) boots the test
//! rootfs and runs busybox commands. Each test checks that nothing is left behind.

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use agentvm_integration::{text, wait_with_deadline, VmEnv};

const T: Duration = Duration::from_secs(120);

#[test]
fn echo_output_arrives() {
    let Some(env) = VmEnv::get("echo_output_arrives") else {
        return;
    };
    let out = env.run(&["--", "echo", "hello from the guest"], None, T);
    let (so, se) = text(&out);
    assert_eq!(out.status.code(), Some(0), "stderr: {se}");
    assert_eq!(so, "hello from the guest\n");
    env.assert_clean();
}

/// Output faster than the host reads it arrives whole, on both streams: 8 MB from `head` and
/// 1 MB of 512-byte writes to stderr. Without the output window (protocol `OUTPUT_WINDOW`)
/// the userspace vsock device stalled such a connection for good after a few KiB.
#[test]
fn bulk_output_arrives_whole() {
    let Some(env) = VmEnv::get("bulk_output_arrives_whole") else {
        return;
    };
    let script = "head -c 8000000 /dev/zero; dd if=/dev/zero bs=512 count=2000 >&2 2>/dev/null; \
                  dd if=/dev/zero bs=512 count=2000 1>&2; echo done";
    let out = env.run(&["--", "sh", "-c", script], None, T);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out).1);
    assert_eq!(out.stdout.len(), 8_000_000 + "done\n".len());
    assert!(out.stdout.ends_with(b"done\n"));
    assert!(
        out.stderr.len() >= 1_024_000,
        "stderr: {} bytes",
        out.stderr.len()
    );
    env.assert_clean();
}

#[test]
fn exit_code_comes_back() {
    let Some(env) = VmEnv::get("exit_code_comes_back") else {
        return;
    };
    let out = env.run(
        &["--", "sh", "-c", "echo out; echo err >&2; exit 7"],
        None,
        T,
    );
    let (so, se) = text(&out);
    assert_eq!(out.status.code(), Some(7), "stderr: {se}");
    assert_eq!(so, "out\n");
    assert!(se.contains("err\n"), "stderr: {se}");
    env.assert_clean();
}

#[test]
fn sigkilled_workload_reports_137() {
    let Some(env) = VmEnv::get("sigkilled_workload_reports_137") else {
        return;
    };
    let out = env.run(&["--", "sh", "-c", "kill -9 $$"], None, T);
    assert_eq!(out.status.code(), Some(137), "{:?}", text(&out));
    env.assert_clean();
}

#[test]
fn stdin_is_delivered() {
    let Some(env) = VmEnv::get("stdin_is_delivered") else {
        return;
    };
    let out = env.run(&["-i", "--", "cat"], Some(b"line one\nline two\n"), T);
    let (so, se) = text(&out);
    assert_eq!(out.status.code(), Some(0), "stderr: {se}");
    assert_eq!(so, "line one\nline two\n");
    env.assert_clean();
}

#[test]
fn env_cwd_and_user_are_applied() {
    let Some(env) = VmEnv::get("env_cwd_and_user_are_applied") else {
        return;
    };
    let out = env.run(
        &[
            "-e",
            "GREETING=hi there",
            "-w",
            "/tmp",
            "-u",
            "1000:1000",
            "--",
            "sh",
            "-c",
            "echo \"$GREETING\"; pwd; id -u; id -g; touch /tmp/x && echo writable",
        ],
        None,
        T,
    );
    let (so, se) = text(&out);
    assert_eq!(out.status.code(), Some(0), "stderr: {se}");
    assert_eq!(so, "hi there\n/tmp\n1000\n1000\nwritable\n");
    env.assert_clean();
}

#[test]
fn missing_binary_is_127_with_a_message() {
    let Some(env) = VmEnv::get("missing_binary_is_127_with_a_message") else {
        return;
    };
    let out = env.run(&["--", "no-such-command", "arg"], None, T);
    let (_, se) = text(&out);
    assert_eq!(out.status.code(), Some(127), "stderr: {se}");
    assert!(
        se.contains("no-such-command") && se.contains("executable file not found"),
        "stderr: {se}"
    );
    env.assert_clean();
}

#[test]
fn terminal_gets_a_tty() {
    let Some(env) = VmEnv::get("terminal_gets_a_tty") else {
        return;
    };
    let out = env.run(
        &[
            "-t",
            "--",
            "sh",
            "-c",
            "test -t 0 && test -t 1 && echo is-a-tty; echo TERM=$TERM",
        ],
        None,
        T,
    );
    let (so, se) = text(&out);
    assert_eq!(out.status.code(), Some(0), "stderr: {se}");
    assert!(so.contains("is-a-tty"), "stdout: {so:?}");
    assert!(so.contains("TERM=xterm"), "stdout: {so:?}");
    env.assert_clean();
}

/// Reads the child's stdout until `marker` shows up (the workload is running).
fn wait_for_marker(stdout: &mut std::process::ChildStdout, marker: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + T;
    while !String::from_utf8_lossy(&seen).contains(marker) {
        assert!(Instant::now() < deadline, "no {marker:?} in {seen:?}");
        let n = stdout.read(&mut buf).expect("read stdout");
        assert!(
            n > 0,
            "stdout closed before {marker:?}: {:?}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

#[test]
fn ctrl_c_reaches_the_workload() {
    let Some(env) = VmEnv::get("ctrl_c_reaches_the_workload") else {
        return;
    };
    let mut child = env
        .run_cmd(&[
            "--",
            "sh",
            "-c",
            "trap 'echo got-int; exit 3' INT; echo ready; while :; do sleep 0.1; done",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdout = child.stdout.take().expect("stdout");
    wait_for_marker(&mut stdout, "ready");
    // SAFETY: kill(2) on the child we just spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let mut rest = String::new();
    let out = wait_with_deadline(child, T);
    stdout.read_to_string(&mut rest).expect("read rest");
    assert!(rest.contains("got-int"), "stdout after SIGINT: {rest:?}");
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    env.assert_clean();
}

#[test]
fn killed_vmm_fails_fast_and_leaves_nothing() {
    let Some(env) = VmEnv::get("killed_vmm_fails_fast_and_leaves_nothing") else {
        return;
    };
    let mut child = env
        .run_cmd(&["--", "sh", "-c", "echo ready; sleep 600"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdout = child.stdout.take().expect("stdout");
    wait_for_marker(&mut stdout, "ready");
    let qemu: Vec<String> = env
        .leftover_processes()
        .into_iter()
        .filter(|p| p.contains("qemu-system"))
        .collect();
    assert_eq!(qemu.len(), 1, "expected one QEMU for this test: {qemu:?}");
    let pid: i32 = qemu[0].split(':').next().unwrap().parse().unwrap();
    let killed_at = Instant::now();
    // SAFETY: kill(2) on the QEMU process this test's agentvm started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let out = wait_with_deadline(child, Duration::from_secs(30));
    let took = killed_at.elapsed();
    let (_, se) = text(&out);
    assert_ne!(out.status.code(), Some(0), "stderr: {se}");
    assert!(took < Duration::from_secs(10), "took {took:?} to notice");
    assert!(se.contains("VM exited unexpectedly"), "stderr: {se}");
    assert!(se.contains("console tail"), "stderr: {se}");
    env.assert_clean();
}

#[test]
fn check_reports_the_host() {
    let Some(env) = VmEnv::get("check_reports_the_host") else {
        return;
    };
    let out = std::process::Command::new(&env.bin)
        .arg("check")
        .output()
        .expect("run check");
    let (so, _) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{so}");
    for item in ["qemu", "kernel", "agent", "vhost-vsock", "kvm"] {
        assert!(so.contains(item), "no {item} line in:\n{so}");
    }
}

#[test]
fn image_config_defaults_apply() {
    let Some(env) = VmEnv::get("image_config_defaults_apply") else {
        return;
    };
    let Some(image) = env.test_image("image_config_defaults_apply") else {
        return;
    };
    // The image's Entrypoint + Cmd, Env and WorkingDir; its upper layer whites out
    // /etc/obsolete and hardlinks srv/message.
    let out = wait_with_deadline(
        env.bare_run_cmd(&[&image])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn"),
        T,
    );
    let (so, se) = text(&out);
    assert_eq!(out.status.code(), Some(0), "stderr: {se}");
    assert_eq!(so, "hello from an OCI image\n/srv\nimage-env\n");
    // User args replace Cmd but keep the Entrypoint; -e and -w override the image's.
    let out = wait_with_deadline(
        env.bare_run_cmd(&[
            "-e",
            "GREETING=flag-env",
            "-w",
            "/etc",
            &image,
            "--",
            "echo $GREETING; pwd; ls; stat -c %h /srv/message",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn"),
        T,
    );
    let (so, se) = text(&out);
    assert_eq!(out.status.code(), Some(0), "stderr: {se}");
    assert_eq!(so, "flag-env\n/etc\ngroup\npasswd\n2\n");
    env.assert_clean();
}
