//! A container: one sandbox (VM) and its init process, with the lifecycle a containerd shim
//! drives: [`Container::create`] boots the VM, [`Container::start`] runs the process, and the
//! returned [`Running`] handle signals it, resizes its terminal, closes its stdin and waits
//! for its exit and for the VM's teardown.
//!
//! The exit is reported as soon as the agent sends it, before the VM powers off, so a caller
//! can publish it without waiting for the (slow, under TCG) teardown.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use agentvm_protocol::{tokio_io, Frame, Message, ProcessSpec, RootfsSpec, StartRequest, Stream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

use crate::accel::{self, AccelChoice};
use crate::assets::Assets;
use crate::error::{Error, Result};
use crate::sandbox::{AgentConn, Sandbox, SandboxConfig};
use crate::vmm::Share;

/// The 9p mount tag of the container's root directory.
const ROOT_TAG: &str = "rootfs";
/// How the guest mounts a shared root: 9p2000.L over virtio, 512 KiB messages, and
/// `cache=mmap` so that mmap'd files (shared libraries, databases) work.
const ROOT_9P_OPTIONS: &str = "trans=virtio,version=9p2000.L,msize=524288,cache=mmap";
/// How long the VM may take to power off by itself before it is killed.
const TEARDOWN_GRACE: Duration = Duration::from_secs(5);
/// After a SIGKILL is forwarded, how long the agent gets to report the exit before the VM
/// itself is killed (a wedged guest must not make `docker kill` hang).
const KILL_GRACE: Duration = Duration::from_secs(5);

/// What to boot and run.
#[derive(Debug, Clone)]
pub struct ContainerConfig {
    /// Sandbox id; names the state directory.
    pub id: String,
    /// Host directory holding the container's root filesystem, shared with the guest.
    pub root: PathBuf,
    pub root_readonly: bool,
    pub process: ProcessSpec,
    pub hostname: Option<String>,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub accel: AccelChoice,
    pub boot_timeout: Duration,
    pub debug: bool,
}

/// The stdio of a process; `None` streams are not connected.
#[derive(Default)]
pub struct ProcessIo {
    pub stdin: Option<Box<dyn AsyncRead + Send + Unpin>>,
    pub stdout: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    pub stderr: Option<Box<dyn AsyncWrite + Send + Unpin>>,
}

impl std::fmt::Debug for ProcessIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessIo")
            .field("stdin", &self.stdin.is_some())
            .field("stdout", &self.stdout.is_some())
            .field("stderr", &self.stderr.is_some())
            .finish()
    }
}

/// How and when a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Shell-style: the exit code, or 128 + the signal number.
    pub code: i32,
    pub at: SystemTime,
}

/// A booted VM whose init process has not started yet.
#[derive(Debug)]
pub struct Container {
    sandbox: Sandbox,
    conn: AgentConn,
    request: StartRequest,
    pid: u32,
}

impl Container {
    /// Boots the VM with the root directory shared, and waits for the agent. Nothing is left
    /// running on failure.
    pub async fn create(cfg: ContainerConfig) -> Result<Container> {
        let assets = Assets::locate()?;
        if !cfg.root.is_dir() {
            return Err(Error::Invalid(format!(
                "container root {} is not a directory",
                cfg.root.display()
            )));
        }
        let (accel, warning) = accel::resolve(cfg.accel, &assets).await?;
        if let Some(w) = warning {
            tracing::warn!("{w}");
        }
        let sandbox_cfg = SandboxConfig {
            id: cfg.id.clone(),
            disks: Vec::new(),
            shares: vec![Share {
                tag: ROOT_TAG.into(),
                path: cfg.root.clone(),
                readonly: cfg.root_readonly,
            }],
            memory_mib: cfg.memory_mib,
            vcpus: cfg.vcpus,
            accel,
            boot_timeout: cfg.boot_timeout,
            icount: false,
            debug: cfg.debug,
        };
        let (sandbox, conn) = Sandbox::boot(&sandbox_cfg, &assets).await?;
        let pid = sandbox
            .vmm_pid()
            .ok_or_else(|| Error::Agent("the VMM exited right after boot".into()))?;
        let mut options = ROOT_9P_OPTIONS.to_string();
        if cfg.root_readonly {
            options.push_str(",ro");
        }
        let request = StartRequest {
            rootfs: RootfsSpec {
                device: ROOT_TAG.into(),
                fstype: "9p".into(),
                overlay: false,
                options: Some(options),
            },
            process: cfg.process,
            hostname: cfg.hostname,
            init: true,
        };
        Ok(Container {
            sandbox,
            conn,
            request,
            pid,
        })
    }

    /// Host pid of the VMM: the container's task pid as containerd and Docker see it.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Starts the init process with `io`. On success the process runs; on failure (the
    /// agent could not start it) the error carries the agent's message, and the returned
    /// handle still reports the exit (e.g. 127) and the teardown.
    pub async fn start(self, io: ProcessIo) -> (Running, Result<i32>) {
        let Container {
            sandbox,
            mut conn,
            request,
            pid,
        } = self;
        let (exit_tx, exit_rx) = watch::channel(None);
        let (down_tx, down_rx) = watch::channel(false);
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let running = Running {
            pid,
            ctl: ctl_tx,
            exit: exit_rx,
            torn_down: down_rx,
        };
        let send = conn
            .send(&Frame::Msg(Message::Start(Box::new(request))))
            .await;
        let (started_tx, started_rx) = oneshot::channel();
        tokio::spawn(async move {
            let mut sandbox = sandbox;
            let code = match send {
                Ok(()) => drive(&mut sandbox, conn, io, ctl_rx, started_tx).await,
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                    255
                }
            };
            let _ = exit_tx.send(Some(Exit {
                code,
                at: SystemTime::now(),
            }));
            sandbox.destroy(TEARDOWN_GRACE).await;
            let _ = down_tx.send(true);
        });
        let started = started_rx
            .await
            .unwrap_or_else(|_| Err(Error::Agent("the process driver ended".into())));
        (running, started)
    }

    /// Tears the VM down without running anything (delete before start).
    pub async fn destroy(mut self) {
        let _ = self.conn.send(&Frame::Msg(Message::Shutdown)).await;
        drop(self.conn);
        self.sandbox.destroy(TEARDOWN_GRACE).await;
    }
}

enum Control {
    Signal(i32),
    Resize { rows: u16, cols: u16 },
    CloseStdin,
}

/// A started init process.
#[derive(Debug, Clone)]
pub struct Running {
    pid: u32,
    ctl: mpsc::UnboundedSender<Control>,
    exit: watch::Receiver<Option<Exit>>,
    torn_down: watch::Receiver<bool>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Control::Signal(s) => write!(f, "Signal({s})"),
            Control::Resize { rows, cols } => write!(f, "Resize({rows}x{cols})"),
            Control::CloseStdin => f.write_str("CloseStdin"),
        }
    }
}

impl Running {
    /// Host pid of the VMM.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit, once the process has ended.
    pub fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Delivers `signal` to the process. Fails once the process has exited.
    pub fn signal(&self, signal: i32) -> Result<()> {
        self.control(Control::Signal(signal))
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        self.control(Control::Resize { rows, cols })
    }

    /// Ends the process's stdin (EOF), as `CloseIO` asks.
    pub fn close_stdin(&self) -> Result<()> {
        self.control(Control::CloseStdin)
    }

    fn control(&self, c: Control) -> Result<()> {
        if self.exited().is_some() {
            return Err(Error::Invalid("the process has already exited".into()));
        }
        self.ctl
            .send(c)
            .map_err(|_| Error::Invalid("the process has already exited".into()))
    }

    /// Resolves with the exit (at once if it has happened).
    pub async fn wait(&self) -> Exit {
        let mut rx = self.exit.clone();
        let r = rx.wait_for(Option::is_some).await.map(|e| *e);
        match r {
            Ok(Some(e)) => e,
            // The driver never drops the sender before publishing an exit.
            _ => Exit {
                code: 255,
                at: SystemTime::now(),
            },
        }
    }

    /// Resolves when the VM is gone and its state directory removed.
    pub async fn wait_torn_down(&self) {
        let mut rx = self.torn_down.clone();
        let _ = rx.wait_for(|d| *d).await;
    }
}

/// Relays stdio and control until the process exits; returns its exit code. Reports the
/// start outcome through `started`.
async fn drive(
    sandbox: &mut Sandbox,
    conn: AgentConn,
    io: ProcessIo,
    mut ctl: mpsc::UnboundedReceiver<Control>,
    started: oneshot::Sender<Result<i32>>,
) -> i32 {
    let AgentConn {
        mut reader,
        mut writer,
    } = conn;
    let mut started = Some(started);
    let report = |started: &mut Option<oneshot::Sender<Result<i32>>>, r: Result<i32>| {
        if let Some(tx) = started.take() {
            let _ = tx.send(r);
        }
    };
    // read_frame is not cancel-safe: it runs in its own task and hands frames over a channel.
    let (ftx, mut frames) = mpsc::channel::<Result<Option<Frame>>>(16);
    let reader_task = tokio::spawn(async move {
        loop {
            let f = tokio_io::read_frame(&mut reader).await.map_err(Error::from);
            let end = !matches!(f, Ok(Some(_)));
            if ftx.send(f).await.is_err() || end {
                break;
            }
        }
    });
    let (stx, mut stdin_rx) = mpsc::channel::<Vec<u8>>(4);
    let mut stdin_open = io.stdin.is_some();
    let stdin_task = io.stdin.map(|mut src| {
        tokio::spawn(async move {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match src.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if stx.send(buf[..n].to_vec()).await.is_err() {
                            break;
                        }
                    }
                }
            }
        })
    });
    if !stdin_open {
        let _ = tokio_io::write_frame(&mut writer, &Frame::Data(Stream::Stdin, Vec::new())).await;
    }
    let mut stdout = io.stdout;
    let mut stderr = io.stderr;
    let mut setup_error: Option<String> = None;
    let mut kill_deadline: Option<tokio::time::Instant> = None;
    let mut ctl_open = true;
    let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
    let code = loop {
        let deadline = kill_deadline.unwrap_or(far);
        tokio::select! {
            f = frames.recv() => match f {
                Some(Ok(Some(Frame::Data(s, b)))) => {
                    let sink = match s {
                        Stream::Stdout => stdout.as_mut(),
                        Stream::Stderr => stderr.as_mut(),
                        Stream::Stdin => None,
                    };
                    if let (Some(w), false) = (sink, b.is_empty()) {
                        // A reader that went away must not stop the process: drop the data.
                        let _ = w.write_all(&b).await;
                        let _ = w.flush().await;
                    }
                }
                Some(Ok(Some(Frame::Msg(Message::Started { pid })))) => {
                    report(&mut started, Ok(pid));
                }
                Some(Ok(Some(Frame::Msg(Message::Error { message, exit_code })))) => {
                    tracing::info!("agent: {message} (exit code {exit_code:?})");
                    if started.is_some() {
                        setup_error = Some(message);
                    }
                }
                Some(Ok(Some(Frame::Msg(Message::Exited(st))))) => break st.code,
                Some(Ok(Some(other))) => tracing::debug!("ignoring frame {other:?}"),
                Some(Ok(None)) | Some(Err(_)) | None => {
                    let why = tokio::time::timeout(Duration::from_secs(3), sandbox.vmm_exited())
                        .await
                        .unwrap_or_else(|_| "the agent connection closed".into());
                    tracing::warn!("the VM ended without reporting an exit ({why}):\n{}", sandbox.diagnostics());
                    break if kill_deadline.is_some() { 128 + libc::SIGKILL } else { 255 };
                }
            },
            chunk = stdin_rx.recv(), if stdin_open => {
                let data = chunk.unwrap_or_default();
                stdin_open = !data.is_empty();
                let _ = tokio_io::write_frame(&mut writer, &Frame::Data(Stream::Stdin, data)).await;
            }
            c = ctl.recv(), if ctl_open => match c {
                Some(Control::Signal(signal)) => {
                    if signal == libc::SIGKILL && kill_deadline.is_none() {
                        kill_deadline = Some(tokio::time::Instant::now() + KILL_GRACE);
                    }
                    let _ = tokio_io::write_frame(&mut writer, &Frame::Msg(Message::Signal { signal })).await;
                }
                Some(Control::Resize { rows, cols }) => {
                    let _ = tokio_io::write_frame(&mut writer, &Frame::Msg(Message::Resize { rows, cols })).await;
                }
                Some(Control::CloseStdin) => {
                    if stdin_open {
                        stdin_open = false;
                        let _ = tokio_io::write_frame(&mut writer, &Frame::Data(Stream::Stdin, Vec::new())).await;
                    }
                }
                // Every handle is gone: only the process or the VM can end this now.
                None => ctl_open = false,
            },
            st = sandbox.vmm_exited() => {
                tracing::warn!("QEMU exited ({st}) before the process reported an exit:\n{}", sandbox.diagnostics());
                break if kill_deadline.is_some() { 128 + libc::SIGKILL } else { 255 };
            }
            () = tokio::time::sleep_until(deadline), if kill_deadline.is_some() => {
                tracing::warn!("no exit {KILL_GRACE:?} after SIGKILL: killing the VM");
                sandbox.kill();
                kill_deadline = Some(far);
            }
        }
    };
    let message =
        setup_error.unwrap_or_else(|| format!("the process exited ({code}) before it started"));
    report(&mut started, Err(Error::Agent(message)));
    if let Some(t) = stdin_task {
        t.abort();
    }
    // Closing the connection tells the agent the exit was read: it powers off at once.
    reader_task.abort();
    let _ = reader_task.await;
    drop(writer);
    code
}
