//! The host end of the DNS relay for Docker's embedded DNS server.
//!
//! On user-defined networks Docker writes `nameserver 127.0.0.11` into the container's
//! `/etc/resolv.conf` and answers there from inside the container's network namespace on the
//! host (an iptables DNAT in that namespace points 127.0.0.11:53 at dockerd's resolver). The
//! guest's 127.0.0.11 is its own loopback, so the agent listens there and relays each query
//! over vsock; this side sends it from a UDP socket that lives in the container's namespace,
//! where Docker's rules apply, and relays the answer back. Names of other containers and
//! Compose services resolve in the VM exactly as under runc.

use std::time::Duration;

use agentvm_protocol::{tokio_io, Frame, Message};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::sandbox::{spawn_frame_reader, AgentConn};

/// Docker's embedded DNS server address.
pub const DOCKER_DNS: &str = "127.0.0.11";
/// How long the agent may take to bind its end.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks the agent to listen on [`DOCKER_DNS`]:53 and relays its queries through `socket`
/// (created in the container's network namespace) until the connection closes.
/// What the relay does for the egress policy: before an answer reaches the guest, the
/// addresses of names the policy's domain rules name are added to its table
/// ([`crate::egress::learn`]). The policy is read from the sandbox's record at each answer
/// (`agentvm policy set` changes it).
#[derive(Debug, Clone)]
pub struct EgressHook {
    pub netns: std::sync::Arc<std::os::fd::OwnedFd>,
    pub state_dir: std::path::PathBuf,
    pub nft: std::path::PathBuf,
    /// The netlink socket in the namespace, opened at the first answer that needs it.
    writer: std::sync::Arc<std::sync::Mutex<Option<crate::nftlink::SetWriter>>>,
    /// Every answer's addresses by name, for the audit log.
    resolved: std::sync::Arc<crate::egress::Resolved>,
}

impl EgressHook {
    pub fn new(
        netns: std::sync::Arc<std::os::fd::OwnedFd>,
        state_dir: std::path::PathBuf,
        nft: std::path::PathBuf,
        resolved: std::sync::Arc<crate::egress::Resolved>,
    ) -> EgressHook {
        EgressHook {
            netns,
            state_dir,
            nft,
            writer: Default::default(),
            resolved,
        }
    }

    pub(crate) async fn learn(&self, answer: &[u8]) {
        self.resolved.note(answer);
        let Ok(record) = crate::egress::Record::load(&self.state_dir) else {
            return;
        };
        let learnt = crate::egress::learn(&record.policy, &record.facts, answer);
        if learnt.is_empty() {
            return;
        }
        // Netlink first (microseconds); `nft` (milliseconds) if that fails.
        let direct = {
            let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            if w.is_none() {
                *w = crate::nftlink::SetWriter::open_in(&self.netns)
                    .map_err(|e| tracing::debug!("egress: netlink socket: {e}"))
                    .ok();
            }
            let r = match w.as_mut() {
                Some(writer) => writer.add(crate::egress::TABLE, &learnt),
                None => Err(std::io::Error::other("no netlink socket")),
            };
            if r.is_err() {
                *w = None;
            }
            r
        };
        if let Err(e) = direct {
            tracing::debug!("egress: add learnt addresses over netlink: {e}; using nft");
            let script = crate::egress::learnt_script(&learnt);
            if let Err(e) = crate::netns::nft_in(&self.netns, &self.nft, script).await {
                tracing::warn!("egress: allow the addresses of a resolved name: {e}");
            }
        }
    }
}

pub async fn start_relay(
    mut conn: AgentConn,
    socket: std::net::UdpSocket,
    upstream: std::net::SocketAddr,
    egress: Option<EgressHook>,
) -> Result<JoinHandle<()>> {
    conn.send(&Frame::Msg(Message::DnsRelay {
        address: DOCKER_DNS.into(),
    }))
    .await?;
    match tokio::time::timeout(READY_TIMEOUT, conn.recv()).await {
        Ok(Ok(Some(Frame::Msg(Message::Ready)))) => {}
        Ok(Ok(Some(Frame::Msg(Message::Error { message, .. })))) => {
            return Err(Error::Agent(format!(
                "DNS relay: {}",
                crate::guest::text(&message)
            )))
        }
        Ok(other) => {
            return Err(Error::Agent(format!(
                "DNS relay: expected Ready, got {}",
                crate::guest::describe_recv(&other)
            )))
        }
        Err(_) => return Err(Error::Agent("DNS relay: the agent did not answer".into())),
    }
    socket
        .connect(upstream)
        .and_then(|()| socket.set_nonblocking(true))
        .map_err(|e| Error::Agent(format!("DNS relay: connect to {upstream}: {e}")))?;
    let socket = tokio::net::UdpSocket::from_std(socket)
        .map_err(|e| Error::Agent(format!("DNS relay socket: {e}")))?;
    let AgentConn { reader, mut writer } = conn;
    Ok(tokio::spawn(async move {
        let (mut frames, reader_task) = spawn_frame_reader(reader);
        let mut buf = vec![0u8; 65536];
        loop {
            tokio::select! {
                f = frames.recv() => match f {
                    Some(Ok(Some(Frame::Dns(query)))) => {
                        if let Err(e) = socket.send(&query).await {
                            tracing::debug!("DNS relay: send to {upstream}: {e}");
                        }
                    }
                    Some(Ok(Some(other))) => tracing::debug!(
                        "DNS relay: ignoring {}",
                        crate::guest::describe(&other)
                    ),
                    _ => break,
                },
                r = socket.recv(&mut buf) => match r {
                    Ok(n) => {
                        // The table first: the guest connects as soon as it has the answer.
                        if let Some(h) = &egress {
                            h.learn(&buf[..n]).await;
                        }
                        let reply = Frame::Dns(buf[..n].to_vec());
                        if tokio_io::write_frame(&mut writer, &reply).await.is_err() {
                            break;
                        }
                    }
                    // Nothing listening (yet): ICMP unreachable surfaces here; keep going.
                    Err(e) => tracing::debug!("DNS relay: receive from {upstream}: {e}"),
                },
            }
        }
        reader_task.abort();
    }))
}
