//! The agentvm runtime: boots a microVM per sandbox (QEMU microvm today, behind
//! [`vmm::VmmBackend`]), talks to the guest agent over vsock, and runs OCI processes in it.

pub mod accel;
pub mod assets;
pub mod check;
pub mod config;
pub mod container;
pub mod dns;
pub mod error;
pub mod guest;
pub mod hooks;
pub mod hostcgroup;
pub mod image;
pub mod install;
pub mod jail;
pub mod layers;
pub mod mounts;
pub mod netguard;
pub mod netns;
pub mod oci;
pub mod qmp;
pub mod resources;
pub mod ringlog;
pub mod run;
pub mod sandbox;
pub mod vmm;

pub use error::{Error, Result};
