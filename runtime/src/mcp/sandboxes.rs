//! The sandboxes of one MCP session: each a VM booted from an image with an idle init process
//! (or the caller's command), in which `exec` and the file tools start more processes over
//! the agent. The session owns them: [`Manager::shutdown`] removes them all.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use agentvm_protocol::{ProcessSpec, User};
use serde::{Deserialize, Serialize};

use super::limits::{self, Capture, Sink, Tail};
use super::{guestfs, McpError, ToolResult};
use crate::accel::{self, AccelChoice};
use crate::assets::Assets;
use crate::container::{self, ImageVmConfig, ProcessIo, Running};

/// Where the workspace directory appears in the guest.
pub const WORKSPACE: &str = "/workspace";
/// The init process of a sandbox created without a command: idle until stopped.
pub const IDLE_INIT: &str = "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done";
/// How long the agent may take to boot a sandbox's VM (TCG emulation is slow).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a stopped sandbox's init gets after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long the teardown of a VM may take before the server gives up waiting.
const TEARDOWN_WAIT: Duration = Duration::from_secs(30);
/// How long a file tool's helper may run.
const FILE_TIMEOUT: Duration = Duration::from_secs(60);

/// What `sandbox_create` asks for, checked.
#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    pub image: String,
    pub workspace: Option<PathBuf>,
    pub workspace_readonly: bool,
    pub env: BTreeMap<String, String>,
    pub memory_mib: Option<u32>,
    pub cpus: Option<u32>,
    pub egress: Option<String>,
    /// Stored secrets as files `/run/secrets/NAME`.
    pub secrets: Vec<String>,
    /// Stored secrets as environment variables `NAME`.
    pub secret_env: Vec<String>,
    pub persistent: bool,
    pub command: Option<Vec<String>>,
    pub workdir: Option<String>,
    pub user: Option<String>,
}

/// What an exec asks for.
#[derive(Debug, Clone, Default)]
pub struct ExecRequest {
    pub args: Vec<String>,
    pub cwd: Option<String>,
    pub env: BTreeMap<String, String>,
    pub stdin: Option<String>,
    pub user: Option<String>,
    pub output_cap: usize,
}

/// A sandbox as the tools report it.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SandboxInfo {
    /// Pass this to every other tool.
    pub id: String,
    pub image: String,
    /// `running`, `paused` or `stopped`.
    pub state: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub memory_mib: u32,
    pub cpus: u32,
    /// The host directory mounted at /workspace, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    /// The working directory of commands unless they give one.
    pub workdir: String,
    /// How the init process ended, once stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// exec_start processes not yet reported finished by exec_output.
    pub execs: usize,
    /// It outlives the session that created it (until sandbox_remove).
    #[serde(default)]
    pub persistent: bool,
    /// The egress policy (`none`: no network device).
    #[serde(default)]
    pub egress: String,
    /// The sandbox's IPv4 address on its uplink, when it has a network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

/// The outcome of a finished process.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct ExecOutcome {
    /// The exit code; 128+N when killed by signal N; 127: command not found.
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    /// Output past max_output_bytes was cut off (only the first bytes are returned).
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub duration_ms: u64,
}

/// What exec_output returns.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct ExecProgress {
    /// Output since the previous exec_output call of this exec.
    pub stdout: String,
    pub stderr: String,
    /// Bytes lost since the previous call because more than max_output_bytes came in between.
    pub stdout_dropped_bytes: u64,
    pub stderr_dropped_bytes: u64,
    /// Whether the process still runs.
    pub running: bool,
    /// The exit code once it has ended (the exec id is then forgotten).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

/// A process of a sandbox: over the agent (library mode) or through `ctr` (containerd mode).
#[derive(Clone)]
enum Proc {
    Vm(Running),
    Ctr(Arc<super::ctrd::Proc>),
}

impl Proc {
    fn exited(&self) -> Option<container::Exit> {
        match self {
            Proc::Vm(r) => r.exited(),
            Proc::Ctr(p) => p.exited(),
        }
    }

    async fn wait(&self) -> container::Exit {
        match self {
            Proc::Vm(r) => r.wait().await,
            Proc::Ctr(p) => p.wait().await,
        }
    }

    fn signal(&self, sig: i32) -> crate::Result<()> {
        match self {
            Proc::Vm(r) => r.signal(sig),
            Proc::Ctr(p) => p.signal(sig),
        }
    }
}

/// A sandbox's init: a VM the server boots, or a container of containerd.
enum Init {
    Vm(Running),
    Ctr(Box<super::ctrd::Sandbox>),
}

impl Init {
    fn proc(&self) -> Proc {
        match self {
            Init::Vm(r) => Proc::Vm(r.clone()),
            Init::Ctr(c) => Proc::Ctr(Arc::clone(c.init())),
        }
    }

    fn exited(&self) -> Option<container::Exit> {
        self.proc().exited()
    }

    fn signal(&self, sig: i32) -> crate::Result<()> {
        self.proc().signal(sig)
    }

    async fn wait(&self) -> container::Exit {
        self.proc().wait().await
    }

    /// Waits until the VM is gone (library mode), or removes the container, its snapshot and
    /// its network (containerd mode).
    async fn wait_torn_down(&self) {
        match self {
            Init::Vm(r) => r.wait_torn_down().await,
            Init::Ctr(c) => c.remove().await,
        }
    }

    fn is_paused(&self) -> bool {
        match self {
            Init::Vm(r) => r.is_paused(),
            Init::Ctr(c) => c.is_paused(),
        }
    }

    async fn pause(&self) -> crate::Result<()> {
        match self {
            Init::Vm(r) => r.pause().await,
            Init::Ctr(c) => c.pause().await,
        }
    }

    async fn resume(&self) -> crate::Result<()> {
        match self {
            Init::Vm(r) => r.resume().await,
            Init::Ctr(c) => c.resume().await,
        }
    }

    /// Starts `process` (`extra_env`: the variables the caller asked for; `user`: whether it
    /// named one), once the agent (or containerd) took it.
    async fn spawn_exec(
        &self,
        process: ProcessSpec,
        extra_env: &[String],
        user: bool,
        mut io: ProcessIo,
    ) -> (Proc, crate::Result<()>) {
        match self {
            Init::Vm(r) => {
                let (proc, started) = r.spawn_exec(process, io);
                let res = started.await.map(|_| ());
                (Proc::Vm(proc), res)
            }
            Init::Ctr(c) => {
                let u = user.then(|| format!("{}:{}", process.user.uid, process.user.gid));
                static NEXT: AtomicU64 = AtomicU64::new(1);
                let exec_id = format!("mcp-{}", NEXT.fetch_add(1, Ordering::SeqCst));
                let mut input = None;
                if let Some(mut r) = io.stdin.take() {
                    use tokio::io::AsyncReadExt as _;
                    let mut b = Vec::new();
                    let _ = r.read_to_end(&mut b).await;
                    input = Some(b);
                }
                let args = &process.args;
                match c.exec(
                    &exec_id,
                    args,
                    &process.cwd,
                    u,
                    extra_env,
                    input.as_deref(),
                    io,
                ) {
                    Ok(p) => (Proc::Ctr(p), Ok(())),
                    // Nothing ran: an already-ended process.
                    Err(e) => (Proc::Ctr(c.failed_proc()), Err(e)),
                }
            }
        }
    }
}

/// A process started by exec_start.
struct Job {
    proc: Proc,
    stdout: Arc<Mutex<Capture>>,
    stderr: Arc<Mutex<Capture>>,
}

/// Kills a process whose caller went away: a tool call the client cancelled (or whose
/// request was dropped) must not leave its command running in the sandbox.
struct KillOnDrop<'a>(&'a Proc);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        if self.0.exited().is_none() {
            let _ = self.0.signal(libc::SIGKILL);
        }
    }
}

/// One sandbox of the session.
struct Entry {
    id: String,
    image: String,
    created: u64,
    workspace: Option<PathBuf>,
    memory_mib: u32,
    vcpus: u32,
    workdir: String,
    env: Vec<String>,
    user: (u32, u32),
    init: Init,
    log: Arc<Mutex<Tail>>,
    state_dir: PathBuf,
    execs: Mutex<HashMap<String, Job>>,
    next_exec: AtomicU64,
    /// Served by a host process of its own ([`super::persist`]).
    persistent: bool,
    egress: String,
    address: Option<String>,
}

impl Entry {
    fn state(&self) -> &'static str {
        if self.init.exited().is_some() {
            "stopped"
        } else if self.init.is_paused() {
            "paused"
        } else {
            "running"
        }
    }

    fn info(&self) -> SandboxInfo {
        SandboxInfo {
            persistent: self.persistent,
            id: self.id.clone(),
            image: self.image.clone(),
            state: self.state().into(),
            created: self.created,
            memory_mib: self.memory_mib,
            cpus: self.vcpus,
            workspace: self.workspace.as_ref().map(|p| p.display().to_string()),
            workdir: self.workdir.clone(),
            exit_code: self.init.exited().map(|e| e.code),
            execs: lock(&self.execs).len(),
            egress: self.egress.clone(),
            address: self.address.clone(),
        }
    }

    /// Fails unless the VM runs (not paused, not stopped).
    fn check_running(&self) -> ToolResult<()> {
        match self.state() {
            "running" => Ok(()),
            "paused" => Err(McpError::State {
                id: self.id.clone(),
                state: "paused",
                hint: "sandbox_resume it first",
            }),
            _ => Err(McpError::State {
                id: self.id.clone(),
                state: "stopped",
                hint: "its VM is gone; sandbox_create a new one",
            }),
        }
    }

    /// The process spec of a command in this sandbox.
    fn process(&self, args: Vec<String>, req: &ExecRequest) -> ToolResult<ProcessSpec> {
        let cwd = match &req.cwd {
            Some(c) => limits::resolve_path(c, &self.workdir)?,
            None => self.workdir.clone(),
        };
        let (uid, gid) = match &req.user {
            Some(u) => parse_user(u)?,
            None => self.user,
        };
        let mut p = ProcessSpec {
            args,
            env: limits::merge_env(&self.env, &limits::env_entries(&req.env)?),
            cwd,
            user: User {
                uid,
                gid,
                additional_gids: Vec::new(),
            },
            ..Default::default()
        };
        crate::run::finish_process(&mut p);
        Ok(p)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn parse_user(u: &str) -> ToolResult<(u32, u32)> {
    crate::run::parse_user(u).map_err(|_| {
        McpError::InvalidArgument(format!(
            "user {u:?}: give a numeric UID or UID:GID (names are not resolved)"
        ))
    })
}

/// The sandboxes of the session.
#[derive(Default)]
pub struct Manager {
    sandboxes: Mutex<BTreeMap<String, Arc<Entry>>>,
    /// Creates under way, counted against the limit; shutdown waits for them.
    creating: AtomicU64,
    /// The session ended: no more creates.
    closed: std::sync::atomic::AtomicBool,
    /// This is the host process of a persistent sandbox ([`super::persist::host`]).
    hosting: bool,
    /// containerd mode: sandboxes are containers of this containerd ([`super::ctrd`]).
    containerd: Option<super::ctrd::Ctr>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field(
                "sandboxes",
                &lock(&self.sandboxes).keys().collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Checks what `sandbox_create` asks for that this server does not do, before anything boots.
pub fn check_create(req: &CreateRequest) -> ToolResult<()> {
    for name in req.secrets.iter().chain(&req.secret_env) {
        crate::secrets::validate_name(name).map_err(|e| McpError::Secret(e.to_string()))?;
    }
    egress_policy(req.egress.as_deref())?;
    if req.image.trim().is_empty() {
        return Err(McpError::InvalidArgument(
            "image is empty: give an image reference (oci:DIR, oci-archive:PATH, \
             docker-archive:PATH, docker-daemon:NAME or REGISTRY/REPO:TAG)"
                .into(),
        ));
    }
    limits::within(
        req.memory_mib,
        crate::run::DEFAULT_MEMORY_MIB,
        limits::MEMORY_MIB,
        "memory_mib",
    )?;
    limits::within(req.cpus, crate::run::DEFAULT_VCPUS, limits::VCPUS, "cpus")?;
    limits::env_entries(&req.env)?;
    if let Some(c) = &req.command {
        limits::command(Some(c.clone()), None)?;
    }
    if let Some(w) = &req.workdir {
        if !w.starts_with('/') {
            return Err(McpError::InvalidArgument(format!(
                "workdir {w:?} must be an absolute path in the sandbox"
            )));
        }
        limits::resolve_path(w, "/")?;
    }
    if let Some(u) = &req.user {
        parse_user(u)?;
    }
    Ok(())
}

/// The egress profile of a sandbox that names none.
pub const DEFAULT_EGRESS: &str = "agent";

/// The network a create asks for: `None` for egress `none` (no network device), else the
/// policy (a built-in profile, one of the host's policy file, with inline rules after `;`).
pub fn egress_policy(egress: Option<&str>) -> ToolResult<Option<crate::egress::Policy>> {
    let text = egress.map(str::trim).unwrap_or(DEFAULT_EGRESS);
    if text == "none" {
        return Ok(None);
    }
    let bad = |e: crate::egress::PolicyError| {
        McpError::InvalidArgument(format!(
            "egress {text:?}: {e} (profiles: agent, open, none, none-but; rules after `;`, e.g. \
             \"none-but; allow pypi.org tcp port 443\")"
        ))
    };
    let file = crate::egress::PolicyFile::load(&crate::egress::policy_path()).map_err(bad)?;
    let text = if text.is_empty() {
        DEFAULT_EGRESS
    } else {
        text
    };
    file.select(Some(text)).map(Some).map_err(bad)
}

/// The secrets a create asks for, in the order first named: `files` as `/run/secrets/NAME`,
/// `env` as variables (a name in both gets both).
pub fn wanted_secrets(files: &[String], env: &[String]) -> Vec<crate::secrets::Wanted> {
    let mut out: Vec<crate::secrets::Wanted> = Vec::new();
    for (names, as_env) in [(files, false), (env, true)] {
        for n in names {
            match out.iter_mut().find(|w| &w.name == n) {
                Some(w) if as_env => w.env = true,
                Some(w) => w.file = true,
                None => out.push(crate::secrets::Wanted {
                    name: n.clone(),
                    file: !as_env,
                    env: as_env,
                }),
            }
        }
    }
    out
}

/// The host directory to share at /workspace: an existing directory, not `/`.
pub fn workspace_dir(p: &Path) -> ToolResult<PathBuf> {
    if !p.is_absolute() {
        return Err(McpError::InvalidArgument(format!(
            "workspace {} must be an absolute host path",
            p.display()
        )));
    }
    let dir = p
        .canonicalize()
        .map_err(|e| McpError::InvalidArgument(format!("workspace {}: {e}", p.display())))?;
    if !dir.is_dir() {
        return Err(McpError::InvalidArgument(format!(
            "workspace {} is not a directory",
            dir.display()
        )));
    }
    if dir == Path::new("/") {
        return Err(McpError::InvalidArgument(
            "workspace / would hand the whole host to the sandbox: give a project directory".into(),
        ));
    }
    Ok(dir)
}

fn workspace_mount(dir: &Path, readonly: bool) -> ToolResult<oci_spec::runtime::Mount> {
    oci_spec::runtime::MountBuilder::default()
        .destination(WORKSPACE)
        .typ("bind")
        .source(dir)
        .options(vec![
            "rbind".to_string(),
            if readonly { "ro" } else { "rw" }.to_string(),
        ])
        .build()
        .map_err(|e| McpError::InvalidArgument(format!("workspace mount: {e}")))
}

impl Manager {
    pub fn new() -> Manager {
        Manager::default()
    }

    /// The manager of a persistent sandbox's host process.
    pub fn hosting(self) -> Manager {
        Manager {
            hosting: true,
            ..self
        }
    }

    /// A manager whose sandboxes are containers of `ctr`'s containerd namespace.
    pub fn with_containerd(self, ctr: super::ctrd::Ctr) -> Manager {
        Manager {
            containerd: Some(ctr),
            ..self
        }
    }

    pub fn is_containerd(&self) -> bool {
        self.containerd.is_some()
    }

    pub fn is_hosting(&self) -> bool {
        self.hosting
    }

    /// Whether this session has sandbox `id`.
    pub fn has(&self, id: &str) -> bool {
        lock(&self.sandboxes).contains_key(id)
    }

    fn get(&self, id: &str) -> ToolResult<Arc<Entry>> {
        lock(&self.sandboxes)
            .get(id)
            .cloned()
            .ok_or_else(|| McpError::UnknownSandbox(id.to_string()))
    }

    /// Boots a sandbox; returns it and warnings for the caller (TCG emulation).
    pub async fn create(&self, req: CreateRequest) -> ToolResult<(SandboxInfo, Vec<String>)> {
        check_create(&req)?;
        if !nix::unistd::geteuid().is_root() {
            return Err(McpError::Unsupported(
                "agentvm mcp must run as root to boot VMs (as agentvm run does): register it \
                 as `sudo agentvm mcp` (claude mcp add agentvm -- sudo agentvm mcp)"
                    .into(),
            ));
        }
        let workspace = req.workspace.as_deref().map(workspace_dir).transpose()?;
        let busy = lock(&self.sandboxes).len() as u64 + self.creating.load(Ordering::SeqCst);
        if busy >= limits::MAX_SANDBOXES as u64 {
            return Err(McpError::InvalidArgument(format!(
                "this session already has {} sandboxes: sandbox_remove one first",
                limits::MAX_SANDBOXES
            )));
        }
        if self.closed.load(Ordering::SeqCst) {
            return Err(McpError::InvalidArgument("the session is ending".into()));
        }
        // Counted until the boot ends, also when the call is dropped half-way.
        struct Creating<'a>(&'a AtomicU64);
        impl Drop for Creating<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.creating.fetch_add(1, Ordering::SeqCst);
        let _creating = Creating(&self.creating);
        match &self.containerd {
            Some(ctr) => self.boot_ctr(ctr, req, workspace).await,
            None => self.boot(req, workspace).await,
        }
    }

    /// containerd mode: the sandbox is a container run by containerd with the agentvm
    /// runtime ([`super::ctrd`]).
    async fn boot_ctr(
        &self,
        ctr: &super::ctrd::Ctr,
        req: CreateRequest,
        workspace: Option<PathBuf>,
    ) -> ToolResult<(SandboxInfo, Vec<String>)> {
        if req.persistent || !req.secrets.is_empty() || !req.secret_env.is_empty() {
            return Err(McpError::Unsupported(
                "persistent sandboxes and secrets are not available in containerd mode yet \
                 (run agentvm mcp without --containerd for them)"
                    .into(),
            ));
        }
        let network = egress_policy(req.egress.as_deref())?;
        let egress = network
            .as_ref()
            .map_or_else(|| "none".to_string(), |p| p.name.clone());
        let egress_text = network.as_ref().map(|_| {
            req.egress
                .as_deref()
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .unwrap_or(DEFAULT_EGRESS)
                .to_string()
        });
        let env = limits::env_entries(&req.env)?;
        let workdir = req
            .workdir
            .clone()
            .or_else(|| workspace.as_ref().map(|_| WORKSPACE.to_string()));
        let user = match &req.user {
            Some(u) => Some(parse_user(u)?),
            None => None,
        };
        let memory_mib = req.memory_mib.unwrap_or(crate::run::DEFAULT_MEMORY_MIB);
        let vcpus = req.cpus.unwrap_or(crate::run::DEFAULT_VCPUS);
        let id = crate::sandbox::new_id();
        let log = Arc::new(Mutex::new(Tail::new(limits::LOG_TAIL_BYTES)));
        let io = ProcessIo {
            stdin: None,
            stdout: Some(Box::new(Sink::Tail(Arc::clone(&log)))),
            stderr: Some(Box::new(Sink::Tail(Arc::clone(&log)))),
        };
        let spec = super::ctrd::Spec {
            id: id.clone(),
            image: req.image.clone(),
            args: req
                .command
                .clone()
                .unwrap_or_else(|| vec!["/bin/sh".into(), "-c".into(), IDLE_INIT.into()]),
            env: env.clone(),
            cwd: workdir.clone(),
            user: user.map(|(u, g)| format!("{u}:{g}")),
            workspace: workspace.clone().map(|w| (w, req.workspace_readonly)),
            memory_mib,
            cpus: vcpus,
            egress: egress_text,
        };
        let sandbox = super::ctrd::Sandbox::create(ctr, spec, io, BOOT_TIMEOUT).await?;
        let address = sandbox.address();
        let entry = Arc::new(Entry {
            id: id.clone(),
            image: req.image,
            created: unix_now(),
            workspace,
            memory_mib,
            vcpus,
            workdir: workdir.unwrap_or_else(|| "/".into()),
            env,
            user: user.unwrap_or((0, 0)),
            init: Init::Ctr(Box::new(sandbox)),
            log,
            state_dir: crate::sandbox::state_root().join(".mcp-ctrd").join(&id),
            execs: Mutex::new(HashMap::new()),
            next_exec: AtomicU64::new(1),
            persistent: false,
            egress,
            address,
        });
        let info = entry.info();
        lock(&self.sandboxes).insert(id, entry);
        Ok((info, Vec::new()))
    }

    async fn boot(
        &self,
        req: CreateRequest,
        workspace: Option<PathBuf>,
    ) -> ToolResult<(SandboxInfo, Vec<String>)> {
        let assets = Assets::locate()?;
        // Decrypted only now, and only into the start request (zeroed as it drops): a missing
        // or undecryptable secret fails the create, naming it, before anything boots.
        let wanted = wanted_secrets(&req.secrets, &req.secret_env);
        let secrets = if wanted.is_empty() {
            Vec::new()
        } else {
            tokio::task::spawn_blocking(move || crate::secrets::Store::host().resolve(&wanted))
                .await
                .map_err(|e| crate::Error::Invalid(format!("secrets: {e}")))?
                .map_err(|e| McpError::Secret(e.to_string()))?
        };
        let reference = req.image.clone();
        // Converting an image takes seconds the first time: off the runtime's thread.
        let (rootfs, config) =
            tokio::task::spawn_blocking(move || crate::image::prepare(&reference))
                .await
                .map_err(|e| crate::Error::Invalid(format!("image build: {e}")))??;
        let wanted = crate::image::UserProcess {
            // Placeholder: the init is ours; only the env, workdir and user are merged.
            args: vec!["true".into()],
            env: limits::env_entries(&req.env)?,
            workdir: req
                .workdir
                .clone()
                .or_else(|| workspace.as_ref().map(|_| WORKSPACE.to_string())),
            user: req.user.clone(),
        };
        let merged = crate::image::merge(&wanted, &config)?;
        let user = match &merged.user {
            Some(u) => parse_user(u).map_err(|_| {
                McpError::InvalidArgument(format!(
                    "the image runs as user {u:?}, a name this server cannot resolve: pass \
                     user as a numeric UID[:GID]"
                ))
            })?,
            None => (0, 0),
        };
        let (accel, warning) = accel::resolve(AccelChoice::Auto, &assets).await?;
        let mut warnings = Vec::new();
        if let Some(w) = warning {
            tracing::warn!("{w}");
            warnings.push(w);
        }
        let mut policy = crate::mounts::SharePolicy::detect(&HashMap::new())?;
        // The workspace is the user's own directory: root in the guest may not leave device
        // nodes, file capabilities or setuid/setgid files there for the host to trip over.
        policy.limits = crate::vmm::VolumeLimits {
            no_devices: true,
            no_file_caps: true,
            no_setid: true,
        };
        let virtio_fs = matches!(policy.volumes, crate::vmm::ShareTransport::VirtioFs(_));
        if workspace.is_some() && !req.workspace_readonly && !virtio_fs {
            return Err(McpError::Unsupported(
                "a writable workspace needs virtiofsd (its file server bounds what the guest \
                 leaves on the host; 9p cannot): cargo install virtiofsd, or run \
                 hack/install-deps.sh, or pass workspace_readonly: true"
                    .into(),
            ));
        }
        let oci_mounts = match &workspace {
            Some(dir) => vec![workspace_mount(dir, req.workspace_readonly)?],
            None => Vec::new(),
        };
        let plan = crate::mounts::plan(&oci_mounts, &policy)?;
        let args = req
            .command
            .clone()
            .unwrap_or_else(|| vec!["/bin/sh".into(), "-c".into(), IDLE_INIT.into()]);
        let mut process = ProcessSpec {
            args,
            env: merged.env.clone(),
            cwd: merged.cwd.clone(),
            user: User {
                uid: user.0,
                gid: user.1,
                additional_gids: Vec::new(),
            },
            ..Default::default()
        };
        crate::run::finish_process(&mut process);
        let memory_mib = req.memory_mib.unwrap_or(crate::run::DEFAULT_MEMORY_MIB);
        let vcpus = req.cpus.unwrap_or(crate::run::DEFAULT_VCPUS);
        let id = crate::sandbox::new_id();
        let log = Arc::new(Mutex::new(Tail::new(limits::LOG_TAIL_BYTES)));
        let io = ProcessIo {
            stdin: None,
            stdout: Some(Box::new(Sink::Tail(Arc::clone(&log)))),
            stderr: Some(Box::new(Sink::Tail(Arc::clone(&log)))),
        };
        let network = egress_policy(req.egress.as_deref())?;
        let egress = network
            .as_ref()
            .map_or_else(|| "none".to_string(), |p| p.name.clone());
        let cfg = ImageVmConfig {
            network,
            id: id.clone(),
            rootfs,
            secrets,
            process: process.clone(),
            mounts: plan,
            hostname: Some(format!("agentvm-{}", &id[..8])),
            memory_mib,
            vcpus,
            accel,
            boot_timeout: BOOT_TIMEOUT,
        };
        let init = container::boot_image(cfg, &assets, io).await?;
        let state_dir = crate::sandbox::state_root().join(&id);
        let address = (egress != "none")
            .then(|| crate::egress::Record::load(&state_dir).ok())
            .flatten()
            .and_then(|r| r.facts.own_networks.first().copied())
            .and_then(|n| match n.addr {
                std::net::IpAddr::V4(a) => Some(crate::uplink::sandbox_address(a).to_string()),
                std::net::IpAddr::V6(_) => None,
            });
        let entry = Arc::new(Entry {
            id: id.clone(),
            image: req.image,
            created: unix_now(),
            workspace,
            memory_mib,
            vcpus,
            workdir: process.cwd.clone(),
            env: process.env.clone(),
            user,
            init: Init::Vm(init),
            log,
            state_dir,
            execs: Mutex::new(HashMap::new()),
            next_exec: AtomicU64::new(1),
            persistent: self.hosting,
            egress,
            address,
        });
        let info = entry.info();
        lock(&self.sandboxes).insert(id, entry);
        Ok((info, warnings))
    }

    pub fn list(&self) -> Vec<SandboxInfo> {
        lock(&self.sandboxes).values().map(|e| e.info()).collect()
    }

    pub fn info(&self, id: &str) -> ToolResult<SandboxInfo> {
        Ok(self.get(id)?.info())
    }

    /// Starts a process in the sandbox; returns its handle and output buffers once the agent
    /// has taken it, or the outcome at once when it could not start (127: not found).
    async fn start(entry: &Entry, req: &ExecRequest) -> ToolResult<Result<Job, ExecOutcome>> {
        entry.check_running()?;
        let process = entry.process(req.args.clone(), req)?;
        let extra_env = limits::env_entries(&req.env)?;
        if req
            .stdin
            .as_ref()
            .is_some_and(|s| s.len() > limits::MAX_STDIN_BYTES)
        {
            return Err(McpError::TooLarge {
                what: "stdin".into(),
                size: req.stdin.as_ref().map_or(0, |s| s.len() as u64),
                limit: limits::MAX_STDIN_BYTES as u64,
            });
        }
        let stdout = Arc::new(Mutex::new(Capture::new(req.output_cap)));
        let stderr = Arc::new(Mutex::new(Capture::new(req.output_cap)));
        let io = ProcessIo {
            stdin: req.stdin.clone().map(|s| {
                Box::new(std::io::Cursor::new(s.into_bytes()))
                    as Box<dyn tokio::io::AsyncRead + Send + Unpin>
            }),
            stdout: Some(Box::new(Sink::Capture(Arc::clone(&stdout)))),
            stderr: Some(Box::new(Sink::Capture(Arc::clone(&stderr)))),
        };
        let t = Instant::now();
        let (proc, started) = entry
            .init
            .spawn_exec(process, &extra_env, req.user.is_some(), io)
            .await;
        match started {
            Ok(_) => Ok(Ok(Job {
                proc,
                stdout,
                stderr,
            })),
            Err(e) => {
                // The agent reports a failed start with the code a shell would give (127 for a
                // missing program, 126 for one that cannot run): that is the command's outcome.
                let exit = tokio::time::timeout(Duration::from_secs(5), proc.wait()).await;
                match exit {
                    Ok(x) if x.code == 126 || x.code == 127 => {
                        let job = Job {
                            proc,
                            stdout,
                            stderr,
                        };
                        let mut out = finish(&job, x.code, t);
                        out.stderr.push_str(&format!("agentvm: {e}\n"));
                        Ok(Err(out))
                    }
                    _ => Err(McpError::Runtime(e)),
                }
            }
        }
    }

    /// Runs a command to its end, or kills it after `timeout`.
    pub async fn exec(
        &self,
        id: &str,
        req: ExecRequest,
        timeout: Duration,
    ) -> ToolResult<ExecOutcome> {
        let entry = self.get(id)?;
        let t = Instant::now();
        let job = match Self::start(&entry, &req).await? {
            Ok(job) => job,
            Err(outcome) => return Ok(outcome),
        };
        let _guard = KillOnDrop(&job.proc);
        match tokio::time::timeout(timeout, job.proc.wait()).await {
            Ok(exit) => Ok(finish(&job, exit.code, t)),
            Err(_) => {
                let _ = job.proc.signal(libc::SIGKILL);
                let _ = tokio::time::timeout(Duration::from_secs(10), job.proc.wait()).await;
                let out = finish(&job, 128 + libc::SIGKILL, t);
                Err(McpError::Timeout {
                    seconds: timeout.as_secs(),
                    stdout: out.stdout,
                    stderr: out.stderr,
                })
            }
        }
    }

    /// Starts a command and returns its exec id at once.
    pub async fn exec_start(&self, id: &str, req: ExecRequest) -> ToolResult<String> {
        let entry = self.get(id)?;
        if lock(&entry.execs).len() >= limits::MAX_EXECS {
            return Err(McpError::InvalidArgument(format!(
                "sandbox {id} has {} unfinished execs: read their exits with exec_output first",
                limits::MAX_EXECS
            )));
        }
        let job = match Self::start(&entry, &req).await? {
            Ok(job) => job,
            Err(outcome) => {
                return Err(McpError::NotStarted {
                    exit_code: outcome.exit_code,
                    message: outcome.stderr.trim().to_string(),
                })
            }
        };
        let n = entry.next_exec.fetch_add(1, Ordering::SeqCst);
        let exec_id = format!("exec-{n}");
        lock(&entry.execs).insert(exec_id.clone(), job);
        Ok(exec_id)
    }

    /// Output of an exec_start process since the last call, and its exit once it ended;
    /// waits up to `wait` for the exit first.
    pub async fn exec_output(
        &self,
        id: &str,
        exec_id: &str,
        wait: Duration,
        kill: bool,
    ) -> ToolResult<ExecProgress> {
        let entry = self.get(id)?;
        let proc = lock(&entry.execs)
            .get(exec_id)
            .map(|j| j.proc.clone())
            .ok_or_else(|| McpError::UnknownExec(exec_id.to_string()))?;
        if kill && proc.exited().is_none() {
            let _ = proc.signal(libc::SIGKILL);
            let _ = tokio::time::timeout(Duration::from_secs(10), proc.wait()).await;
        } else if !wait.is_zero() && proc.exited().is_none() {
            let _ = tokio::time::timeout(wait, proc.wait()).await;
        }
        let exit = proc.exited();
        let mut execs = lock(&entry.execs);
        let job = execs
            .get(exec_id)
            .ok_or_else(|| McpError::UnknownExec(exec_id.to_string()))?;
        let (out, out_dropped) = lock(&job.stdout).take();
        let (err, err_dropped) = lock(&job.stderr).take();
        if exit.is_some() {
            execs.remove(exec_id);
        }
        Ok(ExecProgress {
            stdout: limits::text(&out),
            stderr: limits::text(&err),
            stdout_dropped_bytes: out_dropped,
            stderr_dropped_bytes: err_dropped,
            running: exit.is_none(),
            exit_code: exit.map(|e| e.code),
        })
    }

    /// Runs a file helper as root in `/` with `stdin`; returns its exit code and output.
    async fn helper(
        &self,
        id: &str,
        args: Vec<String>,
        stdin: Option<Vec<u8>>,
        cap: usize,
    ) -> ToolResult<(i32, Vec<u8>, bool, String)> {
        let entry = self.get(id)?;
        entry.check_running()?;
        let mut process = ProcessSpec {
            args,
            env: Vec::new(),
            cwd: "/".into(),
            ..Default::default()
        };
        crate::run::finish_process(&mut process);
        let stdout = Arc::new(Mutex::new(Capture::new(cap)));
        let stderr = Arc::new(Mutex::new(Capture::new(4096)));
        let io = ProcessIo {
            stdin: stdin.map(|b| {
                Box::new(std::io::Cursor::new(b)) as Box<dyn tokio::io::AsyncRead + Send + Unpin>
            }),
            stdout: Some(Box::new(Sink::Capture(Arc::clone(&stdout)))),
            stderr: Some(Box::new(Sink::Capture(Arc::clone(&stderr)))),
        };
        let (proc, started) = entry.init.spawn_exec(process, &[], true, io).await;
        let _guard = KillOnDrop(&proc);
        if let Err(e) = started {
            let code = tokio::time::timeout(Duration::from_secs(5), proc.wait())
                .await
                .map(|x| x.code)
                .unwrap_or(255);
            return Ok((code, Vec::new(), false, e.to_string()));
        }
        let code = match tokio::time::timeout(FILE_TIMEOUT, proc.wait()).await {
            Ok(x) => x.code,
            Err(_) => {
                let _ = proc.signal(libc::SIGKILL);
                return Err(McpError::Timeout {
                    seconds: FILE_TIMEOUT.as_secs(),
                    stdout: String::new(),
                    stderr: String::new(),
                });
            }
        };
        let (out, dropped) = lock(&stdout).take();
        let (err, _) = lock(&stderr).take();
        Ok((code, out, dropped > 0, limits::text(&err)))
    }

    /// The workdir relative paths start from.
    fn workdir(&self, id: &str) -> ToolResult<String> {
        Ok(self.get(id)?.workdir.clone())
    }

    /// Reads a file of the sandbox; returns its resolved path and content.
    pub async fn file_read(&self, id: &str, path: &str, max: u64) -> ToolResult<(String, Vec<u8>)> {
        let path = limits::resolve_path(path, &self.workdir(id)?)?;
        let (code, out, cut, err) = self
            .helper(id, guestfs::read_command(&path, max), None, max as usize)
            .await?;
        if code != 0 {
            return Err(guestfs::failure(code, &err, &path, max));
        }
        if cut {
            // It grew while being read.
            return Err(McpError::TooLarge {
                what: format!("file {path}"),
                size: max + 1,
                limit: max,
            });
        }
        Ok((path, out))
    }

    /// Writes a file of the sandbox; returns its resolved path and new size.
    pub async fn file_write(
        &self,
        id: &str,
        path: &str,
        content: Vec<u8>,
        append: bool,
        create_dirs: bool,
    ) -> ToolResult<(String, u64)> {
        let path = limits::resolve_path(path, &self.workdir(id)?)?;
        if path == "/" {
            return Err(McpError::InvalidArgument("cannot write to /".into()));
        }
        if content.len() as u64 > limits::MAX_FILE_BYTES {
            return Err(McpError::TooLarge {
                what: "content".into(),
                size: content.len() as u64,
                limit: limits::MAX_FILE_BYTES,
            });
        }
        let (code, out, _, err) = self
            .helper(
                id,
                guestfs::write_command(&path, create_dirs, append),
                Some(content),
                64,
            )
            .await?;
        if code != 0 {
            return Err(guestfs::failure(code, &err, &path, limits::MAX_FILE_BYTES));
        }
        let size = limits::text(&out).trim().parse().unwrap_or(0);
        Ok((path, size))
    }

    /// Lists a directory of the sandbox.
    pub async fn file_list(
        &self,
        id: &str,
        path: &str,
    ) -> ToolResult<(String, Vec<guestfs::Entry>, bool)> {
        let path = limits::resolve_path(path, &self.workdir(id)?)?;
        let (code, out, cut, err) = self
            .helper(id, guestfs::list_command(&path), None, 4 << 20)
            .await?;
        if code != 0 {
            return Err(guestfs::failure(code, &err, &path, 0));
        }
        let (entries, more) = guestfs::parse_list(&out, limits::MAX_LIST_ENTRIES);
        Ok((path, entries, more || cut))
    }

    /// The last `max` bytes of the init process's output, whether older output was cut, and
    /// the tail of the VM's console when asked (while the VM runs).
    pub fn logs(
        &self,
        id: &str,
        max: usize,
        console: bool,
    ) -> ToolResult<(String, bool, Option<String>)> {
        let entry = self.get(id)?;
        let (out, cut) = lock(&entry.log).last(max);
        let console = console.then(|| {
            let path = entry.state_dir.join("console.log");
            let b = std::fs::read(&path).unwrap_or_default();
            let tail = &b[b.len().saturating_sub(max)..];
            printable(&limits::text(tail))
        });
        Ok((limits::text(&out), cut, console))
    }

    pub async fn pause(&self, id: &str) -> ToolResult<SandboxInfo> {
        let entry = self.get(id)?;
        entry.check_running()?;
        entry.init.pause().await?;
        Ok(entry.info())
    }

    pub async fn resume(&self, id: &str) -> ToolResult<SandboxInfo> {
        let entry = self.get(id)?;
        match entry.state() {
            "paused" => {
                entry.init.resume().await?;
                Ok(entry.info())
            }
            "running" => Ok(entry.info()),
            _ => entry.check_running().map(|()| entry.info()),
        }
    }

    /// Stops the sandbox's VM (SIGTERM to its init, SIGKILL after a grace); the sandbox stays
    /// listed, stopped, until removed.
    pub async fn stop(&self, id: &str) -> ToolResult<SandboxInfo> {
        let entry = self.get(id)?;
        stop_entry(&entry, STOP_GRACE).await;
        Ok(entry.info())
    }

    /// Stops the sandbox and forgets it.
    pub async fn remove(&self, id: &str) -> ToolResult<SandboxInfo> {
        let entry = self.get(id)?;
        stop_entry(&entry, Duration::ZERO).await;
        lock(&self.sandboxes).remove(id);
        Ok(entry.info())
    }

    /// Removes every sandbox of the session (at its end); returns how many there were.
    pub async fn shutdown(&self) -> usize {
        self.closed.store(true, Ordering::SeqCst);
        // A create still booting (its client gone mid-call) adds its sandbox when it ends:
        // wait for it, so that sandbox is removed too.
        let deadline = tokio::time::Instant::now() + BOOT_TIMEOUT + Duration::from_secs(60);
        while self.creating.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let all: Vec<Arc<Entry>> = std::mem::take(&mut *lock(&self.sandboxes))
            .into_values()
            .collect();
        let n = all.len();
        let mut set = tokio::task::JoinSet::new();
        for e in all {
            set.spawn(async move { stop_entry(&e, Duration::ZERO).await });
        }
        while set.join_next().await.is_some() {}
        n
    }
}

/// Ends a sandbox's VM and waits for its teardown: SIGTERM to the init first when `grace` is
/// not zero, SIGKILL after it.
async fn stop_entry(entry: &Entry, grace: Duration) {
    let init = &entry.init;
    if init.exited().is_none() {
        if init.is_paused() {
            if let Err(e) = init.resume().await {
                tracing::warn!("resume sandbox {} to stop it: {e}", entry.id);
            }
        }
        if !grace.is_zero() && init.signal(libc::SIGTERM).is_ok() {
            let _ = tokio::time::timeout(grace, init.wait()).await;
        }
        if init.exited().is_none() {
            let _ = init.signal(libc::SIGKILL);
        }
    }
    if tokio::time::timeout(TEARDOWN_WAIT, init.wait_torn_down())
        .await
        .is_err()
    {
        tracing::warn!(
            "sandbox {}: the VM was not torn down within {} s",
            entry.id,
            TEARDOWN_WAIT.as_secs()
        );
    }
}

/// Guest text for the model: control characters other than newlines and tabs escaped.
fn printable(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let keep = !c.is_control() || c == '\n' || c == '\t';
            let v: Vec<char> = if keep {
                vec![c]
            } else {
                c.escape_default().collect()
            };
            v
        })
        .collect()
}

fn finish(job: &Job, code: i32, t: Instant) -> ExecOutcome {
    let (out, out_dropped) = lock(&job.stdout).take();
    let (err, err_dropped) = lock(&job.stderr).take();
    ExecOutcome {
        exit_code: code,
        stdout: limits::text(&out),
        stderr: limits::text(&err),
        stdout_truncated: out_dropped > 0,
        stderr_truncated: err_dropped > 0,
        duration_ms: t.elapsed().as_millis() as u64,
    }
}

/// Seconds since the Unix epoch (0 on a clock set before it): a sandbox's creation time.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> CreateRequest {
        CreateRequest {
            image: "oci:/x".into(),
            ..Default::default()
        }
    }

    #[test]
    fn create_refuses_what_it_cannot_do_before_booting() {
        let code = |r: CreateRequest| check_create(&r).unwrap_err().code();
        assert!(check_create(&req()).is_ok());
        assert!(check_create(&CreateRequest {
            secrets: vec!["API_KEY".into()],
            secret_env: vec!["TOKEN".into()],
            ..req()
        })
        .is_ok());
        for bad in ["../x", "", "a b"] {
            let e = check_create(&CreateRequest {
                secrets: vec![bad.into()],
                ..req()
            })
            .unwrap_err();
            assert_eq!(e.code(), "secret_error", "{bad:?}");
        }
        assert!(check_create(&CreateRequest {
            egress: Some("none".into()),
            ..req()
        })
        .is_ok());
        assert!(check_create(&CreateRequest {
            egress: Some("none-but; allow 198.51.100.7 tcp port 80".into()),
            ..req()
        })
        .is_ok());
        assert_eq!(
            code(CreateRequest {
                egress: Some("no-such-profile".into()),
                ..req()
            }),
            "invalid_argument"
        );
        assert_eq!(
            code(CreateRequest {
                egress: Some("agent; allow".into()),
                ..req()
            }),
            "invalid_argument"
        );
        assert_eq!(
            code(CreateRequest {
                image: " ".into(),
                ..Default::default()
            }),
            "invalid_argument"
        );
        assert_eq!(
            code(CreateRequest {
                memory_mib: Some(1),
                ..req()
            }),
            "invalid_argument"
        );
        assert_eq!(
            code(CreateRequest {
                cpus: Some(0),
                ..req()
            }),
            "invalid_argument"
        );
        assert_eq!(
            code(CreateRequest {
                workdir: Some("rel".into()),
                ..req()
            }),
            "invalid_argument"
        );
        assert_eq!(
            code(CreateRequest {
                user: Some("root".into()),
                ..req()
            }),
            "invalid_argument"
        );
        assert_eq!(
            code(CreateRequest {
                command: Some(vec![]),
                ..req()
            }),
            "invalid_argument"
        );
    }

    #[test]
    fn secrets_are_wanted_as_files_env_or_both() {
        let w = wanted_secrets(&["A".into(), "B".into()], &["B".into(), "C".into()]);
        let got: Vec<_> = w.iter().map(|w| (w.name.as_str(), w.file, w.env)).collect();
        assert_eq!(
            got,
            [("A", true, false), ("B", true, true), ("C", false, true)]
        );
        assert!(wanted_secrets(&[], &[]).is_empty());
    }

    #[test]
    fn workspaces_are_existing_directories_but_not_the_root() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(
            workspace_dir(d.path()).unwrap(),
            d.path().canonicalize().unwrap()
        );
        assert!(workspace_dir(Path::new("/")).is_err());
        assert!(workspace_dir(Path::new("relative")).is_err());
        assert!(workspace_dir(&d.path().join("missing")).is_err());
        let f = d.path().join("file");
        std::fs::write(&f, "x").unwrap();
        assert!(workspace_dir(&f).is_err());
        let m = workspace_mount(d.path(), true).unwrap();
        let plan = crate::mounts::plan(&[m], &crate::mounts::SharePolicy::nine_p()).unwrap();
        assert_eq!(plan.shares.len(), 1);
        assert!(plan.shares[0].readonly);
        assert_eq!(plan.mounts[0].destination, WORKSPACE);
    }

    #[tokio::test]
    async fn unknown_ids_are_clear_errors() {
        let m = Manager::new();
        let e = m.info("nope").unwrap_err();
        assert_eq!(e.code(), "unknown_sandbox");
        assert!(e.to_string().contains("sandbox_list"), "{e}");
        assert_eq!(
            m.exec("nope", ExecRequest::default(), Duration::from_secs(1))
                .await
                .unwrap_err()
                .code(),
            "unknown_sandbox"
        );
        assert_eq!(
            m.file_read("nope", "/etc/passwd", 10)
                .await
                .unwrap_err()
                .code(),
            "unknown_sandbox"
        );
        assert_eq!(m.stop("nope").await.unwrap_err().code(), "unknown_sandbox");
        assert_eq!(m.shutdown().await, 0);
    }

    #[test]
    fn console_text_keeps_lines_and_escapes_the_rest() {
        assert_eq!(printable("a\tb\nc\u{1b}[2J"), "a\tb\nc\\u{1b}[2J");
    }
}
