//! A sandbox: one VM with its state directory, booted until the agent answers.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentvm_protocol::{self as proto, tokio_io, Frame};
use tokio::io::{AsyncRead, AsyncReadExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::assets::{self, Assets};
use crate::error::{Error, Result};
use crate::guest::Dialer;
use crate::hostcgroup::{self, HostCgroup};
use crate::vmm::{Accel, AgentIo, Disk, Nic, Qemu, Share, VmConfig, VmHandle, VmmBackend};

/// Root of per-sandbox state directories.
pub const STATE_ROOT: &str = "/run/agentvm";
/// In a state dir: the pids of the VMM and its helpers, one per line.
const PIDS_FILE: &str = "pids";
/// In a state dir: the host cgroup directories made for the sandbox, one per line.
const CGROUPS_FILE: &str = "cgroups";

/// What to boot.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub id: String,
    pub disks: Vec<Disk>,
    pub shares: Vec<Share>,
    /// Network devices, backed by taps in `netns`.
    pub nics: Vec<Nic>,
    /// The network namespace QEMU starts in (none: the caller's).
    pub netns: Option<Arc<OwnedFd>>,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub accel: Accel,
    pub boot_timeout: Duration,
    pub icount: bool,
    pub debug: bool,
}

/// What the guest boots: the kernel and the initramfs holding the agent.
#[derive(Debug, Clone, Default)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Host-side timestamps of a boot, for `--debug` and benchmarks.
#[derive(Debug, Clone, Copy)]
pub struct BootTimings {
    pub started: Instant,
    /// The VMM process (and helpers) were spawned.
    pub vmm_spawned: Instant,
    /// The agent's first Hello arrived.
    pub agent_ready: Instant,
    /// Guest uptime reported in that Hello (kernel boot + agent start).
    pub guest_uptime_ms: u64,
}

/// A running VM. Dropping it kills the VM and removes its state directory; prefer
/// [`Sandbox::destroy`], which lets the VM power off by itself first. The VM is a
/// [`VmHandle`], whatever backend started it.
#[derive(Debug)]
pub struct Sandbox {
    pub id: String,
    pub state_dir: PathBuf,
    /// Shared with the processes running in the VM ([`Sandbox::vm`]: pause, resume); the
    /// sandbox alone ends it (kill on drop, stop on destroy).
    vm: Option<Arc<dyn VmHandle>>,
    /// The state dir is gone (destroyed).
    removed: bool,
    pub timings: BootTimings,
    /// The host cgroup the VMM and its helpers join ([`Sandbox::set_cgroup`]).
    cgroup: Option<Arc<HostCgroup>>,
}

/// One connection to the agent, past its Hello.
pub struct AgentConn {
    pub reader: ReadHalf<Box<dyn AgentIo>>,
    pub writer: WriteHalf<Box<dyn AgentIo>>,
}

impl std::fmt::Debug for AgentConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentConn")
    }
}

impl AgentConn {
    pub async fn send(&mut self, frame: &Frame) -> Result<()> {
        Ok(tokio_io::write_frame(&mut self.writer, frame).await?)
    }

    pub async fn recv(&mut self) -> Result<Option<Frame>> {
        Ok(tokio_io::read_frame(&mut self.reader).await?)
    }
}

/// Reads frames from the agent in a task of its own and hands them over a channel; the end of
/// the stream (`Ok(None)`) or an error is the last item. `read_frame` is not cancel-safe, so it
/// must never sit in a `select!` itself.
pub fn spawn_frame_reader(
    mut reader: ReadHalf<Box<dyn AgentIo>>,
) -> (mpsc::Receiver<Result<Option<Frame>>>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(16);
    let task = tokio::spawn(async move {
        loop {
            let f = tokio_io::read_frame(&mut reader).await.map_err(Error::from);
            let end = !matches!(f, Ok(Some(_)));
            if tx.send(f).await.is_err() || end {
                break;
            }
        }
    });
    (rx, task)
}

/// Copies `src` into a channel in chunks until end of file or an error; the channel closing
/// marks the end of the input.
pub fn spawn_input_pump<R>(mut src: R) -> (mpsc::Receiver<Vec<u8>>, JoinHandle<()>)
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel(4);
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match src.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    (rx, task)
}

/// A fresh random sandbox id (hex).
pub fn new_id() -> String {
    let mut b = [0u8; 8];
    let _ = crate::vmm::getrandom(&mut b);
    assets::hex(&b)
}

/// Sandbox ids name directories: keep them to a safe alphabet.
pub fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        && !id.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "invalid sandbox id {id:?}: use 1-64 characters of [A-Za-z0-9_-]"
        )))
    }
}

pub fn state_root() -> PathBuf {
    std::env::var_os("AGENTVM_STATE_ROOT")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(STATE_ROOT))
}

impl Sandbox {
    /// Creates the state dir, starts the VM and waits until the agent greets. On any failure
    /// everything started so far is stopped and removed.
    pub async fn boot(cfg: &SandboxConfig, assets: &Assets) -> Result<(Sandbox, AgentConn)> {
        let mut sandbox = Sandbox::prepare(&cfg.id)?;
        let conn = sandbox.launch(cfg, assets).await?;
        Ok((sandbox, conn))
    }

    /// Creates the state directory of sandbox `id`, without a VM yet. Dropping the result
    /// removes the directory.
    pub fn prepare(id: &str) -> Result<Sandbox> {
        validate_id(id)?;
        let started = Instant::now();
        let root = state_root();
        std::fs::create_dir_all(&root).map_err(|e| Error::io("create", &root, e))?;
        let state_dir = root.join(id);
        std::fs::create_dir(&state_dir).map_err(|e| Error::io("create", &state_dir, e))?;
        Ok(Sandbox {
            id: id.to_string(),
            state_dir,
            vm: None,
            removed: false,
            cgroup: None,
            timings: BootTimings {
                started,
                vmm_spawned: started,
                agent_ready: started,
                guest_uptime_ms: 0,
            },
        })
    }

    /// Appends host pids to the state dir, so that a cleanup after a crash of this process
    /// finds them (each process's command line must name the state dir).
    pub fn record_pids(&self, pids: &[u32]) -> Result<()> {
        use std::io::Write;
        let path = self.state_dir.join(PIDS_FILE);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io("open", &path, e))?;
        let text: String = pids.iter().map(|p| format!("{p}\n")).collect();
        f.write_all(text.as_bytes())
            .map_err(|e| Error::io("write", &path, e))
    }

    /// Makes the VMM and its helpers join `cgroup` when they start, and records its
    /// directories in the state dir, so a cleanup after a crash removes them. Its owner
    /// removes it once everything in it has ended.
    pub fn set_cgroup(&mut self, cgroup: Arc<HostCgroup>) -> Result<()> {
        use std::io::Write;
        let path = self.state_dir.join(CGROUPS_FILE);
        let text: String = cgroup
            .created_dirs()
            .iter()
            .map(|d| format!("{}\n", d.display()))
            .collect();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io("open", &path, e))?;
        f.write_all(text.as_bytes())
            .map_err(|e| Error::io("write", &path, e))?;
        self.cgroup = Some(cgroup);
        Ok(())
    }

    /// Whether the host's OOM killer ended a process of the sandbox's cgroup.
    pub fn host_oom_killed(&self) -> bool {
        self.cgroup.as_ref().is_some_and(|c| c.oom_kills() > 0)
    }

    /// Starts the VM of a prepared sandbox and waits until the agent greets. On failure the
    /// VM is stopped; the state dir stays until the sandbox is dropped or destroyed.
    pub async fn launch(&mut self, cfg: &SandboxConfig, assets: &Assets) -> Result<AgentConn> {
        let backend = Qemu {
            qemu: assets.qemu.clone(),
        };
        let started = Instant::now();
        let modules = assets::kernel_modules(&assets.kernel);
        let initrd = assets::initramfs_for(&assets.agent, &modules)?;
        let image = GuestImage {
            kernel: assets.kernel.clone(),
            initrd,
        };
        self.launch_with(&backend, cfg, image).await?;
        self.timings.started = started;
        self.wait_booted(cfg.boot_timeout).await
    }

    /// Starts the VM of a prepared sandbox on `backend`, booting `image`; the agent is not
    /// waited for ([`Sandbox::wait_booted`]). On failure the VM is stopped.
    pub async fn launch_with(
        &mut self,
        backend: &dyn VmmBackend,
        cfg: &SandboxConfig,
        image: GuestImage,
    ) -> Result<()> {
        self.timings.started = Instant::now();
        let GuestImage { kernel, initrd } = image;
        let mut cmdline = vec![format!("agentvm.port={}", proto::AGENT_PORT)];
        if cfg.debug {
            cmdline.push("agentvm.debug=1".into());
        }
        let vm_cfg = VmConfig {
            kernel,
            initrd,
            disks: cfg.disks.clone(),
            shares: cfg.shares.clone(),
            nics: cfg.nics.clone(),
            netns: cfg.netns.clone(),
            memory_mib: cfg.memory_mib,
            vcpus: cfg.vcpus,
            accel: cfg.accel,
            state_dir: self.state_dir.clone(),
            cmdline,
            icount: cfg.icount,
            cgroup: self.cgroup.clone(),
        };
        let vm: Arc<dyn VmHandle> = Arc::from(backend.launch(&vm_cfg).await?);
        self.timings.vmm_spawned = Instant::now();
        let pids = vm.pids();
        self.vm = Some(vm);
        let recorded = self.record_pids(&pids);
        if recorded.is_err() {
            if let Some(vm) = self.vm.take() {
                vm.stop(Duration::ZERO).await;
            }
        }
        recorded
    }

    /// Waits until the launched VM's agent greets. On failure the VM is stopped; the state
    /// dir stays until the sandbox is dropped or destroyed.
    pub async fn wait_booted(&mut self, timeout: Duration) -> Result<AgentConn> {
        let waited = self.wait_agent(timeout).await;
        if waited.is_err() {
            if let Some(vm) = self.vm.take() {
                vm.stop(Duration::ZERO).await;
            }
        }
        waited
    }

    fn vm_ref(&self) -> &dyn VmHandle {
        self.vm
            .as_deref()
            .expect("sandbox VM is present until destroy")
    }

    /// The VM, shared with the processes that run in it (pause, resume). None before the
    /// launch and once destroyed.
    pub fn vm(&self) -> Option<Arc<dyn VmHandle>> {
        self.vm.clone()
    }

    /// Polls the agent's port until it greets, failing early if the VMM exits.
    async fn wait_agent(&mut self, timeout: Duration) -> Result<AgentConn> {
        let deadline = Instant::now() + timeout;
        loop {
            let vm = self.vm_ref();
            if let Some(status) = vm.exited() {
                return Err(Error::Boot {
                    reason: format!("the VMM exited during boot ({status})"),
                    console: vm.diagnostics(),
                });
            }
            // Connect only once the agent says it listens: connection requests that reach
            // the guest before its vsock driver is up can wedge vhost-device-vsock for the
            // rest of the VM's life (seen here in ~1 boot of 30).
            let ready = vm.agent_listening();
            if ready {
                let attempt =
                    tokio::time::timeout(Duration::from_secs(2), self.connect_once()).await;
                match attempt {
                    Ok(Ok((conn, uptime))) => {
                        self.timings.agent_ready = Instant::now();
                        self.timings.guest_uptime_ms = uptime;
                        return Ok(conn);
                    }
                    // The agent answered but is incompatible: no point retrying.
                    Ok(Err(e @ Error::Agent(_))) => return Err(e),
                    Ok(Err(e)) => tracing::debug!("agent connect attempt failed: {e}"),
                    Err(_) => tracing::debug!("agent connect attempt timed out"),
                }
            }
            if Instant::now() >= deadline {
                let what = if ready { "answer" } else { "start" };
                return Err(Error::Boot {
                    reason: format!(
                        "the guest agent did not {what} within {} s",
                        timeout.as_secs()
                    ),
                    console: self.vm_ref().diagnostics(),
                });
            }
            let pause = if ready { 20 } else { 10 };
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }

    async fn connect_once(&self) -> Result<(AgentConn, u64)> {
        let io = self
            .vm_ref()
            .dialer()
            .dial()
            .await
            .map_err(|e| Error::io("connect to the agent of", &self.state_dir, e))?;
        // Guest data: greet checks the version and never echoes a whole frame.
        crate::guest::greet(io).await
    }

    /// Opens another connection to the agent (for exec).
    pub async fn connect(&self) -> Result<AgentConn> {
        Ok(self.connect_once().await?.0)
    }

    /// The channel to the agent's port, for connections opened away from this sandbox's
    /// owner (exec processes: see [`crate::guest::open`]). None once destroyed.
    pub fn agent_channel(&self) -> Option<Arc<dyn Dialer>> {
        self.vm.as_ref().map(|vm| vm.dialer())
    }

    /// Resolves when the VMM exits, with a description of how.
    pub async fn vmm_exited(&self) -> String {
        self.vm_ref().wait().await
    }

    /// Host pid of the VMM process.
    pub fn vmm_pid(&self) -> Option<u32> {
        self.vm.as_ref().and_then(|vm| vm.pids().first().copied())
    }

    /// Host pids of the VMM (first) and its helpers; empty without a VM.
    pub fn pids(&self) -> Vec<u32> {
        self.vm.as_ref().map(|vm| vm.pids()).unwrap_or_default()
    }

    /// Kills the VM at once (its exit shows in [`Sandbox::vmm_exited`]).
    pub fn kill(&self) {
        if let Some(vm) = &self.vm {
            vm.kill();
        }
    }

    /// Console and VMM log tails, for error reports.
    pub fn diagnostics(&self) -> String {
        self.vm
            .as_ref()
            .map(|vm| vm.diagnostics())
            .unwrap_or_default()
    }

    pub fn console_log(&self) -> PathBuf {
        self.state_dir.join("console.log")
    }

    /// Lets the VM power off by itself for up to `grace`, then kills whatever is left and
    /// removes the state directory.
    pub async fn destroy(mut self, grace: Duration) {
        if let Some(vm) = self.vm.take() {
            vm.stop(grace).await;
        }
        remove_state_dir(&self.state_dir);
        self.removed = true;
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(vm) = self.vm.take() {
            // Others may hold the handle still (a process's pause): kill now so nothing
            // outlives the sandbox.
            vm.kill();
        }
        if !self.removed {
            remove_state_dir(&self.state_dir);
        }
    }
}

/// Removes what a sandbox `id` left behind when the process that owned it died: kills the
/// processes recorded in its state dir (only those whose command line still names that dir,
/// so a recycled pid is never hit), removes the host cgroups recorded there (killing what
/// is left in them: only the sandbox's processes join them) and removes the dir. Returns
/// whether there was anything.
pub fn cleanup_stale(id: &str) -> Result<bool> {
    validate_id(id)?;
    let dir = state_root().join(id);
    if !dir.exists() {
        return Ok(false);
    }
    let needle = dir.display().to_string();
    let pids = std::fs::read_to_string(dir.join(PIDS_FILE)).unwrap_or_default();
    for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if pid > 1 && String::from_utf8_lossy(&cmdline).contains(&needle) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    let cgroups: Vec<PathBuf> = std::fs::read_to_string(dir.join(CGROUPS_FILE))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(PathBuf::from)
        .collect();
    if let Err(e) = hostcgroup::remove_recorded(&cgroups) {
        tracing::warn!("cleanup of sandbox {id}: {e}");
    }
    remove_state_dir(&dir);
    Ok(true)
}

fn remove_state_dir(dir: &Path) {
    // Whatever path ended the sandbox, its uid is free again with its state.
    crate::sandboxuser::release_claims_of(&state_root().join(".uids"), dir);
    // A pod sandbox's share may still hold containers' roots bound below it: never walk
    // into those.
    let pod = dir.join("pod");
    if pod.exists() && !crate::pod::release_share(&pod) {
        tracing::warn!(
            "keeping {}: the pod share could not be unmounted",
            dir.display()
        );
        return;
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("cannot remove {}: {e}", dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleanup_of_unknown_or_invalid_ids() {
        assert!(cleanup_stale("../etc").is_err());
        let root = tempfile::tempdir().unwrap();
        // Only this test touches AGENTVM_STATE_ROOT in this test binary.
        std::env::set_var("AGENTVM_STATE_ROOT", root.path());
        assert!(!cleanup_stale("nothing-here").unwrap());
        let dir = root.path().join("stale");
        std::fs::create_dir(&dir).unwrap();
        // A pid that is not ours to kill: its command line does not name the state dir.
        std::fs::write(dir.join(PIDS_FILE), format!("{}\n", std::process::id())).unwrap();
        // A host cgroup it made (an empty directory stands in for it) goes too.
        let cgroup = root.path().join("cgroup-of-stale");
        std::fs::create_dir(&cgroup).unwrap();
        std::fs::write(dir.join(CGROUPS_FILE), format!("{}\n", cgroup.display())).unwrap();
        assert!(cleanup_stale("stale").unwrap());
        assert!(!dir.exists());
        assert!(!cgroup.exists(), "the recorded cgroup must be removed");
        std::env::remove_var("AGENTVM_STATE_ROOT");
    }

    #[test]
    fn ids_are_validated() {
        assert!(validate_id("abc-123_X").is_ok());
        for bad in ["", "../x", "a/b", "-rf", "a b", &"x".repeat(65)] {
            assert!(validate_id(bad).is_err(), "{bad:?} accepted");
        }
        let id = new_id();
        assert_eq!(id.len(), 16);
        assert!(validate_id(&id).is_ok());
        assert_ne!(id, new_id());
    }
}
