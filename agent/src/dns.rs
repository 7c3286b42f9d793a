//! The guest end of the DNS relay: a UDP listener (Docker's `127.0.0.11:53`) whose queries
//! go to the host over the relay's vsock connection as [`Frame::Dns`], and whose replies come
//! back the same way.
//!
//! Clients pick their own 16-bit query ids, so two clients may use the same one. Every query
//! gets a fresh relay id on the way out; the [`IdTable`] maps it back to the client's address
//! and original id when the reply comes in.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use agentvm_protocol::{Frame, Message, ProtocolError};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::{debug, info};

/// The port the relay listens on.
pub const DNS_PORT: u16 = 53;
/// How many queries may await their reply at once; a newer query evicts the oldest.
pub const TABLE_SIZE: usize = 4096;
/// How long a query waits for its reply before a late reply is dropped.
pub const QUERY_TTL: Duration = Duration::from_secs(10);
/// A DNS message is at least its header.
pub const HEADER_LEN: usize = 12;

/// One query awaiting its reply.
#[derive(Debug, Clone, Copy)]
struct Pending {
    relay_id: u16,
    client: SocketAddr,
    id: u16,
    sent: Instant,
}

/// Relay ids of the queries in flight. Ids are handed out in sequence and query `n` lives
/// in slot `n % TABLE_SIZE`, so the table is bounded, a new query evicts exactly the oldest
/// one, and a lookup is one slot. `TABLE_SIZE` divides 65536, so the slot of an id does not
/// change when the sequence wraps.
#[derive(Debug)]
pub struct IdTable {
    slots: Vec<Option<Pending>>,
    next: u16,
    ttl: Duration,
}

const _: () = assert!(65536 % TABLE_SIZE == 0);

impl IdTable {
    /// An empty table whose first relay id is `first`.
    pub fn new(first: u16, ttl: Duration) -> Self {
        Self {
            slots: vec![None; TABLE_SIZE],
            next: first,
            ttl,
        }
    }

    /// Remembers a query of `client` with its `id`; returns the relay id to send it with.
    pub fn insert(&mut self, client: SocketAddr, id: u16, now: Instant) -> u16 {
        let relay_id = self.next;
        self.next = self.next.wrapping_add(1);
        self.slots[usize::from(relay_id) % TABLE_SIZE] = Some(Pending {
            relay_id,
            client,
            id,
            sent: now,
        });
        relay_id
    }

    /// The client and original id of the query sent as `relay_id`, forgotten on the way (one
    /// reply per query). None if unknown, evicted or older than the TTL.
    pub fn take(&mut self, relay_id: u16, now: Instant) -> Option<(SocketAddr, u16)> {
        let slot = &mut self.slots[usize::from(relay_id) % TABLE_SIZE];
        match *slot {
            Some(p) if p.relay_id == relay_id => {
                *slot = None;
                (now.saturating_duration_since(p.sent) <= self.ttl).then_some((p.client, p.id))
            }
            _ => None,
        }
    }
}

/// Reads the id of a DNS message; None for one shorter than a header.
fn message_id(msg: &[u8]) -> Option<u16> {
    if msg.len() < HEADER_LEN {
        return None;
    }
    Some(u16::from_be_bytes([msg[0], msg[1]]))
}

fn set_message_id(msg: &mut [u8], id: u16) {
    msg[..2].copy_from_slice(&id.to_be_bytes());
}

/// Binds the relay's UDP socket on `address`:`port`.
pub async fn bind(address: &str, port: u16) -> Result<UdpSocket, String> {
    let ip: IpAddr = address
        .parse()
        .map_err(|_| format!("DNS relay: {address:?} is not an IP address"))?;
    let addr = SocketAddr::new(ip, port);
    UdpSocket::bind(addr)
        .await
        .map_err(|e| format!("DNS relay: bind UDP {addr}: {e}"))
}

/// Why a relay ended.
#[derive(Debug, PartialEq, Eq)]
pub enum RelayEnd {
    /// The host closed the connection (or broke it).
    HostGone,
    /// The host asked to power off.
    Shutdown,
}

/// Relays until the host connection ends. Queries go to `out` as [`Frame::Dns`]; replies
/// come from `host`. Short or unknown messages are dropped; so are queries while the host
/// connection is congested (clients retry), so that the relay never stops reading replies.
pub async fn relay(
    socket: UdpSocket,
    out: &mpsc::Sender<Frame>,
    host: &mut mpsc::Receiver<Result<Frame, ProtocolError>>,
) -> RelayEnd {
    let first = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u16)
        .unwrap_or(0);
    let mut table = IdTable::new(first, QUERY_TTL);
    // The largest UDP payload.
    let mut buf = vec![0u8; 65536];
    loop {
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                let (n, client) = match r {
                    Ok(r) => r,
                    Err(e) => {
                        // E.g. a client's ICMP error surfacing here; the socket is still fine.
                        debug!("DNS relay: receive: {e}");
                        continue;
                    }
                };
                let Some(id) = message_id(&buf[..n]) else {
                    debug!("DNS relay: dropping a {n}-byte datagram from {client}");
                    continue;
                };
                let mut query = buf[..n].to_vec();
                set_message_id(&mut query, table.insert(client, id, Instant::now()));
                match out.try_send(Frame::Dns(query)) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => {
                        debug!("DNS relay: host connection congested; dropping a query of {client}");
                    }
                    Err(TrySendError::Closed(_)) => return RelayEnd::HostGone,
                }
            }
            f = host.recv() => match f {
                None => return RelayEnd::HostGone,
                Some(Err(e)) => {
                    info!("DNS relay: malformed frame from the host: {e}");
                    return RelayEnd::HostGone;
                }
                Some(Ok(Frame::Dns(mut reply))) => {
                    let Some(relay_id) = message_id(&reply) else {
                        debug!("DNS relay: dropping a {}-byte reply", reply.len());
                        continue;
                    };
                    let Some((client, id)) = table.take(relay_id, Instant::now()) else {
                        debug!("DNS relay: dropping a reply to unknown or expired query {relay_id}");
                        continue;
                    };
                    set_message_id(&mut reply, id);
                    if let Err(e) = socket.send_to(&reply, client).await {
                        debug!("DNS relay: reply to {client}: {e}");
                    }
                }
                Some(Ok(Frame::Msg(Message::Shutdown))) => return RelayEnd::Shutdown,
                Some(Ok(other)) => debug!("DNS relay: ignoring {other:?}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn ids_map_back_to_their_clients() {
        let t0 = Instant::now();
        let mut t = IdTable::new(65535, QUERY_TTL);
        let a = t.insert(client(1000), 7, t0);
        let b = t.insert(client(1001), 7, t0);
        assert_eq!((a, b), (65535, 0), "ids wrap around");
        assert_eq!(t.take(b, t0), Some((client(1001), 7)));
        assert_eq!(t.take(a, t0), Some((client(1000), 7)));
        assert_eq!(t.take(a, t0), None, "one reply per query");
        assert_eq!(t.take(1234, t0), None, "never sent");
    }

    #[test]
    fn old_queries_expire() {
        let t0 = Instant::now();
        let mut t = IdTable::new(0, Duration::from_secs(10));
        let a = t.insert(client(1), 1, t0);
        let b = t.insert(client(2), 2, t0);
        assert_eq!(
            t.take(a, t0 + Duration::from_secs(10)),
            Some((client(1), 1))
        );
        assert_eq!(t.take(b, t0 + Duration::from_secs(11)), None);
    }

    #[test]
    fn the_table_is_bounded_and_evicts_the_oldest() {
        let t0 = Instant::now();
        let mut t = IdTable::new(100, QUERY_TTL);
        let ids: Vec<u16> = (0..TABLE_SIZE + 1)
            .map(|i| t.insert(client(2000), i as u16, t0))
            .collect();
        assert_eq!(t.slots.len(), TABLE_SIZE);
        assert_eq!(t.take(ids[0], t0), None, "the oldest was evicted");
        assert_eq!(t.take(ids[1], t0), Some((client(2000), 1)));
        assert_eq!(
            t.take(ids[TABLE_SIZE], t0),
            Some((client(2000), TABLE_SIZE as u16))
        );
        // An id that shares a slot with a live entry is not mistaken for it.
        let live = t.insert(client(3000), 9, t0);
        assert_eq!(t.take(live.wrapping_add(TABLE_SIZE as u16), t0), None);
        assert_eq!(t.take(live, t0), Some((client(3000), 9)));
    }

    #[test]
    fn short_messages_have_no_id() {
        assert_eq!(message_id(&[0x12; 11]), None);
        assert_eq!(message_id(&[]), None);
        let mut m = [0u8; 12];
        set_message_id(&mut m, 0xabcd);
        assert_eq!(message_id(&m), Some(0xabcd));
    }
}
