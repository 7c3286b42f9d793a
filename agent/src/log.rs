//! Console logging: every line goes to stderr, which [`crate::boot`] points at `/dev/console`.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static DEBUG: AtomicBool = AtomicBool::new(false);

/// Turns debug logging on or off (`agentvm.debug=1` on the kernel command line).
pub fn set_debug(on: bool) {
    DEBUG.store(on, Ordering::Relaxed);
}

/// Whether debug logging is on.
pub fn debug_enabled() -> bool {
    DEBUG.load(Ordering::Relaxed)
}

/// Writes one log line. Never panics: a PID 1 that panics takes the VM down.
pub fn write_line(args: std::fmt::Arguments<'_>) {
    let mut line = String::with_capacity(128);
    let _ = std::fmt::write(&mut line, format_args!("agentvm-agent: {args}\n"));
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Logs a line to the console, prefixed `agentvm-agent:`.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::write_line(format_args!($($arg)*)) };
}

/// Logs a line only when `agentvm.debug=1`.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::log::debug_enabled() {
            $crate::log::write_line(format_args!($($arg)*))
        }
    };
}
