//! Port-forward of a pod sandbox: `localhost:PORT` in the pod's network namespace on the host
//! reaches `localhost:PORT` in its VM.
//!
//! containerd's CRI implements PortForward (`kubectl port-forward`) by entering the pod's
//! network namespace on the host and dialing `localhost:PORT` there. Under runc that is the
//! pod's own loopback; here the pod's processes run in the VM, whose loopback the namespace
//! cannot reach (and the pod IP, held by both the veth and the guest's eth0, is local to the
//! namespace, so even a DNAT to it would stay on the host). So the namespace gets a relay:
//!
//! - an nftables `nat output` rule ([`RULES`]) redirects every TCP connection to 127.0.0.1
//!   made inside the namespace to one listener, [`RELAY_PORT`] on 127.0.0.1, which the shim
//!   holds in the namespace;
//! - for each connection accepted there, the original port (`SO_ORIGINAL_DST`) is asked of
//!   the agent over a new vsock connection ([`Message::Connect`]), which connects to it on
//!   the guest's loopback (127.0.0.1, else ::1) and relays the bytes;
//! - when nothing listens in the guest, the accepted connection is reset, so the CRI's forward
//!   ends with an error as it does under runc (there the connect itself is refused).
//!
//! Nothing else in a pod's namespace dials its loopback (the namespace holds the holder, QEMU
//! and the VM's helpers only), so the redirect changes nothing else. Only pod sandboxes get it:
//! Docker's `127.0.0.11` DNS lives on a namespace's loopback too.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use agentvm_protocol::{tokio_io, Frame, Message, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::error::{Error, Result};
use crate::guest::{self, Dialer, CONNECT_TIMEOUT};
use crate::sandbox::spawn_frame_reader;

/// The relay's port on the namespace's 127.0.0.1. A forward to this very port still reaches
/// the guest's: a connection that was not redirected is relayed to the port it came to.
pub const RELAY_PORT: u16 = 65535;

/// The nftables table of the redirect (family `ip`), loaded into the pod's namespace.
pub const TABLE: &str = "agentvm_portforward";

/// The rules that send the namespace's loopback connections to the relay.
pub fn rules() -> String {
    format!(
        "table ip {TABLE} {{\n\
         \tchain output {{\n\
         \t\ttype nat hook output priority -100; policy accept;\n\
         \t\tip daddr 127.0.0.1 tcp dport != {RELAY_PORT} redirect to :{RELAY_PORT}\n\
         \t}}\n\
         }}\n"
    )
}

/// Loads the redirect into the namespace `netns` and starts the relay on `listener` (made in
/// that namespace: [`crate::netns::Netns::tcp_listener`]). The task runs until aborted (the
/// namespace's end: its sockets hold the namespace); the connections it relays end with it.
pub async fn start(
    netns: &Arc<OwnedFd>,
    nft: &Path,
    listener: std::net::TcpListener,
    dialer: Arc<dyn Dialer>,
) -> Result<JoinHandle<()>> {
    crate::netns::nft_in(netns, nft, rules()).await?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::Invalid(format!("port-forward relay: {e}")))?;
    let listener = TcpListener::from_std(listener)
        .map_err(|e| Error::Invalid(format!("port-forward relay: {e}")))?;
    Ok(tokio::spawn(accept_loop(listener, dialer)))
}

async fn accept_loop(listener: TcpListener, dialer: Arc<dyn Dialer>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    let dialer = Arc::clone(&dialer);
                    conns.spawn(async move {
                        let port = original_port(&tcp).unwrap_or(RELAY_PORT);
                        if let Err(e) = forward(tcp, port, dialer.as_ref()).await {
                            tracing::info!("port-forward to the pod's port {port}: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::debug!("port-forward relay: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// The port a redirected connection was made to (its conntrack entry's original
/// destination); `None` for a connection made to the relay's port itself.
fn original_port(tcp: &TcpStream) -> Option<u16> {
    // SAFETY: sockaddr_in is plain data, valid when zeroed.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: the fd is the live socket `tcp` owns; `addr` and `len` are valid for writes of
    // the size given, which is what the kernel writes at most.
    let r = unsafe {
        libc::getsockopt(
            tcp.as_raw_fd(),
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    (r == 0).then(|| u16::from_be(addr.sin_port))
}

/// Makes `tcp`'s close a reset: the peer's read fails instead of seeing a clean end.
fn reset(tcp: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the fd is the live socket `tcp` owns; `linger` is valid for reads of its size.
    unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(tcp);
}

/// Relays one accepted connection to `port` on the guest's loopback.
async fn forward(tcp: TcpStream, port: u16, dialer: &dyn Dialer) -> Result<()> {
    let mut conn = match guest::open(dialer, CONNECT_TIMEOUT).await {
        Ok(c) => c,
        Err(e) => {
            reset(tcp);
            return Err(e);
        }
    };
    conn.send(&Frame::Msg(Message::Connect { port })).await?;
    let answer = tokio::time::timeout(CONNECT_TIMEOUT, conn.recv()).await;
    match answer {
        Ok(Ok(Some(Frame::Msg(Message::Ready)))) => {}
        Ok(Ok(Some(Frame::Msg(Message::Error { message, .. })))) => {
            reset(tcp);
            return Err(Error::Agent(guest::text(&message)));
        }
        Ok(other) => {
            reset(tcp);
            return Err(Error::Agent(format!(
                "expected Ready, got {}",
                guest::describe_recv(&other)
            )));
        }
        Err(_) => {
            reset(tcp);
            return Err(Error::Agent("the agent did not answer".into()));
        }
    }
    let crate::sandbox::AgentConn { reader, mut writer } = conn;
    let (mut frames, reader_task) = spawn_frame_reader(reader);
    let (mut rd, mut wr) = tcp.into_split();
    let mut buf = vec![0u8; agentvm_protocol::MAX_DATA_CHUNK];
    let (mut reading, mut writing) = (true, true);
    while reading || writing {
        tokio::select! {
            r = rd.read(&mut buf), if reading => {
                let chunk = r.map(|n| buf[..n].to_vec()).unwrap_or_default();
                reading = !chunk.is_empty();
                if tokio_io::write_frame(&mut writer, &Frame::Data(Stream::Stdin, chunk))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            f = frames.recv(), if writing => match f {
                Some(Ok(Some(Frame::Data(Stream::Stdout, data)))) if !data.is_empty() => {
                    if wr.write_all(&data).await.is_err() {
                        writing = false;
                    }
                }
                Some(Ok(Some(Frame::Data(Stream::Stdout, _)))) => {
                    let _ = wr.shutdown().await;
                    writing = false;
                }
                Some(Ok(Some(other))) => {
                    tracing::debug!("port-forward: ignoring {}", guest::describe(&other));
                }
                // The agent's end (the VM's, or the guest connection's): so ends the forward.
                _ => break,
            },
        }
    }
    reader_task.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_redirect_the_loopback_but_the_relay_port() {
        let r = rules();
        assert!(r.contains("type nat hook output priority -100"), "{r}");
        assert!(
            r.contains("ip daddr 127.0.0.1 tcp dport != 65535 redirect to :65535"),
            "{r}"
        );
    }
}
