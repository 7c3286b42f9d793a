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

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use agentvm_protocol::{InterfaceSpec, NetworkSpec, RouteSpec};
use serde::Deserialize;

use crate::error::{Error, Result};

/// Prefix of the tap devices agentvm creates next to each interface.
pub const TAP_PREFIX: &str = "avmtap";

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
        })
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
        let mut cmd = std::process::Command::new(program);
        cmd.args(args).stdin(Stdio::null());
        enter(&mut cmd, &self.fd);
        let shown = format!("{cmd:?}");
        let out = tokio::process::Command::from(cmd)
            .output()
            .await
            .map_err(|e| Error::Spawn {
                program: program.into(),
                source: e,
            })?;
        if !out.status.success() {
            return Err(Error::Invalid(format!(
                "network setup: {shown} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        String::from_utf8(out.stdout)
            .map_err(|_| Error::Invalid(format!("network setup: {shown} printed non-UTF-8")))
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

    /// Creates a tap per interface and joins the two with tc redirects both ways.
    pub async fn wire(&self, wiring: &mut Wiring) -> Result<()> {
        wiring.taps.clear();
        for (i, iface) in wiring.interfaces.iter().enumerate() {
            let tap = format!("{TAP_PREFIX}{i}");
            let mtu = iface.mtu.to_string();
            self.run("ip", ["tuntap", "add", "dev", &tap, "mode", "tap"])
                .await?;
            self.run("ip", ["link", "set", "dev", &tap, "mtu", &mtu, "up"])
                .await?;
            for (from, to) in [(iface.name.as_str(), tap.as_str()), (&tap, &iface.name)] {
                self.run("tc", ["qdisc", "add", "dev", from, "ingress"])
                    .await?;
                self.run(
                    "tc",
                    [
                        "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32",
                        "match", "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev",
                        to,
                    ],
                )
                .await?;
            }
            wiring.taps.push(tap);
        }
        Ok(())
    }

    /// A UDP socket living in the namespace (it keeps talking from there whatever thread uses
    /// it): the host end of the DNS relay to Docker's resolver at 127.0.0.11.
    pub fn udp_socket(&self) -> Result<std::net::UdpSocket> {
        let fd = Arc::clone(&self.fd);
        std::thread::spawn(move || -> std::io::Result<std::net::UdpSocket> {
            // SAFETY: setns on a valid namespace fd affects only this short-lived thread.
            if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            std::net::UdpSocket::bind("0.0.0.0:0")
        })
        .join()
        .map_err(|_| Error::Invalid("the namespace socket thread panicked".into()))?
        .map_err(|e| {
            Error::io(
                "create a UDP socket in",
                format!("/proc/{}/ns/net", self.pid),
                e,
            )
        })
    }

    /// Kills the holder; the namespace goes with the last process in it.
    pub async fn destroy(mut self) {
        let _ = self.holder.start_kill();
        let _ = self.holder.wait().await;
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
        .filter(|l| l.link_type == "ether" && !l.ifname.starts_with(TAP_PREFIX))
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

    /// A real namespace with a veth pair: needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN).
    #[tokio::test]
    async fn namespace_is_created_scanned_and_wired() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipping namespace_is_created_scanned_and_wired: needs root");
            return;
        }
        let ns = Netns::create(&NetnsMode::New, Path::new("/test")).unwrap();
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
        ns.wire(&mut w).await.unwrap();
        assert_eq!(w.taps, vec!["avmtap0".to_string()]);
        let filters = ns
            .run("tc", ["filter", "show", "dev", "eth0", "ingress"])
            .await
            .unwrap();
        assert!(filters.contains("avmtap0"), "{filters}");
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
}
