//! Persistent sandboxes: ones that outlive the MCP session that created them.
//!
//! A sandbox's VM dies with the process that booted it (QEMU and its helpers are spawned with
//! `PR_SET_PDEATHSIG`), so a persistent sandbox gets a process of its own: the server spawns
//! `agentvm mcp host` in a new session (`setsid`), hands it the create request on stdin, and
//! reads one line back (the sandbox, or why it could not boot). The host then serves MCP — the
//! same tools, over its own one-sandbox [`Manager`] — on a root-only unix socket
//! `<state root>/.mcp/<id>.sock`. Any later `agentvm mcp` session lists the sockets and forwards
//! every call naming such a sandbox to its host, so a persistent sandbox is used exactly as a
//! session's own. The host exits once its sandbox is removed (its socket goes with it), or on
//! SIGTERM/SIGINT, removing the sandbox.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::ServiceExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use super::sandboxes::{CreateRequest, Manager, SandboxInfo};
use super::server::{AgentvmServer, Created};
use super::{McpError, ToolResult};

/// How long a host may take to build the image and boot (a first image build included).
const HOST_START_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a forwarded call may take to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The directory of the hosts' sockets.
pub fn sockets_dir() -> PathBuf {
    crate::sandbox::state_root().join(".mcp")
}

/// The socket of persistent sandbox `id`, if `id` could name one.
pub fn socket_of(id: &str) -> Option<PathBuf> {
    crate::sandbox::validate_id(id).ok()?;
    Some(sockets_dir().join(format!("{id}.sock")))
}

/// Whether `id` is a persistent sandbox some host serves.
pub fn is_hosted(id: &str) -> bool {
    socket_of(id).is_some_and(|p| p.exists())
}

/// What the server sends a host on its stdin.
#[derive(Debug, Serialize, Deserialize)]
struct HostRequest {
    image: String,
    workspace: Option<PathBuf>,
    workspace_readonly: bool,
    env: std::collections::BTreeMap<String, String>,
    memory_mib: Option<u32>,
    cpus: Option<u32>,
    command: Option<Vec<String>>,
    workdir: Option<String>,
    user: Option<String>,
    #[serde(default)]
    secrets: Vec<String>,
    #[serde(default)]
    secret_env: Vec<String>,
    #[serde(default)]
    egress: Option<String>,
}

/// The host's one line back.
#[derive(Debug, Serialize, Deserialize)]
struct HostReply {
    #[serde(default)]
    created: Option<serde_json::Value>,
    #[serde(default)]
    error: Option<String>,
}

/// Boots a persistent sandbox in a host process of its own; returns it as `sandbox_create`
/// does.
pub async fn create(req: CreateRequest) -> ToolResult<serde_json::Value> {
    super::sandboxes::check_create(&CreateRequest {
        persistent: false,
        ..req.clone()
    })?;
    let exe = std::env::current_exe()
        .map_err(|e| crate::Error::Invalid(format!("find this binary: {e}")))?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(["mcp", "host"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid(2) is async-signal-safe and touches no memory of the parent: the host
    // leaves the server's session and process group, so a signal to the client's group (a
    // terminal's Ctrl-C) does not reach it.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| crate::Error::Invalid(format!("start the sandbox host: {e}")))?;
    let request = HostRequest {
        image: req.image,
        workspace: req.workspace,
        workspace_readonly: req.workspace_readonly,
        env: req.env,
        memory_mib: req.memory_mib,
        cpus: req.cpus,
        command: req.command,
        workdir: req.workdir,
        user: req.user,
        secrets: req.secrets,
        secret_env: req.secret_env,
        egress: req.egress,
    };
    let mut stdin = child.stdin.take().expect("piped");
    let body = serde_json::to_vec(&request).unwrap_or_default();
    stdin
        .write_all(&body)
        .await
        .map_err(|e| crate::Error::Invalid(format!("talk to the sandbox host: {e}")))?;
    drop(stdin);
    let mut out = tokio::io::BufReader::new(child.stdout.take().expect("piped"));
    let mut line = String::new();
    let read = tokio::time::timeout(HOST_START_TIMEOUT, out.read_line(&mut line)).await;
    if read.is_err() {
        let _ = child.start_kill();
        return Err(McpError::Runtime(crate::Error::Invalid(format!(
            "the sandbox host did not boot the sandbox within {} s",
            HOST_START_TIMEOUT.as_secs()
        ))));
    }
    // The host lives on; tokio reaps it when it exits while this process still runs.
    drop(child);
    let reply: HostReply = serde_json::from_str(line.trim()).map_err(|_| {
        crate::Error::Invalid("the sandbox host ended without booting the sandbox".into())
    })?;
    match (reply.created, reply.error) {
        (Some(c), _) => Ok(c),
        (None, Some(e)) => Err(McpError::Runtime(crate::Error::Invalid(e))),
        (None, None) => Err(McpError::Runtime(crate::Error::Invalid(
            "the sandbox host said nothing".into(),
        ))),
    }
}

/// Forwards a tool call naming persistent sandbox `id` to its host.
pub async fn forward(id: &str, request: CallToolRequestParams) -> ToolResult<CallToolResult> {
    let path = socket_of(id).ok_or_else(|| McpError::UnknownSandbox(id.to_string()))?;
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::UnixStream::connect(&path))
        .await
        .map_err(|_| host_gone(id, "did not accept a connection"))?
        .map_err(|e| host_gone(id, &e.to_string()))?;
    let client = ().serve(stream).await.map_err(|e| host_gone(id, &e.to_string()))?;
    let r = client.call_tool(request).await;
    let _ = client.cancel().await;
    r.map_err(|e| host_gone(id, &e.to_string()))
}

fn host_gone(id: &str, why: &str) -> McpError {
    McpError::Runtime(crate::Error::Invalid(format!(
        "persistent sandbox {id}: its host process does not answer ({why})"
    )))
}

/// The persistent sandboxes every live host serves.
pub async fn list() -> Vec<SandboxInfo> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(sockets_dir()) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_suffix(".sock") else {
            continue;
        };
        let mut req = CallToolRequestParams::new("sandbox_list");
        req.arguments = Some(serde_json::Map::new());
        let Ok(r) = forward(id, req).await else {
            continue;
        };
        let listed = r
            .structured_content
            .and_then(|v| serde_json::from_value::<Vec<SandboxInfo>>(v["sandboxes"].clone()).ok());
        out.extend(listed.unwrap_or_default());
    }
    out
}

/// `agentvm mcp host`: boots the sandbox read from stdin, answers one line on stdout, then
/// serves MCP for it on its socket until it is removed or a signal comes.
pub async fn host() -> crate::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut body = String::new();
    tokio::io::stdin()
        .read_to_string(&mut body)
        .await
        .map_err(|e| crate::Error::io("read", "stdin", e))?;
    let r: HostRequest = serde_json::from_str(&body)
        .map_err(|e| crate::Error::Invalid(format!("agentvm mcp host: bad request: {e}")))?;
    let manager = Arc::new(Manager::new().hosting());
    let created = manager
        .create(CreateRequest {
            image: r.image,
            workspace: r.workspace,
            workspace_readonly: r.workspace_readonly,
            env: r.env,
            memory_mib: r.memory_mib,
            cpus: r.cpus,
            command: r.command,
            workdir: r.workdir,
            user: r.user,
            secrets: r.secrets,
            secret_env: r.secret_env,
            egress: r.egress,
            ..Default::default()
        })
        .await;
    let mut stdout = tokio::io::stdout();
    let (sandbox, warnings) = match created {
        Ok(c) => c,
        Err(e) => {
            let reply = HostReply {
                created: None,
                error: Some(e.to_string()),
            };
            let _ = stdout
                .write_all(
                    format!("{}\n", serde_json::to_string(&reply).unwrap_or_default()).as_bytes(),
                )
                .await;
            return Err(crate::Error::Invalid(e.to_string()));
        }
    };
    let dir = sockets_dir();
    let sock = dir.join(format!("{}.sock", sandbox.id));
    let listener = bind(&dir, &sock);
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            manager.shutdown().await;
            let reply = HostReply {
                created: None,
                error: Some(e.to_string()),
            };
            let _ = stdout
                .write_all(
                    format!("{}\n", serde_json::to_string(&reply).unwrap_or_default()).as_bytes(),
                )
                .await;
            return Err(e);
        }
    };
    let reply = HostReply {
        created: serde_json::to_value(Created { sandbox, warnings }).ok(),
        error: None,
    };
    let _ = stdout
        .write_all(format!("{}\n", serde_json::to_string(&reply).unwrap_or_default()).as_bytes())
        .await;
    let _ = stdout.flush().await;
    drop(stdout);
    let sig =
        |k: SignalKind| signal(k).map_err(|e| crate::Error::io("install handler for", "signal", e));
    let (mut term, mut int) = (sig(SignalKind::terminate())?, sig(SignalKind::interrupt())?);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            c = listener.accept() => {
                if let Ok((stream, _)) = c {
                    let server = AgentvmServer::new(Arc::clone(&manager));
                    tokio::spawn(async move {
                        if let Ok(s) = server.serve(stream).await {
                            let _ = s.waiting().await;
                        }
                    });
                }
            }
            _ = tick.tick() => {
                if manager.list().is_empty() {
                    break;
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    let _ = std::fs::remove_file(&sock);
    manager.shutdown().await;
    // The last host out takes the directory.
    let _ = std::fs::remove_dir(&dir);
    Ok(())
}

fn bind(dir: &std::path::Path, sock: &std::path::Path) -> crate::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| crate::Error::io("create", dir, e))?;
    let _ = std::fs::remove_file(sock);
    let l =
        tokio::net::UnixListener::bind(sock).map_err(|e| crate::Error::io("listen on", sock, e))?;
    std::fs::set_permissions(sock, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| crate::Error::io("chmod", sock, e))?;
    Ok(l)
}
