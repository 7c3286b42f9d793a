//! The guest side of the host protocol: one connection, one process.
//!
//! Per connection: `Hello`, then `Start` (or `Shutdown`); the process is spawned, stdio is
//! relayed as `Data` frames, `Signal`/`Resize` are applied, and `Exited` is the last frame.
//! A connection that starts with `DnsRelay` instead carries DNS messages (see [`crate::dns`]),
//! one that starts with `Connect` a port-forwarded TCP connection (see [`crate::forward`]).
//! Every connection runs as its own task; all tasks share one thread (see the crate docs).

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentvm_protocol::tokio_io::{read_frame, write_frame};
use agentvm_protocol::{
    ExitStatus, Frame, Message, ProtocolError, RootfsSpec, SecretSpec, StartRequest, Stream,
    HOST_CID, MAX_DATA_CHUNK, OUTPUT_WINDOW, VERSION,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{sleep, Instant};

use crate::cgroup::Cgroup;
use crate::fdio::FdStream;
use crate::machine::{Guest, Machine};
use crate::process::plan::{MountNs, PidNs};
use crate::process::spawn::{open_pty, resize, SpawnError};
use crate::process::Plan;
use crate::reaper::Reaper;
use crate::vsock::Listener;
use crate::{boot, debug, dns, info, mounts, net, rootfs, secrets};

/// How long stdout/stderr may stay open after the process exited (an orphan holding them)
/// before `Exited` is reported anyway.
const OUTPUT_GRACE: Duration = Duration::from_millis(500);
/// How long the host gets to read the final frames of the init process before power-off.
const LINGER: Duration = Duration::from_secs(1);
/// How long the init's exit waits for the other processes' exits to be reported.
const DRAIN: Duration = Duration::from_secs(5);

/// State shared by all connections.
#[derive(Debug)]
pub struct Agent {
    /// Processes, the VM's end and the guest's setup ([`Guest`] in a VM).
    machine: Arc<dyn Machine>,
    /// The root filesystem the first `Start` mounted; later ones reuse it.
    rootfs: Mutex<Option<RootfsSpec>>,
    /// The highest capability number the kernel knows.
    last_cap: u8,
    /// Where processes are rooted.
    root: String,
    /// The root was prepared by someone else (tests): never mount.
    preset_root: bool,
    /// The port of DNS relays ([`dns::DNS_PORT`]; tests use another).
    dns_port: u16,
    /// The container's cgroup, which started processes join and `Update` limits; `None`
    /// keeps them in the agent's cgroup and refuses updates.
    cgroup: Option<Cgroup>,
    /// Processes other than the init being served: counted from their start request until
    /// their last frame (`Exited`) has gone out.
    others: tokio::sync::watch::Sender<usize>,
    /// The containers of a pod's VM beside the VM's own, by id.
    members: Mutex<HashMap<String, Arc<Member>>>,
    /// Shares mounted once for the roots of pod containers, by tag.
    shares: Mutex<HashSet<String>>,
    /// The env secrets of the VM's own container, from its init's start request: its exec
    /// processes get them too.
    secret_env: Mutex<Vec<SecretSpec>>,
    /// The pod's PID namespace, whose pid 1 is the sandbox's init (pause): the containers
    /// that share the pod's processes join it.
    pod_pid_ns: Mutex<Option<Arc<OwnedFd>>>,
    /// The mount namespace of the VM's own container, made by its init (whose root is the
    /// namespace's own, not a chroot: user namespaces work); its execs join it.
    container_mnt_ns: Mutex<Option<Arc<OwnedFd>>>,
}

/// A container of a pod's VM beside the VM's own (the pod sandbox's): its root, cgroup and
/// namespaces, which its exec processes join.
#[derive(Debug)]
struct Member {
    root: String,
    cgroup: Option<Cgroup>,
    /// The init's mount namespace, and its PID namespace when it has one of its own; none
    /// once the init is gone before they could be opened.
    mnt_ns: Option<OwnedFd>,
    pid_ns: Option<OwnedFd>,
    /// Exec processes being served: the init's end waits for their exits to go out.
    others: tokio::sync::watch::Sender<usize>,
    /// The container's env secrets, which its exec processes get too.
    secret_env: Vec<SecretSpec>,
}

/// Counts one process other than the init while it is served ([`Agent::others`]).
struct Other<'a>(&'a tokio::sync::watch::Sender<usize>);

impl<'a> Other<'a> {
    fn enter(count: &'a tokio::sync::watch::Sender<usize>) -> Self {
        count.send_modify(|n| *n += 1);
        Other(count)
    }
}

impl Drop for Other<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Agent {
    pub fn new(reaper: Arc<Reaper>, last_cap: u8) -> Self {
        Self::on(Arc::new(Guest { reaper }), last_cap)
    }

    /// An agent on `machine` (a simulated one runs the server on a host: `sim`).
    pub fn on(machine: Arc<dyn Machine>, last_cap: u8) -> Self {
        Self {
            machine,
            rootfs: Mutex::new(None),
            last_cap,
            root: rootfs::ROOT.to_string(),
            preset_root: false,
            dns_port: dns::DNS_PORT,
            cgroup: None,
            others: tokio::sync::watch::Sender::new(0),
            members: Mutex::new(HashMap::new()),
            shares: Mutex::new(HashSet::new()),
            secret_env: Mutex::new(Vec::new()),
            pod_pid_ns: Mutex::new(None),
            container_mnt_ns: Mutex::new(None),
        }
    }

    /// The same agent with processes in `cgroup` ([`Cgroup::system`] in the guest).
    pub fn with_cgroup(self, cgroup: Option<Cgroup>) -> Self {
        Self { cgroup, ..self }
    }

    /// The same agent with DNS relays on `port`, so tests need not bind port 53.
    #[cfg(test)]
    fn with_dns_port(self, port: u16) -> Self {
        Self {
            dns_port: port,
            ..self
        }
    }

    /// An agent whose processes run in an existing directory tree `root`; `Start` requests
    /// mount nothing. For tests.
    pub fn with_root(reaper: Arc<Reaper>, last_cap: u8, root: &str) -> Self {
        Self::new(reaper, last_cap).rooted_at(root)
    }

    /// The same agent with processes in an existing directory tree `root`; `Start` requests
    /// mount nothing.
    pub fn rooted_at(self, root: &str) -> Self {
        Self {
            root: root.to_string(),
            preset_root: true,
            ..self
        }
    }

    fn ensure_rootfs(&self, spec: &RootfsSpec) -> Result<(), rootfs::RootfsError> {
        if self.preset_root {
            return Ok(());
        }
        let mut mounted = self.rootfs.lock().unwrap_or_else(|p| p.into_inner());
        match &*mounted {
            Some(m) if m == spec => {}
            Some(m) => debug!("keeping the first root filesystem {m:?}, not {spec:?}"),
            None => {
                rootfs::execute(&rootfs::plan(spec))?;
                info!("mounted container rootfs from {}", spec.device);
                // Best effort: a container without them only loses `modprobe` of built-ins.
                if let Some(rel) = rootfs::kernel_release() {
                    let ops = rootfs::modules_ops(
                        &rel,
                        std::path::Path::new("/"),
                        std::path::Path::new(rootfs::ROOT),
                    );
                    if let Err(e) = rootfs::execute(&ops) {
                        debug!("lib/modules not shown in the container: {e}");
                    }
                }
                *mounted = Some(spec.clone());
            }
        }
        Ok(())
    }
}

impl Agent {
    /// Finishes the container root once the init's mounts are made ([`rootfs::seal`]).
    fn seal_rootfs(&self, spec: &RootfsSpec) -> Result<(), rootfs::RootfsError> {
        if self.preset_root {
            return Ok(());
        }
        rootfs::execute(&rootfs::seal(spec))
    }
}

/// What to do once a connection is over.
#[derive(Debug, PartialEq, Eq)]
enum After {
    Close,
    /// The init process is done: let the host read, then power off.
    LingerThenPowerOff,
    PowerOffNow(&'static str),
}

/// Accepts connections forever; returns only if accepting keeps failing.
pub async fn serve(listener: Listener, agent: Arc<Agent>) -> std::io::Error {
    let mut failures = 0u32;
    loop {
        match listener.accept().await {
            Ok((stream, cid)) if cid == HOST_CID => {
                failures = 0;
                debug!("connection from the host");
                tokio::spawn(connection(Arc::clone(&agent), stream));
            }
            Ok((stream, cid)) => {
                drop(stream);
                info!("rejected a connection from cid {cid}: only the host (cid {HOST_CID}) may connect");
            }
            Err(e) => {
                failures += 1;
                info!("accept: {e}");
                if failures >= 100 {
                    return e;
                }
                sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The cgroup of pod container `container`, or the error to answer: no such container, or
/// one without a cgroup of its own (then `consequence` says what that means).
fn member_cgroup(
    agent: &Agent,
    container: &str,
    consequence: &str,
) -> Result<crate::cgroup::Cgroup, String> {
    let member = lock(&agent.members).get(container).cloned();
    match member.as_ref().map(|m| &m.cgroup) {
        None => Err(format!("no container {container} runs in this VM")),
        Some(None) => Err(format!(
            "container {container} has no cgroup of its own (see the VM's console log); \
             {consequence}"
        )),
        Some(Some(cg)) => Ok(cg.clone()),
    }
}

fn msg(m: Message) -> Frame {
    Frame::Msg(m)
}

fn error(message: impl Into<String>, exit_code: Option<i32>) -> Frame {
    msg(Message::Error {
        message: message.into(),
        exit_code,
    })
}

/// Serves one host connection to its end. Powers the VM off when the protocol says so.
pub async fn connection(agent: Arc<Agent>, stream: FdStream) {
    let uptime_ms = boot::uptime_ms();
    let (out, out_rx) = mpsc::channel::<Frame>(64);
    let writer = tokio::spawn(write_frames(stream.clone(), out_rx));
    let (mut host, reader) = read_frames(stream);
    let _ = out
        .send(msg(Message::Hello {
            version: VERSION,
            uptime_ms,
        }))
        .await;

    let mut other = None;
    let after = match host.recv().await {
        Some(Ok(Frame::Msg(Message::Start(req)))) => {
            if !req.init {
                other = Some(Other::enter(&agent.others));
            }
            run(&agent, *req, &out, &mut host).await
        }
        Some(Ok(Frame::Msg(Message::DnsRelay { address }))) => {
            dns_relay(&agent, &address, &out, &mut host).await
        }
        Some(Ok(Frame::Msg(Message::Shutdown))) => {
            After::PowerOffNow("shutdown requested by the host")
        }
        Some(Ok(Frame::Msg(Message::Connect { port }))) => {
            crate::forward::serve(port, &out, &mut host).await;
            After::Close
        }
        Some(Ok(Frame::Msg(Message::ForgetCaches))) => {
            // 2: dentries and inodes; file data of inodes still in use stays cached.
            if let Err(e) = std::fs::write("/proc/sys/vm/drop_caches", "2") {
                info!("drop caches: {e}");
            }
            let _ = out.send(msg(Message::Ready)).await;
            After::Close
        }
        Some(Ok(Frame::Msg(Message::Stats))) => {
            let mut stats = crate::stats::collect();
            if let Some(cg) = &agent.cgroup {
                cg.limit_stats(&mut stats);
            }
            let _ = out.send(msg(Message::StatsReply(stats))).await;
            After::Close
        }
        Some(Ok(Frame::Msg(Message::MemberStats { container }))) => {
            let reply = match member_cgroup(&agent, &container, "it has no figures of its own") {
                Ok(cg) => msg(Message::StatsReply(cg.usage())),
                Err(e) => error(e, None),
            };
            let _ = out.send(reply).await;
            After::Close
        }
        Some(Ok(Frame::Msg(Message::FreezeContainer { container, frozen }))) => {
            let reply = match member_cgroup(&agent, &container, "it cannot be paused") {
                Err(e) => error(e, None),
                Ok(cg) => {
                    let done = tokio::task::spawn_blocking(move || {
                        cg.freeze(frozen, std::time::Duration::from_secs(10))
                    })
                    .await;
                    match done {
                        Ok(Ok(())) => msg(Message::Ready),
                        Ok(Err(e)) => {
                            info!("freeze {container} ({frozen}): {e}");
                            error(e.to_string(), None)
                        }
                        Err(e) => error(format!("freeze {container}: {e}"), None),
                    }
                }
            };
            let _ = out.send(reply).await;
            After::Close
        }
        Some(Ok(Frame::Msg(Message::UpdateContainer { container, limits }))) => {
            let cgroup = member_cgroup(&agent, &container, "its limits cannot be changed");
            let reply = match cgroup {
                Err(e) => error(e, None),
                Ok(cg) => match cg.apply(&limits) {
                    Ok(skipped) => msg(Message::Updated { skipped }),
                    Err(e) => {
                        info!("update {container} {limits:?}: {e}");
                        error(e.to_string(), None)
                    }
                },
            };
            let _ = out.send(reply).await;
            After::Close
        }
        Some(Ok(Frame::Msg(Message::Update(limits)))) => {
            let reply = match &agent.cgroup {
                None => error(
                    "the guest has no cgroup for the container's processes (see the VM's \
                     console log); limits cannot be changed",
                    None,
                ),
                Some(cg) => match cg.apply(&limits) {
                    Ok(skipped) => {
                        debug!("limits applied: {limits:?}, skipped {skipped:?}");
                        msg(Message::Updated { skipped })
                    }
                    Err(e) => {
                        info!("update {limits:?}: {e}");
                        error(e.to_string(), None)
                    }
                },
            };
            let _ = out.send(reply).await;
            After::Close
        }
        Some(Ok(other)) => {
            let _ = out
                .send(error(
                    format!("expected start, got {}", describe(&other)),
                    None,
                ))
                .await;
            After::Close
        }
        Some(Err(e)) => {
            info!("malformed frame from the host: {e}");
            let _ = out.send(error(format!("malformed frame: {e}"), None)).await;
            After::Close
        }
        None => After::Close,
    };
    if let After::PowerOffNow(reason) = after {
        agent.machine.power_off(reason);
    }
    // Everything queued goes out, flushed, before the connection closes.
    drop(out);
    let _ = writer.await;
    drop(other);
    if after == After::LingerThenPowerOff {
        // The host closes the connection once it has read `Exited`.
        let _ = tokio::time::timeout(LINGER, async {
            while let Some(Ok(_)) = host.recv().await {}
        })
        .await;
        reader.abort();
        agent
            .machine
            .power_off("the container's init process exited");
    }
    reader.abort();
}

/// Serves a DNS relay connection: `Ready` once the UDP socket is bound, then DNS frames
/// until the host closes the connection.
async fn dns_relay(
    agent: &Agent,
    address: &str,
    out: &mpsc::Sender<Frame>,
    host: &mut HostFrames,
) -> After {
    let socket = match dns::bind(address, agent.dns_port).await {
        Ok(s) => s,
        Err(e) => {
            info!("{e}");
            let _ = out.send(error(e, None)).await;
            return After::Close;
        }
    };
    debug!("DNS relay on {address}:{}", agent.dns_port);
    let _ = out.send(msg(Message::Ready)).await;
    match dns::relay(socket, out, host).await {
        dns::RelayEnd::HostGone => {
            debug!("DNS relay on {address} ended");
            After::Close
        }
        dns::RelayEnd::Shutdown => After::PowerOffNow("shutdown requested by the host"),
    }
}

fn describe(f: &Frame) -> String {
    match f {
        Frame::Msg(m) => format!("{m:?}")
            .split([' ', '(', '{'])
            .next()
            .unwrap_or("")
            .to_string(),
        Frame::Data(s, _) => format!("{s:?} data"),
        Frame::Dns(_) => "DNS data".into(),
    }
}

async fn write_frames(mut stream: FdStream, mut rx: mpsc::Receiver<Frame>) {
    while let Some(f) = rx.recv().await {
        if let Err(e) = write_frame(&mut stream, &f).await {
            debug!("write to host: {e}");
            break;
        }
    }
}

type HostFrames = mpsc::Receiver<Result<Frame, ProtocolError>>;

/// Reads host frames in a task of its own (`read_frame` is not cancel-safe, a channel is).
/// The channel closes at end of stream; an error is delivered, then the channel closes.
fn read_frames(mut stream: FdStream) -> (HostFrames, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(16);
    let task = tokio::spawn(async move {
        loop {
            match read_frame(&mut stream).await {
                Ok(Some(f)) => {
                    if tx.send(Ok(f)).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    break;
                }
            }
        }
    });
    (rx, task)
}

/// The output of a process connection sent and not yet confirmed read by the host
/// ([`OUTPUT_WINDOW`]).
#[derive(Debug, Default)]
struct Window {
    unacked: std::sync::Mutex<u64>,
    freed: tokio::sync::Notify,
}

/// The most one output frame carries: a quarter of the window, so output keeps flowing while
/// the host's confirmations come back.
const OUTPUT_CHUNK: usize = (OUTPUT_WINDOW / 4) as usize;

impl Window {
    /// Waits until `n` more bytes fit in the window (always when nothing is in flight).
    async fn take(&self, n: u64) {
        loop {
            let freed = self.freed.notified();
            {
                let mut unacked = lock(&self.unacked);
                if *unacked == 0 || *unacked + n <= OUTPUT_WINDOW {
                    *unacked += n;
                    return;
                }
            }
            freed.await;
        }
    }

    /// The host has read `n` bytes.
    fn give(&self, n: u64) {
        let mut unacked = lock(&self.unacked);
        *unacked = unacked.saturating_sub(n);
        drop(unacked);
        self.freed.notify_waiters();
    }
}

async fn pump_output(
    mut src: FdStream,
    stream: Stream,
    out: mpsc::Sender<Frame>,
    window: Arc<Window>,
) {
    let mut buf = vec![0u8; OUTPUT_CHUNK.min(MAX_DATA_CHUNK)];
    loop {
        match src.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                window.take(n as u64).await;
                if out
                    .send(Frame::Data(stream, buf[..n].to_vec()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => {
                debug!("read {stream:?}: {e}");
                break;
            }
        }
    }
    let _ = out.send(Frame::Data(stream, Vec::new())).await;
}

async fn pump_stdin(mut dst: FdStream, mut rx: mpsc::Receiver<Vec<u8>>) {
    while let Some(chunk) = rx.recv().await {
        if let Err(e) = dst.write_all(&chunk).await {
            debug!("write stdin: {e}");
            break;
        }
    }
    // Dropping `dst` closes the child's stdin (pipe mode).
}

async fn run(
    agent: &Agent,
    req: StartRequest,
    out: &mpsc::Sender<Frame>,
    host: &mut HostFrames,
) -> After {
    if let Some(member) = req.container.clone() {
        return if member.create {
            run_member(agent, req, &member, out, host).await
        } else {
            exec_in_member(agent, req, &member.id, out, host).await
        };
    }
    let failed = if req.init {
        After::LingerThenPowerOff
    } else {
        After::Close
    };
    if let Err(e) = agent.ensure_rootfs(&req.rootfs) {
        info!("{e}");
        let _ = out.send(error(e.to_string(), None)).await;
        return failed;
    }
    if let Some(name) = req.hostname.as_ref().filter(|_| agent.machine.owns_guest()) {
        if let Err(e) = boot::set_hostname(name) {
            let _ = out.send(error(e.to_string(), None)).await;
            return failed;
        }
    }
    if req.init && !agent.machine.owns_guest() {
        debug!("simulated machine: the guest's network, sysctls and mounts are not set up");
        *lock(&agent.secret_env) = secrets::env_only(&req.secrets);
    } else if req.init {
        if let Some(network) = &req.network {
            if let Err(e) = net::configure(network) {
                info!("{e}");
                let _ = out.send(error(e.to_string(), None)).await;
                return failed;
            }
            debug!("network configured: {network:?}");
        }
        // After the network: per-interface parameters need their interface. The guest kernel
        // may lack a parameter a runtime on the host would have: the VM is the boundary, so a
        // missing one is reported, not fatal.
        for e in crate::sysctl::apply(&req.sysctls) {
            info!("{e}");
        }
        if let Err(e) = mounts::apply(&req.mounts, &agent.root) {
            info!("{e}");
            let _ = out.send(error(e.to_string(), None)).await;
            return failed;
        }
        // Last, so no mount of the spec covers them; before the root turns read-only.
        if !agent.preset_root {
            let user = &req.process.user;
            if let Err(e) =
                secrets::install(&req.secrets, &agent.root, mounts::FILES, user.uid, user.gid)
            {
                info!("{e}");
                let _ = out.send(error(e.to_string(), None)).await;
                return failed;
            }
        }
        *lock(&agent.secret_env) = secrets::env_only(&req.secrets);
        // Every mount point exists now: a read-only root turns read-only.
        if let Err(e) = agent.seal_rootfs(&req.rootfs) {
            info!("{e}");
            let _ = out.send(error(e.to_string(), None)).await;
            return failed;
        }
    } else if req.network.is_some() || !req.mounts.is_empty() || !req.sysctls.is_empty() {
        debug!("ignoring the network and mounts of a process that is not the init process");
    }
    let pod_pid_ns = req.init && req.pid_namespace;
    let secret_env = lock(&agent.secret_env).clone();
    let process = secrets::with_env(&req.process, &secret_env);
    let planned = Plan::new(&process, &agent.root, agent.last_cap);
    secrets::scrub(process);
    // The init makes the container's mount namespace (its root the namespace's own) and
    // masks and seals its paths there; later processes join it.
    let container_ns = if req.init || agent.preset_root {
        None
    } else {
        lock(&agent.container_mnt_ns).clone()
    };
    let planned = planned.and_then(|mut p| {
        if req.init && !agent.preset_root {
            p.mount_ns = MountNs::New;
            p.confine_paths(&req.readonly_paths, &req.masked_paths)?;
        }
        if let Some(ns) = &container_ns {
            p.mount_ns = MountNs::Join(ns.as_raw_fd());
        }
        Ok(p)
    });
    if !req.init && !agent.preset_root && container_ns.is_none() {
        // Its init's masked and read-only paths live in that namespace only.
        let _ = out
            .send(error(
                "the container's mount namespace is not known (its init did not start, or \
                 the agent could not open it; see the VM's console log)",
                None,
            ))
            .await;
        return failed;
    }
    let plan = match planned {
        Ok(mut p) => {
            p.cgroup_procs = agent.cgroup.as_ref().and_then(Cgroup::procs_path);
            if pod_pid_ns {
                // Its procfs stays the VM's: pause reads none.
                p.pid_ns = PidNs::New;
            }
            Arc::new(p)
        }
        Err(e) => {
            let _ = out
                .send(error(format!("invalid process spec: {e}"), None))
                .await;
            return failed;
        }
    };
    let keep_mnt_ns = req.init && !agent.preset_root;
    let mut keep_pid_ns = |pid: i32| {
        if pod_pid_ns {
            *lock(&agent.pod_pid_ns) = open_ns(pid, "pid").map(Arc::new);
        }
        if keep_mnt_ns {
            *lock(&agent.container_mnt_ns) = open_ns(pid, "mnt").map(Arc::new);
        }
    };
    let (pid, supervised) = match start_and_supervise(
        agent,
        plan,
        &req.process,
        &agent.root,
        out,
        host,
        &mut keep_pid_ns,
    )
    .await
    {
        Some(r) => r,
        None => return failed,
    };
    match supervised {
        Supervised::Exited(status) => {
            if req.init {
                end_the_others(agent).await;
            }
            debug!("pid {pid} exited: {status:?}");
            let _ = out.send(msg(Message::Exited(status))).await;
            if req.init {
                After::LingerThenPowerOff
            } else {
                After::Close
            }
        }
        Supervised::HostGone => {
            if req.init {
                After::PowerOffNow("the host connection of the init process closed")
            } else {
                After::Close
            }
        }
        Supervised::Shutdown => After::PowerOffNow("shutdown requested by the host"),
    }
}

/// Spawns the planned process (with a terminal under `root` if asked), reports `Started`
/// and serves it to its end. `None`: it did not start, and the failure (with `Exited` where
/// a runc user would see an exit code) has been reported.
async fn start_and_supervise(
    agent: &Agent,
    plan: Arc<Plan>,
    process: &agentvm_protocol::ProcessSpec,
    root: &str,
    out: &mpsc::Sender<Frame>,
    host: &mut HostFrames,
    on_spawned: &mut (dyn FnMut(i32) + Send),
) -> Option<(i32, Supervised)> {
    let pty = if process.terminal {
        match open_pty(
            &format!("{}/dev/pts/ptmx", root.trim_end_matches('/')),
            process.console_size,
        ) {
            Ok(p) => Some(p),
            Err(e) => {
                let _ = out.send(error(e.to_string(), None)).await;
                return None;
            }
        }
    } else {
        None
    };
    // No `.await` between the spawn and the registration (see `reaper`).
    let (spawned, exit_rx) = match agent.machine.spawn(plan, process, pty) {
        Ok(s) => s,
        Err(SpawnError::Setup { message, exit_code }) => {
            info!("start {:?} failed: {message}", process.args);
            let _ = out.send(error(message, Some(exit_code))).await;
            let _ = out
                .send(msg(Message::Exited(ExitStatus::exited(exit_code))))
                .await;
            return None;
        }
        Err(e) => {
            info!("start {:?} failed: {e}", process.args);
            let _ = out.send(error(e.to_string(), None)).await;
            return None;
        }
    };
    let pid = spawned.pid;
    debug!("started pid {pid}: {:?}", process.args);
    on_spawned(pid);
    let _ = out.send(msg(Message::Started { pid })).await;
    let supervised = match supervise(spawned, exit_rx, out, host).await {
        Supervised::Exited(mut status) => {
            // A SIGKILL the kernel log attributes to the OOM killer: the memory limit.
            status.oom = status.signal == Some(libc::SIGKILL) && agent.machine.oom_killed(pid);
            Supervised::Exited(status)
        }
        other => other,
    };
    Some((pid, supervised))
}

/// A pod container's id: a path component of the agent's own directories and of a cgroup.
fn valid_member_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Opens `/proc/<pid>/ns/<kind>` (the namespace stays alive while the descriptor is open).
fn open_ns(pid: i32, kind: &str) -> Option<OwnedFd> {
    std::fs::File::open(format!("/proc/{pid}/ns/{kind}"))
        .map(OwnedFd::from)
        .map_err(|e| info!("open the {kind} namespace of pid {pid}: {e}"))
        .ok()
}

/// Mounts a pod container's root, mounts and cgroup; its init gets a mount namespace of its
/// own (and a PID namespace if asked). Returns the member and the plan of its init.
fn create_member(
    agent: &Agent,
    req: &StartRequest,
    pc: &agentvm_protocol::PodContainer,
) -> Result<(Member, Plan), String> {
    let id = &pc.id;
    let base = format!("{}/{id}", rootfs::PODS);
    // shareProcessNamespace: the pod's namespace, whose pid 1 is pause (none when the
    // sandbox predates it: the VM's, as before).
    let pod_pid_ns = if pc.own_pid_namespace {
        None
    } else {
        lock(&agent.pod_pid_ns).clone()
    };
    let root = if agent.preset_root {
        agent.root.clone()
    } else {
        format!("{base}/root")
    };
    if !agent.preset_root {
        let tag = req.rootfs.device.clone();
        let share_dir = format!("{}/{tag}", rootfs::SHARES);
        let mounted = lock(&agent.shares).contains(&tag);
        let ops = rootfs::pod_plan(
            &req.rootfs,
            &root,
            &share_dir,
            mounted,
            !pc.own_pid_namespace && pod_pid_ns.is_none(),
        )
        .map_err(|e| e.to_string())?;
        rootfs::execute(&ops).map_err(|e| e.to_string())?;
        lock(&agent.shares).insert(tag);
        let files = format!("{base}/files");
        mounts::apply_with_files(&req.mounts, &root, &files).map_err(|e| e.to_string())?;
        let user = &req.process.user;
        secrets::install(&req.secrets, &root, &files, user.uid, user.gid)
            .map_err(|e| e.to_string())?;
        if pc.readonly_root {
            rootfs::execute(&[rootfs::Op::RemountReadonly {
                target: root.clone(),
            }])
            .map_err(|e| e.to_string())?;
        }
    }
    let cgroup = agent
        .cgroup
        .as_ref()
        .and_then(|c| match c.sibling(&format!("pod-{id}")) {
            Ok(cg) => Some(cg),
            Err(e) => {
                info!("{e}; container {id} runs in the VM's cgroup");
                None
            }
        });
    if let Some(limits) = &pc.limits {
        match &cgroup {
            // A limit the guest cannot set fails the container, as runc fails its create.
            Some(cg) => {
                let skipped = cg.apply(limits).map_err(|e| e.to_string())?;
                if !skipped.is_empty() {
                    debug!("container {id}: no {skipped:?} in the guest");
                }
            }
            None => info!("container {id} has no cgroup: its limits {limits:?} are not applied"),
        }
    }
    let secret_env = secrets::env_only(&req.secrets);
    let process = secrets::with_env(&req.process, &secret_env);
    let planned = Plan::new(&process, &root, agent.last_cap);
    secrets::scrub(process);
    let mut plan = planned.map_err(|e| format!("invalid process spec: {e}"))?;
    plan.cgroup_procs = cgroup.as_ref().and_then(Cgroup::procs_path);
    if !agent.preset_root {
        plan.mount_ns = MountNs::New;
        // In the container's own mount namespace, after its procfs: its execs join it.
        plan.confine_paths(&req.readonly_paths, &req.masked_paths)
            .map_err(|e| format!("invalid process spec: {e}"))?;
    }
    if pc.own_pid_namespace {
        plan.pid_ns = PidNs::New;
    } else if let Some(fd) = &pod_pid_ns {
        plan.pid_ns = PidNs::Join(fd.as_raw_fd());
    }
    if plan.pid_ns != PidNs::Agent && !agent.preset_root {
        plan.proc_mount = std::ffi::CString::new(format!("{root}/proc")).ok();
    }
    let member = Member {
        root,
        cgroup,
        mnt_ns: None,
        pid_ns: None,
        others: tokio::sync::watch::Sender::new(0),
        secret_env,
    };
    Ok((member, plan))
}

/// Undoes [`create_member`]: the root's mounts (lazily: a process of the container may still
/// be exiting), the copied files and the cgroup.
async fn remove_member(agent: &Agent, id: &str, member: &Member) {
    if !agent.preset_root {
        if let Err(e) = nix::mount::umount2(member.root.as_str(), nix::mount::MntFlags::MNT_DETACH)
        {
            info!("unmount the root of container {id}: {e}");
        }
        let _ = std::fs::remove_dir_all(format!("{}/{id}", rootfs::PODS));
    }
    if let Some(cg) = &member.cgroup {
        // Its last processes may still be on their way out.
        for _ in 0..50 {
            if cg.remove().is_ok() {
                break;
            }
            sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The init of a pod container: creates the container, runs the process, and when it exits
/// ends the container's other processes (reporting their exits first), then removes the
/// container. The VM keeps running.
async fn run_member(
    agent: &Agent,
    req: StartRequest,
    pc: &agentvm_protocol::PodContainer,
    out: &mpsc::Sender<Frame>,
    host: &mut HostFrames,
) -> After {
    let id = pc.id.clone();
    let fail = |m: String| error(format!("container {id}: {m}"), None);
    if !valid_member_id(&id) {
        let _ = out.send(fail("invalid container id".into())).await;
        return After::Close;
    }
    if lock(&agent.members).contains_key(&id) {
        let _ = out.send(fail("exists already in this VM".into())).await;
        return After::Close;
    }
    let (member, plan) = match create_member(agent, &req, pc) {
        Ok(m) => m,
        Err(e) => {
            info!("create container {id}: {e}");
            let _ = out.send(fail(e)).await;
            // What was mounted before the failure goes.
            let partial = Member {
                root: format!("{}/{id}/root", rootfs::PODS),
                cgroup: None,
                mnt_ns: None,
                pid_ns: None,
                others: tokio::sync::watch::Sender::new(0),
                secret_env: Vec::new(),
            };
            remove_member(agent, &id, &partial).await;
            return After::Close;
        }
    };
    let root = member.root.clone();
    let own_pid = plan.pid_ns != PidNs::Agent;
    let plan = Arc::new(plan);
    // Registered once the init runs, with its namespaces (opened right after the spawn,
    // before `Started` goes out, so an exec the host sends after it finds them).
    let preset = agent.preset_root;
    let mut registered = |pid: i32| {
        let m = Member {
            root: member.root.clone(),
            cgroup: member.cgroup.clone(),
            mnt_ns: if preset { None } else { open_ns(pid, "mnt") },
            // Its own PID namespace, or the pod's it joined: its execs join the same.
            pid_ns: if own_pid { open_ns(pid, "pid") } else { None },
            others: member.others.clone(),
            secret_env: member.secret_env.clone(),
        };
        lock(&agent.members).insert(id.clone(), Arc::new(m));
    };
    let outcome =
        start_and_supervise(agent, plan, &req.process, &root, out, host, &mut registered).await;
    let status = match outcome {
        None => None,
        Some((_, Supervised::Exited(mut status))) => {
            // Any OOM kill in the container's cgroup (its memory limit), of the init or of
            // another of its processes: runc's shim publishes the cgroup's OOM event, and the
            // CRI marks the container OOMKilled on it.
            status.oom |= member.cgroup.as_ref().is_some_and(|cg| cg.oom_kills() > 0);
            Some(status)
        }
        Some((pid, _)) => {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            None
        }
    };
    // As the end of a PID namespace under runc: the container's other processes go, and
    // their exits are reported before the init's.
    if let Some(cg) = &member.cgroup {
        if let Err(e) = cg.kill_all() {
            info!("kill the processes of container {id}: {e}");
        }
    }
    let mut count = member.others.subscribe();
    if tokio::time::timeout(DRAIN, count.wait_for(|n| *n == 0))
        .await
        .is_err()
    {
        info!("exec processes of container {id} still served {DRAIN:?} after its init exited");
    }
    lock(&agent.members).remove(&id);
    remove_member(agent, &id, &member).await;
    if let Some(status) = status {
        debug!("container {id} exited: {status:?}");
        let _ = out.send(msg(Message::Exited(status))).await;
    }
    After::Close
}

/// An exec process in pod container `id`: its root, cgroup, mount and PID namespaces.
async fn exec_in_member(
    agent: &Agent,
    req: StartRequest,
    id: &str,
    out: &mpsc::Sender<Frame>,
    host: &mut HostFrames,
) -> After {
    let Some(member) = lock(&agent.members).get(id).cloned() else {
        let _ = out
            .send(error(format!("no container {id} runs in this VM"), None))
            .await;
        return After::Close;
    };
    // A process joining a frozen cgroup would freeze before its exec, and the spawn (which
    // waits for the exec) with it.
    if member.cgroup.as_ref().is_some_and(Cgroup::is_frozen) {
        let _ = out
            .send(error(
                format!("cannot exec in a paused container: resume {id} first"),
                None,
            ))
            .await;
        return After::Close;
    }
    let _served = Other::enter(&member.others);
    let process = secrets::with_env(&req.process, &member.secret_env);
    let planned = Plan::new(&process, &member.root, agent.last_cap);
    secrets::scrub(process);
    let mut plan = match planned {
        Ok(p) => p,
        Err(e) => {
            let _ = out
                .send(error(format!("invalid process spec: {e}"), None))
                .await;
            return After::Close;
        }
    };
    plan.cgroup_procs = member.cgroup.as_ref().and_then(Cgroup::procs_path);
    if !agent.preset_root {
        match &member.mnt_ns {
            Some(fd) => plan.mount_ns = MountNs::Join(fd.as_raw_fd()),
            None => {
                let _ = out
                    .send(error(format!("container {id} is not running"), None))
                    .await;
                return After::Close;
            }
        }
    }
    if let Some(fd) = &member.pid_ns {
        plan.pid_ns = PidNs::Join(fd.as_raw_fd());
    }
    let root = member.root.clone();
    match start_and_supervise(
        agent,
        Arc::new(plan),
        &req.process,
        &root,
        out,
        host,
        &mut |_| {},
    )
    .await
    {
        Some((pid, Supervised::Exited(status))) => {
            debug!("pid {pid} in container {id} exited: {status:?}");
            let _ = out.send(msg(Message::Exited(status))).await;
            After::Close
        }
        Some((_, Supervised::Shutdown)) => After::PowerOffNow("shutdown requested by the host"),
        _ => After::Close,
    }
}

/// The container's init exited. As when the kernel tears down a container's PID namespace
/// under runc, every other process of the container is killed, and their exits are reported
/// (an exec's client sees 137) before the init's; a VM powered off under them would end their
/// connections with no exit at all.
async fn end_the_others(agent: &Agent) {
    // The VM holds this one container: every process but the agent goes (else the
    // container's cgroup's).
    let killed = agent.machine.kill_all();
    if let Some(cg) = agent.cgroup.as_ref().filter(|_| !killed) {
        if let Err(e) = cg.kill_all() {
            info!("kill the container's processes: {e}");
        }
    }
    let mut count = agent.others.subscribe();
    if tokio::time::timeout(DRAIN, count.wait_for(|n| *n == 0))
        .await
        .is_err()
    {
        info!(
            "{} process(es) still served {DRAIN:?} after the init exited; reporting its exit",
            *count.borrow()
        );
    }
}

enum Supervised {
    Exited(ExitStatus),
    HostGone,
    Shutdown,
}

async fn supervise(
    spawned: crate::process::spawn::Spawned,
    mut exit_rx: tokio::sync::oneshot::Receiver<ExitStatus>,
    out: &mpsc::Sender<Frame>,
    host: &mut HostFrames,
) -> Supervised {
    let pid = spawned.pid;
    let mut outputs = JoinSet::new();
    let window = Arc::new(Window::default());
    // Dropped (so aborted) when the process is over, even if an orphan blocks its stdin.
    let mut stdin_writer = JoinSet::new();
    let mut stdin_tx = None;
    let mut master = None;
    let setup = (|| -> std::io::Result<()> {
        if let Some(m) = spawned.master {
            let m = FdStream::new(m)?;
            let (tx, rx) = mpsc::channel(16);
            stdin_writer.spawn(pump_stdin(m.clone(), rx));
            outputs.spawn(pump_output(
                m.clone(),
                Stream::Stdout,
                out.clone(),
                Arc::clone(&window),
            ));
            stdin_tx = Some(tx);
            master = Some(m);
        }
        if let Some(fd) = spawned.stdin {
            let (tx, rx) = mpsc::channel(16);
            stdin_writer.spawn(pump_stdin(FdStream::new(fd)?, rx));
            stdin_tx = Some(tx);
        }
        for (fd, stream) in [
            (spawned.stdout, Stream::Stdout),
            (spawned.stderr, Stream::Stderr),
        ] {
            if let Some(fd) = fd {
                outputs.spawn(pump_output(
                    FdStream::new(fd)?,
                    stream,
                    out.clone(),
                    Arc::clone(&window),
                ));
            }
        }
        Ok(())
    })();
    if let Err(e) = setup {
        // Without stdio the process cannot be served; it must not outlive its connection.
        info!("stdio for pid {pid}: {e}");
        let _ = out.send(error(format!("stdio: {e}"), None)).await;
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }

    let mut status: Option<ExitStatus> = None;
    let grace = sleep(Duration::from_secs(86400 * 365));
    tokio::pin!(grace);
    loop {
        if status.is_some() && outputs.is_empty() {
            break;
        }
        tokio::select! {
            r = &mut exit_rx, if status.is_none() => {
                status = Some(r.unwrap_or_else(|_| {
                    info!("lost the exit status of pid {pid}");
                    ExitStatus::exited(255)
                }));
                grace.as_mut().reset(Instant::now() + OUTPUT_GRACE);
            }
            Some(_) = outputs.join_next(), if !outputs.is_empty() => {}
            () = &mut grace, if status.is_some() => {
                debug!("stdio of pid {pid} still open {OUTPUT_GRACE:?} after exit; reporting the exit");
                break;
            }
            ev = host.recv() => {
                let running = status.is_none();
                let gone = || {
                    if running {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                    Supervised::HostGone
                };
                match ev {
                    None => return gone(),
                    Some(Err(e)) => {
                        info!("malformed frame from the host: {e}");
                        let _ = out.send(error(format!("malformed frame: {e}"), None)).await;
                        return gone();
                    }
                    Some(Ok(Frame::Data(Stream::Stdin, data))) => {
                        if data.is_empty() {
                            if master.is_none() {
                                stdin_tx = None;
                            }
                        } else if let Some(tx) = &stdin_tx {
                            if tx.send(data).await.is_err() {
                                stdin_tx = None;
                            }
                        }
                    }
                    Some(Ok(Frame::Data(s, _))) => debug!("ignoring {s:?} data from the host"),
                    Some(Ok(Frame::Dns(_))) => debug!("ignoring DNS data on a process connection"),
                    Some(Ok(Frame::Msg(m))) => match m {
                        Message::Signal { signal } => {
                            if running {
                                if let Err(e) = deliver(pid, signal) {
                                    let _ = out.send(error(e, None)).await;
                                }
                            }
                        }
                        Message::Resize { rows, cols } => {
                            if let Some(m) = &master {
                                if let Err(e) = resize(m.raw_fd(), rows, cols) {
                                    debug!("resize: {e}");
                                }
                            }
                        }
                        Message::Shutdown => return Supervised::Shutdown,
                        Message::Consumed { bytes } => {
                            window.give(bytes);
                            // The host is reading: output after the exit still has time.
                            if status.is_some() {
                                grace.as_mut().reset(Instant::now() + OUTPUT_GRACE);
                            }
                        }
                        other => {
                            let what = describe(&Frame::Msg(other));
                            let _ = out
                                .send(error(format!("unexpected {what} while a process runs"), None))
                                .await;
                        }
                    },
                }
            }
        }
    }
    // Output tasks still running belong to an orphan holding the pipes: stop them so that no
    // frame follows `Exited`.
    outputs.abort_all();
    Supervised::Exited(status.unwrap_or(ExitStatus::exited(255)))
}

fn deliver(pid: i32, signal: i32) -> Result<(), String> {
    let sig = Signal::try_from(signal).map_err(|_| format!("invalid signal {signal}"))?;
    kill(Pid::from_raw(pid), sig).map_err(|e| format!("kill pid {pid} with {sig}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentvm_protocol::{ProcessSpec, RootfsSpec};
    use std::os::unix::net::UnixStream;

    fn start_request(args: &[&str]) -> StartRequest {
        StartRequest {
            rootfs: RootfsSpec {
                device: "/dev/null".into(),
                fstype: "none".into(),
                overlay: false,
                options: None,
                layers: None,
                subdir: None,
            },
            process: ProcessSpec {
                args: args.iter().map(|s| s.to_string()).collect(),
                env: vec!["PATH=/usr/bin:/bin".into()],
                cwd: "/".into(),
                ..Default::default()
            },
            hostname: None,
            init: false,
            pid_namespace: false,
            network: None,
            mounts: Vec::new(),
            sysctls: Default::default(),
            container: None,
            secrets: Vec::new(),
            masked_paths: Vec::new(),
            readonly_paths: Vec::new(),
        }
    }

    struct Host {
        stream: FdStream,
        pid: Option<i32>,
    }

    impl Host {
        async fn send(&mut self, f: Frame) {
            write_frame(&mut self.stream, &f).await.unwrap();
        }

        async fn recv(&mut self) -> Option<Frame> {
            tokio::time::timeout(Duration::from_secs(10), read_frame(&mut self.stream))
                .await
                .expect("agent answered within 10 s")
                .unwrap()
        }

        /// All frames up to the end of the connection.
        async fn rest(&mut self) -> Vec<Frame> {
            let mut v = Vec::new();
            while let Some(f) = self.recv().await {
                if let Frame::Msg(Message::Started { pid }) = f {
                    self.pid = Some(pid);
                }
                v.push(f);
            }
            v
        }
    }

    /// A connection to `agent` over a socketpair, past the agent's Hello.
    async fn greeted(agent: &Arc<Agent>) -> Host {
        let (a, b) = UnixStream::pair().unwrap();
        tokio::spawn(connection(
            Arc::clone(agent),
            FdStream::new(a.into()).unwrap(),
        ));
        let mut host = Host {
            stream: FdStream::new(b.into()).unwrap(),
            pid: None,
        };
        let Some(Frame::Msg(Message::Hello { version, .. })) = host.recv().await else {
            panic!("no hello");
        };
        assert_eq!(version, VERSION);
        host
    }

    async fn connect(agent: &Arc<Agent>, req: StartRequest) -> Host {
        let mut host = greeted(agent).await;
        host.send(msg(Message::Start(Box::new(req)))).await;
        host
    }

    fn data(frames: &[Frame], s: Stream) -> Vec<u8> {
        frames
            .iter()
            .filter_map(|f| match f {
                Frame::Data(t, d) if *t == s => Some(d.as_slice()),
                _ => None,
            })
            .flatten()
            .copied()
            .collect()
    }

    fn eof_before_exit(frames: &[Frame], s: Stream) {
        let eof = frames
            .iter()
            .position(|f| matches!(f, Frame::Data(t, d) if *t == s && d.is_empty()))
            .unwrap_or_else(|| panic!("no {s:?} EOF in {frames:?}"));
        assert!(eof < frames.len() - 1);
    }

    fn exited(frames: &[Frame]) -> ExitStatus {
        match frames.last() {
            Some(Frame::Msg(Message::Exited(s))) => *s,
            other => panic!("last frame is not Exited: {other:?} in {frames:?}"),
        }
    }

    /// A UDP port on `ip` that is free right now.
    fn free_udp_port(ip: &str) -> u16 {
        std::net::UdpSocket::bind((ip, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn dns_query(id: u16, name: u8) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, name, 0, 0, 1, 0, 1]);
        q
    }

    async fn recv_reply(s: &tokio::net::UdpSocket, buf: &mut [u8]) -> usize {
        tokio::time::timeout(Duration::from_secs(5), s.recv(buf))
            .await
            .expect("reply within 5 s")
            .unwrap()
    }

    /// A pod container's stats are its own cgroup's figures; an unknown container or one
    /// without a cgroup is an error naming it.
    #[tokio::test(flavor = "current_thread")]
    async fn member_stats_are_the_containers_cgroup() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.subtree_control"), "").unwrap();
        let cg = crate::cgroup::Cgroup::prepare(root.path()).unwrap();
        for (f, v) in [
            (
                "cpu.stat",
                "usage_usec 4242\nuser_usec 4000\nsystem_usec 242\n",
            ),
            ("memory.current", "8192\n"),
            ("memory.max", "max\n"),
            ("pids.current", "3\n"),
        ] {
            std::fs::write(cg.dir().join(f), v).unwrap();
        }
        let agent = Arc::new(Agent::with_root(Arc::new(Reaper::default()), 40, "/"));
        for (name, cgroup) in [("c1", Some(cg)), ("c2", None)] {
            lock(&agent.members).insert(
                name.into(),
                Arc::new(Member {
                    root: "/".into(),
                    cgroup,
                    mnt_ns: None,
                    pid_ns: None,
                    others: tokio::sync::watch::channel(0).0,
                    secret_env: Vec::new(),
                }),
            );
        }
        let ask = |container: &str| {
            let agent = agent.clone();
            let container = container.to_string();
            async move {
                let mut h = greeted(&agent).await;
                h.send(msg(Message::MemberStats { container })).await;
                h.rest().await
            }
        };
        let f = ask("c1").await;
        let [Frame::Msg(Message::StatsReply(s))] = &f[..] else {
            panic!("{f:?}");
        };
        assert_eq!((s.cpu_usage_usec, s.memory_usage, s.pids), (4242, 8192, 3));
        assert_eq!(s.memory_limit, crate::stats::guest_memory());
        for (name, says) in [("c2", "no cgroup of its own"), ("c3", "no container c3")] {
            let f = ask(name).await;
            assert!(
                matches!(&f[..], [Frame::Msg(Message::Error { message, .. })] if message.contains(says)),
                "{name}: {f:?}"
            );
        }
    }

    /// A stats connection answers one StatsReply with live figures and closes.
    #[tokio::test(flavor = "current_thread")]
    async fn stats_session() {
        let agent = Arc::new(Agent::with_root(Arc::new(Reaper::default()), 40, "/"));
        let mut h = greeted(&agent).await;
        h.send(msg(Message::Stats)).await;
        let frames = h.rest().await;
        assert!(
            matches!(&frames[..], [Frame::Msg(Message::StatsReply(s))] if s.memory_limit > 0),
            "{frames:?}"
        );
    }

    /// A port-forward connection reaches a server on the guest's loopback: Ready, the bytes
    /// both ways, each direction's end; a port where nothing listens answers an error.
    #[tokio::test(flavor = "current_thread")]
    async fn port_forward_session() {
        let agent = Arc::new(Agent::with_root(Arc::new(Reaper::default()), 40, "/"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            s.write_all(&got.to_ascii_uppercase()).await.unwrap();
        });
        let mut h = greeted(&agent).await;
        h.send(msg(Message::Connect { port })).await;
        assert_eq!(h.recv().await, Some(msg(Message::Ready)));
        h.send(Frame::Data(Stream::Stdin, b"hello".to_vec())).await;
        h.send(Frame::Data(Stream::Stdin, Vec::new())).await;
        assert_eq!(
            h.rest().await,
            [
                Frame::Data(Stream::Stdout, b"HELLO".to_vec()),
                Frame::Data(Stream::Stdout, Vec::new())
            ]
        );
        server.await.unwrap();

        // Nothing listens on the port now.
        let mut h = greeted(&agent).await;
        h.send(msg(Message::Connect { port })).await;
        let frames = h.rest().await;
        assert!(
            matches!(&frames[..], [Frame::Msg(Message::Error { message, .. })]
                if message.contains(&format!("localhost:{port}"))),
            "{frames:?}"
        );
    }

    /// A forget-caches connection answers Ready and closes (dropping the kernel's cached
    /// directory entries, which only costs lookups).
    #[tokio::test(flavor = "current_thread")]
    async fn forget_caches_session() {
        let agent = Arc::new(Agent::with_root(Arc::new(Reaper::default()), 40, "/"));
        let mut h = greeted(&agent).await;
        h.send(msg(Message::ForgetCaches)).await;
        let frames = h.rest().await;
        assert!(
            matches!(&frames[..], [Frame::Msg(Message::Ready)]),
            "{frames:?}"
        );
    }

    /// An update connection writes the limits into the agent's cgroup and answers Updated,
    /// naming what the guest lacks; an agent without a cgroup answers an error.
    #[tokio::test(flavor = "current_thread")]
    async fn update_session() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("cgroup.subtree_control"), "").unwrap();
        let cg = Cgroup::prepare(t.path()).unwrap();
        std::fs::write(cg.dir().join("memory.max"), "max").unwrap();
        std::fs::write(cg.dir().join("pids.max"), "max").unwrap();
        let limits = agentvm_protocol::ResourceLimits {
            memory_max: Some(64 << 20),
            memory_swap_max: Some(0),
            pids_max: Some(50),
            ..Default::default()
        };
        let agent = Arc::new(
            Agent::with_root(Arc::new(Reaper::default()), 40, "/").with_cgroup(Some(cg.clone())),
        );
        let mut h = greeted(&agent).await;
        h.send(msg(Message::Update(limits))).await;
        assert_eq!(
            h.rest().await,
            [msg(Message::Updated {
                skipped: vec!["memory.swap.max".into()]
            })]
        );
        let read = |f: &str| std::fs::read_to_string(cg.dir().join(f)).unwrap();
        assert_eq!(
            (read("memory.max"), read("pids.max")),
            ("67108864".into(), "50".into())
        );

        let bare = Arc::new(Agent::with_root(Arc::new(Reaper::default()), 40, "/"));
        let mut h = greeted(&bare).await;
        h.send(msg(Message::Update(limits))).await;
        let f = h.rest().await;
        assert!(
            matches!(&f[..], [Frame::Msg(Message::Error { message, .. })] if message.contains("no cgroup")),
            "{f:?}"
        );
    }

    /// A DNS relay over a socketpair: ids are rewritten on the way out and restored on the
    /// way back, per client; short and unknown messages are dropped; the relay (and its
    /// socket) ends with the connection. Needs no root: 127.0.0.211 is on lo already.
    #[tokio::test(flavor = "current_thread")]
    async fn dns_relay_session() {
        const IP: &str = "127.0.0.211";
        let port = free_udp_port(IP);
        // Not started: a DNS relay spawns nothing, and a running reaper would wait for the
        // children of other tests.
        let agent =
            Arc::new(Agent::with_root(Arc::new(Reaper::default()), 40, "/").with_dns_port(port));
        let open = |address: &str| {
            let agent = Arc::clone(&agent);
            let address = address.to_string();
            async move {
                let mut h = greeted(&agent).await;
                h.send(msg(Message::DnsRelay { address })).await;
                h
            }
        };

        // An address that is not one: Error, connection closed.
        let f = open("dns.invalid").await.rest().await;
        assert!(
            matches!(&f[..], [Frame::Msg(Message::Error { message, exit_code: None })] if message.contains("not an IP address")),
            "{f:?}"
        );

        let mut h = open(IP).await;
        assert_eq!(h.recv().await, Some(msg(Message::Ready)));
        // The port is taken now: a second relay on it fails to bind.
        let f = open(IP).await.rest().await;
        assert!(
            matches!(&f[..], [Frame::Msg(Message::Error { message, .. })] if message.contains("bind UDP")),
            "{f:?}"
        );

        let relay = format!("{IP}:{port}");
        let a = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        a.send_to(&[1, 2, 3], &relay).await.unwrap(); // too short: dropped
        a.send_to(&dns_query(0x1234, b'a'), &relay).await.unwrap();
        b.send_to(&dns_query(0x1234, b'b'), &relay).await.unwrap();
        let mut relayed = Vec::new();
        for _ in 0..2 {
            match h.recv().await {
                Some(Frame::Dns(q)) => relayed.push(q),
                other => panic!("expected a DNS query, got {other:?}"),
            }
        }
        let (qa, qb) = (relayed[0].clone(), relayed[1].clone());
        assert_eq!(qa[2..], dns_query(0, b'a')[2..]);
        assert_eq!(qb[2..], dns_query(0, b'b')[2..]);
        assert_ne!(qa[..2], qb[..2], "same client id, different relay ids");

        // Unknown and short replies are dropped; real ones reach their client with its id.
        let mut unknown = qa.clone();
        unknown[0] ^= 0x80;
        h.send(Frame::Dns(unknown)).await;
        h.send(Frame::Dns(vec![0; 5])).await;
        let mut reply_b = qb.clone();
        reply_b[2] |= 0x80; // QR: a response
        h.send(Frame::Dns(reply_b.clone())).await;
        let mut reply_a = qa.clone();
        reply_a[2] |= 0x80;
        h.send(Frame::Dns(reply_a.clone())).await;
        h.send(Frame::Dns(reply_a.clone())).await; // a duplicate: dropped
        let mut buf = [0u8; 512];
        let n = recv_reply(&b, &mut buf).await;
        assert_eq!(buf[..2], 0x1234u16.to_be_bytes());
        assert_eq!(buf[2..n], reply_b[2..]);
        let n = recv_reply(&a, &mut buf).await;
        assert_eq!(buf[..2], 0x1234u16.to_be_bytes());
        assert_eq!(buf[2..n], reply_a[2..]);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), a.recv(&mut buf))
                .await
                .is_err(),
            "only one reply per query"
        );

        // Closing the connection ends the relay and frees its socket.
        drop(h);
        let mut rebound = false;
        for _ in 0..100 {
            if std::net::UdpSocket::bind((IP, port)).is_ok() {
                rebound = true;
                break;
            }
            sleep(Duration::from_millis(20)).await;
        }
        assert!(rebound, "the relay's socket was closed with its connection");
    }

    fn member_request(id: &str, create: bool, args: &[&str]) -> StartRequest {
        let mut req = start_request(args);
        req.container = Some(agentvm_protocol::PodContainer {
            id: id.into(),
            create,
            own_pid_namespace: true,
            readonly_root: false,
            limits: None,
        });
        req
    }

    /// Runs `body` with an agent whose container root is `/`, on a runtime of its own, serially
    /// with other tests that reap children. Needs root (`chroot`, namespaces).
    fn with_root_agent<F, Fut>(test: &str, body: F)
    where
        F: FnOnce(Arc<Agent>) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        if !crate::testutil::as_root(test, "chroot and namespaces") {
            return;
        }
        let _guard = crate::testutil::child_lock();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let reaper = Reaper::start().unwrap();
            let agent = Arc::new(Agent::with_root(
                reaper,
                crate::process::caps::kernel_last_cap(),
                "/",
            ));
            body(agent).await;
        });
    }

    /// Pod containers beside the VM's own: each has its own PID namespace (its init is pid 1
    /// there, an exec joins it), execs reach only an existing container, the init's end
    /// ends its exec processes (reported first, 137) and forgets the container, and a
    /// second container runs while the first does. Needs root (namespaces, `chroot`).
    #[test]
    fn pod_containers_are_tracked_and_ended_one_by_one() {
        with_root_agent(
            "pod_containers_are_tracked_and_ended_one_by_one",
            |agent| async move {
                // No such container yet.
                let f = connect(&agent, member_request("c1", false, &["true"]))
                    .await
                    .rest()
                    .await;
                assert!(
                    matches!(&f[..], [Frame::Msg(Message::Error { message, .. })] if message.contains("no container c1")),
                    "{f:?}"
                );
                let mut c1 = connect(&agent, member_request("c1", true, &["sleep", "30"])).await;
                assert!(matches!(
                    c1.recv().await,
                    Some(Frame::Msg(Message::Started { .. }))
                ));
                let f = connect(&agent, member_request("c1", true, &["true"]))
                    .await
                    .rest()
                    .await;
                assert!(
                    matches!(&f[..], [Frame::Msg(Message::Error { message, .. })] if message.contains("exists already")),
                    "{f:?}"
                );
                let mut c2 = connect(&agent, member_request("c2", true, &["sleep", "30"])).await;
                assert!(matches!(
                    c2.recv().await,
                    Some(Frame::Msg(Message::Started { .. }))
                ));
                // An exec in c1 is in c1's PID namespace: its shell is not pid 1 there, c1's
                // init (sleep) is.
                let f = connect(
                    &agent,
                    member_request(
                        "c1",
                        false,
                        &["sh", "-c", "echo $$; cat /proc/1/comm >/dev/null"],
                    ),
                )
                .await
                .rest()
                .await;
                let pid: i32 = String::from_utf8_lossy(&data(&f, Stream::Stdout))
                    .trim()
                    .parse()
                    .unwrap();
                assert!(pid > 1 && pid < 100, "pid {pid} in c1's own namespace");
                assert_eq!(exited(&f), ExitStatus::exited(0));
                let mut ex = connect(&agent, member_request("c1", false, &["sleep", "30"])).await;
                assert!(matches!(
                    ex.recv().await,
                    Some(Frame::Msg(Message::Started { .. }))
                ));
                // c1's init ends: its exec goes with it (the namespace's end), reported first.
                c1.send(msg(Message::Signal { signal: 9 })).await;
                assert_eq!(exited(&ex.rest().await), ExitStatus::signaled(9));
                assert_eq!(exited(&c1.rest().await), ExitStatus::signaled(9));
                assert!(!lock(&agent.members).contains_key("c1"));
                // c2 still runs and is served.
                let f = connect(&agent, member_request("c2", false, &["true"]))
                    .await
                    .rest()
                    .await;
                assert_eq!(exited(&f), ExitStatus::exited(0));
                // As under runc: the init of a PID namespace gets only the signals it handles
                // (sleep has no SIGTERM handler), and SIGKILL.
                c2.send(msg(Message::Signal { signal: 15 })).await;
                assert!(
                    tokio::time::timeout(Duration::from_millis(300), c2.recv())
                        .await
                        .is_err(),
                    "sleep as pid 1 ignores SIGTERM"
                );
                c2.send(msg(Message::Signal { signal: 9 })).await;
                assert_eq!(exited(&c2.rest().await), ExitStatus::signaled(9));
                assert!(lock(&agent.members).is_empty());
                // Invalid ids never become paths.
                let f = connect(&agent, member_request("../x", true, &["true"]))
                    .await
                    .rest()
                    .await;
                assert!(
                    matches!(&f[..], [Frame::Msg(Message::Error { message, .. })] if message.contains("invalid container id")),
                    "{f:?}"
                );
            },
        );
    }

    /// End-to-end over a socketpair, with `/` as the container root. Needs root (`chroot`).
    /// One test, run serially: the agent's reaper waits for any child of the test process.
    /// Env secrets: an exec of the VM's own container gets those of its init's start
    /// request, a pod container's init its own (replacing a variable of the same name).
    #[test]
    fn env_secrets_reach_the_containers_processes() {
        with_root_agent(
            "env_secrets_reach_the_containers_processes",
            |agent| async move {
                let token = |v: &str| SecretSpec {
                    name: "TOKEN".into(),
                    value: agentvm_protocol::SecretValue::new(v.as_bytes().to_vec()),
                    file: false,
                    env: true,
                };
                *lock(&agent.secret_env) = vec![token("vm-s3cret")];
                let echo = ["sh", "-c", "echo \"$TOKEN\""];
                let f = connect(&agent, start_request(&echo)).await.rest().await;
                assert_eq!(data(&f, Stream::Stdout), b"vm-s3cret\n");
                let mut req = member_request("sec1", true, &echo);
                req.process.env.push("TOKEN=from-the-image".into());
                req.secrets = vec![token("pod-s3cret")];
                let f = connect(&agent, req).await.rest().await;
                assert_eq!(data(&f, Stream::Stdout), b"pod-s3cret\n", "{f:?}");
            },
        );
    }

    #[test]
    fn protocol_sessions() {
        with_root_agent("protocol_sessions", |agent| async move {
            // Output on both streams, exit code.
            let mut h = connect(
                &agent,
                start_request(&["sh", "-c", "echo out; echo err >&2; exit 3"]),
            )
            .await;
            let f = h.rest().await;
            assert!(matches!(f[0], Frame::Msg(Message::Started { pid }) if pid > 0));
            assert_eq!(data(&f, Stream::Stdout), b"out\n");
            assert_eq!(data(&f, Stream::Stderr), b"err\n");
            eof_before_exit(&f, Stream::Stdout);
            eof_before_exit(&f, Stream::Stderr);
            assert_eq!(exited(&f), ExitStatus::exited(3));

            // A missing binary: Error with 127, then Exited(127).
            let mut h = connect(&agent, start_request(&["agentvm-no-such-binary"])).await;
            let f = h.rest().await;
            assert_eq!(
                f,
                [
                    error(
                        "exec: \"agentvm-no-such-binary\": executable file not found in $PATH",
                        Some(127)
                    ),
                    msg(Message::Exited(ExitStatus::exited(127))),
                ]
            );

            // Not executable: 126.
            let mut h = connect(&agent, start_request(&["/etc/passwd"])).await;
            let f = h.rest().await;
            assert!(
                matches!(&f[0], Frame::Msg(Message::Error { exit_code: Some(126), message }) if message.contains("permission denied")),
                "{f:?}"
            );
            assert_eq!(exited(&f), ExitStatus::exited(126));

            // Missing cwd: 127.
            let mut req = start_request(&["true"]);
            req.process.cwd = "/agentvm/no/such/dir".into();
            let f = connect(&agent, req).await.rest().await;
            assert!(
                matches!(&f[0], Frame::Msg(Message::Error { exit_code: Some(127), message }) if message.starts_with("chdir to cwd")),
                "{f:?}"
            );

            // Stdin relay and stdin EOF.
            let mut h = connect(&agent, start_request(&["cat"])).await;
            assert!(matches!(
                h.recv().await,
                Some(Frame::Msg(Message::Started { .. }))
            ));
            h.send(Frame::Data(Stream::Stdin, b"hello ".to_vec())).await;
            h.send(Frame::Data(Stream::Stdin, b"agent".to_vec())).await;
            h.send(Frame::Data(Stream::Stdin, Vec::new())).await;
            let f = h.rest().await;
            assert_eq!(data(&f, Stream::Stdout), b"hello agent");
            assert_eq!(exited(&f), ExitStatus::exited(0));

            // Signals.
            let mut h = connect(&agent, start_request(&["sleep", "30"])).await;
            assert!(matches!(
                h.recv().await,
                Some(Frame::Msg(Message::Started { .. }))
            ));
            h.send(msg(Message::Signal { signal: 15 })).await;
            let f = h.rest().await;
            assert_eq!(exited(&f), ExitStatus::signaled(15));

            // An orphan holding stdout does not delay Exited past the grace period.
            let t = std::time::Instant::now();
            let f = connect(&agent, start_request(&["sh", "-c", "sleep 5 & echo bye"]))
                .await
                .rest()
                .await;
            assert_eq!(exited(&f), ExitStatus::exited(0));
            assert_eq!(data(&f, Stream::Stdout), b"bye\n");
            assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());

            // A malformed frame: Error, connection closed, process killed.
            let mut h = connect(&agent, start_request(&["sleep", "30"])).await;
            let Some(Frame::Msg(Message::Started { pid })) = h.recv().await else {
                panic!("not started");
            };
            h.stream.write_all(&[0, 0, 0, 2, 9, 9]).await.unwrap();
            let f = h.rest().await;
            assert!(
                matches!(&f[..], [Frame::Msg(Message::Error { message, exit_code: None })] if message.contains("unknown frame tag 9")),
                "{f:?}"
            );
            let mut gone = false;
            for _ in 0..100 {
                if kill(Pid::from_raw(pid), None).is_err() {
                    gone = true;
                    break;
                }
                sleep(Duration::from_millis(20)).await;
            }
            assert!(gone, "process of a broken connection was killed and reaped");

            // A first frame that is not Start.
            let (a, b) = UnixStream::pair().unwrap();
            tokio::spawn(connection(
                Arc::clone(&agent),
                FdStream::new(a.into()).unwrap(),
            ));
            let mut h = Host {
                stream: FdStream::new(b.into()).unwrap(),
                pid: None,
            };
            assert!(matches!(
                h.recv().await,
                Some(Frame::Msg(Message::Hello { .. }))
            ));
            h.send(msg(Message::Resize { rows: 1, cols: 1 })).await;
            let f = h.rest().await;
            assert!(
                matches!(&f[..], [Frame::Msg(Message::Error { message, .. })] if message.contains("expected start")),
                "{f:?}"
            );

            // A terminal: the process has a controlling tty of the requested size.
            let mut req = start_request(&["sh", "-c", "stty size; tty"]);
            req.process.terminal = true;
            req.process.console_size = Some((33, 101));
            let f = connect(&agent, req).await.rest().await;
            let out = String::from_utf8_lossy(&data(&f, Stream::Stdout)).into_owned();
            assert!(out.contains("33 101"), "{out:?}");
            assert!(out.contains("/dev/pts/"), "{out:?}");
            assert_eq!(exited(&f), ExitStatus::exited(0));
        });
    }
}
