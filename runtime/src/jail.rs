//! The jail every host process of a sandbox goes through: QEMU, virtiofsd and
//! vhost-device-vsock are started as root by the shim, and a guest that breaks out of a device
//! emulation lands in one of them. [`Jail`] says what such a process may still do, and
//! [`Jail::apply`] makes the child take those steps between fork and exec:
//!
//! - its own mount (and IPC, optionally network) namespace, where Docker's overlay mounts
//!   can be unmounted and the engine's files covered, without the host seeing any of it;
//! - the whole file tree read-only there (`mount_setattr(AT_RECURSIVE)`), but for the paths
//!   the process must write;
//! - a Landlock domain that allows writes only beneath named directories (the container's
//!   writable layer), so no rename, link or create can touch what the engine trusts;
//! - `no_new_privs`, and for processes that need no privilege, no capabilities at all:
//!   uid 0 under `SECBIT_NOROOT` with an empty bounding set gains none at exec.
//!
//! Seccomp filters come from the programs themselves (QEMU's `-sandbox`, virtiofsd's
//! `--seccomp`), installed after their start-up. docs/security.md has the threat model.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};

// Landlock's ABI (include/uapi/linux/landlock.h); libc has the syscall numbers only.
const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
const LANDLOCK_RULE_PATH_BENEATH: libc::c_int = 1;
const FS_WRITE_FILE: u64 = 1 << 1;
const FS_REMOVE_DIR: u64 = 1 << 4;
const FS_REMOVE_FILE: u64 = 1 << 5;
const FS_MAKE_CHAR: u64 = 1 << 6;
const FS_MAKE_DIR: u64 = 1 << 7;
const FS_MAKE_REG: u64 = 1 << 8;
const FS_MAKE_SOCK: u64 = 1 << 9;
const FS_MAKE_FIFO: u64 = 1 << 10;
const FS_MAKE_BLOCK: u64 = 1 << 11;
const FS_MAKE_SYM: u64 = 1 << 12;
const FS_REFER: u64 = 1 << 13;
const FS_TRUNCATE: u64 = 1 << 14;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

use crate::fsmount::{MountAttr, AT_RECURSIVE, MOUNT_ATTR_RDONLY};

const SECBIT_NOROOT: libc::c_ulong = 1 << 0;
const SECBIT_NOROOT_LOCKED: libc::c_ulong = 1 << 1;
const SECBIT_NO_SETUID_FIXUP: libc::c_ulong = 1 << 2;
const SECBIT_NO_SETUID_FIXUP_LOCKED: libc::c_ulong = 1 << 3;
/// Higher than any capability number a kernel has today (40 in 6.x); dropping an unknown
/// one fails with EINVAL, which ends the loop.
const CAP_PROBE_LIMIT: libc::c_ulong = 64;

/// The Landlock ABI version of the running kernel, or `None` without Landlock (not built,
/// or not in the `lsm=` list).
pub fn landlock_abi() -> Option<u32> {
    // SAFETY: the version query takes no pointers (NULL attr, size 0) and returns a number.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    (v > 0).then_some(v as u32)
}

/// The write-type access rights of Landlock ABI `abi` that the jail handles: writing file
/// contents, making and removing directory entries, links and renames between directories
/// (REFER, ABI 2) and truncation (ABI 3). Reads are not restricted: the mount namespace
/// decides what there is to read.
fn write_rights(abi: u32) -> u64 {
    let mut r = FS_WRITE_FILE
        | FS_REMOVE_DIR
        | FS_REMOVE_FILE
        | FS_MAKE_CHAR
        | FS_MAKE_DIR
        | FS_MAKE_REG
        | FS_MAKE_SOCK
        | FS_MAKE_FIFO
        | FS_MAKE_BLOCK
        | FS_MAKE_SYM;
    if abi >= 2 {
        r |= FS_REFER;
    }
    if abi >= 3 {
        r |= FS_TRUNCATE;
    }
    r
}

/// The Landlock ABI the layered root needs: REFER (2) lets the guest's overlay rename from
/// its work dir into the writable layer; under ABI 1 every such rename is refused.
pub const LANDLOCK_MIN_ABI: u32 = 2;

/// A Landlock ruleset that allows writing only beneath some directories; made in the parent,
/// enforced by the child ([`Jail::apply`]).
#[derive(Debug)]
pub struct WriteRules {
    fd: OwnedFd,
}

impl WriteRules {
    /// Rules allowing every write beneath each of `dirs` (opened without following a final
    /// symlink: the rule is bound to the directory found now, whatever its name later), and
    /// no write anywhere else but block devices, which are refused everywhere.
    pub fn new(dirs: &[PathBuf]) -> Result<WriteRules> {
        let abi = landlock_abi()
            .filter(|v| *v >= LANDLOCK_MIN_ABI)
            .ok_or_else(|| Error::Missing {
                what: format!("Landlock ABI {LANDLOCK_MIN_ABI} (Linux 5.19+)"),
                hint: "boot the host with landlock in its lsm= list (CONFIG_SECURITY_LANDLOCK)"
                    .into(),
            })?;
        let handled = write_rights(abi);
        let attr = RulesetAttr {
            handled_access_fs: handled,
        };
        // SAFETY: attr is a valid ruleset_attr of the size passed; the kernel returns a new fd.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &attr as *const RulesetAttr,
                std::mem::size_of::<RulesetAttr>(),
                0u32,
            )
        };
        if fd < 0 {
            return Err(Error::io(
                "create a Landlock ruleset for",
                dirs.first().cloned().unwrap_or_default(),
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: the syscall returned a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        // /dev/null stays writable: daemons and shells send output there.
        let null = std::fs::File::options()
            .write(true)
            .open("/dev/null")
            .map_err(|e| Error::io("open", "/dev/null", e))?;
        let mut rules = vec![(OwnedFd::from(null), handled & (FS_WRITE_FILE | FS_TRUNCATE))];
        for dir in dirs {
            rules.push((open_dir_nofollow(dir)?, handled & !FS_MAKE_BLOCK));
        }
        for (i, (d, allowed_access)) in rules.iter().enumerate() {
            let rule = PathBeneathAttr {
                allowed_access: *allowed_access,
                parent_fd: d.as_raw_fd(),
            };
            // SAFETY: both fds are open; rule is a valid path_beneath_attr.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_landlock_add_rule,
                    fd.as_raw_fd(),
                    LANDLOCK_RULE_PATH_BENEATH,
                    &rule as *const PathBeneathAttr,
                    0u32,
                )
            };
            if r != 0 {
                let rule_for = match dirs.get(i.wrapping_sub(1)) {
                    Some(d) => d.clone(),
                    None => PathBuf::from("/dev/null"),
                };
                return Err(Error::io(
                    "add a Landlock rule for",
                    rule_for,
                    std::io::Error::last_os_error(),
                ));
            }
        }
        Ok(WriteRules { fd })
    }
}

/// Opens `dir` as an `O_PATH` descriptor, refusing a symlink in its last component.
pub fn open_dir_nofollow(dir: &Path) -> Result<OwnedFd> {
    let c = cstring(dir)?;
    // SAFETY: c is a valid C string; open returns a new fd or -1.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(Error::io(
            "open (no symlinks)",
            dir,
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: a fresh fd owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn cstring(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::Invalid(format!("{} holds a NUL byte", p.display())))
}

/// A path of the engine's covered in the jail's mount namespace by an empty, read-only
/// file or directory of the jail's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cover {
    pub path: PathBuf,
    pub dir: bool,
}

/// What a jailed process may do. Built by the caller, applied by [`Jail::apply`].
#[derive(Debug, Default)]
pub struct Jail {
    /// Own mount and IPC namespaces (everything below needs the first).
    pub mount_ns: bool,
    /// Own, empty network namespace as well (for daemons that use only unix sockets).
    pub net_ns: bool,
    /// Mounts to take away first (Docker's overlay of the root under a shared layer dir).
    pub detach: Vec<PathBuf>,
    /// Paths covered by empty read-only stand-ins (`empty` holds them).
    pub cover: Vec<Cover>,
    /// A private directory with the stand-ins: `empty.d/` and `empty` (made by [`Jail::apply`]).
    pub empty: Option<PathBuf>,
    /// The whole file tree read-only, but for `writable`.
    pub readonly: bool,
    pub writable: Vec<PathBuf>,
    /// Writes allowed only beneath these directories (Landlock).
    pub landlock: Option<WriteRules>,
    /// No capabilities after exec: uid 0 without privilege (needs nothing of root's).
    pub unprivileged: bool,
    /// Runs as this uid and gid, no supplementary groups (implies `unprivileged`'s empty
    /// bounding set).
    pub user: Option<(u32, u32)>,
    /// The helpers' seccomp filter ([`helper_filter`]), for programs without one of their own.
    pub seccomp: bool,
    /// A file server that may not set setuid/setgid bits ([`setid_filter`]).
    pub deny_setid: bool,
    /// A root of its own: a tmpfs at `staging` holding only `keep` (each at its own path,
    /// bound from the host; symlinks among them copied as symlinks), pivoted into.
    pub root: Option<MinimalRoot>,
}

/// A file tree holding only what a program needs ([`Jail::root`]).
#[derive(Debug, Clone, Default)]
pub struct MinimalRoot {
    /// An empty directory of the runtime's where the tmpfs is mounted (in the child's
    /// namespace only).
    pub staging: PathBuf,
    /// Absolute host paths: directories, files, device nodes, sockets or symlinks.
    pub keep: Vec<PathBuf>,
    /// The uid and gid the program will run as: character devices in `keep` are then made
    /// afresh in the root (same device number, mode 0600, owned by them) instead of bound
    /// from the host, so a device only root may open on the host (`/dev/kvm`) opens for it.
    pub owner: Option<(u32, u32)>,
}

impl MinimalRoot {
    /// The root of a dynamically linked program: [`PROGRAM_PATHS`] and `extra`.
    pub fn program(staging: PathBuf, extra: impl IntoIterator<Item = PathBuf>) -> MinimalRoot {
        let mut keep: Vec<PathBuf> = PROGRAM_PATHS.iter().map(PathBuf::from).collect();
        keep.extend(extra);
        MinimalRoot {
            staging,
            keep,
            owner: None,
        }
    }
}

/// The host paths every dynamically linked program needs: its libraries and the loader.
pub const PROGRAM_PATHS: &[&str] = &[
    "/usr",
    "/lib",
    "/lib64",
    "/bin",
    "/sbin",
    "/etc/ld.so.cache",
    "/proc",
    "/sys",
    "/dev/null",
    "/dev/zero",
    "/dev/urandom",
];

/// What the child makes in its new root before binding, prepared before the fork.
#[derive(Debug, Default)]
struct RootPlan {
    staging: CString,
    old: CString,
    dirs: Vec<CString>,
    files: Vec<CString>,
    symlinks: Vec<(CString, CString)>,
    binds: Vec<(CString, CString)>,
    /// Character devices made afresh: path, device number.
    nodes: Vec<(CString, libc::dev_t)>,
    owner: Option<(u32, u32)>,
}

impl RootPlan {
    fn new(root: &MinimalRoot) -> Result<RootPlan> {
        use std::os::unix::ffi::OsStrExt;
        let inside = |p: &Path| -> PathBuf { root.staging.join(p.strip_prefix("/").unwrap_or(p)) };
        let mut plan = RootPlan {
            staging: cstring(&root.staging)?,
            old: cstring(&root.staging.join(".old"))?,
            owner: root.owner,
            ..RootPlan::default()
        };
        let mut dirs: Vec<PathBuf> = Vec::new();
        let add_parents = |p: &Path, dirs: &mut Vec<PathBuf>| {
            let mut parents: Vec<PathBuf> = p
                .ancestors()
                .skip(1)
                .take_while(|a| *a != Path::new("/") && !a.as_os_str().is_empty())
                .map(&inside)
                .collect();
            parents.reverse();
            for d in parents {
                if !dirs.contains(&d) {
                    dirs.push(d);
                }
            }
        };
        for p in &root.keep {
            if !p.is_absolute() {
                return Err(Error::Invalid(format!("{} is not absolute", p.display())));
            }
            let Ok(m) = std::fs::symlink_metadata(p) else {
                continue; // not on this host (/lib64 on some)
            };
            add_parents(p, &mut dirs);
            let dst = inside(p);
            if m.file_type().is_symlink() {
                let target = std::fs::read_link(p).map_err(|e| Error::io("read", p, e))?;
                plan.symlinks.push((
                    CString::new(target.as_os_str().as_bytes())
                        .map_err(|_| Error::Invalid("NUL in a symlink".into()))?,
                    cstring(&dst)?,
                ));
                continue;
            }
            if root.owner.is_some() && {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_char_device()
            } {
                use std::os::unix::fs::MetadataExt;
                plan.nodes.push((cstring(&dst)?, m.rdev()));
                continue;
            }
            if m.is_dir() {
                if !dirs.contains(&dst) {
                    dirs.push(dst.clone());
                }
            } else {
                plan.files.push(cstring(&dst)?);
            }
            plan.binds.push((cstring(p)?, cstring(&dst)?));
        }
        // Parents first: a directory kept whole may hold a later one's mount point.
        plan.dirs = dirs.iter().map(|d| cstring(d)).collect::<Result<_>>()?;
        Ok(plan)
    }

    /// The child's side: a tmpfs at the staging dir, the kept paths bound into it, then
    /// pivot_root. Syscalls only.
    ///
    /// # Safety
    /// Between fork and exec only; every pointer is owned by `self`.
    unsafe fn enter(&self) -> std::io::Result<()> {
        let null = std::ptr::null::<libc::c_char>();
        // SAFETY: NUL-terminated strings owned by self; the caller is the forked child.
        unsafe {
            // Device nodes of its own need a tmpfs that honours them.
            let nodev = if self.nodes.is_empty() {
                libc::MS_NODEV
            } else {
                0
            };
            check(libc::mount(
                c"tmpfs".as_ptr(),
                self.staging.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | nodev,
                c"mode=0755".as_ptr().cast(),
            ) as _)?;
            for d in &self.dirs {
                if libc::mkdir(d.as_ptr(), 0o755) != 0
                    && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for f in &self.files {
                let fd = libc::open(
                    f.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o600,
                );
                check(fd as _)?;
                libc::close(fd);
            }
            for (target, link) in &self.symlinks {
                check(libc::symlink(target.as_ptr(), link.as_ptr()) as _)?;
            }
            if let Some((uid, gid)) = self.owner {
                for (node, dev) in &self.nodes {
                    check(libc::mknod(node.as_ptr(), libc::S_IFCHR | 0o600, *dev) as _)?;
                    check(libc::chown(node.as_ptr(), uid, gid) as _)?;
                }
            }
            for (src, dst) in &self.binds {
                check(libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    null,
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ) as _)?;
            }
            check(libc::mkdir(self.old.as_ptr(), 0o700) as _)?;
            check(libc::syscall(
                libc::SYS_pivot_root,
                self.staging.as_ptr(),
                self.old.as_ptr(),
            ))?;
            check(libc::chdir(c"/".as_ptr()) as _)?;
            check(libc::umount2(c"/.old".as_ptr(), libc::MNT_DETACH) as _)?;
            check(libc::rmdir(c"/.old".as_ptr()) as _)?;
        }
        Ok(())
    }
}

/// Syscalls a vhost-user helper never makes and an attacker in it would want: mounts and
/// namespaces, tracing and other processes' memory, kernel modules, kexec and BPF, keyrings,
/// file handles, io_uring (which bypasses seccomp), privilege changes, the clock and host
/// names, swap, reboot. They fail with EPERM; so does a socket of any family but AF_UNIX.
const HELPER_DENIED: &[libc::c_long] = &[
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_mount_setattr,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_pidfd_getfd,
    libc::SYS_kcmp,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_setuid,
    libc::SYS_setgid,
    libc::SYS_setreuid,
    libc::SYS_setregid,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
    libc::SYS_setgroups,
    libc::SYS_capset,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_sethostname,
    libc::SYS_setdomainname,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_syslog,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_uselib,
    libc::SYS_vhangup,
    libc::SYS_lookup_dcookie,
    libc::SYS_fanotify_init,
];

fn filter_err(e: impl Into<seccompiler::Error>) -> Error {
    Error::Invalid(format!("seccomp filter: {}", e.into()))
}

/// Compiles a deny list: the syscalls of `rules` (when a rule matches, or always for an
/// empty list) fail with EPERM, everything else is allowed.
fn deny_list(
    rules: std::collections::BTreeMap<i64, Vec<seccompiler::SeccompRule>>,
) -> Result<seccompiler::BpfProgram> {
    let filter = seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::EPERM as u32),
        seccompiler::TargetArch::x86_64,
    )
    .map_err(filter_err)?;
    seccompiler::BpfProgram::try_from(filter).map_err(filter_err)
}

/// `(arg & bits) == bits` on the low 32 bits of syscall argument `arg`.
fn has_bits(arg: u8, bits: u64) -> Result<seccompiler::SeccompCondition> {
    use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition};
    SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(bits),
        bits,
    )
    .map_err(filter_err)
}

/// A file server's filter that refuses setuid and setgid bits: chmod calls and file creations
/// (`open`/`openat` with `O_CREAT`, `mknodat`) whose mode has either bit fail with EPERM.
/// A chmod cannot tell directories from files: `chmod g+s DIR` is refused as well.
pub fn setid_filter() -> Result<seccompiler::BpfProgram> {
    use seccompiler::SeccompRule;
    const SETID: [u64; 2] = [libc::S_ISUID as u64, libc::S_ISGID as u64];
    let setid_at = |mode: u8| -> Result<Vec<SeccompRule>> {
        SETID
            .into_iter()
            .map(|b| SeccompRule::new(vec![has_bits(mode, b)?]).map_err(filter_err))
            .collect()
    };
    let created_setid = |flags: u8, mode: u8| -> Result<Vec<SeccompRule>> {
        SETID
            .into_iter()
            .map(|b| {
                SeccompRule::new(vec![
                    has_bits(flags, libc::O_CREAT as u64)?,
                    has_bits(mode, b)?,
                ])
                .map_err(filter_err)
            })
            .collect()
    };
    let mut rules = std::collections::BTreeMap::new();
    rules.insert(libc::SYS_chmod, setid_at(1)?);
    rules.insert(libc::SYS_fchmod, setid_at(1)?);
    rules.insert(libc::SYS_fchmodat, setid_at(2)?);
    rules.insert(libc::SYS_fchmodat2, setid_at(2)?);
    rules.insert(libc::SYS_mknodat, setid_at(2)?);
    rules.insert(libc::SYS_mknod, setid_at(1)?);
    rules.insert(libc::SYS_open, created_setid(1, 2)?);
    rules.insert(libc::SYS_openat, created_setid(2, 3)?);
    rules.insert(libc::SYS_creat, setid_at(1)?);
    deny_list(rules)
}

/// The helpers' seccomp filter, compiled with seccompiler: [`HELPER_DENIED`] and sockets
/// other than AF_UNIX fail with EPERM, everything else is allowed. A deny list, as QEMU's
/// `-sandbox`: installed before exec, it must let the program start.
pub fn helper_filter() -> Result<seccompiler::BpfProgram> {
    use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
    let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> =
        HELPER_DENIED.iter().map(|&nr| (nr, Vec::new())).collect();
    let not_unix = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Ne,
        libc::AF_UNIX as u64,
    )
    .map_err(filter_err)?;
    rules.insert(
        libc::SYS_socket,
        vec![SeccompRule::new(vec![not_unix]).map_err(filter_err)?],
    );
    deny_list(rules)
}

/// Everything [`Jail::apply`]'s child step needs, prepared before the fork: the child must
/// not allocate.
struct Prepared {
    mount_ns: bool,
    net_ns: bool,
    detach: Vec<CString>,
    cover: Vec<(CString, bool)>,
    empty_dir: CString,
    empty_file: CString,
    readonly: bool,
    writable: Vec<CString>,
    landlock: Option<OwnedFd>,
    unprivileged: bool,
    user: Option<(u32, u32)>,
    seccomp: Option<seccompiler::BpfProgram>,
    setid: Option<seccompiler::BpfProgram>,
    root: Option<RootPlan>,
}

impl Jail {
    /// The jail of a helper daemon that needs no privilege: own namespaces, read-only tree but
    /// `writable`, no capabilities, the helpers' seccomp filter.
    pub fn unprivileged(writable: Vec<PathBuf>, net_ns: bool) -> Jail {
        Jail {
            mount_ns: true,
            net_ns,
            readonly: true,
            writable,
            unprivileged: true,
            seccomp: true,
            ..Jail::default()
        }
    }

    /// Registers the jail with `cmd`: the child takes every step before exec and fails to
    /// start if one fails. Call it after any `pre_exec` that needs privilege (`setns`).
    pub fn apply(self, cmd: &mut std::process::Command) -> Result<()> {
        // Mount changes outside a namespace of the child's own would change the host's.
        if !self.mount_ns
            && (self.readonly
                || !self.cover.is_empty()
                || !self.detach.is_empty()
                || self.root.is_some())
        {
            return Err(Error::Invalid(
                "a jail that changes mounts needs a mount namespace of its own".into(),
            ));
        }
        let (empty_dir, empty_file) = match &self.empty {
            Some(dir) if !self.cover.is_empty() => {
                let d = dir.join("empty.d");
                let f = dir.join("empty");
                std::fs::create_dir_all(&d).map_err(|e| Error::io("create", &d, e))?;
                std::fs::write(&f, b"").map_err(|e| Error::io("create", &f, e))?;
                (cstring(&d)?, cstring(&f)?)
            }
            _ if !self.cover.is_empty() => {
                return Err(Error::Invalid(
                    "a jail that covers paths needs a dir".into(),
                ))
            }
            _ => (CString::default(), CString::default()),
        };
        let p = Prepared {
            mount_ns: self.mount_ns,
            net_ns: self.net_ns,
            detach: self
                .detach
                .iter()
                .map(|p| cstring(p))
                .collect::<Result<_>>()?,
            cover: self
                .cover
                .iter()
                .map(|c| Ok((cstring(&c.path)?, c.dir)))
                .collect::<Result<_>>()?,
            empty_dir,
            empty_file,
            readonly: self.readonly,
            writable: self
                .writable
                .iter()
                .map(|p| cstring(p))
                .collect::<Result<_>>()?,
            landlock: self.landlock.map(|r| r.fd),
            unprivileged: self.unprivileged || self.user.is_some(),
            user: self.user,
            seccomp: if self.seccomp {
                Some(helper_filter()?)
            } else {
                None
            },
            setid: if self.deny_setid {
                Some(setid_filter()?)
            } else {
                None
            },
            root: self.root.as_ref().map(RootPlan::new).transpose()?,
        };
        let p = Arc::new(p);
        // SAFETY: the closure runs in the child between fork and exec. It only makes
        // syscalls (unshare, mount, umount2, mount_setattr, prctl, landlock_restrict_self)
        // on C strings and descriptors prepared before the fork, and allocates nothing.
        unsafe {
            cmd.pre_exec(move || p.enter());
        }
        Ok(())
    }
}

fn check(r: libc::c_long) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Prepared {
    /// The child's side. Async-signal-safe: syscalls only.
    fn enter(&self) -> std::io::Result<()> {
        let null = std::ptr::null::<libc::c_char>();
        // SAFETY: every pointer passed below is a NUL-terminated C string owned by `self`
        // (alive until exec) or NULL where the syscall allows it; the structs are local.
        unsafe {
            if self.mount_ns {
                let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC;
                if self.net_ns {
                    flags |= libc::CLONE_NEWNET;
                }
                check(libc::unshare(flags) as _)?;
                check(libc::mount(
                    null,
                    c"/".as_ptr(),
                    null,
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) as _)?;
            }
            if let Some(root) = &self.root {
                root.enter()?;
            }
            for d in &self.detach {
                // Not a mount point (any more): nothing to take away.
                let _ = libc::umount2(d.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW);
            }
            // Read-only first: a bind of a writable path must not cover the covers below.
            if self.readonly {
                let ro = MountAttr {
                    attr_set: MOUNT_ATTR_RDONLY,
                    attr_clr: 0,
                    propagation: 0,
                    userns_fd: 0,
                };
                check(libc::syscall(
                    libc::SYS_mount_setattr,
                    libc::AT_FDCWD,
                    c"/".as_ptr(),
                    AT_RECURSIVE,
                    &ro as *const MountAttr,
                    std::mem::size_of::<MountAttr>(),
                ))?;
                let rw = MountAttr {
                    attr_set: 0,
                    attr_clr: MOUNT_ATTR_RDONLY,
                    propagation: 0,
                    userns_fd: 0,
                };
                for w in &self.writable {
                    // A mount of its own at the path, then writable: only that subtree.
                    check(libc::mount(
                        w.as_ptr(),
                        w.as_ptr(),
                        null,
                        libc::MS_BIND,
                        std::ptr::null(),
                    ) as _)?;
                    check(libc::syscall(
                        libc::SYS_mount_setattr,
                        libc::AT_FDCWD,
                        w.as_ptr(),
                        0,
                        &rw as *const MountAttr,
                        std::mem::size_of::<MountAttr>(),
                    ))?;
                }
            }
            for (target, dir) in &self.cover {
                let src = if *dir {
                    &self.empty_dir
                } else {
                    &self.empty_file
                };
                check(libc::mount(
                    src.as_ptr(),
                    target.as_ptr(),
                    null,
                    libc::MS_BIND,
                    std::ptr::null(),
                ) as _)?;
                check(libc::mount(
                    null,
                    target.as_ptr(),
                    null,
                    libc::MS_BIND
                        | libc::MS_REMOUNT
                        | libc::MS_RDONLY
                        | libc::MS_NOSUID
                        | libc::MS_NODEV
                        | libc::MS_NOEXEC,
                    std::ptr::null(),
                ) as _)?;
            }
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) as _)?;
            if let Some(fd) = &self.landlock {
                check(libc::syscall(
                    libc::SYS_landlock_restrict_self,
                    fd.as_raw_fd(),
                    0u32,
                ))?;
            }
            if self.unprivileged {
                // Root gains no capabilities at exec any more, and none can come back.
                let mut cap = 0;
                while cap < CAP_PROBE_LIMIT && libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) == 0
                {
                    cap += 1;
                }
                check(libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_CLEAR_ALL,
                    0,
                    0,
                    0,
                ) as _)?;
            }
            if let Some((uid, gid)) = self.user {
                // A change of credentials clears the parent-death signal: carried over.
                let mut death: libc::c_int = 0;
                check(libc::prctl(libc::PR_GET_PDEATHSIG, &mut death as *mut libc::c_int) as _)?;
                check(libc::setgroups(0, std::ptr::null()) as _)?;
                check(libc::setresgid(gid, gid, gid) as _)?;
                // Leaving uid 0 clears the permitted and effective capabilities.
                check(libc::setresuid(uid, uid, uid) as _)?;
                if death != 0 {
                    check(libc::prctl(libc::PR_SET_PDEATHSIG, death as libc::c_ulong) as _)?;
                }
            } else if self.unprivileged {
                check(libc::prctl(
                    libc::PR_SET_SECUREBITS,
                    SECBIT_NOROOT
                        | SECBIT_NOROOT_LOCKED
                        | SECBIT_NO_SETUID_FIXUP
                        | SECBIT_NO_SETUID_FIXUP_LOCKED,
                    0,
                    0,
                    0,
                ) as _)?;
            }
            // Last: the filters refuse the mounts and prctls above.
            for prog in [&self.seccomp, &self.setid].into_iter().flatten() {
                let fprog = libc::sock_fprog {
                    len: prog.len() as libc::c_ushort,
                    filter: prog.as_ptr() as *mut libc::sock_filter,
                };
                check(libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0u32,
                    &fprog as *const libc::sock_fprog,
                ))?;
            }
        }
        Ok(())
    }
}

/// Makes `fd` the child's descriptor `target` (without close-on-exec), for a program that
/// takes descriptors by number (QEMU's `fd=`). Register before [`Jail::apply`].
pub fn pass_fd(cmd: &mut std::process::Command, fd: Arc<OwnedFd>, target: RawFd) {
    // SAFETY: runs between fork and exec; dup2 and fcntl are async-signal-safe and work on
    // a descriptor kept open by `fd` (moved into the closure).
    unsafe {
        cmd.pre_exec(move || {
            let raw = fd.as_raw_fd();
            if raw == target {
                let flags = libc::fcntl(raw, libc::F_GETFD);
                check(libc::fcntl(raw, libc::F_SETFD, flags & !libc::FD_CLOEXEC) as _)?;
            } else {
                check(libc::dup2(raw, target) as _)?;
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::{share_jail, FsCache, Share, ShareTransport, VirtioFs};

    /// Whether a test that needs root and Landlock can run (under CI it must).
    fn privileged(test: &str) -> bool {
        let missing = if !nix::unistd::Uid::effective().is_root() {
            Some("needs root")
        } else if landlock_abi().unwrap_or(0) < LANDLOCK_MIN_ABI {
            Some("needs Landlock ABI 2")
        } else {
            None
        };
        crate::test_support::runnable(test, missing)
    }

    /// The container root's share of a Docker-like layer dir.
    fn root_share(layer: &Path) -> Share {
        Share {
            tag: "rootfs".into(),
            path: layer.to_path_buf(),
            readonly: false,
            transport: ShareTransport::VirtioFs(VirtioFs {
                daemon: "/bin/true".into(),
                cache: FsCache::Auto,
            }),
            overlay_upper: true,
            expose: vec!["diff".into(), "agentvm-work".into()],
            limits: Default::default(),
        }
    }

    fn run_jailed(jail: Jail, script: &str) -> (bool, String) {
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.args(["-c", script]);
        jail.apply(&mut cmd).unwrap();
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// A Docker-like layer dir shared as a container root: every attack a guest's root can
    /// make through virtiofsd on the engine's files fails inside the jail, writes into the
    /// layer and renames from agentvm's work dir into it still work, and the host sees
    /// nothing but those.
    #[test]
    fn a_shared_layer_dir_exposes_the_layer_only() {
        if !privileged("a_shared_layer_dir_exposes_the_layer_only") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let layer = tmp.path().join("overlay2/abc");
        let state = tmp.path().join("state");
        for d in ["diff", "work", "merged", "agentvm-work"] {
            std::fs::create_dir_all(layer.join(d)).unwrap();
        }
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(layer.join("link"), "SHORTID").unwrap();
        std::fs::write(layer.join("lower"), "l/AAA:l/BBB").unwrap();
        std::fs::write(layer.join("work/secret"), "engine").unwrap();
        let canary = tmp.path().join("canary");
        std::fs::create_dir(&canary).unwrap();
        // Docker's overlay of the root: a mount at merged, taken away in the jail.
        let merged = layer.join("merged");
        nix::mount::mount(
            Some("tmpfs"),
            &merged,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        std::fs::write(merged.join("in-merged"), "x").unwrap();
        let share = root_share(&layer);
        std::fs::create_dir_all(share.socket_dir(&state)).unwrap();
        let jail = share_jail(&share, &state).unwrap();
        let l = layer.display();
        let c = canary.display();
        let s = state.display();
        let script = format!(
            r#"
            fail() {{ echo "ALLOWED: $*"; bad=1; }}
            bad=0
            echo ../../../canary > {l}/link 2>/dev/null && fail write link
            echo l/../../../etc > {l}/lower 2>/dev/null && fail write lower
            mv {l}/diff {l}/diff2 2>/dev/null && fail rename diff
            rmdir {l}/agentvm-work 2>/dev/null && fail remove work dir
            mkdir {l}/evil 2>/dev/null && fail mkdir beside the layer
            ln -s / {l}/evil2 2>/dev/null && fail symlink beside the layer
            ln {l}/link {l}/diff/hardlink 2>/dev/null && fail hard link of link
            touch {l}/work/x 2>/dev/null && fail write engine work dir
            chmod 0 {l}/lower 2>/dev/null && fail chmod lower
            mknod {l}/diff/blk b 8 0 2>/dev/null && fail block device
            touch {c}/x {s}/x 2>/dev/null && fail write outside
            rmdir {c} 2>/dev/null && fail remove outside
            [ -s {l}/link ] && fail read link
            [ -e {l}/work/secret ] && fail see engine work dir
            [ -e {l}/merged/in-merged ] && fail see the engine mount
            echo data > {l}/diff/file || fail write in the layer refused
            mkdir -p {l}/diff/a/b && ln -s /etc {l}/diff/a/b/etc || fail dirs in the layer
            mknod {l}/diff/wh c 0 0 || fail whiteout refused
            echo up > {l}/agentvm-work/tmp && mv {l}/agentvm-work/tmp {l}/diff/copied \
              || fail copy-up rename refused
            exit $bad
            "#
        );
        let (ok, out) = run_jailed(jail, &script);
        let _ = nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH);
        assert!(ok, "{out}");
        // The host sees the engine's files as they were and the layer's new files.
        assert_eq!(
            std::fs::read_to_string(layer.join("link")).unwrap(),
            "SHORTID"
        );
        assert_eq!(
            std::fs::read_to_string(layer.join("lower")).unwrap(),
            "l/AAA:l/BBB"
        );
        assert!(layer.join("diff").is_dir() && canary.is_dir());
        assert!(!layer.join("evil").exists() && !layer.join("work/x").exists());
        assert_eq!(
            std::fs::read_to_string(layer.join("diff/copied")).unwrap(),
            "up\n"
        );
        assert_eq!(
            std::fs::read_to_string(layer.join("diff/file")).unwrap(),
            "data\n"
        );
        // No mount of the jail is left on the host.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.contains(&format!("{}", state.display())),
            "{mounts}"
        );
    }

    /// The host remounts its view of a layered root (`HostView::refresh`) while a racer in the
    /// share's jail (where the guest's requests run) swaps the layer and the mount point for
    /// symlinks as fast as it can: no swap gets through, and every refresh mounts the same
    /// layer at the same place.
    #[test]
    fn refreshes_race_a_jailed_symlink_swapper() {
        if !privileged("refreshes_race_a_jailed_symlink_swapper") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let layer = tmp.path().join("overlay2/abc");
        let lower = tmp.path().join("lower");
        let target = tmp.path().join("target");
        for d in ["diff", "work", "merged", "agentvm-work"] {
            std::fs::create_dir_all(layer.join(d)).unwrap();
        }
        std::fs::create_dir_all(&lower).unwrap();
        std::fs::create_dir_all(&target).unwrap();
        std::fs::write(lower.join("image-file"), "image").unwrap();
        let merged = layer.join("merged");
        crate::test_support::mount_overlay(&lower, &layer, nix::mount::MsFlags::empty());
        let view = crate::layers::HostView::find(&merged).expect("the overlay is found");
        let state = tmp.path().join("state");
        let share = root_share(&layer);
        std::fs::create_dir_all(share.socket_dir(&state)).unwrap();
        let jail = share_jail(&share, &state).unwrap();
        let (l, t) = (layer.display(), target.display());
        let script = format!(
            "end=$(( $(date +%s) + 3 )); while [ $(date +%s) -lt $end ]; do \
               mv {l}/diff {l}/d2 2>/dev/null && echo SWAPPED-DIFF && mv {l}/d2 {l}/diff; \
               ln -s {t} {l}/m2 2>/dev/null && mv -T {l}/m2 {l}/merged 2>/dev/null \
                 && echo SWAPPED-MERGED; \
               ln -s {t} {l}/diff/x 2>/dev/null && rm -f {l}/diff/x; \
             done; echo racer-done"
        );
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.args(["-c", &script])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        jail.apply(&mut cmd).unwrap();
        let racer = cmd.spawn().unwrap();
        let mut refreshed = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while std::time::Instant::now() < deadline {
            view.refresh().unwrap();
            refreshed += 1;
            let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            assert!(!mi.contains(&format!(" {} ", target.display())), "{mi}");
            let now = crate::layers::HostView::find(&merged).expect("the root is mounted");
            assert_eq!(now.upper, view.upper);
            assert_eq!(
                std::fs::read_to_string(merged.join("image-file")).unwrap(),
                "image"
            );
        }
        let out = racer.wait_with_output().unwrap();
        let _ = nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("racer-done"), "{text}");
        assert!(!text.contains("SWAPPED"), "{text}");
        assert!(refreshed > 3, "only {refreshed} refreshes");
        view.untouched().unwrap();
    }

    /// A program in a minimal root sees only what was kept: its libraries, a kept file, no
    /// host secret, no other state.
    #[test]
    fn a_minimal_root_holds_only_what_is_kept() {
        if !privileged("a_minimal_root_holds_only_what_is_kept") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let kept = tmp.path().join("disk.img");
        let hidden = tmp.path().join("other-sandbox-state");
        std::fs::write(&kept, "kept").unwrap();
        std::fs::write(&hidden, "secret").unwrap();
        let staging = tmp.path().join("root");
        std::fs::create_dir(&staging).unwrap();
        let root = MinimalRoot::program(staging, [kept.clone()]);
        let script = format!(
            "cat {k}; echo; ls /; [ -e {h} ] && echo SEES-HIDDEN; [ -e /etc/shadow ] && \
             echo SEES-SHADOW; [ -e /var/lib ] && echo SEES-VAR; touch /usr/x 2>/dev/null && \
             echo WROTE; cat /proc/self/status | grep -c NoNewPrivs",
            k = kept.display(),
            h = hidden.display()
        );
        let jail = Jail {
            mount_ns: true,
            readonly: true,
            unprivileged: true,
            root: Some(root),
            ..Jail::default()
        };
        let (ok, out) = run_jailed(jail, &script);
        assert!(ok, "{out}");
        assert!(out.starts_with("kept"), "{out}");
        for bad in ["SEES-HIDDEN", "SEES-SHADOW", "SEES-VAR", "WROTE"] {
            assert!(!out.contains(bad), "{bad}: {out}");
        }
        // Nothing of the jail's stays mounted on the host.
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mi.contains(&tmp.path().display().to_string()), "{mi}");
    }

    /// A program jailed as a sandbox's own uid: that uid and gid, no groups, no capability,
    /// a device node of its own that it may open (the host's stays root's), and nothing of
    /// root's files it could read before.
    #[test]
    fn a_sandbox_user_opens_its_own_device_nodes_and_nothing_of_roots() {
        if !privileged("a_sandbox_user_opens_its_own_device_nodes_and_nothing_of_roots") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let secret = tmp.path().join("root-only");
        std::fs::write(&secret, "secret").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let staging = tmp.path().join("root");
        std::fs::create_dir(&staging).unwrap();
        let ids = (0x7a00_4242, 0x7a00_4242);
        let mut root = MinimalRoot::program(staging, [secret.clone(), "/dev/net/tun".into()]);
        root.owner = Some(ids);
        let jail = Jail {
            mount_ns: true,
            readonly: true,
            user: Some(ids),
            root: Some(root),
            ..Jail::default()
        };
        let script = format!(
            "id -u; id -g; grep -E '^(CapEff|CapPrm|CapBnd|Groups):' /proc/self/status; \
             ls -ln /dev/net/tun; (exec 3<>/dev/net/tun) && echo OPENED-TUN; \
             cat {s} 2>/dev/null && echo READ-SECRET; kill -0 1 2>/dev/null && echo SIGNALS-INIT; \
             echo end",
            s = secret.display()
        );
        let (ok, out) = run_jailed(jail, &script);
        assert!(ok, "{out}");
        let lines: Vec<&str> = out.lines().collect();
        let id = ids.0.to_string();
        assert_eq!(&lines[..2], [id.as_str(), id.as_str()], "{out}");
        for cap in [
            "CapEff:\t0000000000000000",
            "CapPrm:\t0000000000000000",
            "CapBnd:\t0000000000000000",
        ] {
            assert!(out.contains(cap), "{cap}: {out}");
        }
        let groups = out.lines().find(|l| l.starts_with("Groups:"));
        assert_eq!(groups.map(str::trim), Some("Groups:"), "{out}");
        assert!(
            out.contains(&format!("{id} {id}")),
            "the node is its own: {out}"
        );
        assert!(out.contains("OPENED-TUN"), "{out}");
        assert!(
            !out.contains("READ-SECRET") && !out.contains("SIGNALS-INIT"),
            "{out}"
        );
        assert!(out.ends_with("end\n"), "{out}");
        // The host's node is untouched.
        use std::os::unix::fs::MetadataExt;
        let host = std::fs::metadata("/dev/net/tun").unwrap();
        assert_eq!((host.uid(), host.mode() & 0o777), (0, 0o600));
    }

    #[test]
    fn mount_changes_need_a_namespace() {
        let jail = Jail {
            readonly: true,
            ..Jail::default()
        };
        let e = jail
            .apply(&mut std::process::Command::new("/bin/true"))
            .unwrap_err();
        assert!(e.to_string().contains("mount namespace"), "{e}");
    }

    /// A file server for a container without CAP_FSETID: no setuid or setgid bit reaches a
    /// file, whichever call the guest's request becomes; everything else works. Needs no root.
    #[test]
    fn setid_bits_are_refused_to_a_file_server() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().display();
        let script = format!(
            "cd {d} && touch f && chmod 0755 f && echo plain-ok; \
             chmod u+s f 2>/dev/null && echo SUID; chmod g+s f 2>/dev/null && echo SGID; \
             chmod 4755 f 2>/dev/null && echo SUID-OCTAL; \
             mkdir shared && echo dir-ok; mkfifo p && echo fifo-ok; \
             cp -p f g && echo copy-ok; true"
        );
        let jail = Jail {
            deny_setid: true,
            ..Jail::default()
        };
        let (ok, out) = run_jailed(jail, &script);
        assert!(ok, "{out}");
        for good in ["plain-ok", "dir-ok", "fifo-ok", "copy-ok"] {
            assert!(out.contains(good), "{good} missing: {out}");
        }
        assert!(!out.contains("SUID") && !out.contains("SGID"), "{out}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(tmp.path().join("f"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o6000, 0, "{mode:o}");
    }

    /// A helper with no privilege: no capabilities after exec, no_new_privs, its own mount
    /// and network namespaces, and writes only in its dir.
    #[test]
    fn an_unprivileged_helper_holds_no_capability() {
        if !privileged("an_unprivileged_helper_holds_no_capability") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("vsock");
        std::fs::create_dir(&dir).unwrap();
        let script = format!(
            "grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; \
             unshare -n true 2>/dev/null && echo unshared; \
             readlink /proc/self/ns/mnt /proc/self/ns/net; \
             touch {d}/ok && echo wrote-dir; touch {t}/no 2>/dev/null && echo wrote-outside; true",
            d = dir.display(),
            t = tmp.path().display()
        );
        let (ok, out) = run_jailed(Jail::unprivileged(vec![dir.clone()], true), &script);
        assert!(ok, "{out}");
        assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
        assert!(out.contains("CapPrm:\t0000000000000000"), "{out}");
        assert!(out.contains("CapBnd:\t0000000000000000"), "{out}");
        assert!(out.contains("NoNewPrivs:\t1"), "{out}");
        assert!(
            out.contains("Seccomp:\t2") && !out.contains("unshared"),
            "{out}"
        );
        assert!(
            out.contains("wrote-dir") && !out.contains("wrote-outside"),
            "{out}"
        );
        for ns in ["mnt", "net"] {
            let host = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
            assert!(!out.contains(&host.display().to_string()), "{ns}: {out}");
        }
    }
}
