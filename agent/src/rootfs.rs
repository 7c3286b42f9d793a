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
/// The tmpfs under a read-only layered root's overlay: it takes the mount points that the
/// setup creates (`/proc`, `/dev`, `/etc/resolv.conf`, ... which a CRI pause image lacks) and
/// nothing else, as the root is made read-only ([`seal`]) once they exist. runc creates them
/// in the container's writable layer before it makes the root read-only; here that layer's
/// share is read-only on the host, so they live in the guest's memory instead.
pub const SCRATCH: &str = "/run/agentvm/scratch";

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
    /// Make the mount at `target` read-only (that mount only: not its filesystem, not the
    /// mounts below it), as runc's final remount of a read-only root.
    RemountReadonly {
        target: String,
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
    ops.extend(kernel_filesystems(ROOT, true));
    ops
}

/// The kernel filesystems and Docker-like `/dev` in the root at `root`; `proc` false leaves
/// `/proc` to the process (a PID namespace of its own mounts its own procfs).
fn kernel_filesystems(root: &str, proc: bool) -> Vec<Op> {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let r = |p: &str| format!("{root}{p}");
    let mut ops = vec![mkdir(&r("/proc"), 0o555)];
    if proc {
        ops.push(mnt("proc", &r("/proc"), "proc", nosuid_nodev_noexec, None));
    }
    ops.extend([
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

/// Where the agent mounts a share that holds several containers' roots (a pod's).
pub const SHARES: &str = "/run/agentvm/shares";
/// Where the roots of a pod's containers are assembled: `<PODS>/<container id>`.
pub const PODS: &str = "/run/agentvm/containers";

/// A container root's relative path in a share is refused: it would leave the share.
#[derive(Debug, thiserror::Error)]
#[error("invalid root directory {0:?} in a share: a relative path without '..' is required")]
pub struct BadSubdir(pub String);

/// The steps that assemble a pod container's root at `root` from directory `subdir` of the
/// share `spec.device` (mounted at `share_dir` unless `share_mounted`): a bind of that
/// directory, and the kernel filesystems in it (`/proc` only if `proc`).
pub fn pod_plan(
    spec: &RootfsSpec,
    root: &str,
    share_dir: &str,
    share_mounted: bool,
    proc: bool,
) -> Result<Vec<Op>, BadSubdir> {
    let subdir = spec.subdir.clone().unwrap_or_default();
    if subdir.is_empty()
        || subdir.starts_with('/')
        || subdir.split('/').any(|c| c == ".." || c == ".")
    {
        return Err(BadSubdir(subdir));
    }
    let mut ops = Vec::new();
    if !share_mounted {
        ops.push(mkdir(share_dir, 0o755));
        ops.push(mnt(
            &spec.device,
            share_dir,
            &spec.fstype,
            MsFlags::empty(),
            spec.options.as_deref(),
        ));
    }
    ops.push(mkdir(root, 0o755));
    ops.push(mnt(
        &format!("{share_dir}/{}", subdir.trim_end_matches('/')),
        root,
        "none",
        MsFlags::MS_BIND,
        None,
    ));
    ops.extend(kernel_filesystems(root, proc));
    Ok(ops)
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
        // Writable while the mount points are made, read-only once they are ([`seal`]).
        let (s_upper, s_work) = (format!("{SCRATCH}/upper"), format!("{SCRATCH}/work"));
        ops.extend([
            mkdir(SCRATCH, 0o755),
            mnt(
                "tmpfs",
                SCRATCH,
                "tmpfs",
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some("mode=0755,size=4m"),
            ),
            mkdir(&s_upper, 0o755),
            mkdir(&s_work, 0o700),
        ]);
        (
            MsFlags::empty(),
            format!(
                "lowerdir={upper}:{},upperdir={s_upper},workdir={s_work}",
                lowers.join(":")
            ),
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

/// The steps that finish the root once every mount in it is made (the kernel filesystems of
/// [`plan`], then the container's own mounts): a read-only root becomes read-only.
pub fn seal(spec: &RootfsSpec) -> Vec<Op> {
    match &spec.layers {
        Some(l) if l.readonly => vec![Op::RemountReadonly {
            target: ROOT.into(),
        }],
        _ => Vec::new(),
    }
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
            SCRATCH.to_string(),
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
        Op::RemountReadonly { target } => format!("remount {target} read-only"),
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
        Op::RemountReadonly { target } => mount(
            None::<&str>,
            target.as_str(),
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(errno_io),
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
            subdir: None,
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
    fn a_pod_containers_root_is_a_directory_of_the_pod_share_mounted_once() {
        let spec = RootfsSpec {
            device: "pod".into(),
            fstype: "virtiofs".into(),
            subdir: Some("c1/rootfs".into()),
            ..spec(false)
        };
        let root = "/run/agentvm/containers/c1/root";
        let share = "/run/agentvm/shares/pod";
        let first = pod_plan(&spec, root, share, false, true).unwrap();
        assert_eq!(
            first[1],
            mnt("pod", share, "virtiofs", MsFlags::empty(), None)
        );
        let bind = mnt(
            "/run/agentvm/shares/pod/c1/rootfs",
            root,
            "none",
            MsFlags::MS_BIND,
            None,
        );
        assert_eq!(first[3], bind);
        assert!(mount_targets(&first).contains(&"/run/agentvm/containers/c1/root/proc"));
        // The share is mounted already; /proc is left to the container's PID namespace.
        let later = pod_plan(&spec, root, share, true, false).unwrap();
        assert_eq!(later[1], bind);
        assert!(!mount_targets(&later).iter().any(|t| t.ends_with("/proc")));
        assert!(later.contains(&mkdir(&format!("{root}/proc"), 0o555)));
        for bad in ["", "/abs", "../x", "c1/../../x", "./c1"] {
            let s = RootfsSpec {
                subdir: Some(bad.into()),
                ..spec.clone()
            };
            assert!(pod_plan(&s, root, share, true, true).is_err(), "{bad}");
        }
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
    fn read_only_layered_root_takes_mount_points_in_guest_memory_then_seals() {
        let spec = layered_spec(true);
        let ops = plan(&spec);
        let (flags, data) = overlay_mount(&ops);
        // Writable while the mount points are made: the shared writable layer is the top
        // lower layer (the host shares it read-only), the upper a tmpfs of the guest's.
        assert_eq!(flags, MsFlags::empty());
        assert_eq!(
            data,
            "lowerdir=/run/agentvm/rw/diff:/run/agentvm/lower0:/run/agentvm/lower1,\
             upperdir=/run/agentvm/scratch/upper,workdir=/run/agentvm/scratch/work"
        );
        let scratch = index(
            &ops,
            |o| matches!(o, Op::Mount { target, fstype, .. } if target == SCRATCH && fstype == "tmpfs"),
        );
        let root = index(
            &ops,
            |o| matches!(o, Op::Mount { target, .. } if target == ROOT),
        );
        assert!(scratch < root);
        assert!(!ops
            .iter()
            .any(|o| matches!(o, Op::Mkdir { path, .. } if path.ends_with("agentvm-work"))));
        // The mount points (/proc, /dev, ...) are made before the root turns read-only,
        // which is the last step, after the container's own mounts.
        assert!(ops.contains(&mkdir("/run/agentvm/rootfs/proc", 0o555)));
        assert!(!ops.iter().any(|o| matches!(o, Op::RemountReadonly { .. })));
        assert_eq!(
            seal(&spec),
            [Op::RemountReadonly {
                target: ROOT.into()
            }]
        );
        let order = unmount_order();
        let pos = |t: &str| order.iter().position(|o| o == t).unwrap();
        assert!(pos(ROOT) < pos(SCRATCH));
    }

    #[test]
    fn a_writable_root_is_not_sealed() {
        assert!(seal(&layered_spec(false)).is_empty());
        assert!(seal(&spec(true)).is_empty());
        assert!(seal(&spec(false)).is_empty());
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
            subdir: None,
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
            subdir: None,
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

    /// The read-only root's steps for real, in a private mount namespace: mount points are
    /// made in the overlay's tmpfs upper while the shared layer stays untouched, and after the
    /// seal the root refuses writes while a mount inside it (the container's /dev) does not.
    #[test]
    fn real_read_only_root_gets_its_mount_points_then_turns_read_only() {
        if !crate::testutil::as_root(
            "real_read_only_root_gets_its_mount_points_then_turns_read_only",
            "mount(2)",
        ) {
            return;
        }
        let dir = std::env::temp_dir().join(format!("agentvm-rootfs-ro-{}", std::process::id()));
        let d = dir.to_str().unwrap().to_string();
        std::fs::create_dir_all(format!("{d}/layer/bin")).unwrap();
        std::fs::create_dir_all(format!("{d}/diff")).unwrap();
        let d2 = d.clone();
        // unshare(CLONE_NEWNS) moves only this thread; its mounts die with the namespace.
        let result = std::thread::spawn(move || {
            let d = d2;
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare mntns");
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .expect("make the namespace's mounts private");
            let (root, scratch) = (format!("{d}/root"), format!("{d}/scratch"));
            let ops = [
                mkdir(&scratch, 0o755),
                mnt(
                    "tmpfs",
                    &scratch,
                    "tmpfs",
                    MsFlags::empty(),
                    Some("size=1m"),
                ),
                mkdir(&format!("{scratch}/upper"), 0o755),
                mkdir(&format!("{scratch}/work"), 0o700),
                mkdir(&root, 0o755),
                mnt(
                    "overlay",
                    &root,
                    "overlay",
                    MsFlags::empty(),
                    Some(&format!(
                        "lowerdir={d}/diff:{d}/layer,upperdir={scratch}/upper,\
                         workdir={scratch}/work"
                    )),
                ),
                mkdir(&format!("{root}/proc"), 0o555),
                mkdir(&format!("{root}/dev"), 0o755),
                mnt(
                    "tmpfs",
                    &format!("{root}/dev"),
                    "tmpfs",
                    MsFlags::empty(),
                    None,
                ),
                Op::RemountReadonly {
                    target: root.clone(),
                },
            ];
            execute(&ops).map_err(|e| e.to_string())?;
            let ro = std::fs::create_dir(format!("{root}/etc")).unwrap_err();
            if ro.raw_os_error() != Some(libc::EROFS) {
                return Err(format!("mkdir in the sealed root: {ro}"));
            }
            std::fs::write(format!("{root}/dev/null-ish"), "x")
                .map_err(|e| format!("the root's /dev should stay writable: {e}"))?;
            if !std::path::Path::new(&format!("{root}/proc")).is_dir()
                || !std::path::Path::new(&format!("{root}/bin")).is_dir()
            {
                return Err("the root lacks its mount point or its layer".into());
            }
            Ok(())
        })
        .join()
        .unwrap();
        // The mount point went to the guest's memory, not into the shared writable layer.
        let diff_entries = std::fs::read_dir(format!("{d}/diff")).unwrap().count();
        std::fs::remove_dir_all(&dir).unwrap();
        result.unwrap();
        assert_eq!(diff_entries, 0, "the shared writable layer was written to");
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
