//! The shim binary's lifecycle: `start` daemonizes the server, `delete` cleans up after a
//! dead one, and the server hands containerd the task service.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::api::DeleteResponse;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::{io_error, Config, Error, ExitSignal, Flags, StartOpts};
use tokio::io::AsyncReadExt;

use crate::task::{sandbox_id, timestamp, TaskService, EXIT_FILE};

/// The shim process.
pub struct Service {
    id: String,
    namespace: String,
    exit: Arc<ExitSignal>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("id", &self.id)
            .field("namespace", &self.namespace)
            .finish()
    }
}

#[async_trait]
impl containerd_shim::Shim for Service {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Service {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    /// Starts the server process and returns its address once it listens. The server gets
    /// /dev/null for stdin and stderr and a pipe for stdout that it closes when it is ready,
    /// so it never holds containerd's pipes (reference P1, P2).
    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // A pod's containers share one shim, the sandbox's (as runc's v2 shim groups them):
        // its socket is named after the sandbox id, and a later container of the pod is sent
        // to the shim that already listens there.
        let role = pod_role(Path::new("config.json"));
        let group = grouping_id_of(&role, &opts.id);
        let address = containerd_shim::socket_address(&opts.address, &opts.namespace, &group);
        if group != opts.id && serves(&address).await {
            tokio::fs::write("address", &address)
                .await
                .map_err(io_error!(e, "write address"))?;
            return Ok(address);
        }
        let exe = std::env::current_exe().map_err(io_error!(e, "find own executable"))?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.args([
            "-namespace",
            &opts.namespace,
            "-id",
            &opts.id,
            "-address",
            &opts.address,
            "-socket",
            &address,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
        if opts.debug {
            cmd.arg("-debug");
        }
        // A pod's server keeps its mounts in a namespace of its own (crate::mountns), and
        // the host's namespace to look its volumes up in.
        let own_mounts = !matches!(role, agentvm::pod::PodRole::None);
        let host_ns = if own_mounts {
            let ns = crate::mountns::open_current()
                .map_err(io_error!(e, "open the host's mount namespace"))?;
            cmd.env(crate::mountns::HOST_NS_ENV, ns.as_raw_fd().to_string());
            Some(ns)
        } else {
            None
        };
        let host_ns_fd = host_ns.as_ref().map(|ns| ns.as_raw_fd());
        // SAFETY: setsid(2), fcntl(2), unshare(2) and mount(2) on static data are
        // async-signal-safe and touch no memory of the parent; setsid makes the server
        // independent of `start`'s process group and session.
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                if let Some(fd) = host_ns_fd {
                    crate::mountns::keep_across_exec(fd)?;
                    crate::mountns::enter_own()?;
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(io_error!(e, "spawn the shim server"))?;
        drop(host_ns);
        let mut ready = child.stdout.take().expect("stdout is piped");
        let mut junk = Vec::new();
        let _ = ready.read_to_end(&mut junk).await;
        if let Ok(Some(st)) = child.try_wait() {
            return Err(Error::Other(format!(
                "the shim server exited ({st}) before listening; see containerd's log"
            )));
        }
        // containerd's fallback when bootstrap.json is missing, and how the server finds its
        // socket to remove at exit.
        tokio::fs::write("address", &address)
            .await
            .map_err(io_error!(e, "write address"))?;
        Ok(address)
    }

    /// `delete` is handled by [`delete_action`] before the crate's `run` (see main.rs).
    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let bundle = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        Ok(delete_response(&self.id, &bundle))
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        TaskService::new(self.namespace.clone(), publisher, Arc::clone(&self.exit))
    }
}

/// The id whose shim serves the container of the bundle whose spec is `config`: the pod
/// sandbox's id for a CRI container of a pod, else the container's own.
pub fn grouping_id(config: &Path, id: &str) -> String {
    grouping_id_of(&pod_role(config), id)
}

fn grouping_id_of(role: &agentvm::pod::PodRole, id: &str) -> String {
    match role {
        agentvm::pod::PodRole::Container { sandbox_id } if !sandbox_id.is_empty() => {
            sandbox_id.clone()
        }
        _ => id.to_string(),
    }
}

/// The CRI role of the container of the bundle whose spec is `config` (none when the spec
/// cannot be read: `create` reports that).
fn pod_role(config: &Path) -> agentvm::pod::PodRole {
    let annotations = std::fs::read(config)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("annotations").cloned())
        .and_then(|a| serde_json::from_value::<HashMap<String, String>>(a).ok())
        .unwrap_or_default();
    agentvm::pod::PodRole::of(&annotations)
}

/// Whether a shim answers on `address` (`unix://<path>`).
async fn serves(address: &str) -> bool {
    let path = address.strip_prefix("unix://").unwrap_or(address);
    tokio::net::UnixStream::connect(path).await.is_ok()
}

/// `delete`: containerd lost (or closed) the server; remove whatever the container left and
/// print the exit as a `DeleteResponse` on stdout. Returns the process exit code.
pub fn delete_action(flags: &containerd_shim::Flags) -> i32 {
    use containerd_shim::protos::protobuf::Message as _;
    let bundle = if flags.bundle.is_empty() {
        std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."))
    } else {
        PathBuf::from(&flags.bundle)
    };
    let response = delete_response(&flags.id, &bundle);
    let bytes = match response.write_to_bytes() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("encode delete response: {e}");
            return 1;
        }
    };
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(&bytes).and_then(|()| out.flush()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("write delete response: {e}");
            1
        }
    }
}

/// Cleans up and reports the recorded exit, or 137 (the container was killed with its shim).
fn delete_response(id: &str, bundle: &Path) -> DeleteResponse {
    cleanup(id, bundle);
    let recorded = std::fs::read_to_string(bundle.join(EXIT_FILE))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    DeleteResponse {
        pid: 0,
        exit_status: recorded.unwrap_or(128 + libc::SIGKILL as u32),
        exited_at: protobuf::MessageField::some(timestamp(std::time::SystemTime::now())),
        ..Default::default()
    }
}

/// Kills the container's VM if it is still around, removes its state dir and unmounts the
/// root filesystem the shim mounted. Best effort: reports problems on the shim log.
pub fn cleanup(id: &str, bundle: &Path) {
    let group = grouping_id(&bundle.join("config.json"), id);
    if group != id {
        // A pod's later container: its root's bind in the pod's share; the VM is the
        // sandbox's, cleaned up with it.
        if let (Ok(pod), Ok(name)) = (sandbox_id(&group), sandbox_id(id)) {
            agentvm::pod::unbind_root(&agentvm::pod::share_dir(&pod), &name);
        }
        crate::rootfs::unmount(&bundle.join("rootfs"));
        return;
    }
    match sandbox_id(id) {
        Ok(sid) => {
            if let Err(e) = agentvm::sandbox::cleanup_stale(&sid) {
                tracing::warn!("cleanup of sandbox {sid}: {e}");
            }
        }
        Err(e) => tracing::warn!("{e}"),
    }
    crate::rootfs::unmount(&bundle.join("rootfs"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(annotations: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("config.json"),
            format!(r#"{{"ociVersion":"1.0.2","annotations":{{{annotations}}}}}"#),
        )
        .unwrap();
        d
    }

    #[test]
    fn a_pods_containers_are_grouped_under_the_sandbox_id() {
        let cfg = |d: &tempfile::TempDir| d.path().join("config.json");
        let app = bundle(
            r#""io.kubernetes.cri.container-type":"container","io.kubernetes.cri.sandbox-id":"sb1""#,
        );
        assert_eq!(grouping_id(&cfg(&app), "c1"), "sb1");
        let sandbox = bundle(
            r#""io.kubernetes.cri.container-type":"sandbox","io.kubernetes.cri.sandbox-id":"sb1""#,
        );
        assert_eq!(grouping_id(&cfg(&sandbox), "sb1"), "sb1");
        // Docker, ctr: one shim per container; so without a spec, or with a broken one.
        let docker = bundle(r#""org.opencontainers.image.ref.name":"x""#);
        assert_eq!(grouping_id(&cfg(&docker), "c2"), "c2");
        assert_eq!(
            grouping_id(Path::new("/nonexistent/config.json"), "c3"),
            "c3"
        );
        let empty = bundle(r#""io.kubernetes.cri.container-type":"container""#);
        assert_eq!(grouping_id(&cfg(&empty), "c4"), "c4");
    }

    #[tokio::test]
    async fn only_a_listening_socket_serves() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s.sock");
        let address = format!("unix://{}", path.display());
        assert!(!serves(&address).await);
        let _l = tokio::net::UnixListener::bind(&path).unwrap();
        assert!(serves(&address).await);
    }
}
