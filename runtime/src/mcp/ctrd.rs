//! containerd mode (`agentvm mcp --containerd`): each sandbox is a container of a containerd
//! namespace of its own (`agentvm-mcp` by default, never `moby` or `k8s.io`), run with the
//! agentvm runtime (`io.containerd.agentvm.v1`), so `ctr -n agentvm-mcp c ls` shows it. The
//! server drives containerd with `ctr`, containerd's own client (docs/decisions.md says why):
//! `ctr run` stays attached as the sandbox's init (its exit is the init's), `ctr task exec`
//! runs each command, `ctr task kill/pause/resume` and `ctr task rm` / `ctr c rm` do the rest.
//! A networked sandbox's namespace is made here with its uplink ([`crate::uplink`]) and
//! joined by the shim (`--with-ns network:`), which wires the tap, guard and egress table as
//! for any container (the policy as the `io.agentvm.egress` annotation).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::{McpError, ToolResult};
use crate::container::{Exit, ProcessIo};
use crate::netns::{Netns, NetnsMode};

/// containerd's default socket.
pub const DEFAULT_ADDRESS: &str = "/run/containerd/containerd.sock";
/// The containerd namespace of the sandboxes by default.
pub const DEFAULT_NAMESPACE: &str = "agentvm-mcp";
/// The runtime the sandboxes run with.
pub const RUNTIME: &str = "io.containerd.agentvm.v1";
/// The label that marks a container as an MCP sandbox.
pub const LABEL: &str = "io.agentvm.mcp";
/// Namespaces of other clients, refused: their owners list and remove what is in them.
const FOREIGN: [&str; 3] = ["moby", "k8s.io", "default"];

/// A containerd reached through `ctr`.
#[derive(Debug, Clone)]
pub struct Ctr {
    bin: PathBuf,
    address: PathBuf,
    namespace: String,
}

fn runtime_error(msg: String) -> McpError {
    McpError::Runtime(crate::Error::Invalid(msg))
}

impl Ctr {
    /// Checks the namespace name; finds `ctr`.
    pub fn new(address: &Path, namespace: &str) -> crate::Result<Ctr> {
        if FOREIGN.contains(&namespace) {
            return Err(crate::Error::Invalid(format!(
                "containerd namespace {namespace:?} belongs to another client (Docker, the CRI \
                 or ctr's default): give the MCP sandboxes a namespace of their own (default \
                 {DEFAULT_NAMESPACE})"
            )));
        }
        let ok = !namespace.is_empty()
            && namespace.len() <= 76
            && namespace
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !ok {
            return Err(crate::Error::Invalid(format!(
                "containerd namespace {namespace:?}: letters, digits, '-', '_' and '.' only"
            )));
        }
        let bin = ["/usr/bin/ctr", "/usr/local/bin/ctr", "/bin/ctr"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or_else(|| {
                crate::Error::Invalid(
                    "agentvm mcp --containerd drives containerd with its client `ctr`, which is \
                     not installed (apt-get install containerd)"
                        .into(),
                )
            })?;
        Ok(Ctr {
            bin,
            address: address.to_path_buf(),
            namespace: namespace.to_string(),
        })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn command(&self) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(&self.bin);
        c.arg("--address")
            .arg(&self.address)
            .arg("--namespace")
            .arg(&self.namespace)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
    }

    /// Runs `ctr ARGS` to its end (within `timeout`); its stdout, or its stderr as the error.
    async fn run(&self, args: &[&str], timeout: Duration) -> Result<String, String> {
        let mut c = self.command();
        c.args(args);
        let out = match tokio::time::timeout(timeout, c.output()).await {
            Err(_) => return Err(format!("ctr {} did not answer within {timeout:?}", args[0])),
            Ok(Err(e)) => return Err(format!("ctr: {e}")),
            Ok(Ok(o)) => o,
        };
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// Fails clearly when containerd does not answer on the address.
    pub async fn check(&self) -> crate::Result<()> {
        if !self.address.exists() {
            return Err(crate::Error::Invalid(format!(
                "containerd is not reachable: no socket at {} (start containerd, or give its \
                 socket with --address, or run agentvm mcp without --containerd)",
                self.address.display()
            )));
        }
        self.run(&["version"], Duration::from_secs(10))
            .await
            .map(|_| ())
            .map_err(|e| {
                crate::Error::Invalid(format!(
                    "containerd is not reachable at {} ({e}): start it, or give its socket with \
                     --address, or run agentvm mcp without --containerd (library mode)",
                    self.address.display()
                ))
            })
    }

    /// The image `reference` in the namespace: a name containerd knows, one it pulls
    /// (`REGISTRY/REPO:TAG`), or an archive or OCI layout it imports (`oci-archive:PATH`,
    /// `docker-archive:PATH`, `oci:DIR`).
    pub async fn ensure_image(&self, reference: &str) -> ToolResult<String> {
        let long = Duration::from_secs(600);
        let known = |name: &str| {
            let name = name.to_string();
            async move {
                self.run(&["images", "ls", "-q"], Duration::from_secs(30))
                    .await
                    .map(|l| l.lines().any(|x| x == name))
                    .unwrap_or(false)
            }
        };
        let import = |path: PathBuf, dir: bool| async move {
            // Named after the archive's own reference, else `agentvm-mcp/import:<digest>`.
            let name = format!("import.agentvm-mcp.local/{}", short_hash(&path));
            let mut c = self.command();
            c.args(["images", "import", "--base-name", &name, "--digests", "-"]);
            let mut tar = None;
            if dir {
                let mut t = std::process::Command::new("tar")
                    .arg("-C")
                    .arg(&path)
                    .args(["-cf", "-", "."])
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .spawn()
                    .map_err(|e| crate::Error::Spawn {
                        program: "tar".into(),
                        source: e,
                    })?;
                let out = t.stdout.take().expect("piped");
                c.stdin(Stdio::from(out));
                tar = Some(t);
            } else {
                let f =
                    std::fs::File::open(&path).map_err(|e| crate::Error::io("open", &path, e))?;
                c.stdin(Stdio::from(f));
            }
            let res = tokio::time::timeout(long, c.output()).await;
            if let Some(mut t) = tar {
                let _ = t.wait();
            }
            let out = match res {
                Ok(Ok(o)) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
                Ok(Ok(o)) => {
                    return Err(McpError::InvalidArgument(format!(
                        "image {}: ctr images import: {}",
                        path.display(),
                        String::from_utf8_lossy(&o.stderr).trim()
                    )))
                }
                Ok(Err(e)) => return Err(runtime_error(format!("ctr: {e}"))),
                Err(_) => return Err(runtime_error("ctr images import took too long".into())),
            };
            // "unpacking NAME (sha256:...)...done" per image.
            out.lines()
                .find_map(|l| {
                    l.strip_prefix("unpacking ")?
                        .split_whitespace()
                        .next()
                        .map(str::to_string)
                })
                .ok_or_else(|| {
                    McpError::InvalidArgument(format!(
                        "image {}: containerd imported no image ({})",
                        path.display(),
                        out.trim()
                    ))
                })
        };
        if let Some(p) = reference.strip_prefix("oci:") {
            let p = p.split(':').next().unwrap_or(p);
            return import(PathBuf::from(p), true).await;
        }
        for prefix in ["oci-archive:", "docker-archive:"] {
            if let Some(p) = reference.strip_prefix(prefix) {
                return import(PathBuf::from(p), false).await;
            }
        }
        if reference.starts_with('/') && Path::new(reference).is_dir() {
            return import(PathBuf::from(reference), true).await;
        }
        let name = normalize(reference);
        if known(&name).await {
            return Ok(name);
        }
        self.run(&["images", "pull", &name], long)
            .await
            .map_err(|e| McpError::InvalidArgument(format!("image {reference}: pull: {e}")))?;
        Ok(name)
    }
}

/// `busybox` -> `docker.io/library/busybox:latest`, as Docker and nerdctl name them.
pub fn normalize(reference: &str) -> String {
    let (name, tag) = match reference.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n, Some(t)),
        _ => (reference, None),
    };
    let name = if name.contains('@') {
        return reference.to_string();
    } else {
        name
    };
    let first = name.split('/').next().unwrap_or("");
    let has_host =
        name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let full = if has_host {
        name.to_string()
    } else if name.contains('/') {
        format!("docker.io/{name}")
    } else {
        format!("docker.io/library/{name}")
    };
    format!("{full}:{}", tag.unwrap_or("latest"))
}

fn short_hash(p: &Path) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    p.hash(&mut h);
    format!("{:016x}", h.finish())
}

/// A process run through `ctr` (the init, or an exec): its exit, and how to signal it.
#[derive(Debug)]
pub struct Proc {
    ctr: Ctr,
    container: String,
    exec_id: Option<String>,
    exit: watch::Receiver<Option<Exit>>,
}

impl Proc {
    pub fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    pub async fn wait(&self) -> Exit {
        let mut rx = self.exit.clone();
        let got = rx.wait_for(Option::is_some).await.ok().and_then(|e| *e);
        got.unwrap_or(Exit {
            code: 255,
            at: SystemTime::now(),
            oom: false,
        })
    }

    /// `ctr task kill -s SIG [--exec-id X] ID`, in the background.
    pub fn signal(&self, sig: i32) -> crate::Result<()> {
        let mut c = self.ctr.command();
        let sig = sig.to_string();
        c.args(["tasks", "kill", "-s", &sig]);
        if let Some(e) = &self.exec_id {
            c.args(["--exec-id", e]);
        }
        c.arg(&self.container);
        c.kill_on_drop(false);
        let mut child = c.spawn().map_err(|e| crate::Error::Spawn {
            program: "ctr".into(),
            source: e,
        })?;
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(async move {
                    let _ = child.wait().await;
                });
            }
            Err(_) => std::mem::forget(child),
        }
        Ok(())
    }
}

/// What a process started through `ctr` reads.
enum Stdin {
    /// An empty pipe held open until the process ends (a sandbox's init, which may be a
    /// shell that ends at EOF).
    Held,
    /// These bytes, then EOF (an exec's: none is `/dev/null`'s EOF at once).
    Bytes(Vec<u8>),
}

/// Spawns `ctr ARGS` with `stdin` and `io`'s output, and notes its exit status as the
/// process's exit.
fn spawn_proc(
    ctr: &Ctr,
    args: Vec<String>,
    container: &str,
    exec_id: Option<String>,
    stdin: Stdin,
    io: ProcessIo,
) -> crate::Result<Arc<Proc>> {
    let mut c = ctr.command();
    c.args(&args).stdin(Stdio::piped()).kill_on_drop(false);
    let mut child = c.spawn().map_err(|e| crate::Error::Spawn {
        program: "ctr".into(),
        source: e,
    })?;
    let (tx, rx) = watch::channel(None);
    let mut copies = Vec::new();
    let mut held_stdin = child.stdin.take();
    debug_assert!(io.stdin.is_none(), "stdin comes as bytes (Stdin)");
    if let (Stdin::Bytes(bytes), Some(mut pipe)) = (stdin, held_stdin.take()) {
        copies.push(tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            // A process that ends without reading it all closes the pipe: EPIPE, fine.
            let _ = pipe.write_all(&bytes).await;
        }));
    }
    if let (Some(mut sink), Some(mut out)) = (io.stdout, child.stdout.take()) {
        copies.push(tokio::spawn(async move {
            let _ = tokio::io::copy(&mut out, &mut sink).await;
        }));
    }
    if let (Some(mut sink), Some(mut err)) = (io.stderr, child.stderr.take()) {
        copies.push(tokio::spawn(async move {
            let _ = tokio::io::copy(&mut err, &mut sink).await;
        }));
    }
    tokio::spawn(async move {
        let st = child.wait().await;
        drop(held_stdin);
        for c in copies {
            let _ = c.await;
        }
        let code = match st {
            Ok(s) => {
                use std::os::unix::process::ExitStatusExt;
                s.code()
                    .or_else(|| s.signal().map(|n| 128 + n))
                    .unwrap_or(255)
            }
            Err(_) => 255,
        };
        let _ = tx.send(Some(Exit {
            code,
            at: SystemTime::now(),
            oom: false,
        }));
    });
    Ok(Arc::new(Proc {
        ctr: ctr.clone(),
        container: container.to_string(),
        exec_id,
        exit: rx,
    }))
}

/// What a sandbox is created with.
#[derive(Debug)]
pub struct Spec {
    pub id: String,
    pub image: String,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    pub workspace: Option<(PathBuf, bool)>,
    pub memory_mib: u32,
    pub cpus: u32,
    /// The egress policy text (`None`: no network).
    pub egress: Option<String>,
}

/// A sandbox of containerd mode.
#[derive(Debug)]
pub struct Sandbox {
    ctr: Ctr,
    id: String,
    init: Arc<Proc>,
    paused: AtomicBool,
    netns: Mutex<Option<Netns>>,
    address: Option<String>,
    torn_down: watch::Sender<bool>,
    removed: AtomicBool,
}

impl Sandbox {
    /// Creates and starts the container; returns once its task runs (within `timeout`).
    pub async fn create(
        ctr: &Ctr,
        spec: Spec,
        output: ProcessIo,
        timeout: Duration,
    ) -> ToolResult<Sandbox> {
        let image = ctr.ensure_image(&spec.image).await?;
        let label = crate::sandbox::state_root()
            .join(".mcp-ctrd")
            .join(&spec.id);
        let mut netns = None;
        let mut address = None;
        if spec.egress.is_some() {
            std::fs::create_dir_all(&label).map_err(|e| crate::Error::io("create", &label, e))?;
            let ns = Netns::create(&NetnsMode::New, &label)?;
            match crate::uplink::Uplink::create(&ns.fd(), ns.pid(), &label).await {
                Ok(u) => {
                    address = Some(u.addresses().0.to_string());
                    ns.set_uplink(u);
                    netns = Some(ns);
                }
                Err(e) => {
                    ns.destroy().await;
                    let _ = std::fs::remove_dir_all(&label);
                    return Err(e.into());
                }
            }
        }
        let mut args: Vec<String> = vec![
            "run".into(),
            "--runtime".into(),
            RUNTIME.into(),
            "--label".into(),
            format!("{LABEL}=1"),
            "--memory-limit".into(),
            (u64::from(spec.memory_mib) << 20).to_string(),
            "--cpus".into(),
            spec.cpus.to_string(),
        ];
        if let Some(ns) = &netns {
            args.push("--with-ns".into());
            args.push(format!("network:/proc/{}/ns/net", ns.pid()));
        }
        if let Some(e) = &spec.egress {
            args.push("--annotation".into());
            args.push(format!("io.agentvm.egress={e}"));
        }
        for e in &spec.env {
            args.push("--env".into());
            args.push(e.clone());
        }
        if let Some(c) = &spec.cwd {
            args.push("--cwd".into());
            args.push(c.clone());
        }
        if let Some(u) = &spec.user {
            args.push("--user".into());
            args.push(u.clone());
        }
        if let Some((dir, ro)) = &spec.workspace {
            args.push("--mount".into());
            args.push(format!(
                "type=bind,src={},dst={},options=rbind:{}",
                dir.display(),
                super::sandboxes::WORKSPACE,
                if *ro { "ro" } else { "rw" }
            ));
        }
        args.push(image);
        args.push(spec.id.clone());
        args.extend(spec.args.iter().cloned());
        let init = match spawn_proc(ctr, args, &spec.id, None, Stdin::Held, output) {
            Ok(p) => p,
            Err(e) => {
                if let Some(ns) = netns {
                    ns.destroy().await;
                }
                return Err(e.into());
            }
        };
        let (torn_down, _) = watch::channel(false);
        let sandbox = Sandbox {
            ctr: ctr.clone(),
            id: spec.id.clone(),
            init,
            paused: AtomicBool::new(false),
            netns: Mutex::new(netns),
            address,
            torn_down,
            removed: AtomicBool::new(false),
        };
        // Running once `ctr task ls` says so; failed if `ctr run` ended first.
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(x) = sandbox.init.exited() {
                let why = format!(
                    "the container did not start (ctr run ended with {}); see its output with \
                     the server's log",
                    x.code
                );
                sandbox.remove().await;
                return Err(runtime_error(why));
            }
            let ls = ctr
                .run(&["tasks", "ls"], Duration::from_secs(30))
                .await
                .unwrap_or_default();
            let running = ls.lines().any(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.first() == Some(&spec.id.as_str()) && w.get(2) == Some(&"RUNNING")
            });
            if running {
                return Ok(sandbox);
            }
            if tokio::time::Instant::now() > deadline {
                sandbox.remove().await;
                return Err(runtime_error(format!(
                    "the container's task did not run within {} s",
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn address(&self) -> Option<String> {
        self.address.clone()
    }

    pub fn init(&self) -> &Arc<Proc> {
        &self.init
    }

    /// A process that never ran (its exec could not be started): exit 255.
    pub fn failed_proc(&self) -> Arc<Proc> {
        let (_, rx) = watch::channel(Some(Exit {
            code: 255,
            at: SystemTime::now(),
            oom: false,
        }));
        Arc::new(Proc {
            ctr: self.ctr.clone(),
            container: self.id.clone(),
            exec_id: None,
            exit: rx,
        })
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    pub async fn pause(&self) -> crate::Result<()> {
        self.ctr
            .run(&["tasks", "pause", &self.id], Duration::from_secs(60))
            .await
            .map_err(crate::Error::Invalid)?;
        self.paused.store(true, Ordering::SeqCst);
        Ok(())
    }

    pub async fn resume(&self) -> crate::Result<()> {
        self.ctr
            .run(&["tasks", "resume", &self.id], Duration::from_secs(60))
            .await
            .map_err(crate::Error::Invalid)?;
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Starts `args` in the container (`ctr task exec`): `cwd`, `user` (`UID[:GID]`), and
    /// `env` set through `env(1)` in the guest (ctr's exec has no environment flag), `stdin`
    /// through ctr's own (none: EOF at once).
    #[allow(clippy::too_many_arguments)]
    pub fn exec(
        &self,
        exec_id: &str,
        args: &[String],
        cwd: &str,
        user: Option<String>,
        env: &[String],
        stdin: Option<&[u8]>,
        io: ProcessIo,
    ) -> crate::Result<Arc<Proc>> {
        let mut a: Vec<String> = vec![
            "tasks".into(),
            "exec".into(),
            "--exec-id".into(),
            exec_id.into(),
            "--cwd".into(),
            cwd.into(),
        ];
        if let Some(u) = user {
            a.push("--user".into());
            a.push(u);
        }
        a.push(self.id.clone());
        let mut command = Vec::new();
        if !env.is_empty() {
            command.push("env".to_string());
            command.extend(env.iter().cloned());
        }
        command.extend(args.iter().cloned());
        a.extend(command);
        let stdin = Stdin::Bytes(stdin.map(<[u8]>::to_vec).unwrap_or_default());
        spawn_proc(&self.ctr, a, &self.id, Some(exec_id.to_string()), stdin, io)
    }

    /// Kills the task, deletes it and the container (with its snapshot), then the network
    /// namespace and its uplink. Idempotent.
    pub async fn remove(&self) {
        if self.removed.swap(true, Ordering::SeqCst) {
            let mut rx = self.torn_down.subscribe();
            let _ = rx.wait_for(|d| *d).await;
            return;
        }
        let t = Duration::from_secs(60);
        if self.is_paused() {
            let _ = self.resume().await;
        }
        if self.init.exited().is_none() {
            let _ = self
                .ctr
                .run(&["tasks", "kill", "-s", "SIGKILL", &self.id], t)
                .await;
            let _ = tokio::time::timeout(Duration::from_secs(30), self.init.wait()).await;
        }
        if let Err(e) = self.ctr.run(&["tasks", "rm", "-f", &self.id], t).await {
            if !e.contains("not found") {
                tracing::warn!("sandbox {}: ctr task rm: {e}", self.id);
            }
        }
        if let Err(e) = self.ctr.run(&["containers", "rm", &self.id], t).await {
            if !e.contains("not found") {
                tracing::warn!("sandbox {}: ctr container rm: {e}", self.id);
            }
        }
        let ns = self.netns.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(ns) = ns {
            ns.destroy().await;
        }
        let label = crate::sandbox::state_root()
            .join(".mcp-ctrd")
            .join(&self.id);
        let _ = std::fs::remove_dir_all(&label);
        let _ = std::fs::remove_dir(label.parent().unwrap_or(&label));
        self.torn_down.send_replace(true);
    }

    pub async fn wait_torn_down(&self) {
        let mut rx = self.torn_down.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_named_as_containerd_knows_them() {
        assert_eq!(normalize("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(normalize("alpine:3.20"), "docker.io/library/alpine:3.20");
        assert_eq!(normalize("user/app"), "docker.io/user/app:latest");
        assert_eq!(normalize("localhost:5000/app:v1"), "localhost:5000/app:v1");
        assert_eq!(normalize("ghcr.io/o/r"), "ghcr.io/o/r:latest");
    }

    #[test]
    fn other_clients_namespaces_are_refused() {
        for ns in ["moby", "k8s.io", "default", "", "a b", "../x"] {
            assert!(Ctr::new(Path::new(DEFAULT_ADDRESS), ns).is_err(), "{ns}");
        }
    }
}
