//! The hostile-guest suite: in each test a real VM's root does what an attacker would to
//! the host through what it can reach (every share tag it can mount, every file it sees
//! there), and the test ends by checking that nothing reached the host and nothing leaked.
//! Needs hack/docker-up.sh (hack/test.sh runs it).

use std::path::{Path, PathBuf};
use std::time::Duration;

use agentvm_integration::{processes_mentioning, text, unique_name, DockerEnv, DOCKER_TIMEOUT};

const T: Duration = DOCKER_TIMEOUT;

/// A host directory with a file in it that no container may delete or see.
struct Canary {
    dir: PathBuf,
}

impl Canary {
    fn new(test: &str) -> Canary {
        let dir = PathBuf::from(format!("/var/tmp/{}", unique_name(test)));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("agentvm-canary-file"), "host only").unwrap();
        Canary { dir }
    }

    fn assert_intact(&self) {
        assert_eq!(
            std::fs::read_to_string(self.dir.join("agentvm-canary-file")).ok(),
            Some("host only".to_string()),
            "the host's canary {} was touched",
            self.dir.display()
        );
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Docker's layer dir of container `name` (the writable layer's parent) and its files the
/// engine trusts, as they are now.
fn layer_metadata(env: &DockerEnv, name: &str) -> (PathBuf, Vec<(String, Option<String>)>) {
    let out = env.docker(
        &["inspect", "-f", "{{.GraphDriver.Data.UpperDir}}", name],
        None,
        T,
    );
    let upper = PathBuf::from(text(&out).0.trim());
    let dir = upper
        .parent()
        .expect("upper dir has a parent")
        .to_path_buf();
    let files = ["link", "lower"]
        .iter()
        .map(|f| (f.to_string(), std::fs::read_to_string(dir.join(f)).ok()))
        .collect();
    (dir, files)
}

/// The guest's attack: mount every virtio-fs tag it can find, write the canary's path into
/// every file it sees at the top of each share (Docker's `link` makes `docker rm` delete
/// it; `lower` makes the next start mount it), swap the writable layer for a symlink to the
/// host's root, plant entries beside it. Prints what worked, then whether a host file is in
/// its root.
fn attack_script(canary: &Path) -> String {
    let c = canary.display();
    format!(
        r#"
        tags=$(echo rootfs vol0 vol1 vol2 vol3 $(cat /sys/fs/virtiofs/*/tag 2>/dev/null) \
          | tr ' ' '\n' | sort -u)
        for t in $tags; do
          d=/tmp/attack/$t; mkdir -p $d
          mount -t virtiofs $t $d 2>/dev/null || continue
          echo "mounted $t: $(ls -a $d | tr '\n' ' ')"
          for f in $d/* $d/.[!.]*; do
            [ -f "$f" ] || continue
            printf '../../../../../../../../..{c}' > "$f" 2>/dev/null && echo "WROTE $f"
          done
          printf 'l/../../../../../../../../..{c}' > $d/lower 2>/dev/null && echo "WROTE lower"
          mv $d/diff $d/diff.moved 2>/dev/null && echo "MOVED diff"
          ln -s / $d/diff 2>/dev/null && echo "SWAPPED diff"
          mkdir $d/planted 2>/dev/null && echo "PLANTED dir"
          rm -rf $d/work $d/merged 2>/dev/null
          chmod 0777 $d 2>/dev/null
          [ -e $d/work ] || echo "DELETED work"
        done
        [ -e /agentvm-canary-file ] && echo "LEAKED host file into the root"
        echo attack-done
        "#
    )
}

#[test]
fn guest_root_cannot_reach_the_engines_layer_metadata() {
    let test = "guest_root_cannot_reach_the_engines_layer_metadata";
    let Some(env) = DockerEnv::get(test) else {
        return;
    };
    let canary = Canary::new(test);
    let name = unique_name("hostile-layer");
    let script = attack_script(&canary.dir);
    let out = env.docker(
        &[
            "run",
            "--runtime=agentvm",
            "--name",
            &name,
            &env.image,
            "sh",
            "-c",
            &script,
        ],
        None,
        T,
    );
    let (so, se) = text(&out);
    assert!(out.status.success(), "docker run: {so}{se}");
    assert!(so.contains("attack-done"), "{so}{se}");
    // The guest reached the root share (the attack ran), but none of the engine's files.
    assert!(
        so.contains("mounted rootfs"),
        "the guest found no share: {so}"
    );
    for bad in ["WROTE", "MOVED", "SWAPPED", "PLANTED", "DELETED", "LEAKED"] {
        assert!(!so.contains(bad), "the guest could {bad}: {so}");
    }
    let (dir, before) = layer_metadata(&env, &name);
    // The guest may change the shared dir's mode (Landlock has no say on chmod); the shim
    // puts it back once the VM is gone.
    use std::os::unix::fs::PermissionsExt;
    // The exit is published before the teardown: give it a few seconds.
    let mode = |d: &Path| std::fs::metadata(d).unwrap().permissions().mode() & 0o7777;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while mode(&dir) == 0o777 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_ne!(mode(&dir), 0o777, "{} left world-writable", dir.display());
    assert!(
        before
            .iter()
            .all(|(_, v)| v.as_deref().is_some_and(|s| !s.contains("var/tmp"))),
        "Docker's metadata in {} was rewritten: {before:?}",
        dir.display()
    );
    // Once more after a restart (a new VM, Docker mounting from its metadata), then rm.
    let out = env.docker(&["start", "-a", &name], None, T);
    let (so, se) = text(&out);
    assert!(out.status.success(), "docker start: {so}{se}");
    for bad in ["WROTE", "MOVED", "SWAPPED", "PLANTED", "DELETED", "LEAKED"] {
        assert!(
            !so.contains(bad),
            "after a restart the guest could {bad}: {so}"
        );
    }
    let (_, after) = layer_metadata(&env, &name);
    assert_eq!(before, after, "Docker's metadata changed across a restart");
    let id = text(&env.docker(&["inspect", "-f", "{{.Id}}", &name], None, T))
        .0
        .trim()
        .to_string();
    let out = env.docker(&["rm", &name], None, T);
    assert!(out.status.success(), "docker rm: {}", text(&out).1);
    canary.assert_intact();
    assert!(!dir.exists(), "docker rm left {}", dir.display());
    env.assert_vm_gone(&id);
}

/// Starts a detached agentvm container named `name` running `script`; returns its full id.
fn run_detached(env: &DockerEnv, name: &str, script: &str) -> String {
    let out = env.docker(
        &[
            "run",
            "--runtime=agentvm",
            "-d",
            "--name",
            name,
            &env.image,
            "sh",
            "-c",
            script,
        ],
        None,
        T,
    );
    let (id, se) = text(&out);
    assert!(out.status.success(), "docker run -d: {se}");
    id.trim().to_string()
}

/// One line of /proc/<pid>/status.
fn status_field(pid: u32, field: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

/// Capabilities a file server needs (virtiofsd keeps them, and SYS_ADMIN for overlayfs's
/// trusted xattrs on the writable layer): CHOWN 0, DAC_OVERRIDE 1, DAC_READ_SEARCH 2,
/// FOWNER 3, FSETID 4, SETGID 6, SETUID 7, SYS_ADMIN 21, MKNOD 27, SETFCAP 31.
const FILE_SERVER_CAPS: u64 =
    1 | 1 << 1 | 1 << 2 | 1 << 3 | 1 << 4 | 1 << 6 | 1 << 7 | 1 << 21 | 1 << 27 | 1 << 31;

#[test]
fn vmm_and_helpers_run_jailed() {
    let test = "vmm_and_helpers_run_jailed";
    let Some(env) = DockerEnv::get(test) else {
        return;
    };
    let name = unique_name("hostile-jail");
    let id = run_detached(&env, &name, "echo up; exec sleep 1000");
    let state = format!("/run/agentvm/{id}");
    let host_mnt = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let mut seen = Vec::new();
    let mut sandbox_uids: Vec<String> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let procs = loop {
        let procs: Vec<(u32, String)> = processes_mentioning(&state)
            .iter()
            .filter_map(|p| {
                let (pid, cmd) = p.split_once(':')?;
                Some((pid.trim().parse().ok()?, cmd.to_string()))
            })
            .filter(|(_, cmd)| {
                ["qemu-system", "virtiofsd", "vhost-device-vsock"]
                    .iter()
                    .any(|n| cmd.contains(n))
            })
            .collect();
        if procs.iter().any(|(_, c)| c.contains("qemu-system")) {
            break procs;
        }
        assert!(std::time::Instant::now() < deadline, "no QEMU for {id}");
        std::thread::sleep(Duration::from_millis(200));
    };
    for (pid, cmd) in &procs {
        let program = cmd
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        let cap_eff = u64::from_str_radix(&status_field(*pid, "CapEff"), 16).unwrap();
        let uid = status_field(*pid, "Uid");
        assert_eq!(
            status_field(*pid, "Seccomp"),
            "2",
            "{program}: no seccomp filter"
        );
        assert_eq!(
            status_field(*pid, "NoNewPrivs"),
            "1",
            "{program}: no no_new_privs"
        );
        let mnt = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
        assert_ne!(mnt, host_mnt, "{program} shares the host's mount namespace");
        if program.contains("virtiofsd") {
            // A file server: only a file server's capabilities.
            assert_eq!(
                cap_eff & !FILE_SERVER_CAPS,
                0,
                "{program}: capabilities {cap_eff:x} beyond a file server's"
            );
        } else {
            // QEMU and vhost-device-vsock: the sandbox's own uid, no capability at all.
            let real = uid
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
            assert!(
                cap_eff == 0 && real != "0" && !uid.split_whitespace().any(|u| u == "0"),
                "{program}: uid {uid} with capabilities {cap_eff:x}"
            );
            let gid = status_field(*pid, "Gid");
            assert!(
                !gid.split_whitespace().any(|g| g == "0"),
                "{program}: gid {gid}"
            );
            assert_eq!(
                status_field(*pid, "Groups"),
                "",
                "{program}: supplementary groups"
            );
            sandbox_uids.push(real);
        }
        if !program.contains("virtiofsd") {
            // QEMU's and vhost-device-vsock's trees hold what they need, not the host's
            // secrets or engines (virtiofsd's root is its share).
            for hidden in [
                "etc/shadow",
                "etc/passwd",
                "var/lib/docker",
                "run/containerd",
                "home",
            ] {
                let p = format!("/proc/{pid}/root/{hidden}");
                assert!(!Path::new(&p).exists(), "{program} sees {p}");
            }
            assert!(Path::new(&format!("/proc/{pid}/root/usr/bin")).exists());
        }
        seen.push(program);
    }
    let _ = env.docker(&["rm", "-f", &name], None, T);
    env.assert_vm_gone(&id);
    assert!(
        seen.iter().any(|p| p.contains("qemu-system")),
        "checked {seen:?}"
    );
    // One uid for the sandbox's QEMU and its vsock helper, and it is given back.
    sandbox_uids.sort();
    sandbox_uids.dedup();
    assert_eq!(sandbox_uids.len(), 1, "uids {sandbox_uids:?} of {seen:?}");
    let claimed = std::fs::read_dir("/run/agentvm/.uids")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| std::fs::read_to_string(e.path()).unwrap_or_default() == state)
                .count()
        })
        .unwrap_or(0);
    assert_eq!(claimed, 0, "the sandbox's uid is still claimed");
}

/// Bytes of a capped log: both halves.
fn capped_size(path: &Path) -> u64 {
    let older = PathBuf::from(format!("{}.1", path.display()));
    [path.to_path_buf(), older]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// The guest floods its serial console (root makes the UART's device node and writes to it):
/// the host's log stays under its cap (4 MiB), the shim's memory does not follow the flood,
/// and the container keeps working.
#[test]
fn a_console_flood_stays_under_the_cap() {
    let test = "a_console_flood_stays_under_the_cap";
    let Some(env) = DockerEnv::get(test) else {
        return;
    };
    let name = unique_name("hostile-console");
    // 12 MiB: three times the cap (the emulated UART takes ~2 s a MiB under TCG).
    let id = run_detached(
        &env,
        &name,
        "mknod /tmp/ttyS0 c 4 64 && dd if=/dev/zero bs=64k count=192 2>/dev/null \
         | tr '\\0' x > /tmp/ttyS0; echo flooded; exec sleep 1000",
    );
    let console = PathBuf::from(format!("/run/agentvm/{id}/console.log"));
    let deadline = std::time::Instant::now() + Duration::from_secs(170);
    let mut largest = 0;
    loop {
        largest = largest.max(capped_size(&console));
        let logs = text(&env.docker(&["logs", &name], None, T)).0;
        if logs.contains("flooded") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the flood did not end in time"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    largest = largest.max(capped_size(&console));
    assert!(largest > 0, "no console log at {}", console.display());
    assert!(
        largest <= 4 << 20,
        "the console log grew to {largest} bytes (cap 4 MiB)"
    );
    // The flood reached the host (the newest half is full of it), and the container works.
    let tail = std::fs::read(&console).unwrap_or_default();
    assert!(
        tail.windows(64).any(|w| w.iter().all(|&b| b == b'x')),
        "no flood seen"
    );
    let out = env.docker(&["exec", &name, "echo", "alive"], None, T);
    assert_eq!(text(&out).0.trim(), "alive", "{}", text(&out).1);
    // The shim read the flood through a fixed buffer: its RSS stays small.
    let shim = processes_mentioning(&format!("-id {id}"))
        .iter()
        .filter(|p| p.contains("containerd-shim-agentvm-v1"))
        .find_map(|p| p.split(':').next()?.trim().parse::<u32>().ok())
        .unwrap_or_else(|| panic!("no shim for {id}"));
    let rss_kib: u64 = status_field(shim, "VmRSS")
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(
        rss_kib > 0 && rss_kib < 64 << 10,
        "shim RSS {rss_kib} KiB after the flood"
    );
    let _ = env.docker(&["rm", "-f", &name], None, T);
    env.assert_vm_gone(&id);
}

/// With `--cap-drop ALL` a writable volume gets no device node and no setuid or setgid file
/// from the guest (whose root holds every capability in the VM), while ordinary writes work;
/// with Docker's default capabilities a device node is made, as under runc.
#[test]
fn dropped_capabilities_bound_what_a_volume_takes() {
    let test = "dropped_capabilities_bound_what_a_volume_takes";
    let Some(env) = DockerEnv::get(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rootfile"), "x").unwrap();
    let vol = format!("{}:/w", dir.path().display());
    let script = "mknod /w/mem c 1 1 2>/dev/null && echo MKNOD; \
                  chmod u+s /w/rootfile 2>/dev/null && echo SETUID; \
                  cp /bin/busybox /w/sh && chmod 4755 /w/sh 2>/dev/null && echo SETUID-COPY; \
                  echo data > /w/plain && chmod 0640 /w/plain && echo plain-ok";
    let (out, _) = env.run(
        &format!("{test}-dropped"),
        &[
            "--rm",
            "--cap-drop",
            "ALL",
            "-v",
            &vol,
            &env.image,
            "sh",
            "-c",
            script,
        ],
        None,
    );
    let (so, se) = text(&out);
    assert!(so.contains("plain-ok"), "{so}{se}");
    for bad in ["MKNOD", "SETUID"] {
        assert!(
            !so.contains(bad),
            "with --cap-drop ALL the guest could {bad}: {so}"
        );
    }
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    assert!(
        !dir.path().join("mem").exists(),
        "a device node reached the host"
    );
    for f in ["rootfile", "sh"] {
        if let Ok(m) = std::fs::metadata(dir.path().join(f)) {
            assert_eq!(m.permissions().mode() & 0o6000, 0, "{f} is setuid/setgid");
        }
    }
    assert_eq!(
        std::fs::read_to_string(dir.path().join("plain")).unwrap(),
        "data\n"
    );
    // Docker's default capabilities include CAP_MKNOD: a device node is made, as with runc.
    let (out, _) = env.run(
        &format!("{test}-default"),
        &[
            "--rm",
            "-v",
            &vol,
            &env.image,
            "sh",
            "-c",
            "mknod /w/null2 c 1 3 && echo made",
        ],
        None,
    );
    assert!(text(&out).0.contains("made"), "{:?}", text(&out));
    let m = std::fs::symlink_metadata(dir.path().join("null2")).unwrap();
    assert!(m.file_type().is_char_device());
}
