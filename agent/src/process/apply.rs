//! Applying a [`Plan`] through the [`Syscalls`] seam, in the forked child.
//!
//! Order, and why:
//! 1. `setsid` (always: the process leads its own session, as under runc), then the
//!    controlling terminal when `terminal` is set (stdio is already the pty slave).
//! 2. A pod container's namespaces (after the cgroup, so the cgroup path is the agent's
//!    view): its init unshares a mount namespace of its own and mounts the procfs of its
//!    PID namespace in its root, then moves its root onto the namespace's `/` and enters it
//!    (so it is not chrooted: the kernel lets it make user namespaces); an exec into it joins
//!    that mount namespace, whose root is then its own. The VM's own container `chroot`s
//!    into its root. Then a container's init makes its `readonlyPaths` read-only and masks
//!    its `maskedPaths` (inside the new root, so a symlink cannot lead out of it), as runc
//!    does after its pivot_root; then `chdir(cwd)`: cwd is resolved inside the new root.
//! 3. rlimits, while still root with every capability (raising a hard limit needs
//!    `CAP_SYS_RESOURCE`). Then the seccomp filter when the process
//!    does not set `no_new_privs` (loading a filter without it needs `CAP_SYS_ADMIN`, so
//!    before the capabilities go, as runc does).
//! 4. With capabilities: drop the bounding set (needs `CAP_SETPCAP`, so before `setuid`) and
//!    set keep-caps so that `setuid` away from root keeps the permitted set.
//! 5. `setgroups`, `setresgid`, `setresuid`, in that order (the first two need root).
//! 6. With capabilities: clear keep-caps, `capset` (effective/permitted/inheritable), clear and
//!    raise the ambient set.
//! 7. `no_new_privs`, then the seccomp filter when it is set: last before `exec`, so that as
//!    few syscalls as possible run under the filter before the workload does (runc's order).
//! 8. `execve` of each `PATH` candidate in turn (inside the new root), following Go's
//!    `exec.LookPath` as runc does: a candidate that does not exist or cannot be executed is
//!    skipped; if none runs, the name was "not found in $PATH".
//!
//! Exit codes reported for a failure (what a Docker user sees): 127 when something does not
//! exist (a missing binary, a missing cwd: `ENOENT`/`ENOTDIR`), 126 for every other failure
//! (permission denied, exec format error, a setup syscall refused).

use nix::errno::Errno;

use super::plan::{MountNs, Plan};
use super::seam::Syscalls;

/// A step of process setup, for error reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Step {
    Setsid = 1,
    ControllingTty,
    MountNamespace,
    MountProc,
    Chroot,
    Chdir,
    Setrlimit,
    BoundingSet,
    KeepCaps,
    Setgroups,
    Setgid,
    Setuid,
    Capset,
    Ambient,
    NoNewPrivs,
    Exec,
    ReadonlyPath,
    MaskPath,
    Seccomp,
}

impl Step {
    const ALL: [Step; 19] = [
        Step::Setsid,
        Step::ControllingTty,
        Step::MountNamespace,
        Step::MountProc,
        Step::Chroot,
        Step::Chdir,
        Step::Setrlimit,
        Step::BoundingSet,
        Step::KeepCaps,
        Step::Setgroups,
        Step::Setgid,
        Step::Setuid,
        Step::Capset,
        Step::Ambient,
        Step::NoNewPrivs,
        Step::Exec,
        Step::ReadonlyPath,
        Step::MaskPath,
        Step::Seccomp,
    ];

    fn from_u32(n: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|s| *s as u32 == n)
    }

    fn what(self) -> &'static str {
        match self {
            Step::Setsid => "setsid",
            Step::ControllingTty => "set the controlling terminal",
            Step::MountNamespace => "enter the container's mount namespace",
            Step::MountProc => "mount the container's /proc",
            Step::Chroot => "chroot into the container root",
            Step::Chdir => "chdir",
            Step::Setrlimit => "setrlimit",
            Step::BoundingSet => "drop capabilities from the bounding set",
            Step::KeepCaps => "prctl(PR_SET_KEEPCAPS)",
            Step::Setgroups => "setgroups",
            Step::Setgid => "setgid",
            Step::Setuid => "setuid",
            Step::Capset => "capset",
            Step::Ambient => "set ambient capabilities",
            Step::NoNewPrivs => "prctl(PR_SET_NO_NEW_PRIVS)",
            Step::Exec => "exec",
            Step::ReadonlyPath => "make a readonlyPaths entry read-only",
            Step::MaskPath => "mask a maskedPaths entry",
            Step::Seccomp => "load the seccomp filter",
        }
    }
}

/// A failed setup step, small and `Copy` so the child can report it without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepError {
    pub step: Step,
    pub errno: Errno,
}

impl StepError {
    /// Encoding for the child -> parent error pipe.
    pub fn to_bytes(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&(self.step as u32).to_le_bytes());
        b[4..].copy_from_slice(&(self.errno as i32).to_le_bytes());
        b
    }

    /// Decodes [`StepError::to_bytes`].
    pub fn from_bytes(b: [u8; 8]) -> Option<Self> {
        let step = Step::from_u32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))?;
        let errno = Errno::from_raw(i32::from_le_bytes([b[4], b[5], b[6], b[7]]));
        Some(Self { step, errno })
    }

    /// The message and exit code reported to the host, worded like runc's.
    pub fn report(&self, plan: &Plan) -> (String, i32) {
        let not_found = matches!(self.errno, Errno::ENOENT | Errno::ENOTDIR);
        let code = if not_found { 127 } else { 126 };
        let err = errno_text(self.errno);
        let name = &plan.exec.name;
        let msg = match self.step {
            Step::Exec if plan.exec.search && not_found => {
                format!("exec: {name:?}: executable file not found in $PATH")
            }
            Step::Exec if not_found => format!("exec: {name:?}: stat {name}: {err}"),
            Step::Exec => format!("exec: {name:?}: {err}"),
            Step::Chdir => format!(
                "chdir to cwd ({:?}) set in config.json failed: {err}",
                plan.cwd_display
            ),
            s => format!("{}: {err}", s.what()),
        };
        (msg, code)
    }
}

/// Go-style (lower-case) text of an errno: "no such file or directory".
fn errno_text(e: Errno) -> String {
    let d = e.desc();
    let mut c = d.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => d.to_string(),
    }
}

fn at(step: Step) -> impl Fn(Errno) -> StepError {
    move |errno| StepError { step, errno }
}

/// Runs the setup of `plan` through `sys` and execs the process. Returns only on failure.
/// Must not allocate: it runs between `fork` and `exec`.
pub fn apply<S: Syscalls>(plan: &Plan, sys: &mut S) -> StepError {
    match setup(plan, sys) {
        Ok(()) => exec(plan, sys),
        Err(e) => e,
    }
}

fn setup<S: Syscalls>(plan: &Plan, sys: &mut S) -> Result<(), StepError> {
    sys.setsid().map_err(at(Step::Setsid))?;
    if plan.terminal {
        sys.set_controlling_tty()
            .map_err(at(Step::ControllingTty))?;
    }
    if let Some(procs) = &plan.cgroup_procs {
        // Best effort: a process outside the container's cgroup only escapes `docker
        // update`'s limits, while a failed start would break `docker exec` for good.
        let _ = sys.join_cgroup(procs);
    }
    match plan.mount_ns {
        MountNs::Agent => {}
        MountNs::New => sys.unshare_mounts().map_err(at(Step::MountNamespace))?,
        MountNs::Join(fd) => sys.join_mounts(fd).map_err(at(Step::MountNamespace))?,
    }
    if let Some(proc) = &plan.proc_mount {
        sys.mount_proc(proc).map_err(at(Step::MountProc))?;
    }
    match plan.mount_ns {
        MountNs::Agent => sys.chroot(&plan.root).map_err(at(Step::Chroot))?,
        // The container's root becomes its namespace's own root (user namespaces work).
        MountNs::New => sys.enter_root(&plan.root).map_err(at(Step::Chroot))?,
        // Joining the namespace made its root (the container's) the process's.
        MountNs::Join(_) => {}
    }
    for path in &plan.readonly_paths {
        sys.readonly_path(path).map_err(at(Step::ReadonlyPath))?;
    }
    for path in &plan.masked_paths {
        sys.mask_path(path).map_err(at(Step::MaskPath))?;
    }
    sys.chdir(&plan.cwd).map_err(at(Step::Chdir))?;
    for r in &plan.rlimits {
        sys.setrlimit(r.resource, r.soft, r.hard)
            .map_err(at(Step::Setrlimit))?;
    }
    if !plan.no_new_privileges {
        load_seccomp(plan, sys)?;
    }
    if let Some(caps) = &plan.caps {
        for &cap in &caps.drop_bounding {
            sys.drop_bounding_cap(cap).map_err(at(Step::BoundingSet))?;
        }
        sys.set_keep_caps(true).map_err(at(Step::KeepCaps))?;
    }
    sys.setgroups(&plan.additional_gids)
        .map_err(at(Step::Setgroups))?;
    sys.setresgid(plan.gid).map_err(at(Step::Setgid))?;
    sys.setresuid(plan.uid).map_err(at(Step::Setuid))?;
    if let Some(caps) = &plan.caps {
        sys.set_keep_caps(false).map_err(at(Step::KeepCaps))?;
        sys.capset(&caps.sets).map_err(at(Step::Capset))?;
        sys.clear_ambient_caps().map_err(at(Step::Ambient))?;
        for &cap in &caps.ambient {
            sys.raise_ambient_cap(cap).map_err(at(Step::Ambient))?;
        }
    }
    if plan.no_new_privileges {
        sys.set_no_new_privs().map_err(at(Step::NoNewPrivs))?;
        load_seccomp(plan, sys)?;
    }
    Ok(())
}

fn load_seccomp<S: Syscalls>(plan: &Plan, sys: &mut S) -> Result<(), StepError> {
    match &plan.seccomp {
        Some(p) => sys
            .load_seccomp(p.flags, &p.insns)
            .map_err(at(Step::Seccomp)),
        None => Ok(()),
    }
}

fn exec<S: Syscalls>(plan: &Plan, sys: &mut S) -> StepError {
    let e = &plan.exec;
    let exec_err = at(Step::Exec);
    if !e.search {
        return match e.candidates.first() {
            Some(path) => exec_err(sys.execve(path, e.argv(), e.envp())),
            None => exec_err(Errno::ENOENT),
        };
    }
    for path in &e.candidates {
        match sys.execve(path, e.argv(), e.envp()) {
            // Not there, or there but not executable (Go's LookPath skips those too).
            Errno::ENOENT | Errno::ENOTDIR | Errno::EACCES | Errno::EISDIR => continue,
            other => return exec_err(other),
        }
    }
    exec_err(Errno::ENOENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::plan::MountNs;
    use crate::process::seam::recorder::{Call, Recorder};
    use agentvm_protocol::{Capabilities, ProcessSpec, Rlimit, User};

    fn spec() -> ProcessSpec {
        ProcessSpec {
            args: vec!["sh".into(), "-c".into(), "true".into()],
            env: vec!["PATH=/bin:/usr/bin".into()],
            cwd: "/work".into(),
            user: User {
                uid: 1000,
                gid: 1001,
                additional_gids: vec![10, 20],
            },
            rlimits: vec![Rlimit {
                kind: "RLIMIT_NOFILE".into(),
                hard: 2048,
                soft: 1024,
            }],
            no_new_privileges: true,
            capabilities: Some(Capabilities {
                bounding: vec!["CAP_KILL".into()],
                effective: vec!["CAP_KILL".into()],
                permitted: vec!["CAP_KILL".into()],
                inheritable: vec!["CAP_KILL".into()],
                ambient: vec!["CAP_KILL".into()],
            }),
            ..Default::default()
        }
    }

    fn run(spec: &ProcessSpec, rec: &mut Recorder) -> (Plan, StepError) {
        let plan = Plan::new(spec, "/run/agentvm/rootfs", 40).unwrap();
        let err = apply(&plan, rec);
        (plan, err)
    }

    #[test]
    fn full_order() {
        let mut r = Recorder::default();
        let (_, err) = run(&spec(), &mut r);
        assert_eq!(err.step, Step::Exec);

        let setsid = r.pos(|c| *c == Call::Setsid);
        let chroot = r.pos(|c| *c == Call::Chroot("/run/agentvm/rootfs".into()));
        let chdir = r.pos(|c| *c == Call::Chdir("/work".into()));
        let rlimit = r.pos(|c| matches!(c, Call::Setrlimit(_, 1024, 2048)));
        let first_drop = r.pos(|c| matches!(c, Call::DropBounding(_)));
        let last_drop = r
            .calls
            .iter()
            .rposition(|c| matches!(c, Call::DropBounding(_)))
            .unwrap();
        let keep = r.pos(|c| *c == Call::KeepCaps(true));
        let groups = r.pos(|c| *c == Call::Setgroups(vec![10, 20]));
        let gid = r.pos(|c| *c == Call::Setresgid(1001));
        let uid = r.pos(|c| *c == Call::Setresuid(1000));
        let unkeep = r.pos(|c| *c == Call::KeepCaps(false));
        let capset = r.pos(|c| matches!(c, Call::Capset(_)));
        let clear = r.pos(|c| *c == Call::ClearAmbient);
        let raise = r.pos(|c| *c == Call::RaiseAmbient(5));
        let nnp = r.pos(|c| *c == Call::NoNewPrivs);
        let exec = r.pos(|c| matches!(c, Call::Execve(_)));

        assert_eq!(setsid, 0);
        assert!(chroot < chdir, "chroot before chdir");
        assert!(chdir < rlimit);
        assert!(rlimit < first_drop, "rlimits while still privileged");
        assert!(last_drop < keep && keep < groups);
        assert!(groups < gid && gid < uid, "setgroups, setgid, setuid");
        assert!(last_drop < uid, "bounding set dropped before setuid");
        assert!(uid < unkeep && unkeep < capset && capset < clear && clear < raise);
        assert_eq!(nnp + 1, exec, "no_new_privs is the last step before exec");
        assert!(!r.calls.contains(&Call::ControllingTty));
        // CAP_KILL (5) is kept in the bounding set, everything else is dropped.
        assert!(!r.calls.contains(&Call::DropBounding(5)));
        assert_eq!(last_drop - first_drop + 1, 40);
    }

    fn confined() -> ProcessSpec {
        ProcessSpec {
            seccomp: Some(agentvm_protocol::Seccomp {
                default_action: "SCMP_ACT_ALLOW".into(),
                syscalls: vec![agentvm_protocol::SeccompSyscall {
                    names: vec!["sethostname".into()],
                    action: "SCMP_ACT_ERRNO".into(),
                    ..Default::default()
                }],
                flags: vec!["SECCOMP_FILTER_FLAG_LOG".into()],
                ..Default::default()
            }),
            ..spec()
        }
    }

    #[test]
    fn with_no_new_privs_seccomp_is_the_last_step_before_exec() {
        let mut r = Recorder::default();
        let (plan, err) = run(&confined(), &mut r);
        assert_eq!(err.step, Step::Exec);
        let n = plan.seccomp.as_ref().unwrap().insns.len();
        let nnp = r.pos(|c| *c == Call::NoNewPrivs);
        let filter = r.pos(|c| *c == Call::Seccomp(n, crate::seccomp::FLAG_LOG));
        let exec = r.pos(|c| matches!(c, Call::Execve(_)));
        assert_eq!((nnp + 1, filter + 1), (filter, exec), "{:?}", r.calls);
    }

    #[test]
    fn without_no_new_privs_seccomp_comes_before_the_capabilities_go() {
        let mut s = confined();
        s.no_new_privileges = false;
        let mut r = Recorder::default();
        run(&s, &mut r);
        let rlimit = r.pos(|c| matches!(c, Call::Setrlimit(..)));
        let filter = r.pos(|c| matches!(c, Call::Seccomp(..)));
        let first_drop = r.pos(|c| matches!(c, Call::DropBounding(_)));
        assert!(rlimit < filter && filter < first_drop, "{:?}", r.calls);
        assert!(!r.calls.contains(&Call::NoNewPrivs));
        assert_eq!(
            r.calls
                .iter()
                .filter(|c| matches!(c, Call::Seccomp(..)))
                .count(),
            1
        );
    }

    #[test]
    fn an_inits_readonly_and_masked_paths_are_set_up_inside_the_root_before_chdir() {
        let mut plan = Plan::new(&spec(), "/run/agentvm/rootfs", 40).unwrap();
        plan.confine_paths(
            &["/proc/sys".into(), "/proc/bus".into()],
            &["/proc/kcore".into(), "/sys/firmware".into()],
        )
        .unwrap();
        let mut r = Recorder::default();
        apply(&plan, &mut r);
        let chroot = r.pos(|c| matches!(c, Call::Chroot(_)));
        let chdir = r.pos(|c| matches!(c, Call::Chdir(_)));
        let between: Vec<Call> = r.calls[chroot + 1..chdir].to_vec();
        assert_eq!(
            between,
            [
                Call::ReadonlyPath("/proc/sys".into()),
                Call::ReadonlyPath("/proc/bus".into()),
                Call::MaskPath("/proc/kcore".into()),
                Call::MaskPath("/sys/firmware".into()),
            ]
        );
        assert!(matches!(
            plan.confine_paths(&["proc/sys".into()], &[]),
            Err(crate::process::PlanError::RelativeConfinedPath(_))
        ));
        // No spec, no paths, no filter.
        let mut r = Recorder::default();
        run(&spec(), &mut r);
        assert!(!r.calls.iter().any(|c| matches!(
            c,
            Call::ReadonlyPath(_) | Call::MaskPath(_) | Call::Seccomp(..)
        )));
    }

    #[test]
    fn terminal_gets_session_and_controlling_tty_before_chroot() {
        let mut s = spec();
        s.terminal = true;
        let mut r = Recorder::default();
        run(&s, &mut r);
        assert_eq!(r.calls[0], Call::Setsid);
        assert_eq!(r.calls[1], Call::ControllingTty);
        assert_eq!(r.calls[2], Call::Chroot("/run/agentvm/rootfs".into()));
    }

    #[test]
    fn a_pod_containers_namespaces_come_after_its_cgroup_and_before_its_root() {
        let root = "/run/agentvm/containers/c1/root";
        let mut plan = Plan::new(&spec(), root, 40).unwrap();
        plan.cgroup_procs = Some(c"/sys/fs/cgroup/pod-c1/cgroup.procs".into());
        plan.mount_ns = MountNs::New;
        plan.proc_mount = Some(c"/run/agentvm/containers/c1/root/proc".into());
        let mut r = Recorder::default();
        apply(&plan, &mut r);
        let cg = r.pos(|c| matches!(c, Call::JoinCgroup(_)));
        let ns = r.pos(|c| *c == Call::UnshareMounts);
        let proc = r.pos(|c| *c == Call::MountProc(format!("{root}/proc")));
        let enter = r.pos(|c| *c == Call::EnterRoot(root.into()));
        assert!(cg < ns && ns < proc && proc < enter, "{:?}", r.calls);
        assert!(!r.calls.iter().any(|c| matches!(c, Call::Chroot(_))));

        // An exec joins the container's mount namespace and mounts nothing.
        plan.mount_ns = MountNs::Join(7);
        plan.proc_mount = None;
        let mut r = Recorder::default();
        apply(&plan, &mut r);
        let join = r.pos(|c| *c == Call::JoinMounts(7));
        assert!(join < r.pos(|c| matches!(c, Call::Chdir(_))));
        assert!(
            !r.calls
                .iter()
                .any(|c| matches!(c, Call::MountProc(_) | Call::Chroot(_) | Call::EnterRoot(_))),
            "the joined namespace's root is the container's: {:?}",
            r.calls
        );
    }

    #[test]
    fn the_cgroup_is_joined_before_chroot_and_a_failure_is_not_fatal() {
        let mut plan = Plan::new(&spec(), "/run/agentvm/rootfs", 40).unwrap();
        plan.cgroup_procs = Some(c"/sys/fs/cgroup/agentvm/cgroup.procs".into());
        let mut r = Recorder::default();
        let err = apply(&plan, &mut r);
        assert_eq!(
            err.step,
            Step::Exec,
            "the recorder's join fails; exec is still tried"
        );
        let join = r.pos(|c| *c == Call::JoinCgroup("/sys/fs/cgroup/agentvm/cgroup.procs".into()));
        assert_eq!(join + 1, r.pos(|c| matches!(c, Call::Chroot(_))));
        let mut r = Recorder::default();
        run(&spec(), &mut r);
        assert!(!r.calls.iter().any(|c| matches!(c, Call::JoinCgroup(_))));
    }

    #[test]
    fn without_capabilities_nothing_cap_related_happens() {
        let mut s = spec();
        s.capabilities = None;
        s.no_new_privileges = false;
        let mut r = Recorder::default();
        run(&s, &mut r);
        assert!(!r.calls.iter().any(|c| matches!(
            c,
            Call::DropBounding(_)
                | Call::KeepCaps(_)
                | Call::Capset(_)
                | Call::ClearAmbient
                | Call::RaiseAmbient(_)
                | Call::NoNewPrivs
        )));
        let uid = r.pos(|c| *c == Call::Setresuid(1000));
        assert!(matches!(r.calls[uid + 1], Call::Execve(_)));
    }

    #[test]
    fn path_lookup_tries_each_dir_and_reports_not_found() {
        let mut s = spec();
        s.args[0] = "nope".into();
        let mut r = Recorder::default();
        let (plan, err) = run(&s, &mut r);
        let execs: Vec<_> = r
            .calls
            .iter()
            .filter_map(|c| match c {
                Call::Execve(p) => Some(p.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(execs, ["/bin/nope", "/usr/bin/nope"]);
        assert_eq!(err.errno, Errno::ENOENT);
        let (msg, code) = err.report(&plan);
        assert_eq!(msg, "exec: \"nope\": executable file not found in $PATH");
        assert_eq!(code, 127);
    }

    #[test]
    fn path_lookup_skips_non_executable_and_stops_at_hard_errors() {
        let mut s = spec();
        s.args[0] = "tool".into();
        let mut r = Recorder {
            exec_results: vec![
                ("/bin/tool".into(), Errno::EACCES),
                ("/usr/bin/tool".into(), Errno::ENOEXEC),
            ],
            ..Default::default()
        };
        let (plan, err) = run(&s, &mut r);
        assert_eq!(err.errno, Errno::ENOEXEC);
        assert_eq!(
            err.report(&plan),
            ("exec: \"tool\": exec format error".into(), 126)
        );
    }

    #[test]
    fn explicit_path_permission_denied_is_126() {
        let mut s = spec();
        s.args[0] = "/etc/passwd".into();
        let mut r = Recorder {
            exec_results: vec![("/etc/passwd".into(), Errno::EACCES)],
            ..Default::default()
        };
        let (plan, err) = run(&s, &mut r);
        assert_eq!(
            err.report(&plan),
            ("exec: \"/etc/passwd\": permission denied".into(), 126)
        );

        let mut r = Recorder::default();
        s.args[0] = "/missing".into();
        let (plan, err) = run(&s, &mut r);
        assert_eq!(
            err.report(&plan),
            (
                "exec: \"/missing\": stat /missing: no such file or directory".into(),
                127
            )
        );
    }

    #[test]
    fn missing_cwd_stops_before_ids_and_is_127() {
        let mut r = Recorder {
            fail_chdir: Some(Errno::ENOENT),
            ..Default::default()
        };
        let (plan, err) = run(&spec(), &mut r);
        assert_eq!(err.step, Step::Chdir);
        assert!(matches!(r.calls.last(), Some(Call::Chdir(_))));
        assert_eq!(
            err.report(&plan),
            (
                "chdir to cwd (\"/work\") set in config.json failed: no such file or directory"
                    .into(),
                127
            )
        );
    }

    #[test]
    fn step_error_roundtrips_through_bytes() {
        let e = StepError {
            step: Step::Setuid,
            errno: Errno::EPERM,
        };
        assert_eq!(StepError::from_bytes(e.to_bytes()), Some(e));
        assert_eq!(StepError::from_bytes([0; 8]), None);
        assert_eq!(StepError::from_bytes([99, 0, 0, 0, 1, 0, 0, 0]), None);
    }
}
