//! `agentvm mcp`: a Model Context Protocol server on stdio, so an AI agent (Claude Code or
//! any MCP client) creates sandboxes, runs commands in them, moves files and stops them.
//!
//! Library mode: the server boots every sandbox itself through the runtime library
//! ([`crate::container::boot_image`]) and owns it; nothing but agentvm (kernel, agent, QEMU)
//! needs to be installed, and containerd or Docker never see these sandboxes. When the session
//! ends (stdin closes, as when the client exits or is killed; SIGTERM, SIGINT or SIGHUP) every
//! sandbox is torn down before the server exits — except those created `persistent`, which
//! live in a host process of their own until removed ([`persist`]).
//!
//! | module | what |
//! |---|---|
//! | [`server`] | the rmcp tool router: tool schemas, descriptions, structured results |
//! | [`sandboxes`] | the sandboxes of the session: create, exec, files, pause, stop, remove |
//! | [`limits`] | argument checks, guest path resolution and output capping (pure) |
//! | [`guestfs`] | the shell helpers that read, write and list files inside the guest |
//! | [`stdio`] | the stdio framing: JSON-RPC parse errors answered, the rest passed on |
//! | [`persist`] | persistent sandboxes: a host process each, reached over a unix socket |
//! | [`install`] | `agentvm mcp install`/`uninstall`: Claude Code's `~/.claude.json` |

pub mod ctrd;
pub mod guestfs;
pub mod install;
pub mod limits;
pub mod persist;
pub mod sandboxes;
pub mod server;
pub mod stdio;

use std::borrow::Cow;

use rmcp::handler::server::tool::IntoCallToolResult;
use rmcp::model::{CallToolResponse, CallToolResult};
use serde_json::json;

/// What a tool call can fail with. Every variant reaches the client as a tool result with
/// `isError: true` and a structured body `{"error": {"code", "message"}}`, so the model can
/// read what to do; malformed arguments are rejected by rmcp before a tool runs (JSON-RPC
/// error -32602).
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    /// No sandbox of this session has the id.
    #[error("unknown sandbox {0:?}: sandbox_list shows the sandboxes of this session")]
    UnknownSandbox(String),
    /// No exec_start of the sandbox has the id (or its exit was already read).
    #[error("unknown exec {0:?} in this sandbox: exec_start returns the id; an exec is forgotten once exec_output has reported its exit")]
    UnknownExec(String),
    /// An argument the schema allows but the server does not.
    #[error("{0}")]
    InvalidArgument(String),
    /// A guest path that climbs above the sandbox's root.
    #[error("path {0:?} is outside the sandbox: `..` may not climb above / (paths are inside the sandbox; relative ones start at the sandbox's working directory)")]
    PathOutside(String),
    /// A file or content over its size limit.
    #[error("{what} is {size} bytes, over the limit of {limit} bytes")]
    TooLarge { what: String, size: u64, limit: u64 },
    /// The guest reported a file error (missing, a directory, no permission).
    #[error("{0}")]
    File(String),
    /// The sandbox is paused or stopped, so it cannot do this now.
    #[error("sandbox {id} is {state}: {hint}")]
    State {
        id: String,
        state: &'static str,
        hint: &'static str,
    },
    /// The command ran past its timeout and was killed.
    #[error("the command did not finish within {seconds} s and was killed (SIGKILL); raise timeout_seconds, or use exec_start and exec_output for long commands")]
    Timeout {
        seconds: u64,
        stdout: String,
        stderr: String,
    },
    /// The command could not start (a missing program: 127; one that cannot run: 126).
    #[error("the command could not start (exit code {exit_code}): {message}")]
    NotStarted { exit_code: i32, message: String },
    /// The client cancelled the call (`notifications/cancelled`); its command was killed.
    #[error("cancelled by the client; the command was killed")]
    Cancelled,
    /// A secret could not be given: a bad name, missing from the store, or undecryptable.
    #[error("{0}")]
    Secret(String),
    /// Something this server does not do (yet).
    #[error("{0}")]
    Unsupported(Cow<'static, str>),
    /// The runtime failed (boot, agent, image).
    #[error(transparent)]
    Runtime(#[from] crate::Error),
}

impl McpError {
    /// A stable, machine-readable name of the error.
    pub fn code(&self) -> &'static str {
        match self {
            McpError::UnknownSandbox(_) => "unknown_sandbox",
            McpError::UnknownExec(_) => "unknown_exec",
            McpError::InvalidArgument(_) => "invalid_argument",
            McpError::PathOutside(_) => "path_outside_sandbox",
            McpError::TooLarge { .. } => "too_large",
            McpError::File(_) => "file_error",
            McpError::State { .. } => "invalid_state",
            McpError::Timeout { .. } => "timeout",
            McpError::NotStarted { .. } => "not_started",
            McpError::Cancelled => "cancelled",
            McpError::Secret(_) => "secret_error",
            McpError::Unsupported(_) => "unsupported",
            McpError::Runtime(_) => "runtime_error",
        }
    }

    /// The structured body of the error result.
    pub fn to_json(&self) -> serde_json::Value {
        let mut body = json!({
            "error": { "code": self.code(), "message": self.to_string() }
        });
        if let McpError::Timeout { stdout, stderr, .. } = self {
            body["timed_out"] = json!(true);
            body["stdout"] = json!(stdout);
            body["stderr"] = json!(stderr);
        }
        body
    }
}

impl IntoCallToolResult for McpError {
    fn into_call_tool_result(self) -> Result<CallToolResponse, rmcp::ErrorData> {
        Ok(CallToolResult::structured_error(self.to_json()).into())
    }
}

/// Result of a tool.
pub type ToolResult<T> = std::result::Result<T, McpError>;

/// Serves MCP on this process's stdin and stdout until the session ends, then removes every
/// sandbox of the session. Call it on a current-thread runtime: the VMs' helpers die with the
/// thread that spawned them.
/// `containerd`: containerd mode, with containerd's socket and the namespace of the
/// sandboxes; refused when containerd does not answer.
pub async fn serve_stdio(containerd: Option<(std::path::PathBuf, String)>) -> crate::Result<()> {
    use rmcp::ServiceExt;
    use tokio::signal::unix::{signal, SignalKind};

    // What a server killed before it could clean up left on the host.
    let swept = crate::uplink::sweep().await;
    if swept > 0 {
        tracing::info!("removed the host rules of {swept} sandboxes that are gone");
    }
    let mut manager = sandboxes::Manager::new();
    if let Some((address, namespace)) = containerd {
        let ctr = ctrd::Ctr::new(&address, &namespace)?;
        ctr.check().await?;
        tracing::info!(
            "containerd mode: sandboxes in containerd namespace {} at {}",
            ctr.namespace(),
            address.display()
        );
        manager = manager.with_containerd(ctr);
    }
    let manager = std::sync::Arc::new(manager);
    let server = server::AgentvmServer::new(std::sync::Arc::clone(&manager));
    let (input, output) = stdio::filtered(tokio::io::stdin(), tokio::io::stdout());
    let sig =
        |k: SignalKind| signal(k).map_err(|e| crate::Error::io("install handler for", "signal", e));
    let (mut term, mut int, mut hup) = (
        sig(SignalKind::terminate())?,
        sig(SignalKind::interrupt())?,
        sig(SignalKind::hangup())?,
    );
    let session = async {
        let service = server
            .serve((input, output))
            .await
            .map_err(|e| crate::Error::Invalid(format!("MCP initialization failed: {e}")))?;
        Ok::<String, crate::Error>(match service.waiting().await {
            Ok(reason) => format!("{reason:?}"),
            Err(e) => e.to_string(),
        })
    };
    // A signal drops the session (and with it the transport) mid-way: the sandboxes go next.
    let why = tokio::select! {
        r = session => r,
        _ = term.recv() => Ok("SIGTERM".into()),
        _ = int.recv() => Ok("SIGINT".into()),
        _ = hup.recv() => Ok("SIGHUP".into()),
    };
    let n = manager.shutdown().await;
    match &why {
        Ok(w) => tracing::info!("MCP session ended ({w}); removed {n} sandboxes"),
        Err(e) => tracing::warn!("MCP session ended: {e}; removed {n} sandboxes"),
    }
    why.map(|_| ())
}
