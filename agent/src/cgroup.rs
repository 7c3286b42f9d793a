//! The container's cgroup in the guest, `/sys/fs/cgroup/agentvm`: created at boot with the
//! cpu, memory and pids controllers enabled for it; every process the agent starts joins it
//! before `exec` (see [`crate::process::apply`]), and `docker update` writes its limits there.
//!
//! The agent and the kernel threads stay in the root cgroup, so a container at its memory or
//! pids limit cannot starve the agent, and the root's `cpu.stat` still counts the whole guest.
//! Nested dockerd keeps working: it creates `/sys/fs/cgroup/docker/<id>` beside this cgroup
//! (docs/decisions.md, "Update").
//!
//! Everything goes through a [`Cgroup`] rooted at a directory, so tests point it at a temp dir
//! with the files the kernel would provide.

use std::ffi::CString;
use std::io::Write;
use std::path::{Path, PathBuf};

use agentvm_protocol::{GuestStats, ResourceLimits};

/// Where the agent mounts the guest's cgroup2 hierarchy.
pub const SYS_CGROUP: &str = "/sys/fs/cgroup";
/// The container's cgroup, below the root.
pub const NAME: &str = "agentvm";
/// The controllers `docker update` needs.
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];
/// Files that may be missing without harm: no swap in the guest, nothing to limit.
const OPTIONAL: [&str; 1] = ["memory.swap.max"];

/// Errors of creating the cgroup or writing its limits.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The cgroup directory could not be created.
    #[error("create cgroup {}: {source}", path.display())]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The guest kernel lacks a file (its controller is not enabled or not built in).
    #[error("the guest kernel has no {file} in {} (its controller is not enabled or not built in)", dir.display())]
    Missing { file: &'static str, dir: PathBuf },
    /// The kernel did not report the cgroup frozen (thawed) in time; it was thawed again.
    #[error("the processes of {} were not {} within {seconds} s", dir.display(), if *frozen { "frozen" } else { "thawed" })]
    Freeze {
        dir: PathBuf,
        frozen: bool,
        seconds: u64,
    },
    /// The kernel refused a value.
    #[error("write {value:?} to {}: {source}", path.display())]
    Write {
        path: PathBuf,
        value: String,
        source: std::io::Error,
    },
}

/// The container's cgroup below a cgroup2 hierarchy.
#[derive(Debug, Clone)]
pub struct Cgroup {
    root: PathBuf,
    dir: PathBuf,
}

impl Cgroup {
    /// The container's cgroup below the hierarchy mounted at `root`, created if missing, with
    /// the controllers enabled in the root's `cgroup.subtree_control`. Enabling them now, not
    /// at the first update, charges the container's memory to its cgroup from the start (the
    /// kernel does not move pages charged before).
    pub fn prepare(root: &Path) -> Result<Self, CgroupError> {
        let cg = Cgroup {
            root: root.to_path_buf(),
            dir: root.join(NAME),
        };
        cg.ensure()?;
        Ok(cg)
    }

    /// The cgroup of a pod container `name` beside the VM's own container's (a sibling of
    /// [`NAME`], so neither holds processes and children at once), created with the same
    /// controllers.
    pub fn sibling(&self, name: &str) -> Result<Self, CgroupError> {
        let cg = Cgroup {
            root: self.root.clone(),
            dir: self.root.join(name),
        };
        cg.ensure()?;
        Ok(cg)
    }

    /// Removes the (empty) cgroup directory.
    pub fn remove(&self) -> std::io::Result<()> {
        std::fs::remove_dir(&self.dir)
    }

    /// The system's cgroup (`/sys/fs/cgroup/agentvm`), or `None` with the reason logged.
    pub fn system() -> Option<Self> {
        match Self::prepare(Path::new(SYS_CGROUP)) {
            Ok(cg) => Some(cg),
            Err(e) => {
                crate::info!("{e}; processes run in the root cgroup and cannot be limited");
                None
            }
        }
    }

    /// The cgroup's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path a starting process writes `0` to, to join the cgroup.
    pub fn procs_path(&self) -> Option<CString> {
        CString::new(
            self.dir
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .ok()
    }

    /// How many processes the OOM killer ended in this cgroup for its memory limit
    /// (`oom_kill` of `memory.events`; 0 without the file).
    pub fn oom_kills(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("memory.events"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Freezes (`frozen`) or thaws every process in the cgroup and below it
    /// (`cgroup.freeze`), and waits until `cgroup.events` says it is done: the kernel freezes
    /// asynchronously. A freeze not done within `timeout` is undone (no half-frozen
    /// container is left) and an error. Blocking: polls every 10 ms.
    pub fn freeze(&self, frozen: bool, timeout: std::time::Duration) -> Result<(), CgroupError> {
        let path = self.dir.join("cgroup.freeze");
        let value = if frozen { "1" } else { "0" };
        write_existing(&path, value).map_err(|source| CgroupError::Write {
            path: path.clone(),
            value: value.into(),
            source,
        })?;
        let want = format!("frozen {value}");
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let events =
                std::fs::read_to_string(self.dir.join("cgroup.events")).unwrap_or_default();
            if events.lines().any(|l| l.trim() == want) {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                if frozen {
                    let _ = write_existing(&path, "0");
                }
                return Err(CgroupError::Freeze {
                    dir: self.dir.clone(),
                    frozen,
                    seconds: timeout.as_secs(),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Whether the cgroup is asked to be frozen (`cgroup.freeze` says 1).
    pub fn is_frozen(&self) -> bool {
        std::fs::read_to_string(self.dir.join("cgroup.freeze")).is_ok_and(|v| v.trim() == "1")
    }

    /// Kills every process in the cgroup and below it (`cgroup.kill`, Linux 5.14+).
    pub fn kill_all(&self) -> std::io::Result<()> {
        std::fs::write(self.dir.join("cgroup.kill"), "1")
    }

    /// Creates the directory again if a workload removed it, and enables the controllers.
    fn ensure(&self) -> Result<(), CgroupError> {
        match std::fs::create_dir(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(CgroupError::Create {
                    path: self.dir.clone(),
                    source,
                })
            }
        }
        let control = self.root.join("cgroup.subtree_control");
        let all = CONTROLLERS.map(|c| format!("+{c}")).join(" ");
        if write_existing(&control, &all).is_err() {
            // One controller the kernel lacks fails the whole write: enable the others.
            for c in CONTROLLERS {
                if let Err(e) = write_existing(&control, &format!("+{c}")) {
                    crate::debug!("enable the {c} controller: {e}");
                }
            }
        }
        Ok(())
    }

    /// Writes `limits`; returns the optional files the guest does not have (skipped).
    pub fn apply(&self, limits: &ResourceLimits) -> Result<Vec<String>, CgroupError> {
        self.ensure()?;
        let mut skipped = Vec::new();
        for (file, value) in writes(limits) {
            let path = self.dir.join(file);
            match write_existing(&path, &value) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if OPTIONAL.contains(&file) {
                        skipped.push(file.to_string());
                    } else {
                        return Err(CgroupError::Missing {
                            file,
                            dir: self.dir.clone(),
                        });
                    }
                }
                Err(source) => {
                    return Err(CgroupError::Write {
                        path,
                        value,
                        source,
                    })
                }
            }
        }
        Ok(skipped)
    }

    /// The cgroup's own usage (a pod's later container), against the guest's memory.
    pub fn usage(&self) -> GuestStats {
        let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        let files = crate::stats::CgroupFiles {
            cpu_stat: read("cpu.stat"),
            memory_current: read("memory.current"),
            memory_max: read("memory.max"),
            memory_stat: read("memory.stat"),
            memory_events: read("memory.events"),
            pids_current: read("pids.current"),
        };
        crate::stats::cgroup_usage(&files, crate::stats::guest_memory())
    }

    /// Reports memory against the cgroup's limit once `docker update` set one below the VM's
    /// size, as runc reports a container's cgroup; otherwise leaves the guest's figures.
    pub fn limit_stats(&self, s: &mut GuestStats) {
        let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        crate::stats::apply_cgroup_memory(
            s,
            &read("memory.max"),
            &read("memory.current"),
            &read("memory.stat"),
        );
    }
}

/// The files to write for `limits`, in order, with their contents.
pub fn writes(limits: &ResourceLimits) -> Vec<(&'static str, String)> {
    let max = |v: i64| {
        if v < 0 {
            "max".to_string()
        } else {
            v.to_string()
        }
    };
    let mut w = Vec::new();
    if let Some(weight) = limits.cpu_weight {
        w.push(("cpu.weight", weight.clamp(1, 10_000).to_string()));
    }
    if let Some(c) = limits.cpu_max {
        w.push(("cpu.max", format!("{} {}", max(c.quota), c.period)));
    }
    if let Some(v) = limits.pids_max {
        w.push(("pids.max", max(v)));
    }
    if let Some(v) = limits.memory_low {
        w.push(("memory.low", max(v)));
    }
    if let Some(v) = limits.memory_swap_max {
        w.push(("memory.swap.max", max(v)));
    }
    if let Some(v) = limits.memory_max {
        w.push(("memory.max", max(v)));
    }
    w
}

/// Writes `value` in one `write(2)` to a file that must exist (cgroupfs creates none), as
/// `echo value > file` does (`O_TRUNC` is harmless there and needed for plain test files).
fn write_existing(path: &Path, value: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)?;
    f.write_all(value.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentvm_protocol::CpuMax;

    /// A fake hierarchy: the files the kernel would show, `memory.swap.max` left out (no swap).
    fn fake_root() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("cgroup.subtree_control"), "").unwrap();
        let dir = t.path().join(NAME);
        std::fs::create_dir(&dir).unwrap();
        for f in [
            "cpu.weight",
            "cpu.max",
            "pids.max",
            "memory.low",
            "memory.max",
        ] {
            std::fs::write(dir.join(f), "").unwrap();
        }
        t
    }

    fn read(t: &tempfile::TempDir, f: &str) -> String {
        std::fs::read_to_string(t.path().join(f)).unwrap()
    }

    #[test]
    fn limits_become_cgroup_v2_files() {
        let w = writes(&ResourceLimits {
            memory_max: Some(64 << 20),
            memory_swap_max: Some(0),
            cpu_max: Some(CpuMax {
                quota: 50_000,
                period: 100_000,
            }),
            cpu_weight: Some(39),
            pids_max: Some(-1),
            memory_low: None,
        });
        assert_eq!(
            w,
            [
                ("cpu.weight", "39".to_string()),
                ("cpu.max", "50000 100000".to_string()),
                ("pids.max", "max".to_string()),
                ("memory.swap.max", "0".to_string()),
                ("memory.max", "67108864".to_string()),
            ]
        );
        let unlimited = writes(&ResourceLimits {
            cpu_max: Some(CpuMax {
                quota: -1,
                period: 100_000,
            }),
            cpu_weight: Some(0),
            ..Default::default()
        });
        assert_eq!(
            unlimited,
            [
                ("cpu.weight", "1".to_string()),
                ("cpu.max", "max 100000".to_string())
            ]
        );
        assert!(writes(&ResourceLimits::default()).is_empty());
    }

    #[test]
    fn prepare_creates_the_cgroup_and_enables_controllers() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("cgroup.subtree_control"), "").unwrap();
        let cg = Cgroup::prepare(t.path()).unwrap();
        assert!(cg.dir().is_dir());
        assert_eq!(read(&t, "cgroup.subtree_control"), "+cpu +memory +pids");
        assert_eq!(
            cg.procs_path().unwrap().to_str().unwrap(),
            t.path().join("agentvm/cgroup.procs").to_str().unwrap()
        );
        // Again (the agent restarted nothing, a second prepare is harmless).
        Cgroup::prepare(t.path()).unwrap();
    }

    #[test]
    fn apply_writes_the_files_and_skips_missing_swap() {
        let t = fake_root();
        let cg = Cgroup::prepare(t.path()).unwrap();
        let skipped = cg
            .apply(&ResourceLimits {
                memory_max: Some(64 << 20),
                memory_swap_max: Some(0),
                cpu_max: Some(CpuMax {
                    quota: 50_000,
                    period: 100_000,
                }),
                pids_max: Some(50),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(skipped, ["memory.swap.max"]);
        assert_eq!(read(&t, "agentvm/memory.max"), "67108864");
        assert_eq!(read(&t, "agentvm/cpu.max"), "50000 100000");
        assert_eq!(read(&t, "agentvm/pids.max"), "50");
        assert_eq!(read(&t, "agentvm/cpu.weight"), "", "not asked for");
        assert!(!t.path().join("agentvm/memory.swap.max").exists());
    }

    #[test]
    fn a_missing_controller_file_is_an_error() {
        let t = fake_root();
        std::fs::remove_file(t.path().join("agentvm/pids.max")).unwrap();
        let cg = Cgroup::prepare(t.path()).unwrap();
        let e = cg
            .apply(&ResourceLimits {
                pids_max: Some(5),
                ..Default::default()
            })
            .unwrap_err();
        assert!(e.to_string().contains("no pids.max"), "{e}");
    }

    #[test]
    fn a_removed_cgroup_is_created_again() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("cgroup.subtree_control"), "").unwrap();
        let cg = Cgroup::prepare(t.path()).unwrap();
        std::fs::remove_dir(cg.dir()).unwrap();
        // Nothing to write: only the directory comes back.
        assert!(cg.apply(&ResourceLimits::default()).unwrap().is_empty());
        assert!(cg.dir().is_dir());
    }

    #[test]
    fn oom_kills_come_from_memory_events() {
        let t = fake_root();
        let cg = Cgroup::prepare(t.path()).unwrap();
        assert_eq!(cg.oom_kills(), 0, "no memory.events");
        std::fs::write(
            cg.dir().join("memory.events"),
            "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n",
        )
        .unwrap();
        assert_eq!(cg.oom_kills(), 1);
    }

    #[test]
    fn without_a_hierarchy_prepare_fails() {
        let e = Cgroup::prepare(Path::new("/nonexistent/cgroup")).unwrap_err();
        assert!(e.to_string().starts_with("create cgroup"), "{e}");
    }

    /// A freeze waits for the kernel's word in `cgroup.events`; one the kernel never
    /// confirms is undone and an error.
    #[test]
    fn a_freeze_waits_for_the_kernel_and_is_undone_when_it_never_comes() {
        let t = fake_root();
        let cg = Cgroup {
            root: t.path().to_path_buf(),
            dir: t.path().join(NAME),
        };
        let dir = cg.dir().to_path_buf();
        std::fs::write(dir.join("cgroup.freeze"), "0").unwrap();
        std::fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        // The "kernel": confirms what cgroup.freeze asks, after a while.
        let kernel_dir = dir.clone();
        let kernel = std::thread::spawn(move || {
            for _ in 0..2 {
                let asked = loop {
                    let v = std::fs::read_to_string(kernel_dir.join("cgroup.freeze")).unwrap();
                    let events = std::fs::read_to_string(kernel_dir.join("cgroup.events")).unwrap();
                    if !events.contains(&format!("frozen {}", v.trim())) && !v.trim().is_empty() {
                        break v.trim().to_string();
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                };
                std::thread::sleep(std::time::Duration::from_millis(50));
                std::fs::write(
                    kernel_dir.join("cgroup.events"),
                    format!("populated 1\nfrozen {asked}\n"),
                )
                .unwrap();
            }
        });
        let long = std::time::Duration::from_secs(10);
        cg.freeze(true, long).unwrap();
        assert_eq!(read(&t, "agentvm/cgroup.freeze"), "1");
        cg.freeze(false, long).unwrap();
        assert_eq!(read(&t, "agentvm/cgroup.freeze"), "0");
        kernel.join().unwrap();
        // No kernel now: the freeze times out and is undone.
        let e = cg
            .freeze(true, std::time::Duration::from_millis(100))
            .unwrap_err();
        assert!(e.to_string().contains("were not frozen"), "{e}");
        assert_eq!(read(&t, "agentvm/cgroup.freeze"), "0");
    }
}
