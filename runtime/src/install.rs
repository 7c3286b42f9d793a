//! `agentvm install`: registers the shim with Docker by merging
//! `{"runtimes":{"agentvm":{"runtimeType":"io.containerd.agentvm.v1"}}}` into daemon.json.
//! Idempotent; keeps every other setting; restarts nothing (dockerd reads runtimes at start
//! and on SIGHUP).

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};

/// Docker's daemon configuration file.
pub const DOCKER_DAEMON_JSON: &str = "/etc/docker/daemon.json";
/// The name users pass to `docker run --runtime`.
pub const RUNTIME_NAME: &str = "agentvm";
/// The containerd runtime type; containerd runs `containerd-shim-agentvm-v1` for it.
pub const RUNTIME_TYPE: &str = "io.containerd.agentvm.v1";

/// Merges the agentvm runtime into the daemon.json text `current` (empty = no file yet).
/// Returns the new text, or `None` when nothing needs to change.
pub fn merge_daemon_json(current: &str) -> Result<Option<String>> {
    let mut root: Value = if current.trim().is_empty() {
        Value::Object(Map::new())
    } else {
        serde_json::from_str(current)
            .map_err(|e| Error::Invalid(format!("daemon.json is not valid JSON: {e}")))?
    };
    let obj = root
        .as_object_mut()
        .ok_or_else(|| Error::Invalid("daemon.json is not a JSON object".into()))?;
    let runtimes = obj
        .entry("runtimes")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .ok_or_else(|| Error::Invalid("daemon.json: \"runtimes\" is not an object".into()))?;
    let wanted = json!({ "runtimeType": RUNTIME_TYPE });
    if runtimes.get(RUNTIME_NAME) == Some(&wanted) {
        return Ok(None);
    }
    runtimes.insert(RUNTIME_NAME.into(), wanted);
    let mut text = serde_json::to_string_pretty(&root).expect("JSON values serialize");
    text.push('\n');
    Ok(Some(text))
}

/// Registers the runtime in the daemon.json at `path`; returns whether the file changed.
pub fn install_docker_runtime(path: &Path) -> Result<bool> {
    let current = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Error::io("read", path, e)),
    };
    let Some(text) = merge_daemon_json(&current)? else {
        return Ok(false);
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
    }
    // Write a sibling and rename, so dockerd never reads a half-written file.
    let tmp = path.with_extension("json.agentvm-tmp");
    std::fs::write(&tmp, text).map_err(|e| Error::io("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io("replace", path, e))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_into_empty_and_existing_configs_once() {
        let fresh = merge_daemon_json("").unwrap().unwrap();
        let v: Value = serde_json::from_str(&fresh).unwrap();
        assert_eq!(v["runtimes"]["agentvm"]["runtimeType"], RUNTIME_TYPE);
        assert_eq!(merge_daemon_json(&fresh).unwrap(), None, "idempotent");

        let other =
            r#"{"debug": true, "runtimes": {"kata": {"runtimeType": "io.containerd.kata.v2"}}}"#;
        let merged: Value =
            serde_json::from_str(&merge_daemon_json(other).unwrap().unwrap()).unwrap();
        assert_eq!(merged["debug"], true);
        assert_eq!(
            merged["runtimes"]["kata"]["runtimeType"],
            "io.containerd.kata.v2"
        );
        assert_eq!(merged["runtimes"]["agentvm"]["runtimeType"], RUNTIME_TYPE);
    }

    #[test]
    fn refuses_to_rewrite_what_it_cannot_read() {
        assert!(merge_daemon_json("{not json").is_err());
        assert!(merge_daemon_json("[1]").is_err());
        assert!(merge_daemon_json(r#"{"runtimes": 3}"#).is_err());
    }

    #[test]
    fn writes_the_file_and_reports_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docker/daemon.json");
        assert!(install_docker_runtime(&path).unwrap());
        assert!(!install_docker_runtime(&path).unwrap());
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["runtimes"]["agentvm"]["runtimeType"], RUNTIME_TYPE);
    }
}
