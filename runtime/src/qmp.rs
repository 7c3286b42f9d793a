//! A minimal QMP (QEMU Machine Protocol) client: one connection per command, enough to pause
//! and resume a VM (`docker pause` freezes every vCPU, like the cgroup freezer freezes runc's
//! processes).

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::error::{Error, Result};

/// How long QEMU may take to answer.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Runs one QMP command (`stop`, `cont`, `query-status`) and returns its `return` value.
pub async fn execute(socket: &Path, command: &str) -> Result<Value> {
    tokio::time::timeout(TIMEOUT, execute_inner(socket, command))
        .await
        .map_err(|_| Error::Agent(format!("QMP {command}: QEMU did not answer")))?
}

async fn execute_inner(socket: &Path, command: &str) -> Result<Value> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| Error::io("connect to QMP socket", socket, e))?;
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    // Greeting, then capabilities negotiation, then the command.
    read_reply(&mut lines, "greeting", true).await?;
    for cmd in ["qmp_capabilities", command] {
        let mut req = json!({ "execute": cmd }).to_string();
        req.push('\n');
        w.write_all(req.as_bytes())
            .await
            .map_err(|e| Error::io("write QMP", socket, e))?;
        let v = read_reply(&mut lines, cmd, false).await?;
        if cmd == command {
            return Ok(v);
        }
    }
    unreachable!("the loop returns on the command's reply")
}

/// Reads lines until a reply (`return`/`error`, or the `QMP` greeting), skipping events.
async fn read_reply<R: tokio::io::AsyncBufRead + Unpin>(
    lines: &mut tokio::io::Lines<R>,
    what: &str,
    greeting: bool,
) -> Result<Value> {
    loop {
        let line = lines
            .next_line()
            .await
            .map_err(|e| Error::Agent(format!("QMP {what}: {e}")))?
            .ok_or_else(|| Error::Agent(format!("QMP {what}: QEMU closed the connection")))?;
        let v: Value = serde_json::from_str(&line)
            .map_err(|e| Error::Agent(format!("QMP {what}: bad reply {line:?}: {e}")))?;
        if greeting && v.get("QMP").is_some() {
            return Ok(v);
        }
        if let Some(r) = v.get("return") {
            return Ok(r.clone());
        }
        if let Some(e) = v.get("error") {
            return Err(Error::Agent(format!("QMP {what}: {e}")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A fake QEMU: greets, acknowledges capabilities, emits an event, then answers.
    #[tokio::test]
    async fn command_reply_skips_events_and_reports_errors() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            for reply in [
                r#"{"return": {"status": "paused", "running": false}}"#,
                r#"{"error": {"class": "GenericError", "desc": "nope"}}"#,
            ] {
                let (s, _) = listener.accept().await.unwrap();
                let (r, mut w) = s.into_split();
                let mut lines = BufReader::new(r).lines();
                w.write_all(b"{\"QMP\": {\"version\": {}}}\n")
                    .await
                    .unwrap();
                assert!(lines
                    .next_line()
                    .await
                    .unwrap()
                    .unwrap()
                    .contains("qmp_capabilities"));
                w.write_all(b"{\"return\": {}}\n").await.unwrap();
                lines.next_line().await.unwrap().unwrap();
                w.write_all(b"{\"event\": \"STOP\"}\n").await.unwrap();
                w.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
            }
        });
        let v = execute(&sock, "query-status").await.unwrap();
        assert_eq!(v["status"], "paused");
        let e = execute(&sock, "stop").await.unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
        server.await.unwrap();
        let e = execute(&dir.path().join("missing"), "stop")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("QMP socket"), "{e}");
    }
}
