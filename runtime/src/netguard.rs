//! Host-side anti-spoofing for the guest's frames (docs/security.md "Network: anti-spoofing").
//!
//! Root in the guest may send any frame. Every frame the guest sends enters the host on the
//! ingress of its tap (in the container's network namespace), where tc filters decide, before
//! the `mirred` redirect to the veth, whether it may reach Docker's bridge: only frames with
//! the veth's MAC as source and the interface's addresses (ARP sender, IPv4 and IPv6 source)
//! are forwarded; router advertisements, redirects and DHCP server traffic are dropped, and so
//! is everything else (VLAN-tagged frames, other ethertypes, IPv6 extension headers other
//! than a fragment header or an MLD hop-by-hop header).
//!
//! [`rules`] is pure: interface facts in, an ordered list of `u32` filters out (tc's `u32`
//! classifier and `mirred` action are the only ones every kernel agentvm meets has; `flower`,
//! `matchall` and the `gact` drop action are modules some hosts lack). Each drop filter carries
//! a [`Reason`], and its packet counter (`tc -s filter show`) is what [`parse_drops`] reads.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::Deserialize;

use crate::netns::HostInterface;

/// First tc priority of the guard's filters on a tap's ingress.
pub const FIRST_PRIO: u16 = 10;

/// Why a frame from the guest was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// The Ethernet source is not the guest's MAC (also: whatever nothing else matched).
    SourceMac,
    /// IPv4 with a source the interface does not have.
    Ipv4Source,
    /// ARP with another sender MAC or IP.
    Arp,
    /// IPv6 with a source the interface does not have, or an extension header.
    Ipv6Source,
    /// ICMPv6 router advertisement (type 134).
    RouterAdvertisement,
    /// ICMPv6 redirect (type 137).
    Redirect,
    /// DHCPv4 or DHCPv6 server traffic (UDP source port 67 or 547).
    DhcpServer,
    /// 802.1Q or 802.1ad tagged frames.
    Vlan,
    /// Other ethertypes, IPv4 UDP with IP options.
    Other,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::SourceMac => "spoofed source MAC",
            Reason::Ipv4Source => "spoofed source IP",
            Reason::Arp => "ARP",
            Reason::Ipv6Source => "spoofed IPv6 source or header",
            Reason::RouterAdvertisement => "RA",
            Reason::Redirect => "ICMPv6 redirect",
            Reason::DhcpServer => "DHCP server",
            Reason::Vlan => "VLAN-tagged",
            Reason::Other => "other",
        })
    }
}

/// What a filter does with the frames it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Redirected to the veth's egress: onto Docker's network.
    Forward,
    /// Dropped and counted.
    Drop(Reason),
}

/// The ethertype a filter applies to (tc's `protocol`). With a VLAN tag the kernel has moved
/// into the skb, tc sees the tag's protocol (802.1Q), not the inner one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    All,
    Ipv4,
    Ipv6,
    Arp,
    Dot1Q,
    Dot1Ad,
}

impl Proto {
    fn tc_name(self) -> &'static str {
        match self {
            Proto::All => "all",
            Proto::Ipv4 => "ip",
            Proto::Ipv6 => "ipv6",
            Proto::Arp => "arp",
            Proto::Dot1Q => "802.1Q",
            Proto::Dot1Ad => "802.1ad",
        }
    }

    /// The ethertype, `None` for all.
    pub fn ethertype(self) -> Option<u16> {
        match self {
            Proto::All => None,
            Proto::Ipv4 => Some(0x0800),
            Proto::Ipv6 => Some(0x86dd),
            Proto::Arp => Some(0x0806),
            Proto::Dot1Q => Some(0x8100),
            Proto::Dot1Ad => Some(0x88a8),
        }
    }
}

/// A `u32` key: the 32-bit word at `off` (relative to the network header; negative offsets
/// reach the Ethernet header) masked with `mask` equals `value`. `off` is a multiple of 4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub off: i32,
    pub value: u32,
    pub mask: u32,
}

/// One tc filter on the tap's ingress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub prio: u16,
    pub proto: Proto,
    pub keys: Vec<Key>,
    pub verdict: Verdict,
}

/// How a drop is done: tc's `gact` drop action where the kernel has it, else a redirect to
/// a tap that is never brought up (mirred drops what it cannot send, and counts it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DropAction {
    Gact,
    Sink(String),
}

/// What the guard needs to know about an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub mac: [u8; 6],
    pub ipv4: Vec<Ipv4Addr>,
    /// Global IPv6 addresses (the link-local one is derived from the MAC).
    pub ipv6: Vec<Ipv6Addr>,
    /// IPv6 is on for the interface (Docker switches it off on networks without IPv6, and
    /// the guest follows).
    pub ipv6_enabled: bool,
}

/// A fact the guard cannot use.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("interface {iface}: MAC address {mac:?} is not of the form aa:bb:cc:dd:ee:ff")]
    Mac { iface: String, mac: String },
    #[error("interface {iface}: address {addr:?} is not an IP address in CIDR form")]
    Address { iface: String, addr: String },
}

impl Facts {
    /// The facts of a scanned interface.
    pub fn of(iface: &HostInterface, ipv6_enabled: bool) -> Result<Facts, GuardError> {
        let mac = parse_mac(&iface.mac).ok_or_else(|| GuardError::Mac {
            iface: iface.name.clone(),
            mac: iface.mac.clone(),
        })?;
        let mut facts = Facts {
            mac,
            ipv4: Vec::new(),
            ipv6: Vec::new(),
            ipv6_enabled,
        };
        for a in &iface.addresses {
            let bad = || GuardError::Address {
                iface: iface.name.clone(),
                addr: a.clone(),
            };
            let ip: std::net::IpAddr = a
                .split('/')
                .next()
                .unwrap_or("")
                .parse()
                .map_err(|_| bad())?;
            match ip {
                std::net::IpAddr::V4(v4) => facts.ipv4.push(v4),
                std::net::IpAddr::V6(v6) => facts.ipv6.push(v6),
            }
        }
        Ok(facts)
    }

    /// The link-local address the guest's kernel gives its eth0: EUI-64 from the MAC
    /// (`addr_gen_mode` 0, the default; the agent sets no other).
    pub fn link_local(&self) -> Ipv6Addr {
        let m = self.mac;
        Ipv6Addr::from([
            0xfe,
            0x80,
            0,
            0,
            0,
            0,
            0,
            0,
            m[0] ^ 0x02,
            m[1],
            m[2],
            0xff,
            0xfe,
            m[3],
            m[4],
            m[5],
        ])
    }
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Builds keys byte-wise, merged into aligned 32-bit words as the kernel compares them.
#[derive(Default)]
struct Keys(Vec<Key>);

impl Keys {
    fn bytes(mut self, off: i32, bytes: &[u8]) -> Self {
        for (i, b) in bytes.iter().enumerate() {
            self = self.masked(off + i as i32, *b, 0xff);
        }
        self
    }

    fn masked(mut self, off: i32, value: u8, mask: u8) -> Self {
        let word = off.div_euclid(4) * 4;
        let shift = 8 * (3 - off.rem_euclid(4)) as u32;
        let (v, m) = ((u32::from(value & mask)) << shift, u32::from(mask) << shift);
        match self.0.iter_mut().find(|k| k.off == word) {
            Some(k) => {
                k.value |= v;
                k.mask |= m;
            }
            None => self.0.push(Key {
                off: word,
                value: v,
                mask: m,
            }),
        }
        self
    }

    fn u8(self, off: i32, v: u8) -> Self {
        self.bytes(off, &[v])
    }

    fn u16(self, off: i32, v: u16) -> Self {
        self.bytes(off, &v.to_be_bytes())
    }

    /// Ethernet source address (6 bytes from 8 before the network header).
    fn src_mac(self, mac: &[u8; 6]) -> Self {
        self.bytes(-8, mac)
    }

    fn done(mut self) -> Vec<Key> {
        if self.0.is_empty() {
            // u32 wants a key; this one matches everything.
            self.0.push(Key {
                off: 0,
                value: 0,
                mask: 0,
            });
        }
        self.0
    }
}

const UDP: u8 = 17;
const TCP: u8 = 6;
const ICMPV6: u8 = 58;
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_FRAGMENT: u8 = 44;
const DHCPV4_SERVER: u16 = 67;
const DHCPV6_SERVER: u16 = 547;
const ND_ROUTER_ADVERT: u8 = 134;
const ND_NEIGHBOR_SOLICIT: u8 = 135;
const ND_REDIRECT: u8 = 137;
const MLD_REPORTS: [u8; 3] = [131, 132, 143];
const MLD_V2_REPORT: u8 = 143;

/// The guard's filters for a tap in front of an interface with `facts`, in priority order.
/// The last rule drops whatever no rule before it matched: nothing the guest sends reaches
/// the namespace's own stack either.
pub fn rules(facts: &Facts) -> Vec<Rule> {
    let mac = &facts.mac;
    let from_guest = || Keys::default().src_mac(mac);
    let mut out: Vec<(Proto, Vec<Key>, Verdict)> = Vec::new();
    let mut add = |proto, keys: Keys, verdict| out.push((proto, keys.done(), verdict));

    // IPv4. Version 4 with a 20-byte header (0x45) puts the UDP source port at 20; UDP with
    // IP options is dropped so no port can hide behind them.
    add(
        Proto::Ipv4,
        from_guest().u8(0, 0x45).u8(9, UDP).u16(20, DHCPV4_SERVER),
        Verdict::Drop(Reason::DhcpServer),
    );
    for a in &facts.ipv4 {
        add(
            Proto::Ipv4,
            from_guest().u8(0, 0x45).u8(9, UDP).bytes(12, &a.octets()),
            Verdict::Forward,
        );
    }
    for a in &facts.ipv4 {
        add(
            Proto::Ipv4,
            from_guest().u8(9, UDP).bytes(12, &a.octets()),
            Verdict::Drop(Reason::Other),
        );
    }
    for a in &facts.ipv4 {
        add(
            Proto::Ipv4,
            from_guest().bytes(12, &a.octets()),
            Verdict::Forward,
        );
    }
    add(Proto::Ipv4, from_guest(), Verdict::Drop(Reason::Ipv4Source));

    // ARP for IPv4 over Ethernet: sender MAC and IP are the guest's; probes (sender IP
    // 0.0.0.0, requests only) may pass.
    let arp = || {
        from_guest()
            .u16(0, 1)
            .u16(2, 0x0800)
            .u8(4, 6)
            .u8(5, 4)
            .bytes(8, mac)
    };
    for a in &facts.ipv4 {
        add(Proto::Arp, arp().bytes(14, &a.octets()), Verdict::Forward);
    }
    if !facts.ipv4.is_empty() {
        add(
            Proto::Arp,
            arp().u16(6, 1).bytes(14, &[0; 4]),
            Verdict::Forward,
        );
    }
    add(Proto::Arp, from_guest(), Verdict::Drop(Reason::Arp));

    // IPv6: router advertisements, redirects and DHCPv6 server traffic first, also in the
    // first fragment of a fragmented packet (which Linux would not accept for ND anyway).
    let v6 = || from_guest();
    add(
        Proto::Ipv6,
        v6().u8(6, ICMPV6).u8(40, ND_ROUTER_ADVERT),
        Verdict::Drop(Reason::RouterAdvertisement),
    );
    add(
        Proto::Ipv6,
        v6().u8(6, ICMPV6).u8(40, ND_REDIRECT),
        Verdict::Drop(Reason::Redirect),
    );
    add(
        Proto::Ipv6,
        v6().u8(6, UDP).u16(40, DHCPV6_SERVER),
        Verdict::Drop(Reason::DhcpServer),
    );
    // Fragment header at 40: next header (40), offset and flags (42..44, offset = top 13
    // bits); the first fragment's payload starts at 48.
    let first_fragment = |next: u8| {
        v6().u8(6, IPV6_FRAGMENT)
            .u8(40, next)
            .masked(42, 0, 0xff)
            .masked(43, 0, 0xf8)
    };
    add(
        Proto::Ipv6,
        first_fragment(ICMPV6).u8(48, ND_ROUTER_ADVERT),
        Verdict::Drop(Reason::RouterAdvertisement),
    );
    add(
        Proto::Ipv6,
        first_fragment(ICMPV6).u8(48, ND_REDIRECT),
        Verdict::Drop(Reason::Redirect),
    );
    add(
        Proto::Ipv6,
        first_fragment(UDP).u16(48, DHCPV6_SERVER),
        Verdict::Drop(Reason::DhcpServer),
    );
    if facts.ipv6_enabled {
        let mut sources = facts.ipv6.clone();
        let ll = facts.link_local();
        if !sources.contains(&ll) {
            sources.push(ll);
        }
        for s in &sources {
            let src = || v6().bytes(8, &s.octets());
            for next in [TCP, UDP, ICMPV6, IPV6_FRAGMENT] {
                add(Proto::Ipv6, src().u8(6, next), Verdict::Forward);
            }
            for t in MLD_REPORTS {
                add(Proto::Ipv6, mld(src(), t), Verdict::Forward);
            }
        }
        // Duplicate address detection and the MLD report before an address is usable
        // come from the unspecified address.
        let unspecified = || v6().bytes(8, &[0; 16]);
        add(
            Proto::Ipv6,
            unspecified().u8(6, ICMPV6).u8(40, ND_NEIGHBOR_SOLICIT),
            Verdict::Forward,
        );
        add(
            Proto::Ipv6,
            mld(unspecified(), MLD_V2_REPORT),
            Verdict::Forward,
        );
    }
    add(Proto::Ipv6, from_guest(), Verdict::Drop(Reason::Ipv6Source));

    add(Proto::Dot1Q, Keys::default(), Verdict::Drop(Reason::Vlan));
    add(Proto::Dot1Ad, Keys::default(), Verdict::Drop(Reason::Vlan));
    add(Proto::All, from_guest(), Verdict::Drop(Reason::Other));
    add(
        Proto::All,
        Keys::default(),
        Verdict::Drop(Reason::SourceMac),
    );

    out.into_iter()
        .enumerate()
        .map(|(i, (proto, keys, verdict))| Rule {
            prio: FIRST_PRIO + i as u16,
            proto,
            keys,
            verdict,
        })
        .collect()
}

/// An MLD message of `kind` behind the hop-by-hop header (with Router Alert) it must carry:
/// an 8-byte header (length 0) whose next header is ICMPv6, the message at 48.
fn mld(keys: Keys, kind: u8) -> Keys {
    keys.u8(6, IPV6_HOP_BY_HOP)
        .u8(40, ICMPV6)
        .u8(41, 0)
        .u8(48, kind)
}

impl Rule {
    /// The `tc filter add` arguments (without the leading `tc`) for this rule on `tap`.
    /// `forward_to` `None`: an allowed frame goes on to the next hook (the egress policy's
    /// nftables chain, which forwards it) instead of being redirected to the veth.
    pub fn tc_args(&self, tap: &str, forward_to: Option<&str>, drop: &DropAction) -> Vec<String> {
        let mut a: Vec<String> = [
            "filter",
            "add",
            "dev",
            tap,
            "parent",
            "ffff:",
            "protocol",
            self.proto.tc_name(),
            "prio",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.push(self.prio.to_string());
        a.push("u32".into());
        for k in &self.keys {
            a.extend([
                "match".into(),
                "u32".into(),
                format!("{:#010x}", k.value),
                format!("{:#010x}", k.mask),
                "at".into(),
                k.off.to_string(),
            ]);
        }
        match (self.verdict, drop, forward_to) {
            // A terminal match without an action: the frame carries on (TC_ACT_OK).
            (Verdict::Forward, _, None) => a.extend(["classid".into(), "1:1".into()]),
            (Verdict::Forward, _, Some(veth)) => {
                a.push("action".into());
                a.extend(redirect(veth));
            }
            (Verdict::Drop(_), DropAction::Gact, _) => a.extend(["action".into(), "drop".into()]),
            (Verdict::Drop(_), DropAction::Sink(sink), _) => {
                a.push("action".into());
                a.extend(redirect(sink));
            }
        }
        a
    }
}

fn redirect(dev: &str) -> [String; 5] {
    ["mirred", "egress", "redirect", "dev", dev].map(String::from)
}

/// The verdict of `rules` on an Ethernet frame, as the kernel's tc ingress would find it:
/// a VLAN tag is taken out of the frame first (and the filter protocol is then the tag's),
/// a key beyond the frame's end does not match, and `None` means no rule matched.
pub fn classify(rules: &[Rule], frame: &[u8]) -> Option<Verdict> {
    if frame.len() < 14 {
        return None;
    }
    let outer = u16::from_be_bytes([frame[12], frame[13]]);
    let (protocol, skb): (u16, Vec<u8>) =
        if (outer == 0x8100 || outer == 0x88a8) && frame.len() >= 18 {
            let mut skb = frame[..12].to_vec();
            skb.extend_from_slice(&frame[16..]);
            (outer, skb)
        } else {
            (outer, frame.to_vec())
        };
    let word = |off: i32| -> Option<u32> {
        let start = usize::try_from(14 + off).ok()?;
        let b = skb.get(start..start + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let mut sorted: Vec<&Rule> = rules.iter().collect();
    sorted.sort_by_key(|r| r.prio);
    sorted
        .into_iter()
        .find(|r| {
            r.proto.ethertype().is_none_or(|t| t == protocol)
                && r.keys
                    .iter()
                    .all(|k| word(k.off).is_some_and(|w| (w ^ k.value) & k.mask == 0))
        })
        .map(|r| r.verdict)
}

/// Dropped frames per reason, in [`Reason`] order, without zeros.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drops(pub Vec<(Reason, u64)>);

impl Drops {
    pub fn total(&self) -> u64 {
        self.0.iter().map(|(_, n)| n).sum()
    }
}

impl fmt::Display for Drops {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (reason, n)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{reason} {n}")?;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct TcFilter {
    #[serde(default)]
    pref: u16,
    #[serde(default)]
    options: Option<TcOptions>,
}

#[derive(Deserialize)]
struct TcOptions {
    #[serde(default)]
    actions: Vec<TcAction>,
}

#[derive(Deserialize)]
struct TcAction {
    #[serde(default)]
    stats: Option<TcStats>,
}

#[derive(Deserialize)]
struct TcStats {
    #[serde(default)]
    packets: u64,
}

/// Sums the packet counters of `rules`' drop filters in `tc -s -j filter show dev TAP
/// ingress` output.
pub fn parse_drops(rules: &[Rule], json: &str) -> Result<Drops, serde_json::Error> {
    parse_counters(rules, json).map(|(_, drops)| drops)
}

/// The frames `rules` forwarded and dropped, from `tc -s -j filter show dev TAP ingress`.
pub fn parse_counters(rules: &[Rule], json: &str) -> Result<(u64, Drops), serde_json::Error> {
    let filters: Vec<TcFilter> = serde_json::from_str(json)?;
    let mut forwarded = 0;
    let mut by_reason = std::collections::BTreeMap::<Reason, u64>::new();
    for f in filters {
        let Some(verdict) = rules.iter().find(|r| r.prio == f.pref).map(|r| r.verdict) else {
            continue;
        };
        let packets: u64 = f
            .options
            .iter()
            .flat_map(|o| &o.actions)
            .filter_map(|a| a.stats.as_ref())
            .map(|s| s.packets)
            .sum();
        match verdict {
            Verdict::Forward => forwarded += packets,
            Verdict::Drop(reason) => *by_reason.entry(reason).or_default() += packets,
        }
    }
    let drops = Drops(by_reason.into_iter().filter(|(_, n)| *n > 0).collect());
    Ok((forwarded, drops))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0x42, 0xac, 0x12, 0x00, 0x02];
    const OTHER_MAC: [u8; 6] = [0x02, 0x42, 0xac, 0x12, 0x00, 0x09];

    fn eth(src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&src);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut h = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0];
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        h.extend_from_slice(l4);
        h
    }

    fn udp(sport: u16, dport: u16) -> Vec<u8> {
        let mut u = sport.to_be_bytes().to_vec();
        u.extend_from_slice(&dport.to_be_bytes());
        u.extend_from_slice(&[0, 8, 0, 0]);
        u
    }

    fn tcp(sport: u16, dport: u16) -> Vec<u8> {
        let mut t = sport.to_be_bytes().to_vec();
        t.extend_from_slice(&dport.to_be_bytes());
        t.extend_from_slice(&[0; 16]);
        t
    }

    fn arp(op: u16, sha: [u8; 6], spa: [u8; 4], tpa: [u8; 4]) -> Vec<u8> {
        let mut a = vec![0, 1, 8, 0, 6, 4];
        a.extend_from_slice(&op.to_be_bytes());
        a.extend_from_slice(&sha);
        a.extend_from_slice(&spa);
        a.extend_from_slice(&[0; 6]);
        a.extend_from_slice(&tpa);
        a
    }

    fn ipv6(src: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
        let mut h = vec![0x60, 0, 0, 0];
        h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        h.extend_from_slice(&[next, 255]);
        h.extend_from_slice(&src.octets());
        h.extend_from_slice(&"ff02::1".parse::<Ipv6Addr>().unwrap().octets());
        h.extend_from_slice(payload);
        h
    }

    fn icmp6(kind: u8) -> Vec<u8> {
        vec![kind, 0, 0, 0, 0, 0, 0, 0]
    }

    fn facts(v4: &[&str], v6: &[&str], v6_on: bool) -> Facts {
        Facts {
            mac: MAC,
            ipv4: v4.iter().map(|a| a.parse().unwrap()).collect(),
            ipv6: v6.iter().map(|a| a.parse().unwrap()).collect(),
            ipv6_enabled: v6_on,
        }
    }

    const ME: [u8; 4] = [172, 18, 0, 2];
    const GW: [u8; 4] = [172, 18, 0, 1];
    const NEIGHBOUR: [u8; 4] = [172, 18, 0, 3];
    const FWD: Option<Verdict> = Some(Verdict::Forward);
    fn dropped(r: Reason) -> Option<Verdict> {
        Some(Verdict::Drop(r))
    }

    #[test]
    fn ipv4_only_interface() {
        let r = rules(&facts(&["172.18.0.2"], &[], false));
        let v4 = |src, l4: u8, payload: &[u8]| eth(MAC, 0x0800, &ipv4(src, GW, l4, payload));
        assert_eq!(classify(&r, &v4(ME, 6, &tcp(40000, 80))), FWD);
        assert_eq!(classify(&r, &v4(ME, 17, &udp(40000, 53))), FWD);
        assert_eq!(classify(&r, &v4(ME, 1, &[8, 0, 0, 0])), FWD);
        // The real-world addresses: the cloud metadata service and Docker's resolver are
        // destinations the guest may use, never sources it may claim.
        let to = |dst| eth(MAC, 0x0800, &ipv4(ME, dst, 6, &tcp(40000, 80)));
        assert_eq!(classify(&r, &to([169, 254, 169, 254])), FWD);
        assert_eq!(classify(&r, &to([127, 0, 0, 11])), FWD);
        for spoof in [NEIGHBOUR, GW, [169, 254, 169, 254], [127, 0, 0, 11], [0; 4]] {
            assert_eq!(
                classify(&r, &v4(spoof, 6, &tcp(40000, 80))),
                dropped(Reason::Ipv4Source),
                "{spoof:?}"
            );
        }
        // Right IP, wrong MAC.
        assert_eq!(
            classify(&r, &eth(OTHER_MAC, 0x0800, &ipv4(ME, GW, 6, &tcp(1, 2)))),
            dropped(Reason::SourceMac)
        );
        // DHCP server traffic, even from the guest's own address.
        assert_eq!(
            classify(&r, &v4(ME, 17, &udp(67, 68))),
            dropped(Reason::DhcpServer)
        );
        // A DHCP client is not a server.
        assert_eq!(classify(&r, &v4(ME, 17, &udp(68, 67))), FWD);
        // UDP behind IP options (IHL 6) cannot hide its port.
        let mut opts = ipv4(ME, GW, 17, &[]);
        opts[0] = 0x46;
        opts.extend_from_slice(&[0x94, 4, 0, 0]);
        opts.extend_from_slice(&udp(67, 68));
        assert_eq!(
            classify(&r, &eth(MAC, 0x0800, &opts)),
            dropped(Reason::Other)
        );
        // No IPv6 at all on this interface.
        let ll = facts(&["172.18.0.2"], &[], false).link_local();
        assert_eq!(
            classify(&r, &eth(MAC, 0x86dd, &ipv6(ll, 58, &icmp6(128)))),
            dropped(Reason::Ipv6Source)
        );
    }

    #[test]
    fn arp_only_for_own_addresses() {
        let r = rules(&facts(&["172.18.0.2"], &[], false));
        let a = |op, sha, spa, tpa| classify(&r, &eth(MAC, 0x0806, &arp(op, sha, spa, tpa)));
        assert_eq!(a(1, MAC, ME, GW), FWD);
        assert_eq!(a(2, MAC, ME, GW), FWD);
        // Gratuitous ARP for itself, and an RFC 5227 probe.
        assert_eq!(a(1, MAC, ME, ME), FWD);
        assert_eq!(a(1, MAC, [0; 4], ME), FWD);
        // Claiming the gateway's IP (gratuitous or as a reply), or another MAC.
        assert_eq!(a(1, MAC, GW, GW), dropped(Reason::Arp));
        assert_eq!(a(2, MAC, GW, NEIGHBOUR), dropped(Reason::Arp));
        assert_eq!(a(2, OTHER_MAC, ME, GW), dropped(Reason::Arp));
        // A "probe" reply is no probe.
        assert_eq!(a(2, MAC, [0; 4], GW), dropped(Reason::Arp));
        // ARP from another Ethernet source.
        assert_eq!(
            classify(&r, &eth(OTHER_MAC, 0x0806, &arp(1, OTHER_MAC, ME, GW))),
            dropped(Reason::SourceMac)
        );
        // Truncated ARP.
        assert_eq!(
            classify(&r, &eth(MAC, 0x0806, &arp(1, MAC, ME, GW)[..12])),
            dropped(Reason::Arp)
        );
    }

    #[test]
    fn dual_stack_interface() {
        let f = facts(&["172.18.0.2"], &["fd00::2"], true);
        let r = rules(&f);
        let me6: Ipv6Addr = "fd00::2".parse().unwrap();
        let v6 = |src, next, p: &[u8]| classify(&r, &eth(MAC, 0x86dd, &ipv6(src, next, p)));
        assert_eq!(
            f.link_local(),
            "fe80::42:acff:fe12:2".parse::<Ipv6Addr>().unwrap()
        );
        for src in [me6, f.link_local()] {
            assert_eq!(v6(src, 6, &tcp(1, 80)), FWD);
            assert_eq!(v6(src, 17, &udp(1, 53)), FWD);
            assert_eq!(v6(src, 58, &icmp6(128)), FWD);
            assert_eq!(v6(src, 58, &icmp6(135)), FWD);
            assert_eq!(v6(src, 58, &icmp6(136)), FWD);
            assert_eq!(v6(src, 58, &icmp6(133)), FWD, "router solicitation");
            assert_eq!(
                v6(src, 58, &icmp6(134)),
                dropped(Reason::RouterAdvertisement)
            );
            assert_eq!(v6(src, 58, &icmp6(137)), dropped(Reason::Redirect));
            assert_eq!(v6(src, 17, &udp(547, 546)), dropped(Reason::DhcpServer));
            assert_eq!(v6(src, 17, &udp(546, 547)), FWD, "a DHCPv6 client");
            // MLDv2 report behind hop-by-hop with Router Alert.
            let mut hbh = vec![58, 0, 5, 2, 0, 0, 1, 0];
            hbh.extend_from_slice(&icmp6(143));
            assert_eq!(v6(src, 0, &hbh), FWD);
            // An RA behind hop-by-hop or destination options is no MLD report.
            let mut ra = vec![58, 0, 5, 2, 0, 0, 1, 0];
            ra.extend_from_slice(&icmp6(134));
            assert_eq!(v6(src, 0, &ra), dropped(Reason::Ipv6Source));
            assert_eq!(v6(src, 60, &ra), dropped(Reason::Ipv6Source));
            // Fragments: the first one is looked into.
            let frag = |next, offset: u16, payload: &[u8]| {
                let mut h = vec![next, 0];
                h.extend_from_slice(&(offset << 3 | 1).to_be_bytes());
                h.extend_from_slice(&[0, 0, 0, 1]);
                h.extend_from_slice(payload);
                h
            };
            assert_eq!(v6(src, 44, &frag(17, 0, &udp(1, 53))), FWD);
            assert_eq!(v6(src, 44, &frag(17, 185, &udp(547, 546))), FWD);
            assert_eq!(
                v6(src, 44, &frag(17, 0, &udp(547, 546))),
                dropped(Reason::DhcpServer)
            );
            assert_eq!(
                v6(src, 44, &frag(58, 0, &icmp6(134))),
                dropped(Reason::RouterAdvertisement)
            );
        }
        // Duplicate address detection from ::, nothing else.
        let any = Ipv6Addr::UNSPECIFIED;
        assert_eq!(v6(any, 58, &icmp6(135)), FWD);
        assert_eq!(v6(any, 58, &icmp6(128)), dropped(Reason::Ipv6Source));
        // Another address of the subnet, another link-local, the gateway's.
        for spoof in ["fd00::3", "fd00::1", "fe80::1", "fe80::42:acff:fe12:3"] {
            let s: Ipv6Addr = spoof.parse().unwrap();
            assert_eq!(
                v6(s, 6, &tcp(1, 80)),
                dropped(Reason::Ipv6Source),
                "{spoof}"
            );
        }
        // IPv4 still works.
        assert_eq!(
            classify(&r, &eth(MAC, 0x0800, &ipv4(ME, GW, 6, &tcp(1, 2)))),
            FWD
        );
    }

    #[test]
    fn ipv6_on_without_global_address_allows_link_local_and_dad() {
        let f = facts(&["172.18.0.2"], &[], true);
        let r = rules(&f);
        let v6 = |src, next, p: &[u8]| classify(&r, &eth(MAC, 0x86dd, &ipv6(src, next, p)));
        assert_eq!(v6(f.link_local(), 58, &icmp6(133)), FWD);
        assert_eq!(v6(Ipv6Addr::UNSPECIFIED, 58, &icmp6(135)), FWD);
        assert_eq!(
            v6("fd00::2".parse().unwrap(), 6, &tcp(1, 2)),
            dropped(Reason::Ipv6Source)
        );
    }

    #[test]
    fn multiple_addresses_each_allowed() {
        let r = rules(&facts(
            &["172.18.0.2", "10.5.0.7"],
            &["fd00::2", "2001:db8::7"],
            true,
        ));
        for src in [ME, [10, 5, 0, 7]] {
            assert_eq!(
                classify(&r, &eth(MAC, 0x0800, &ipv4(src, GW, 17, &udp(5, 53)))),
                FWD
            );
            assert_eq!(classify(&r, &eth(MAC, 0x0806, &arp(1, MAC, src, GW))), FWD);
        }
        assert_eq!(
            classify(
                &r,
                &eth(MAC, 0x0800, &ipv4([10, 5, 0, 8], GW, 6, &tcp(5, 53)))
            ),
            dropped(Reason::Ipv4Source)
        );
        for s in ["fd00::2", "2001:db8::7"] {
            let p = ipv6(s.parse().unwrap(), 6, &tcp(1, 2));
            assert_eq!(classify(&r, &eth(MAC, 0x86dd, &p)), FWD, "{s}");
        }
    }

    #[test]
    fn ipv6_only_interface_has_no_arp() {
        let r = rules(&facts(&[], &["fd00::2"], true));
        assert_eq!(
            classify(&r, &eth(MAC, 0x0806, &arp(1, MAC, [0; 4], ME))),
            dropped(Reason::Arp)
        );
        assert_eq!(
            classify(&r, &eth(MAC, 0x0800, &ipv4(ME, GW, 6, &tcp(1, 2)))),
            dropped(Reason::Ipv4Source)
        );
        let p = ipv6("fd00::2".parse().unwrap(), 6, &tcp(1, 2));
        assert_eq!(classify(&r, &eth(MAC, 0x86dd, &p)), FWD);
    }

    #[test]
    fn vlan_tags_and_other_ethertypes_are_dropped() {
        let r = rules(&facts(&["172.18.0.2"], &[], false));
        let inner = ipv4(ME, GW, 6, &tcp(1, 2));
        for tpid in [0x8100u16, 0x88a8] {
            let mut tagged = eth(MAC, tpid, &[0, 5]);
            tagged.extend_from_slice(&0x0800u16.to_be_bytes());
            tagged.extend_from_slice(&inner);
            assert_eq!(classify(&r, &tagged), dropped(Reason::Vlan), "{tpid:#x}");
        }
        assert_eq!(
            classify(&r, &eth(MAC, 0x88cc, &[0; 40])),
            dropped(Reason::Other),
            "LLDP"
        );
        assert_eq!(
            classify(&r, &eth(MAC, 0x8863, &[0; 40])),
            dropped(Reason::Other),
            "PPPoE discovery"
        );
        assert_eq!(
            classify(&r, &eth(OTHER_MAC, 0x88cc, &[0; 40])),
            dropped(Reason::SourceMac)
        );
        // Nothing falls through to the namespace's own stack.
        assert_eq!(
            classify(&r, &eth(MAC, 0x0800, &[])),
            dropped(Reason::Ipv4Source)
        );
    }

    #[test]
    fn keys_are_aligned_words() {
        for f in [
            facts(&["172.18.0.2"], &[], false),
            facts(&["172.18.0.2", "10.0.0.1"], &["fd00::2"], true),
        ] {
            let r = rules(&f);
            assert!(r.iter().all(|r| r.keys.iter().all(|k| k.off % 4 == 0)));
            assert!(r.windows(2).all(|w| w[0].prio < w[1].prio));
            assert_eq!(r.last().unwrap().verdict, Verdict::Drop(Reason::SourceMac));
        }
    }

    #[test]
    fn tc_arguments() {
        let r = rules(&facts(&["172.18.0.2"], &[], false));
        let first = r[0].tc_args("avmtap0", Some("eth0"), &DropAction::Gact);
        assert_eq!(
            first.join(" "),
            "filter add dev avmtap0 parent ffff: protocol ip prio 10 u32 \
             match u32 0x0242ac12 0xffffffff at -8 match u32 0x00020000 0xffff0000 at -4 \
             match u32 0x45000000 0xff000000 at 0 match u32 0x00110000 0x00ff0000 at 8 \
             match u32 0x00430000 0xffff0000 at 20 action drop"
        );
        let fwd = r[1].tc_args("avmtap0", Some("eth0"), &DropAction::Gact);
        assert!(
            fwd.join(" ").ends_with(
                "match u32 0xac120002 0xffffffff at 12 action mirred egress redirect dev eth0"
            ),
            "{fwd:?}"
        );
        // With an egress policy, allowed frames carry on to its nftables chain.
        let on = r[1].tc_args("avmtap0", None, &DropAction::Gact);
        assert!(
            on.join(" ")
                .ends_with("match u32 0xac120002 0xffffffff at 12 classid 1:1"),
            "{on:?}"
        );
        let sink = r[0].tc_args("avmtap0", Some("eth0"), &DropAction::Sink("avmsink".into()));
        assert!(sink
            .join(" ")
            .ends_with("action mirred egress redirect dev avmsink"));
        let last = r
            .last()
            .unwrap()
            .tc_args("avmtap0", None, &DropAction::Gact);
        assert_eq!(
            last.join(" "),
            format!(
                "filter add dev avmtap0 parent ffff: protocol all prio {} u32 \
                 match u32 0x00000000 0x00000000 at 0 action drop",
                r.last().unwrap().prio
            )
        );
    }

    #[test]
    fn facts_from_a_scanned_interface() {
        let iface = HostInterface {
            name: "eth0".into(),
            mac: "02:42:ac:12:00:02".into(),
            mtu: 1500,
            addresses: vec!["172.18.0.2/16".into(), "fd00::2/64".into()],
        };
        let f = Facts::of(&iface, true).unwrap();
        assert_eq!(f.mac, MAC);
        assert_eq!(f.ipv4, vec![Ipv4Addr::new(172, 18, 0, 2)]);
        assert_eq!(f.ipv6, vec!["fd00::2".parse::<Ipv6Addr>().unwrap()]);
        let bad = HostInterface {
            mac: "zz".into(),
            ..iface.clone()
        };
        assert!(Facts::of(&bad, true)
            .unwrap_err()
            .to_string()
            .contains("MAC"));
        let bad = HostInterface {
            addresses: vec!["nope/3".into()],
            ..iface
        };
        assert!(Facts::of(&bad, true)
            .unwrap_err()
            .to_string()
            .contains("nope"));
    }

    #[test]
    fn drop_counters_are_summed_per_reason() {
        let r = rules(&facts(&["172.18.0.2"], &[], false));
        let prio_of = |reason| {
            r.iter()
                .find(|x| x.verdict == Verdict::Drop(reason))
                .unwrap()
                .prio
        };
        let fwd_prio = r
            .iter()
            .find(|x| x.verdict == Verdict::Forward)
            .unwrap()
            .prio;
        let entry = |pref: u16, packets: u64| {
            format!(
                r#"{{"parent":"ffff:","protocol":"all","pref":{pref},"kind":"u32","chain":0}},
                {{"parent":"ffff:","protocol":"all","pref":{pref},"kind":"u32","chain":0,"options":{{"fh":"800::800",
                "match":{{"value":"0","mask":"0","offmask":"","off":0}},"match":{{"value":"0","mask":"0","offmask":"","off":4}},
                "actions":[{{"order":1,"kind":"gact","control_action":{{"type":"drop"}},"prob":{{}},"index":1,"ref":1,"bind":1,
                "stats":{{"bytes":84,"packets":{packets},"drops":{packets},"overlimits":0,"requeues":0,"backlog":0,"qlen":0}}}}]}}}}"#
            )
        };
        let json = format!(
            "[{},{},{},{}]",
            entry(prio_of(Reason::Ipv4Source), 12),
            entry(prio_of(Reason::Arp), 3),
            entry(fwd_prio, 1000),
            entry(prio_of(Reason::DhcpServer), 0),
        );
        let d = parse_drops(&r, &json).unwrap();
        assert_eq!(d.0, vec![(Reason::Ipv4Source, 12), (Reason::Arp, 3)]);
        assert_eq!(d.total(), 15);
        assert_eq!(d.to_string(), "spoofed source IP 12, ARP 3");
        assert_eq!(parse_counters(&r, &json).unwrap().0, 1000);
        assert!(parse_drops(&r, "nope").is_err());
    }
}
