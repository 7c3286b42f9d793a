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
//! Mounts the host makes after the namespace was made do not reach it where the host's `/`
//! is a private mount (no systemd): a pod's later volumes are therefore looked up in the
//! host's namespace, whose descriptor `start` hands the server ([`HOST_NS_ENV`],
//! `agentvm::pod::use_host_mounts`).
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

/// The environment variable naming the descriptor of the host's mount namespace that
/// `start` leaves open across the server's exec.
pub const HOST_NS_ENV: &str = "AGENTVM_HOST_MOUNT_NS_FD";

/// Opens the caller's mount namespace (for `start`, the host's).
pub fn open_current() -> std::io::Result<std::fs::File> {
    std::fs::File::open("/proc/self/ns/mnt")
}

/// Keeps `fd` open across exec (for the server's `pre_exec`: fcntl(2) only).
pub fn keep_across_exec(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl(2) on a descriptor number, no memory.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The host's mount namespace `start` handed the server ([`HOST_NS_ENV`]), if any: checked
/// to be a mount namespace, made close-on-exec again, and the variable removed so that no
/// child sees it. Call it while the process has one thread.
pub fn take_host() -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let raw: std::os::fd::RawFd = std::env::var(HOST_NS_ENV).ok()?.parse().ok()?;
    std::env::remove_var(HOST_NS_ENV);
    let link = std::fs::read_link(format!("/proc/self/fd/{raw}")).ok()?;
    if !link.to_string_lossy().starts_with("mnt:[") {
        // Not what `start` left (the variable came from elsewhere): leave the descriptor
        // alone, and look volumes up in the server's own namespace.
        eprintln!("{HOST_NS_ENV}={raw} does not name a mount namespace ({link:?}); ignored");
        return None;
    }
    // SAFETY: the descriptor was left open for this process by `start` and nothing else
    // here owns it; it names a mount namespace (checked above).
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
    // SAFETY: fcntl(2) on a live descriptor.
    unsafe { libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC) };
    Some(fd)
}
