//! Early boot of the VM: the agent's own mounts, console, loopback and hostname.

use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::mount::{mount, MsFlags};
use nix::sys::stat::Mode;
use nix::time::{clock_gettime, ClockId};

/// The default hostname of the VM.
pub const HOSTNAME: &str = "agentvm";

/// A failure of early boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("mount {fstype} on {target}: {errno}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        errno: Errno,
    },
    #[error("create {path}: {source}")]
    Mkdir {
        path: &'static str,
        source: std::io::Error,
    },
    #[error("open /dev/console: {0}")]
    Console(Errno),
    #[error("bring up lo: {0}")]
    Loopback(Errno),
    #[error("set hostname {name:?}: {errno}")]
    Hostname { name: String, errno: Errno },
}

/// One early mount: source, target, fstype, flags, data.
type EarlyMount = (
    &'static str,
    &'static str,
    &'static str,
    MsFlags,
    Option<&'static str>,
);

/// The agent's own mounts, in order (devtmpfs before devpts, sysfs before cgroup2).
pub fn early_mounts() -> [EarlyMount; 6] {
    let common = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    [
        ("proc", "/proc", "proc", common, None),
        ("sysfs", "/sys", "sysfs", common, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("mode=0620,ptmxmode=0666,gid=5"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", common, None),
    ]
}

/// Mounts [`early_mounts`], tolerating what is already mounted.
pub fn mount_early() -> Result<(), BootError> {
    for (source, target, fstype, flags, data) in early_mounts() {
        std::fs::create_dir_all(target).map_err(|source| BootError::Mkdir {
            path: target,
            source,
        })?;
        match mount(Some(source), target, Some(fstype), flags, data) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(errno) => {
                return Err(BootError::Mount {
                    fstype,
                    target,
                    errno,
                })
            }
        }
    }
    Ok(())
}

/// Points fds 0, 1 and 2 at `/dev/console`. An initramfs without `/dev/console` leaves init
/// with no stdio at all, so this runs right after `/dev` is mounted.
pub fn setup_console() -> Result<(), BootError> {
    let fd = open(
        "/dev/console",
        OFlag::O_RDWR | OFlag::O_NOCTTY,
        Mode::empty(),
    )
    .map_err(BootError::Console)?;
    for target in 0..=2 {
        if fd != target {
            nix::unistd::dup2(fd, target).map_err(BootError::Console)?;
        }
    }
    if fd > 2 {
        let _ = nix::unistd::close(fd);
    }
    Ok(())
}

/// Brings the loopback interface up (`SIOCSIFFLAGS` with `IFF_UP`).
pub fn loopback_up() -> Result<(), BootError> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(BootError::Loopback)?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags member of a valid ifreq.
    Errno::result(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })
        .map_err(BootError::Loopback)?;
    // SAFETY: after SIOCGIFFLAGS the flags member of the union is the initialized one.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads the name and flags of a valid ifreq.
    Errno::result(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) })
        .map_err(BootError::Loopback)?;
    Ok(())
}

/// Sets the hostname.
pub fn set_hostname(name: &str) -> Result<(), BootError> {
    nix::unistd::sethostname(name).map_err(|errno| BootError::Hostname {
        name: name.to_string(),
        errno,
    })
}

/// Milliseconds since boot (`CLOCK_BOOTTIME`).
pub fn uptime_ms() -> u64 {
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        .map(|t| {
            u64::try_from(t.tv_sec()).unwrap_or(0) * 1000
                + u64::try_from(t.tv_nsec()).unwrap_or(0) / 1_000_000
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_mount_order() {
        let targets: Vec<_> = early_mounts().iter().map(|m| m.1).collect();
        let at = |t| targets.iter().position(|x| *x == t).unwrap();
        assert!(at("/dev") < at("/dev/pts"));
        assert!(at("/sys") < at("/sys/fs/cgroup"));
        assert_eq!(targets.len(), 6);
    }

    #[test]
    fn uptime_is_monotonic() {
        let a = uptime_ms();
        let b = uptime_ms();
        assert!(a > 0 && b >= a);
    }
}
