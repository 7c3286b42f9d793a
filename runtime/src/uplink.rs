//! A sandbox's own way out to the network when no engine made one (`agentvm mcp`'s sandboxes).
//!
//! Docker, CNI and nerdctl hand a container a network namespace with a veth already in it;
//! library mode has nobody to do that, so this module does the same job the way a CNI
//! `bridge`/`ptp` plugin would: a veth pair whose container end (`eth0`) sits in the
//! sandbox's namespace ([`crate::netns::Netns`]) with a point-to-point /30 out of
//! [`SUBNET`], the host end (`avmuN`) in the host's namespace with the gateway address, and
//! the host masquerading what leaves. From there the sandbox is wired exactly as a Docker
//! container (tap + guard + the egress table inside its namespace).
//!
//! What lives on the host, and how it goes away:
//! - the host end of the veth: the kernel deletes it with the namespace (the peer goes with
//!   the last process in it), and [`Uplink::remove`] deletes it anyway;
//! - an nftables table `ip agentvm-mcp-avmuN` (masquerade, and no new connections from
//!   outside into the sandbox), deleted by [`Uplink::remove`];
//! - where iptables' `FORWARD` chain exists (Docker sets its policy to DROP, and an accept
//!   in a table of our own cannot overrule another table's drop), two `ACCEPT` rules for the
//!   link, commented `agentvm-mcp avmuN`, deleted by [`Uplink::remove`].
//!
//! A server that was SIGKILLed cannot remove anything: [`sweep`] (run when `agentvm mcp`
//! starts) removes the table and rules of every `avmuN` link that no longer exists.
//!
//! The index N is claimed by creating the link (the kernel refuses a second `avmuN`), so
//! concurrent servers never share an address.

use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Prefix of the host ends of the sandboxes' veth pairs.
pub const LINK_PREFIX: &str = "avmu";
/// Prefix of the per-sandbox nftables tables (family `ip`) on the host.
pub const TABLE_PREFIX: &str = "agentvm-mcp-";
/// The comment on the iptables rules of link `avmuN`: `agentvm-mcp avmuN`.
pub const RULE_COMMENT: &str = "agentvm-mcp";
/// The uplinks' addresses: a /30 per sandbox out of 10.232.0.0/16 (not Docker's
/// 172.17.0.0/16, nor the 10.231.0.0/16 the project's CRI and egress tests use).
pub const SUBNET: Ipv4Addr = Ipv4Addr::new(10, 232, 0, 0);
/// How many /30s [`SUBNET`] holds.
pub const MAX_LINKS: u32 = 1 << 14;
/// The sandbox's interface name.
pub const GUEST_IF: &str = "eth0";

/// The addresses of uplink `n`: (network, host end = gateway, sandbox end), each of a /30.
pub fn addresses(n: u32) -> (Ipv4Addr, Ipv4Addr, Ipv4Addr) {
    let base = u32::from(SUBNET) + 4 * (n % MAX_LINKS);
    (
        Ipv4Addr::from(base),
        Ipv4Addr::from(base + 1),
        Ipv4Addr::from(base + 2),
    )
}

/// The sandbox's end of the uplink whose /30 starts at `network`.
pub fn sandbox_address(network: Ipv4Addr) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(network) + 2)
}

/// The index of a host link name `avmuN`.
pub fn link_index(name: &str) -> Option<u32> {
    let n: u32 = name.strip_prefix(LINK_PREFIX)?.parse().ok()?;
    (n < MAX_LINKS && name == format!("{LINK_PREFIX}{n}")).then_some(n)
}

/// The host's nftables table of uplink `link`.
pub fn table_name(link: &str) -> String {
    format!("{TABLE_PREFIX}{link}")
}

/// The host-side nftables script of uplink `n` (`label` goes into the table's comment).
pub fn host_script(n: u32, label: &str) -> String {
    let link = format!("{LINK_PREFIX}{n}");
    let (net, _, _) = addresses(n);
    let table = table_name(&link);
    let label: String = label
        .chars()
        .filter(|c| !matches!(c, '"' | '\\' | '\n'))
        .take(120)
        .collect();
    format!(
        "table ip {table} {{\n\
         \tcomment \"agentvm mcp sandbox {label}\"\n\
         \tchain post {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {net}/30 oifname != \"{link}\" masquerade\n\
         \t}}\n\
         \tchain inbound {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\toifname \"{link}\" ct state established,related accept\n\
         \t\toifname \"{link}\" drop\n\
         \t}}\n\
         }}\n"
    )
}

/// The iptables rules (arguments after `-I FORWARD 1` / `-D FORWARD`) of link `link`.
pub fn iptables_rules(link: &str) -> [Vec<String>; 2] {
    let comment = format!("{RULE_COMMENT} {link}");
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    [
        s(&[
            "-i",
            link,
            "-m",
            "comment",
            "--comment",
            &comment,
            "-j",
            "ACCEPT",
        ]),
        s(&[
            "-o",
            link,
            "-m",
            "conntrack",
            "--ctstate",
            "RELATED,ESTABLISHED",
            "-m",
            "comment",
            "--comment",
            &comment,
            "-j",
            "ACCEPT",
        ]),
    ]
}

/// A sandbox's uplink: the host end of its veth, its table and rules on the host.
#[derive(Debug)]
pub struct Uplink {
    index: u32,
    link: String,
    nft: PathBuf,
    /// iptables, when its FORWARD chain exists (rules were inserted there).
    iptables: Option<PathBuf>,
}

/// Runs `program args` in the host's namespace; its stdout, or an error with its stderr.
async fn host(program: &Path, args: &[&str], input: Option<String>) -> Result<String> {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let shown = format!("{} {}", program.display(), args.join(" "));
    let spawn_err = |e| Error::Spawn {
        program: program.display().to_string(),
        source: e,
    };
    let mut child = cmd.spawn().map_err(spawn_err)?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        let _ = stdin.write_all(input.as_bytes()).await;
    }
    let out = child.wait_with_output().await.map_err(spawn_err)?;
    if !out.status.success() {
        return Err(Error::Invalid(format!(
            "sandbox uplink: `{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn program(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

fn ip() -> PathBuf {
    program("ip").unwrap_or_else(|| PathBuf::from("ip"))
}

/// iptables, if installed and its filter table's FORWARD chain answers.
async fn iptables_forward() -> Option<PathBuf> {
    let bin = program("iptables")?;
    host(&bin, &["-w", "-S", "FORWARD"], None).await.ok()?;
    Some(bin)
}

/// Makes sure the host forwards IPv4 (as Docker does when it starts); warns when it had to.
fn ensure_forwarding() -> Result<()> {
    let path = "/proc/sys/net/ipv4/ip_forward";
    let now = std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
    if now.trim() != "1" {
        std::fs::write(path, b"1").map_err(|e| Error::io("write", path, e))?;
        tracing::warn!(
            "net.ipv4.ip_forward was 0: set it to 1 so sandboxes reach the network (as Docker \
             does)"
        );
    }
    Ok(())
}

impl Uplink {
    /// Gives the namespace `ns` (its holder `pid`) an `eth0` with a /30 and a default route
    /// through a veth to the host, which masquerades it. `label` (the state dir) names the
    /// sandbox in the host link's alias and the table's comment. Nothing is left on failure.
    pub async fn create(ns: &Arc<OwnedFd>, pid: u32, label: &Path) -> Result<Uplink> {
        let nft = crate::egress::nft_program().ok_or_else(|| {
            Error::Invalid(
                "a sandbox with network needs nft (nftables) on the host to masquerade its \
                 traffic and enforce its egress policy (apt-get install nftables), or egress \
                 \"none\""
                    .into(),
            )
        })?;
        ensure_forwarding()?;
        let ip = ip();
        let pid_s = pid.to_string();
        // Claim an index: the kernel refuses a second link of the same name.
        let start = std::process::id() % MAX_LINKS;
        let mut claimed = None;
        for k in 0..MAX_LINKS {
            let n = (start + k) % MAX_LINKS;
            let link = format!("{LINK_PREFIX}{n}");
            if Path::new("/sys/class/net").join(&link).exists() {
                continue;
            }
            let r = host(
                &ip,
                &[
                    "link", "add", &link, "type", "veth", "peer", "name", GUEST_IF, "netns", &pid_s,
                ],
                None,
            )
            .await;
            match r {
                Ok(_) => {
                    claimed = Some((n, link));
                    break;
                }
                Err(e) if e.to_string().contains("File exists") => continue,
                Err(e) => return Err(e),
            }
        }
        let (index, link) = claimed.ok_or_else(|| {
            Error::Invalid(format!(
                "sandbox uplink: all {MAX_LINKS} links {LINK_PREFIX}N are taken"
            ))
        })?;
        let mut up = Uplink {
            index,
            link,
            nft,
            iptables: None,
        };
        if let Err(e) = up.configure(ns, label).await {
            up.remove().await;
            return Err(e);
        }
        Ok(up)
    }

    async fn configure(&mut self, ns: &Arc<OwnedFd>, label: &Path) -> Result<()> {
        let ip = ip();
        let (_, gw, addr) = addresses(self.index);
        let link = self.link.clone();
        let gw_cidr = format!("{gw}/30");
        let addr_cidr = format!("{addr}/30");
        let label_s = label.display().to_string();
        // IPv4 only: no IPv6 on either end (the guest turns it off too).
        let no_v6 = format!("/proc/sys/net/ipv6/conf/{link}/disable_ipv6");
        let _ = std::fs::write(&no_v6, b"1");
        host(&ip, &["link", "set", "dev", &link, "alias", &label_s], None).await?;
        host(&ip, &["addr", "add", &gw_cidr, "dev", &link], None).await?;
        host(&ip, &["link", "set", "dev", &link, "up"], None).await?;
        let no_v6_guest = format!("net.ipv6.conf.{GUEST_IF}.disable_ipv6=1");
        let _ = crate::netns::run_in(ns, "sysctl", ["-qw", no_v6_guest.as_str()], None).await;
        let gw_s = gw.to_string();
        for args in [
            vec!["link", "set", "dev", "lo", "up"],
            vec!["addr", "add", addr_cidr.as_str(), "dev", GUEST_IF],
            vec!["link", "set", "dev", GUEST_IF, "up"],
            vec!["route", "add", "default", "via", gw_s.as_str()],
        ] {
            crate::netns::run_in(ns, "ip", args, None).await?;
        }
        host(
            &self.nft,
            &["-f", "-"],
            Some(host_script(self.index, &label_s)),
        )
        .await?;
        if let Some(ipt) = iptables_forward().await {
            self.iptables = Some(ipt.clone());
            for rule in iptables_rules(&link) {
                let mut args = vec!["-w", "-I", "FORWARD", "1"];
                args.extend(rule.iter().map(String::as_str));
                host(&ipt, &args, None).await?;
            }
        }
        Ok(())
    }

    /// The host end's name (`avmuN`).
    pub fn link(&self) -> &str {
        &self.link
    }

    /// The sandbox's address and its gateway (the host end).
    pub fn addresses(&self) -> (Ipv4Addr, Ipv4Addr) {
        let (_, gw, addr) = addresses(self.index);
        (addr, gw)
    }

    /// Removes the rules, the table and the host end (each as far as it exists).
    pub async fn remove(&mut self) {
        remove_host_state(&self.link, self.iptables.as_deref(), &self.nft).await;
        let _ = host(&ip(), &["link", "del", "dev", &self.link], None).await;
    }
}

/// Deletes the iptables rules (when `iptables` is given) and the nftables table of `link`.
async fn remove_host_state(link: &str, iptables: Option<&Path>, nft: &Path) {
    if let Some(ipt) = iptables {
        for rule in iptables_rules(link) {
            let mut args = vec!["-w", "-D", "FORWARD"];
            args.extend(rule.iter().map(String::as_str));
            // Deleted as often as it is there (an insert that was retried).
            while host(ipt, &args, None).await.is_ok() {}
        }
    }
    let table = table_name(link);
    if let Err(e) = host(nft, &["delete", "table", "ip", &table], None).await {
        if !e.to_string().contains("No such file") {
            tracing::warn!("{e}");
        }
    }
}

/// The uplink tables on the host whose link is gone (a server killed before it removed
/// them), from `nft list tables`' output.
pub fn stale_tables(listing: &str, link_exists: impl Fn(&str) -> bool) -> Vec<String> {
    listing
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table ip "))
        .filter_map(|t| t.trim().strip_prefix(TABLE_PREFIX))
        .filter(|link| link_index(link).is_some() && !link_exists(link))
        .map(str::to_string)
        .collect()
}

/// Removes the host state of uplinks whose link no longer exists. Returns how many.
pub async fn sweep() -> usize {
    let Some(nft) = crate::egress::nft_program() else {
        return 0;
    };
    let Ok(listing) = host(&nft, &["list", "tables", "ip"], None).await else {
        return 0;
    };
    let stale = stale_tables(&listing, |l| Path::new("/sys/class/net").join(l).exists());
    if stale.is_empty() {
        return 0;
    }
    let ipt = iptables_forward().await;
    for link in &stale {
        tracing::info!("removing the leftover uplink rules of {link} (its sandbox is gone)");
        remove_host_state(link, ipt.as_deref(), &nft).await;
    }
    stale.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_slash30s_of_the_subnet() {
        assert_eq!(
            addresses(0),
            (
                Ipv4Addr::new(10, 232, 0, 0),
                Ipv4Addr::new(10, 232, 0, 1),
                Ipv4Addr::new(10, 232, 0, 2)
            )
        );
        assert_eq!(addresses(65).1, Ipv4Addr::new(10, 232, 1, 5));
        let last = addresses(MAX_LINKS - 1);
        assert_eq!(last.2, Ipv4Addr::new(10, 232, 255, 254));
        // Never Docker's default bridge, nor the CRI and egress tests' 10.231.0.0/16.
        for n in [0, 1, MAX_LINKS - 1] {
            let o = addresses(n).0.octets();
            assert_eq!((o[0], o[1]), (10, 232));
        }
    }

    #[test]
    fn link_names_parse_strictly() {
        assert_eq!(link_index("avmu0"), Some(0));
        assert_eq!(link_index("avmu16383"), Some(16383));
        assert_eq!(link_index("avmu16384"), None);
        assert_eq!(link_index("avmu01"), None);
        assert_eq!(link_index("avmtap0"), None);
        assert_eq!(link_index("avmu"), None);
    }

    #[test]
    fn the_host_script_masquerades_the_sandbox_and_keeps_the_outside_out() {
        let s = host_script(3, "/run/agentvm/abc\"; drop");
        assert!(s.starts_with("table ip agentvm-mcp-avmu3 {"), "{s}");
        assert!(
            s.contains("ip saddr 10.232.0.12/30 oifname != \"avmu3\" masquerade"),
            "{s}"
        );
        assert!(
            s.contains("oifname \"avmu3\" ct state established,related accept"),
            "{s}"
        );
        assert!(s.contains("oifname \"avmu3\" drop"), "{s}");
        // The label cannot close the comment's quotes.
        assert!(s.contains("comment \"agentvm mcp sandbox /run/agentvm/abc; drop\""));
    }

    #[test]
    fn iptables_rules_name_the_link() {
        let [a, b] = iptables_rules("avmu7");
        assert_eq!(a[..2], ["-i".to_string(), "avmu7".to_string()]);
        assert!(a.contains(&"agentvm-mcp avmu7".to_string()));
        assert!(b.contains(&"RELATED,ESTABLISHED".to_string()));
    }

    #[test]
    fn only_tables_of_missing_links_are_stale() {
        let listing = "table ip nat\ntable ip agentvm-mcp-avmu1\ntable ip agentvm-mcp-avmu2\n\
                       table ip agentvm-mcp-other\ntable ip filter\n";
        let stale = stale_tables(listing, |l| l == "avmu2");
        assert_eq!(stale, vec!["avmu1".to_string()]);
    }
}
