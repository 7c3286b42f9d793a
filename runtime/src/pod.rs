//! Kubernetes pods as containerd's CRI plugin hands them to a runtime: the pod sandbox
//! (the pause container, which holds the pod's namespaces) and the pod's containers, told
//! apart by the plugin's annotations.
//!
//! What a VM cannot honour is refused here, before anything is created: the host's network,
//! PID or IPC namespace (`hostNetwork`, `hostPID`, `hostIPC`).
//!
//! One VM per pod: the sandbox's VM boots with a "pod share", a virtio-fs share of a host
//! directory of its state dir ([`share_dir`]) made a shared mount, so that a bind mount the
//! shim makes there later also appears in virtiofsd's mount namespace. Each later container
//! of the pod gets its root bound there ([`attach_root`]) and runs in that VM
//! ([`member_request`]); docs/decisions.md "A pod's later containers" has the measurements.

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use agentvm_protocol::{MountSource, PodContainer, RootfsSpec, StartRequest};

use oci_spec::runtime::{LinuxNamespaceType, Mount, Spec};

use crate::error::{Error, Result};
use crate::fsmount;
use crate::netns::NetnsMode;

/// The CRI plugin's annotation naming what a container is: `sandbox` or `container`.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// The CRI plugin's annotation naming the pod sandbox a container belongs to.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// The mount tag of the pod share in the sandbox's VM.
pub const SHARE_TAG: &str = "pod";

/// The CRI plugin's annotations of a pod sandbox's size: the sum of its containers' limits,
/// as kubelet (1.23+) sends them in `LinuxPodSandboxConfig.resources`.
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// What the pod asks of its VM (docs/decisions.md "The pod VM's size"): from a sandbox's
/// annotations only; absent, zero or unparsable values ask nothing (the default size).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PodSize {
    /// Bytes: the sum of the containers' memory limits.
    pub memory: Option<i64>,
    /// The sum of the containers' CPU quotas over one period (microseconds).
    pub quota: Option<i64>,
    pub period: Option<u64>,
}

impl PodSize {
    /// The size a pod sandbox's annotations ask; nothing for any other container.
    pub fn of(annotations: &HashMap<String, String>) -> PodSize {
        if !matches!(PodRole::of(annotations), PodRole::Sandbox { .. }) {
            return PodSize::default();
        }
        let positive = |key: &str| {
            annotations
                .get(key)
                .and_then(|v| v.trim().parse::<i64>().ok())
                .filter(|v| *v > 0)
        };
        let quota = positive(SANDBOX_CPU_QUOTA);
        let period = positive(SANDBOX_CPU_PERIOD).map(|p| p as u64);
        PodSize {
            memory: positive(SANDBOX_MEMORY),
            // A quota without its period cannot be read as CPUs.
            quota: quota.filter(|_| period.is_some()),
            period: period.filter(|_| quota.is_some()),
        }
    }
}

/// What a container is to the CRI plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodRole {
    /// Not started by the CRI plugin (Docker, ctr, nerdctl).
    None,
    /// The pod sandbox (pause container) of pod `id`.
    Sandbox { id: String },
    /// A container of the pod whose sandbox is `sandbox_id`.
    Container { sandbox_id: String },
}

impl PodRole {
    /// The role the CRI plugin's annotations give.
    pub fn of(annotations: &HashMap<String, String>) -> PodRole {
        let sandbox_id = annotations.get(SANDBOX_ID).cloned().unwrap_or_default();
        match annotations.get(CONTAINER_TYPE).map(String::as_str) {
            Some("sandbox") => PodRole::Sandbox { id: sandbox_id },
            Some("container") => PodRole::Container { sandbox_id },
            _ => PodRole::None,
        }
    }
}

/// The pod's hostname for a container of the pod whose spec names none: under runc it joins
/// the sandbox's UTS namespace; here its VM gets the name the CRI plugin wrote for the pod
/// (the file bound on `/etc/hostname`, which the plugin writes from the pod's config).
pub fn container_hostname(role: &PodRole, mounts: &[Mount]) -> Option<String> {
    if !matches!(role, PodRole::Container { .. }) {
        return None;
    }
    let source = mounts
        .iter()
        .find(|m| m.destination() == Path::new("/etc/hostname"))?
        .source()
        .as_ref()?;
    let mut text = String::new();
    // A hostname is at most 64 bytes: read no more than a line's worth.
    std::fs::File::open(source)
        .ok()?
        .take(256)
        .read_to_string(&mut text)
        .ok()?;
    let name = text.trim();
    (!name.is_empty() && name.len() <= 64).then(|| name.to_string())
}

/// The namespaces the spec leaves to the host (an OCI spec without an entry of a type shares
/// the runtime's): the Kubernetes setting that asked for each.
fn host_namespaces(spec: &Spec) -> Vec<&'static str> {
    let listed = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .map(|ns| ns.iter().map(|n| n.typ()).collect::<Vec<_>>())
        .unwrap_or_default();
    [
        (LinuxNamespaceType::Network, "hostNetwork"),
        (LinuxNamespaceType::Pid, "hostPID"),
        (LinuxNamespaceType::Ipc, "hostIPC"),
    ]
    .into_iter()
    .filter(|(t, _)| !listed.contains(t))
    .map(|(_, setting)| setting)
    .collect()
}

/// Checks a CRI container against what agentvm can run: the host's namespaces are refused.
/// Returns `netns` unchanged (a pod's container never uses it: it runs in the sandbox's VM).
pub fn admit(
    spec: &Spec,
    annotations: &HashMap<String, String>,
    netns: NetnsMode,
) -> Result<NetnsMode> {
    let role = PodRole::of(annotations);
    if role == PodRole::None {
        return Ok(netns);
    }
    let host = host_namespaces(spec);
    if !host.is_empty() {
        return Err(Error::Invalid(format!(
            "agentvm cannot run a pod with {}: true: each pod runs in its own VM, with its own \
             kernel, network stack, processes and IPC, so the host's cannot be shared. Run this \
             pod without {} (or with runtimeClassName runc)",
            host.join(": true, "),
            host.join(", "),
        )));
    }
    // A pod's container runs in the sandbox's VM: its namespace paths name the host's view
    // of the pod (the holder's), which the shim never enters.
    Ok(netns)
}

/// Whether a container's spec gives it a PID namespace of its own: an entry without a path
/// (Kubernetes' default). With `shareProcessNamespace` the entry names the sandbox's.
pub fn own_pid_namespace(spec: &Spec) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|ns| ns.iter().find(|n| n.typ() == LinuxNamespaceType::Pid))
        .is_some_and(|n| n.path().as_ref().is_none_or(|p| p.as_os_str().is_empty()))
}

/// The pod share's host directory of the sandbox whose state dir is `sandbox_state_id`.
pub fn share_dir(sandbox_state_id: &str) -> PathBuf {
    crate::sandbox::state_root()
        .join(sandbox_state_id)
        .join("pod")
}

fn mount_flags(target: &Path, flags: nix::mount::MsFlags) -> Result<()> {
    nix::mount::mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
        .map_err(|e| Error::io("change the propagation of", target, e.into()))
}

/// Makes the (empty) pod share directory a mount of its own in a peer group of its own
/// (shared), so that a bind mount made below it later reaches virtiofsd's mount namespace
/// (virtiofsd makes its copy a slave) and nothing else.
pub fn prepare_share(dir: &Path) -> Result<()> {
    use nix::mount::MsFlags;
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
    nix::mount::mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(|e| Error::io("bind", dir, e.into()))?;
    mount_flags(dir, MsFlags::MS_PRIVATE)?;
    mount_flags(dir, MsFlags::MS_SHARED)
}

/// Takes the pod share's mount (and every container root still bound below it) away.
/// Returns whether the directory may now be removed: false when something is still
/// mounted there (a removal would walk into a container's root).
pub fn release_share(dir: &Path) -> bool {
    match nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) => true,
        // Not a mount point: nothing below it was bound (binds need the share's mount).
        Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => true,
        Err(e) => {
            tracing::warn!("unmount the pod share {}: {e}", dir.display());
            false
        }
    }
}

/// The directory of container `id` in the pod share `share`.
pub fn member_dir(share: &Path, id: &str) -> Result<PathBuf> {
    crate::sandbox::validate_id(id)?;
    Ok(share.join(id))
}

/// The mount namespace a pod's volumes are looked up in ([`use_host_mounts`]).
static HOST_MOUNTS: std::sync::OnceLock<std::os::fd::OwnedFd> = std::sync::OnceLock::new();

/// Looks the sources of a pod's volumes up in the mount namespace `ns` from now on: the
/// host's, which the shim of a pod has left for one of its own (shim/src/mountns.rs). A
/// host whose `/` is a private mount propagates nothing into the shim's namespace, so a mount
/// the host makes after the pod started (below a volume, or the volume itself) is only seen
/// there. Without it, the caller's namespace.
pub fn use_host_mounts(ns: std::os::fd::OwnedFd) {
    let _ = HOST_MOUNTS.set(ns);
}

/// The metadata of a volume's source, looked up where [`bind_volume`] looks it up (the
/// host's mount namespace, [`use_host_mounts`]): a source inside a host mount made after the
/// pod started exists only there.
pub fn source_metadata(path: &Path) -> std::io::Result<std::fs::Metadata> {
    fsmount::in_namespace(HOST_MOUNTS.get().map(|ns| ns.as_fd()), || {
        std::fs::metadata(path)
    })
}

/// Makes (or opens) the mount point `<share>/<id>/<path...>`, each component made and
/// opened without following symlinks: the share is the guest's to write, and what it swaps
/// in there is never mounted on.
fn share_point(share: &Path, id: &str, path: &[&str], is_file: bool) -> Result<OwnedFd> {
    crate::sandbox::validate_id(id)?;
    let open_err = |what: &str, e| Error::io("open (no symlinks)", share.join(id).join(what), e);
    let mut dir =
        fsmount::open_dir(share).map_err(|e| Error::io("open (no symlinks)", share, e))?;
    let (last, dirs) = path.split_last().expect("a mount point's path");
    for name in std::iter::once(&id).chain(dirs) {
        dir = fsmount::make_point_in(dir.as_fd(), name.as_ref(), false)
            .map_err(|e| open_err(name, e))?;
    }
    fsmount::make_point_in(dir.as_fd(), last.as_ref(), is_file).map_err(|e| open_err(last, e))
}

/// Binds the container's root (the shim's mount of the snapshotter's mounts) into the pod
/// share as `<id>/rootfs`; returns that path relative to the share.
pub fn bind_root(share: &Path, id: &str, root: &Path) -> Result<String> {
    let target = share_point(share, id, &["rootfs"], false)?;
    let tree = fsmount::clone_tree(root, None).map_err(|e| Error::io("bind", root, e))?;
    fsmount::attach_tree(tree, target.as_fd())
        .map_err(|e| Error::io("bind", share.join(id).join("rootfs"), e))?;
    Ok(format!("{id}/rootfs"))
}

/// Binds a later container's volume (a host directory: kubelet's emptyDir, hostPath,
/// configMap, secret; or a file) into the pod share as `<id>/mounts/<n>`; returns that path
/// relative to the share, and whether the source is a file. The source and the mounts below it are looked up in the host's
/// namespace ([`use_host_mounts`]) and copied detached, where the copy gets its propagation
/// (`bind`) and read-only (its top only, as runc's read-only bind, or all of it with `rro`)
/// before it is attached: virtiofsd's copy is read-only from the start, and not even root in
/// the guest writes through it.
pub fn bind_volume(
    share: &Path,
    id: &str,
    n: usize,
    source: &Path,
    readonly: bool,
    bind: crate::mounts::HostBind,
) -> Result<(String, bool)> {
    use crate::mounts::BindPropagation;
    let relative = format!("{id}/mounts/{n}");
    // One trip into the host's namespace: what the source is, and its copy.
    let (meta, tree) = fsmount::in_namespace(HOST_MOUNTS.get().map(|ns| ns.as_fd()), || {
        Ok((std::fs::metadata(source), fsmount::clone_tree(source, None)))
    })
    .map_err(|e| Error::io("bind", source, e))?;
    let is_file = meta
        .map_err(|e| Error::io("bind mount source", source, e))?
        .is_file();
    let tree = tree.map_err(|e| Error::io("bind", source, e))?;
    let target = share_point(share, id, &["mounts", &n.to_string()], is_file)?;
    let propagation = match bind.propagation {
        BindPropagation::Private => libc::MS_PRIVATE,
        BindPropagation::Slave => libc::MS_SLAVE,
        // The copy stays in the source's peer group, as a bind of a shared mount does.
        BindPropagation::Shared => 0,
    };
    let attrs = if readonly {
        fsmount::MOUNT_ATTR_RDONLY
    } else {
        0
    };
    fsmount::set_tree_attrs(tree.as_fd(), attrs, bind.recursive_readonly, propagation)
        .map_err(|e| Error::io("set the mount attributes of", source, e))?;
    fsmount::attach_tree(tree, target.as_fd())
        .map_err(|e| Error::io("bind", share.join(&relative), e))?;
    Ok((relative, is_file))
}

/// Undoes [`bind_root`] and [`bind_volume`] (best effort: nothing to undo is fine). The
/// share is the guest's to write: `<id>` and `<id>/mounts` are opened without following
/// symlinks and everything below them is unmounted and removed through those descriptors
/// (`/proc/self/fd/N/NAME` with `UMOUNT_NOFOLLOW`, `unlinkat`), so a symlink or a directory
/// the guest swapped in never leads an unmount or a removal out of the share.
pub fn unbind_root(share: &Path, id: &str) {
    if crate::sandbox::validate_id(id).is_err() {
        return;
    }
    let Ok(share_fd) = fsmount::open_dir(share) else {
        return;
    };
    let Ok(dir) = fsmount::open_dir_in(share_fd.as_fd(), id.as_ref()) else {
        return;
    };
    let unmount = |parent: &OwnedFd, name: &std::ffi::OsStr| {
        let target = fd_path(parent).join(name);
        match nix::mount::umount2(
            &target,
            nix::mount::MntFlags::MNT_DETACH | nix::mount::MntFlags::UMOUNT_NOFOLLOW,
        ) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => true,
            Err(e) => {
                tracing::warn!(
                    "unmount {}/{id}/…/{}: {e}",
                    share.display(),
                    name.to_string_lossy()
                );
                false
            }
        }
    };
    // rmdir (or the unlink of a file's empty mount point) only, and only once unmounted:
    // never a removal inside a volume.
    let remove = |parent: &OwnedFd, name: &std::ffi::OsStr| {
        use nix::unistd::{unlinkat, UnlinkatFlags};
        if unlinkat(Some(parent.as_raw_fd()), name, UnlinkatFlags::RemoveDir).is_err() {
            let _ = unlinkat(Some(parent.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir);
        }
    };
    if let Ok(volumes) = fsmount::open_dir_in(dir.as_fd(), "mounts".as_ref()) {
        let names: Vec<std::ffi::OsString> = std::fs::read_dir(fd_path(&volumes))
            .map(|entries| entries.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        for name in names {
            if unmount(&volumes, &name) {
                remove(&volumes, &name);
            }
        }
        drop(volumes);
        let _ = nix::unistd::unlinkat(
            Some(dir.as_raw_fd()),
            "mounts",
            nix::unistd::UnlinkatFlags::RemoveDir,
        );
    }
    if !unmount(&dir, "rootfs".as_ref()) {
        return;
    }
    // rmdir only: never a recursive removal next to a container's root.
    let _ = nix::unistd::unlinkat(
        Some(dir.as_raw_fd()),
        "rootfs",
        nix::unistd::UnlinkatFlags::RemoveDir,
    );
    drop(dir);
    let _ = nix::unistd::unlinkat(
        Some(share_fd.as_raw_fd()),
        id,
        nix::unistd::UnlinkatFlags::RemoveDir,
    );
}

/// The path that names what `fd` refers to (its `/proc/self/fd` magic link): a lookup below
/// it starts at that directory, wherever it has been moved since.
fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Whether a mount point of `mountinfo` (the text of /proc/self/mountinfo) lies below `dir`
/// (canonicalized when it exists).
fn has_submounts(mountinfo: &str, dir: &Path) -> bool {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .any(|p| p.starts_with(&dir) && p != dir)
}

/// A mountinfo path with its octal escapes (`\040` for a space) decoded.
fn unescape_mountinfo(p: &str) -> PathBuf {
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (b[i], octal) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
}

/// What the agent is asked to run for a pod's container `id` whose root is `subdir` of the
/// pod share `share`: its process, its mounts (files copied, tmpfs, directory binds bound
/// into the pod share with [`bind_volume`] and bound from there in the guest), its
/// namespaces. On an error, what was bound is left for [`unbind_root`].
pub fn member_request(
    id: &str,
    subdir: String,
    bundle: &crate::oci::BundleSpec,
    share: &Path,
) -> Result<StartRequest> {
    let plan = crate::mounts::plan_pod(
        &bundle.mounts,
        &crate::mounts::SharePolicy::nine_p(),
        &source_metadata,
    )?;
    let mut mounts = plan.mounts;
    // The CRI binds the sandbox's shm into each container: the pod's, in the VM the sandbox's.
    for m in mounts.iter_mut() {
        if m.destination == "/dev/shm" && matches!(m.source, MountSource::Tmpfs { .. }) {
            m.source = MountSource::PodShm;
        }
    }
    for (n, (volume, bind)) in plan.shares.iter().zip(&plan.host_binds).enumerate() {
        let (dir, file) = bind_volume(share, id, n, &volume.path, volume.readonly, *bind)?;
        // The host's bind is read-only at its top only, as runc's (non-recursive) read-only
        // mount is: mounts below it stay writable. The guest sees the whole tree as one
        // virtio-fs mount, where a read-only remount would cover them too: when the copy has
        // mounts below it, read-only is left to the host's bind.
        let guest_readonly = volume.readonly
            && (bind.recursive_readonly
                || !has_submounts(
                    &std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
                    &share.join(&dir),
                ));
        for m in mounts.iter_mut() {
            if matches!(&m.source, MountSource::Share { tag, .. } if *tag == volume.tag) {
                m.source = MountSource::ShareDir {
                    tag: SHARE_TAG.into(),
                    subdir: dir.clone(),
                    file,
                };
                m.readonly = guest_readonly;
            }
        }
    }
    Ok(StartRequest {
        rootfs: RootfsSpec {
            device: SHARE_TAG.into(),
            fstype: "virtiofs".into(),
            overlay: false,
            options: None,
            layers: None,
            subdir: Some(subdir),
        },
        process: bundle.process.clone(),
        hostname: None,
        init: false,
        pid_namespace: false,
        network: None,
        mounts,
        sysctls: Default::default(),
        container: Some(PodContainer {
            id: id.into(),
            create: true,
            own_pid_namespace: bundle.own_pid_namespace,
            readonly_root: bundle.root_readonly,
            limits: bundle.limits,
        }),
        secrets: Vec::new(),
        masked_paths: bundle.confinement.masked_paths.clone(),
        readonly_paths: bundle.confinement.readonly_paths.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read-only volume with a mount below it (critest's non-recursive read-only mount)
    /// is found by its mountinfo lines, escapes decoded; the volume's own mount is not one.
    #[test]
    fn submounts_of_a_volume_are_found_in_mountinfo() {
        let info = "22 1 8:1 / / rw - ext4 /dev/vda rw\n\
                    30 22 0:5 / /srv/vol rw - ext4 /dev/vda rw\n\
                    31 30 0:6 / /srv/my\\040vol/tmpfs rw - tmpfs tmpfs rw\n";
        assert!(has_submounts(info, Path::new("/srv/my vol")));
        assert!(!has_submounts(info, Path::new("/srv/vol")));
        assert!(!has_submounts(info, Path::new("/srv/v")));
        assert_eq!(unescape_mountinfo("/a\\040b\\"), PathBuf::from("/a b\\"));
    }

    fn spec(namespaces: &[&str]) -> Spec {
        let ns: Vec<String> = namespaces
            .iter()
            .map(|t| format!(r#"{{"type":"{t}"}}"#))
            .collect();
        serde_json::from_str(&format!(
            r#"{{"ociVersion":"1.0.2","linux":{{"namespaces":[{}]}}}}"#,
            ns.join(",")
        ))
        .unwrap()
    }

    fn cri(kind: &str, extra: &[(&str, &str)]) -> HashMap<String, String> {
        let mut a: HashMap<String, String> = [
            (CONTAINER_TYPE.to_string(), kind.to_string()),
            (SANDBOX_ID.to_string(), "pod1".to_string()),
        ]
        .into();
        a.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        a
    }

    const ALL: &[&str] = &["pid", "ipc", "uts", "mount", "network"];

    #[test]
    fn a_pods_container_takes_the_pods_hostname_from_its_etc_hostname() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hostname");
        std::fs::write(&file, "cri-pod\n").unwrap();
        let mounts: Vec<Mount> = serde_json::from_str(&format!(
            r#"[{{"destination":"/etc/hosts","source":"/nonexistent","type":"bind"}},
               {{"destination":"/etc/hostname","source":"{}","type":"bind"}}]"#,
            file.display()
        ))
        .unwrap();
        let container = PodRole::Container {
            sandbox_id: "p".into(),
        };
        assert_eq!(
            container_hostname(&container, &mounts).as_deref(),
            Some("cri-pod")
        );
        assert_eq!(container_hostname(&PodRole::None, &mounts), None);
        assert_eq!(container_hostname(&container, &mounts[..1]), None);
        std::fs::write(&file, "x".repeat(65)).unwrap();
        assert_eq!(container_hostname(&container, &mounts), None);
    }

    #[test]
    fn a_sandboxs_size_comes_from_the_cri_annotations() {
        let sized = cri(
            "sandbox",
            &[
                (SANDBOX_MEMORY, "268435456"),
                (SANDBOX_CPU_QUOTA, "150000"),
                (SANDBOX_CPU_PERIOD, "100000"),
                ("io.kubernetes.cri.sandbox-cpu-shares", "1536"),
            ],
        );
        assert_eq!(
            PodSize::of(&sized),
            PodSize {
                memory: Some(256 << 20),
                quota: Some(150_000),
                period: Some(100_000)
            }
        );
        // containerd writes 0 for what kubelet leaves out; a container's annotations ask
        // nothing; a quota needs its period.
        let zero = cri(
            "sandbox",
            &[
                (SANDBOX_MEMORY, "0"),
                (SANDBOX_CPU_QUOTA, "0"),
                (SANDBOX_CPU_PERIOD, "100000"),
            ],
        );
        assert_eq!(PodSize::of(&zero), PodSize::default());
        let mut container = sized.clone();
        container.insert(CONTAINER_TYPE.into(), "container".into());
        assert_eq!(PodSize::of(&container), PodSize::default());
        let no_period = cri(
            "sandbox",
            &[(SANDBOX_CPU_QUOTA, "150000"), (SANDBOX_MEMORY, "x")],
        );
        assert_eq!(PodSize::of(&no_period), PodSize::default());
    }

    #[test]
    fn roles_come_from_the_cri_annotations() {
        assert_eq!(PodRole::of(&HashMap::new()), PodRole::None);
        assert_eq!(
            PodRole::of(&cri("sandbox", &[])),
            PodRole::Sandbox { id: "pod1".into() }
        );
        assert_eq!(
            PodRole::of(&cri("container", &[])),
            PodRole::Container {
                sandbox_id: "pod1".into()
            }
        );
    }

    #[test]
    fn host_namespaces_of_a_pod_are_refused_by_their_kubernetes_names() {
        for (missing, setting) in [
            ("network", "hostNetwork"),
            ("pid", "hostPID"),
            ("ipc", "hostIPC"),
        ] {
            let ns: Vec<&str> = ALL.iter().copied().filter(|n| *n != missing).collect();
            for kind in ["sandbox", "container"] {
                let e = admit(&spec(&ns), &cri(kind, &[]), NetnsMode::New)
                    .unwrap_err()
                    .to_string();
                assert!(e.contains(&format!("{setting}: true")), "{e}");
                assert!(e.contains("runtimeClassName runc"), "{e}");
            }
        }
        let e = admit(
            &spec(&["uts", "mount"]),
            &cri("sandbox", &[]),
            NetnsMode::Host,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("hostNetwork: true, hostPID: true, hostIPC: true"),
            "{e}"
        );
    }

    #[test]
    fn docker_and_ctr_specs_pass_unchanged() {
        // Docker's --pid host / --ipc host are not this module's business.
        let out = admit(&spec(&["network"]), &HashMap::new(), NetnsMode::New).unwrap();
        assert_eq!(out, NetnsMode::New);
    }

    #[test]
    fn a_sandbox_keeps_its_namespace() {
        let join = NetnsMode::Join("/run/netns/cni-1".into());
        assert_eq!(
            admit(&spec(ALL), &cri("sandbox", &[]), join.clone()).unwrap(),
            join
        );
    }

    #[test]
    fn a_pods_container_is_admitted_with_the_pods_namespaces() {
        let join = NetnsMode::Join("/proc/7/ns/net".into());
        assert_eq!(
            admit(&spec(ALL), &cri("container", &[]), join.clone()).unwrap(),
            join
        );
    }

    #[test]
    fn a_pid_namespace_without_a_path_is_the_containers_own() {
        assert!(own_pid_namespace(&spec(ALL)));
        let shared: Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"pid","path":"/proc/9/ns/pid"}]}}"#,
        )
        .unwrap();
        assert!(!own_pid_namespace(&shared));
    }

    #[test]
    fn a_containers_root_is_bound_into_the_pod_share_and_unbound() {
        let t = tempfile::tempdir().unwrap();
        let share = t.path().join("pod");
        std::fs::create_dir(&share).unwrap();
        assert!(member_dir(&share, "../x").is_err());
        assert!(member_dir(&share, "").is_err());
        let d = member_dir(&share, "abc-1").unwrap();
        assert_eq!(d, share.join("abc-1"));
        if !crate::test_support::as_root("a_containers_root_is_bound_into_the_pod_share") {
            return;
        }
        let root = t.path().join("rootfs");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("marker"), "x").unwrap();
        let sub = bind_root(&share, "abc-1", &root).unwrap();
        assert_eq!(sub, "abc-1/rootfs");
        assert!(share.join("abc-1/rootfs/marker").exists());
        // Volumes: a read-only one refuses writes already on the host, a writable one takes
        // them.
        let vol = t.path().join("vol");
        std::fs::create_dir(&vol).unwrap();
        let bind = crate::mounts::HostBind::default();
        assert_eq!(
            bind_volume(&share, "abc-1", 0, &vol, true, bind).unwrap().0,
            "abc-1/mounts/0"
        );
        assert_eq!(
            bind_volume(&share, "abc-1", 1, &vol, false, bind)
                .unwrap()
                .0,
            "abc-1/mounts/1"
        );
        let file = t.path().join("termination-log");
        std::fs::write(&file, "").unwrap();
        assert_eq!(
            bind_volume(&share, "abc-1", 2, &file, false, bind)
                .unwrap()
                .0,
            "abc-1/mounts/2"
        );
        std::fs::write(share.join("abc-1/mounts/2"), "bye").unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "bye");
        let e = std::fs::write(share.join("abc-1/mounts/0/f"), "x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
        std::fs::write(share.join("abc-1/mounts/1/f"), "x").unwrap();
        assert!(vol.join("f").exists());
        unbind_root(&share, "abc-1");
        assert!(vol.join("f").exists(), "a volume's content is left alone");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "bye");
        assert!(!share.join("abc-1").exists());
        assert!(
            root.join("marker").exists(),
            "the container's root is left alone"
        );
    }

    /// A mount the share's writer (the guest) swaps in for a mount point is refused, and
    /// what the symlink names is neither mounted on nor unmounted.
    #[test]
    fn a_symlink_in_the_pod_share_is_never_mounted_on() {
        if !crate::test_support::as_root("a_symlink_in_the_pod_share_is_never_mounted_on") {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let share = t.path().join("pod");
        let victim = t.path().join("victim");
        let vol = t.path().join("vol");
        for d in [&share, &victim, &vol] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(vol.join("payload"), "x").unwrap();
        std::fs::create_dir_all(share.join("c1/mounts")).unwrap();
        std::os::unix::fs::symlink(&victim, share.join("c1/mounts/0")).unwrap();
        let bind = crate::mounts::HostBind::default();
        let e = bind_volume(&share, "c1", 0, &vol, false, bind).unwrap_err();
        assert!(e.to_string().contains("no symlinks"), "{e}");
        assert!(
            !victim.join("payload").exists(),
            "nothing mounted on the victim"
        );
        // A symlinked member directory too.
        std::os::unix::fs::symlink(&victim, share.join("c2")).unwrap();
        assert!(bind_root(&share, "c2", &vol).is_err());
        assert!(!victim.join("payload").exists());
        // Unbinding through a symlink unmounts nothing.
        nix::mount::mount(
            Some(&vol),
            &victim,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        unbind_root(&share, "c1");
        assert!(victim.join("payload").exists(), "the victim's mount stays");
        nix::mount::umount2(&victim, nix::mount::MntFlags::MNT_DETACH).unwrap();

        // A symlink earlier in the path: `<id>/mounts` or `<id>` swapped for a link to a host
        // directory whose entries look like mount points. Nothing there is unmounted or
        // removed.
        let host = t.path().join("host");
        std::fs::create_dir_all(host.join("emptydir")).unwrap();
        std::fs::create_dir_all(host.join("rootfs")).unwrap();
        std::fs::write(host.join("file"), "keep").unwrap();
        nix::mount::mount(
            Some(&vol),
            &host.join("rootfs"),
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        std::fs::create_dir_all(share.join("c3")).unwrap();
        std::os::unix::fs::symlink(&host, share.join("c3/mounts")).unwrap();
        std::os::unix::fs::symlink(&host, share.join("c4")).unwrap();
        unbind_root(&share, "c3");
        unbind_root(&share, "c4");
        assert!(
            host.join("emptydir").is_dir(),
            "an empty host dir was removed"
        );
        assert_eq!(std::fs::read_to_string(host.join("file")).unwrap(), "keep");
        assert!(
            host.join("rootfs/payload").exists(),
            "a host mount named rootfs was unmounted"
        );
        nix::mount::umount2(&host.join("rootfs"), nix::mount::MntFlags::MNT_DETACH).unwrap();
    }

    /// A mount below a read-only volume stays writable (runc's non-recursive read-only
    /// bind), unless `rro` asks read-only for all of it.
    #[test]
    fn read_only_covers_the_mounts_below_a_volume_only_with_rro() {
        if !crate::test_support::as_root("read_only_covers_the_mounts_below_a_volume_only_with_rro")
        {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let share = t.path().join("pod");
        let vol = t.path().join("vol");
        std::fs::create_dir(&share).unwrap();
        std::fs::create_dir_all(vol.join("tmpfs")).unwrap();
        let tmpfs = vol.join("tmpfs");
        nix::mount::mount(
            Some("tmpfs"),
            &tmpfs,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        let plain = crate::mounts::HostBind::default();
        let rro = crate::mounts::HostBind {
            recursive_readonly: true,
            ..plain
        };
        bind_volume(&share, "c", 0, &vol, true, plain).unwrap();
        bind_volume(&share, "c", 1, &vol, true, rro).unwrap();
        let erofs = |p: &str| {
            std::fs::write(share.join(p), "x")
                .err()
                .and_then(|e| e.raw_os_error())
                == Some(libc::EROFS)
        };
        assert!(erofs("c/mounts/0/f"));
        assert!(!erofs("c/mounts/0/tmpfs/f"), "the tmpfs stays writable");
        assert!(erofs("c/mounts/1/f"));
        assert!(erofs("c/mounts/1/tmpfs/g"), "rro covers the tmpfs");
        unbind_root(&share, "c");
        nix::mount::umount2(&tmpfs, nix::mount::MntFlags::MNT_DETACH).unwrap();
        assert!(!share.join("c").exists());
    }

    /// Looked up in another mount namespace (the host's, for a pod's shim), a volume brings
    /// the mounts made there after the caller's namespace was made, and propagation decides
    /// whether later ones follow: what a private `/` never propagates.
    #[test]
    fn volumes_are_looked_up_in_the_given_namespace() {
        use std::os::fd::AsFd;
        if !crate::test_support::as_root("volumes_are_looked_up_in_the_given_namespace") {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let share = t.path().join("pod");
        let vol = t.path().join("vol");
        std::fs::create_dir(&share).unwrap();
        std::fs::create_dir_all(vol.join("early")).unwrap();
        std::fs::create_dir_all(vol.join("late")).unwrap();
        // The "host": a namespace of a thread of its own, private (nothing reaches this
        // process from it), with a tmpfs below the volume, the volume itself shared there.
        let (ns_tx, ns_rx) = std::sync::mpsc::channel();
        let (late_tx, late_rx) = std::sync::mpsc::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let v = vol.clone();
        let host = std::thread::spawn(move || {
            use nix::mount::{mount, MsFlags};
            nix::sched::unshare(
                nix::sched::CloneFlags::CLONE_FS | nix::sched::CloneFlags::CLONE_NEWNS,
            )
            .unwrap();
            let none = None::<&str>;
            mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none).unwrap();
            mount(Some(&v), &v, none, MsFlags::MS_BIND, none).unwrap();
            mount(none, &v, none, MsFlags::MS_SHARED, none).unwrap();
            let tmpfs = |at: &Path, marker: &str| {
                mount(Some("tmpfs"), at, Some("tmpfs"), MsFlags::empty(), none).unwrap();
                std::fs::write(at.join(marker), "x").unwrap();
            };
            tmpfs(&v.join("early"), "early-marker");
            ns_tx
                .send(std::fs::File::open("/proc/thread-self/ns/mnt").unwrap())
                .unwrap();
            late_rx.recv().unwrap();
            tmpfs(&v.join("late"), "late-marker");
            done_tx.send(()).unwrap();
        });
        let ns = OwnedFd::from(ns_rx.recv().unwrap());
        let clone = |ns| fsmount::clone_tree(&vol, ns).unwrap();
        let marker = vol.join("early/early-marker");
        assert!(!marker.exists(), "not in this namespace");
        let there = fsmount::in_namespace(Some(ns.as_fd()), || std::fs::metadata(&marker));
        assert!(
            there.is_ok_and(|m| m.is_file()),
            "a file of the other namespace"
        );
        let target = share_point(&share, "c", &["mounts", "0"], false).unwrap();
        fsmount::attach_tree(clone(None), target.as_fd()).unwrap();
        assert!(!share.join("c/mounts/0/early/early-marker").exists());
        for (n, propagation) in [
            (1, crate::mounts::BindPropagation::Slave),
            (2, crate::mounts::BindPropagation::Private),
        ] {
            let target = share_point(&share, "c", &["mounts", &n.to_string()], false).unwrap();
            let tree = clone(Some(ns.as_fd()));
            let p = match propagation {
                crate::mounts::BindPropagation::Private => libc::MS_PRIVATE,
                _ => libc::MS_SLAVE,
            };
            fsmount::set_tree_attrs(tree.as_fd(), 0, false, p).unwrap();
            fsmount::attach_tree(tree, target.as_fd()).unwrap();
            assert!(
                share
                    .join(format!("c/mounts/{n}/early/early-marker"))
                    .exists(),
                "the host's earlier mount comes along"
            );
        }
        late_tx.send(()).unwrap();
        done_rx.recv().unwrap();
        host.join().unwrap();
        assert!(
            share.join("c/mounts/1/late/late-marker").exists(),
            "a slave takes the host's later mount"
        );
        assert!(
            !share.join("c/mounts/2/late/late-marker").exists(),
            "a private copy does not"
        );
        unbind_root(&share, "c");
        assert!(!share.join("c").exists());
    }
}
