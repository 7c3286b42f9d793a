//! A client of the CRI streaming server (containerd's copy of kubelet's): the URLs that the
//! CRI's `Exec`, `Attach` and `PortForward` return, spoken to over WebSocket with the channel
//! protocol `v4.channel.k8s.io`, as `kubectl exec/attach/port-forward` does through the API
//! server (kubelet's SPDY path carries the same streams).
//!
//! Every binary message starts with its channel's number. Exec and attach: 0 stdin, 1 stdout,
//! 2 stderr, 3 the end's status (a `metav1.Status` in JSON), 4 terminal size (JSON `Width`,
//! `Height`). Port-forward: channels `2n` (data) and `2n + 1` (errors) for the request's `n`-th
//! port, each starting with that port as two little-endian bytes. v4 has no half-close of
//! stdin (v5, which containerd 1.7 does not speak, added it): what a test sends on stdin must
//! not need an end of file.

use std::io::ErrorKind;
use std::net::TcpStream;
use std::time::Duration;

use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;
use tungstenite::{Message, WebSocket};

/// Channels of exec and attach.
pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const STATUS: u8 = 3;
pub const RESIZE: u8 = 4;

/// An open stream of the CRI streaming server.
pub struct Stream {
    ws: WebSocket<TcpStream>,
}

/// What an exec or attach sent until the server closed the stream.
#[derive(Debug, Default)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The `metav1.Status` of channel 3, if one came.
    pub status: Option<serde_json::Value>,
}

impl Output {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// The exit code the status reports: 0 for `Success`, the `ExitCode` cause of a
    /// `NonZeroExitCode` failure; `None` without a status or for another failure.
    pub fn exit_code(&self) -> Option<i32> {
        let s = self.status.as_ref()?;
        if s["status"] == "Success" {
            return Some(0);
        }
        if s["reason"] != "NonZeroExitCode" {
            return None;
        }
        s["details"]["causes"]
            .as_array()?
            .iter()
            .find(|c| c["reason"] == "ExitCode")?["message"]
            .as_str()?
            .parse()
            .ok()
    }
}

impl Stream {
    /// Opens the streaming URL (`http://host:port/exec/<token>` and the like) as a WebSocket
    /// speaking `v4.channel.k8s.io`; reads give up after `timeout` of silence.
    pub fn open(url: &str, timeout: Duration) -> Result<Stream, String> {
        let ws_url = url
            .strip_prefix("http://")
            .map(|rest| format!("ws://{rest}"))
            .ok_or_else(|| format!("not a plain http streaming URL: {url}"))?;
        let authority = ws_url["ws://".len()..]
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let mut req = ws_url
            .as_str()
            .into_client_request()
            .map_err(|e| format!("{url}: {e}"))?;
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static("v4.channel.k8s.io"),
        );
        req.headers_mut()
            .insert("Origin", HeaderValue::from_static("http://127.0.0.1"));
        let tcp = TcpStream::connect(&authority).map_err(|e| format!("{authority}: {e}"))?;
        tcp.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let (ws, _) = tungstenite::client::client(req, tcp).map_err(|e| format!("{url}: {e}"))?;
        Ok(Stream { ws })
    }

    /// Sends `data` on `channel`.
    pub fn send(&mut self, channel: u8, data: &[u8]) {
        let mut frame = Vec::with_capacity(data.len() + 1);
        frame.push(channel);
        frame.extend_from_slice(data);
        self.ws
            .send(Message::Binary(frame))
            .unwrap_or_else(|e| panic!("send on channel {channel}: {e}"));
    }

    /// Sends a terminal size on the resize channel.
    pub fn resize(&mut self, width: u16, height: u16) {
        let size = serde_json::json!({ "Width": width, "Height": height }).to_string();
        self.send(RESIZE, size.as_bytes());
    }

    /// The next message as (channel, data); `None` once the server closed the stream.
    /// Panics when nothing came within the stream's timeout.
    pub fn recv(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            match self.ws.read() {
                Ok(Message::Binary(b)) => {
                    if let Some((&channel, data)) = b.split_first() {
                        return Some((channel, data.to_vec()));
                    }
                }
                Ok(Message::Close(_)) => return None,
                Ok(_) => {}
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return None
                }
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    panic!("the streaming server sent nothing within the timeout")
                }
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof
                    ) =>
                {
                    return None
                }
                Err(tungstenite::Error::Protocol(
                    tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                )) => return None,
                Err(e) => panic!("streaming server: {e}"),
            }
        }
    }

    /// Reads exec or attach output until the server closes the stream.
    pub fn collect(mut self) -> Output {
        let mut out = Output::default();
        while let Some((channel, data)) = self.recv() {
            match channel {
                STDOUT => out.stdout.extend_from_slice(&data),
                STDERR => out.stderr.extend_from_slice(&data),
                STATUS if !data.is_empty() => {
                    out.status = Some(serde_json::from_slice(&data).unwrap_or_else(|e| {
                        panic!("status {:?}: {e}", String::from_utf8_lossy(&data))
                    }))
                }
                _ => {}
            }
        }
        out
    }

    /// Reads stdout until it holds `needle`; returns what was read.
    pub fn stdout_until(&mut self, needle: &str) -> String {
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains(needle) {
            match self.recv() {
                Some((STDOUT, data)) => seen.extend_from_slice(&data),
                Some((STATUS, data)) if !data.is_empty() => panic!(
                    "the stream ended with {} before {needle:?}; stdout: {:?}",
                    String::from_utf8_lossy(&data),
                    String::from_utf8_lossy(&seen)
                ),
                Some(_) => {}
                None => panic!(
                    "the stream closed before {needle:?}; stdout: {:?}",
                    String::from_utf8_lossy(&seen)
                ),
            }
        }
        String::from_utf8_lossy(&seen).into_owned()
    }

    /// Closes the stream from this side.
    pub fn close(mut self) {
        let _ = self.ws.close(None);
        let _ = self.ws.flush();
    }
}

/// Port-forward over a stream of a `PortForward` URL (one port: channels 0 and 1): sends
/// `request` on the data channel and returns (data received, errors received) once the server
/// closes the stream (the forward ends when the pod's side closes its connection).
pub fn forward_once(url: &str, port: u16, request: &[u8]) -> Result<(Vec<u8>, String), String> {
    let mut s = Stream::open(url, Duration::from_secs(60))?;
    let (mut data, mut errors) = (Vec::new(), Vec::new());
    // Each channel's first message is its port.
    let mut port_seen = [false; 2];
    let mut sent = false;
    while let Some((channel, bytes)) = s.recv() {
        let c = usize::from(channel);
        if c > 1 {
            continue;
        }
        let bytes = if !port_seen[c] {
            port_seen[c] = true;
            assert!(
                bytes.len() >= 2 && u16::from_le_bytes([bytes[0], bytes[1]]) == port,
                "channel {c} did not start with port {port}: {bytes:?}"
            );
            bytes[2..].to_vec()
        } else {
            bytes
        };
        match c {
            0 => data.extend_from_slice(&bytes),
            _ => errors.extend_from_slice(&bytes),
        }
        if port_seen == [true, true] && !sent {
            s.send(0, request);
            sent = true;
        }
    }
    Ok((data, String::from_utf8_lossy(&errors).into_owned()))
}
