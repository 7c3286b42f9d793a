//! Fault drills through Docker: the shim SIGKILLed, the guest dying under the agent, and
//! containerd restarted while a container runs. Each ends with a proper exit status and a
//! leak check. The drills run one at a time (the containerd restart would disturb the
//! others). Needs hack/docker-up.sh (hack/test.sh runs it).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use agentvm_integration::{processes_mentioning, text, unique_name, DockerEnv, DOCKER_TIMEOUT};

const T: Duration = DOCKER_TIMEOUT;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The pids of the containerd Docker uses: started without `--config` (hack/docker-up.sh),
/// unlike the CRI tests' own.
fn system_containerd() -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = raw.split(|b| *b == 0).filter(|a| !a.is_empty()).collect();
            args.first()
                .is_some_and(|a| a.rsplit(|b| *b == b'/').next() == Some(b"containerd"))
                && !args
                    .iter()
                    .any(|a| a.starts_with(b"--config") || *a == b"-c")
        })
        .collect()
}

/// Starts a detached container that runs until killed; returns its full id.
fn start_sleeper(env: &DockerEnv, name: &str, extra: &[&str]) -> String {
    let mut args = vec!["run", "--runtime=agentvm", "-d", "--name", name];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[&env.image, "sh", "-c", "echo up; exec sleep 1000"]);
    let out = env.docker(&args, None, T);
    let (id, se) = text(&out);
    assert!(out.status.success(), "docker run -d: {se}");
    let id = id.trim().to_string();
    // Running means started in the VM: wait for its first output.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !text(&env.docker(&["logs", name], None, T)).0.contains("up") {
        assert!(Instant::now() < deadline, "the container never printed");
        std::thread::sleep(Duration::from_millis(100));
    }
    id
}

/// The pid of the shim serving container `id`.
fn shim_pid(id: &str) -> i32 {
    let procs = processes_mentioning(&format!("-id {id}"));
    procs
        .iter()
        .filter(|p| p.contains("containerd-shim-agentvm-v1"))
        .find_map(|p| p.split(':').next()?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no shim for {id} among {procs:?}"))
}

fn wait_exit_code(env: &DockerEnv, name: &str) -> i32 {
    let out = env.docker(&["wait", name], None, T);
    let (so, se) = text(&out);
    so.trim()
        .parse()
        .unwrap_or_else(|_| panic!("docker wait printed {so:?} {se}"))
}

#[test]
fn shim_sigkill_ends_the_container_and_leaks_nothing() {
    let Some(env) = DockerEnv::get("shim_sigkill_ends_the_container_and_leaks_nothing") else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let name = unique_name("shimkill");
    let id = start_sleeper(&env, &name, &[]);
    let pid = shim_pid(&id);
    // SAFETY: kill(2) on a pid we just looked up; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let code = wait_exit_code(&env, &name);
    assert_ne!(
        code, 0,
        "a container whose shim died must not look successful"
    );
    let out = env.docker(&["rm", "-f", &name], None, T);
    assert!(out.status.success(), "rm -f: {:?}", text(&out));
    env.assert_vm_gone(&id);
}

#[test]
fn guest_crash_under_the_agent_ends_the_container() {
    let Some(env) = DockerEnv::get("guest_crash_under_the_agent_ends_the_container") else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    // The guest kernel panics (sysrq crash) and takes the agent with it: QEMU exits.
    let (out, id) = env.run(
        "crash",
        &[
            "--rm",
            &env.image,
            "sh",
            "-c",
            "echo before; sleep 0.2; echo c > /proc/sysrq-trigger; sleep 30; echo after",
        ],
        None,
    );
    let (so, se) = text(&out);
    assert_eq!(out.status.code(), Some(255), "{so} {se}");
    assert!(so.contains("before") && !so.contains("after"), "{so}");
    env.assert_vm_gone(&id);
}

#[test]
fn containerd_restart_keeps_a_running_container() {
    let Some(env) = DockerEnv::get("containerd_restart_keeps_a_running_container") else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let name = unique_name("ctrdrestart");
    let id = start_sleeper(&env, &name, &[]);
    let shim = shim_pid(&id);
    let up = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/docker-up.sh");
    // Docker's containerd only: another one (the CRI tests', hack/cri-up.sh) runs with a
    // config of its own and is left alone.
    let pids = system_containerd();
    assert!(!pids.is_empty(), "containerd was not running");
    for pid in &pids {
        // SAFETY: kill(2) on a pid just read from /proc; at worst it names an exited process.
        unsafe { libc::kill(*pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while pids
        .iter()
        .any(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
    {
        assert!(Instant::now() < deadline, "containerd did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = std::process::Command::new("bash")
        .arg(&up)
        .output()
        .expect("run hack/docker-up.sh");
    assert!(out.status.success(), "restart: {:?}", text(&out));
    // The same shim and VM serve the container; exec and stop work through the new containerd.
    assert_eq!(shim_pid(&id), shim, "the shim was replaced");
    // dockerd reconnects to the new containerd with gRPC's backoff (seconds): until then its
    // calls fail with "dial ... timeout" whatever the runtime. Give it a minute.
    let deadline = Instant::now() + Duration::from_secs(60);
    let out = loop {
        let out = env.docker(&["exec", &name, "echo", "still-here"], None, T);
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(text(&out).0, "still-here\n", "{:?}", text(&out));
    let out = env.docker(&["stop", "-t", "2", &name], None, T);
    assert!(out.status.success(), "stop: {:?}", text(&out));
    let code = wait_exit_code(&env, &name);
    assert!(code == 143 || code == 137, "exit {code}");
    env.docker(&["rm", "-f", &name], None, T);
    env.assert_vm_gone(&id);
}
