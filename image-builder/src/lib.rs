//! OCI images to ext4 root filesystems.
//!
//! Layers are parsed and applied to an in-memory model ([`tree::Tree`]) with every name
//! resolved inside the image; the model is then materialised into a private staging
//! directory with fd-relative calls only, and turned into an ext4 image by `mkfs.ext4 -d`
//! plus `debugfs` for what a host directory cannot hold (device nodes, xattrs).

pub mod blobs;
pub mod cache;
pub mod config;
pub mod digest;
mod error;
pub mod ext4;
mod fsutil;
mod image;
pub mod layer;
pub mod limits;
pub mod progress;
pub mod registry;
pub mod source;
pub mod tree;

#[cfg(test)]
pub(crate) mod testutil;

pub use config::{ContainerConfig, ImageConfig};
pub use error::{Error, Result};
pub use image::{build, inspect, BuildOptions, BuiltImage};
pub use limits::Limits;
pub use progress::{NoProgress, Progress};
pub use registry::RegistryOptions;
pub use source::{ImageRef, Platform};
