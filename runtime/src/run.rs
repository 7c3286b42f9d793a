//! `agentvm run`: one process in a fresh VM, with the user's stdio, signals and exit code.

use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use std::sync::Arc;

use agentvm_protocol::{ProcessSpec, RootfsSpec, StartRequest};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};

use crate::accel::{self, AccelChoice};
use crate::assets::Assets;
use crate::container::ProcessIo;
use crate::error::{Error, Result};
use crate::guest::{self, GuestLog};
use crate::sandbox::{new_id, Sandbox, SandboxConfig};
use crate::session::{self, Control, DriveLink};
use crate::vmm::Disk;

/// Defaults documented in the README.
pub const DEFAULT_MEMORY_MIB: u32 = 512;
pub const DEFAULT_VCPUS: u32 = 1;
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long the agent may take to confirm the process's start (the root's mount and the
/// process's setup), once it answered.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Options of `agentvm run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub rootfs: PathBuf,
    pub process: ProcessSpec,
    pub interactive: bool,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub accel: AccelChoice,
    pub boot_timeout: Duration,
    pub icount: bool,
    pub debug: bool,
    /// Secrets for the process, decrypted ([`crate::secrets::Store::resolve`]).
    pub secrets: Vec<agentvm_protocol::SecretSpec>,
}

/// Completes the process spec the way `docker run` does: a default PATH, TERM for a tty.
pub fn finish_process(p: &mut ProcessSpec) {
    if !p.env.iter().any(|e| e.starts_with("PATH=")) {
        p.env.insert(0, DEFAULT_PATH.to_string());
    }
    if p.terminal && !p.env.iter().any(|e| e.starts_with("TERM=")) {
        p.env.push("TERM=xterm".to_string());
    }
}

/// Parses `-u UID[:GID]`.
pub fn parse_user(s: &str) -> Result<(u32, u32)> {
    let bad = || {
        Error::Invalid(format!(
            "invalid --user {s:?}: use numeric UID or UID:GID (user names are not resolved yet)"
        ))
    };
    let (u, g) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    let uid: u32 = u.parse().map_err(|_| bad())?;
    let gid: u32 = match g {
        Some(g) => g.parse().map_err(|_| bad())?,
        None => uid,
    };
    Ok((uid, gid))
}

/// Puts the host terminal in raw mode for the life of the guard.
struct RawTerminal {
    saved: nix::sys::termios::Termios,
}

impl RawTerminal {
    fn enter() -> Option<Self> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(Self { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let stdin = std::io::stdin();
        let _ = nix::sys::termios::tcsetattr(
            stdin.as_fd(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.saved,
        );
    }
}

fn terminal_size() -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into the struct we pass; fd 0 may be any file,
    // in which case the call fails and we return None.
    let r = unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
}

/// Runs the process and returns its exit code (128+n for a signal).
pub async fn run(mut opts: RunOptions) -> Result<i32> {
    let assets = Assets::locate()?;
    if !opts.rootfs.is_file() {
        return Err(Error::Invalid(format!(
            "rootfs {} is not a file: pass an ext4 image (agentvm-image build makes one)",
            opts.rootfs.display()
        )));
    }
    let (accel, warning) = accel::resolve(opts.accel, &assets).await?;
    if let Some(w) = warning {
        eprintln!("agentvm: warning: {w}");
    }
    finish_process(&mut opts.process);
    if opts.process.terminal {
        opts.process.console_size = terminal_size();
    }
    let cfg = SandboxConfig {
        id: new_id(),
        disks: vec![Disk {
            path: opts.rootfs.clone(),
            readonly: true,
        }],
        shares: Vec::new(),
        nics: Vec::new(),
        netns: None,
        memory_mib: opts.memory_mib,
        vcpus: opts.vcpus,
        accel,
        boot_timeout: opts.boot_timeout,
        icount: opts.icount,
        debug: opts.debug,
    };
    let (mut sandbox, conn) = Sandbox::boot(&cfg, &assets).await?;
    let outcome = drive(&mut sandbox, conn, &opts).await;
    let exited = Instant::now();
    sandbox.destroy(Duration::from_secs(5)).await;
    let (code, timing) = outcome?;
    if opts.debug {
        eprintln!("{timing} teardown={}ms", exited.elapsed().as_millis());
    }
    Ok(code)
}

/// Starts the process and relays until it exits, through the session driver the shim's
/// containers use ([`crate::session::drive`]); returns its code and a timing line.
async fn drive(
    sandbox: &mut Sandbox,
    conn: crate::sandbox::AgentConn,
    opts: &RunOptions,
) -> Result<(i32, String)> {
    let start = StartRequest {
        rootfs: RootfsSpec {
            device: "/dev/vda".into(),
            fstype: "ext4".into(),
            overlay: true,
            options: None,
            layers: None,
            subdir: None,
        },
        process: opts.process.clone(),
        hostname: None,
        init: true,
        pid_namespace: false,
        network: None,
        mounts: Vec::new(),
        sysctls: Default::default(),
        container: None,
        secrets: opts.secrets.clone(),
        masked_paths: Vec::new(),
        readonly_paths: Vec::new(),
    };
    let io = ProcessIo {
        stdin: opts
            .interactive
            .then(|| Box::new(tokio::io::stdin()) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        stdout: Some(Box::new(tokio::io::stdout())),
        stderr: Some(Box::new(tokio::io::stderr())),
    };
    let _raw = if opts.process.terminal && std::io::stdin().is_terminal() {
        RawTerminal::enter()
    } else {
        None
    };
    let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
    let signals = forward_signals(ctl_tx)?;
    let (started_tx, started_rx) = oneshot::channel();
    let link = DriveLink {
        dialer: None,
        log: Arc::new(GuestLog::new(
            sandbox.id.clone(),
            guest::GUEST_LOG_PER_SECOND,
        )),
        start_timeout: START_TIMEOUT,
        pending: Vec::new(),
    };
    let t_start = Instant::now();
    let started = async {
        let r = started_rx.await;
        (r, Instant::now())
    };
    let (ending, (started, t_started)) = tokio::join!(
        session::drive(
            Some(&mut *sandbox),
            link,
            conn,
            start,
            io,
            ctl_rx,
            started_tx
        ),
        started
    );
    signals.abort();
    if let Some(reason) = ending.vm_died {
        return Err(Error::VmDied {
            reason,
            console: sandbox.diagnostics(),
        });
    }
    match started {
        Ok(Ok(())) => {}
        // The process could not even be set up (rootfs, invalid spec, no exit reported).
        Ok(Err(e)) if !ending.reported => return Err(e),
        // It could not start (a command not found): reported with its exit code, as Docker
        // reports `exec: ...: not found` with 127.
        Ok(Err(e)) => eprintln!("agentvm: {e}"),
        Err(_) => {
            return Err(Error::Agent(
                "the process driver ended without a start".into(),
            ))
        }
    }
    let t = sandbox.timings;
    let now = Instant::now();
    let timing = format!(
        "agentvm: timing: vmm-spawn={}ms guest-uptime-at-agent={}ms agent-ready={}ms exec={}ms run={}ms",
        t.vmm_spawned.duration_since(t.started).as_millis(),
        t.guest_uptime_ms,
        t.agent_ready.duration_since(t.started).as_millis(),
        t_started.duration_since(t_start).as_millis(),
        now.duration_since(t_started).as_millis(),
    );
    Ok((ending.code, timing))
}

/// Forwards the signals a terminal or a supervisor sends `agentvm run` to the process, and
/// the terminal's size when it changes; the task ends when the driver's channel closes.
fn forward_signals(ctl: mpsc::UnboundedSender<Control>) -> Result<tokio::task::JoinHandle<()>> {
    let sig = |k: SignalKind| signal(k).map_err(|e| Error::io("install handler for", "signal", e));
    let mut sigint = sig(SignalKind::interrupt())?;
    let mut sigterm = sig(SignalKind::terminate())?;
    let mut sighup = sig(SignalKind::hangup())?;
    let mut sigquit = sig(SignalKind::quit())?;
    let mut sigusr1 = sig(SignalKind::user_defined1())?;
    let mut sigusr2 = sig(SignalKind::user_defined2())?;
    let mut sigwinch = sig(SignalKind::window_change())?;
    Ok(tokio::spawn(async move {
        loop {
            let c = tokio::select! {
                _ = sigint.recv() => Control::Signal(libc::SIGINT),
                _ = sigterm.recv() => Control::Signal(libc::SIGTERM),
                _ = sighup.recv() => Control::Signal(libc::SIGHUP),
                _ = sigquit.recv() => Control::Signal(libc::SIGQUIT),
                _ = sigusr1.recv() => Control::Signal(libc::SIGUSR1),
                _ = sigusr2.recv() => Control::Signal(libc::SIGUSR2),
                _ = sigwinch.recv() => match terminal_size() {
                    Some((rows, cols)) => Control::Resize { rows, cols },
                    None => continue,
                },
            };
            if ctl.send(c).is_err() {
                break;
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_parse() {
        assert_eq!(parse_user("1000").unwrap(), (1000, 1000));
        assert_eq!(parse_user("1000:50").unwrap(), (1000, 50));
        assert!(parse_user("root").is_err());
        assert!(parse_user("1:x").is_err());
    }

    #[test]
    fn process_gets_docker_defaults() {
        let mut p = ProcessSpec {
            args: vec!["sh".into()],
            terminal: true,
            ..Default::default()
        };
        finish_process(&mut p);
        assert_eq!(p.env[0], DEFAULT_PATH);
        assert!(p.env.contains(&"TERM=xterm".to_string()));
        let mut q = ProcessSpec {
            args: vec!["sh".into()],
            env: vec!["PATH=/x".into()],
            ..Default::default()
        };
        finish_process(&mut q);
        assert_eq!(q.env, vec!["PATH=/x".to_string()]);
    }
}
