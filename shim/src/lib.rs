//! The containerd runtime v2 shim of agentvm (`io.containerd.agentvm.v1`) as a library: the
//! binary (`main.rs`) only parses its action and runs [`service::Service`].
//!
//! - [`service`]: the shim process's lifecycle (`start` daemonizes the server, `delete` cleans
//!   up after a dead one) and the server that hands containerd the task service;
//! - [`task`]: the `containerd.task.v2.Task` service, which turns Task calls into `agentvm`
//!   container and pod calls and publishes the task events;
//! - `io`, `rootfs`: the containerd-side fifos and the rootfs mounts containerd hands over;
//! - [`mountns`]: the server's own mount namespace, where those mounts live.
//!
//! Dependencies run one way: `service` → `task` → `io`, `rootfs` → the `agentvm` runtime.

mod io;
pub mod mountns;
mod rootfs;
pub mod service;
pub mod task;

/// The runtime type containerd and Docker know this shim by.
pub const RUNTIME_ID: &str = "io.containerd.agentvm.v1";
