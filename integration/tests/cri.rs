//! Kubernetes' Container Runtime Interface through containerd's CRI plugin: the calls kubelet
//! makes, over containerd's gRPC socket, against the RuntimeClass handler `runc` (the
//! reference) and `agentvm`, with the same assertions for both.
//!
//! Needs the CRI tests' own containerd (hack/cri-up.sh: its own socket, config, CNI network
//! 10.231.0.0/24, the locally built pause image and the busybox test image in `k8s.io`);
//! hack/test.sh starts it and sets `AGENTVM_CRI_SOCKET`. Without it the tests skip (fail
//! under `AGENTVM_REQUIRE_VM=1`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::security_profile::ProfileType;
use k8s_cri::v1::{
    AttachRequest, ContainerConfig, ContainerMetadata, ContainerState, ContainerStatsFilter,
    ContainerStatsRequest, ContainerStatus, ContainerStatusRequest, CreateContainerRequest,
    ExecRequest, ExecSyncRequest, ExecSyncResponse, ImageSpec, LinuxContainerConfig,
    LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    ListContainerStatsRequest, ListPodSandboxRequest, Mount, NamespaceMode, NamespaceOption,
    PodSandboxConfig, PodSandboxFilter, PodSandboxMetadata, PodSandboxState,
    PodSandboxStatsRequest, PodSandboxStatusRequest, PortForwardRequest, RemoveContainerRequest,
    RemovePodSandboxRequest, ReopenContainerLogRequest, RunPodSandboxRequest,
    StartContainerRequest, StopContainerRequest, StopPodSandboxRequest, VersionRequest,
};
use k8s_cri::v1::{Capability, DnsConfig, Int64Value, SecurityProfile};
use k8s_cri::v1::{LinuxContainerResources, UpdateContainerResourcesRequest};
use tonic::transport::{Channel, Endpoint, Uri};

use agentvm_integration::processes_mentioning;

#[path = "cri/streaming.rs"]
mod streaming;

/// The socket hack/cri-up.sh's containerd listens on, unless `AGENTVM_CRI_SOCKET` says.
const DEFAULT_SOCKET: &str = "/run/agentvm-cri-test/containerd.sock";
/// The busybox test image hack/cri-up.sh imports (hack/make-test-image.py).
const BUSYBOX: &str = "docker.io/agentvm-test/busybox:latest";
/// Deadline of one CRI call that may boot a VM (TCG, two cores shared with other tests).
const CALL_TIMEOUT: Duration = Duration::from_secs(180);
/// The cgroup the test pods' cgroups are made in (cgroupfs paths, as kubelet's
/// `cgroupDriver: cgroupfs` gives).
const CGROUP_PARENT: &str = "/agentvm-cri-test";
/// The pod network of hack/cri-up.sh.
const POD_SUBNET_PREFIX: &str = "10.231.0.";

/// The runtime handlers every scenario runs against: runc is the reference.
const RUNC: &str = "runc";
const AGENTVM: &str = "agentvm";

/// A connection to the CRI test containerd.
struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    _images: ImageServiceClient<Channel>,
}

fn skip_or_fail<T>(test: &str, reason: String) -> Option<T> {
    if std::env::var("AGENTVM_REQUIRE_VM").as_deref() == Ok("1") {
        panic!("{test}: {reason} (AGENTVM_REQUIRE_VM=1 forbids skipping)");
    }
    eprintln!("SKIP {test}: {reason}");
    None
}

impl Cri {
    /// The connection for a CRI test, or `None` (after printing why) when the CRI test
    /// containerd is not running.
    fn get(test: &str) -> Option<Cri> {
        let socket = std::env::var("AGENTVM_CRI_SOCKET").unwrap_or_else(|_| DEFAULT_SOCKET.into());
        if !Path::new(&socket).exists() {
            return skip_or_fail(
                test,
                format!("no CRI test containerd at {socket} (run hack/cri-up.sh as root)"),
            );
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let connected = rt.block_on(async {
            let path = PathBuf::from(&socket);
            // The URI is required by tonic and ignored by the connector.
            let channel = Endpoint::from_static("http://[::]:50051")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await?;
            let mut runtime = RuntimeServiceClient::new(channel.clone());
            let v = runtime
                .version(VersionRequest {
                    version: "v1".into(),
                })
                .await?
                .into_inner();
            Ok::<_, Box<dyn std::error::Error>>((runtime, ImageServiceClient::new(channel), v))
        });
        match connected {
            Ok((runtime, images, v)) => {
                eprintln!(
                    "{test}: {} {} (CRI {})",
                    v.runtime_name, v.runtime_version, v.runtime_api_version
                );
                Some(Cri {
                    rt,
                    runtime,
                    _images: images,
                })
            }
            Err(e) => skip_or_fail(
                test,
                format!("the CRI test containerd at {socket} does not answer: {e}"),
            ),
        }
    }

    fn block<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.rt
            .block_on(async { tokio::time::timeout(CALL_TIMEOUT, f).await })
            .unwrap_or_else(|_| panic!("a CRI call took longer than {CALL_TIMEOUT:?}"))
    }

    fn client(&self) -> RuntimeServiceClient<Channel> {
        self.runtime.clone()
    }
}

/// A gRPC error as text: its code and message.
fn status_text(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// A pod of one test, removed (with its containers) when dropped, also after a failed
/// assertion.
struct Pod<'a> {
    cri: &'a Cri,
    id: String,
    config: PodSandboxConfig,
    logs: tempfile::TempDir,
    containers: Vec<String>,
}

fn pod_config(test: &str, handler: &str, logs: &Path, ns: NamespaceOption) -> PodSandboxConfig {
    let name = format!("{test}-{handler}");
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.clone(),
            uid: format!("{name}-{}", std::process::id()),
            namespace: "agentvm-it".into(),
            attempt: 0,
        }),
        // kubelet names no hostname for a pod on the host's network (runc refuses one).
        hostname: if ns.network == NamespaceMode::Node as i32 {
            String::new()
        } else {
            "cri-pod".into()
        },
        log_directory: logs.display().to_string(),
        linux: Some(LinuxPodSandboxConfig {
            // kubelet always names the pod's cgroup (PodSandboxStats reads it).
            cgroup_parent: CGROUP_PARENT.into(),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(ns),
                ..Default::default()
            }),
            ..Default::default()
        }),
        labels: HashMap::from([(
            "agentvm-test".into(),
            format!("{test}-{handler}-{}", std::process::id()),
        )]),
        ..Default::default()
    }
}

/// A busybox container running `sh -c script`, logging to `<name>.log` in the pod's log
/// directory.
fn container_config(name: &str, script: &str) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: BUSYBOX.into(),
            ..Default::default()
        }),
        command: vec!["sh".into(), "-c".into(), script.into()],
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

impl<'a> Pod<'a> {
    /// RunPodSandbox with `handler` and the namespace options `ns`.
    fn run(
        cri: &'a Cri,
        test: &str,
        handler: &str,
        ns: NamespaceOption,
    ) -> Result<Pod<'a>, String> {
        Self::run_annotated(cri, test, handler, ns, &[])
    }

    /// [`Pod::run`] with pod annotations.
    fn run_annotated(
        cri: &'a Cri,
        test: &str,
        handler: &str,
        ns: NamespaceOption,
        annotations: &[(&str, &str)],
    ) -> Result<Pod<'a>, String> {
        Self::run_with(cri, test, handler, ns, |config| {
            config.annotations = annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        })
    }

    /// [`Pod::run`] with the pod's config changed by `adjust` (DNS, sysctls, resources...).
    fn run_with(
        cri: &'a Cri,
        test: &str,
        handler: &str,
        ns: NamespaceOption,
        adjust: impl FnOnce(&mut PodSandboxConfig),
    ) -> Result<Pod<'a>, String> {
        let logs = tempfile::Builder::new()
            .prefix("agentvm-cri-logs.")
            .tempdir()
            .expect("log dir");
        let mut config = pod_config(test, handler, logs.path(), ns);
        adjust(&mut config);
        let id = cri
            .block(cri.client().run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.into(),
            }))
            .map_err(status_text)?
            .into_inner()
            .pod_sandbox_id;
        Ok(Pod {
            cri,
            id,
            config,
            logs,
            containers: Vec::new(),
        })
    }

    /// CreateContainer + StartContainer of a busybox container running `sh -c script`,
    /// logging to `<name>.log` in the pod's log directory.
    fn start(&mut self, name: &str, script: &str) -> String {
        self.start_with(name, script, None)
    }

    /// [`Pod::start`] with the container's Linux settings.
    fn start_with(
        &mut self,
        name: &str,
        script: &str,
        linux: Option<LinuxContainerConfig>,
    ) -> String {
        self.start_config(ContainerConfig {
            linux,
            ..container_config(name, script)
        })
    }

    /// CreateContainer + StartContainer of `config`.
    fn start_config(&mut self, config: ContainerConfig) -> String {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let c = self.cri;
        let id = c
            .block(c.client().create_container(CreateContainerRequest {
                pod_sandbox_id: self.id.clone(),
                config: Some(config),
                sandbox_config: Some(self.config.clone()),
            }))
            .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}"))
            .into_inner()
            .container_id;
        self.containers.push(id.clone());
        c.block(c.client().start_container(StartContainerRequest {
            container_id: id.clone(),
        }))
        .unwrap_or_else(|e| panic!("StartContainer {name}: {e}"));
        id
    }

    /// The streaming URL of an `Exec` of `cmd` in container `id`.
    fn exec_url(&self, id: &str, cmd: &[&str], stdin: bool, tty: bool) -> String {
        let c = self.cri;
        c.block(c.client().exec(ExecRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            tty,
            stdin,
            stdout: true,
            // kubelet asks for no stderr with a terminal: it is the terminal's output.
            stderr: !tty,
        }))
        .unwrap_or_else(|e| panic!("Exec: {e}"))
        .into_inner()
        .url
    }

    /// The streaming URL of an `Attach` to container `id`'s stdout and stderr (and stdin).
    fn attach_url(&self, id: &str, stdin: bool) -> String {
        let c = self.cri;
        c.block(c.client().attach(AttachRequest {
            container_id: id.into(),
            stdin,
            tty: false,
            stdout: true,
            stderr: true,
        }))
        .unwrap_or_else(|e| panic!("Attach: {e}"))
        .into_inner()
        .url
    }

    /// The streaming URL of a `PortForward` to the pod's `port`.
    fn port_forward_url(&self, port: u16) -> String {
        let c = self.cri;
        c.block(c.client().port_forward(PortForwardRequest {
            pod_sandbox_id: self.id.clone(),
            port: vec![port.into()],
        }))
        .unwrap_or_else(|e| panic!("PortForward: {e}"))
        .into_inner()
        .url
    }

    fn status(&self, id: &str) -> ContainerStatus {
        let c = self.cri;
        c.block(c.client().container_status(ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        }))
        .unwrap_or_else(|e| panic!("ContainerStatus: {e}"))
        .into_inner()
        .status
        .expect("a status")
    }

    /// Polls ContainerStatus until the container is in `state`.
    fn wait_state(&self, id: &str, state: ContainerState) -> ContainerStatus {
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let s = self.status(id);
            if s.state == state as i32 {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "container {id} not {state:?} after {CALL_TIMEOUT:?}: {s:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn exec_sync(&self, id: &str, cmd: &[&str], timeout: i64) -> Result<ExecSyncResponse, String> {
        let c = self.cri;
        c.block(c.client().exec_sync(ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout,
        }))
        .map(|r| r.into_inner())
        .map_err(status_text)
    }

    fn stop_container(&self, id: &str, timeout: i64) {
        let c = self.cri;
        c.block(c.client().stop_container(StopContainerRequest {
            container_id: id.into(),
            timeout,
        }))
        .unwrap_or_else(|e| panic!("StopContainer: {e}"));
    }

    fn remove_container(&mut self, id: &str) {
        let c = self.cri;
        c.block(c.client().remove_container(RemoveContainerRequest {
            container_id: id.into(),
        }))
        .unwrap_or_else(|e| panic!("RemoveContainer: {e}"));
        self.containers.retain(|c| c != id);
    }

    /// The pod's network namespace (the runtime spec in PodSandboxStatus' verbose info).
    fn netns_path(&self) -> Option<String> {
        let c = self.cri;
        let info = c
            .block(c.client().pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: self.id.clone(),
                verbose: true,
            }))
            .ok()?
            .into_inner()
            .info;
        let v: serde_json::Value = serde_json::from_str(info.get("info")?).ok()?;
        v["runtimeSpec"]["linux"]["namespaces"]
            .as_array()?
            .iter()
            .find(|n| n["type"] == "network")?["path"]
            .as_str()
            .map(Into::into)
    }

    /// StopPodSandbox + RemovePodSandbox.
    fn remove(mut self) -> Result<(), String> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), String> {
        let c = self.cri;
        for id in std::mem::take(&mut self.containers) {
            let _ = c.block(
                c.client()
                    .remove_container(RemoveContainerRequest { container_id: id }),
            );
        }
        if self.id.is_empty() {
            return Ok(());
        }
        let id = std::mem::take(&mut self.id);
        c.block(c.client().stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: id.clone(),
        }))
        .map_err(status_text)?;
        c.block(
            c.client()
                .remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id }),
        )
        .map_err(status_text)?;
        Ok(())
    }
}

impl Drop for Pod<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("cleaning up pod: {e}");
        }
    }
}

/// Asserts that nothing of the ids survives: no process naming them (shims, QEMU, helpers,
/// the namespace holder), no mount, no agentvm state dir, and that the pod's network
/// namespace (holding the VM's taps) is gone.
fn assert_nothing_left(ids: &[String], netns: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut left = Vec::new();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for id in ids {
            left.extend(processes_mentioning(id));
            left.extend(
                mounts
                    .lines()
                    .filter(|l| l.contains(id.as_str()))
                    .map(|l| format!("mount {l}")),
            );
            let state = Path::new("/run/agentvm").join(id);
            if state.exists() {
                left.push(format!("state dir {}", state.display()));
            }
        }
        if let Some(ns) = netns {
            if Path::new(ns).exists() {
                left.push(format!("network namespace {ns}"));
            }
        }
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "left behind after the pod was removed: {left:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The CRI log format: `<RFC 3339 time> <stream> <P|F> <text>` per line; returns
/// (stream, text) of the full lines, checking each line's shape.
fn parse_cri_log(raw: &str) -> Vec<(String, String)> {
    raw.lines()
        .map(|line| {
            let mut parts = line.splitn(4, ' ');
            let (time, stream, tag, text) = (
                parts.next().unwrap_or(""),
                parts.next().unwrap_or(""),
                parts.next().unwrap_or(""),
                parts.next().unwrap_or(""),
            );
            assert!(
                time.len() >= 20 && time.as_bytes()[4] == b'-' && time.contains('T'),
                "not an RFC 3339 time in {line:?}"
            );
            assert!(
                stream == "stdout" || stream == "stderr",
                "bad stream in {line:?}"
            );
            assert_eq!(tag, "F", "a partial line in {line:?}");
            (stream.to_string(), text.to_string())
        })
        .collect()
}

/// Reads a container's log until it holds `lines` lines (the shim's copy may lag the exit).
fn read_log(path: &Path, lines: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let raw = std::fs::read_to_string(path).unwrap_or_default();
        if raw.lines().count() >= lines || Instant::now() > deadline {
            return raw;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `$runc` and `$agentvm`: the test `$body` against the handler `runc` (the reference) and
/// against `agentvm`, with the same assertions.
macro_rules! against_both {
    ($body:ident, $runc:ident, $agentvm:ident) => {
        #[test]
        fn $runc() {
            if let Some(cri) = Cri::get(stringify!($runc)) {
                $body(&cri, RUNC);
            }
        }

        #[test]
        fn $agentvm() {
            if let Some(cri) = Cri::get(stringify!($agentvm)) {
                $body(&cri, AGENTVM);
            }
        }
    };
}

/// The pod lifecycle kubelet drives, with the same assertions for every handler.
fn pod_lifecycle(cri: &Cri, handler: &str) {
    let test = "lifecycle";
    let mut pod = Pod::run(cri, test, handler, NamespaceOption::default())
        .unwrap_or_else(|e| panic!("RunPodSandbox with handler {handler}: {e}"));
    let sandbox_id = pod.id.clone();
    let netns = pod.netns_path();
    assert!(netns.is_some(), "the pod has its own network namespace");

    // PodSandboxStatus: ready, with an address of the pod network.
    let status = cri
        .block(cri.client().pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.id.clone(),
            verbose: false,
        }))
        .expect("PodSandboxStatus")
        .into_inner()
        .status
        .expect("a sandbox status");
    assert_eq!(status.state, PodSandboxState::SandboxReady as i32);
    assert_eq!(status.runtime_handler, handler);
    let ip = status.network.map(|n| n.ip).unwrap_or_default();
    assert!(
        ip.starts_with(POD_SUBNET_PREFIX),
        "pod IP {ip:?} not in the pod network"
    );

    // A container that exits by itself: exit code, reason, timestamps, log.
    let exiter = pod.start(
        "exiter",
        "echo out-line; echo err-line >&2; echo second-out; exit 3",
    );
    let s = pod.wait_state(&exiter, ContainerState::ContainerExited);
    assert_eq!(s.exit_code, 3);
    assert_eq!(s.reason, "Error");
    assert!(s.created_at > 0 && s.started_at >= s.created_at, "{s:?}");
    // containerd stamps the start once the runtime has answered, so a quick exit may carry
    // an earlier time (seen under runc): it is not before the create.
    assert!(s.finished_at >= s.created_at, "{s:?}");
    assert_eq!(
        Path::new(&s.log_path),
        pod.logs.path().join("exiter.log"),
        "the log path is the one kubelet gave"
    );
    let log = parse_cri_log(&read_log(&pod.logs.path().join("exiter.log"), 3));
    let out: Vec<_> = log
        .iter()
        .filter(|(s, _)| s == "stdout")
        .map(|(_, t)| t.as_str())
        .collect();
    let err: Vec<_> = log
        .iter()
        .filter(|(s, _)| s == "stderr")
        .map(|(_, t)| t.as_str())
        .collect();
    assert_eq!(out, ["out-line", "second-out"]);
    assert_eq!(err, ["err-line"]);

    // A long-running container: running, ExecSync, stop.
    let worker = pod.start(
        "worker",
        "echo started; trap 'echo stopping; exit 0' TERM; while true; do sleep 0.2; done",
    );
    let s = pod.wait_state(&worker, ContainerState::ContainerRunning);
    assert!(s.started_at > 0 && s.finished_at == 0, "{s:?}");
    if handler == AGENTVM {
        assert_one_vm(&sandbox_id, &[&worker]);
    }
    let r = pod
        .exec_sync(
            &worker,
            &["sh", "-c", "echo exec-out; echo exec-err >&2; exit 5"],
            60,
        )
        .expect("ExecSync");
    assert_eq!(
        (r.stdout.as_slice(), r.stderr.as_slice(), r.exit_code),
        (&b"exec-out\n"[..], &b"exec-err\n"[..], 5)
    );
    let r = pod.exec_sync(&worker, &["hostname"], 60).expect("ExecSync");
    assert_eq!(String::from_utf8_lossy(&r.stdout), "cri-pod\n");
    // A command that outlives its timeout ends the call with an error, in time.
    let t = Instant::now();
    let r = pod.exec_sync(&worker, &["sleep", "30"], 2);
    let took = t.elapsed();
    assert!(r.is_err(), "ExecSync past its timeout answered {r:?}");
    assert!(
        took < Duration::from_secs(20),
        "ExecSync with a 2 s timeout took {took:?}"
    );
    // The container keeps running after the timed-out exec.
    let r = pod.exec_sync(&worker, &["true"], 60).expect("ExecSync");
    assert_eq!(r.exit_code, 0);

    pod.stop_container(&worker, 30);
    let s = pod.wait_state(&worker, ContainerState::ContainerExited);
    assert_eq!((s.exit_code, s.reason.as_str()), (0, "Completed"), "{s:?}");
    assert!(s.finished_at >= s.started_at, "{s:?}");
    let log = parse_cri_log(&read_log(&pod.logs.path().join("worker.log"), 2));
    assert_eq!(
        log,
        [
            ("stdout".to_string(), "started".to_string()),
            ("stdout".to_string(), "stopping".to_string())
        ]
    );

    let ids = [sandbox_id.clone(), exiter.clone(), worker.clone()];
    pod.remove_container(&exiter);
    pod.remove_container(&worker);
    pod.remove().expect("StopPodSandbox + RemovePodSandbox");
    assert_nothing_left(&ids, netns.as_deref());
}

against_both!(pod_lifecycle, pod_lifecycle_runc, pod_lifecycle_agentvm);

/// The QEMU processes of agentvm sandbox `id`, as "pid: command line".
fn qemu_of(id: &str) -> Vec<String> {
    processes_mentioning(&format!("/run/agentvm/{id}"))
        .into_iter()
        .filter(|p| p.contains("qemu"))
        .collect()
}

/// One VM for the pod: one QEMU, the sandbox's, and no VM or state dir of the containers'.
fn assert_one_vm(sandbox_id: &str, containers: &[&str]) {
    let qemu = qemu_of;
    assert_eq!(qemu(sandbox_id).len(), 1, "one QEMU for the pod");
    for id in containers {
        assert!(qemu(id).is_empty(), "no QEMU of container {id}");
        assert!(
            !Path::new("/run/agentvm").join(id).exists(),
            "no state dir of container {id}: it runs in the pod's VM"
        );
    }
}

/// Two containers of one pod: A serves HTTP on localhost:8080, B reaches it over the pod's
/// loopback; both see the pod's IP on their eth0; each has its own process tree (the pod does
/// not share its PID namespace); the pod is one VM under agentvm; removing it leaves nothing.
fn two_container_pod(cri: &Cri, handler: &str) {
    // kubelet's default: each container its own PID namespace (not `shareProcessNamespace`).
    let ns = NamespaceOption {
        pid: NamespaceMode::Container as i32,
        ..Default::default()
    };
    let mut pod = Pod::run(cri, "twocontainers", handler, ns)
        .unwrap_or_else(|e| panic!("RunPodSandbox with handler {handler}: {e}"));
    let sandbox_id = pod.id.clone();
    let netns = pod.netns_path();
    let ip = cri
        .block(cri.client().pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.id.clone(),
            verbose: false,
        }))
        .expect("PodSandboxStatus")
        .into_inner()
        .status
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .unwrap_or_default();
    assert!(ip.starts_with(POD_SUBNET_PREFIX), "pod IP {ip:?}");

    // kubelet passes the pod's namespace options with each container too.
    let own_pid = || {
        Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: Some(NamespaceOption {
                    pid: NamespaceMode::Container as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
    };
    let server = pod.start_with(
        "server",
        "mkdir -p /www && echo hello-from-a > /www/index.html && \
         exec httpd -f -p 127.0.0.1:8080 -h /www",
        own_pid(),
    );
    let client = pod.start_with("client", "exec sleep 1234", own_pid());
    pod.wait_state(&server, ContainerState::ContainerRunning);
    pod.wait_state(&client, ContainerState::ContainerRunning);
    if handler == AGENTVM {
        assert_one_vm(&sandbox_id, &[&server, &client]);
    }

    // B reaches A on localhost (the server may take a moment to listen).
    let deadline = Instant::now() + CALL_TIMEOUT;
    let body = loop {
        let r = pod
            .exec_sync(&client, &["wget", "-qO-", "http://127.0.0.1:8080/"], 60)
            .expect("ExecSync wget");
        if r.exit_code == 0 {
            break String::from_utf8_lossy(&r.stdout).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "B never reached A on localhost:8080: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(body, "hello-from-a\n");

    // Both see the pod's IP on their eth0.
    for id in [&server, &client] {
        let r = pod
            .exec_sync(id, &["ip", "-o", "-4", "addr", "show", "dev", "eth0"], 60)
            .expect("ExecSync ip");
        let out = String::from_utf8_lossy(&r.stdout);
        assert!(out.contains(&format!(" {ip}/")), "{id}: {out:?}");
    }
    // Each its own process tree: A does not see B's sleep, B sees it as its pid 1.
    let ps = |id: &str| {
        let r = pod
            .exec_sync(id, &["ps", "-o", "pid,args"], 60)
            .expect("ps");
        String::from_utf8_lossy(&r.stdout).into_owned()
    };
    let a = ps(&server);
    assert!(!a.contains("sleep 1234"), "A sees B's processes: {a}");
    assert!(a.contains("httpd"), "{a}");
    let b = ps(&client);
    assert!(
        b.lines()
            .any(|l| l.trim_start().starts_with("1 ") && l.contains("sleep 1234")),
        "{b}"
    );

    // B's end leaves A (and the pod) running.
    pod.stop_container(&client, 2);
    let s = pod.wait_state(&client, ContainerState::ContainerExited);
    assert_eq!(s.exit_code, 137, "{s:?}");
    pod.remove_container(&client);
    let r = pod
        .exec_sync(&server, &["true"], 60)
        .expect("ExecSync after B");
    assert_eq!(r.exit_code, 0);

    let ids = [sandbox_id, server, client];
    pod.remove().expect("StopPodSandbox + RemovePodSandbox");
    assert_nothing_left(&ids, netns.as_deref());
}

against_both!(
    two_container_pod,
    two_container_pod_runc,
    two_container_pod_agentvm
);

/// The namespace options of a pod that shares one of the host's namespaces.
fn host_namespace_options() -> [(&'static str, NamespaceOption); 3] {
    let node = NamespaceMode::Node as i32;
    [
        (
            "hostNetwork",
            NamespaceOption {
                network: node,
                ..Default::default()
            },
        ),
        (
            "hostPID",
            NamespaceOption {
                pid: node,
                ..Default::default()
            },
        ),
        (
            "hostIPC",
            NamespaceOption {
                ipc: node,
                ..Default::default()
            },
        ),
    ]
}

/// The pods of this test process labelled for `test` and `handler`.
fn listed_pods(cri: &Cri, test: &str, handler: &str) -> Vec<String> {
    let label = format!("{test}-{handler}-{}", std::process::id());
    cri.block(cri.client().list_pod_sandbox(ListPodSandboxRequest {
        filter: Some(PodSandboxFilter {
            label_selector: HashMap::from([("agentvm-test".into(), label)]),
            ..Default::default()
        }),
    }))
    .expect("ListPodSandbox")
    .into_inner()
    .items
    .into_iter()
    .map(|p| p.id)
    .collect()
}

/// runc, the reference, runs pods that share the host's network, PID or IPC namespace.
#[test]
fn host_namespaces_runc() {
    let Some(cri) = Cri::get("host_namespaces_runc") else {
        return;
    };
    for (setting, ns) in host_namespace_options() {
        let test = format!("host-ns-{}", setting.to_lowercase());
        let pod = Pod::run(&cri, &test, RUNC, ns)
            .unwrap_or_else(|e| panic!("runc refused a pod with {setting}: {e}"));
        let id = pod.id.clone();
        pod.remove().expect("remove the pod");
        assert_nothing_left(&[id], None);
    }
}

/// A VM cannot share the host's namespaces: agentvm refuses such pods at RunPodSandbox, with
/// an error naming the setting, and leaves nothing behind.
#[test]
fn host_namespaces_are_refused_by_agentvm() {
    let Some(cri) = Cri::get("host_namespaces_are_refused_by_agentvm") else {
        return;
    };
    for (setting, ns) in host_namespace_options() {
        let test = format!("host-ns-{}", setting.to_lowercase());
        let err = match Pod::run(&cri, &test, AGENTVM, ns) {
            Ok(pod) => {
                let _ = pod.remove();
                panic!("agentvm ran a pod with {setting}: true");
            }
            Err(e) => e,
        };
        assert!(
            err.contains(&format!("{setting}: true")) && err.contains("own VM"),
            "the error does not say why: {err}"
        );
        assert_eq!(
            listed_pods(&cri, &test, AGENTVM),
            Vec::<String>::new(),
            "a refused pod is still listed"
        );
    }
    let left: Vec<String> = processes_mentioning("containerd-shim-agentvm-v1")
        .into_iter()
        .filter(|p| p.contains("host-ns-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// How long a stream may stay silent before a streaming test gives up.
const STREAM_TIMEOUT: Duration = Duration::from_secs(60);

/// `kubectl exec` and `kubectl attach` through the CRI streaming server: an exec reading
/// stdin and writing stdout and stderr, with its exit code; an exec in a terminal (the size
/// sent on the resize channel, its exit code); attach to a running container's stdout, and to
/// the stdin of one created with `stdin: true`.
fn exec_attach(cri: &Cri, handler: &str) {
    let mut pod = Pod::run(cri, "streaming", handler, NamespaceOption::default())
        .unwrap_or_else(|e| panic!("RunPodSandbox with handler {handler}: {e}"));
    let talker = pod.start(
        "talker",
        "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.3; done",
    );
    let echoer = pod.start_config(ContainerConfig {
        stdin: true,
        ..container_config(
            "echoer",
            "while read -r line; do echo echo:$line; echo err:$line >&2; done",
        )
    });
    pod.wait_state(&talker, ContainerState::ContainerRunning);
    pod.wait_state(&echoer, ContainerState::ContainerRunning);

    // Exec with stdin, stdout, stderr and an exit code.
    let url = pod.exec_url(
        &talker,
        &[
            "sh",
            "-c",
            "read -r line; echo got:$line; echo to-err >&2; exit 3",
        ],
        true,
        false,
    );
    let mut s = streaming::Stream::open(&url, STREAM_TIMEOUT).expect("open exec stream");
    s.send(streaming::STDIN, b"hello\n");
    let out = s.collect();
    assert_eq!(
        (out.stdout(), out.stderr(), out.exit_code()),
        ("got:hello\n".into(), "to-err\n".into(), Some(3)),
        "{out:?}"
    );

    // Exec without stdin: a success.
    let url = pod.exec_url(&talker, &["sh", "-c", "echo plain; hostname"], false, false);
    let out = streaming::Stream::open(&url, STREAM_TIMEOUT)
        .expect("open exec stream")
        .collect();
    assert_eq!(
        (out.stdout(), out.exit_code()),
        ("plain\ncri-pod\n".into(), Some(0)),
        "{out:?}"
    );

    // Exec in a terminal: stdin is a tty of the size sent, output comes as the terminal's.
    let url = pod.exec_url(
        &talker,
        &[
            "sh",
            "-c",
            "read -r x; test -t 0 && echo is-a-tty; stty size; exit 7",
        ],
        true,
        true,
    );
    let mut s = streaming::Stream::open(&url, STREAM_TIMEOUT).expect("open tty exec stream");
    s.resize(91, 33);
    // The size goes its own way (ResizePty): let it land before the command reads it.
    std::thread::sleep(Duration::from_secs(1));
    s.send(streaming::STDIN, b"go\r");
    let out = s.collect();
    let text = out.stdout();
    assert!(
        text.contains("is-a-tty\r\n") && text.contains("33 91\r\n"),
        "{out:?}"
    );
    assert_eq!(out.exit_code(), Some(7), "{out:?}");

    // Attach to a running container's stdout: its ticks keep coming.
    let url = pod.attach_url(&talker, false);
    let mut s = streaming::Stream::open(&url, STREAM_TIMEOUT).expect("open attach stream");
    let seen = s.stdout_until("\n");
    let first: u32 = seen
        .lines()
        .find_map(|l| l.trim().strip_prefix("tick-")?.parse().ok())
        .unwrap_or_else(|| panic!("no tick in {seen:?}"));
    let later = format!("tick-{}\n", first + 2);
    s.stdout_until(&later);
    s.close();
    // Attach ends without ending the container.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        pod.status(&talker).state,
        ContainerState::ContainerRunning as i32
    );

    // Attach with stdin to a container created with `stdin: true`.
    let url = pod.attach_url(&echoer, true);
    let mut s = streaming::Stream::open(&url, STREAM_TIMEOUT).expect("open attach stream");
    s.send(streaming::STDIN, b"ping\n");
    s.stdout_until("echo:ping\n");
    s.close();
    let log = parse_cri_log(&read_log(&pod.logs.path().join("echoer.log"), 2));
    assert!(
        log.contains(&("stdout".into(), "echo:ping".into()))
            && log.contains(&("stderr".into(), "err:ping".into())),
        "{log:?}"
    );

    let ids = [pod.id.clone(), talker, echoer];
    pod.remove().expect("remove the pod");
    assert_nothing_left(&ids, None);
}

against_both!(exec_attach, exec_attach_runc, exec_attach_agentvm);

/// `kubectl port-forward` through the CRI's PortForward: the streaming server connects to
/// `localhost:PORT` in the pod's network namespace, which reaches a server listening on the
/// pod's loopback only and one on every address; a port where nothing listens ends the forward
/// with an error on the port's error channel.
fn port_forward(cri: &Cri, handler: &str) {
    let mut pod = Pod::run(cri, "portforward", handler, NamespaceOption::default())
        .unwrap_or_else(|e| panic!("RunPodSandbox with handler {handler}: {e}"));
    let web = pod.start(
        "web",
        "mkdir -p /www && echo hello-over-forward > /www/index.html && \
         httpd -p 127.0.0.1:8080 -h /www && exec httpd -f -p 8081 -h /www",
    );
    pod.wait_state(&web, ContainerState::ContainerRunning);
    let deadline = Instant::now() + CALL_TIMEOUT;
    while pod
        .exec_sync(&web, &["wget", "-qO-", "http://127.0.0.1:8081/"], 60)
        .map(|r| r.exit_code)
        != Ok(0)
    {
        assert!(Instant::now() < deadline, "the web server never answered");
        std::thread::sleep(Duration::from_millis(300));
    }

    for port in [8080u16, 8081] {
        let url = pod.port_forward_url(port);
        let (data, errors) =
            streaming::forward_once(&url, port, b"GET / HTTP/1.0\r\nHost: pod\r\n\r\n")
                .unwrap_or_else(|e| panic!("port-forward to {port}: {e}"));
        let text = String::from_utf8_lossy(&data);
        assert!(
            text.starts_with("HTTP/1.") && text.ends_with("hello-over-forward\n"),
            "port {port}: {text:?} (errors {errors:?})"
        );
        assert_eq!(errors, "", "port {port}");
    }
    // Nothing listens on 8082: the forward ends with an error.
    let url = pod.port_forward_url(8082);
    let (data, errors) = streaming::forward_once(&url, 8082, b"GET / HTTP/1.0\r\n\r\n")
        .unwrap_or_else(|e| panic!("port-forward to 8082: {e}"));
    assert!(
        data.is_empty() && !errors.is_empty(),
        "data {:?}, errors {errors:?}",
        String::from_utf8_lossy(&data)
    );

    let netns = pod.netns_path();
    let ids = [pod.id.clone(), web];
    pod.remove().expect("remove the pod");
    assert_nothing_left(&ids, netns.as_deref());
}

against_both!(port_forward, port_forward_runc, port_forward_agentvm);

/// kubelet's volumes are bind mounts of host directories in the container spec: an emptyDir
/// given to two containers of a pod (both see each other's files, and so does the host), a
/// read-only one (a configMap's: readable, not writable, also not by root), a read-only file
/// (a `subPath`) whose host rewrite the container sees.
fn volumes(cri: &Cri, handler: &str) {
    let host = tempfile::Builder::new()
        .prefix("agentvm-cri-volumes.")
        .tempdir()
        .expect("volume dirs");
    let (shared, config) = (host.path().join("shared"), host.path().join("config"));
    std::fs::create_dir(&shared).unwrap();
    std::fs::create_dir(&config).unwrap();
    std::fs::write(config.join("key"), "value-from-host\n").unwrap();
    // A read-only file bind (a configMap's `subPath`), which the host later rewrites in place.
    let setting = host.path().join("setting.conf");
    std::fs::write(&setting, "first\n").unwrap();
    // A host mount below a read-only volume (critest's non-recursive read-only mount), made
    // before the pod as kubelet sets volumes up: the volume is read-only, the tmpfs below it
    // is not, and the host can take it away while the container runs.
    let below = config.join("tmpfs");
    std::fs::create_dir(&below).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &below,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .expect("mount a tmpfs below the read-only volume");
    let _tmpfs = Unmount(below.clone());
    let mut pod = Pod::run(cri, "volumes", handler, NamespaceOption::default())
        .unwrap_or_else(|e| panic!("RunPodSandbox with handler {handler}: {e}"));
    let mount = |path: &Path, at: &str, readonly: bool| Mount {
        container_path: at.into(),
        host_path: path.display().to_string(),
        readonly,
        ..Default::default()
    };
    let writer = pod.start_config(ContainerConfig {
        mounts: vec![
            mount(&shared, "/shared", false),
            mount(&config, "/config", true),
            mount(&setting, "/etc/setting.conf", true),
        ],
        ..container_config(
            "writer",
            "echo from-writer > /shared/note && exec sleep 600",
        )
    });
    let reader = pod.start_config(ContainerConfig {
        mounts: vec![mount(&shared, "/data", false)],
        ..container_config("reader", "exec sleep 600")
    });
    pod.wait_state(&writer, ContainerState::ContainerRunning);
    pod.wait_state(&reader, ContainerState::ContainerRunning);
    let sh = |id: &str, script: &str| {
        let r = pod
            .exec_sync(id, &["sh", "-c", script], 60)
            .expect("ExecSync");
        (r.exit_code, String::from_utf8_lossy(&r.stdout).into_owned())
    };

    // The writer's file, seen by the reader and the host.
    let deadline = Instant::now() + CALL_TIMEOUT;
    while sh(&reader, "cat /data/note").1 != "from-writer\n" {
        assert!(Instant::now() < deadline, "the reader never saw the note");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(
        std::fs::read_to_string(shared.join("note")).unwrap(),
        "from-writer\n"
    );
    // The reader's answer, seen by the writer and the host.
    assert_eq!(sh(&reader, "echo from-reader > /data/answer").0, 0);
    assert_eq!(
        sh(&writer, "cat /shared/answer"),
        (0, "from-reader\n".into())
    );
    assert_eq!(
        std::fs::read_to_string(shared.join("answer")).unwrap(),
        "from-reader\n"
    );
    // A file the host adds appears in the pod.
    std::fs::write(shared.join("from-host"), "host-line\n").unwrap();
    assert_eq!(
        sh(&reader, "cat /data/from-host"),
        (0, "host-line\n".into())
    );

    // The read-only volume: readable, refuses writes (the container runs as root).
    assert_eq!(
        sh(&writer, "cat /config/key"),
        (0, "value-from-host\n".into())
    );
    assert_eq!(
        sh(
            &writer,
            "if touch /config/probe 2>/dev/null; then echo writable; else echo read-only; fi"
        ),
        (0, "read-only\n".into())
    );
    assert!(!config.join("probe").exists());
    // The read-only file: readable, refuses writes, follows the host's rewrite.
    assert_eq!(sh(&writer, "cat /etc/setting.conf"), (0, "first\n".into()));
    assert_eq!(
        sh(
            &writer,
            "if echo x > /etc/setting.conf 2>/dev/null; then echo writable; else echo read-only; fi"
        ),
        (0, "read-only\n".into())
    );
    std::fs::write(&setting, "second\n").unwrap();
    let deadline = Instant::now() + CALL_TIMEOUT;
    while sh(&writer, "cat /etc/setting.conf").1 != "second\n" {
        assert!(
            Instant::now() < deadline,
            "the host's rewrite of a read-only file bind never reached the container"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(
        sh(&writer, "touch /config/tmpfs/written 2>&1 && echo written"),
        (0, "written\n".into()),
        "the host's tmpfs below a read-only volume is writable"
    );
    assert!(below.join("written").exists());
    nix::mount::umount(&below).expect("unmount the host's tmpfs");
    std::fs::remove_dir(&below).expect(
        "the host removes a directory below a volume while the container runs \
         (EBUSY: a copy of its mount is pinned in the host's namespace)",
    );

    // A container removed from a running pod leaves no mount in its shim, whose mounts
    // live in a namespace of their own under agentvm (the host's under runc).
    pod.stop_container(&reader, 10);
    pod.remove_container(&reader);
    let (shim, _) = pod_shim_tree(&pod.id);
    let shim_mounts = std::fs::read_to_string(format!("/proc/{shim}/mountinfo")).unwrap();
    assert!(
        !shim_mounts.lines().any(|l| l.contains(reader.as_str())),
        "the removed container's mounts are left in its shim: {shim_mounts}"
    );
    assert!(
        shim_mounts.lines().any(|l| l.contains(writer.as_str())),
        "the running container's root is not among its shim's mounts"
    );
    let own_namespace = std::fs::read_link(format!("/proc/{shim}/ns/mnt")).unwrap()
        != std::fs::read_link("/proc/self/ns/mnt").unwrap();
    assert_eq!(
        own_namespace,
        handler == AGENTVM,
        "the shim's mount namespace"
    );

    let netns = pod.netns_path();
    let ids = [pod.id.clone(), writer, reader];
    pod.remove().expect("remove the pod");
    assert_nothing_left(&ids, netns.as_deref());
    // The volumes' content stays on the host; no mount is left on them.
    assert_eq!(
        std::fs::read_to_string(shared.join("note")).unwrap(),
        "from-writer\n"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let path = host.path().display().to_string();
    assert!(
        !mounts.lines().any(|l| l.contains(&path)),
        "a volume is still mounted"
    );
}

against_both!(volumes, volumes_runc, volumes_agentvm);

/// Mounts the host makes after RunPodSandbox (as critest makes them): below a volume with
/// HostToContainer propagation (a shared host mount, which containerd requires for it) they
/// reach the running container, below a Private one they do not; a tmpfs mounted below a
/// read-only volume before the container is created is there and writable, a volume whose
/// source exists only inside a host mount made after RunPodSandbox is there, and the host can
/// take its mounts away while the container runs. Under agentvm the pod's shim lives in a
/// mount namespace of its own made at RunPodSandbox, which a host with a private `/` (this
/// one) propagates nothing into.
fn mount_propagation(cri: &Cri, handler: &str) {
    use k8s_cri::v1::MountPropagation;
    use nix::mount::{mount as sys_mount, MsFlags};
    let host = tempfile::Builder::new()
        .prefix("agentvm-cri-propagation.")
        .tempdir()
        .expect("volume dirs");
    let mut pod = Pod::run(cri, "propagation", handler, NamespaceOption::default())
        .unwrap_or_else(|e| panic!("RunPodSandbox with handler {handler}: {e}"));
    let none = None::<&str>;
    let tmpfs = |at: &Path| {
        std::fs::create_dir_all(at).unwrap();
        sys_mount(
            Some("tmpfs"),
            at,
            Some("tmpfs"),
            MsFlags::empty(),
            Some("size=1m"),
        )
        .unwrap_or_else(|e| panic!("mount a tmpfs on {}: {e}", at.display()));
        Unmount(at.to_path_buf())
    };
    let (shared, private, ro) = (
        host.path().join("shared"),
        host.path().join("private"),
        host.path().join("ro"),
    );
    std::fs::create_dir(&shared).unwrap();
    std::fs::create_dir(&private).unwrap();
    sys_mount(Some(&shared), &shared, none, MsFlags::MS_BIND, none).unwrap();
    let shared_mount = Unmount(shared.clone());
    sys_mount(none, &shared, none, MsFlags::MS_SHARED, none).unwrap();
    let below_ro = tmpfs(&ro.join("tmpfs"));
    // A volume whose source exists only inside a host mount made after RunPodSandbox.
    let late_src = tmpfs(&host.path().join("late-src"));
    let inside = host.path().join("late-src/dir");
    std::fs::create_dir(&inside).unwrap();
    std::fs::write(inside.join("inside"), "inside\n").unwrap();
    let mount = |path: &Path, at: &str, readonly: bool, propagation: MountPropagation| Mount {
        container_path: at.into(),
        host_path: path.display().to_string(),
        readonly,
        propagation: propagation as i32,
        ..Default::default()
    };
    let id = pod.start_config(ContainerConfig {
        mounts: vec![
            mount(
                &shared,
                "/shared",
                false,
                MountPropagation::PropagationHostToContainer,
            ),
            mount(
                &private,
                "/private",
                false,
                MountPropagation::PropagationPrivate,
            ),
            mount(&ro, "/ro", true, MountPropagation::PropagationPrivate),
            mount(
                &inside,
                "/late",
                false,
                MountPropagation::PropagationPrivate,
            ),
        ],
        ..container_config("prop", "exec sleep 600")
    });
    pod.wait_state(&id, ContainerState::ContainerRunning);
    let sh = |script: &str| {
        let r = pod
            .exec_sync(&id, &["sh", "-c", script], 60)
            .expect("ExecSync");
        String::from_utf8_lossy(&r.stdout).into_owned()
    };
    assert_eq!(
        sh("touch /ro/tmpfs/w 2>&1 && echo written; touch /ro/top 2>/dev/null || echo refused"),
        "written\nrefused\n",
        "the tmpfs mounted after RunPodSandbox below the read-only volume"
    );
    assert!(ro.join("tmpfs/w").exists());
    assert_eq!(
        sh("cat /late/inside"),
        "inside\n",
        "a source inside a later host mount"
    );

    // Mounts made while the container runs.
    let late_shared = tmpfs(&shared.join("late"));
    let late_private = tmpfs(&private.join("late"));
    std::fs::write(shared.join("late/marker"), "late\n").unwrap();
    std::fs::write(private.join("late/marker"), "late\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while sh("cat /shared/late/marker 2>&1") != "late\n" {
        assert!(
            Instant::now() < deadline,
            "the host's later mount never reached the HostToContainer volume: {}",
            sh("ls -la /shared /shared/late 2>&1")
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(
        sh("ls /private/late"),
        "",
        "the host's later mount reached the Private volume"
    );

    // The host takes its mounts away while the container runs.
    drop(below_ro);
    std::fs::remove_dir(ro.join("tmpfs")).expect(
        "the host removes a directory below a volume while the container runs \
         (EBUSY: a copy of its mount is pinned in the host's namespace)",
    );
    drop(late_shared);
    drop(late_private);
    std::fs::remove_dir(shared.join("late")).expect("remove a mount point of a later mount");

    let netns = pod.netns_path();
    let ids = [pod.id.clone(), id];
    pod.remove().expect("remove the pod");
    assert_nothing_left(&ids, netns.as_deref());
    drop(shared_mount);
    drop(late_src);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let path = host.path().display().to_string();
    assert!(
        !mounts.lines().any(|l| l.contains(&path)),
        "a volume is still mounted"
    );
}

against_both!(
    mount_propagation,
    mount_propagation_runc,
    mount_propagation_agentvm
);

/// `ctr` against the CRI test containerd, in the CRI plugin's namespace.
fn ctr_k8s(args: &[&str]) -> (bool, String) {
    let socket = std::env::var("AGENTVM_CRI_SOCKET").unwrap_or_else(|_| DEFAULT_SOCKET.into());
    let out = std::process::Command::new("ctr")
        .args(["--address", &socket, "-n", "k8s.io"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run ctr");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The status `ctr task ls` gives task `id`.
fn task_status(id: &str) -> String {
    let (ok, ls) = ctr_k8s(&["task", "ls"]);
    assert!(ok, "ctr task ls: {ls}");
    ls.lines()
        .find_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.first() == Some(&id)).then(|| w.get(2).unwrap_or(&"").to_string())
        })
        .unwrap_or_default()
}

/// A task pause of one container of a pod (`ctr task pause`: containerd's API has it, the
/// CRI does not) freezes that container only: its ticks stop while the pod's other container
/// answers ExecSync and the pod stays ready, and go on after the resume; a paused container
/// is stopped (the signals reach it) and the other keeps running. Under agentvm the container's
/// cgroup is frozen in the guest; the VM runs on.
fn pause_one_container(cri: &Cri, handler: &str) {
    let mut pod = Pod::run(cri, "pauseone", handler, NamespaceOption::default())
        .unwrap_or_else(|e| panic!("RunPodSandbox with handler {handler}: {e}"));
    let ticker = pod.start(
        "ticker",
        "i=0; while true; do i=$((i+1)); echo $i > /dev/shm/tick; sleep 0.1; done",
    );
    let watcher = pod.start("watcher", "exec sleep 600");
    pod.wait_state(&ticker, ContainerState::ContainerRunning);
    pod.wait_state(&watcher, ContainerState::ContainerRunning);
    let tick = || -> u64 {
        let r = pod
            .exec_sync(&watcher, &["cat", "/dev/shm/tick"], 30)
            .expect("ExecSync in the running container");
        String::from_utf8_lossy(&r.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    };
    let goes_on = |after: u64| {
        let deadline = Instant::now() + CALL_TIMEOUT;
        while tick() <= after {
            assert!(
                Instant::now() < deadline,
                "the ticker never ticked past {after}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    goes_on(0);

    let (ok, out) = ctr_k8s(&["task", "pause", &ticker]);
    assert!(ok, "ctr task pause: {out}");
    assert_eq!(task_status(&ticker), "PAUSED");
    assert_eq!(task_status(&watcher), "RUNNING");
    assert_eq!(task_status(&pod.id), "RUNNING", "the pod's sandbox");
    let frozen_at = tick();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(tick(), frozen_at, "the paused container ticked on");
    // No exec in a paused container (a frozen process never gets to exec): refused, and the
    // pod answers on.
    let refused = pod.exec_sync(&ticker, &["true"], 10);
    assert!(
        refused.is_err(),
        "an exec in the paused container: {refused:?}"
    );
    assert_eq!(tick(), frozen_at);
    assert_eq!(
        sandbox_state(cri, &pod.id).0,
        PodSandboxState::SandboxReady as i32
    );

    let (ok, out) = ctr_k8s(&["task", "resume", &ticker]);
    assert!(ok, "ctr task resume: {out}");
    assert_eq!(task_status(&ticker), "RUNNING");
    goes_on(frozen_at);

    let (ok, out) = ctr_k8s(&["task", "pause", &ticker]);
    assert!(ok, "ctr task pause: {out}");
    pod.stop_container(&ticker, 2);
    let st = pod.wait_state(&ticker, ContainerState::ContainerExited);
    // Which signal ends it is the freezer's: cgroup v1's (this host's, runc) holds SIGTERM
    // until SIGKILL thaws the container (137); cgroup v2's (the guest's; runc on a v2 host)
    // lets a fatal SIGTERM through to a frozen process (143).
    assert!(
        [137, 143].contains(&st.exit_code),
        "a paused container's stop: {st:?}"
    );
    pod.wait_state(&watcher, ContainerState::ContainerRunning);

    let netns = pod.netns_path();
    let ids = [pod.id.clone(), ticker, watcher];
    pod.remove().expect("remove the pod");
    assert_nothing_left(&ids, netns.as_deref());
}

against_both!(
    pause_one_container,
    pause_one_container_runc,
    pause_one_container_agentvm
);

/// Unmounts a test's mount when the test ends, however it ends (nothing mounted is fine).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// What kubelet does with a pod's container over its life: after the first attempt crashes
/// (exit 2) and the second is killed by a signal (137), a new container of the same name with
/// attempt 2 in the same (running) pod: the same pod IP and task, and under agentvm the same
/// single QEMU (nothing is booted for a restart); log rotation
/// (the log renamed, ReopenContainerLog, new lines in a new file at the path); the stats
/// kubelet's summary API reads (ContainerStats, ListContainerStats, PodSandboxStats) with
/// non-zero CPU and memory.
fn restart_logs_stats(cri: &Cri, handler: &str) {
    let mut pod = Pod::run(cri, "restart", handler, NamespaceOption::default())
        .unwrap_or_else(|e| panic!("RunPodSandbox with handler {handler}: {e}"));
    let sandbox_before = sandbox_state(cri, &pod.id);
    let vm_before = qemu_of(&pod.id);
    if handler == AGENTVM {
        assert_eq!(vm_before.len(), 1, "one QEMU for the pod: {vm_before:?}");
    }
    // Two crashes: a non-zero exit, then death by a signal (the pod shares its PID namespace,
    // kubelet's default here, so the shell is not the namespace's pid 1 and SIGKILL ends it).
    let first = pod.start("worker", "echo attempt-0; exit 2");
    let s = pod.wait_state(&first, ContainerState::ContainerExited);
    assert_eq!((s.exit_code, s.reason.as_str()), (2, "Error"), "{s:?}");
    let attempt = |n: u32, script: &str| ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "worker".into(),
            attempt: n,
        }),
        log_path: format!("worker-{n}.log"),
        ..container_config("worker", script)
    };
    let killed = pod.start_config(attempt(1, "echo attempt-1; kill -KILL $$; echo survived"));
    let s = pod.wait_state(&killed, ContainerState::ContainerExited);
    assert_eq!(
        (s.exit_code, s.reason.as_str()),
        (137, "Error"),
        "killed by SIGKILL: {s:?}"
    );

    // The restart: attempt 2, its own log, in the same pod (the same VM).
    let log = pod.logs.path().join("worker-2.log");
    let second = pod.start_config(attempt(
        2,
        "echo attempt-2; i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done; \
         while true; do if [ -e /tmp/mark ]; then cat /tmp/mark; rm /tmp/mark; fi; \
         sleep 0.2; done",
    ));
    let s = pod.wait_state(&second, ContainerState::ContainerRunning);
    assert_eq!(s.metadata.as_ref().map(|m| m.attempt), Some(2), "{s:?}");
    assert_eq!(
        pod.status(&first).exit_code,
        2,
        "the first attempt's status stays"
    );
    // The same pod: ready, its IP and task, and under agentvm the same single QEMU.
    assert_eq!(
        sandbox_state(cri, &pod.id),
        sandbox_before,
        "the pod (state, IP, task pid) after two crashes"
    );
    assert_eq!(
        qemu_of(&pod.id),
        vm_before,
        "the pod's VM after two crashes"
    );
    let r = pod
        .exec_sync(
            &second,
            &["ip", "-o", "-4", "addr", "show", "dev", "eth0"],
            60,
        )
        .expect("ExecSync ip");
    let eth0 = String::from_utf8_lossy(&r.stdout);
    assert!(
        eth0.contains(&format!(" {}/", sandbox_before.1)),
        "the restarted container has the pod IP: {eth0:?}"
    );
    let lines = |path: &Path, n: usize| -> Vec<String> {
        parse_cri_log(&read_log(path, n))
            .into_iter()
            .map(|(_, t)| t)
            .collect()
    };
    assert_eq!(
        lines(&pod.logs.path().join("worker-1.log"), 1),
        ["attempt-1"]
    );
    assert_eq!(lines(&log, 1), ["attempt-2"]);
    assert_eq!(lines(&pod.logs.path().join("worker.log"), 1), ["attempt-0"]);

    // Rotation: kubelet renames the log and asks for it to be reopened.
    let rotated = pod.logs.path().join("worker-2.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    cri.block(
        cri.client()
            .reopen_container_log(ReopenContainerLogRequest {
                container_id: second.clone(),
            }),
    )
    .expect("ReopenContainerLog");
    let r = pod
        .exec_sync(&second, &["sh", "-c", "echo after-reopen > /tmp/mark"], 60)
        .expect("ExecSync");
    assert_eq!(r.exit_code, 0);
    assert_eq!(lines(&log, 1), ["after-reopen"]);
    assert_eq!(lines(&rotated, 1), ["attempt-2"]);

    // Stats of the container and of the pod.
    let stats = cri
        .block(cri.client().container_stats(ContainerStatsRequest {
            container_id: second.clone(),
        }))
        .expect("ContainerStats")
        .into_inner()
        .stats
        .expect("container stats");
    let cpu = |c: &Option<k8s_cri::v1::CpuUsage>| {
        c.as_ref()
            .and_then(|c| c.usage_core_nano_seconds.as_ref())
            .map_or(0, |v| v.value)
    };
    let mem = |m: &Option<k8s_cri::v1::MemoryUsage>| {
        m.as_ref()
            .and_then(|m| m.working_set_bytes.as_ref())
            .map_or(0, |v| v.value)
    };
    assert!(cpu(&stats.cpu) > 0 && mem(&stats.memory) > 0, "{stats:?}");
    // A sleeping shell's own figures (its cgroup's), not the whole VM's (kernel, agent,
    // page cache: tens of MiB).
    assert!(
        mem(&stats.memory) < 16 << 20,
        "the container's working set is its own: {stats:?}"
    );
    let listed = cri
        .block(
            cri.client()
                .list_container_stats(ListContainerStatsRequest {
                    filter: Some(ContainerStatsFilter {
                        pod_sandbox_id: pod.id.clone(),
                        ..Default::default()
                    }),
                }),
        )
        .expect("ListContainerStats")
        .into_inner()
        .stats;
    let of_second = listed
        .iter()
        .find(|s| s.attributes.as_ref().is_some_and(|a| a.id == second))
        .unwrap_or_else(|| panic!("the running container is not listed: {listed:?}"));
    assert!(
        cpu(&of_second.cpu) > 0 && mem(&of_second.memory) > 0,
        "{of_second:?}"
    );
    let pod_stats = cri
        .block(cri.client().pod_sandbox_stats(PodSandboxStatsRequest {
            pod_sandbox_id: pod.id.clone(),
        }))
        .expect("PodSandboxStats")
        .into_inner()
        .stats
        .and_then(|s| s.linux)
        .expect("linux pod stats");
    assert!(
        cpu(&pod_stats.cpu) > 0 && mem(&pod_stats.memory) > 0,
        "{pod_stats:?}"
    );

    let netns = pod.netns_path();
    let ids = [pod.id.clone(), first, killed, second];
    pod.remove().expect("remove the pod");
    assert_nothing_left(&ids, netns.as_deref());
}

against_both!(
    restart_logs_stats,
    restart_logs_stats_runc,
    restart_logs_stats_agentvm
);

/// The memory limit and CPU quota of the calling process's own cgroup, as
/// "<memory> <quota>": cgroup v2's files (under the process's cgroup, as the VM's guest has
/// them) or v1's (runc's containers on a cgroup v1 host).
const CGROUP_LIMITS: &str = r#"cg=$(sed -n 's/^0:://p' /proc/self/cgroup)
if [ -f "/sys/fs/cgroup$cg/memory.max" ]; then d=/sys/fs/cgroup$cg
elif [ -f /sys/fs/cgroup/memory.max ]; then d=/sys/fs/cgroup; fi
if [ -n "$d" ]; then echo "$(cat $d/memory.max) $(cut -d' ' -f1 $d/cpu.max)"
else echo "$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes) $(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us)"; fi"#;

/// UpdateContainerResources (`kubectl` in-place resize, VPA): the container's memory limit
/// and CPU quota change in its own cgroup, and only in its own (a second container of the pod
/// keeps none).
fn update_resources(cri: &Cri, handler: &str) {
    let mut pod = Pod::run(cri, "update", handler, NamespaceOption::default())
        .unwrap_or_else(|e| panic!("RunPodSandbox with handler {handler}: {e}"));
    let limited = pod.start("limited", "exec sleep 600");
    let other = pod.start("other", "exec sleep 600");
    pod.wait_state(&limited, ContainerState::ContainerRunning);
    pod.wait_state(&other, ContainerState::ContainerRunning);
    let limits = |id: &str| {
        let r = pod
            .exec_sync(id, &["sh", "-c", CGROUP_LIMITS], 60)
            .expect("ExecSync");
        assert_eq!(r.exit_code, 0, "{}", String::from_utf8_lossy(&r.stderr));
        String::from_utf8_lossy(&r.stdout).trim().to_string()
    };
    let before = limits(&other);
    cri.block(
        cri.client()
            .update_container_resources(UpdateContainerResourcesRequest {
                container_id: limited.clone(),
                linux: Some(LinuxContainerResources {
                    memory_limit_in_bytes: 100 << 20,
                    cpu_period: 100_000,
                    cpu_quota: 50_000,
                    cpu_shares: 512,
                    ..Default::default()
                }),
                ..Default::default()
            }),
    )
    .expect("UpdateContainerResources");
    assert_eq!(limits(&limited), format!("{} 50000", 100 << 20));
    assert_eq!(
        limits(&other),
        before,
        "the other container's limits changed"
    );

    let netns = pod.netns_path();
    let ids = [pod.id.clone(), limited, other];
    pod.remove().expect("remove the pod");
    assert_nothing_left(&ids, netns.as_deref());
}

against_both!(
    update_resources,
    update_resources_runc,
    update_resources_agentvm
);

/// A container with `readonly_rootfs`: writes to its root fail as read-only, its /dev/shm and
/// the kernel filesystems under it still work; its log says so.
fn readonly_root(cri: &Cri, handler: &str) {
    let mut pod = Pod::run(cri, "readonly", handler, NamespaceOption::default())
        .unwrap_or_else(|e| panic!("RunPodSandbox with handler {handler}: {e}"));
    let script =
        "if touch /probe 2>/dev/null; then echo root-writable; else echo root-read-only; fi; \
                  touch /dev/shm/probe && echo shm-writable; \
                  test -r /proc/self/status && echo proc-mounted";
    let id = pod.start_with(
        "ro",
        script,
        Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                readonly_rootfs: true,
                ..Default::default()
            }),
            ..Default::default()
        }),
    );
    let s = pod.wait_state(&id, ContainerState::ContainerExited);
    assert_eq!((s.exit_code, s.reason.as_str()), (0, "Completed"), "{s:?}");
    let log = parse_cri_log(&read_log(&pod.logs.path().join("ro.log"), 3));
    let out: Vec<&str> = log.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(out, ["root-read-only", "shm-writable", "proc-mounted"]);
    let ids = [pod.id.clone(), id];
    pod.remove().expect("remove the pod");
    assert_nothing_left(&ids, None);
}

against_both!(readonly_root, readonly_root_runc, readonly_root_agentvm);

/// The output lines of an exited container's log (`lines` of them expected).
fn exited_output(pod: &Pod, id: &str, name: &str, lines: usize) -> (ContainerStatus, Vec<String>) {
    let s = pod.wait_state(id, ContainerState::ContainerExited);
    let log = parse_cri_log(&read_log(
        &pod.logs.path().join(format!("{name}.log")),
        lines,
    ));
    (s, log.into_iter().map(|(_, t)| t).collect())
}

/// The pod's and its containers' security context and the pod's settings as kubelet passes
/// them: runAsUser/runAsGroup/supplementalGroups, capabilities dropped and added,
/// noNewPrivileges, seccomp profile names, the pod's namespaced sysctls, its DNS config in
/// /etc/resolv.conf, /etc/hosts, and the termination message file (a file bind kubelet reads
/// back from the host).
fn security_context(cri: &Cri, handler: &str) {
    let mut pod = Pod::run_with(cri, "security", handler, NamespaceOption::default(), |c| {
        c.dns_config = Some(DnsConfig {
            servers: vec!["10.231.0.53".into(), "10.231.0.54".into()],
            searches: vec!["ns1.svc.example".into(), "example".into()],
            options: vec!["ndots:2".into(), "timeout:1".into()],
        });
        let linux = c.linux.get_or_insert_with(Default::default);
        linux.sysctls = HashMap::from([
            ("net.ipv4.ip_unprivileged_port_start".into(), "80".into()),
            ("kernel.shm_rmid_forced".into(), "1".into()),
        ]);
    })
    .unwrap_or_else(|e| panic!("RunPodSandbox with handler {handler}: {e}"));
    let profile = |t: ProfileType| {
        Some(SecurityProfile {
            profile_type: t as i32,
            ..Default::default()
        })
    };
    let secured = |name: &str, script: &str, sc: LinuxContainerSecurityContext| ContainerConfig {
        linux: Some(LinuxContainerConfig {
            security_context: Some(sc),
            ..Default::default()
        }),
        ..container_config(name, script)
    };

    // A user, its groups, no new privileges: `id` as runc shows it, no capabilities left.
    let user = pod.start_config(secured(
        "user",
        "id; grep -E '^(CapEff|NoNewPrivs)' /proc/self/status",
        LinuxContainerSecurityContext {
            run_as_user: Some(Int64Value { value: 1000 }),
            run_as_group: Some(Int64Value { value: 3000 }),
            supplemental_groups: vec![4000, 5000],
            no_new_privs: true,
            seccomp: profile(ProfileType::RuntimeDefault),
            ..Default::default()
        },
    ));
    let (s, out) = exited_output(&pod, &user, "user", 3);
    assert_eq!(
        (s.exit_code, s.reason.as_str()),
        (0, "Completed"),
        "{s:?} {out:?}"
    );
    assert_eq!(
        out,
        [
            "uid=1000(user) gid=3000 groups=3000,4000,5000",
            "CapEff:\t0000000000000000",
            "NoNewPrivs:\t1",
        ],
        "user"
    );

    // Root with capabilities dropped and added (containerd's default set, minus CHOWN and
    // KILL, plus NET_ADMIN and SYS_TIME); not privileged; seccomp Unconfined accepted.
    let caps = pod.start_config(secured(
        "caps",
        "grep -E '^Cap(Prm|Eff|Bnd)' /proc/self/status; \
         touch /tmp/f; if chown 1 /tmp/f 2>/dev/null; then echo chown; else echo no-chown; fi; \
         if mount -t tmpfs t /mnt 2>/dev/null; then echo mounted; else echo no-mount; fi",
        LinuxContainerSecurityContext {
            capabilities: Some(Capability {
                add_capabilities: vec!["NET_ADMIN".into(), "SYS_TIME".into()],
                drop_capabilities: vec!["CHOWN".into(), "KILL".into()],
                ..Default::default()
            }),
            seccomp: profile(ProfileType::Unconfined),
            ..Default::default()
        },
    ));
    let (s, out) = exited_output(&pod, &caps, "caps", 5);
    assert_eq!(
        (s.exit_code, s.reason.as_str()),
        (0, "Completed"),
        "{s:?} {out:?}"
    );
    // containerd's default: CHOWN DAC_OVERRIDE FSETID FOWNER MKNOD NET_RAW SETGID SETUID
    // SETFCAP SETPCAP NET_BIND_SERVICE SYS_CHROOT KILL AUDIT_WRITE = 0xa80425fb; minus CHOWN (0)
    // and KILL (5), plus NET_ADMIN (12) and SYS_TIME (25).
    let set = format!(
        "{:016x}",
        (0xa804_25fbu64 & !(1 | 1 << 5)) | 1 << 12 | 1 << 25
    );
    let mut wrong = Vec::new();
    let caps_want = [
        format!("CapPrm:\t{set}"),
        format!("CapEff:\t{set}"),
        format!("CapBnd:\t{set}"),
        "no-chown".into(),
        "no-mount".into(),
    ];
    if out != caps_want {
        wrong.push(format!("caps: {out:?}, want {caps_want:?}"));
    }

    // The pod's sysctls, DNS config, /etc/hosts, and the termination message.
    let host = tempfile::Builder::new()
        .prefix("agentvm-cri-termination.")
        .tempdir()
        .expect("termination dir");
    let message = host.path().join("termination-log");
    std::fs::write(&message, "").unwrap();
    let pod_settings = pod.start_config(ContainerConfig {
        mounts: vec![Mount {
            container_path: "/dev/termination-log".into(),
            host_path: message.display().to_string(),
            ..Default::default()
        }],
        ..container_config(
            "settings",
            "cat /proc/sys/net/ipv4/ip_unprivileged_port_start /proc/sys/kernel/shm_rmid_forced; \
             echo resolv; cat /etc/resolv.conf; \
             md5sum /etc/hosts | cut -d' ' -f1; \
             echo 'the end' > /dev/termination-log",
        )
    });
    let (s, out) = exited_output(&pod, &pod_settings, "settings", 8);
    assert_eq!(
        (s.exit_code, s.reason.as_str()),
        (0, "Completed"),
        "{s:?} {out:?}"
    );
    let hosts = std::process::Command::new("md5sum")
        .arg("/etc/hosts")
        .output()
        .expect("md5sum");
    let hosts = String::from_utf8_lossy(&hosts.stdout);
    let settings_want = [
        "80",
        "1",
        "resolv",
        "search ns1.svc.example example",
        "nameserver 10.231.0.53",
        "nameserver 10.231.0.54",
        "options ndots:2 timeout:1",
        hosts.split(' ').next().unwrap_or_default(),
    ];
    if out != settings_want {
        wrong.push(format!(
            "sysctls, resolv.conf, the host's /etc/hosts: {out:?}, want {settings_want:?}"
        ));
    }
    let written = std::fs::read_to_string(&message).unwrap();
    if written != "the end\n" {
        wrong.push(format!(
            "the termination message in the host's file: {written:?}"
        ));
    }
    assert!(wrong.is_empty(), "{wrong:#?}");

    let netns = pod.netns_path();
    let ids = [pod.id.clone(), user, caps, pod_settings];
    pod.remove().expect("remove the pod");
    assert_nothing_left(&ids, netns.as_deref());
}

against_both!(
    security_context,
    security_context_runc,
    security_context_agentvm
);

/// kubelet's default `maskedPaths` (pkg/securitycontext: the CRI passes them, containerd adds
/// none of its own).
const KUBELET_MASKED_PATHS: [&str; 11] = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
/// kubelet's default `readonlyPaths`.
const KUBELET_READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The spec's confinement beyond capabilities, as runc applies it: a container with the
/// RuntimeDefault seccomp profile runs under a filter (its init and its execs) that refuses
/// syscalls the profile leaves out (`syslog`, which the guest's `dmesg_restrict=0` would
/// otherwise allow root, and `unshare`); kubelet's masked paths read nothing and its
/// read-only paths refuse writes. An Unconfined container gets no filter (its root makes a
/// user namespace), and keeps the masked and read-only paths (they do not depend on the
/// profile).
fn seccomp_and_masked_paths(cri: &Cri, handler: &str) {
    let mut pod = Pod::run(cri, "seccomp", handler, NamespaceOption::default())
        .unwrap_or_else(|e| panic!("RunPodSandbox with handler {handler}: {e}"));
    let with_profile = |name: &str, script: &str, t: ProfileType| ContainerConfig {
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                seccomp: Some(SecurityProfile {
                    profile_type: t as i32,
                    ..Default::default()
                }),
                masked_paths: KUBELET_MASKED_PATHS.map(String::from).to_vec(),
                readonly_paths: KUBELET_READONLY_PATHS.map(String::from).to_vec(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..container_config(name, script)
    };
    let confined = pod.start_config(with_profile(
        "confined",
        "exec sleep 600",
        ProfileType::RuntimeDefault,
    ));
    let unconfined = pod.start_config(with_profile(
        "unconfined",
        "exec sleep 601",
        ProfileType::Unconfined,
    ));
    pod.wait_state(&confined, ContainerState::ContainerRunning);
    pod.wait_state(&unconfined, ContainerState::ContainerRunning);
    let sh = |id: &str, script: &str| {
        let r = pod
            .exec_sync(id, &["sh", "-c", script], 60)
            .expect("ExecSync");
        let out = String::from_utf8_lossy(&r.stdout).into_owned();
        let err = String::from_utf8_lossy(&r.stderr).into_owned();
        (r.exit_code, out, err)
    };
    // The filter mode of the container's init (sleep; the pod's processes are shared) and
    // of the exec itself.
    let modes = "for p in /proc/[0-9]*; do \
                   [ \"$(tr '\\0' ' ' < $p/cmdline 2>/dev/null)\" = \"sleep $SLEEP \" ] && grep '^Seccomp:' $p/status; \
                 done; grep '^Seccomp:' /proc/self/status";
    // The masked and read-only paths (/proc/kcore is not in the guest kernel:
    // /proc/timer_list is the masked file both kernels have). The write puts the pod's
    // hostname back: harmless if it ever got through.
    let paths = "cat /proc/timer_list | wc -c | tr -d ' '; \
                 cat /proc/kcore 2>/dev/null | wc -c | tr -d ' '; \
                 ls /sys/firmware | wc -l | tr -d ' '; \
                 awk '$2 == \"/proc/sys\" {split($4, o, \",\"); print o[1]}' /proc/self/mounts | sort -u; \
                 { cat /proc/sys/kernel/hostname > /proc/sys/kernel/hostname; } 2>&1 | sed 's/.*: //'";
    let refused = "dmesg 2>&1 >/dev/null | sed 's/.*: //'; \
                   unshare -U true 2>&1 | sed 's/.*: //'";
    let mut wrong = Vec::new();
    let (code, out, err) = sh(
        &confined,
        &format!("SLEEP=600; {modes}; {paths}; {refused}"),
    );
    let want = "Seccomp:\t2\nSeccomp:\t2\n0\n0\n0\nro\nRead-only file system\n\
                Operation not permitted\nOperation not permitted\n";
    if (code, out.as_str()) != (0, want) {
        wrong.push(format!(
            "RuntimeDefault: exit {code}, {out:?} (stderr {err:?}), want {want:?}"
        ));
    }
    // Unconfined, root makes a user namespace (as under runc: a process chrooted into its
    // root could not; the kernel refuses user namespaces to chrooted processes).
    let userns = "unshare -U true 2>&1 && echo userns";
    let (code, out, err) = sh(
        &unconfined,
        &format!("SLEEP=601; {modes}; {paths}; {userns}"),
    );
    let want = "Seccomp:\t0\nSeccomp:\t0\n0\n0\n0\nro\nRead-only file system\nuserns\n";
    if (code, out.as_str()) != (0, want) {
        wrong.push(format!(
            "Unconfined: exit {code}, {out:?} (stderr {err:?}), want {want:?}"
        ));
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    let netns = pod.netns_path();
    let ids = [pod.id.clone(), confined, unconfined];
    pod.remove().expect("remove the pod");
    assert_nothing_left(&ids, netns.as_deref());
}

against_both!(
    seccomp_and_masked_paths,
    seccomp_and_masked_paths_runc,
    seccomp_and_masked_paths_agentvm
);

/// A container of a running pod that allocates past its memory limit: killed by the OOM
/// killer (137) and reported `OOMKilled`; the pod and its other container keep running.
fn oom_killed(cri: &Cri, handler: &str) {
    let mut pod = Pod::run(cri, "oom", handler, NamespaceOption::default())
        .unwrap_or_else(|e| panic!("RunPodSandbox with handler {handler}: {e}"));
    let other = pod.start("other", "exec sleep 600");
    let hog = pod.start_with(
        "hog",
        // dd fills a 96 MiB buffer from /dev/zero: every page is touched.
        "exec dd if=/dev/zero of=/dev/null bs=96M count=1",
        Some(LinuxContainerConfig {
            resources: Some(LinuxContainerResources {
                memory_limit_in_bytes: 32 << 20,
                ..Default::default()
            }),
            ..Default::default()
        }),
    );
    let s = pod.wait_state(&hog, ContainerState::ContainerExited);
    assert_eq!(
        (s.exit_code, s.reason.as_str()),
        (137, "OOMKilled"),
        "{s:?}"
    );
    let s = pod.status(&other);
    assert_eq!(s.state, ContainerState::ContainerRunning as i32, "{s:?}");
    let netns = pod.netns_path();
    let ids = [pod.id.clone(), other, hog];
    pod.remove().expect("remove the pod");
    assert_nothing_left(&ids, netns.as_deref());
}

against_both!(oom_killed, oom_killed_runc, oom_killed_agentvm);

/// A pod whose containers' limits kubelet sums into `LinuxPodSandboxConfig.resources` (768 MiB,
/// 2 CPUs): its containers see at least that much memory and that many CPUs (under agentvm the
/// pod's VM is sized from them, docs/decisions.md "The pod VM's size").
fn pod_sized(cri: &Cri, handler: &str) {
    let mut pod = Pod::run_with(cri, "sized", handler, NamespaceOption::default(), |c| {
        let linux = c.linux.get_or_insert_with(Default::default);
        linux.resources = Some(LinuxContainerResources {
            memory_limit_in_bytes: 768 << 20,
            cpu_period: 100_000,
            cpu_quota: 200_000,
            cpu_shares: 2048,
            ..Default::default()
        });
    })
    .unwrap_or_else(|e| panic!("RunPodSandbox with handler {handler}: {e}"));
    let id = pod.start_with(
        "big",
        "echo $(sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo) $(nproc)",
        Some(LinuxContainerConfig {
            resources: Some(LinuxContainerResources {
                memory_limit_in_bytes: 768 << 20,
                cpu_period: 100_000,
                cpu_quota: 200_000,
                cpu_shares: 2048,
                ..Default::default()
            }),
            ..Default::default()
        }),
    );
    let (s, out) = exited_output(&pod, &id, "big", 1);
    assert_eq!(
        (s.exit_code, s.reason.as_str()),
        (0, "Completed"),
        "{s:?} {out:?}"
    );
    let figures: Vec<u64> = out
        .first()
        .map(|l| l.split(' ').filter_map(|w| w.parse().ok()).collect())
        .unwrap_or_default();
    let [mem_kib, cpus] = figures[..] else {
        panic!("no MemTotal and nproc in {out:?}");
    };
    eprintln!("{handler}: MemTotal {mem_kib} kB, {cpus} CPUs");
    assert!(mem_kib >= 768 << 10, "MemTotal {mem_kib} kB < 768 MiB");
    assert!(cpus >= 2, "{cpus} CPUs");
    let netns = pod.netns_path();
    let ids = [pod.id.clone(), id];
    pod.remove().expect("remove the pod");
    assert_nothing_left(&ids, netns.as_deref());
}

against_both!(pod_sized, pod_sized_runc, pod_sized_agentvm);

/// `shareProcessNamespace: true` (pid `POD`): a container sees the other's processes and the
/// pod's pid 1 is the pause process, nothing of the VM's (agent, kernel threads); and the
/// pod's `/dev/shm` (its IPC) is one for its containers: a file one writes the other reads.
fn shared_pid_and_shm(cri: &Cri, handler: &str) {
    let ns = NamespaceOption {
        pid: NamespaceMode::Pod as i32,
        ..Default::default()
    };
    let mut pod = Pod::run(cri, "sharedpid", handler, ns)
        .unwrap_or_else(|e| panic!("RunPodSandbox with handler {handler}: {e}"));
    let a = pod.start("a", "echo from-a > /dev/shm/note && exec sleep 600");
    let b = pod.start("b", "exec sleep 601");
    pod.wait_state(&a, ContainerState::ContainerRunning);
    pod.wait_state(&b, ContainerState::ContainerRunning);
    let sh = |id: &str, script: &str| {
        let r = pod
            .exec_sync(id, &["sh", "-c", script], 60)
            .expect("ExecSync");
        (r.exit_code, String::from_utf8_lossy(&r.stdout).into_owned())
    };
    let procs = "cat /proc/1/comm; \
                 for p in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $p; echo; done | grep -c '^sleep 60[01] $'; \
                 cat /proc/[0-9]*/comm 2>/dev/null | grep -c -E '^(kthreadd|agentvm-agent)$' || true";
    assert_eq!(
        sh(&b, procs),
        (0, "pause\n2\n0\n".into()),
        "processes seen by b"
    );
    assert_eq!(
        sh(&a, procs),
        (0, "pause\n2\n0\n".into()),
        "processes seen by a"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, note) = sh(&b, "cat /dev/shm/note 2>/dev/null");
        if note == "from-a\n" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "b never saw a's /dev/shm/note: {note:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(sh(&b, "echo from-b > /dev/shm/answer").0, 0);
    assert_eq!(sh(&a, "cat /dev/shm/answer"), (0, "from-b\n".into()));
    let netns = pod.netns_path();
    let ids = [pod.id.clone(), a, b];
    pod.remove().expect("remove the pod");
    assert_nothing_left(&ids, netns.as_deref());
}

against_both!(
    shared_pid_and_shm,
    shared_pid_and_shm_runc,
    shared_pid_and_shm_agentvm
);

/// The pod's sandbox status: its state, its IP and the task pid containerd knows it by (the
/// verbose info's `pid`: the pause process under runc, the namespace holder under agentvm).
fn sandbox_state(cri: &Cri, id: &str) -> (i32, String, i64) {
    let r = cri
        .block(cri.client().pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: true,
        }))
        .expect("PodSandboxStatus")
        .into_inner();
    let status = r.status.expect("a sandbox status");
    let pid = r
        .info
        .get("info")
        .and_then(|i| serde_json::from_str::<serde_json::Value>(i).ok())
        .and_then(|v| v["pid"].as_i64())
        .unwrap_or(0);
    (
        status.state,
        status.network.map(|n| n.ip).unwrap_or_default(),
        pid,
    )
}

/// The host's processes as (pid, parent pid, command line).
fn host_processes() -> Vec<(i32, i32, String)> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The command name may hold spaces and parentheses: the fields follow the last ')'.
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            Some((pid, ppid, String::from_utf8_lossy(&raw).replace('\0', " ")))
        })
        .collect()
}

/// The shim process serving pod `sandbox_id` (runc's v2 shim or agentvm's, both started with
/// `-id <sandbox id>` and serving all the pod's containers) and its descendants, as
/// (pid, command line): QEMU and every helper under agentvm, pause and the containers'
/// processes under runc.
fn pod_shim_tree(sandbox_id: &str) -> (i32, Vec<(i32, String)>) {
    let procs = host_processes();
    let needle = format!("-id {sandbox_id} ");
    let shim = procs
        .iter()
        .find(|(_, _, cmd)| cmd.contains("containerd-shim") && cmd.contains(&needle))
        .map(|(pid, _, _)| *pid)
        .unwrap_or_else(|| panic!("no shim serving pod {sandbox_id}"));
    let mut tree = vec![shim];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            procs
                .iter()
                .filter(|(_, ppid, _)| *ppid == parent)
                .map(|(pid, _, _)| *pid),
        );
        i += 1;
    }
    let named = tree
        .into_iter()
        .filter_map(|pid| {
            let (_, _, cmd) = procs.iter().find(|(p, _, _)| *p == pid)?;
            Some((pid, cmd.clone()))
        })
        .collect();
    (shim, named)
}

/// Which of `procs` still run (the same pid with the same command line: not a recycled pid).
fn still_running(procs: &[(i32, String)]) -> Vec<String> {
    procs
        .iter()
        .filter(|(pid, cmd)| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|raw| String::from_utf8_lossy(&raw).replace('\0', " ") == *cmd)
        })
        .map(|(pid, cmd)| format!("{pid}: {cmd}"))
        .collect()
}

/// Host cgroups of the test pods (under [`CGROUP_PARENT`], in every hierarchy) that name one
/// of `ids`.
fn cgroups_of(ids: &[String]) -> Vec<String> {
    let parent = CGROUP_PARENT.trim_start_matches('/');
    let mut dirs = vec![Path::new("/sys/fs/cgroup").join(parent)];
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        dirs.extend(rd.flatten().map(|e| e.path().join(parent)));
    }
    dirs.iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|rd| rd.flatten().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            p.is_dir() && ids.iter().any(|id| name.contains(id.as_str()))
        })
        .map(|p| p.display().to_string())
        .collect()
}

/// How long containerd may take to notice a dead shim and report its containers' exits.
const DEAD_SHIM_NOTICED: Duration = Duration::from_secs(60);

/// Waits until each of `containers` is EXITED and then the pod NOTREADY, at most
/// [`DEAD_SHIM_NOTICED`] in all, after the pod's `what` was killed; returns their statuses.
fn await_pod_down(
    cri: &Cri,
    pod: &Pod,
    containers: &[&String],
    what: &str,
) -> Vec<ContainerStatus> {
    let deadline = Instant::now() + DEAD_SHIM_NOTICED;
    let mut statuses = Vec::new();
    for id in containers {
        statuses.push(loop {
            let s = pod.status(id);
            if s.state == ContainerState::ContainerExited as i32 {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "container {id} not exited {DEAD_SHIM_NOTICED:?} after its {what} was killed: {s:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        });
    }
    loop {
        let (state, _, _) = sandbox_state(cri, &pod.id);
        if state == PodSandboxState::SandboxNotready as i32 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pod is still ready {DEAD_SHIM_NOTICED:?} after its {what} was killed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    statuses
}

/// The shim of a running pod with two running containers is SIGKILLed (the drill of a shim
/// crash or an OOM kill of the shim): containerd reports both containers exited, with an exit
/// code, within [`DEAD_SHIM_NOTICED`], and the pod NOTREADY; StopPodSandbox and
/// RemovePodSandbox then succeed and nothing of the pod is left: none of the shim's
/// descendants (QEMU and its helpers, or pause and the containers), no process, mount or state
/// dir naming the pod or its containers, no network namespace (which held the VM's taps).
fn shim_killed(cri: &Cri, handler: &str) {
    let mut pod = Pod::run(cri, "shimkill", handler, NamespaceOption::default())
        .unwrap_or_else(|e| panic!("RunPodSandbox with handler {handler}: {e}"));
    let sandbox_id = pod.id.clone();
    let netns = pod.netns_path();
    assert!(netns.is_some(), "the pod has its own network namespace");
    let a = pod.start("a", "echo a-up; exec sleep 600");
    let b = pod.start("b", "echo b-up; exec sleep 601");
    pod.wait_state(&a, ContainerState::ContainerRunning);
    pod.wait_state(&b, ContainerState::ContainerRunning);
    if handler == AGENTVM {
        assert_one_vm(&sandbox_id, &[&a, &b]);
    }
    let (shim, tree) = pod_shim_tree(&sandbox_id);
    assert!(
        !cgroups_of(std::slice::from_ref(&sandbox_id)).is_empty(),
        "the pod has a host cgroup under {CGROUP_PARENT}"
    );
    // The shim and at least what runs the pod: pause + two sleeps, or QEMU.
    assert!(tree.len() >= 2, "the pod's processes: {tree:#?}");
    if handler == AGENTVM {
        assert!(
            tree.iter().any(|(_, cmd)| cmd.contains("qemu-system")),
            "QEMU is the shim's child: {tree:#?}"
        );
    }

    // SAFETY: kill(2) on the pid of the shim just found; no memory is involved.
    assert_eq!(unsafe { libc::kill(shim, libc::SIGKILL) }, 0);
    for s in await_pod_down(cri, &pod, &[&a, &b], "shim") {
        // containerd's exit code for a task whose shim died (it cannot know the real one).
        assert_eq!(
            (s.exit_code, s.reason.as_str()),
            (255, "Error"),
            "a container whose shim died: {s:?}"
        );
        assert!(s.finished_at >= s.started_at, "{s:?}");
    }

    let ids = [sandbox_id, a, b];
    // kubelet's order: stop the pod, remove its containers, remove the pod.
    let t = Instant::now();
    cri.block(cri.client().stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.id.clone(),
    }))
    .map_err(status_text)
    .expect("StopPodSandbox after the shim died");
    pod.remove()
        .expect("RemoveContainer + RemovePodSandbox after the shim died");
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "removing the pod of a dead shim took {:?}",
        t.elapsed()
    );
    assert_nothing_left(&ids, netns.as_deref());
    let left = still_running(&tree);
    assert!(
        left.is_empty(),
        "the dead shim's processes survive: {left:#?}"
    );
    let left = cgroups_of(&ids);
    assert!(left.is_empty(), "host cgroups left: {left:#?}");
}

against_both!(shim_killed, shim_killed_runc, shim_killed_agentvm);

/// The pod's VM dies under a live shim (QEMU SIGKILLed: a VMM crash, the host's OOM killer):
/// every container of the pod exits with an error within [`DEAD_SHIM_NOTICED`], the sandbox
/// too (the pod NOTREADY, so kubelet makes a new one), and the pod's stop and removal leave
/// nothing: no shim, helper, mount, state dir, host cgroup or network namespace. agentvm only:
/// under runc a pod has no single process whose death ends all its containers.
#[test]
fn vm_killed_agentvm() {
    let Some(cri) = Cri::get("vm_killed_agentvm") else {
        return;
    };
    let mut pod = Pod::run(&cri, "vmkill", AGENTVM, NamespaceOption::default())
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}"));
    let sandbox_id = pod.id.clone();
    let netns = pod.netns_path();
    let a = pod.start("a", "exec sleep 600");
    let b = pod.start("b", "exec sleep 601");
    pod.wait_state(&a, ContainerState::ContainerRunning);
    pod.wait_state(&b, ContainerState::ContainerRunning);
    assert_one_vm(&sandbox_id, &[&a, &b]);
    let (_, tree) = pod_shim_tree(&sandbox_id);
    let qemu: Vec<i32> = tree
        .iter()
        .filter(|(_, cmd)| cmd.contains("qemu-system"))
        .map(|(pid, _)| *pid)
        .collect();
    assert_eq!(qemu.len(), 1, "one QEMU under the pod's shim: {tree:#?}");

    // SAFETY: kill(2) on the pid of the pod's QEMU just found; no memory is involved.
    assert_eq!(unsafe { libc::kill(qemu[0], libc::SIGKILL) }, 0);
    for s in await_pod_down(&cri, &pod, &[&a, &b], "VM") {
        assert!(
            s.exit_code != 0 && s.reason == "Error",
            "a container whose VM died exits with an error: {s:?}"
        );
    }

    let ids = [sandbox_id, a, b];
    cri.block(cri.client().stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.id.clone(),
    }))
    .map_err(status_text)
    .expect("StopPodSandbox after the VM died");
    pod.remove()
        .expect("RemoveContainer + RemovePodSandbox after the VM died");
    assert_nothing_left(&ids, netns.as_deref());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = still_running(&tree);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the shim or a helper survives the pod: {left:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let left = cgroups_of(&ids);
    assert!(left.is_empty(), "host cgroups left: {left:#?}");
}

/// Figures for docs/decisions.md ("A pod's later containers"): CreateContainer +
/// StartContainer of a container added to a running pod, and 500 small-file creates in its
/// root (a virtio-fs share under agentvm) against the same in its /dev/shm (memory), each as
/// the ExecSync round trip minus that of `true`. Medians of 5. Run by hand:
/// `cargo test -p agentvm-integration --test cri -- --ignored pod_container_costs --nocapture`.
#[test]
#[ignore]
fn pod_container_costs() {
    let Some(cri) = Cri::get("pod_container_costs") else {
        return;
    };
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    for handler in [RUNC, AGENTVM] {
        let mut pod = Pod::run(&cri, "costs", handler, NamespaceOption::default())
            .unwrap_or_else(|e| panic!("RunPodSandbox with handler {handler}: {e}"));
        let mut starts = Vec::new();
        let mut ids = Vec::new();
        for i in 0..5 {
            let t = Instant::now();
            ids.push(pod.start(&format!("c{i}"), "exec sleep 600"));
            starts.push(t.elapsed());
        }
        let id = ids[0].clone();
        let timed = |cmd: &str| {
            let mut v = Vec::new();
            for _ in 0..5 {
                let t = Instant::now();
                let r = pod
                    .exec_sync(&id, &["sh", "-c", cmd], 120)
                    .expect("ExecSync");
                assert_eq!(r.exit_code, 0, "{}", String::from_utf8_lossy(&r.stderr));
                v.push(t.elapsed());
            }
            median(v)
        };
        let base = timed("true");
        let files = |dir: &str| {
            format!(
                "mkdir -p {dir}/t && cd {dir}/t && i=0; while [ $i -lt 500 ]; do \
                 echo x > f$i; i=$((i+1)); done; rm -r {dir}/t"
            )
        };
        let root = timed(&files("")).saturating_sub(base);
        let shm = timed(&files("/dev/shm")).saturating_sub(base);
        println!(
            "{handler}: create+start of a container in a running pod {:?} (median of 5); \
             ExecSync of true {base:?}; 500 files in the root {root:?}, in /dev/shm {shm:?}",
            median(starts)
        );
        pod.remove().expect("remove the pod");
    }
}

/// VmRSS of `pid` in KiB (0 when it is gone).
fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The host RSS of a pod: its shim and every process under it (QEMU and its helpers under
/// agentvm; pause and the containers' processes under runc), in KiB, in total and by program
/// (the base name of argv[0]).
fn pod_rss(sandbox_id: &str) -> (u64, std::collections::BTreeMap<String, u64>) {
    let (_, tree) = pod_shim_tree(sandbox_id);
    let mut parts = std::collections::BTreeMap::new();
    for (pid, cmd) in &tree {
        let prog = cmd.split_whitespace().next().unwrap_or("?");
        let prog = prog.rsplit('/').next().unwrap_or(prog).to_string();
        *parts.entry(prog).or_insert(0) += rss_kib(*pid);
    }
    (parts.values().sum(), parts)
}

/// One round of hack/bench-pod.py for each handler: RunPodSandbox, then CreateContainer and
/// StartContainer of three containers one after the other (the first is what "a pod with one
/// container" costs on top of the pod, the later ones are containers added to a running pod),
/// the host RSS of the pod with one and with three containers running, and StopPodSandbox +
/// RemoveContainer of each + RemovePodSandbox (kubelet's order). Prints one `BENCH {json}` line per round and handler; round 0 is a
/// warm-up. `AGENTVM_BENCH_ROUNDS` rounds (default 1) after it, the handlers' order alternating.
/// Run by hack/bench-pod.py.
#[test]
#[ignore]
fn pod_bench() {
    let Some(cri) = Cri::get("pod_bench") else {
        return;
    };
    let rounds: usize = std::env::var("AGENTVM_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1000.0;
    for round in 0..=rounds {
        let order = if round % 2 == 0 {
            [RUNC, AGENTVM]
        } else {
            [AGENTVM, RUNC]
        };
        for handler in order {
            let t = Instant::now();
            let mut pod = Pod::run(&cri, "bench", handler, NamespaceOption::default())
                .unwrap_or_else(|e| panic!("RunPodSandbox with handler {handler}: {e}"));
            let run_pod_ms = ms(t);
            let (mut create_ms, mut start_ms) = (Vec::new(), Vec::new());
            let mut rss_one = None;
            for i in 0..3 {
                let name = format!("c{i}");
                let t = Instant::now();
                let id = cri
                    .block(cri.client().create_container(CreateContainerRequest {
                        pod_sandbox_id: pod.id.clone(),
                        config: Some(container_config(&name, "exec sleep 600")),
                        sandbox_config: Some(pod.config.clone()),
                    }))
                    .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}"))
                    .into_inner()
                    .container_id;
                pod.containers.push(id.clone());
                create_ms.push(ms(t));
                let t = Instant::now();
                cri.block(cri.client().start_container(StartContainerRequest {
                    container_id: id.clone(),
                }))
                .unwrap_or_else(|e| panic!("StartContainer {name}: {e}"));
                start_ms.push(ms(t));
                let s = pod.status(&id);
                assert_eq!(s.state, ContainerState::ContainerRunning as i32, "{s:?}");
                if i == 0 {
                    rss_one = Some(pod_rss(&pod.id));
                }
            }
            if handler == AGENTVM {
                let ids: Vec<&str> = pod.containers.iter().map(String::as_str).collect();
                assert_one_vm(&pod.id, &ids);
            }
            let (rss_one, _) = rss_one.expect("measured");
            let (rss_three, parts) = pod_rss(&pod.id);
            let netns = pod.netns_path();
            let mut ids = pod.containers.clone();
            ids.push(pod.id.clone());
            let t = Instant::now();
            cri.block(cri.client().stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.id.clone(),
            }))
            .unwrap_or_else(|e| panic!("StopPodSandbox: {e}"));
            pod.remove().expect("RemoveContainer + RemovePodSandbox");
            let remove_ms = ms(t);
            assert_nothing_left(&ids, netns.as_deref());
            println!(
                "BENCH {}",
                serde_json::json!({
                    "round": round,
                    "warmup": round == 0,
                    "handler": handler,
                    "run_pod_ms": run_pod_ms,
                    "create_ms": create_ms,
                    "start_ms": start_ms,
                    "remove_pod_ms": remove_ms,
                    "rss_kib_one": rss_one,
                    "rss_kib_three": rss_three,
                    "rss_kib_parts": parts,
                })
            );
        }
    }
}

/// Whether a TCP connection from container `id` of `pod` to `addr:port` opens (3 s).
fn pod_reaches(pod: &Pod, id: &str, addr: &str, port: u16) -> bool {
    let script = format!("timeout 3 nc {addr} {port} </dev/null && echo OPEN || echo CLOSED");
    let out = pod
        .exec_sync(id, &["sh", "-c", &script], 30)
        .unwrap_or_else(|e| panic!("exec in {id}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("OPEN") || text.contains("CLOSED"), "{text}");
    text.contains("OPEN")
}

/// The egress policy of a pod (agentvm only: runc has none): the pod annotation
/// `io.agentvm.egress=agent` (passed to the runtime through the handler's `pod_annotations`)
/// holds for every container of the pod, as one policy on the pod's VM. A service of this host
/// on the pod network's gateway is refused to both of the pod's containers while a pod without
/// the policy reaches it; another pod of the pod network (its own network) is reached;
/// `agentvm policy show` names the policy and `policy log` the blocks.
#[test]
fn pod_egress_policy_holds_for_every_container_of_the_pod() {
    let test = "pod_egress_policy_holds_for_every_container_of_the_pod";
    let Some(cri) = Cri::get(test) else {
        return;
    };
    // The host's address on the pod network (the CNI bridge's): the pods' gateway.
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "dev", "avmcri0"])
        .output()
        .expect("ip");
    let gateway = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .map(str::to_string)
        .expect("an address on avmcri0");
    let listener = std::net::TcpListener::bind((gateway.as_str(), 0)).expect("listen");
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in listener.incoming() {
            drop(c);
        }
    });

    let mut open = Pod::run(&cri, "egress-open", AGENTVM, NamespaceOption::default())
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}"));
    let web = open.start(
        "web",
        "mkdir -p /www && echo hi > /www/index.html && exec httpd -f -p 8080 -h /www",
    );
    open.wait_state(&web, ContainerState::ContainerRunning);
    let web_ip = cri
        .block(cri.client().pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: open.id.clone(),
            verbose: false,
        }))
        .expect("PodSandboxStatus")
        .into_inner()
        .status
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .unwrap_or_default();
    assert!(!web_ip.is_empty());
    let deadline = Instant::now() + CALL_TIMEOUT;
    while !pod_reaches(&open, &web, &gateway, port) {
        assert!(
            Instant::now() < deadline,
            "a pod without policy never reached the host"
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    let mut guarded = Pod::run_annotated(
        &cri,
        "egress-agent",
        AGENTVM,
        NamespaceOption::default(),
        &[("io.agentvm.egress", "agent")],
    )
    .unwrap_or_else(|e| panic!("RunPodSandbox under agent: {e}"));
    let a = guarded.start("a", "exec sleep 600");
    let b = guarded.start("b", "exec sleep 600");
    guarded.wait_state(&a, ContainerState::ContainerRunning);
    guarded.wait_state(&b, ContainerState::ContainerRunning);
    for id in [&a, &b] {
        assert!(
            !pod_reaches(&guarded, id, &gateway, port),
            "container {id} reached the host under agent"
        );
        assert!(
            pod_reaches(&guarded, id, &web_ip, 8080),
            "container {id} did not reach the other pod"
        );
    }
    let agentvm = |args: &[&str]| {
        let out = std::process::Command::new(agentvm_integration::agentvm_bin())
            .args(args)
            .output()
            .expect("agentvm");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, show) = agentvm(&["policy", "show", &guarded.id]);
    assert!(ok && show.contains("policy: agent (base agent)"), "{show}");
    let (ok, log) = agentvm(&["policy", "log", &guarded.id]);
    assert!(
        ok && log.contains(&format!("blocked tcp to {gateway}:{port}"))
            && log.contains("the host's own address"),
        "{log}"
    );
    let (ok, show) = agentvm(&["policy", "show", &open.id]);
    assert!(ok && show.contains("policy: open"), "{show}");

    let ids = [guarded.id.clone(), a, b];
    let netns = guarded.netns_path();
    guarded.remove().expect("remove the guarded pod");
    assert_nothing_left(&ids, netns.as_deref());
    let ids = [open.id.clone(), web];
    let netns = open.netns_path();
    open.remove().expect("remove the open pod");
    assert_nothing_left(&ids, netns.as_deref());
}

/// Secrets of a pod (agentvm only): the pod annotations `io.agentvm.secrets` and
/// `io.agentvm.secrets-env` (let through by the handler's `pod_annotations`) give each of the
/// pod's containers the secret as a file on /run/secrets and as a variable; the pod's sandbox
/// spec carries the name only.
#[test]
fn pod_secrets_reach_its_containers() {
    let test = "pod_secrets_reach_its_containers";
    let Some(cri) = Cri::get(test) else {
        return;
    };
    let name = format!("AVM_CRI_{}", std::process::id());
    let value = format!(
        "pod-secret-{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let secret = |args: &[&str], input: &[u8]| {
        use std::io::Write;
        let mut child = std::process::Command::new(agentvm_integration::agentvm_bin())
            .arg("secret")
            .args(args)
            .env_remove("AGENTVM_SECRETS_DIR")
            .env_remove("AGENTVM_SECRETS_KEY")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("agentvm secret");
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().expect("agentvm secret")
    };
    struct Forget<'a>(&'a dyn Fn());
    impl Drop for Forget<'_> {
        fn drop(&mut self) {
            (self.0)();
        }
    }
    let out = secret(&["set", &name], value.as_bytes());
    assert!(out.status.success(), "{out:?}");
    let rm = || {
        let _ = secret(&["rm", &name], b"");
    };
    let _forget = Forget(&rm);

    let mut pod = Pod::run_annotated(
        &cri,
        "secrets",
        AGENTVM,
        NamespaceOption::default(),
        &[
            ("io.agentvm.secrets", name.as_str()),
            ("io.agentvm.secrets-env", name.as_str()),
        ],
    )
    .unwrap_or_else(|e| panic!("RunPodSandbox: {e}"));
    let app = pod.start("app", "exec sleep 600");
    pod.wait_state(&app, ContainerState::ContainerRunning);
    let script = format!("cat /run/secrets/{name}; echo; echo env=${name}");
    let out = pod
        .exec_sync(&app, &["sh", "-c", &script], 60)
        .unwrap_or_else(|e| panic!("exec: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout,
        format!("{value}\nenv={value}\n"),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids = [pod.id.clone(), app];
    let netns = pod.netns_path();
    pod.remove().expect("remove the pod");
    assert_nothing_left(&ids, netns.as_deref());
}
