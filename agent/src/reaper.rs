//! The one child reaper of PID 1.
//!
//! Every process in the VM that loses its parent is re-parented to the agent, so the agent
//! must reap them all. One task does it: on SIGCHLD it calls `waitpid(-1, WNOHANG)` until
//! nothing is left, hands the status of a registered pid to its waiter, and discards the
//! rest. Nothing else in the agent may call `wait*` (so no `Child::wait`, no tokio::process).
//!
//! Registration must happen right after the spawn, with no `.await` in between: the runtime
//! is single-threaded, so the reaper cannot run (and steal the status) in that window.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use agentvm_protocol::ExitStatus;
use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// Dispatches child exit statuses to the waiters registered by pid.
#[derive(Debug, Default)]
pub struct Reaper {
    waiters: Mutex<HashMap<i32, oneshot::Sender<ExitStatus>>>,
}

/// The protocol status of a wait status; `None` for stops and continues.
pub fn exit_status(ws: WaitStatus) -> Option<(i32, ExitStatus)> {
    match ws {
        WaitStatus::Exited(pid, code) => Some((pid.as_raw(), ExitStatus::exited(code))),
        WaitStatus::Signaled(pid, sig, _) => Some((pid.as_raw(), ExitStatus::signaled(sig as i32))),
        _ => None,
    }
}

impl Reaper {
    /// Starts the reaper task. Must be called inside a tokio runtime, before any child is
    /// spawned (so that no SIGCHLD is missed).
    pub fn start() -> std::io::Result<Arc<Self>> {
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Arc::new(Self::default());
        let r = Arc::clone(&reaper);
        tokio::spawn(async move {
            loop {
                r.reap_all();
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(reaper)
    }

    /// Registers interest in `pid`'s exit. Call right after spawning it, before any await.
    pub fn register(&self, pid: i32) -> oneshot::Receiver<ExitStatus> {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(pid, tx);
        rx
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, oneshot::Sender<ExitStatus>>> {
        // A poisoned map is still a valid map: keep reaping rather than panic as PID 1.
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands `status` to the waiter of `pid`; returns false (and drops it) for unknown pids.
    pub fn dispatch(&self, pid: i32, status: ExitStatus) -> bool {
        match self.lock().remove(&pid) {
            Some(tx) => {
                // The waiter may be gone (its connection dropped); nothing to do then.
                let _ = tx.send(status);
                true
            }
            None => {
                crate::debug!("reaped pid {pid} ({status:?})");
                false
            }
        }
    }

    /// Reaps every child that has exited.
    pub fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(ws) => {
                    if let Some((pid, status)) = exit_status(ws) {
                        self.dispatch(pid, status);
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    crate::info!("waitpid: {e}");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    #[test]
    fn statuses_map_to_protocol() {
        let p = Pid::from_raw(42);
        assert_eq!(
            exit_status(WaitStatus::Exited(p, 3)),
            Some((42, ExitStatus::exited(3)))
        );
        assert_eq!(
            exit_status(WaitStatus::Signaled(p, Signal::SIGKILL, false)),
            Some((42, ExitStatus::signaled(9)))
        );
        assert_eq!(exit_status(WaitStatus::StillAlive), None);
    }

    #[test]
    fn dispatch_goes_to_registered_waiter_and_drops_unknown() {
        let r = Reaper::default();
        let mut rx = r.register(7);
        assert!(!r.dispatch(8, ExitStatus::exited(1)));
        assert!(rx.try_recv().is_err());
        assert!(r.dispatch(7, ExitStatus::exited(2)));
        assert_eq!(rx.try_recv().unwrap(), ExitStatus::exited(2));
        // A status is delivered once; a second one for the same pid is an orphan's.
        assert!(!r.dispatch(7, ExitStatus::exited(3)));
    }

    #[test]
    fn reaps_a_real_child() {
        let _guard = crate::testutil::child_lock();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let status = rt.block_on(async {
            let reaper = Reaper::start().unwrap();
            // The reaper is what waits for this child.
            #[allow(clippy::zombie_processes)]
            let child = std::process::Command::new("/bin/sh")
                .args(["-c", "kill -TERM $$"])
                .spawn()
                .unwrap();
            let rx = reaper.register(child.id() as i32);
            tokio::time::timeout(std::time::Duration::from_secs(10), rx)
                .await
                .expect("reaper delivered the status")
                .unwrap()
        });
        assert_eq!(status, ExitStatus::signaled(15));
    }
}
