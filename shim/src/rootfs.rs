//! Root filesystems from containerd snapshotters (ctr, nerdctl, CRI): mounted on the host at
//! `<bundle>/rootfs`, as runc shims do, then shared with the VM like Docker's pre-mounted root.

use std::path::Path;

use containerd_shim::protos::api::Mount;

/// Mounts the snapshotter's mounts at `target` (in order, like runc shims).
pub async fn mount_all(mounts: &[Mount], target: &Path) -> containerd_shim::Result<()> {
    for m in mounts {
        if let Err(e) = containerd_shim::util::mount_rootfs(m, target).await {
            unmount(target);
            return Err(e);
        }
    }
    Ok(())
}

/// Unmounts everything at and under `target`; nothing mounted is fine.
pub fn unmount(target: &Path) {
    if let Some(t) = target.to_str() {
        if let Err(e) = containerd_shim::mount::umount_recursive(Some(t), libc::MNT_DETACH) {
            tracing::warn!("unmount {t}: {e}");
        }
    }
}
