//! An image converted by agentvm-image and booted by `agentvm run` shows the same files,
//! owners, modes, link counts and ids as the same image under `docker run` with runc.
//! Also exercises `docker-daemon:` against a real dockerd. Needs hack/docker-up.sh.

use std::process::Stdio;
use std::time::Duration;

use agentvm_integration::{text, wait_with_deadline, DockerEnv, VmEnv};

const T: Duration = Duration::from_secs(180);

/// What the two runs print: identity and metadata of image files. Not /etc itself: Docker
/// creates mount points for hosts/hostname/resolv.conf in it before the container starts,
/// which changes its mtime (and overlayfs reports a merged directory's link count as 1).
const PROBE: &str = "id -u; id -g; for f in /bin /bin/busybox /bin/sh /bin/ls /etc/passwd \
    /etc/group /root /tmp; do stat -c '%n %F %a %u %g %h %s %Y' $f; done; ls /bin | wc -l";

#[test]
fn agentvm_image_matches_runc() {
    let Some(docker) = DockerEnv::get("agentvm_image_matches_runc") else {
        return;
    };
    let Some(vm) = VmEnv::get("agentvm_image_matches_runc") else {
        return;
    };
    let runc = docker.docker(
        &[
            "run",
            "--rm",
            "--runtime=runc",
            &docker.image,
            "sh",
            "-c",
            PROBE,
        ],
        None,
        T,
    );
    let (runc_out, runc_err) = text(&runc);
    assert_eq!(runc.status.code(), Some(0), "runc: {runc_err}");

    let cache = tempfile::tempdir().unwrap();
    let reference = format!("docker-daemon:{}", docker.image);
    let ours = wait_with_deadline(
        vm.bare_run_cmd(&[&reference, "--", "sh", "-c", PROBE])
            .env("AGENTVM_IMAGE_CACHE", cache.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn agentvm"),
        T,
    );
    let (our_out, our_err) = text(&ours);
    assert_eq!(ours.status.code(), Some(0), "agentvm: {our_err}");
    assert!(
        runc_out.lines().count() > 10,
        "probe printed too little: {runc_out}"
    );
    assert_eq!(our_out, runc_out, "agentvm (left) and runc (right) differ");
    vm.assert_clean();
}
