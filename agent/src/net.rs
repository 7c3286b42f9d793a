//! The guest's network, from the host's [`NetworkSpec`]: every virtio-net device (found by
//! the MAC address the host gave it) is renamed, gets its MTU and addresses and is brought up;
//! then the routes are added.
//!
//! [`plan`] validates the spec into typed steps (pure, tested); [`apply`] performs them
//! through the [`Rtnl`] seam, whose real implementation, [`Netlink`], speaks rtnetlink, so the
//! order of the steps is tested without root. Nothing here writes to `/etc`: the host sends
//! `/etc/hosts` and `/etc/resolv.conf` as mounts.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use agentvm_protocol::NetworkSpec;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use nix::errno::Errno;

use crate::debug;

/// An address or network in CIDR form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n` or `x:y::z/n`; the prefix length is required.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not in CIDR form (address/prefix length)"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?}: {addr:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?;
        Ok(Self { addr, prefix })
    }

    /// The network part only (host bits cleared).
    pub fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        }
    }

    /// The IPv4 broadcast address of the network, for prefixes that have one (< /31).
    pub fn broadcast(&self) -> Option<Ipv4Addr> {
        match self.addr {
            IpAddr::V4(a) if self.prefix < 31 => {
                let host = u32::MAX >> self.prefix;
                Some(Ipv4Addr::from(u32::from(a) | host))
            }
            _ => None,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// One interface to configure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: [u8; 6],
    /// 0 keeps the device's MTU.
    pub mtu: u32,
    pub addresses: Vec<Cidr>,
}

/// One route to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub destination: Cidr,
    /// None: an on-link route.
    pub gateway: Option<IpAddr>,
    pub device: String,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.destination.prefix == 0 {
            f.write_str("default")?;
        } else {
            write!(f, "{}", self.destination)?;
        }
        if let Some(gw) = self.gateway {
            write!(f, " via {gw}")?;
        }
        write!(f, " dev {}", self.device)
    }
}

/// A validated [`NetworkSpec`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetPlan {
    pub interfaces: Vec<Interface>,
    pub routes: Vec<Route>,
}

/// A failure to configure the network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The spec is not valid; nothing was changed.
    #[error("invalid network spec: {0}")]
    Invalid(String),
    /// The rtnetlink socket could not be opened.
    #[error("open rtnetlink socket: {0}")]
    Socket(std::io::Error),
    /// The interfaces could not be listed.
    #[error("list network interfaces: {}", .0.desc())]
    List(Errno),
    /// No guest interface has the MAC address the host gave the device.
    #[error(
        "configure {name}: no network interface has MAC address {mac} (the guest has: {found})"
    )]
    NoSuchMac {
        name: String,
        mac: String,
        found: String,
    },
    /// One step of configuring an interface failed.
    #[error("configure {iface}: {step}: {}", .errno.desc())]
    Interface {
        iface: String,
        step: String,
        errno: Errno,
    },
    /// A route names an interface the guest does not have.
    #[error("add route {route}: no interface {}", .route.device)]
    NoSuchDevice { route: Route },
    /// The kernel refused a route.
    #[error("add route {route}: {}", .errno.desc())]
    Route { route: Route, errno: Errno },
}

fn invalid(msg: String) -> NetError {
    NetError::Invalid(msg)
}

/// Parses `aa:bb:cc:dd:ee:ff` (either case).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Whether the kernel accepts `name` as an interface name (`dev_valid_name`).
fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
}

fn parse_destination(s: &str) -> Result<Cidr, String> {
    match s {
        "default" => Ok(Cidr {
            addr: Ipv4Addr::UNSPECIFIED.into(),
            prefix: 0,
        }),
        "default6" => Ok(Cidr {
            addr: Ipv6Addr::UNSPECIFIED.into(),
            prefix: 0,
        }),
        _ => {
            let c = Cidr::parse(s)?;
            if c.network() != c.addr {
                return Err(format!(
                    "{s:?} has host bits set (the network is {}/{})",
                    c.network(),
                    c.prefix
                ));
            }
            Ok(c)
        }
    }
}

/// Validates `spec`: names, MACs, addresses, route destinations and gateways.
pub fn plan(spec: &NetworkSpec) -> Result<NetPlan, NetError> {
    let mut interfaces: Vec<Interface> = Vec::new();
    for i in &spec.interfaces {
        if !valid_ifname(&i.name) {
            return Err(invalid(format!(
                "interface name {:?} is not valid (1 to 15 bytes, no '/', ':' or spaces)",
                i.name
            )));
        }
        let mac = parse_mac(&i.mac).ok_or_else(|| {
            invalid(format!(
                "interface {}: MAC address {:?} is not of the form aa:bb:cc:dd:ee:ff",
                i.name, i.mac
            ))
        })?;
        if let Some(other) = interfaces.iter().find(|o| o.name == i.name || o.mac == mac) {
            return Err(invalid(format!(
                "interfaces {} ({}) and {} ({}) share a name or MAC address",
                other.name,
                format_mac(&other.mac),
                i.name,
                i.mac
            )));
        }
        let addresses = i
            .addresses
            .iter()
            .map(|a| Cidr::parse(a))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(format!("interface {}: address {e}", i.name)))?;
        interfaces.push(Interface {
            name: i.name.clone(),
            mac,
            mtu: i.mtu,
            addresses,
        });
    }
    let mut routes = Vec::new();
    for r in &spec.routes {
        let destination = parse_destination(&r.destination)
            .map_err(|e| invalid(format!("route destination {e}")))?;
        let gateway = match &r.gateway {
            None => None,
            Some(g) => {
                let gw: IpAddr = g.parse().map_err(|_| {
                    invalid(format!(
                        "route {}: gateway {g:?} is not an IP address",
                        r.destination
                    ))
                })?;
                if gw.is_ipv4() != destination.addr.is_ipv4() {
                    return Err(invalid(format!(
                        "route {}: gateway {gw} is not of the destination's address family",
                        r.destination
                    )));
                }
                Some(gw)
            }
        };
        if !valid_ifname(&r.device) {
            return Err(invalid(format!(
                "route {}: device name {:?} is not valid",
                r.destination, r.device
            )));
        }
        routes.push(Route {
            destination,
            gateway,
            device: r.device.clone(),
        });
    }
    Ok(NetPlan { interfaces, routes })
}

/// A network interface as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// None for devices without a hardware address.
    pub mac: Option<[u8; 6]>,
    pub up: bool,
}

/// The rtnetlink requests that configuring the network makes.
pub trait Rtnl {
    /// Lists every interface.
    fn links(&mut self) -> Result<Vec<Link>, Errno>;
    /// Sets or clears `IFF_UP`.
    fn set_up(&mut self, index: u32, up: bool) -> Result<(), Errno>;
    /// Renames a link (which must be down).
    fn rename(&mut self, index: u32, name: &str) -> Result<(), Errno>;
    fn set_mtu(&mut self, index: u32, mtu: u32) -> Result<(), Errno>;
    /// Adds an address; fails with `EEXIST` if the link has it already.
    fn add_address(&mut self, index: u32, addr: &Cidr) -> Result<(), Errno>;
    /// Adds a route out of link `oif`; fails with `EEXIST` if it exists.
    fn add_route(&mut self, route: &Route, oif: u32) -> Result<(), Errno>;
}

/// Configures the interfaces, then adds the routes, stopping at the first failure.
pub fn apply(plan: &NetPlan, rtnl: &mut impl Rtnl) -> Result<(), NetError> {
    if plan.interfaces.is_empty() && plan.routes.is_empty() {
        return Ok(());
    }
    let mut links = rtnl.links().map_err(NetError::List)?;
    let mut matched = Vec::with_capacity(plan.interfaces.len());
    for iface in &plan.interfaces {
        let link = links
            .iter()
            .position(|l| l.mac == Some(iface.mac))
            .ok_or_else(|| NetError::NoSuchMac {
                name: iface.name.clone(),
                mac: format_mac(&iface.mac),
                found: links
                    .iter()
                    .filter_map(|l| {
                        l.mac
                            .filter(|m| *m != [0; 6])
                            .map(|m| format!("{} {}", l.name, format_mac(&m)))
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        matched.push(link);
    }
    // Renames. When a wanted name is held by another link (two devices swap names), every
    // renamed link first moves to a temporary name, so no rename collides with a later one.
    let renames: Vec<(usize, &Interface)> = plan
        .interfaces
        .iter()
        .zip(&matched)
        .filter(|(iface, &l)| links[l].name != iface.name)
        .map(|(iface, &l)| (l, iface))
        .collect();
    let collides = renames.iter().any(|(l, iface)| {
        links
            .iter()
            .enumerate()
            .any(|(i, other)| i != *l && other.name == iface.name)
    });
    for &(l, iface) in &renames {
        let link = &mut links[l];
        if link.up {
            rtnl.set_up(link.index, false).map_err(step(
                iface,
                format!("bring {} down to rename it", link.name),
            ))?;
            link.up = false;
        }
        if collides {
            let tmp = format!("avmtmp{}", link.index);
            rtnl.rename(link.index, &tmp)
                .map_err(step(iface, format!("rename {} to {tmp}", link.name)))?;
            link.name = tmp;
        }
    }
    for &(l, iface) in &renames {
        let link = &mut links[l];
        rtnl.rename(link.index, &iface.name).map_err(step(
            iface,
            format!("rename {} to {}", link.name, iface.name),
        ))?;
        link.name = iface.name.clone();
    }
    for (iface, &l) in plan.interfaces.iter().zip(&matched) {
        let index = links[l].index;
        if iface.mtu != 0 {
            rtnl.set_mtu(index, iface.mtu)
                .map_err(step(iface, format!("set MTU {}", iface.mtu)))?;
        }
        for addr in &iface.addresses {
            rtnl.add_address(index, addr)
                .map_err(step(iface, format!("add address {addr}")))?;
        }
        rtnl.set_up(index, true)
            .map_err(step(iface, "bring up".to_string()))?;
        links[l].up = true;
    }
    for route in &plan.routes {
        let oif = links
            .iter()
            .find(|l| l.name == route.device)
            .ok_or_else(|| NetError::NoSuchDevice {
                route: route.clone(),
            })?
            .index;
        rtnl.add_route(route, oif)
            .map_err(|errno| NetError::Route {
                route: route.clone(),
                errno,
            })?;
    }
    Ok(())
}

/// The error of one step of configuring `iface`, for `map_err`.
fn step(iface: &Interface, step: String) -> impl FnOnce(Errno) -> NetError + '_ {
    move |errno| NetError::Interface {
        iface: iface.name.clone(),
        step,
        errno,
    }
}

/// Validates `spec` and applies it over a fresh rtnetlink socket.
pub fn configure(spec: &NetworkSpec) -> Result<(), NetError> {
    let plan = plan(spec)?;
    let mut nl = Netlink::open().map_err(NetError::Socket)?;
    apply(&plan, &mut nl)
}

/// An rtnetlink socket in the network namespace of the thread that opened it. Requests are
/// synchronous: the kernel answers them at once.
#[derive(Debug)]
pub struct Netlink {
    socket: Socket,
    seq: u32,
}

/// Receive buffer size; a dump datagram is at most a few pages.
const RECV_BUF: usize = 64 * 1024;

impl Netlink {
    /// Opens and binds a `NETLINK_ROUTE` socket (close-on-exec).
    pub fn open() -> std::io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self { socket, seq: 0 })
    }

    /// Sends one request and collects the answers: for a dump every message up to
    /// `NLMSG_DONE`, otherwise nothing up to the ACK (the error code of which is returned).
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, Errno> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0).map_err(io_errno)?;

        let mut answers = Vec::new();
        let mut rbuf = vec![0u8; RECV_BUF];
        loop {
            let n = self
                .socket
                .recv(&mut &mut rbuf[..], libc::MSG_TRUNC)
                .map_err(io_errno)?;
            if n > rbuf.len() {
                return Err(Errno::EMSGSIZE);
            }
            let mut off = 0;
            while off < n {
                let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rbuf[off..n]).map_err(
                    |e| {
                        debug!("undecodable rtnetlink answer: {e}");
                        Errno::EBADMSG
                    },
                )?;
                let len = m.header.length as usize;
                if len == 0 {
                    return Err(Errno::EBADMSG);
                }
                off += (len + 3) & !3;
                if m.header.sequence_number != seq {
                    continue;
                }
                match m.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(answers),
                            Some(c) => Err(Errno::from_raw(-c.get())),
                        }
                    }
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::InnerMessage(inner) => answers.push(inner),
                    _ => {}
                }
            }
        }
    }

    fn ack(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<(), Errno> {
        self.request(msg, NLM_F_ACK | flags).map(drop)
    }

    fn set_link(&mut self, index: u32, f: impl FnOnce(&mut LinkMessage)) -> Result<(), Errno> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        f(&mut m);
        self.ack(RouteNetlinkMessage::SetLink(m), 0)
    }
}

fn io_errno(e: std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

fn family(addr: &IpAddr) -> AddressFamily {
    if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn route_address(addr: IpAddr) -> RouteAddress {
    match addr {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    }
}

impl Rtnl for Netlink {
    fn links(&mut self) -> Result<Vec<Link>, Errno> {
        let answers = self.request(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .map(|l| {
                let mut link = Link {
                    index: l.header.index,
                    name: String::new(),
                    mac: None,
                    up: l.header.flags.contains(LinkFlags::Up),
                };
                for a in l.attributes {
                    match a {
                        LinkAttribute::IfName(n) => link.name = n,
                        LinkAttribute::Address(a) => link.mac = a.try_into().ok(),
                        _ => {}
                    }
                }
                link
            })
            .collect())
    }

    fn set_up(&mut self, index: u32, up: bool) -> Result<(), Errno> {
        self.set_link(index, |m| {
            m.header.flags = if up {
                LinkFlags::Up
            } else {
                LinkFlags::empty()
            };
            m.header.change_mask = LinkFlags::Up;
        })
    }

    fn rename(&mut self, index: u32, name: &str) -> Result<(), Errno> {
        self.set_link(index, |m| {
            m.attributes.push(LinkAttribute::IfName(name.to_string()))
        })
    }

    fn set_mtu(&mut self, index: u32, mtu: u32) -> Result<(), Errno> {
        self.set_link(index, |m| m.attributes.push(LinkAttribute::Mtu(mtu)))
    }

    fn add_address(&mut self, index: u32, addr: &Cidr) -> Result<(), Errno> {
        let mut m = AddressMessage::default();
        m.header.family = family(&addr.addr);
        m.header.prefix_len = addr.prefix;
        m.header.index = index;
        m.attributes.push(AddressAttribute::Local(addr.addr));
        m.attributes.push(AddressAttribute::Address(addr.addr));
        if let Some(brd) = addr.broadcast() {
            m.attributes.push(AddressAttribute::Broadcast(brd));
        }
        if addr.addr.is_ipv6() {
            // The host allocated the address: no duplicate address detection, so it is usable
            // at once instead of "tentative" for the first second of the container's life.
            m.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        self.ack(
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    fn add_route(&mut self, route: &Route, oif: u32) -> Result<(), Errno> {
        let mut m = RouteMessage::default();
        m.header.address_family = family(&route.destination.addr);
        m.header.destination_prefix_length = route.destination.prefix;
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.protocol = RouteProtocol::Boot;
        m.header.kind = RouteType::Unicast;
        m.header.scope = if route.gateway.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        if route.destination.prefix > 0 {
            m.attributes.push(RouteAttribute::Destination(route_address(
                route.destination.addr,
            )));
        }
        if let Some(gw) = route.gateway {
            m.attributes
                .push(RouteAttribute::Gateway(route_address(gw)));
        }
        m.attributes.push(RouteAttribute::Oif(oif));
        self.ack(RouteNetlinkMessage::NewRoute(m), NLM_F_CREATE | NLM_F_EXCL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentvm_protocol::{InterfaceSpec, RouteSpec};

    fn iface(name: &str, mac: &str, addresses: &[&str]) -> InterfaceSpec {
        InterfaceSpec {
            name: name.into(),
            mac: mac.into(),
            mtu: 1500,
            addresses: addresses.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn route(dest: &str, gw: Option<&str>, dev: &str) -> RouteSpec {
        RouteSpec {
            destination: dest.into(),
            gateway: gw.map(Into::into),
            device: dev.into(),
        }
    }

    fn docker_spec() -> NetworkSpec {
        NetworkSpec {
            interfaces: vec![iface(
                "eth0",
                "02:42:AC:11:00:02",
                &["172.17.0.2/16", "fd00::2/64"],
            )],
            routes: vec![
                route("default", Some("172.17.0.1"), "eth0"),
                route("default6", Some("fd00::1"), "eth0"),
                route("10.1.0.0/24", None, "eth0"),
            ],
        }
    }

    fn invalid_msg(spec: &NetworkSpec) -> String {
        match plan(spec) {
            Err(NetError::Invalid(m)) => m,
            other => panic!("expected an invalid spec, got {other:?}"),
        }
    }

    #[test]
    fn cidr_parsing() {
        let c = Cidr::parse("172.17.0.2/16").unwrap();
        assert_eq!(c.to_string(), "172.17.0.2/16");
        assert_eq!(c.network(), "172.17.0.0".parse::<IpAddr>().unwrap());
        assert_eq!(c.broadcast(), Some("172.17.255.255".parse().unwrap()));
        assert_eq!(Cidr::parse("10.0.0.1/32").unwrap().broadcast(), None);
        assert_eq!(
            Cidr::parse("0.0.0.0/0").unwrap().network().to_string(),
            "0.0.0.0"
        );
        let v6 = Cidr::parse("fd00::2/64").unwrap();
        assert_eq!(v6.network().to_string(), "fd00::");
        assert_eq!(v6.broadcast(), None);
        assert_eq!(Cidr::parse("::/0").unwrap().network().to_string(), "::");
        for bad in [
            "172.17.0.2",
            "172.17.0.2/33",
            "fd00::2/129",
            "x/8",
            "1.2.3.4/-1",
            "1.2.3.4/",
            "/8",
            "",
            "1.2.3.4/8/8",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("02:42:AC:11:00:0f"),
            Some([0x02, 0x42, 0xac, 0x11, 0x00, 0x0f])
        );
        for bad in [
            "",
            "02:42:ac:11:00",
            "02:42:ac:11:00:02:03",
            "02-42-ac-11-00-02",
            "2:42:ac:11:00:02",
            "02:42:ac:11:00:zz",
            "02:42:ac:11:00:+1",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
        assert_eq!(
            format_mac(&[0x02, 0x42, 0xac, 0, 0, 0xff]),
            "02:42:ac:00:00:ff"
        );
    }

    #[test]
    fn plan_of_a_docker_network() {
        let p = plan(&docker_spec()).unwrap();
        assert_eq!(p.interfaces.len(), 1);
        assert_eq!(p.interfaces[0].mac, [0x02, 0x42, 0xac, 0x11, 0, 2]);
        assert_eq!(p.interfaces[0].addresses[1].to_string(), "fd00::2/64");
        assert_eq!(p.routes[0].to_string(), "default via 172.17.0.1 dev eth0");
        assert_eq!(p.routes[0].destination.prefix, 0);
        assert!(p.routes[0].destination.addr.is_ipv4());
        assert_eq!(p.routes[1].to_string(), "default via fd00::1 dev eth0");
        assert!(p.routes[1].destination.addr.is_ipv6());
        assert_eq!(p.routes[2].to_string(), "10.1.0.0/24 dev eth0");
        assert_eq!(plan(&NetworkSpec::default()).unwrap(), NetPlan::default());
    }

    #[test]
    fn hostile_specs_are_rejected() {
        let with = |f: &dyn Fn(&mut NetworkSpec)| {
            let mut s = docker_spec();
            f(&mut s);
            invalid_msg(&s)
        };
        assert!(with(&|s| s.interfaces[0].name = "a-very-long-name0".into()).contains("not valid"));
        assert!(with(&|s| s.interfaces[0].name = "../eth0".into()).contains("not valid"));
        assert!(with(&|s| s.interfaces[0].name = "eth 0".into()).contains("not valid"));
        assert!(with(&|s| s.interfaces[0].name = String::new()).contains("not valid"));
        assert!(with(&|s| s.interfaces[0].mac = "nope".into()).contains("MAC address"));
        assert!(
            with(&|s| s.interfaces[0].addresses[0] = "172.17.0.2".into()).contains("CIDR form")
        );
        assert!(
            with(&|s| s.interfaces.push(iface("eth1", "02:42:ac:11:00:02", &[])))
                .contains("share a name or MAC")
        );
        assert!(
            with(&|s| s.interfaces.push(iface("eth0", "02:42:ac:11:00:03", &[])))
                .contains("share a name or MAC")
        );
        assert!(with(&|s| s.routes[0].gateway = Some("fd00::1".into())).contains("address family"));
        assert!(with(&|s| s.routes[0].gateway = Some("gw".into())).contains("not an IP"));
        assert!(with(&|s| s.routes[0].destination = "defaults".into()).contains("CIDR"));
        assert!(with(&|s| s.routes[2].destination = "10.1.0.5/24".into())
            .contains("host bits set (the network is 10.1.0.0/24)"));
        assert!(with(&|s| s.routes[0].device = "a/b".into()).contains("device name"));
    }

    /// Records the requests; links are what `links` returns.
    #[derive(Debug, Default)]
    struct Recorder {
        links: Vec<Link>,
        calls: Vec<String>,
        fail: Option<(&'static str, Errno)>,
    }

    impl Recorder {
        fn call(&mut self, c: String) -> Result<(), Errno> {
            let failed = self.fail.filter(|(p, _)| c.starts_with(p));
            self.calls.push(c);
            failed.map_or(Ok(()), |(_, e)| Err(e))
        }
    }

    impl Rtnl for Recorder {
        fn links(&mut self) -> Result<Vec<Link>, Errno> {
            Ok(self.links.clone())
        }
        fn set_up(&mut self, index: u32, up: bool) -> Result<(), Errno> {
            self.call(format!("{} {index}", if up { "up" } else { "down" }))
        }
        fn rename(&mut self, index: u32, name: &str) -> Result<(), Errno> {
            self.call(format!("rename {index} {name}"))
        }
        fn set_mtu(&mut self, index: u32, mtu: u32) -> Result<(), Errno> {
            self.call(format!("mtu {index} {mtu}"))
        }
        fn add_address(&mut self, index: u32, addr: &Cidr) -> Result<(), Errno> {
            self.call(format!("addr {index} {addr}"))
        }
        fn add_route(&mut self, route: &Route, oif: u32) -> Result<(), Errno> {
            self.call(format!("route {route} oif {oif}"))
        }
    }

    fn link(index: u32, name: &str, mac: &str, up: bool) -> Link {
        Link {
            index,
            name: name.into(),
            mac: parse_mac(mac),
            up,
        }
    }

    fn guest() -> Recorder {
        Recorder {
            links: vec![
                link(1, "lo", "00:00:00:00:00:00", true),
                link(2, "eth0", "02:42:ac:11:00:02", false),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn apply_configures_then_routes() {
        let mut r = guest();
        apply(&plan(&docker_spec()).unwrap(), &mut r).unwrap();
        assert_eq!(
            r.calls,
            [
                "mtu 2 1500",
                "addr 2 172.17.0.2/16",
                "addr 2 fd00::2/64",
                "up 2",
                "route default via 172.17.0.1 dev eth0 oif 2",
                "route default via fd00::1 dev eth0 oif 2",
                "route 10.1.0.0/24 dev eth0 oif 2",
            ]
        );
    }

    #[test]
    fn apply_renames_a_link_that_is_up_after_taking_it_down() {
        let mut r = guest();
        r.links[1] = link(5, "enp0s3", "02:42:ac:11:00:02", true);
        let mut spec = docker_spec();
        spec.interfaces[0].mtu = 0;
        apply(&plan(&spec).unwrap(), &mut r).unwrap();
        assert_eq!(
            r.calls[..4],
            [
                "down 5",
                "rename 5 eth0",
                "addr 5 172.17.0.2/16",
                "addr 5 fd00::2/64"
            ]
        );
        assert_eq!(r.calls[4], "up 5");
        assert!(r.calls[5].ends_with("dev eth0 oif 5"), "{:?}", r.calls);
    }

    #[test]
    fn apply_swaps_names_through_temporary_ones() {
        let mut r = guest();
        r.links[1] = link(2, "eth0", "02:00:00:00:00:0b", false);
        r.links.push(link(3, "eth1", "02:00:00:00:00:0a", false));
        let spec = NetworkSpec {
            interfaces: vec![
                iface("eth0", "02:00:00:00:00:0a", &[]),
                iface("eth1", "02:00:00:00:00:0b", &[]),
            ],
            routes: vec![route("default", None, "eth1")],
        };
        apply(&plan(&spec).unwrap(), &mut r).unwrap();
        assert_eq!(
            r.calls,
            [
                "rename 3 avmtmp3",
                "rename 2 avmtmp2",
                "rename 3 eth0",
                "rename 2 eth1",
                "mtu 3 1500",
                "up 3",
                "mtu 2 1500",
                "up 2",
                "route default dev eth1 oif 2",
            ]
        );
    }

    #[test]
    fn apply_reports_a_missing_mac_before_changing_anything() {
        let mut r = guest();
        let mut spec = docker_spec();
        spec.interfaces
            .push(iface("eth1", "02:00:00:00:00:99", &[]));
        let err = apply(&plan(&spec).unwrap(), &mut r).unwrap_err();
        assert_eq!(
            err.to_string(),
            "configure eth1: no network interface has MAC address 02:00:00:00:00:99 \
             (the guest has: eth0 02:42:ac:11:00:02)"
        );
        assert!(r.calls.is_empty(), "{:?}", r.calls);
    }

    #[test]
    fn apply_errors_name_the_step() {
        let mut r = guest();
        r.fail = Some(("addr 2 172.17", Errno::EEXIST));
        let err = apply(&plan(&docker_spec()).unwrap(), &mut r).unwrap_err();
        assert_eq!(
            err.to_string(),
            "configure eth0: add address 172.17.0.2/16: File exists"
        );
        let mut r = guest();
        r.fail = Some(("route default via fd00", Errno::ENETUNREACH));
        let err = apply(&plan(&docker_spec()).unwrap(), &mut r).unwrap_err();
        assert_eq!(
            err.to_string(),
            "add route default via fd00::1 dev eth0: Network is unreachable"
        );
        let mut r = guest();
        let mut spec = docker_spec();
        spec.routes[0].device = "eth9".into();
        let err = apply(&plan(&spec).unwrap(), &mut r).unwrap_err();
        assert_eq!(
            err.to_string(),
            "add route default via 172.17.0.1 dev eth9: no interface eth9"
        );
    }

    /// Runs `cmd` (from the calling thread, so in its network namespace) and returns stdout.
    fn ip(args: &[&str]) -> String {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The real thing, in a network namespace of its own: a veth device (the test kernel may
    /// lack the dummy driver) is found by MAC, renamed, addressed, brought up and routed.
    #[test]
    fn configures_a_real_interface_in_a_new_netns() {
        if !crate::testutil::as_root(
            "configures_a_real_interface_in_a_new_netns",
            "a network namespace",
        ) {
            return;
        }
        if std::process::Command::new("ip").arg("-V").output().is_err() {
            eprintln!(
                "skipping configures_a_real_interface_in_a_new_netns: no `ip` command (iproute2)"
            );
            return;
        }
        // `ip` is a child of this process: no reaper of another test may wait for it.
        let _guard = crate::testutil::child_lock();
        // unshare(CLONE_NEWNET) moves only the calling thread; the namespace dies with it.
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
            ip(&[
                "link",
                "add",
                "d0",
                "address",
                "02:00:00:00:00:01",
                "type",
                "veth",
                "peer",
                "name",
                "d1",
            ]);
            ip(&["link", "set", "d1", "up"]);
            let spec = NetworkSpec {
                interfaces: vec![InterfaceSpec {
                    name: "eth7".into(),
                    mac: "02:00:00:00:00:01".into(),
                    mtu: 1400,
                    addresses: vec!["10.99.0.2/24".into(), "fd00:99::2/64".into()],
                }],
                routes: vec![
                    route("default", Some("10.99.0.1"), "eth7"),
                    route("default6", Some("fd00:99::1"), "eth7"),
                    route("10.98.0.0/16", None, "eth7"),
                ],
            };
            configure(&spec).unwrap();

            let addr = ip(&["-j", "addr", "show", "dev", "eth7"]);
            for want in [
                "\"ifname\":\"eth7\"",
                "\"mtu\":1400",
                "\"address\":\"02:00:00:00:00:01\"",
                "\"local\":\"10.99.0.2\",\"prefixlen\":24",
                "\"broadcast\":\"10.99.0.255\"",
                "\"local\":\"fd00:99::2\",\"prefixlen\":64",
            ] {
                assert!(addr.contains(want), "{want} not in {addr}");
            }
            assert!(addr.contains("\"UP\""), "{addr}");
            // No duplicate address detection: the global IPv6 address is usable at once.
            let v6_addr = addr.split("\"local\":\"fd00:99::2\"").nth(1).unwrap();
            let v6_addr = &v6_addr[..v6_addr.find('}').unwrap()];
            assert!(!v6_addr.contains("tentative"), "{addr}");
            let v4 = ip(&["-j", "route", "show"]);
            assert!(
                v4.contains("{\"dst\":\"default\",\"gateway\":\"10.99.0.1\",\"dev\":\"eth7\""),
                "{v4}"
            );
            assert!(
                v4.contains("{\"dst\":\"10.98.0.0/16\",\"dev\":\"eth7\",\"scope\":\"link\""),
                "{v4}"
            );
            let v6 = ip(&["-j", "-6", "route", "show"]);
            assert!(
                v6.contains("{\"dst\":\"default\",\"gateway\":\"fd00:99::1\",\"dev\":\"eth7\""),
                "{v6}"
            );

            // Applying it again fails on the first address, with the step named.
            let err = configure(&spec).unwrap_err();
            assert_eq!(
                err.to_string(),
                "configure eth7: add address 10.99.0.2/24: File exists"
            );
        })
        .join()
        .unwrap();
    }
}
