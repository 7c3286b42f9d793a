//! Egress policy: where a sandbox's guest may send packets, enforced on the host.
//!
//! The guest is root and owns its kernel, so the filter sits where its frames enter the host:
//! an nftables `netdev` table in the container's network namespace with a chain on the tap's
//! ingress (after the anti-spoofing guard, [`crate::netguard`]) that ends each frame's path
//! with `fwd to <veth>` or a drop, and one on the veth's ingress that forwards to the tap and
//! remembers who contacted the guest (a reply to them is allowed whatever the rules say, so
//! published ports and the gateway's DNS keep working). Nothing the guest does — raw sockets,
//! its own routes or DNS, nested containers with their own NAT — reaches the veth another way.
//!
//! A policy is a base profile (`open`, `agent`, `none-but`) plus rules in order, first match
//! wins; see [`Rule`] for their form. Profiles come from the host's policy file
//! ([`policy_path`], TOML: `default = "<profile>"`, `[profiles.<name>] base = "agent"`,
//! `rules = ["deny 203.0.113.0/24", ...]`) or inline from the container's annotation
//! [`ANNOTATION`] (`agent`, `ci`, or `none-but; allow 198.51.100.7 tcp port 443`).
//!
//! Blocked frames are counted and, rate-limited, forwarded to an audit tap the shim reads: it
//! logs each (destination, protocol, port, the rule that blocked it) to `egress.log` in the
//! sandbox's state dir and to its own log ([`audit_line`]).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// The annotation that picks a container's policy (`docker run --annotation
/// io.agentvm.egress=agent`).
pub const ANNOTATION: &str = "io.agentvm.egress";
/// The host's policy file.
pub const POLICY_PATH: &str = "/etc/agentvm/policy.toml";
/// The nftables table (family `netdev`) of the policy in a sandbox's namespace.
pub const TABLE: &str = "agentvm";
/// The tap blocked frames are forwarded to, read by the shim for the audit log.
pub const AUDIT_TAP: &str = "avmaudit0";
/// Blocked frames logged per second at most (the rest are counted only).
pub const AUDIT_RATE: u32 = 20;

/// The policy file: `$AGENTVM_POLICY` or [`POLICY_PATH`].
pub fn policy_path() -> PathBuf {
    std::env::var_os("AGENTVM_POLICY")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(POLICY_PATH))
}

/// What is wrong with a policy, a profile or a rule.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("egress rule {rule:?}: {why} (form: `allow|deny TARGET [tcp|udp|icmp] [port N[-M]]`, TARGET an address, a CIDR or `*`)")]
    Rule { rule: String, why: String },
    #[error("egress profile {0:?} is neither built in (open, agent, none-but) nor in {1}")]
    UnknownProfile(String, String),
    #[error("{path}: {why}; fix the file or remove it")]
    File { path: String, why: String },
    #[error("egress rule {rule:?}: {name:?} is not a domain name (letters, digits, `-`, dots; `*.` in front for every name below it)")]
    Domain { rule: String, name: String },
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

/// An IP network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Net {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Net {
    pub fn new(addr: IpAddr, prefix: u8) -> Net {
        Net { addr, prefix }
    }

    fn host(addr: IpAddr) -> Net {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        Net { addr, prefix }
    }

    fn parse(s: &str) -> Option<Net> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.parse::<u8>().ok().filter(|&p| p <= max)?,
            None => max,
        };
        Some(Net { addr, prefix }.network())
    }

    /// The network address (host bits cleared).
    pub fn network(self) -> Net {
        let addr = match self.addr {
            IpAddr::V4(a) => {
                let m = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(a) & m).into())
            }
            IpAddr::V6(a) => {
                let m = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(a) & m).into())
            }
        };
        Net { addr, ..self }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                Net::new(ip, self.prefix).network().addr == self.addr
            }
            _ => false,
        }
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A transport protocol a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
}

/// One rule: `allow|deny TARGET [tcp|udp|icmp] [port N[-M]]`. TARGET is an address, a CIDR or
/// `*` (everything). A port needs `tcp` or `udp`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rule {
    pub action: Action,
    /// `None` (and no domain): any destination.
    pub net: Option<Net>,
    /// A domain name (`example.test`, or `*.example.test` for every name below it): the
    /// addresses the DNS relay resolves it to, for the answer's TTL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    pub proto: Option<Proto>,
    pub ports: Option<(u16, u16)>,
    /// How the rule was written (or which built-in it is): what the audit log names.
    pub text: String,
}

impl Rule {
    pub fn parse(s: &str) -> Result<Rule, PolicyError> {
        let bad = |why: &str| PolicyError::Rule {
            rule: s.to_string(),
            why: why.to_string(),
        };
        let mut words = s.split_whitespace();
        let action = match words.next() {
            Some("allow") => Action::Allow,
            Some("deny") => Action::Deny,
            Some(other) => return Err(bad(&format!("{other:?} is not allow or deny"))),
            None => return Err(bad("empty")),
        };
        let target = words.next().ok_or_else(|| bad("no target"))?;
        let (net, domain) = match target {
            "*" => (None, None),
            t => match Net::parse(t) {
                Some(n) => (Some(n), None),
                None if t.chars().any(|c| c.is_ascii_alphabetic()) => {
                    if !looks_like_domain(t) {
                        return Err(PolicyError::Domain {
                            rule: s.to_string(),
                            name: t.to_string(),
                        });
                    }
                    (None, Some(t.to_ascii_lowercase()))
                }
                None => {
                    return Err(bad(&format!(
                        "{t:?} is not an address, a CIDR, a domain or *"
                    )))
                }
            },
        };
        let (mut proto, mut ports) = (None, None);
        while let Some(w) = words.next() {
            match w {
                "tcp" | "udp" | "icmp" if proto.is_none() => {
                    proto = Some(match w {
                        "tcp" => Proto::Tcp,
                        "udp" => Proto::Udp,
                        _ => Proto::Icmp,
                    })
                }
                "port" if ports.is_none() => {
                    let p = words.next().ok_or_else(|| bad("port without a number"))?;
                    let (lo, hi) = p.split_once('-').unwrap_or((p, p));
                    let (lo, hi) = (lo.parse::<u16>(), hi.parse::<u16>());
                    match (lo, hi) {
                        (Ok(lo), Ok(hi)) if lo <= hi && lo > 0 => ports = Some((lo, hi)),
                        _ => return Err(bad(&format!("{p:?} is not a port or a range N-M"))),
                    }
                }
                other => return Err(bad(&format!("unexpected {other:?}"))),
            }
        }
        if ports.is_some() && !matches!(proto, Some(Proto::Tcp | Proto::Udp)) {
            return Err(bad("a port needs tcp or udp"));
        }
        Ok(Rule {
            action,
            net,
            domain,
            proto,
            ports,
            text: s.split_whitespace().collect::<Vec<_>>().join(" "),
        })
    }

    fn builtin(action: Action, net: Net, text: &str) -> Rule {
        Rule {
            action,
            net: Some(net),
            domain: None,
            proto: None,
            ports: None,
            text: text.to_string(),
        }
    }

    /// Whether a packet to `dst` (protocol, destination port) matches. A domain rule matches
    /// no address here: which addresses it stands for only the relay knows at the time.
    pub fn matches(&self, dst: IpAddr, proto: Option<Proto>, port: Option<u16>) -> bool {
        self.matches_named(dst, None, proto, port)
    }

    /// [`Rule::matches`] for an address the relay resolved from `name`: a domain rule naming
    /// it matches too.
    pub fn matches_named(
        &self,
        dst: IpAddr,
        name: Option<&str>,
        proto: Option<Proto>,
        port: Option<u16>,
    ) -> bool {
        self.domain
            .as_deref()
            .is_none_or(|d| name.is_some_and(|n| domain_matches(d, n)))
            && self.net.is_none_or(|n| n.contains(dst))
            && self.proto.is_none_or(|p| Some(p) == proto)
            && self
                .ports
                .is_none_or(|(lo, hi)| port.is_some_and(|p| (lo..=hi).contains(&p)))
    }
}

/// Whether the name `qname` (as asked, any case, a trailing dot or not) is one the domain
/// `rule` (`example.test` or `*.example.test`) names.
pub fn domain_matches(rule: &str, qname: &str) -> bool {
    let q = qname.trim_end_matches('.').to_ascii_lowercase();
    match rule.strip_prefix("*.") {
        Some(suffix) => {
            q.len() > suffix.len()
                && q.ends_with(suffix)
                && q[..q.len() - suffix.len()].ends_with('.')
        }
        None => q == rule,
    }
}

fn looks_like_domain(t: &str) -> bool {
    let t = t.strip_prefix("*.").unwrap_or(t);
    t.contains('.')
        && t.split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        && t.chars().any(|c| c.is_ascii_alphabetic())
}

/// The built-in profiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Base {
    /// As runc: no filter.
    Open,
    /// Everything but the cloud metadata service, link-local, private, shared and
    /// unique-local ranges and the host's own addresses — except the container's own
    /// networks and its gateways' DNS.
    Agent,
    /// Nothing but the container's own networks, its gateways' DNS and what the rules allow.
    NoneBut,
}

impl Base {
    fn parse(s: &str) -> Option<Base> {
        match s {
            "open" => Some(Base::Open),
            "agent" => Some(Base::Agent),
            "none-but" => Some(Base::NoneBut),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Base::Open => "open",
            Base::Agent => "agent",
            Base::NoneBut => "none-but",
        }
    }
}

/// Ranges the `agent` profile denies (besides the host's own addresses), with the name the
/// audit log gives them.
pub const AGENT_DENIED: &[(&str, &str)] = &[
    ("169.254.169.254/32", "cloud metadata"),
    ("fd00:ec2::254/128", "cloud metadata"),
    ("169.254.0.0/16", "link-local"),
    ("fe80::/10", "link-local"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("100.64.0.0/10", "shared address space (CGNAT)"),
    ("fc00::/7", "unique local (ULA)"),
    ("127.0.0.0/8", "loopback"),
    ("::1/128", "loopback"),
    ("0.0.0.0/8", "this network"),
];

/// A container's policy as chosen: the profile's name, its base and its rules.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Policy {
    /// How it was named (`agent`, a profile of the file, or the annotation's text).
    pub name: String,
    pub base: Base,
    pub rules: Vec<Rule>,
}

impl Policy {
    pub fn open() -> Policy {
        Policy {
            name: "open".into(),
            base: Base::Open,
            rules: Vec::new(),
        }
    }

    /// Whether a rule names a domain (the relay then feeds the table, and DNS to anyone but
    /// the relay is blocked).
    pub fn has_domains(&self) -> bool {
        self.rules.iter().any(|r| r.domain.is_some())
    }

    /// The distinct domains its rules name, in order of first appearance: domain `i`'s
    /// addresses live in the table's sets `dom4_i` and `dom6_i`.
    pub fn domains(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for d in self.rules.iter().filter_map(|r| r.domain.as_ref()) {
            if !out.contains(d) {
                out.push(d.clone());
            }
        }
        out
    }

    /// Whether there is anything to enforce.
    pub fn is_open(&self) -> bool {
        self.base == Base::Open && self.rules.iter().all(|r| r.action == Action::Allow)
    }

    /// Every rule in the order it is applied, the base's implicit ones included, for the
    /// sandbox's `facts`; and the default action.
    pub fn effective(&self, facts: &Facts) -> (Vec<Rule>, Action) {
        let mut out = Vec::new();
        let guarded = self.base != Base::Open;
        if self.has_domains() {
            // Names resolve through the relay only, or the allowlist could be sidestepped.
            for (proto, port) in [(Proto::Udp, 53), (Proto::Tcp, 53), (Proto::Tcp, 853)] {
                out.push(Rule {
                    action: Action::Deny,
                    net: None,
                    domain: None,
                    proto: Some(proto),
                    ports: Some((port, port)),
                    text: "DNS past agentvm's relay (the policy names domains)".into(),
                });
            }
        } else if guarded {
            for g in &facts.gateways {
                for proto in [Proto::Udp, Proto::Tcp] {
                    out.push(Rule {
                        action: Action::Allow,
                        net: Some(Net::host(*g)),
                        domain: None,
                        proto: Some(proto),
                        ports: Some((53, 53)),
                        text: "the gateway's DNS".into(),
                    });
                }
            }
        }
        out.extend(self.rules.iter().cloned());
        if guarded {
            // The host answers on the gateway address too: its services are not the
            // container network's.
            for h in &facts.host_addresses {
                out.push(Rule::builtin(
                    Action::Deny,
                    Net::host(*h),
                    "the host's own address",
                ));
            }
            for n in &facts.own_networks {
                out.push(Rule::builtin(
                    Action::Allow,
                    *n,
                    "the container's own network",
                ));
            }
        }
        let default = match self.base {
            Base::Open => Action::Allow,
            Base::Agent => {
                for (n, what) in AGENT_DENIED {
                    if let Some(net) = Net::parse(n) {
                        out.push(Rule::builtin(Action::Deny, net, what));
                    }
                }
                Action::Allow
            }
            Base::NoneBut => Action::Deny,
        };
        (out, default)
    }

    /// The verdict for one packet, and the rule that gave it (`None`: the default).
    pub fn verdict(
        &self,
        facts: &Facts,
        dst: IpAddr,
        proto: Option<Proto>,
        port: Option<u16>,
    ) -> (Action, Option<String>) {
        self.verdict_named(facts, dst, None, proto, port)
    }

    /// [`Policy::verdict`] for an address the relay resolved from `name` (its domain rules
    /// apply to it).
    pub fn verdict_named(
        &self,
        facts: &Facts,
        dst: IpAddr,
        name: Option<&str>,
        proto: Option<Proto>,
        port: Option<u16>,
    ) -> (Action, Option<String>) {
        let (rules, default) = self.effective(facts);
        // As the table: such an address never joins a domain's set.
        let name = name.filter(|_| self.never_learnt(facts, dst).is_none());
        rules
            .iter()
            .find(|r| r.matches_named(dst, name, proto, port))
            .map(|r| (r.action, Some(r.text.clone())))
            .unwrap_or((default, None))
    }
}

/// Ranges a name's addresses never join an allow set under a guarded profile, whatever the
/// domain rules say: a DNS answer (from a server an attacker may run) must not open the
/// metadata service, the host's loopback or link-local neighbours. Explicit address rules
/// still can.
pub const NEVER_LEARNT: &[(&str, &str)] = &[
    ("169.254.169.254/32", "cloud metadata"),
    ("fd00:ec2::254/128", "cloud metadata"),
    ("169.254.0.0/16", "link-local"),
    ("fe80::/10", "link-local"),
    ("127.0.0.0/8", "loopback"),
    ("::1/128", "loopback"),
    ("0.0.0.0/8", "this network"),
    ("::/128", "unspecified"),
];

impl Policy {
    /// Why an address a DNS answer gave for an allowed name must not be learnt (`None`: it
    /// may). The domain rules come before the profile's built-in denies, so without this a
    /// name the policy allows, answered with 169.254.169.254 or (under `agent`) a private
    /// address, would open it (DNS rebinding). Under `open` every address may be learnt (the
    /// profile denies nothing, and a deny rule naming a domain must catch all its addresses).
    pub fn never_learnt(&self, facts: &Facts, addr: IpAddr) -> Option<&'static str> {
        if self.base == Base::Open {
            return None;
        }
        let addr = addr.to_canonical();
        if facts
            .host_addresses
            .iter()
            .any(|h| h.to_canonical() == addr)
        {
            return Some("the host's own address");
        }
        let named = |list: &[(&str, &'static str)]| {
            list.iter()
                .find(|(n, _)| Net::parse(n).is_some_and(|n| n.contains(addr)))
                .map(|(_, what)| *what)
        };
        if let Some(what) = named(NEVER_LEARNT) {
            return Some(what);
        }
        if facts.own_networks.iter().any(|n| n.contains(addr)) {
            return None;
        }
        match self.base {
            Base::Agent => named(AGENT_DENIED),
            _ => None,
        }
    }
}

/// What the policy needs to know of the sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Facts {
    /// Tap and veth of each interface.
    pub links: Vec<(String, String)>,
    /// The networks of the container's interfaces (Docker/CNI networks).
    pub own_networks: Vec<Net>,
    /// The gateways of its routes.
    pub gateways: Vec<IpAddr>,
    /// The host's own addresses (from its network namespace).
    pub host_addresses: Vec<IpAddr>,
}

/// The host's policy file: the default profile and named profiles.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyFile {
    pub path: String,
    pub default: Option<String>,
    pub profiles: BTreeMap<String, (Base, Vec<Rule>)>,
}

impl PolicyFile {
    /// Reads the file at `path`; a missing file is an empty one.
    pub fn load(path: &Path) -> Result<PolicyFile, PolicyError> {
        let shown = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, &shown),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PolicyFile {
                path: shown,
                ..PolicyFile::default()
            }),
            Err(e) => Err(PolicyError::File {
                path: shown,
                why: e.to_string(),
            }),
        }
    }

    pub fn parse(text: &str, path: &str) -> Result<PolicyFile, PolicyError> {
        let bad = |why: String| PolicyError::File {
            path: path.to_string(),
            why,
        };
        let doc: toml_edit::DocumentMut = text.parse().map_err(|e| bad(format!("{e}")))?;
        let mut file = PolicyFile {
            path: path.to_string(),
            ..PolicyFile::default()
        };
        for (key, item) in doc.iter() {
            match key {
                "default" => {
                    let v = item
                        .as_str()
                        .ok_or_else(|| bad("default must be a profile name".into()))?;
                    file.default = Some(v.to_string());
                }
                "profiles" => {
                    let table = item
                        .as_table_like()
                        .ok_or_else(|| bad("profiles must be a table".into()))?;
                    for (name, p) in table.iter() {
                        if Base::parse(name).is_some() {
                            return Err(bad(format!("profile {name:?} is built in")));
                        }
                        let p = p
                            .as_table_like()
                            .ok_or_else(|| bad(format!("profiles.{name} must be a table")))?;
                        let mut base = Base::Agent;
                        let mut rules = Vec::new();
                        for (k, v) in p.iter() {
                            match k {
                                "base" => {
                                    base = v.as_str().and_then(Base::parse).ok_or_else(|| {
                                        bad(format!(
                                            "profiles.{name}.base must be open, agent or none-but"
                                        ))
                                    })?
                                }
                                "rules" => {
                                    let list = v.as_array().ok_or_else(|| {
                                        bad(format!("profiles.{name}.rules must be a list"))
                                    })?;
                                    for r in list.iter() {
                                        let r = r.as_str().ok_or_else(|| {
                                            bad(format!("profiles.{name}.rules holds a non-string"))
                                        })?;
                                        rules.push(
                                            Rule::parse(r).map_err(|e| {
                                                bad(format!("profiles.{name}: {e}"))
                                            })?,
                                        );
                                    }
                                }
                                other => {
                                    return Err(bad(format!(
                                        "unknown key profiles.{name}.{other} (known: base, rules)"
                                    )))
                                }
                            }
                        }
                        file.profiles.insert(name.to_string(), (base, rules));
                    }
                }
                other => {
                    return Err(bad(format!(
                        "unknown setting {other:?} (known: default, profiles)"
                    )))
                }
            }
        }
        if let Some(d) = &file.default {
            file.profile(d)?;
        }
        Ok(file)
    }

    /// The profile `name`: built in or from the file.
    pub fn profile(&self, name: &str) -> Result<Policy, PolicyError> {
        if let Some(base) = Base::parse(name) {
            return Ok(Policy {
                name: name.to_string(),
                base,
                rules: Vec::new(),
            });
        }
        let (base, rules) = self
            .profiles
            .get(name)
            .ok_or_else(|| PolicyError::UnknownProfile(name.to_string(), self.path.clone()))?;
        Ok(Policy {
            name: name.to_string(),
            base: *base,
            rules: rules.clone(),
        })
    }

    /// The policy a container gets: its annotation's (a profile name, then inline rules after
    /// `;`), else the file's default, else `open`.
    pub fn select(&self, annotation: Option<&str>) -> Result<Policy, PolicyError> {
        let Some(text) = annotation.map(str::trim).filter(|t| !t.is_empty()) else {
            return match &self.default {
                Some(d) => self.profile(d),
                None => Ok(Policy::open()),
            };
        };
        let mut parts = text.split(';').map(str::trim);
        let mut policy = self.profile(parts.next().unwrap_or_default())?;
        for r in parts.filter(|r| !r.is_empty()) {
            policy.rules.push(Rule::parse(r)?);
        }
        policy.name = text.to_string();
        Ok(policy)
    }
}

fn nft_set(nets: &[Net], v6: bool) -> Option<String> {
    let items: Vec<String> = nets
        .iter()
        .filter(|n| n.addr.is_ipv6() == v6)
        .map(Net::to_string)
        .collect();
    (!items.is_empty()).then(|| format!("{{ {} }}", items.join(", ")))
}

/// One rule as nftables statements (one per address family it applies to).
fn nft_rule(r: &Rule, veth: &str, domains: &[String]) -> Vec<String> {
    let verdict = match r.action {
        Action::Allow => format!("fwd to \"{veth}\""),
        Action::Deny => "jump deny".to_string(),
    };
    let l4 = match (r.proto, r.ports) {
        (Some(Proto::Tcp), Some((lo, hi))) => {
            format!("meta l4proto tcp th dport {}", range(lo, hi))
        }
        (Some(Proto::Udp), Some((lo, hi))) => {
            format!("meta l4proto udp th dport {}", range(lo, hi))
        }
        (Some(Proto::Tcp), None) => "meta l4proto tcp".into(),
        (Some(Proto::Udp), None) => "meta l4proto udp".into(),
        (Some(Proto::Icmp), _) => "meta l4proto { icmp, ipv6-icmp }".into(),
        (None, _) => String::new(),
    };
    let mut out = Vec::new();
    let domain = r
        .domain
        .as_ref()
        .and_then(|d| domains.iter().position(|x| x == d));
    match (domain, r.net) {
        (Some(i), _) => {
            out.push(format!("ip daddr @dom4_{i} {l4} counter {verdict}"));
            out.push(format!("ip6 daddr @dom6_{i} {l4} counter {verdict}"));
        }
        (None, Some(n)) => {
            let fam = if n.addr.is_ipv4() { "ip" } else { "ip6" };
            out.push(format!("{fam} daddr {n} {l4} counter {verdict}"));
        }
        (None, None) => {
            for fam in ["ip", "ip6"] {
                out.push(format!("meta protocol {fam} {l4} counter {verdict}"));
            }
        }
    }
    out.into_iter()
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

fn range(lo: u16, hi: u16) -> String {
    if lo == hi {
        lo.to_string()
    } else {
        format!("{lo}-{hi}")
    }
}

/// The mark of frames from the guest while they cross the namespace (the veth's egress hook
/// sees them and the stack's own packets alike; the mark is scrubbed when they leave it).
const FROM_GUEST: u32 = 0x6176_6d31;

/// The nftables script that enforces `policy` in the sandbox's namespace (one transaction:
/// the table is replaced whole). Every tap's frames end in the script: the anti-spoofing guard
/// in front of it lets the allowed ones through to here instead of redirecting them. The
/// namespace's own stack talks on the veth too (Docker's embedded DNS server forwards queries
/// to upstream servers from there): the veth's egress hook notes its flows, and their answers
/// go to the stack, not the guest; neighbour discovery reaches both (they share the address).
pub fn nft_script(policy: &Policy, facts: &Facts) -> String {
    let (rules, default) = policy.effective(facts);
    let domains = policy.domains();
    let mut s =
        String::from("table netdev agentvm\ndelete table netdev agentvm\ntable netdev agentvm {\n");
    for fam in ["4", "6"] {
        let addr = if fam == "4" { "ipv4_addr" } else { "ipv6_addr" };
        for set in ["replies", "stack"] {
            s.push_str(&format!(
                "  set {set}{fam} {{ type {addr} . inet_proto . inet_service . inet_service; \
                 flags dynamic,timeout; timeout 180s; size 65536; }}\n"
            ));
        }
    }
    for i in 0..domains.len() {
        s.push_str(&format!(
            "  set dom4_{i} {{ type ipv4_addr; flags timeout; size 65536; }}\n  \
             set dom6_{i} {{ type ipv6_addr; flags timeout; size 65536; }}\n"
        ));
    }
    s.push_str(&format!(
        "  chain deny {{\n    counter\n    limit rate {AUDIT_RATE}/second burst {} packets fwd to \"{AUDIT_TAP}\"\n    drop\n  }}\n",
        AUDIT_RATE * 2
    ));
    for (tap, veth) in &facts.links {
        // From the network to the guest: remember who talked to it.
        s.push_str(&format!(
            "  chain stack_{veth} {{\n    type filter hook egress device \"{veth}\" priority 0; policy accept;\n\
             \x20   meta mark {FROM_GUEST:#x} accept\n\
             \x20   meta protocol ip meta l4proto {{ tcp, udp }} update @stack4 {{ ip daddr . meta l4proto . th dport . th sport }}\n\
             \x20   meta protocol ip6 meta l4proto {{ tcp, udp }} update @stack6 {{ ip6 daddr . meta l4proto . th dport . th sport }}\n  }}\n\
             \x20 chain in_{veth} {{\n    type filter hook ingress device \"{veth}\" priority 0; policy accept;\n\
             \x20   meta protocol arp dup to \"{tap}\" accept\n\
             \x20   icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} dup to \"{tap}\" accept\n\
             \x20   meta protocol ip meta l4proto {{ tcp, udp }} ip saddr . meta l4proto . th sport . th dport @stack4 accept\n\
             \x20   meta protocol ip6 meta l4proto {{ tcp, udp }} ip6 saddr . meta l4proto . th sport . th dport @stack6 accept\n\
             \x20   meta protocol ip meta l4proto {{ tcp, udp }} update @replies4 {{ ip saddr . meta l4proto . th sport . th dport }}\n\
             \x20   meta protocol ip6 meta l4proto {{ tcp, udp }} update @replies6 {{ ip6 saddr . meta l4proto . th sport . th dport }}\n\
             \x20   fwd to \"{tap}\"\n  }}\n"
        ));
        s.push_str(&format!(
            "  chain out_{tap} {{\n    type filter hook ingress device \"{tap}\" priority 0; policy accept;\n    meta mark set {FROM_GUEST:#x}\n"
        ));
        let line = |s: &mut String, l: &str| {
            s.push_str("    ");
            s.push_str(l);
            s.push('\n');
        };
        // ARP and neighbour discovery (the guard checked their addresses), then replies.
        line(
            &mut s,
            &format!("meta protocol != {{ ip, ip6 }} fwd to \"{veth}\""),
        );
        line(
            &mut s,
            &format!(
                "icmpv6 type {{ nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert }} fwd to \"{veth}\""
            ),
        );
        // Link-scope multicast (MLD, IGMP, mDNS) never leaves the link.
        line(&mut s, &format!("ip6 daddr ff02::/16 fwd to \"{veth}\""));
        line(&mut s, &format!("ip daddr 224.0.0.0/24 fwd to \"{veth}\""));
        line(
            &mut s,
            &format!(
                "meta protocol ip meta l4proto {{ tcp, udp }} ip daddr . meta l4proto . th dport . th sport @replies4 fwd to \"{veth}\""
            ),
        );
        line(
            &mut s,
            &format!(
                "meta protocol ip6 meta l4proto {{ tcp, udp }} ip6 daddr . meta l4proto . th dport . th sport @replies6 fwd to \"{veth}\""
            ),
        );
        // Runs of plain network rules with one action collapse into one set lookup.
        let mut i = 0;
        while i < rules.len() {
            let plain = |r: &Rule| r.proto.is_none() && r.ports.is_none() && r.net.is_some();
            if plain(&rules[i]) {
                let mut j = i;
                while j < rules.len() && plain(&rules[j]) && rules[j].action == rules[i].action {
                    j += 1;
                }
                let nets: Vec<Net> = rules[i..j].iter().filter_map(|r| r.net).collect();
                let verdict = match rules[i].action {
                    Action::Allow => format!("fwd to \"{veth}\""),
                    Action::Deny => "jump deny".into(),
                };
                for (fam, v6) in [("ip", false), ("ip6", true)] {
                    if let Some(set) = nft_set(&nets, v6) {
                        line(&mut s, &format!("{fam} daddr {set} counter {verdict}"));
                    }
                }
                i = j;
            } else {
                for l in nft_rule(&rules[i], veth, &domains) {
                    line(&mut s, &l);
                }
                i += 1;
            }
        }
        match default {
            Action::Allow => line(&mut s, &format!("counter fwd to \"{veth}\"")),
            Action::Deny => line(&mut s, "counter jump deny"),
        }
        s.push_str("  }\n");
    }
    s.push_str("}\n");
    s
}

/// `nft`, where installed: the egress policy's tool (the anti-spoofing guard alone needs only
/// tc).
pub fn nft_program() -> Option<PathBuf> {
    ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// The error for a policy that needs nftables on a host without it.
pub fn nft_missing(policy: &Policy) -> crate::Error {
    crate::Error::Missing {
        what: "nft (nftables)".into(),
        hint: format!(
            "the egress policy {:?} is enforced with nftables: apt-get install nftables (or \
             run hack/install-deps.sh)",
            policy.name
        ),
    }
}

/// What a sandbox's egress is, kept in its state dir (`egress.json`) for `agentvm policy`
/// and the audit reader.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub policy: Policy,
    pub facts: Facts,
    /// The namespace to enter to change it (the holder's).
    pub netns: PathBuf,
    /// Whether agentvm's DNS relay serves the guest (domain rules need it).
    #[serde(default)]
    pub dns_relay: bool,
}

/// The error for domain rules where no relay sees the guest's DNS.
pub fn domains_need_relay(policy: &Policy) -> PolicyError {
    PolicyError::File {
        path: format!("egress policy {:?}", policy.name),
        why: "domain rules work through agentvm's DNS relay, which serves containers on \
              user-defined networks (docker network create; Compose networks); name addresses \
              here, or use such a network"
            .into(),
    }
}

/// The record's file in a sandbox's state dir.
pub fn record_path(state_dir: &Path) -> PathBuf {
    state_dir.join("egress.json")
}

/// The audit log in a sandbox's state dir.
pub fn log_path(state_dir: &Path) -> PathBuf {
    state_dir.join("egress.log")
}

impl Record {
    pub fn load(state_dir: &Path) -> crate::Result<Record> {
        let p = record_path(state_dir);
        let text = std::fs::read_to_string(&p).map_err(|e| crate::Error::io("read", &p, e))?;
        serde_json::from_str(&text)
            .map_err(|e| crate::Error::Invalid(format!("{}: {e}", p.display())))
    }

    /// Writes the record (whole, by rename).
    pub fn save(&self, state_dir: &Path) -> crate::Result<()> {
        let p = record_path(state_dir);
        let tmp = state_dir.join("egress.json.tmp");
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| crate::Error::Invalid(format!("egress record: {e}")))?;
        std::fs::write(&tmp, text).map_err(|e| crate::Error::io("write", &tmp, e))?;
        std::fs::rename(&tmp, &p).map_err(|e| crate::Error::io("write", &p, e))
    }
}

/// The host's own addresses, from `ip -j addr show` in the caller's (the host's) namespace.
pub fn parse_host_addresses(json: &str) -> Vec<IpAddr> {
    #[derive(serde::Deserialize)]
    struct Link {
        #[serde(default)]
        addr_info: Vec<Addr>,
    }
    #[derive(serde::Deserialize)]
    struct Addr {
        local: Option<String>,
    }
    let links: Vec<Link> = serde_json::from_str(json).unwrap_or_default();
    let mut out: Vec<IpAddr> = links
        .iter()
        .flat_map(|l| &l.addr_info)
        .filter_map(|a| a.local.as_deref()?.parse().ok())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Shortest and longest time a resolved address stays allowed (the answer's TTL, clamped):
/// a TTL of 0 must still let the connection that asked for the name be made.
const LEARN_MIN_SECS: u32 = 5;
const LEARN_MAX_SECS: u32 = 86_400;

/// An address the relay learnt for a domain rule: it goes into the set `set` (`dom4_i` or
/// `dom6_i`) for `ttl` seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Learnt {
    pub set: String,
    pub addr: IpAddr,
    pub ttl: u32,
}

/// What the relay must add to the table for a DNS answer: the addresses of a name a domain
/// rule names, each for its record's TTL (empty: nothing to add, or not a DNS answer). The
/// question decides which rules apply (an answer's A records may carry the canonical name of
/// a CNAME chain).
/// Addresses the profile's built-in rules keep closed are left out
/// ([`Policy::never_learnt`]) and logged.
pub fn learn(policy: &Policy, facts: &Facts, answer: &[u8]) -> Vec<Learnt> {
    let domains = policy.domains();
    if domains.is_empty() {
        return Vec::new();
    }
    let Ok(packet) = simple_dns::Packet::parse(answer) else {
        return Vec::new();
    };
    let mut names: Vec<String> = packet
        .questions
        .iter()
        .map(|q| q.qname.to_string())
        .collect();
    names.extend(packet.answers.iter().map(|a| a.name.to_string()));
    let sets: Vec<usize> = domains
        .iter()
        .enumerate()
        .filter(|(_, d)| names.iter().any(|n| domain_matches(d, n)))
        .map(|(i, _)| i)
        .collect();
    let mut out = Vec::new();
    if sets.is_empty() {
        return out;
    }
    for a in &packet.answers {
        let ttl = a.ttl.clamp(LEARN_MIN_SECS, LEARN_MAX_SECS);
        let (fam, addr) = match &a.rdata {
            simple_dns::rdata::RData::A(r) => {
                ("4", IpAddr::from(std::net::Ipv4Addr::from(r.address)))
            }
            simple_dns::rdata::RData::AAAA(r) => {
                ("6", IpAddr::from(std::net::Ipv6Addr::from(r.address)))
            }
            _ => continue,
        };
        if let Some(why) = policy.never_learnt(facts, addr) {
            tracing::info!(
                "egress: {} answered with {addr} ({why}): not allowed by the name",
                a.name
            );
            continue;
        }
        for i in &sets {
            out.push(Learnt {
                set: format!("dom{fam}_{i}"),
                addr,
                ttl,
            });
        }
    }
    out
}

/// The same additions as an nftables script (what `nft -f -` takes; the relay's fallback when
/// it cannot talk netlink itself).
pub fn learnt_script(learnt: &[Learnt]) -> String {
    learnt
        .iter()
        .map(|l| {
            format!(
                "add element netdev {TABLE} {} {{ {} timeout {}s }}\n",
                l.set, l.addr, l.ttl
            )
        })
        .collect()
}

/// The learnt addresses a policy change keeps: those in the old table's domain sets
/// (`json`: `nft -j list table netdev agentvm`) whose domain the new policy names too, each
/// for what is left of its timeout, moved to the new policy's set for that domain. Without
/// this, `agentvm policy set` would forget every resolved name until its next lookup.
pub fn carried_over(old: &Policy, new: &Policy, facts: &Facts, json: &str) -> Vec<Learnt> {
    let (old_domains, new_domains) = (old.domains(), new.domains());
    let Ok(doc) = serde_json::from_str::<serde_json::Value>(json) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let items = doc["nftables"].as_array().cloned().unwrap_or_default();
    for item in &items {
        let set = &item["set"];
        let Some(name) = set["name"].as_str() else {
            continue;
        };
        let Some((fam, index)) = name
            .strip_prefix("dom")
            .and_then(|rest| rest.split_once('_'))
        else {
            continue;
        };
        let Some(domain) = index.parse::<usize>().ok().and_then(|i| old_domains.get(i)) else {
            continue;
        };
        let Some(j) = new_domains.iter().position(|d| d == domain) else {
            continue;
        };
        for elem in set["elem"].as_array().into_iter().flatten() {
            let e = &elem["elem"];
            let (Some(addr), Some(left)) = (
                e["val"].as_str().and_then(|v| v.parse::<IpAddr>().ok()),
                e["expires"].as_u64(),
            ) else {
                continue;
            };
            if left == 0
                || (fam == "4") != addr.is_ipv4()
                || new.never_learnt(facts, addr).is_some()
            {
                continue;
            }
            out.push(Learnt {
                set: format!("dom{fam}_{j}"),
                addr,
                ttl: u32::try_from(left)
                    .unwrap_or(LEARN_MAX_SECS)
                    .min(LEARN_MAX_SECS),
            });
        }
    }
    out
}

/// A blocked frame from the audit tap: destination, protocol, port. `None` for frames that
/// are not IP.
pub fn parse_frame(frame: &[u8]) -> Option<(IpAddr, Option<Proto>, Option<u16>)> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(14..)?;
    let (dst, proto, l4): (IpAddr, u8, &[u8]) = match ethertype {
        0x0800 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            let d: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            (
                IpAddr::from(d),
                *ip.get(9)?,
                ip.get(ihl..).unwrap_or_default(),
            )
        }
        0x86dd => {
            let d: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            (
                IpAddr::from(d),
                *ip.get(6)?,
                ip.get(40..).unwrap_or_default(),
            )
        }
        _ => return None,
    };
    let proto = match proto {
        6 => Some(Proto::Tcp),
        17 => Some(Proto::Udp),
        1 | 58 => Some(Proto::Icmp),
        _ => None,
    };
    let port = match proto {
        Some(Proto::Tcp | Proto::Udp) => l4.get(2..4).map(|p| u16::from_be_bytes([p[0], p[1]])),
        _ => None,
    };
    Some((dst, proto, port))
}

/// The names the relay resolved, by address, for the audit log: a blocked connection to an
/// address a DNS answer gave is logged with the name it was resolved from, and judged by the
/// domain rules that name it. Bounded; entries last their record's TTL (at least
/// [`LEARN_MIN_SECS`]).
#[derive(Debug, Default)]
pub struct Resolved {
    names: std::sync::Mutex<std::collections::HashMap<IpAddr, (String, std::time::Instant)>>,
}

/// How many addresses [`Resolved`] remembers.
const RESOLVED_CAP: usize = 4096;

impl Resolved {
    /// Notes the A/AAAA records of a DNS answer under its question's name.
    pub fn note(&self, answer: &[u8]) {
        let Ok(packet) = simple_dns::Packet::parse(answer) else {
            return;
        };
        let Some(q) = packet.questions.first() else {
            return;
        };
        let name = q
            .qname
            .to_string()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let now = std::time::Instant::now();
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        for a in &packet.answers {
            let addr = match &a.rdata {
                simple_dns::rdata::RData::A(r) => IpAddr::from(std::net::Ipv4Addr::from(r.address)),
                simple_dns::rdata::RData::AAAA(r) => {
                    IpAddr::from(std::net::Ipv6Addr::from(r.address))
                }
                _ => continue,
            };
            if names.len() >= RESOLVED_CAP && !names.contains_key(&addr) {
                names.retain(|_, (_, until)| *until > now);
                if names.len() >= RESOLVED_CAP {
                    continue;
                }
            }
            let ttl = a.ttl.clamp(LEARN_MIN_SECS, LEARN_MAX_SECS);
            names.insert(
                addr,
                (
                    name.clone(),
                    now + std::time::Duration::from_secs(ttl.into()),
                ),
            );
        }
    }

    /// The name `addr` was last resolved from, while its record lives.
    pub fn name_of(&self, addr: IpAddr) -> Option<String> {
        let names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        names
            .get(&addr)
            .filter(|(_, until)| *until > std::time::Instant::now())
            .map(|(n, _)| n.clone())
    }
}

/// The audit log's line for a blocked frame.
pub fn audit_line(
    policy: &Policy,
    facts: &Facts,
    dst: IpAddr,
    name: Option<&str>,
    proto: Option<Proto>,
    port: Option<u16>,
) -> String {
    let (_, rule) = policy.verdict_named(facts, dst, name, proto, port);
    let proto_name = match proto {
        Some(Proto::Tcp) => "tcp",
        Some(Proto::Udp) => "udp",
        Some(Proto::Icmp) => "icmp",
        None => "ip",
    };
    let to = match (port, dst) {
        (Some(p), IpAddr::V6(a)) => format!("[{a}]:{p}"),
        (Some(p), a) => format!("{a}:{p}"),
        (None, a) => a.to_string(),
    };
    let why = rule.unwrap_or_else(|| format!("the default of {}", policy.base.name()));
    let from = name.map(|n| format!(" ({n})")).unwrap_or_default();
    format!(
        "blocked {proto_name} to {to}{from} (policy {:?}, rule: {why})",
        policy.name
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn facts() -> Facts {
        Facts {
            links: vec![("avmtap0".into(), "eth0".into())],
            own_networks: vec![Net::parse("172.18.0.0/16").unwrap()],
            gateways: vec![ip("172.18.0.1")],
            host_addresses: vec![ip("172.18.0.1"), ip("192.0.2.10")],
        }
    }

    #[test]
    fn rules_parse_and_bad_ones_say_why() {
        let r = Rule::parse("allow 10.1.0.0/16 tcp port 443").unwrap();
        assert_eq!(
            (r.action, r.net, r.proto, r.ports),
            (
                Action::Allow,
                Net::parse("10.1.0.0/16"),
                Some(Proto::Tcp),
                Some((443, 443))
            )
        );
        let r = Rule::parse("deny  fd00::1  udp port 1000-2000").unwrap();
        assert_eq!(r.ports, Some((1000, 2000)));
        assert_eq!(r.text, "deny fd00::1 udp port 1000-2000");
        assert_eq!(Rule::parse("allow *").unwrap().net, None);
        // Host bits are cleared.
        assert_eq!(
            Rule::parse("deny 10.1.2.3/8").unwrap().net,
            Net::parse("10.0.0.0/8")
        );
        for (bad, says) in [
            ("permit 1.2.3.4", "is not allow or deny"),
            ("allow", "no target"),
            ("allow 1.2.3.4/33", "not an address"),
            ("allow 1.2.3.4 port 80", "a port needs tcp or udp"),
            ("allow 1.2.3.4 tcp port 0", "not a port"),
            ("allow 1.2.3.4 tcp port 90-80", "not a port"),
            ("allow 1.2.3.4 tcp tcp", "unexpected"),
        ] {
            let e = Rule::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let d = Rule::parse("allow *.PyPI.org tcp port 443").unwrap();
        assert_eq!((d.domain.as_deref(), d.net), (Some("*.pypi.org"), None));
        let e = Rule::parse("allow exa_mple.test").unwrap_err().to_string();
        assert!(e.contains("is not a domain name"), "{e}");
    }

    /// The real service addresses the `agent` profile exists for: covered here, by the rules,
    /// never by a packet.
    #[test]
    fn the_agent_profile_blocks_metadata_private_ranges_and_the_host() {
        let p = PolicyFile::default().select(Some("agent")).unwrap();
        let f = facts();
        let deny = |a: &str, proto, port| p.verdict(&f, ip(a), proto, port);
        for (a, why) in [
            ("169.254.169.254", "cloud metadata"),
            ("fd00:ec2::254", "cloud metadata"),
            ("169.254.10.1", "link-local"),
            ("10.0.0.5", "private (RFC 1918)"),
            ("172.31.255.1", "private (RFC 1918)"),
            ("192.168.1.1", "private (RFC 1918)"),
            ("100.100.100.100", "shared address space (CGNAT)"),
            ("fd12::1", "unique local (ULA)"),
            ("192.0.2.10", "the host's own address"),
        ] {
            assert_eq!(
                deny(a, Some(Proto::Tcp), Some(80)),
                (Action::Deny, Some(why.into())),
                "{a}"
            );
        }
        // The container's own network, its gateway's DNS (not its other ports), the world.
        assert_eq!(deny("172.18.0.7", None, None).0, Action::Allow);
        assert_eq!(
            deny("172.18.0.1", Some(Proto::Udp), Some(53)).0,
            Action::Allow
        );
        assert_eq!(
            deny("172.18.0.1", Some(Proto::Tcp), Some(53)).0,
            Action::Allow
        );
        assert_eq!(
            deny("172.18.0.1", Some(Proto::Tcp), Some(22)),
            (Action::Deny, Some("the host's own address".into()))
        );
        assert_eq!(
            deny("198.51.100.7", Some(Proto::Tcp), Some(443)).0,
            Action::Allow
        );
        assert_eq!(
            deny("2001:db8::1", Some(Proto::Udp), Some(443)).0,
            Action::Allow
        );
    }

    #[test]
    fn none_but_denies_by_default_and_first_match_wins() {
        let file = PolicyFile::parse(
            "default = \"ci\"\n[profiles.ci]\nbase = \"none-but\"\nrules = [\"deny 198.51.100.7 tcp port 22\", \"allow 198.51.100.0/24\"]\n",
            "policy.toml",
        )
        .unwrap();
        let p = file.select(None).unwrap();
        assert_eq!((p.name.as_str(), p.base), ("ci", Base::NoneBut));
        let f = facts();
        assert_eq!(
            p.verdict(&f, ip("198.51.100.7"), Some(Proto::Tcp), Some(22))
                .0,
            Action::Deny
        );
        assert_eq!(
            p.verdict(&f, ip("198.51.100.7"), Some(Proto::Tcp), Some(80))
                .0,
            Action::Allow
        );
        assert_eq!(
            p.verdict(&f, ip("203.0.113.1"), Some(Proto::Tcp), Some(80)),
            (Action::Deny, None)
        );
        // Inline rules after a base, from the annotation.
        let p = file
            .select(Some("none-but; allow 203.0.113.1 tcp port 80"))
            .unwrap();
        assert_eq!(
            p.verdict(&f, ip("203.0.113.1"), Some(Proto::Tcp), Some(80))
                .0,
            Action::Allow
        );
        assert_eq!(
            p.verdict(&f, ip("203.0.113.1"), Some(Proto::Udp), Some(80))
                .0,
            Action::Deny
        );
        assert!(PolicyFile::default().select(None).unwrap().is_open());
    }

    #[test]
    fn bad_files_and_unknown_profiles_are_named() {
        for (text, says) in [
            ("default = 5\n", "default must be a profile name"),
            ("default = \"nope\"\n", "\"nope\" is neither built in"),
            ("[profiles.agent]\n", "is built in"),
            (
                "[profiles.x]\nbase = \"closed\"\n",
                "base must be open, agent or none-but",
            ),
            ("[profiles.x]\nrules = [\"allow\"]\n", "no target"),
            ("[profiles.x]\nrulez = []\n", "unknown key profiles.x.rulez"),
            ("defualt = \"agent\"\n", "unknown setting"),
            ("[profiles\n", "policy.toml"),
        ] {
            let e = PolicyFile::parse(text, "policy.toml")
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
        let e = PolicyFile::default()
            .select(Some("strict"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"strict\" is neither built in"), "{e}");
    }

    #[test]
    fn the_script_forwards_allowed_and_audits_denied_frames() {
        let p = PolicyFile::default()
            .select(Some("agent; allow 10.231.5.0/24 tcp port 8080"))
            .unwrap();
        let s = nft_script(&p, &facts());
        // Replaced whole in one transaction.
        assert!(s.starts_with("table netdev agentvm\ndelete table netdev agentvm\n"));
        // Replies to whoever contacted the guest, learnt on the veth's side.
        assert!(s.contains("hook ingress device \"eth0\""));
        assert!(s.contains("update @replies4 { ip saddr . meta l4proto . th sport . th dport }"));
        assert!(s.contains("fwd to \"avmtap0\""));
        // Order: gateway DNS, the inline rule, the host, the own network, the profile's denies.
        let dns = s
            .find("ip daddr 172.18.0.1/32 meta l4proto udp th dport 53")
            .unwrap();
        let inline = s
            .find("ip daddr 10.231.5.0/24 meta l4proto tcp th dport 8080")
            .unwrap();
        let host = s
            .find("ip daddr { 172.18.0.1/32, 192.0.2.10/32 } counter jump deny")
            .unwrap();
        let own = s
            .find("ip daddr { 172.18.0.0/16 } counter fwd to \"eth0\"")
            .unwrap();
        let meta = s.find("169.254.169.254/32").unwrap();
        assert!(
            dns < inline && inline < host && host < own && own < meta,
            "{s}"
        );
        assert!(s.contains(
            "ip6 daddr { fd00:ec2::254/128, fe80::/10, fc00::/7, ::1/128 } counter jump deny"
        ));
        assert!(s.contains(&format!("fwd to \"{AUDIT_TAP}\"")));
        assert!(s.trim_end().ends_with("counter fwd to \"eth0\"\n  }\n}"));
        let none = nft_script(
            &PolicyFile::default().select(Some("none-but")).unwrap(),
            &facts(),
        );
        assert!(none.contains("counter jump deny\n  }\n}"), "{none}");
    }

    /// The example file shipped in docs/ parses, and its profiles are what it says.
    #[test]
    fn the_shipped_example_policy_file_is_valid() {
        let text = include_str!("../../docs/policy.example.toml");
        let f = PolicyFile::parse(text, "docs/policy.example.toml").unwrap();
        assert_eq!(f.default.as_deref(), Some("open"));
        let ci = f.select(Some("ci")).unwrap();
        assert_eq!((ci.base, ci.rules.len()), (Base::Agent, 2));
        assert_eq!(
            ci.verdict(&facts(), ip("198.51.100.1"), Some(Proto::Tcp), Some(25))
                .0,
            Action::Deny
        );
        assert_eq!(f.select(Some("one-api")).unwrap().base, Base::NoneBut);
    }

    #[test]
    fn domains_match_exactly_or_below_a_wildcard() {
        assert!(domain_matches("example.test", "Example.TEST."));
        assert!(!domain_matches("example.test", "www.example.test"));
        assert!(domain_matches("*.example.test", "www.example.test"));
        assert!(domain_matches("*.example.test", "a.b.example.test."));
        assert!(!domain_matches("*.example.test", "example.test"));
        assert!(!domain_matches("*.example.test", "badexample.test"));
    }

    /// A DNS answer for an allowed name becomes set elements with the record's TTL (clamped);
    /// other names and garbage add nothing.
    #[test]
    fn answers_for_allowed_names_feed_the_table() {
        use simple_dns::{
            rdata::RData, Name, Packet, Question, ResourceRecord, CLASS, QCLASS, QTYPE, TYPE,
        };
        let p = PolicyFile::default()
            .select(Some(
                "none-but; allow example.test tcp port 443; deny *.evil.test",
            ))
            .unwrap();
        assert_eq!(p.domains(), ["example.test", "*.evil.test"]);
        let answer = |q: &str, records: Vec<(&str, u32, RData<'static>)>| {
            let mut pk = Packet::new_reply(7);
            pk.questions.push(Question::new(
                Name::new_unchecked(q).into_owned(),
                QTYPE::TYPE(TYPE::A),
                QCLASS::CLASS(CLASS::IN),
                false,
            ));
            for (name, ttl, rdata) in records {
                pk.answers.push(ResourceRecord::new(
                    Name::new_unchecked(name).into_owned(),
                    CLASS::IN,
                    ttl,
                    rdata,
                ));
            }
            pk.build_bytes_vec().unwrap()
        };
        let a = |ip: [u8; 4]| {
            RData::A(simple_dns::rdata::A {
                address: u32::from_be_bytes(ip),
            })
        };
        let script = learnt_script(&learn(
            &p,
            &facts(),
            &answer(
                "example.test",
                vec![
                    ("example.test", 300, a([198, 51, 100, 7])),
                    ("example.test", 0, a([198, 51, 100, 9])),
                ],
            ),
        ));
        assert_eq!(
            script,
            "add element netdev agentvm dom4_0 { 198.51.100.7 timeout 300s }\n\
             add element netdev agentvm dom4_0 { 198.51.100.9 timeout 5s }\n"
        );
        let script = learnt_script(&learn(
            &p,
            &facts(),
            &answer(
                "x.evil.test",
                vec![("x.evil.test", 60, a([203, 0, 113, 66]))],
            ),
        ));
        assert!(
            script.contains("dom4_1 { 203.0.113.66 timeout 60s }"),
            "{script}"
        );
        assert_eq!(
            learn(
                &p,
                &facts(),
                &answer("other.test", vec![("other.test", 60, a([1, 2, 3, 4]))])
            ),
            []
        );
        assert_eq!(learn(&p, &facts(), b"not dns"), []);
        // The script: a set per domain, DNS past the relay denied first, the gateway's DNS not
        // allowed, the rule on the set.
        let s = nft_script(&p, &facts());
        assert!(
            s.contains("set dom4_0 { type ipv4_addr; flags timeout;"),
            "{s}"
        );
        let dns = s
            .find("meta protocol ip meta l4proto udp th dport 53 counter jump deny")
            .unwrap();
        let rule = s
            .find("ip daddr @dom4_0 meta l4proto tcp th dport 443 counter fwd to \"eth0\"")
            .unwrap();
        assert!(dns < rule, "{s}");
        assert!(s.contains("ip6 daddr @dom6_1 counter jump deny"), "{s}");
        assert!(!s.contains("th dport 53 counter fwd"), "{s}");
    }

    #[test]
    fn an_allowed_name_cannot_open_what_the_profile_keeps_closed() {
        use simple_dns::rdata::RData;
        use simple_dns::{Name, Packet, Question, ResourceRecord, CLASS, QCLASS, QTYPE, TYPE};
        // DNS rebinding: the server answering for an allowed name is the attacker's.
        let answer = |records: &[RData<'static>]| {
            let mut pk = Packet::new_reply(9);
            pk.questions.push(Question::new(
                Name::new_unchecked("allowed.test"),
                QTYPE::TYPE(TYPE::A),
                QCLASS::CLASS(CLASS::IN),
                false,
            ));
            for r in records {
                pk.answers.push(ResourceRecord::new(
                    Name::new_unchecked("allowed.test"),
                    CLASS::IN,
                    60,
                    r.clone(),
                ));
            }
            pk.build_bytes_vec().unwrap()
        };
        let v4 = |t: &str| {
            RData::A(simple_dns::rdata::A {
                address: u32::from(t.parse::<std::net::Ipv4Addr>().unwrap()),
            })
        };
        let v6 = |t: &str| {
            RData::AAAA(simple_dns::rdata::AAAA {
                address: u128::from(t.parse::<std::net::Ipv6Addr>().unwrap()),
            })
        };
        let hostile = answer(&[
            v4("169.254.169.254"),
            v6("fd00:ec2::254"),
            v6("::ffff:169.254.169.254"),
            v4("169.254.10.1"),
            v4("127.0.0.1"),
            v6("::1"),
            v4("0.0.0.0"),
            v4("192.0.2.10"),   // the host's own address (facts)
            v4("172.18.0.1"),   // the gateway: the host too
            v4("10.20.30.40"),  // private
            v6("fd12:3456::1"), // unique local
            v4("100.64.0.1"),   // shared address space
            v4("172.18.0.5"),   // the container's own network
            v4("198.51.100.7"), // public-looking
        ]);
        let learnt = |policy: &str| -> Vec<String> {
            let p = PolicyFile::default().select(Some(policy)).unwrap();
            learn(&p, &facts(), &hostile)
                .into_iter()
                .map(|l| l.addr.to_string())
                .collect()
        };
        // agent: only what the profile would let through anyway.
        assert_eq!(
            learnt("agent; allow allowed.test"),
            ["172.18.0.5", "198.51.100.7"]
        );
        // none-but: a private address the name gives is the admin's choice; metadata,
        // link-local, loopback and the host never are.
        assert_eq!(
            learnt("none-but; allow allowed.test tcp port 443"),
            [
                "10.20.30.40",
                "fd12:3456::1",
                "100.64.0.1",
                "172.18.0.5",
                "198.51.100.7"
            ]
        );
        // open denies nothing built in: a deny rule naming the domain catches every address.
        assert_eq!(learnt("open; deny allowed.test").len(), 14);
        // What a policy change carries over is held to the new profile too.
        let json = r#"{"nftables": [{"set": {"name": "dom4_0", "elem": [
            {"elem": {"val": "10.20.30.40", "expires": 200}},
            {"elem": {"val": "169.254.169.254", "expires": 200}},
            {"elem": {"val": "198.51.100.7", "expires": 200}}]}}]}"#;
        let file = PolicyFile::default();
        let old = file.select(Some("none-but; allow allowed.test")).unwrap();
        let new = file.select(Some("agent; allow allowed.test")).unwrap();
        let kept: Vec<String> = carried_over(&old, &new, &facts(), json)
            .into_iter()
            .map(|l| l.addr.to_string())
            .collect();
        assert_eq!(kept, ["198.51.100.7"]);
        // The verdict for a metadata packet stays the built-in deny.
        let (action, why) = new.verdict_named(
            &facts(),
            "169.254.169.254".parse().unwrap(),
            Some("allowed.test"),
            Some(Proto::Tcp),
            Some(80),
        );
        assert_eq!(action, Action::Deny, "{why:?}");
    }

    #[test]
    fn a_policy_change_keeps_what_the_relay_learnt_for_names_it_still_allows() {
        let file = PolicyFile::default();
        let old = file
            .select(Some("none-but; allow a.test; allow b.test"))
            .unwrap();
        let new = file
            .select(Some("agent; allow c.test; allow b.test tcp port 443"))
            .unwrap();
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "netdev", "name": "agentvm"}},
            {"set": {"name": "dom4_0", "elem": [{"elem": {"val": "198.51.100.1", "timeout": 300, "expires": 200}}]}},
            {"set": {"name": "dom4_1", "elem": [{"elem": {"val": "198.51.100.2", "timeout": 300, "expires": 100}},
                                                {"elem": {"val": "198.51.100.3", "timeout": 5, "expires": 0}}]}},
            {"set": {"name": "dom6_1", "elem": [{"elem": {"val": "2001:db8::2", "timeout": 60, "expires": 59}},
                                                {"elem": {"val": "198.51.100.9", "timeout": 60, "expires": 59}}]}},
            {"set": {"name": "dom4_7", "elem": [{"elem": {"val": "198.51.100.4", "expires": 50}}]}},
            {"set": {"name": "other", "elem": [{"elem": {"val": "198.51.100.5", "expires": 50}}]}}]}"#;
        let kept = carried_over(&old, &new, &facts(), json);
        let l = |set: &str, addr: &str, ttl| Learnt {
            set: set.into(),
            addr: addr.parse().unwrap(),
            ttl,
        };
        // b.test was old set 1 and is new set 1; a.test is gone; expired and mismatched
        // entries and sets of no old domain are dropped.
        assert_eq!(
            kept,
            [
                l("dom4_1", "198.51.100.2", 100),
                l("dom6_1", "2001:db8::2", 59)
            ]
        );
        assert_eq!(carried_over(&old, &new, &facts(), "not json"), []);
        assert_eq!(carried_over(&old, &Policy::open(), &facts(), json), []);
    }

    #[test]
    fn host_addresses_come_from_ip_json() {
        let json = r#"[{"ifname":"lo","addr_info":[{"local":"127.0.0.1"},{"local":"::1"}]},
            {"ifname":"docker0","addr_info":[{"local":"172.17.0.1"}]},{"ifname":"x"}]"#;
        assert_eq!(
            parse_host_addresses(json),
            [ip("127.0.0.1"), ip("172.17.0.1"), ip("::1")]
        );
        assert!(parse_host_addresses("garbage").is_empty());
    }

    /// A blocked connection to an address the relay resolved is logged with its name and
    /// judged by the domain rule naming it (not the next rule or the default).
    #[test]
    fn blocks_name_the_domain_an_address_was_resolved_from() {
        use simple_dns::{rdata::RData, Name, Packet, Question, ResourceRecord};
        use simple_dns::{CLASS, QCLASS, QTYPE, TYPE};
        let answer = |q: &str, ip: [u8; 4], ttl: u32| {
            let mut pk = Packet::new_reply(1);
            pk.questions.push(Question::new(
                Name::new_unchecked(q),
                QTYPE::TYPE(TYPE::A),
                QCLASS::CLASS(CLASS::IN),
                false,
            ));
            pk.answers.push(ResourceRecord::new(
                Name::new_unchecked(q),
                CLASS::IN,
                ttl,
                RData::A(simple_dns::rdata::A {
                    address: u32::from_be_bytes(ip),
                }),
            ));
            pk.build_bytes_vec().unwrap()
        };
        let resolved = Resolved::default();
        resolved.note(&answer("X.Evil.Test", [203, 0, 113, 66], 60));
        resolved.note(&answer("other.test", [198, 51, 100, 8], 60));
        resolved.note(b"not dns");
        assert_eq!(
            resolved.name_of(ip("203.0.113.66")).as_deref(),
            Some("x.evil.test")
        );
        assert_eq!(resolved.name_of(ip("192.0.2.1")), None);
        let p = PolicyFile::default()
            .select(Some("agent; deny *.evil.test"))
            .unwrap();
        let name = resolved.name_of(ip("203.0.113.66"));
        assert_eq!(
            audit_line(
                &p,
                &facts(),
                ip("203.0.113.66"),
                name.as_deref(),
                Some(Proto::Tcp),
                Some(443)
            ),
            "blocked tcp to 203.0.113.66:443 (x.evil.test) (policy \"agent; deny *.evil.test\", \
             rule: deny *.evil.test)"
        );
        let p = PolicyFile::default()
            .select(Some("none-but; allow example.test tcp port 443"))
            .unwrap();
        let name = resolved.name_of(ip("198.51.100.8"));
        assert_eq!(
            audit_line(
                &p,
                &facts(),
                ip("198.51.100.8"),
                name.as_deref(),
                Some(Proto::Tcp),
                Some(8080)
            ),
            "blocked tcp to 198.51.100.8:8080 (other.test) (policy \"none-but; allow \
             example.test tcp port 443\", rule: the default of none-but)"
        );
    }

    #[test]
    fn blocked_frames_are_described_with_their_rule() {
        let mut frame = vec![0u8; 14 + 20 + 8];
        frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        frame[14] = 0x45;
        frame[14 + 9] = 6;
        frame[14 + 16..14 + 20].copy_from_slice(&[169, 254, 169, 254]);
        frame[14 + 20 + 2..14 + 20 + 4].copy_from_slice(&80u16.to_be_bytes());
        let (dst, proto, port) = parse_frame(&frame).unwrap();
        assert_eq!(
            (dst, proto, port),
            (ip("169.254.169.254"), Some(Proto::Tcp), Some(80))
        );
        let p = PolicyFile::default().select(Some("agent")).unwrap();
        assert_eq!(
            audit_line(&p, &facts(), dst, None, proto, port),
            "blocked tcp to 169.254.169.254:80 (policy \"agent\", rule: cloud metadata)"
        );
        // Truncated and non-IP frames are nothing.
        assert_eq!(parse_frame(&frame[..20]), None);
        let mut arp = frame.clone();
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(parse_frame(&arp), None);
    }
}
