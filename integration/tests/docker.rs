//! Docker end to end: `docker run --runtime=agentvm` through dockerd, containerd 1.7 and
//! containerd-shim-agentvm-v1, each container in a real VM (TCG on these machines). Each test
//! checks that the container's VM and state dir are gone afterwards.
//! Needs hack/docker-up.sh (hack/test.sh runs it).

use std::time::Duration;

use agentvm_integration::{processes_mentioning, text, unique_name, DockerEnv, DOCKER_TIMEOUT};

const T: Duration = DOCKER_TIMEOUT;

#[test]
fn docker_run_echo_prints_hi() {
    let Some(env) = DockerEnv::get("docker_run_echo_prints_hi") else {
        return;
    };
    let (out, id) = env.run("echo", &["--rm", &env.image.clone(), "echo", "hi"], None);
    let (so, se) = text(&out);
    assert_eq!(out.status.code(), Some(0), "stderr: {se}");
    assert_eq!(so, "hi\n");
    env.assert_vm_gone(&id);
}

/// 8 MB of output faster than Docker reads it arrives whole (the agent's output window keeps
/// the userspace vsock device from stalling the connection).
#[test]
fn docker_run_bulk_output_arrives_whole() {
    let Some(env) = DockerEnv::get("docker_run_bulk_output_arrives_whole") else {
        return;
    };
    let (out, id) = env.run(
        "bulk",
        &[
            "--rm",
            &env.image.clone(),
            "sh",
            "-c",
            "head -c 8000000 /dev/zero; echo done",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out).1);
    assert_eq!(out.stdout.len(), 8_000_000 + "done\n".len());
    assert!(out.stdout.ends_with(b"done\n"));
    env.assert_vm_gone(&id);
}

#[test]
fn docker_run_exit_code_comes_back() {
    let Some(env) = DockerEnv::get("docker_run_exit_code_comes_back") else {
        return;
    };
    let (out, id) = env.run(
        "exit3",
        &[
            "--rm",
            &env.image.clone(),
            "sh",
            "-c",
            "echo err >&2; exit 3",
        ],
        None,
    );
    let (_, se) = text(&out);
    assert_eq!(out.status.code(), Some(3), "stderr: {se}");
    assert!(se.contains("err"), "stderr: {se}");
    env.assert_vm_gone(&id);
}

#[test]
fn docker_run_interactive_stdin() {
    let Some(env) = DockerEnv::get("docker_run_interactive_stdin") else {
        return;
    };
    let (out, id) = env.run(
        "stdin",
        &[
            "--rm",
            "-i",
            &env.image.clone(),
            "sh",
            "-c",
            "tr a-z A-Z; echo done",
        ],
        Some(b"line one\nline two\n"),
    );
    let (so, se) = text(&out);
    assert_eq!(out.status.code(), Some(0), "stderr: {se}");
    assert_eq!(so, "LINE ONE\nLINE TWO\ndone\n");
    env.assert_vm_gone(&id);
}

#[test]
fn docker_stop_logs_wait_and_rm() {
    let Some(env) = DockerEnv::get("docker_stop_logs_wait_and_rm") else {
        return;
    };
    let n = unique_name("stop");
    let image = env.image.clone();
    let (out, id) = env.run("stop",
        &["-d", &image, "sh", "-c", "echo started; echo data > /tmp/written; trap 'exit 143' TERM; while :; do sleep 1; done"],
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let id = id.trim().to_string();
    // Wait for the workload to have written (the VM boots in seconds under TCG).
    let deadline = std::time::Instant::now() + T;
    loop {
        let logs = env.docker(&["logs", &n], None, T);
        if text(&logs).0.contains("started") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no output from the container: {:?}",
            text(&logs)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The writable layer Docker sees is the one the VM wrote.
    let diff = env.docker(&["diff", &n], None, T);
    assert!(
        text(&diff).0.contains("/tmp/written"),
        "docker diff: {:?}",
        text(&diff)
    );
    let stop = env.docker(&["stop", "-t", "20", &n], None, T);
    assert_eq!(stop.status.code(), Some(0), "{:?}", text(&stop));
    let wait = env.docker(&["wait", &n], None, T);
    assert_eq!(text(&wait).0.trim(), "143", "{:?}", text(&wait));
    env.assert_vm_gone(&id);
    let rm = env.docker(&["rm", "-f", &n], None, T);
    assert_eq!(rm.status.code(), Some(0), "{:?}", text(&rm));
}

#[test]
fn docker_rm_force_kills_a_running_container() {
    let Some(env) = DockerEnv::get("docker_rm_force_kills_a_running_container") else {
        return;
    };
    let n = unique_name("rmf");
    let image = env.image.clone();
    let (out, id) = env.run("rmf", &["-d", &image, "sleep", "1000"], None);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let rm = env.docker(&["rm", "-f", &n], None, T);
    assert_eq!(rm.status.code(), Some(0), "{:?}", text(&rm));
    env.assert_vm_gone(id.trim());
}

#[test]
fn docker_run_missing_binary_is_127() {
    let Some(env) = DockerEnv::get("docker_run_missing_binary_is_127") else {
        return;
    };
    let (out, id) = env.run(
        "missing",
        &["--rm", &env.image.clone(), "no-such-binary"],
        None,
    );
    let (_, se) = text(&out);
    assert_eq!(out.status.code(), Some(127), "stderr: {se}");
    assert!(se.contains("no-such-binary"), "stderr: {se}");
    if !id.is_empty() {
        env.assert_vm_gone(id.trim());
    }
}

/// `docker exec` runs in the running container: output, exit codes, stdin; in the init's
/// mount namespace, where root makes user namespaces.
#[test]
fn docker_exec_runs_processes_in_the_running_container() {
    let Some(env) = DockerEnv::get("docker_exec_runs_processes_in_the_running_container") else {
        return;
    };
    let n = unique_name("exec");
    let image = env.image.clone();
    // The init mounts a tmpfs: its execs share its mount namespace.
    let (out, id) = env.run(
        "exec",
        &[
            "-d",
            &image,
            "sh",
            "-c",
            "mkdir -p /m && mount -t tmpfs tmpfs /m && exec sleep 300",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let mounts = env.docker(
        &[
            "exec",
            &n,
            "sh",
            "-c",
            "for i in $(seq 100); do grep -q ' /m tmpfs' /proc/mounts && break; sleep 0.1; done; \
             grep -c ' /m tmpfs' /proc/mounts",
        ],
        None,
        T,
    );
    assert_eq!(
        text(&mounts).0,
        "1\n",
        "the init's mount in the exec: {:?}",
        text(&mounts)
    );
    // Root makes user namespaces (the container's root is its mount namespace's own, not a
    // chroot, which the kernel refuses them to): rootless tools and sandboxes (bubblewrap,
    // Chrome's) work.
    let userns = env.docker(&["exec", &n, "unshare", "-U", "-r", "id", "-u"], None, T);
    assert_eq!(
        text(&userns),
        ("0\n".into(), String::new()),
        "unshare -U -r"
    );
    let echo = env.docker(&["exec", &n, "echo", "hi"], None, T);
    let (so, se) = text(&echo);
    assert_eq!(echo.status.code(), Some(0), "stderr: {se}");
    assert_eq!(so, "hi\n");
    let exit5 = env.docker(&["exec", &n, "sh", "-c", "exit 5"], None, T);
    assert_eq!(exit5.status.code(), Some(5), "{:?}", text(&exit5));
    let cat = env.docker(&["exec", "-i", &n, "cat"], Some(b"piped\nthrough cat\n"), T);
    let (so, se) = text(&cat);
    assert_eq!(cat.status.code(), Some(0), "stderr: {se}");
    assert_eq!(so, "piped\nthrough cat\n");
    let rm = env.docker(&["rm", "-f", &n], None, T);
    assert_eq!(rm.status.code(), Some(0), "{:?}", text(&rm));
    env.assert_vm_gone(id.trim());
}

#[test]
fn five_containers_at_once() {
    let Some(env) = DockerEnv::get("five_containers_at_once") else {
        return;
    };
    // Five VMs booting side by side: separate state dirs, vsock daemons and sockets.
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..5)
            .map(|i| {
                let env = &env;
                s.spawn(move || {
                    let msg = format!("container-{i}");
                    let args = ["--rm", env.image.as_str(), "echo", msg.as_str()];
                    let (out, id) = env.run(&format!("five{i}"), &args, None);
                    (msg, out, id)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (msg, out, id) in results {
        let (so, se) = text(&out);
        assert_eq!(out.status.code(), Some(0), "{msg}: stderr: {se}");
        assert_eq!(so, format!("{msg}\n"));
        env.assert_vm_gone(&id);
    }
}

#[test]
fn killed_vmm_ends_the_container_and_leaks_nothing() {
    let Some(env) = DockerEnv::get("killed_vmm_ends_the_container_and_leaks_nothing") else {
        return;
    };
    let n = unique_name("vmmkill");
    let image = env.image.clone();
    let (out, id) = env.run("vmmkill", &["-d", &image, "sleep", "1000"], None);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let id = id.trim().to_string();
    let qemu: Vec<i32> = processes_mentioning(&format!("/run/agentvm/{id}"))
        .iter()
        .filter(|p| p.contains("qemu-system"))
        .map(|p| p.split(':').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(qemu.len(), 1, "expected one QEMU for {id}");
    let killed_at = std::time::Instant::now();
    // SAFETY: kill(2) on the QEMU process of this test's container.
    unsafe { libc::kill(qemu[0], libc::SIGKILL) };
    let wait = env.docker(&["wait", &n], None, T);
    let took = killed_at.elapsed();
    let (code, _) = text(&wait);
    assert_eq!(wait.status.code(), Some(0), "{:?}", text(&wait));
    assert_ne!(
        code.trim(),
        "0",
        "a killed VM must not look like a clean exit"
    );
    assert!(took < Duration::from_secs(15), "docker wait took {took:?}");
    let rm = env.docker(&["rm", "-f", &n], None, T);
    assert_eq!(rm.status.code(), Some(0), "{:?}", text(&rm));
    env.assert_vm_gone(&id);
}

/// Reads a counter file the container rewrites every 0.1 s.
fn counter(path: &std::path::Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn docker_pause_freezes_the_vm_and_unpause_resumes_it() {
    let Some(env) = DockerEnv::get("docker_pause_freezes_the_vm_and_unpause_resumes_it") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let v = format!("{}:/data", dir.path().display());
    let n = unique_name("pause");
    let (out, id) = env.run(
        "pause",
        &[
            "-d",
            "-v",
            &v,
            &env.image,
            "sh",
            "-c",
            "i=0; while true; do i=$((i+1)); echo $i > /data/c; sleep 0.1; done",
        ],
        None,
    );
    assert!(out.status.success(), "{:?}", text(&out));
    let c = dir.path().join("c");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while counter(&c) < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the counter never ran"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = env.docker(&["pause", &n], None, T);
    assert!(out.status.success(), "pause: {:?}", text(&out));
    let out = env.docker(&["inspect", "-f", "{{.State.Status}}", &n], None, T);
    assert_eq!(text(&out).0.trim(), "paused");
    std::thread::sleep(Duration::from_millis(300));
    let frozen = counter(&c);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(counter(&c), frozen, "the counter moved while paused");
    let out = env.docker(&["unpause", &n], None, T);
    assert!(out.status.success(), "unpause: {:?}", text(&out));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while counter(&c) <= frozen + 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the counter did not resume"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Paused again, then removed by force: the kill must land in a frozen VM too.
    let out = env.docker(&["pause", &n], None, T);
    assert!(out.status.success(), "pause: {:?}", text(&out));
    let out = env.docker(&["rm", "-f", &n], None, T);
    assert!(
        out.status.success(),
        "rm -f of a paused container: {:?}",
        text(&out)
    );
    env.assert_vm_gone(id.trim());
}

#[test]
fn docker_stats_shows_the_vms_figures() {
    let Some(env) = DockerEnv::get("docker_stats_shows_the_vms_figures") else {
        return;
    };
    let n = unique_name("stats");
    let (out, id) = env.run(
        "stats",
        &[
            "-d",
            "-m",
            "200m",
            &env.image,
            "sh",
            "-c",
            "sleep 1000 & while true; do :; done",
        ],
        None,
    );
    assert!(out.status.success(), "{:?}", text(&out));
    // The first sample may come before the VM booted; the figures arrive once it runs.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let line = loop {
        let out = env.docker(
            &[
                "stats",
                "--no-stream",
                "--format",
                "{{.MemUsage}}|{{.PIDs}}|{{.CPUPerc}}",
                &n,
            ],
            None,
            T,
        );
        let line = text(&out).0.trim().to_string();
        if line.split('|').nth(1).is_some_and(|p| p.trim() != "0") {
            break line;
        }
        assert!(std::time::Instant::now() < deadline, "no figures: {line}");
        std::thread::sleep(Duration::from_millis(500));
    };
    env.docker(&["rm", "-f", &n], None, T);
    let parts: Vec<&str> = line.split('|').collect();
    let (usage, limit) = parts[0].split_once(" / ").expect("usage / limit");
    assert!(!usage.starts_with("0B"), "memory usage: {line}");
    // --memory 200m sizes the VM: 200 MiB + the documented overhead, minus the kernel's own.
    let limit_mib: f64 = limit.trim_end_matches("MiB").parse().expect("MiB limit");
    assert!(limit_mib > 200.0 && limit_mib < 300.0, "limit: {line}");
    assert!(parts[1].trim().parse::<u32>().unwrap() >= 2, "pids: {line}");
    env.assert_vm_gone(id.trim());
}

/// `docker update` sets the limits of the container's cgroup in the guest
/// (`/sys/fs/cgroup/agentvm`, which the container sees), `docker stats` reports memory against
/// the new limit, and a memory limit above the VM's size is refused with advice.
#[test]
fn docker_update_sets_the_guests_cgroup_limits() {
    let Some(env) = DockerEnv::get("docker_update_sets_the_guests_cgroup_limits") else {
        return;
    };
    let n = unique_name("update");
    let (out, id) = env.run("update", &["-d", &env.image, "sleep", "1000"], None);
    assert!(out.status.success(), "{:?}", text(&out));
    let read_limits = || {
        let cat = env.docker(
            &[
                "exec",
                &n,
                "cat",
                "/proc/self/cgroup",
                "/sys/fs/cgroup/agentvm/memory.max",
                "/sys/fs/cgroup/agentvm/cpu.max",
                "/sys/fs/cgroup/agentvm/pids.max",
            ],
            None,
            T,
        );
        assert!(cat.status.success(), "{:?}", text(&cat));
        text(&cat).0
    };
    assert_eq!(read_limits(), "0::/agentvm\nmax\nmax 100000\nmax\n");
    let update = env.docker(
        &[
            "update",
            "--memory",
            "64m",
            "--memory-swap",
            "64m",
            "--cpus",
            "0.5",
            "--pids-limit",
            "50",
            &n,
        ],
        None,
        T,
    );
    assert!(update.status.success(), "{:?}", text(&update));
    assert_eq!(read_limits(), "0::/agentvm\n67108864\n50000 100000\n50\n");
    let stats = env.docker(
        &["stats", "--no-stream", "--format", "{{.MemUsage}}", &n],
        None,
        T,
    );
    let line = text(&stats).0;
    assert!(line.trim().ends_with("/ 64MiB"), "docker stats: {line:?}");

    // No --memory at run: the VM has the default 512 MiB, which it cannot outgrow.
    let too_much = env.docker(
        &["update", "--memory", "2g", "--memory-swap", "2g", &n],
        None,
        T,
    );
    let (_, se) = text(&too_much);
    assert!(!too_much.status.success(), "update above the VM succeeded");
    assert!(
        se.contains("cannot raise the memory limit above the VM's 512 MiB"),
        "stderr: {se}"
    );
    assert_eq!(
        read_limits(),
        "0::/agentvm\n67108864\n50000 100000\n50\n",
        "a refused update changes nothing"
    );
    env.docker(&["rm", "-f", &n], None, T);
    env.assert_vm_gone(id.trim());
}

#[test]
fn docker_restart_and_cp_both_ways() {
    let Some(env) = DockerEnv::get("docker_restart_and_cp_both_ways") else {
        return;
    };
    let n = unique_name("restart");
    let (out, id) = env.run(
        "restart",
        &[
            "-d",
            &env.image,
            "sh",
            "-c",
            "echo boot >> /tmp/boots; exec sleep 1000",
        ],
        None,
    );
    assert!(out.status.success(), "{:?}", text(&out));
    let id = id.trim().to_string();
    // Into the container, then read back by the workload and out again.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("in.txt");
    std::fs::write(&src, "copied in\n").unwrap();
    let dest = format!("{n}:/tmp/in.txt");
    let out = env.docker(&["cp", src.to_str().unwrap(), &dest], None, T);
    assert!(out.status.success(), "cp in: {:?}", text(&out));
    let out = env.docker(&["exec", &n, "cat", "/tmp/in.txt"], None, T);
    assert_eq!(text(&out).0, "copied in\n");
    let back = dir.path().join("boots");
    let from = format!("{n}:/tmp/boots");
    let out = env.docker(&["cp", &from, back.to_str().unwrap()], None, T);
    assert!(out.status.success(), "cp out: {:?}", text(&out));
    assert_eq!(std::fs::read_to_string(&back).unwrap(), "boot\n");
    // A restart boots a new VM on the same container filesystem.
    let out = env.docker(&["restart", "-t", "1", &n], None, T);
    assert!(out.status.success(), "restart: {:?}", text(&out));
    // Running means started: the new init's first line may land a moment later.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = env.docker(&["exec", &n, "cat", "/tmp/boots"], None, T);
        if text(&out).0 == "boot\nboot\n" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "after the restart: {:?}",
            text(&out)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = env.docker(
        &["inspect", "-f", "{{.State.Status}} {{.RestartCount}}", &n],
        None,
        T,
    );
    assert_eq!(text(&out).0.trim().split(' ').next(), Some("running"));
    env.docker(&["rm", "-f", &n], None, T);
    env.assert_vm_gone(&id);
}

#[test]
fn out_of_memory_is_137_and_oom_killed() {
    let Some(env) = DockerEnv::get("out_of_memory_is_137_and_oom_killed") else {
        return;
    };
    let n = unique_name("oomrun");
    // The shell doubles a string until the guest's OOM killer ends it.
    let (out, id) = env.run(
        "oomrun",
        &[
            "-m",
            "32m",
            &env.image,
            "sh",
            "-c",
            "x=$(head -c 1000000 /dev/zero | tr '\\0' a); while true; do x=\"$x$x\"; done",
        ],
        None,
    );
    let code = out.status.code();
    let inspect = env.docker(&["inspect", "-f", "{{.State.OOMKilled}}", &n], None, T);
    env.docker(&["rm", "-f", &n], None, T);
    assert_eq!(code, Some(137), "{:?}", text(&out));
    assert_eq!(
        text(&inspect).0.trim(),
        "true",
        "Docker must see the OOM kill"
    );
    env.assert_vm_gone(&id);
}

/// `docker run -t` on a real terminal: the guest's tty starts at the terminal's size and
/// follows a resize (SIGWINCH -> docker -> ResizePty -> the agent's pty).
#[test]
fn docker_run_tty_follows_a_resize() {
    let Some(env) = DockerEnv::get("docker_run_tty_follows_a_resize") else {
        return;
    };
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    let set_size = |fd: i32, rows: u16, cols: u16| {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a valid winsize from the pointer.
        assert_eq!(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) }, 0);
    };
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two fds into the given pointers; the rest are null (defaults).
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty");
    // SAFETY: both fds were just returned by openpty and are owned here.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    set_size(master.as_raw_fd(), 20, 70);
    let n = unique_name("tty");
    let mut cmd = std::process::Command::new("docker");
    cmd.args([
        "run",
        "--runtime=agentvm",
        "--rm",
        "-t",
        "--name",
        &n,
        &env.image,
        "sh",
        "-c",
        "stty size; i=0; while [ $i -lt 300 ] && [ ! -f /tmp/go ]; do sleep 0.1; i=$((i+1)); done; \
         sleep 0.5; stty size",
    ])
    .stdin(slave.try_clone().unwrap())
    .stdout(slave.try_clone().unwrap())
    .stderr(slave.try_clone().unwrap());
    // SAFETY: setsid and TIOCSCTTY between fork and exec make the pty the controlling
    // terminal of docker; both are async-signal-safe syscalls.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn docker run -t");
    drop(slave);
    // Read the terminal in a thread (docker blocks if nobody drains it).
    let mut reader = std::fs::File::from(master.try_clone().unwrap());
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(k) = reader.read(&mut buf) {
            if k == 0 || tx.send(String::from_utf8_lossy(&buf[..k]).into()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !seen.contains("20 70") {
        assert!(
            std::time::Instant::now() < deadline,
            "no first size: {seen:?}"
        );
        if let Ok(s) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.push_str(&s);
        }
    }
    set_size(master.as_raw_fd(), 33, 99);
    // SAFETY: kill(2) with the child's pid; SIGWINCH tells docker to forward the new size.
    unsafe { libc::kill(child.id() as i32, libc::SIGWINCH) };
    std::thread::sleep(Duration::from_millis(500));
    let out = env.docker(&["exec", &n, "touch", "/tmp/go"], None, T);
    assert!(out.status.success(), "{:?}", text(&out));
    while !seen.contains("33 99") {
        assert!(
            std::time::Instant::now() < deadline,
            "size not followed: {seen:?}"
        );
        if let Ok(s) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.push_str(&s);
        }
    }
    let status = child.wait().expect("docker run -t");
    assert!(status.success(), "{status:?}: {seen:?}");
}

/// Polls `check` until it holds or `secs` pass; returns the last value.
fn eventually<T>(secs: u64, mut check: impl FnMut() -> (bool, T)) -> (bool, T) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let (ok, v) = check();
        if ok || std::time::Instant::now() > deadline {
            return (ok, v);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// What the workload writes reaches Docker while the container runs, in both root modes:
/// `layers` (the default: image layers on a block device, the writable layer shared, the
/// host's view refreshed after guest copy-ups) and `share` (the whole root shared).
fn workload_writes_reach_docker(test: &str, mode: &str) {
    let Some(env) = DockerEnv::get(test) else {
        return;
    };
    let n = unique_name(test);
    let annotation = format!("io.agentvm.rootfs={mode}");
    let (out, id) = env.run(
        test,
        &[
            "-d",
            "--annotation",
            &annotation,
            &env.image,
            "sleep",
            "1000",
        ],
        None,
    );
    assert!(out.status.success(), "{:?}", text(&out));
    let id = id.trim().to_string();
    let exec = |script: &str| env.docker(&["exec", &n, "sh", "-c", script], None, T);
    let root = text(&exec("head -1 /proc/mounts")).0;
    let layered = root.contains("lowerdir=/run/agentvm/lower0");
    assert_eq!(layered, mode == "layers", "root: {root}");
    // Docker looks first (the host caches what it saw), then the workload writes.
    let diff = |n: &str| text(&env.docker(&["diff", n], None, T)).0;
    assert!(!diff(&n).contains("/srv"));
    let out = exec("mkdir -p /srv/out && echo result > /srv/out/file && rm /etc/group");
    assert!(out.status.success(), "{:?}", text(&out));
    let (ok, d) = eventually(10, || {
        let d = diff(&n);
        (
            d.contains("A /srv/out/file") && d.contains("D /etc/group"),
            d,
        )
    });
    assert!(ok, "docker diff: {d}");
    // docker cp out of the running container.
    let dir = tempfile::tempdir().unwrap();
    let got = dir.path().join("file");
    let out = env.docker(
        &["cp", &format!("{n}:/srv/out/file"), got.to_str().unwrap()],
        None,
        T,
    );
    assert!(out.status.success(), "cp out: {:?}", text(&out));
    assert_eq!(std::fs::read_to_string(&got).unwrap(), "result\n");
    // docker cp into a directory the workload never touched: the workload sees it.
    let src = dir.path().join("in.txt");
    std::fs::write(&src, "from the host\n").unwrap();
    let out = env.docker(
        &["cp", src.to_str().unwrap(), &format!("{n}:/root/in.txt")],
        None,
        T,
    );
    assert!(out.status.success(), "cp in: {:?}", text(&out));
    let (ok, seen) = eventually(10, || {
        let s = text(&exec("cat /root/in.txt 2>&1")).0;
        (s == "from the host\n", s)
    });
    assert!(ok, "the workload reads the copied file: {seen:?}");
    // docker export of the running container.
    let tar = dir.path().join("root.tar");
    let out = env.docker(&["export", "-o", tar.to_str().unwrap(), &n], None, T);
    assert!(out.status.success(), "export: {:?}", text(&out));
    let list = std::process::Command::new("tar")
        .arg("tf")
        .arg(&tar)
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(
        list.lines().any(|l| l == "srv/out/file"),
        "export lacks the file"
    );
    assert!(
        !list.lines().any(|l| l == "etc/group"),
        "export has a deleted file"
    );
    // docker commit (pauses the VM), then a container of the new image.
    let image = format!("agentvm-test/commit-{}", n.to_lowercase());
    let out = env.docker(&["commit", &n, &image], None, T);
    assert!(out.status.success(), "commit: {:?}", text(&out));
    let (out, _) = env.run(
        &format!("{test}-commit"),
        &[
            "--rm",
            &image,
            "sh",
            "-c",
            "cat /srv/out/file /root/in.txt; test -e /etc/group || echo no-group",
        ],
        None,
    );
    assert_eq!(
        text(&out).0,
        "result\nfrom the host\nno-group\n",
        "{:?}",
        text(&out)
    );
    env.docker(&["rmi", "-f", &image], None, T);
    env.docker(&["rm", "-f", &n], None, T);
    env.assert_vm_gone(&id);
}

#[test]
fn workload_writes_reach_docker_with_layers() {
    workload_writes_reach_docker("writes-layers", "layers");
}

#[test]
fn workload_writes_reach_docker_with_a_shared_root() {
    workload_writes_reach_docker("writes-share", "share");
}
