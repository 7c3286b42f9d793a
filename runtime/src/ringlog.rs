//! Capped logs of what the guest and the VMM write: the serial console and QEMU's own
//! output reach the host through pipes, and a thread per pipe writes them to a file that
//! never grows past half its cap: when it would, it becomes `<file>.1` (replacing the older
//! half) and a new file starts. A guest flooding its console costs the host at most the cap
//! on disk (the state dir is on a tmpfs shared with containerd and dockerd) and nothing in
//! memory beyond one read buffer.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

/// The serial console's cap (both halves).
pub const CONSOLE_CAP: u64 = 4 << 20;
/// The cap of the VMM's own output.
pub const VMM_LOG_CAP: u64 = 512 << 10;

/// The older half of a capped log.
pub fn older(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

/// A writer that keeps `path` and its older half under `cap` bytes together.
#[derive(Debug)]
pub struct CappedFile {
    path: PathBuf,
    half: u64,
    file: File,
    written: u64,
}

impl CappedFile {
    pub fn create(path: &Path, cap: u64) -> std::io::Result<CappedFile> {
        Ok(CappedFile {
            path: path.to_path_buf(),
            half: (cap / 2).max(1),
            file: File::create(path)?,
            written: 0,
        })
    }

    /// Appends `buf`, rotating first when it would pass the half cap. A single write larger
    /// than the half cap keeps only its end.
    pub fn write(&mut self, mut buf: &[u8]) -> std::io::Result<()> {
        if buf.len() as u64 > self.half {
            buf = &buf[buf.len() - self.half as usize..];
        }
        if self.written + buf.len() as u64 > self.half {
            std::fs::rename(&self.path, older(&self.path))?;
            self.file = File::create(&self.path)?;
            self.written = 0;
        }
        self.file.write_all(buf)?;
        self.written += buf.len() as u64;
        Ok(())
    }
}

/// Copies everything from `pipe` into a capped `path` on a thread of its own, until the
/// writer closes the pipe (the VMM exited). The file exists when this returns.
pub fn spawn(pipe: OwnedFd, path: &Path, cap: u64) -> std::io::Result<()> {
    let mut out = CappedFile::create(path, cap)?;
    let name = format!(
        "log-{}",
        path.file_name().unwrap_or_default().to_string_lossy()
    );
    std::thread::Builder::new().name(name).spawn(move || {
        let mut pipe = File::from(pipe);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if let Err(e) = out.write(&buf[..n]) {
                        tracing::warn!("write {}: {e}", out.path.display());
                        // Keep draining: a full pipe would stall the VMM.
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    })?;
    Ok(())
}

/// The last `max` bytes of a capped log (both halves).
pub fn read_tail(path: &Path, max: u64) -> Vec<u8> {
    let mut out = tail_bytes(&older(path), max);
    out.extend(tail_bytes(path, max));
    if out.len() as u64 > max {
        out.drain(..out.len() - max as usize);
    }
    out
}

fn tail_bytes(path: &Path, max: u64) -> Vec<u8> {
    use std::io::{Seek, SeekFrom};
    let Ok(mut f) = File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > max && f.seek(SeekFrom::Start(len - max)).is_err() {
        return Vec::new();
    }
    let mut out = Vec::new();
    let _ = f.take(max).read_to_end(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_stays_under_the_cap_and_keeps_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console.log");
        let mut f = CappedFile::create(&p, 1000).unwrap();
        for i in 0..10_000 {
            f.write(format!("line {i}\n").as_bytes()).unwrap();
        }
        let total = std::fs::metadata(&p).unwrap().len()
            + std::fs::metadata(older(&p)).map(|m| m.len()).unwrap_or(0);
        assert!(total <= 1000, "{total}");
        let tail = String::from_utf8(read_tail(&p, 30)).unwrap();
        assert!(tail.ends_with("line 9999\n"), "{tail:?}");
        // One write larger than the cap keeps its end only.
        f.write(&[b'x'; 5000]).unwrap();
        assert!(std::fs::metadata(&p).unwrap().len() <= 500);
    }

    #[test]
    fn the_pipe_is_drained_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console.log");
        let (r, w) = nix::unistd::pipe().unwrap();
        spawn(r, &p, 64 << 10).unwrap();
        let mut w = File::from(w);
        let big = vec![b'a'; 1 << 20];
        w.write_all(&big).unwrap();
        w.write_all(b"\nthe end\n").unwrap();
        drop(w);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let t = read_tail(&p, 100);
            if t.ends_with(b"the end\n") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never drained");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let total = std::fs::metadata(&p).unwrap().len()
            + std::fs::metadata(older(&p)).map(|m| m.len()).unwrap_or(0);
        assert!(total <= 64 << 10);
    }
}
