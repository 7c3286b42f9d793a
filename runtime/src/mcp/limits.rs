//! The limits of the MCP tools and the pure checks behind them: guest paths, environment,
//! sizes, timeouts, and the buffers that cap a process's output.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use super::{McpError, ToolResult};

/// Default cap of each of stdout and stderr returned by `exec` and kept by `exec_output`.
pub const DEFAULT_OUTPUT_BYTES: usize = 64 * 1024;
/// Largest cap a caller may ask for.
pub const MAX_OUTPUT_BYTES: usize = 1 << 20;
/// Largest file `file_read` returns and `file_write` writes.
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// Most entries `file_list` returns.
pub const MAX_LIST_ENTRIES: usize = 1000;
/// `exec`'s timeout unless given.
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 60;
/// Longest timeout `exec` accepts (exec_start has none).
pub const MAX_TIMEOUT_SECONDS: u64 = 3600;
/// Longest `exec_output` waits for more output or the exit.
pub const MAX_WAIT_SECONDS: u64 = 30;
/// Guest memory bounds, MiB.
pub const MEMORY_MIB: std::ops::RangeInclusive<u32> = 64..=65536;
/// vCPU bounds.
pub const VCPUS: std::ops::RangeInclusive<u32> = 1..=64;
/// Most sandboxes one session runs at once.
pub const MAX_SANDBOXES: usize = 16;
/// Most running exec_start processes per sandbox.
pub const MAX_EXECS: usize = 64;
/// Longest stdin `exec` takes, bytes.
pub const MAX_STDIN_BYTES: usize = 1 << 20;
/// How much of the init process's output `logs` keeps (the last bytes).
pub const LOG_TAIL_BYTES: usize = 256 * 1024;

/// Resolves `path` inside the sandbox: an absolute path as it is, a relative one from `cwd`
/// (itself absolute); `.` and `..` are applied lexically, and a `..` that would climb above
/// `/` is refused rather than clamped, so a caller never acts on a path other than the one it
/// meant. The result is absolute and normalized.
pub fn resolve_path(path: &str, cwd: &str) -> ToolResult<String> {
    if path.is_empty() {
        return Err(McpError::InvalidArgument("path is empty".into()));
    }
    if path.contains('\0') {
        return Err(McpError::InvalidArgument("path contains a NUL byte".into()));
    }
    let joined = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{cwd}/{path}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for c in joined.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(McpError::PathOutside(path.to_string()));
                }
            }
            c => parts.push(c),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

/// Checks an environment given as a map and renders it as `KEY=VALUE` entries.
pub fn env_entries(env: &BTreeMap<String, String>) -> ToolResult<Vec<String>> {
    env.iter()
        .map(|(k, v)| {
            let bad_key = k.is_empty()
                || k.contains('=')
                || k.contains('\0')
                || k.starts_with(|c: char| c.is_ascii_digit());
            if bad_key {
                return Err(McpError::InvalidArgument(format!(
                    "environment variable name {k:?} is invalid: use letters, digits and `_`, \
                     not starting with a digit"
                )));
            }
            if v.contains('\0') {
                return Err(McpError::InvalidArgument(format!(
                    "environment variable {k} contains a NUL byte"
                )));
            }
            Ok(format!("{k}={v}"))
        })
        .collect()
}

/// `base` with `extra` applied on top (same key: `extra` wins), as `docker exec -e` does.
pub fn merge_env(base: &[String], extra: &[String]) -> Vec<String> {
    let key = |e: &str| e.split('=').next().unwrap_or_default().to_string();
    let mut out: Vec<String> = base.to_vec();
    for e in extra {
        let k = key(e);
        out.retain(|x| key(x) != k);
        out.push(e.clone());
    }
    out
}

/// The command of an exec: exactly one of an argv or a shell string.
pub fn command(argv: Option<Vec<String>>, shell: Option<String>) -> ToolResult<Vec<String>> {
    match (argv, shell) {
        (Some(_), Some(_)) => Err(McpError::InvalidArgument(
            "give either argv or shell, not both".into(),
        )),
        (None, None) => Err(McpError::InvalidArgument(
            "give the command: argv (a list, run as is) or shell (a string run by /bin/sh -c)"
                .into(),
        )),
        (Some(argv), None) => {
            if argv.is_empty() || argv[0].is_empty() {
                return Err(McpError::InvalidArgument(
                    "argv is empty: its first element is the program".into(),
                ));
            }
            if argv.iter().any(|a| a.contains('\0')) {
                return Err(McpError::InvalidArgument("argv contains a NUL byte".into()));
            }
            Ok(argv)
        }
        (None, Some(shell)) => {
            if shell.trim().is_empty() {
                return Err(McpError::InvalidArgument("shell is empty".into()));
            }
            if shell.contains('\0') {
                return Err(McpError::InvalidArgument(
                    "shell contains a NUL byte".into(),
                ));
            }
            Ok(vec!["/bin/sh".into(), "-c".into(), shell])
        }
    }
}

/// A timeout in seconds within `1..=max`, or `default`.
pub fn seconds(given: Option<u64>, default: u64, max: u64, what: &str) -> ToolResult<u64> {
    match given {
        None => Ok(default),
        Some(s) if (1..=max).contains(&s) => Ok(s),
        Some(s) => Err(McpError::InvalidArgument(format!(
            "{what} {s} is out of range: give 1 to {max} seconds"
        ))),
    }
}

/// An output cap within `1..=MAX_OUTPUT_BYTES`, or the default.
pub fn output_cap(given: Option<usize>) -> ToolResult<usize> {
    match given {
        None => Ok(DEFAULT_OUTPUT_BYTES),
        Some(n) if (1..=MAX_OUTPUT_BYTES).contains(&n) => Ok(n),
        Some(n) => Err(McpError::InvalidArgument(format!(
            "max_output_bytes {n} is out of range: give 1 to {MAX_OUTPUT_BYTES}"
        ))),
    }
}

/// Checks a number against its bounds.
pub fn within(
    value: Option<u32>,
    default: u32,
    range: std::ops::RangeInclusive<u32>,
    what: &str,
) -> ToolResult<u32> {
    let v = value.unwrap_or(default);
    if range.contains(&v) {
        Ok(v)
    } else {
        Err(McpError::InvalidArgument(format!(
            "{what} {v} is out of range: give {} to {}",
            range.start(),
            range.end()
        )))
    }
}

/// Output of a process: the first `cap` bytes are kept, the rest only counted. `take` hands
/// over what was kept so far and makes room for more (exec_output's "since the last call").
#[derive(Debug, Default)]
pub struct Capture {
    kept: Vec<u8>,
    cap: usize,
    /// Bytes dropped since the last take because the buffer was full.
    dropped: u64,
    /// Bytes seen in all.
    total: u64,
}

impl Capture {
    pub fn new(cap: usize) -> Capture {
        Capture {
            cap,
            ..Default::default()
        }
    }

    pub fn push(&mut self, b: &[u8]) {
        self.total += b.len() as u64;
        let room = self.cap.saturating_sub(self.kept.len());
        let n = room.min(b.len());
        self.kept.extend_from_slice(&b[..n]);
        self.dropped += (b.len() - n) as u64;
    }

    /// What was kept since the last take and how many bytes were dropped meanwhile.
    pub fn take(&mut self) -> (Vec<u8>, u64) {
        (
            std::mem::take(&mut self.kept),
            std::mem::take(&mut self.dropped),
        )
    }

    pub fn total(&self) -> u64 {
        self.total
    }
}

/// The last `cap` bytes of a stream (the init process's output, for `logs`).
#[derive(Debug, Default)]
pub struct Tail {
    buf: std::collections::VecDeque<u8>,
    cap: usize,
    total: u64,
}

impl Tail {
    pub fn new(cap: usize) -> Tail {
        Tail {
            cap,
            ..Default::default()
        }
    }

    pub fn push(&mut self, b: &[u8]) {
        self.total += b.len() as u64;
        let b = &b[b.len().saturating_sub(self.cap)..];
        let over = (self.buf.len() + b.len()).saturating_sub(self.cap);
        self.buf.drain(..over);
        self.buf.extend(b);
    }

    /// The last `n` bytes kept, and whether older output was cut.
    pub fn last(&self, n: usize) -> (Vec<u8>, bool) {
        let n = n.min(self.buf.len());
        let start = self.buf.len() - n;
        let cut = self.total > n as u64;
        (self.buf.iter().skip(start).copied().collect(), cut)
    }
}

/// Where a process's output goes: a [`Capture`] or a [`Tail`] shared with the server.
#[derive(Debug, Clone)]
pub enum Sink {
    Capture(Arc<Mutex<Capture>>),
    Tail(Arc<Mutex<Tail>>),
}

impl tokio::io::AsyncWrite for Sink {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &*self {
            Sink::Capture(c) => c.lock().unwrap_or_else(|p| p.into_inner()).push(b),
            Sink::Tail(t) => t.lock().unwrap_or_else(|p| p.into_inner()).push(b),
        }
        Poll::Ready(Ok(b.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Guest output as text for the model: invalid UTF-8 replaced (the bytes are guest data,
/// shown, never interpreted).
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_inside_the_sandbox_or_are_refused() {
        assert_eq!(resolve_path("/etc/passwd", "/").unwrap(), "/etc/passwd");
        assert_eq!(resolve_path("a/b", "/workspace").unwrap(), "/workspace/a/b");
        assert_eq!(resolve_path("./a/../b/", "/w").unwrap(), "/w/b");
        assert_eq!(resolve_path("/", "/w").unwrap(), "/");
        assert_eq!(resolve_path("..", "/w").unwrap(), "/");
        assert_eq!(resolve_path("//x//y", "/").unwrap(), "/x/y");
        for bad in ["../..", "/../etc/passwd", "a/../../..", "/x/../../y"] {
            let e = resolve_path(bad, "/w").unwrap_err();
            assert_eq!(e.code(), "path_outside_sandbox", "{bad}");
            assert!(e.to_string().contains("outside the sandbox"), "{e}");
        }
        assert_eq!(
            resolve_path("", "/").unwrap_err().code(),
            "invalid_argument"
        );
        assert_eq!(
            resolve_path("a\0b", "/").unwrap_err().code(),
            "invalid_argument"
        );
    }

    #[test]
    fn env_is_checked_and_merged() {
        let mut m = BTreeMap::new();
        m.insert("A".to_string(), "1 2".to_string());
        m.insert("B_2".to_string(), String::new());
        assert_eq!(env_entries(&m).unwrap(), vec!["A=1 2", "B_2="]);
        for bad in ["", "A=B", "1X", "A\0"] {
            let mut m = BTreeMap::new();
            m.insert(bad.to_string(), "v".to_string());
            assert!(env_entries(&m).is_err(), "{bad:?} accepted");
        }
        let mut m = BTreeMap::new();
        m.insert("A".to_string(), "x\0y".to_string());
        assert!(env_entries(&m).is_err());
        let merged = merge_env(
            &["PATH=/bin".into(), "A=1".into()],
            &["A=2".into(), "C=3".into()],
        );
        assert_eq!(merged, vec!["PATH=/bin", "A=2", "C=3"]);
    }

    #[test]
    fn commands_are_argv_or_shell() {
        assert_eq!(
            command(Some(vec!["echo".into(), "hi".into()]), None).unwrap(),
            vec!["echo", "hi"]
        );
        assert_eq!(
            command(None, Some("echo $HOME".into())).unwrap(),
            vec!["/bin/sh", "-c", "echo $HOME"]
        );
        for (argv, shell) in [
            (None, None),
            (Some(vec![]), None),
            (Some(vec![String::new()]), None),
            (Some(vec!["a".into()]), Some("b".into())),
            (None, Some("  ".into())),
            (Some(vec!["a\0".into()]), None),
        ] {
            assert_eq!(
                command(argv.clone(), shell.clone()).unwrap_err().code(),
                "invalid_argument",
                "{argv:?} {shell:?}"
            );
        }
    }

    #[test]
    fn numbers_are_bounded() {
        assert_eq!(seconds(None, 60, 3600, "timeout").unwrap(), 60);
        assert_eq!(seconds(Some(5), 60, 3600, "timeout").unwrap(), 5);
        assert!(seconds(Some(0), 60, 3600, "timeout").is_err());
        assert!(seconds(Some(3601), 60, 3600, "timeout").is_err());
        assert_eq!(within(None, 512, MEMORY_MIB, "memory_mib").unwrap(), 512);
        let e = within(Some(32), 512, MEMORY_MIB, "memory_mib").unwrap_err();
        assert!(e.to_string().contains("give 64 to 65536"), "{e}");
        assert!(within(Some(0), 1, VCPUS, "cpus").is_err());
        assert_eq!(output_cap(None).unwrap(), DEFAULT_OUTPUT_BYTES);
        assert!(output_cap(Some(0)).is_err());
        assert!(output_cap(Some(MAX_OUTPUT_BYTES + 1)).is_err());
    }

    #[test]
    fn captures_keep_the_head_and_count_the_rest() {
        let mut c = Capture::new(4);
        c.push(b"ab");
        c.push(b"cdef");
        assert_eq!(c.take(), (b"abcd".to_vec(), 2));
        assert_eq!(c.total(), 6);
        // After a take there is room again (exec_output's next chunk).
        c.push(b"ghijk");
        assert_eq!(c.take(), (b"ghij".to_vec(), 1));
        assert_eq!(c.take(), (Vec::new(), 0));
        assert_eq!(c.total(), 11);
    }

    #[test]
    fn tails_keep_the_last_bytes() {
        let mut t = Tail::new(4);
        t.push(b"ab");
        assert_eq!(t.last(10), (b"ab".to_vec(), false));
        t.push(b"cdef");
        assert_eq!(t.last(10), (b"cdef".to_vec(), true));
        t.push(b"0123456789");
        assert_eq!(t.last(2), (b"89".to_vec(), true));
    }

    #[tokio::test]
    async fn sinks_write_into_their_buffers() {
        use tokio::io::AsyncWriteExt;
        let cap = Arc::new(Mutex::new(Capture::new(3)));
        let mut s = Sink::Capture(Arc::clone(&cap));
        s.write_all(b"hello").await.unwrap();
        assert_eq!(cap.lock().unwrap().take(), (b"hel".to_vec(), 2));
        assert_eq!(text(b"ok \xff"), "ok \u{fffd}");
    }
}
