//! The agentvm runtime: boots a microVM per sandbox (QEMU microvm today, behind
//! [`vmm::VmmBackend`]), talks to the guest agent over vsock, and runs OCI processes in it.

pub mod accel;
pub mod assets;
pub mod check;
pub mod config;
pub mod container;
pub mod dns;
pub mod egress;
pub mod error;
#[cfg(any(test, feature = "testing"))]
pub mod fakevm;
pub mod fsmount;
pub mod guest;
pub mod hooks;
pub mod hostcgroup;
pub mod image;
pub mod install;
pub mod jail;
pub mod layers;
pub mod mcp;
pub mod mounts;
pub mod netguard;
pub mod netns;
pub mod nftlink;
pub mod oci;
pub mod pod;
pub mod portfwd;
mod qmp;
pub mod resources;
pub mod ringlog;
pub mod run;
pub mod sandbox;
pub mod sandboxuser;
pub mod secrets;
mod session;
pub mod uplink;
pub mod vmm;

pub use error::{Error, Result};

/// Helpers of the unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    /// Whether a test that needs something this host may lack can run: `missing` says what
    /// is missing. Without it the test prints why and skips; under CI
    /// (`AGENTVM_REQUIRE_VM=1`) it fails instead.
    pub fn runnable(test: &str, missing: Option<&str>) -> bool {
        let Some(why) = missing else {
            return true;
        };
        assert!(
            std::env::var("AGENTVM_REQUIRE_VM").as_deref() != Ok("1"),
            "{test}: {why} (AGENTVM_REQUIRE_VM=1 forbids skipping)"
        );
        eprintln!("SKIP {test}: {why}");
        false
    }

    /// Mounts an overlay of `lower` under `dir/diff` (work dir `dir/work`) at `dir/merged`,
    /// as Docker's overlay2 lays a container out. Needs root.
    pub fn mount_overlay(
        lower: &std::path::Path,
        dir: &std::path::Path,
        flags: nix::mount::MsFlags,
    ) {
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            dir.join("diff").display(),
            dir.join("work").display()
        );
        nix::mount::mount(
            Some("overlay"),
            &dir.join("merged"),
            Some("overlay"),
            flags,
            Some(opts.as_str()),
        )
        .unwrap();
    }

    /// [`runnable`] for a test that needs root.
    pub fn as_root(test: &str) -> bool {
        runnable(
            test,
            (!nix::unistd::Uid::effective().is_root()).then_some("needs root"),
        )
    }
}
