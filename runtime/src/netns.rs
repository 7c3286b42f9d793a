//! The container's network namespace on the host and how the VM is wired into it.
//!
//! Docker, CNI and nerdctl give a container a network namespace holding a veth with the
//! container's IP and MAC. A VM cannot enter a namespace, so the shim keeps one itself: a
//! holder process (`sleep`, renamed) lives in it and is the task pid containerd and Docker see
//! (`/proc/<pid>/ns/net` is where dockerd plumbs the veth). When the VM boots, every Ethernet
//! interface found in the namespace gets a tap device next to it, the two are joined by tc
//! `mirred` redirects in both directions, and QEMU (started inside the namespace) attaches a
//! virtio-net device with the veth's MAC to the tap. The guest configures the veth's
//! addresses and routes on its `eth0`, so traffic leaves the VM exactly as it would leave a
//! runc container. Everything lives in the namespace: it disappears with the holder and QEMU.
//!
//! The redirect from the tap is guarded ([`crate::netguard`]): only frames carrying the veth's
//! MAC and addresses reach the veth; the rest is dropped, counted, and reported in the log.

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentvm_protocol::{InterfaceSpec, NetworkSpec, RouteSpec};
use serde::Deserialize;

use crate::egress;
use crate::error::{Error, Result};
use crate::netguard::{self, DropAction, Drops};

/// Prefix of the tap devices agentvm creates next to each interface.
pub const TAP_PREFIX: &str = "avmtap";

/// The tap that is never brought up: where the guard's drops go on kernels without tc's
/// `gact` action (mirred drops and counts what it cannot send).
pub const SINK: &str = "avmsink";

/// How often the drop counters are looked at while the VM runs.
const DROP_CHECK: Duration = Duration::from_secs(5);
/// The least time between two warnings about dropped frames while the VM runs.
const DROP_WARN_EVERY: Duration = Duration::from_secs(60);

/// Which network namespace a container gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetnsMode {
    /// A fresh namespace owned by the shim (the spec names no path).
    New,
    /// An existing namespace (CRI, `--network container:X`).
    Join(PathBuf),
    /// No network namespace in the spec: the host's stack, which a VM cannot share.
    Host,
}

/// A network namespace kept alive by a holder process.
#[derive(Debug)]
pub struct Netns {
    holder: tokio::process::Child,
    pid: u32,
    fd: Arc<OwnedFd>,
    /// The label given at create (the state dir): names the sandbox in log lines.
    label: String,
    /// The guarded taps, and the task that reports their drops while the VM runs.
    guard: Mutex<Guard>,
    /// The egress audit reader (its tap descriptor keeps the namespace alive).
    audit: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The names the DNS relay resolved, for the audit log.
    resolved: Arc<egress::Resolved>,
    /// Other tasks with sockets in the namespace ([`Netns::hold`]).
    held: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The veth to the host that agentvm made itself ([`crate::uplink`]), removed with the
    /// namespace.
    uplink: Mutex<Option<crate::uplink::Uplink>>,
}

#[derive(Debug, Default)]
struct Guard {
    taps: Arc<Vec<GuardedTap>>,
    monitor: Option<tokio::task::JoinHandle<()>>,
}

/// A tap whose ingress carries the guard's filters.
#[derive(Debug, Clone)]
struct GuardedTap {
    tap: String,
    rules: Vec<netguard::Rule>,
}

/// An Ethernet interface found in the namespace, as the guest should carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInterface {
    pub name: String,
    pub mac: String,
    pub mtu: u32,
    /// CIDR addresses with global scope.
    pub addresses: Vec<String>,
}

/// Interfaces and routes of a namespace, plus the taps made for them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wiring {
    pub interfaces: Vec<HostInterface>,
    pub routes: Vec<RouteSpec>,
    /// Tap device per interface, in the same order.
    pub taps: Vec<String>,
}

impl Wiring {
    /// What the agent applies in the guest. Interfaces keep their names (`eth0`).
    pub fn network_spec(&self) -> NetworkSpec {
        NetworkSpec {
            interfaces: self
                .interfaces
                .iter()
                .map(|i| InterfaceSpec {
                    name: i.name.clone(),
                    mac: i.mac.clone(),
                    mtu: i.mtu,
                    addresses: i.addresses.clone(),
                })
                .collect(),
            routes: self.routes.clone(),
        }
    }
}

impl Netns {
    /// Starts the holder in a new namespace or in `join`'s. `label` goes into the holder's
    /// command line (the state dir), so a cleanup after a crash can recognise it.
    pub fn create(mode: &NetnsMode, label: &Path) -> Result<Netns> {
        let join_fd =
            match mode {
                NetnsMode::Host => return Err(Error::Invalid(
                    "agentvm cannot run a container on the host's network (--network host): the \
                     container runs in its own VM with its own kernel and network stack. Use a \
                     bridge or user-defined network and publish ports with -p instead."
                        .into(),
                )),
                NetnsMode::New => None,
                NetnsMode::Join(path) => Some(
                    std::fs::File::open(path)
                        .map_err(|e| Error::io("open network namespace", path, e))?,
                ),
            };
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg0(format!("agentvm-netns {}", label.display()))
            .arg("infinity")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let raw = join_fd.as_ref().map(|f| f.as_raw_fd());
        // SAFETY: the closure runs between fork and exec and makes only async-signal-safe
        // syscalls (unshare/setns, prctl) on an fd that stays open in the parent until spawn
        // returns.
        unsafe {
            cmd.pre_exec(move || {
                let r = match raw {
                    Some(fd) => libc::setns(fd, libc::CLONE_NEWNET),
                    None => libc::unshare(libc::CLONE_NEWNET),
                };
                if r != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(true);
        let holder = cmd.spawn().map_err(|e| Error::Spawn {
            program: "sleep (network namespace holder)".into(),
            source: e,
        })?;
        let pid = holder
            .id()
            .ok_or_else(|| Error::Invalid("the network namespace holder exited at once".into()))?;
        let ns_path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        let fd = std::fs::File::open(&ns_path)
            .map_err(|e| Error::io("open", &ns_path, e))?
            .into();
        drop(join_fd);
        Ok(Netns {
            holder,
            pid,
            fd: Arc::new(fd),
            label: label.display().to_string(),
            guard: Mutex::default(),
            audit: Mutex::default(),
            resolved: Arc::default(),
            held: Mutex::default(),
            uplink: Mutex::default(),
        })
    }

    /// The names the DNS relay resolved in this sandbox (it notes them; the audit log reads).
    pub fn resolved(&self) -> Arc<egress::Resolved> {
        Arc::clone(&self.resolved)
    }

    /// The holder's host pid: the task pid reported to containerd.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The namespace, for processes that must start inside it (QEMU).
    pub fn fd(&self) -> Arc<OwnedFd> {
        Arc::clone(&self.fd)
    }

    /// Resolves when the holder exits (someone killed the task pid).
    pub async fn holder_exited(&mut self) {
        let _ = self.holder.wait().await;
    }

    /// Runs `program args` inside the namespace and returns its stdout.
    async fn run<I, S>(&self, program: &str, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run_in(&self.fd, program, args, None).await
    }

    /// Finds the namespace's Ethernet interfaces and routes.
    pub async fn scan(&self) -> Result<Wiring> {
        let links = self.run("ip", ["-j", "addr", "show"]).await?;
        let v4 = self.run("ip", ["-j", "-4", "route", "show"]).await?;
        let v6 = self.run("ip", ["-j", "-6", "route", "show"]).await?;
        parse_wiring(&links, &v4, &v6)
    }

    /// Whether IPv6 is switched off on `iface` (`net.ipv6.conf.<iface>.disable_ipv6`).
    pub async fn ipv6_disabled(&self, iface: &str) -> bool {
        let path = format!("/proc/sys/net/ipv6/conf/{iface}/disable_ipv6");
        self.run("cat", [path.as_str()])
            .await
            .is_ok_and(|v| v.trim() == "1")
    }

    /// Creates a tap per interface and joins the two both ways; the way from the tap goes
    /// through the guard's filters ([`netguard::rules`]) and then the egress policy. With
    /// nftables installed, the egress table forwards in both directions (and a policy can be
    /// changed later, [`crate::egress`]); without it, tc redirects do and only `open` is
    /// possible.
    pub async fn wire(&self, wiring: &mut Wiring, policy: &egress::Policy) -> Result<()> {
        wiring.taps.clear();
        let nft = egress::nft_program();
        if nft.is_none() && !policy.is_open() {
            return Err(egress::nft_missing(policy));
        }
        let mut guarded = Vec::new();
        // Whether this kernel has tc's `gact` was learnt by an earlier sandbox of this boot
        // (the state root is a tmpfs): a kernel without it costs three more commands to find.
        let verdict = crate::sandbox::state_root().join(".tc-drop-sink");
        let mut drop = DropAction::Gact;
        if verdict.exists() && !wiring.interfaces.is_empty() {
            self.run("ip", ["tuntap", "add", "dev", SINK, "mode", "tap"])
                .await?;
            drop = DropAction::Sink(SINK.into());
        }
        for (i, iface) in wiring.interfaces.iter().enumerate() {
            let tap = format!("{TAP_PREFIX}{i}");
            let mtu = iface.mtu.to_string();
            let facts = netguard::Facts::of(iface, !self.ipv6_disabled(&iface.name).await)
                .map_err(|e| Error::Invalid(format!("network setup: {e}")))?;
            let rules = netguard::rules(&facts);
            self.run("ip", ["tuntap", "add", "dev", &tap, "mode", "tap"])
                .await?;
            self.run("ip", ["link", "set", "dev", &tap, "mtu", &mtu, "up"])
                .await?;
            if nft.is_none() {
                self.redirect_to_tap(&iface.name, &tap).await?;
            }
            let forward = nft.is_none().then_some(iface.name.as_str());
            let guard = self.guard_tap(&tap, forward, &rules, &drop).await;
            if let Err(e) = guard {
                if drop != DropAction::Gact {
                    return Err(e);
                }
                // No `gact` in this kernel: drop by redirecting to a tap that stays down.
                tracing::debug!("guarding {tap} with tc's drop action failed ({e}); using {SINK}");
                self.run("tc", ["qdisc", "del", "dev", &tap, "ingress"])
                    .await?;
                self.run("ip", ["tuntap", "add", "dev", SINK, "mode", "tap"])
                    .await?;
                drop = DropAction::Sink(SINK.into());
                self.guard_tap(&tap, forward, &rules, &drop).await?;
                let _ = std::fs::write(&verdict, b"");
            }
            guarded.push(GuardedTap {
                tap: tap.clone(),
                rules,
            });
            wiring.taps.push(tap);
        }
        if let (Some(nft), false) = (&nft, wiring.interfaces.is_empty()) {
            self.apply_egress_first(nft, wiring, policy).await?;
        }
        let taps = Arc::new(guarded);
        let monitor = (!taps.is_empty()).then(|| {
            tokio::spawn(monitor_drops(
                Arc::clone(&self.fd),
                Arc::clone(&taps),
                self.label.clone(),
            ))
        });
        let mut g = self.guard.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = g.monitor.take() {
            old.abort();
        }
        *g = Guard { taps, monitor };
        Ok(())
    }

    /// Redirects everything arriving on `veth` to `tap` (tc `mirred`): the way in without
    /// nftables.
    async fn redirect_to_tap(&self, veth: &str, tap: &str) -> Result<()> {
        let batch = format!(
            "qdisc add dev {veth} ingress\n\
             filter add dev {veth} parent ffff: protocol all u32 match u8 0 0 action mirred \
             egress redirect dev {tap}\n"
        );
        run_in(&self.fd, "tc", ["-batch", "-"], Some(batch)).await?;
        Ok(())
    }

    /// Makes the audit tap, loads the policy's table and starts the audit reader: the first
    /// egress setup of the namespace.
    async fn apply_egress_first(
        &self,
        nft: &Path,
        wiring: &Wiring,
        policy: &egress::Policy,
    ) -> Result<()> {
        self.run(
            "ip",
            ["tuntap", "add", "dev", egress::AUDIT_TAP, "mode", "tap"],
        )
        .await?;
        // Only what the table forwards may show up there: no IPv6, ARP or multicast of the
        // namespace's own stack on it.
        let no_v6 = format!("net.ipv6.conf.{}.disable_ipv6=1", egress::AUDIT_TAP);
        let _ = self.run("sysctl", ["-qw", no_v6.as_str()]).await;
        self.run(
            "ip",
            [
                "link",
                "set",
                "dev",
                egress::AUDIT_TAP,
                "arp",
                "off",
                "multicast",
                "off",
                "up",
            ],
        )
        .await?;
        let mut facts = egress_facts(wiring).await;
        if self
            .uplink
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            // The gateway of an uplink is the host itself, and the sandbox's DNS goes through
            // agentvm's relay: nothing on the host is open to it, DNS included.
            facts.gateways.clear();
        }
        let record = egress::Record {
            policy: policy.clone(),
            facts,
            netns: PathBuf::from(format!("/proc/{}/ns/net", self.pid)),
            dns_relay: false,
        };
        apply_egress(&self.fd, nft, &record).await?;
        let state_dir = PathBuf::from(&self.label);
        record.save(&state_dir)?;
        let reader = spawn_audit_reader(Arc::clone(&self.fd), state_dir, self.resolved())?;
        let old = self
            .audit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(reader);
        if let Some(old) = old {
            old.abort();
        }
        Ok(())
    }

    /// Installs the ingress qdisc and the guard's filters on `tap` in one `tc -batch`.
    async fn guard_tap(
        &self,
        tap: &str,
        veth: Option<&str>,
        rules: &[netguard::Rule],
        drop: &DropAction,
    ) -> Result<()> {
        let mut batch = format!("qdisc add dev {tap} ingress\n");
        for r in rules {
            batch.push_str(&r.tc_args(tap, veth, drop).join(" "));
            batch.push('\n');
        }
        run_in(&self.fd, "tc", ["-batch", "-"], Some(batch)).await?;
        Ok(())
    }

    /// What the guard dropped so far, per tap (taps without drops left out).
    pub async fn guard_drops(&self) -> Vec<(String, Drops)> {
        let taps = Arc::clone(&self.guard.lock().unwrap_or_else(|p| p.into_inner()).taps);
        read_drops(&self.fd, &taps).await
    }

    /// A UDP socket living in the namespace (it keeps talking from there whatever thread uses
    /// it): the host end of the DNS relay to Docker's resolver at 127.0.0.11.
    pub fn udp_socket(&self) -> Result<std::net::UdpSocket> {
        self.socket_in("create a UDP socket in", || {
            std::net::UdpSocket::bind("0.0.0.0:0")
        })
    }

    /// A TCP listener on `addr` inside the namespace (the port-forward relay).
    pub fn tcp_listener(&self, addr: std::net::SocketAddr) -> Result<std::net::TcpListener> {
        self.socket_in("listen on TCP in", move || {
            std::net::TcpListener::bind(addr)
        })
    }

    /// Runs `make` (which makes a socket) on a thread that entered the namespace.
    fn socket_in<T: Send + 'static>(
        &self,
        what: &'static str,
        make: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> Result<T> {
        let fd = Arc::clone(&self.fd);
        std::thread::spawn(move || -> std::io::Result<T> {
            // SAFETY: setns on a valid namespace fd affects only this short-lived thread.
            if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            make()
        })
        .join()
        .map_err(|_| Error::Invalid("the namespace socket thread panicked".into()))?
        .map_err(|e| Error::io(what, format!("/proc/{}/ns/net", self.pid), e))
    }

    /// Keeps `task` (one holding sockets of the namespace, which keep it alive) until the
    /// namespace is destroyed, and aborts it then.
    pub fn hold(&self, task: tokio::task::JoinHandle<()>) {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
    }

    /// Hands the namespace its uplink ([`crate::uplink`]): removed by [`Netns::destroy`].
    pub fn set_uplink(&self, uplink: crate::uplink::Uplink) {
        let old = self
            .uplink
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(uplink);
        debug_assert!(old.is_none(), "a second uplink");
    }

    /// Kills the holder; the namespace goes with the last process in it. What the guard
    /// dropped is logged first.
    pub async fn destroy(mut self) {
        let monitor = self
            .guard
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .monitor
            .take();
        if let Some(m) = monitor {
            m.abort();
        }
        let audit = self
            .audit
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(a) = audit {
            a.abort();
        }
        for task in std::mem::take(self.held.get_mut().unwrap_or_else(|p| p.into_inner())) {
            task.abort();
        }
        for (tap, drops) in self.guard_drops().await {
            tracing::warn!(
                "guest frames dropped on {tap}: {drops} ({}, torn down)",
                self.label
            );
        }
        let _ = self.holder.start_kill();
        let _ = self.holder.wait().await;
        let uplink = self
            .uplink
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut u) = uplink {
            u.remove().await;
        }
    }
}

/// What the egress policy needs to know of a wired namespace: its taps and veths, its
/// networks and gateways, and the host's addresses.
async fn egress_facts(wiring: &Wiring) -> egress::Facts {
    let host = tokio::process::Command::new("ip")
        .args(["-j", "addr", "show"])
        .stdin(Stdio::null())
        .output()
        .await
        .map(|o| egress::parse_host_addresses(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or_default();
    let own_networks = wiring
        .interfaces
        .iter()
        .flat_map(|i| &i.addresses)
        .filter_map(|a| {
            let (ip, prefix) = a.split_once('/')?;
            Some(egress::Net::new(ip.parse().ok()?, prefix.parse().ok()?).network())
        })
        .collect();
    let mut gateways: Vec<std::net::IpAddr> = wiring
        .routes
        .iter()
        .filter_map(|r| r.gateway.as_deref()?.parse().ok())
        .collect();
    gateways.sort();
    gateways.dedup();
    egress::Facts {
        links: wiring
            .taps
            .iter()
            .cloned()
            .zip(wiring.interfaces.iter().map(|i| i.name.clone()))
            .collect(),
        own_networks,
        gateways,
        host_addresses: host,
    }
}

/// Loads `record`'s policy into the namespace `fd` (one nftables transaction).
pub async fn apply_egress(fd: &Arc<OwnedFd>, nft: &Path, record: &egress::Record) -> Result<()> {
    nft_in(fd, nft, egress::nft_script(&record.policy, &record.facts)).await
}

/// The egress table of the namespace `fd` as `nft -j` prints it (with the learnt sets).
pub async fn egress_listing(fd: &Arc<OwnedFd>, nft: &Path) -> Result<String> {
    run_in(
        fd,
        &nft.display().to_string(),
        ["-j", "list", "table", "netdev", egress::TABLE],
        None,
    )
    .await
}

/// Replaces the policy `old` in the namespace `fd` with `record`'s, keeping the addresses the
/// relay learnt for names both allow (for what is left of their TTLs), in one transaction.
pub async fn change_egress(
    fd: &Arc<OwnedFd>,
    nft: &Path,
    old: &egress::Policy,
    record: &egress::Record,
) -> Result<()> {
    let mut script = egress::nft_script(&record.policy, &record.facts);
    if old.has_domains() && record.policy.has_domains() {
        let listing = egress_listing(fd, nft).await.unwrap_or_default();
        script.push_str(&egress::learnt_script(&egress::carried_over(
            old,
            &record.policy,
            &record.facts,
            &listing,
        )));
    }
    nft_in(fd, nft, script).await
}

/// Runs an nftables script in the namespace `fd` (one transaction).
pub async fn nft_in(fd: &Arc<OwnedFd>, nft: &Path, script: String) -> Result<()> {
    run_in(fd, &nft.display().to_string(), ["-f", "-"], Some(script))
        .await
        .map(drop)
}

/// How many packets the policy in the namespace `fd` has blocked (its `deny` chain's counter).
pub async fn egress_blocked(fd: &Arc<OwnedFd>, nft: &Path) -> Result<u64> {
    let text = run_in(
        fd,
        &nft.display().to_string(),
        ["list", "chain", "netdev", "agentvm", "deny"],
        None,
    )
    .await?;
    Ok(parse_counter(&text))
}

/// The packets of the first `counter packets N` in nft's output.
fn parse_counter(text: &str) -> u64 {
    text.split("counter packets ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Reads the frames the policy blocked from the audit tap and logs each (rate-limited by the
/// table) to the sandbox's `egress.log` and the shim's log, until aborted ([`Netns::destroy`]:
/// the tap's descriptor holds the namespace) or the tap goes.
fn spawn_audit_reader(
    fd: Arc<OwnedFd>,
    state_dir: PathBuf,
    resolved: Arc<egress::Resolved>,
) -> Result<tokio::task::JoinHandle<()>> {
    let tap = open_tap_in(&fd, egress::AUDIT_TAP)?;
    nix::fcntl::fcntl(
        tap.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .map_err(|e| Error::io("set up the audit tap", egress::AUDIT_TAP, e.into()))?;
    // SAFETY: `tap` is an OwnedFd moved into the AsyncFd: it stays open and the same
    // descriptor for the AsyncFd's whole life.
    let tap = unsafe { tokio::io::unix::AsyncFd::register(tap) }
        .map_err(|e| Error::io("set up the audit tap", egress::AUDIT_TAP, e.into()))?;
    Ok(tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok(mut ready) = tap.readable().await else {
                return;
            };
            let n = match ready.try_io(|t| {
                nix::unistd::read(t.get_ref().as_raw_fd(), &mut buf).map_err(std::io::Error::from)
            }) {
                Ok(Ok(n)) => n,
                Ok(Err(_)) => return,
                Err(_would_block) => continue,
            };
            audit(&state_dir, &resolved, &buf[..n]);
        }
    }))
}

/// Logs one blocked frame.
fn audit(state_dir: &Path, resolved: &egress::Resolved, frame: &[u8]) {
    use std::io::Write;
    let Some((dst, proto, port)) = egress::parse_frame(frame) else {
        return;
    };
    // The record may have changed (`agentvm policy set`): read at each frame.
    let Ok(record) = egress::Record::load(state_dir) else {
        return;
    };
    let name = resolved.name_of(dst);
    let line = egress::audit_line(
        &record.policy,
        &record.facts,
        dst,
        name.as_deref(),
        proto,
        port,
    );
    tracing::warn!("egress: {line} ({})", state_dir.display());
    let log = egress::log_path(state_dir);
    if std::fs::metadata(&log).is_ok_and(|m| m.len() > EGRESS_LOG_CAP) {
        let _ = std::fs::rename(&log, log.with_extension("log.1"));
    }
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
    {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let _ = writeln!(f, "{}.{:03} {line}", now.as_secs(), now.subsec_millis());
    }
}

/// The audit log's size before it is rotated (one older half kept).
const EGRESS_LOG_CAP: u64 = 512 * 1024;

/// Opens the tap `name` of the namespace `fd` (a thread enters the namespace to open it).
fn open_tap_in(fd: &Arc<OwnedFd>, name: &str) -> Result<OwnedFd> {
    let fd = Arc::clone(fd);
    let name = name.to_string();
    let shown = name.clone();
    std::thread::spawn(move || -> std::io::Result<OwnedFd> {
        // SAFETY: setns on a valid namespace fd affects only this short-lived thread.
        if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        // struct ifreq: the name (16 bytes), then the flags.
        let mut ifr = [0u8; 40];
        let n = name.len().min(15);
        ifr[..n].copy_from_slice(&name.as_bytes()[..n]);
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI) as u16;
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `ifr` is large enough for,
        // on a tun fd this thread owns.
        if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, ifr.as_mut_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from(tun))
    })
    .join()
    .map_err(|_| Error::Invalid("the tap thread panicked".into()))?
    .map_err(|e| Error::io("open the tap", shown, e))
}

/// Runs `program args` inside the namespace `fd`, with `input` on its stdin, and returns its
/// stdout.
pub(crate) async fn run_in<I, S>(
    fd: &Arc<OwnedFd>,
    program: &str,
    args: I,
    input: Option<String>,
) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    use tokio::io::AsyncWriteExt;
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    enter(&mut cmd, fd);
    let shown = format!("{cmd:?}");
    let spawn_err = |e| Error::Spawn {
        program: program.into(),
        source: e,
    };
    let mut child = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        // A program that fails early closes its stdin: its exit status says why.
        let _ = stdin.write_all(input.as_bytes()).await;
    }
    let out = child.wait_with_output().await.map_err(spawn_err)?;
    if !out.status.success() {
        return Err(Error::Invalid(format!(
            "network setup: {shown} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        )));
    }
    String::from_utf8(out.stdout)
        .map_err(|_| Error::Invalid(format!("network setup: {shown} printed non-UTF-8")))
}

/// The guard's drop counters of `taps` (`tc -s -j filter show`), taps without drops left out.
async fn read_drops(fd: &Arc<OwnedFd>, taps: &[GuardedTap]) -> Vec<(String, Drops)> {
    let mut out = Vec::new();
    for t in taps {
        let json = match run_in(
            fd,
            "tc",
            ["-s", "-j", "filter", "show", "dev", &t.tap, "ingress"],
            None,
        )
        .await
        {
            Ok(j) => j,
            Err(e) => {
                tracing::debug!("read the guard's counters of {}: {e}", t.tap);
                continue;
            }
        };
        match netguard::parse_drops(&t.rules, &json) {
            Ok(d) if d.total() > 0 => out.push((t.tap.clone(), d)),
            Ok(_) => {}
            Err(e) => tracing::debug!("parse the guard's counters of {}: {e}", t.tap),
        }
    }
    out
}

/// Warns about the guard's drops while the VM runs: looks every [`DROP_CHECK`], warns when
/// the counts grew, at most every [`DROP_WARN_EVERY`]. Aborted by [`Netns::destroy`].
async fn monitor_drops(fd: Arc<OwnedFd>, taps: Arc<Vec<GuardedTap>>, label: String) {
    let mut reported: Vec<(String, u64)> = Vec::new();
    let mut last_warn: Option<Instant> = None;
    loop {
        tokio::time::sleep(DROP_CHECK).await;
        if last_warn.is_some_and(|t| t.elapsed() < DROP_WARN_EVERY) {
            continue;
        }
        let now = read_drops(&fd, &taps).await;
        let totals: Vec<(String, u64)> = now.iter().map(|(t, d)| (t.clone(), d.total())).collect();
        if totals != reported {
            for (tap, drops) in &now {
                tracing::warn!("guest frames dropped on {tap}: {drops} ({label})");
            }
            reported = totals;
            last_warn = Some(Instant::now());
        }
    }
}

/// Makes `cmd` start inside the namespace `fd`.
pub fn enter(cmd: &mut std::process::Command, fd: &Arc<OwnedFd>) {
    let raw = fd.as_raw_fd();
    let keep = Arc::clone(fd);
    // SAFETY: the closure runs between fork and exec and only calls setns, an async-signal-
    // safe syscall, on an fd kept open by `keep` (moved into the closure) until exec.
    unsafe {
        cmd.pre_exec(move || {
            let _ = &keep;
            if libc::setns(raw, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[derive(Deserialize)]
struct IpLink {
    ifname: String,
    #[serde(default)]
    mtu: u32,
    #[serde(default)]
    link_type: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    addr_info: Vec<IpAddr>,
}

#[derive(Deserialize)]
struct IpAddr {
    #[serde(default)]
    family: String,
    #[serde(default)]
    local: String,
    #[serde(default)]
    prefixlen: u8,
    #[serde(default)]
    scope: String,
}

#[derive(Deserialize)]
struct IpRoute {
    dst: String,
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    dev: Option<String>,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(rename = "type", default)]
    kind: Option<String>,
}

/// Parses `ip -j addr show` and `ip -j -4/-6 route show` of a namespace.
pub fn parse_wiring(links: &str, v4: &str, v6: &str) -> Result<Wiring> {
    let bad = |what: &str, e: serde_json::Error| {
        Error::Invalid(format!("network setup: cannot parse `ip -j {what}`: {e}"))
    };
    let links: Vec<IpLink> = serde_json::from_str(links).map_err(|e| bad("addr", e))?;
    let interfaces: Vec<HostInterface> = links
        .into_iter()
        .filter(|l| l.link_type == "ether" && !l.ifname.starts_with(TAP_PREFIX) && l.ifname != SINK)
        .map(|l| HostInterface {
            addresses: l
                .addr_info
                .iter()
                .filter(|a| {
                    (a.family == "inet" || a.family == "inet6")
                        && a.scope == "global"
                        && !a.local.is_empty()
                })
                .map(|a| format!("{}/{}", a.local, a.prefixlen))
                .collect(),
            name: l.ifname,
            mac: l.address,
            mtu: if l.mtu == 0 { 1500 } else { l.mtu },
        })
        .collect();
    let mut routes = Vec::new();
    for (json, default) in [(v4, "default"), (v6, "default6")] {
        let parsed: Vec<IpRoute> = serde_json::from_str(json).map_err(|e| bad("route", e))?;
        for r in parsed {
            let Some(dev) = r.dev else { continue };
            // The guest's kernel adds the routes of its own addresses; multicast, local and
            // other special routes are its own business too.
            let special = r.kind.as_deref().is_some_and(|k| k != "unicast");
            if r.protocol.as_deref() == Some("kernel")
                || special
                || r.dst.starts_with("fe80:")
                || !interfaces.iter().any(|i| i.name == dev)
            {
                continue;
            }
            routes.push(RouteSpec {
                destination: if r.dst == "default" {
                    default.into()
                } else {
                    r.dst
                },
                gateway: r.gateway,
                device: dev,
            });
        }
    }
    Ok(Wiring {
        interfaces,
        routes,
        taps: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINKS: &str = r#"[
      {"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP"],"mtu":65536,"link_type":"loopback",
       "address":"00:00:00:00:00:00","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host"}]},
      {"ifindex":7,"link_index":8,"ifname":"eth0","mtu":1450,"link_type":"ether",
       "address":"02:42:ac:12:00:02","addr_info":[
         {"family":"inet","local":"172.18.0.2","prefixlen":16,"broadcast":"172.18.255.255","scope":"global"},
         {"family":"inet6","local":"fd00::2","prefixlen":64,"scope":"global"},
         {"family":"inet6","local":"fe80::42:acff:fe12:2","prefixlen":64,"scope":"link"}]},
      {"ifindex":9,"ifname":"avmtap0","mtu":1450,"link_type":"ether","address":"aa:bb:cc:dd:ee:ff","addr_info":[]}
    ]"#;
    const V4: &str = r#"[
      {"dst":"default","gateway":"172.18.0.1","dev":"eth0","flags":[]},
      {"dst":"172.18.0.0/16","dev":"eth0","protocol":"kernel","scope":"link","prefsrc":"172.18.0.2","flags":[]},
      {"dst":"10.9.0.0/24","gateway":"172.18.0.254","dev":"eth0","flags":[]}
    ]"#;
    const V6: &str = r#"[
      {"dst":"fd00::/64","dev":"eth0","protocol":"kernel","metric":256,"flags":[]},
      {"dst":"fe80::/64","dev":"eth0","protocol":"kernel","metric":256,"flags":[]},
      {"dst":"default","gateway":"fd00::1","dev":"eth0","metric":1024,"flags":[]},
      {"type":"multicast","dst":"ff00::/8","dev":"eth0","table":"local","flags":[]}
    ]"#;

    #[test]
    fn docker_veth_is_found_with_global_addresses_and_routes() {
        let w = parse_wiring(LINKS, V4, V6).unwrap();
        assert_eq!(
            w.interfaces,
            vec![HostInterface {
                name: "eth0".into(),
                mac: "02:42:ac:12:00:02".into(),
                mtu: 1450,
                addresses: vec!["172.18.0.2/16".into(), "fd00::2/64".into()],
            }]
        );
        let dests: Vec<_> = w.routes.iter().map(|r| r.destination.as_str()).collect();
        assert_eq!(dests, ["default", "10.9.0.0/24", "default6"]);
        assert_eq!(w.routes[0].gateway.as_deref(), Some("172.18.0.1"));
        assert_eq!(w.routes[2].gateway.as_deref(), Some("fd00::1"));
        let spec = w.network_spec();
        assert_eq!(spec.interfaces[0].name, "eth0");
        assert_eq!(spec.routes.len(), 3);
    }

    #[test]
    fn loopback_only_namespace_has_nothing_to_wire() {
        let lo = r#"[{"ifindex":1,"ifname":"lo","mtu":65536,"link_type":"loopback","address":"00:00:00:00:00:00","addr_info":[]}]"#;
        let w = parse_wiring(lo, "[]", "[]").unwrap();
        assert!(w.interfaces.is_empty() && w.routes.is_empty());
    }

    #[test]
    fn garbage_from_ip_is_a_clear_error() {
        let e = parse_wiring("not json", "[]", "[]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot parse `ip -j addr`"), "{e}");
    }

    #[test]
    fn host_network_is_refused_with_an_explanation() {
        let e = Netns::create(&NetnsMode::Host, Path::new("/x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--network host") && e.contains("-p"), "{e}");
    }

    /// Opens tap `name` in `ns` as QEMU would and writes `frames` into it: they enter the host
    /// on the tap's ingress, where the guard sits.
    fn send_as_guest(ns: &Netns, name: &str, frames: Vec<Vec<u8>>) {
        let fd = ns.fd();
        let name = name.to_string();
        std::thread::spawn(move || {
            // SAFETY: setns on a valid namespace fd affects only this short-lived thread.
            let entered = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(entered, 0);
            let tun = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .unwrap();
            // struct ifreq: the name (16 bytes), then the flags.
            let mut ifr = [0u8; 40];
            ifr[..name.len()].copy_from_slice(name.as_bytes());
            let flags = (libc::IFF_TAP | libc::IFF_NO_PI) as u16;
            ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
            // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `ifr` is large enough
            // for, on a tun fd this thread owns.
            let r = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, ifr.as_mut_ptr()) };
            assert_eq!(r, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
            for f in frames {
                std::io::Write::write_all(&mut &tun, &f).unwrap();
            }
        })
        .join()
        .unwrap();
    }

    /// Frames a hostile guest (MAC 02:00:00:00:00:07, IP 10.77.0.2) writes into its tap: only
    /// the honest one passes the kernel's tc, whatever drop action the kernel offers.
    async fn guard_drops_what_the_guest_must_not_send(ns: &Netns, redirected: bool) {
        use crate::netguard::Reason;
        let mac = [2, 0, 0, 0, 0, 7];
        let eth = |src: [u8; 6], ethertype: u16, payload: &[u8]| {
            let mut f = vec![0xff; 6];
            f.extend_from_slice(&src);
            f.extend_from_slice(&ethertype.to_be_bytes());
            f.extend_from_slice(payload);
            f.resize(f.len().max(60), 0);
            f
        };
        let udp4 = |src: [u8; 4], sport: u16| {
            let mut p = vec![0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 17, 0, 0];
            p.extend_from_slice(&src);
            p.extend_from_slice(&[10, 77, 0, 1]);
            p.extend_from_slice(&sport.to_be_bytes());
            p.extend_from_slice(&[0, 68, 0, 8, 0, 0]);
            p
        };
        let arp = |spa: [u8; 4]| {
            let mut a = vec![0, 1, 8, 0, 6, 4, 0, 2];
            a.extend_from_slice(&mac);
            a.extend_from_slice(&spa);
            a.extend_from_slice(&[0xff; 6]);
            a.extend_from_slice(&[10, 77, 0, 1]);
            a
        };
        let ra = {
            let mut p = vec![0x60, 0, 0, 0, 0, 8, 58, 255];
            p.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xfe, 0, 0, 7]);
            p.extend_from_slice(&[0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            p.extend_from_slice(&[134, 0, 0, 0, 64, 0, 0, 0]);
            p
        };
        let mut vlan = eth(mac, 0x8100, &[0, 5, 8, 0]);
        vlan.truncate(18);
        vlan.extend_from_slice(&udp4([10, 77, 0, 2], 40000));
        let frames = vec![
            eth(mac, 0x0800, &udp4([10, 77, 0, 2], 40000)),
            eth(mac, 0x0800, &udp4([10, 77, 0, 9], 40000)),
            eth(mac, 0x0800, &udp4([10, 77, 0, 2], 67)),
            eth(mac, 0x0806, &arp([10, 77, 0, 1])),
            eth(mac, 0x0806, &arp([10, 77, 0, 2])),
            eth(mac, 0x86dd, &ra),
            vlan,
            eth([2, 0, 0, 0, 0, 8], 0x0800, &udp4([10, 77, 0, 2], 40000)),
        ];
        send_as_guest(ns, "avmtap0", frames);
        let taps = Arc::clone(&ns.guard.lock().unwrap().taps);
        let json = ns
            .run(
                "tc",
                ["-s", "-j", "filter", "show", "dev", "avmtap0", "ingress"],
            )
            .await
            .unwrap();
        let (forwarded, drops) = netguard::parse_counters(&taps[0].rules, &json).unwrap();
        // Counted where tc redirects them (with an egress table, they carry on uncounted).
        if redirected {
            assert_eq!(
                forwarded, 2,
                "the honest UDP datagram and ARP reply: {json}"
            );
        }
        assert_eq!(
            drops.0,
            vec![
                (Reason::SourceMac, 1),
                (Reason::Ipv4Source, 1),
                (Reason::Arp, 1),
                (Reason::RouterAdvertisement, 1),
                (Reason::DhcpServer, 1),
                (Reason::Vlan, 1),
            ],
            "{json}"
        );
        let reported = ns.guard_drops().await;
        assert_eq!(reported.len(), 1);
        assert_eq!(
            reported[0].1.to_string(),
            "spoofed source MAC 1, spoofed source IP 1, ARP 1, RA 1, DHCP server 1, VLAN-tagged 1"
        );
    }

    /// With `none-but; allow 198.51.100.9 udp port 9`, a guest datagram to that address
    /// reaches the veth's peer; one to 203.0.113.5 does not and is in the audit log with the
    /// rule that blocked it; a changed policy applies at once.
    async fn egress_lets_through_only_what_the_policy_allows(ns: &Netns, state: &Path) {
        let mac = [2, 0, 0, 0, 0, 7];
        let udp = |dst: [u8; 4]| {
            let mut f = vec![0x02, 0, 0, 0, 0, 1];
            f.extend_from_slice(&mac);
            f.extend_from_slice(&0x0800u16.to_be_bytes());
            f.extend_from_slice(&[0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 77, 0, 2]);
            f.extend_from_slice(&dst);
            f.extend_from_slice(&[0x9c, 0x40, 0, 9, 0, 8, 0, 0]);
            f.resize(60, 0);
            f
        };
        // What reaches the veth's peer from the guest's address (the namespace's own stack
        // sends neighbour discovery there too): counted by a probe table of the test's own.
        ns.run("nft", ["add", "table", "netdev", "probe"])
            .await
            .unwrap();
        ns.run(
            "nft",
            [
                "add",
                "chain",
                "netdev",
                "probe",
                "c",
                "{ type filter hook ingress device \"peer0\" priority 0; }",
            ],
        )
        .await
        .unwrap();
        ns.run(
            "nft",
            [
                "add",
                "rule",
                "netdev",
                "probe",
                "c",
                "ip",
                "saddr",
                "10.77.0.2",
                "counter",
            ],
        )
        .await
        .unwrap();
        let peer_rx = || async {
            let out = ns
                .run("nft", ["list", "chain", "netdev", "probe", "c"])
                .await
                .unwrap();
            parse_counter(&out)
        };
        let before = peer_rx().await;
        send_as_guest(ns, "avmtap0", vec![udp([198, 51, 100, 9])]);
        send_as_guest(ns, "avmtap0", vec![udp([203, 0, 113, 5])]);
        let log = egress::log_path(state);
        let deadline = Instant::now() + Duration::from_secs(5);
        let text = loop {
            let t = std::fs::read_to_string(&log).unwrap_or_default();
            if t.contains("203.0.113.5") || Instant::now() > deadline {
                break t;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(
            peer_rx().await,
            before + 1,
            "only the allowed datagram passed"
        );
        assert!(
            text.contains("blocked udp to 203.0.113.5:9 (policy \"none-but; allow 198.51.100.9 udp port 9\", rule: the default of none-but)"),
            "{text}"
        );
        assert!(!text.contains("to 198.51.100.9"), "{text}");
        // The audit tap carries only what the table blocked, nothing of the namespace's own.
        assert_eq!(text.lines().count(), 1, "{text}");
        // A new policy on the running namespace: 203.0.113.5 is allowed now.
        let mut record = egress::Record::load(state).unwrap();
        record.policy = egress::PolicyFile::default().select(Some("agent")).unwrap();
        apply_egress(&ns.fd(), &egress::nft_program().unwrap(), &record)
            .await
            .unwrap();
        send_as_guest(ns, "avmtap0", vec![udp([203, 0, 113, 5])]);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(peer_rx().await, before + 2, "allowed under the new policy");
    }

    /// A real namespace with a veth pair: needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN).
    #[tokio::test]
    async fn namespace_is_created_scanned_and_wired() {
        if !crate::test_support::as_root("namespace_is_created_scanned_and_wired") {
            return;
        }
        let state = tempfile::tempdir().unwrap();
        let ns = Netns::create(&NetnsMode::New, state.path()).unwrap();
        let own = std::fs::read_link("/proc/self/ns/net").unwrap();
        let theirs = std::fs::read_link(format!("/proc/{}/ns/net", ns.pid())).unwrap();
        assert_ne!(
            own, theirs,
            "the holder must live in a namespace of its own"
        );
        ns.run(
            "ip",
            [
                "link",
                "add",
                "eth0",
                "address",
                "02:00:00:00:00:07",
                "type",
                "veth",
                "peer",
                "name",
                "peer0",
            ],
        )
        .await
        .unwrap();
        ns.run("ip", ["addr", "add", "10.77.0.2/24", "dev", "eth0"])
            .await
            .unwrap();
        ns.run("ip", ["link", "set", "eth0", "up"]).await.unwrap();
        ns.run("ip", ["link", "set", "peer0", "up"]).await.unwrap();
        ns.run("ip", ["route", "add", "default", "via", "10.77.0.1"])
            .await
            .unwrap();
        let mut w = ns.scan().await.unwrap();
        let eth0 = w.interfaces.iter().find(|i| i.name == "eth0").unwrap();
        assert_eq!(eth0.mac, "02:00:00:00:00:07");
        assert_eq!(eth0.addresses, vec!["10.77.0.2/24".to_string()]);
        assert!(w
            .routes
            .iter()
            .any(|r| r.destination == "default" && r.gateway.as_deref() == Some("10.77.0.1")));
        w.interfaces.retain(|i| i.name == "eth0");
        let nft = egress::nft_program();
        let policy = egress::PolicyFile::default()
            .select(Some("none-but; allow 198.51.100.9 udp port 9"))
            .unwrap();
        if nft.is_none() {
            // Without nftables only `open` is possible, and tc redirects.
            let e = ns.wire(&mut w.clone(), &policy).await.unwrap_err();
            assert!(e.to_string().contains("apt-get install nftables"), "{e}");
            ns.wire(&mut w, &egress::Policy::open()).await.unwrap();
            let filters = ns
                .run("tc", ["filter", "show", "dev", "eth0", "ingress"])
                .await
                .unwrap();
            assert!(filters.contains("avmtap0"), "{filters}");
        } else {
            ns.wire(&mut w, &policy).await.unwrap();
            let table = ns
                .run("nft", ["list", "table", "netdev", "agentvm"])
                .await
                .unwrap();
            assert!(table.contains("fwd to \"avmtap0\""), "{table}");
        }
        assert_eq!(w.taps, vec!["avmtap0".to_string()]);
        guard_drops_what_the_guest_must_not_send(&ns, nft.is_none()).await;
        if nft.is_some() {
            egress_lets_through_only_what_the_policy_allows(&ns, state.path()).await;
        } else {
            crate::test_support::runnable(
                "namespace_is_created_scanned_and_wired (egress)",
                Some("nft is not installed (apt-get install nftables)"),
            );
        }
        assert!(!ns.ipv6_disabled("eth0").await, "a fresh veth has IPv6 on");
        ns.run("sysctl", ["-qw", "net.ipv6.conf.eth0.disable_ipv6=1"])
            .await
            .unwrap();
        assert!(ns.ipv6_disabled("eth0").await);
        let sock = ns.udp_socket().unwrap();
        assert!(sock.local_addr().is_ok());
        let path = format!("/proc/{}/ns/net", ns.pid());
        ns.destroy().await;
        assert!(!Path::new(&path).exists(), "the holder must be gone");
    }

    /// Learnt addresses reach the table's sets over netlink, with their timeouts, in the
    /// namespace the socket was opened in (not the caller's); a set that does not exist is an
    /// error the relay sees (it then falls back to nft).
    #[tokio::test]
    async fn learnt_addresses_go_into_the_sets_over_netlink() {
        let test = "learnt_addresses_go_into_the_sets_over_netlink";
        if !crate::test_support::as_root(test) {
            return;
        }
        if egress::nft_program().is_none() {
            crate::test_support::runnable(
                test,
                Some("nft is not installed (apt-get install nftables)"),
            );
            return;
        }
        let state = tempfile::tempdir().unwrap();
        let ns = Netns::create(&NetnsMode::New, state.path()).unwrap();
        let table = "table netdev agentvm {\n set dom4_0 { type ipv4_addr; flags timeout; }\n \
                     set dom6_0 { type ipv6_addr; flags timeout; }\n}\n";
        run_in(&ns.fd(), "nft", ["-f", "-"], Some(table.to_string()))
            .await
            .unwrap();
        let mut w = crate::nftlink::SetWriter::open_in(&ns.fd()).unwrap();
        let l = |set: &str, addr: &str, ttl| egress::Learnt {
            set: set.into(),
            addr: addr.parse().unwrap(),
            ttl,
        };
        w.add(
            egress::TABLE,
            &[
                l("dom4_0", "198.51.100.7", 300),
                l("dom4_0", "198.51.100.9", 5),
                l("dom6_0", "2001:db8::7", 60),
            ],
        )
        .unwrap();
        // Again: an address already there is no error.
        w.add(egress::TABLE, &[l("dom4_0", "198.51.100.7", 300)])
            .unwrap();
        let sets = ns
            .run("nft", ["list", "table", "netdev", "agentvm"])
            .await
            .unwrap();
        for want in [
            "198.51.100.7 timeout 5m",
            "198.51.100.9 timeout 5s",
            "2001:db8::7 timeout 1m",
        ] {
            assert!(sets.contains(want), "{want} not in\n{sets}");
        }
        // Not in the caller's namespace.
        let own = tokio::process::Command::new("nft")
            .args(["list", "tables", "netdev"])
            .output()
            .await
            .unwrap();
        assert!(!String::from_utf8_lossy(&own.stdout).contains("198.51.100.9"));
        let e = w
            .add(egress::TABLE, &[l("dom4_9", "198.51.100.7", 300)])
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
        ns.destroy().await;
    }

    /// What the relay adds to a lookup of an allowed name: the netlink batch against spawning
    /// `nft` (median of 50 each). Run by hand: `cargo test -p agentvm --lib
    /// learnt_address_cost -- --ignored --nocapture` as root.
    #[tokio::test]
    #[ignore = "a measurement, run by hand"]
    async fn learnt_address_cost() {
        if !crate::test_support::as_root("learnt_address_cost") {
            return;
        }
        let state = tempfile::tempdir().unwrap();
        let ns = Netns::create(&NetnsMode::New, state.path()).unwrap();
        let table = "table netdev agentvm {\n set dom4_0 { type ipv4_addr; flags timeout; }\n \
                     set dom6_0 { type ipv6_addr; flags timeout; }\n}\n";
        run_in(&ns.fd(), "nft", ["-f", "-"], Some(table.to_string()))
            .await
            .unwrap();
        let nft = egress::nft_program().unwrap();
        let mut w = crate::nftlink::SetWriter::open_in(&ns.fd()).unwrap();
        let median = |mut v: Vec<Duration>| {
            v.sort();
            v[v.len() / 2]
        };
        let (mut direct, mut spawned) = (Vec::new(), Vec::new());
        for i in 0..50u8 {
            let learnt = [egress::Learnt {
                set: "dom4_0".into(),
                addr: std::net::IpAddr::from([198, 51, 100, i]),
                ttl: 60,
            }];
            let t = Instant::now();
            w.add(egress::TABLE, &learnt).unwrap();
            direct.push(t.elapsed());
            let learnt = [egress::Learnt {
                set: "dom4_0".into(),
                addr: std::net::IpAddr::from([203, 0, 113, i]),
                ttl: 60,
            }];
            let t = Instant::now();
            nft_in(&ns.fd(), &nft, egress::learnt_script(&learnt))
                .await
                .unwrap();
            spawned.push(t.elapsed());
        }
        // The whole of what the relay does before it hands an answer on: read the sandbox's
        // record, parse the answer, add its address.
        let record = egress::Record {
            policy: egress::PolicyFile::default()
                .select(Some("none-but; allow example.test tcp port 443"))
                .unwrap(),
            facts: egress::Facts::default(),
            netns: PathBuf::from(format!("/proc/{}/ns/net", ns.pid())),
            dns_relay: true,
        };
        record.save(state.path()).unwrap();
        let hook = crate::dns::EgressHook::new(
            ns.fd(),
            state.path().to_path_buf(),
            nft.clone(),
            ns.resolved(),
        );
        let mut whole = Vec::new();
        for i in 0..50u8 {
            use simple_dns::{rdata::RData, Name, Packet, Question, ResourceRecord};
            use simple_dns::{CLASS, QCLASS, QTYPE, TYPE};
            let mut pk = Packet::new_reply(7);
            pk.questions.push(Question::new(
                Name::new_unchecked("example.test"),
                QTYPE::TYPE(TYPE::A),
                QCLASS::CLASS(CLASS::IN),
                false,
            ));
            pk.answers.push(ResourceRecord::new(
                Name::new_unchecked("example.test"),
                CLASS::IN,
                60,
                RData::A(simple_dns::rdata::A {
                    address: u32::from_be_bytes([192, 0, 2, i]),
                }),
            ));
            let answer = pk.build_bytes_vec().unwrap();
            let t = Instant::now();
            hook.learn(&answer).await;
            whole.push(t.elapsed());
        }
        let listing = egress_listing(&ns.fd(), &nft).await.unwrap();
        assert!(listing.contains("192.0.2.49"), "{listing}");
        println!(
            "learnt address: netlink median {:?}, nft spawned median {:?}, the relay's whole \
             hook (record, parse, netlink) median {:?}",
            median(direct),
            median(spawned),
            median(whole)
        );
        ns.destroy().await;
    }
}
