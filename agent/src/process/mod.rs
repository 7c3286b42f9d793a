//! Turning an OCI [`ProcessSpec`] into a running process.
//!
//! [`plan::Plan::new`] validates the spec and prepares everything that allocates (C strings,
//! argument vectors, capability masks) in the parent. [`apply::apply`] then runs in the forked
//! child, between `fork` and `exec`, and only makes syscalls, all of them through the
//! [`seam::Syscalls`] trait so that the order of operations is unit-tested with a recording
//! double. [`spawn`] glues the two to `std::process::Command`.
//!
//! [`ProcessSpec`]: agentvm_protocol::ProcessSpec

pub mod apply;
pub mod caps;
pub mod plan;
pub mod rlimit;
pub mod seam;
pub mod spawn;

pub use apply::{apply, Step, StepError};
pub use plan::{Plan, PlanError};
