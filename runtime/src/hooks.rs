//! OCI hooks from a bundle's `config.json`, run on the host.
//!
//! A VM runtime has no container namespaces on the host, so every hook runs in the shim's
//! namespaces with the task pid (the network namespace holder) in the state on its stdin —
//! which is what Docker's `libnetwork-setkey` prestart hook and nerdctl's CNI hooks need.
//! `createContainer` and `startContainer` hooks are meant to run inside the container; they
//! are not run (and logged) because their paths name files in the container's root.

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use oci_spec::runtime::Hook;
pub use oci_spec::runtime::Hooks;
use serde::Serialize;
use tokio::io::AsyncWriteExt;

use crate::error::{Error, Result};

/// Upper bound for a hook without its own timeout: a wedged hook must not hang a container
/// operation forever.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// The moments at which hooks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// During create, after the namespace exists (status `creating`).
    CreateRuntime,
    /// During create, after `createRuntime` (status `creating`); deprecated in OCI but what
    /// Docker 20.10-27 use for networking.
    Prestart,
    /// After the process started (status `running`); failures are only logged.
    Poststart,
    /// After the container was deleted (status `stopped`); failures are only logged.
    Poststop,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::CreateRuntime => "createRuntime",
            Phase::Prestart => "prestart",
            Phase::Poststart => "poststart",
            Phase::Poststop => "poststop",
        }
    }

    fn status(self) -> &'static str {
        match self {
            Phase::CreateRuntime | Phase::Prestart => "creating",
            Phase::Poststart => "running",
            Phase::Poststop => "stopped",
        }
    }

    fn hooks(self, hooks: &Hooks) -> &[Hook] {
        let list = match self {
            Phase::CreateRuntime => hooks.create_runtime(),
            Phase::Prestart => hooks.prestart(),
            Phase::Poststart => hooks.poststart(),
            Phase::Poststop => hooks.poststop(),
        };
        list.as_deref().unwrap_or_default()
    }
}

/// The OCI state handed to a hook on stdin.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct State<'a> {
    pub oci_version: &'a str,
    pub id: &'a str,
    pub status: &'a str,
    pub pid: u32,
    pub bundle: &'a str,
    pub annotations: &'a HashMap<String, String>,
}

/// What hooks need to know about the container.
#[derive(Debug, Clone)]
pub struct HookContext {
    pub id: String,
    pub bundle: String,
    pub pid: u32,
    pub annotations: HashMap<String, String>,
}

/// Logs the in-container hooks agentvm does not run.
pub fn warn_unsupported(hooks: &Hooks) {
    let n = hooks.create_container().as_ref().map_or(0, Vec::len)
        + hooks.start_container().as_ref().map_or(0, Vec::len);
    if n > 0 {
        tracing::warn!(
            "{n} createContainer/startContainer hook(s) not run: they execute inside the \
             container's namespaces, which live in the VM"
        );
    }
}

/// Runs the hooks of `phase` in order. For create phases the first failure is returned;
/// for the others failures are logged and the rest still run.
pub async fn run(hooks: Option<&Hooks>, phase: Phase, ctx: &HookContext) -> Result<()> {
    let Some(hooks) = hooks else { return Ok(()) };
    let state = serde_json::to_vec(&State {
        oci_version: "1.0.2",
        id: &ctx.id,
        status: phase.status(),
        pid: ctx.pid,
        bundle: &ctx.bundle,
        annotations: &ctx.annotations,
    })
    .map_err(|e| Error::Invalid(format!("hook state: {e}")))?;
    for (i, hook) in phase.hooks(hooks).iter().enumerate() {
        let r = run_one(hook, &state).await.map_err(|e| {
            Error::Invalid(format!(
                "{} hook #{i} ({}) failed: {e}",
                phase.name(),
                hook.path().display()
            ))
        });
        match (r, phase) {
            (Ok(()), _) => {}
            (Err(e), Phase::CreateRuntime | Phase::Prestart) => return Err(e),
            (Err(e), _) => tracing::warn!("{e}"),
        }
    }
    Ok(())
}

async fn run_one(hook: &Hook, state: &[u8]) -> std::result::Result<(), String> {
    let path: &Path = hook.path();
    if !path.is_absolute() {
        return Err("the hook path must be absolute".into());
    }
    let mut cmd = std::process::Command::new(path);
    if let Some(args) = hook.args() {
        if let Some((arg0, rest)) = args.split_first() {
            cmd.arg0(arg0).args(rest);
        }
    }
    cmd.env_clear();
    for kv in hook.env().as_deref().unwrap_or_default() {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its stdin is fine: ignore EPIPE.
        let _ = stdin.write_all(state).await;
    }
    let timeout = match hook.timeout() {
        Some(s) if s > 0 => Duration::from_secs(s as u64),
        _ => DEFAULT_TIMEOUT,
    };
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| format!("timed out after {} s", timeout.as_secs()))?
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        return Ok(());
    }
    let mut msg = format!("{}", out.status);
    for stream in [&out.stderr, &out.stdout] {
        let text = String::from_utf8_lossy(stream);
        if !text.trim().is_empty() {
            msg.push_str(": ");
            msg.push_str(text.trim());
            break;
        }
    }
    Err(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hooks(json: &str) -> Hooks {
        serde_json::from_str(json).unwrap()
    }

    fn ctx() -> HookContext {
        HookContext {
            id: "c1".into(),
            bundle: "/b".into(),
            pid: 4242,
            annotations: HashMap::from([("k".to_string(), "v".to_string())]),
        }
    }

    #[tokio::test]
    async fn hooks_get_the_state_on_stdin_their_args_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let h = hooks(&format!(
            r#"{{"prestart":[{{"path":"/bin/sh","args":["sh","-c","cat > {0}; echo \" $0 $FOO\" >> {0}","argzero"],"env":["FOO=bar"]}}]}}"#,
            out.display()
        ));
        run(Some(&h), Phase::Prestart, &ctx()).await.unwrap();
        let got = std::fs::read_to_string(&out).unwrap();
        let (json, tail) = got.split_once(" argzero").unwrap();
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["pid"], 4242);
        assert_eq!(v["status"], "creating");
        assert_eq!(v["id"], "c1");
        assert_eq!(v["bundle"], "/b");
        assert_eq!(v["annotations"]["k"], "v");
        assert_eq!(v["ociVersion"], "1.0.2");
        assert_eq!(tail.trim(), "bar");
    }

    #[tokio::test]
    async fn a_failing_create_hook_fails_with_its_stderr() {
        let h = hooks(
            r#"{"createRuntime":[{"path":"/bin/sh","args":["sh","-c","echo no network >&2; exit 3"]}]}"#,
        );
        let e = run(Some(&h), Phase::CreateRuntime, &ctx())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("createRuntime hook #0") && e.contains("no network"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_failing_poststop_hook_is_only_logged_and_the_next_runs() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("ran");
        let h = hooks(&format!(
            r#"{{"poststop":[{{"path":"/bin/false"}},{{"path":"/bin/sh","args":["sh","-c","cat > {}"]}}]}}"#,
            out.display()
        ));
        run(Some(&h), Phase::Poststop, &ctx()).await.unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        assert_eq!(v["status"], "stopped");
    }

    #[tokio::test]
    async fn hooks_time_out_and_relative_paths_are_refused() {
        let h = hooks(r#"{"prestart":[{"path":"/bin/sleep","args":["sleep","30"],"timeout":1}]}"#);
        let e = run(Some(&h), Phase::Prestart, &ctx()).await.unwrap_err();
        assert!(e.to_string().contains("timed out after 1 s"), "{e}");
        let h = hooks(r#"{"prestart":[{"path":"bin/true"}]}"#);
        let e = run(Some(&h), Phase::Prestart, &ctx()).await.unwrap_err();
        assert!(e.to_string().contains("absolute"), "{e}");
    }
}
