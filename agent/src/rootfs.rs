//! The container root filesystem: the block device, an optional overlay, and the kernel
//! filesystems and Docker-like `/dev` inside it.
//!
//! [`plan`] is pure (tested); [`execute`] performs it.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use agentvm_protocol::{LayeredRoot, RootfsSpec};
use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};

/// Where the container's root is assembled.
pub const ROOT: &str = "/run/agentvm/rootfs";
/// The device, read-only, under an overlay.
pub const LOWER: &str = "/run/agentvm/lower";
/// The tmpfs holding the overlay's upper and work directories.
pub const RW: &str = "/run/agentvm/rw";

/// One step of root filesystem setup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create a directory (and its parents) if missing.
    Mkdir {
        path: String,
        mode: u32,
    },
    Mount {
        source: String,
        target: String,
        fstype: String,
        flags: MsFlags,
        data: Option<String>,
    },
    /// Create a character device and chmod it (mknod's mode is filtered by the umask).
    CharDev {
        path: String,
        major: u64,
        minor: u64,
        mode: u32,
    },
    Symlink {
        target: String,
        link: String,
    },
}

/// A failed setup step.
#[derive(Debug, thiserror::Error)]
#[error("set up container rootfs: {op}: {source}")]
pub struct RootfsError {
    op: String,
    source: std::io::Error,
}

fn mkdir(path: &str, mode: u32) -> Op {
    Op::Mkdir {
        path: path.into(),
        mode,
    }
}

fn mnt(source: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) -> Op {
    Op::Mount {
        source: source.into(),
        target: target.into(),
        fstype: fstype.into(),
        flags,
        data: data.map(Into::into),
    }
}

/// The steps that assemble the container root at [`ROOT`].
pub fn plan(spec: &RootfsSpec) -> Vec<Op> {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let r = |p: &str| format!("{ROOT}{p}");
    let mut ops = Vec::new();
    if let Some(layers) = &spec.layers {
        ops.extend(layered(layers));
    } else if spec.overlay {
        let upper = format!("{RW}/upper");
        let work = format!("{RW}/work");
        ops.extend([
            mkdir(LOWER, 0o755),
            mnt(&spec.device, LOWER, &spec.fstype, MsFlags::MS_RDONLY, None),
            mkdir(RW, 0o755),
            mnt("tmpfs", RW, "tmpfs", MsFlags::empty(), Some("mode=0755")),
            mkdir(&upper, 0o755),
            mkdir(&work, 0o755),
            mkdir(ROOT, 0o755),
            mnt(
                "overlay",
                ROOT,
                "overlay",
                MsFlags::empty(),
                Some(&format!("lowerdir={LOWER},upperdir={upper},workdir={work}")),
            ),
        ]);
    } else {
        // Mounted read-write as is: a share (9p or virtio-fs) of the host's container rootfs
        // (Docker's overlay2 `merged` dir) takes the writes, so `docker diff`/`docker cp` see
        // them.
        ops.extend([
            mkdir(ROOT, 0o755),
            mnt(
                &spec.device,
                ROOT,
                &spec.fstype,
                MsFlags::empty(),
                spec.options.as_deref(),
            ),
        ]);
    }
    ops.extend([
        mkdir(&r("/proc"), 0o555),
        mnt("proc", &r("/proc"), "proc", nosuid_nodev_noexec, None),
        mkdir(&r("/sys"), 0o555),
        mnt("sysfs", &r("/sys"), "sysfs", nosuid_nodev_noexec, None),
        mkdir(&r("/sys/fs/cgroup"), 0o555),
        mnt(
            "cgroup2",
            &r("/sys/fs/cgroup"),
            "cgroup2",
            nosuid_nodev_noexec,
            None,
        ),
        mkdir(&r("/dev"), 0o755),
        mnt(
            "tmpfs",
            &r("/dev"),
            "tmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=755,size=65536k"),
        ),
    ]);
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        ops.push(Op::CharDev {
            path: r(&format!("/dev/{name}")),
            major,
            minor,
            mode: 0o666,
        });
    }
    for (target, link) in [
        ("pts/ptmx", "/dev/ptmx"),
        ("/proc/self/fd", "/dev/fd"),
        ("/proc/self/fd/0", "/dev/stdin"),
        ("/proc/self/fd/1", "/dev/stdout"),
        ("/proc/self/fd/2", "/dev/stderr"),
    ] {
        ops.push(Op::Symlink {
            target: target.into(),
            link: r(link),
        });
    }
    ops.extend([
        mkdir(&r("/dev/pts"), 0o755),
        mnt(
            "devpts",
            &r("/dev/pts"),
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
        ),
        mkdir(&r("/dev/shm"), 0o1777),
        mnt(
            "shm",
            &r("/dev/shm"),
            "tmpfs",
            nosuid_nodev_noexec,
            Some("mode=1777,size=65536k"),
        ),
    ]);
    ops
}

/// Options of a layered root's overlay, as Docker's overlay2 driver mounts its own: renamed
/// directories are copied up whole instead of leaving redirect xattrs, and copy-up copies
/// data, so the writable layer means the same to the engine reading it on the host.
pub const OVERLAY_COMPAT: &str = "redirect_dir=off,index=off,metacopy=off";

/// Most lower-layer devices of a layered root.
pub const MAX_LOWER: usize = 4;

fn lower_dir(i: usize) -> String {
    format!("{LOWER}{i}")
}

/// The steps of a layered root: each device read-only at `lower<i>`, the share at [`RW`],
/// and the overlay at [`ROOT`].
fn layered(l: &LayeredRoot) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut lowers = Vec::new();
    for (i, dev) in l.lower.iter().take(MAX_LOWER).enumerate() {
        let dir = lower_dir(i);
        ops.push(mkdir(&dir, 0o755));
        ops.push(mnt(dev, &dir, "ext4", MsFlags::MS_RDONLY, None));
        lowers.push(dir);
    }
    ops.push(mkdir(RW, 0o755));
    ops.push(mnt(
        &l.tag,
        RW,
        &l.fstype,
        MsFlags::empty(),
        l.options.as_deref(),
    ));
    let upper = format!("{RW}/{}", l.upper);
    let (flags, data) = if l.readonly {
        (
            MsFlags::MS_RDONLY,
            format!("lowerdir={upper}:{}", lowers.join(":")),
        )
    } else {
        let work = format!("{RW}/{}", l.work);
        ops.push(mkdir(&work, 0o700));
        (
            MsFlags::empty(),
            format!(
                "lowerdir={},upperdir={upper},workdir={work},{OVERLAY_COMPAT}",
                lowers.join(":")
            ),
        )
    };
    ops.push(mkdir(ROOT, 0o755));
    ops.push(mnt("overlay", ROOT, "overlay", flags, Some(&data)));
    ops
}

/// Where the agent's initramfs holds the guest kernel's `lib/modules/<release>/`
/// (modules.builtin and depmod's indexes, from kernel/build.sh).
pub const MODULES: &str = "/lib/modules";

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Resolves `rel` (e.g. `lib/modules`) below `root` the way the container will see it,
/// following only relative symlinks that stay inside (`lib -> usr/lib` in merged-/usr
/// images). `None` if a component is an absolute or escaping symlink, or not a directory.
/// Missing trailing components are returned as they would be created.
fn resolve_below(root: &Path, rel: &str) -> Option<PathBuf> {
    let mut parts: Vec<String> = rel
        .split('/')
        .filter(|p| !p.is_empty())
        .map(String::from)
        .collect();
    let mut done: Vec<String> = Vec::new();
    let mut hops = 0;
    while !parts.is_empty() {
        let part = parts.remove(0);
        if part == "." || part == ".." {
            return None;
        }
        let here = done
            .iter()
            .fold(root.to_path_buf(), |p, c| p.join(c))
            .join(&part);
        match std::fs::symlink_metadata(&here) {
            Err(_) => {
                done.push(part);
                continue;
            }
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                let target = std::fs::read_link(&here).ok()?;
                let target = target.to_str()?;
                if hops > 8 || target.starts_with('/') {
                    return None;
                }
                let mut expanded: Vec<String> = target
                    .split('/')
                    .filter(|p| !p.is_empty())
                    .map(String::from)
                    .collect();
                expanded.extend(parts);
                parts = expanded;
            }
            Ok(m) if m.is_dir() => done.push(part),
            Ok(_) => return None,
        }
    }
    Some(done.iter().fold(root.to_path_buf(), |p, c| p.join(c)))
}

/// Steps that show the guest kernel's `lib/modules/<release>` read-only in the container at
/// `/lib/modules/<release>`, so that `modprobe overlay`, `modprobe br_netfilter` (dockerd,
/// kind, k3s) find the module built in and succeed quietly, as they do on a host whose
/// /lib/modules is bind-mounted into the container. Nothing when the agent has no such
/// directory or the image brings its own.
pub fn modules_ops(release: &str, source_root: &Path, container_root: &Path) -> Vec<Op> {
    let source = source_root
        .join(MODULES.trim_start_matches('/'))
        .join(release);
    if !source.is_dir() {
        return Vec::new();
    }
    let Some(target) = resolve_below(container_root, &format!("lib/modules/{release}")) else {
        return Vec::new();
    };
    if target.exists() {
        return Vec::new();
    }
    let (src, dst) = (source.display().to_string(), target.display().to_string());
    vec![
        mkdir(&dst, 0o755),
        mnt(&src, &dst, "", MsFlags::MS_BIND, None),
        mnt(
            "none",
            &dst,
            "",
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None,
        ),
    ]
}

/// What to unmount when powering off, innermost first.
pub fn unmount_order() -> Vec<String> {
    let r = |p: &str| format!("{ROOT}{p}");
    let modules = kernel_release()
        .and_then(|rel| resolve_below(Path::new(ROOT), &format!("lib/modules/{rel}")))
        .map(|p| p.display().to_string());
    modules
        .into_iter()
        .chain(vec![
            r("/dev/shm"),
            r("/dev/pts"),
            r("/dev"),
            r("/sys/fs/cgroup"),
            r("/sys"),
            r("/proc"),
            ROOT.to_string(),
            RW.to_string(),
            LOWER.to_string(),
        ])
        .chain((0..MAX_LOWER).map(lower_dir))
        .collect()
}

fn errno_io(e: Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

/// Performs `ops`, stopping at the first failure.
pub fn execute(ops: &[Op]) -> Result<(), RootfsError> {
    for op in ops {
        run(op).map_err(|source| RootfsError {
            op: describe(op),
            source,
        })?;
    }
    Ok(())
}

fn describe(op: &Op) -> String {
    match op {
        Op::Mkdir { path, .. } => format!("mkdir {path}"),
        Op::Mount {
            source,
            target,
            fstype,
            ..
        } => format!("mount {source} ({fstype}) on {target}"),
        Op::CharDev { path, .. } => format!("mknod {path}"),
        Op::Symlink { target, link } => format!("symlink {link} -> {target}"),
    }
}

fn run(op: &Op) -> std::io::Result<()> {
    match op {
        Op::Mkdir { path, mode } => {
            if std::fs::symlink_metadata(path).is_err() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(*mode)
                    .create(path)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode))?;
            }
            Ok(())
        }
        Op::Mount {
            source,
            target,
            fstype,
            flags,
            data,
        } => mount(
            Some(source.as_str()),
            target.as_str(),
            Some(fstype.as_str()),
            *flags,
            data.as_deref(),
        )
        .map_err(errno_io),
        Op::CharDev {
            path,
            major,
            minor,
            mode,
        } => {
            mknod(
                path.as_str(),
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(*mode),
                makedev(*major, *minor),
            )
            .map_err(errno_io)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode))
        }
        Op::Symlink { target, link } => match std::os::unix::fs::symlink(target, link) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            r => r,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_are_shown_below_merged_usr_unless_the_image_has_them() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("lib/modules/6.12.9")).unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("usr/lib", root.path().join("lib")).unwrap();
        let ops = modules_ops("6.12.9", src.path(), root.path());
        let want = root
            .path()
            .join("usr/lib/modules/6.12.9")
            .display()
            .to_string();
        assert_eq!(ops.len(), 3, "{ops:?}");
        assert_eq!(ops[0], mkdir(&want, 0o755));
        assert!(
            matches!(&ops[1], Op::Mount { target, flags, .. } if *target == want && *flags == MsFlags::MS_BIND)
        );
        assert!(
            matches!(&ops[2], Op::Mount { flags, .. } if flags.contains(MsFlags::MS_RDONLY | MsFlags::MS_REMOUNT))
        );
        // Another release: nothing to show.
        assert!(modules_ops("6.1.0", src.path(), root.path()).is_empty());
        // The image has its own.
        std::fs::create_dir_all(root.path().join("usr/lib/modules/6.12.9")).unwrap();
        assert!(modules_ops("6.12.9", src.path(), root.path()).is_empty());
    }

    #[test]
    fn modules_never_follow_a_symlink_out_of_the_root() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("lib/modules/6.12.9")).unwrap();
        let root = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/usr/lib", root.path().join("lib")).unwrap();
        assert!(modules_ops("6.12.9", src.path(), root.path()).is_empty());
        let root = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("../../etc", root.path().join("lib")).unwrap();
        assert!(modules_ops("6.12.9", src.path(), root.path()).is_empty());
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("lib"), "a file").unwrap();
        assert!(modules_ops("6.12.9", src.path(), root.path()).is_empty());
    }

    fn spec(overlay: bool) -> RootfsSpec {
        RootfsSpec {
            device: "/dev/vda".into(),
            fstype: "ext4".into(),
            overlay,
            options: None,
            layers: None,
        }
    }

    fn mount_targets(ops: &[Op]) -> Vec<&str> {
        ops.iter()
            .filter_map(|o| match o {
                Op::Mount { target, .. } => Some(target.as_str()),
                _ => None,
            })
            .collect()
    }

    fn index(ops: &[Op], pred: impl Fn(&Op) -> bool) -> usize {
        ops.iter().position(pred).unwrap()
    }

    #[test]
    fn overlay_layout() {
        let ops = plan(&spec(true));
        assert_eq!(
            ops[1],
            mnt("/dev/vda", LOWER, "ext4", MsFlags::MS_RDONLY, None)
        );
        let Op::Mount { fstype, data, .. } = &ops[7] else {
            panic!("expected the overlay mount, got {:?}", ops[7]);
        };
        assert_eq!(fstype, "overlay");
        assert_eq!(
            data.as_deref(),
            Some(
                "lowerdir=/run/agentvm/lower,upperdir=/run/agentvm/rw/upper,\
                 workdir=/run/agentvm/rw/work"
            )
        );
    }

    fn layered_spec(readonly: bool) -> RootfsSpec {
        RootfsSpec {
            layers: Some(LayeredRoot {
                lower: vec!["/dev/vdb".into(), "/dev/vda".into()],
                tag: "rootfs".into(),
                fstype: "virtiofs".into(),
                options: None,
                upper: "diff".into(),
                work: "agentvm-work".into(),
                readonly,
            }),
            ..spec(false)
        }
    }

    fn overlay_mount(ops: &[Op]) -> (MsFlags, String) {
        ops.iter()
            .find_map(|o| match o {
                Op::Mount {
                    target,
                    fstype,
                    flags,
                    data,
                    ..
                } if target == ROOT && fstype == "overlay" => {
                    Some((*flags, data.clone().unwrap_or_default()))
                }
                _ => None,
            })
            .expect("an overlay on the root")
    }

    #[test]
    fn layered_root_stacks_the_devices_under_the_shared_upper() {
        let ops = plan(&layered_spec(false));
        assert_eq!(
            &mount_targets(&ops)[..4],
            ["/run/agentvm/lower0", "/run/agentvm/lower1", RW, ROOT]
        );
        assert_eq!(
            ops[1],
            mnt(
                "/dev/vdb",
                "/run/agentvm/lower0",
                "ext4",
                MsFlags::MS_RDONLY,
                None
            )
        );
        assert_eq!(
            ops[5],
            mnt("rootfs", RW, "virtiofs", MsFlags::empty(), None)
        );
        assert!(ops.contains(&mkdir("/run/agentvm/rw/agentvm-work", 0o700)));
        let (flags, data) = overlay_mount(&ops);
        assert_eq!(flags, MsFlags::empty());
        assert_eq!(
            data,
            "lowerdir=/run/agentvm/lower0:/run/agentvm/lower1,upperdir=/run/agentvm/rw/diff,\
             workdir=/run/agentvm/rw/agentvm-work,redirect_dir=off,index=off,metacopy=off"
        );
        // The devices are unmounted at power-off.
        let order = unmount_order();
        assert!(
            order.iter().position(|t| t == ROOT)
                < order.iter().position(|t| t == "/run/agentvm/lower1")
        );
    }

    #[test]
    fn read_only_layered_root_has_no_upper() {
        let ops = plan(&layered_spec(true));
        let (flags, data) = overlay_mount(&ops);
        assert_eq!(flags, MsFlags::MS_RDONLY);
        assert_eq!(
            data,
            "lowerdir=/run/agentvm/rw/diff:/run/agentvm/lower0:/run/agentvm/lower1"
        );
        assert!(!ops
            .iter()
            .any(|o| matches!(o, Op::Mkdir { path, .. } if path.ends_with("agentvm-work"))));
    }

    #[test]
    fn plain_layout_is_rw_and_mounts_in_order() {
        let ops = plan(&spec(false));
        assert_eq!(
            ops[1],
            mnt("/dev/vda", ROOT, "ext4", MsFlags::empty(), None)
        );
        assert_eq!(
            mount_targets(&ops),
            [
                ROOT,
                "/run/agentvm/rootfs/proc",
                "/run/agentvm/rootfs/sys",
                "/run/agentvm/rootfs/sys/fs/cgroup",
                "/run/agentvm/rootfs/dev",
                "/run/agentvm/rootfs/dev/pts",
                "/run/agentvm/rootfs/dev/shm",
            ]
        );
    }

    #[test]
    fn shared_dir_root_is_mounted_rw_with_its_options() {
        let ops = plan(&RootfsSpec {
            device: "rootfs".into(),
            fstype: "9p".into(),
            overlay: false,
            options: Some("trans=virtio,version=9p2000.L".into()),
            layers: None,
        });
        assert_eq!(
            ops[1],
            mnt(
                "rootfs",
                ROOT,
                "9p",
                MsFlags::empty(),
                Some("trans=virtio,version=9p2000.L")
            )
        );
    }

    #[test]
    fn virtiofs_root_is_mounted_by_tag() {
        let ops = plan(&RootfsSpec {
            device: "rootfs".into(),
            fstype: "virtiofs".into(),
            overlay: false,
            options: None,
            layers: None,
        });
        assert_eq!(
            ops[1],
            mnt("rootfs", ROOT, "virtiofs", MsFlags::empty(), None)
        );
    }

    #[test]
    fn every_mount_has_its_directory_first() {
        for overlay in [false, true] {
            let ops = plan(&spec(overlay));
            for (i, op) in ops.iter().enumerate() {
                if let Op::Mount { target, .. } = op {
                    let mk = index(
                        &ops,
                        |o| matches!(o, Op::Mkdir { path, .. } if path == target),
                    );
                    assert!(mk < i, "mkdir {target} before mounting it");
                }
            }
        }
    }

    #[test]
    fn dev_is_docker_like() {
        let ops = plan(&spec(false));
        let dev_mount = index(
            &ops,
            |o| matches!(o, Op::Mount { target, .. } if target == "/run/agentvm/rootfs/dev"),
        );
        let null = index(&ops, |o| {
            *o == Op::CharDev {
                path: "/run/agentvm/rootfs/dev/null".into(),
                major: 1,
                minor: 3,
                mode: 0o666,
            }
        });
        assert!(dev_mount < null, "devices go into the new tmpfs");
        assert!(ops.contains(&Op::CharDev {
            path: "/run/agentvm/rootfs/dev/tty".into(),
            major: 5,
            minor: 0,
            mode: 0o666
        }));
        assert!(ops.contains(&Op::Symlink {
            target: "pts/ptmx".into(),
            link: "/run/agentvm/rootfs/dev/ptmx".into()
        }));
        assert!(ops.contains(&Op::Symlink {
            target: "/proc/self/fd/2".into(),
            link: "/run/agentvm/rootfs/dev/stderr".into()
        }));
        let Some(Op::Mount { data, .. }) = ops
            .iter()
            .find(|o| matches!(o, Op::Mount { fstype, .. } if fstype == "devpts"))
        else {
            panic!("no devpts mount");
        };
        assert!(data
            .as_deref()
            .unwrap()
            .starts_with("newinstance,ptmxmode=0666"));
    }

    #[test]
    fn execute_creates_files_and_reports_failures() {
        let dir = std::env::temp_dir().join(format!("agentvm-rootfs-test-{}", std::process::id()));
        let d = dir.to_str().unwrap().to_string();
        let ops = [
            mkdir(&format!("{d}/a/b"), 0o750),
            Op::Symlink {
                target: "/proc/self/fd".into(),
                link: format!("{d}/a/fd"),
            },
            Op::Symlink {
                target: "/proc/self/fd".into(),
                link: format!("{d}/a/fd"),
            },
        ];
        execute(&ops).unwrap();
        let meta = std::fs::metadata(format!("{d}/a/b")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o750);
        assert_eq!(
            std::fs::read_link(format!("{d}/a/fd")).unwrap(),
            std::path::Path::new("/proc/self/fd")
        );
        let err = execute(&[Op::Symlink {
            target: "x".into(),
            link: format!("{d}/missing/dir/link"),
        }])
        .unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
