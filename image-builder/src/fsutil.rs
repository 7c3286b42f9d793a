//! Small fd-relative file system helpers. Every call here works on a directory file
//! descriptor we opened ourselves and never follows a symlink in the last component.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;

use crate::error::{Error, Result};

/// Opens `name` inside `dir` with `flags | O_NOFOLLOW | O_CLOEXEC`.
pub(crate) fn open_at(dir: &OwnedFd, name: &[u8], flags: OFlag, mode: u32) -> Result<OwnedFd> {
    let fd = openat(
        Some(dir.as_raw_fd()),
        OsStr::from_bytes(name),
        flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(mode),
    )
    .map_err(|e| Error::nix(format!("open {:?}", String::from_utf8_lossy(name)), e))?;
    // SAFETY: `openat` just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a directory by absolute path without following a final symlink.
pub(crate) fn open_dir(path: &Path) -> Result<OwnedFd> {
    let fd = nix::fcntl::open(
        path,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
        Mode::empty(),
    )
    .map_err(|e| Error::nix(format!("open directory {}", path.display()), e))?;
    // SAFETY: `open` just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the subdirectory `name` of `dir`, refusing symlinks.
pub(crate) fn open_subdir(dir: &OwnedFd, name: &[u8]) -> Result<OwnedFd> {
    open_at(dir, name, OFlag::O_DIRECTORY | OFlag::O_RDONLY, 0)
}

/// Turns an owned descriptor into a `File`.
pub(crate) fn into_file(fd: OwnedFd) -> File {
    File::from(fd)
}

/// Makes a child tool (mkfs.ext4, debugfs, docker) die with the builder: if the builder is
/// SIGKILLed mid-build, no tool keeps writing into a work dir that gc will remove.
pub(crate) fn die_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and only makes the
    // async-signal-safe syscalls prctl(2), getppid(2) and _exit(2); it allocates nothing
    // and touches no lock.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The builder died between fork and prctl: do not run orphaned.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}
