//! The server's stdio: newline-delimited JSON-RPC messages, as MCP's stdio transport defines.
//!
//! rmcp drops input that is not JSON at all without a word (to avoid error storms between two
//! peers that both answer garbage). A client that sends a malformed line should learn why it
//! gets no answer, so this layer answers each such line with JSON-RPC's parse error (-32700,
//! `id: null`) and passes every well-formed line on; rmcp answers the rest (well-formed JSON
//! that is not a valid request gets -32600). The session goes on in both cases.

use tokio::io::DuplexStream;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

/// Longest message accepted, bytes (a 1 MiB file in base64 fits easily).
pub const MAX_LINE: u64 = 16 << 20;

/// The JSON-RPC response to a line that is not JSON.
pub fn parse_error(why: &str) -> Vec<u8> {
    let v = serde_json::json!({
        "jsonrpc": "2.0",
        "id": null,
        "error": { "code": -32700, "message": format!("Parse error: {why}") }
    });
    let mut line = serde_json::to_vec(&v).unwrap_or_default();
    line.push(b'\n');
    line
}

/// What to do with one input line.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// Blank: skip.
    Skip,
    /// Well-formed JSON: to rmcp.
    Pass,
    /// Not JSON: this response to the client.
    Answer(Vec<u8>),
}

/// Classifies one line (without its newline).
pub fn classify(line: &[u8]) -> Line {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Line::Skip;
    }
    match serde_json::from_slice::<serde::de::IgnoredAny>(line) {
        Ok(_) => Line::Pass,
        Err(e) => Line::Answer(parse_error(&e.to_string())),
    }
}

/// Puts the filter between `input`/`output` and rmcp: returns the streams rmcp reads from and
/// writes to. rmcp sees end of input when `input` ends.
pub fn filtered<R, W>(input: R, mut output: W) -> (DuplexStream, DuplexStream)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (rmcp_in, mut feed) = tokio::io::duplex(1 << 20);
    let (rmcp_out, drain) = tokio::io::duplex(1 << 20);
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(64);
    // One writer, whole lines only: rmcp's messages and the parse errors never interleave.
    tokio::spawn(async move {
        while let Some(line) = rx.recv().await {
            if output.write_all(&line).await.is_err() || output.flush().await.is_err() {
                break;
            }
        }
    });
    let to_client = tx.clone();
    tokio::spawn(async move {
        let mut r = BufReader::new(drain);
        loop {
            let mut line = Vec::new();
            match r.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if to_client.send(line).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    tokio::spawn(async move {
        let mut r = BufReader::new(input);
        loop {
            let mut line = Vec::new();
            match (&mut r)
                .take(MAX_LINE + 1)
                .read_until(b'\n', &mut line)
                .await
            {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if line.len() as u64 > MAX_LINE && line.last() != Some(&b'\n') {
                // Skip the rest of the oversized line, then answer it.
                let mut rest = Vec::new();
                loop {
                    rest.clear();
                    match (&mut r).take(1 << 20).read_until(b'\n', &mut rest).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) if rest.last() == Some(&b'\n') => break,
                        Ok(_) => {}
                    }
                }
                let why = format!("message longer than {MAX_LINE} bytes");
                if tx.send(parse_error(&why)).await.is_err() {
                    break;
                }
                continue;
            }
            let body = line.strip_suffix(b"\n").unwrap_or(&line);
            match classify(body) {
                Line::Skip => {}
                Line::Answer(a) => {
                    if tx.send(a).await.is_err() {
                        break;
                    }
                }
                Line::Pass => {
                    let mut msg = body.to_vec();
                    msg.push(b'\n');
                    if feed.write_all(&msg).await.is_err() {
                        break;
                    }
                }
            }
        }
        // Dropping `feed` ends rmcp's input: the session is over.
    });
    (rmcp_in, rmcp_out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_classified() {
        assert_eq!(classify(b"  \r"), Line::Skip);
        assert_eq!(
            classify(br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#),
            Line::Pass
        );
        // Well-formed JSON of the wrong shape is rmcp's to answer (-32600).
        assert_eq!(classify(b"[1,2]"), Line::Pass);
        let Line::Answer(a) = classify(b"{not json") else {
            panic!("garbage passed")
        };
        let v: serde_json::Value = serde_json::from_slice(&a).unwrap();
        assert_eq!(v["error"]["code"], -32700);
        assert_eq!(v["id"], serde_json::Value::Null);
        assert_eq!(*a.last().unwrap(), b'\n');
    }

    #[tokio::test]
    async fn garbage_is_answered_and_json_passed_on() {
        let (mut client, server_in) = tokio::io::duplex(1 << 16);
        let (server_out, mut client_out) = tokio::io::duplex(1 << 16);
        let (mut rmcp_in, _rmcp_out) = filtered(server_in, server_out);
        client
            .write_all(b"garbage\n\n{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}\n")
            .await
            .unwrap();
        drop(client);
        let mut passed = String::new();
        rmcp_in.read_to_string(&mut passed).await.unwrap();
        assert_eq!(
            passed,
            "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}\n"
        );
        let mut answer = vec![0u8; 4096];
        let n = client_out.read(&mut answer).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&answer[..n]).unwrap();
        assert_eq!(v["error"]["code"], -32700);
    }
}
