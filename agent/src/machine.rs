//! What the agent does to the machine around the protocol: start processes and learn their
//! exits, end the VM, and set up the guest (hostname, network, sysctls, mounts). [`Guest`]
//! is the real one (PID 1 of a VM); `sim::Sim` (feature `sim`) runs the same server on a
//! host, with processes as plain children and the VM's end reported instead of a reboot,
//! so the host runtime is tested against the real agent without a VM.

use std::sync::Arc;

use agentvm_protocol::{ExitStatus, ProcessSpec};
use tokio::sync::oneshot;

use crate::process::spawn::{spawn, Pty, SpawnError, Spawned};
use crate::process::Plan;
use crate::reaper::Reaper;

/// The machine under the agent's server.
pub trait Machine: std::fmt::Debug + Send + Sync {
    /// Starts `plan`'s process (`process` is its spec) on `pty` if given, else on pipes, and
    /// returns it with the receiver of its exit status. No `.await` may separate the spawn
    /// from the registration of the exit (see [`crate::reaper`]).
    fn spawn(
        &self,
        plan: Arc<Plan>,
        process: &ProcessSpec,
        pty: Option<Pty>,
    ) -> Result<(Spawned, oneshot::Receiver<ExitStatus>), SpawnError>;
    /// Whether the kernel log says the OOM killer ended `pid`.
    fn oom_killed(&self, pid: i32) -> bool;
    /// Kills every process but the agent, when the machine can (PID 1 of the VM); false
    /// when it cannot (the caller falls back to the container's cgroup).
    fn kill_all(&self) -> bool;
    /// Ends the VM. The real one never returns.
    fn power_off(&self, reason: &str);
    /// Whether the agent sets up the guest itself: its hostname, network, sysctls and the
    /// container's mounts. A simulated machine shares the host's and skips them.
    fn owns_guest(&self) -> bool;
}

/// The real machine: the agent is PID 1 of a VM, its children are reaped by [`Reaper`].
#[derive(Debug)]
pub struct Guest {
    pub reaper: Arc<Reaper>,
}

impl Machine for Guest {
    fn spawn(
        &self,
        plan: Arc<Plan>,
        _process: &ProcessSpec,
        pty: Option<Pty>,
    ) -> Result<(Spawned, oneshot::Receiver<ExitStatus>), SpawnError> {
        let s = spawn(plan, pty)?;
        let rx = self.reaper.register(s.pid);
        Ok((s, rx))
    }

    fn oom_killed(&self, pid: i32) -> bool {
        crate::stats::oom_killed(pid)
    }

    fn kill_all(&self) -> bool {
        if !crate::power::is_init() {
            return false;
        }
        // kill(-1) from PID 1: every process but PID 1 itself (kernel threads ignore it).
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(-1),
            nix::sys::signal::Signal::SIGKILL,
        );
        true
    }

    fn power_off(&self, reason: &str) {
        crate::power::power_off(reason)
    }

    fn owns_guest(&self) -> bool {
        true
    }
}
