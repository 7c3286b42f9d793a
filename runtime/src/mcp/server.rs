//! The MCP tools: schemas (from the parameter types' doc comments, via schemars), what each
//! tool promises, and the mapping onto [`Manager`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use rmcp::handler::server::tool::IntoCallToolResult;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::service::RequestContext;
use rmcp::{tool, tool_handler, tool_router, Json, RoleServer, ServerHandler};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::guestfs::Entry;
use super::limits;
use super::sandboxes::{
    CreateRequest, ExecOutcome, ExecProgress, ExecRequest, Manager, SandboxInfo,
};
use super::{McpError, ToolResult};

/// What the server tells the model about itself at `initialize`.
const INSTRUCTIONS: &str = "agentvm runs each sandbox in its own microVM (a Linux guest with \
its own kernel): root inside it cannot reach this host. Typical use: sandbox_create with an \
image (and a host project directory as workspace, mounted at /workspace), then exec commands \
and file_read/file_write/file_list inside it, then sandbox_remove. Long commands: exec_start, \
then exec_output until it reports exit_code. Sandboxes reach the public internet (egress \
\"agent\": not private networks, cloud metadata or this host); egress \"none\" gives one no \
network at all. Every sandbox of this session is removed when the session ends.";

/// `sandbox_create`'s arguments.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateParams {
    /// The image to boot: `oci:DIR` (an OCI layout), `oci-archive:PATH`,
    /// `docker-archive:PATH`, `docker-daemon:NAME[:TAG]` or `REGISTRY/REPO:TAG`. Converted once
    /// and cached; its Env, WorkingDir and User apply.
    pub image: String,
    /// A host directory (absolute path) to mount read-write at /workspace in the sandbox;
    /// commands then start in /workspace. The sandbox can change everything in it.
    #[serde(default)]
    pub workspace: Option<String>,
    /// Mount the workspace read-only.
    #[serde(default)]
    pub workspace_readonly: bool,
    /// Environment variables for every command in the sandbox (NAME: value).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Guest memory in MiB (default 512).
    #[serde(default)]
    pub memory_mib: Option<u32>,
    /// Number of virtual CPUs (default 1).
    #[serde(default)]
    pub cpus: Option<u32>,
    /// Network egress policy. "agent" (the default): the public internet, but not private
    /// networks (10/8, 172.16/12, 192.168/16, CGNAT, ULA), link-local and cloud metadata, or
    /// this host. "open": everything. "none": no network device at all. "none-but; allow
    /// HOST|CIDR|DOMAIN [tcp|udp] [port N]; ...": only what the rules allow (rules can follow
    /// any profile after ";"). Profiles of the host's /etc/agentvm/egress.toml work too.
    #[serde(default)]
    pub egress: Option<String>,
    /// Names of secrets stored on the host (`agentvm secret set NAME`) to give the sandbox as
    /// files /run/secrets/NAME (mode 0400, the sandbox user's). Values never appear in
    /// results or logs; a missing secret fails the create, naming it.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Names of stored secrets to give the sandbox as environment variables NAME (of every
    /// command in it).
    #[serde(default)]
    pub secret_env: Vec<String>,
    /// Keep the sandbox after this session ends (until sandbox_remove): later sessions list
    /// and use it. Default false: the sandbox is removed when the session ends.
    #[serde(default)]
    pub persistent: bool,
    /// The sandbox's main process (argv). Default: an idle process, so the sandbox waits for
    /// exec. The VM stops when this process exits; its output is what `logs` returns.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// The working directory of commands (absolute). Default: /workspace with a workspace,
    /// else the image's WorkingDir, else /.
    #[serde(default)]
    pub workdir: Option<String>,
    /// The user commands run as: numeric UID or UID:GID. Default: the image's user, else
    /// root (0).
    #[serde(default)]
    pub user: Option<String>,
}

/// `sandbox_create`'s result.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct Created {
    pub sandbox: SandboxInfo,
    /// Things to know, e.g. that the VM runs under slow software emulation.
    pub warnings: Vec<String>,
}

/// A list of sandboxes.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Listing {
    pub sandboxes: Vec<SandboxInfo>,
}

/// Names a sandbox.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxRef {
    /// The id sandbox_create returned.
    pub sandbox_id: String,
}

/// A command to run in a sandbox.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecParams {
    /// The id sandbox_create returned.
    pub sandbox_id: String,
    /// The program and its arguments, run as is (no shell). Give this or `shell`.
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    /// A shell command line, run by `/bin/sh -c` (pipes, redirections, `&&`). Give this or
    /// `argv`.
    #[serde(default)]
    pub shell: Option<String>,
    /// Working directory in the sandbox (relative: from the sandbox's workdir).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Extra environment variables (NAME: value), over the sandbox's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Text to feed to the command's standard input (then end of input). Default: none.
    #[serde(default)]
    pub stdin: Option<String>,
    /// Run as this numeric UID or UID:GID instead of the sandbox's user.
    #[serde(default)]
    pub user: Option<String>,
    /// Seconds before the command is killed and reported as timed out (default 60, at most
    /// 3600). Use exec_start for longer work.
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
    /// Most bytes of each of stdout and stderr returned (default 65536, at most 1048576);
    /// the rest is cut and the result says so.
    #[serde(default)]
    pub max_output_bytes: Option<usize>,
}

/// A command to start in the background.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecStartParams {
    /// The id sandbox_create returned.
    pub sandbox_id: String,
    /// The program and its arguments, run as is (no shell). Give this or `shell`.
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    /// A shell command line, run by `/bin/sh -c`. Give this or `argv`.
    #[serde(default)]
    pub shell: Option<String>,
    /// Working directory in the sandbox (relative: from the sandbox's workdir).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Extra environment variables (NAME: value), over the sandbox's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Text to feed to the command's standard input (then end of input).
    #[serde(default)]
    pub stdin: Option<String>,
    /// Run as this numeric UID or UID:GID instead of the sandbox's user.
    #[serde(default)]
    pub user: Option<String>,
    /// Most bytes of each of stdout and stderr buffered between two exec_output calls
    /// (default 65536, at most 1048576); more is dropped and counted.
    #[serde(default)]
    pub max_output_bytes: Option<usize>,
}

/// exec_start's result.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Started {
    /// Pass this to exec_output.
    pub exec_id: String,
}

/// Which background command to read.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecOutputParams {
    /// The id sandbox_create returned.
    pub sandbox_id: String,
    /// The id exec_start returned.
    pub exec_id: String,
    /// Wait up to this many seconds for the command to end before answering (default 0:
    /// answer at once; at most 30).
    #[serde(default)]
    pub wait_seconds: Option<u64>,
    /// Kill the command (SIGKILL) first.
    #[serde(default)]
    pub kill: bool,
}

/// How file content is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// UTF-8 text.
    Text,
    /// Base64 of the raw bytes.
    Base64,
}

/// A file to read.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileReadParams {
    /// The id sandbox_create returned.
    pub sandbox_id: String,
    /// Path in the sandbox (relative: from the sandbox's workdir). At most 1 MiB is read.
    pub path: String,
    /// `text` or `base64`. Default: text when the file is valid UTF-8, else base64.
    #[serde(default)]
    pub encoding: Option<Encoding>,
}

/// A file's content.
#[derive(Debug, Serialize, JsonSchema)]
pub struct FileContent {
    /// The path read, absolute in the sandbox.
    pub path: String,
    pub size: u64,
    pub encoding: Encoding,
    pub content: String,
}

/// A file to write.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileWriteParams {
    /// The id sandbox_create returned.
    pub sandbox_id: String,
    /// Path in the sandbox (relative: from the sandbox's workdir).
    pub path: String,
    /// The content (at most 1 MiB once decoded).
    pub content: String,
    /// How `content` is encoded: `text` (default) or `base64`.
    #[serde(default)]
    pub encoding: Option<Encoding>,
    /// Append instead of replacing the file.
    #[serde(default)]
    pub append: bool,
    /// Create missing parent directories (default true).
    #[serde(default)]
    pub create_dirs: Option<bool>,
}

/// A written file.
#[derive(Debug, Serialize, JsonSchema)]
pub struct FileWritten {
    /// The path written, absolute in the sandbox.
    pub path: String,
    /// The file's size afterwards, bytes.
    pub size: u64,
}

/// A directory to list.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileListParams {
    /// The id sandbox_create returned.
    pub sandbox_id: String,
    /// Directory in the sandbox (default: the sandbox's workdir).
    #[serde(default)]
    pub path: Option<String>,
}

/// A directory's entries.
#[derive(Debug, Serialize, JsonSchema)]
pub struct FileListing {
    /// The directory listed, absolute in the sandbox.
    pub path: String,
    /// Sorted by name; at most 1000.
    pub entries: Vec<Entry>,
    /// There were more entries than returned.
    pub truncated: bool,
}

/// Which logs to read.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogsParams {
    /// The id sandbox_create returned.
    pub sandbox_id: String,
    /// Most bytes returned, from the end (default 16384, at most 262144).
    #[serde(default)]
    pub max_bytes: Option<usize>,
    /// Also return the tail of the VM's serial console (guest kernel and agent messages).
    #[serde(default)]
    pub console: bool,
}

/// A sandbox's logs.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Logs {
    /// The end of the main process's stdout and stderr (empty for the default idle process;
    /// exec output is returned by exec and exec_output instead).
    pub output: String,
    /// Older output was cut.
    pub truncated: bool,
    /// The end of the VM's console, when asked for and the VM runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console: Option<String>,
}

/// The MCP server: the tools over the session's [`Manager`].
#[derive(Debug, Clone)]
pub struct AgentvmServer {
    manager: Arc<Manager>,
}

fn exec_request(
    argv: Option<Vec<String>>,
    shell: Option<String>,
    cwd: Option<String>,
    env: BTreeMap<String, String>,
    stdin: Option<String>,
    user: Option<String>,
    max_output_bytes: Option<usize>,
) -> ToolResult<ExecRequest> {
    Ok(ExecRequest {
        args: limits::command(argv, shell)?,
        cwd,
        env,
        stdin,
        user,
        output_cap: limits::output_cap(max_output_bytes)?,
    })
}

/// Runs `work` until it ends or the client cancels the request: dropping it then kills the
/// command it started ([`super::sandboxes`]'s kill-on-drop guard).
async fn cancellable<T>(
    ctx: &RequestContext<RoleServer>,
    work: impl std::future::Future<Output = ToolResult<T>>,
) -> ToolResult<T> {
    tokio::select! {
        r = work => r,
        () = ctx.ct.cancelled() => Err(McpError::Cancelled),
    }
}

#[tool_router]
impl AgentvmServer {
    pub fn new(manager: Arc<Manager>) -> AgentvmServer {
        AgentvmServer { manager }
    }

    #[tool(
        description = "Create a sandbox: boot a microVM from an image and keep it running for \
        exec and the file tools. Returns the sandbox (its `id` is what every other tool takes). \
        Booting takes seconds (longer under software emulation). Optionally mounts a host \
        directory at /workspace.",
        annotations(
            title = "Create sandbox",
            destructive_hint = false,
            open_world_hint = false
        )
    )]
    async fn sandbox_create(
        &self,
        Parameters(p): Parameters<CreateParams>,
    ) -> Result<Json<Created>, McpError> {
        let req = CreateRequest {
            image: p.image,
            workspace: p.workspace.map(Into::into),
            workspace_readonly: p.workspace_readonly,
            env: p.env,
            memory_mib: p.memory_mib,
            cpus: p.cpus,
            egress: p.egress,
            secrets: p.secrets,
            secret_env: p.secret_env,
            persistent: p.persistent,
            command: p.command,
            workdir: p.workdir,
            user: p.user,
        };
        if req.persistent && !self.manager.is_hosting() {
            let created = super::persist::create(req).await?;
            return serde_json::from_value(created).map(Json).map_err(|e| {
                McpError::Runtime(crate::Error::Invalid(format!(
                    "the sandbox host answered nonsense: {e}"
                )))
            });
        }
        let (sandbox, warnings) = self.manager.create(req).await?;
        Ok(Json(Created { sandbox, warnings }))
    }

    #[tool(
        description = "List this session's sandboxes with their state (running, paused, \
        stopped).",
        annotations(
            title = "List sandboxes",
            read_only_hint = true,
            open_world_hint = false
        )
    )]
    async fn sandbox_list(&self) -> Json<Listing> {
        let mut sandboxes = self.manager.list();
        if !self.manager.is_hosting() {
            sandboxes.extend(super::persist::list().await);
        }
        Json(Listing { sandboxes })
    }

    #[tool(
        description = "Run a command in a sandbox and wait for it: returns exit_code, stdout \
        and stderr (each cut at max_output_bytes, marked by stdout_truncated/stderr_truncated). \
        A non-zero exit is a normal result. A command still running after timeout_seconds is \
        killed and reported as an error with code `timeout` and the output so far.",
        annotations(
            title = "Run command",
            destructive_hint = true,
            open_world_hint = false
        )
    )]
    async fn exec(
        &self,
        Parameters(p): Parameters<ExecParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<Json<ExecOutcome>, McpError> {
        let timeout = limits::seconds(
            p.timeout_seconds,
            limits::DEFAULT_TIMEOUT_SECONDS,
            limits::MAX_TIMEOUT_SECONDS,
            "timeout_seconds",
        )?;
        let req = exec_request(
            p.argv,
            p.shell,
            p.cwd,
            p.env,
            p.stdin,
            p.user,
            p.max_output_bytes,
        )?;
        let work = self
            .manager
            .exec(&p.sandbox_id, req, Duration::from_secs(timeout));
        let out = cancellable(&ctx, work).await?;
        Ok(Json(out))
    }

    #[tool(
        description = "Start a long-running command in a sandbox without waiting; returns an \
        exec_id. Read its output and, once it has ended, its exit code with exec_output.",
        annotations(
            title = "Start command",
            destructive_hint = true,
            open_world_hint = false
        )
    )]
    async fn exec_start(
        &self,
        Parameters(p): Parameters<ExecStartParams>,
    ) -> Result<Json<Started>, McpError> {
        let req = exec_request(
            p.argv,
            p.shell,
            p.cwd,
            p.env,
            p.stdin,
            p.user,
            p.max_output_bytes,
        )?;
        let exec_id = self.manager.exec_start(&p.sandbox_id, req).await?;
        Ok(Json(Started { exec_id }))
    }

    #[tool(
        description = "Output of an exec_start command since the previous exec_output call, \
        without blocking (or waiting up to wait_seconds for it to end). `running` says whether \
        it still runs; once it has ended `exit_code` is set and the exec_id is forgotten. \
        `kill: true` ends it first.",
        annotations(
            title = "Read command output",
            read_only_hint = false,
            destructive_hint = false,
            open_world_hint = false
        )
    )]
    async fn exec_output(
        &self,
        Parameters(p): Parameters<ExecOutputParams>,
    ) -> Result<Json<ExecProgress>, McpError> {
        let wait = match p.wait_seconds {
            None | Some(0) => 0,
            w => limits::seconds(w, 0, limits::MAX_WAIT_SECONDS, "wait_seconds")?,
        };
        let out = self
            .manager
            .exec_output(&p.sandbox_id, &p.exec_id, Duration::from_secs(wait), p.kill)
            .await?;
        Ok(Json(out))
    }

    #[tool(
        description = "Read a file inside a sandbox (at most 1 MiB). Paths are inside the \
        sandbox, never the host's; relative paths start at the sandbox's workdir.",
        annotations(title = "Read file", read_only_hint = true, open_world_hint = false)
    )]
    async fn file_read(
        &self,
        Parameters(p): Parameters<FileReadParams>,
    ) -> Result<Json<FileContent>, McpError> {
        let (path, bytes) = self
            .manager
            .file_read(&p.sandbox_id, &p.path, limits::MAX_FILE_BYTES)
            .await?;
        let size = bytes.len() as u64;
        let (encoding, content) = match (p.encoding, String::from_utf8(bytes)) {
            (Some(Encoding::Base64), Ok(s)) => (
                Encoding::Base64,
                base64::engine::general_purpose::STANDARD.encode(s),
            ),
            (Some(Encoding::Text) | None, Ok(s)) => (Encoding::Text, s),
            (Some(Encoding::Text), Err(_)) => {
                return Err(McpError::InvalidArgument(format!(
                    "{path} is not UTF-8 text: read it with encoding base64"
                )))
            }
            (_, Err(e)) => (
                Encoding::Base64,
                base64::engine::general_purpose::STANDARD.encode(e.into_bytes()),
            ),
        };
        Ok(Json(FileContent {
            path,
            size,
            encoding,
            content,
        }))
    }

    #[tool(
        description = "Write (or append to) a file inside a sandbox, creating parent \
        directories. At most 1 MiB. Paths are inside the sandbox; relative paths start at the \
        sandbox's workdir. Files under /workspace land in the host's workspace directory.",
        annotations(title = "Write file", destructive_hint = true, open_world_hint = false)
    )]
    async fn file_write(
        &self,
        Parameters(p): Parameters<FileWriteParams>,
    ) -> Result<Json<FileWritten>, McpError> {
        let bytes = match p.encoding.unwrap_or(Encoding::Text) {
            Encoding::Text => p.content.into_bytes(),
            Encoding::Base64 => base64::engine::general_purpose::STANDARD
                .decode(p.content.trim())
                .map_err(|e| McpError::InvalidArgument(format!("content is not base64: {e}")))?,
        };
        let (path, size) = self
            .manager
            .file_write(
                &p.sandbox_id,
                &p.path,
                bytes,
                p.append,
                p.create_dirs.unwrap_or(true),
            )
            .await?;
        Ok(Json(FileWritten { path, size }))
    }

    #[tool(
        description = "List a directory inside a sandbox: name, type (file, directory, \
        symlink, other) and size of each entry.",
        annotations(
            title = "List directory",
            read_only_hint = true,
            open_world_hint = false
        )
    )]
    async fn file_list(
        &self,
        Parameters(p): Parameters<FileListParams>,
    ) -> Result<Json<FileListing>, McpError> {
        let (path, entries, truncated) = self
            .manager
            .file_list(&p.sandbox_id, p.path.as_deref().unwrap_or("."))
            .await?;
        Ok(Json(FileListing {
            path,
            entries,
            truncated,
        }))
    }

    #[tool(
        description = "The end of a sandbox's main-process output (and, with console: true, \
        of its VM console).",
        annotations(title = "Sandbox logs", read_only_hint = true, open_world_hint = false)
    )]
    async fn logs(&self, Parameters(p): Parameters<LogsParams>) -> Result<Json<Logs>, McpError> {
        let max = match p.max_bytes {
            None => 16 * 1024,
            Some(n) if (1..=limits::LOG_TAIL_BYTES).contains(&n) => n,
            Some(n) => {
                return Err(McpError::InvalidArgument(format!(
                    "max_bytes {n} is out of range: give 1 to {}",
                    limits::LOG_TAIL_BYTES
                )))
            }
        };
        let (output, truncated, console) = self.manager.logs(&p.sandbox_id, max, p.console)?;
        Ok(Json(Logs {
            output,
            truncated,
            console,
        }))
    }

    #[tool(
        description = "Freeze a sandbox: every vCPU stops, processes keep their state. Commands \
        and file tools are refused until sandbox_resume.",
        annotations(
            title = "Pause sandbox",
            destructive_hint = false,
            idempotent_hint = false,
            open_world_hint = false
        )
    )]
    async fn sandbox_pause(
        &self,
        Parameters(p): Parameters<SandboxRef>,
    ) -> Result<Json<SandboxInfo>, McpError> {
        Ok(Json(self.manager.pause(&p.sandbox_id).await?))
    }

    #[tool(
        description = "Let a paused sandbox run again.",
        annotations(
            title = "Resume sandbox",
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn sandbox_resume(
        &self,
        Parameters(p): Parameters<SandboxRef>,
    ) -> Result<Json<SandboxInfo>, McpError> {
        Ok(Json(self.manager.resume(&p.sandbox_id).await?))
    }

    #[tool(
        description = "Stop a sandbox: its processes get SIGTERM, then SIGKILL after 5 s, and \
        its VM ends (everything outside /workspace is lost). It stays listed as stopped until \
        sandbox_remove.",
        annotations(
            title = "Stop sandbox",
            destructive_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn sandbox_stop(
        &self,
        Parameters(p): Parameters<SandboxRef>,
    ) -> Result<Json<SandboxInfo>, McpError> {
        Ok(Json(self.manager.stop(&p.sandbox_id).await?))
    }

    #[tool(
        description = "Remove a sandbox: kill its VM at once if it runs and forget it. The \
        workspace directory on the host stays.",
        annotations(
            title = "Remove sandbox",
            destructive_hint = true,
            idempotent_hint = false,
            open_world_hint = false
        )
    )]
    async fn sandbox_remove(
        &self,
        Parameters(p): Parameters<SandboxRef>,
    ) -> Result<Json<SandboxInfo>, McpError> {
        Ok(Json(self.manager.remove(&p.sandbox_id).await?))
    }
}

#[tool_handler]
impl ServerHandler for AgentvmServer {
    /// The router's, except that a call naming a persistent sandbox of another process goes
    /// to that sandbox's host ([`super::persist`]).
    async fn call_tool(
        &self,
        request: rmcp::model::CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::CallToolResponse, rmcp::ErrorData> {
        let id = request
            .arguments
            .as_ref()
            .and_then(|a| a.get("sandbox_id"))
            .and_then(|v| v.as_str())
            .map(str::to_string);
        if let Some(id) = id {
            if !self.manager.is_hosting()
                && !self.manager.has(&id)
                && super::persist::is_hosted(&id)
            {
                return match super::persist::forward(&id, request).await {
                    Ok(r) => Ok(r.into()),
                    Err(e) => e.into_call_tool_result(),
                };
            }
        }
        let tcc = rmcp::handler::server::tool::ToolCallContext::new(self, request, context);
        Self::tool_router().call(tcc).await
    }

    fn get_info(&self) -> rmcp::model::ServerConfig {
        rmcp::model::ServerConfig::new(
            rmcp::model::ServerCapabilities::builder()
                .enable_tools()
                .build(),
        )
        .with_server_info(rmcp::model::Implementation::new(
            "agentvm",
            env!("CARGO_PKG_VERSION"),
        ))
        .with_instructions(INSTRUCTIONS.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tool_is_listed_with_a_schema_and_a_description() {
        let router = AgentvmServer::tool_router();
        let tools = router.list_all();
        let mut names: Vec<String> = tools.iter().map(|t| t.name.to_string()).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "exec",
                "exec_output",
                "exec_start",
                "file_list",
                "file_read",
                "file_write",
                "logs",
                "sandbox_create",
                "sandbox_list",
                "sandbox_pause",
                "sandbox_remove",
                "sandbox_resume",
                "sandbox_stop"
            ]
        );
        for t in &tools {
            let d = t.description.as_deref().unwrap_or_default();
            assert!(d.len() > 20, "{} has no real description", t.name);
            assert!(t.output_schema.is_some(), "{} has no output schema", t.name);
        }
        let exec = tools.iter().find(|t| t.name == "exec").unwrap();
        let props = exec.input_schema.get("properties").unwrap();
        for p in [
            "sandbox_id",
            "argv",
            "shell",
            "cwd",
            "env",
            "stdin",
            "timeout_seconds",
        ] {
            let desc = props[p]["description"].as_str().unwrap_or_default();
            assert!(!desc.is_empty(), "exec.{p} has no description");
        }
        assert_eq!(
            exec.input_schema["required"],
            serde_json::json!(["sandbox_id"])
        );
    }

    #[test]
    fn errors_are_structured_tool_results() {
        use rmcp::handler::server::tool::IntoCallToolResult;
        use rmcp::model::CallToolResponse;
        let r = McpError::UnknownSandbox("x".into())
            .into_call_tool_result()
            .unwrap();
        let CallToolResponse::Complete(r) = r else {
            panic!("not a complete result")
        };
        assert_eq!(r.is_error, Some(true));
        let s = r.structured_content.unwrap();
        assert_eq!(s["error"]["code"], "unknown_sandbox");
        let t = McpError::Timeout {
            seconds: 2,
            stdout: "so far".into(),
            stderr: String::new(),
        }
        .to_json();
        assert_eq!(t["timed_out"], true);
        assert_eq!(t["stdout"], "so far");
    }
}
