//! The pure part of process setup: [`ProcessSpec`] -> [`Plan`].

use std::ffi::{CString, NulError};
use std::os::raw::c_char;

use agentvm_protocol::ProcessSpec;

use super::{caps, rlimit};

/// The search path used for `args[0]` when the process environment has no `PATH`, as in runc.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A process spec the agent refuses to run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// `args` is empty.
    #[error("process args are empty: there is nothing to execute")]
    EmptyArgs,
    /// An argument, environment entry or path holds a NUL byte.
    #[error("{what} contains a NUL byte")]
    Nul { what: &'static str },
    /// The working directory is not absolute.
    #[error("cwd {0:?} is not an absolute path")]
    RelativeCwd(String),
    /// An rlimit type this agent does not know.
    #[error("unknown rlimit type {0:?} (expected an OCI name such as RLIMIT_NOFILE)")]
    UnknownRlimit(String),
    /// An rlimit whose soft limit exceeds its hard limit.
    #[error("rlimit {kind}: soft limit {soft} exceeds hard limit {hard}")]
    RlimitSoftAboveHard { kind: String, soft: u64, hard: u64 },
    /// A capability name this agent does not know.
    #[error("unknown capability {0:?} (expected an OCI name such as CAP_CHOWN)")]
    UnknownCapability(String),
    /// `-1` is not a user or group id: the kernel reads it as "leave unchanged".
    #[error("{kind} {id} is not a valid id")]
    InvalidId { kind: &'static str, id: u32 },
    /// A masked or read-only path that is not absolute.
    #[error("masked or read-only path {0:?} is not absolute")]
    RelativeConfinedPath(String),
    /// The seccomp profile cannot be loaded.
    #[error("seccomp profile: {0}")]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

/// One `setrlimit` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RlimitPlan {
    pub resource: rlimit::Resource,
    pub soft: u64,
    pub hard: u64,
}

/// Capability sets as bit masks (bit `n` = capability number `n`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapSets {
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
}

/// What to do about capabilities, when the spec names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapPlan {
    /// Capabilities to drop from the bounding set (all the kernel knows minus the kept ones).
    pub drop_bounding: Vec<u8>,
    pub sets: CapSets,
    /// Capabilities to raise in the ambient set, after clearing it.
    pub ambient: Vec<u8>,
}

/// How `args[0]` is executed.
#[derive(Debug)]
pub struct ExecPlan {
    /// `args[0]` as given, for messages.
    pub name: String,
    /// Whether `args[0]` is looked up in `PATH` (it has no `/`).
    pub search: bool,
    /// Paths to try with `execve`, in order (inside the new root).
    pub candidates: Vec<CString>,
    // The pointer arrays point into these; they must live as long as the plan.
    _argv: Vec<CString>,
    _envp: Vec<CString>,
    argv_ptrs: Vec<*const c_char>,
    envp_ptrs: Vec<*const c_char>,
}

// SAFETY: the raw pointers point into the `CString`s owned by the same `ExecPlan`, which are
// never mutated or moved out after construction (moving a `CString` does not move its heap
// buffer), so sharing or sending the plan across threads cannot invalidate them.
unsafe impl Send for ExecPlan {}
// SAFETY: as above; the plan is immutable after construction.
unsafe impl Sync for ExecPlan {}

impl ExecPlan {
    /// NULL-terminated `argv` for `execve`.
    pub fn argv(&self) -> &[*const c_char] {
        &self.argv_ptrs
    }

    /// NULL-terminated `envp` for `execve`.
    pub fn envp(&self) -> &[*const c_char] {
        &self.envp_ptrs
    }
}

/// The mount namespace of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MountNs {
    /// The agent's (the VM's own container).
    #[default]
    Agent,
    /// A new one, every mount a slave of the agent's (a pod container's init).
    New,
    /// The one this descriptor (open in the agent, inherited by the child) names.
    Join(i32),
}

/// The PID namespace a process is forked into; set up by the parent around the fork
/// ([`crate::process::spawn`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PidNs {
    /// The agent's.
    #[default]
    Agent,
    /// A new one, the process its init.
    New,
    /// The one this descriptor names (an exec into a container with its own).
    Join(i32),
}

/// Everything the child does between `fork` and `exec`, prepared in the parent.
#[derive(Debug)]
pub struct Plan {
    /// Give the process a controlling terminal (its stdio is a pty slave).
    pub terminal: bool,
    /// `cgroup.procs` of the cgroup to join before `chroot` (the container's, see
    /// [`crate::cgroup`]); `None` stays in the agent's.
    pub cgroup_procs: Option<CString>,
    /// The mount namespace the process runs in (a pod container's own, see
    /// [`crate::process::apply`]).
    pub mount_ns: MountNs,
    /// The PID namespace the process is forked into (a pod container's own).
    pub pid_ns: PidNs,
    /// Where to mount a procfs before `chroot`: the root's `/proc`, for the init of a
    /// container with a PID namespace of its own (a procfs shows the PID namespace of the
    /// process that mounts it).
    pub proc_mount: Option<CString>,
    /// The new root directory.
    pub root: CString,
    /// The working directory, inside the new root.
    pub cwd: CString,
    /// `cwd` as given, for messages.
    pub cwd_display: String,
    pub rlimits: Vec<RlimitPlan>,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    /// `None` leaves the capabilities alone (a privileged process).
    pub caps: Option<CapPlan>,
    pub no_new_privileges: bool,
    /// `linux.readonlyPaths` and `linux.maskedPaths`, inside the new root: set up by a
    /// container's init only (they stay in its mount namespace for later processes).
    pub readonly_paths: Vec<CString>,
    pub masked_paths: Vec<CString>,
    /// The seccomp filter, loaded last before `exec` with `no_new_privileges`, otherwise
    /// before the capabilities drop (loading it without no_new_privs needs CAP_SYS_ADMIN).
    pub seccomp: Option<crate::seccomp::Program>,
    pub exec: ExecPlan,
}

fn cstring(s: &str, what: &'static str) -> Result<CString, PlanError> {
    CString::new(s).map_err(|_: NulError| PlanError::Nul { what })
}

fn cap_mask(names: &[String], last_cap: u8) -> Result<u64, PlanError> {
    let mut mask = 0u64;
    for n in names {
        let cap = caps::from_name(n).ok_or_else(|| PlanError::UnknownCapability(n.clone()))?;
        // A capability the running kernel does not know is skipped, as runc does.
        if cap <= last_cap {
            mask |= 1 << cap;
        }
    }
    Ok(mask)
}

/// The `PATH` the process sees: the last `PATH=` entry of `env`, else [`DEFAULT_PATH`].
pub fn search_path(env: &[String]) -> &str {
    env.iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH)
}

/// The `execve` candidates for `name` along `path` (Go's `exec.LookPath` rules: an empty
/// element means the current directory).
pub fn lookup_candidates(name: &str, path: &str) -> Vec<String> {
    if path.is_empty() {
        return Vec::new();
    }
    path.split(':')
        .map(|dir| {
            let dir = if dir.is_empty() { "." } else { dir };
            format!("{}/{name}", dir.trim_end_matches('/'))
        })
        .collect()
}

impl Plan {
    /// Validates `spec` and prepares the setup of a process rooted at `root`. `last_cap` is
    /// the highest capability number the running kernel knows.
    pub fn new(spec: &ProcessSpec, root: &str, last_cap: u8) -> Result<Self, PlanError> {
        let name = spec.args.first().ok_or(PlanError::EmptyArgs)?;
        if name.is_empty() {
            return Err(PlanError::EmptyArgs);
        }
        if !spec.cwd.starts_with('/') {
            return Err(PlanError::RelativeCwd(spec.cwd.clone()));
        }
        if spec.user.uid == u32::MAX {
            return Err(PlanError::InvalidId {
                kind: "uid",
                id: spec.user.uid,
            });
        }
        for &gid in std::iter::once(&spec.user.gid).chain(&spec.user.additional_gids) {
            if gid == u32::MAX {
                return Err(PlanError::InvalidId {
                    kind: "gid",
                    id: gid,
                });
            }
        }

        let mut rlimits = Vec::with_capacity(spec.rlimits.len());
        for r in &spec.rlimits {
            let resource = rlimit::from_name(&r.kind)
                .ok_or_else(|| PlanError::UnknownRlimit(r.kind.clone()))?;
            if r.soft > r.hard {
                return Err(PlanError::RlimitSoftAboveHard {
                    kind: r.kind.clone(),
                    soft: r.soft,
                    hard: r.hard,
                });
            }
            rlimits.push(RlimitPlan {
                resource,
                soft: r.soft,
                hard: r.hard,
            });
        }

        let caps = match &spec.capabilities {
            None => None,
            Some(c) => {
                let bounding = cap_mask(&c.bounding, last_cap)?;
                let sets = CapSets {
                    effective: cap_mask(&c.effective, last_cap)?,
                    permitted: cap_mask(&c.permitted, last_cap)?,
                    inheritable: cap_mask(&c.inheritable, last_cap)?,
                };
                let ambient = cap_mask(&c.ambient, last_cap)?;
                Some(CapPlan {
                    drop_bounding: (0..=last_cap.min(63))
                        .filter(|n| bounding & (1 << n) == 0)
                        .collect(),
                    sets,
                    ambient: (0..=last_cap.min(63))
                        .filter(|n| ambient & (1 << n) != 0)
                        .collect(),
                })
            }
        };

        let seccomp = spec
            .seccomp
            .as_ref()
            .map(crate::seccomp::program)
            .transpose()?;

        let search = !name.contains('/');
        let candidates = if search {
            lookup_candidates(name, search_path(&spec.env))
        } else {
            vec![name.clone()]
        };
        let candidates = candidates
            .iter()
            .map(|c| cstring(c, "PATH"))
            .collect::<Result<Vec<_>, _>>()?;
        let argv = spec
            .args
            .iter()
            .map(|a| cstring(a, "an argument"))
            .collect::<Result<Vec<_>, _>>()?;
        let envp = spec
            .env
            .iter()
            .map(|e| cstring(e, "an environment entry"))
            .collect::<Result<Vec<_>, _>>()?;
        let argv_ptrs = argv
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let envp_ptrs = envp
            .iter()
            .map(|e| e.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();

        Ok(Self {
            terminal: spec.terminal,
            cgroup_procs: None,
            mount_ns: MountNs::Agent,
            pid_ns: PidNs::Agent,
            proc_mount: None,
            root: cstring(root, "the root path")?,
            cwd: cstring(&spec.cwd, "cwd")?,
            cwd_display: spec.cwd.clone(),
            rlimits,
            uid: spec.user.uid,
            gid: spec.user.gid,
            additional_gids: spec.user.additional_gids.clone(),
            caps,
            no_new_privileges: spec.no_new_privileges,
            readonly_paths: Vec::new(),
            masked_paths: Vec::new(),
            seccomp,
            exec: ExecPlan {
                name: name.clone(),
                search,
                candidates,
                _argv: argv,
                _envp: envp,
                argv_ptrs,
                envp_ptrs,
            },
        })
    }
}

impl Plan {
    /// Sets the container's read-only and masked paths (the init of a container).
    pub fn confine_paths(
        &mut self,
        readonly: &[String],
        masked: &[String],
    ) -> Result<(), PlanError> {
        let paths = |list: &[String]| -> Result<Vec<CString>, PlanError> {
            list.iter()
                .map(|p| {
                    if !p.starts_with('/') {
                        return Err(PlanError::RelativeConfinedPath(p.clone()));
                    }
                    cstring(p, "a masked or read-only path")
                })
                .collect()
        };
        self.readonly_paths = paths(readonly)?;
        self.masked_paths = paths(masked)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentvm_protocol::{Capabilities, Rlimit, User};

    fn spec(args: &[&str]) -> ProcessSpec {
        ProcessSpec {
            args: args.iter().map(|s| s.to_string()).collect(),
            cwd: "/".into(),
            ..Default::default()
        }
    }

    #[test]
    fn empty_args_rejected() {
        assert_eq!(
            Plan::new(&spec(&[]), "/r", 40).unwrap_err(),
            PlanError::EmptyArgs
        );
        assert_eq!(
            Plan::new(&spec(&[""]), "/r", 40).unwrap_err(),
            PlanError::EmptyArgs
        );
    }

    #[test]
    fn default_path_when_env_has_none() {
        let mut s = spec(&["sh"]);
        s.env = vec!["HOME=/root".into()];
        let p = Plan::new(&s, "/r", 40).unwrap();
        assert!(p.exec.search);
        let c: Vec<_> = p
            .exec
            .candidates
            .iter()
            .map(|c| c.to_str().unwrap().to_string())
            .collect();
        assert_eq!(
            c,
            [
                "/usr/local/sbin/sh",
                "/usr/local/bin/sh",
                "/usr/sbin/sh",
                "/usr/bin/sh",
                "/sbin/sh",
                "/bin/sh"
            ]
        );
        // The environment itself is passed exactly as given: no PATH is added.
        assert_eq!(p.exec.envp().len(), 2);
        assert!(p.exec.envp()[1].is_null());
    }

    #[test]
    fn env_path_wins_and_empty_element_is_cwd() {
        assert_eq!(search_path(&["PATH=/a".into(), "PATH=/b:".into()]), "/b:");
        assert_eq!(lookup_candidates("x", "/b/:"), ["/b/x", "./x"]);
        assert!(lookup_candidates("x", "").is_empty());
    }

    #[test]
    fn names_with_slash_are_not_searched() {
        let p = Plan::new(&spec(&["./run.sh", "a"]), "/r", 40).unwrap();
        assert!(!p.exec.search);
        assert_eq!(p.exec.candidates, [CString::new("./run.sh").unwrap()]);
        assert_eq!(p.exec.argv().len(), 3);
        assert!(p.exec.argv()[2].is_null());
    }

    #[test]
    fn rlimits_parsed_and_unknown_rejected() {
        let mut s = spec(&["sh"]);
        s.rlimits = vec![Rlimit {
            kind: "RLIMIT_NOFILE".into(),
            hard: 4096,
            soft: 1024,
        }];
        let p = Plan::new(&s, "/r", 40).unwrap();
        assert_eq!(
            p.rlimits,
            [RlimitPlan {
                resource: libc::RLIMIT_NOFILE,
                soft: 1024,
                hard: 4096
            }]
        );

        s.rlimits[0].kind = "RLIMIT_FOO".into();
        assert_eq!(
            Plan::new(&s, "/r", 40).unwrap_err(),
            PlanError::UnknownRlimit("RLIMIT_FOO".into())
        );

        s.rlimits[0].kind = "RLIMIT_CORE".into();
        s.rlimits[0].soft = 5000;
        assert!(matches!(
            Plan::new(&s, "/r", 40).unwrap_err(),
            PlanError::RlimitSoftAboveHard { soft: 5000, .. }
        ));
    }

    #[test]
    fn capabilities_parsed_into_masks() {
        let mut s = spec(&["sh"]);
        s.capabilities = Some(Capabilities {
            bounding: vec!["CAP_CHOWN".into(), "CAP_KILL".into(), "CAP_NET_RAW".into()],
            effective: vec!["CAP_KILL".into()],
            permitted: vec!["CAP_KILL".into(), "CAP_NET_RAW".into()],
            inheritable: vec![],
            ambient: vec!["CAP_NET_RAW".into()],
        });
        let c = Plan::new(&s, "/r", 40).unwrap().caps.unwrap();
        assert_eq!(c.sets.effective, 1 << 5);
        assert_eq!(c.sets.permitted, (1 << 5) | (1 << 13));
        assert_eq!(c.sets.inheritable, 0);
        assert_eq!(c.ambient, [13]);
        assert_eq!(c.drop_bounding.len(), 41 - 3);
        assert!(!c.drop_bounding.contains(&0));
        assert!(!c.drop_bounding.contains(&5));
        assert!(c.drop_bounding.contains(&21));
    }

    #[test]
    fn capabilities_unknown_to_kernel_are_skipped_unknown_names_rejected() {
        let mut s = spec(&["sh"]);
        s.capabilities = Some(Capabilities {
            bounding: vec!["CAP_BPF".into()],
            ..Default::default()
        });
        // A kernel whose last capability is 37 knows nothing about CAP_BPF (39).
        let c = Plan::new(&s, "/r", 37).unwrap().caps.unwrap();
        assert_eq!(c.drop_bounding, (0..=37).collect::<Vec<u8>>());

        s.capabilities.as_mut().unwrap().effective = vec!["CAP_EVERYTHING".into()];
        assert_eq!(
            Plan::new(&s, "/r", 40).unwrap_err(),
            PlanError::UnknownCapability("CAP_EVERYTHING".into())
        );
    }

    #[test]
    fn no_capabilities_means_untouched() {
        assert!(Plan::new(&spec(&["sh"]), "/r", 40).unwrap().caps.is_none());
    }

    #[test]
    fn invalid_ids_nul_bytes_and_relative_cwd_rejected() {
        let mut s = spec(&["sh"]);
        s.user = User {
            uid: u32::MAX,
            gid: 0,
            additional_gids: vec![],
        };
        assert!(matches!(
            Plan::new(&s, "/r", 40).unwrap_err(),
            PlanError::InvalidId { kind: "uid", .. }
        ));
        s.user = User {
            uid: 1000,
            gid: 1000,
            additional_gids: vec![u32::MAX],
        };
        assert!(matches!(
            Plan::new(&s, "/r", 40).unwrap_err(),
            PlanError::InvalidId { kind: "gid", .. }
        ));

        let mut s = spec(&["sh", "a\0b"]);
        assert!(matches!(
            Plan::new(&s, "/r", 40).unwrap_err(),
            PlanError::Nul { .. }
        ));
        s.args.pop();
        s.cwd = "tmp".into();
        assert_eq!(
            Plan::new(&s, "/r", 40).unwrap_err(),
            PlanError::RelativeCwd("tmp".into())
        );
    }
}
