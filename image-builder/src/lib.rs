//! OCI images to ext4 root filesystems.
//!
//! Layers are parsed and applied to an in-memory model ([`tree::Tree`]) with every name
//! resolved inside the image; the model is then materialised into a private staging
//! directory with fd-relative calls only, and turned into an ext4 image by `mkfs.ext4 -d`
//! plus `debugfs` for what a host directory cannot hold (device nodes, xattrs).

pub mod blobs;
pub mod config;
pub mod digest;
mod error;
pub mod ext4;
mod fsutil;
pub mod layer;
pub mod limits;
pub mod progress;
pub mod source;
pub mod tree;

#[cfg(test)]
pub(crate) mod testutil;

pub use error::{Error, Result};
pub use limits::Limits;
pub use progress::{NoProgress, Progress};
