//! One session with the guest agent: the driver that relays a process's stdio, signals,
//! terminal size and exit over its agent connection. The shim's containers (the init and
//! every exec process, [`crate::container`]) and `agentvm run` ([`crate::run`]) go through
//! this one loop.

use std::sync::Arc;
use std::time::Duration;

use agentvm_protocol::{tokio_io, Frame, Message, StartRequest, Stream};
use tokio::io::{AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};

use crate::container::ProcessIo;
use crate::error::{Error, Result};
use crate::guest::{self, Dialer, GuestLog};
use crate::sandbox::{spawn_input_pump, AgentConn, Sandbox};
use crate::vmm::AgentIo;

/// After a SIGKILL is forwarded, how long the agent gets to report the exit before the VM
/// itself is killed (a wedged guest must not make `docker kill` hang).
pub(crate) const KILL_GRACE: Duration = Duration::from_secs(5);
/// How long the agent may take to accept and greet a connection (connects run off the init
/// driver's loop, so a stalled one delays only the request that asked for it).
pub(crate) const CONNECT_TIMEOUT: Duration = guest::CONNECT_TIMEOUT;

/// What a process's holders ask of its driver.
pub(crate) enum Control {
    Signal(i32),
    Resize {
        rows: u16,
        cols: u16,
    },
    CloseStdin,
    /// Open another agent connection (for an exec process).
    Connect(oneshot::Sender<Result<AgentConn>>),
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Control::Signal(s) => write!(f, "Signal({s})"),
            Control::Resize { rows, cols } => write!(f, "Resize({rows}x{cols})"),
            Control::CloseStdin => f.write_str("CloseStdin"),
            Control::Connect(_) => f.write_str("Connect"),
        }
    }
}

/// The exit of a container whose VM the host's OOM killer ended (its cgroup's memory limit,
/// docs/security.md): 137 and an OOM, as Docker reports a runc container's.
fn host_oom(sandbox: &Sandbox) -> Option<(i32, bool)> {
    sandbox.host_oom_killed().then(|| {
        tracing::warn!("the host's OOM killer ended the VM (its host cgroup's memory limit)");
        (128 + libc::SIGKILL, true)
    })
}

/// Resolves when the VMM exits; never without a sandbox.
async fn vmm_exited(sandbox: &Option<&mut Sandbox>) -> String {
    match sandbox {
        Some(s) => s.vmm_exited().await,
        None => std::future::pending().await,
    }
}

/// What a process's driver needs besides its connection.
pub(crate) struct DriveLink {
    /// Opens further agent connections (exec processes); none for an exec's own driver.
    pub(crate) dialer: Option<Arc<dyn Dialer>>,
    /// The rate limit of what this VM's agent makes the host log.
    pub(crate) log: Arc<GuestLog>,
    pub(crate) start_timeout: Duration,
    /// Controls that came while the connection was being opened, delivered after the start.
    pub(crate) pending: Vec<Control>,
}

/// How a driven process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ending {
    /// The exit code (clamped: the guest reports it), 255 when no exit was reported.
    pub(crate) code: i32,
    /// The guest's (or the host's) OOM killer ended it.
    pub(crate) oom: bool,
    /// The VM ended before the process reported an exit, and why (the init's driver only;
    /// the caller reports it with the VM's diagnostics).
    pub(crate) vm_died: Option<String>,
    /// The guest reported the exit (`code` is the process's, not one the host chose).
    pub(crate) reported: bool,
}

/// What the driver's loop asks its writer task to send.
enum Out {
    Frame(Frame),
    /// End of stdin, once the stdin read so far has been sent.
    CloseStdin,
}

/// Relays stdio and control until the process exits; returns how it ended ([`Ending`]).
/// Reports the start outcome through `started`. `sandbox` is given to the init process's
/// driver only.
///
/// The loop never waits on the guest: frames are read by one task (which also writes the
/// process's output, so a slow reader of the output slows only the guest) and written by
/// another (so a guest that stops reading cannot hold up a kill), and agent connections for
/// exec processes are opened by tasks of their own. Every wait on the guest is bounded: the
/// start by `start_timeout`, a kill by [`KILL_GRACE`].
pub(crate) async fn drive(
    mut sandbox: Option<&mut Sandbox>,
    link: DriveLink,
    conn: AgentConn,
    request: StartRequest,
    io: ProcessIo,
    mut ctl: mpsc::UnboundedReceiver<Control>,
    started: oneshot::Sender<Result<()>>,
) -> Ending {
    let DriveLink {
        dialer,
        log,
        start_timeout,
        pending,
    } = link;
    let mut vm_died: Option<String> = None;
    let AgentConn { reader, writer } = conn;
    let mut started = Some(started);
    let report = |started: &mut Option<oneshot::Sender<Result<()>>>, r: Result<()>| {
        if let Some(tx) = started.take() {
            let _ = tx.send(r);
        }
    };
    let (stdin_rx, stdin_task) = match io.stdin {
        Some(src) => {
            let (rx, task) = spawn_input_pump(src);
            (Some(rx), Some(task))
        }
        None => (None, None),
    };
    let (out, out_rx) = mpsc::unbounded_channel();
    let (mut msgs, reader_task) =
        spawn_reader(reader, io.stdout, io.stderr, Arc::clone(&log), out.clone());
    let start = Frame::Msg(Message::Start(Box::new(request)));
    let writer_task = spawn_writer(writer, start, stdin_rx, out_rx);
    for c in pending {
        let _ = out.send(match c {
            Control::Signal(signal) => Out::Frame(Frame::Msg(Message::Signal { signal })),
            Control::Resize { rows, cols } => {
                Out::Frame(Frame::Msg(Message::Resize { rows, cols }))
            }
            Control::CloseStdin => Out::CloseStdin,
            Control::Connect(reply) => {
                serve_connect(&dialer, reply);
                continue;
            }
        });
    }
    let mut setup_error: Option<String> = None;
    let mut kill_deadline: Option<tokio::time::Instant> = None;
    let start_deadline = tokio::time::Instant::now() + start_timeout;
    let mut ctl_open = true;
    let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
    let mut reported = false;
    let (code, oom) = loop {
        let deadline = kill_deadline.unwrap_or(far);
        tokio::select! {
            m = msgs.recv() => match m {
                Some(Message::Started { pid }) => {
                    if started.is_some() {
                        // A guest number: logged, never used on the host.
                        tracing::debug!(sandbox = %sandbox_name(&sandbox), "process started (guest pid {pid})");
                        report(&mut started, Ok(()));
                    }
                }
                Some(Message::Error { message, exit_code }) => {
                    let message = guest::text(&message);
                    log.info(&format!("agent: {message} (exit code {exit_code:?})"));
                    if started.is_some() {
                        setup_error = Some(message);
                    }
                }
                Some(Message::Exited(st)) => {
                    reported = true;
                    break (guest::exit_code(&st), st.oom);
                }
                Some(other) => log.info(&format!(
                    "ignoring {}",
                    guest::describe(&Frame::Msg(other))
                )),
                None => {
                    if let Some(sandbox) = sandbox.as_deref_mut() {
                        let why = tokio::time::timeout(Duration::from_secs(3), sandbox.vmm_exited())
                            .await
                            .unwrap_or_else(|_| "the agent connection closed".into());
                        vm_died = Some(why);
                        if let Some(exit) = host_oom(sandbox) {
                            break exit;
                        }
                    } else {
                        log.info("the agent connection of a process closed without an exit");
                    }
                    break (if kill_deadline.is_some() { 128 + libc::SIGKILL } else { 255 }, false);
                }
            },
            c = ctl.recv(), if ctl_open => match c {
                Some(Control::Signal(signal)) => {
                    if signal == libc::SIGKILL && kill_deadline.is_none() {
                        kill_deadline = Some(tokio::time::Instant::now() + KILL_GRACE);
                    }
                    let _ = out.send(Out::Frame(Frame::Msg(Message::Signal { signal })));
                }
                Some(Control::Resize { rows, cols }) => {
                    let _ = out.send(Out::Frame(Frame::Msg(Message::Resize { rows, cols })));
                }
                Some(Control::CloseStdin) => {
                    let _ = out.send(Out::CloseStdin);
                }
                Some(Control::Connect(reply)) => serve_connect(&dialer, reply),
                // Every handle is gone: only the process or the VM can end this now.
                None => ctl_open = false,
            },
            st = vmm_exited(&sandbox) => {
                vm_died = Some(format!("QEMU {st}"));
                if let Some(exit) = sandbox.as_deref().and_then(host_oom) {
                    break exit;
                }
                break (if kill_deadline.is_some() { 128 + libc::SIGKILL } else { 255 }, false);
            }
            () = tokio::time::sleep_until(deadline), if kill_deadline.is_some() => {
                match sandbox.as_deref_mut() {
                    Some(sandbox) => {
                        tracing::warn!("no exit {KILL_GRACE:?} after SIGKILL: killing the VM");
                        sandbox.kill();
                        kill_deadline = Some(far);
                    }
                    // Closing an exec process's connection makes the agent kill it.
                    None => break (128 + libc::SIGKILL, false),
                }
            }
            () = tokio::time::sleep_until(start_deadline), if started.is_some() => {
                let why = format!(
                    "the agent did not confirm the start within {} s",
                    start_timeout.as_secs()
                );
                tracing::warn!(sandbox = %sandbox_name(&sandbox), "{why}");
                setup_error = Some(why);
                break (255, false);
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
    for t in [reader_task, writer_task] {
        t.abort();
        let _ = t.await;
    }
    Ending {
        code,
        oom,
        vm_died,
        reported,
    }
}

/// Opens an agent connection for `reply` in a task of its own: an agent that accepts and
/// never answers must not hold up the loop that asked (its process's kill and output).
fn serve_connect(dialer: &Option<Arc<dyn Dialer>>, reply: oneshot::Sender<Result<AgentConn>>) {
    match dialer {
        Some(d) => {
            let d = Arc::clone(d);
            tokio::spawn(async move {
                let _ = reply.send(guest::open(&*d, CONNECT_TIMEOUT).await);
            });
        }
        None => {
            let _ = reply.send(Err(Error::Invalid("not the init process".into())));
        }
    }
}

fn sandbox_name(sandbox: &Option<&mut Sandbox>) -> String {
    sandbox.as_deref().map(|s| s.id.clone()).unwrap_or_default()
}

/// Reads the agent's frames in a task of its own: writes stdio data to `stdout`/`stderr`
/// (a sink that went away drops the data, never the process) and hands control messages
/// over a channel, which closes at the end of the connection. `read_frame` is not
/// cancel-safe, so it must never sit in a `select!` itself.
fn spawn_reader(
    mut reader: ReadHalf<Box<dyn AgentIo>>,
    mut stdout: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    mut stderr: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    log: Arc<GuestLog>,
    acks: mpsc::UnboundedSender<Out>,
) -> (mpsc::Receiver<Message>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(16);
    let task = tokio::spawn(async move {
        let mut unacked = 0u64;
        loop {
            match tokio_io::read_frame(&mut reader).await {
                Ok(Some(Frame::Data(s, b))) => {
                    // Read off the connection: the agent may send more (its output window).
                    unacked += b.len() as u64;
                    if unacked >= agentvm_protocol::OUTPUT_WINDOW / 4 {
                        let bytes = std::mem::take(&mut unacked);
                        let _ = acks.send(Out::Frame(Frame::Msg(Message::Consumed { bytes })));
                    }
                    let sink = match s {
                        Stream::Stdout => stdout.as_mut(),
                        Stream::Stderr => stderr.as_mut(),
                        Stream::Stdin => None,
                    };
                    if let (Some(w), false) = (sink, b.is_empty()) {
                        let _ = w.write_all(&b).await;
                        let _ = w.flush().await;
                    }
                }
                Ok(Some(Frame::Msg(m))) => {
                    if tx.send(m).await.is_err() {
                        break;
                    }
                }
                Ok(Some(other)) => log.info(&format!("ignoring {}", guest::describe(&other))),
                Ok(None) => break,
                Err(e) => {
                    log.info(&format!(
                        "agent connection: {}",
                        guest::text(&e.to_string())
                    ));
                    break;
                }
            }
        }
    });
    (rx, task)
}

/// Writes to the agent in a task of its own: `first`, then the stdin chunks of `stdin` and the
/// frames the driver queues on `out` (those first), until `out` closes or a write fails.
fn spawn_writer(
    mut writer: WriteHalf<Box<dyn AgentIo>>,
    first: Frame,
    stdin: Option<mpsc::Receiver<Vec<u8>>>,
    mut out: mpsc::UnboundedReceiver<Out>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let sent = tokio_io::write_frame(&mut writer, &first).await;
        // The start request may carry secrets: not kept for the process's lifetime (their
        // buffers are zeroed as they drop).
        drop(first);
        if sent.is_err() {
            return;
        }
        let mut stdin_open = stdin.is_some();
        let mut stdin = stdin.unwrap_or_else(|| mpsc::channel(1).1);
        if !stdin_open {
            let eof = Frame::Data(Stream::Stdin, Vec::new());
            if tokio_io::write_frame(&mut writer, &eof).await.is_err() {
                return;
            }
        }
        loop {
            let frame = tokio::select! {
                biased;
                o = out.recv() => match o {
                    Some(Out::Frame(f)) => f,
                    Some(Out::CloseStdin) if stdin_open => {
                        stdin_open = false;
                        Frame::Data(Stream::Stdin, Vec::new())
                    }
                    Some(Out::CloseStdin) => continue,
                    None => break,
                },
                chunk = stdin.recv(), if stdin_open => {
                    let data = chunk.unwrap_or_default();
                    stdin_open = !data.is_empty();
                    Frame::Data(Stream::Stdin, data)
                }
            };
            if tokio_io::write_frame(&mut writer, &frame).await.is_err() {
                break;
            }
        }
    })
}
