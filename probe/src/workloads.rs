//! Small workloads that need kernel features a minimal kernel leaves out. Each prints one line
//! that is the same on any kernel that has the feature (so runc and agentvm can be compared).

use std::ffi::CString;
use std::io::{Error, Result};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The workloads, in the order `all` runs them (landlock last: it restricts the process).
pub const NAMES: [&str; 5] = ["itimer", "posix-timer", "madvise", "vm-readv", "landlock"];

/// Runs workload `name` (one of [`NAMES`]).
pub fn run(name: &str) -> Result<String> {
    match name {
        "itimer" => itimer(),
        "posix-timer" => posix_timer(),
        "madvise" => madvise(),
        "vm-readv" => vm_readv(),
        "landlock" => landlock(),
        _ => Err(fail(format!("no workload {name:?}"))),
    }
}

fn check(r: libc::c_int, what: &str) -> Result<libc::c_int> {
    if r < 0 {
        let e = Error::last_os_error();
        return Err(Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(r)
}

fn fail(msg: String) -> Error {
    Error::other(msg)
}

static ALARMS: AtomicU32 = AtomicU32::new(0);

extern "C" fn on_alarm(_: libc::c_int) {
    ALARMS.fetch_add(1, Ordering::SeqCst);
}

/// Waits until `count` reaches `n`, sleeping in pause(2) between signals.
fn wait_for(count: &AtomicU32, n: u32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while count.load(Ordering::SeqCst) < n {
        if Instant::now() > deadline {
            return Err(fail(format!(
                "only {} of {n} signals in 10 s",
                count.load(Ordering::SeqCst)
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// alarm(2) once, then setitimer(ITIMER_REAL) three times, as busybox ping and many daemons do.
fn itimer() -> Result<String> {
    // SAFETY: installs a handler that only touches an atomic; sigaction gets valid pointers.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_alarm as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = libc::SA_RESTART;
        check(
            libc::sigaction(libc::SIGALRM, &sa, std::ptr::null_mut()),
            "sigaction",
        )?;
    }
    // alarm(2) has no error return: call it raw to see an ENOSYS.
    // SAFETY: alarm has no memory arguments.
    let r = unsafe { libc::syscall(libc::SYS_alarm, 1u32) };
    if r < 0 {
        return Err(fail(format!("alarm: {}", Error::last_os_error())));
    }
    if r != 0 {
        return Err(fail("alarm: a previous alarm was pending".into()));
    }
    wait_for(&ALARMS, 1)?;
    let tick = libc::timeval {
        tv_sec: 0,
        tv_usec: 20_000,
    };
    let it = libc::itimerval {
        it_interval: tick,
        it_value: tick,
    };
    // SAFETY: setitimer reads `it`; the old value is not asked for.
    let r = unsafe { libc::setitimer(libc::ITIMER_REAL, &it, std::ptr::null_mut()) };
    check(r, "setitimer")?;
    wait_for(&ALARMS, 4)?;
    let off: libc::itimerval = libc::itimerval {
        it_interval: libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        },
        it_value: libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        },
    };
    let mut cur: libc::itimerval = off;
    // SAFETY: both pointers are valid itimervals.
    unsafe {
        check(
            libc::setitimer(libc::ITIMER_REAL, &off, std::ptr::null_mut()),
            "setitimer",
        )?;
        check(libc::getitimer(libc::ITIMER_REAL, &mut cur), "getitimer")?;
    }
    Ok("alarm fired, 3 ITIMER_REAL ticks, timer stopped".into())
}

/// timer_create(CLOCK_MONOTONIC) with SIGEV_SIGNAL, three expirations taken by sigtimedwait.
fn posix_timer() -> Result<String> {
    // SAFETY: plain libc calls on local, initialised structures; the timer is deleted before
    // returning.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        check(
            libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()),
            "sigprocmask",
        )?;
        let mut sev: libc::sigevent = std::mem::zeroed();
        sev.sigev_notify = libc::SIGEV_SIGNAL;
        sev.sigev_signo = libc::SIGUSR1;
        let mut timer: libc::timer_t = std::ptr::null_mut();
        check(
            libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut timer),
            "timer_create",
        )?;
        let tick = libc::timespec {
            tv_sec: 0,
            tv_nsec: 20_000_000,
        };
        let spec = libc::itimerspec {
            it_interval: tick,
            it_value: tick,
        };
        check(
            libc::timer_settime(timer, 0, &spec, std::ptr::null_mut()),
            "timer_settime",
        )?;
        let wait = libc::timespec {
            tv_sec: 10,
            tv_nsec: 0,
        };
        for i in 0..3 {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            if libc::sigtimedwait(&set, &mut info, &wait) != libc::SIGUSR1 {
                return Err(fail(format!(
                    "expiration {}: {}",
                    i + 1,
                    Error::last_os_error()
                )));
            }
        }
        let mut cur: libc::itimerspec = std::mem::zeroed();
        check(libc::timer_gettime(timer, &mut cur), "timer_gettime")?;
        check(libc::timer_getoverrun(timer), "timer_getoverrun")?;
        check(libc::timer_delete(timer), "timer_delete")?;
    }
    Ok("3 expirations of a CLOCK_MONOTONIC timer, timer deleted".into())
}

/// MADV_DONTNEED drops anonymous pages (they read back as zero); MADV_WILLNEED and
/// posix_fadvise are accepted.
fn madvise() -> Result<String> {
    const PAGES: usize = 16;
    const PAGE: usize = 4096;
    let len = PAGES * PAGE;
    // SAFETY: a fresh private anonymous mapping, used only through `mem` below and unmapped
    // before returning.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return Err(Error::last_os_error());
        }
        let mem = std::slice::from_raw_parts_mut(p.cast::<u8>(), len);
        mem.fill(0xaa);
        check(
            libc::madvise(p, len, libc::MADV_WILLNEED),
            "madvise(WILLNEED)",
        )?;
        check(
            libc::madvise(p, len, libc::MADV_DONTNEED),
            "madvise(DONTNEED)",
        )?;
        let mem = std::slice::from_raw_parts(p.cast::<u8>(), len);
        let zero = mem.iter().all(|b| *b == 0);
        libc::munmap(p, len);
        if !zero {
            return Err(fail("MADV_DONTNEED left the pages' contents".into()));
        }
        let f = CString::new("/proc/self/exe").expect("no NUL");
        let fd = check(libc::open(f.as_ptr(), libc::O_RDONLY), "open")?;
        let r = libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_SEQUENTIAL);
        libc::close(fd);
        if r != 0 {
            return Err(fail(format!(
                "posix_fadvise: {}",
                Error::from_raw_os_error(r)
            )));
        }
    }
    Ok(format!(
        "MADV_DONTNEED zeroed {PAGES} pages, MADV_WILLNEED and fadvise accepted"
    ))
}

/// process_vm_readv of a forked child's memory, written by the child after the fork.
fn vm_readv() -> Result<String> {
    let mut buf = [0u8; 32];
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two fds.
    check(unsafe { libc::pipe(fds.as_mut_ptr()) }, "pipe")?;
    // SAFETY: single-threaded; the child writes to its own copy of `buf`, reports through the
    // pipe and sleeps until killed.
    let pid = check(unsafe { libc::fork() }, "fork")?;
    if pid == 0 {
        let msg = b"written by the child after fork";
        buf[..msg.len()].copy_from_slice(msg);
        // SAFETY: in the child: write one byte to the pipe, then wait to be killed.
        unsafe {
            std::ptr::write_volatile(buf.as_mut_ptr(), buf[0]);
            libc::write(fds[1], b"r".as_ptr().cast(), 1);
            loop {
                libc::pause();
            }
        }
    }
    let mut ready = [0u8; 1];
    // SAFETY: reading one byte from our pipe.
    unsafe {
        libc::close(fds[1]);
        libc::read(fds[0], ready.as_mut_ptr().cast(), 1);
        libc::close(fds[0]);
    }
    let mut got = [0u8; 32];
    let local = libc::iovec {
        iov_base: got.as_mut_ptr().cast(),
        iov_len: got.len(),
    };
    let remote = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: `local` points at `got`, which is writable for its length; `remote` names the
    // same address in the child (forked from us).
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    let err = Error::last_os_error();
    // SAFETY: ending and reaping our child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    if n < 0 {
        return Err(fail(format!("process_vm_readv: {err}")));
    }
    let text = String::from_utf8_lossy(&got[..n as usize]);
    let text = text.trim_end_matches('\0');
    if !text.starts_with("written by the child") {
        return Err(fail(format!("read {text:?}, not the child's buffer")));
    }
    Ok(format!("read {n} bytes of a child: {text:?}"))
}

/// A Landlock ruleset that handles file reads and allows none, then a read that it denies.
fn landlock() -> Result<String> {
    const CREATE_RULESET_VERSION: u64 = 1;
    const ACCESS_FS_READ_FILE: u64 = 1 << 2;
    let path = CString::new("/etc/passwd").expect("no NUL");
    // SAFETY: open/close of a path we own the string of.
    unsafe {
        let fd = check(libc::open(path.as_ptr(), libc::O_RDONLY), "open before")?;
        libc::close(fd);
    }
    // SAFETY: landlock_create_ruleset(NULL, 0, VERSION) only returns the ABI version.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    if abi < 0 {
        return Err(fail(format!(
            "landlock_create_ruleset(version): {}",
            Error::last_os_error()
        )));
    }
    // struct landlock_ruleset_attr { __u64 handled_access_fs; } is enough for every ABI.
    let attr: u64 = ACCESS_FS_READ_FILE;
    // SAFETY: the attribute is a live u64 of the size passed.
    let ruleset = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const u64,
            std::mem::size_of::<u64>(),
            0u32,
        )
    };
    if ruleset < 0 {
        return Err(fail(format!(
            "landlock_create_ruleset: {}",
            Error::last_os_error()
        )));
    }
    // SAFETY: prctl and landlock_restrict_self take plain integers; the fd is ours.
    unsafe {
        check(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            "prctl(NO_NEW_PRIVS)",
        )?;
        if libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) != 0 {
            return Err(fail(format!(
                "landlock_restrict_self: {}",
                Error::last_os_error()
            )));
        }
        libc::close(ruleset as i32);
    }
    // SAFETY: as above.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY) };
    if fd >= 0 {
        return Err(fail("the read of /etc/passwd was allowed".into()));
    }
    let e = Error::last_os_error();
    if e.raw_os_error() != Some(libc::EACCES) {
        return Err(fail(format!("the read failed with {e}, not EACCES")));
    }
    Ok("ruleset enforced, read of /etc/passwd denied (EACCES)".into())
}
