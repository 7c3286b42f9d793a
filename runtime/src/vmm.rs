//! The VMM boundary: a backend ([`VmmBackend`]) starts a VM and hands back a [`VmHandle`],
//! which is everything the rest of the runtime does with a VM (the agent channel, wait,
//! pause, resume, kill, stop, pids, diagnostics). The QEMU microvm backend ([`Qemu`]) keeps
//! its processes, QMP socket and vsock transport private to this module; a fake backend
//! serving the real guest agent over socketpairs is in [`crate::fakevm`] (tests).

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::future::Future;
use std::pin::Pin;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};

use crate::assets;
use crate::error::{Error, Result};
use crate::guest::{DialFuture, Dialer};
use crate::jail::{self, Jail, WriteRules};
use crate::ringlog;

/// How guest code is executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization through /dev/kvm.
    Kvm,
    /// QEMU's software emulation: slow but works everywhere.
    Tcg,
}

/// A disk attached to the guest as a virtio-blk device (`/dev/vda`, `/dev/vdb`, ... in order).
#[derive(Debug, Clone)]
pub struct Disk {
    pub path: PathBuf,
    pub readonly: bool,
}

/// A host directory shared with the guest, mounted there by its `tag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub tag: String,
    pub path: PathBuf,
    pub readonly: bool,
    pub transport: ShareTransport,
    /// The guest stacks an overlay on this share (a container's writable layer): virtio-fs
    /// must store overlayfs's `trusted.overlay.*` attributes (opaque directories), which
    /// takes CAP_SYS_ADMIN in virtiofsd.
    pub overlay_upper: bool,
    /// When not empty, the only entries of the shared directory the guest may reach, and
    /// the only places it may write (beneath them): the rest (an engine's metadata beside a
    /// writable layer) is covered in virtiofsd's mount namespace, and Landlock refuses any
    /// other write, rename or link. virtio-fs only.
    pub expose: Vec<String>,
    /// What the guest's writes may not leave on the host (the container's capabilities).
    pub limits: VolumeLimits,
}

/// What reaches the host through a writable volume, as the container's capabilities allow
/// (`--cap-drop`): root in the VM holds every capability there, the file server on the host
/// applies these. virtio-fs only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VolumeLimits {
    /// No device nodes (the container lacks CAP_MKNOD): virtiofsd without it.
    pub no_devices: bool,
    /// No file capabilities (CAP_SETFCAP): virtiofsd without it.
    pub no_file_caps: bool,
    /// No setuid or setgid bits on files (CAP_FSETID): refused by a seccomp filter on the
    /// file server's chmod and create calls.
    pub no_setid: bool,
}

impl VolumeLimits {
    /// The limits of a container whose bounding set is `bounding` (OCI names, `CAP_MKNOD`);
    /// `None` (no capabilities in the spec) limits nothing.
    pub fn from_bounding(bounding: Option<&[String]>) -> VolumeLimits {
        let Some(b) = bounding else {
            return VolumeLimits::default();
        };
        let lacks = |c: &str| !b.iter().any(|x| x.eq_ignore_ascii_case(c));
        VolumeLimits {
            no_devices: lacks("CAP_MKNOD"),
            no_file_caps: lacks("CAP_SETFCAP"),
            no_setid: lacks("CAP_FSETID"),
        }
    }
}

/// How a shared directory crosses the VM boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShareTransport {
    /// QEMU's built-in virtio-9p server (`-fsdev local`, passthrough security model);
    /// `readonly=on` makes QEMU refuse writes.
    NineP,
    /// virtio-fs: a `vhost-user-fs-device` served by a virtiofsd process of its own, a helper
    /// of the VM like vhost-device-vsock; `--readonly` makes virtiofsd refuse writes.
    VirtioFs(VirtioFs),
}

/// The virtiofsd serving one virtio-fs share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioFs {
    pub daemon: PathBuf,
    pub cache: FsCache,
}

/// virtiofsd's `--cache` policy: how long the guest may trust what it cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsCache {
    /// Nothing cached (direct I/O, zero timeouts): host changes are seen at once.
    Never,
    /// Attributes and names trusted for 1 s, file data kept while the mtime is unchanged.
    Auto,
    /// Metadata cached for long, data never.
    Metadata,
    /// Everything cached for long: only for directories nobody else writes.
    Always,
}

impl FsCache {
    pub fn as_str(self) -> &'static str {
        match self {
            FsCache::Never => "never",
            FsCache::Auto => "auto",
            FsCache::Metadata => "metadata",
            FsCache::Always => "always",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            FsCache::Never,
            FsCache::Auto,
            FsCache::Metadata,
            FsCache::Always,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }
}

impl Share {
    pub fn is_virtio_fs(&self) -> bool {
        matches!(self.transport, ShareTransport::VirtioFs(_))
    }

    /// The vhost-user socket between QEMU and this share's virtiofsd, in a directory of
    /// its own in the state dir: virtiofsd may write there and nowhere else of the host's,
    /// and its command line names the state dir, as cleanup requires.
    pub fn socket(&self, state_dir: &Path) -> PathBuf {
        self.socket_dir(state_dir).join("vhost.sock")
    }

    pub fn socket_dir(&self, state_dir: &Path) -> PathBuf {
        state_dir.join(format!("fs-{}", self.tag))
    }
}

/// A virtio-net device backed by a tap device that already exists (in the VMM's network
/// namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub tap: String,
    /// The guest-visible MAC address.
    pub mac: String,
}

/// Everything a backend needs to start one VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub disks: Vec<Disk>,
    /// Directories shared with the guest (virtio-9p or virtio-fs, per share).
    pub shares: Vec<Share>,
    pub nics: Vec<Nic>,
    /// Network namespace the VMM starts in; none keeps the caller's.
    pub netns: Option<Arc<OwnedFd>>,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub accel: Accel,
    /// Private directory for sockets and logs; removed by the caller.
    pub state_dir: PathBuf,
    /// Extra kernel command line words.
    pub cmdline: Vec<String>,
    /// Run the guest clock off the instruction counter (TCG only), for deterministic benchmarks.
    pub icount: bool,
    /// The host cgroup QEMU and every helper join before they exec (none: the caller's).
    pub cgroup: Option<Arc<crate::hostcgroup::HostCgroup>>,
}

impl VmConfig {
    pub fn console_log(&self) -> PathBuf {
        self.state_dir.join("console.log")
    }

    /// The QMP control socket of the VMM (pause, resume): made by the runtime, QEMU gets the
    /// listening descriptor ([`QMP_FD`]).
    pub fn qmp_socket(&self) -> PathBuf {
        self.state_dir.join("qmp.sock")
    }

    /// The directory of vhost-device-vsock's sockets (the only place it may write).
    pub fn vsock_dir(&self) -> PathBuf {
        self.state_dir.join("vsock")
    }
}

/// QEMU's descriptor of the listening QMP socket.
pub const QMP_FD: i32 = 200;
/// QEMU's descriptor of the console pipe's writing end.
pub const CONSOLE_FD: i32 = 201;
/// QEMU's descriptor of its connection to vhost-device-vsock.
pub const VSOCK_FD: i32 = 202;
/// QEMU's descriptors of its taps (one each, opened by the runtime in the sandbox's network
/// namespace): `TAP_FD_BASE + i`.
pub const TAP_FD_BASE: i32 = 210;
const MAX_NICS: usize = 20;
/// QEMU's descriptors of its connections to the virtiofsd of share `i`: `SHARE_FD_BASE + i`.
pub const SHARE_FD_BASE: i32 = 230;
const MAX_SHARES: usize = 100;
/// QEMU's descriptors of disk `i`'s image, in fd set `i + 1`: `DISK_FD_BASE + 2i` (opened
/// as the disk is used) and, for a writable disk, `DISK_FD_BASE + 2i + 1` read-only.
pub const DISK_FD_BASE: i32 = 330;

/// QEMU's seccomp filter: obsolete syscalls, privilege changes, new processes and resource
/// control are refused (the process is killed), as libvirt runs it.
pub const QEMU_SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// A future boxed for a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A VMM implementation: starts a VM and hands back its [`VmHandle`].
pub trait VmmBackend: std::fmt::Debug + Send + Sync {
    fn name(&self) -> &'static str;
    fn launch<'a>(&'a self, cfg: &'a VmConfig) -> BoxFuture<'a, Result<Box<dyn VmHandle>>>;
}

/// A started VM, whatever backend started it: everything the rest of the runtime does with
/// a VM goes through this, so no backend detail (QEMU's QMP socket, its processes) leaks
/// past the backend. Methods take `&self`: the handle is shared between the sandbox that
/// owns the VM and the processes running in it (pause, resume).
pub trait VmHandle: std::fmt::Debug + Send + Sync {
    /// Opens connections to the guest agent's port (exec processes, requests, relays).
    fn dialer(&self) -> Arc<dyn Dialer>;
    /// Whether the agent says it listens, so connecting is safe (QEMU: its line on the
    /// console; connecting earlier can wedge vhost-device-vsock).
    fn agent_listening(&self) -> bool;
    /// How the VMM ended, once it has.
    fn exited(&self) -> Option<String>;
    /// Resolves when the VMM exits, with a description of how (at once if it has).
    fn wait(&self) -> BoxFuture<'_, String>;
    /// Freezes every vCPU.
    fn pause(&self) -> BoxFuture<'_, Result<()>>;
    /// Lets a paused VM run again.
    fn resume(&self) -> BoxFuture<'_, Result<()>>;
    /// Kills the VMM and every helper at once (the exit shows in [`VmHandle::wait`]).
    fn kill(&self);
    /// Waits for the VMM to exit for at most `grace`, then kills it and every helper, and
    /// waits until they are gone.
    fn stop(&self, grace: Duration) -> BoxFuture<'_, ()>;
    /// Host pids of the VMM (first) and of its helper processes, for cleanup records and
    /// leak checks.
    fn pids(&self) -> Vec<u32>;
    /// Tail of the guest console and of the VMM's own log, for error reports.
    fn diagnostics(&self) -> String;
}

/// How the host reaches the agent's vsock port (QEMU's transports).
#[derive(Debug, Clone)]
enum AgentChannel {
    /// vhost-device-vsock's host side: a unix socket speaking `CONNECT <port>\n`.
    VhostUser { uds: PathBuf },
    /// Kernel vhost-vsock: AF_VSOCK to the guest's CID.
    Vsock { cid: u32 },
}

/// A byte stream to the agent.
pub trait AgentIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AgentIo for T {}

impl AgentChannel {
    /// Opens one connection to `port` in the guest. Fails fast when nobody listens yet.
    async fn connect(&self, port: u32) -> std::io::Result<Box<dyn AgentIo>> {
        match self {
            AgentChannel::VhostUser { uds } => {
                let mut s = tokio::net::UnixStream::connect(uds).await?;
                s.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
                // The daemon answers "OK <host port>\n" once the guest accepted; read byte by
                // byte so no agent data is swallowed into a buffer.
                let mut line = Vec::new();
                let mut reader = BufReader::with_capacity(1, &mut s);
                reader.read_until(b'\n', &mut line).await?;
                if !line.starts_with(b"OK ") {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionRefused,
                        format!(
                            "vsock CONNECT {port} refused: {:?}",
                            String::from_utf8_lossy(&line)
                        ),
                    ));
                }
                Ok(Box::new(s))
            }
            AgentChannel::Vsock { cid } => {
                let addr = tokio_vsock::VsockAddr::new(*cid, port);
                Ok(Box::new(tokio_vsock::VsockStream::connect(addr).await?))
            }
        }
    }
}

impl Dialer for AgentChannel {
    fn dial(&self) -> DialFuture<'_> {
        Box::pin(self.connect(agentvm_protocol::AGENT_PORT))
    }
}

/// A VM QEMU runs: the VMM process (owned by a task that reaps it), its helper processes
/// (vhost-device-vsock, virtiofsd) and its QMP socket. Dropping it kills them all.
#[derive(Debug)]
struct QemuVm {
    vmm_pid: u32,
    helpers: std::sync::Mutex<Vec<Child>>,
    helper_pids: Vec<u32>,
    /// Asks the VMM's task to kill it; closing it does too.
    kill_vmm: mpsc::UnboundedSender<()>,
    /// How the VMM exited, once it has.
    exit: watch::Receiver<Option<String>>,
    channel: Arc<AgentChannel>,
    qmp: PathBuf,
    console_log: PathBuf,
    vmm_log: PathBuf,
    /// The uid QEMU and vhost-device-vsock run as, held until the VM is gone.
    _user: Option<crate::sandboxuser::SandboxUser>,
}

impl QemuVm {
    fn new(
        mut vmm: Child,
        helpers: Vec<Child>,
        channel: AgentChannel,
        cfg: &VmConfig,
        vmm_log: PathBuf,
        user: Option<crate::sandboxuser::SandboxUser>,
    ) -> QemuVm {
        let vmm_pid = vmm.id().unwrap_or(0);
        let helper_pids = helpers.iter().filter_map(Child::id).collect();
        let (kill_vmm, mut kill_rx) = mpsc::unbounded_channel::<()>();
        let (exit_tx, exit) = watch::channel(None);
        tokio::spawn(async move {
            let status = loop {
                tokio::select! {
                    st = vmm.wait() => break st,
                    k = kill_rx.recv() => {
                        let _ = vmm.start_kill();
                        if k.is_none() {
                            // The handle is gone: reap and end.
                            break vmm.wait().await;
                        }
                    }
                }
            };
            let text = match status {
                Ok(st) => st.to_string(),
                Err(e) => format!("wait failed: {e}"),
            };
            exit_tx.send_replace(Some(text));
        });
        QemuVm {
            vmm_pid,
            helpers: std::sync::Mutex::new(helpers),
            helper_pids,
            kill_vmm,
            exit,
            channel: Arc::new(channel),
            qmp: cfg.qmp_socket(),
            console_log: cfg.console_log(),
            vmm_log,
            _user: user,
        }
    }

    fn kill_helpers(&self) -> Vec<Child> {
        let mut helpers =
            std::mem::take(&mut *self.helpers.lock().unwrap_or_else(|p| p.into_inner()));
        for h in &mut helpers {
            let _ = h.start_kill();
        }
        helpers
    }
}

impl VmHandle for QemuVm {
    fn dialer(&self) -> Arc<dyn Dialer> {
        self.channel.clone()
    }

    fn agent_listening(&self) -> bool {
        console_says_ready(&self.console_log)
    }

    fn exited(&self) -> Option<String> {
        self.exit.borrow().clone()
    }

    fn wait(&self) -> BoxFuture<'_, String> {
        let mut rx = self.exit.clone();
        Box::pin(async move {
            match rx.wait_for(Option::is_some).await {
                Ok(st) => st.clone().unwrap_or_default(),
                Err(_) => "the VMM's watcher ended".into(),
            }
        })
    }

    fn pause(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { crate::qmp::execute(&self.qmp, "stop").await.map(drop) })
    }

    fn resume(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { crate::qmp::execute(&self.qmp, "cont").await.map(drop) })
    }

    fn kill(&self) {
        let _ = self.kill_vmm.send(());
        // kill_on_drop reaps nothing synchronously; kill now so nothing outlives us.
        for h in self
            .helpers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter_mut()
        {
            let _ = h.start_kill();
        }
    }

    fn stop(&self, grace: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if tokio::time::timeout(grace, self.wait()).await.is_err() {
                let _ = self.kill_vmm.send(());
                self.wait().await;
            }
            for mut h in self.kill_helpers() {
                let _ = h.wait().await;
            }
        })
    }

    fn pids(&self) -> Vec<u32> {
        std::iter::once(self.vmm_pid)
            .filter(|p| *p != 0)
            .chain(self.helper_pids.iter().copied())
            .collect()
    }

    fn diagnostics(&self) -> String {
        let mut out = assets::tail(&self.console_log, 25);
        let vmm = assets::tail(&self.vmm_log, 5);
        if !vmm.trim().is_empty() {
            out.push_str("\n--- vmm log ---\n");
            out.push_str(&vmm);
        }
        out
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        // The VMM's task kills it as the channel closes; the helpers die here.
        self.kill_helpers();
    }
}

/// The line the agent prints on the serial console once it listens on vsock.
pub const AGENT_READY_LINE: &str = "agentvm-agent: ready on vsock port";

fn console_says_ready(console: &Path) -> bool {
    // The line comes early; a console that rotated since still has it in its older half.
    [crate::ringlog::older(console), console.to_path_buf()]
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .any(|b| {
            b.windows(AGENT_READY_LINE.len())
                .any(|w| w == AGENT_READY_LINE.as_bytes())
        })
}

/// The QEMU `microvm` backend.
#[derive(Debug, Clone)]
pub struct Qemu {
    pub qemu: PathBuf,
}

/// The vsock transport chosen for this host.
#[derive(Debug, Clone)]
pub enum VsockTransport {
    /// In-kernel vhost-vsock (`/dev/vhost-vsock`), with this guest CID.
    Kernel { cid: u32 },
    /// vhost-user vsock through a `vhost-device-vsock` daemon.
    User { daemon: PathBuf },
}

impl VsockTransport {
    /// Kernel vhost-vsock where `/dev/vhost-vsock` exists, the vhost-user daemon otherwise.
    pub fn detect() -> Result<Self> {
        if Path::new("/dev/vhost-vsock").exists() {
            Ok(VsockTransport::Kernel { cid: random_cid() })
        } else {
            Ok(VsockTransport::User {
                daemon: assets::vhost_vsock_daemon()?,
            })
        }
    }
}

fn random_cid() -> u32 {
    // CIDs 0-2 are reserved; collisions with other VMs make QEMU fail to start, which the
    // caller reports. 2^31 values make that unlikely.
    let mut b = [0u8; 4];
    let _ = getrandom(&mut b);
    3 + (u32::from_le_bytes(b) & 0x7fff_fff0)
}

pub(crate) fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

/// QEMU's TCG accelerator with its translation cache bounded to
/// [`crate::hostcgroup::TCG_TB_SIZE_MIB`].
const TCG_ACCEL: &str = "tcg,tb-size=256";

/// The guest CID used with vhost-device-vsock: each daemon serves one VM, so it is private.
const USER_VSOCK_CID: u32 = 3;

/// Builds QEMU's argument list. Pure, so the command line is unit-tested.
pub fn qemu_args(cfg: &VmConfig, vsock: &VsockTransport) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    let mem = format!("{}M", cfg.memory_mib);
    let user_vsock = matches!(vsock, VsockTransport::User { .. });
    // vhost-user devices (vsock, virtio-fs) need guest RAM their daemons can map: a shared
    // memfd backend.
    let shared_memory = user_vsock || cfg.shares.iter().any(Share::is_virtio_fs);
    let machine = if shared_memory {
        "microvm,acpi=off,x-option-roms=off,memory-backend=mem"
    } else {
        "microvm,acpi=off,x-option-roms=off"
    };
    push(&["-M", machine]);
    match cfg.accel {
        // Nested virtualisation is a large attack surface of the host kernel's: off.
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host,-vmx,-svm"]),
        // The translation cache is bounded so the host cgroup's overhead holds (QEMU's
        // default is 1 GiB on a host with 8 GiB or more, filled as the guest runs new code).
        Accel::Tcg => push(&["-accel", TCG_ACCEL, "-cpu", "max"]),
    }
    if cfg.icount && cfg.accel == Accel::Tcg {
        push(&["-icount", "shift=3,sleep=off"]);
    }
    push(&["-m", &mem, "-smp", &cfg.vcpus.to_string()]);
    if shared_memory {
        push(&[
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
        ]);
    }
    push(&[
        // The state dir on the command line: cleanup_stale kills only what names it.
        "-name",
        &qemu_escape(&cfg.state_dir),
        "-sandbox",
        QEMU_SANDBOX,
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display",
        "none",
        "-monitor",
        "none",
        // QMP and the console come as descriptors: QEMU needs no writable path.
        "-chardev",
        &format!("socket,id=qmp,fd={QMP_FD},server=on,wait=off"),
        "-mon",
        "chardev=qmp,mode=control",
        "-chardev",
        &format!("file,id=console,path=/proc/self/fd/{CONSOLE_FD}"),
        "-serial",
        "chardev:console",
        "-kernel",
        &cfg.kernel.display().to_string(),
        "-initrd",
        &cfg.initrd.display().to_string(),
    ]);
    let mut cmdline = vec![
        "console=ttyS0",
        "reboot=t",
        "panic=-1",
        "quiet",
        "rdinit=/init",
        // The kernel has the dummy driver (for nested networking); no dummy0 by default.
        "dummy.numdummies=0",
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    cmdline.extend(cfg.cmdline.iter().cloned());
    push(&["-append", &cmdline.join(" ")]);
    // Disks, vhost-user connections and taps come as descriptors the runtime opened: QEMU
    // (its own uid) opens no path of the host's but its program, kernel and initrd.
    for (i, d) in cfg.disks.iter().enumerate() {
        let ro = if d.readonly { "on" } else { "off" };
        let fd = DISK_FD_BASE + 2 * i as i32;
        let set = i + 1;
        push(&["-add-fd", &format!("fd={fd},set={set}")]);
        if !d.readonly {
            push(&["-add-fd", &format!("fd={},set={set}", fd + 1)]);
        }
        push(&[
            "-drive",
            &format!(
                "id=disk{i},file=/dev/fdset/{set},format=raw,if=none,readonly={ro},cache=none,\
                 aio=threads"
            ),
            "-device",
            &format!("virtio-blk-device,drive=disk{i}"),
        ]);
    }
    for (i, sh) in cfg.shares.iter().enumerate() {
        let tag = qemu_escape(Path::new(&sh.tag));
        match &sh.transport {
            ShareTransport::NineP => {
                let ro = if sh.readonly { ",readonly=on" } else { "" };
                push(&[
                    "-fsdev",
                    &format!(
                        "local,id=fs{i},path={},security_model=passthrough{ro}",
                        qemu_escape(&sh.path)
                    ),
                    "-device",
                    &format!("virtio-9p-device,fsdev=fs{i},mount_tag={tag}"),
                ]);
            }
            // Read-only is virtiofsd's job (`--readonly`): QEMU only relays.
            ShareTransport::VirtioFs(_) => push(&[
                "-chardev",
                &format!("socket,id=fs{i},fd={}", SHARE_FD_BASE + i as i32),
                "-device",
                &format!("vhost-user-fs-device,chardev=fs{i},tag={tag}"),
            ]),
        }
    }
    for (i, nic) in cfg.nics.iter().enumerate() {
        push(&[
            "-netdev",
            &format!("tap,id=net{i},fd={}", TAP_FD_BASE + i as i32),
            "-device",
            &format!(
                "virtio-net-device,netdev=net{i},mac={}",
                qemu_escape(Path::new(&nic.mac))
            ),
        ]);
    }
    match vsock {
        VsockTransport::User { .. } => push(&[
            "-chardev",
            &format!("socket,id=vsock0,fd={VSOCK_FD}"),
            "-device",
            "vhost-user-vsock-device,chardev=vsock0",
        ]),
        VsockTransport::Kernel { cid } => {
            push(&["-device", &format!("vhost-vsock-device,guest-cid={cid}")])
        }
    }
    a
}

/// virtiofsd's arguments for one share. Pure, so the command line is unit-tested.
///
/// - `--sandbox namespace`: virtiofsd moves into new mount, pid and network namespaces with
///   the shared directory as its root, so no path the guest sends (`..`, symlinks) can leave
///   the share (the runtime runs as root, which that needs).
/// - `--cache`: see [`FsCache`]; with `never`, `--allow-mmap` keeps shared mmap working (9p's
///   `cache=mmap` does the same).
/// - `--xattr`: extended attributes pass through, as with 9p's passthrough model (file
///   capabilities in images).
/// - `--readonly` for read-only shares: virtiofsd refuses every write, whatever the guest
///   mounts.
/// - Submounts under a share are announced to the guest (virtiofsd's default), so they keep
///   their own `st_dev` there.
/// - The socket lives in the state dir, so the command line names it (cleanup relies on that).
pub fn virtiofsd_args(share: &Share, fs: &VirtioFs, state_dir: &Path) -> Vec<String> {
    // A share with hidden entries runs under Landlock, which forbids the mounts of
    // virtiofsd's namespace sandbox: the jail made the namespace, virtiofsd chroots.
    let sandbox = if share.expose.is_empty() {
        "namespace"
    } else {
        "chroot"
    };
    let mut a = vec![
        "--socket-path".to_string(),
        share.socket(state_dir).display().to_string(),
        "--shared-dir".into(),
        share.path.display().to_string(),
        "--sandbox".into(),
        sandbox.into(),
        "--cache".into(),
        fs.cache.as_str().into(),
        "--xattr".into(),
        "--log-level".into(),
        "warn".into(),
    ];
    if fs.cache == FsCache::Never {
        a.push("--allow-mmap".into());
    }
    if share.readonly {
        a.push("--readonly".into());
    }
    let mut modcaps = Vec::new();
    if share.overlay_upper {
        // trusted.* xattrs need CAP_SYS_ADMIN, which virtiofsd drops by default; it stays
        // confined to the share by its sandbox.
        modcaps.push("+sys_admin");
    }
    if share.limits.no_devices {
        modcaps.push("-mknod");
    }
    if share.limits.no_file_caps {
        modcaps.push("-setfcap");
    }
    if !modcaps.is_empty() {
        a.push(format!("--modcaps={}", modcaps.join(":")));
    }
    a
}

/// QEMU option values separate with `,`; a literal comma is written `,,`.
fn qemu_escape(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// A vhost-user backend daemon (vhost-device-vsock, virtiofsd) started for one VM; QEMU
/// connects to its socket as a client, so the socket must exist before QEMU starts.
struct VhostUserDaemon {
    name: &'static str,
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

/// How long a vhost-user daemon may take to create its socket.
const DAEMON_LISTEN_TIMEOUT: Duration = Duration::from_secs(5);

impl VhostUserDaemon {
    fn spawn(
        name: &'static str,
        program: &Path,
        args: &[String],
        socket: PathBuf,
        log: PathBuf,
        jail: Jail,
        cgroup: Option<&crate::hostcgroup::HostCgroup>,
    ) -> Result<Self> {
        let mut cmd = Command::new(program);
        let (out, err) = capped_output(&log, ringlog::VMM_LOG_CAP)?;
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true);
        crate::hostcgroup::enter(&mut cmd, cgroup)?;
        die_with_parent(&mut cmd);
        jail.apply(cmd.as_std_mut())?;
        let child = cmd.spawn().map_err(|e| Error::Spawn {
            program: program.display().to_string(),
            source: e,
        })?;
        Ok(Self {
            name,
            child,
            socket,
            log,
        })
    }

    /// Waits until the daemon's socket exists; fails (and kills it) if it exits first or
    /// takes too long.
    async fn listening(mut self) -> Result<Child> {
        let deadline = Instant::now() + DAEMON_LISTEN_TIMEOUT;
        while !self.socket.exists() {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(Error::Boot {
                    reason: format!("{} exited ({st}) before listening", self.name),
                    console: assets::tail(&self.log, 10),
                });
            }
            if Instant::now() > deadline {
                let _ = self.child.start_kill();
                return Err(Error::Boot {
                    reason: format!(
                        "{} did not create its socket within {} s",
                        self.name,
                        DAEMON_LISTEN_TIMEOUT.as_secs()
                    ),
                    console: assets::tail(&self.log, 10),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(self.child)
    }
}

/// Makes a spawned helper die with the process that started it, so a killed `agentvm` or
/// shim cannot leak VMs.
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only makes the async-signal-safe
    // prctl syscall; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A child's stdout and stderr: one pipe, drained into a capped log ([`ringlog`]).
fn capped_output(path: &Path, cap: u64) -> Result<(Stdio, Stdio)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::io("make a pipe for", path, e.into()))?;
    ringlog::spawn(r, path, cap).map_err(|e| Error::io("create", path, e))?;
    let w2 = w
        .try_clone()
        .map_err(|e| Error::io("make a pipe for", path, e))?;
    Ok((Stdio::from(w), Stdio::from(w2)))
}

/// A directory only the runtime (root) may enter, for a helper's sockets.
fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io("create", dir, e))
}

/// The jail of the virtiofsd serving `share`. Every virtiofsd gets `no_new_privs`; one whose
/// share exposes only some entries ([`Share::expose`]: the directory that holds a container's
/// writable layer also holds the engine's metadata) runs in its own mount and network
/// namespaces where every other entry is covered by an empty read-only stand-in (an overlay
/// mounted there, Docker's `merged`, is taken away first), the host's tree is read-only but
/// for the share and its socket dir, and Landlock allows writes only beneath the exposed
/// entries and the socket dir: no rename, link, create or delete in the directory itself.
pub fn share_jail(share: &Share, state_dir: &Path) -> Result<Jail> {
    if share.expose.is_empty() {
        return Ok(Jail {
            deny_setid: share.limits.no_setid && !share.readonly,
            ..Jail::default()
        });
    }
    let sock_dir = share.socket_dir(state_dir);
    let mut cover = Vec::new();
    let entries = std::fs::read_dir(&share.path).map_err(|e| Error::io("list", &share.path, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list", &share.path, e))?;
        let name = entry.file_name();
        let path = entry.path();
        let ty = entry
            .file_type()
            .map_err(|e| Error::io("inspect", &path, e))?;
        if share
            .expose
            .iter()
            .any(|x| name.as_encoded_bytes() == x.as_bytes())
        {
            if !ty.is_dir() {
                return Err(Error::Invalid(format!(
                    "{} is not a directory (a symlink?): refusing to share it",
                    path.display()
                )));
            }
            continue;
        }
        if !(ty.is_dir() || ty.is_file()) {
            return Err(Error::Invalid(format!(
                "{} is neither a file nor a directory (a symlink?): refusing to share {}",
                path.display(),
                share.path.display()
            )));
        }
        cover.push(jail::Cover {
            path,
            dir: ty.is_dir(),
        });
    }
    let mut writable_beneath: Vec<PathBuf> = Vec::new();
    if !share.readonly {
        writable_beneath.extend(share.expose.iter().map(|x| share.path.join(x)));
    }
    writable_beneath.push(sock_dir.clone());
    Ok(Jail {
        mount_ns: true,
        net_ns: true,
        detach: cover
            .iter()
            .filter(|c| c.dir)
            .map(|c| c.path.clone())
            .collect(),
        cover,
        empty: Some(state_dir.join(format!("jail-{}", share.tag))),
        readonly: true,
        writable: vec![share.path.clone(), sock_dir],
        landlock: Some(WriteRules::new(&writable_beneath)?),
        unprivileged: false,
        user: None,
        // virtiofsd installs its own allow list (`--seccomp kill`).
        seccomp: false,
        deny_setid: false,
        root: None,
    })
}

impl VmmBackend for Qemu {
    fn name(&self) -> &'static str {
        "qemu-microvm"
    }

    fn launch<'a>(&'a self, cfg: &'a VmConfig) -> BoxFuture<'a, Result<Box<dyn VmHandle>>> {
        Box::pin(async move {
            let vm = self.launch_qemu(cfg).await?;
            Ok(Box::new(vm) as Box<dyn VmHandle>)
        })
    }
}

impl Qemu {
    async fn launch_qemu(&self, cfg: &VmConfig) -> Result<QemuVm> {
        let vsock = VsockTransport::detect()?;
        if cfg.nics.len() > MAX_NICS || cfg.shares.len() > MAX_SHARES {
            return Err(Error::Invalid(format!(
                "{} network interfaces and {} shares: at most {MAX_NICS} and {MAX_SHARES}",
                cfg.nics.len(),
                cfg.shares.len()
            )));
        }
        let user = sandbox_user(cfg)?;
        let ids = user.as_ref().map(|u| (u.uid, u.gid()));
        // vhost-user daemons: all started first, then waited for together.
        let mut daemons = Vec::new();
        let channel = match &vsock {
            VsockTransport::User { daemon } => {
                let dir = cfg.vsock_dir();
                private_dir(&dir)?;
                let sock = dir.join("vhost.sock");
                let uds = dir.join("agent.sock");
                let args = [
                    "--guest-cid".to_string(),
                    USER_VSOCK_CID.to_string(),
                    "--socket".into(),
                    sock.display().to_string(),
                    "--uds-path".into(),
                    uds.display().to_string(),
                ];
                let log = cfg.state_dir.join("vhost-device-vsock.log");
                // Unix sockets only: no network, no capability, writes in its dir alone, a
                // root holding its program, libraries and that dir.
                let staging = cfg.state_dir.join("vsock-root");
                private_dir(&staging)?;
                if let Some((uid, gid)) = ids {
                    // Its uid's dir: the sockets it makes there are its own.
                    nix::unistd::chown(&dir, Some(uid.into()), Some(gid.into()))
                        .map_err(|e| Error::io("hand over", &dir, e.into()))?;
                }
                let mut root = jail::MinimalRoot::program(staging, [daemon.clone(), dir.clone()]);
                root.owner = ids;
                let jail = Jail {
                    root: Some(root),
                    user: ids,
                    ..Jail::unprivileged(vec![dir], true)
                };
                daemons.push(VhostUserDaemon::spawn(
                    "vhost-device-vsock",
                    daemon,
                    &args,
                    sock,
                    log,
                    jail,
                    cfg.cgroup.as_deref(),
                )?);
                AgentChannel::VhostUser { uds }
            }
            VsockTransport::Kernel { cid } => AgentChannel::Vsock { cid: *cid },
        };
        for sh in &cfg.shares {
            if let ShareTransport::VirtioFs(fs) = &sh.transport {
                private_dir(&sh.socket_dir(&cfg.state_dir))?;
                let log = cfg.state_dir.join(format!("virtiofsd-{}.log", sh.tag));
                daemons.push(VhostUserDaemon::spawn(
                    "virtiofsd",
                    &fs.daemon,
                    &virtiofsd_args(sh, fs, &cfg.state_dir),
                    sh.socket(&cfg.state_dir),
                    log,
                    share_jail(sh, &cfg.state_dir)?,
                    cfg.cgroup.as_deref(),
                )?);
            }
        }
        let mut helpers = Vec::new();
        for d in daemons {
            // On an error the remaining daemons are dropped, which kills them (kill_on_drop).
            helpers.push(d.listening().await?);
        }
        // QEMU's vhost-user connections, made here (it could not reach the sockets).
        let mut vhost = Vec::new();
        if let VsockTransport::User { .. } = &vsock {
            vhost.push((
                connect_daemon(&cfg.vsock_dir().join("vhost.sock")).await?,
                VSOCK_FD,
            ));
        }
        for (i, sh) in cfg.shares.iter().enumerate() {
            if sh.is_virtio_fs() {
                vhost.push((
                    connect_daemon(&sh.socket(&cfg.state_dir)).await?,
                    SHARE_FD_BASE + i as i32,
                ));
            }
        }
        let vmm_log = cfg.state_dir.join("qemu.log");
        let kill_helpers = |helpers: &mut Vec<Child>| {
            for h in helpers {
                let _ = h.start_kill();
            }
        };
        let spawned = self.spawn_qemu(cfg, &vsock, &vmm_log, vhost, ids);
        let vmm = match spawned {
            Ok(c) => c,
            Err(e) => {
                kill_helpers(&mut helpers);
                return Err(e);
            }
        };
        Ok(QemuVm::new(vmm, helpers, channel, cfg, vmm_log, user))
    }
}

/// Connects to a vhost-user daemon's socket for QEMU. The socket file appears when the daemon
/// binds it, an instant before it listens: refused connections are retried for a while.
async fn connect_daemon(sock: &Path) -> Result<Arc<OwnedFd>> {
    let deadline = Instant::now() + DAEMON_LISTEN_TIMEOUT;
    loop {
        match std::os::unix::net::UnixStream::connect(sock) {
            Ok(s) => return Ok(Arc::new(OwnedFd::from(s))),
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => return Err(Error::io("connect to", sock, e)),
        }
    }
}

/// The sandbox's own uid for QEMU and vhost-device-vsock ([`crate::sandboxuser`]), or none:
/// when the runtime is not root (nothing to switch from), or when a 9p share needs QEMU to
/// keep root's capabilities (passthrough chowns as the guest asks).
fn sandbox_user(cfg: &VmConfig) -> Result<Option<crate::sandboxuser::SandboxUser>> {
    let nine_p = cfg
        .shares
        .iter()
        .any(|s| matches!(s.transport, ShareTransport::NineP));
    if nine_p || !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let base = crate::config::HostConfig::load()?.sandbox_uid_base();
    crate::sandboxuser::SandboxUser::claim(
        &crate::sandbox::state_root().join(".uids"),
        base,
        crate::config::SANDBOX_UID_COUNT,
        &cfg.state_dir,
    )
    .map(Some)
}

/// Opens each tap in the child, after it entered the sandbox's network namespace, as QEMU's
/// descriptor `TAP_FD_BASE + i` (QEMU's own uid could not open `/dev/net/tun`).
fn open_taps(cmd: &mut std::process::Command, nics: &[Nic]) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let mut reqs: Vec<[u8; 40]> = Vec::new();
    for nic in nics {
        if nic.tap.is_empty() || nic.tap.len() >= 16 {
            return Err(Error::Invalid(format!("tap name {:?}", nic.tap)));
        }
        // struct ifreq: the name (16 bytes, NUL-terminated), then the flags.
        let mut ifr = [0u8; 40];
        ifr[..nic.tap.len()].copy_from_slice(nic.tap.as_bytes());
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u16;
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        reqs.push(ifr);
    }
    if reqs.is_empty() {
        return Ok(());
    }
    // SAFETY: the closure runs between fork and exec and makes only async-signal-safe
    // syscalls (open, ioctl, dup2, close) on a copy of the requests it owns; it allocates
    // nothing.
    unsafe {
        cmd.pre_exec(move || {
            for (i, req) in reqs.iter_mut().enumerate() {
                let fd = libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::ioctl(fd, libc::TUNSETIFF, req.as_mut_ptr()) != 0
                    || libc::dup2(fd, TAP_FD_BASE + i as i32) < 0
                {
                    let e = std::io::Error::last_os_error();
                    libc::close(fd);
                    return Err(e);
                }
                libc::close(fd);
            }
            Ok(())
        });
    }
    Ok(())
}

impl Qemu {
    /// Starts QEMU jailed: in the sandbox's network namespace, its own mount namespace with
    /// the host's tree read-only (but for writable disks and 9p shares), `no_new_privs`, no
    /// capabilities (unless 9p shares need root's: passthrough chowns), its seccomp filter
    /// ([`QEMU_SANDBOX`]); QMP and the console reach it as descriptors.
    fn spawn_qemu(
        &self,
        cfg: &VmConfig,
        vsock: &VsockTransport,
        vmm_log: &Path,
        vhost: Vec<(Arc<OwnedFd>, i32)>,
        user: Option<(u32, u32)>,
    ) -> Result<Child> {
        let qmp_path = cfg.qmp_socket();
        let qmp = std::os::unix::net::UnixListener::bind(&qmp_path)
            .map_err(|e| Error::io("listen on", &qmp_path, e))?;
        let (console_r, console_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| Error::io("make a pipe for", cfg.console_log(), e.into()))?;
        ringlog::spawn(console_r, &cfg.console_log(), ringlog::CONSOLE_CAP)
            .map_err(|e| Error::io("create", cfg.console_log(), e))?;
        let (out, err) = capped_output(vmm_log, ringlog::VMM_LOG_CAP)?;
        let mut cmd = Command::new(&self.qemu);
        cmd.args(qemu_args(cfg, vsock))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true);
        crate::hostcgroup::enter(&mut cmd, cfg.cgroup.as_deref())?;
        die_with_parent(&mut cmd);
        if let Some(fd) = &cfg.netns {
            crate::netns::enter(cmd.as_std_mut(), fd);
        }
        open_taps(cmd.as_std_mut(), &cfg.nics)?;
        jail::pass_fd(cmd.as_std_mut(), Arc::new(OwnedFd::from(qmp)), QMP_FD);
        if let Some((uid, gid)) = user {
            // QEMU opens the pipe again through /proc/self/fd: its uid must own it.
            nix::unistd::fchown(
                std::os::fd::AsRawFd::as_raw_fd(&console_w),
                Some(uid.into()),
                Some(gid.into()),
            )
            .map_err(|e| Error::io("hand over", cfg.console_log(), e.into()))?;
        }
        jail::pass_fd(cmd.as_std_mut(), Arc::new(console_w), CONSOLE_FD);
        for (fd, target) in vhost {
            jail::pass_fd(cmd.as_std_mut(), fd, target);
        }
        for (i, d) in cfg.disks.iter().enumerate() {
            use std::os::unix::fs::OpenOptionsExt;
            let open = |write: bool| -> Result<Arc<OwnedFd>> {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(write)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(&d.path)
                    .map_err(|e| Error::io("open", &d.path, e))?;
                Ok(Arc::new(OwnedFd::from(f)))
            };
            let fd = DISK_FD_BASE + 2 * i as i32;
            jail::pass_fd(cmd.as_std_mut(), open(!d.readonly)?, fd);
            if !d.readonly {
                jail::pass_fd(cmd.as_std_mut(), open(false)?, fd + 1);
            }
        }
        let nine_p: Vec<&Share> = cfg
            .shares
            .iter()
            .filter(|s| matches!(s.transport, ShareTransport::NineP))
            .collect();
        let writable: Vec<PathBuf> = nine_p
            .iter()
            .filter(|s| !s.readonly)
            .map(|s| s.path.clone())
            .collect();
        // QEMU's file tree holds only what it opens by path: its program and libraries, the
        // kernel, initrd, 9p shares and the devices of its accelerator and vsock (made afresh,
        // owned by its uid, when it has one).
        let mut keep = vec![self.qemu.clone(), cfg.kernel.clone(), cfg.initrd.clone()];
        keep.extend(nine_p.iter().map(|s| s.path.clone()));
        if cfg.accel == Accel::Kvm {
            keep.push("/dev/kvm".into());
        }
        if let VsockTransport::Kernel { .. } = vsock {
            keep.push("/dev/vhost-vsock".into());
        }
        let staging = cfg.state_dir.join("vmm-root");
        private_dir(&staging)?;
        let mut root = jail::MinimalRoot::program(staging, keep);
        root.owner = user;
        let jail = Jail {
            mount_ns: true,
            readonly: true,
            writable,
            unprivileged: nine_p.is_empty(),
            user,
            root: Some(root),
            ..Jail::default()
        };
        jail.apply(cmd.as_std_mut())?;
        // The parent's copies of the descriptors close with `cmd`.
        cmd.spawn().map_err(|e| Error::Spawn {
            program: self.qemu.display().to_string(),
            source: e,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(accel: Accel) -> VmConfig {
        VmConfig {
            kernel: "/k/bzImage".into(),
            initrd: "/k/initrd".into(),
            disks: vec![Disk {
                path: "/img/a,b.ext4".into(),
                readonly: true,
            }],
            shares: vec![Share {
                tag: "rootfs".into(),
                path: "/var/lib/docker/x/merged".into(),
                readonly: false,
                transport: ShareTransport::NineP,
                overlay_upper: false,
                expose: Vec::new(),
                limits: Default::default(),
            }],
            nics: vec![Nic {
                tap: "avmtap0".into(),
                mac: "02:42:ac:11:00:02".into(),
            }],
            netns: None,
            memory_mib: 512,
            vcpus: 2,
            accel,
            state_dir: "/run/agentvm/x".into(),
            cmdline: vec!["agentvm.debug=1".into()],
            icount: true,
            cgroup: None,
        }
    }

    fn joined(args: &[String]) -> String {
        args.join(" ")
    }

    #[test]
    fn user_vsock_needs_shared_memory_backend() {
        let a = qemu_args(
            &cfg(Accel::Tcg),
            &VsockTransport::User {
                daemon: "/bin/true".into(),
            },
        );
        let s = joined(&a);
        assert!(s.contains("-M microvm,acpi=off,x-option-roms=off,memory-backend=mem"));
        assert!(s.contains("memory-backend-memfd,id=mem,size=512M,share=on"));
        assert!(s.contains("vhost-user-vsock-device,chardev=vsock0"));
        // QEMU gets its vhost-user connection, it does not reach the socket.
        assert!(s.contains(&format!("-chardev socket,id=vsock0,fd={VSOCK_FD}")));
        assert!(!s.contains("vhost.sock"));
        assert!(s.contains("-accel tcg,tb-size=256 -cpu max"));
        assert_eq!(
            TCG_ACCEL,
            format!("tcg,tb-size={}", crate::hostcgroup::TCG_TB_SIZE_MIB)
        );
        assert!(s.contains("-icount shift=3,sleep=off"));
        assert!(s.contains("-no-reboot"));
        // The console and QMP are descriptors; the state dir is named for cleanup.
        assert!(s.contains(&format!("file,id=console,path=/proc/self/fd/{CONSOLE_FD}")));
        assert!(s.contains(&format!("socket,id=qmp,fd={QMP_FD},server=on,wait=off")));
        assert!(s.contains("-name /run/agentvm/x "));
        assert!(s.contains(&format!("-sandbox {QEMU_SANDBOX}")));
        assert!(!s.contains("console.log") && !s.contains("qmp.sock"));
    }

    #[test]
    fn kernel_vsock_uses_cid_and_no_memfd() {
        let a = qemu_args(&cfg(Accel::Kvm), &VsockTransport::Kernel { cid: 77 });
        let s = joined(&a);
        assert!(s.contains("vhost-vsock-device,guest-cid=77"));
        assert!(!s.contains("memfd"));
        assert!(s.contains("-accel kvm -cpu host,-vmx,-svm"));
        assert!(!s.contains("icount"), "icount is TCG-only");
    }

    #[test]
    fn disks_come_as_descriptor_sets() {
        let mut c = cfg(Accel::Tcg);
        c.disks.push(Disk {
            path: "/state/init.ext4".into(),
            readonly: false,
        });
        let a = qemu_args(&c, &VsockTransport::Kernel { cid: 3 });
        let s = joined(&a);
        // A read-only disk: one read-only descriptor in set 1; a writable one: a read-write
        // and a read-only descriptor in set 2. No image path reaches QEMU.
        assert!(s.contains(&format!(
            "-add-fd fd={DISK_FD_BASE},set=1 -drive id=disk0,file=/dev/fdset/1,format=raw,\
             if=none,readonly=on,"
        )));
        assert!(s.contains(&format!(
            "-add-fd fd={},set=2 -add-fd fd={},set=2 -drive id=disk1,file=/dev/fdset/2,\
             format=raw,if=none,readonly=off,",
            DISK_FD_BASE + 2,
            DISK_FD_BASE + 3
        )));
        assert!(!s.contains("/img/") && !s.contains("init.ext4"), "{s}");
        let append = &a[a.iter().position(|s| s == "-append").unwrap() + 1];
        assert!(append.starts_with("console=ttyS0 reboot=t panic=-1"));
        assert!(append.ends_with("agentvm.debug=1"));
    }

    #[test]
    fn shares_are_virtio_9p_passthrough() {
        let a = qemu_args(&cfg(Accel::Tcg), &VsockTransport::Kernel { cid: 3 });
        let s = joined(&a);
        assert!(s.contains(
            "-fsdev local,id=fs0,path=/var/lib/docker/x/merged,security_model=passthrough -device"
        ));
        assert!(s.contains("virtio-9p-device,fsdev=fs0,mount_tag=rootfs"));
        assert!(s.contains(&format!(
            "-netdev tap,id=net0,fd={TAP_FD_BASE} -device \
             virtio-net-device,netdev=net0,mac=02:42:ac:11:00:02"
        )));
        let mut ro = cfg(Accel::Tcg);
        ro.shares[0].readonly = true;
        let s = joined(&qemu_args(&ro, &VsockTransport::Kernel { cid: 3 }));
        assert!(s.contains("security_model=passthrough,readonly=on"));
    }

    fn virtio_fs(cache: FsCache) -> ShareTransport {
        ShareTransport::VirtioFs(VirtioFs {
            daemon: "/usr/bin/virtiofsd".into(),
            cache,
        })
    }

    #[test]
    fn virtio_fs_shares_are_vhost_user_devices_on_shared_memory() {
        let mut c = cfg(Accel::Tcg);
        c.shares.push(Share {
            tag: "vol0".into(),
            path: "/home/u/project".into(),
            readonly: true,
            transport: virtio_fs(FsCache::Never),
            overlay_upper: false,
            expose: Vec::new(),
            limits: Default::default(),
        });
        // Kernel vsock alone needs no shared memory; a virtio-fs share does.
        let a = qemu_args(&c, &VsockTransport::Kernel { cid: 3 });
        let s = joined(&a);
        assert!(s.contains("-M microvm,acpi=off,x-option-roms=off,memory-backend=mem"));
        assert!(s.contains("memory-backend-memfd,id=mem,size=512M,share=on"));
        // The 9p root stays 9p next to it, device indexes stay per share.
        assert!(s.contains("virtio-9p-device,fsdev=fs0,mount_tag=rootfs"));
        assert!(s.contains(&format!(
            "-chardev socket,id=fs1,fd={} -device vhost-user-fs-device,chardev=fs1,tag=vol0",
            SHARE_FD_BASE + 1
        )));
        // Read-only is virtiofsd's job, not QEMU's (vhost-user-fs has no readonly option).
        assert!(!a
            .iter()
            .any(|x| x.contains("fs1") && x.contains("readonly")));
        // One memory backend even with vhost-user vsock as well.
        let a = qemu_args(
            &c,
            &VsockTransport::User {
                daemon: "/bin/true".into(),
            },
        );
        assert_eq!(
            a.iter()
                .filter(|x| x.contains("memory-backend-memfd"))
                .count(),
            1
        );
    }

    #[test]
    fn virtiofsd_command_line() {
        let mut share = Share {
            tag: "vol3".into(),
            path: "/srv/data".into(),
            readonly: false,
            transport: virtio_fs(FsCache::Never),
            overlay_upper: false,
            expose: Vec::new(),
            limits: Default::default(),
        };
        let fs = VirtioFs {
            daemon: "/usr/bin/virtiofsd".into(),
            cache: FsCache::Never,
        };
        let state = Path::new("/run/agentvm/abc");
        let a = virtiofsd_args(&share, &fs, state).join(" ");
        assert_eq!(
            a,
            "--socket-path /run/agentvm/abc/fs-vol3/vhost.sock --shared-dir /srv/data \
             --sandbox namespace --cache never --xattr --log-level warn --allow-mmap"
        );
        // The state dir is on the command line: cleanup_stale only kills what names it.
        assert!(a.contains(state.to_str().unwrap()));
        share.readonly = true;
        let auto = VirtioFs {
            cache: FsCache::Auto,
            ..fs
        };
        let a = virtiofsd_args(&share, &auto, state);
        assert!(a.ends_with(&["--readonly".to_string()]));
        assert!(a.windows(2).any(|w| w == ["--cache", "auto"]));
        assert!(!a.contains(&"--allow-mmap".to_string()));
        assert!(!a.iter().any(|x| x.starts_with("--modcaps")));
        // A writable layer's share keeps CAP_SYS_ADMIN for overlayfs's trusted xattrs.
        share.readonly = false;
        share.overlay_upper = true;
        let a = virtiofsd_args(&share, &auto, state);
        assert!(a.ends_with(&["--modcaps=+sys_admin".to_string()]));
        // A share that hides entries is jailed by the runtime (Landlock): virtiofsd chroots.
        share.expose = vec!["diff".into()];
        let a = virtiofsd_args(&share, &auto, state);
        assert!(a.windows(2).any(|w| w == ["--sandbox", "chroot"]));
    }

    #[test]
    fn volume_limits_follow_the_containers_capabilities() {
        let caps = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(VolumeLimits::from_bounding(None), VolumeLimits::default());
        let docker_default = caps(&["CAP_CHOWN", "CAP_FSETID", "CAP_MKNOD", "CAP_SETFCAP"]);
        assert_eq!(
            VolumeLimits::from_bounding(Some(&docker_default)),
            VolumeLimits::default()
        );
        let dropped = VolumeLimits::from_bounding(Some(&[]));
        assert!(dropped.no_devices && dropped.no_file_caps && dropped.no_setid);
        let mut share = Share {
            tag: "vol0".into(),
            path: "/srv/data".into(),
            readonly: false,
            transport: virtio_fs(FsCache::Never),
            overlay_upper: false,
            expose: Vec::new(),
            limits: dropped,
        };
        let fs = VirtioFs {
            daemon: "/usr/bin/virtiofsd".into(),
            cache: FsCache::Never,
        };
        let a = virtiofsd_args(&share, &fs, Path::new("/run/agentvm/x"));
        assert!(
            a.ends_with(&["--modcaps=-mknod:-setfcap".to_string()]),
            "{a:?}"
        );
        share.limits = VolumeLimits::from_bounding(Some(&caps(&["CAP_MKNOD"])));
        let a = virtiofsd_args(&share, &fs, Path::new("/run/agentvm/x"));
        assert!(a.ends_with(&["--modcaps=-setfcap".to_string()]), "{a:?}");
        assert!(
            share_jail(&share, Path::new("/run/agentvm/x"))
                .unwrap()
                .deny_setid
        );
    }

    #[test]
    fn cache_policies_parse() {
        for c in ["never", "auto", "metadata", "always"] {
            assert_eq!(FsCache::parse(c).unwrap().as_str(), c);
        }
        assert_eq!(FsCache::parse("sometimes"), None);
    }

    #[test]
    fn random_cids_avoid_reserved_values() {
        for _ in 0..100 {
            assert!(random_cid() >= 3);
        }
    }
}
