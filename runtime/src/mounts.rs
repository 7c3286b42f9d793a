//! The OCI `mounts` of a bundle mapped onto what crosses the VM boundary.
//!
//! - Kernel filesystems (`/proc`, `/sys`, `/dev`, `/dev/pts`, `/dev/mqueue`, cgroups) are the
//!   guest's own: the agent mounts them, nothing of the host's is passed.
//! - `/dev/shm` becomes a tmpfs in the guest (shared memory cannot cross a VM boundary).
//! - `tmpfs` mounts become guest tmpfs mounts with the same size/mode options.
//! - Bind mounts of directories (volumes, `-v /host:/ctr`) are shared one device each, over
//!   virtio-fs when virtiofsd is installed and over virtio-9p otherwise ([`SharePolicy`];
//!   docs/decisions.md has the measurements). `ro` is enforced on the host (virtiofsd
//!   `--readonly`, QEMU's 9p `readonly=on`) as well as by the guest mount, so not even root in
//!   the guest can write through it.
//! - Bind mounts of small regular files (Docker's `/etc/hosts`, `/etc/resolv.conf`,
//!   `/etc/hostname`) are copied into the guest when the container starts.
//! - Anything else (sockets, devices, large single files, other filesystem types) is refused
//!   with an error naming the mount.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use agentvm_protocol::{MountSource, MountSpec, RootfsSpec};
use oci_spec::runtime::Mount;

use crate::assets;
use crate::error::{Error, Result};
use crate::vmm::{FsCache, Share, ShareTransport, VirtioFs};

/// How the guest mounts a shared directory: 9p2000.L over virtio, 512 KiB messages, and
/// `cache=mmap` so that mmap'd files (shared libraries, databases) work.
pub const NINEP_OPTIONS: &str = "trans=virtio,version=9p2000.L,msize=524288,cache=mmap";
/// Annotation (`docker run --annotation`) choosing the transport of the container's volumes
/// and bind mounts: `virtiofs` or `9p`.
pub const SHARES_ANNOTATION: &str = "io.agentvm.shares";
/// Annotation choosing the transport of the container root: `virtiofs` or `9p`.
pub const ROOT_ANNOTATION: &str = "io.agentvm.root-share";
/// Annotation choosing virtiofsd's `--cache` policy: `never`, `auto`, `metadata`, `always`.
pub const CACHE_ANNOTATION: &str = "io.agentvm.virtiofs-cache";
/// virtiofsd's cache policy unless annotated: host and guest see each other's writes at once.
pub const DEFAULT_CACHE: FsCache = FsCache::Never;

/// Largest single file copied into the guest for a file bind mount.
pub const MAX_FILE_BIND: u64 = 1 << 20;
/// Most directory shares per VM (each is a virtio-mmio device).
pub const MAX_SHARES: usize = 16;
/// `/dev/shm` of the guest when the spec gives no size (Docker's default).
const SHM_DEFAULT: &str = "mode=1777,size=65536k";

/// Destinations the agent provides itself.
const GUEST_OWN: &[&str] = &[
    "/proc",
    "/sys",
    "/sys/fs/cgroup",
    "/dev",
    "/dev/pts",
    "/dev/mqueue",
    "/dev/console",
];
/// Filesystem types the guest kernel provides itself.
const GUEST_OWN_TYPES: &[&str] = &["proc", "sysfs", "devpts", "mqueue", "cgroup", "cgroup2"];

/// Which transport a container's shares use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharePolicy {
    /// Volumes and bind mounts.
    pub volumes: ShareTransport,
    /// The container root (Docker's overlay2 `merged` dir or the snapshotter mount).
    pub root: ShareTransport,
    /// What writable volumes may not leave on the host (the container's capabilities).
    pub limits: crate::vmm::VolumeLimits,
}

/// What a transport annotation asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wanted {
    NineP,
    VirtioFs,
}

fn wanted(annotations: &HashMap<String, String>, key: &str) -> Result<Option<Wanted>> {
    match annotations.get(key).map(|v| v.trim()) {
        None | Some("") => Ok(None),
        Some("9p") => Ok(Some(Wanted::NineP)),
        Some("virtiofs" | "virtio-fs") => Ok(Some(Wanted::VirtioFs)),
        Some(other) => Err(Error::Invalid(format!(
            "annotation {key}={other:?}: use \"virtiofs\" or \"9p\""
        ))),
    }
}

impl SharePolicy {
    /// Every share over virtio-9p.
    pub fn nine_p() -> Self {
        SharePolicy {
            volumes: ShareTransport::NineP,
            root: ShareTransport::NineP,
            limits: Default::default(),
        }
    }

    /// This host's policy for a container with `annotations`: volumes over virtio-fs when
    /// virtiofsd is installed, else virtio-9p; the root over virtio-9p. Annotations override
    /// either ([`SHARES_ANNOTATION`], [`ROOT_ANNOTATION`], [`CACHE_ANNOTATION`]).
    pub fn detect(annotations: &HashMap<String, String>) -> Result<Self> {
        Self::resolve(annotations, || assets::virtiofsd().ok())
    }

    /// [`SharePolicy::detect`] with `virtiofsd` as the lookup of the daemon (a seam for
    /// tests). Asking for virtio-fs by annotation on a host without virtiofsd is an error.
    pub fn resolve(
        annotations: &HashMap<String, String>,
        virtiofsd: impl FnOnce() -> Option<PathBuf>,
    ) -> Result<Self> {
        let cache = match annotations.get(CACHE_ANNOTATION).map(|v| v.trim()) {
            None | Some("") => DEFAULT_CACHE,
            Some(v) => FsCache::parse(v).ok_or_else(|| {
                Error::Invalid(format!(
                    "annotation {CACHE_ANNOTATION}={v:?}: use never, auto, metadata or always"
                ))
            })?,
        };
        let volumes = wanted(annotations, SHARES_ANNOTATION)?;
        let root = wanted(annotations, ROOT_ANNOTATION)?.unwrap_or(Wanted::NineP);
        let daemon = virtiofsd();
        let virtio_fs = |key: &str| -> Result<ShareTransport> {
            match &daemon {
                Some(d) => Ok(ShareTransport::VirtioFs(VirtioFs {
                    daemon: d.clone(),
                    cache,
                })),
                None => Err(Error::Missing {
                    what: "virtiofsd".into(),
                    hint: format!(
                        "annotation {key} asks for virtio-fs: cargo install virtiofsd (or run \
                         hack/install-deps.sh)"
                    ),
                }),
            }
        };
        let volumes = match volumes {
            Some(Wanted::NineP) => ShareTransport::NineP,
            Some(Wanted::VirtioFs) => virtio_fs(SHARES_ANNOTATION)?,
            None if daemon.is_some() => virtio_fs(SHARES_ANNOTATION)?,
            None => ShareTransport::NineP,
        };
        let root = match root {
            Wanted::NineP => ShareTransport::NineP,
            Wanted::VirtioFs => virtio_fs(ROOT_ANNOTATION)?,
        };
        Ok(SharePolicy {
            volumes,
            root,
            limits: Default::default(),
        })
    }
}

/// How the guest mounts `share`: the filesystem type and the mount(2) data options.
pub fn guest_mount(share: &Share) -> (&'static str, String) {
    let (fstype, mut options) = match share.transport {
        ShareTransport::NineP => ("9p", NINEP_OPTIONS.to_string()),
        ShareTransport::VirtioFs(_) => ("virtiofs", String::new()),
    };
    if share.readonly {
        if !options.is_empty() {
            options.push(',');
        }
        options.push_str("ro");
    }
    (fstype, options)
}

/// The share holding the container root at `path` and how the guest mounts it.
pub fn root_share(
    tag: &str,
    path: &Path,
    readonly: bool,
    policy: &SharePolicy,
) -> (Share, RootfsSpec) {
    let share = Share {
        tag: tag.into(),
        path: path.to_path_buf(),
        readonly,
        transport: policy.root.clone(),
        overlay_upper: false,
        expose: Vec::new(),
        limits: Default::default(),
    };
    let (fstype, options) = guest_mount(&share);
    let spec = RootfsSpec {
        device: tag.into(),
        fstype: fstype.into(),
        overlay: false,
        options: (!options.is_empty()).then_some(options),
        layers: None,
        subdir: None,
    };
    (share, spec)
}

/// What the VM gets for the bundle's mounts.
#[derive(Debug, Clone, Default)]
pub struct MountPlan {
    /// Directory shares (tags `vol0`, `vol1`, ...).
    pub shares: Vec<Share>,
    /// What the agent mounts, in spec order.
    pub mounts: Vec<MountSpec>,
    /// The content of the `/etc/resolv.conf` the container gets, when one is bound.
    pub resolv_conf: Option<String>,
    /// How the host binds each share's source, in `shares` order (a pod's container:
    /// crate::pod::bind_volume).
    pub host_binds: Vec<HostBind>,
}

/// Whether mounts the host makes below a bind's source later reach the container (the
/// spec's `rprivate`, `rslave`, `rshared`; Kubernetes' mount propagation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BindPropagation {
    /// None do (`rprivate`, Kubernetes' default).
    Private,
    /// They do (`rslave`, HostToContainer); also a spec that says nothing, as under runc,
    /// whose root is a slave of the host's.
    #[default]
    Slave,
    /// They do, and the container's would reach the host (`rshared`, Bidirectional): the
    /// guest's mounts stay in the VM, so this is [`BindPropagation::Slave`] with the source's
    /// peer group kept.
    Shared,
}

/// How the host binds a share's source: its propagation and whether read-only covers the
/// mounts below it too (`rro`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostBind {
    pub propagation: BindPropagation,
    pub recursive_readonly: bool,
}

impl HostBind {
    /// From a mount's OCI options (the last propagation option wins, as in runc).
    pub fn of(options: &[String]) -> HostBind {
        let mut bind = HostBind::default();
        for o in options {
            match o.as_str() {
                "private" | "rprivate" => bind.propagation = BindPropagation::Private,
                "slave" | "rslave" => bind.propagation = BindPropagation::Slave,
                "shared" | "rshared" => bind.propagation = BindPropagation::Shared,
                "rro" => bind.recursive_readonly = true,
                _ => {}
            }
        }
        bind
    }
}

impl MountPlan {
    /// Whether the container's resolver is Docker's embedded DNS server, which only answers
    /// inside the container's network namespace on the host.
    pub fn uses_docker_dns(&self) -> bool {
        self.resolv_conf.as_deref().is_some_and(|r| {
            r.lines().any(|l| {
                let mut w = l.split_whitespace();
                w.next() == Some("nameserver") && w.next() == Some(crate::dns::DOCKER_DNS)
            })
        })
    }
}

/// Maps the spec's mounts, sharing directories as `policy` says; reads file binds now (call
/// it when the container starts, after Docker has written `/etc/hosts` and
/// `/etc/resolv.conf`).
pub fn plan(mounts: &[Mount], policy: &SharePolicy) -> Result<MountPlan> {
    plan_with(mounts, policy, false, &|p| std::fs::metadata(p))
}

/// Files the CRI plugin (and Docker) write for a container and bind on these paths: copied
/// into the guest even for a pod's container (their content is known at start).
const COPIED_FILES: &[&str] = &["/etc/hosts", "/etc/hostname", "/etc/resolv.conf"];

/// [`plan`] for a pod's later container: a bind of another file (kubelet's termination
/// message file, a `subPath` volume, read-only or not) is a share like a directory's, so that
/// the container's writes reach the host file and the host's changes reach the container, as
/// under runc, whatever its size. The caller binds the file into the pod share
/// ([`crate::pod::member_request`]). `metadata` looks a bind's source up (in the host's
/// mount namespace, for a pod's shim: [`crate::pod::source_metadata`]).
pub fn plan_pod(
    mounts: &[Mount],
    policy: &SharePolicy,
    metadata: &dyn Fn(&Path) -> std::io::Result<std::fs::Metadata>,
) -> Result<MountPlan> {
    plan_with(mounts, policy, true, metadata)
}

fn plan_with(
    mounts: &[Mount],
    policy: &SharePolicy,
    live_files: bool,
    metadata: &dyn Fn(&Path) -> std::io::Result<std::fs::Metadata>,
) -> Result<MountPlan> {
    let mut out = MountPlan::default();
    for m in mounts {
        let dest = m.destination();
        let dest_str = dest.display().to_string();
        if !dest.is_absolute() || dest.components().any(|c| c.as_os_str() == "..") {
            return Err(Error::Invalid(format!(
                "mount destination {dest_str:?} must be an absolute path without `..`"
            )));
        }
        let typ = m.typ().as_deref().unwrap_or("");
        let options = m.options().as_deref().unwrap_or_default();
        let has = |o: &str| options.iter().any(|x| x == o);
        let readonly = has("ro") || has("rro");
        let bind = typ == "bind" || has("bind") || has("rbind");
        if dest_str == "/dev/shm" {
            let opts = if typ == "tmpfs" {
                data_options(options)
            } else {
                None
            };
            out.mounts.push(MountSpec {
                destination: dest_str,
                source: MountSource::Tmpfs {
                    options: Some(opts.unwrap_or_else(|| SHM_DEFAULT.into())),
                },
                readonly: false,
            });
            continue;
        }
        if GUEST_OWN.contains(&dest_str.as_str()) || GUEST_OWN_TYPES.contains(&typ) {
            continue;
        }
        if typ == "tmpfs" && !bind {
            out.mounts.push(MountSpec {
                destination: dest_str,
                source: MountSource::Tmpfs {
                    options: data_options(options),
                },
                readonly,
            });
            continue;
        }
        if !bind {
            return Err(Error::Invalid(format!(
                "mount of type {typ:?} on {dest_str} is not supported by agentvm: only bind \
                 mounts of directories and small files, and tmpfs, cross the VM boundary"
            )));
        }
        let source = m
            .source()
            .as_deref()
            .ok_or_else(|| Error::Invalid(format!("bind mount on {dest_str} has no source")))?;
        let meta = metadata(source).map_err(|e| Error::io("bind mount source", source, e))?;
        let live_file = live_files && meta.is_file() && !COPIED_FILES.contains(&dest_str.as_str());
        if meta.is_dir() || live_file {
            let host_bind = HostBind::of(options);
            // A pod's container binds its shares into the one pod share: no device each.
            if !live_files && out.shares.len() >= MAX_SHARES {
                return Err(Error::Invalid(format!(
                    "too many directory mounts: agentvm shares at most {MAX_SHARES} per container"
                )));
            }
            let share = Share {
                tag: format!("vol{}", out.shares.len()),
                path: source.to_path_buf(),
                readonly,
                transport: policy.volumes.clone(),
                overlay_upper: false,
                expose: Vec::new(),
                limits: policy.limits,
            };
            let (fstype, options) = guest_mount(&share);
            out.mounts.push(MountSpec {
                destination: dest_str,
                source: MountSource::Share {
                    tag: share.tag.clone(),
                    options,
                    fstype: fstype.into(),
                },
                readonly,
            });
            out.shares.push(share);
            out.host_binds.push(host_bind);
        } else if meta.is_file() {
            let content = read_small_file(source, meta.len(), &dest_str)?;
            if dest_str == "/etc/resolv.conf" {
                out.resolv_conf = Some(content.clone());
            }
            use std::os::unix::fs::PermissionsExt;
            out.mounts.push(MountSpec {
                destination: dest_str,
                source: MountSource::File {
                    content,
                    mode: meta.permissions().mode() & 0o7777,
                },
                readonly,
            });
        } else {
            return Err(Error::Invalid(format!(
                "cannot bind-mount {} on {dest_str}: only directories and regular files cross \
                 the VM boundary (sockets and devices of the host stay on the host)",
                source.display()
            )));
        }
    }
    Ok(out)
}

fn read_small_file(source: &Path, len: u64, dest: &str) -> Result<String> {
    if len > MAX_FILE_BIND {
        return Err(Error::Invalid(format!(
            "cannot bind-mount the file {} on {dest}: single files are copied into the VM and \
             are limited to {} KiB; mount its directory instead",
            source.display(),
            MAX_FILE_BIND >> 10
        )));
    }
    let bytes = std::fs::read(source).map_err(|e| Error::io("read", PathBuf::from(source), e))?;
    String::from_utf8(bytes).map_err(|_| {
        Error::Invalid(format!(
            "cannot bind-mount the file {} on {dest}: single files are copied into the VM as \
             text; mount its directory instead",
            source.display()
        ))
    })
}

/// mount(2) data options (`size=`, `mode=`, `uid=`...) among OCI mount options; flags like
/// `nosuid` are left out.
fn data_options(options: &[String]) -> Option<String> {
    let data: Vec<&str> = options
        .iter()
        .map(String::as_str)
        .filter(|o| o.contains('='))
        .collect();
    (!data.is_empty()).then(|| data.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mounts(json: &str) -> Vec<Mount> {
        serde_json::from_str(json).unwrap()
    }

    fn ninep() -> SharePolicy {
        SharePolicy::nine_p()
    }

    fn annotations(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn virtiofs(cache: FsCache) -> ShareTransport {
        ShareTransport::VirtioFs(VirtioFs {
            daemon: "/opt/virtiofsd".into(),
            cache,
        })
    }

    #[test]
    fn virtio_fs_for_volumes_when_virtiofsd_is_found_9p_otherwise() {
        let none = HashMap::new();
        let found = || Some(PathBuf::from("/opt/virtiofsd"));
        let p = SharePolicy::resolve(&none, found).unwrap();
        assert_eq!(p.volumes, virtiofs(DEFAULT_CACHE));
        assert_eq!(p.root, ShareTransport::NineP);
        // The fallback: no virtiofsd, every share on 9p, no error.
        let p = SharePolicy::resolve(&none, || None).unwrap();
        assert_eq!(p, ninep());
    }

    #[test]
    fn annotations_choose_transports_and_cache() {
        let found = || Some(PathBuf::from("/opt/virtiofsd"));
        let a = annotations(&[
            (SHARES_ANNOTATION, "9p"),
            (ROOT_ANNOTATION, "virtiofs"),
            (CACHE_ANNOTATION, "auto"),
        ]);
        let p = SharePolicy::resolve(&a, found).unwrap();
        assert_eq!(p.volumes, ShareTransport::NineP);
        assert_eq!(p.root, virtiofs(FsCache::Auto));
        // Asking for virtio-fs where there is no virtiofsd says so.
        let a = annotations(&[(ROOT_ANNOTATION, "virtiofs")]);
        let e = SharePolicy::resolve(&a, || None).unwrap_err().to_string();
        assert!(e.contains("virtiofsd not found"), "{e}");
        for (k, v) in [(SHARES_ANNOTATION, "nfs"), (CACHE_ANNOTATION, "sometimes")] {
            let e = SharePolicy::resolve(&annotations(&[(k, v)]), found)
                .unwrap_err()
                .to_string();
            assert!(e.contains(k), "{e}");
        }
    }

    #[test]
    fn virtio_fs_volumes_are_mounted_as_virtiofs() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().display().to_string();
        let json = format!(
            r#"[{{"destination":"/work","type":"bind","source":"{src}","options":["rbind"]}},
                {{"destination":"/ro","type":"bind","source":"{src}","options":["rbind","ro"]}}]"#
        );
        let policy = SharePolicy {
            volumes: virtiofs(FsCache::Never),
            root: ShareTransport::NineP,
            limits: Default::default(),
        };
        let p = plan(&mounts(&json), &policy).unwrap();
        assert!(p.shares.iter().all(Share::is_virtio_fs));
        assert!(p.shares[1].readonly, "virtiofsd gets --readonly");
        let MountSource::Share {
            tag,
            options,
            fstype,
        } = &p.mounts[0].source
        else {
            panic!("{:?}", p.mounts[0]);
        };
        assert_eq!(
            (tag.as_str(), options.as_str(), fstype.as_str()),
            ("vol0", "", "virtiofs")
        );
        assert!(
            matches!(&p.mounts[1].source, MountSource::Share { options, fstype, .. } if options == "ro" && fstype == "virtiofs")
        );
    }

    #[test]
    fn root_share_spec_follows_the_transport() {
        let (share, spec) = root_share("rootfs", Path::new("/m"), false, &ninep());
        assert_eq!(share.transport, ShareTransport::NineP);
        assert_eq!(
            (spec.device.as_str(), spec.fstype.as_str()),
            ("rootfs", "9p")
        );
        assert_eq!(spec.options.as_deref(), Some(NINEP_OPTIONS));
        let policy = SharePolicy {
            volumes: ShareTransport::NineP,
            root: virtiofs(FsCache::Never),
            limits: Default::default(),
        };
        let (share, spec) = root_share("rootfs", Path::new("/m"), false, &policy);
        assert!(share.is_virtio_fs());
        assert_eq!(spec.fstype, "virtiofs");
        assert_eq!(spec.options, None);
        let (_, spec) = root_share("rootfs", Path::new("/m"), true, &policy);
        assert_eq!(spec.options.as_deref(), Some("ro"));
        let (_, spec) = root_share("rootfs", Path::new("/m"), true, &ninep());
        assert_eq!(
            spec.options.as_deref(),
            Some(format!("{NINEP_OPTIONS},ro").as_str())
        );
    }

    #[test]
    fn docker_default_mounts() {
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path();
        std::fs::write(
            c.join("resolv.conf"),
            "nameserver 127.0.0.11\noptions ndots:0\n",
        )
        .unwrap();
        std::fs::write(c.join("hosts"), "127.0.0.1 localhost\n172.18.0.2 abc\n").unwrap();
        std::fs::create_dir(c.join("shm")).unwrap();
        let json = format!(
            r#"[
            {{"destination":"/proc","type":"proc","source":"proc","options":["nosuid","noexec","nodev"]}},
            {{"destination":"/dev","type":"tmpfs","source":"tmpfs","options":["nosuid","strictatime","mode=755","size=65536k"]}},
            {{"destination":"/dev/pts","type":"devpts","source":"devpts","options":["nosuid","noexec","newinstance","ptmxmode=0666","mode=0620","gid=5"]}},
            {{"destination":"/sys","type":"sysfs","source":"sysfs","options":["nosuid","noexec","nodev","ro"]}},
            {{"destination":"/sys/fs/cgroup","type":"cgroup","source":"cgroup","options":["ro","nosuid","noexec","nodev"]}},
            {{"destination":"/dev/mqueue","type":"mqueue","source":"mqueue","options":["nosuid","noexec","nodev"]}},
            {{"destination":"/dev/shm","type":"bind","source":"{0}/shm","options":["rbind","rprivate"]}},
            {{"destination":"/etc/resolv.conf","type":"bind","source":"{0}/resolv.conf","options":["rbind","rprivate"]}},
            {{"destination":"/etc/hosts","type":"bind","source":"{0}/hosts","options":["rbind","rprivate"]}}
        ]"#,
            c.display()
        );
        let p = plan(&mounts(&json), &ninep()).unwrap();
        assert!(p.shares.is_empty());
        let dests: Vec<_> = p.mounts.iter().map(|m| m.destination.as_str()).collect();
        assert_eq!(dests, ["/dev/shm", "/etc/resolv.conf", "/etc/hosts"]);
        assert_eq!(
            p.mounts[0].source,
            MountSource::Tmpfs {
                options: Some(SHM_DEFAULT.into())
            }
        );
        assert!(
            matches!(&p.mounts[2].source, MountSource::File { content, .. } if content.contains("172.18.0.2 abc"))
        );
        assert!(p.uses_docker_dns());
    }

    #[test]
    fn a_pods_writable_file_binds_are_shares_its_etc_files_and_read_only_ones_copies() {
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path();
        for f in ["hosts", "termination-log", "key"] {
            std::fs::write(c.join(f), "x\n").unwrap();
        }
        let json = format!(
            r#"[
            {{"destination":"/etc/hosts","type":"bind","source":"{0}/hosts","options":["rbind","rw"]}},
            {{"destination":"/dev/termination-log","type":"bind","source":"{0}/termination-log","options":["rbind","rw"]}},
            {{"destination":"/etc/key","type":"bind","source":"{0}/key","options":["rbind","ro"]}}
        ]"#,
            c.display()
        );
        let p = plan_pod(&mounts(&json), &ninep(), &|p| std::fs::metadata(p)).unwrap();
        assert_eq!(p.shares.len(), 2);
        assert_eq!(p.shares[0].path, c.join("termination-log"));
        assert_eq!(
            (p.shares[1].path.clone(), p.shares[1].readonly),
            (c.join("key"), true)
        );
        assert!(matches!(p.mounts[0].source, MountSource::File { .. }));
        assert!(matches!(&p.mounts[1].source, MountSource::Share { tag, .. } if tag == "vol0"));
        assert!(matches!(&p.mounts[2].source, MountSource::Share { tag, .. } if tag == "vol1"));
        assert!(p.mounts[2].readonly);
        // Docker's and ctr's containers keep copies.
        let p = plan(&mounts(&json), &ninep()).unwrap();
        assert!(p.shares.is_empty());
    }

    #[test]
    fn volumes_are_shares_and_ro_is_carried_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().display().to_string();
        let json = format!(
            r#"[{{"destination":"/work","type":"bind","source":"{src}","options":["rbind"]}},
                {{"destination":"/ro","type":"bind","source":"{src}","options":["rbind","ro"]}},
                {{"destination":"/scratch","type":"tmpfs","source":"tmpfs","options":["nosuid","size=1m","ro"]}}]"#
        );
        let p = plan(&mounts(&json), &ninep()).unwrap();
        assert_eq!(p.shares.len(), 2);
        assert_eq!(
            (p.shares[0].tag.as_str(), p.shares[0].readonly),
            ("vol0", false)
        );
        assert_eq!(
            (p.shares[1].tag.as_str(), p.shares[1].readonly),
            ("vol1", true)
        );
        assert!(
            matches!(&p.mounts[1].source, MountSource::Share { tag, options, fstype } if tag == "vol1" && options.ends_with(",ro") && fstype == "9p")
        );
        assert!(p.mounts[1].readonly);
        assert_eq!(
            p.mounts[2].source,
            MountSource::Tmpfs {
                options: Some("size=1m".into())
            }
        );
        assert!(p.mounts[2].readonly);
        assert!(!p.uses_docker_dns());
    }

    #[test]
    fn host_binds_follow_the_propagation_and_rro_options() {
        let of = |o: &[&str]| HostBind::of(&o.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(of(&[]), HostBind::default());
        assert_eq!(of(&["rbind"]).propagation, BindPropagation::Slave);
        assert_eq!(
            of(&["rbind", "rprivate"]).propagation,
            BindPropagation::Private
        );
        assert_eq!(
            of(&["rshared", "rslave"]).propagation,
            BindPropagation::Slave
        );
        assert_eq!(
            of(&["rbind", "shared"]).propagation,
            BindPropagation::Shared
        );
        assert!(of(&["rro"]).recursive_readonly);
        assert!(!of(&["ro"]).recursive_readonly);
    }

    #[test]
    fn unsupported_sources_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("docker.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; (MAX_FILE_BIND + 1) as usize]).unwrap();
        for (src, typ, want) in [
            (sock.display().to_string(), "bind", "sockets and devices"),
            (big.display().to_string(), "bind", "limited to 1024 KiB"),
            ("/nonexistent/x".to_string(), "bind", "bind mount source"),
            ("/dev/sda".to_string(), "ext4", "not supported"),
        ] {
            let json = format!(r#"[{{"destination":"/x","type":"{typ}","source":"{src}"}}]"#);
            let e = plan(&mounts(&json), &ninep()).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        let e = plan(
            &mounts(r#"[{"destination":"x/../y","type":"tmpfs"}]"#),
            &ninep(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("absolute"), "{e}");
    }
}
