//! `agentvm-syscall-probe`: checks that the kernel it runs on implements every x86-64 syscall
//! Docker's default seccomp profile allows (no ENOSYS), and runs small workloads that need
//! kernel features tinyconfig leaves out (interval and POSIX timers, madvise,
//! process_vm_readv, Landlock). Static, so it runs in any image and in the agentvm guest.
//!
//!     agentvm-syscall-probe [-v]        the syscall check; exit 1 if any returns ENOSYS
//!     agentvm-syscall-probe list        the list, with the capability and kernel option each needs
//!     agentvm-syscall-probe WORKLOAD    itimer | posix-timer | madvise | vm-readv | landlock
//!     agentvm-syscall-probe all         the syscall check, then every workload

mod syscalls;
mod workloads;

use std::time::{Duration, Instant};

use syscalls::{Kind, Syscall, ALLOWED};

/// Where the list comes from, printed in the report.
const SOURCE: &str =
    "moby/profiles seccomp/default.json @3c283243 (Docker 28/29), x86-64 ABI, Linux 6.12";

/// How long a probed call may block before it counts as implemented (only `pause` blocks).
const BLOCK_LIMIT: Duration = Duration::from_secs(3);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(String::as_str) {
        None => probe(false),
        Some("-v") | Some("--verbose") => probe(true),
        Some("all") => {
            let mut code = probe(false);
            for w in workloads::NAMES {
                code |= workload(w);
            }
            code
        }
        Some("list") => {
            list();
            0
        }
        Some("-h") | Some("--help") => {
            println!(
                "usage: agentvm-syscall-probe [-v] | list | all | {}",
                workloads::NAMES.join(" | ")
            );
            0
        }
        Some(w) if workloads::NAMES.contains(&w) => workload(w),
        Some(w) => {
            eprintln!("agentvm-syscall-probe: unknown command {w:?} (try --help)");
            2
        }
    };
    std::process::exit(code);
}

/// Runs one workload, prints its line; 0 on success.
fn workload(name: &str) -> i32 {
    match workloads::run(name) {
        Ok(line) => {
            println!("{name}: {line}");
            0
        }
        Err(e) => {
            println!("{name}: FAILED: {e}");
            1
        }
    }
}

fn list() {
    println!("# {SOURCE}");
    println!("# nr\tname\tcapability\tkernel option");
    for s in ALLOWED {
        let caps = if s.caps.is_empty() {
            "-".to_string()
        } else {
            s.caps.join("|")
        };
        let opt = match s.kind {
            Kind::Absent(why) => format!("(absent: {why})"),
            _ if s.option.is_empty() => "-".to_string(),
            _ => format!("CONFIG_{}", s.option),
        };
        println!("{}\t{}\t{caps}\t{opt}", s.nr, s.name);
    }
}

/// What one probed call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The raw return value (a negative errno on failure).
    Returned(i64),
    /// The call ended the process (exit, exit_group) before it could report.
    Exited(i32),
    /// The call raised a signal (rt_sigreturn on a garbage frame, uretprobe off its trampoline).
    Signaled(i32),
    /// The call was still blocked after [`BLOCK_LIMIT`] (pause).
    Blocked,
}

fn probe(verbose: bool) -> i32 {
    let caps = effective_caps();
    let mut implemented = 0;
    let mut missing = Vec::new();
    let mut unverified = Vec::new();
    let mut absent = 0;
    println!(
        "agentvm-syscall-probe: {} syscalls from {SOURCE}",
        ALLOWED.len()
    );
    for s in ALLOWED {
        if let Kind::Absent(why) = s.kind {
            absent += 1;
            if verbose {
                println!("skipped  {:3} {:<24} {why}", s.nr, s.name);
            }
            continue;
        }
        let out = call_in_child(s);
        let verdict = judge(s, out, caps);
        match verdict {
            Verdict::Ok => implemented += 1,
            Verdict::Missing(_) => missing.push(s.name),
            Verdict::Unverified(_) => unverified.push(s.name),
        }
        let show = verbose || !matches!(verdict, Verdict::Ok);
        if show {
            let (tag, note) = match &verdict {
                Verdict::Ok => ("ok", String::new()),
                Verdict::Missing(n) => ("MISSING", n.clone()),
                Verdict::Unverified(n) => ("unverif.", n.clone()),
            };
            println!(
                "{tag:<8} {:3} {:<24} {:<14} {note}",
                s.nr,
                s.name,
                describe(out)
            );
        }
    }
    println!(
        "summary: {implemented} implemented, {} missing (ENOSYS), {} not verifiable here \
         (the profile lets them through only with a capability this process lacks), {absent} \
         known exceptions not called (kernel/README.md)",
        missing.len(),
        unverified.len()
    );
    if missing.is_empty() {
        0
    } else {
        println!("missing: {}", missing.join(" "));
        1
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Ok,
    Missing(String),
    Unverified(String),
}

const ENOSYS: i64 = libc::ENOSYS as i64;
const EPERM: i64 = libc::EPERM as i64;
const EOPNOTSUPP: i64 = libc::EOPNOTSUPP as i64;

fn judge(s: &Syscall, out: Outcome, caps: u64) -> Verdict {
    let has_cap = s.caps.is_empty() || s.caps.iter().any(|c| cap_bit(c) & caps != 0);
    let needs = if s.option.is_empty() {
        String::new()
    } else {
        format!("needs CONFIG_{}", s.option)
    };
    match out {
        Outcome::Returned(r) if r == -ENOSYS => {
            // Docker's profile answers clone3 with ENOSYS (so that libc falls back to clone)
            // unless the container has CAP_SYS_ADMIN.
            if s.name == "clone3" && !has_cap {
                Verdict::Unverified("ENOSYS from seccomp without CAP_SYS_ADMIN (by design)".into())
            } else {
                Verdict::Missing(needs)
            }
        }
        Outcome::Returned(r) if r == -EPERM && !has_cap => {
            Verdict::Unverified(format!("seccomp allows it with {}", s.caps.join(" or ")))
        }
        // Built, but switched off at boot: Landlock must be in the LSM list to be usable.
        Outcome::Returned(r) if r == -EOPNOTSUPP && s.name.starts_with("landlock_") => {
            Verdict::Missing("Landlock is built but not enabled (lsm= / CONFIG_LSM)".into())
        }
        _ => Verdict::Ok,
    }
}

fn describe(out: Outcome) -> String {
    match out {
        Outcome::Returned(r) if r < 0 && r > -4096 => errno_name(-r),
        Outcome::Returned(r) => format!("= {r}"),
        Outcome::Exited(c) => format!("exited {c}"),
        Outcome::Signaled(s) => format!("signal {s}"),
        Outcome::Blocked => "blocked".into(),
    }
}

fn errno_name(e: i64) -> String {
    let name = match e as i32 {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::E2BIG => "E2BIG",
        libc::EBADF => "EBADF",
        libc::ECHILD => "ECHILD",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EEXIST => "EEXIST",
        libc::ENOTDIR => "ENOTDIR",
        libc::EINVAL => "EINVAL",
        libc::ENOTTY => "ENOTTY",
        libc::ESPIPE => "ESPIPE",
        libc::ERANGE => "ERANGE",
        libc::ENOSYS => "ENOSYS",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOTSOCK => "ENOTSOCK",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::ENOSPC => "ENOSPC",
        libc::ENODEV => "ENODEV",
        libc::ENXIO => "ENXIO",
        _ => return format!("errno {e}"),
    };
    name.into()
}

/// The capability bit for a name the profile uses.
fn cap_bit(name: &str) -> u64 {
    let n = match name {
        "CAP_DAC_READ_SEARCH" => 2,
        "CAP_SYS_MODULE" => 16,
        "CAP_SYS_RAWIO" => 17,
        "CAP_SYS_CHROOT" => 18,
        "CAP_SYS_PTRACE" => 19,
        "CAP_SYS_PACCT" => 20,
        "CAP_SYS_ADMIN" => 21,
        "CAP_SYS_BOOT" => 22,
        "CAP_SYS_NICE" => 23,
        "CAP_SYS_TIME" => 25,
        "CAP_SYS_TTY_CONFIG" => 26,
        "CAP_SYSLOG" => 34,
        "CAP_PERFMON" => 38,
        "CAP_BPF" => 39,
        _ => return 0,
    };
    1 << n
}

/// This process's effective capability set, from capget(2) (0 if it cannot be read).
fn effective_caps() -> u64 {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut h = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut d = [Data::default(); 2];
    // SAFETY: capget writes two `Data` records (version 3) into `d` and may update `h`; both
    // are live, correctly sized and exclusively borrowed for the call.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut h as *mut Header, d.as_mut_ptr()) };
    if r != 0 {
        return 0;
    }
    u64::from(d[0].effective) | (u64::from(d[1].effective) << 32)
}

/// Makes one call in a forked child (in its own session, so that vhangup and signals stay
/// there), and reports what happened.
fn call_in_child(s: &Syscall) -> Outcome {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two fds into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        panic!("pipe2: {}", std::io::Error::last_os_error());
    }
    let (rd, wr) = (fds[0], fds[1]);
    // SAFETY: the probe is single-threaded, so the child may run any code; it only makes raw
    // syscalls and leaves through _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        panic!("fork: {}", std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: in the child: plain syscalls on our own fds, then _exit without unwinding.
        unsafe {
            libc::close(rd);
            libc::setsid();
            let r = match s.kind {
                Kind::Forks => raw_syscall_child_exits(s.nr, s.args),
                _ => raw_syscall(s.nr, s.args),
            };
            let bytes = r.to_ne_bytes();
            libc::write(wr, bytes.as_ptr().cast(), bytes.len());
            libc::_exit(0);
        }
    }
    // SAFETY: closing our copy of the write end, which nothing else uses.
    unsafe { libc::close(wr) };
    // The child writes its result, or closes the pipe by exiting or dying; a call still
    // blocked after BLOCK_LIMIT is implemented (ENOSYS returns at once).
    let mut pfd = libc::pollfd {
        fd: rd,
        events: libc::POLLIN,
        revents: 0,
    };
    let limit = BLOCK_LIMIT.as_millis() as i32;
    let deadline = Instant::now() + BLOCK_LIMIT;
    let mut blocked = false;
    loop {
        // SAFETY: poll on one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, limit) };
        if r > 0 {
            break;
        }
        if r == 0 || Instant::now() > deadline {
            blocked = true;
            // SAFETY: ending our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            break;
        }
    }
    let mut status = 0;
    // SAFETY: reaping our own child with a valid status pointer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let mut buf = [0u8; 8];
    // SAFETY: reading at most 8 bytes into an 8-byte buffer from our pipe.
    let n = unsafe { libc::read(rd, buf.as_mut_ptr().cast(), buf.len()) };
    // SAFETY: closing our read end.
    unsafe { libc::close(rd) };
    if n == 8 {
        return Outcome::Returned(i64::from_ne_bytes(buf));
    }
    if blocked {
        Outcome::Blocked
    } else if libc::WIFSIGNALED(status) {
        Outcome::Signaled(libc::WTERMSIG(status))
    } else {
        Outcome::Exited(libc::WEXITSTATUS(status))
    }
}

/// One raw x86-64 syscall; returns `rax` (a negative errno on failure).
///
/// # Safety
/// The call may do anything the syscall does with these arguments; callers run it in a
/// throw-away child.
unsafe fn raw_syscall(nr: u64, a: [u64; 6]) -> i64 {
    let ret: i64;
    // SAFETY: the syscall instruction clobbers rcx and r11 only; the caller accepts its effects.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") nr as i64 => ret,
            in("rdi") a[0], in("rsi") a[1], in("rdx") a[2],
            in("r10") a[3], in("r8") a[4], in("r9") a[5],
            lateout("rcx") _, lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// Like [`raw_syscall`] for fork, vfork and clone: a new process leaves through exit(0) at
/// the instruction after `syscall`, before it touches memory (vfork shares the stack).
///
/// # Safety
/// As [`raw_syscall`].
unsafe fn raw_syscall_child_exits(nr: u64, a: [u64; 6]) -> i64 {
    let ret: i64;
    // SAFETY: as raw_syscall; the new process runs only these instructions and exits.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "mov eax, 60",
            "xor edi, edi",
            "syscall",
            "2:",
            inlateout("rax") nr as i64 => ret,
            inlateout("rdi") a[0] => _, in("rsi") a[1], in("rdx") a[2],
            in("r10") a[3], in("r8") a[4], in("r9") a[5],
            lateout("rcx") _, lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_unique_and_x86_64() {
        let mut last = None;
        for s in ALLOWED {
            assert!(last < Some(s.nr), "{} out of order", s.name);
            last = Some(s.nr);
            assert!(s.nr < 512, "{} is not a 64-bit number", s.name);
        }
        assert_eq!(ALLOWED.len(), 347);
    }

    #[test]
    fn every_capability_named_is_known() {
        for s in ALLOWED {
            for c in s.caps {
                assert_ne!(cap_bit(c), 0, "{}: unknown {c}", s.name);
            }
        }
    }

    #[test]
    fn enosys_is_missing_unless_clone3_without_admin() {
        let clone3 = ALLOWED.iter().find(|s| s.name == "clone3").unwrap();
        let madvise = ALLOWED.iter().find(|s| s.name == "madvise").unwrap();
        let enosys = Outcome::Returned(-ENOSYS);
        assert!(matches!(judge(madvise, enosys, 0), Verdict::Missing(_)));
        assert!(matches!(judge(clone3, enosys, 0), Verdict::Unverified(_)));
        assert!(matches!(
            judge(clone3, enosys, cap_bit("CAP_SYS_ADMIN")),
            Verdict::Missing(_)
        ));
        let eperm = Outcome::Returned(-EPERM);
        assert_eq!(judge(madvise, eperm, 0), Verdict::Ok);
    }

    #[test]
    fn host_kernel_implements_getpid_and_reports_enosys() {
        let getpid = ALLOWED.iter().find(|s| s.name == "getpid").unwrap();
        assert!(matches!(call_in_child(getpid), Outcome::Returned(r) if r > 0));
        let bogus = Syscall { nr: 511, ..*getpid };
        assert_eq!(call_in_child(&bogus), Outcome::Returned(-ENOSYS));
        let exit = ALLOWED.iter().find(|s| s.name == "exit").unwrap();
        assert_eq!(call_in_child(exit), Outcome::Exited(0));
        let vfork = ALLOWED.iter().find(|s| s.name == "vfork").unwrap();
        assert!(matches!(call_in_child(vfork), Outcome::Returned(r) if r > 0));
    }
}
