//! Spawning a planned process with `std::process::Command` and `pre_exec`.
//!
//! `Command` forks; [`super::apply`] runs in the child (chroot, ids, caps, ...) and execs the
//! process itself, so `Command`'s own program, cwd, uid and gid are never used (they would
//! apply before the chroot). A failed step is written as 8 bytes to a close-on-exec pipe so
//! that the parent can say which step failed, not just the errno.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::sys::stat::Mode;

use super::apply::{apply, StepError};
use super::plan::{PidNs, Plan};
use super::seam::Real;

/// Runs `fork` (the spawn) with this thread's PID namespace for children set to `ns`, and
/// sets it back to the agent's own afterwards, whatever happened.
fn in_pid_namespace<T>(ns: PidNs, fork: impl FnOnce() -> T) -> io::Result<T> {
    let own = open(
        "/proc/self/ns/pid",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io::Error::from)?;
    // SAFETY: `open` returned a fresh descriptor that nothing else owns.
    let own = unsafe { OwnedFd::from_raw_fd(own) };
    // SAFETY: unshare and setns take a flag word and a descriptor: no memory is shared.
    let entered = unsafe {
        match ns {
            PidNs::New => libc::unshare(libc::CLONE_NEWPID),
            PidNs::Join(fd) => libc::setns(fd, libc::CLONE_NEWPID),
            PidNs::Agent => 0,
        }
    };
    if entered != 0 {
        return Err(io::Error::last_os_error());
    }
    let r = fork();
    // SAFETY: as above; the agent's own namespace is an ancestor of (or equal to) the one
    // entered, which setns allows.
    if unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
        // Later forks would land in the container's namespace: nothing the agent can serve.
        panic!(
            "cannot return to the agent's PID namespace: {}",
            io::Error::last_os_error()
        );
    }
    Ok(r)
}

/// A failure to start the process.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// A setup step or the exec failed in the child; `exit_code` is what runc users see.
    #[error("{message}")]
    Setup { message: String, exit_code: i32 },
    /// The agent could not fork or set up stdio.
    #[error("spawn: {0}")]
    Io(#[from] io::Error),
    /// The terminal could not be created.
    #[error("create terminal: {0}")]
    Pty(Errno),
}

/// A pseudo-terminal pair.
#[derive(Debug)]
pub struct Pty {
    pub master: OwnedFd,
    pub slave: OwnedFd,
}

/// Opens a new pty from the devpts instance whose `ptmx` is at `ptmx` (the container's own, so
/// that the slave's `/dev/pts/N` exists inside the container), with an initial size.
pub fn open_pty(ptmx: &str, size: Option<(u16, u16)>) -> Result<Pty, SpawnError> {
    let master = open(
        ptmx,
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(SpawnError::Pty)?;
    // SAFETY: open just returned this fd; nothing else owns it.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int through the pointer, which is valid for the call.
    Errno::result(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) })
        .map_err(SpawnError::Pty)?;
    // SAFETY: TIOCGPTPEER takes open flags as an integer and returns a new fd.
    let slave = Errno::result(unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    })
    .map_err(SpawnError::Pty)?;
    // SAFETY: TIOCGPTPEER just returned this fd; nothing else owns it.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    if let Some((rows, cols)) = size {
        resize(master.as_raw_fd(), rows, cols).map_err(SpawnError::Pty)?;
    }
    Ok(Pty { master, slave })
}

/// Sets the window size of the terminal behind `fd` (`TIOCSWINSZ`).
pub fn resize(fd: i32, rows: u16, cols: u16) -> Result<(), Errno> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize through the pointer, valid for the call.
    Errno::result(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) }).map(drop)
}

/// A started process and the agent's ends of its stdio.
#[derive(Debug)]
pub struct Spawned {
    pub pid: i32,
    /// Pipe mode: the write end of the child's stdin and the read ends of stdout/stderr.
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    /// Terminal mode: the pty master (stdin and stdout at once).
    pub master: Option<OwnedFd>,
}

/// Starts `plan`'s process, on `pty` if given, else on pipes.
///
/// The caller must keep the process single-threaded and register the pid with the reaper
/// before its next `.await`.
pub fn spawn(plan: Arc<Plan>, pty: Option<Pty>) -> Result<Spawned, SpawnError> {
    let (err_rd, err_wr) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    let err_fd = err_wr.as_raw_fd();

    let mut cmd = Command::new(&plan.exec.name);
    let master = match pty {
        Some(Pty { master, slave }) => {
            cmd.stdin(Stdio::from(slave.try_clone()?))
                .stdout(Stdio::from(slave.try_clone()?))
                .stderr(Stdio::from(slave));
            Some(master)
        }
        None => {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            None
        }
    };
    let child_plan = Arc::clone(&plan);
    let in_child = move || {
        let err = apply(&child_plan, &mut Real);
        let bytes = err.to_bytes();
        // SAFETY: writes 8 bytes from a live stack buffer to our own pipe.
        unsafe { libc::write(err_fd, bytes.as_ptr().cast(), bytes.len()) };
        Err(io::Error::from_raw_os_error(err.errno as i32))
    };
    // SAFETY: the closure runs between fork and exec in a child of a single-threaded parent.
    // It only makes syscalls (through `Real`) on memory prepared before the fork, and writes
    // a fixed-size buffer to a pipe; it does not allocate or take locks.
    unsafe { cmd.pre_exec(in_child) };
    let result = match plan.pid_ns {
        PidNs::Agent => cmd.spawn(),
        ns => in_pid_namespace(ns, || cmd.spawn())?,
    };
    // The parent's copy of the write end must go before reading, or a failure that left no
    // record would block the read forever.
    drop(cmd);
    drop(err_wr);
    match result {
        Ok(mut child) => {
            let pid = i32::try_from(child.id()).map_err(io::Error::other)?;
            // `child` is dropped without waiting: the reaper owns exit statuses.
            Ok(Spawned {
                pid,
                stdin: child.stdin.take().map(OwnedFd::from),
                stdout: child.stdout.take().map(OwnedFd::from),
                stderr: child.stderr.take().map(OwnedFd::from),
                master,
            })
        }
        Err(e) => {
            let mut buf = [0u8; 8];
            match nix::unistd::read(err_rd.as_raw_fd(), &mut buf) {
                Ok(8) => match StepError::from_bytes(buf) {
                    Some(step) => {
                        let (message, exit_code) = step.report(&plan);
                        Err(SpawnError::Setup { message, exit_code })
                    }
                    None => Err(SpawnError::Io(e)),
                },
                _ => Err(SpawnError::Io(e)),
            }
        }
    }
}
