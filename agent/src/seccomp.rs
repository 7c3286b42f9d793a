//! The OCI seccomp profile ([`agentvm_protocol::Seccomp`]) as a BPF program, which the
//! process's setup loads before `exec` ([`crate::process::apply`]).
//!
//! [`translate`] is the pure part, read as runc reads a profile: actions and their errno
//! values (EPERM when none is given), argument conditions (several conditions on one argument
//! make one rule each, as runc does), rules whose action is the default dropped.
//! [`compile`] hands the rules to libseccomp, which resolves syscall names (a name this
//! libseccomp does not know, newer than it, is skipped, as runc does) and generates one
//! program for every architecture of the profile. The program is exported as raw BPF, so the
//! forked child only makes the `seccomp(2)` call. As runc's, it answers ENOSYS to a native
//! syscall newer than every one the profile names, whatever the default action
//! ([`enosys_stub`]).

use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{FromRawFd, OwnedFd};

use agentvm_protocol::{Seccomp, SeccompArg};
use libseccomp::{ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext};

/// `SECCOMP_FILTER_FLAG_TSYNC`.
pub const FLAG_TSYNC: u32 = 1;
/// `SECCOMP_FILTER_FLAG_LOG`.
pub const FLAG_LOG: u32 = 1 << 1;
/// `SECCOMP_FILTER_FLAG_SPEC_ALLOW`.
pub const FLAG_SPEC_ALLOW: u32 = 1 << 2;

/// The errno of an `SCMP_ACT_ERRNO` (and the message of an `SCMP_ACT_TRACE`) that names none.
const DEFAULT_ERRNO: u16 = libc::EPERM as u16;
/// Syscall arguments a condition may name (`arg0` .. `arg5`).
const MAX_ARGS: u32 = 6;

/// What the filter does with a syscall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    KillProcess,
    KillThread,
    Trap,
    Errno(u16),
    Trace(u16),
    Log,
    Allow,
}

/// A comparison of a syscall argument with a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Ne,
    Lt,
    Le,
    Eq,
    Ge,
    Gt,
    /// `arg & mask == value`.
    MaskedEq {
        mask: u64,
    },
}

/// `arg[index] op value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cond {
    pub index: u32,
    pub op: Op,
    pub value: u64,
}

/// `action` for `syscall` when every one of `conds` holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub syscall: String,
    pub action: Action,
    pub conds: Vec<Cond>,
}

/// A profile, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub default: Action,
    /// Architectures besides the native one.
    pub arches: Vec<ScmpArch>,
    /// `SECCOMP_FILTER_FLAG_*` bits for `seccomp(2)`.
    pub flags: u32,
    pub rules: Vec<Rule>,
    /// Every syscall the profile names, whatever its action (a rule whose action is the
    /// default's is not in `rules`): the newest of them bounds what the profile knows.
    pub names: Vec<String>,
}

/// A profile the agent cannot load; the process does not start, as under runc.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SeccompError {
    #[error(
        "unknown seccomp action {0:?} (expected SCMP_ACT_ALLOW, SCMP_ACT_ERRNO, SCMP_ACT_KILL, \
         SCMP_ACT_KILL_THREAD, SCMP_ACT_KILL_PROCESS, SCMP_ACT_TRAP, SCMP_ACT_TRACE or \
         SCMP_ACT_LOG)"
    )]
    UnknownAction(String),
    #[error(
        "seccomp action SCMP_ACT_NOTIFY needs a listener (listenerPath), which agentvm does \
         not support"
    )]
    Notify,
    #[error("seccomp errnoRet {0} is out of range (at most 65535)")]
    ReturnOutOfRange(u32),
    #[error("unknown seccomp operator {0:?} (expected SCMP_CMP_EQ, SCMP_CMP_MASKED_EQ, ...)")]
    UnknownOp(String),
    #[error("seccomp argument index {0} is out of range (a syscall has arguments 0 to 5)")]
    ArgIndex(u32),
    #[error("unknown seccomp flag {0:?}")]
    UnknownFlag(String),
    #[error("unknown seccomp architecture {0:?}")]
    UnknownArch(String),
    #[error("libseccomp: {0}")]
    Libseccomp(String),
}

fn ret(value: Option<u32>) -> Result<u16, SeccompError> {
    match value {
        None => Ok(DEFAULT_ERRNO),
        Some(v) => u16::try_from(v).map_err(|_| SeccompError::ReturnOutOfRange(v)),
    }
}

/// The action named `name` (`SCMP_ACT_*`); `errno_ret` is the value of an ERRNO or TRACE
/// action and ignored for the others.
pub fn action(name: &str, errno_ret: Option<u32>) -> Result<Action, SeccompError> {
    Ok(match name {
        "SCMP_ACT_ALLOW" => Action::Allow,
        "SCMP_ACT_ERRNO" => Action::Errno(ret(errno_ret)?),
        "SCMP_ACT_TRACE" => Action::Trace(ret(errno_ret)?),
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => Action::KillThread,
        "SCMP_ACT_KILL_PROCESS" => Action::KillProcess,
        "SCMP_ACT_TRAP" => Action::Trap,
        "SCMP_ACT_LOG" => Action::Log,
        "SCMP_ACT_NOTIFY" => return Err(SeccompError::Notify),
        other => return Err(SeccompError::UnknownAction(other.to_string())),
    })
}

/// The condition of one OCI argument entry. For `SCMP_CMP_MASKED_EQ`, `value` is the mask
/// and `valueTwo` the value, as in runc and libseccomp.
pub fn cond(arg: &SeccompArg) -> Result<Cond, SeccompError> {
    if arg.index >= MAX_ARGS {
        return Err(SeccompError::ArgIndex(arg.index));
    }
    let (op, value) = match arg.op.as_str() {
        "SCMP_CMP_NE" => (Op::Ne, arg.value),
        "SCMP_CMP_LT" => (Op::Lt, arg.value),
        "SCMP_CMP_LE" => (Op::Le, arg.value),
        "SCMP_CMP_EQ" => (Op::Eq, arg.value),
        "SCMP_CMP_GE" => (Op::Ge, arg.value),
        "SCMP_CMP_GT" => (Op::Gt, arg.value),
        "SCMP_CMP_MASKED_EQ" => (Op::MaskedEq { mask: arg.value }, arg.value_two),
        other => return Err(SeccompError::UnknownOp(other.to_string())),
    };
    Ok(Cond {
        index: arg.index,
        op,
        value,
    })
}

fn flag(name: &str) -> Result<u32, SeccompError> {
    match name {
        "SECCOMP_FILTER_FLAG_TSYNC" => Ok(FLAG_TSYNC),
        "SECCOMP_FILTER_FLAG_LOG" => Ok(FLAG_LOG),
        "SECCOMP_FILTER_FLAG_SPEC_ALLOW" => Ok(FLAG_SPEC_ALLOW),
        other => Err(SeccompError::UnknownFlag(other.to_string())),
    }
}

/// Validates `profile` and turns it into rules.
pub fn translate(profile: &Seccomp) -> Result<Filter, SeccompError> {
    let default = action(&profile.default_action, profile.default_errno_ret)?;
    let arches = profile
        .architectures
        .iter()
        .map(|a| a.parse().map_err(|_| SeccompError::UnknownArch(a.clone())))
        .collect::<Result<Vec<ScmpArch>, _>>()?;
    let mut flags = 0;
    for f in &profile.flags {
        flags |= flag(f)?;
    }
    let mut rules = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for entry in &profile.syscalls {
        for name in &entry.names {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        let act = action(&entry.action, entry.errno_ret)?;
        let conds = entry.args.iter().map(cond).collect::<Result<Vec<_>, _>>()?;
        // libseccomp refuses a rule that does what the default does; it changes nothing.
        if act == default {
            continue;
        }
        // Two conditions on one argument would contradict each other within one rule (the
        // conditions of a rule all hold at once): runc makes one rule of each, which match
        // when any holds.
        let repeated = conds
            .iter()
            .enumerate()
            .any(|(i, c)| conds[..i].iter().any(|d| d.index == c.index));
        let groups: Vec<Vec<Cond>> = if repeated {
            conds.iter().map(|c| vec![*c]).collect()
        } else {
            vec![conds]
        };
        for name in &entry.names {
            for conds in &groups {
                rules.push(Rule {
                    syscall: name.clone(),
                    action: act,
                    conds: conds.clone(),
                });
            }
        }
    }
    Ok(Filter {
        default,
        arches,
        flags,
        rules,
        names,
    })
}

/// One BPF instruction, laid out as the kernel's `struct sock_filter`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// A compiled filter: what the child passes to `seccomp(SECCOMP_SET_MODE_FILTER)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    pub insns: Vec<Insn>,
    pub flags: u32,
    /// Syscall names of the profile this libseccomp does not know (skipped).
    pub skipped: Vec<String>,
}

fn scmp(a: Action) -> ScmpAction {
    match a {
        Action::KillProcess => ScmpAction::KillProcess,
        Action::KillThread => ScmpAction::KillThread,
        Action::Trap => ScmpAction::Trap,
        Action::Errno(e) => ScmpAction::Errno(i32::from(e)),
        Action::Trace(m) => ScmpAction::Trace(m),
        Action::Log => ScmpAction::Log,
        Action::Allow => ScmpAction::Allow,
    }
}

fn scmp_cond(c: &Cond) -> ScmpArgCompare {
    let op = match c.op {
        Op::Ne => ScmpCompareOp::NotEqual,
        Op::Lt => ScmpCompareOp::Less,
        Op::Le => ScmpCompareOp::LessOrEqual,
        Op::Eq => ScmpCompareOp::Equal,
        Op::Ge => ScmpCompareOp::GreaterEqual,
        Op::Gt => ScmpCompareOp::Greater,
        Op::MaskedEq { mask } => ScmpCompareOp::MaskedEqual(mask),
    };
    ScmpArgCompare::new(c.index, op, c.value)
}

fn lib(what: &str) -> impl Fn(libseccomp::error::SeccompError) -> SeccompError + '_ {
    move |e| SeccompError::Libseccomp(format!("{what}: {e}"))
}

/// Generates the BPF program of `filter` with libseccomp.
pub fn compile(filter: &Filter) -> Result<Program, SeccompError> {
    let mut ctx = ScmpFilterContext::new(scmp(filter.default)).map_err(lib("new filter"))?;
    for &arch in &filter.arches {
        ctx.add_arch(arch).map_err(lib("add architecture"))?;
    }
    // A binary tree of syscall numbers instead of a linear list: a profile of ~400 rules
    // (the CRI's RuntimeDefault) costs each syscall a few comparisons, not hundreds. Only an
    // optimisation: an older libseccomp without it still builds a correct filter.
    let _ = ctx.set_ctl_optimize(2);
    let mut skipped = Vec::new();
    for rule in &filter.rules {
        let Ok(nr) = libseccomp::ScmpSyscall::from_name(&rule.syscall) else {
            if !skipped.contains(&rule.syscall) {
                skipped.push(rule.syscall.clone());
            }
            continue;
        };
        let conds: Vec<ScmpArgCompare> = rule.conds.iter().map(scmp_cond).collect();
        ctx.add_rule_conditional(scmp(rule.action), nr, &conds)
            .map_err(lib(&format!("rule for {}", rule.syscall)))?;
    }
    let bytes = export(&ctx)?;
    let mut insns: Vec<Insn> = bytes
        .chunks_exact(std::mem::size_of::<Insn>())
        .map(|c| Insn {
            code: u16::from_ne_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect();
    let newest = filter
        .names
        .iter()
        .filter_map(|n| libseccomp::ScmpSyscall::from_name(n).ok())
        .map(i32::from)
        .filter(|nr| *nr >= 0)
        .max();
    if let (Some(newest), false) = (
        newest,
        matches!(filter.default, Action::Allow | Action::Log),
    ) {
        insns.splice(0..0, enosys_stub(newest as u32));
    }
    Ok(Program {
        insns,
        flags: filter.flags,
        skipped,
    })
}

/// The native architecture's `AUDIT_ARCH_*`, and the bit of its syscall numbers that marks
/// another ABI (x32's on x86_64).
#[cfg(target_arch = "x86_64")]
const NATIVE: (u32, u32) = (0xc000_003e, 0x4000_0000);
#[cfg(target_arch = "aarch64")]
const NATIVE: (u32, u32) = (0xc000_00b7, 0);

/// BPF that answers ENOSYS to a native syscall newer than `newest` (the newest the profile
/// names) and falls through to the profile's program for everything else, as runc's filter
/// does: a profile written before a syscall existed would otherwise give it its default
/// action (EPERM, for the CRI's and Docker's), and a C library that tries a new syscall and
/// falls back on ENOSYS only (glibc's `fchmodat2`, `clone3`) would fail instead of falling
/// back. A syscall the profile names is never newer, so no rule of it is overridden.
fn enosys_stub(newest: u32) -> [Insn; 6] {
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const JGT_K: u16 = 0x25; // BPF_JMP | BPF_JGT | BPF_K
    const JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const RET_ERRNO: u32 = 0x0005_0000; // SECCOMP_RET_ERRNO
    let (arch, other_abi) = NATIVE;
    let insn = |code, jt, jf, k| Insn { code, jt, jf, k };
    // Offsets count the instructions skipped; 6 is the profile's first.
    [
        insn(LD_W_ABS, 0, 0, 4),       // 0: A = seccomp_data.arch
        insn(JEQ_K, 0, 4, arch),       // 1: another arch: to 6
        insn(LD_W_ABS, 0, 0, 0),       // 2: A = seccomp_data.nr
        insn(JSET_K, 2, 0, other_abi), // 3: another ABI (x32): to 6
        insn(JGT_K, 0, 1, newest),     // 4: known to the profile: to 6
        insn(RET_K, 0, 0, RET_ERRNO | libc::ENOSYS as u32), // 5
    ]
}

/// The raw BPF of `ctx`, through a memory file (libseccomp 2.5 exports to a descriptor only).
fn export(ctx: &ScmpFilterContext) -> Result<Vec<u8>, SeccompError> {
    let io = |e: std::io::Error| SeccompError::Libseccomp(format!("export the filter: {e}"));
    // SAFETY: memfd_create takes a NUL-terminated name and flags and returns a new descriptor.
    let fd = unsafe { libc::memfd_create(c"seccomp".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    ctx.export_bpf(&fd).map_err(lib("export the filter"))?;
    let mut file = std::fs::File::from(fd);
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(io)?;
    Ok(bytes)
}

/// [`translate`] then [`compile`].
pub fn program(profile: &Seccomp) -> Result<Program, SeccompError> {
    compile(&translate(profile)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentvm_protocol::SeccompSyscall;

    fn rule(
        names: &[&str],
        action: &str,
        errno: Option<u32>,
        args: &[(u32, u64, u64, &str)],
    ) -> SeccompSyscall {
        SeccompSyscall {
            names: names.iter().map(|n| n.to_string()).collect(),
            action: action.into(),
            errno_ret: errno,
            args: args
                .iter()
                .map(|&(index, value, value_two, op)| SeccompArg {
                    index,
                    value,
                    value_two,
                    op: op.into(),
                })
                .collect(),
        }
    }

    fn profile(default: &str, syscalls: Vec<SeccompSyscall>) -> Seccomp {
        Seccomp {
            default_action: default.into(),
            default_errno_ret: None,
            architectures: vec!["SCMP_ARCH_X86_64".into(), "SCMP_ARCH_X86".into()],
            flags: Vec::new(),
            syscalls,
        }
    }

    #[test]
    fn actions_and_their_errno_values_read_as_runc_reads_them() {
        assert_eq!(action("SCMP_ACT_ALLOW", Some(5)), Ok(Action::Allow));
        assert_eq!(action("SCMP_ACT_ERRNO", None), Ok(Action::Errno(1)));
        assert_eq!(action("SCMP_ACT_ERRNO", Some(38)), Ok(Action::Errno(38)));
        assert_eq!(action("SCMP_ACT_TRACE", None), Ok(Action::Trace(1)));
        assert_eq!(action("SCMP_ACT_KILL", None), Ok(Action::KillThread));
        assert_eq!(action("SCMP_ACT_KILL_THREAD", None), Ok(Action::KillThread));
        assert_eq!(
            action("SCMP_ACT_KILL_PROCESS", None),
            Ok(Action::KillProcess)
        );
        assert_eq!(action("SCMP_ACT_TRAP", None), Ok(Action::Trap));
        assert_eq!(action("SCMP_ACT_LOG", None), Ok(Action::Log));
        assert_eq!(action("SCMP_ACT_NOTIFY", None), Err(SeccompError::Notify));
        assert_eq!(
            action("SCMP_ACT_ERRNO", Some(70000)),
            Err(SeccompError::ReturnOutOfRange(70000))
        );
        assert!(matches!(
            action("SCMP_ACT_SOMETIMES", None),
            Err(SeccompError::UnknownAction(_))
        ));
        let mut p = profile("SCMP_ACT_ERRNO", Vec::new());
        p.default_errno_ret = Some(38);
        assert_eq!(translate(&p).unwrap().default, Action::Errno(38));
    }

    #[test]
    fn argument_conditions_and_masked_equality() {
        let a = |index, value, value_two, op: &str| SeccompArg {
            index,
            value,
            value_two,
            op: op.into(),
        };
        assert_eq!(
            cond(&a(0, 0x7e020000, 0, "SCMP_CMP_MASKED_EQ")),
            Ok(Cond {
                index: 0,
                op: Op::MaskedEq { mask: 0x7e020000 },
                value: 0
            })
        );
        assert_eq!(cond(&a(5, 8, 0, "SCMP_CMP_EQ")).unwrap().op, Op::Eq);
        for (name, op) in [
            ("SCMP_CMP_NE", Op::Ne),
            ("SCMP_CMP_LT", Op::Lt),
            ("SCMP_CMP_LE", Op::Le),
            ("SCMP_CMP_GE", Op::Ge),
            ("SCMP_CMP_GT", Op::Gt),
        ] {
            assert_eq!(
                cond(&a(1, 3, 9, name)).unwrap(),
                Cond {
                    index: 1,
                    op,
                    value: 3
                }
            );
        }
        assert_eq!(
            cond(&a(6, 0, 0, "SCMP_CMP_EQ")),
            Err(SeccompError::ArgIndex(6))
        );
        assert!(matches!(
            cond(&a(0, 0, 0, "SCMP_CMP_ROUGHLY")),
            Err(SeccompError::UnknownOp(_))
        ));
    }

    #[test]
    fn rules_split_as_runc_splits_them() {
        let p = profile(
            "SCMP_ACT_ERRNO",
            vec![
                rule(&["read", "write"], "SCMP_ACT_ALLOW", None, &[]),
                // The default action again: dropped.
                rule(&["reboot"], "SCMP_ACT_ERRNO", None, &[]),
                // Another errno is another action.
                rule(&["clone3"], "SCMP_ACT_ERRNO", Some(38), &[]),
                // Two arguments: one rule, both must hold.
                rule(
                    &["socket"],
                    "SCMP_ACT_ALLOW",
                    None,
                    &[(0, 16, 0, "SCMP_CMP_NE"), (2, 9, 0, "SCMP_CMP_EQ")],
                ),
                // Twice the same argument: a rule each, either may hold.
                rule(
                    &["personality"],
                    "SCMP_ACT_ALLOW",
                    None,
                    &[(0, 0, 0, "SCMP_CMP_EQ"), (0, 8, 0, "SCMP_CMP_EQ")],
                ),
            ],
        );
        let f = translate(&p).unwrap();
        assert_eq!(f.default, Action::Errno(1));
        assert_eq!(f.arches, [ScmpArch::X8664, ScmpArch::X86]);
        let summary: Vec<(&str, Action, usize)> = f
            .rules
            .iter()
            .map(|r| (r.syscall.as_str(), r.action, r.conds.len()))
            .collect();
        assert_eq!(
            summary,
            [
                ("read", Action::Allow, 0),
                ("write", Action::Allow, 0),
                ("clone3", Action::Errno(38), 0),
                ("socket", Action::Allow, 2),
                ("personality", Action::Allow, 1),
                ("personality", Action::Allow, 1),
            ]
        );
        assert_eq!(f.rules[5].conds[0].value, 8);
    }

    #[test]
    fn flags_and_architectures_are_checked() {
        let mut p = profile("SCMP_ACT_ALLOW", Vec::new());
        p.flags = vec![
            "SECCOMP_FILTER_FLAG_LOG".into(),
            "SECCOMP_FILTER_FLAG_SPEC_ALLOW".into(),
        ];
        assert_eq!(translate(&p).unwrap().flags, FLAG_LOG | FLAG_SPEC_ALLOW);
        p.flags = vec!["SECCOMP_FILTER_FLAG_NEW_LISTENER".into()];
        assert!(matches!(translate(&p), Err(SeccompError::UnknownFlag(_))));
        p.flags.clear();
        p.architectures = vec!["SCMP_ARCH_Z80".into()];
        assert_eq!(
            translate(&p),
            Err(SeccompError::UnknownArch("SCMP_ARCH_Z80".into()))
        );
    }

    #[test]
    fn unknown_syscall_names_are_skipped_not_fatal() {
        let p = profile(
            "SCMP_ACT_ERRNO",
            vec![
                rule(
                    &["read", "syscall_from_the_future", "write"],
                    "SCMP_ACT_ALLOW",
                    None,
                    &[],
                ),
                rule(&["syscall_from_the_future"], "SCMP_ACT_LOG", None, &[]),
            ],
        );
        let prog = program(&p).unwrap();
        assert_eq!(prog.skipped, ["syscall_from_the_future"]);
        assert!(!prog.insns.is_empty());
        // A filter ends in a return: BPF_RET is class 6.
        assert_eq!(prog.insns.last().unwrap().code & 0x07, 0x06);
    }

    /// Loads `prog` in a forked child and runs `checks` there: 0 when all hold, 1 when the
    /// filter did not load, else 10 + the index of the first that failed. `checks` must not
    /// allocate (a forked child of a threaded process).
    fn under_filter<const N: usize>(prog: &Program, checks: impl FnOnce() -> [bool; N]) -> i32 {
        crate::testutil::in_child(|| {
            let fprog = crate::process::seam::SockFprog::of(&prog.insns);
            // SAFETY: seccomp(2) reads `fprog`, whose filter points at `prog.insns`, alive
            // here; prctl takes integers only.
            let loaded = unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
                    && libc::syscall(libc::SYS_seccomp, 1, prog.flags, &fprog) == 0
            };
            if !loaded {
                return 1;
            }
            match checks().iter().position(|ok| !ok) {
                None => 0,
                Some(i) => 10 + i as i32,
            }
        })
    }

    #[test]
    fn a_compiled_filter_answers_as_the_profile_says() {
        // Allows everything except: getppid fails with errno 42, fchdir(999) with 33 (other
        // fds are untouched: EBADF), and personality(0x12345) with the default EPERM of a
        // rule without errnoRet.
        let p = profile(
            "SCMP_ACT_ALLOW",
            vec![
                rule(&["getppid"], "SCMP_ACT_ERRNO", Some(42), &[]),
                rule(
                    &["fchdir"],
                    "SCMP_ACT_ERRNO",
                    Some(33),
                    &[(0, 999, 0, "SCMP_CMP_EQ")],
                ),
                rule(
                    &["personality"],
                    "SCMP_ACT_ERRNO",
                    None,
                    &[(0, 0xffff_f000, 0x12000, "SCMP_CMP_MASKED_EQ")],
                ),
            ],
        );
        let prog = program(&p).unwrap();
        let got = under_filter(&prog, || {
            // SAFETY: raw syscalls with integer arguments; errno is the thread's.
            unsafe {
                let errno = || *libc::__errno_location();
                [
                    libc::syscall(libc::SYS_getppid) == -1 && errno() == 42,
                    libc::fchdir(999) == -1 && errno() == 33,
                    libc::fchdir(998) == -1 && errno() == libc::EBADF,
                    // glibc's personality() never sets errno: the raw call does.
                    libc::syscall(libc::SYS_personality, 0x12345) == -1 && errno() == libc::EPERM,
                    libc::syscall(libc::SYS_personality, 0xffff_ffffu32) != -1,
                ]
            }
        });
        assert_eq!(got, 0, "check {} failed in the filtered child", got - 10);
    }

    /// A syscall newer than every one the profile names answers ENOSYS (so a C library
    /// falls back), one the profile knows but does not name still gets the default action,
    /// and a profile whose default allows gets no such answer at all.
    #[test]
    fn syscalls_newer_than_the_profile_answer_enosys() {
        let p = profile(
            "SCMP_ACT_ERRNO",
            vec![rule(
                &["exit_group", "exit", "getppid", "rt_sigreturn"],
                "SCMP_ACT_ALLOW",
                None,
                &[],
            )],
        );
        let prog = program(&p).unwrap();
        assert_eq!(prog.insns[..6], enosys_stub(libc::SYS_exit_group as u32));
        let got = under_filter(&prog, || {
            // SAFETY: raw syscalls with integer arguments; errno is the thread's.
            unsafe {
                let errno = || *libc::__errno_location();
                [
                    libc::syscall(libc::SYS_getppid) > 0,
                    // Older than exit_group, not named: the default.
                    libc::syscall(libc::SYS_tkill, 0, 0) == -1 && errno() == libc::EPERM,
                    // Newer: ENOSYS.
                    libc::syscall(libc::SYS_fanotify_init, 0, 0) == -1 && errno() == libc::ENOSYS,
                    libc::syscall(libc::SYS_fchmodat2, 0, 0, 0, 0) == -1 && errno() == libc::ENOSYS,
                ]
            }
        });
        assert_eq!(got, 0, "check {} failed in the filtered child", got - 10);
        let allowing = profile(
            "SCMP_ACT_ALLOW",
            vec![rule(&["getppid"], "SCMP_ACT_ERRNO", None, &[])],
        );
        let prog = program(&allowing).unwrap();
        let enosys = 0x0005_0000 | libc::ENOSYS as u32;
        assert!(
            !prog.insns.iter().any(|i| i.code == 0x06 && i.k == enosys),
            "an allowing profile answers no ENOSYS"
        );
    }
}
