//! The sandbox's cgroup on the host: QEMU and its helper daemons are charged to, and bounded
//! by, the container's cgroup (`linux.cgroupsPath`), as runc would place a container's
//! processes, so the host's OOM killer, `systemd-cgtop` and the engine's accounting see the
//! VM (docs/decisions.md, "Host cgroups"; docs/security.md, "Host resources: cgroups").
//!
//! - [`cgroup_path`] reads `linux.cgroupsPath` in both of runc's forms: a cgroupfs path
//!   (`/docker/<id>`, ctr's `/<namespace>/<id>`) or systemd's `slice:prefix:name`
//!   (`system.slice:docker:<id>` is `/system.slice/docker-<id>.scope`).
//! - [`Layout::detect`] tells cgroup v1 (one hierarchy per controller: these hosts) from v2
//!   (unified) under a root that is a parameter (`/sys/fs/cgroup`), so tests use a temp dir.
//! - [`HostCgroup::create`] makes the cgroup in every hierarchy and writes [`Limits`]: memory =
//!   guest RAM + [`overhead_mib`], no swap, CPU shares and a quota, a pids limit.
//! - [`enter`] makes a spawned process join the cgroup itself, between fork and exec, through
//!   `cgroup.procs` files the parent opened: there is no moment where it runs outside.
//! - [`HostCgroup::remove`] and [`remove_recorded`] (after a crash) remove what was created.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use crate::vmm::Accel;

/// Where the kernel's cgroup filesystems are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The parent of a container's cgroup when its spec names none (`agentvm` CLI, tools that
/// leave `linux.cgroupsPath` out): `/agentvm/<id>`.
pub const DEFAULT_PARENT: &str = "agentvm";
/// Host memory on top of the guest's RAM under KVM: QEMU's own heap, its device state and
/// thread stacks, virtiofsd and vhost-device-vsock (docs/decisions.md, "Host cgroups").
pub const KVM_OVERHEAD_MIB: u64 = 160;
/// QEMU's TCG translation cache, bounded by agentvm (`-accel tcg,tb-size=256`): QEMU's
/// default is 1 GiB on a host with 8 GiB or more, filled as the guest runs new code.
pub const TCG_TB_SIZE_MIB: u64 = 256;
/// Under TCG: [`TCG_TB_SIZE_MIB`] + the rest measured on an idle and a busy sandbox (121 and
/// 189 MiB besides the guest's RAM, page cache included), with headroom
/// (docs/decisions.md, "Host cgroups").
pub const TCG_OVERHEAD_MIB: u64 = TCG_TB_SIZE_MIB + 256;
/// Processes and threads of QEMU and its helpers (the kernel counts threads): an idle
/// sandbox has about 10, one doing disk and file I/O up to ~100 (QEMU's block thread pool
/// alone may grow to 64); measured, with headroom.
pub const PIDS_MAX: u64 = 512;
/// CPU time granted on top of the VM's CPUs for QEMU's I/O threads and the helper daemons,
/// in microseconds per [`CPU_PERIOD_US`]: half a CPU.
pub const IO_CPU_ALLOWANCE_US: u64 = 50_000;
/// The CFS period of the quota, microseconds (the kernel's default).
pub const CPU_PERIOD_US: u64 = 100_000;

/// The v1 controllers the sandbox's processes join; `memory`, `cpu` and `pids` carry limits,
/// `cpuacct` and `blkio` account. A missing one is a warning.
const V1_CONTROLLERS: &[&str] = &["memory", "cpu", "cpuacct", "pids", "blkio"];
/// The v2 controllers enabled for the sandbox's cgroup.
const V2_CONTROLLERS: &[&str] = &["memory", "cpu", "io", "pids"];
/// How long a removal waits for the cgroup to empty (processes killed but not yet gone).
const REMOVE_WAIT: Duration = Duration::from_secs(5);

/// What can go wrong with the host cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// `linux.cgroupsPath` cannot be used.
    #[error("linux.cgroupsPath {path:?}: {reason}")]
    InvalidPath { path: String, reason: String },
    /// Neither cgroup v1 hierarchies nor cgroup v2 under the root.
    #[error("no cgroup filesystem under {}: mount cgroup v1 hierarchies or cgroup2 there", root.display())]
    NoCgroupFs { root: PathBuf },
    /// A cgroup file or directory could not be written or made.
    #[error("host cgroup: cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The cgroup stayed populated.
    #[error("host cgroup {}: cannot remove it, processes {pids:?} are still in it", path.display())]
    Busy { path: PathBuf, pids: Vec<u32> },
}

fn io_err(action: &'static str, path: &Path, source: std::io::Error) -> CgroupError {
    CgroupError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The container's cgroup relative to the root of each hierarchy, as runc reads
/// `linux.cgroupsPath`:
///
/// - `slice:prefix:name` (the systemd driver's form): `/<expanded slice>/<prefix>-<name>.scope`;
///   an empty slice is `system.slice`, an empty prefix leaves `<name>.scope`, a name that is a
///   slice is that slice under the parent;
/// - any other path: a cgroupfs path, cleaned lexically as runc does (`..` cannot climb above
///   the root). A relative path is taken from the root too (runc would take it from its own
///   cgroup, which for a shim is containerd's);
/// - none or empty: `/agentvm/<id>` ([`DEFAULT_PARENT`]), so a sandbox is never unbounded.
///
/// The root itself is refused: it cannot hold limits, and is never removed.
pub fn cgroup_path(cgroups_path: Option<&str>, id: &str) -> Result<PathBuf, CgroupError> {
    let invalid = |p: &str, reason: &str| CgroupError::InvalidPath {
        path: p.to_string(),
        reason: reason.to_string(),
    };
    let raw = match cgroups_path.filter(|p| !p.is_empty()) {
        Some(p) => p,
        None => {
            return clean(&format!("{DEFAULT_PARENT}/{id}"))
                .ok_or_else(|| invalid(id, "is no usable name"))
        }
    };
    if raw.contains('\0') {
        return Err(invalid(raw, "contains a NUL byte"));
    }
    let path = match systemd_form(raw) {
        Some((slice, prefix, name)) => {
            let slice = if slice.is_empty() {
                "system.slice"
            } else {
                slice
            };
            let parent = expand_slice(slice).ok_or_else(|| {
                invalid(
                    raw,
                    "the slice must be a systemd slice name (a-b.slice, no '/')",
                )
            })?;
            if name.is_empty() || name.contains('/') {
                return Err(invalid(
                    raw,
                    "the unit name must be a single path component",
                ));
            }
            let unit = if name.ends_with(".slice") {
                name.to_string()
            } else if prefix.is_empty() {
                format!("{name}.scope")
            } else {
                format!("{prefix}-{name}.scope")
            };
            format!("{parent}/{unit}")
        }
        None => raw.to_string(),
    };
    clean(&path).ok_or_else(|| invalid(raw, "names the root cgroup"))
}

/// `slice:prefix:name` when `p` has that shape (exactly two colons, no `/`).
fn systemd_form(p: &str) -> Option<(&str, &str, &str)> {
    if p.contains('/') {
        return None;
    }
    let mut it = p.split(':');
    let (a, b, c) = (it.next()?, it.next()?, it.next()?);
    it.next().is_none().then_some((a, b, c))
}

/// systemd's slice hierarchy as runc's `ExpandSlice` builds it: `a-b-c.slice` lives in
/// `/a.slice/a-b.slice/a-b-c.slice`, `-.slice` is the root.
fn expand_slice(slice: &str) -> Option<String> {
    let stem = slice.strip_suffix(".slice")?;
    if stem.is_empty() || slice.contains('/') {
        return None;
    }
    if stem == "-" {
        return Some(String::new());
    }
    let (mut path, mut prefix) = (String::new(), String::new());
    for part in stem.split('-') {
        if part.is_empty() {
            return None;
        }
        path.push_str(&format!("/{prefix}{part}.slice"));
        prefix.push_str(part);
        prefix.push('-');
    }
    Some(path)
}

/// `p` cleaned lexically from `/` (`..` stops at the root) and made relative; `None` for the
/// root itself.
fn clean(p: &str) -> Option<PathBuf> {
    let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
    for c in Path::new(p).components() {
        match c {
            Component::Normal(s) => parts.push(s),
            Component::ParentDir => {
                parts.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    (!parts.is_empty()).then(|| parts.iter().collect())
}

/// The host memory one sandbox may use besides its guest RAM.
pub fn overhead_mib(accel: Accel) -> u64 {
    match accel {
        Accel::Kvm => KVM_OVERHEAD_MIB,
        Accel::Tcg => TCG_OVERHEAD_MIB,
    }
}

/// What the spec asks of the CPU (`linux.resources.cpu`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuRequest {
    pub shares: Option<u64>,
    pub quota: Option<i64>,
    pub period: Option<u64>,
}

/// The limits written to the sandbox's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory and memory+swap (no swap), bytes.
    pub memory_bytes: u64,
    /// v1 `cpu.shares` (v2: converted to `cpu.weight`); none leaves the default.
    pub cpu_shares: Option<u64>,
    /// CFS quota per [`CPU_PERIOD_US`], microseconds.
    pub cpu_quota_us: u64,
    pub pids_max: u64,
}

impl Limits {
    /// The limits of a VM with `memory_mib` of RAM and `vcpus` vCPUs:
    ///
    /// - memory: the guest's RAM + [`overhead_mib`] (the RAM already includes the guest
    ///   kernel's share, [`crate::oci::MEMORY_OVERHEAD_MIB`]); memory+swap the same;
    /// - CPU: the spec's shares; a quota of the CPUs the spec asks for (`--cpus`), or of the
    ///   VM's vCPUs when it asks none, plus [`IO_CPU_ALLOWANCE_US`];
    /// - pids: [`PIDS_MAX`]; the spec's pids limit applies to the container's processes in
    ///   the guest, not to QEMU's threads.
    pub fn for_vm(memory_mib: u32, vcpus: u32, accel: Accel, cpu: &CpuRequest) -> Limits {
        let cpus_us = match (cpu.quota, cpu.period) {
            (Some(q), Some(p)) if q > 0 && p > 0 => {
                // The spec's quota scaled to our period, never below 1% of a CPU.
                ((q as u128 * CPU_PERIOD_US as u128 / p as u128) as u64).max(1_000)
            }
            _ => u64::from(vcpus.max(1)) * CPU_PERIOD_US,
        };
        Limits {
            memory_bytes: (u64::from(memory_mib) + overhead_mib(accel)) << 20,
            cpu_shares: cpu.shares.filter(|&s| s > 0),
            cpu_quota_us: cpus_us + IO_CPU_ALLOWANCE_US,
            pids_max: PIDS_MAX,
        }
    }
}

/// What a container asks of its host cgroup: the spec's `linux.cgroupsPath` and CPU
/// resources (memory and vCPUs come from the VM's size).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    pub cgroups_path: Option<String>,
    pub cpu: CpuRequest,
}

impl Request {
    /// Makes the cgroup of sandbox `id` (a VM of `memory_mib` and `vcpus`) under
    /// [`CGROUP_ROOT`]. A host without any cgroup filesystem is a warning and `None`: the VM
    /// then runs in the caller's cgroup.
    pub fn create(
        &self,
        id: &str,
        memory_mib: u32,
        vcpus: u32,
        accel: Accel,
    ) -> Result<Option<std::sync::Arc<HostCgroup>>, CgroupError> {
        let path = cgroup_path(self.cgroups_path.as_deref(), id)?;
        let layout = match Layout::detect(Path::new(CGROUP_ROOT)) {
            Ok(l) => l,
            Err(e @ CgroupError::NoCgroupFs { .. }) => {
                tracing::warn!("{e}: the VM is not limited on the host");
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let limits = Limits::for_vm(memory_mib, vcpus, accel, &self.cpu);
        let cg = HostCgroup::create(&layout, &path, &limits)?;
        tracing::info!(
            "host cgroup /{}: memory {} MiB, cpu quota {} us per {CPU_PERIOD_US} us, pids {}",
            path.display(),
            limits.memory_bytes >> 20,
            limits.cpu_quota_us,
            limits.pids_max
        );
        Ok(Some(std::sync::Arc::new(cg)))
    }
}

/// A cgroup v1 hierarchy: where it is mounted and which of our controllers it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    pub mount: PathBuf,
    pub controllers: Vec<&'static str>,
}

/// How the host's cgroups are laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// cgroup v1: one hierarchy per controller (or co-mounted, like `cpu,cpuacct`).
    V1(Vec<Hierarchy>),
    /// cgroup v2: one unified hierarchy at this root.
    V2(PathBuf),
}

impl Layout {
    /// Looks at `root` (normally [`CGROUP_ROOT`]): cgroup v2 when it holds
    /// `cgroup.controllers`, else the v1 hierarchies of [`V1_CONTROLLERS`] found under it
    /// (a co-mounted hierarchy appears once). A v1 controller that is missing is logged.
    pub fn detect(root: &Path) -> Result<Layout, CgroupError> {
        if root.join("cgroup.controllers").is_file() {
            return Ok(Layout::V2(root.to_path_buf()));
        }
        let mut hierarchies: Vec<Hierarchy> = Vec::new();
        for &c in V1_CONTROLLERS {
            let dir = root.join(c);
            let Ok(mount) = dir.canonicalize() else {
                tracing::warn!(
                    "host cgroup: no {c} controller under {} (no {c} limit or accounting for VMs)",
                    root.display()
                );
                continue;
            };
            if !mount.join("cgroup.procs").is_file() {
                tracing::warn!("host cgroup: {} is not a cgroup hierarchy", dir.display());
                continue;
            }
            match hierarchies.iter_mut().find(|h| h.mount == mount) {
                Some(h) => h.controllers.push(c),
                None => hierarchies.push(Hierarchy {
                    mount,
                    controllers: vec![c],
                }),
            }
        }
        if hierarchies.is_empty() {
            return Err(CgroupError::NoCgroupFs {
                root: root.to_path_buf(),
            });
        }
        Ok(Layout::V1(hierarchies))
    }
}

/// One directory of the sandbox's cgroup (one per v1 hierarchy, one on v2).
#[derive(Debug)]
struct Dir {
    path: PathBuf,
    /// Made by us (so removed by us); an existing cgroup is only joined.
    created: bool,
    /// `<path>/cgroup.procs`.
    procs: PathBuf,
    /// Where this directory's OOM kill counter is: v1 `memory.oom_control`, v2
    /// `memory.events`.
    oom_file: Option<PathBuf>,
}

/// The sandbox's cgroup, made and limited. Dropping it without [`HostCgroup::remove`]
/// removes what it created in the background (best effort, never blocking).
#[derive(Debug)]
pub struct HostCgroup {
    /// Relative to each hierarchy's root, e.g. `docker/<id>`.
    pub path: PathBuf,
    dirs: Vec<Dir>,
    removed: std::sync::atomic::AtomicBool,
}

impl HostCgroup {
    /// Makes `path` (relative, from [`cgroup_path`]) in every hierarchy of `layout` and writes
    /// `limits`. A controller the host lacks is a warning; a limit that cannot be written is
    /// an error (and what was made is removed again).
    pub fn create(
        layout: &Layout,
        path: &Path,
        limits: &Limits,
    ) -> Result<HostCgroup, CgroupError> {
        let mut cg = HostCgroup {
            path: path.to_path_buf(),
            dirs: Vec::new(),
            removed: Default::default(),
        };
        if let Err(e) = cg.make(layout, limits) {
            let _ = cg.remove_with(None);
            return Err(e);
        }
        Ok(cg)
    }

    fn make(&mut self, layout: &Layout, limits: &Limits) -> Result<(), CgroupError> {
        match layout {
            Layout::V1(hierarchies) => {
                for h in hierarchies {
                    let oom = h
                        .controllers
                        .contains(&"memory")
                        .then_some("memory.oom_control");
                    let dir = self.mkdir(&h.mount, oom)?;
                    for &c in &h.controllers {
                        write_v1(&h.mount, &dir, c, limits)?;
                    }
                }
            }
            Layout::V2(root) => {
                let enabled = enable_v2(root, &self.path)?;
                let oom = enabled.contains(&"memory").then_some("memory.events");
                let dir = self.mkdir(root, oom)?;
                write_v2(&dir, &enabled, limits)?;
            }
        }
        Ok(())
    }

    /// Makes (or finds) the cgroup under `mount`; parents are made as `mkdir -p` would and
    /// are never removed (runc leaves `/docker` too).
    fn mkdir(&mut self, mount: &Path, oom_file: Option<&str>) -> Result<PathBuf, CgroupError> {
        let path = mount.join(&self.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io_err("create", parent, e))?;
        }
        let created = match std::fs::create_dir(&path) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                tracing::warn!(
                    "host cgroup {} exists already: joining it, and leaving it in place at the end",
                    path.display()
                );
                false
            }
            Err(e) => return Err(io_err("create", &path, e)),
        };
        self.dirs.push(Dir {
            procs: path.join("cgroup.procs"),
            path: path.clone(),
            created,
            oom_file: oom_file.map(|f| path.join(f)),
        });
        Ok(path)
    }

    /// The directories this cgroup made, to record in the sandbox's state dir.
    pub fn created_dirs(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .filter(|d| d.created)
            .map(|d| d.path.clone())
            .collect()
    }

    /// Every directory of the cgroup (one per hierarchy).
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.path.clone()).collect()
    }

    /// Moves process `pid` (all its threads) into the cgroup.
    pub fn add_pid(&self, pid: u32) -> Result<(), CgroupError> {
        for d in &self.dirs {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&d.procs)
                .map_err(|e| io_err("open", &d.procs, e))?;
            f.write_all(format!("{pid}\n").as_bytes())
                .map_err(|e| io_err("write a pid to", &d.procs, e))?;
        }
        Ok(())
    }

    /// Opens every `cgroup.procs` for writing (close-on-exec), for [`enter`].
    fn open_procs(&self) -> Result<Vec<OwnedFd>, CgroupError> {
        self.dirs
            .iter()
            .map(|d| {
                std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(&d.procs)
                    .map(OwnedFd::from)
                    .map_err(|e| io_err("open", &d.procs, e))
            })
            .collect()
    }

    /// How many processes the host's OOM killer ended in this cgroup (0 when the kernel does
    /// not count them).
    pub fn oom_kills(&self) -> u64 {
        self.dirs
            .iter()
            .filter_map(|d| d.oom_file.as_ref())
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .filter_map(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("oom_kill ")
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
            })
            .max()
            .unwrap_or(0)
    }

    /// Removes the directories this cgroup made, once its processes are gone: it waits up to
    /// a few seconds for exiting processes, then kills what is left in it (nothing but the
    /// sandbox's processes ever joins it). Blocking.
    pub fn remove(&self) -> Result<(), CgroupError> {
        self.remove_with(Some(REMOVE_WAIT))
    }

    fn remove_with(&self, grace: Option<Duration>) -> Result<(), CgroupError> {
        self.removed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        remove_dirs(&self.created_dirs(), grace)
    }
}

impl Drop for HostCgroup {
    fn drop(&mut self) {
        if self.removed.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let dirs = self.created_dirs();
        if dirs.is_empty() || remove_dirs(&dirs, None).is_ok() {
            return;
        }
        // Killed processes take a moment to leave: retry off this thread.
        let _ = std::thread::Builder::new()
            .name("agentvm-cgroup-rm".into())
            .spawn(move || {
                if let Err(e) = remove_dirs(&dirs, Some(REMOVE_WAIT)) {
                    tracing::warn!("{e}");
                }
            });
    }
}

/// Removes cgroup directories recorded by a sandbox whose owner died: kills whatever still
/// runs in them at once (nothing but the sandbox's processes ever joins them), then removes
/// them. Directories already gone are fine. Blocking.
pub fn remove_recorded(dirs: &[PathBuf]) -> Result<(), CgroupError> {
    remove_dirs(dirs, Some(Duration::ZERO))
}

/// Removes `dirs` (cgroups agentvm made). With a `grace`, processes still in a cgroup get
/// that long to leave by themselves, are then SIGKILLed and waited for up to
/// [`REMOVE_WAIT`]; without one, a busy cgroup is an error at once.
fn remove_dirs(dirs: &[PathBuf], grace: Option<Duration>) -> Result<(), CgroupError> {
    let mut first_err = None;
    for dir in dirs {
        if let Err(e) = remove_one(dir, grace) {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

fn remove_one(dir: &Path, grace: Option<Duration>) -> Result<(), CgroupError> {
    let start = Instant::now();
    let mut killed_at: Option<Instant> = None;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => return Err(io_err("remove", dir, e)),
        }
        let busy = || CgroupError::Busy {
            path: dir.to_path_buf(),
            pids: procs(dir),
        };
        let Some(grace) = grace else {
            return Err(busy());
        };
        match killed_at {
            None if start.elapsed() >= grace => {
                for pid in procs(dir) {
                    if pid > 1 && pid != std::process::id() {
                        // SAFETY: kill(2) with a plain pid and signal; no memory is involved.
                        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                    }
                }
                killed_at = Some(Instant::now());
            }
            Some(t) if t.elapsed() >= REMOVE_WAIT => return Err(busy()),
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pids in cgroup `dir`.
fn procs(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    std::fs::write(&path, value).map_err(|e| io_err("write", &path, e))
}

/// The v1 limits of controller `c` in `dir` (`mount` is the hierarchy's root, where optional
/// files are looked up).
fn write_v1(mount: &Path, dir: &Path, c: &str, l: &Limits) -> Result<(), CgroupError> {
    match c {
        "memory" => {
            let bytes = l.memory_bytes.to_string();
            write(dir, "memory.limit_in_bytes", &bytes)?;
            // memory+swap >= memory: written second. Absent without swap accounting.
            if mount.join("memory.memsw.limit_in_bytes").exists() {
                write(dir, "memory.memsw.limit_in_bytes", &bytes)?;
            }
        }
        "cpu" => {
            if let Some(s) = l.cpu_shares {
                write(dir, "cpu.shares", &s.clamp(2, 262_144).to_string())?;
            }
            write(dir, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
            write(dir, "cpu.cfs_quota_us", &l.cpu_quota_us.to_string())?;
        }
        "pids" => write(dir, "pids.max", &l.pids_max.to_string())?,
        _ => {}
    }
    Ok(())
}

/// Enables [`V2_CONTROLLERS`] (those the root offers) in `cgroup.subtree_control` of the
/// root and of every ancestor of `path`; returns those enabled. A controller that cannot be
/// enabled (the host lacks it, a parent holds processes) is a warning.
fn enable_v2(root: &Path, path: &Path) -> Result<Vec<&'static str>, CgroupError> {
    let available = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let mut enabled: Vec<&'static str> = V2_CONTROLLERS
        .iter()
        .copied()
        .filter(|c| available.split_whitespace().any(|a| a == *c))
        .collect();
    for c in V2_CONTROLLERS.iter().filter(|c| !enabled.contains(c)) {
        tracing::warn!("host cgroup: cgroup v2 offers no {c} controller (no {c} limit for VMs)");
    }
    let mut dir = root.to_path_buf();
    let mut ancestors: Vec<PathBuf> = vec![dir.clone()];
    let parts: Vec<_> = path.components().collect();
    for c in &parts[..parts.len().saturating_sub(1)] {
        dir.push(c);
        ancestors.push(dir.clone());
    }
    for a in ancestors {
        std::fs::create_dir_all(&a).map_err(|e| io_err("create", &a, e))?;
        let control = a.join("cgroup.subtree_control");
        let on = std::fs::read_to_string(&control).unwrap_or_default();
        enabled.retain(|c| {
            if on.split_whitespace().any(|x| x == *c) {
                return true;
            }
            match std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&control)
                .and_then(|mut f| f.write_all(format!("+{c}\n").as_bytes()))
            {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(
                        "host cgroup: cannot enable {c} in {}: {e} (no {c} limit for VMs)",
                        control.display()
                    );
                    false
                }
            }
        });
    }
    Ok(enabled)
}

fn write_v2(dir: &Path, enabled: &[&str], l: &Limits) -> Result<(), CgroupError> {
    if enabled.contains(&"memory") {
        write(dir, "memory.max", &l.memory_bytes.to_string())?;
        // v2 counts swap apart: memory+swap = memory is no swap.
        if dir.join("memory.swap.max").exists() {
            write(dir, "memory.swap.max", "0")?;
        }
    }
    if enabled.contains(&"cpu") {
        if let Some(s) = l.cpu_shares {
            write(
                dir,
                "cpu.weight",
                &crate::resources::shares_to_weight(s).to_string(),
            )?;
        }
        write(
            dir,
            "cpu.max",
            &format!("{} {CPU_PERIOD_US}", l.cpu_quota_us),
        )?;
    }
    if enabled.contains(&"pids") {
        write(dir, "pids.max", &l.pids_max.to_string())?;
    }
    Ok(())
}

/// Makes the process `cmd` spawns join `cgroup` itself, first thing after fork: the parent
/// opens every `cgroup.procs` now, the child writes `0` (itself) to each before exec, so no
/// byte QEMU or a helper allocates is charged elsewhere. Register it before any step that
/// drops privileges. The fds close with `cmd` (and in the child at exec).
pub fn enter(
    cmd: &mut tokio::process::Command,
    cgroup: Option<&HostCgroup>,
) -> Result<(), CgroupError> {
    let Some(cg) = cgroup else {
        return Ok(());
    };
    let fds = cg.open_procs()?;
    // SAFETY: the closure runs between fork and exec. It only calls write(2), which is
    // async-signal-safe, on fds the parent opened (and keeps open in `cmd`), with a static
    // buffer; it allocates nothing and touches no lock.
    unsafe {
        cmd.pre_exec(move || {
            for fd in &fds {
                let r = libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1);
                if r != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroupfs_paths_are_cleaned_like_runc() {
        let p = |s: &str| cgroup_path(Some(s), "id").map(|p| p.display().to_string());
        let id = "0123abcd".repeat(8);
        assert_eq!(p(&format!("/docker/{id}")).unwrap(), format!("docker/{id}"));
        // ctr: /<namespace>/<id>.
        assert_eq!(p("/default/web").unwrap(), "default/web");
        assert_eq!(
            p("/kubepods/besteffort/pod1/c1").unwrap(),
            "kubepods/besteffort/pod1/c1"
        );
        // `..` stops at the root, as filepath.Clean("/" + p) does.
        assert_eq!(p("/../../etc/x").unwrap(), "etc/x");
        assert_eq!(p("a/./b//c/../d").unwrap(), "a/b/d");
        assert!(p("/").is_err());
        assert!(p("/a/..").is_err());
        assert!(p("a\0b").is_err());
        // Absent: /agentvm/<id>.
        assert_eq!(cgroup_path(None, "abc").unwrap(), Path::new("agentvm/abc"));
        assert_eq!(
            cgroup_path(Some(""), "abc").unwrap(),
            Path::new("agentvm/abc")
        );
    }

    #[test]
    fn systemd_paths_expand_like_runc() {
        let p = |s: &str| cgroup_path(Some(s), "id").map(|p| p.display().to_string());
        assert_eq!(
            p("system.slice:docker:abc").unwrap(),
            "system.slice/docker-abc.scope"
        );
        assert_eq!(
            p("kubepods-besteffort-pod12.slice:cri-containerd:c1").unwrap(),
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice/cri-containerd-c1.scope"
        );
        // Empty slice: system.slice; empty prefix: <name>.scope; -.slice: the root.
        assert_eq!(p(":docker:abc").unwrap(), "system.slice/docker-abc.scope");
        assert_eq!(p("user.slice::abc").unwrap(), "user.slice/abc.scope");
        assert_eq!(p("-.slice:x:abc").unwrap(), "x-abc.scope");
        assert_eq!(
            p("machine.slice::my.slice").unwrap(),
            "machine.slice/my.slice"
        );
        for bad in [
            "system:docker:abc",
            "a--b.slice:x:y",
            "-a.slice:x:y",
            "x.slice:p:",
            ".slice:p:n",
        ] {
            assert!(p(bad).is_err(), "{bad} accepted");
        }
        // A path with colons and slashes is a cgroupfs path.
        assert_eq!(p("/a:b:c/d").unwrap(), "a:b:c/d");
    }

    #[test]
    fn limits_follow_the_vm_and_the_spec() {
        let none = CpuRequest::default();
        let l = Limits::for_vm(320, 1, Accel::Tcg, &none);
        assert_eq!(l.memory_bytes, (320 + TCG_OVERHEAD_MIB) << 20);
        assert_eq!(l.cpu_quota_us, 100_000 + IO_CPU_ALLOWANCE_US);
        assert_eq!(l.cpu_shares, None);
        assert_eq!(l.pids_max, PIDS_MAX);
        let l = Limits::for_vm(512, 2, Accel::Kvm, &none);
        assert_eq!(l.memory_bytes, (512 + KVM_OVERHEAD_MIB) << 20);
        assert_eq!(l.cpu_quota_us, 200_000 + IO_CPU_ALLOWANCE_US);
        // --cpus 1.5 --cpu-shares 512: the asked CPUs, not the 2 vCPUs.
        let asked = CpuRequest {
            shares: Some(512),
            quota: Some(150_000),
            period: Some(100_000),
        };
        let l = Limits::for_vm(512, 2, Accel::Kvm, &asked);
        assert_eq!(l.cpu_quota_us, 150_000 + IO_CPU_ALLOWANCE_US);
        assert_eq!(l.cpu_shares, Some(512));
        // Another period is rescaled to ours.
        let l = Limits::for_vm(
            512,
            1,
            Accel::Kvm,
            &CpuRequest {
                quota: Some(25_000),
                period: Some(50_000),
                ..none
            },
        );
        assert_eq!(l.cpu_quota_us, 50_000 + IO_CPU_ALLOWANCE_US);
    }

    /// A v1 root as the kernel shows it, minus the kernel: one dir per hierarchy with its
    /// `cgroup.procs`, `cpu` and `cpuacct` co-mounted through symlinks as on many distros.
    fn fake_v1(memsw: bool, with_pids: bool) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let mut dirs = vec!["memory", "cpu,cpuacct", "blkio"];
        if with_pids {
            dirs.push("pids");
        }
        for d in dirs {
            std::fs::create_dir(r.join(d)).unwrap();
            std::fs::write(r.join(d).join("cgroup.procs"), "1\n").unwrap();
        }
        std::os::unix::fs::symlink("cpu,cpuacct", r.join("cpu")).unwrap();
        std::os::unix::fs::symlink("cpu,cpuacct", r.join("cpuacct")).unwrap();
        std::fs::write(r.join("memory/memory.oom_control"), "oom_kill 0\n").unwrap();
        if memsw {
            std::fs::write(r.join("memory/memory.memsw.limit_in_bytes"), "").unwrap();
        }
        root
    }

    fn read(p: PathBuf) -> String {
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    /// What the kernel does at rmdir of a cgroup: its files go with it.
    fn emulate_kernel_files_vanish(cg: &HostCgroup) {
        for d in cg.dirs() {
            for f in std::fs::read_dir(&d).unwrap() {
                std::fs::remove_file(f.unwrap().path()).unwrap();
            }
        }
    }

    #[test]
    fn v1_layout_limits_placement_and_removal() {
        let root = fake_v1(true, true);
        let r = root.path();
        let layout = Layout::detect(r).unwrap();
        let Layout::V1(h) = &layout else {
            panic!("not v1: {layout:?}")
        };
        assert_eq!(h.len(), 4, "cpu and cpuacct are one hierarchy: {h:?}");
        let co = h.iter().find(|h| h.controllers.contains(&"cpu")).unwrap();
        assert_eq!(co.controllers, vec!["cpu", "cpuacct"]);
        let limits = Limits::for_vm(
            320,
            1,
            Accel::Tcg,
            &CpuRequest {
                shares: Some(512),
                ..Default::default()
            },
        );
        let path = cgroup_path(Some("/docker/c1"), "c1").unwrap();
        let cg = HostCgroup::create(&layout, &path, &limits).unwrap();
        let mem = r.join("memory/docker/c1");
        let bytes = ((320 + TCG_OVERHEAD_MIB) << 20).to_string();
        assert_eq!(read(mem.join("memory.limit_in_bytes")), bytes);
        assert_eq!(read(mem.join("memory.memsw.limit_in_bytes")), bytes);
        let cpu = r.join("cpu,cpuacct/docker/c1");
        assert_eq!(read(cpu.join("cpu.shares")), "512");
        assert_eq!(read(cpu.join("cpu.cfs_period_us")), "100000");
        assert_eq!(read(cpu.join("cpu.cfs_quota_us")), "150000");
        assert_eq!(
            read(r.join("pids/docker/c1/pids.max")),
            PIDS_MAX.to_string()
        );
        assert!(r.join("blkio/docker/c1").is_dir());
        assert_eq!(cg.created_dirs().len(), 4);
        // Placement: the pid lands in every hierarchy's cgroup.procs.
        cg.add_pid(4242).unwrap();
        for d in cg.dirs() {
            assert_eq!(read(d.join("cgroup.procs")), "4242\n", "{}", d.display());
        }
        // OOM kills are read from memory.oom_control.
        assert_eq!(cg.oom_kills(), 0);
        std::fs::write(
            mem.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        assert_eq!(cg.oom_kills(), 2);
        emulate_kernel_files_vanish(&cg);
        cg.remove().unwrap();
        for d in cg.dirs() {
            assert!(!d.exists(), "{} left behind", d.display());
        }
        // The parent stays, as runc leaves /docker.
        assert!(r.join("memory/docker").is_dir());
    }

    #[test]
    fn v1_without_pids_or_memsw_warns_and_goes_on() {
        let root = fake_v1(false, false);
        let layout = Layout::detect(root.path()).unwrap();
        let limits = Limits::for_vm(128, 1, Accel::Kvm, &CpuRequest::default());
        let cg = HostCgroup::create(&layout, Path::new("default/x"), &limits).unwrap();
        let mem = root.path().join("memory/default/x");
        assert!(mem.join("memory.limit_in_bytes").is_file());
        assert!(!mem.join("memory.memsw.limit_in_bytes").exists());
        assert!(!root.path().join("pids").exists());
        assert_eq!(cg.dirs().len(), 3);
        emulate_kernel_files_vanish(&cg);
        cg.remove().unwrap();
    }

    #[test]
    fn no_cgroup_fs_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        let e = Layout::detect(root.path()).unwrap_err().to_string();
        assert!(e.contains("no cgroup filesystem"), "{e}");
    }

    fn fake_v2(controllers: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), controllers).unwrap();
        std::fs::write(root.path().join("cgroup.subtree_control"), "").unwrap();
        std::fs::write(root.path().join("cgroup.procs"), "1\n").unwrap();
        root
    }

    #[test]
    fn v2_layout_enables_controllers_down_the_path_and_writes_limits() {
        let root = fake_v2("cpuset cpu io memory hugetlb pids rdma misc\n");
        let r = root.path();
        let layout = Layout::detect(r).unwrap();
        assert_eq!(layout, Layout::V2(r.to_path_buf()));
        let limits = Limits::for_vm(
            512,
            2,
            Accel::Kvm,
            &CpuRequest {
                shares: Some(1024),
                ..Default::default()
            },
        );
        let path = cgroup_path(Some("system.slice:docker:c2"), "c2").unwrap();
        let cg = HostCgroup::create(&layout, &path, &limits).unwrap();
        for a in [r.to_path_buf(), r.join("system.slice")] {
            assert_eq!(
                read(a.join("cgroup.subtree_control")),
                "+memory\n+cpu\n+io\n+pids\n",
                "{}",
                a.display()
            );
        }
        let dir = r.join("system.slice/docker-c2.scope");
        assert_eq!(
            read(dir.join("memory.max")),
            ((512 + KVM_OVERHEAD_MIB) << 20).to_string()
        );
        assert_eq!(read(dir.join("cpu.max")), "250000 100000");
        assert_eq!(read(dir.join("cpu.weight")), "39");
        assert_eq!(read(dir.join("pids.max")), PIDS_MAX.to_string());
        assert!(
            !dir.join("cgroup.subtree_control").exists(),
            "the leaf enables nothing"
        );
        cg.add_pid(77).unwrap();
        assert_eq!(read(dir.join("cgroup.procs")), "77\n");
        std::fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        assert_eq!(cg.oom_kills(), 1);
        assert_eq!(cg.created_dirs(), vec![dir.clone()]);
        emulate_kernel_files_vanish(&cg);
        cg.remove().unwrap();
        assert!(!dir.exists());
        assert!(r.join("system.slice").is_dir());
    }

    #[test]
    fn v2_without_pids_controller_writes_no_pids_limit() {
        let root = fake_v2("cpu memory\n");
        let layout = Layout::detect(root.path()).unwrap();
        let limits = Limits::for_vm(256, 1, Accel::Kvm, &CpuRequest::default());
        let cg = HostCgroup::create(&layout, Path::new("agentvm/x"), &limits).unwrap();
        let dir = root.path().join("agentvm/x");
        assert!(dir.join("memory.max").is_file());
        assert!(dir.join("cpu.max").is_file());
        assert!(!dir.join("pids.max").exists());
        assert_eq!(
            read(root.path().join("cgroup.subtree_control")),
            "+memory\n+cpu\n"
        );
        emulate_kernel_files_vanish(&cg);
        cg.remove().unwrap();
    }

    #[test]
    fn an_existing_cgroup_is_joined_but_never_removed() {
        let root = fake_v2("memory\n");
        std::fs::create_dir_all(root.path().join("pod/c3")).unwrap();
        let layout = Layout::detect(root.path()).unwrap();
        let limits = Limits::for_vm(256, 1, Accel::Kvm, &CpuRequest::default());
        let cg = HostCgroup::create(&layout, Path::new("pod/c3"), &limits).unwrap();
        assert!(cg.created_dirs().is_empty());
        cg.remove().unwrap();
        drop(cg);
        assert!(root.path().join("pod/c3").is_dir());
    }

    #[test]
    fn a_failed_limit_write_is_a_clear_error_and_leaves_nothing() {
        let root = fake_v1(false, true);
        let layout = Layout::detect(root.path()).unwrap();
        let limits = Limits::for_vm(256, 1, Accel::Kvm, &CpuRequest::default());
        // pids.max cannot be written (a directory stands where the kernel has the file) in
        // a cgroup that exists already: the cgroups made before it are removed again.
        std::fs::create_dir_all(root.path().join("pids/x/pids.max")).unwrap();
        let e = HostCgroup::create(&layout, Path::new("x"), &limits)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("host cgroup: cannot write ") && e.contains("pids/x/pids.max"),
            "{e}"
        );
        assert!(root.path().join("pids/x").is_dir(), "not ours: kept");
    }

    #[test]
    fn recorded_dirs_that_are_gone_are_fine() {
        let root = tempfile::tempdir().unwrap();
        remove_recorded(&[root.path().join("gone")]).unwrap();
        let empty = root.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        remove_recorded(std::slice::from_ref(&empty)).unwrap();
        assert!(!empty.exists());
    }

    /// The real hierarchy: a `sleep` spawned with [`enter`] is in the cgroup from its first
    /// instruction, the limits are the kernel's, and the cgroup goes away after it. Needs
    /// root; under `AGENTVM_REQUIRE_VM=1` not being root fails the test.
    #[tokio::test]
    async fn a_spawned_child_lives_in_the_real_cgroup() {
        if !crate::test_support::as_root("a_spawned_child_lives_in_the_real_cgroup") {
            return;
        }
        let layout = Layout::detect(Path::new(CGROUP_ROOT)).unwrap();
        let path = PathBuf::from(format!("agentvm-test/cg-{}", std::process::id()));
        let limits = Limits::for_vm(128, 1, Accel::Tcg, &CpuRequest::default());
        let cg = HostCgroup::create(&layout, &path, &limits).unwrap();
        let mut cmd = tokio::process::Command::new("sleep");
        cmd.arg("30").kill_on_drop(true);
        enter(&mut cmd, Some(&cg)).unwrap();
        let mut child = cmd.spawn().unwrap();
        let pid = child.id().unwrap();
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        let want = format!("/{}", path.display());
        match &layout {
            Layout::V1(hs) => {
                for h in hs {
                    let line = cgroups
                        .lines()
                        .find(|l| {
                            let ctrls = l.split(':').nth(1).unwrap_or("");
                            h.controllers
                                .iter()
                                .all(|c| ctrls.split(',').any(|x| x == *c))
                        })
                        .unwrap_or_else(|| panic!("no line for {:?} in {cgroups}", h.controllers));
                    assert!(line.ends_with(&want), "{line} (want {want})");
                }
                let mem = Path::new(CGROUP_ROOT).join("memory").join(&path);
                if mem.exists() {
                    assert_eq!(
                        read(mem.join("memory.limit_in_bytes")).trim(),
                        limits.memory_bytes.to_string()
                    );
                }
            }
            Layout::V2(root) => {
                assert!(
                    cgroups.lines().any(|l| l == format!("0::{want}")),
                    "{cgroups}"
                );
                assert_eq!(
                    read(root.join(&path).join("memory.max")).trim(),
                    limits.memory_bytes.to_string()
                );
            }
        }
        // The removal after a crash kills what is left, then removes the cgroup.
        let dirs = cg.dirs();
        let recorded = cg.created_dirs();
        assert_eq!(recorded.len(), dirs.len());
        tokio::task::spawn_blocking(move || remove_recorded(&recorded))
            .await
            .unwrap()
            .unwrap();
        let st = child.wait().await.unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&st),
            Some(libc::SIGKILL)
        );
        drop(cg);
        for d in dirs {
            assert!(!d.exists(), "{} left behind", d.display());
        }
        let mounts = match &layout {
            Layout::V1(hs) => hs.iter().map(|h| h.mount.clone()).collect(),
            Layout::V2(r) => vec![r.clone()],
        };
        for m in mounts {
            let _ = std::fs::remove_dir(m.join("agentvm-test"));
        }
    }
}
