//! The container's own mounts from the start request ([`MountSpec`]): shares of host
//! directories (virtio-9p or virtio-fs), small host files (`/etc/hosts`, `/etc/resolv.conf`) copied into the guest and
//! bind-mounted, and tmpfs, set up in the container root after the root filesystem and in the
//! order given.
//!
//! [`plan`] is pure (tested); [`execute`] performs it. A destination is resolved inside the
//! container root at the time its step runs, as `chroot` would resolve it: a symlink (`/etc`
//! -> `/host-etc`) is followed relative to the root, and `..` never climbs out of it.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::{Mutex, TryLockError};

use agentvm_protocol::{MountSource, MountSpec};
use nix::mount::{mount, MsFlags};

/// Where the agent keeps the content of `File` mounts: on its own `/run` tmpfs, outside the
/// container root (see [`crate::rootfs::ROOT`]), so the container sees only the bind mounts.
pub const FILES: &str = "/run/agentvm/files";

/// The filesystems a [`MountSource::Share`] may be mounted as: the host's shared-directory
/// transports (never a block device or anything else a tag could be mistaken for).
const SHARE_FSTYPES: &[&str] = &["9p", "virtiofs"];

/// How many symlinks one destination may pass through, as the kernel's `MAXSYMLINKS`.
const MAX_SYMLINKS: u32 = 40;

/// What a missing mount point is created as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointKind {
    Dir,
    /// An empty file, to bind a file onto.
    File,
}

/// One step of setting up the container's mounts. `dest` is always a path inside the
/// container (absolute, without `..`), resolved in the root when the step runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Write `content` to the agent's file `path` (outside the container root) with `mode`.
    WriteFile {
        path: String,
        content: String,
        mode: u32,
    },
    /// Create the mount point `dest` and its missing parents (directories, mode 0755).
    MountPoint { dest: String, kind: PointKind },
    Mount {
        source: String,
        dest: String,
        fstype: String,
        flags: MsFlags,
        data: Option<String>,
    },
    /// Bind-mount the agent's file `source` onto `dest`.
    Bind { source: String, dest: String },
    /// Make the bind mount at `dest` read-only (a bind mount ignores `MS_RDONLY` at first).
    RemountReadonly { dest: String },
}

/// A mount the agent refuses or failed to set up.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The spec is not valid; nothing was mounted.
    #[error("mount on {destination:?}: {reason}")]
    Invalid {
        destination: String,
        reason: &'static str,
    },
    /// A step failed.
    #[error("set up container mounts: {op}: {source}")]
    Step { op: String, source: std::io::Error },
}

/// Mounts made in the container root, in order; [`crate::power`] unmounts them innermost
/// first before the root filesystem.
static MOUNTED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The container mounts made so far, to unmount in reverse order.
/// Never blocks: it runs on the way to power-off, maybe from the panic hook.
pub fn mounted() -> Vec<String> {
    match MOUNTED.try_lock() {
        Ok(m) => m.clone(),
        Err(TryLockError::Poisoned(p)) => p.into_inner().clone(),
        Err(TryLockError::WouldBlock) => Vec::new(),
    }
}

/// Checks that `dest` is an absolute container path below `/` without `..` or NUL bytes.
fn check_destination(dest: &str) -> Result<(), MountError> {
    let invalid = |reason| {
        Err(MountError::Invalid {
            destination: dest.to_string(),
            reason,
        })
    };
    if !dest.starts_with('/') {
        return invalid("the destination must be an absolute path");
    }
    if dest.contains('\0') {
        return invalid("the destination contains a NUL byte");
    }
    let path = Path::new(dest);
    if path.components().any(|c| c == Component::ParentDir) {
        return invalid("the destination must not contain '..'");
    }
    if !path.components().any(|c| matches!(c, Component::Normal(_))) {
        return invalid("the container root itself cannot be a mount destination");
    }
    Ok(())
}

/// Splits mount options into the generic flags mount(2) takes as bits (`ro`, `nosuid`, ...)
/// and the filesystem-specific rest, which goes into `data`.
pub fn split_options(options: &str) -> (MsFlags, Option<String>) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for opt in options.split(',').filter(|o| !o.is_empty()) {
        let (set, clear) = match opt {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            other => {
                data.push(other);
                continue;
            }
        };
        flags = (flags | set) & !clear;
    }
    let data = (!data.is_empty()).then(|| data.join(","));
    (flags, data)
}

/// The steps that set up `mounts` in order. `File` contents go to `files_dir`
/// (normally [`FILES`]).
pub fn plan(mounts: &[MountSpec], files_dir: &str) -> Result<Vec<Op>, MountError> {
    let mut ops = Vec::new();
    for (i, m) in mounts.iter().enumerate() {
        check_destination(&m.destination)?;
        let dest = m.destination.clone();
        let readonly = if m.readonly {
            MsFlags::MS_RDONLY
        } else {
            MsFlags::empty()
        };
        match &m.source {
            MountSource::Share {
                tag,
                options,
                fstype,
            } => {
                if !SHARE_FSTYPES.contains(&fstype.as_str()) {
                    return Err(MountError::Invalid {
                        destination: dest,
                        reason: "a share's filesystem type must be 9p or virtiofs",
                    });
                }
                let (flags, data) = split_options(options);
                ops.push(Op::MountPoint {
                    dest: dest.clone(),
                    kind: PointKind::Dir,
                });
                ops.push(Op::Mount {
                    source: tag.clone(),
                    dest,
                    fstype: fstype.clone(),
                    flags: flags | readonly,
                    data,
                });
            }
            MountSource::ShareDir { tag, subdir, file } => {
                let relative = |p: &str| {
                    !p.is_empty()
                        && !p.starts_with('/')
                        && !p.split('/').any(|c| c == ".." || c == ".")
                };
                if !relative(subdir) || !relative(tag) || tag.contains('/') {
                    return Err(MountError::Invalid {
                        destination: dest,
                        reason: "a share directory must be a relative path without `..` in a \
                                 share named without `/`",
                    });
                }
                ops.push(Op::MountPoint {
                    dest: dest.clone(),
                    kind: if *file {
                        PointKind::File
                    } else {
                        PointKind::Dir
                    },
                });
                ops.push(Op::Bind {
                    source: format!(
                        "{}/{tag}/{}",
                        crate::rootfs::SHARES,
                        subdir.trim_end_matches('/')
                    ),
                    dest: dest.clone(),
                });
                if m.readonly {
                    ops.push(Op::RemountReadonly { dest });
                }
            }
            MountSource::PodShm => {
                ops.push(Op::MountPoint {
                    dest: dest.clone(),
                    kind: PointKind::Dir,
                });
                ops.push(Op::Bind {
                    source: format!("{}/dev/shm", crate::rootfs::ROOT),
                    dest,
                });
            }
            MountSource::Tmpfs { options } => {
                let (flags, data) = split_options(options.as_deref().unwrap_or(""));
                ops.push(Op::MountPoint {
                    dest: dest.clone(),
                    kind: PointKind::Dir,
                });
                ops.push(Op::Mount {
                    source: "tmpfs".into(),
                    dest,
                    fstype: "tmpfs".into(),
                    flags: flags | readonly,
                    data,
                });
            }
            MountSource::File { content, mode } => {
                if *mode > 0o7777 {
                    return Err(MountError::Invalid {
                        destination: dest,
                        reason: "the file mode has bits beyond 0o7777",
                    });
                }
                let path = format!("{}/{i}", files_dir.trim_end_matches('/'));
                ops.push(Op::WriteFile {
                    path: path.clone(),
                    content: content.clone(),
                    mode: *mode,
                });
                ops.push(Op::MountPoint {
                    dest: dest.clone(),
                    kind: PointKind::File,
                });
                ops.push(Op::Bind {
                    source: path,
                    dest: dest.clone(),
                });
                if m.readonly {
                    ops.push(Op::RemountReadonly { dest });
                }
            }
        }
    }
    Ok(ops)
}

/// Resolves the container path `dest` inside `root` the way `chroot(root)` would: symlinks
/// are followed with `root` as `/`, and `..` stops at `root`. Components past the first
/// missing one are taken as they are; the result has no symlink in any existing component.
pub fn resolve_in_root(root: &Path, dest: &str) -> std::io::Result<PathBuf> {
    // Components still to walk, the next one last.
    let mut pending: Vec<OsString> = components_rev(Path::new(dest));
    let mut resolved: Vec<OsString> = Vec::new();
    let mut links = 0;
    while let Some(c) = pending.pop() {
        if c == ".." {
            resolved.pop();
            continue;
        }
        let candidate = join(root, &resolved).join(&c);
        match std::fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(std::io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = std::fs::read_link(&candidate)?;
                if target.is_absolute() {
                    resolved.clear();
                }
                pending.extend(components_rev(&target));
            }
            Ok(_) => resolved.push(c),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => resolved.push(c),
            Err(e) => return Err(e),
        }
    }
    Ok(join(root, &resolved))
}

/// The normal and `..` components of `p`, last first.
fn components_rev(p: &Path) -> Vec<OsString> {
    p.components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

fn join(root: &Path, parts: &[OsString]) -> PathBuf {
    let mut p = root.to_path_buf();
    p.extend(parts);
    p
}

/// Validates and performs `mounts` in the container root `root`.
pub fn apply(mounts: &[MountSpec], root: &str) -> Result<(), MountError> {
    execute(&plan(mounts, FILES)?, root)
}

/// [`apply`] with the copied files kept in `files` (a pod container's own directory, so
/// the containers of a pod never share a copy).
pub fn apply_with_files(mounts: &[MountSpec], root: &str, files: &str) -> Result<(), MountError> {
    execute(&plan(mounts, files)?, root)
}

/// Performs `ops` in the container root `root`, stopping at the first failure.
pub fn execute(ops: &[Op], root: &str) -> Result<(), MountError> {
    let root = Path::new(root);
    for op in ops {
        run(op, root).map_err(|source| MountError::Step {
            op: describe(op),
            source,
        })?;
    }
    Ok(())
}

fn describe(op: &Op) -> String {
    match op {
        Op::WriteFile { path, .. } => format!("write {path}"),
        Op::MountPoint { dest, .. } => format!("create mount point {dest}"),
        Op::Mount {
            source,
            dest,
            fstype,
            ..
        } => format!("mount {source} ({fstype}) on {dest}"),
        Op::Bind { source, dest } => format!("bind-mount {source} on {dest}"),
        Op::RemountReadonly { dest } => format!("make {dest} read-only"),
    }
}

fn errno_io(e: nix::errno::Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

fn mount_at(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> std::io::Result<()> {
    mount(source, target, fstype, flags, data).map_err(errno_io)?;
    let mut mounted = MOUNTED.lock().unwrap_or_else(|p| p.into_inner());
    let target = target.to_string_lossy().into_owned();
    if !mounted.contains(&target) {
        mounted.push(target);
    }
    Ok(())
}

fn run(op: &Op, root: &Path) -> std::io::Result<()> {
    match op {
        Op::WriteFile {
            path,
            content,
            mode,
        } => {
            let path = Path::new(path);
            if let Some(dir) = path.parent() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)?;
            }
            // A fresh inode: a file of an earlier start may still be bound somewhere.
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(path)?;
            f.write_all(content.as_bytes())?;
            // After the write, and explicitly: the open mode is filtered by the umask.
            f.set_permissions(std::fs::Permissions::from_mode(*mode))
        }
        Op::MountPoint { dest, kind } => {
            let target = resolve_in_root(root, dest)?;
            if std::fs::symlink_metadata(&target).is_ok() {
                return Ok(());
            }
            let parent = match kind {
                PointKind::Dir => target.as_path(),
                PointKind::File => target.parent().unwrap_or(root),
            };
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)?;
            if *kind == PointKind::File {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&target)?;
            }
            Ok(())
        }
        Op::Mount {
            source,
            dest,
            fstype,
            flags,
            data,
        } => mount_at(
            Some(source.as_str()),
            &resolve_in_root(root, dest)?,
            Some(fstype.as_str()),
            *flags,
            data.as_deref(),
        ),
        Op::Bind { source, dest } => mount_at(
            Some(source.as_str()),
            &resolve_in_root(root, dest)?,
            None,
            MsFlags::MS_BIND,
            None,
        ),
        Op::RemountReadonly { dest } => mount_at(
            None,
            &resolve_in_root(root, dest)?,
            None,
            // nosuid and nodev as on the agent's /run the file comes from.
            MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV,
            None,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `path` is `dir` or below it, comparing components.
    fn is_within(path: &str, dir: &str) -> bool {
        Path::new(path).starts_with(Path::new(dir))
    }

    fn file(dest: &str, content: &str, readonly: bool) -> MountSpec {
        MountSpec {
            destination: dest.into(),
            source: MountSource::File {
                content: content.into(),
                mode: 0o644,
            },
            readonly,
        }
    }

    fn tmpfs(dest: &str, options: Option<&str>) -> MountSpec {
        MountSpec {
            destination: dest.into(),
            source: MountSource::Tmpfs {
                options: options.map(Into::into),
            },
            readonly: false,
        }
    }

    fn share(dest: &str, readonly: bool) -> MountSpec {
        MountSpec {
            destination: dest.into(),
            source: MountSource::Share {
                tag: "m0".into(),
                options: "trans=virtio,version=9p2000.L".into(),
                fstype: "9p".into(),
            },
            readonly,
        }
    }

    /// A pod container's volume: a bind of its directory of the mounted pod share, made
    /// read-only when asked; paths leaving the share are refused.
    #[test]
    fn the_pods_shm_is_the_vm_containers() {
        let shm = MountSpec {
            destination: "/dev/shm".into(),
            source: MountSource::PodShm,
            readonly: false,
        };
        assert_eq!(
            plan(&[shm], "/f").unwrap(),
            [
                Op::MountPoint {
                    dest: "/dev/shm".into(),
                    kind: PointKind::Dir
                },
                Op::Bind {
                    source: "/run/agentvm/rootfs/dev/shm".into(),
                    dest: "/dev/shm".into()
                },
            ]
        );
    }

    #[test]
    fn share_dirs_are_bound_from_the_mounted_share() {
        let vol = |subdir: &str, readonly: bool| MountSpec {
            destination: "/data".into(),
            source: MountSource::ShareDir {
                tag: "pod".into(),
                subdir: subdir.into(),
                file: false,
            },
            readonly,
        };
        assert_eq!(
            plan(&[vol("c1/mounts/0", true)], "/f").unwrap(),
            [
                Op::MountPoint {
                    dest: "/data".into(),
                    kind: PointKind::Dir
                },
                Op::Bind {
                    source: "/run/agentvm/shares/pod/c1/mounts/0".into(),
                    dest: "/data".into()
                },
                Op::RemountReadonly {
                    dest: "/data".into()
                },
            ]
        );
        assert_eq!(plan(&[vol("c1/mounts/0", false)], "/f").unwrap().len(), 2);
        // A file of the share is bound on a file.
        let file = MountSpec {
            source: MountSource::ShareDir {
                tag: "pod".into(),
                subdir: "c1/mounts/1".into(),
                file: true,
            },
            ..vol("", false)
        };
        assert_eq!(
            plan(&[file], "/f").unwrap()[0],
            Op::MountPoint {
                dest: "/data".into(),
                kind: PointKind::File
            }
        );
        for bad in ["", "/etc", "c1/../../x", "./c1"] {
            assert!(plan(&[vol(bad, false)], "/f").is_err(), "{bad}");
        }
    }

    #[test]
    fn virtiofs_shares_mount_by_tag_and_other_types_are_refused() {
        let spec = |fstype: &str, options: &str| MountSpec {
            destination: "/work".into(),
            source: MountSource::Share {
                tag: "vol0".into(),
                options: options.into(),
                fstype: fstype.into(),
            },
            readonly: false,
        };
        let ops = plan(&[spec("virtiofs", "")], "/f").unwrap();
        assert_eq!(
            ops[1],
            Op::Mount {
                source: "vol0".into(),
                dest: "/work".into(),
                fstype: "virtiofs".into(),
                flags: MsFlags::empty(),
                data: None,
            }
        );
        let (flags, data) = plan(&[spec("virtiofs", "ro")], "/f")
            .unwrap()
            .remove(1)
            .flags_data();
        assert_eq!((flags, data), (MsFlags::MS_RDONLY, None));
        for bad in ["ext4", "", "bind"] {
            let e = plan(&[spec(bad, "")], "/f").unwrap_err();
            assert!(matches!(e, MountError::Invalid { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn files_live_outside_the_container_root() {
        for dir in [crate::rootfs::ROOT, crate::rootfs::LOWER, crate::rootfs::RW] {
            assert!(!is_within(FILES, dir), "{FILES} inside {dir}");
        }
        // /run is the agent's own tmpfs (see boot::early_mounts).
        assert!(is_within(FILES, "/run"));
    }

    #[test]
    fn plan_of_docker_like_mounts() {
        let ops = plan(
            &[
                file("/etc/hosts", "127.0.0.1 localhost\n", false),
                file("/etc/resolv.conf", "nameserver 127.0.0.11\n", true),
                share("/data", true),
                tmpfs("/scratch", Some("nosuid,nodev,size=65536k,mode=1777")),
            ],
            "/files/",
        )
        .unwrap();
        assert_eq!(
            ops,
            [
                Op::WriteFile {
                    path: "/files/0".into(),
                    content: "127.0.0.1 localhost\n".into(),
                    mode: 0o644
                },
                Op::MountPoint {
                    dest: "/etc/hosts".into(),
                    kind: PointKind::File
                },
                Op::Bind {
                    source: "/files/0".into(),
                    dest: "/etc/hosts".into()
                },
                Op::WriteFile {
                    path: "/files/1".into(),
                    content: "nameserver 127.0.0.11\n".into(),
                    mode: 0o644
                },
                Op::MountPoint {
                    dest: "/etc/resolv.conf".into(),
                    kind: PointKind::File
                },
                Op::Bind {
                    source: "/files/1".into(),
                    dest: "/etc/resolv.conf".into()
                },
                Op::RemountReadonly {
                    dest: "/etc/resolv.conf".into()
                },
                Op::MountPoint {
                    dest: "/data".into(),
                    kind: PointKind::Dir
                },
                Op::Mount {
                    source: "m0".into(),
                    dest: "/data".into(),
                    fstype: "9p".into(),
                    flags: MsFlags::MS_RDONLY,
                    data: Some("trans=virtio,version=9p2000.L".into()),
                },
                Op::MountPoint {
                    dest: "/scratch".into(),
                    kind: PointKind::Dir
                },
                Op::Mount {
                    source: "tmpfs".into(),
                    dest: "/scratch".into(),
                    fstype: "tmpfs".into(),
                    flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                    data: Some("size=65536k,mode=1777".into()),
                },
            ]
        );
    }

    #[test]
    fn option_words_become_flags() {
        assert_eq!(split_options(""), (MsFlags::empty(), None));
        assert_eq!(
            split_options("ro,noexec,,mode=755"),
            (
                MsFlags::MS_RDONLY | MsFlags::MS_NOEXEC,
                Some("mode=755".into())
            )
        );
        assert_eq!(
            split_options("ro,rw,nosuid,suid,trans=virtio"),
            (MsFlags::empty(), Some("trans=virtio".into()))
        );
        let (flags, data) = plan(&[tmpfs("/t", None)], "/f")
            .unwrap()
            .remove(1)
            .flags_data();
        assert_eq!((flags, data), (MsFlags::empty(), None));
    }

    impl Op {
        fn flags_data(self) -> (MsFlags, Option<String>) {
            match self {
                Op::Mount { flags, data, .. } => (flags, data),
                other => panic!("not a mount: {other:?}"),
            }
        }
    }

    #[test]
    fn hostile_destinations_are_rejected() {
        for (dest, why) in [
            ("etc/hosts", "absolute"),
            ("/etc/../../hosts", "'..'"),
            ("/..", "'..'"),
            ("/", "root itself"),
            ("/.", "root itself"),
            ("//", "root itself"),
            ("/etc/ho\0sts", "NUL"),
            ("", "absolute"),
        ] {
            let err = plan(&[tmpfs(dest, None)], "/f").unwrap_err();
            assert!(err.to_string().contains(why), "{dest:?}: {err}");
        }
        let mut m = file("/etc/hosts", "", false);
        m.source = MountSource::File {
            content: String::new(),
            mode: 0o170000,
        };
        assert!(plan(&[m], "/f").unwrap_err().to_string().contains("mode"));
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let p =
                std::env::temp_dir().join(format!("agentvm-mounts-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.0.join(rel.trim_start_matches('/'))
        }

        fn s(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn destinations_resolve_inside_the_root() {
        let t = TempDir::new("resolve");
        let root = t.path("root");
        std::fs::create_dir_all(root.join("host-etc")).unwrap();
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("/host-etc", root.join("etc")).unwrap();
        std::os::unix::fs::symlink("../../../../..", root.join("usr/lib/up")).unwrap();
        std::os::unix::fs::symlink("../usr/lib/up/host-etc", root.join("rel")).unwrap();
        std::os::unix::fs::symlink("loop2", root.join("loop1")).unwrap();
        std::os::unix::fs::symlink("loop1", root.join("loop2")).unwrap();
        // A dangling absolute link, as /etc/resolv.conf often is in images.
        std::os::unix::fs::symlink(
            "/run/systemd/resolve/stub.conf",
            root.join("host-etc/resolv.conf"),
        )
        .unwrap();

        let r = |d: &str| resolve_in_root(&root, d).unwrap();
        assert_eq!(r("/etc/hosts"), root.join("host-etc/hosts"));
        assert_eq!(r("/usr/lib/up/etc/hosts"), root.join("host-etc/hosts"));
        assert_eq!(r("/rel/x"), root.join("host-etc/x"));
        assert_eq!(
            r("/etc/resolv.conf"),
            root.join("run/systemd/resolve/stub.conf")
        );
        assert_eq!(r("/new/dir/"), root.join("new/dir"));
        assert_eq!(r("/./usr//lib"), root.join("usr/lib"));
        let err = resolve_in_root(&root, "/loop1/x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP));
    }

    #[test]
    fn mount_points_are_created_inside_the_root() {
        let t = TempDir::new("points");
        let root = t.path("root");
        std::fs::create_dir_all(root.join("host-etc")).unwrap();
        std::os::unix::fs::symlink("/host-etc", root.join("etc")).unwrap();
        std::fs::write(root.join("host-etc/hosts"), "keep").unwrap();
        let ops = [
            Op::MountPoint {
                dest: "/etc/hosts".into(),
                kind: PointKind::File,
            },
            Op::MountPoint {
                dest: "/etc/sub/hostname".into(),
                kind: PointKind::File,
            },
            Op::MountPoint {
                dest: "/data/a/b".into(),
                kind: PointKind::Dir,
            },
        ];
        execute(&ops, root.to_str().unwrap()).unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("host-etc/hosts")).unwrap(),
            "keep"
        );
        assert!(root.join("host-etc/sub/hostname").is_file());
        assert!(root.join("data/a/b").is_dir());
        assert!(!Path::new("/host-etc/sub").exists());
        // Executing again changes nothing.
        execute(&ops, root.to_str().unwrap()).unwrap();

        let err = execute(
            &[Op::MountPoint {
                dest: "/etc/hosts/x".into(),
                kind: PointKind::Dir,
            }],
            root.to_str().unwrap(),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("set up container mounts: create mount point /etc/hosts/x:"),
            "{err}"
        );
    }

    #[test]
    fn file_content_is_written_with_its_mode() {
        let t = TempDir::new("write");
        let path = format!("{}/files/0", t.s());
        let op = |content: &str, mode| Op::WriteFile {
            path: path.clone(),
            content: content.into(),
            mode,
        };
        execute(&[op("one", 0o600)], "/nonexistent").unwrap();
        execute(&[op("two\n", 0o444)], "/nonexistent").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two\n");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o444);
    }

    /// Real mounts in a scratch root: tmpfs, a file bound read-only through a symlinked /etc,
    /// nothing escapes the root. Needs root for mount(2).
    #[test]
    fn real_mounts_in_a_scratch_root() {
        if !crate::testutil::as_root("real_mounts_in_a_scratch_root", "mount(2)") {
            return;
        }
        let t = TempDir::new("real");
        let root = t.path("root");
        std::fs::create_dir_all(root.join("host-etc")).unwrap();
        std::os::unix::fs::symlink("/host-etc", root.join("etc")).unwrap();
        std::fs::write(root.join("host-etc/hosts"), "image hosts\n").unwrap();
        let mounts = [
            file("/etc/hosts", "10.0.0.2 box\n", true),
            file("/etc/hostname", "box\n", false),
            tmpfs("/scratch", Some("size=1m,mode=1777,nosuid")),
        ];
        let ops = plan(&mounts, &format!("{}/files", t.s())).unwrap();
        let result = execute(&ops, root.to_str().unwrap());
        let unmount_all = || {
            for target in mounted().iter().rev() {
                if is_within(target, t.s()) {
                    let _ = nix::mount::umount2(target.as_str(), nix::mount::MntFlags::MNT_DETACH);
                }
            }
        };
        let checks = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            result.unwrap();
            let hosts = root.join("host-etc/hosts");
            assert_eq!(std::fs::read_to_string(&hosts).unwrap(), "10.0.0.2 box\n");
            let err = std::fs::write(&hosts, "x").unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
            assert_eq!(
                std::fs::read_to_string(root.join("host-etc/hostname")).unwrap(),
                "box\n"
            );
            std::fs::write(root.join("host-etc/hostname"), "renamed\n").unwrap();
            let meta = std::fs::metadata(root.join("scratch")).unwrap();
            assert_eq!(meta.permissions().mode() & 0o7777, 0o1777);
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            let scratch = format!(" {} ", root.join("scratch").display());
            let line = mountinfo.lines().find(|l| l.contains(&scratch)).unwrap();
            assert!(line.contains("nosuid") && line.contains("tmpfs"), "{line}");
            assert!(!Path::new("/host-etc").exists());
        }));
        unmount_all();
        if let Err(p) = checks {
            std::panic::resume_unwind(p);
        }
    }
}
