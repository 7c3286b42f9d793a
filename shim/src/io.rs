//! The stdio fifos containerd hands the shim, turned into the runtime's [`ProcessIo`].
//!
//! stdout/stderr are opened read-write: the shim itself then always holds a reader, so the
//! workload never gets EPIPE when containerd (or dockerd) restarts (reference P9).
//!
//! stdin is opened `O_RDONLY|O_NONBLOCK` (never blocks) and ends, after everything written to
//! it was read, when no client holds its write end any more or when `CloseIO` asks
//! ([`StdinClose`]). Clients (containerd's `cio`: ctr, dockerd, the CRI plugin) start opening
//! the write end before they ask for the process, so a fifo without a writer when the shim
//! opens it had one that is gone: `ctr task exec` with a stdin already at EOF closes its end
//! before the shim's Start, and never sends `CloseIO`. A blocking open would wait for a writer
//! forever; here such a stdin ends at once (after [`WRITER_GRACE`], for a client slower to open
//! than those). `ctr` sends `CloseIO` after its last write and before it closes its end: the
//! data already in the fifo is still read before the process's stdin ends.

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::time::Duration;

use agentvm::container::ProcessIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::net::unix::pipe;
use tokio::sync::watch;

/// How long a stdin fifo without a writer is given for one to appear before it counts as ended.
pub const WRITER_GRACE: Duration = Duration::from_millis(300);

/// The `CloseIO(stdin)` of one process: valid before its stdin is opened (then it ends as soon
/// as it is open and drained).
#[derive(Clone)]
pub struct StdinClose(watch::Sender<bool>);

impl Default for StdinClose {
    fn default() -> Self {
        StdinClose(watch::channel(false).0)
    }
}

impl StdinClose {
    /// Ends the stdin once what clients already wrote to the fifo has been read.
    pub fn close(&self) {
        self.0.send_replace(true);
    }
}

/// Opens the stdio of a process. Empty paths are not connected.
pub async fn open(
    stdin: &str,
    stdout: &str,
    stderr: &str,
    close: &StdinClose,
) -> std::io::Result<ProcessIo> {
    Ok(ProcessIo {
        stdin: if stdin.is_empty() {
            None
        } else {
            Some(open_stdin(stdin, close.0.subscribe())?)
        },
        stdout: open_output(stdout).await?,
        stderr: open_output(stderr).await?,
    })
}

fn open_stdin(
    path: &str,
    close: watch::Receiver<bool>,
) -> std::io::Result<Box<dyn AsyncRead + Send + Unpin>> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo_path(path)?)?;
    let (reader, writer) = tokio::io::simplex(64 * 1024);
    tokio::spawn(async move {
        let mut writer = writer;
        if let Err(e) = pump_stdin(file, &mut writer, close).await {
            tracing::warn!("stdin fifo: {e}");
        }
        // The halves share one buffer: only a shutdown (not a drop) ends the process's stdin.
        let _ = writer.shutdown().await;
    });
    Ok(Box::new(reader))
}

type StdinSink = WriteHalf<tokio::io::SimplexStream>;

/// One non-blocking read of the fifo: `Some(n)` bytes (0: no writer), `None` if a writer
/// holds it but nothing is there. Read directly, not through tokio's readiness, which a fifo
/// that never had a writer does not report.
fn read_now(fd: RawFd, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
    loop {
        match nix::unistd::read(fd, buf) {
            Ok(n) => return Ok(Some(n)),
            Err(nix::errno::Errno::EAGAIN) => return Ok(None),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Copies what is in the fifo now, until it is empty or has no writer.
async fn drain(fd: RawFd, buf: &mut [u8], out: &mut StdinSink) -> std::io::Result<()> {
    while let Some(n) = read_now(fd, buf)? {
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).await?;
    }
    Ok(())
}

async fn pump_stdin(
    file: std::fs::File,
    out: &mut StdinSink,
    mut close: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    let mut buf = vec![0u8; 32 * 1024];
    // Until a writer is seen: a fifo without one had a client that is gone (or is very late).
    let deadline = tokio::time::Instant::now() + WRITER_GRACE;
    loop {
        match read_now(fd, &mut buf)? {
            None => break,
            Some(0) if *close.borrow() || tokio::time::Instant::now() >= deadline => {
                return Ok(());
            }
            Some(0) => tokio::time::sleep(Duration::from_millis(10)).await,
            Some(n) => {
                out.write_all(&buf[..n]).await?;
                break;
            }
        }
    }
    if *close.borrow() {
        return drain(fd, &mut buf, out).await;
    }
    let mut rx = pipe::Receiver::from_file(file)?;
    loop {
        tokio::select! {
            biased;
            n = rx.read(&mut buf) => match n? {
                0 => return Ok(()),
                n => out.write_all(&buf[..n]).await?,
            },
            () = async { drop(close.wait_for(|c| *c).await) } => {
                // What the client wrote before it asked is in the fifo: read it first (`fd`
                // is `rx`'s, open until this returns).
                return drain(fd, &mut buf, out).await;
            }
        }
    }
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
        let mut io = open(&i, &o, "", &StdinClose::default()).await.unwrap();
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

    fn fifo(dir: &Path, name: &str) -> String {
        let p = dir.join(name);
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        p.to_str().unwrap().to_string()
    }

    async fn read_all_bounded(io: &mut ProcessIo) -> Vec<u8> {
        let mut got = Vec::new();
        let stdin = io.stdin.as_mut().unwrap();
        tokio::time::timeout(Duration::from_secs(5), stdin.read_to_end(&mut got))
            .await
            .expect("stdin did not end")
            .unwrap();
        got
    }

    /// `ctr task exec </dev/null`: the client opened and closed its end before the shim's
    /// Start, and sends no CloseIO. The stdin ends (after the grace), it is not waited on.
    #[tokio::test(flavor = "current_thread")]
    async fn a_stdin_whose_writer_is_gone_ends() {
        let dir = tempfile::tempdir().unwrap();
        let i = fifo(dir.path(), "stdin");
        // A writer that came and went (opening it needs a reader: one held meanwhile).
        let keep = pipe::OpenOptions::new().open_receiver(&i).unwrap();
        drop(pipe::OpenOptions::new().open_sender(&i).unwrap());
        drop(keep);
        let t = std::time::Instant::now();
        let mut io = open(&i, "", "", &StdinClose::default()).await.unwrap();
        assert_eq!(read_all_bounded(&mut io).await, b"");
        assert!(t.elapsed() >= WRITER_GRACE, "{:?}", t.elapsed());
    }

    /// `printf 'a\nb\n' | ctr task exec`: ctr writes, asks CloseIO, then closes its end. The
    /// data comes before the end of stdin.
    #[tokio::test(flavor = "current_thread")]
    async fn close_io_ends_stdin_after_the_data_already_written() {
        let dir = tempfile::tempdir().unwrap();
        let i = fifo(dir.path(), "stdin");
        let close = StdinClose::default();
        let mut io = open(&i, "", "", &close).await.unwrap();
        let mut client = pipe::OpenOptions::new().open_sender(&i).unwrap();
        client.write_all(b"a\nb\n").await.unwrap();
        close.close();
        // The client's end is still open: only CloseIO can end the stdin here.
        assert_eq!(read_all_bounded(&mut io).await, b"a\nb\n");
        drop(client);
    }

    /// CloseIO before Start (the fifo not open yet) is kept: the stdin ends once what was
    /// written is read, though the client still holds its end.
    #[tokio::test(flavor = "current_thread")]
    async fn close_io_before_the_open_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let i = fifo(dir.path(), "stdin");
        let close = StdinClose::default();
        close.close();
        let keep = pipe::OpenOptions::new()
            .read_write(true)
            .open_receiver(&i)
            .unwrap();
        let mut client = pipe::OpenOptions::new().open_sender(&i).unwrap();
        client.write_all(b"x").await.unwrap();
        let mut io = open(&i, "", "", &close).await.unwrap();
        drop(keep);
        assert_eq!(read_all_bounded(&mut io).await, b"x");
        drop(client);
    }
}
