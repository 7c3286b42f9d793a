//! A container: one sandbox (VM) and its init process, with the lifecycle a containerd shim
//! drives: [`Container::create`] boots the VM, [`Container::start`] runs the process, and the
//! returned [`Running`] handle signals it, resizes its terminal, closes its stdin and waits
//! for its exit and for the VM's teardown.
//!
//! The exit is reported as soon as the agent sends it, before the VM powers off, so a caller
//! can publish it without waiting for the (slow, under TCG) teardown.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use agentvm_protocol::{
    tokio_io, Frame, GuestStats, Message, MountSpec, NetworkSpec, ProcessSpec, RootfsSpec,
    StartRequest, Stream,
};
use oci_spec::runtime::Hooks;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

use crate::accel::{self, AccelChoice};
use crate::assets::Assets;
use crate::error::{Error, Result};
use crate::hostcgroup::{self, HostCgroup};
use crate::netns::{Netns, NetnsMode};
use crate::sandbox::{spawn_frame_reader, spawn_input_pump, AgentConn, Sandbox, SandboxConfig};
use crate::vmm::{Accel, Disk, FsCache, Nic, Share, ShareTransport, VirtioFs};
use crate::{assets, dns, hooks, layers, mounts};

/// The mount tag of the container's root directory share.
const ROOT_TAG: &str = "rootfs";
/// How long the VM may take to power off by itself before it is killed.
const TEARDOWN_GRACE: Duration = Duration::from_secs(5);
/// After a SIGKILL is forwarded, how long the agent gets to report the exit before the VM
/// itself is killed (a wedged guest must not make `docker kill` hang).
const KILL_GRACE: Duration = Duration::from_secs(5);
/// How long the agent may take to accept a connection for an exec process.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// The container's network namespace.
    pub netns: NetnsMode,
    /// The spec's mounts (mapped by [`crate::mounts::plan`] at start).
    pub mounts: Vec<oci_spec::runtime::Mount>,
    /// The spec's hooks.
    pub hooks: Option<Hooks>,
    /// The spec's `linux.sysctl`, applied in the guest.
    pub sysctls: BTreeMap<String, String>,
    /// For hook states: the container id, bundle and annotations.
    pub container_id: String,
    pub bundle: String,
    pub annotations: HashMap<String, String>,
    /// The host cgroup QEMU and its helpers are charged to (`linux.cgroupsPath` and the CPU
    /// asks of the spec); none leaves them in the caller's.
    pub host_cgroup: Option<hostcgroup::Request>,
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
    /// The guest's OOM killer ended the process.
    pub oom: bool,
}

/// A created container: its state dir and network namespace exist and the create hooks ran;
/// the VM boots at [`Container::start`], once the namespace holds its interfaces (Docker 28
/// plumbs them only after create returns).
#[derive(Debug)]
pub struct Container {
    sandbox: Sandbox,
    netns: Netns,
    cfg: ContainerConfig,
    assets: Assets,
    accel: Accel,
    cgroup: Option<Arc<HostCgroup>>,
}

/// What the init process's driver owns and tears down after the exit.
struct Owner {
    sandbox: Sandbox,
    netns: Option<Netns>,
    down: watch::Sender<bool>,
    /// The host's mount of a layered root, kept fresh while the VM runs.
    host_view: Option<layers::HostView>,
    /// Removed once the VM and the namespace holder are gone.
    cgroup: Option<Arc<HostCgroup>>,
}

/// How often the refresher looks whether the guest or the host changed a layered root behind
/// the other's back: about the longest a `docker diff`, `docker cp` or `docker export` of a
/// running container lags behind what the workload wrote, and a `docker cp` into it behind
/// what the workload sees.
const HOST_VIEW_REFRESH: Duration = Duration::from_secs(1);

/// A task keeping both views of a layered root fresh while the VM runs. Every
/// [`HOST_VIEW_REFRESH`] it looks at both overlays' work dirs, which change with every
/// copy-up or deletion of an image file: when the guest's changed, it mounts the host's view
/// afresh (so `docker diff` sees the guest's writes); when the host's changed (`docker cp`
/// into the container), it has the guest forget its cached directory entries.
struct Refresher {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Refresher {
    fn spawn(
        view: layers::HostView,
        vm: mpsc::UnboundedSender<Control>,
        shared: Arc<VmShared>,
    ) -> Refresher {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let (mut host_seen, mut guest_seen) = (view.host_writes(), view.guest_writes());
            let mut forget = false;
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    _ = tokio::time::sleep(HOST_VIEW_REFRESH) => {}
                }
                // A copy-up by the host changes its work dir's mtime; a remount (ours, at a
                // pause too) makes the dir anew, another inode: no host write.
                let host = view.host_writes();
                if let (Some(seen), Some(now)) = (host_seen, host) {
                    forget |= seen.0 == now.0 && seen != now;
                }
                let guest = view.guest_writes();
                if guest != guest_seen {
                    guest_seen = guest;
                    refresh_view(&view).await;
                }
                host_seen = view.host_writes();
                // A paused guest cannot answer: after the resume.
                if forget && !shared.paused.load(Ordering::SeqCst) {
                    tokio::select! {
                        _ = stopped.changed() => break,
                        r = forget_guest_caches(&vm) => {
                            if let Err(e) = r {
                                tracing::warn!("have the guest forget its cached root: {e}");
                            }
                            forget = false;
                        }
                    }
                }
            }
        });
        Refresher { stop, task }
    }

    /// Stops refreshing; returns once no refresh is in flight, so the engine can unmount
    /// the root after the exit without a refresh mounting it again.
    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn forget_guest_caches(vm: &mpsc::UnboundedSender<Control>) -> Result<()> {
    let gone = || Error::Invalid("the container's init process has exited".into());
    let (tx, rx) = oneshot::channel();
    vm.send(Control::Connect(tx)).map_err(|_| gone())?;
    let mut conn = rx.await.unwrap_or_else(|_| Err(gone()))?;
    conn.send(&Frame::Msg(Message::ForgetCaches)).await?;
    match tokio::time::timeout(CONNECT_TIMEOUT, conn.recv()).await {
        Ok(Ok(Some(Frame::Msg(Message::Ready)))) => Ok(()),
        Ok(other) => Err(Error::Agent(format!("expected ready, got {other:?}"))),
        Err(_) => Err(Error::Agent("the agent did not answer".into())),
    }
}

async fn refresh_view(view: &layers::HostView) {
    let v = view.clone();
    match tokio::task::spawn_blocking(move || v.refresh()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("refresh the host view of the container root: {e}"),
        Err(e) => tracing::warn!("refresh the host view of the container root: {e}"),
    }
}

impl Container {
    /// Checks the assets, creates the state dir and the network namespace (with its holder
    /// process, the task pid) and runs the `createRuntime` and `prestart` hooks. Nothing is
    /// left behind on failure.
    pub async fn create(cfg: ContainerConfig) -> Result<Container> {
        let assets = Assets::locate()?;
        if !cfg.root.is_dir() {
            return Err(Error::Invalid(format!(
                "container root {} is not a directory",
                cfg.root.display()
            )));
        }
        let (accel, warning) = accel::resolve(cfg.accel, &assets).await?;
        if accel == Accel::Tcg && !crate::config::HostConfig::load()?.allow_tcg {
            return Err(crate::config::tcg_refused(
                warning.as_deref().unwrap_or("TCG was asked for"),
            ));
        }
        if let Some(w) = warning {
            tracing::warn!("{w}");
        }
        let mut sandbox = Sandbox::prepare(&cfg.id)?;
        let cgroup = match &cfg.host_cgroup {
            Some(req) => {
                // A few small writes to cgroupfs: fine on the runtime.
                let made = req.create(&cfg.id, cfg.memory_mib, cfg.vcpus, accel);
                let made = match made {
                    Ok(m) => m,
                    Err(e) => {
                        sandbox.destroy(TEARDOWN_GRACE).await;
                        return Err(e.into());
                    }
                };
                if let Some(cg) = &made {
                    if let Err(e) = sandbox.set_cgroup(Arc::clone(cg)) {
                        sandbox.destroy(TEARDOWN_GRACE).await;
                        remove_cgroup(made).await;
                        return Err(e);
                    }
                }
                made
            }
            None => None,
        };
        let netns = match Netns::create(&cfg.netns, &sandbox.state_dir) {
            Ok(n) => n,
            Err(e) => {
                sandbox.destroy(TEARDOWN_GRACE).await;
                remove_cgroup(cgroup).await;
                return Err(e);
            }
        };
        let container = Container {
            sandbox,
            netns,
            cfg,
            assets,
            accel,
            cgroup,
        };
        if let Err(e) = container.setup().await {
            container.destroy().await;
            return Err(e);
        }
        Ok(container)
    }

    async fn setup(&self) -> Result<()> {
        self.sandbox.record_pids(&[self.netns.pid()])?;
        // The holder is the task pid: the engine finds the container's cgroup through it.
        if let Some(cg) = &self.cgroup {
            cg.add_pid(self.netns.pid())?;
        }
        if let Some(h) = &self.cfg.hooks {
            hooks::warn_unsupported(h);
        }
        let ctx = self.hook_context();
        hooks::run(self.cfg.hooks.as_ref(), hooks::Phase::CreateRuntime, &ctx).await?;
        hooks::run(self.cfg.hooks.as_ref(), hooks::Phase::Prestart, &ctx).await
    }

    fn hook_context(&self) -> hooks::HookContext {
        hooks::HookContext {
            id: self.cfg.container_id.clone(),
            bundle: self.cfg.bundle.clone(),
            pid: self.netns.pid(),
            annotations: self.cfg.annotations.clone(),
        }
    }

    /// The task pid containerd and Docker see: the network namespace holder, a host process
    /// living in the container's network namespace.
    pub fn pid(&self) -> u32 {
        self.netns.pid()
    }

    /// Boots the VM wired to the namespace's interfaces, with the bundle's mounts, and starts
    /// the init process with `io`. On success the process runs; on failure (the VM did not
    /// boot, the agent could not start the process) the error says why, and the returned
    /// handle still reports the exit (e.g. 127) and the teardown.
    pub async fn start(self, io: ProcessIo) -> (Running, Result<i32>) {
        let Container {
            mut sandbox,
            netns,
            cfg,
            assets,
            accel,
            cgroup,
        } = self;
        let pid = netns.pid();
        let hook_ctx = hooks::HookContext {
            id: cfg.container_id.clone(),
            bundle: cfg.bundle.clone(),
            pid,
            annotations: cfg.annotations.clone(),
        };
        let prepared = boot(&mut sandbox, &netns, &cfg, &assets, accel).await;
        let (down_tx, down_rx) = watch::channel(false);
        let host_view = prepared.as_ref().ok().and_then(|p| p.2.clone());
        let owner = Owner {
            sandbox,
            netns: Some(netns),
            down: down_tx,
            host_view: host_view.clone(),
            cgroup,
        };
        let (conn, request) = match prepared {
            Ok((conn, request, _)) => (Ok(conn), request),
            Err(e) => {
                tracing::error!("start: {e}");
                // Never sent: the VM is not there.
                let (_, rootfs) = mounts::root_share(
                    ROOT_TAG,
                    &cfg.root,
                    cfg.root_readonly,
                    &mounts::SharePolicy::nine_p(),
                );
                (Err(e), start_request(&cfg, None, Vec::new(), rootfs))
            }
        };
        let shared = Arc::new(VmShared {
            qmp: owner.sandbox.state_dir.join("qmp.sock"),
            paused: AtomicBool::new(false),
            memory_mib: cfg.memory_mib,
            host_view,
        });
        let link = VmLink {
            vm: None,
            torn_down: down_rx,
            shared,
        };
        let r = launch(conn, request, io, pid, Some(owner), link).await;
        if r.1.is_ok() {
            hooks::run(cfg.hooks.as_ref(), hooks::Phase::Poststart, &hook_ctx)
                .await
                .ok();
        }
        r
    }

    /// Tears down what create made without running anything (delete before start).
    pub async fn destroy(self) {
        self.netns.destroy().await;
        self.sandbox.destroy(TEARDOWN_GRACE).await;
        remove_cgroup(self.cgroup).await;
    }
}

/// Removes the sandbox's host cgroup once everything in it has ended (off the runtime: it
/// may wait for exiting processes).
async fn remove_cgroup(cgroup: Option<Arc<HostCgroup>>) {
    let Some(cg) = cgroup else { return };
    match tokio::task::spawn_blocking(move || cg.remove()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("{e}"),
        Err(e) => tracing::warn!("remove the host cgroup: {e}"),
    }
}

/// The init process's start request.
fn start_request(
    cfg: &ContainerConfig,
    network: Option<NetworkSpec>,
    mounts: Vec<MountSpec>,
    rootfs: RootfsSpec,
) -> StartRequest {
    StartRequest {
        rootfs,
        process: cfg.process.clone(),
        hostname: cfg.hostname.clone(),
        init: true,
        network,
        mounts,
        sysctls: cfg.sysctls.clone(),
    }
}

/// Wires the namespace, maps the mounts, boots the VM and starts the DNS relay when the
/// container uses Docker's resolver.
async fn boot(
    sandbox: &mut Sandbox,
    netns: &Netns,
    cfg: &ContainerConfig,
    assets: &Assets,
    accel: Accel,
) -> Result<(AgentConn, StartRequest, Option<layers::HostView>)> {
    let policy = mounts::SharePolicy::detect(&cfg.annotations)?;
    let plan = mounts::plan(&cfg.mounts, &policy)?;
    let mut wiring = netns.scan().await?;
    netns.wire(&mut wiring).await?;
    let (root, disks, rootfs, host_view) = root_setup(cfg, &policy, &sandbox.state_dir).await?;
    let mut shares = vec![root];
    shares.extend(plan.shares.iter().cloned());
    let sandbox_cfg = SandboxConfig {
        id: cfg.id.clone(),
        disks,
        shares,
        nics: wiring
            .interfaces
            .iter()
            .zip(&wiring.taps)
            .map(|(i, tap)| Nic {
                tap: tap.clone(),
                mac: i.mac.clone(),
            })
            .collect(),
        netns: Some(netns.fd()),
        memory_mib: cfg.memory_mib,
        vcpus: cfg.vcpus,
        accel,
        boot_timeout: cfg.boot_timeout,
        icount: false,
        debug: cfg.debug,
    };
    let conn = sandbox.launch(&sandbox_cfg, assets).await?;
    if plan.uses_docker_dns() {
        let relay_conn = sandbox.connect().await?;
        let socket = netns.udp_socket()?;
        let upstream = std::net::SocketAddr::from(([127, 0, 0, 11], 53));
        // The relay task ends when its agent connection closes with the VM.
        dns::start_relay(relay_conn, socket, upstream).await?;
    }
    let network = (!wiring.interfaces.is_empty()).then(|| wiring.network_spec());
    let mut request = start_request(cfg, network, plan.mounts, rootfs);
    for iface in &wiring.interfaces {
        // Docker turns IPv6 off on the veth of a network without it; so does the guest.
        if !iface.name.contains('.') && netns.ipv6_disabled(&iface.name).await {
            request.sysctls.insert(
                format!("net.ipv6.conf.{}.disable_ipv6", iface.name),
                "1".into(),
            );
        }
    }
    Ok((conn, request, host_view))
}

/// How the container root reaches the VM: image layers on disks under the shared writable
/// layer ([`layers`]) where the root is an overlay and virtiofsd is installed (or the
/// annotation asks for it), else the whole root shared.
async fn root_setup(
    cfg: &ContainerConfig,
    policy: &mounts::SharePolicy,
    state_dir: &std::path::Path,
) -> Result<(Share, Vec<Disk>, RootfsSpec, Option<layers::HostView>)> {
    let mode = layers::RootMode::from_annotations(&cfg.annotations)?;
    if mode != layers::RootMode::Share {
        let daemon = assets::virtiofsd().ok();
        let prepared = match daemon {
            Some(_) => {
                let (root, state) = (cfg.root.clone(), state_dir.to_path_buf());
                let cache = agentvm_image::cache::default_dir();
                // Building an image's layers takes seconds the first time: off the runtime.
                tokio::task::spawn_blocking(move || {
                    let Some(view) = layers::HostView::find(&root) else {
                        return Ok(None);
                    };
                    let Some(layered) = layers::prepare(&view, &cache, &state)? else {
                        return Ok(None);
                    };
                    // The engine looked into its mount of the root while creating the
                    // container (/etc, the working dir): start the VM with a fresh one.
                    view.refresh()?;
                    Ok(Some((layered, Some(view))))
                })
                .await
                .map_err(|e| Error::Invalid(format!("layers image build: {e}")))?
            }
            None => Err(Error::Missing {
                what: "virtiofsd".into(),
                hint: format!(
                    "annotation {}=layers shares the writable layer over virtio-fs: cargo \
                     install virtiofsd (or run hack/install-deps.sh)",
                    layers::ROOTFS_ANNOTATION
                ),
            }),
        };
        match (prepared, mode) {
            (Ok(Some((l, view))), _) => {
                let (share, disks, spec) = layered_root(cfg, policy, l, daemon);
                return Ok((share, disks, spec, view));
            }
            (Ok(None), layers::RootMode::Layers) => {
                return Err(Error::Invalid(format!(
                    "annotation {}=layers: the container root {} is not an overlay with a \
                     writable layer",
                    layers::ROOTFS_ANNOTATION,
                    cfg.root.display()
                )))
            }
            (Err(e), layers::RootMode::Layers) => return Err(e),
            (Err(e), _) if daemon.is_some() => {
                tracing::warn!("container root: sharing the whole root instead of layers: {e}")
            }
            _ => {}
        }
    }
    let (share, spec) = mounts::root_share(ROOT_TAG, &cfg.root, cfg.root_readonly, policy);
    Ok((share, Vec::new(), spec, None))
}

/// The share, disks and guest spec of a layered root.
fn layered_root(
    cfg: &ContainerConfig,
    policy: &mounts::SharePolicy,
    l: layers::LayeredRoot,
    daemon: Option<std::path::PathBuf>,
) -> (Share, Vec<Disk>, RootfsSpec) {
    // `auto` unless annotated: the guest's writes still reach the host at once (virtiofsd
    // writes through), and the host's rarely come, are seen within its 1 s timeouts, and
    // make the guest forget its cache (Refresher). `never` made every lookup a round trip:
    // `ls -lR /usr` took 4.7x as long (docs/benchmarks.md).
    let cache = match &policy.volumes {
        ShareTransport::VirtioFs(v) if cfg.annotations.contains_key(mounts::CACHE_ANNOTATION) => {
            v.cache
        }
        _ => FsCache::Auto,
    };
    let share = Share {
        tag: ROOT_TAG.into(),
        path: l.share_dir,
        readonly: cfg.root_readonly,
        transport: ShareTransport::VirtioFs(VirtioFs {
            daemon: daemon.unwrap_or_default(),
            cache,
        }),
        overlay_upper: !cfg.root_readonly,
        // Docker's `link`, `lower`, `work` and `merged` (containerd's `work`) sit beside the
        // writable layer: the guest reaches the layer and agentvm's work dir only.
        expose: vec![l.upper.clone(), layers::GUEST_WORKDIR.into()],
    };
    let lower = (0..l.disks.len())
        .map(|i| format!("/dev/vd{}", (b'a' + i as u8) as char))
        .collect();
    let disks = l
        .disks
        .into_iter()
        .map(|path| Disk {
            path,
            readonly: true,
        })
        .collect();
    let spec = RootfsSpec {
        device: "layers".into(),
        fstype: "overlay".into(),
        overlay: false,
        options: None,
        layers: Some(agentvm_protocol::LayeredRoot {
            lower,
            tag: ROOT_TAG.into(),
            fstype: "virtiofs".into(),
            options: None,
            upper: l.upper,
            work: layers::GUEST_WORKDIR.into(),
            readonly: cfg.root_readonly,
        }),
    };
    (share, disks, spec)
}

/// How a process reaches the VM it runs in.
struct VmLink {
    /// Control channel of the init process's driver (none: this is the init process).
    vm: Option<mpsc::UnboundedSender<Control>>,
    torn_down: watch::Receiver<bool>,
    shared: Arc<VmShared>,
}

/// Runs `request` over `conn` in a driver task. The driver of the init process owns the
/// sandbox (`owner`): it tears the VM down after the exit and opens the connections of exec
/// processes.
async fn launch(
    conn: Result<AgentConn>,
    request: StartRequest,
    io: ProcessIo,
    pid: u32,
    owner: Option<Owner>,
    link: VmLink,
) -> (Running, Result<i32>) {
    let VmLink {
        vm,
        torn_down,
        shared,
    } = link;
    let (exit_tx, exit_rx) = watch::channel(None);
    let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
    let refresher_ctl = ctl_tx.clone();
    let refresher_shared = shared.clone();
    let running = Running {
        pid,
        rootfs: Arc::new(request.rootfs.clone()),
        vm: vm.unwrap_or_else(|| ctl_tx.clone()),
        ctl: ctl_tx,
        exit: exit_rx,
        torn_down,
        shared,
    };
    let (started_tx, started_rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut sandbox, netns, down_tx, host_view, cgroup) = match owner {
            Some(o) => (
                Some(o.sandbox),
                o.netns,
                Some(o.down),
                o.host_view,
                o.cgroup,
            ),
            None => (None, None, None, None, None),
        };
        let shared_layer = host_view.clone();
        let refresher = host_view.map(|v| Refresher::spawn(v, refresher_ctl, refresher_shared));
        let send = match conn {
            Ok(mut conn) => conn
                .send(&Frame::Msg(Message::Start(Box::new(request))))
                .await
                .map(|()| conn),
            Err(e) => Err(e),
        };
        let (code, oom) = match send {
            Ok(conn) => drive(sandbox.as_mut(), conn, io, ctl_rx, started_tx).await,
            Err(e) => {
                let _ = started_tx.send(Err(e));
                (255, false)
            }
        };
        // Before the exit is known: the engine unmounts the root after it.
        if let Some(r) = refresher {
            r.stop().await;
        }
        // The guest wrote beside the engine's files: say so if what the engine will now
        // walk and remove is not what was shared (the share's jail should make it impossible).
        if let Some(v) = &shared_layer {
            if let Err(e) = v.untouched() {
                tracing::error!("container root after the exit: {e}");
            }
        }
        let _ = exit_tx.send(Some(Exit {
            code,
            at: SystemTime::now(),
            oom,
        }));
        if let Some(sandbox) = sandbox {
            sandbox.destroy(TEARDOWN_GRACE).await;
        }
        // The VM and its virtiofsd are gone: nothing races the shared dir any more.
        if let Some(v) = &shared_layer {
            if v.untouched().is_ok() {
                if let Err(e) = v.restore_share_dir() {
                    tracing::warn!("container root: {e}");
                }
            }
        }
        if let Some(netns) = netns {
            netns.destroy().await;
        }
        remove_cgroup(cgroup).await;
        if let Some(down_tx) = down_tx {
            let _ = down_tx.send(true);
        }
    });
    let started = started_rx
        .await
        .unwrap_or_else(|_| Err(Error::Agent("the process driver ended".into())));
    (running, started)
}

enum Control {
    Signal(i32),
    Resize {
        rows: u16,
        cols: u16,
    },
    CloseStdin,
    /// Open another agent connection (for an exec process).
    Connect(oneshot::Sender<Result<AgentConn>>),
}

/// A started process: the init process or an exec process in the same VM.
#[derive(Debug, Clone)]
pub struct Running {
    pid: u32,
    rootfs: Arc<RootfsSpec>,
    /// Control channel of the init process's driver, which owns the sandbox.
    vm: mpsc::UnboundedSender<Control>,
    ctl: mpsc::UnboundedSender<Control>,
    exit: watch::Receiver<Option<Exit>>,
    torn_down: watch::Receiver<bool>,
    shared: Arc<VmShared>,
}

/// State of the VM shared by its init and exec processes.
#[derive(Debug)]
struct VmShared {
    /// The VMM's QMP socket.
    qmp: PathBuf,
    paused: AtomicBool,
    /// The VM's RAM, fixed at boot: the ceiling of `docker update --memory`.
    memory_mib: u32,
    /// The host's mount of a layered root, refreshed when the VM pauses.
    host_view: Option<layers::HostView>,
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

    /// Runs another process in the container (`docker exec`) over a new agent connection.
    /// As [`Container::start`]: the handle reports the exit even when the start failed.
    /// The process ends at the latest with the VM.
    pub async fn exec(&self, process: ProcessSpec, io: ProcessIo) -> (Running, Result<i32>) {
        let gone = || Error::Invalid("the container's init process has exited".into());
        let (tx, rx) = oneshot::channel();
        let conn = match self.vm.send(Control::Connect(tx)) {
            Ok(()) => rx.await.unwrap_or_else(|_| Err(gone())),
            Err(_) => Err(gone()),
        };
        let request = StartRequest {
            rootfs: (*self.rootfs).clone(),
            process,
            hostname: None,
            init: false,
            network: None,
            mounts: Vec::new(),
            sysctls: Default::default(),
        };
        launch(
            conn,
            request,
            io,
            self.pid,
            None,
            VmLink {
                vm: Some(self.vm.clone()),
                torn_down: self.torn_down.clone(),
                shared: Arc::clone(&self.shared),
            },
        )
        .await
    }

    /// Freezes the whole VM (every vCPU), as `docker pause` freezes a runc container's
    /// processes. Signals sent meanwhile are delivered on resume.
    pub async fn pause(&self) -> Result<()> {
        if self.exited().is_some() {
            return Err(Error::Invalid("the process has already exited".into()));
        }
        crate::qmp::execute(&self.shared.qmp, "stop").await?;
        self.shared.paused.store(true, Ordering::SeqCst);
        // `docker commit` pauses, then reads the root: show it everything written so far.
        if let Some(v) = &self.shared.host_view {
            refresh_view(v).await;
        }
        Ok(())
    }

    /// Lets a paused VM run again.
    pub async fn resume(&self) -> Result<()> {
        crate::qmp::execute(&self.shared.qmp, "cont").await?;
        self.shared.paused.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Resource usage of the whole VM, asked of the agent over a connection of its own.
    pub async fn stats(&self) -> Result<GuestStats> {
        let gone = || Error::Invalid("the container's init process has exited".into());
        let (tx, rx) = oneshot::channel();
        self.vm.send(Control::Connect(tx)).map_err(|_| gone())?;
        let mut conn = rx.await.unwrap_or_else(|_| Err(gone()))?;
        conn.send(&Frame::Msg(Message::Stats)).await?;
        match tokio::time::timeout(CONNECT_TIMEOUT, conn.recv()).await {
            Ok(Ok(Some(Frame::Msg(Message::StatsReply(s))))) => Ok(s),
            Ok(other) => Err(Error::Agent(format!("expected stats, got {other:?}"))),
            Err(_) => Err(Error::Agent(
                "the agent did not answer a stats request".into(),
            )),
        }
    }

    /// Sets the cgroup limits of the container's processes in the guest (`docker update`).
    /// A memory limit above the VM's RAM is refused: that is fixed at boot. Returns the
    /// limits the guest has no file for (`memory.swap.max` without swap).
    pub async fn update(&self, limits: agentvm_protocol::ResourceLimits) -> Result<Vec<String>> {
        crate::resources::check_memory(&limits, self.shared.memory_mib)?;
        let gone = || Error::Invalid("the container's init process has exited".into());
        let (tx, rx) = oneshot::channel();
        self.vm.send(Control::Connect(tx)).map_err(|_| gone())?;
        let mut conn = rx.await.unwrap_or_else(|_| Err(gone()))?;
        conn.send(&Frame::Msg(Message::Update(limits))).await?;
        match tokio::time::timeout(CONNECT_TIMEOUT, conn.recv()).await {
            Ok(Ok(Some(Frame::Msg(Message::Updated { skipped })))) => Ok(skipped),
            Ok(Ok(Some(Frame::Msg(Message::Error { message, .. })))) => Err(Error::Agent(message)),
            Ok(other) => Err(Error::Agent(format!("expected updated, got {other:?}"))),
            Err(_) => Err(Error::Agent(
                "the agent did not answer an update request".into(),
            )),
        }
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.shared.paused.load(Ordering::SeqCst)
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
                oom: false,
            },
        }
    }

    /// Resolves when the VM is gone and its state directory removed.
    pub async fn wait_torn_down(&self) {
        let mut rx = self.torn_down.clone();
        let _ = rx.wait_for(|d| *d).await;
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
async fn vmm_exited(sandbox: &mut Option<&mut Sandbox>) -> String {
    match sandbox {
        Some(s) => s.vmm_exited().await,
        None => std::future::pending().await,
    }
}

/// Relays stdio and control until the process exits; returns its exit code. Reports the
/// start outcome through `started`. `sandbox` is given to the init process's driver only.
async fn drive(
    mut sandbox: Option<&mut Sandbox>,
    conn: AgentConn,
    io: ProcessIo,
    mut ctl: mpsc::UnboundedReceiver<Control>,
    started: oneshot::Sender<Result<i32>>,
) -> (i32, bool) {
    let AgentConn { reader, mut writer } = conn;
    let mut started = Some(started);
    let report = |started: &mut Option<oneshot::Sender<Result<i32>>>, r: Result<i32>| {
        if let Some(tx) = started.take() {
            let _ = tx.send(r);
        }
    };
    let (mut frames, reader_task) = spawn_frame_reader(reader);
    let mut stdin_open = io.stdin.is_some();
    let (mut stdin_rx, stdin_task) = match io.stdin {
        Some(src) => {
            let (rx, task) = spawn_input_pump(src);
            (rx, Some(task))
        }
        None => (mpsc::channel(1).1, None),
    };
    if !stdin_open {
        let _ = tokio_io::write_frame(&mut writer, &Frame::Data(Stream::Stdin, Vec::new())).await;
    }
    let mut stdout = io.stdout;
    let mut stderr = io.stderr;
    let mut setup_error: Option<String> = None;
    let mut kill_deadline: Option<tokio::time::Instant> = None;
    let mut ctl_open = true;
    let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
    let (code, oom) = loop {
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
                Some(Ok(Some(Frame::Msg(Message::Exited(st))))) => break (st.code, st.oom),
                Some(Ok(Some(other))) => tracing::debug!("ignoring frame {other:?}"),
                Some(Ok(None)) | Some(Err(_)) | None => {
                    if let Some(sandbox) = sandbox.as_deref_mut() {
                        let why = tokio::time::timeout(Duration::from_secs(3), sandbox.vmm_exited())
                            .await
                            .unwrap_or_else(|_| "the agent connection closed".into());
                        tracing::warn!("the VM ended without reporting an exit ({why}):\n{}", sandbox.diagnostics());
                        if let Some(exit) = host_oom(sandbox) {
                            break exit;
                        }
                    } else {
                        tracing::info!("the agent connection of an exec process closed without an exit");
                    }
                    break (if kill_deadline.is_some() { 128 + libc::SIGKILL } else { 255 }, false);
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
                Some(Control::Connect(reply)) => {
                    let conn = match sandbox.as_deref_mut() {
                        Some(s) => tokio::time::timeout(CONNECT_TIMEOUT, s.connect())
                            .await
                            .unwrap_or_else(|_| Err(Error::Agent("the agent did not answer a new connection".into()))),
                        None => Err(Error::Invalid("not the init process".into())),
                    };
                    let _ = reply.send(conn);
                }
                // Every handle is gone: only the process or the VM can end this now.
                None => ctl_open = false,
            },
            st = vmm_exited(&mut sandbox) => {
                let diagnostics = sandbox.as_deref().map(Sandbox::diagnostics).unwrap_or_default();
                tracing::warn!("QEMU exited ({st}) before the process reported an exit:\n{diagnostics}");
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
    (code, oom)
}
