//! The sandbox is charged and bounded on the host (issue 11, item 4): QEMU and every helper
//! of a Docker container run in the container's cgroup (`linux.cgroupsPath`, as runc would
//! use it) with the limits docs/decisions.md ("Host cgroups") gives, a runaway QEMU is ended
//! by the host's OOM killer within that cgroup and reported as an OOM kill, and the cgroup
//! goes away with the container.
//!
//! Needs root, dockerd with the agentvm runtime and cgroup v1 or v2; skips otherwise
//! (fails under `AGENTVM_REQUIRE_VM=1`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentvm_integration::{processes_mentioning, text, DockerEnv, DOCKER_TIMEOUT};

/// Mirrors of agentvm's constants (runtime/src/oci.rs, hostcgroup.rs): the integration
/// crate builds without the runtime library.
const GUEST_OVERHEAD_MIB: u64 = 64;
const TCG_OVERHEAD_MIB: u64 = 512;
const KVM_OVERHEAD_MIB: u64 = 160;
const PIDS_MAX: u64 = 512;
const IO_CPU_ALLOWANCE_US: u64 = 50_000;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

fn require(test: &str, reason: &str) {
    if std::env::var("AGENTVM_REQUIRE_VM").as_deref() == Ok("1") {
        panic!("{test}: {reason} (AGENTVM_REQUIRE_VM=1 forbids skipping)");
    }
    eprintln!("SKIP {test}: {reason}");
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

fn v2() -> bool {
    Path::new(CGROUP_ROOT).join("cgroup.controllers").is_file()
}

/// The container's cgroup as dockerd names it for runc: `/docker/<id>` with the cgroupfs
/// driver, `/system.slice/docker-<id>.scope` with systemd's.
fn docker_cgroup(env: &DockerEnv, id: &str) -> String {
    let out = env.docker(
        &["info", "--format", "{{.CgroupDriver}}"],
        None,
        DOCKER_TIMEOUT,
    );
    match text(&out).0.trim() {
        "systemd" => format!("/system.slice/docker-{id}.scope"),
        _ => format!("/docker/{id}"),
    }
}

/// The directory of `cgroup` in the hierarchy carrying `controller`.
fn cgroup_dir(controller: &str, cgroup: &str) -> PathBuf {
    let rel = cgroup.trim_start_matches('/');
    if v2() {
        Path::new(CGROUP_ROOT).join(rel)
    } else {
        Path::new(CGROUP_ROOT).join(controller).join(rel)
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
        .trim()
        .to_string()
}

/// Pids and command lines of the processes of the container's VM (QEMU, vhost-device-vsock,
/// virtiofsd, the netns holder): all name its state dir.
fn vm_processes(id: &str) -> Vec<(u32, String)> {
    processes_mentioning(&format!("/run/agentvm/{id}"))
        .into_iter()
        .filter_map(|l| {
            let (pid, cmd) = l.split_once(": ")?;
            Some((pid.parse().ok()?, cmd.to_string()))
        })
        .collect()
}

/// Where `pid` is in the hierarchy of `controller` (v2: the unified one).
fn cgroup_of(pid: u32, controller: &str) -> Option<String> {
    let all = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    all.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        let hit = if v2() {
            ctrls.is_empty()
        } else {
            ctrls.split(',').any(|c| c == controller)
        };
        hit.then(|| path.to_string())
    })
}

fn memory_limit_file() -> &'static str {
    if v2() {
        "memory.max"
    } else {
        "memory.limit_in_bytes"
    }
}

/// Runs `docker run -d` with `args` and returns the container id, or fails the test.
fn run_detached(env: &DockerEnv, test: &str, args: &[&str]) -> String {
    let mut all = vec!["-d"];
    all.extend_from_slice(args);
    let (out, id) = env.run(test, &all, None);
    let (o, e) = text(&out);
    assert!(out.status.success(), "docker run failed:\n{o}\n{e}");
    let id = id.trim().to_string();
    assert_eq!(id.len(), 64, "container id {id:?}");
    id
}

fn wait_gone(dirs: &[PathBuf]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while dirs.iter().any(|d| d.exists()) {
        assert!(
            Instant::now() < deadline,
            "host cgroup left behind: {:?}",
            dirs.iter().filter(|d| d.exists()).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The controllers whose hierarchies the test checks.
const CONTROLLERS: &[&str] = &["memory", "cpu", "pids"];

#[test]
fn qemu_and_helpers_live_in_the_containers_limited_cgroup() {
    const TEST: &str = "qemu_and_helpers_live_in_the_containers_limited_cgroup";
    if !is_root() {
        return require(TEST, "needs root (reads and checks host cgroups)");
    }
    let Some(env) = DockerEnv::get(TEST) else {
        return;
    };
    let id = run_detached(
        &env,
        TEST,
        &[
            "-m",
            "256m",
            "--pids-limit",
            "64",
            "--cpus",
            "1",
            &env.image,
            "sleep",
            "600",
        ],
    );
    let cgroup = docker_cgroup(&env, &id);
    let check = || -> Result<(), String> {
        let procs = vm_processes(&id);
        let qemu = procs
            .iter()
            .find(|(_, c)| c.contains("qemu-system"))
            .ok_or_else(|| format!("no QEMU among {procs:?}"))?;
        if !procs.iter().any(|(_, c)| c.contains("vhost-device-vsock"))
            && !qemu.1.contains("vhost-vsock-device")
        {
            return Err(format!("no vsock helper among {procs:?}"));
        }
        eprintln!("{} processes of the VM:", procs.len());
        for (pid, cmd) in &procs {
            let short: String = cmd.chars().take(90).collect();
            for c in CONTROLLERS {
                let at = cgroup_of(*pid, c).unwrap_or_default();
                eprintln!("  {pid} {c}:{at}  {short}");
                if at != cgroup {
                    return Err(format!(
                        "pid {pid} ({short}) is in {c} cgroup {at:?}, not {cgroup:?}"
                    ));
                }
            }
        }
        // Memory: the VM's RAM (the limit + the guest's share) + the host overhead.
        let overhead = if qemu.1.contains("-accel tcg") {
            TCG_OVERHEAD_MIB
        } else {
            KVM_OVERHEAD_MIB
        };
        let want = (256 + GUEST_OVERHEAD_MIB + overhead) << 20;
        let mem = cgroup_dir("memory", &cgroup);
        let limit = read(&mem.join(memory_limit_file()));
        eprintln!(
            "memory limit {limit} ({} MiB), usage {}",
            limit.parse::<u64>().unwrap_or(0) >> 20,
            std::fs::read_to_string(mem.join(if v2() {
                "memory.current"
            } else {
                "memory.usage_in_bytes"
            }))
            .unwrap_or_default()
            .trim()
        );
        if limit != want.to_string() {
            return Err(format!("memory limit {limit}, expected {want}"));
        }
        if !v2() && mem.join("memory.memsw.limit_in_bytes").exists() {
            let sw = read(&mem.join("memory.memsw.limit_in_bytes"));
            if sw != want.to_string() {
                return Err(format!("memory+swap limit {sw}, expected {want}"));
            }
        }
        // pids: QEMU's threads, not the guest's --pids-limit.
        let pids = read(&cgroup_dir("pids", &cgroup).join("pids.max"));
        if pids != PIDS_MAX.to_string() {
            return Err(format!("pids.max {pids}, expected {PIDS_MAX}"));
        }
        let threads: usize = procs
            .iter()
            .map(|(p, _)| {
                std::fs::read_dir(format!("/proc/{p}/task"))
                    .map(|d| d.count())
                    .unwrap_or(0)
            })
            .sum();
        eprintln!(
            "threads of the VM's processes: {threads}; pids.current {}",
            std::fs::read_to_string(cgroup_dir("pids", &cgroup).join("pids.current"))
                .unwrap_or_default()
                .trim()
        );
        // cpu: --cpus 1 plus the I/O allowance.
        let quota = 100_000 + IO_CPU_ALLOWANCE_US;
        let cpu = cgroup_dir("cpu", &cgroup);
        let got = if v2() {
            read(&cpu.join("cpu.max"))
        } else {
            read(&cpu.join("cpu.cfs_quota_us"))
        };
        if !got.starts_with(&quota.to_string()) {
            return Err(format!("cpu quota {got}, expected {quota}"));
        }
        Ok(())
    };
    let result = check();
    let dirs: Vec<PathBuf> = CONTROLLERS.iter().map(|c| cgroup_dir(c, &cgroup)).collect();
    let rm = env.docker(&["rm", "-f", &id], None, DOCKER_TIMEOUT);
    assert!(rm.status.success(), "docker rm -f: {:?}", text(&rm));
    if let Err(e) = result {
        panic!("{e}");
    }
    env.assert_vm_gone(&id);
    wait_gone(&dirs);
}

/// A QEMU that outgrows its host cgroup is ended by the host's OOM killer there, not
/// anything else on the host, and Docker sees an OOM kill (137, OOMKilled) as with runc.
/// The test lowers the cgroup's limit to a little above what the VM uses, then has the
/// guest fill a tmpfs: every page the guest touches for the first time is QEMU's on the host.
#[test]
fn a_runaway_vm_is_oom_killed_within_its_cgroup_and_reported() {
    const TEST: &str = "a_runaway_vm_is_oom_killed_within_its_cgroup_and_reported";
    if !is_root() {
        return require(TEST, "needs root (writes host cgroup limits)");
    }
    let Some(env) = DockerEnv::get(TEST) else {
        return;
    };
    let id = run_detached(&env, TEST, &["-m", "256m", &env.image, "sleep", "600"]);
    let cgroup = docker_cgroup(&env, &id);
    let mem = cgroup_dir("memory", &cgroup);
    let (usage_file, limit_file) = if v2() {
        ("memory.current", "memory.max")
    } else {
        ("memory.usage_in_bytes", "memory.limit_in_bytes")
    };
    let usage: u64 = read(&mem.join(usage_file)).parse().expect("usage");
    let low = usage + (48 << 20);
    eprintln!(
        "usage {} MiB, limit lowered to {} MiB",
        usage >> 20,
        low >> 20
    );
    std::fs::write(mem.join(limit_file), low.to_string()).expect("lower the memory limit");
    if !v2() && mem.join("memory.memsw.limit_in_bytes").exists() {
        std::fs::write(mem.join("memory.memsw.limit_in_bytes"), low.to_string())
            .expect("lower the memory+swap limit");
    }
    // The cgroup goes with the VM: watch its OOM kill counter while it exists.
    let oom_file = mem.join(if v2() {
        "memory.events"
    } else {
        "memory.oom_control"
    });
    let watcher = std::thread::spawn(move || {
        let mut kills = 0u64;
        let deadline = Instant::now() + DOCKER_TIMEOUT;
        while let Ok(s) = std::fs::read_to_string(&oom_file) {
            if let Some(n) = s.lines().find_map(|l| l.strip_prefix("oom_kill ")) {
                kills = kills.max(n.trim().parse().unwrap_or(0));
            }
            if Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        kills
    });
    // 160 MiB of tmpfs: below the container's 256m in the guest, far above the 48 MiB the
    // host cgroup still allows.
    let fill = env.docker(
        &[
            "exec",
            &id,
            "sh",
            "-c",
            "mkdir -p /fill && mount -t tmpfs -o size=200m tmpfs /fill && \
             dd if=/dev/zero of=/fill/f bs=1M count=160 && echo filled",
        ],
        None,
        DOCKER_TIMEOUT,
    );
    eprintln!("exec: {:?}", text(&fill));
    let wait = env.docker(&["wait", &id], None, DOCKER_TIMEOUT);
    let code = text(&wait).0.trim().to_string();
    let state = env.docker(
        &[
            "inspect",
            "-f",
            "{{.State.ExitCode}} {{.State.OOMKilled}}",
            &id,
        ],
        None,
        DOCKER_TIMEOUT,
    );
    let state = text(&state).0.trim().to_string();
    let dirs: Vec<PathBuf> = CONTROLLERS.iter().map(|c| cgroup_dir(c, &cgroup)).collect();
    let rm = env.docker(&["rm", "-f", &id], None, DOCKER_TIMEOUT);
    assert!(rm.status.success(), "docker rm -f: {:?}", text(&rm));
    let kills = watcher.join().expect("watcher");
    eprintln!("docker wait: {code}; ExitCode OOMKilled: {state}; host OOM kills: {kills}");
    assert!(
        !text(&fill).0.contains("filled"),
        "the guest filled 160 MiB past the host limit: {:?}",
        text(&fill)
    );
    assert!(
        kills > 0,
        "no OOM kill counted in the container's host cgroup"
    );
    assert_eq!(code, "137", "docker wait");
    assert_eq!(state, "137 true", "docker inspect ExitCode OOMKilled");
    env.assert_vm_gone(&id);
    wait_gone(&dirs);
}
