//! The OCI runtime spec (a bundle's `config.json`) mapped onto what agentvm runs: the process
//! for the agent, the hostname, and the VM's size.

use std::path::{Path, PathBuf};

use agentvm_protocol::{Capabilities, ProcessSpec, Rlimit, Seccomp, User};
use std::collections::{BTreeMap, HashMap};

use oci_spec::runtime::{Hooks, LinuxNamespaceType, Mount, Process, Spec};

use crate::netns::NetnsMode;

use crate::error::{Error, Result};

/// Guest memory added on top of the container's memory limit: the guest kernel, the agent and
/// the page cache of a small workload. Measured: the busybox test guest uses ~25 MiB after boot.
pub const MEMORY_OVERHEAD_MIB: u32 = 64;
/// Smallest VM booted whatever the limit says: below this the kernel itself struggles.
pub const MIN_MEMORY_MIB: u32 = 128;
/// vCPUs are capped here: each is a host thread (and under TCG a busy one).
pub const MAX_VCPUS: u32 = 16;

/// Annotation choosing the confinement of a container in its VM: `vm` (root holds every
/// capability, no seccomp filter, no masked or read-only paths) or `spec` (the spec's
/// capabilities, seccomp profile, masked and read-only paths, as runc applies them).
pub const CAPABILITIES_ANNOTATION: &str = "io.agentvm.capabilities";

/// How much of the spec's confinement a container keeps inside the VM: its capability sets,
/// its seccomp profile (`linux.seccomp`), its `linux.maskedPaths` and `linux.readonlyPaths`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapPolicy {
    /// Root in the VM holds every capability, and no process gets a seccomp filter or masked
    /// or read-only paths: the VM, not the spec's confinement, is the boundary, so
    /// Docker-in-Docker, mounts, iptables and `/proc/sys` writes work without `--privileged`.
    /// Non-root processes keep the spec's capability sets.
    Vm,
    /// The spec's capability sets, seccomp profile, masked and read-only paths, as runc
    /// would apply them.
    Spec,
}

/// The policy named by [`CAPABILITIES_ANNOTATION`] in `annotations`. Unless annotated, a
/// Kubernetes pod's containers (the CRI plugin's `io.kubernetes.cri.container-type`) keep
/// the spec's sets: several containers share the pod's VM, and a pod's security context
/// (`capabilities.drop: [ALL]`, the restricted Pod Security Standard) must hold between them
/// as under runc; a Docker container, alone in its VM, gets every capability.
pub fn cap_policy(annotations: &HashMap<String, String>) -> Result<CapPolicy> {
    match annotations.get(CAPABILITIES_ANNOTATION).map(String::as_str) {
        None if annotations.contains_key(crate::pod::CONTAINER_TYPE) => Ok(CapPolicy::Spec),
        None | Some("vm") => Ok(CapPolicy::Vm),
        Some("spec") => Ok(CapPolicy::Spec),
        Some(other) => Err(Error::Invalid(format!(
            "annotation {CAPABILITIES_ANNOTATION}={other:?}: use \"vm\" (root in the VM gets \
             every capability, the default) or \"spec\" (the container's capability sets)"
        ))),
    }
}

/// Applies `policy` to a process: under [`CapPolicy::Vm`] a process running as uid 0 keeps
/// the agent's full capability set and no process gets a seccomp filter; everything else
/// keeps the spec's sets and profile.
pub fn apply_cap_policy(process: &mut ProcessSpec, policy: CapPolicy) {
    if policy == CapPolicy::Vm {
        process.seccomp = None;
        if process.user.uid == 0 {
            process.capabilities = None;
        }
    }
}

/// The spec's confinement beyond capabilities, as [`CapPolicy`] leaves it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Confinement {
    /// `linux.seccomp`: loaded for the init and for every exec of the container.
    pub seccomp: Option<Seccomp>,
    /// `linux.maskedPaths`.
    pub masked_paths: Vec<String>,
    /// `linux.readonlyPaths`.
    pub readonly_paths: Vec<String>,
}

/// The spec's seccomp profile, masked and read-only paths under `policy` (none under
/// [`CapPolicy::Vm`]).
pub fn confinement(spec: &Spec, policy: CapPolicy) -> Result<Confinement> {
    let Some(linux) = spec.linux().as_ref() else {
        return Ok(Confinement::default());
    };
    if policy == CapPolicy::Vm {
        return Ok(Confinement::default());
    }
    Ok(Confinement {
        seccomp: match linux.seccomp() {
            Some(s) => Some(via_json(s, "linux.seccomp")?),
            None => None,
        },
        masked_paths: linux.masked_paths().clone().unwrap_or_default(),
        readonly_paths: linux.readonly_paths().clone().unwrap_or_default(),
    })
}

/// What agentvm takes from a bundle's `config.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleSpec {
    pub process: ProcessSpec,
    pub hostname: Option<String>,
    /// `root.path`, resolved against the bundle when relative.
    pub root: PathBuf,
    pub root_readonly: bool,
    /// The VM's memory: the OCI memory limit + [`MEMORY_OVERHEAD_MIB`], or the default.
    pub memory_mib: u32,
    /// The OCI CPU quota rounded up to whole vCPUs, or the default.
    pub vcpus: u32,
    /// The network namespace entry of `linux.namespaces`.
    pub netns: NetnsMode,
    pub mounts: Vec<Mount>,
    pub hooks: Option<Hooks>,
    pub annotations: HashMap<String, String>,
    /// `linux.sysctl`.
    pub sysctls: BTreeMap<String, String>,
    /// `linux.cgroupsPath` and the CPU asks of `linux.resources`, for the host cgroup.
    pub host_cgroup: crate::hostcgroup::Request,
    /// What writable volumes may not leave on the host: the spec's bounding set, before root
    /// in the VM is given every capability.
    pub volume_limits: crate::vmm::VolumeLimits,
    /// A CRI container's PID namespace is its own (not the pod's).
    pub own_pid_namespace: bool,
    /// The cgroup limits of `linux.resources` (memory, CPU, pids), for a pod's later
    /// container, whose cgroup in the pod's VM gets them; `None` when it names none.
    pub limits: Option<agentvm_protocol::ResourceLimits>,
    /// The seccomp profile (also in `process`, for the init), masked and read-only paths the
    /// container keeps under its [`CapPolicy`].
    pub confinement: Confinement,
}

/// The cgroup limits of the spec's `linux.resources` (through JSON: the OCI field names are
/// the same on both sides); `None` when it limits nothing a guest cgroup holds.
fn cgroup_limits(spec: &Spec) -> Result<Option<agentvm_protocol::ResourceLimits>> {
    let Some(resources) = spec.linux().as_ref().and_then(|l| l.resources().as_ref()) else {
        return Ok(None);
    };
    let json = serde_json::to_vec(resources)
        .map_err(|e| Error::Invalid(format!("linux.resources: {e}")))?;
    let parsed: crate::resources::LinuxResources = serde_json::from_slice(&json)
        .map_err(|e| Error::Invalid(format!("linux.resources: {e}")))?;
    let limits = crate::resources::convert(&parsed)?.limits;
    Ok((limits != Default::default()).then_some(limits))
}

/// Reads and maps `<bundle>/config.json`.
pub fn load_bundle(
    bundle: &Path,
    default_memory_mib: u32,
    default_vcpus: u32,
) -> Result<BundleSpec> {
    let path = bundle.join("config.json");
    let spec = Spec::load(&path)
        .map_err(|e| Error::Invalid(format!("cannot load {}: {e}", path.display())))?;
    map_spec(&spec, bundle, default_memory_mib, default_vcpus)
}

/// Maps a parsed spec; `bundle` resolves a relative root path.
pub fn map_spec(
    spec: &Spec,
    bundle: &Path,
    default_memory_mib: u32,
    default_vcpus: u32,
) -> Result<BundleSpec> {
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| Error::Invalid("config.json has no process".into()))?;
    let mut process = process_spec(process)?;
    let volume_limits = crate::vmm::VolumeLimits::from_bounding(
        process.capabilities.as_ref().map(|c| c.bounding.as_slice()),
    );
    let annotations = spec.annotations().clone().unwrap_or_default();
    let policy = cap_policy(&annotations)?;
    let confinement = confinement(spec, policy)?;
    process.seccomp = confinement.seccomp.clone();
    apply_cap_policy(&mut process, policy);
    let (root, root_readonly) = match spec.root() {
        Some(r) if r.path().is_absolute() => (r.path().clone(), r.readonly().unwrap_or(false)),
        Some(r) => (bundle.join(r.path()), r.readonly().unwrap_or(false)),
        None => (bundle.join("rootfs"), false),
    };
    let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
    let memory_limit = resources
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit());
    let cpu = resources.and_then(|r| r.cpu().as_ref());
    let pod = crate::pod::PodSize::of(&annotations);
    refuse_id_remapping(spec)?;
    let netns = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|ns| ns.iter().find(|n| n.typ() == LinuxNamespaceType::Network))
        .map_or(NetnsMode::Host, |n| match n.path() {
            Some(p) if !p.as_os_str().is_empty() => NetnsMode::Join(p.clone()),
            _ => NetnsMode::New,
        });
    // A Kubernetes pod's: refused where a VM cannot honour it.
    let netns = crate::pod::admit(spec, &annotations, netns)?;
    let mounts = spec.mounts().clone().unwrap_or_default();
    let hostname = spec
        .hostname()
        .clone()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            crate::pod::container_hostname(&crate::pod::PodRole::of(&annotations), &mounts)
        });
    let host_cgroup = crate::hostcgroup::Request {
        cgroups_path: spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().as_ref())
            .map(|p| p.display().to_string()),
        cpu: crate::hostcgroup::CpuRequest {
            shares: cpu.and_then(|c| c.shares()),
            quota: cpu.and_then(|c| c.quota()),
            period: cpu.and_then(|c| c.period()),
        },
    };
    Ok(BundleSpec {
        confinement,
        // Only a pod's later container runs in a cgroup of its own in a VM it does not size.
        limits: match crate::pod::PodRole::of(&annotations) {
            crate::pod::PodRole::Container { .. } => cgroup_limits(spec)?,
            _ => None,
        },
        own_pid_namespace: crate::pod::own_pid_namespace(spec),
        volume_limits,
        host_cgroup,
        netns,
        mounts,
        hooks: spec.hooks().clone(),
        annotations,
        sysctls: spec
            .linux()
            .as_ref()
            .and_then(|l| l.sysctl().clone())
            .map(|m| m.into_iter().collect())
            .unwrap_or_default(),
        process,
        hostname,
        root,
        root_readonly,
        memory_mib: memory_mib(pod.memory.or(memory_limit), default_memory_mib),
        vcpus: if pod.quota.is_some() {
            vcpus(pod.quota, pod.period, default_vcpus)
        } else {
            vcpus(
                cpu.and_then(|c| c.quota()),
                cpu.and_then(|c| c.period()),
                default_vcpus,
            )
        },
    })
}

/// Refuses a spec that remaps user and group ids (a user namespace with mappings: dockerd
/// `--userns-remap`, Kubernetes `hostUsers: false`). Under runc its root is an unprivileged
/// host id on every file it writes; here the guest's root writes through the shares as the
/// ids the guest names, so running it would quietly give it more than its engine granted.
/// A mapping of every id onto itself changes nothing and is accepted.
fn refuse_id_remapping(spec: &Spec) -> Result<()> {
    let Some(linux) = spec.linux().as_ref() else {
        return Ok(());
    };
    let identity = |maps: &Option<Vec<oci_spec::runtime::LinuxIdMapping>>| {
        maps.as_deref()
            .unwrap_or_default()
            .iter()
            .all(|m| m.container_id() == m.host_id() || m.size() == 0)
    };
    if !identity(linux.uid_mappings()) || !identity(linux.gid_mappings()) {
        return Err(Error::Invalid(
            "the spec remaps user ids (a user namespace with uid/gid mappings: dockerd \
             --userns-remap or Kubernetes hostUsers: false), which agentvm does not support \
             yet: files the container's root writes to its root and volumes would be owned \
             by host root instead of the remapped ids. Run this container without id \
             remapping (docker run --userns=host, or drop userns-remap for the agentvm \
             runtime), or with runc"
                .into(),
        ));
    }
    Ok(())
}

/// The VM size for an OCI memory limit in bytes (absent, 0 or -1 mean unlimited).
pub fn memory_mib(limit: Option<i64>, default_mib: u32) -> u32 {
    match limit {
        Some(bytes) if bytes > 0 => {
            let mib = u32::try_from((bytes as u64).div_ceil(1 << 20)).unwrap_or(u32::MAX);
            mib.saturating_add(MEMORY_OVERHEAD_MIB).max(MIN_MEMORY_MIB)
        }
        _ => default_mib,
    }
}

/// vCPUs for an OCI CPU quota/period (`--cpus 1.5` = quota 150000, period 100000 -> 2).
pub fn vcpus(quota: Option<i64>, period: Option<u64>, default: u32) -> u32 {
    match (quota, period) {
        (Some(q), Some(p)) if q > 0 && p > 0 => {
            let n = (q as u64).div_ceil(p);
            u32::try_from(n).unwrap_or(MAX_VCPUS).clamp(1, MAX_VCPUS)
        }
        _ => default,
    }
}

/// A JSON OCI `process` object (what containerd sends for an exec) as a [`ProcessSpec`].
pub fn process_spec_json(json: &[u8]) -> Result<ProcessSpec> {
    let p: Process = serde_json::from_slice(json)
        .map_err(|e| Error::Invalid(format!("exec process spec: {e}")))?;
    process_spec(&p)
}

/// The OCI `process` as the agent's [`ProcessSpec`].
pub fn process_spec(p: &Process) -> Result<ProcessSpec> {
    let args = p.args().clone().unwrap_or_default();
    if args.is_empty() {
        return Err(Error::Invalid("process.args is empty".into()));
    }
    // Rlimit and capability names are the OCI strings on both sides: go through JSON rather
    // than mapping every enum variant by hand.
    let rlimits: Vec<Rlimit> = match p.rlimits() {
        Some(r) => via_json(r, "process.rlimits")?,
        None => Vec::new(),
    };
    let capabilities: Option<Capabilities> = match p.capabilities() {
        Some(c) => {
            let mut caps: Capabilities = via_json(c, "process.capabilities")?;
            for set in [
                &mut caps.bounding,
                &mut caps.effective,
                &mut caps.inheritable,
                &mut caps.permitted,
                &mut caps.ambient,
            ] {
                set.sort();
            }
            Some(caps)
        }
        None => None,
    };
    let cwd = p.cwd().display().to_string();
    Ok(ProcessSpec {
        args,
        env: p.env().clone().unwrap_or_default(),
        cwd: if cwd.is_empty() { "/".into() } else { cwd },
        user: User {
            uid: p.user().uid(),
            gid: p.user().gid(),
            additional_gids: p.user().additional_gids().clone().unwrap_or_default(),
        },
        terminal: p.terminal().unwrap_or(false),
        console_size: p.console_size().map(|b| {
            (
                u16::try_from(b.height()).unwrap_or(u16::MAX),
                u16::try_from(b.width()).unwrap_or(u16::MAX),
            )
        }),
        rlimits,
        no_new_privileges: p.no_new_privileges().unwrap_or(false),
        capabilities,
        seccomp: None,
    })
}

fn via_json<T: serde::de::DeserializeOwned>(v: &impl serde::Serialize, what: &str) -> Result<T> {
    serde_json::to_value(v)
        .and_then(serde_json::from_value)
        .map_err(|e| Error::Invalid(format!("{what}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Spec {
        serde_json::from_str(json).unwrap()
    }

    const DOCKER_LIKE: &str = r#"{
        "ociVersion": "1.0.2",
        "process": {
            "terminal": true,
            "consoleSize": {"height": 40, "width": 120},
            "user": {"uid": 1000, "gid": 1000, "additionalGids": [10, 20]},
            "args": ["sh", "-c", "echo hi"],
            "env": ["PATH=/usr/bin:/bin", "HOSTNAME=abc"],
            "cwd": "/work",
            "capabilities": {
                "bounding": ["CAP_KILL", "CAP_CHOWN"],
                "effective": ["CAP_CHOWN"],
                "permitted": ["CAP_CHOWN", "CAP_KILL"]
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 512}],
            "noNewPrivileges": true
        },
        "root": {"path": "/var/lib/docker/overlay2/x/merged", "readonly": true},
        "hostname": "abc",
        "linux": {
            "resources": {
                "memory": {"limit": 268435456},
                "cpu": {"quota": 150000, "period": 100000}
            },
            "namespaces": [{"type": "network"}]
        }
    }"#;

    #[test]
    fn docker_spec_maps_to_process_and_vm_size() {
        let b = map_spec(&spec(DOCKER_LIKE), Path::new("/bundle"), 512, 1).unwrap();
        let p = &b.process;
        assert_eq!(p.args, ["sh", "-c", "echo hi"]);
        assert_eq!(p.env, ["PATH=/usr/bin:/bin", "HOSTNAME=abc"]);
        assert_eq!(p.cwd, "/work");
        assert_eq!(
            p.user,
            User {
                uid: 1000,
                gid: 1000,
                additional_gids: vec![10, 20]
            }
        );
        assert!(p.terminal);
        assert_eq!(p.console_size, Some((40, 120)));
        assert!(p.no_new_privileges);
        assert_eq!(
            p.rlimits,
            [Rlimit {
                kind: "RLIMIT_NOFILE".into(),
                hard: 1024,
                soft: 512
            }]
        );
        let caps = p.capabilities.as_ref().unwrap();
        assert_eq!(caps.bounding, ["CAP_CHOWN", "CAP_KILL"]);
        assert_eq!(caps.effective, ["CAP_CHOWN"]);
        assert!(caps.ambient.is_empty());
        assert_eq!(b.hostname.as_deref(), Some("abc"));
        assert_eq!(b.root, Path::new("/var/lib/docker/overlay2/x/merged"));
        assert!(b.root_readonly);
        assert_eq!(b.memory_mib, 256 + MEMORY_OVERHEAD_MIB);
        assert_eq!(b.vcpus, 2);
        assert_eq!(b.netns, NetnsMode::New);
    }

    #[test]
    fn root_in_the_vm_gets_every_capability_unless_the_annotation_says_spec() {
        let docker = spec(DOCKER_LIKE);
        let mut root = docker.clone();
        let mut p = root.process().clone().unwrap();
        p.user_mut().set_uid(0);
        root.set_process(Some(p));
        let b = map_spec(&root, Path::new("/b"), 512, 1).unwrap();
        assert_eq!(b.process.capabilities, None, "root keeps the full set");
        // uid 1000 keeps the spec's sets.
        let b = map_spec(&docker, Path::new("/b"), 512, 1).unwrap();
        assert!(b.process.capabilities.is_some());
        root.set_annotations(Some(HashMap::from([(
            CAPABILITIES_ANNOTATION.to_string(),
            "spec".to_string(),
        )])));
        let b = map_spec(&root, Path::new("/b"), 512, 1).unwrap();
        assert_eq!(
            b.process.capabilities.unwrap().bounding,
            ["CAP_CHOWN", "CAP_KILL"]
        );
        root.set_annotations(Some(HashMap::from([(
            CAPABILITIES_ANNOTATION.to_string(),
            "all".to_string(),
        )])));
        let e = map_spec(&root, Path::new("/b"), 512, 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("io.agentvm.capabilities") && e.contains("\"spec\""),
            "{e}"
        );
    }

    #[test]
    fn seccomp_and_masked_paths_ride_on_the_capability_policy() {
        let confined = DOCKER_LIKE.replace(
            r#""namespaces": [{"type": "network"}]"#,
            r#""namespaces": [{"type": "network"}, {"type": "pid"}, {"type": "ipc"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys"],
            "readonlyPaths": ["/proc/sys"],
            "seccomp": {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1,
                "architectures": ["SCMP_ARCH_X86_64"],
                "syscalls": [{"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
                    {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                     "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
                    {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]}"#,
        );
        // Docker, alone in its VM: none of it, for root and for other users alike.
        let docker = map_spec(&spec(&confined), Path::new("/b"), 512, 1).unwrap();
        assert_eq!(docker.confinement, Confinement::default());
        assert_eq!(docker.process.seccomp, None);
        // A pod's container, or Docker annotated `spec`: all of it, as the spec says.
        for annotation in [
            (crate::pod::CONTAINER_TYPE, "container"),
            (CAPABILITIES_ANNOTATION, "spec"),
        ] {
            let mut s = spec(&confined);
            s.set_annotations(Some(HashMap::from([(
                annotation.0.to_string(),
                annotation.1.to_string(),
            )])));
            let b = map_spec(&s, Path::new("/b"), 512, 1).unwrap();
            assert_eq!(b.confinement.masked_paths, ["/proc/kcore", "/proc/keys"]);
            assert_eq!(b.confinement.readonly_paths, ["/proc/sys"]);
            let profile = b.confinement.seccomp.as_ref().expect("profile");
            assert_eq!(b.process.seccomp.as_ref(), Some(profile));
            assert_eq!(profile.default_action, "SCMP_ACT_ERRNO");
            assert_eq!(profile.default_errno_ret, Some(1));
            assert_eq!(profile.architectures, ["SCMP_ARCH_X86_64"]);
            assert_eq!(profile.syscalls.len(), 3);
            assert_eq!(profile.syscalls[1].args[0].op, "SCMP_CMP_EQ");
            assert_eq!(profile.syscalls[1].args[0].value, 8);
            assert_eq!(profile.syscalls[2].errno_ret, Some(38));
        }
        // An exec gets the container's profile, which the Docker policy drops again.
        let mut exec =
            process_spec_json(br#"{"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}}"#)
                .unwrap();
        exec.seccomp = Some(Seccomp::default());
        apply_cap_policy(&mut exec, CapPolicy::Spec);
        assert!(exec.seccomp.is_some());
        apply_cap_policy(&mut exec, CapPolicy::Vm);
        assert_eq!(exec.seccomp, None);
    }

    #[test]
    fn the_specs_resources_become_cgroup_limits() {
        let mut cri = spec(&DOCKER_LIKE.replace(
            r#"[{"type": "network"}]"#,
            r#"[{"type": "network"}, {"type": "pid"}, {"type": "ipc"}]"#,
        ));
        cri.set_annotations(Some(HashMap::from([(
            crate::pod::CONTAINER_TYPE.to_string(),
            "container".to_string(),
        )])));
        let b = map_spec(&cri, Path::new("/b"), 512, 1).unwrap();
        let limits = b.limits.expect("limits");
        assert_eq!(limits.memory_max, Some(256 << 20));
        // A Docker container's limits size its VM and its cgroup by other ways.
        let b = map_spec(&spec(DOCKER_LIKE), Path::new("/b"), 512, 1).unwrap();
        assert_eq!(b.limits, None);
        let mut bare = cri.clone();
        let mut linux = cri.linux().clone().unwrap();
        linux.set_resources(None);
        bare.set_linux(Some(linux));
        let b = map_spec(&bare, Path::new("/b"), 512, 1).unwrap();
        assert_eq!(b.limits, None);
    }

    #[test]
    fn a_pods_root_keeps_the_specs_capabilities_unless_annotated_vm() {
        let pod = |extra: &[(&str, &str)]| {
            let mut a = HashMap::from([(
                crate::pod::CONTAINER_TYPE.to_string(),
                "container".to_string(),
            )]);
            a.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            a
        };
        assert_eq!(cap_policy(&pod(&[])).unwrap(), CapPolicy::Spec);
        assert_eq!(
            cap_policy(&pod(&[(CAPABILITIES_ANNOTATION, "vm")])).unwrap(),
            CapPolicy::Vm
        );
        assert_eq!(cap_policy(&HashMap::new()).unwrap(), CapPolicy::Vm);
    }

    #[test]
    fn network_namespace_modes() {
        let with = |ns: &str| {
            spec(&format!(
                r#"{{"ociVersion":"1.0.2","process":{{"user":{{"uid":0,"gid":0}},"args":["true"],"cwd":"/"}},"linux":{{"namespaces":[{ns}]}}}}"#
            ))
        };
        let b = map_spec(
            &with(r#"{"type":"network","path":"/var/run/netns/cni-1"}"#),
            Path::new("/b"),
            512,
            1,
        )
        .unwrap();
        assert_eq!(b.netns, NetnsMode::Join("/var/run/netns/cni-1".into()));
        let b = map_spec(&with(r#"{"type":"pid"}"#), Path::new("/b"), 512, 1).unwrap();
        assert_eq!(b.netns, NetnsMode::Host);
    }

    #[test]
    fn remapped_ids_are_refused_with_what_to_do() {
        let with = |maps: &str| {
            spec(&format!(
                r#"{{"ociVersion":"1.0.2","process":{{"user":{{"uid":0,"gid":0}},"args":["true"],"cwd":"/"}},"linux":{{"namespaces":[{{"type":"user"}}],{maps}}}}}"#
            ))
        };
        let remap = r#""uidMappings":[{"containerID":0,"hostID":100000,"size":65536}],"gidMappings":[{"containerID":0,"hostID":100000,"size":65536}]"#;
        let e = map_spec(&with(remap), Path::new("/b"), 512, 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("userns-remap") && e.contains("--userns=host"),
            "{e}"
        );
        let gid_only = r#""gidMappings":[{"containerID":0,"hostID":5,"size":1}]"#;
        assert!(map_spec(&with(gid_only), Path::new("/b"), 512, 1).is_err());
        let identity = r#""uidMappings":[{"containerID":0,"hostID":0,"size":4294967295}]"#;
        assert!(map_spec(&with(identity), Path::new("/b"), 512, 1).is_ok());
    }

    #[test]
    fn minimal_spec_gets_defaults_and_relative_root() {
        let s = spec(
            r#"{"ociVersion":"1.0.2","process":{"user":{"uid":0,"gid":0},"args":["true"],"cwd":"/"},"root":{"path":"rootfs"}}"#,
        );
        let b = map_spec(&s, Path::new("/run/b"), 512, 1).unwrap();
        assert_eq!(b.root, Path::new("/run/b/rootfs"));
        assert!(!b.root_readonly);
        assert_eq!((b.memory_mib, b.vcpus), (512, 1));
        assert_eq!(b.process.capabilities, None);
        assert_eq!(b.hostname, None);
    }

    #[test]
    fn hostile_or_odd_values_are_bounded() {
        assert_eq!(memory_mib(Some(-1), 512), 512);
        assert_eq!(memory_mib(Some(0), 512), 512);
        assert_eq!(memory_mib(Some(1), 512), MIN_MEMORY_MIB);
        assert_eq!(memory_mib(Some(i64::MAX), 512), u32::MAX);
        assert_eq!(vcpus(Some(i64::MAX), Some(1), 1), MAX_VCPUS);
        assert_eq!(vcpus(Some(-1), Some(100000), 1), 1);
        assert_eq!(vcpus(Some(50000), Some(0), 1), 1);
        assert_eq!(vcpus(Some(50000), Some(100000), 1), 1);
        let no_args = spec(
            r#"{"ociVersion":"1.0.2","process":{"user":{"uid":0,"gid":0},"args":[],"cwd":"/"}}"#,
        );
        assert!(map_spec(&no_args, Path::new("/b"), 512, 1).is_err());
        let no_process = spec(r#"{"ociVersion":"1.0.2"}"#);
        assert!(map_spec(&no_process, Path::new("/b"), 512, 1).is_err());
    }
}
