//! Errors of the runtime library.

use std::path::PathBuf;

/// Everything that can go wrong while preparing, booting or driving a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A required host component is missing; the message says how to get it.
    #[error("{what} not found: {hint}")]
    Missing { what: String, hint: String },
    /// A file the runtime needs could not be read or written.
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// Spawning a host helper (QEMU, vhost-device-vsock) failed.
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    /// The VM did not come up; `console` holds the tail of its serial console.
    #[error("the VM failed to boot: {reason}\n--- console tail ---\n{console}")]
    Boot { reason: String, console: String },
    /// The VMM process ended while the sandbox was in use.
    #[error("the VM exited unexpectedly ({reason})\n--- console tail ---\n{console}")]
    VmDied { reason: String, console: String },
    /// The agent broke the protocol or the connection failed.
    #[error("guest agent: {0}")]
    Protocol(#[from] agentvm_protocol::ProtocolError),
    /// The agent answered, but not what the host expected.
    #[error("guest agent: {0}")]
    Agent(String),
    /// The sandbox's cgroup on the host.
    #[error(transparent)]
    Cgroup(#[from] crate::hostcgroup::CgroupError),
    /// A secret a container asked for (missing, undecryptable, or the key file refused).
    #[error(transparent)]
    Secret(#[from] crate::secrets::SecretError),
    /// Invalid user input (flags, specs).
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
