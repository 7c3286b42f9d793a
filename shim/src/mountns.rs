//! The shim server's own mount namespace.
//!
//! The server mounts what containerd hands it (a snapshotter's rootfs at `<bundle>/rootfs`)
//! and binds a pod's container roots and volumes into the pod share. Made in the host's
//! mount namespace, those mounts pin the host directories below them: a host `rmdir` of a
//! directory that one of the binds copied as a mount point fails with EBUSY while the
//! container runs (Linux refuses to remove a mount point of the caller's own namespace, and
//! lazily detaches those of other namespaces), and a SIGKILLed shim leaves them all behind.
//!
//! So the server of a pod (the CRI sandbox's shim, which serves all the pod's containers)
//! starts in a namespace of its own whose mounts are slaves of the host's: mounts the host
//! makes later (kubelet's volumes, a host mount below a volume) still reach the shim,
//! virtiofsd and the VM where the host's mount is shared; the shim's own mounts reach neither
//! the host nor any other process, and end with the shim's last process.
//!
//! Not Docker's (or ctr's) server: Docker reads and writes the container's root through its
//! own mount of it (`docker cp`, `docker diff`), and a layered root's refreshed host view is
//! mounted by the shim over that mount point for Docker to see; it must be in the host's
//! namespace.

/// Moves the calling process into a new mount namespace, with every mount a slave of the
/// host's (`mount --make-rslave /`). Only async-signal-safe system calls on static data: made
/// for the server's `pre_exec`, between fork and exec, where the child has one thread
/// (`unshare(CLONE_NEWNS)` fails with EINVAL in a process whose threads share their
/// filesystem context).
pub fn enter_own() -> std::io::Result<()> {
    // SAFETY: unshare(2) takes flags only.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a static C string for the target, null for the unused source, type and data.
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_SLAVE,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
