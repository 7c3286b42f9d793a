//! Ending the VM: kill everything, flush, unmount, reboot. QEMU runs with `-no-reboot`, so a
//! reboot ends the VM; the host sees the VMM exit.

use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{getpid, sync, Pid};

use crate::{mounts, rootfs};

/// Whether this process is the VM's init.
pub fn is_init() -> bool {
    getpid().as_raw() == 1
}

/// Ends the VM. Outside PID 1 (tests, a developer running the binary) it only exits.
pub fn power_off(reason: &str) -> ! {
    crate::info!("powering off: {reason}");
    if !is_init() {
        std::process::exit(1);
    }
    // Everything but PID 1.
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    reap_for(Duration::from_millis(500));
    sync();
    let container_mounts = mounts::mounted().into_iter().rev();
    for target in container_mounts.chain(rootfs::unmount_order()) {
        match umount2(target.as_str(), MntFlags::empty()) {
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
            Err(e) => {
                crate::debug!("umount {target}: {e}");
                // Still busy: at least stop writing to it.
                let _ = mount(
                    None::<&str>,
                    target.as_str(),
                    None::<&str>,
                    MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                    None::<&str>,
                );
            }
        }
    }
    sync();
    let err = reboot(RebootMode::RB_AUTOBOOT);
    crate::info!("reboot failed: {err:?}");
    std::process::exit(1);
}

/// Reaps killed processes until none is left or `limit` passes, so mounts are no longer busy.
fn reap_for(limit: Duration) {
    let start = Instant::now();
    while start.elapsed() < limit {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Err(Errno::ECHILD) => return,
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(10)),
            _ => {}
        }
    }
}
