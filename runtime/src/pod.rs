//! Kubernetes pods as containerd's CRI plugin hands them to a runtime: the pod sandbox
//! (the pause container, which holds the pod's namespaces) and the pod's containers, told
//! apart by the plugin's annotations.
//!
//! What a VM cannot honour is refused here, before anything is created: the host's network,
//! PID or IPC namespace (`hostNetwork`, `hostPID`, `hostIPC`). A pod's containers are meant to
//! run in the pod sandbox's VM (one VM per pod); until that exists, a container of a pod is
//! refused unless the pod opts into a VM of its own for each container, without the pod's
//! network ([`INTERIM_ANNOTATION`]), because the sandbox's VM already carries the pod's
//! interfaces.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use oci_spec::runtime::{LinuxNamespaceType, Mount, Spec};

use crate::error::{Error, Result};
use crate::netns::NetnsMode;

/// The CRI plugin's annotation naming what a container is: `sandbox` or `container`.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// The CRI plugin's annotation naming the pod sandbox a container belongs to.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// A pod annotation (passed through by the runtime's `pod_annotations`) that lets the pod's
/// containers run before the pod has a VM of its own: each in a VM of its own, without the
/// pod's network (loopback only). For tests and development.
pub const INTERIM_ANNOTATION: &str = "io.agentvm.pod-containers";
/// The one value of [`INTERIM_ANNOTATION`].
pub const INTERIM_OWN_VM: &str = "vm-without-network";

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

/// Checks a CRI container against what agentvm can run and says how its network namespace
/// is used: `netns` as the spec gives it, or joined without wiring for a pod's container
/// under [`INTERIM_ANNOTATION`]. Specs not from the CRI plugin pass unchanged.
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
    match role {
        PodRole::Container { .. } => {
            match annotations.get(INTERIM_ANNOTATION).map(String::as_str) {
                Some(INTERIM_OWN_VM) => match netns {
                    NetnsMode::Join(path) => Ok(NetnsMode::JoinUnwired(path)),
                    other => Ok(other),
                },
                Some(other) => Err(Error::Invalid(format!(
                    "annotation {INTERIM_ANNOTATION}={other:?}: the only value is \
                 {INTERIM_OWN_VM:?}"
                ))),
                None => Err(Error::Invalid(format!(
                    "agentvm does not run a pod's containers in the pod's VM yet (one VM per pod \
                 is being built): the pod sandbox's VM carries the pod's network. For tests, \
                 annotate the pod {INTERIM_ANNOTATION}={INTERIM_OWN_VM} (passed through by the \
                 runtime's pod_annotations) to run each container in a VM of its own without \
                 the pod's network"
                ))),
            }
        }
        _ => Ok(netns),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_pods_container_needs_the_interim_annotation_and_gets_no_network() {
        let join = NetnsMode::Join("/proc/7/ns/net".into());
        let e = admit(&spec(ALL), &cri("container", &[]), join.clone())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(INTERIM_ANNOTATION) && e.contains("one VM per pod"),
            "{e}"
        );
        let ok = cri("container", &[(INTERIM_ANNOTATION, INTERIM_OWN_VM)]);
        assert_eq!(
            admit(&spec(ALL), &ok, join).unwrap(),
            NetnsMode::JoinUnwired("/proc/7/ns/net".into())
        );
        let bad = cri("container", &[(INTERIM_ANNOTATION, "shared")]);
        assert!(admit(&spec(ALL), &bad, NetnsMode::New).is_err());
    }
}
