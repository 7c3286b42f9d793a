//! `agentvm run`: one process in a fresh VM, with the user's stdio, signals and exit code.

use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use agentvm_protocol::{tokio_io, Frame, Message, ProcessSpec, RootfsSpec, StartRequest, Stream};
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::accel::{self, AccelChoice};
use crate::assets::Assets;
use crate::error::{Error, Result};
use crate::sandbox::{new_id, spawn_frame_reader, spawn_input_pump, Sandbox, SandboxConfig};
use crate::vmm::Disk;

/// Defaults documented in the README.
pub const DEFAULT_MEMORY_MIB: u32 = 512;
pub const DEFAULT_VCPUS: u32 = 1;
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

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

/// Starts the process and relays until it exits; returns its code and a timing line.
async fn drive(
    sandbox: &mut Sandbox,
    conn: crate::sandbox::AgentConn,
    opts: &RunOptions,
) -> Result<(i32, String)> {
    let crate::sandbox::AgentConn { reader, mut writer } = conn;
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
    let t_start = Instant::now();
    tokio_io::write_frame(&mut writer, &Frame::Msg(Message::Start(Box::new(start)))).await?;

    let (mut frames, reader_task) = spawn_frame_reader(reader);
    let mut stdin_open = opts.interactive;
    let mut stdin_rx = if opts.interactive {
        spawn_input_pump(tokio::io::stdin()).0
    } else {
        tokio_io::write_frame(&mut writer, &Frame::Data(Stream::Stdin, Vec::new())).await?;
        mpsc::channel(1).1
    };
    let _raw = if opts.process.terminal && std::io::stdin().is_terminal() {
        RawTerminal::enter()
    } else {
        None
    };

    let sig = |k: SignalKind| signal(k).map_err(|e| Error::io("install handler for", "signal", e));
    let mut sigint = sig(SignalKind::interrupt())?;
    let mut sigterm = sig(SignalKind::terminate())?;
    let mut sighup = sig(SignalKind::hangup())?;
    let mut sigquit = sig(SignalKind::quit())?;
    let mut sigusr1 = sig(SignalKind::user_defined1())?;
    let mut sigusr2 = sig(SignalKind::user_defined2())?;
    let mut sigwinch = sig(SignalKind::window_change())?;

    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut t_started = None;
    let mut unacked = 0u64;
    let code = loop {
        let forward: Option<i32> = tokio::select! {
            f = frames.recv() => {
                // Output read off the connection opens the agent's window (OUTPUT_WINDOW).
                if let Some(Ok(Some(Frame::Data(_, b)))) = &f {
                    unacked += b.len() as u64;
                    if unacked >= agentvm_protocol::OUTPUT_WINDOW / 4 {
                        let bytes = std::mem::take(&mut unacked);
                        let ack = Frame::Msg(Message::Consumed { bytes });
                        tokio_io::write_frame(&mut writer, &ack).await?;
                    }
                }
                match f {
                    Some(Ok(Some(Frame::Data(Stream::Stdout, b)))) => {
                        if !b.is_empty() {
                            let _ = stdout.write_all(&b).await;
                            let _ = stdout.flush().await;
                        }
                    }
                    Some(Ok(Some(Frame::Data(Stream::Stderr, b)))) => {
                        if !b.is_empty() {
                            let _ = stderr.write_all(&b).await;
                            let _ = stderr.flush().await;
                        }
                    }
                    Some(Ok(Some(Frame::Msg(Message::Started { .. })))) => {
                        t_started = Some(Instant::now());
                    }
                    Some(Ok(Some(Frame::Msg(Message::Error { message, exit_code })))) => {
                        if exit_code.is_none() && t_started.is_none() {
                            // The process could not even be set up (rootfs, invalid spec).
                            return Err(Error::Agent(crate::guest::text(&message)));
                        }
                        let message = crate::guest::text(&message);
                        let _ = stderr.write_all(format!("agentvm: {message}\n").as_bytes()).await;
                    }
                    Some(Ok(Some(Frame::Msg(Message::Exited(st))))) => break crate::guest::exit_code(&st),
                    Some(Ok(Some(other))) => {
                        tracing::debug!("ignoring unexpected frame {}", crate::guest::describe(&other));
                    }
                    Some(Ok(None)) | Some(Err(_)) | None => {
                        // The agent went away before reporting an exit: the VM is dying.
                        let why = tokio::time::timeout(Duration::from_secs(3), sandbox.vmm_exited())
                            .await
                            .unwrap_or_else(|_| "the agent connection closed".into());
                        return Err(Error::VmDied { reason: why, console: sandbox.diagnostics() });
                    }
                }
                None
            }
            chunk = stdin_rx.recv(), if stdin_open => {
                let data = match chunk {
                    Some(b) => b,
                    None => { stdin_open = false; Vec::new() }
                };
                tokio_io::write_frame(&mut writer, &Frame::Data(Stream::Stdin, data)).await?;
                None
            }
            st = sandbox.vmm_exited() => {
                return Err(Error::VmDied { reason: format!("QEMU {st}"), console: sandbox.diagnostics() });
            }
            _ = sigint.recv() => Some(libc::SIGINT),
            _ = sigterm.recv() => Some(libc::SIGTERM),
            _ = sighup.recv() => Some(libc::SIGHUP),
            _ = sigquit.recv() => Some(libc::SIGQUIT),
            _ = sigusr1.recv() => Some(libc::SIGUSR1),
            _ = sigusr2.recv() => Some(libc::SIGUSR2),
            _ = sigwinch.recv() => {
                if let Some((rows, cols)) = terminal_size() {
                    tokio_io::write_frame(&mut writer, &Frame::Msg(Message::Resize { rows, cols })).await?;
                }
                None
            }
        };
        if let Some(signal) = forward {
            tokio_io::write_frame(&mut writer, &Frame::Msg(Message::Signal { signal })).await?;
        }
    };
    let t = sandbox.timings;
    let now = Instant::now();
    let started = t_started.unwrap_or(now);
    let timing = format!(
            "agentvm: timing: vmm-spawn={}ms guest-uptime-at-agent={}ms agent-ready={}ms exec={}ms run={}ms",
            t.vmm_spawned.duration_since(t.started).as_millis(),
            t.guest_uptime_ms,
            t.agent_ready.duration_since(t.started).as_millis(),
            started.duration_since(t_start).as_millis(),
            now.duration_since(started).as_millis(),
    );
    // Closing the connection (both halves) tells the agent the host has read the exit; it
    // then powers off at once.
    reader_task.abort();
    let _ = reader_task.await;
    drop(writer);
    Ok((code, timing))
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
