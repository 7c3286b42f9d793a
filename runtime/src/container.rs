//! A container: one sandbox (VM) and its init process, with the lifecycle a containerd shim
//! drives: [`Container::create`] boots the VM, [`Container::start`] runs the process, and the
//! returned [`Running`] handle signals it, resizes its terminal, closes its stdin and waits
//! for its exit and for the VM's teardown.
//!
//! The exit is reported as soon as the agent sends it, before the VM powers off, so a caller
//! can publish it without waiting for the (slow, under TCG) teardown.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use agentvm_protocol::{
    Frame, GuestStats, Message, MountSpec, NetworkSpec, ProcessSpec, RootfsSpec, StartRequest,
};
use oci_spec::runtime::Hooks;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, watch};

use crate::accel::{self, AccelChoice};
use crate::assets::Assets;
use crate::error::{Error, Result};
use crate::guest::{self, Dialer, GuestLog};
use crate::hostcgroup::{self, HostCgroup};
use crate::netns::{Netns, NetnsMode};
use crate::sandbox::{AgentConn, Sandbox, SandboxConfig};
use crate::session::{drive, Control, DriveLink, Ending, CONNECT_TIMEOUT};
use crate::vmm::{Accel, Disk, FsCache, Nic, Share, ShareTransport, VirtioFs};
use crate::{assets, dns, hooks, layers, mounts};

/// The mount tag of the container's root directory share.
const ROOT_TAG: &str = "rootfs";
/// How long the VM may take to power off by itself before it is killed.
const TEARDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long a request/reply exchange with the agent (stats, update, forget caches) may take
/// as a whole, the connect included.
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the agent may take to confirm an exec process's start (`Started` or an error).
const EXEC_START_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// What writable volumes may not leave on the host (from the spec's capabilities).
    pub volume_limits: crate::vmm::VolumeLimits,
    /// The container's secrets, decrypted ([`crate::secrets`]): sent with the init's start
    /// request, nowhere else (their `Debug` shows no value).
    pub secrets: Vec<agentvm_protocol::SecretSpec>,
    /// The VMM backend. None: QEMU, on the host's plumbing (assets, a network namespace, a
    /// host cgroup). A test backend ([`crate::fakevm`]) gets none of that plumbing: no
    /// network namespace (the task pid is the calling process's), no host cgroup, no
    /// acceleration check, the root and the bundle's mounts shared as they are (no layers,
    /// egress policy, DNS relay or port forwarding), a pod share that is a plain directory.
    pub backend: Option<Arc<dyn crate::vmm::VmmBackend>>,
    /// The spec's masked and read-only paths, as the confinement policy leaves them
    /// ([`crate::oci::confinement`]): applied in the guest before the init runs.
    pub masked_paths: Vec<String>,
    pub readonly_paths: Vec<String>,
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
    /// None on a test backend ([`ContainerConfig::backend`]).
    netns: Option<Netns>,
    cfg: ContainerConfig,
    /// None on a test backend.
    assets: Option<Assets>,
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
            let mut guest_seen = view.guest_writes();
            let mut forget = false;
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    _ = tokio::time::sleep(HOST_VIEW_REFRESH) => {}
                }
                forget |= shared.host_wrote(&view);
                let guest = view.guest_writes();
                if guest != guest_seen {
                    guest_seen = guest;
                    refresh_view(&view).await;
                    // Our remount made the work dir anew: not a host write.
                    *shared.host_seen.lock().unwrap_or_else(|p| p.into_inner()) =
                        view.host_writes();
                }
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

impl VmShared {
    fn vm(&self) -> Result<&dyn crate::vmm::VmHandle> {
        self.vm
            .as_deref()
            .ok_or_else(|| Error::Invalid("this process has no VM to pause or resume".into()))
    }

    /// Whether the host wrote into the shared root since the last look (and notes that it
    /// looked). A copy-up by the host changes its overlay's work dir's mtime; a remount (ours,
    /// at a pause too) makes the dir anew, another inode: no host write.
    fn host_wrote(&self, view: &layers::HostView) -> bool {
        let now = view.host_writes();
        let mut seen = self.host_seen.lock().unwrap_or_else(|p| p.into_inner());
        let wrote = matches!((*seen, now), (Some(s), Some(n)) if s.0 == n.0 && s != n);
        *seen = now;
        wrote
    }

    /// Before an exec: when the host wrote into the root since the refresher last looked
    /// (`docker cp` then `docker exec` at once), the guest forgets its cached root first, so
    /// the exec sees the host's write (as under runc) instead of up to a second later.
    async fn catch_up(&self, vm: &mpsc::UnboundedSender<Control>) {
        let Some(view) = &self.host_view else {
            return;
        };
        if self.paused.load(Ordering::SeqCst) || !self.host_wrote(view) {
            return;
        }
        if let Err(e) = forget_guest_caches(vm).await {
            tracing::warn!("have the guest forget its cached root before an exec: {e}");
        }
    }
}

async fn forget_guest_caches(vm: &mpsc::UnboundedSender<Control>) -> Result<()> {
    match ask(vm, Message::ForgetCaches, "forget-caches").await? {
        Frame::Msg(Message::Ready) => Ok(()),
        other => Err(Error::Agent(format!(
            "expected ready, got {}",
            guest::describe(&other)
        ))),
    }
}

/// A new agent connection, opened by the init process's driver (off its loop, bounded by
/// [`CONNECT_TIMEOUT`]).
async fn connect_via(vm: &mpsc::UnboundedSender<Control>) -> Result<AgentConn> {
    let gone = || Error::Invalid("the container's init process has exited".into());
    let (tx, rx) = oneshot::channel();
    vm.send(Control::Connect(tx)).map_err(|_| gone())?;
    rx.await.unwrap_or_else(|_| Err(gone()))
}

/// Sends `request` over a connection of its own and reads the agent's one reply, all within
/// [`REPLY_TIMEOUT`].
async fn ask(vm: &mpsc::UnboundedSender<Control>, request: Message, what: &str) -> Result<Frame> {
    let exchange = async {
        let mut conn = connect_via(vm).await?;
        conn.send(&Frame::Msg(request)).await?;
        conn.recv().await?.ok_or_else(|| {
            Error::Agent(format!(
                "the agent closed the connection of a {what} request"
            ))
        })
    };
    tokio::time::timeout(REPLY_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(Error::Agent(format!(
                "the agent did not answer a {what} request within {} s",
                REPLY_TIMEOUT.as_secs()
            )))
        })
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
        if !cfg.root.is_dir() {
            return Err(Error::Invalid(format!(
                "container root {} is not a directory",
                cfg.root.display()
            )));
        }
        if cfg.backend.is_some() {
            let container = Container {
                sandbox: Sandbox::prepare(&cfg.id)?,
                netns: None,
                cfg,
                assets: None,
                accel: Accel::Tcg,
                cgroup: None,
            };
            if let Err(e) = container.setup().await {
                container.destroy().await;
                return Err(e);
            }
            return Ok(container);
        }
        let assets = Assets::locate()?;
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
            netns: Some(netns),
            cfg,
            assets: Some(assets),
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
        if let Some(netns) = &self.netns {
            self.sandbox.record_pids(&[netns.pid()])?;
        }
        // The holder is the task pid: the engine finds the container's cgroup through it.
        if let Some(cg) = &self.cgroup {
            cg.add_pid(self.pid())?;
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
            pid: self.pid(),
            annotations: self.cfg.annotations.clone(),
        }
    }

    /// The task pid containerd and Docker see: the network namespace holder, a host process
    /// living in the container's network namespace (the calling process on a test backend).
    pub fn pid(&self) -> u32 {
        self.netns
            .as_ref()
            .map_or_else(std::process::id, Netns::pid)
    }

    /// Boots the VM wired to the namespace's interfaces, with the bundle's mounts, and starts
    /// the init process with `io`. On success the process runs and the result is its host
    /// pid ([`Container::pid`]); on failure (the VM did not boot, the agent could not start
    /// the process) the error says why, and the returned handle still reports the exit (e.g.
    /// 127) and the teardown.
    pub async fn start(self, io: ProcessIo) -> (Running, Result<u32>) {
        let Container {
            mut sandbox,
            netns,
            cfg,
            assets,
            accel,
            cgroup,
        } = self;
        let pid = netns.as_ref().map_or_else(std::process::id, Netns::pid);
        let hook_ctx = hooks::HookContext {
            id: cfg.container_id.clone(),
            bundle: cfg.bundle.clone(),
            pid,
            annotations: cfg.annotations.clone(),
        };
        let prepared = match (&netns, &assets, &cfg.backend) {
            (Some(netns), Some(assets), _) => boot(&mut sandbox, netns, &cfg, assets, accel).await,
            (_, _, Some(backend)) => boot_bare(&mut sandbox, &cfg, backend.as_ref()).await,
            _ => Err(Error::Invalid(
                "a container with neither QEMU nor a backend".into(),
            )),
        };
        let (down_tx, down_rx) = watch::channel(false);
        let host_view = prepared.as_ref().ok().and_then(|p| p.2.clone());
        let owner = Owner {
            sandbox,
            netns,
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
            vm: owner.sandbox.vm(),
            paused: AtomicBool::new(false),
            frozen: Default::default(),
            memory_mib: cfg.memory_mib,
            host_seen: std::sync::Mutex::new(host_view.as_ref().and_then(|v| v.host_writes())),
            host_view,
            log: Arc::new(GuestLog::new(cfg.id.clone(), guest::GUEST_LOG_PER_SECOND)),
        });
        let dialer = owner.sandbox.agent_channel();
        let link = VmLink {
            vm: None,
            torn_down: down_rx,
            shared,
            dialer,
            // The init's start mounts the root and configures the network: as slow as a boot.
            start_timeout: cfg.boot_timeout,
        };
        let (running, started) = launch(
            Box::pin(std::future::ready(conn)),
            request,
            io,
            pid,
            Some(owner),
            link,
        );
        let r = (running, started.await);
        if r.1.is_ok() {
            hooks::run(cfg.hooks.as_ref(), hooks::Phase::Poststart, &hook_ctx)
                .await
                .ok();
        }
        r
    }

    /// Tears down what create made without running anything (delete before start).
    pub async fn destroy(self) {
        if let Some(netns) = self.netns {
            netns.destroy().await;
        }
        self.sandbox.destroy(TEARDOWN_GRACE).await;
        remove_cgroup(self.cgroup).await;
    }
}

/// What to boot for a VM of its own around an ext4 root image (`agentvm mcp`'s sandboxes):
/// no network namespace, engine or host cgroup, the image attached read-only with a guest
/// tmpfs over it (as `agentvm run` does), plus directory shares.
#[derive(Debug, Clone)]
pub struct ImageVmConfig {
    /// Sandbox id; names the state directory.
    pub id: String,
    /// The ext4 root image (`agentvm-image`'s cache), attached read-only as `/dev/vda`.
    pub rootfs: PathBuf,
    /// Secrets, decrypted ([`crate::secrets::Store::resolve`]): sent with the init's start,
    /// as files in `/run/secrets` and env vars of the init and every exec.
    pub secrets: Vec<agentvm_protocol::SecretSpec>,
    /// The init process: the VM powers off when it exits.
    pub process: ProcessSpec,
    /// Directory shares and the guest mounts that use them ([`mounts::plan`]).
    pub mounts: mounts::MountPlan,
    pub hostname: Option<String>,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub accel: Accel,
    pub boot_timeout: Duration,
    /// A network under this egress policy: a namespace of its own with a veth to the host,
    /// which masquerades it ([`crate::uplink`]), the guest's DNS through the host's resolver.
    /// None: no network device at all.
    pub network: Option<crate::egress::Policy>,
}

/// What [`boot_image`] made for a networked VM.
struct ImageNet {
    netns: Netns,
    wiring: crate::netns::Wiring,
}

/// Makes the namespace of a networked image VM: its uplink to the host, then the tap, guard
/// and egress table (as [`boot`] does for an engine's namespace). Nothing is left on failure.
async fn image_network(sandbox: &Sandbox, policy: &crate::egress::Policy) -> Result<ImageNet> {
    let netns = Netns::create(&NetnsMode::New, &sandbox.state_dir)?;
    let made = async {
        sandbox.record_pids(&[netns.pid()])?;
        let uplink =
            crate::uplink::Uplink::create(&netns.fd(), netns.pid(), &sandbox.state_dir).await?;
        netns.set_uplink(uplink);
        let mut wiring = netns.scan().await?;
        netns.wire(&mut wiring, policy).await?;
        Ok::<_, Error>(wiring)
    }
    .await;
    match made {
        Ok(wiring) => Ok(ImageNet { netns, wiring }),
        Err(e) => {
            netns.destroy().await;
            Err(e)
        }
    }
}

/// The host's first name server (`/etc/resolv.conf`), where a networked image VM's DNS
/// relay sends its queries.
fn host_nameserver() -> Option<std::net::SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    text.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next() == Some("nameserver"))
            .then(|| w.next()?.parse::<std::net::IpAddr>().ok())
            .flatten()
            .map(|ip| std::net::SocketAddr::new(ip, 53))
    })
}

/// Starts the DNS relay of a networked image VM: the guest asks 127.0.0.11, the agent relays
/// over vsock, the host asks its own resolver from its own namespace; the egress table learns
/// the addresses of names its domain rules allow. Returns whether it runs (the guest then
/// gets `nameserver 127.0.0.11`).
async fn image_dns(sandbox: &mut Sandbox, net: &ImageNet) -> Result<bool> {
    let Some(upstream) = host_nameserver() else {
        tracing::warn!("no nameserver in the host's /etc/resolv.conf: the sandbox has no DNS");
        return Ok(false);
    };
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, sandbox.connect())
        .await
        .unwrap_or_else(|_| {
            Err(Error::Agent(
                "the agent did not answer a new connection".into(),
            ))
        })?;
    let bind: std::net::SocketAddr = if upstream.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(bind)
        .map_err(|e| Error::io("bind the DNS relay's socket", bind.to_string(), e))?;
    let hook = match (
        crate::egress::nft_program(),
        crate::egress::Record::load(&sandbox.state_dir),
    ) {
        (Some(nft), Ok(mut record)) => {
            record.dns_relay = true;
            record.save(&sandbox.state_dir)?;
            Some(dns::EgressHook::new(
                net.netns.fd(),
                sandbox.state_dir.clone(),
                nft,
                net.netns.resolved(),
            ))
        }
        _ => None,
    };
    dns::start_relay(conn, socket, upstream, hook).await?;
    Ok(true)
}

/// Boots a VM from an ext4 root image and starts its init process with `io`. The returned
/// handle is that init process, as [`Container::start`]'s is: it runs more processes
/// ([`Running::spawn_exec`]), pauses and resumes the VM, and a SIGKILL to it ends the VM,
/// whose teardown [`Running::wait_torn_down`] awaits. The pid every process reports is the
/// VMM's. On failure nothing is left behind.
pub async fn boot_image(cfg: ImageVmConfig, assets: &Assets, io: ProcessIo) -> Result<Running> {
    let mut sandbox = Sandbox::prepare(&cfg.id)?;
    let net = match &cfg.network {
        Some(policy) => match image_network(&sandbox, policy).await {
            Ok(n) => Some(n),
            Err(e) => {
                sandbox.destroy(TEARDOWN_GRACE).await;
                return Err(e);
            }
        },
        None => None,
    };
    let sandbox_cfg = SandboxConfig {
        id: cfg.id.clone(),
        disks: vec![Disk {
            path: cfg.rootfs.clone(),
            readonly: true,
        }],
        shares: cfg.mounts.shares.clone(),
        nics: net
            .iter()
            .flat_map(|n| n.wiring.interfaces.iter().zip(&n.wiring.taps))
            .map(|(i, tap)| Nic {
                tap: tap.clone(),
                mac: i.mac.clone(),
            })
            .collect(),
        netns: net.as_ref().map(|n| n.netns.fd()),
        memory_mib: cfg.memory_mib,
        vcpus: cfg.vcpus,
        accel: cfg.accel,
        boot_timeout: cfg.boot_timeout,
        icount: false,
        debug: false,
    };
    let launched = match sandbox.launch(&sandbox_cfg, assets).await {
        Ok(c) => match &net {
            Some(n) => image_dns(&mut sandbox, n).await.map(|dns| (c, dns)),
            None => Ok((c, false)),
        },
        Err(e) => Err(e),
    };
    let (conn, dns) = match launched {
        Ok(c) => c,
        Err(e) => {
            sandbox.destroy(TEARDOWN_GRACE).await;
            if let Some(n) = net {
                n.netns.destroy().await;
            }
            return Err(e);
        }
    };
    let pid = sandbox.vmm_pid().unwrap_or(0);
    let mut mounts = cfg.mounts.mounts;
    let mut sysctls = std::collections::BTreeMap::new();
    if let Some(n) = &net {
        if dns {
            mounts.push(MountSpec {
                destination: "/etc/resolv.conf".into(),
                source: agentvm_protocol::MountSource::File {
                    content: format!("nameserver {}\n", dns::DOCKER_DNS),
                    mode: 0o644,
                },
                readonly: false,
            });
        }
        // The uplink is IPv4 only.
        for iface in &n.wiring.interfaces {
            sysctls.insert(
                format!("net.ipv6.conf.{}.disable_ipv6", iface.name),
                "1".to_string(),
            );
        }
    }
    let network = net.as_ref().map(|n| n.wiring.network_spec());
    let request = StartRequest {
        rootfs: RootfsSpec {
            device: "/dev/vda".into(),
            fstype: "ext4".into(),
            overlay: true,
            options: None,
            layers: None,
            subdir: None,
        },
        process: cfg.process,
        hostname: cfg.hostname,
        init: true,
        pid_namespace: false,
        network,
        mounts,
        sysctls,
        container: None,
        secrets: cfg.secrets,
        masked_paths: Vec::new(),
        readonly_paths: Vec::new(),
    };
    let (down_tx, down_rx) = watch::channel(false);
    let shared = Arc::new(VmShared {
        vm: sandbox.vm(),
        paused: AtomicBool::new(false),
        frozen: Default::default(),
        memory_mib: cfg.memory_mib,
        host_view: None,
        host_seen: Default::default(),
        log: Arc::new(GuestLog::new(cfg.id.clone(), guest::GUEST_LOG_PER_SECOND)),
    });
    let dialer = sandbox.agent_channel();
    let owner = Owner {
        sandbox,
        netns: net.map(|n| n.netns),
        down: down_tx,
        host_view: None,
        cgroup: None,
    };
    let link = VmLink {
        vm: None,
        torn_down: down_rx,
        shared,
        dialer,
        start_timeout: cfg.boot_timeout,
    };
    let (running, started) = launch(
        Box::pin(std::future::ready(Ok(conn))),
        request,
        io,
        pid,
        Some(owner),
        link,
    );
    match started.await {
        Ok(_) => Ok(running),
        Err(e) => {
            // The driver tears the VM down after a failed start: wait for it.
            running.wait_torn_down().await;
            Err(e)
        }
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
        // A pod sandbox's pause is pid 1 of the pod's PID namespace, as under runc (hostPID
        // is refused before this).
        pid_namespace: matches!(
            crate::pod::PodRole::of(&cfg.annotations),
            crate::pod::PodRole::Sandbox { .. }
        ),
        network,
        mounts,
        sysctls: cfg.sysctls.clone(),
        container: None,
        secrets: cfg.secrets.clone(),
        masked_paths: cfg.masked_paths.clone(),
        readonly_paths: cfg.readonly_paths.clone(),
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
    let mut policy = mounts::SharePolicy::detect(&cfg.annotations)?;
    policy.limits = cfg.volume_limits;
    let plan = mounts::plan(&cfg.mounts, &policy)?;
    let egress_policy = crate::egress::PolicyFile::load(&crate::egress::policy_path())
        .and_then(|f| {
            f.select(
                cfg.annotations
                    .get(crate::egress::ANNOTATION)
                    .map(String::as_str),
            )
        })
        .map_err(|e| Error::Invalid(e.to_string()))?;
    if egress_policy.has_domains() && !plan.uses_docker_dns() {
        return Err(Error::Invalid(
            crate::egress::domains_need_relay(&egress_policy).to_string(),
        ));
    }
    let mut wiring = netns.scan().await?;
    netns.wire(&mut wiring, &egress_policy).await?;
    let (root, disks, rootfs, host_view) = root_setup(cfg, &policy, &sandbox.state_dir).await?;
    let mut shares = vec![root];
    shares.extend(plan.shares.iter().cloned());
    if let Some(pod) = pod_share(cfg, &sandbox.state_dir)? {
        shares.push(pod);
    }
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
        let relay_conn = tokio::time::timeout(CONNECT_TIMEOUT, sandbox.connect())
            .await
            .unwrap_or_else(|_| {
                Err(Error::Agent(
                    "the agent did not answer a new connection".into(),
                ))
            })?;
        let socket = netns.udp_socket()?;
        let upstream = std::net::SocketAddr::from(([127, 0, 0, 11], 53));
        // The egress table learns the addresses of allowed names from the relay's answers.
        let hook = match (
            crate::egress::nft_program(),
            crate::egress::Record::load(&sandbox.state_dir),
        ) {
            (Some(nft), Ok(mut record)) => {
                record.dns_relay = true;
                record.save(&sandbox.state_dir)?;
                Some(dns::EgressHook::new(
                    netns.fd(),
                    sandbox.state_dir.clone(),
                    nft,
                    netns.resolved(),
                ))
            }
            _ => None,
        };
        // The relay task ends when its agent connection closes with the VM.
        dns::start_relay(relay_conn, socket, upstream, hook).await?;
    }
    if matches!(
        crate::pod::PodRole::of(&cfg.annotations),
        crate::pod::PodRole::Sandbox { .. }
    ) {
        start_port_forward(sandbox, netns).await?;
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

/// [`boot`] on a test backend ([`ContainerConfig::backend`]): no host plumbing, the root and
/// the bundle's mounts shared as they are.
async fn boot_bare(
    sandbox: &mut Sandbox,
    cfg: &ContainerConfig,
    backend: &dyn crate::vmm::VmmBackend,
) -> Result<(AgentConn, StartRequest, Option<layers::HostView>)> {
    let policy = mounts::SharePolicy::nine_p();
    let plan = mounts::plan(&cfg.mounts, &policy)?;
    let (root, rootfs) = mounts::root_share(ROOT_TAG, &cfg.root, cfg.root_readonly, &policy);
    let mut shares = vec![root];
    shares.extend(plan.shares.iter().cloned());
    if matches!(
        crate::pod::PodRole::of(&cfg.annotations),
        crate::pod::PodRole::Sandbox { .. }
    ) {
        // A plain directory: the simulated guest sees the host's files where they are.
        let dir = sandbox.state_dir.join("pod");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
    }
    let sandbox_cfg = SandboxConfig {
        id: cfg.id.clone(),
        disks: Vec::new(),
        shares,
        nics: Vec::new(),
        netns: None,
        memory_mib: cfg.memory_mib,
        vcpus: cfg.vcpus,
        accel: Accel::Tcg,
        boot_timeout: cfg.boot_timeout,
        icount: false,
        debug: cfg.debug,
    };
    let image = crate::sandbox::GuestImage::default();
    sandbox.launch_with(backend, &sandbox_cfg, image).await?;
    let conn = sandbox.wait_booted(cfg.boot_timeout).await?;
    Ok((conn, start_request(cfg, None, plan.mounts, rootfs), None))
}

/// The port-forward relay of a pod sandbox ([`crate::portfwd`]), held by its namespace.
/// Without nftables the pod runs without it (a CRI PortForward then finds nothing), with a
/// warning.
async fn start_port_forward(sandbox: &Sandbox, netns: &Netns) -> Result<()> {
    let Some(nft) = crate::egress::nft_program() else {
        tracing::warn!(
            "nft (nftables) is not installed: kubectl port-forward cannot reach this pod \
             (apt-get install nftables)"
        );
        return Ok(());
    };
    let Some(channel) = sandbox.agent_channel() else {
        return Ok(());
    };
    let listener = netns.tcp_listener(std::net::SocketAddr::from((
        [127, 0, 0, 1],
        crate::portfwd::RELAY_PORT,
    )))?;
    let task = crate::portfwd::start(&netns.fd(), &nft, listener, channel).await?;
    netns.hold(task);
    Ok(())
}

/// The pod share of a pod sandbox's VM ([`crate::pod`]): the later containers' roots are
/// bound into it. None for anything else, or without virtiofsd (the pod's containers are then
/// refused with that reason when they are created).
fn pod_share(cfg: &ContainerConfig, state_dir: &std::path::Path) -> Result<Option<Share>> {
    if !matches!(
        crate::pod::PodRole::of(&cfg.annotations),
        crate::pod::PodRole::Sandbox { .. }
    ) {
        return Ok(None);
    }
    let Ok(daemon) = assets::virtiofsd() else {
        tracing::warn!(
            "virtiofsd is not installed: this pod's containers cannot be added to its VM"
        );
        return Ok(None);
    };
    let dir = state_dir.join("pod");
    crate::pod::prepare_share(&dir)?;
    Ok(Some(Share {
        tag: crate::pod::SHARE_TAG.into(),
        path: dir,
        readonly: false,
        transport: ShareTransport::VirtioFs(VirtioFs {
            daemon,
            cache: crate::vmm::FsCache::Auto,
        }),
        overlay_upper: false,
        expose: Vec::new(),
        limits: cfg.volume_limits,
    }))
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
            // A root that should be layered and cannot: shared whole only when the host's
            // admin allows it (the shared root is slower and takes another code path).
            (Err(e), _) => {
                if !crate::config::HostConfig::load()?.shared_root_fallback {
                    return Err(Error::Invalid(format!(
                        "cannot set up the container root as image layers: {e}; fix that, \
                         annotate {}=share to share the whole root, or allow the fallback \
                         (shared_root_fallback = true in {})",
                        layers::ROOTFS_ANNOTATION,
                        crate::config::path().display()
                    )));
                }
                tracing::warn!("container root: sharing the whole root instead of layers: {e}")
            }
            (Ok(None), _) => {}
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
        limits: Default::default(),
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
        subdir: None,
    };
    (share, disks, spec)
}

/// How a process reaches the VM it runs in.
struct VmLink {
    /// Control channel of the init process's driver (none: this is the init process).
    vm: Option<mpsc::UnboundedSender<Control>>,
    torn_down: watch::Receiver<bool>,
    shared: Arc<VmShared>,
    /// Opens the agent connections of exec processes and requests (init process only).
    dialer: Option<Arc<dyn Dialer>>,
    /// How long the agent may take to confirm the start.
    start_timeout: Duration,
}

/// The outcome of a start: the host pid the process reports, or why it did not start.
pub type Started = Pin<Box<dyn Future<Output = Result<u32>> + Send>>;

/// Where a driver gets its agent connection: at once (the init process, over the connection
/// the boot opened) or from the init's driver (an exec process).
type ConnSource = Pin<Box<dyn Future<Output = Result<AgentConn>> + Send>>;

/// Runs `request` in a driver task, over the connection `conn` resolves to. The driver of
/// the init process owns the sandbox (`owner`): it tears the VM down after the exit and hands
/// out the connections of exec processes. `pid` is the host pid every process of the VM
/// reports (the namespace holder's): the guest's pids are guest data and never leave the
/// driver. The handle works at once: a SIGKILL while the connection is being opened ends the
/// process (137) without waiting for the agent; other controls are delivered after the start.
fn launch(
    conn: ConnSource,
    request: StartRequest,
    io: ProcessIo,
    pid: u32,
    owner: Option<Owner>,
    link: VmLink,
) -> (Running, Started) {
    let VmLink {
        vm,
        torn_down,
        shared,
        dialer,
        start_timeout,
    } = link;
    let (exit_tx, exit_rx) = watch::channel(None);
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel();
    let refresher_ctl = ctl_tx.clone();
    let refresher_shared = shared.clone();
    let running = Running {
        pid,
        rootfs: Arc::new(request.rootfs.clone()),
        member: request.container.as_ref().map(|c| Arc::from(c.id.as_str())),
        vm: vm.unwrap_or_else(|| ctl_tx.clone()),
        ctl: ctl_tx,
        exit: exit_rx,
        torn_down,
        shared: Arc::clone(&shared),
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
        let (conn, pending) = connect_or_kill(conn, &mut ctl_rx).await;
        let (code, oom) = match conn {
            Ok(conn) => {
                let link = DriveLink {
                    dialer,
                    log: Arc::clone(&shared.log),
                    start_timeout,
                    pending,
                };
                let ending: Ending = drive(
                    sandbox.as_mut(),
                    link,
                    conn,
                    request,
                    io,
                    ctl_rx,
                    started_tx,
                )
                .await;
                if let Some(why) = &ending.vm_died {
                    let diagnostics = sandbox
                        .as_ref()
                        .map(Sandbox::diagnostics)
                        .unwrap_or_default();
                    tracing::warn!(
                        "the VM ended before the process reported an exit ({why}):\n{diagnostics}"
                    );
                }
                (ending.code, ending.oom)
            }
            Err((e, code)) => {
                let _ = started_tx.send(Err(e));
                (code, false)
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
    let started = Box::pin(async move {
        let started = started_rx
            .await
            .unwrap_or_else(|_| Err(Error::Agent("the process driver ended".into())));
        started.map(|()| pid)
    });
    (running, started)
}

/// Waits for the connection while serving the process's controls: a SIGKILL gives up at once
/// (exit 137); the others are kept for the driver. A failure comes with the exit code.
async fn connect_or_kill(
    mut conn: ConnSource,
    ctl: &mut mpsc::UnboundedReceiver<Control>,
) -> (std::result::Result<AgentConn, (Error, i32)>, Vec<Control>) {
    let mut pending = Vec::new();
    let mut ctl_open = true;
    loop {
        tokio::select! {
            c = &mut conn => return (c.map_err(|e| (e, 255)), pending),
            c = ctl.recv(), if ctl_open => match c {
                Some(Control::Signal(libc::SIGKILL)) => {
                    let e = Error::Agent("killed before the agent took the process".into());
                    return (Err((e, 128 + libc::SIGKILL)), pending);
                }
                Some(c) => pending.push(c),
                None => ctl_open = false,
            },
        }
    }
}

/// A started process: the init process or an exec process in the same VM.
#[derive(Debug, Clone)]
pub struct Running {
    pid: u32,
    rootfs: Arc<RootfsSpec>,
    /// The pod container this process belongs to (none: the VM's own container).
    member: Option<Arc<str>>,
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
    /// The VM (pause, resume); none for a fake agent without one.
    vm: Option<Arc<dyn crate::vmm::VmHandle>>,
    paused: AtomicBool,
    /// The pod containers of the VM whose processes are frozen in the guest (a task pause of
    /// one of them: [`Running::pause`]).
    frozen: std::sync::Mutex<std::collections::HashSet<String>>,
    /// The VM's RAM, fixed at boot: the ceiling of `docker update --memory`.
    memory_mib: u32,
    /// The host's mount of a layered root, refreshed when the VM pauses.
    host_view: Option<layers::HostView>,
    /// The host overlay's work dir token last seen ([`layers::HostView::host_writes`]): the
    /// refresher and each exec compare against it, and have the guest forget its cached
    /// root when the host wrote (`docker cp` into the container).
    host_seen: std::sync::Mutex<Option<(u64, i64, i64)>>,
    /// The rate limit of what this VM's agent makes the host log.
    log: Arc<GuestLog>,
}

impl Running {
    /// The host pid this process reports: the container's network namespace holder, for the
    /// init process and every exec process alike (never a pid the guest named).
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
    /// As [`Container::start`]: the handle reports the exit even when the start failed, and
    /// the result is the host pid the process reports ([`Running::pid`]), not the guest's.
    /// Bounded: the connection within 10 s, the agent's confirmation within 30 s. The
    /// process ends at the latest with the VM.
    pub async fn exec(&self, process: ProcessSpec, io: ProcessIo) -> (Running, Result<u32>) {
        let (running, started) = self.spawn_exec(process, io);
        (running, started.await)
    }

    /// [`Running::exec`] whose handle comes at once, before the agent took the process: it
    /// can be signalled (a SIGKILL ends a start that waits for the agent) while `Started`
    /// resolves.
    pub fn spawn_exec(&self, process: ProcessSpec, io: ProcessIo) -> (Running, Started) {
        let request = StartRequest {
            rootfs: (*self.rootfs).clone(),
            process,
            hostname: None,
            init: false,
            pid_namespace: false,
            network: None,
            mounts: Vec::new(),
            sysctls: Default::default(),
            container: self
                .member
                .as_ref()
                .map(|id| agentvm_protocol::PodContainer {
                    id: id.to_string(),
                    create: false,
                    own_pid_namespace: false,
                    readonly_root: false,
                    limits: None,
                }),
            secrets: Vec::new(),
            masked_paths: Vec::new(),
            readonly_paths: Vec::new(),
        };
        self.spawn_in_vm(request, io, EXEC_START_TIMEOUT)
    }

    /// Starts another container of a pod in this VM (the pod sandbox's): `request` carries
    /// its root, mounts and namespaces ([`crate::pod::member_request`]). The handle is the
    /// container's init process; its exit does not end the VM, and its exec processes
    /// ([`Running::spawn_exec`] on this handle) run in the container.
    pub fn spawn_member(&self, request: StartRequest, io: ProcessIo) -> (Running, Started) {
        // Its start mounts a root over virtio-fs: slower than an exec's.
        self.spawn_in_vm(request, io, CONNECT_TIMEOUT + EXEC_START_TIMEOUT)
    }

    fn spawn_in_vm(
        &self,
        request: StartRequest,
        io: ProcessIo,
        start_timeout: Duration,
    ) -> (Running, Started) {
        let vm = self.vm.clone();
        let shared = Arc::clone(&self.shared);
        let conn: ConnSource = Box::pin(async move {
            shared.catch_up(&vm).await;
            connect_via(&vm).await
        });
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
                dialer: None,
                start_timeout,
            },
        )
    }

    /// Whether this is a process of a pod container beside the VM's own (the VM does not
    /// end with it).
    pub fn is_member(&self) -> bool {
        self.member.is_some()
    }

    /// Freezes the whole VM (every vCPU), as `docker pause` freezes a runc container's
    /// processes. Signals sent meanwhile are delivered on resume.
    pub async fn pause(&self) -> Result<()> {
        if self.exited().is_some() {
            return Err(Error::Invalid("the process has already exited".into()));
        }
        // One container of a pod: its processes are frozen in the guest; the VM and the
        // pod's other containers run on.
        if let Some(id) = &self.member {
            return self.freeze(id, true).await;
        }
        self.shared.vm()?.pause().await?;
        self.shared.paused.store(true, Ordering::SeqCst);
        // `docker commit` pauses, then reads the root: show it everything written so far.
        if let Some(v) = &self.shared.host_view {
            refresh_view(v).await;
        }
        Ok(())
    }

    /// Lets a paused VM (or a pod's frozen container) run again.
    pub async fn resume(&self) -> Result<()> {
        if let Some(id) = &self.member {
            return self.freeze(id, false).await;
        }
        self.resume_vm().await
    }

    /// Lets the paused VM run again, whichever of its containers this process belongs to.
    pub async fn resume_vm(&self) -> Result<()> {
        self.shared.vm()?.resume().await?;
        self.shared.paused.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Resource usage, asked of the agent over a connection of its own: the whole VM's for
    /// the VM's container, a pod's later container's own cgroup's for it.
    pub async fn stats(&self) -> Result<GuestStats> {
        let request = match &self.member {
            Some(id) => Message::MemberStats {
                container: id.to_string(),
            },
            None => Message::Stats,
        };
        match ask(&self.vm, request, "stats").await? {
            Frame::Msg(Message::StatsReply(s)) => Ok(s),
            Frame::Msg(Message::Error { message, .. }) => Err(Error::Agent(guest::text(&message))),
            other => Err(Error::Agent(format!(
                "expected stats, got {}",
                guest::describe(&other)
            ))),
        }
    }

    /// Sets the cgroup limits of the container's processes in the guest (`docker update`,
    /// the CRI's UpdateContainerResources): the VM's container's, or a pod container's.
    /// A memory limit above the VM's RAM is refused: that is fixed at boot. Returns the
    /// limits the guest has no file for (`memory.swap.max` without swap).
    pub async fn update(&self, limits: agentvm_protocol::ResourceLimits) -> Result<Vec<String>> {
        crate::resources::check_memory(&limits, self.shared.memory_mib)?;
        // A pod's later container has a cgroup of its own beside the VM's container's.
        let request = match &self.member {
            Some(id) => Message::UpdateContainer {
                container: id.to_string(),
                limits,
            },
            None => Message::Update(limits),
        };
        match ask(&self.vm, request, "update").await? {
            Frame::Msg(Message::Updated { skipped }) => {
                Ok(skipped.iter().take(16).map(|f| guest::text(f)).collect())
            }
            Frame::Msg(Message::Error { message, .. }) => Err(Error::Agent(guest::text(&message))),
            other => Err(Error::Agent(format!(
                "expected updated, got {}",
                guest::describe(&other)
            ))),
        }
    }

    /// Freezes or thaws the pod container `id` in the guest (`Message::FreezeContainer`).
    async fn freeze(&self, id: &str, frozen: bool) -> Result<()> {
        if self.vm_paused() {
            return Err(Error::Invalid(
                "the pod's VM is paused: resume the pod's sandbox first".into(),
            ));
        }
        let what = if frozen { "pause" } else { "resume" };
        let request = Message::FreezeContainer {
            container: id.to_string(),
            frozen,
        };
        match ask(&self.vm, request, what).await? {
            Frame::Msg(Message::Ready) => {
                let mut set = self.shared.frozen.lock().unwrap_or_else(|e| e.into_inner());
                if frozen {
                    set.insert(id.to_string());
                } else {
                    set.remove(id);
                }
                Ok(())
            }
            Frame::Msg(Message::Error { message, .. }) => Err(Error::Agent(guest::text(&message))),
            other => Err(Error::Agent(format!(
                "expected ready, got {}",
                guest::describe(&other)
            ))),
        }
    }

    /// Whether the process is paused: its VM, or (a pod's later container) its own
    /// processes in the guest.
    pub fn is_paused(&self) -> bool {
        self.vm_paused()
            || self.member.as_ref().is_some_and(|id| {
                self.shared
                    .frozen
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains(&**id)
            })
    }

    /// Whether the VM is paused (its agent cannot answer).
    pub fn vm_paused(&self) -> bool {
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

/// A container whose VM is a fake agent, for tests of what the host makes of the agent's
/// words (here and in the shim). Not for production use.
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    use super::*;
    use crate::vmm::AgentIo;

    /// Starts an init process over `agent` (a stream whose other end plays the agent: it
    /// must send Hello first), with `host_pid` as the host pid every process of the "VM"
    /// reports. Exec connections come from `dialer`.
    pub async fn fake_init(
        agent: Box<dyn AgentIo>,
        dialer: Arc<dyn Dialer>,
        host_pid: u32,
        io: ProcessIo,
    ) -> (Running, Result<u32>) {
        let conn = guest::greet(agent).await.map(|(c, _)| c);
        let conn: ConnSource = Box::pin(std::future::ready(conn));
        let request = StartRequest {
            rootfs: RootfsSpec {
                device: ROOT_TAG.into(),
                fstype: "virtiofs".into(),
                overlay: false,
                options: None,
                layers: None,
                subdir: None,
            },
            process: ProcessSpec {
                args: vec!["init".into()],
                ..Default::default()
            },
            hostname: None,
            init: true,
            pid_namespace: false,
            network: None,
            mounts: Vec::new(),
            sysctls: Default::default(),
            container: None,
            secrets: Vec::new(),
            masked_paths: Vec::new(),
            readonly_paths: Vec::new(),
        };
        let shared = Arc::new(VmShared {
            vm: None,
            paused: AtomicBool::new(false),
            frozen: Default::default(),
            memory_mib: 128,
            host_view: None,
            host_seen: Default::default(),
            log: Arc::new(GuestLog::new("fake", guest::GUEST_LOG_PER_SECOND)),
        });
        let link = VmLink {
            vm: None,
            torn_down: watch::channel(false).1,
            shared,
            dialer: Some(dialer),
            start_timeout: Duration::from_secs(10),
        };
        let (running, started) = launch(conn, request, io, host_pid, None, link);
        (running, started.await)
    }

    /// A dialer handing out the host ends of prepared agent connections, last first; the
    /// test keeps the agent ends (a stalled one: accepted, never greeted).
    #[derive(Default)]
    pub struct Dials(pub std::sync::Mutex<Vec<Box<dyn AgentIo>>>);

    impl std::fmt::Debug for Dials {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Dials")
        }
    }

    impl Dialer for Dials {
        fn dial(&self) -> guest::DialFuture<'_> {
            let next = self.0.lock().unwrap_or_else(|p| p.into_inner()).pop();
            Box::pin(async move {
                next.ok_or_else(|| std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::vmm::AgentIo;
    use agentvm_protocol::{tokio_io, ExitStatus, Stream, VERSION};
    use tokio::io::{AsyncReadExt, DuplexStream, ReadHalf, WriteHalf};
    use tokio::net::UnixStream;

    use super::testing::{fake_init, Dials};
    use super::*;

    /// The agent's side of one connection.
    struct Agent {
        reader: ReadHalf<UnixStream>,
        writer: WriteHalf<UnixStream>,
    }

    impl Agent {
        async fn send(&mut self, m: Message) {
            tokio_io::write_frame(&mut self.writer, &Frame::Msg(m))
                .await
                .unwrap();
        }

        async fn data(&mut self, s: Stream, b: &[u8]) {
            tokio_io::write_frame(&mut self.writer, &Frame::Data(s, b.to_vec()))
                .await
                .unwrap();
        }

        /// The next control message from the host, skipping stdin frames.
        async fn recv(&mut self) -> Message {
            loop {
                let f = tokio::time::timeout(
                    Duration::from_secs(5),
                    tokio_io::read_frame(&mut self.reader),
                )
                .await
                .expect("the host sent nothing within 5 s");
                match f.unwrap() {
                    Some(Frame::Msg(m)) => return m,
                    Some(Frame::Data(Stream::Stdin, _)) => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
        }

        /// Reads the host's Start request and confirms it with a guest pid.
        async fn start(&mut self, guest_pid: i32) -> StartRequest {
            let Message::Start(req) = self.recv().await else {
                panic!("expected Start")
            };
            self.send(Message::Started { pid: guest_pid }).await;
            *req
        }
    }

    /// A socketpair: the host's end and the agent's, which has greeted unless `greet` is off.
    /// An init process started over a fake agent that reports `guest_pid`; exec connections
    /// come from the returned dialer.
    async fn started_init(
        host_pid: u32,
        guest_pid: i32,
        io: ProcessIo,
    ) -> (Running, Result<u32>, Arc<Dials>, Agent) {
        let dials = Arc::new(Dials::default());
        let (host, mut init_agent) = pair(true).await;
        let ((init, started), init_agent) =
            tokio::join!(fake_init(host, dials.clone(), host_pid, io), async move {
                init_agent.start(guest_pid).await;
                init_agent
            });
        (init, started, dials, init_agent)
    }

    async fn pair(greet: bool) -> (Box<dyn AgentIo>, Agent) {
        let (host, agent) = UnixStream::pair().unwrap();
        let (reader, writer) = tokio::io::split(agent);
        let mut agent = Agent { reader, writer };
        if greet {
            agent
                .send(Message::Hello {
                    version: VERSION,
                    uptime_ms: 1,
                })
                .await;
        }
        (Box::new(host), agent)
    }

    fn output() -> (ProcessIo, DuplexStream) {
        let (w, r) = tokio::io::duplex(1 << 16);
        (
            ProcessIo {
                stdin: None,
                stdout: Some(Box::new(w)),
                stderr: None,
            },
            r,
        )
    }

    /// A real host process standing for the namespace holder: the test checks that nothing
    /// the guest says reaches it.
    fn holder() -> tokio::process::Child {
        tokio::process::Command::new("sleep")
            .arg("60")
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    async fn read_exactly(r: &mut DuplexStream, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        tokio::time::timeout(Duration::from_secs(5), r.read_exact(&mut b))
            .await
            .expect("no output within 5 s")
            .unwrap();
        b
    }

    #[tokio::test]
    async fn guest_pids_are_never_host_pids() {
        let mut holder = holder();
        let host_pid = holder.id().unwrap();
        // The init claims to be host pid 1, then the holder's pid.
        let (init, started, dials, mut init_agent) =
            started_init(host_pid, 1, ProcessIo::default()).await;
        assert_eq!(started.unwrap(), host_pid);
        assert_eq!(init.pid(), host_pid);

        // An exec that claims pid 1, and another that claims the holder's pid.
        for guest_pid in [1, host_pid as i32] {
            let (host, mut agent) = pair(true).await;
            dials.0.lock().unwrap().push(host);
            let ((exec, started), _) = tokio::join!(
                init.exec(ProcessSpec::default(), ProcessIo::default()),
                agent.start(guest_pid)
            );
            assert_eq!(started.unwrap(), host_pid, "guest pid {guest_pid}");
            assert_eq!(exec.pid(), host_pid);
            // Its exit claims an OOM and a wild code, and is killed afterwards.
            agent
                .send(Message::Exited(ExitStatus {
                    code: -5,
                    signal: Some(99),
                    oom: true,
                }))
                .await;
            let exit = exec.wait().await;
            assert_eq!((exit.code, exit.oom), (255, true));
        }
        // A forged OOM exit of the init itself, after a signal.
        init.signal(libc::SIGTERM).unwrap();
        assert_eq!(
            init_agent.recv().await,
            Message::Signal {
                signal: libc::SIGTERM
            }
        );
        init_agent
            .send(Message::Exited(ExitStatus {
                code: 137,
                signal: Some(9),
                oom: true,
            }))
            .await;
        let exit = init.wait().await;
        assert_eq!((exit.code, exit.oom), (137, true));
        // The host process the guest named is untouched.
        assert!(
            holder.try_wait().unwrap().is_none(),
            "the holder was signalled"
        );
    }

    #[tokio::test]
    async fn a_stalled_exec_connection_blocks_neither_kill_nor_output() {
        let (io, mut out) = output();
        let (init, _, dials, mut init_agent) = started_init(4242, 1, io).await;
        // An exec whose connection the "guest" accepted and never greets.
        let (stalled_host, _stalled_agent) = pair(false).await;
        dials.0.lock().unwrap().push(stalled_host);
        let stalled = tokio::spawn({
            let init = init.clone();
            async move {
                init.exec(ProcessSpec::default(), ProcessIo::default())
                    .await
            }
        });
        tokio::task::yield_now().await;
        // Another exec started meanwhile works.
        let (host, mut agent) = pair(true).await;
        dials.0.lock().unwrap().insert(0, host);
        let t = tokio::time::Instant::now();
        let ((exec, started), _) = tokio::join!(
            init.exec(ProcessSpec::default(), ProcessIo::default()),
            agent.start(7)
        );
        assert!(started.is_ok());
        assert!(exec.exited().is_none());
        // The init's output flows, and its kill goes through.
        init_agent.data(Stream::Stdout, b"still here\n").await;
        assert_eq!(read_exactly(&mut out, 11).await, b"still here\n");
        init.signal(libc::SIGKILL).unwrap();
        assert_eq!(
            init_agent.recv().await,
            Message::Signal {
                signal: libc::SIGKILL
            }
        );
        init_agent
            .send(Message::Exited(ExitStatus::signaled(9)))
            .await;
        assert_eq!(init.wait().await.code, 137);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "took {:?}",
            t.elapsed()
        );
        assert!(
            !stalled.is_finished(),
            "the stalled exec should still be waiting"
        );
        stalled.abort();
    }

    #[tokio::test]
    async fn a_kill_ends_an_exec_whose_connection_stalls() {
        let (init, _, dials, _init_agent) = started_init(4242, 1, ProcessIo::default()).await;
        let (stalled_host, _stalled_agent) = pair(false).await;
        dials.0.lock().unwrap().push(stalled_host);
        let t = tokio::time::Instant::now();
        let (exec, started) = init.spawn_exec(ProcessSpec::default(), ProcessIo::default());
        exec.signal(libc::SIGKILL).unwrap();
        let e = started.await.unwrap_err().to_string();
        assert!(e.contains("killed before"), "{e}");
        assert_eq!(exec.wait().await.code, 137);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "took {:?}",
            t.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_exec_connection_fails_within_its_bound() {
        let (init, _, dials, _init_agent) = started_init(4242, 1, ProcessIo::default()).await;
        let (stalled_host, _stalled_agent) = pair(false).await;
        dials.0.lock().unwrap().push(stalled_host);
        let t = tokio::time::Instant::now();
        let (exec, started) = init
            .exec(ProcessSpec::default(), ProcessIo::default())
            .await;
        let e = started.unwrap_err().to_string();
        assert!(e.contains("did not answer"), "{e}");
        assert!(t.elapsed() <= CONNECT_TIMEOUT + Duration::from_secs(1));
        assert_eq!(exec.wait().await.code, 255);

        // Greeted, but the start is never confirmed: bounded too.
        let (host, mut agent) = pair(true).await;
        dials.0.lock().unwrap().push(host);
        let t = tokio::time::Instant::now();
        let ((_, started), _) = tokio::join!(
            init.exec(ProcessSpec::default(), ProcessIo::default()),
            agent.recv()
        );
        let e = started.unwrap_err().to_string();
        assert!(e.contains("did not confirm the start"), "{e}");
        assert!(t.elapsed() <= EXEC_START_TIMEOUT + Duration::from_secs(1));
    }

    #[tokio::test]
    async fn guest_error_strings_are_capped() {
        let (init, _, dials, _init_agent) = started_init(4242, 1, ProcessIo::default()).await;
        let (host, mut agent) = pair(true).await;
        dials.0.lock().unwrap().push(host);
        let huge = "A".repeat(agentvm_protocol::MAX_FRAME - 100);
        let fail = async {
            let Message::Start(_) = agent.recv().await else {
                panic!("expected Start")
            };
            agent
                .send(Message::Error {
                    message: huge.clone(),
                    exit_code: Some(127),
                })
                .await;
            agent.send(Message::Exited(ExitStatus::exited(127))).await;
        };
        let ((exec, started), ()) = tokio::join!(
            init.exec(ProcessSpec::default(), ProcessIo::default()),
            fail
        );
        let e = started.unwrap_err().to_string();
        assert!(e.len() <= guest::MAX_GUEST_TEXT + 100, "{} bytes", e.len());
        assert!(e.contains("more bytes cut]"), "{}", &e[e.len() - 60..]);
        assert_eq!(exec.wait().await.code, 127);
    }
}
