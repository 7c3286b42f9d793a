//! Adding learnt addresses to the egress table's sets over netlink.
//!
//! The DNS relay must put the addresses of an allowed name into the sandbox's table *before*
//! the answer reaches the guest, so the time that takes is added to every lookup of such a
//! name. Spawning `nft -f -` costs milliseconds (fork, exec, nft parsing its whole ruleset
//! cache); one nftables batch on a netlink socket kept open in the sandbox's namespace costs
//! tens of microseconds. The batch is the one `nft add element` sends: `NFT_MSG_NEWSETELEM`
//! with each element's key and timeout, between batch begin and end, each message acknowledged.
//! No crate on crates.io builds set elements with timeouts without C libraries (libnftnl via
//! `nftnl`, bindgen via `rustables`), and this is the only nftables message the runtime
//! builds itself (docs/decisions.md); the table is still written by `nft`.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use crate::egress::Learnt;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFPROTO_NETDEV: u8 = 5;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 0x2;
const NLA_F_NESTED: u16 = 0x8000;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_DATA_VALUE: u16 = 1;

/// A netlink message under construction: header, nfgenmsg, attributes.
struct Msg {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Msg {
    fn new(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Msg {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        buf.push(family);
        buf.push(0); // NFNETLINK_V0
        buf.extend_from_slice(&res_id.to_be_bytes());
        Msg {
            buf,
            nests: Vec::new(),
        }
    }

    fn attr(&mut self, kind: u16, data: &[u8]) {
        let len = 4 + data.len();
        self.buf
            .extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn string(&mut self, kind: u16, s: &str) {
        let mut data = s.as_bytes().to_vec();
        data.push(0);
        self.attr(kind, &data);
    }

    fn begin(&mut self, kind: u16) {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    }

    fn end(&mut self) {
        if let Some(start) = self.nests.pop() {
            let len = u16::try_from(self.buf.len() - start).unwrap_or(u16::MAX);
            self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// The batch that adds `learnt` to the sets of table `table` (family netdev): one
/// `NEWSETELEM` per set, sequence numbers from `seq`. Returns the bytes and the sequence
/// numbers whose acknowledgements to wait for.
fn batch(table: &str, learnt: &[Learnt], seq: u32) -> (Vec<u8>, Vec<u32>) {
    let mut out = Msg::new(
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
    )
    .finish();
    let mut acks = Vec::new();
    let mut sets: Vec<&str> = learnt.iter().map(|l| l.set.as_str()).collect();
    sets.sort_unstable();
    sets.dedup();
    let mut next = seq.wrapping_add(1);
    for set in sets {
        let mut m = Msg::new(
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM,
            NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK,
            next,
            NFPROTO_NETDEV,
            0,
        );
        m.string(NFTA_SET_ELEM_LIST_TABLE, table);
        m.string(NFTA_SET_ELEM_LIST_SET, set);
        m.begin(NFTA_SET_ELEM_LIST_ELEMENTS);
        for l in learnt.iter().filter(|l| l.set == set) {
            m.begin(NFTA_LIST_ELEM);
            m.begin(NFTA_SET_ELEM_KEY);
            match l.addr {
                IpAddr::V4(a) => m.attr(NFTA_DATA_VALUE, &a.octets()),
                IpAddr::V6(a) => m.attr(NFTA_DATA_VALUE, &a.octets()),
            }
            m.end();
            let ms = u64::from(l.ttl) * 1000;
            m.attr(NFTA_SET_ELEM_TIMEOUT, &ms.to_be_bytes());
            m.end();
        }
        m.end();
        out.extend_from_slice(&m.finish());
        acks.push(next);
        next = next.wrapping_add(1);
    }
    out.extend_from_slice(
        &Msg::new(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            next,
            0,
            NFNL_SUBSYS_NFTABLES,
        )
        .finish(),
    );
    (out, acks)
}

/// The errno of every `NLMSG_ERROR` in `buf` by sequence number (0: acknowledged).
fn parse_acks(buf: &[u8]) -> Vec<(u32, i32)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 16 <= buf.len() {
        let word = |o: usize| u32::from_ne_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
        let len = word(at) as usize;
        if len < 16 || at + len > buf.len() {
            break;
        }
        let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
        let seq = word(at + 8);
        if kind == NLMSG_ERROR && len >= 20 {
            out.push((seq, word(at + 16) as i32));
        }
        at += (len + 3) & !3;
    }
    out
}

/// A netlink socket in a sandbox's network namespace that adds learnt addresses to its
/// egress table.
#[derive(Debug)]
pub struct SetWriter {
    sock: OwnedFd,
    seq: u32,
}

impl SetWriter {
    /// Opens the socket in the namespace `netns` (a short-lived thread enters it).
    pub fn open_in(netns: &Arc<OwnedFd>) -> io::Result<SetWriter> {
        let netns = Arc::clone(netns);
        let sock = std::thread::spawn(move || -> io::Result<OwnedFd> {
            // SAFETY: setns on a valid namespace fd affects only this short-lived thread.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            open_socket()
        })
        .join()
        .map_err(|_| io::Error::other("the netlink thread panicked"))??;
        Ok(SetWriter { sock, seq: 1 })
    }

    /// Adds `learnt` to the sets of the table `table` and waits for the kernel's answer.
    pub fn add(&mut self, table: &str, learnt: &[Learnt]) -> io::Result<()> {
        if learnt.is_empty() {
            return Ok(());
        }
        let (bytes, mut waiting) = batch(table, learnt, self.seq);
        self.seq = self.seq.wrapping_add(waiting.len() as u32 + 2);
        // SAFETY: `bytes` is a valid buffer of its length; the socket is ours.
        let n = unsafe { libc::send(self.sock.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 8192];
        while !waiting.is_empty() {
            // SAFETY: `buf` is a valid writable buffer of its length; the socket is ours.
            let n =
                unsafe { libc::recv(self.sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            for (seq, err) in parse_acks(&buf[..n as usize]) {
                if !waiting.contains(&seq) {
                    continue;
                }
                if err != 0 {
                    return Err(io::Error::from_raw_os_error(-err));
                }
                waiting.retain(|s| *s != seq);
            }
        }
        Ok(())
    }
}

/// A `NETLINK_NETFILTER` socket in the calling thread's namespace, with a receive timeout so
/// a kernel that never answers cannot hold the relay.
fn open_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before it is owned.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: SO_RCVTIMEO takes a struct timeval of the size given.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a zeroed sockaddr_nl is valid (family set below, port id 0: the kernel picks).
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: bind with a sockaddr_nl of the size given.
    let r = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            std::ptr::addr_of!(sa).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn learnt(set: &str, addr: &str, ttl: u32) -> Learnt {
        Learnt {
            set: set.into(),
            addr: addr.parse().unwrap(),
            ttl,
        }
    }

    #[test]
    fn the_batch_is_begin_one_message_per_set_and_end() {
        let (bytes, acks) = batch(
            "agentvm",
            &[
                learnt("dom4_0", "198.51.100.7", 300),
                learnt("dom6_0", "2001:db8::7", 60),
                learnt("dom4_0", "198.51.100.9", 5),
            ],
            40,
        );
        assert_eq!(acks, [41, 42]);
        // Walk the messages: types and sequence numbers.
        let mut at = 0;
        let mut seen = Vec::new();
        while at < bytes.len() {
            let len = u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes([bytes[at + 4], bytes[at + 5]]);
            let seq = u32::from_ne_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert!(len.is_multiple_of(4));
            seen.push((kind, seq, bytes[at + 16]));
            at += len;
        }
        assert_eq!(at, bytes.len());
        let newsetelem = (10 << 8) | 12;
        assert_eq!(
            seen,
            [
                (0x10, 40, 0),
                (newsetelem, 41, 5),
                (newsetelem, 42, 5),
                (0x11, 43, 0)
            ]
        );
        // The v4 set's message carries both addresses and their timeouts in ms.
        let hay = &bytes[..];
        let find = |needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"dom4_0\0") && find(b"dom6_0\0") && find(b"agentvm\0"));
        assert!(find(&[198, 51, 100, 7]) && find(&[198, 51, 100, 9]));
        assert!(find(&300_000u64.to_be_bytes()) && find(&5_000u64.to_be_bytes()));
    }

    #[test]
    fn acks_are_read_by_sequence_number() {
        let mut buf = Vec::new();
        for (seq, err) in [(7u32, 0i32), (8, -2)] {
            buf.extend_from_slice(&36u32.to_ne_bytes());
            buf.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            buf.extend_from_slice(&0u16.to_ne_bytes());
            buf.extend_from_slice(&seq.to_ne_bytes());
            buf.extend_from_slice(&0u32.to_ne_bytes());
            buf.extend_from_slice(&err.to_ne_bytes());
            buf.extend_from_slice(&[0u8; 16]);
        }
        assert_eq!(parse_acks(&buf), [(7, 0), (8, -2)]);
        assert_eq!(parse_acks(&buf[..20]), []);
    }
}
