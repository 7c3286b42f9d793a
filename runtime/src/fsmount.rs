//! Mounts made through file descriptors (the kernel's new mount API: `fsopen`, `fsconfig`,
//! `fsmount`, `move_mount`) on directories opened with `openat2` and no symlink resolution.
//!
//! A host path beside what the guest writes is resolved once: each directory is opened
//! without following any symlink, its identity checked on the descriptor, and from then on
//! used only through the descriptor, so a symlink or directory swapped in after the check
//! changes nothing. `HostView::refresh` (crate::layers) remounts the engine's view of a
//! layered root this way.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_SET_FD: libc::c_uint = 5;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;

/// Mount attributes (`MOUNT_ATTR_*`) of the per-mount options `mountinfo` shows.
pub fn mount_attrs(per_mount: &str) -> u64 {
    per_mount
        .split(',')
        .map(|o| match o {
            "ro" => 0x1,
            "nosuid" => 0x2,
            "nodev" => 0x4,
            "noexec" => 0x8,
            "noatime" => 0x10,
            "strictatime" => 0x20,
            "nodiratime" => 0x80,
            "nosymfollow" => 0x0020_0000,
            _ => 0,
        })
        .fold(0, |a, b| a | b)
}

/// `struct open_how` of openat2(2) (libc's is non-exhaustive).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

fn cstr(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte"))
}

fn check(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn openat2(dir: RawFd, path: &[u8], flags: libc::c_int, resolve: u64) -> io::Result<OwnedFd> {
    let path = cstr(path)?;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve,
    };
    // SAFETY: path is a valid C string and how a live open_how of the size passed; openat2
    // returns a new fd or -1.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    })?;
    // SAFETY: a fresh fd owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

const NO_LINKS: u64 = libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;

/// Opens the directory at absolute `path` as an `O_PATH` descriptor, failing if any
/// component of the path is a symlink.
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    openat2(
        libc::AT_FDCWD,
        path.as_os_str().as_bytes(),
        libc::O_PATH | libc::O_DIRECTORY,
        NO_LINKS,
    )
}

/// Opens the directory at absolute `path` for reading (so its mode and owner can be set
/// through the descriptor), failing if any component is a symlink.
pub fn open_dir_rdonly(path: &Path) -> io::Result<OwnedFd> {
    openat2(
        libc::AT_FDCWD,
        path.as_os_str().as_bytes(),
        libc::O_RDONLY | libc::O_DIRECTORY,
        NO_LINKS,
    )
}

/// Opens the directory `name` (one component) in `dir` as an `O_PATH` descriptor: no
/// symlink, nothing outside `dir`. A mount on `name` is crossed (the descriptor is then the
/// mounted tree's root).
pub fn open_dir_in(dir: BorrowedFd<'_>, name: &std::ffi::OsStr) -> io::Result<OwnedFd> {
    if name.as_bytes().contains(&b'/') || name.is_empty() || name == ".." || name == "." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not one path component"),
        ));
    }
    openat2(
        dir.as_raw_fd(),
        name.as_bytes(),
        libc::O_PATH | libc::O_DIRECTORY,
        NO_LINKS | libc::RESOLVE_BENEATH,
    )
}

/// Device and inode of what `fd` refers to.
pub fn identity(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(io::Error::from)?;
    Ok((st.st_dev, st.st_ino))
}

/// Whether `fd` is on an overlay filesystem.
pub fn is_overlay(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let sfs = nix::sys::statfs::fstatfs(fd).map_err(io::Error::from)?;
    Ok(sfs.filesystem_type() == nix::sys::statfs::OVERLAYFS_SUPER_MAGIC)
}

/// Lazily unmounts the overlay whose root `root` is (`umount2(MNT_DETACH)` through the
/// descriptor's magic link, so no path is resolved again). Refuses anything but the root
/// of an overlay mount.
pub fn detach_overlay(root: BorrowedFd<'_>) -> io::Result<()> {
    if !is_overlay(root)? {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not an overlay: not unmounting it",
        ));
    }
    let link = cstr(format!("/proc/self/fd/{}", root.as_raw_fd()).as_bytes())?;
    // SAFETY: link is a valid C string; umount2 only reads it. The magic link resolves to
    // the very mount the descriptor holds; a descriptor that is no mount's root gets EINVAL.
    check(unsafe { libc::umount2(link.as_ptr(), libc::MNT_DETACH) }.into()).map(drop)
}

/// The layers of an overlay, as descriptors opened with [`open_dir`], and its other
/// options.
#[derive(Debug)]
pub struct OverlayLayers<'a> {
    /// Top first.
    pub lower: &'a [OwnedFd],
    pub upper: &'a OwnedFd,
    pub work: &'a OwnedFd,
    /// Paths of the same layers (lower top first, upper, work): said instead of the
    /// descriptors to a kernel whose overlayfs takes no layer descriptor (before 6.13).
    pub paths: (&'a [std::path::PathBuf], &'a Path, &'a Path),
    /// Other super options (`index=off`, `redirect_dir=on`, a flag without value).
    pub options: &'a [(String, Option<String>)],
}

/// An overlay filesystem context with every option set, not yet created: creation (and
/// the kernel's check that the upper dir is in no other overlay) is [`PendingOverlay::mount`].
#[derive(Debug)]
pub struct PendingOverlay {
    fs: OwnedFd,
}

fn fsconfig(fs: &OwnedFd, cmd: libc::c_uint, key: Option<&str>, value: Value) -> io::Result<()> {
    let key = key.map(|k| cstr(k.as_bytes())).transpose()?;
    let key_ptr = key.as_ref().map_or(std::ptr::null(), |k| k.as_ptr());
    let (val_ptr, aux): (*const libc::c_char, libc::c_int) = match &value {
        Value::None => (std::ptr::null(), 0),
        Value::Str(s) => (s.as_ptr(), 0),
        Value::Fd(fd) => (std::ptr::null(), *fd),
    };
    // SAFETY: key and value are valid C strings (or null where the command takes none) that
    // outlive the call; fsconfig only reads them.
    check(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            cmd,
            key_ptr,
            val_ptr,
            aux,
        )
    })
    .map(drop)
}

enum Value {
    None,
    Str(CString),
    Fd(RawFd),
}

/// What the kernel logged in a filesystem context (why a parameter or the creation failed).
fn context_log(fs: &OwnedFd) -> String {
    let mut out = String::new();
    let mut buf = [0u8; 1024];
    for _ in 0..8 {
        // SAFETY: buf is a live, writable buffer of the length passed.
        let n = unsafe { libc::read(fs.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        let line = String::from_utf8_lossy(&buf[..n as usize]);
        if !out.is_empty() {
            out.push_str("; ");
        }
        out.push_str(line.trim());
    }
    out
}

fn with_log(fs: &OwnedFd, what: &str, e: io::Error) -> io::Error {
    let log = context_log(fs);
    let msg = if log.is_empty() {
        format!("{what}: {e}")
    } else {
        format!("{what}: {e} ({log})")
    };
    io::Error::new(e.kind(), msg)
}

fn fsopen_overlay() -> io::Result<OwnedFd> {
    let name = cstr(b"overlay")?;
    // SAFETY: name is a valid C string; fsopen returns a new fd or -1.
    let fd = check(unsafe { libc::syscall(libc::SYS_fsopen, name.as_ptr(), FSOPEN_CLOEXEC) })?;
    // SAFETY: a fresh fd owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Escapes a layer path for overlayfs's `lowerdir` list (`:` separates layers, `\` escapes).
fn escape_layer(p: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for &b in p.as_os_str().as_bytes() {
        if b == b':' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out
}

impl PendingOverlay {
    /// Sets up an overlay context for `layers`: the layers by descriptor where the kernel
    /// takes them (6.13+), else by path.
    pub fn new(layers: &OverlayLayers<'_>) -> io::Result<PendingOverlay> {
        match Self::configure(layers, true) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Self::configure(layers, false),
            other => other,
        }
    }

    fn configure(layers: &OverlayLayers<'_>, by_fd: bool) -> io::Result<PendingOverlay> {
        let fs = fsopen_overlay()?;
        let set = |key: &str, value: Value, cmd| {
            fsconfig(&fs, cmd, Some(key), value).map_err(|e| with_log(&fs, key, e))
        };
        set("source", Value::Str(cstr(b"overlay")?), FSCONFIG_SET_STRING)?;
        if by_fd {
            for l in layers.lower {
                // An EINVAL here is a kernel without layer descriptors: the caller retries.
                fsconfig(
                    &fs,
                    FSCONFIG_SET_FD,
                    Some("lowerdir+"),
                    Value::Fd(l.as_raw_fd()),
                )?;
            }
            set(
                "upperdir",
                Value::Fd(layers.upper.as_raw_fd()),
                FSCONFIG_SET_FD,
            )?;
            set(
                "workdir",
                Value::Fd(layers.work.as_raw_fd()),
                FSCONFIG_SET_FD,
            )?;
        } else {
            let (lower, upper, work) = layers.paths;
            let list = lower
                .iter()
                .map(|p| escape_layer(p))
                .collect::<Vec<_>>()
                .join(&b':');
            set("lowerdir", Value::Str(cstr(&list)?), FSCONFIG_SET_STRING)?;
            let s = |p: &Path| cstr(p.as_os_str().as_bytes());
            set("upperdir", Value::Str(s(upper)?), FSCONFIG_SET_STRING)?;
            set("workdir", Value::Str(s(work)?), FSCONFIG_SET_STRING)?;
        }
        for (k, v) in layers.options {
            match v {
                Some(v) => set(k, Value::Str(cstr(v.as_bytes())?), FSCONFIG_SET_STRING)?,
                None => set(k, Value::None, FSCONFIG_SET_FLAG)?,
            }
        }
        Ok(PendingOverlay { fs })
    }

    /// Creates the overlay and attaches it on the directory `target` (a descriptor from
    /// [`open_dir_in`] or [`open_dir`]) with mount attributes `attrs` ([`mount_attrs`]).
    pub fn mount(self, target: BorrowedFd<'_>, attrs: u64) -> io::Result<()> {
        fsconfig(&self.fs, FSCONFIG_CMD_CREATE, None, Value::None)
            .map_err(|e| with_log(&self.fs, "create the overlay", e))?;
        // SAFETY: fsmount takes the configured context's fd and returns a new mount fd or -1.
        let mnt = check(unsafe {
            libc::syscall(
                libc::SYS_fsmount,
                self.fs.as_raw_fd(),
                FSMOUNT_CLOEXEC,
                attrs as libc::c_uint,
            )
        })?;
        // SAFETY: a fresh fd owned by nothing else.
        let mnt = unsafe { OwnedFd::from_raw_fd(mnt as RawFd) };
        let empty = cstr(b"")?;
        // SAFETY: both descriptors are live; the empty paths with the EMPTY_PATH flags make
        // move_mount use the descriptors themselves.
        check(unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                mnt.as_raw_fd(),
                empty.as_ptr(),
                target.as_raw_fd(),
                empty.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
            )
        })
        .map(drop)
    }
}

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
pub(crate) struct MountAttr {
    pub attr_set: u64,
    pub attr_clr: u64,
    pub propagation: u64,
    pub userns_fd: u64,
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
/// `AT_RECURSIVE` of open_tree(2) and mount_setattr(2).
pub(crate) const AT_RECURSIVE: libc::c_uint = 0x8000;
/// `MOUNT_ATTR_RDONLY`.
pub const MOUNT_ATTR_RDONLY: u64 = 0x1;

/// How a detached tree takes mounts made later below its source ([`set_tree_attrs`]):
/// `MS_PRIVATE`, `MS_SLAVE` or `MS_SHARED`.
pub type Propagation = u64;

fn open_tree(path: &Path) -> io::Result<OwnedFd> {
    let path = cstr(path.as_os_str().as_bytes())?;
    // SAFETY: path is a valid C string; open_tree returns a new fd or -1.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            path.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | AT_RECURSIVE,
        )
    })?;
    // SAFETY: a fresh fd owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A detached copy of the mount tree at absolute `path`, submounts included
/// (`open_tree(OPEN_TREE_CLONE | AT_RECURSIVE)`), to attach with [`attach_tree`]. With
/// `ns`, `path` is looked up in that mount namespace (e.g. the host's, from a process in a
/// namespace of its own), which sees the mounts made there after the caller's namespace was
/// made: the lookup runs on a thread of its own that leaves the process's filesystem context
/// (`unshare(CLONE_FS)`) and enters `ns`; the process stays where it is.
pub fn clone_tree(path: &Path, ns: Option<BorrowedFd<'_>>) -> io::Result<OwnedFd> {
    in_namespace(ns, || open_tree(path))
}

/// Runs `f` with paths looked up in the mount namespace `ns` (the caller's without one): on
/// a thread of its own that leaves the process's filesystem context (`unshare(CLONE_FS)`)
/// and enters `ns`; the process stays where it is.
pub fn in_namespace<T: Send>(
    ns: Option<BorrowedFd<'_>>,
    f: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    let Some(ns) = ns else {
        return f();
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare(2) takes flags only; CLONE_FS gives this thread its own root
            // and cwd, which setns(CLONE_NEWNS) needs and which end with the thread.
            if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
                return Err(io::Error::last_os_error());
            }
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNS).map_err(io::Error::from)?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the mount namespace thread panicked")))
    })
}

/// Sets a detached tree's mount attributes ([`MOUNT_ATTR_RDONLY`]...) on its top mount, or
/// on every mount of it when `recursive`, and the propagation of every mount of it (0: as
/// cloned).
pub fn set_tree_attrs(
    tree: BorrowedFd<'_>,
    attr_set: u64,
    recursive: bool,
    propagation: Propagation,
) -> io::Result<()> {
    let empty = cstr(b"")?;
    let setattr = |attr: &MountAttr, flags: libc::c_uint| {
        // SAFETY: tree is a live fd, the empty path with AT_EMPTY_PATH names it, attr is a
        // live mount_attr of the size passed.
        check(unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                tree.as_raw_fd(),
                empty.as_ptr(),
                libc::AT_EMPTY_PATH as libc::c_uint | flags,
                attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        })
        .map(drop)
    };
    let none = MountAttr {
        attr_set: 0,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    if propagation != 0 {
        setattr(
            &MountAttr {
                propagation,
                ..none
            },
            AT_RECURSIVE,
        )?;
    }
    if attr_set != 0 {
        setattr(
            &MountAttr { attr_set, ..none },
            if recursive { AT_RECURSIVE } else { 0 },
        )?;
    }
    Ok(())
}

/// Attaches a detached tree ([`clone_tree`]) on `target` (a descriptor of the mount point,
/// resolved without symlinks), in the caller's mount namespace.
pub fn attach_tree(tree: OwnedFd, target: BorrowedFd<'_>) -> io::Result<()> {
    let empty = cstr(b"")?;
    // SAFETY: both descriptors are live; the empty paths with the EMPTY_PATH flags make
    // move_mount use the descriptors themselves.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            target.as_raw_fd(),
            empty.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    })
    .map(drop)
}

/// Makes (or finds) the mount point `name` in `dir` and opens it as an `O_PATH`
/// descriptor: a directory, or an empty regular file when `is_file`. Nothing is followed:
/// a symlink (or a file where a directory is asked, and the reverse) is an error, so what a
/// guest swaps in beside it is never mounted on.
pub fn make_point_in(
    dir: BorrowedFd<'_>,
    name: &std::ffi::OsStr,
    is_file: bool,
) -> io::Result<OwnedFd> {
    if name.as_bytes().contains(&b'/') || name.is_empty() || name == ".." || name == "." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not one path component"),
        ));
    }
    if !is_file {
        match nix::sys::stat::mkdirat(
            Some(dir.as_raw_fd()),
            name,
            nix::sys::stat::Mode::from_bits_truncate(0o755),
        ) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
        return open_dir_in(dir, name);
    }
    match nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        name,
        nix::fcntl::OFlag::O_CREAT
            | nix::fcntl::OFlag::O_EXCL
            | nix::fcntl::OFlag::O_WRONLY
            | nix::fcntl::OFlag::O_NOFOLLOW
            | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    ) {
        // SAFETY: a fresh fd owned by nothing else, closed at once.
        Ok(fd) => drop(unsafe { OwnedFd::from_raw_fd(fd) }),
        Err(nix::errno::Errno::EEXIST) => {}
        Err(e) => return Err(e.into()),
    }
    let fd = openat2(
        dir.as_raw_fd(),
        name.as_bytes(),
        libc::O_PATH,
        NO_LINKS | libc::RESOLVE_BENEATH,
    )?;
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(io::Error::from)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a regular file"),
        ));
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn per_mount_options_become_attributes() {
        assert_eq!(mount_attrs("rw,relatime"), 0);
        assert_eq!(mount_attrs("ro,nosuid,nodev,noexec,relatime"), 0xf);
        assert_eq!(mount_attrs("rw,noatime,nodiratime"), 0x90);
    }

    #[test]
    fn layer_paths_are_escaped_for_the_lowerdir_list() {
        assert_eq!(escape_layer(Path::new("/a:b\\c,d")), b"/a\\:b\\\\c,d");
    }

    #[test]
    fn no_symlink_anywhere_on_the_path() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("real/sub")).unwrap();
        std::os::unix::fs::symlink(t.path().join("real"), t.path().join("link")).unwrap();
        let root = std::fs::canonicalize(t.path()).unwrap();
        assert!(open_dir(&root.join("real/sub")).is_ok());
        for p in ["link", "link/sub"] {
            let e = open_dir(&root.join(p)).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{p}: {e}");
        }
        let dir = open_dir(&root).unwrap();
        assert!(open_dir_in(dir.as_fd(), "real".as_ref()).is_ok());
        assert!(open_dir_in(dir.as_fd(), "link".as_ref()).is_err());
        for bad in ["..", "real/sub", ""] {
            assert!(open_dir_in(dir.as_fd(), bad.as_ref()).is_err(), "{bad}");
        }
        // Not an overlay: nothing is unmounted.
        assert!(detach_overlay(dir.as_fd()).is_err());
    }
}
