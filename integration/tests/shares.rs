//! Which transport a share uses (`runtime/src/mounts.rs`, docs/decisions.md): volumes over
//! virtio-fs when virtiofsd is installed, 9p when asked for by annotation; the container root
//! over 9p, or virtio-fs by annotation, with the VM's writes seen by `docker diff`/`docker cp`
//! at once. Needs hack/docker-up.sh.

use agentvm_integration::{text, DockerEnv};

/// Whether the shim finds virtiofsd: where `agentvm::assets::virtiofsd` looks ($PATH, cargo's
/// bin dir, Debian's libexec).
fn virtiofsd_installed() -> bool {
    let mut dirs: Vec<std::path::PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push("/root/.cargo/bin".into());
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(std::path::Path::new(&home).join(".cargo/bin"));
    }
    dirs.iter().any(|d| d.join("virtiofsd").is_file())
        || std::path::Path::new("/usr/libexec/virtiofsd").is_file()
}

/// The type of the guest mount on `dest`, from `/proc/mounts` output.
fn fstype_of(mounts: &str, dest: &str) -> Option<String> {
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[1] == dest).then(|| f[2].to_string())
    })
}

#[test]
fn volumes_use_virtio_fs_or_9p_as_annotated() {
    let Some(env) = DockerEnv::get("volumes_use_virtio_fs_or_9p_as_annotated") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in"), "from the host\n").unwrap();
    let v = format!("{}:/w", dir.path().display());
    let script = "cat /proc/mounts; cat /w/in; echo from the vm > /w/out";
    let default = if virtiofsd_installed() {
        "virtiofs"
    } else {
        "9p"
    };
    for (annotation, want) in [(None, default), (Some("io.agentvm.shares=9p"), "9p")] {
        let mut args = vec!["--rm", "-v", &v];
        if let Some(a) = annotation {
            args.extend(["--annotation", a]);
        }
        args.extend([env.image.as_str(), "sh", "-c", script]);
        let (out, id) = env.run("shares", &args, None);
        let (so, se) = text(&out);
        assert_eq!(out.status.code(), Some(0), "{so} {se}");
        assert_eq!(fstype_of(&so, "/w").as_deref(), Some(want), "{so}");
        assert!(so.contains("from the host\n"), "{so}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out")).unwrap(),
            "from the vm\n"
        );
        env.assert_vm_gone(&id);
    }
}

#[test]
fn root_on_virtio_fs_keeps_docker_diff_and_cp_true() {
    let Some(env) = DockerEnv::get("root_on_virtio_fs_keeps_docker_diff_and_cp_true") else {
        return;
    };
    if !virtiofsd_installed() {
        let reason = "no virtiofsd (hack/install-deps.sh installs it)";
        if std::env::var("AGENTVM_REQUIRE_VM").as_deref() == Ok("1") {
            panic!("root_on_virtio_fs_keeps_docker_diff_and_cp_true: {reason}");
        }
        eprintln!("SKIP root_on_virtio_fs_keeps_docker_diff_and_cp_true: {reason}");
        return;
    }
    let name = agentvm_integration::unique_name("vfsroot");
    let out = env.docker(
        &[
            "run",
            "--runtime=agentvm",
            "-d",
            "--name",
            &name,
            "--annotation",
            "io.agentvm.root-share=virtiofs",
            &env.image,
            "sh",
            "-c",
            "grep ' / ' /proc/mounts; echo written in the vm > /tmp/written; echo done; \
             sleep 60",
        ],
        None,
        agentvm_integration::DOCKER_TIMEOUT,
    );
    let (id, se) = text(&out);
    assert!(out.status.success(), "{se}");
    let id = id.trim().to_string();
    let t = agentvm_integration::DOCKER_TIMEOUT;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let logs = loop {
        let logs = text(&env.docker(&["logs", &name], None, t)).0;
        if logs.contains("done") {
            break logs;
        }
        assert!(std::time::Instant::now() < deadline, "never ran: {logs}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(logs.starts_with("rootfs / virtiofs "), "{logs}");
    // The VM's write is in Docker's writable layer at once.
    let diff = text(&env.docker(&["diff", &name], None, t)).0;
    assert!(diff.contains("A /tmp/written"), "{diff}");
    let out = env.docker(&["cp", &format!("{name}:/tmp/written"), "-"], None, t);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("written in the vm"));
    env.docker(&["rm", "-f", &name], None, t);
    env.assert_vm_gone(&id);
}
