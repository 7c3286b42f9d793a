//! agentvm-agent: the guest PID 1 of an agentvm microVM.
//!
//! The binary (`main.rs`) is thin: it does the early boot ([`boot`]), then serves the host
//! protocol ([`server`]) on AF_VSOCK. Each connection runs one process in the container root
//! filesystem ([`rootfs`]), set up through [`process`], whose syscalls go through a seam so
//! that the setup logic is tested without root or a VM. Before the container's init process
//! starts, the agent configures the guest network ([`net`]) and the container's own mounts
//! ([`mounts`]); a connection that asks for it relays DNS queries to the host ([`dns`]).
//!
//! The agent is single-threaded on purpose (a current-thread tokio runtime): processes are
//! spawned with `fork`, and only a single-threaded parent makes the code between `fork` and
//! `exec` safe.

pub mod boot;
pub mod cgroup;
pub mod cmdline;
pub mod dns;
pub mod fdio;
pub mod forward;
pub mod log;
pub mod machine;
pub mod mounts;
pub mod net;
pub mod power;
pub mod process;
pub mod reaper;
pub mod rootfs;
pub mod seccomp;
pub mod secrets;
pub mod server;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod stats;
pub mod sysctl;
pub mod vsock;

#[cfg(test)]
mod testutil;
