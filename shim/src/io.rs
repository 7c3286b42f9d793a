//! The stdio fifos containerd hands the shim, turned into the runtime's [`ProcessIo`].
//!
//! stdout/stderr are opened read-write: the shim itself then always holds a reader, so the
//! workload never gets EPIPE when containerd (or dockerd) restarts (reference P9). stdin is
//! opened blocking in a helper thread: containerd opens its write end lazily, and a
//! non-blocking reader opened first would read EOF at once.

use std::path::Path;

use agentvm::container::ProcessIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;

/// Opens the stdio of a process. Empty paths are not connected.
pub async fn open(stdin: &str, stdout: &str, stderr: &str) -> std::io::Result<ProcessIo> {
    Ok(ProcessIo {
        stdin: if stdin.is_empty() {
            None
        } else {
            Some(open_stdin(stdin)?)
        },
        stdout: open_output(stdout).await?,
        stderr: open_output(stderr).await?,
    })
}

fn open_stdin(path: &str) -> std::io::Result<Box<dyn AsyncRead + Send + Unpin>> {
    let path = fifo_path(path)?.to_owned();
    let (reader, mut writer) = tokio::io::simplex(64 * 1024);
    tokio::spawn(async move {
        let opened = tokio::task::spawn_blocking(move || std::fs::File::open(&path)).await;
        let file = match opened {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                tracing::warn!("open stdin fifo: {e}");
                return;
            }
            Err(_) => return,
        };
        let rx = match pipe::Receiver::from_file(file) {
            Ok(rx) => rx,
            Err(e) => {
                tracing::warn!("stdin fifo: {e}");
                return;
            }
        };
        let mut rx = rx;
        let _ = tokio::io::copy(&mut rx, &mut writer).await;
        // The halves share one buffer: only a shutdown (not a drop) ends the process's stdin.
        let _ = writer.shutdown().await;
    });
    Ok(Box::new(reader))
}

async fn open_output(path: &str) -> std::io::Result<Option<Box<dyn AsyncWrite + Send + Unpin>>> {
    if path.is_empty() {
        return Ok(None);
    }
    let path = fifo_path(path)?;
    let meta = tokio::fs::metadata(path).await?;
    use std::os::unix::fs::FileTypeExt;
    if meta.file_type().is_fifo() {
        let tx = pipe::OpenOptions::new()
            .read_write(true)
            .open_sender(path)?;
        Ok(Some(Box::new(tx)))
    } else {
        let f = tokio::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .await?;
        Ok(Some(Box::new(f)))
    }
}

/// containerd passes plain paths, or `fifo://`/`file://` URIs; logging binaries
/// (`binary://`) are not supported yet.
fn fifo_path(p: &str) -> std::io::Result<&Path> {
    let plain = p
        .strip_prefix("fifo://")
        .or_else(|| p.strip_prefix("file://"))
        .unwrap_or(p);
    if plain.contains("://") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!("stdio {p:?}: only fifo and file paths are supported"),
        ));
    }
    Ok(Path::new(plain))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn uris_are_mapped() {
        assert_eq!(
            fifo_path("/run/x-stdout").unwrap(),
            Path::new("/run/x-stdout")
        );
        assert_eq!(fifo_path("fifo:///run/x").unwrap(), Path::new("/run/x"));
        assert_eq!(
            fifo_path("file:///var/log/x").unwrap(),
            Path::new("/var/log/x")
        );
        assert!(fifo_path("binary:///usr/bin/logger?a=b").is_err());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn fifos_carry_data_and_stdin_waits_for_its_writer() {
        let dir = tempfile::tempdir().unwrap();
        let mk = |n: &str| {
            let p = dir.path().join(n);
            nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
            p.to_str().unwrap().to_string()
        };
        let (i, o) = (mk("stdin"), mk("stdout"));
        let mut io = open(&i, &o, "").await.unwrap();
        assert!(io.stderr.is_none());
        // The "client" side opens late, after the shim.
        let mut client_out = pipe::OpenOptions::new().open_receiver(&o).unwrap();
        io.stdout.as_mut().unwrap().write_all(b"out").await.unwrap();
        let mut buf = [0u8; 3];
        client_out.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"out");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let mut client_in = pipe::OpenOptions::new().open_sender(&i).unwrap();
        client_in.write_all(b"in").await.unwrap();
        drop(client_in);
        let mut got = Vec::new();
        io.stdin
            .as_mut()
            .unwrap()
            .read_to_end(&mut got)
            .await
            .unwrap();
        assert_eq!(got, b"in");
    }
}
