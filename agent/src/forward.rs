//! The guest end of a port-forward connection ([`Message::Connect`]): a TCP connection to a
//! port on the guest's loopback, its bytes relayed over the host connection. This is how the
//! CRI's PortForward (`kubectl port-forward`) reaches `localhost:PORT` in a pod whose network
//! stack is the VM's: services that listen on the pod's loopback only are reached too, as
//! under runc.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use agentvm_protocol::{Frame, Message, ProtocolError, Stream, MAX_DATA_CHUNK};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::debug;

/// Connects to `port` on the loopback, IPv4 first (as containerd's CRI dials
/// `localhost:PORT`), then IPv6.
pub async fn connect(port: u16) -> std::io::Result<TcpStream> {
    match TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await {
        Ok(s) => Ok(s),
        Err(v4) => TcpStream::connect(SocketAddr::from((Ipv6Addr::LOCALHOST, port)))
            .await
            .map_err(|_| v4),
    }
}

/// Relays `tcp` and the host connection until both directions have ended or the host is
/// gone. `out` carries frames to the host, `host` the host's frames.
pub async fn relay(
    tcp: TcpStream,
    out: &mpsc::Sender<Frame>,
    host: &mut mpsc::Receiver<Result<Frame, ProtocolError>>,
) {
    let (mut rd, mut wr) = tcp.into_split();
    let mut buf = vec![0u8; MAX_DATA_CHUNK];
    let (mut reading, mut writing) = (true, true);
    while reading || writing {
        tokio::select! {
            r = rd.read(&mut buf), if reading => {
                let chunk = match r {
                    Ok(n) => buf[..n].to_vec(),
                    Err(e) => {
                        debug!("port-forward read: {e}");
                        Vec::new()
                    }
                };
                reading = !chunk.is_empty();
                if out.send(Frame::Data(Stream::Stdout, chunk)).await.is_err() {
                    return;
                }
            }
            f = host.recv(), if writing => match f {
                Some(Ok(Frame::Data(Stream::Stdin, data))) if !data.is_empty() => {
                    if let Err(e) = wr.write_all(&data).await {
                        debug!("port-forward write: {e}");
                        writing = false;
                    }
                }
                Some(Ok(Frame::Data(Stream::Stdin, _))) => {
                    let _ = wr.shutdown().await;
                    writing = false;
                }
                Some(Ok(other)) => debug!("port-forward: ignoring {other:?}"),
                // The host is gone: so is the forward.
                Some(Err(_)) | None => return,
            },
        }
    }
}

/// Serves a [`Message::Connect`]: `Ready` and the relay, or an error when nothing accepts.
pub async fn serve(
    port: u16,
    out: &mpsc::Sender<Frame>,
    host: &mut mpsc::Receiver<Result<Frame, ProtocolError>>,
) {
    match connect(port).await {
        Ok(tcp) => {
            let _ = out.send(Frame::Msg(Message::Ready)).await;
            relay(tcp, out, host).await;
        }
        Err(e) => {
            let _ = out
                .send(Frame::Msg(Message::Error {
                    message: format!("connect to localhost:{port} in the pod: {e}"),
                    exit_code: None,
                }))
                .await;
        }
    }
}
