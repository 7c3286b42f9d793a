//! `docker update`: the OCI `LinuxResources` containerd sends with a Task `Update`, turned into
//! the cgroup v2 limits the agent writes in the guest ([`ResourceLimits`]).
//!
//! Only what a cgroup inside the VM can enforce is converted: memory, swap, reservation, CPU
//! quota and weight, pids. The VM's RAM and vCPUs are fixed at boot, so a memory limit above
//! the VM's size is refused ([`check_memory`]); cpusets, block I/O, hugepages, devices and the
//! like are reported back as ignored, since Docker resends them with every update
//! (docs/decisions.md, "Update").

use agentvm_protocol::{CpuMax, ResourceLimits};
use serde::Deserialize;

use crate::error::{Error, Result};

/// How containerd names an OCI `LinuxResources` in an `Any` (its `typeurl` registry name;
/// the value is JSON).
pub const LINUX_RESOURCES_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";
/// The CFS period the kernel uses when none is given, microseconds.
const DEFAULT_CPU_PERIOD: u64 = 100_000;

/// The parts of OCI `LinuxResources` (runtime-spec `config-linux.md`) agentvm reads; the
/// others are only checked for presence, so a field this version does not model cannot fail
/// an update.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LinuxResources {
    #[serde(default)]
    pub memory: Option<Memory>,
    #[serde(default)]
    pub cpu: Option<Cpu>,
    #[serde(default)]
    pub pids: Option<Pids>,
    #[serde(default)]
    pub devices: Option<serde_json::Value>,
    #[serde(default, rename = "blockIO")]
    pub block_io: Option<serde_json::Value>,
    #[serde(default)]
    pub hugepage_limits: Option<serde_json::Value>,
    #[serde(default)]
    pub network: Option<serde_json::Value>,
    #[serde(default)]
    pub rdma: Option<serde_json::Value>,
    #[serde(default)]
    pub unified: Option<serde_json::Value>,
}

/// OCI `LinuxMemory`, bytes.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Memory {
    pub limit: Option<i64>,
    pub reservation: Option<i64>,
    /// Memory plus swap.
    pub swap: Option<i64>,
    pub kernel: Option<i64>,
    #[serde(rename = "kernelTCP")]
    pub kernel_tcp: Option<i64>,
    pub swappiness: Option<u64>,
    #[serde(rename = "disableOOMKiller")]
    pub disable_oom_killer: Option<bool>,
}

/// OCI `LinuxCPU`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cpu {
    pub shares: Option<u64>,
    pub quota: Option<i64>,
    pub period: Option<u64>,
    pub burst: Option<u64>,
    pub realtime_runtime: Option<i64>,
    pub realtime_period: Option<u64>,
    pub cpus: Option<String>,
    pub mems: Option<String>,
    pub idle: Option<i64>,
}

/// OCI `LinuxPids`.
#[derive(Debug, Default, Deserialize)]
pub struct Pids {
    pub limit: Option<i64>,
}

/// What an update asks of the guest, and what it asked that the VM cannot do.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Update {
    pub limits: ResourceLimits,
    /// Requested settings agentvm ignores, for a warning each.
    pub ignored: Vec<&'static str>,
}

/// Decodes the `resources` of a Task `Update` (`type_url` and JSON `value` of the `Any`).
pub fn parse(type_url: &str, value: &[u8]) -> Result<Update> {
    // containerd writes the URL with its prefix; some clients leave it off.
    if !type_url.ends_with("opencontainers/runtime-spec/1/LinuxResources") {
        return Err(Error::Invalid(format!(
            "update: resources of type {type_url:?}, expected {LINUX_RESOURCES_TYPE_URL}"
        )));
    }
    let r: LinuxResources = serde_json::from_slice(value)
        .map_err(|e| Error::Invalid(format!("update: malformed LinuxResources: {e}")))?;
    convert(&r)
}

/// The cgroup v2 limits for `r`, with runc's conventions: 0 (or absent) leaves a value
/// alone, -1 removes a limit.
pub fn convert(r: &LinuxResources) -> Result<Update> {
    let mut u = Update::default();
    let set = |v: Option<i64>| v.filter(|&v| v != 0).map(|v| v.max(-1));
    if let Some(m) = &r.memory {
        u.limits.memory_max = set(m.limit);
        u.limits.memory_low = set(m.reservation);
        u.limits.memory_swap_max = swap_max(m.swap, m.limit)?;
        if m.kernel.is_some_and(|v| v != 0) || m.kernel_tcp.is_some_and(|v| v != 0) {
            u.ignored.push("kernel memory limits (not in cgroup v2)");
        }
        if m.swappiness.is_some() {
            u.ignored.push("memory swappiness (not in cgroup v2)");
        }
        if m.disable_oom_killer == Some(true) {
            u.ignored.push("--oom-kill-disable (not in cgroup v2)");
        }
    }
    if let Some(c) = &r.cpu {
        u.limits.cpu_weight = c.shares.filter(|&s| s != 0).map(shares_to_weight);
        let quota = c.quota.filter(|&q| q != 0);
        let period = c.period.filter(|&p| p != 0);
        if quota.is_some() || period.is_some() {
            u.limits.cpu_max = Some(CpuMax {
                quota: quota.map_or(-1, |q| q.max(-1)),
                period: period.unwrap_or(DEFAULT_CPU_PERIOD),
            });
        }
        if c.cpus.as_deref().is_some_and(|s| !s.is_empty())
            || c.mems.as_deref().is_some_and(|s| !s.is_empty())
        {
            u.ignored
                .push("cpuset (--cpuset-cpus, --cpuset-mems: the VM's vCPUs are fixed at start)");
        }
        if c.realtime_runtime.is_some_and(|v| v != 0) || c.realtime_period.is_some_and(|v| v != 0) {
            u.ignored.push("real-time CPU limits");
        }
        if c.burst.is_some_and(|v| v != 0) || c.idle.is_some_and(|v| v != 0) {
            u.ignored.push("CPU burst and idle");
        }
    }
    if let Some(p) = &r.pids {
        u.limits.pids_max = set(p.limit);
    }
    let present = |v: &Option<serde_json::Value>| match v {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Array(a)) => !a.is_empty(),
        Some(serde_json::Value::Object(o)) => !o.is_empty(),
        Some(_) => true,
    };
    for (v, what) in [
        (
            &r.block_io,
            "block I/O limits (--blkio-weight, --device-*-bps/iops)",
        ),
        (&r.hugepage_limits, "hugepage limits"),
        (&r.devices, "device rules (the guest's /dev is the agent's)"),
        (&r.network, "network classes and priorities"),
        (&r.rdma, "RDMA limits"),
        (&r.unified, "unified cgroup v2 keys"),
    ] {
        if present(v) {
            u.ignored.push(what);
        }
    }
    Ok(u)
}

/// cgroup v2 `memory.swap.max` from OCI's memory+swap total, as runc converts it.
fn swap_max(swap: Option<i64>, limit: Option<i64>) -> Result<Option<i64>> {
    let (swap, limit) = (swap.unwrap_or(0), limit.unwrap_or(0));
    match (swap, limit) {
        // Memory unlimited and swap unspecified: both unlimited, as on cgroup v1.
        (0, -1) => Ok(Some(-1)),
        (0, _) => Ok(None),
        (s, _) if s < 0 => Ok(Some(-1)),
        (_, l) if l <= 0 => Err(Error::Invalid(
            "update: a swap limit (--memory-swap) needs a memory limit (--memory)".into(),
        )),
        (s, l) if s < l => Err(Error::Invalid(format!(
            "update: the memory+swap limit ({s}) is below the memory limit ({l})"
        ))),
        (s, l) => Ok(Some(s - l)),
    }
}

/// cgroup v1 CPU shares (2..=262144, default 1024) as a cgroup v2 weight (1..=10000), the
/// linear mapping of runc and crun.
pub fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

/// Refuses a memory limit the VM cannot grant: its RAM (`vm_mib`) is fixed when it boots.
pub fn check_memory(limits: &ResourceLimits, vm_mib: u32) -> Result<()> {
    match limits.memory_max {
        Some(bytes) if bytes > 0 && bytes as u64 > u64::from(vm_mib) << 20 => {
            Err(Error::Invalid(format!(
                "agentvm: cannot raise the memory limit above the VM's {vm_mib} MiB set at start \
                 (asked for {} MiB); recreate the container with a larger --memory",
                (bytes as u64).div_ceil(1 << 20)
            )))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_json(json: &str) -> Result<Update> {
        parse(LINUX_RESOURCES_TYPE_URL, json.as_bytes())
    }

    /// What Docker 26 sends for `docker update --memory 64m --memory-swap 64m --cpus 0.5
    /// --pids-limit 50` on a container created without limits.
    #[test]
    fn docker_update_becomes_cgroup_v2_limits() {
        let u = parse_json(
            r#"{"memory":{"limit":67108864,"swap":67108864},
                "cpu":{"quota":50000,"period":100000,"cpus":"","mems":""},
                "pids":{"limit":50},"blockIO":{}}"#,
        )
        .unwrap();
        assert_eq!(
            u.limits,
            ResourceLimits {
                memory_max: Some(64 << 20),
                memory_swap_max: Some(0),
                cpu_max: Some(CpuMax {
                    quota: 50_000,
                    period: 100_000
                }),
                pids_max: Some(50),
                ..Default::default()
            }
        );
        assert!(u.ignored.is_empty(), "{:?}", u.ignored);
    }

    #[test]
    fn zero_leaves_alone_and_minus_one_removes() {
        let u = parse_json(
            r#"{"memory":{"limit":-1},"cpu":{"quota":-1,"period":0,"shares":0,
                "realtimeRuntime":0,"realtimePeriod":0},"pids":{"limit":0}}"#,
        )
        .unwrap();
        assert_eq!(
            u.limits,
            ResourceLimits {
                memory_max: Some(-1),
                memory_swap_max: Some(-1),
                cpu_max: Some(CpuMax {
                    quota: -1,
                    period: 100_000
                }),
                ..Default::default()
            }
        );
        let u = parse_json(r#"{"cpu":{"quota":0,"period":0},"pids":{"limit":-1}}"#).unwrap();
        assert_eq!(u.limits.cpu_max, None);
        assert_eq!(u.limits.pids_max, Some(-1));
        assert_eq!(parse_json("{}").unwrap(), Update::default());
    }

    #[test]
    fn shares_map_onto_weights() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(1), 1, "clamped, no underflow");
        assert_eq!(shares_to_weight(u64::MAX), 10_000);
        let u = parse_json(r#"{"cpu":{"shares":512}}"#).unwrap();
        assert_eq!(u.limits.cpu_weight, Some(1 + (510 * 9999) / 262_142));
    }

    #[test]
    fn swap_is_converted_as_runc_does() {
        assert_eq!(swap_max(Some(128), Some(64)).unwrap(), Some(64));
        assert_eq!(swap_max(Some(64), Some(64)).unwrap(), Some(0));
        assert_eq!(swap_max(Some(-1), Some(64)).unwrap(), Some(-1));
        assert_eq!(swap_max(None, Some(64)).unwrap(), None);
        assert_eq!(swap_max(None, Some(-1)).unwrap(), Some(-1));
        assert!(swap_max(Some(32), Some(64)).is_err());
        assert!(swap_max(Some(64), None).is_err());
    }

    #[test]
    fn what_the_vm_cannot_change_is_reported() {
        let u = parse_json(
            r#"{"cpu":{"cpus":"0-1","shares":1024},"blockIO":{"weight":300},
                "hugepageLimits":[{"pageSize":"2MB","limit":0}],
                "devices":[{"allow":false,"access":"rwm"}],
                "memory":{"kernel":1,"swappiness":10},"unified":{"memory.high":"1"}}"#,
        )
        .unwrap();
        assert_eq!(u.limits.cpu_weight, Some(39));
        assert_eq!(u.ignored.len(), 7, "{:?}", u.ignored);
        assert!(u.ignored[0].starts_with("kernel memory"));
    }

    #[test]
    fn hostile_or_foreign_input_is_refused() {
        assert!(parse(
            "types.containerd.io/opencontainers/runtime-spec/1/Spec",
            b"{}"
        )
        .is_err());
        assert!(parse_json("").is_err());
        assert!(parse_json("7").is_err());
        assert!(parse_json(r#"{"memory":{"limit":"lots"}}"#).is_err());
        assert!(parse_json(r#"{"memory":{"limit":99999999999999999999}}"#).is_err());
        assert!(parse_json(r#"{"cpu":{"shares":-5}}"#).is_err());
        // Very negative values mean "no limit", never a huge write.
        let u = parse_json(r#"{"pids":{"limit":-9223372036854775808}}"#).unwrap();
        assert_eq!(u.limits.pids_max, Some(-1));
        // Unknown fields (newer runtime-spec versions) are fine.
        assert!(parse_json(r#"{"memory":{"useHierarchy":true,"checkBeforeUpdate":true}}"#).is_ok());
        // Without a prefix, as some clients write it.
        assert!(parse("opencontainers/runtime-spec/1/LinuxResources", b"{}").is_ok());
    }

    #[test]
    fn memory_above_the_vm_is_refused_with_advice() {
        let ask = |bytes: i64| ResourceLimits {
            memory_max: Some(bytes),
            ..Default::default()
        };
        assert!(check_memory(&ask(64 << 20), 512).is_ok());
        assert!(check_memory(&ask(512 << 20), 512).is_ok());
        assert!(check_memory(&ask(-1), 512).is_ok());
        assert!(check_memory(&ResourceLimits::default(), 512).is_ok());
        let e = check_memory(&ask(1 << 30), 512).unwrap_err().to_string();
        assert_eq!(
            e,
            "agentvm: cannot raise the memory limit above the VM's 512 MiB set at start \
             (asked for 1024 MiB); recreate the container with a larger --memory"
        );
    }
}
