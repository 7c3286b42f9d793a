//! The shim server's own mount namespace.
//!
//! The server mounts what containerd hands it (a snapshotter's rootfs at `<bundle>/rootfs`)
//! and binds a pod's container roots and volumes into the pod share. Made in the host's
//! mount namespace, those mounts pin the host directories below them: a host `rmdir` of a
//! directory that one of the binds copied as a mount point fails with EBUSY while the
//! container runs (Linux refuses to remove a mount point of the caller's own namespace, and
//! lazily detaches those of other namespaces), and a SIGKILLed shim leaves them all behind.
//!
//! So the server, before it starts a thread, takes a namespace of its own whose mounts are
//! slaves of the host's: mounts the host makes later (kubelet's volumes, a host mount below
//! a volume) still reach the shim, virtiofsd and the VM; the shim's own mounts reach neither
//! the host nor any other process, and end with the shim's last process.

use nix::mount::MsFlags;
use nix::sched::CloneFlags;

/// Moves the calling process into a new mount namespace, with every mount a slave of the
/// host's (`mount --make-rslave /`). Must run before the process starts a second thread
/// (`unshare(CLONE_NEWNS)` fails with EINVAL in a process whose threads share their
/// filesystem context).
pub fn enter_own() -> nix::Result<()> {
    nix::sched::unshare(CloneFlags::CLONE_NEWNS)?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
}
