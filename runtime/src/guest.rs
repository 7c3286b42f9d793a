//! What the host takes from the guest agent, which it does not trust.
//!
//! Root in the guest can replace the agent and speak the protocol with any values, so
//! everything the agent says is guest data, never a host fact:
//!
//! - connections to the agent are opened through a [`Dialer`] and greeted ([`open`]) off any
//!   loop that serves other processes, within [`CONNECT_TIMEOUT`] for the whole exchange;
//! - exit codes are clamped to what a shell could report ([`exit_code`]);
//! - guest strings are cut to [`MAX_GUEST_TEXT`] bytes with their control characters escaped
//!   ([`text`], [`describe`]) before they are logged or returned to the engine;
//! - guest log lines are rate-limited per sandbox ([`GuestLog`]).
//!
//! Guest pids never leave this crate as host pids: the runtime reports the host pid of the
//! container's namespace holder for every process of the VM.

use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use agentvm_protocol::{self as proto, ExitStatus, Frame, Message};

use crate::error::{Error, Result};
use crate::sandbox::AgentConn;
use crate::vmm::AgentIo;

/// How long connecting to the agent and reading its Hello may take together.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest guest string the host logs or hands on, in bytes (the rest is cut, with a marker).
pub const MAX_GUEST_TEXT: usize = 4096;
/// Guest log lines per second and sandbox; more are counted and reported as suppressed.
pub const GUEST_LOG_PER_SECOND: u32 = 20;

/// A future of [`Dialer::dial`].
pub type DialFuture<'a> =
    Pin<Box<dyn Future<Output = std::io::Result<Box<dyn AgentIo>>> + Send + 'a>>;

/// Opens byte streams to the agent's port: the VM's channel ([`crate::vmm::VmHandle::dialer`]),
/// or a fake agent in tests.
pub trait Dialer: Send + Sync {
    fn dial(&self) -> DialFuture<'_>;
}

/// Reads the agent's Hello from a fresh stream; returns the connection and the guest's
/// uptime. Not bounded by itself: see [`open`].
pub async fn greet(io: Box<dyn AgentIo>) -> Result<(AgentConn, u64)> {
    let (reader, writer) = tokio::io::split(io);
    let mut conn = AgentConn { reader, writer };
    match conn.recv().await? {
        Some(Frame::Msg(Message::Hello { version, uptime_ms })) => {
            if version != proto::VERSION {
                return Err(Error::Agent(format!(
                    "agent speaks protocol v{version}, this runtime v{}: reinstall both from \
                     the same build (hack/setup.sh)",
                    proto::VERSION
                )));
            }
            Ok((conn, uptime_ms))
        }
        Some(other) => Err(Error::Agent(format!(
            "expected Hello, got {}",
            describe(&other)
        ))),
        None => Err(Error::Agent(
            "the agent closed the connection before its Hello".into(),
        )),
    }
}

/// Dials and greets the agent within `timeout`, as one bounded step.
pub async fn open(dialer: &dyn Dialer, timeout: Duration) -> Result<AgentConn> {
    let attempt = async {
        let io = dialer
            .dial()
            .await
            .map_err(|e| Error::Agent(format!("connect to the agent: {e}")))?;
        greet(io).await.map(|(conn, _)| conn)
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(Error::Agent(format!(
                "the agent did not answer a new connection within {} s",
                timeout.as_secs()
            )))
        })
}

/// The exit code of a guest's exit report as the engine may see it: 128 + the signal for a
/// signal the guest kernel knows (1..=64), else the code when it is 0..=255, else 255.
pub fn exit_code(st: &ExitStatus) -> i32 {
    match st.signal {
        Some(s) if (1..=64).contains(&s) => 128 + s,
        _ if (0..=255).contains(&st.code) => st.code,
        _ => 255,
    }
}

/// A guest string made fit for a log line or an error returned to the engine: at most
/// [`MAX_GUEST_TEXT`] bytes of it (cut on a character boundary, with a marker saying how much
/// was cut), control characters escaped so it cannot forge log lines or terminal output.
pub fn text(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_GUEST_TEXT) + 48);
    let mut used = 0;
    for (i, c) in s.char_indices() {
        let before = out.len();
        if c.is_control() {
            let _ = write!(out, "{}", c.escape_default());
        } else {
            out.push(c);
        }
        used += out.len() - before;
        if used > MAX_GUEST_TEXT {
            out.truncate(before);
            let _ = write!(out, "... [{} more bytes cut]", s.len() - i);
            break;
        }
    }
    out
}

/// A short description of a frame from the guest, for errors and logs: the kind and size of
/// data frames, a capped rendering of control messages.
pub fn describe(frame: &Frame) -> String {
    match frame {
        Frame::Data(s, b) => format!("{s:?} data ({} bytes)", b.len()),
        Frame::Dns(b) => format!("a DNS message ({} bytes)", b.len()),
        Frame::Msg(Message::Error { message, exit_code }) => {
            format!("error {:?} (exit code {exit_code:?})", text(message))
        }
        Frame::Msg(m) => text(&format!("{m:?}")),
    }
}

/// [`describe`] for what a receive returned.
pub fn describe_recv(r: &Result<Option<Frame>>) -> String {
    match r {
        Ok(Some(f)) => describe(f),
        Ok(None) => "the end of the connection".into(),
        Err(e) => text(&e.to_string()),
    }
}

/// Rate limit of one sandbox's guest log lines: at most `per_second` lines in each
/// one-second window; the others are counted, and the count is logged with the next line
/// let through (or when the limiter is dropped).
#[derive(Debug)]
pub struct GuestLog {
    sandbox: String,
    per_second: u32,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    start: Option<Instant>,
    count: u32,
    suppressed: u64,
}

/// What [`GuestLog::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Log the line; `suppressed` lines were dropped since the last one logged.
    Log { suppressed: u64 },
    /// Drop the line.
    Drop,
}

impl GuestLog {
    pub fn new(sandbox: impl Into<String>, per_second: u32) -> GuestLog {
        GuestLog {
            sandbox: sandbox.into(),
            per_second,
            window: Mutex::new(Window {
                start: None,
                count: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether a line arriving at `now` may be logged.
    pub fn admit(&self, now: Instant) -> Admit {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = match w.start {
            Some(start) => now.saturating_duration_since(start) >= Duration::from_secs(1),
            None => true,
        };
        if fresh {
            w.start = Some(now);
            w.count = 0;
        }
        if w.count >= self.per_second {
            w.suppressed += 1;
            return Admit::Drop;
        }
        w.count += 1;
        Admit::Log {
            suppressed: std::mem::take(&mut w.suppressed),
        }
    }

    /// Logs a line the guest caused, at info level, if the limit lets it through. `line`
    /// must already be made safe ([`text`], [`describe`]).
    pub fn info(&self, line: &str) {
        if let Admit::Log { suppressed } = self.admit(Instant::now()) {
            self.report_suppressed(suppressed);
            tracing::info!(sandbox = %self.sandbox, "guest: {line}");
        }
    }

    /// As [`GuestLog::info`], at warn level.
    pub fn warn(&self, line: &str) {
        if let Admit::Log { suppressed } = self.admit(Instant::now()) {
            self.report_suppressed(suppressed);
            tracing::warn!(sandbox = %self.sandbox, "guest: {line}");
        }
    }

    fn report_suppressed(&self, n: u64) {
        if n > 0 {
            tracing::warn!(sandbox = %self.sandbox, "guest: suppressed {n} messages (more than {} a second)", self.per_second);
        }
    }
}

impl Drop for GuestLog {
    fn drop(&mut self) {
        let w = self.window.get_mut().unwrap_or_else(|p| p.into_inner());
        let n = std::mem::take(&mut w.suppressed);
        self.report_suppressed(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_clamped() {
        let st = |code, signal| ExitStatus {
            code,
            signal,
            oom: false,
        };
        assert_eq!(exit_code(&st(0, None)), 0);
        assert_eq!(exit_code(&st(42, None)), 42);
        assert_eq!(exit_code(&st(255, None)), 255);
        assert_eq!(exit_code(&st(-1, None)), 255);
        assert_eq!(exit_code(&st(256, None)), 255);
        assert_eq!(exit_code(&st(i32::MIN, None)), 255);
        assert_eq!(exit_code(&st(0, Some(9))), 137);
        assert_eq!(exit_code(&st(i32::MAX, Some(15))), 143);
        // A signal no kernel has: the code, if it is sane.
        assert_eq!(exit_code(&st(3, Some(1000))), 3);
        assert_eq!(exit_code(&st(-7, Some(-3))), 255);
    }

    #[test]
    fn guest_text_is_capped_and_escaped() {
        assert_eq!(text("plain"), "plain");
        assert_eq!(text("a\nb\x1b[2J"), "a\\nb\\u{1b}[2J");
        let big = "é".repeat(1 << 19); // 1 MiB of two-byte characters
        let t = text(&big);
        assert!(t.len() <= MAX_GUEST_TEXT + 48, "{} bytes", t.len());
        assert!(t.ends_with(&format!(
            "... [{} more bytes cut]",
            (1 << 20) - MAX_GUEST_TEXT
        )));
        // Escapes count against the cap too.
        let t = text(&"\n".repeat(1 << 20));
        assert!(t.len() <= MAX_GUEST_TEXT + 48, "{} bytes", t.len());
    }

    #[test]
    fn frames_are_described_without_their_payload() {
        let d = describe(&Frame::Data(proto::Stream::Stdout, vec![7; 1 << 20]));
        assert_eq!(d, "Stdout data (1048576 bytes)");
        let d = describe(&Frame::Msg(Message::Error {
            message: "x".repeat(1 << 20),
            exit_code: Some(1),
        }));
        assert!(d.len() < MAX_GUEST_TEXT + 100, "{} bytes", d.len());
        let d = describe(&Frame::Msg(Message::Ready));
        assert_eq!(d, "Ready");
    }

    #[test]
    fn guest_log_lines_are_rate_limited() {
        let log = GuestLog::new("sb", 3);
        let t0 = Instant::now();
        let admitted: Vec<Admit> = (0..5)
            .map(|i| log.admit(t0 + Duration::from_millis(i)))
            .collect();
        assert_eq!(
            admitted,
            [
                Admit::Log { suppressed: 0 },
                Admit::Log { suppressed: 0 },
                Admit::Log { suppressed: 0 },
                Admit::Drop,
                Admit::Drop
            ]
        );
        // Within the same second: still dropped.
        assert_eq!(log.admit(t0 + Duration::from_millis(999)), Admit::Drop);
        // The next window lets lines through and reports what was dropped once.
        let t1 = t0 + Duration::from_millis(1000);
        assert_eq!(log.admit(t1), Admit::Log { suppressed: 3 });
        assert_eq!(log.admit(t1), Admit::Log { suppressed: 0 });
    }

    #[tokio::test]
    async fn a_silent_agent_does_not_hold_open_past_its_deadline() {
        struct Silent(std::sync::Mutex<Vec<tokio::net::UnixStream>>);
        impl Dialer for Silent {
            fn dial(&self) -> DialFuture<'_> {
                Box::pin(async move {
                    let (a, b) = tokio::net::UnixStream::pair()?;
                    // Keep the agent's end open, and never write to it.
                    self.0.lock().unwrap().push(b);
                    Ok(Box::new(a) as Box<dyn AgentIo>)
                })
            }
        }
        let silent = Silent(Default::default());
        let t = tokio::time::Instant::now();
        let r = open(&silent, Duration::from_millis(200)).await;
        assert!(matches!(r, Err(Error::Agent(m)) if m.contains("did not answer")));
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
