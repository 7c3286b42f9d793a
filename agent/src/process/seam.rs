//! The syscall seam of process setup: everything the child does between `fork` and `exec`.
//!
//! [`Real`] makes the syscalls; it must not allocate, since it runs in a forked child.
//! [`Recorder`] (tests only) records the calls so that the order is tested without root.

use std::ffi::CStr;
use std::os::raw::c_char;

use nix::errno::Errno;

use super::plan::CapSets;
use super::rlimit::Resource;
use crate::seccomp::Insn;

/// `struct sock_fprog`: a BPF program for `seccomp(2)`.
#[repr(C)]
#[derive(Debug)]
pub struct SockFprog {
    len: libc::c_ushort,
    filter: *const Insn,
}

impl SockFprog {
    /// The program of `insns`, which must outlive every use of the result. A program longer
    /// than the kernel takes (4096 instructions) gets a length the kernel refuses (EINVAL).
    pub fn of(insns: &[Insn]) -> Self {
        Self {
            len: libc::c_ushort::try_from(insns.len()).unwrap_or(libc::c_ushort::MAX),
            filter: insns.as_ptr(),
        }
    }
}

/// `seccomp(2)`'s `SECCOMP_SET_MODE_FILTER`.
const SECCOMP_SET_MODE_FILTER: libc::c_ulong = 1;

/// The syscalls of process setup.
pub trait Syscalls {
    /// `setsid()`: a new session, so the process can own a controlling terminal.
    fn setsid(&mut self) -> Result<(), Errno>;
    /// `ioctl(0, TIOCSCTTY)`: stdin (a pty slave) becomes the controlling terminal.
    fn set_controlling_tty(&mut self) -> Result<(), Errno>;
    /// Writes `0` to the `cgroup.procs` file at `procs`: the calling process joins that cgroup.
    fn join_cgroup(&mut self, procs: &CStr) -> Result<(), Errno>;
    /// `unshare(CLONE_NEWNS)`, then every mount a slave of the agent's: a mount namespace of
    /// the process's own (a pod container's init).
    fn unshare_mounts(&mut self) -> Result<(), Errno>;
    /// `setns(fd, CLONE_NEWNS)`: the mount namespace of an existing container (an exec).
    fn join_mounts(&mut self, fd: i32) -> Result<(), Errno>;
    /// Mounts a procfs at `target` (the process's PID namespace's, seen from inside it).
    fn mount_proc(&mut self, target: &CStr) -> Result<(), Errno>;
    fn chroot(&mut self, path: &CStr) -> Result<(), Errno>;
    /// Makes the mount at `root` the root of the caller's (own) mount namespace: moves it
    /// onto `/` and enters it (`chdir(root)`, `mount(".", "/", MS_MOVE)`, `chroot(".")`), as
    /// `switch_root` leaves an initramfs. Unlike a `chroot` into a directory, the process's
    /// root is then the namespace's, so the kernel lets it make user namespaces (it refuses
    /// a chrooted process); `pivot_root` cannot be used here: the guest's own root is the
    /// initramfs, which has no parent mount.
    fn enter_root(&mut self, root: &CStr) -> Result<(), Errno>;
    fn chdir(&mut self, path: &CStr) -> Result<(), Errno>;
    fn setrlimit(&mut self, resource: Resource, soft: u64, hard: u64) -> Result<(), Errno>;
    /// `prctl(PR_CAPBSET_DROP, cap)`.
    fn drop_bounding_cap(&mut self, cap: u8) -> Result<(), Errno>;
    /// `prctl(PR_SET_KEEPCAPS)`: keep the permitted set across `setuid` away from root.
    fn set_keep_caps(&mut self, keep: bool) -> Result<(), Errno>;
    fn setgroups(&mut self, gids: &[u32]) -> Result<(), Errno>;
    fn setresgid(&mut self, gid: u32) -> Result<(), Errno>;
    fn setresuid(&mut self, uid: u32) -> Result<(), Errno>;
    /// `capset()`: the effective, permitted and inheritable sets.
    fn capset(&mut self, sets: &CapSets) -> Result<(), Errno>;
    /// `prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)`.
    fn clear_ambient_caps(&mut self) -> Result<(), Errno>;
    /// `prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)`.
    fn raise_ambient_cap(&mut self, cap: u8) -> Result<(), Errno>;
    /// `prctl(PR_SET_NO_NEW_PRIVS, 1)`.
    fn set_no_new_privs(&mut self) -> Result<(), Errno>;
    /// Binds `path` on itself and remounts it read-only, keeping its nosuid, nodev and
    /// noexec; a path that does not exist is left alone (`linux.readonlyPaths`).
    fn readonly_path(&mut self, path: &CStr) -> Result<(), Errno>;
    /// Binds `/dev/null` over the file `path`, or mounts an empty read-only tmpfs on the
    /// directory `path`; a path that does not exist is left alone (`linux.maskedPaths`).
    fn mask_path(&mut self, path: &CStr) -> Result<(), Errno>;
    /// `seccomp(SECCOMP_SET_MODE_FILTER, flags, program)`.
    fn load_seccomp(&mut self, flags: u32, insns: &[Insn]) -> Result<(), Errno>;
    /// `execve()`; returns only on failure. `argv` and `envp` are NULL-terminated.
    fn execve(&mut self, path: &CStr, argv: &[*const c_char], envp: &[*const c_char]) -> Errno;
}

/// The real syscalls. Allocation-free: safe to use between `fork` and `exec`.
#[derive(Debug, Default)]
pub struct Real;

fn check(ret: libc::c_int) -> Result<(), Errno> {
    Errno::result(ret).map(drop)
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

impl Syscalls for Real {
    fn setsid(&mut self) -> Result<(), Errno> {
        // SAFETY: setsid takes no arguments and touches no memory of ours.
        check(unsafe { libc::setsid() })
    }

    fn set_controlling_tty(&mut self) -> Result<(), Errno> {
        // SAFETY: TIOCSCTTY takes an integer argument (0: do not steal), no pointers.
        check(unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCSCTTY, 0) })
    }

    fn unshare_mounts(&mut self) -> Result<(), Errno> {
        // SAFETY: unshare takes a flag word; mount gets NUL-terminated constants and NULLs.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ))
        }
    }

    fn join_mounts(&mut self, fd: i32) -> Result<(), Errno> {
        // SAFETY: setns takes a descriptor and a flag word, no pointers.
        check(unsafe { libc::setns(fd, libc::CLONE_NEWNS) })
    }

    fn mount_proc(&mut self, target: &CStr) -> Result<(), Errno> {
        // SAFETY: every pointer is a NUL-terminated string alive for the call, or NULL data.
        check(unsafe {
            libc::mount(
                c"proc".as_ptr(),
                target.as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            )
        })
    }

    fn chroot(&mut self, path: &CStr) -> Result<(), Errno> {
        // SAFETY: `path` is a valid NUL-terminated string for the duration of the call.
        check(unsafe { libc::chroot(path.as_ptr()) })
    }

    fn chdir(&mut self, path: &CStr) -> Result<(), Errno> {
        // SAFETY: `path` is a valid NUL-terminated string for the duration of the call.
        check(unsafe { libc::chdir(path.as_ptr()) })
    }

    fn enter_root(&mut self, root: &CStr) -> Result<(), Errno> {
        self.chdir(root)?;
        // SAFETY: static C strings for source and target, null type and data.
        check(unsafe {
            libc::mount(
                c".".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_MOVE,
                std::ptr::null(),
            )
        })?;
        self.chroot(c".")
    }

    fn setrlimit(&mut self, resource: Resource, soft: u64, hard: u64) -> Result<(), Errno> {
        let lim = libc::rlimit64 {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: `lim` is a valid rlimit64 that outlives the call.
        check(unsafe { libc::setrlimit64(resource, &lim) })
    }

    fn drop_bounding_cap(&mut self, cap: u8) -> Result<(), Errno> {
        // SAFETY: prctl with integer arguments only.
        check(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) })
    }

    fn set_keep_caps(&mut self, keep: bool) -> Result<(), Errno> {
        // SAFETY: prctl with integer arguments only.
        check(unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, libc::c_ulong::from(keep), 0, 0, 0) })
    }

    fn setgroups(&mut self, gids: &[u32]) -> Result<(), Errno> {
        // SAFETY: `gids` points to `gids.len()` valid gid_t values for the call's duration.
        check(unsafe { libc::setgroups(gids.len(), gids.as_ptr()) })
    }

    fn setresgid(&mut self, gid: u32) -> Result<(), Errno> {
        // SAFETY: integer arguments only.
        check(unsafe { libc::setresgid(gid, gid, gid) })
    }

    fn setresuid(&mut self, uid: u32) -> Result<(), Errno> {
        // SAFETY: integer arguments only.
        check(unsafe { libc::setresuid(uid, uid, uid) })
    }

    fn capset(&mut self, sets: &CapSets) -> Result<(), Errno> {
        let header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let half = |m: u64, hi: bool| if hi { (m >> 32) as u32 } else { m as u32 };
        let data = [false, true].map(|hi| CapData {
            effective: half(sets.effective, hi),
            permitted: half(sets.permitted, hi),
            inheritable: half(sets.inheritable, hi),
        });
        // SAFETY: version 3 capset reads one header and two data structs, both valid here.
        check(unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) as libc::c_int })
    }

    fn clear_ambient_caps(&mut self) -> Result<(), Errno> {
        // SAFETY: prctl with integer arguments only.
        check(unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            )
        })
    }

    fn raise_ambient_cap(&mut self, cap: u8) -> Result<(), Errno> {
        // SAFETY: prctl with integer arguments only.
        check(unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                libc::c_ulong::from(cap),
                0,
                0,
            )
        })
    }

    fn join_cgroup(&mut self, procs: &CStr) -> Result<(), Errno> {
        // SAFETY: `procs` is NUL-terminated; the flags are constants.
        let fd = unsafe { libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(Errno::last());
        }
        // SAFETY: writes one byte from a static buffer to the descriptor opened above.
        let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        let err = Errno::last();
        // SAFETY: closes the descriptor opened above, once.
        unsafe { libc::close(fd) };
        if n == 1 {
            Ok(())
        } else {
            Err(err)
        }
    }

    fn set_no_new_privs(&mut self) -> Result<(), Errno> {
        // SAFETY: prctl with integer arguments only.
        check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
    }

    fn readonly_path(&mut self, path: &CStr) -> Result<(), Errno> {
        // SAFETY: `path` is NUL-terminated and alive for each call; the other pointers are
        // NULL or constants; `st` is a valid out buffer on the stack (all-zero is a valid
        // statvfs).
        unsafe {
            match check(libc::mount(
                path.as_ptr(),
                path.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            )) {
                Err(Errno::ENOENT) => return Ok(()),
                r => r?,
            }
            let mut st: libc::statvfs = std::mem::zeroed();
            check(libc::statvfs(path.as_ptr(), &mut st))?;
            // A bind remount must repeat the mount's locked flags. statvfs's ST_NOSUID,
            // ST_NODEV and ST_NOEXEC have the values of the MS_ flags.
            let kept =
                (st.f_flag as libc::c_ulong) & (libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC);
            check(libc::mount(
                path.as_ptr(),
                path.as_ptr(),
                std::ptr::null(),
                kept | libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                std::ptr::null(),
            ))
        }
    }

    fn mask_path(&mut self, path: &CStr) -> Result<(), Errno> {
        // SAFETY: every pointer is a NUL-terminated string alive for the call, or NULL.
        unsafe {
            let bound = check(libc::mount(
                c"/dev/null".as_ptr(),
                path.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ));
            match bound {
                Ok(()) | Err(Errno::ENOENT) => Ok(()),
                // A directory: a file cannot be bound on it.
                Err(Errno::ENOTDIR) => check(libc::mount(
                    c"tmpfs".as_ptr(),
                    path.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_RDONLY,
                    std::ptr::null(),
                )),
                Err(e) => Err(e),
            }
        }
    }

    fn load_seccomp(&mut self, flags: u32, insns: &[Insn]) -> Result<(), Errno> {
        let prog = SockFprog::of(insns);
        // SAFETY: seccomp(2) reads the sock_fprog on our stack, whose filter points at
        // `insns`, alive for the call; the kernel copies the program.
        let r = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                SECCOMP_SET_MODE_FILTER,
                libc::c_ulong::from(flags),
                &prog as *const SockFprog,
            )
        };
        check(r as libc::c_int)
    }

    fn execve(&mut self, path: &CStr, argv: &[*const c_char], envp: &[*const c_char]) -> Errno {
        debug_assert!(argv.last().is_some_and(|p| p.is_null()));
        debug_assert!(envp.last().is_some_and(|p| p.is_null()));
        // SAFETY: `path` is NUL-terminated; `argv` and `envp` are NULL-terminated arrays of
        // pointers to NUL-terminated strings owned by the plan, alive for the call.
        unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        Errno::last()
    }
}

/// A recording test double.
#[cfg(test)]
pub mod recorder {
    use super::*;

    /// One recorded call.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Call {
        Setsid,
        ControllingTty,
        JoinCgroup(String),
        UnshareMounts,
        JoinMounts(i32),
        MountProc(String),
        Chroot(String),
        EnterRoot(String),
        Chdir(String),
        Setrlimit(Resource, u64, u64),
        DropBounding(u8),
        KeepCaps(bool),
        Setgroups(Vec<u32>),
        Setresgid(u32),
        Setresuid(u32),
        Capset(CapSets),
        ClearAmbient,
        RaiseAmbient(u8),
        NoNewPrivs,
        ReadonlyPath(String),
        MaskPath(String),
        /// The program's length and flags.
        Seccomp(usize, u32),
        Execve(String),
    }

    /// Records calls; `execve` of a path fails with the errno given in `exec_results`
    /// (ENOENT by default), and `chdir` fails with `fail_chdir` when set.
    #[derive(Debug, Default)]
    pub struct Recorder {
        pub calls: Vec<Call>,
        pub exec_results: Vec<(String, Errno)>,
        pub fail_chdir: Option<Errno>,
    }

    impl Recorder {
        fn ok(&mut self, c: Call) -> Result<(), Errno> {
            self.calls.push(c);
            Ok(())
        }

        /// Index of the first call matching `pred`.
        pub fn pos(&self, pred: impl Fn(&Call) -> bool) -> usize {
            self.calls
                .iter()
                .position(pred)
                .unwrap_or_else(|| panic!("call not recorded in {:?}", self.calls))
        }
    }

    fn s(p: &CStr) -> String {
        p.to_string_lossy().into_owned()
    }

    impl Syscalls for Recorder {
        fn setsid(&mut self) -> Result<(), Errno> {
            self.ok(Call::Setsid)
        }
        fn set_controlling_tty(&mut self) -> Result<(), Errno> {
            self.ok(Call::ControllingTty)
        }
        fn join_cgroup(&mut self, procs: &CStr) -> Result<(), Errno> {
            self.calls.push(Call::JoinCgroup(s(procs)));
            // As in a guest whose cgroup a workload removed: the start goes on.
            Err(Errno::ENOENT)
        }
        fn unshare_mounts(&mut self) -> Result<(), Errno> {
            self.ok(Call::UnshareMounts)
        }
        fn join_mounts(&mut self, fd: i32) -> Result<(), Errno> {
            self.ok(Call::JoinMounts(fd))
        }
        fn mount_proc(&mut self, target: &CStr) -> Result<(), Errno> {
            self.ok(Call::MountProc(s(target)))
        }
        fn chroot(&mut self, path: &CStr) -> Result<(), Errno> {
            self.ok(Call::Chroot(s(path)))
        }
        fn enter_root(&mut self, root: &CStr) -> Result<(), Errno> {
            self.ok(Call::EnterRoot(s(root)))
        }
        fn chdir(&mut self, path: &CStr) -> Result<(), Errno> {
            self.calls.push(Call::Chdir(s(path)));
            self.fail_chdir.map_or(Ok(()), Err)
        }
        fn setrlimit(&mut self, resource: Resource, soft: u64, hard: u64) -> Result<(), Errno> {
            self.ok(Call::Setrlimit(resource, soft, hard))
        }
        fn drop_bounding_cap(&mut self, cap: u8) -> Result<(), Errno> {
            self.ok(Call::DropBounding(cap))
        }
        fn set_keep_caps(&mut self, keep: bool) -> Result<(), Errno> {
            self.ok(Call::KeepCaps(keep))
        }
        fn setgroups(&mut self, gids: &[u32]) -> Result<(), Errno> {
            self.ok(Call::Setgroups(gids.to_vec()))
        }
        fn setresgid(&mut self, gid: u32) -> Result<(), Errno> {
            self.ok(Call::Setresgid(gid))
        }
        fn setresuid(&mut self, uid: u32) -> Result<(), Errno> {
            self.ok(Call::Setresuid(uid))
        }
        fn capset(&mut self, sets: &CapSets) -> Result<(), Errno> {
            self.ok(Call::Capset(*sets))
        }
        fn clear_ambient_caps(&mut self) -> Result<(), Errno> {
            self.ok(Call::ClearAmbient)
        }
        fn raise_ambient_cap(&mut self, cap: u8) -> Result<(), Errno> {
            self.ok(Call::RaiseAmbient(cap))
        }
        fn set_no_new_privs(&mut self) -> Result<(), Errno> {
            self.ok(Call::NoNewPrivs)
        }
        fn readonly_path(&mut self, path: &CStr) -> Result<(), Errno> {
            self.ok(Call::ReadonlyPath(s(path)))
        }
        fn mask_path(&mut self, path: &CStr) -> Result<(), Errno> {
            self.ok(Call::MaskPath(s(path)))
        }
        fn load_seccomp(&mut self, flags: u32, insns: &[Insn]) -> Result<(), Errno> {
            self.ok(Call::Seccomp(insns.len(), flags))
        }
        fn execve(&mut self, path: &CStr, _: &[*const c_char], _: &[*const c_char]) -> Errno {
            let p = s(path);
            self.calls.push(Call::Execve(p.clone()));
            self.exec_results
                .iter()
                .find(|(q, _)| *q == p)
                .map_or(Errno::ENOENT, |&(_, e)| e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;

    /// Masked and read-only paths as the real syscalls make them, in a mount namespace of a
    /// forked child's own (nothing leaks into the test host's mounts).
    #[test]
    fn masked_and_readonly_paths_really_mask() {
        if !crate::testutil::as_root("masked_and_readonly_paths_really_mask", "mounts") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = |name: &str| CString::new(format!("{}/{name}", dir.path().display())).unwrap();
        std::fs::write(dir.path().join("secret"), "key").unwrap();
        std::fs::create_dir(dir.path().join("keys")).unwrap();
        std::fs::write(dir.path().join("keys/one"), "1").unwrap();
        std::fs::create_dir(dir.path().join("sys")).unwrap();
        let (secret, keys, keys_one, sys, missing) = (
            p("secret"),
            p("keys"),
            p("keys/one"),
            p("sys"),
            p("nothing/here"),
        );
        let sys_new = p("sys/new");
        let got = crate::testutil::in_child(|| {
            let mut real = Real;
            // SAFETY: integer and NUL-terminated arguments, a stack buffer for read.
            unsafe {
                if libc::unshare(libc::CLONE_NEWNS) != 0
                    || libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ) != 0
                {
                    return 1;
                }
                if real.mask_path(&secret).is_err()
                    || real.mask_path(&keys).is_err()
                    || real.mask_path(&missing).is_err()
                    || real.readonly_path(&sys).is_err()
                    || real.readonly_path(&missing).is_err()
                {
                    return 2;
                }
                // The file reads empty (it is /dev/null now).
                let fd = libc::open(secret.as_ptr(), libc::O_RDONLY);
                let mut buf = [0u8; 8];
                if fd < 0 || libc::read(fd, buf.as_mut_ptr().cast(), 8) != 0 {
                    return 3;
                }
                // The directory is empty and read-only.
                if libc::access(keys_one.as_ptr(), libc::F_OK) == 0 {
                    return 4;
                }
                let made = libc::open(sys_new.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o644);
                if made >= 0 || *libc::__errno_location() != libc::EROFS {
                    return 5;
                }
            }
            0
        });
        assert_eq!(got, 0, "step {got} failed in the child");
        // The host's view is untouched.
        assert_eq!(
            std::fs::read_to_string(dir.path().join("secret")).unwrap(),
            "key"
        );
        assert!(dir.path().join("keys/one").exists());
    }
}
