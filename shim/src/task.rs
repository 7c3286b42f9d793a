//! The `containerd.task.v2.Task` service: translates Task calls into `agentvm` container
//! calls and publishes the task events.
//!
//! Events go through one ordered queue (the publisher's), and each container publishes
//! Create < Start < Exit < Delete: Start is published before the exit watcher exists, and
//! the exit before the VM's (slow) teardown, which Delete waits for.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use agentvm::accel::AccelChoice;
use agentvm::container::{Container, ContainerConfig, Exit, Running};
use async_trait::async_trait;
use containerd_shim::api;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::protos::events::task::{TaskCreate, TaskDelete, TaskExit, TaskIO, TaskStart};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, r#async::TtrpcContext, Code};
use containerd_shim::{Context, ExitSignal};
use tokio::sync::watch;

/// Default VM size when the spec sets no limits (as `agentvm run`).
const DEFAULT_MEMORY_MIB: u32 = agentvm::run::DEFAULT_MEMORY_MIB;
const DEFAULT_VCPUS: u32 = agentvm::run::DEFAULT_VCPUS;
/// Under TCG a boot takes seconds; a loaded CI machine may need much longer.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long Delete waits for the VM to be gone (it is killed after 5 s of grace).
const TEARDOWN_WAIT: Duration = Duration::from_secs(15);

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

enum Phase {
    Created(Box<Container>),
    /// Start is in progress, or Delete took the VM.
    Busy,
    Running(Running),
    /// Ended without a running process (killed or deleted before start).
    Stopped,
}

struct Entry {
    id: String,
    bundle: String,
    stdin: String,
    stdout: String,
    stderr: String,
    terminal: bool,
    pid: u32,
    /// The shim mounted `<bundle>/rootfs` (snapshotter mounts) and must unmount it.
    mounted_rootfs: bool,
    phase: tokio::sync::Mutex<Phase>,
    /// Set once the init process is over; Wait blocks on it even before Start.
    exit: watch::Sender<Option<Exit>>,
}

impl Entry {
    fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }
}

/// The task service of one shim (one container per shim for now).
pub struct TaskService {
    namespace: String,
    publisher: Arc<RemotePublisher>,
    exit: Arc<ExitSignal>,
    containers: Mutex<HashMap<String, Arc<Entry>>>,
}

impl TaskService {
    pub fn new(namespace: String, publisher: RemotePublisher, exit: Arc<ExitSignal>) -> Self {
        Self {
            namespace,
            publisher: Arc::new(publisher),
            exit,
            containers: Mutex::new(HashMap::new()),
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
}

async fn publish(publisher: &RemotePublisher, ns: &str, topic: &str, event: Box<dyn MessageDyn>) {
    if let Err(e) = publisher
        .publish(Context::default(), topic, ns, event)
        .await
    {
        tracing::warn!("publish {topic}: {e}");
    }
}

fn exec_unsupported(exec_id: &str) -> ttrpc::Result<()> {
    if exec_id.is_empty() {
        Ok(())
    } else {
        Err(status(
            Code::NOT_FOUND,
            format!("exec {exec_id}: not found (exec is not implemented yet)"),
        ))
    }
}

/// Publishes the init exit as soon as it is known and records it for Wait/State/Delete.
fn watch_exit(
    entry: Arc<Entry>,
    running: Running,
    publisher: Arc<RemotePublisher>,
    ns: String,
    announce: bool,
) {
    tokio::spawn(async move {
        let exit = running.wait().await;
        entry.exit.send_replace(Some(exit));
        if announce {
            let ev = TaskExit {
                container_id: entry.id.clone(),
                id: entry.id.clone(),
                pid: entry.pid,
                exit_status: exit.code as u32,
                exited_at: MessageField::some(timestamp(exit.at)),
                ..Default::default()
            };
            publish(&publisher, &ns, topics::TASK_EXIT_EVENT_TOPIC, Box::new(ev)).await;
        }
    });
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
        let mounted_rootfs = !req.rootfs.is_empty();
        if mounted_rootfs {
            crate::rootfs::mount_all(&req.rootfs, &bundle.join("rootfs"))
                .await
                .map_err(internal)?;
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
        };
        let container = match Container::create(cfg).await {
            Ok(c) => c,
            Err(e) => {
                if mounted_rootfs {
                    crate::rootfs::unmount(&bundle.join("rootfs"));
                }
                tracing::error!("create {}: {e}", req.id);
                return Err(internal(e));
            }
        };
        let pid = container.pid();
        let entry = Arc::new(Entry {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
            pid,
            mounted_rootfs,
            phase: tokio::sync::Mutex::new(Phase::Created(Box::new(container))),
            exit: watch::channel(None).0,
        });
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

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> ttrpc::Result<api::StartResponse> {
        exec_unsupported(&req.exec_id)?;
        let entry = self.get(&req.id)?;
        let mut phase = entry.phase.lock().await;
        let container = match std::mem::replace(&mut *phase, Phase::Busy) {
            Phase::Created(c) => c,
            other => {
                *phase = other;
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("container {} is not in the created state", req.id),
                ));
            }
        };
        let io = match crate::io::open(&entry.stdin, &entry.stdout, &entry.stderr).await {
            Ok(io) => io,
            Err(e) => {
                container.destroy().await;
                *phase = Phase::Stopped;
                entry.exit.send_replace(Some(Exit {
                    code: 255,
                    at: SystemTime::now(),
                }));
                return Err(internal(format!("open stdio: {e}")));
            }
        };
        let (running, started) = container.start(io).await;
        *phase = Phase::Running(running.clone());
        drop(phase);
        match started {
            Ok(_guest_pid) => {
                // TaskStart is queued before the exit watcher exists: Start < Exit.
                let ev = TaskStart {
                    container_id: req.id.clone(),
                    pid: entry.pid,
                    ..Default::default()
                };
                self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(ev))
                    .await;
                watch_exit(
                    Arc::clone(&entry),
                    running,
                    Arc::clone(&self.publisher),
                    self.namespace.clone(),
                    true,
                );
                Ok(api::StartResponse {
                    pid: entry.pid,
                    ..Default::default()
                })
            }
            Err(e) => {
                // Never started: no TaskStart, so no TaskExit either; Delete reports the code.
                watch_exit(
                    Arc::clone(&entry),
                    running,
                    Arc::clone(&self.publisher),
                    self.namespace.clone(),
                    false,
                );
                Err(internal(e))
            }
        }
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> ttrpc::Result<api::StateResponse> {
        exec_unsupported(&req.exec_id)?;
        let entry = self.get(&req.id)?;
        let exit = entry.exited();
        let status = match (exit, entry.phase.try_lock().as_deref()) {
            (Some(_), _) => api::Status::STOPPED,
            (None, Ok(Phase::Created(_))) => api::Status::CREATED,
            (None, Ok(Phase::Stopped)) => api::Status::STOPPED,
            _ => api::Status::RUNNING,
        };
        Ok(api::StateResponse {
            id: entry.id.clone(),
            bundle: entry.bundle.clone(),
            pid: entry.pid,
            status: status.into(),
            stdin: entry.stdin.clone(),
            stdout: entry.stdout.clone(),
            stderr: entry.stderr.clone(),
            terminal: entry.terminal,
            exit_status: exit.map(|e| e.code as u32).unwrap_or(0),
            exited_at: exit
                .map(|e| MessageField::some(timestamp(e.at)))
                .unwrap_or_default(),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> ttrpc::Result<api::Empty> {
        exec_unsupported(&req.exec_id)?;
        let entry = self.get(&req.id)?;
        let finished = || status(Code::NOT_FOUND, "process already finished");
        if entry.exited().is_some() {
            return Err(finished());
        }
        let mut phase = entry.phase.lock().await;
        match std::mem::replace(&mut *phase, Phase::Stopped) {
            Phase::Running(r) => {
                let sent = r.signal(req.signal as i32);
                *phase = Phase::Running(r);
                sent.map_err(|_| finished())?;
            }
            Phase::Created(c) => {
                // A created task has no process yet: killing it ends the VM.
                c.destroy().await;
                let exit = Exit {
                    code: 128 + req.signal as i32,
                    at: SystemTime::now(),
                };
                entry.exit.send_replace(Some(exit));
                let ev = TaskExit {
                    container_id: entry.id.clone(),
                    id: entry.id.clone(),
                    pid: entry.pid,
                    exit_status: exit.code as u32,
                    exited_at: MessageField::some(timestamp(exit.at)),
                    ..Default::default()
                };
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
        exec_unsupported(&req.exec_id)?;
        let entry = self.get(&req.id)?;
        let mut rx = entry.exit.subscribe();
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

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> ttrpc::Result<api::DeleteResponse> {
        exec_unsupported(&req.exec_id)?;
        let entry = self.get(&req.id)?;
        let mut phase = entry.phase.lock().await;
        match std::mem::replace(&mut *phase, Phase::Busy) {
            Phase::Running(r) => {
                if r.exited().is_none() {
                    *phase = Phase::Running(r);
                    return Err(status(
                        Code::FAILED_PRECONDITION,
                        format!("cannot delete running container {}", req.id),
                    ));
                }
                if tokio::time::timeout(TEARDOWN_WAIT, r.wait_torn_down())
                    .await
                    .is_err()
                {
                    tracing::warn!("the VM of {} is still being torn down", req.id);
                }
            }
            Phase::Created(c) => {
                c.destroy().await;
                entry.exit.send_replace(Some(Exit {
                    code: 0,
                    at: SystemTime::now(),
                }));
            }
            Phase::Busy | Phase::Stopped => {}
        }
        *phase = Phase::Stopped;
        drop(phase);
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
        });
        let ev = TaskDelete {
            container_id: entry.id.clone(),
            id: entry.id.clone(),
            pid: entry.pid,
            exit_status: exit.code as u32,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        };
        self.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(api::DeleteResponse {
            pid: entry.pid,
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
                pid: entry.pid,
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
        let task_pid = self.get(&req.id).map(|e| e.pid).unwrap_or(0);
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
        exec_unsupported(&req.exec_id)?;
        let entry = self.get(&req.id)?;
        if let Phase::Running(r) = &*entry.phase.lock().await {
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
        exec_unsupported(&req.exec_id)?;
        let entry = self.get(&req.id)?;
        if req.stdin {
            if let Phase::Running(r) = &*entry.phase.lock().await {
                let _ = r.close_stdin();
            }
        }
        Ok(api::Empty::default())
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ExecProcessRequest,
    ) -> ttrpc::Result<api::Empty> {
        Err(unimplemented("exec"))
    }

    async fn pause(
        &self,
        _ctx: &TtrpcContext,
        _req: api::PauseRequest,
    ) -> ttrpc::Result<api::Empty> {
        Err(unimplemented("pause"))
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ResumeRequest,
    ) -> ttrpc::Result<api::Empty> {
        Err(unimplemented("resume"))
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> ttrpc::Result<api::Empty> {
        Err(unimplemented("checkpoint"))
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        _req: api::UpdateTaskRequest,
    ) -> ttrpc::Result<api::Empty> {
        Err(unimplemented("update"))
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        _req: api::StatsRequest,
    ) -> ttrpc::Result<api::StatsResponse> {
        Err(unimplemented("stats"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(code(exec_unsupported("e1").unwrap_err()), Code::NOT_FOUND);
        assert!(exec_unsupported("").is_ok());
    }

    #[test]
    fn timestamps_split_seconds_and_nanos() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(5, 7);
        let ts = timestamp(t);
        assert_eq!((ts.seconds, ts.nanos), (5, 7));
    }
}
