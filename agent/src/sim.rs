//! A simulated machine: the agent's real server ([`crate::server::connection`]) on a host,
//! for tests of the host runtime without a VM (`agentvm`'s fake VMM backend).
//!
//! What is real: the whole protocol handling of [`crate::server`] (Hello, Start, stdio and
//! its flow control, signals, resize, exits, pod containers and their exec processes,
//! stats, the init's end ending the other processes and "powering off").
//!
//! What is simulated ([`Sim`]):
//! - processes are plain children of the test process, started with `std::process::Command`
//!   from the spec's args, env and cwd on the host's own filesystem: no chroot, user or
//!   group change, capabilities, rlimits, cgroups, mount or PID namespaces, and no
//!   controlling terminal (a terminal's pty is their stdio);
//! - each exit is reaped by a thread waiting for that pid alone (never `waitpid(-1)`,
//!   which would steal the test's other children);
//! - the guest's setup is skipped: no root filesystem is mounted (the root is `/`), no
//!   hostname, network, sysctls, mounts or secret files;
//! - powering off kills every process the machine started and ends the server: its
//!   runtime is dropped with every connection, as a VM's end closes them;
//! - no OOM is ever reported.
//!
//! The server runs on a thread of its own with a current-thread runtime, as in the VM.

use std::collections::HashSet;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use agentvm_protocol::{ExitStatus, ProcessSpec};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag};
use nix::unistd::Pid;
use tokio::sync::{mpsc, oneshot, watch};

use crate::fdio::FdStream;
use crate::machine::Machine;
use crate::process::spawn::{Pty, SpawnError, Spawned};
use crate::process::Plan;
use crate::reaper::exit_status;
use crate::server::{connection, Agent};

/// The simulated machine (see the module docs).
#[derive(Debug)]
pub struct Sim {
    /// Processes started and not yet reaped.
    live: Arc<Mutex<HashSet<i32>>>,
    /// Why the machine powered off, once it has.
    off: watch::Sender<Option<String>>,
}

impl Default for Sim {
    fn default() -> Self {
        Sim {
            live: Arc::default(),
            off: watch::Sender::new(None),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sim {
    /// Kills every process the machine started that still runs.
    pub fn kill_everything(&self) {
        // Under the lock: a pid leaves the set before it is reaped, so it is never recycled
        // while listed.
        for pid in lock(&self.live).iter() {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
    }

    /// Pids of the processes started and not yet reaped.
    pub fn live_pids(&self) -> Vec<i32> {
        lock(&self.live).iter().copied().collect()
    }

    /// Powers the machine off from outside (the host killing its VM).
    pub fn pull_the_plug(&self, reason: &str) {
        self.off.send_if_modified(|r| {
            let first = r.is_none();
            if first {
                *r = Some(reason.to_string());
            }
            first
        });
        self.kill_everything();
    }

    /// Why the machine powered off, once it has.
    pub fn powered_off(&self) -> watch::Receiver<Option<String>> {
        self.off.subscribe()
    }
}

/// A spawn failure as the real agent reports it: runc's exit codes.
fn spawn_error(name: &str, e: std::io::Error) -> SpawnError {
    let exit_code = match e.kind() {
        std::io::ErrorKind::NotFound => 127,
        std::io::ErrorKind::PermissionDenied => 126,
        _ => return SpawnError::Io(e),
    };
    SpawnError::Setup {
        message: format!("exec: {name:?}: {e}"),
        exit_code,
    }
}

impl Machine for Sim {
    fn spawn(
        &self,
        plan: Arc<Plan>,
        process: &ProcessSpec,
        pty: Option<Pty>,
    ) -> Result<(Spawned, oneshot::Receiver<ExitStatus>), SpawnError> {
        let name = process.args.first().cloned().unwrap_or_default();
        let mut cmd = Command::new(&name);
        cmd.args(&process.args[1..])
            .env_clear()
            .envs(process.env.iter().filter_map(|e| e.split_once('=')))
            .current_dir(&plan.cwd_display);
        let master = match pty {
            Some(Pty { master, slave }) => {
                cmd.stdin(Stdio::from(slave.try_clone()?))
                    .stdout(Stdio::from(slave.try_clone()?))
                    .stderr(Stdio::from(slave));
                Some(master)
            }
            None => {
                cmd.stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                None
            }
        };
        let mut child = cmd.spawn().map_err(|e| spawn_error(&name, e))?;
        let pid = i32::try_from(child.id()).map_err(std::io::Error::other)?;
        lock(&self.live).insert(pid);
        let (tx, rx) = oneshot::channel();
        let live = Arc::clone(&self.live);
        std::thread::spawn(move || {
            let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT;
            while waitid(Id::Pid(Pid::from_raw(pid)), flags)
                .is_err_and(|e| e == nix::errno::Errno::EINTR)
            {}
            let mut live = lock(&live);
            live.remove(&pid);
            let status = waitpid(Pid::from_raw(pid), None)
                .ok()
                .and_then(exit_status)
                .map_or(ExitStatus::exited(255), |(_, st)| st);
            drop(live);
            let _ = tx.send(status);
        });
        Ok((
            Spawned {
                pid,
                stdin: child.stdin.take().map(OwnedFd::from),
                stdout: child.stdout.take().map(OwnedFd::from),
                stderr: child.stderr.take().map(OwnedFd::from),
                master,
            },
            rx,
        ))
    }

    fn oom_killed(&self, _pid: i32) -> bool {
        false
    }

    fn kill_all(&self) -> bool {
        self.kill_everything();
        true
    }

    fn power_off(&self, reason: &str) {
        self.pull_the_plug(reason);
    }

    fn owns_guest(&self) -> bool {
        false
    }
}

/// A simulated VM: the agent's server on a thread of its own, reached through
/// [`SimVm::connect`].
#[derive(Debug)]
pub struct SimVm {
    sim: Arc<Sim>,
    conns: mpsc::UnboundedSender<UnixStream>,
    /// Set once the server has ended (every connection closed).
    ended: watch::Receiver<Option<String>>,
}

impl SimVm {
    /// Starts the server.
    pub fn start() -> std::io::Result<SimVm> {
        let sim = Arc::new(Sim::default());
        let (conns, mut rx) = mpsc::unbounded_channel::<UnixStream>();
        let (ended_tx, ended) = watch::channel(None);
        let machine = Arc::clone(&sim);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("agentvm-sim".into())
            .spawn(move || {
                let agent = Arc::new(
                    Agent::on(machine.clone(), crate::process::caps::kernel_last_cap())
                        .rooted_at("/"),
                );
                let mut off = machine.powered_off();
                rt.block_on(async {
                    loop {
                        tokio::select! {
                            s = rx.recv() => match s {
                                Some(s) => match FdStream::new(s.into()) {
                                    Ok(stream) => {
                                        tokio::spawn(connection(Arc::clone(&agent), stream));
                                    }
                                    Err(e) => crate::info!("simulated connection: {e}"),
                                },
                                None => {
                                    machine.pull_the_plug("the host dropped the VM");
                                    break;
                                }
                            },
                            _ = off.wait_for(Option::is_some) => break,
                        }
                    }
                });
                // Every connection ends with the runtime, as with a VM; nobody connects again.
                drop(rt);
                drop(rx);
                machine.kill_everything();
                // Gone means reaped.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                while !lock(&machine.live).is_empty() && std::time::Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                let why = machine.powered_off().borrow().clone().unwrap_or_default();
                ended_tx.send_replace(Some(why));
            })?;
        Ok(SimVm { sim, conns, ended })
    }

    /// One connection to the agent (the host's end); the agent greets on it.
    pub fn connect(&self) -> std::io::Result<UnixStream> {
        let (host, guest) = UnixStream::pair()?;
        self.conns.send(guest).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "the simulated VM has powered off",
            )
        })?;
        Ok(host)
    }

    /// The machine (its processes, its power).
    pub fn machine(&self) -> &Arc<Sim> {
        &self.sim
    }

    /// Why the VM ended, once its server is gone.
    pub fn ended(&self) -> watch::Receiver<Option<String>> {
        self.ended.clone()
    }
}
