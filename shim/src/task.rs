//! The `containerd.task.v2.Task` service: translates Task calls into `agentvm` container
//! calls and publishes the task events.
//!
//! Events go through one ordered queue (the publisher's), and each container publishes
//! Create < Start < Exit < Delete: Start is published before the exit watcher exists, and
//! the exit before the VM's (slow) teardown, which Delete waits for.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use agentvm::accel::AccelChoice;
use agentvm::container::{Container, ContainerConfig, Exit, Running};
use agentvm_protocol::GuestStats;
use agentvm_protocol::ProcessSpec;
use async_trait::async_trait;
use containerd_shim::api;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::protos::cgroups_v2::metrics::{
    CPUStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{self, Message as _, MessageDyn, MessageField};
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, r#async::TtrpcContext, Code};
use containerd_shim::{Context, ExitSignal};
use tokio::sync::watch;

/// In the bundle: the init process's exit code, written when it is known, so that `delete`
/// after a dead shim reports the real exit (reference P15).
pub const EXIT_FILE: &str = "agentvm-exit-status";

/// Default VM size when the spec sets no limits (as `agentvm run`).
const DEFAULT_MEMORY_MIB: u32 = agentvm::run::DEFAULT_MEMORY_MIB;
const DEFAULT_VCPUS: u32 = agentvm::run::DEFAULT_VCPUS;
/// Under TCG a boot takes seconds; a loaded CI machine may need much longer.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long Delete waits for the VM to be gone (it is killed after 5 s of grace).
const TEARDOWN_WAIT: Duration = Duration::from_secs(15);
/// How long the init's exit waits for the exits of exec processes (they end with the VM).
const EXEC_EXIT_WAIT: Duration = Duration::from_secs(10);

/// Errors as ttrpc statuses, with the codes callers act on (reference §2.2, P4).
fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

fn not_found(id: &str) -> ttrpc::Error {
    status(Code::NOT_FOUND, format!("container {id}: not found"))
}

fn unimplemented(what: &str) -> ttrpc::Error {
    status(
        Code::UNIMPLEMENTED,
        format!("{what} is not implemented by agentvm"),
    )
}

fn internal(e: impl std::fmt::Display) -> ttrpc::Error {
    status(Code::UNKNOWN, e.to_string())
}

/// The status code for a runtime error: what the caller can act on. containerd turns these
/// into its errdefs (InvalidArgument, FailedPrecondition, ResourceExhausted; anything else is
/// unknown), and Docker and kubelet into their messages.
pub fn code_of(e: &agentvm::Error) -> Code {
    match e {
        // The request itself: a spec, an annotation, a setting a VM cannot honour.
        agentvm::Error::Invalid(_)
        | agentvm::Error::Secret(
            agentvm::secrets::SecretError::BadName(_)
            | agentvm::secrets::SecretError::NotAnEnvName(_),
        ) => Code::INVALID_ARGUMENT,
        // The host lacks something (a kernel, QEMU, the secrets key) or a secret is missing:
        // the admin's to fix, retrying changes nothing.
        agentvm::Error::Missing { .. } | agentvm::Error::Secret(_) => Code::FAILED_PRECONDITION,
        agentvm::Error::Io { source, .. } | agentvm::Error::Spawn { source, .. }
            if is_exhausted(source) =>
        {
            Code::RESOURCE_EXHAUSTED
        }
        agentvm::Error::Io { .. }
        | agentvm::Error::Spawn { .. }
        | agentvm::Error::Boot { .. }
        | agentvm::Error::VmDied { .. }
        | agentvm::Error::Protocol(_)
        | agentvm::Error::Agent(_)
        | agentvm::Error::Cgroup(_) => Code::UNKNOWN,
    }
}

/// A full disk, no memory, too many open files or processes.
fn is_exhausted(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ENOSPC | libc::EDQUOT | libc::ENOMEM | libc::EMFILE | libc::ENFILE | libc::EAGAIN
        )
    ) || e.kind() == std::io::ErrorKind::StorageFull
}

/// A runtime error as a ttrpc status ([`code_of`]), its text as the message.
pub fn rpc_error(e: agentvm::Error) -> ttrpc::Error {
    status(code_of(&e), e.to_string())
}

pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

/// The sandbox (state dir) id of a container: its id where that is a valid sandbox id (Docker's
/// 64 hex digits are), otherwise a deterministic sanitized form, so `delete` finds it again.
pub fn sandbox_id(container_id: &str) -> agentvm::Result<String> {
    if agentvm::sandbox::validate_id(container_id).is_ok() {
        return Ok(container_id.to_string());
    }
    let mut s: String = container_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    s = s.trim_start_matches('-').to_string();
    s.truncate(64);
    agentvm::sandbox::validate_id(&s)?;
    Ok(s)
}

/// The lifecycle of a process; `C` is what starting it takes (the booted VM for the init
/// process, the process spec for an exec process).
enum Phase<C> {
    Created(C),
    /// Start is in progress, or Delete took the VM.
    Busy,
    Running(Running),
    /// Ended without a running process (killed or deleted before start).
    Stopped,
}

/// The stdio containerd gave a process.
#[derive(Clone, Default)]
struct Stdio {
    stdin: String,
    stdout: String,
    stderr: String,
    terminal: bool,
}

impl Stdio {
    async fn open(
        &self,
        close: &crate::io::StdinClose,
    ) -> std::io::Result<agentvm::container::ProcessIo> {
        crate::io::open(&self.stdin, &self.stdout, &self.stderr, close).await
    }
}

/// A process of a container: its init process or an exec process.
struct Proc<C> {
    /// The container id for the init process, the exec id otherwise.
    id: String,
    io: Stdio,
    /// `CloseIO(stdin)`: ends the stdin the shim reads from the fifo, after its data.
    stdin_close: crate::io::StdinClose,
    /// The host pid the process reports: the container's network namespace holder (a host
    /// process the shim made) for the init process, and for an exec process once started (0
    /// before). A pid the guest names is guest data and is never published.
    pid: AtomicU32,
    phase: tokio::sync::Mutex<Phase<C>>,
    /// Set once the process is over; Wait blocks on it even before Start.
    exit: watch::Sender<Option<Exit>>,
}

impl<C> Proc<C> {
    fn new(id: String, io: Stdio, pid: u32, created: C) -> Self {
        Proc {
            id,
            io,
            stdin_close: Default::default(),
            pid: AtomicU32::new(pid),
            phase: tokio::sync::Mutex::new(Phase::Created(created)),
            exit: watch::channel(None).0,
        }
    }

    fn pid(&self) -> u32 {
        self.pid.load(Ordering::SeqCst)
    }

    fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    fn exit_event(&self, container_id: &str, exit: Exit) -> TaskExit {
        TaskExit {
            container_id: container_id.to_string(),
            id: self.id.clone(),
            pid: self.pid(),
            exit_status: exit.code as u32,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        }
    }

    /// The handle of the started process, if it runs.
    async fn running(&self) -> Option<Running> {
        match &*self.phase.lock().await {
            Phase::Running(r) => Some(r.clone()),
            _ => None,
        }
    }

    fn state(&self, bundle: &str) -> api::StateResponse {
        let exit = self.exited();
        let status = match (exit, self.phase.try_lock().as_deref()) {
            (Some(_), _) => api::Status::STOPPED,
            (None, Ok(Phase::Created(_))) => api::Status::CREATED,
            (None, Ok(Phase::Stopped)) => api::Status::STOPPED,
            (None, Ok(Phase::Running(r))) if r.is_paused() => api::Status::PAUSED,
            _ => api::Status::RUNNING,
        };
        api::StateResponse {
            id: self.id.clone(),
            bundle: bundle.to_string(),
            pid: self.pid(),
            status: status.into(),
            stdin: self.io.stdin.clone(),
            stdout: self.io.stdout.clone(),
            stderr: self.io.stderr.clone(),
            terminal: self.io.terminal,
            exit_status: exit.map(|e| e.code as u32).unwrap_or(0),
            exited_at: exit
                .map(|e| MessageField::some(timestamp(e.at)))
                .unwrap_or_default(),
            ..Default::default()
        }
    }

    async fn wait(&self) -> ttrpc::Result<api::WaitResponse> {
        let mut rx = self.exit.subscribe();
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map(|e| *e)
            .map_err(internal)?
            .ok_or_else(|| internal("no exit"))?;
        Ok(api::WaitResponse {
            exit_status: exit.code as u32,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    /// Takes the process out of the created state for Start.
    async fn take_created(&self) -> ttrpc::Result<(C, tokio::sync::MutexGuard<'_, Phase<C>>)> {
        let mut phase = self.phase.lock().await;
        match std::mem::replace(&mut *phase, Phase::Busy) {
            Phase::Created(c) => Ok((c, phase)),
            other => {
                *phase = other;
                Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("process {} is not in the created state", self.id),
                ))
            }
        }
    }

    /// Records a start that could not even reach the agent.
    fn failed_to_start(&self, phase: &mut Phase<C>) {
        *phase = Phase::Stopped;
        self.exit.send_replace(Some(Exit {
            code: 255,
            at: SystemTime::now(),
            oom: false,
        }));
    }
}

type ExecProc = Proc<ProcessSpec>;

/// What a created container's start takes.
enum Created {
    /// A VM of its own, booted at Start (a Docker container, a pod sandbox).
    Vm(Box<Container>),
    /// A later container of a pod: it runs in the pod sandbox's VM.
    Member {
        sandbox: Arc<Entry>,
        request: Box<agentvm_protocol::StartRequest>,
    },
}

impl Created {
    /// Tears down what create made without running anything.
    async fn destroy(self) {
        match self {
            Created::Vm(c) => c.destroy().await,
            // Its root is unbound at Delete, with the bundle's.
            Created::Member { .. } => {}
        }
    }
}

struct Entry {
    id: String,
    bundle: String,
    /// The shim mounted `<bundle>/rootfs` (snapshotter mounts) and must unmount it.
    mounted_rootfs: bool,
    /// The spec's hooks and annotations, for the poststop hooks at delete.
    hooks: Option<agentvm::hooks::Hooks>,
    annotations: HashMap<String, String>,
    /// The container's seccomp profile, as its policy leaves it: every exec gets it too, as
    /// under runc.
    seccomp: Option<agentvm_protocol::Seccomp>,
    init: Proc<Box<Created>>,
    execs: Mutex<HashMap<String, Arc<ExecProc>>>,
    /// For a pod's later container: the pod share its root is bound into, and the
    /// container's directory name there.
    pod_share: Option<(PathBuf, String)>,
}

impl Entry {
    fn exited(&self) -> Option<Exit> {
        self.init.exited()
    }

    fn exec(&self, exec_id: &str) -> ttrpc::Result<Arc<ExecProc>> {
        self.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(exec_id)
            .cloned()
            .ok_or_else(|| status(Code::NOT_FOUND, format!("exec {exec_id}: not found")))
    }

    /// The running process `exec_id` names (empty: the init process).
    async fn running(&self, exec_id: &str) -> ttrpc::Result<Option<Running>> {
        Ok(if exec_id.is_empty() {
            self.init.running().await
        } else {
            self.exec(exec_id)?.running().await
        })
    }

    /// Waits (bounded) until the started exec processes have published their exits.
    async fn execs_exited(&self) {
        let rxs: Vec<_> = self
            .execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|p| p.pid() != 0)
            .map(|p| p.exit.subscribe())
            .collect();
        let all = async {
            for mut rx in rxs {
                let _ = rx.wait_for(Option::is_some).await;
            }
        };
        if tokio::time::timeout(EXEC_EXIT_WAIT, all).await.is_err() {
            tracing::warn!("exec processes of {} did not report their exits", self.id);
        }
    }
}

/// The task service of one shim: one Docker container, or every container of a pod (the
/// sandbox id groups them into one shim).
pub struct TaskService {
    namespace: String,
    publisher: Arc<RemotePublisher>,
    exit: Arc<ExitSignal>,
    containers: Mutex<HashMap<String, Arc<Entry>>>,
    /// The VMM backend of the containers it creates (none: QEMU).
    backend: Option<Arc<dyn agentvm::vmm::VmmBackend>>,
}

impl std::fmt::Debug for TaskService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<String> = self
            .containers
            .lock()
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default();
        f.debug_struct("TaskService")
            .field("namespace", &self.namespace)
            .field("containers", &ids)
            .finish()
    }
}

impl TaskService {
    pub fn new(namespace: String, publisher: RemotePublisher, exit: Arc<ExitSignal>) -> Self {
        Self {
            namespace,
            publisher: Arc::new(publisher),
            exit,
            containers: Mutex::new(HashMap::new()),
            backend: None,
        }
    }

    /// The same service creating its containers' VMs on `backend` (a test backend:
    /// `agentvm::fakevm`; see `agentvm::container::ContainerConfig::backend`).
    pub fn with_backend(self, backend: Arc<dyn agentvm::vmm::VmmBackend>) -> Self {
        Self {
            backend: Some(backend),
            ..self
        }
    }

    fn get(&self, id: &str) -> ttrpc::Result<Arc<Entry>> {
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| not_found(id))
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        publish(&self.publisher, &self.namespace, topic, event).await;
    }

    /// Registers a created container and publishes TaskCreate.
    async fn created(
        &self,
        req: &api::CreateTaskRequest,
        entry: Arc<Entry>,
        pid: u32,
    ) -> ttrpc::Result<api::CreateTaskResponse> {
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(req.id.clone(), entry);
        let ev = TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            checkpoint: req.checkpoint.clone(),
            pid,
            ..Default::default()
        };
        self.publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    /// Create of a pod's later container (`sandbox` is the pod sandbox's container id): its
    /// root (the bundle's, mounted) is bound into the sandbox VM's pod share; it runs in that
    /// VM at Start. The sandbox must be served by this shim (`start` groups a pod).
    async fn create_member(
        &self,
        req: &api::CreateTaskRequest,
        sandbox: &str,
        spec: &agentvm::oci::BundleSpec,
        io: Stdio,
        secrets: Vec<agentvm_protocol::SecretSpec>,
    ) -> ttrpc::Result<api::CreateTaskResponse> {
        let precondition = |m: String| status(Code::FAILED_PRECONDITION, m);
        let pod = self.get(sandbox).map_err(|_| {
            precondition(format!(
                "container {}: its pod sandbox {sandbox} is not served by this shim",
                req.id
            ))
        })?;
        let share = agentvm::pod::share_dir(&sandbox_id(sandbox).map_err(rpc_error)?);
        if !share.is_dir() {
            return Err(precondition(format!(
                "container {}: the VM of pod sandbox {sandbox} has no pod share (is virtiofsd \
                 installed? see the shim's log)",
                req.id
            )));
        }
        let name = sandbox_id(&req.id).map_err(rpc_error)?;
        let subdir = agentvm::pod::bind_root(&share, &name, &spec.root).map_err(rpc_error)?;
        let request = match agentvm::pod::member_request(&name, subdir, spec, &share) {
            Ok(mut r) => {
                r.secrets = secrets;
                r
            }
            Err(e) => {
                agentvm::pod::unbind_root(&share, &name);
                return Err(rpc_error(e));
            }
        };
        let pid = pod.init.pid();
        let entry = Arc::new(Entry {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            mounted_rootfs: !req.rootfs.is_empty(),
            hooks: spec.hooks.clone(),
            annotations: spec.annotations.clone(),
            seccomp: spec.confinement.seccomp.clone(),
            init: Proc::new(
                req.id.clone(),
                io,
                pid,
                Box::new(Created::Member {
                    sandbox: pod,
                    request: Box::new(request),
                }),
            ),
            execs: Mutex::new(HashMap::new()),
            pod_share: Some((share, name)),
        });
        self.created(req, entry, pid).await
    }

    /// Starts exec process `exec_id` of `entry` in the container's VM.
    /// The running init process of container `id` (FAILED_PRECONDITION when it does not run).
    async fn running_init(&self, id: &str) -> ttrpc::Result<Running> {
        let entry = self.get(id)?;
        let running = entry.init.running().await;
        running.ok_or_else(|| {
            status(
                Code::FAILED_PRECONDITION,
                format!("container {id} is not running"),
            )
        })
    }

    async fn start_exec(&self, entry: Arc<Entry>, exec_id: &str) -> ttrpc::Result<u32> {
        let exec = entry.exec(exec_id)?;
        let init = entry.init.running().await;
        let (spec, mut phase) = exec.take_created().await?;
        let Some(init) = init.filter(|r| r.exited().is_none()) else {
            exec.failed_to_start(&mut phase);
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("container {} is not running", entry.id),
            ));
        };
        if init.is_paused() {
            // A frozen process never gets to exec (and a paused VM's agent cannot answer).
            exec.failed_to_start(&mut phase);
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!(
                    "cannot exec in a paused container: resume container {} first",
                    entry.id
                ),
            ));
        }
        let io = match exec.io.open(&exec.stdin_close).await {
            Ok(io) => io,
            Err(e) => {
                exec.failed_to_start(&mut phase);
                return Err(internal(format!("open stdio: {e}")));
            }
        };
        // The handle is in place before the agent confirms the start, and the phase lock is
        // not held while it does: a kill of this exec, or anything else, never waits for a
        // stalled agent (a SIGKILL ends the start at once).
        let (running, started) = init.spawn_exec(spec, io);
        *phase = Phase::Running(running.clone());
        drop(phase);
        let started = started.await;
        let announce = started.is_ok();
        if started.is_ok() {
            // As Kata publishes its VMM's pid for every exec: a host process the engine may
            // act on (nsenter into the container's network namespace), never the guest's pid.
            exec.pid.store(entry.init.pid(), Ordering::SeqCst);
            let ev = TaskExecStarted {
                container_id: entry.id.clone(),
                exec_id: exec_id.to_string(),
                pid: exec.pid(),
                ..Default::default()
            };
            self.publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(ev))
                .await;
        }
        self.watch_exit(
            Arc::clone(&entry),
            Some(Arc::clone(&exec)),
            running,
            announce,
        );
        started.map(|_| exec.pid()).map_err(internal)
    }

    /// Publishes the exit of a process (`exec`, or the init process) as soon as it is known,
    /// and records it for Wait/State/Delete. Exec exits go out before the init's.
    fn watch_exit(
        &self,
        entry: Arc<Entry>,
        exec: Option<Arc<ExecProc>>,
        running: Running,
        announce: bool,
    ) {
        let publisher = Arc::clone(&self.publisher);
        let ns = self.namespace.clone();
        tokio::spawn(async move {
            let exit = running.wait().await;
            let (exit_tx, ev) = match &exec {
                Some(p) => (&p.exit, p.exit_event(&entry.id, exit)),
                None => {
                    if announce {
                        entry.execs_exited().await;
                    }
                    (&entry.init.exit, entry.init.exit_event(&entry.id, exit))
                }
            };
            if exec.is_none() {
                exit_tx.send_replace(Some(exit));
                let file = PathBuf::from(&entry.bundle).join(EXIT_FILE);
                if let Err(e) = tokio::fs::write(&file, format!("{}\n", exit.code)).await {
                    tracing::warn!("record the exit in {}: {e}", file.display());
                }
            }
            if exit.oom {
                // The guest's word (a forged OOM is possible): published as the container's
                // OOM, which only marks it OOMKilled, and acted on nowhere on the host.
                // Before the exit, as runc's shim does: Docker marks OOMKilled on it.
                let oom = TaskOOM {
                    container_id: entry.id.clone(),
                    ..Default::default()
                };
                publish(&publisher, &ns, topics::TASK_OOM_EVENT_TOPIC, Box::new(oom)).await;
            }
            if announce {
                publish(&publisher, &ns, topics::TASK_EXIT_EVENT_TOPIC, Box::new(ev)).await;
            }
            // An exec exit is recorded once published, which the init's exit waits for.
            exit_tx.send_replace(Some(exit));
        });
    }
}

/// Delete of an exec process: forgets it once it has ended (no event, as runc's shim).
async fn delete_exec(entry: &Entry, exec_id: &str) -> ttrpc::Result<api::DeleteResponse> {
    let exec = entry.exec(exec_id)?;
    let exit = match exec.exited() {
        Some(exit) => exit,
        None => {
            let mut phase = exec.phase.lock().await;
            if matches!(&*phase, Phase::Running(_) | Phase::Busy) {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("cannot delete running exec {exec_id}"),
                ));
            }
            *phase = Phase::Stopped;
            Exit {
                code: 0,
                at: SystemTime::now(),
                oom: false,
            }
        }
    };
    entry
        .execs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(exec_id);
    Ok(api::DeleteResponse {
        pid: exec.pid(),
        exit_status: exit.code as u32,
        exited_at: MessageField::some(timestamp(exit.at)),
        ..Default::default()
    })
}

/// The secrets container `id`'s annotations ask for, decrypted from the host's store
/// (`agentvm::secrets`). FAILED_PRECONDITION names the secret that is missing or does not
/// decrypt; the values are in no log line and no error.
fn resolve_secrets(
    id: &str,
    annotations: &HashMap<String, String>,
) -> ttrpc::Result<Vec<agentvm_protocol::SecretSpec>> {
    let wanted = agentvm::secrets::wanted(annotations)
        .map_err(|e| status(Code::INVALID_ARGUMENT, format!("container {id}: {e}")))?;
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let resolved = agentvm::secrets::Store::host().resolve(&wanted);
    resolved.map_err(|e| {
        tracing::error!("create {id}: {e}");
        status(Code::FAILED_PRECONDITION, format!("container {id}: {e}"))
    })
}

async fn publish(publisher: &RemotePublisher, ns: &str, topic: &str, event: Box<dyn MessageDyn>) {
    if let Err(e) = publisher
        .publish(Context::default(), topic, ns, event)
        .await
    {
        tracing::warn!("publish {topic}: {e}");
    }
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> ttrpc::Result<api::CreateTaskResponse> {
        if !req.checkpoint.is_empty() {
            return Err(unimplemented("create from checkpoint"));
        }
        if self.get(&req.id).is_ok() {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("container {} already exists", req.id),
            ));
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec = agentvm::oci::load_bundle(&bundle, DEFAULT_MEMORY_MIB, DEFAULT_VCPUS)
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        // Before anything is made: a secret that is missing or does not decrypt fails the
        // create with its name, and leaves nothing behind. A pod's sandbox (the pause
        // container, which sees the pod's annotations too) needs none.
        let secrets = match agentvm::pod::PodRole::of(&spec.annotations) {
            agentvm::pod::PodRole::Sandbox { .. } => Vec::new(),
            _ => resolve_secrets(&req.id, &spec.annotations)?,
        };
        let mounted_rootfs = !req.rootfs.is_empty();
        if mounted_rootfs {
            crate::rootfs::mount_all(&req.rootfs, &bundle.join("rootfs"))
                .await
                .map_err(internal)?;
        }
        let io = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        if let agentvm::pod::PodRole::Container { sandbox_id: pod } =
            agentvm::pod::PodRole::of(&spec.annotations)
        {
            let made = self.create_member(&req, &pod, &spec, io, secrets).await;
            if made.is_err() && mounted_rootfs {
                crate::rootfs::unmount(&bundle.join("rootfs"));
            }
            return made;
        }
        let cfg = ContainerConfig {
            id: sandbox_id(&req.id).map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?,
            root: spec.root.clone(),
            root_readonly: spec.root_readonly,
            process: spec.process,
            hostname: spec.hostname,
            memory_mib: spec.memory_mib,
            vcpus: spec.vcpus,
            accel: AccelChoice::Auto,
            boot_timeout: BOOT_TIMEOUT,
            debug: false,
            netns: spec.netns,
            mounts: spec.mounts,
            hooks: spec.hooks.clone(),
            sysctls: spec.sysctls.clone(),
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            annotations: spec.annotations.clone(),
            host_cgroup: Some(spec.host_cgroup.clone()),
            volume_limits: spec.volume_limits,
            secrets,
            backend: self.backend.clone(),
            masked_paths: spec.confinement.masked_paths.clone(),
            readonly_paths: spec.confinement.readonly_paths.clone(),
        };
        let container = match Container::create(cfg).await {
            Ok(c) => c,
            Err(e) => {
                if mounted_rootfs {
                    crate::rootfs::unmount(&bundle.join("rootfs"));
                }
                tracing::error!("create {}: {e}", req.id);
                return Err(rpc_error(e));
            }
        };
        let pid = container.pid();
        let entry = Arc::new(Entry {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            mounted_rootfs,
            hooks: spec.hooks,
            annotations: spec.annotations,
            seccomp: spec.confinement.seccomp,
            init: Proc::new(
                req.id.clone(),
                io,
                pid,
                Box::new(Created::Vm(Box::new(container))),
            ),
            execs: Mutex::new(HashMap::new()),
            pod_share: None,
        });
        self.created(&req, entry, pid).await
    }
    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> ttrpc::Result<api::StartResponse> {
        let entry = self.get(&req.id)?;
        if !req.exec_id.is_empty() {
            let pid = self.start_exec(entry, &req.exec_id).await?;
            return Ok(api::StartResponse {
                pid,
                ..Default::default()
            });
        }
        let init = &entry.init;
        let (container, mut phase) = init.take_created().await?;
        let io = match init.io.open(&init.stdin_close).await {
            Ok(io) => io,
            Err(e) => {
                container.destroy().await;
                init.failed_to_start(&mut phase);
                return Err(internal(format!("open stdio: {e}")));
            }
        };
        let (running, started) = match *container {
            Created::Vm(c) => {
                let (running, started) = c.start(io).await;
                *phase = Phase::Running(running.clone());
                drop(phase);
                (running, started)
            }
            Created::Member { sandbox, request } => {
                let pod = sandbox.init.running().await;
                let Some(pod) = pod.filter(|r| r.exited().is_none()) else {
                    init.failed_to_start(&mut phase);
                    return Err(status(
                        Code::FAILED_PRECONDITION,
                        format!("the pod sandbox {} is not running", sandbox.id),
                    ));
                };
                // As an exec's: the handle is in place before the agent confirms.
                let (running, started) = pod.spawn_member(*request, io);
                *phase = Phase::Running(running.clone());
                drop(phase);
                (running, started.await)
            }
        };
        let pid = init.pid();
        if started.is_ok() {
            // TaskStart is queued before the exit watcher exists: Start < Exit.
            let ev = TaskStart {
                container_id: req.id.clone(),
                pid,
                ..Default::default()
            };
            self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(ev))
                .await;
        }
        // Never started: no TaskStart, so no TaskExit either; Delete reports the code.
        self.watch_exit(Arc::clone(&entry), None, running, started.is_ok());
        started.map_err(internal)?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> ttrpc::Result<api::StateResponse> {
        let entry = self.get(&req.id)?;
        Ok(if req.exec_id.is_empty() {
            entry.init.state(&entry.bundle)
        } else {
            entry.exec(&req.exec_id)?.state(&entry.bundle)
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> ttrpc::Result<api::Empty> {
        let entry = self.get(&req.id)?;
        let finished = || status(Code::NOT_FOUND, "process already finished");
        let killed = Exit {
            code: 128 + req.signal as i32,
            at: SystemTime::now(),
            oom: false,
        };
        if !req.exec_id.is_empty() {
            let exec = entry.exec(&req.exec_id)?;
            if exec.exited().is_some() {
                return Err(finished());
            }
            let mut phase = exec.phase.lock().await;
            match &*phase {
                Phase::Running(r) => r.signal(req.signal as i32).map_err(|_| finished())?,
                Phase::Created(_) => {
                    // Never started: nothing to signal, and no exit to publish.
                    *phase = Phase::Stopped;
                    exec.exit.send_replace(Some(killed));
                }
                Phase::Busy | Phase::Stopped => return Err(finished()),
            }
            return Ok(api::Empty::default());
        }
        if entry.exited().is_some() {
            return Err(finished());
        }
        let mut phase = entry.init.phase.lock().await;
        match std::mem::replace(&mut *phase, Phase::Stopped) {
            Phase::Running(r) => {
                // A paused VM cannot act on SIGKILL: let it run so the kill lands (a
                // frozen runc container is killable too). A pod's frozen container is not
                // thawed: SIGKILL reaches frozen processes, and a thaw would deliver a
                // pending SIGTERM first (exit 143, where runc's gives 137).
                if req.signal as i32 == libc::SIGKILL && r.vm_paused() {
                    if let Err(e) = r.resume_vm().await {
                        tracing::warn!("resume before SIGKILL: {e}");
                    }
                }
                let sent = r.signal(req.signal as i32);
                *phase = Phase::Running(r);
                sent.map_err(|_| finished())?;
            }
            Phase::Created(c) => {
                // A created task has no process yet: killing it ends the VM.
                c.destroy().await;
                entry.init.exit.send_replace(Some(killed));
                let ev = entry.init.exit_event(&entry.id, killed);
                drop(phase);
                self.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(ev))
                    .await;
            }
            other => {
                *phase = other;
                return Err(finished());
            }
        }
        Ok(api::Empty::default())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> ttrpc::Result<api::WaitResponse> {
        let entry = self.get(&req.id)?;
        if req.exec_id.is_empty() {
            entry.init.wait().await
        } else {
            entry.exec(&req.exec_id)?.wait().await
        }
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> ttrpc::Result<api::DeleteResponse> {
        let entry = self.get(&req.id)?;
        if !req.exec_id.is_empty() {
            return delete_exec(&entry, &req.exec_id).await;
        }
        let mut phase = entry.init.phase.lock().await;
        match std::mem::replace(&mut *phase, Phase::Busy) {
            Phase::Running(r) => {
                if r.exited().is_none() {
                    *phase = Phase::Running(r);
                    return Err(status(
                        Code::FAILED_PRECONDITION,
                        format!("cannot delete running container {}", req.id),
                    ));
                }
                // A pod's later container leaves the VM running.
                if !r.is_member()
                    && tokio::time::timeout(TEARDOWN_WAIT, r.wait_torn_down())
                        .await
                        .is_err()
                {
                    tracing::warn!("the VM of {} is still being torn down", req.id);
                }
            }
            Phase::Created(c) => {
                c.destroy().await;
                entry.init.exit.send_replace(Some(Exit {
                    code: 0,
                    at: SystemTime::now(),
                    oom: false,
                }));
            }
            Phase::Busy | Phase::Stopped => {}
        }
        *phase = Phase::Stopped;
        drop(phase);
        if let Some((share, name)) = &entry.pod_share {
            agentvm::pod::unbind_root(share, name);
        }
        if entry.mounted_rootfs {
            crate::rootfs::unmount(&PathBuf::from(&entry.bundle).join("rootfs"));
        }
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&req.id);
        let exit = entry.exited().unwrap_or(Exit {
            code: 255,
            at: SystemTime::now(),
            oom: false,
        });
        let pid = entry.init.pid();
        let ctx = agentvm::hooks::HookContext {
            id: entry.id.clone(),
            bundle: entry.bundle.clone(),
            pid,
            annotations: entry.annotations.clone(),
        };
        // Failures of poststop hooks are logged, never fatal.
        let _ =
            agentvm::hooks::run(entry.hooks.as_ref(), agentvm::hooks::Phase::Poststop, &ctx).await;
        let ev = TaskDelete {
            container_id: entry.id.clone(),
            id: entry.id.clone(),
            pid,
            exit_status: exit.code as u32,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        };
        self.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.code as u32,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> ttrpc::Result<api::PidsResponse> {
        let entry = self.get(&req.id)?;
        Ok(api::PidsResponse {
            processes: vec![containerd_shim::protos::api::ProcessInfo {
                pid: entry.init.pid(),
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> ttrpc::Result<api::ConnectResponse> {
        let task_pid = self.get(&req.id).map(|e| e.init.pid()).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> ttrpc::Result<api::Empty> {
        // Exit only when no container is left (containerd calls this after each Delete).
        let empty = self
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty();
        if empty {
            self.exit.signal();
        }
        Ok(api::Empty::default())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> ttrpc::Result<api::Empty> {
        let entry = self.get(&req.id)?;
        if let Some(r) = entry.running(&req.exec_id).await? {
            let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
            let _ = r.resize(clamp(req.height), clamp(req.width));
        }
        Ok(api::Empty::default())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> ttrpc::Result<api::Empty> {
        let entry = self.get(&req.id)?;
        if req.stdin {
            let (fifo, close) = if req.exec_id.is_empty() {
                (
                    entry.init.io.stdin.is_empty(),
                    entry.init.stdin_close.clone(),
                )
            } else {
                let exec = entry.exec(&req.exec_id)?;
                (exec.io.stdin.is_empty(), exec.stdin_close.clone())
            };
            if fifo {
                if let Some(r) = entry.running(&req.exec_id).await? {
                    let _ = r.close_stdin();
                }
            } else {
                // Not the runtime's close_stdin: its EOF would overtake the data the client
                // wrote just before (ctr writes, then asks): the stdin ends after the fifo's.
                close.close();
            }
        }
        Ok(api::Empty::default())
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> ttrpc::Result<api::Empty> {
        let entry = self.get(&req.id)?;
        if entry.exited().is_some() {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("container {} is not running", req.id),
            ));
        }
        let spec_json = req
            .spec
            .as_ref()
            .map(|a| a.value.as_slice())
            .unwrap_or(b"{}");
        let mut spec = agentvm::oci::process_spec_json(spec_json)
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        spec.seccomp = entry.seccomp.clone();
        let policy = agentvm::oci::cap_policy(&entry.annotations)
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        agentvm::oci::apply_cap_policy(&mut spec, policy);
        spec.terminal = req.terminal;
        let io = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        {
            let mut execs = entry.execs.lock().unwrap_or_else(|p| p.into_inner());
            if execs.contains_key(&req.exec_id) {
                return Err(status(
                    Code::ALREADY_EXISTS,
                    format!("exec {} already exists", req.exec_id),
                ));
            }
            let exec = Proc::new(req.exec_id.clone(), io, 0, spec);
            execs.insert(req.exec_id.clone(), Arc::new(exec));
        }
        let ev = TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        self.publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(api::Empty::default())
    }

    async fn pause(
        &self,
        _ctx: &TtrpcContext,
        req: api::PauseRequest,
    ) -> ttrpc::Result<api::Empty> {
        let running = self.running_init(&req.id).await?;
        running.pause().await.map_err(internal)?;
        let ev = TaskPaused {
            container_id: req.id.clone(),
            ..Default::default()
        };
        self.publish(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(api::Empty::default())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> ttrpc::Result<api::Empty> {
        let running = self.running_init(&req.id).await?;
        running.resume().await.map_err(internal)?;
        let ev = TaskResumed {
            container_id: req.id.clone(),
            ..Default::default()
        };
        self.publish(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(api::Empty::default())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> ttrpc::Result<api::Empty> {
        Err(unimplemented("checkpoint"))
    }

    /// `docker update`: the container's cgroup limits in the guest; what the VM cannot
    /// change (cpuset, block I/O, ...) is logged and skipped, memory above the VM refused.
    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> ttrpc::Result<api::Empty> {
        let running = self.running_init(&req.id).await?;
        let Some(update) = parse_update(&req)? else {
            return Ok(api::Empty::default());
        };
        if running.vm_paused() {
            // The frozen agent could not answer (a pod's frozen container's agent can).
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("container {} is paused: unpause it to update it", req.id),
            ));
        }
        for what in &update.ignored {
            tracing::warn!(
                "container {}: update ignores {what}: a running VM cannot change it",
                req.id
            );
        }
        let skipped = running.update(update.limits).await.map_err(rpc_error)?;
        for file in skipped {
            tracing::info!("container {}: the guest has no {file}; skipped", req.id);
        }
        Ok(api::Empty::default())
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> ttrpc::Result<api::StatsResponse> {
        let running = self.running_init(&req.id).await?;
        if running.vm_paused() {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("container {} is paused", req.id),
            ));
        }
        let s = running.stats().await.map_err(internal)?;
        Ok(api::StatsResponse {
            stats: MessageField::some(metrics_any(&s).map_err(internal)?),
            ..Default::default()
        })
    }
}

/// The limits of an `UpdateTaskRequest`; `None` when it carries no resources.
fn parse_update(req: &api::UpdateTaskRequest) -> ttrpc::Result<Option<agentvm::resources::Update>> {
    match req.resources.as_ref() {
        Some(any) if !any.type_url.is_empty() || !any.value.is_empty() => {
            agentvm::resources::parse(&any.type_url, &any.value)
                .map(Some)
                .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))
        }
        _ => Ok(None),
    }
}

/// The guest's figures as containerd's cgroup v2 `Metrics`, which Docker decodes for
/// `docker stats` (NET I/O it reads itself from the container's network namespace).
fn metrics_any(s: &GuestStats) -> Result<Any, protobuf::Error> {
    let m = Metrics {
        pids: MessageField::some(PidsStat {
            current: s.pids,
            ..Default::default()
        }),
        cpu: MessageField::some(CPUStat {
            usage_usec: s.cpu_usage_usec,
            user_usec: s.cpu_user_usec,
            system_usec: s.cpu_system_usec,
            ..Default::default()
        }),
        memory: MessageField::some(MemoryStat {
            usage: s.memory_usage,
            usage_limit: s.memory_limit,
            anon: s.memory_anon,
            file: s.memory_file,
            active_file: s.memory_active_file,
            inactive_file: s.memory_inactive_file,
            ..Default::default()
        }),
        memory_events: MessageField::some(MemoryEvents {
            oom_kill: s.oom_kills,
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(Any {
        type_url: METRICS_TYPE_URL.to_string(),
        value: m.write_to_bytes()?,
        ..Default::default()
    })
}

/// The type URL containerd's runc shim gives cgroup v2 metrics (`typeurl` registry name).
const METRICS_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

#[cfg(test)]
mod tests {
    use super::*;

    /// An Exec request as containerd sends it: the process spec (JSON) as an `Any`.
    fn exec_request(id: &str, exec_id: &str, spec: Vec<u8>) -> api::ExecProcessRequest {
        api::ExecProcessRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            spec: MessageField::some(Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
                value: spec,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A container entry of the fake-agent tests: `init` is its init process, no hooks or
    /// annotations, nothing mounted by the shim.
    fn test_entry(
        id: &str,
        bundle: &std::path::Path,
        init: Proc<Box<Created>>,
        pod_share: Option<(std::path::PathBuf, String)>,
    ) -> Entry {
        Entry {
            id: id.into(),
            bundle: bundle.display().to_string(),
            mounted_rootfs: false,
            hooks: None,
            annotations: HashMap::new(),
            seccomp: None,
            init,
            execs: Mutex::new(HashMap::new()),
            pod_share,
        }
    }

    #[test]
    fn guest_stats_become_cgroup_v2_metrics() {
        let any = metrics_any(&GuestStats {
            cpu_usage_usec: 7,
            memory_usage: 100,
            memory_limit: 1000,
            pids: 4,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
        let m = Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(m.cpu.usage_usec, 7);
        assert_eq!((m.memory.usage, m.memory.usage_limit), (100, 1000));
        assert_eq!(m.pids.current, 4);
    }

    #[test]
    fn update_requests_carry_oci_linux_resources() {
        let req = |type_url: &str, json: &str| api::UpdateTaskRequest {
            id: "c".into(),
            resources: MessageField::some(Any {
                type_url: type_url.into(),
                value: json.as_bytes().to_vec(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let u = parse_update(&req(
            agentvm::resources::LINUX_RESOURCES_TYPE_URL,
            r#"{"memory":{"limit":67108864},"pids":{"limit":50},"cpu":{"cpus":"0"}}"#,
        ))
        .unwrap()
        .unwrap();
        assert_eq!(u.limits.memory_max, Some(64 << 20));
        assert_eq!(u.limits.pids_max, Some(50));
        assert_eq!(u.ignored.len(), 1);
        let code = |e: ttrpc::Error| match e {
            ttrpc::Error::RpcStatus(s) => s.code(),
            other => panic!("not a status: {other:?}"),
        };
        let bad = parse_update(&req("types.example/Other", "{}")).unwrap_err();
        assert_eq!(code(bad), Code::INVALID_ARGUMENT);
        let none = api::UpdateTaskRequest::default();
        assert!(parse_update(&none).unwrap().is_none());
    }

    #[test]
    fn runtime_errors_map_to_the_codes_callers_act_on() {
        use agentvm::Error as E;
        let io = |errno| std::io::Error::from_raw_os_error(errno);
        let cases = [
            (E::Invalid("hostNetwork".into()), Code::INVALID_ARGUMENT),
            (
                E::Missing {
                    what: "guest kernel".into(),
                    hint: "run hack/setup.sh".into(),
                },
                Code::FAILED_PRECONDITION,
            ),
            (
                E::Secret(agentvm::secrets::SecretError::Missing {
                    name: "TOKEN".into(),
                    dir: "/var/lib/agentvm/secrets".into(),
                }),
                Code::FAILED_PRECONDITION,
            ),
            (
                E::Secret(agentvm::secrets::SecretError::BadName("a b".into())),
                Code::INVALID_ARGUMENT,
            ),
            (
                E::Io {
                    action: "write",
                    path: "/var/lib/agentvm/x".into(),
                    source: io(libc::ENOSPC),
                },
                Code::RESOURCE_EXHAUSTED,
            ),
            (
                E::Spawn {
                    program: "qemu".into(),
                    source: io(libc::EAGAIN),
                },
                Code::RESOURCE_EXHAUSTED,
            ),
            (
                E::Io {
                    action: "read",
                    path: "/x".into(),
                    source: io(libc::EACCES),
                },
                Code::UNKNOWN,
            ),
            (
                E::Boot {
                    reason: "timeout".into(),
                    console: String::new(),
                },
                Code::UNKNOWN,
            ),
            (
                E::VmDied {
                    reason: "killed".into(),
                    console: String::new(),
                },
                Code::UNKNOWN,
            ),
            (E::Agent("x".into()), Code::UNKNOWN),
        ];
        for (e, want) in cases {
            let text = e.to_string();
            let got = rpc_error(e);
            match got {
                ttrpc::Error::RpcStatus(s) => {
                    assert_eq!((s.code(), s.message()), (want, text.as_str()))
                }
                other => panic!("not a status: {other:?}"),
            }
        }
    }

    #[test]
    fn sandbox_ids_are_stable_and_valid() {
        let docker = "a".repeat(64);
        assert_eq!(sandbox_id(&docker).unwrap(), docker);
        assert_eq!(sandbox_id("my.ctr/1").unwrap(), "my_ctr_1");
        assert_eq!(
            sandbox_id("my.ctr/1").unwrap(),
            sandbox_id("my.ctr/1").unwrap()
        );
        assert_eq!(sandbox_id(&"x.".repeat(40)).unwrap().len(), 64);
        assert!(sandbox_id("").is_err());
    }

    #[test]
    fn statuses_carry_the_codes_callers_act_on() {
        let code = |e: ttrpc::Error| match e {
            ttrpc::Error::RpcStatus(s) => s.code(),
            other => panic!("not a status: {other:?}"),
        };
        assert_eq!(code(not_found("x")), Code::NOT_FOUND);
        assert_eq!(code(unimplemented("pause")), Code::UNIMPLEMENTED);
    }

    /// The create's secrets: none asked, none read; a missing one fails with its name
    /// (FAILED_PRECONDITION), a bad annotation as INVALID_ARGUMENT; no value in any error.
    #[test]
    fn secrets_resolve_at_create_or_fail_naming_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        // No other test of this binary reads these.
        std::env::set_var("AGENTVM_SECRETS_DIR", dir.path().join("secrets"));
        std::env::set_var("AGENTVM_SECRETS_KEY", dir.path().join("secrets.key"));
        agentvm::secrets::Store::host()
            .set("TOKEN", b"tok-value")
            .unwrap();
        let ann =
            |v: &str| HashMap::from([(agentvm::secrets::ANNOTATION.to_string(), v.to_string())]);
        let status = |e: ttrpc::Error| match e {
            ttrpc::Error::RpcStatus(s) => (s.code(), s.message),
            other => panic!("not a status: {other:?}"),
        };
        assert!(resolve_secrets("c", &HashMap::new()).unwrap().is_empty());
        let got = resolve_secrets("c", &ann("TOKEN")).unwrap();
        assert_eq!(got[0].value.as_bytes(), b"tok-value");
        let (code, msg) = status(resolve_secrets("c", &ann("TOKEN,GONE")).unwrap_err());
        assert_eq!(code, Code::FAILED_PRECONDITION);
        assert!(
            msg.contains("container c") && msg.contains("\"GONE\" is not set"),
            "{msg}"
        );
        assert!(!msg.contains("tok-value"), "{msg}");
        let (code, msg) = status(resolve_secrets("c", &ann("../etc")).unwrap_err());
        assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
    }

    #[test]
    fn timestamps_split_seconds_and_nanos() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(5, 7);
        let ts = timestamp(t);
        assert_eq!((ts.seconds, ts.nanos), (5, 7));
    }

    /// The shim against a fake agent over socketpairs, with a fake containerd events
    /// service recording what is published.
    mod hostile_agent {
        use std::os::unix::net::UnixListener;

        use agentvm::container::testing::Dials;
        use agentvm::vmm::AgentIo;
        use agentvm_protocol::{tokio_io, ExitStatus, Frame, Message, VERSION};
        use containerd_shim::protos::api::{Empty, ForwardRequest};
        use containerd_shim::protos::shim_async::{create_events, Events};
        use containerd_shim::protos::ttrpc::asynchronous::{transport::Listener, Server};
        use tokio::net::UnixStream;
        use tokio::sync::mpsc;

        use super::*;

        /// Records every event as (topic, event).
        pub(super) struct Recorder(pub(super) mpsc::UnboundedSender<(String, Any)>);

        #[async_trait]
        impl Events for Recorder {
            async fn forward(
                &self,
                _ctx: &TtrpcContext,
                req: ForwardRequest,
            ) -> ttrpc::Result<Empty> {
                let env = req.envelope();
                let _ = self
                    .0
                    .send((env.topic.clone(), env.event.clone().unwrap_or_default()));
                Ok(Empty::default())
            }
        }

        /// A greeted socketpair: the host's end and the agent's.
        async fn pair() -> (Box<dyn AgentIo>, UnixStream) {
            let (host, mut agent) = UnixStream::pair().unwrap();
            let hello = Frame::Msg(Message::Hello {
                version: VERSION,
                uptime_ms: 1,
            });
            tokio_io::write_frame(&mut agent, &hello).await.unwrap();
            (Box::new(host), agent)
        }

        /// The next control message the host sent (stdin frames skipped).
        async fn recv(agent: &mut UnixStream) -> Message {
            loop {
                match tokio_io::read_frame(agent).await.unwrap() {
                    Some(Frame::Msg(m)) => return m,
                    Some(Frame::Data(..)) => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
        }

        async fn send(agent: &mut UnixStream, m: Message) {
            tokio_io::write_frame(agent, &Frame::Msg(m)).await.unwrap();
        }

        pub(super) fn ctx() -> TtrpcContext {
            TtrpcContext {
                mh: Default::default(),
                metadata: Default::default(),
                timeout_nano: 0,
            }
        }

        struct Harness {
            svc: TaskService,
            events: mpsc::UnboundedReceiver<(String, Any)>,
            dials: Arc<Dials>,
            holder: tokio::process::Child,
            init_agent: UnixStream,
            _server: Server,
            _dir: tempfile::TempDir,
        }

        impl Harness {
            /// A running container "c" whose task pid is a real host process (the holder) and
            /// whose init process's agent is `init_agent`.
            async fn new() -> Harness {
                let dir = tempfile::tempdir().unwrap();
                let sock = dir.path().join("events.sock");
                let (tx, events) = mpsc::unbounded_channel();
                let listener = Listener::try_from(UnixListener::bind(&sock).unwrap()).unwrap();
                let mut server = Server::new()
                    .add_listener(listener)
                    .register_service(create_events(Arc::new(Recorder(tx))));
                server.start().await.unwrap();
                let publisher = RemotePublisher::new(sock.to_str().unwrap()).await.unwrap();
                let svc = TaskService::new("ns".into(), publisher, Arc::new(ExitSignal::default()));

                let holder = tokio::process::Command::new("sleep")
                    .arg("60")
                    .kill_on_drop(true)
                    .spawn()
                    .unwrap();
                let host_pid = holder.id().unwrap();
                let dials = Arc::new(Dials::default());
                let (host, mut init_agent) = pair().await;
                let ((init, started), ()) = tokio::join!(
                    agentvm::container::testing::fake_init(
                        host,
                        dials.clone(),
                        host_pid,
                        Default::default()
                    ),
                    async {
                        let Message::Start(_) = recv(&mut init_agent).await else {
                            panic!("expected Start")
                        };
                        // A fake agent claiming to be host pid 1.
                        send(&mut init_agent, Message::Started { pid: 1 }).await;
                    }
                );
                assert_eq!(started.unwrap(), host_pid);
                let init = Proc {
                    id: "c".into(),
                    io: Stdio::default(),
                    stdin_close: Default::default(),
                    pid: AtomicU32::new(host_pid),
                    phase: tokio::sync::Mutex::new(Phase::Running(init)),
                    exit: watch::channel(None).0,
                };
                let entry = super::test_entry("c", dir.path(), init, None);
                svc.containers
                    .lock()
                    .unwrap()
                    .insert("c".into(), Arc::new(entry));
                Harness {
                    svc,
                    events,
                    dials,
                    holder,
                    init_agent,
                    _server: server,
                    _dir: dir,
                }
            }

            fn host_pid(&self) -> u32 {
                self.holder.id().unwrap()
            }

            async fn add_exec(&self, exec_id: &str) {
                let spec = br#"{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}}"#;
                let req = exec_request("c", exec_id, spec.to_vec());
                self.svc.exec(&ctx(), req).await.unwrap();
            }

            async fn start_exec(&self, exec_id: &str) -> ttrpc::Result<api::StartResponse> {
                let req = api::StartRequest {
                    id: "c".into(),
                    exec_id: exec_id.into(),
                    ..Default::default()
                };
                self.svc.start(&ctx(), req).await
            }

            /// The next event of `topic` (others skipped), within 5 s.
            async fn event(&mut self, topic: &str) -> Any {
                loop {
                    let (t, ev) = tokio::time::timeout(Duration::from_secs(5), self.events.recv())
                        .await
                        .unwrap_or_else(|_| panic!("no {topic} event within 5 s"))
                        .unwrap();
                    if t == topic {
                        return ev;
                    }
                }
            }
        }

        #[tokio::test]
        async fn no_guest_pid_is_published_and_a_forged_oom_touches_no_host_process() {
            let mut h = Harness::new().await;
            let host_pid = h.host_pid();
            h.add_exec("e1").await;
            let (host, mut agent) = pair().await;
            h.dials.0.lock().unwrap().push(host);
            let (resp, ()) = tokio::join!(h.start_exec("e1"), async {
                let Message::Start(_) = recv(&mut agent).await else {
                    panic!("expected Start")
                };
                send(&mut agent, Message::Started { pid: 1 }).await;
            });
            assert_eq!(resp.unwrap().pid, host_pid);
            let ev = h.event(topics::TASK_EXEC_STARTED_EVENT_TOPIC).await;
            let ev = TaskExecStarted::parse_from_bytes(&ev.value).unwrap();
            assert_eq!((ev.exec_id.as_str(), ev.pid), ("e1", host_pid));
            let state = h
                .svc
                .state(
                    &ctx(),
                    api::StateRequest {
                        id: "c".into(),
                        exec_id: "e1".into(),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            assert_eq!(state.pid, host_pid);

            // A forged OOM with a nonsense exit code.
            send(
                &mut agent,
                Message::Exited(ExitStatus {
                    code: -1,
                    signal: None,
                    oom: true,
                }),
            )
            .await;
            let oom = h.event(topics::TASK_OOM_EVENT_TOPIC).await;
            let oom = TaskOOM::parse_from_bytes(&oom.value).unwrap();
            assert_eq!(oom.container_id, "c");
            let exit = h.event(topics::TASK_EXIT_EVENT_TOPIC).await;
            let exit = TaskExit::parse_from_bytes(&exit.value).unwrap();
            assert_eq!(
                (exit.id.as_str(), exit.pid, exit.exit_status),
                ("e1", host_pid, 255)
            );
            // The host process the pids point at was never signalled.
            assert!(h.holder.try_wait().unwrap().is_none());
            // Still a working container: its init is killable.
            let kill = api::KillRequest {
                id: "c".into(),
                signal: libc::SIGKILL as u32,
                ..Default::default()
            };
            h.svc.kill(&ctx(), kill).await.unwrap();
            assert_eq!(
                recv(&mut h.init_agent).await,
                Message::Signal {
                    signal: libc::SIGKILL
                }
            );
        }

        /// A pod's later container in the running pod VM of "c" (its sandbox): Start sends the
        /// agent a Start that creates container "m" (its root from the pod share) and
        /// publishes TaskStart with the pod's host pid; an exec of "m" runs in "m"; "m"'s
        /// exit is published, Delete answers at once (no VM teardown) and unbinds its root;
        /// the sandbox's VM was never asked to stop.
        #[tokio::test]
        async fn a_second_container_runs_in_the_running_pod_vm_and_leaves_it_running() {
            let mut h = Harness::new().await;
            let host_pid = h.host_pid();
            let sandbox = h.svc.get("c").unwrap();
            let bundle = tempfile::tempdir().unwrap();
            let share = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(share.path().join("m/rootfs")).unwrap();
            let request = agentvm_protocol::StartRequest {
                rootfs: agentvm_protocol::RootfsSpec {
                    device: agentvm::pod::SHARE_TAG.into(),
                    fstype: "virtiofs".into(),
                    overlay: false,
                    options: None,
                    layers: None,
                    subdir: Some("m/rootfs".into()),
                },
                process: ProcessSpec {
                    args: vec!["httpd".into()],
                    ..Default::default()
                },
                hostname: None,
                init: false,
                pid_namespace: false,
                network: None,
                mounts: Vec::new(),
                sysctls: Default::default(),
                container: Some(agentvm_protocol::PodContainer {
                    id: "m".into(),
                    create: true,
                    own_pid_namespace: true,
                    readonly_root: false,
                    limits: None,
                }),
                secrets: Vec::new(),
                masked_paths: Vec::new(),
                readonly_paths: Vec::new(),
            };
            let init = Proc::new(
                "m".into(),
                Stdio::default(),
                host_pid,
                Box::new(Created::Member {
                    sandbox,
                    request: Box::new(request),
                }),
            );
            let entry = super::test_entry(
                "m",
                bundle.path(),
                init,
                Some((share.path().to_path_buf(), "m".into())),
            );
            h.svc
                .containers
                .lock()
                .unwrap()
                .insert("m".into(), Arc::new(entry));

            let (host, mut agent) = pair().await;
            h.dials.0.lock().unwrap().push(host);
            let start = api::StartRequest {
                id: "m".into(),
                ..Default::default()
            };
            let c = ctx();
            let (resp, ()) = tokio::join!(h.svc.start(&c, start), async {
                let Message::Start(req) = recv(&mut agent).await else {
                    panic!("expected Start")
                };
                let c = req.container.expect("a pod container");
                assert!(c.create && c.id == "m");
                assert_eq!(req.rootfs.subdir.as_deref(), Some("m/rootfs"));
                assert!(!req.init, "its exit must not power the VM off");
                send(&mut agent, Message::Started { pid: 1 }).await;
            });
            assert_eq!(resp.unwrap().pid, host_pid);
            let ev = h.event(topics::TASK_START_EVENT_TOPIC).await;
            let ev = TaskStart::parse_from_bytes(&ev.value).unwrap();
            assert_eq!((ev.container_id.as_str(), ev.pid), ("m", host_pid));

            // An exec of "m" runs in "m".
            let spec = br#"{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}}"#;
            let exec = api::ExecProcessRequest {
                id: "m".into(),
                exec_id: "e".into(),
                spec: MessageField::some(Any {
                    type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
                    value: spec.to_vec(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            h.svc.exec(&ctx(), exec).await.unwrap();
            let (host, mut exec_agent) = pair().await;
            h.dials.0.lock().unwrap().push(host);
            let start = api::StartRequest {
                id: "m".into(),
                exec_id: "e".into(),
                ..Default::default()
            };
            let c = ctx();
            let (resp, ()) = tokio::join!(h.svc.start(&c, start), async {
                let Message::Start(req) = recv(&mut exec_agent).await else {
                    panic!("expected Start")
                };
                let c = req.container.expect("an exec of the pod container");
                assert!(!c.create && c.id == "m");
                send(&mut exec_agent, Message::Started { pid: 7 }).await;
            });
            assert_eq!(resp.unwrap().pid, host_pid);
            send(&mut exec_agent, Message::Exited(ExitStatus::exited(0))).await;
            drop(exec_agent);

            // "m" ends; the pod's VM does not.
            send(&mut agent, Message::Exited(ExitStatus::exited(3))).await;
            let mut exits = Vec::new();
            for _ in 0..2 {
                let exit = h.event(topics::TASK_EXIT_EVENT_TOPIC).await;
                let exit = TaskExit::parse_from_bytes(&exit.value).unwrap();
                exits.push((exit.container_id, exit.id, exit.exit_status));
            }
            let ids = |c: &str, i: &str, code| (c.to_string(), i.to_string(), code);
            assert_eq!(
                exits,
                [ids("m", "e", 0), ids("m", "m", 3)],
                "the exec's exit first"
            );
            let del = api::DeleteRequest {
                id: "m".into(),
                ..Default::default()
            };
            let t = std::time::Instant::now();
            let resp = h.svc.delete(&ctx(), del).await.unwrap();
            assert_eq!(resp.exit_status, 3);
            assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
            assert!(
                !share.path().join("m").exists(),
                "its directory in the share is gone"
            );
            assert!(h.svc.get("m").is_err());
            // The sandbox still runs, and its agent was asked nothing.
            assert!(h.svc.get("c").unwrap().exited().is_none());
            assert!(
                tokio::time::timeout(Duration::from_millis(200), recv(&mut h.init_agent))
                    .await
                    .is_err(),
                "the sandbox's init got no message"
            );
            // Shutdown keeps the shim while the sandbox is there.
            h.svc
                .shutdown(&ctx(), api::ShutdownRequest::default())
                .await
                .unwrap();
            assert!(
                tokio::time::timeout(Duration::from_millis(100), h.svc.exit.wait())
                    .await
                    .is_err(),
                "the shim stays for the sandbox"
            );
        }

        #[tokio::test]
        async fn a_huge_guest_error_reaches_containerd_capped() {
            let h = Harness::new().await;
            h.add_exec("e2").await;
            let (host, mut agent) = pair().await;
            h.dials.0.lock().unwrap().push(host);
            let (resp, ()) = tokio::join!(h.start_exec("e2"), async {
                let Message::Start(_) = recv(&mut agent).await else {
                    panic!("expected Start")
                };
                let message = "\n".repeat(agentvm_protocol::MAX_FRAME / 2 - 64);
                send(
                    &mut agent,
                    Message::Error {
                        message,
                        exit_code: Some(127),
                    },
                )
                .await;
                send(&mut agent, Message::Exited(ExitStatus::exited(127))).await;
            });
            let ttrpc::Error::RpcStatus(st) = resp.unwrap_err() else {
                panic!("not a status")
            };
            assert!(
                st.message.len() <= agentvm::guest::MAX_GUEST_TEXT + 100,
                "{} bytes",
                st.message.len()
            );
            assert!(st.message.contains("more bytes cut]"));
            assert!(!st.message.contains('\n'));
        }

        #[tokio::test]
        async fn a_stalled_exec_blocks_neither_the_init_kill_nor_other_execs() {
            let mut h = Harness::new().await;
            let host_pid = h.host_pid();
            h.add_exec("stalled").await;
            h.add_exec("ok").await;
            // Accepted by the "guest", never greeted.
            let (stalled_host, _stalled_agent) = UnixStream::pair().unwrap();
            h.dials.0.lock().unwrap().push(Box::new(stalled_host));
            let svc = Arc::new(h.svc);
            let stalled = tokio::spawn({
                let svc = Arc::clone(&svc);
                async move {
                    let req = api::StartRequest {
                        id: "c".into(),
                        exec_id: "stalled".into(),
                        ..Default::default()
                    };
                    svc.start(&ctx(), req).await
                }
            });
            // Let the stalled start take its connection first.
            while !h.dials.0.lock().unwrap().is_empty() {
                tokio::task::yield_now().await;
            }
            let t = tokio::time::Instant::now();
            let (host, mut agent) = pair().await;
            h.dials.0.lock().unwrap().push(host);
            let req = api::StartRequest {
                id: "c".into(),
                exec_id: "ok".into(),
                ..Default::default()
            };
            let c = ctx();
            let (resp, ()) = tokio::join!(svc.start(&c, req), async {
                let Message::Start(_) = recv(&mut agent).await else {
                    panic!("expected Start")
                };
                send(&mut agent, Message::Started { pid: 2 }).await;
            });
            assert_eq!(resp.unwrap().pid, host_pid);
            let kill = api::KillRequest {
                id: "c".into(),
                signal: libc::SIGKILL as u32,
                ..Default::default()
            };
            svc.kill(&ctx(), kill).await.unwrap();
            assert_eq!(
                recv(&mut h.init_agent).await,
                Message::Signal {
                    signal: libc::SIGKILL
                }
            );
            send(&mut h.init_agent, Message::Exited(ExitStatus::signaled(9))).await;
            let init = svc.get("c").unwrap().init.running().await.unwrap();
            assert_eq!(init.wait().await.code, 137);
            assert!(!stalled.is_finished());
            // The stalled exec itself is killable: its start ends, with 137.
            let kill = api::KillRequest {
                id: "c".into(),
                exec_id: "stalled".into(),
                signal: libc::SIGKILL as u32,
                ..Default::default()
            };
            svc.kill(&ctx(), kill).await.unwrap();
            let start = tokio::time::timeout(Duration::from_secs(2), stalled)
                .await
                .expect("the stalled start did not end at its kill")
                .unwrap();
            assert!(start.is_err());
            let wait = api::WaitRequest {
                id: "c".into(),
                exec_id: "stalled".into(),
                ..Default::default()
            };
            assert_eq!(svc.wait(&ctx(), wait).await.unwrap().exit_status, 137);
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "took {:?}",
                t.elapsed()
            );
        }
    }

    /// The Task service over the real guest agent's server on a simulated machine
    /// (`agentvm::fakevm`): containers are created from bundles through `create`, their VMs
    /// launched by the fake backend, which counts them.
    mod on_the_real_agent {
        use std::os::unix::net::UnixListener;
        use std::sync::OnceLock;

        use agentvm::fakevm::FakeVmm;
        use containerd_shim::protos::shim_async::create_events;
        use containerd_shim::protos::ttrpc::asynchronous::{transport::Listener, Server};
        use tokio::sync::mpsc;

        use super::hostile_agent::{ctx, Recorder};
        use super::*;

        /// The state root of every sandbox of this test binary (set once: an env var).
        fn state_root() -> &'static std::path::Path {
            static ROOT: OnceLock<tempfile::TempDir> = OnceLock::new();
            ROOT.get_or_init(|| {
                let dir = tempfile::tempdir().unwrap();
                std::env::set_var("AGENTVM_STATE_ROOT", dir.path());
                dir
            })
            .path()
        }

        struct Harness {
            svc: TaskService,
            backend: Arc<FakeVmm>,
            events: mpsc::UnboundedReceiver<(String, Any)>,
            dir: tempfile::TempDir,
            _server: Server,
        }

        const SANDBOX_ANNOTATIONS: &str = r#"{"io.kubernetes.cri.container-type":"sandbox","io.kubernetes.cri.sandbox-id":"pod1"}"#;
        const MEMBER_ANNOTATIONS: &str = r#"{"io.kubernetes.cri.container-type":"container","io.kubernetes.cri.sandbox-id":"pod1"}"#;

        impl Harness {
            async fn new() -> Harness {
                state_root();
                let dir = tempfile::tempdir().unwrap();
                let sock = dir.path().join("events.sock");
                let (tx, events) = mpsc::unbounded_channel();
                let listener = Listener::try_from(UnixListener::bind(&sock).unwrap()).unwrap();
                let mut server = Server::new()
                    .add_listener(listener)
                    .register_service(create_events(Arc::new(Recorder(tx))));
                server.start().await.unwrap();
                let publisher = RemotePublisher::new(sock.to_str().unwrap()).await.unwrap();
                let backend = Arc::new(FakeVmm::default());
                let svc = TaskService::new("ns".into(), publisher, Arc::new(ExitSignal::default()))
                    .with_backend(backend.clone());
                Harness {
                    svc,
                    backend,
                    events,
                    dir,
                    _server: server,
                }
            }

            /// Creates container `id` from a bundle running `script` with `annotations`.
            async fn create(
                &self,
                id: &str,
                script: &str,
                annotations: &str,
            ) -> ttrpc::Result<api::CreateTaskResponse> {
                let bundle = self.dir.path().join(id);
                std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
                let spec = format!(
                    r#"{{"ociVersion":"1.0.2",
                        "process":{{"args":["sh","-c",{}],"cwd":"/",
                                    "env":["PATH=/usr/bin:/bin"],"user":{{"uid":0,"gid":0}}}},
                        "root":{{"path":"rootfs"}},
                        "linux":{{"namespaces":[{{"type":"network"}},{{"type":"pid"}},
                                                {{"type":"mount"}},{{"type":"ipc"}},{{"type":"uts"}}]}},
                        "annotations":{annotations}}}"#,
                    serde_json::to_string(script).unwrap()
                );
                std::fs::write(bundle.join("config.json"), spec).unwrap();
                let req = api::CreateTaskRequest {
                    id: id.into(),
                    bundle: bundle.display().to_string(),
                    ..Default::default()
                };
                self.svc.create(&ctx(), req).await
            }

            async fn start(&self, id: &str, exec_id: &str) -> ttrpc::Result<api::StartResponse> {
                let req = api::StartRequest {
                    id: id.into(),
                    exec_id: exec_id.into(),
                    ..Default::default()
                };
                self.svc.start(&ctx(), req).await
            }

            async fn kill(&self, id: &str, signal: i32) -> ttrpc::Result<api::Empty> {
                let req = api::KillRequest {
                    id: id.into(),
                    signal: signal as u32,
                    ..Default::default()
                };
                self.svc.kill(&ctx(), req).await
            }

            async fn wait(&self, id: &str, exec_id: &str) -> u32 {
                let req = api::WaitRequest {
                    id: id.into(),
                    exec_id: exec_id.into(),
                    ..Default::default()
                };
                let c = ctx();
                let w = tokio::time::timeout(Duration::from_secs(20), self.svc.wait(&c, req));
                w.await.expect("no exit within 20 s").unwrap().exit_status
            }

            async fn delete(&self, id: &str) -> ttrpc::Result<api::DeleteResponse> {
                let req = api::DeleteRequest {
                    id: id.into(),
                    ..Default::default()
                };
                self.svc.delete(&ctx(), req).await
            }

            async fn exec(&self, id: &str, exec_id: &str, script: &str) {
                let spec = format!(
                    r#"{{"args":["sh","-c",{}],"cwd":"/","env":["PATH=/usr/bin:/bin"],"user":{{"uid":0,"gid":0}}}}"#,
                    serde_json::to_string(script).unwrap()
                );
                let req = super::exec_request(id, exec_id, spec.into_bytes());
                self.svc.exec(&ctx(), req).await.unwrap();
            }

            /// The topics published so far (waiting `settle` for stragglers).
            /// The topics published: at least `expected` of them (waited for up to 20 s: a
            /// loaded machine delays the publisher), then whatever follows within 300 ms.
            async fn topics(&mut self, expected: usize) -> Vec<String> {
                let mut out = Vec::new();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
                while out.len() < expected {
                    match tokio::time::timeout_at(deadline, self.events.recv()).await {
                        Ok(Some((t, _))) => out.push(t),
                        _ => break,
                    }
                }
                let settle = Duration::from_millis(300);
                while let Ok(Some((t, _))) = tokio::time::timeout(settle, self.events.recv()).await
                {
                    out.push(t);
                }
                out
            }
        }

        fn code(e: ttrpc::Error) -> Code {
            match e {
                ttrpc::Error::RpcStatus(s) => s.code(),
                other => panic!("not a status: {other:?}"),
            }
        }

        /// A whole lifecycle: TaskCreate < TaskStart < TaskExit < TaskDelete, the exit code
        /// the agent reported, one VM launched and gone after Delete.
        #[tokio::test]
        async fn events_come_in_order_create_start_exit_delete() {
            let mut h = Harness::new().await;
            h.create("life", "exit 7", "{}").await.unwrap();
            assert_eq!(h.backend.launches(), 0, "the VM boots at start");
            h.start("life", "").await.unwrap();
            assert_eq!(h.wait("life", "").await, 7);
            let del = h.delete("life").await.unwrap();
            assert_eq!(del.exit_status, 7);
            assert_eq!(
                h.topics(4).await,
                [
                    topics::TASK_CREATE_EVENT_TOPIC,
                    topics::TASK_START_EVENT_TOPIC,
                    topics::TASK_EXIT_EVENT_TOPIC,
                    topics::TASK_DELETE_EVENT_TOPIC
                ]
            );
            assert_eq!(h.backend.launches(), 1);
            let vm = &h.backend.vms()[0];
            assert!(vm.ended().is_some(), "the VM is gone after Delete");
            assert!(vm.live_pids().is_empty());
            assert!(!state_root().join("life").exists(), "its state dir is gone");
        }

        /// A kill before start ends the created task (137 published as its exit) without a
        /// VM; it cannot start afterwards, and Delete reports the kill.
        #[tokio::test]
        async fn kill_before_start_ends_the_task_without_a_vm() {
            let mut h = Harness::new().await;
            h.create("early", "sleep 30", "{}").await.unwrap();
            h.kill("early", libc::SIGKILL).await.unwrap();
            assert_eq!(h.wait("early", "").await, 137);
            let e = h.start("early", "").await.unwrap_err();
            assert_eq!(code(e), Code::FAILED_PRECONDITION);
            assert_eq!(h.delete("early").await.unwrap().exit_status, 137);
            assert_eq!(
                h.topics(3).await,
                [
                    topics::TASK_CREATE_EVENT_TOPIC,
                    topics::TASK_EXIT_EVENT_TOPIC,
                    topics::TASK_DELETE_EVENT_TOPIC
                ]
            );
            assert_eq!(h.backend.launches(), 0);
            assert!(!state_root().join("early").exists());
        }

        /// As runc's shim: Delete of a running container is refused (the process keeps
        /// running); after a kill it succeeds. Pause and resume reach the VM.
        #[tokio::test]
        async fn delete_while_running_is_refused() {
            let h = Harness::new().await;
            h.create("busy", "sleep 30", "{}").await.unwrap();
            h.start("busy", "").await.unwrap();
            let e = h.delete("busy").await.unwrap_err();
            assert_eq!(code(e), Code::FAILED_PRECONDITION);
            let vm = h.backend.vms()[0].clone();
            assert_eq!(vm.live_pids().len(), 1, "still running");
            let pause = api::PauseRequest {
                id: "busy".into(),
                ..Default::default()
            };
            h.svc.pause(&ctx(), pause).await.unwrap();
            assert_eq!(vm.paused(), (true, 1));
            // A SIGKILL lands on a paused VM: it is resumed first.
            h.kill("busy", libc::SIGKILL).await.unwrap();
            assert_eq!(vm.paused(), (false, 1));
            assert_eq!(h.wait("busy", "").await, 137);
            assert_eq!(h.delete("busy").await.unwrap().exit_status, 137);
            assert!(vm.ended().is_some() && vm.live_pids().is_empty());
        }

        /// An exec in a running container runs in its VM, its exit reported; the init's exit
        /// follows.
        #[tokio::test]
        async fn exec_reports_its_own_exit() {
            let h = Harness::new().await;
            h.create("ex", "sleep 30", "{}").await.unwrap();
            h.start("ex", "").await.unwrap();
            h.exec("ex", "e1", "exit 5").await;
            h.start("ex", "e1").await.unwrap();
            assert_eq!(h.wait("ex", "e1").await, 5);
            assert_eq!(h.backend.launches(), 1);
            h.kill("ex", libc::SIGTERM).await.unwrap();
            assert_eq!(h.wait("ex", "").await, 128 + libc::SIGTERM as u32);
            h.delete("ex").await.unwrap();
        }

        /// A pod: the sandbox's VM is launched once; a second container runs in it (no second
        /// VM), an exec runs in that container, the container's end leaves the pod's VM
        /// running, and the sandbox's end ends it. Needs root: the shim binds the container's
        /// root into the pod share.
        #[tokio::test]
        async fn a_second_container_and_an_exec_run_in_the_pod_vm() {
            if !nix::unistd::geteuid().is_root() {
                assert!(
                    std::env::var("AGENTVM_REQUIRE_VM").as_deref() != Ok("1"),
                    "needs root to bind a container's root into the pod share"
                );
                eprintln!("SKIP a_second_container_and_an_exec_run_in_the_pod_vm: needs root");
                return;
            }
            let h = Harness::new().await;
            h.create("pod1", "sleep 30", SANDBOX_ANNOTATIONS)
                .await
                .unwrap();
            h.start("pod1", "").await.unwrap();
            h.create("app", "sleep 30", MEMBER_ANNOTATIONS)
                .await
                .unwrap();
            h.start("app", "").await.unwrap();
            assert_eq!(h.backend.launches(), 1, "the container joined the pod's VM");
            let vm = h.backend.vms()[0].clone();
            assert_eq!(vm.live_pids().len(), 2);
            h.exec("app", "e", "exit 4").await;
            h.start("app", "e").await.unwrap();
            assert_eq!(h.wait("app", "e").await, 4);
            // Delete of the running container is refused, as for any.
            assert_eq!(
                code(h.delete("app").await.unwrap_err()),
                Code::FAILED_PRECONDITION
            );
            h.kill("app", libc::SIGKILL).await.unwrap();
            assert_eq!(h.wait("app", "").await, 137);
            h.delete("app").await.unwrap();
            assert!(vm.ended().is_none(), "the pod's VM still runs");
            assert_eq!(vm.live_pids().len(), 1);
            h.kill("pod1", libc::SIGKILL).await.unwrap();
            assert_eq!(h.wait("pod1", "").await, 137);
            h.delete("pod1").await.unwrap();
            assert!(vm.ended().is_some());
            assert_eq!(h.backend.launches(), 1);
        }
    }
}
