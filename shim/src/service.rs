//! The shim binary's lifecycle: `start` daemonizes the server, `delete` cleans up after a
//! dead one, and the server hands containerd the task service.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::api::DeleteResponse;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::{io_error, Config, Error, ExitSignal, Flags, StartOpts};
use tokio::io::AsyncReadExt;

use crate::task::{sandbox_id, timestamp, TaskService};

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
        let address = containerd_shim::socket_address(&opts.address, &opts.namespace, &opts.id);
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
        // SAFETY: setsid(2) is async-signal-safe and touches no memory of the parent; it makes
        // the server independent of `start`'s process group and session.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(io_error!(e, "spawn the shim server"))?;
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

/// In the bundle: the init process's exit code, written when it is known, so that `delete`
/// after a dead shim reports the real exit (reference P15).
pub const EXIT_FILE: &str = "agentvm-exit-status";

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
