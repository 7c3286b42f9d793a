//! `agentvm install` / `agentvm uninstall`: register the shim with Docker and containerd's CRI
//! plugin, or take it out again.
//!
//! * Docker: `{"runtimes":{"agentvm":{"runtimeType":"io.containerd.agentvm.v1"}}}` merged into
//!   daemon.json (dockerd reads runtimes at start and on SIGHUP).
//! * containerd: the CRI runtime table `...containerd.runtimes.agentvm` with
//!   `runtime_type = "io.containerd.agentvm.v1"` merged into config.toml with `toml_edit`, so
//!   the file's layout and comments stay as they are (containerd reads it only at start).
//!   The table path follows the file's `version` ([`CriSchema`]); a file that had no runtime
//!   table also gets containerd's default runc entry written out, because containerd 1.7
//!   replaces its built-in runtimes with the file's (the CRI plugin would then fail to load
//!   for want of its default runtime `runc`). Uninstall removes that runc entry again only when
//!   it carries install's comment and no other runtime is left.
//!
//! Both are idempotent, keep every other setting, write atomically (a sibling temp file
//! renamed over the original, with the original's permissions), refuse to rewrite a file they
//! cannot parse or whose structure is in the way, and restart nothing.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};
use toml_edit::{DocumentMut, InlineTable, Item, Table, TableLike};

use crate::error::{Error, Result};

/// Docker's daemon configuration file.
pub const DOCKER_DAEMON_JSON: &str = "/etc/docker/daemon.json";
/// containerd's configuration file.
pub const CONTAINERD_CONFIG_TOML: &str = "/etc/containerd/config.toml";
/// The name users pass to `docker run --runtime` (and the CRI RuntimeClass `handler`).
pub const RUNTIME_NAME: &str = "agentvm";
/// The containerd runtime type; containerd runs `containerd-shim-agentvm-v1` for it.
pub const RUNTIME_TYPE: &str = "io.containerd.agentvm.v1";

/// Merges the agentvm runtime into the daemon.json text `current` (empty = no file yet).
/// Returns the new text, or `None` when nothing needs to change.
pub fn merge_daemon_json(current: &str) -> Result<Option<String>> {
    let mut root = parse_daemon_json(current)?;
    let obj = root
        .as_object_mut()
        .ok_or_else(|| Error::Invalid("not a JSON object".into()))?;
    let runtimes = obj
        .entry("runtimes")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .ok_or_else(|| Error::Invalid("\"runtimes\" is not an object".into()))?;
    let wanted = json!({ "runtimeType": RUNTIME_TYPE });
    if runtimes.get(RUNTIME_NAME) == Some(&wanted) {
        return Ok(None);
    }
    runtimes.insert(RUNTIME_NAME.into(), wanted);
    Ok(Some(render_json(&root)))
}

/// Removes `runtimes.agentvm` from the daemon.json text `current` (and `runtimes` when that
/// leaves it empty). Returns the new text, or `None` when the runtime is not registered.
pub fn remove_from_daemon_json(current: &str) -> Result<Option<String>> {
    if current.trim().is_empty() {
        return Ok(None);
    }
    let mut root = parse_daemon_json(current)?;
    let obj = root
        .as_object_mut()
        .ok_or_else(|| Error::Invalid("not a JSON object".into()))?;
    let Some(runtimes) = obj.get_mut("runtimes") else {
        return Ok(None);
    };
    let runtimes = runtimes
        .as_object_mut()
        .ok_or_else(|| Error::Invalid("\"runtimes\" is not an object".into()))?;
    if runtimes.remove(RUNTIME_NAME).is_none() {
        return Ok(None);
    }
    if runtimes.is_empty() {
        obj.remove("runtimes");
    }
    Ok(Some(render_json(&root)))
}

fn parse_daemon_json(current: &str) -> Result<Value> {
    if current.trim().is_empty() {
        return Ok(Value::Object(Map::new()));
    }
    serde_json::from_str(current).map_err(|e| Error::Invalid(format!("not valid JSON: {e}")))
}

fn render_json(root: &Value) -> String {
    let mut text = serde_json::to_string_pretty(root).expect("JSON values serialize");
    text.push('\n');
    text
}

/// Registers the runtime in the daemon.json at `path` (created when missing); returns whether
/// the file changed.
pub fn install_docker_runtime(path: &Path) -> Result<bool> {
    let current = read_optional(path)?.unwrap_or_default();
    let Some(text) = merge_daemon_json(&current).map_err(|e| in_file(path, e))? else {
        return Ok(false);
    };
    write_atomic(path, &text)?;
    Ok(true)
}

/// Removes the runtime from the daemon.json at `path`; returns whether the file changed
/// (a missing file is left missing).
pub fn uninstall_docker_runtime(path: &Path) -> Result<bool> {
    let Some(current) = read_optional(path)? else {
        return Ok(false);
    };
    let Some(text) = remove_from_daemon_json(&current).map_err(|e| in_file(path, e))? else {
        return Ok(false);
    };
    write_atomic(path, &text)?;
    Ok(true)
}

/// Where containerd's CRI plugin reads named runtimes from, by config file `version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CriSchema {
    /// `version = 1` or no `version` with other settings: containerd 1.x reads plugin
    /// sections by their short ID (`plugins.cri`); 2.x migrates them.
    V1,
    /// `version = 2` (containerd 1.7; 2.x migrates it): `plugins."io.containerd.grpc.v1.cri"`.
    V2,
    /// `version = 3` (containerd 2.x): `plugins."io.containerd.cri.v1.runtime"`.
    V3,
}

impl CriSchema {
    fn plugin(self) -> &'static str {
        match self {
            CriSchema::V1 => "cri",
            CriSchema::V2 => "io.containerd.grpc.v1.cri",
            CriSchema::V3 => "io.containerd.cri.v1.runtime",
        }
    }

    /// Key path of the agentvm runtime table.
    fn path(self) -> [&'static str; 5] {
        [
            "plugins",
            self.plugin(),
            "containerd",
            "runtimes",
            RUNTIME_NAME,
        ]
    }

    /// The table as a TOML header, for messages.
    pub fn table(self) -> String {
        dotted(&self.path())
    }
}

/// TOML dotted form of a key path, quoting keys that need it.
fn dotted(keys: &[&str]) -> String {
    keys.iter()
        .map(|k| toml_edit::Key::new(*k).display_repr().into_owned())
        .collect::<Vec<_>>()
        .join(".")
}

/// Result of a containerd config edit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TomlEdit {
    /// The new text; `None` = nothing to change.
    pub text: Option<String>,
    /// The schema (table path) the file's `version` selected.
    pub schema: CriSchema,
    /// Whether containerd's default `runc` runtime was written out (install) or its
    /// written-out copy removed (uninstall) along with the agentvm table.
    pub default_runc: bool,
}

/// The runc runtime as containerd's built-in default has it. The built-in `runtimes` map is
/// replaced by the file's as soon as the file has one (containerd 1.7), so a file that gains
/// its first runtime table must carry runc too, or the CRI plugin refuses to load
/// ("no corresponding runtime configured in `containerd.runtimes` for ... `runc`").
const RUNC_NAME: &str = "runc";
const RUNC_TYPE: &str = "io.containerd.runc.v2";
/// Marks the runc table `install` wrote out, so `uninstall` removes only that one.
const RUNC_MARK: &str = "# containerd's default runc runtime, written out by `agentvm install`";
const RUNC_COMMENT: &str =
    "\n# containerd's default runc runtime, written out by `agentvm install`: a runtimes\n\
    # table in this file replaces containerd's built-in one (`agentvm uninstall` removes it)\n";

fn parse_containerd_toml(current: &str) -> Result<(DocumentMut, CriSchema)> {
    let doc: DocumentMut = current
        .parse()
        .map_err(|e| Error::Invalid(format!("not valid TOML: {e}")))?;
    let schema = match doc.get("version") {
        None if doc.is_empty() => CriSchema::V2,
        None => CriSchema::V1,
        Some(v) => match v.as_integer() {
            Some(1) => CriSchema::V1,
            Some(2) => CriSchema::V2,
            Some(3) => CriSchema::V3,
            _ => {
                return Err(Error::Invalid(format!(
                    "unsupported containerd config version {} (1, 2 or 3 expected)",
                    v.to_string().trim()
                )))
            }
        },
    };
    Ok((doc, schema))
}

/// Merges the agentvm CRI runtime into the containerd config.toml text `current` (empty = no
/// file yet: the result gets `version = 2`). The table is picked by the file's `version`; an
/// existing `agentvm` table keeps its other keys and gets `runtime_type` set. When agentvm is
/// the file's only runtime and the default runtime is runc, containerd's runc entry is written
/// out next to it (see [`TomlEdit::default_runc`]).
pub fn merge_containerd_toml(current: &str) -> Result<TomlEdit> {
    let (mut doc, schema) = parse_containerd_toml(current)?;
    if doc.is_empty() {
        // Nothing else in the file: make the version explicit, or containerd reads it as 1.
        doc.insert("version", toml_edit::value(2));
    }
    let end_position = last_position(doc.as_table()).map_or(0, |p| p + 1);
    let path = schema.path();
    let (parents, name) = path.split_at(path.len() - 1);
    let name = name[0];
    // Header tables can only hold header tables; inside an inline table, everything is inline.
    let mut inline = false;
    let mut default_runtime = RUNC_NAME.to_owned();
    let mut table: &mut dyn TableLike = doc.as_table_mut();
    for (i, key) in parents.iter().enumerate() {
        if *key == "runtimes" {
            if let Some(d) = table.get("default_runtime_name").and_then(Item::as_str) {
                default_runtime = d.to_owned();
            }
        }
        if table.get(key).is_none() {
            table.insert(key, new_table(inline));
        }
        let item = table.get_mut(key).expect("just inserted");
        let type_name = item.type_name();
        inline = !item.is_table();
        table = item
            .as_table_like_mut()
            .ok_or_else(|| not_a_table(&parents[..=i], type_name))?;
    }
    let needs_runc = default_runtime == RUNC_NAME
        && table.iter().all(|(k, _)| k == name)
        && !table.contains_key(RUNC_NAME);
    // A table without a position is printed after the table before it in tree order; when no
    // other runtime table is there to follow, that can be the middle of an unrelated section,
    // so append to the end of the file instead.
    let mut next_position = (!table
        .iter()
        .any(|(_, item)| item.as_table().and_then(Table::position).is_some()))
    .then_some(end_position);
    let registered = match table.get(name) {
        None => false,
        Some(item) => {
            let runtime = item
                .as_table_like()
                .ok_or_else(|| not_a_table(&path, item.type_name()))?;
            runtime.get("runtime_type").and_then(Item::as_str) == Some(RUNTIME_TYPE)
                && has_pod_annotations(runtime)
        }
    };
    if registered && !needs_runc {
        return Ok(TomlEdit {
            text: None,
            schema,
            default_runc: false,
        });
    }
    if needs_runc {
        let runc = new_runtime(inline, RUNC_TYPE, next_position, Some(RUNC_COMMENT));
        next_position = next_position.map(|p| p + 1);
        table.insert(RUNC_NAME, runc);
    }
    match table.get_mut(name).and_then(Item::as_table_like_mut) {
        Some(runtime) => {
            runtime.insert("runtime_type", toml_edit::value(RUNTIME_TYPE));
            add_pod_annotations(runtime);
        }
        None => {
            let mut runtime = new_runtime(inline, RUNTIME_TYPE, next_position, None);
            add_pod_annotations(runtime.as_table_like_mut().expect("a table"));
            table.insert(name, runtime);
        }
    }
    Ok(TomlEdit {
        text: Some(doc.to_string()),
        schema,
        default_runc: needs_runc,
    })
}

/// The pod annotations the CRI plugin must pass to agentvm (the egress policy, share and root
/// choices): containerd 1.7 and 2.x hand a pod's annotations to the runtime only where the
/// handler's `pod_annotations` list matches them.
const POD_ANNOTATIONS: &str = "io.agentvm.*";

fn has_pod_annotations(runtime: &dyn TableLike) -> bool {
    runtime
        .get("pod_annotations")
        .and_then(Item::as_array)
        .is_some_and(|a| a.iter().any(|v| v.as_str() == Some(POD_ANNOTATIONS)))
}

/// Adds [`POD_ANNOTATIONS`] to the runtime's `pod_annotations`, keeping what is there.
fn add_pod_annotations(runtime: &mut dyn TableLike) {
    if has_pod_annotations(runtime) {
        return;
    }
    match runtime
        .get_mut("pod_annotations")
        .and_then(Item::as_array_mut)
    {
        Some(list) => list.push(POD_ANNOTATIONS),
        None => {
            let mut list = toml_edit::Array::new();
            list.push(POD_ANNOTATIONS);
            runtime.insert("pod_annotations", toml_edit::value(list));
        }
    }
}

/// A runtime table `{ runtime_type = ... }`: a header table (at `position`, after `comment`)
/// or, inside an inline table, an inline one.
fn new_runtime(
    inline: bool,
    runtime_type: &str,
    position: Option<isize>,
    comment: Option<&str>,
) -> Item {
    let mut item = new_table(inline);
    if let Item::Table(t) = &mut item {
        t.set_implicit(false);
        t.set_position(position);
        if let Some(c) = comment {
            t.decor_mut().set_prefix(c);
        }
    }
    let t = item.as_table_like_mut().expect("a table");
    t.insert("runtime_type", toml_edit::value(runtime_type));
    item
}

/// Removes the agentvm CRI runtime table from the containerd config.toml text `current`, the
/// runc table `install` wrote out when it is the last runtime left, and the parent tables that
/// only existed to hold them (implicit or dotted, now empty), so an install followed by an
/// uninstall gives back the original text.
pub fn remove_from_containerd_toml(current: &str) -> Result<TomlEdit> {
    let (mut doc, schema) = parse_containerd_toml(current)?;
    let path = schema.path();
    let mut default_runc = false;
    let removed = remove_path(doc.as_table_mut(), &path, &path, &mut default_runc)?;
    Ok(TomlEdit {
        text: removed.then(|| doc.to_string()),
        schema,
        default_runc,
    })
}

/// Removes `keys` below `table`; returns whether something was removed.
fn remove_path(
    table: &mut dyn TableLike,
    keys: &[&str],
    full: &[&str],
    default_runc: &mut bool,
) -> Result<bool> {
    let (key, rest) = keys.split_first().expect("non-empty path");
    if rest.is_empty() {
        if table.remove(key).is_none() {
            return Ok(false);
        }
        let written_out_runc = table.len() == 1
            && match table.get(RUNC_NAME) {
                Some(Item::Table(t)) => {
                    t.len() == 1
                        && t.get("runtime_type").and_then(Item::as_str) == Some(RUNC_TYPE)
                        && t.decor()
                            .prefix()
                            .and_then(|p| p.as_str())
                            .is_some_and(|p| p.contains(RUNC_MARK))
                }
                _ => false,
            };
        if written_out_runc {
            table.remove(RUNC_NAME);
            *default_runc = true;
        }
        return Ok(true);
    }
    let Some(item) = table.get_mut(key) else {
        return Ok(false);
    };
    let type_name = item.type_name();
    let Some(child) = item.as_table_like_mut() else {
        let depth = full.len() - rest.len();
        return Err(not_a_table(&full[..depth], type_name));
    };
    let removed = remove_path(child, rest, full, default_runc)?;
    let leftover = match table.get(key) {
        Some(Item::Table(t)) => t.is_empty() && (t.is_implicit() || t.is_dotted()),
        Some(Item::Value(toml_edit::Value::InlineTable(t))) => t.is_empty() && t.is_dotted(),
        _ => false,
    };
    if removed && leftover {
        table.remove(key);
    }
    Ok(removed)
}

/// The highest document position of a header table at or below `table`.
fn last_position(table: &Table) -> Option<isize> {
    let below = table.iter().filter_map(|(_, item)| match item {
        Item::Table(t) => last_position(t),
        Item::ArrayOfTables(a) => a.iter().filter_map(last_position).max(),
        _ => None,
    });
    below.chain(table.position()).max()
}

fn new_table(inline: bool) -> Item {
    if inline {
        Item::Value(toml_edit::Value::InlineTable(InlineTable::new()))
    } else {
        let mut t = Table::new();
        t.set_implicit(true);
        Item::Table(t)
    }
}

fn not_a_table(keys: &[&str], type_name: &str) -> Error {
    Error::Invalid(format!(
        "`{}` is {} {type_name}, not a table",
        dotted(keys),
        if type_name.starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        }
    ))
}

/// Registers the CRI runtime in the containerd config.toml at `path` (created with
/// `version = 2` when missing). `text` of the result is the new content, if it changed.
pub fn install_containerd_runtime(path: &Path) -> Result<TomlEdit> {
    let current = read_optional(path)?.unwrap_or_default();
    let edit = merge_containerd_toml(&current).map_err(|e| in_file(path, e))?;
    if let Some(text) = &edit.text {
        write_atomic(path, text)?;
    }
    Ok(edit)
}

/// Removes the CRI runtime from the containerd config.toml at `path` (a missing file is left
/// missing). `text` of the result is the new content, if it changed.
pub fn uninstall_containerd_runtime(path: &Path) -> Result<TomlEdit> {
    let Some(current) = read_optional(path)? else {
        return Ok(TomlEdit {
            text: None,
            schema: CriSchema::V2,
            default_runc: false,
        });
    };
    let edit = remove_from_containerd_toml(&current).map_err(|e| in_file(path, e))?;
    if let Some(text) = &edit.text {
        write_atomic(path, text)?;
    }
    Ok(edit)
}

/// Prefixes a parse or structure error with the file it is about.
fn in_file(path: &Path, e: Error) -> Error {
    match e {
        Error::Invalid(msg) => Error::Invalid(format!("{}: {msg}", path.display())),
        other => other,
    }
}

fn read_optional(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("read", path, e)),
    }
}

/// Writes `text` to a sibling temp file and renames it over `path`, so a daemon never reads a
/// half-written file; the original's permissions are kept.
fn write_atomic(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
    }
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".agentvm-tmp");
    let tmp: PathBuf = path.with_file_name(name);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        if let Ok(meta) = std::fs::metadata(path) {
            f.set_permissions(meta.permissions())?;
        }
        f.write_all(text.as_bytes())?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io("write", &tmp, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io("replace", path, e)
    })
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
        assert!(remove_from_daemon_json("{not json").is_err());
        assert!(remove_from_daemon_json(r#"{"runtimes": 3}"#).is_err());
    }

    #[test]
    fn writes_the_file_and_reports_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docker/daemon.json");
        assert!(install_docker_runtime(&path).unwrap());
        assert!(!install_docker_runtime(&path).unwrap());
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["runtimes"]["agentvm"]["runtimeType"], RUNTIME_TYPE);
        assert!(uninstall_docker_runtime(&path).unwrap());
        assert!(!uninstall_docker_runtime(&path).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{}\n");
        let entries: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(entries.len(), 1, "no temp file left behind");
    }

    #[test]
    fn daemon_json_uninstall_keeps_other_runtimes_and_drops_an_empty_runtimes() {
        let both = r#"{"debug": true, "runtimes": {"kata": {"runtimeType": "io.containerd.kata.v2"},
            "agentvm": {"runtimeType": "io.containerd.agentvm.v1"}}}"#;
        let v: Value =
            serde_json::from_str(&remove_from_daemon_json(both).unwrap().unwrap()).unwrap();
        assert_eq!(
            v,
            json!({"debug": true, "runtimes": {"kata": {"runtimeType": "io.containerd.kata.v2"}}})
        );

        let only = merge_daemon_json(r#"{"debug": true}"#).unwrap().unwrap();
        let v: Value =
            serde_json::from_str(&remove_from_daemon_json(&only).unwrap().unwrap()).unwrap();
        assert_eq!(v, json!({"debug": true}));

        assert_eq!(remove_from_daemon_json("").unwrap(), None);
        assert_eq!(remove_from_daemon_json(r#"{"debug": true}"#).unwrap(), None);
        assert_eq!(
            remove_from_daemon_json(r#"{"runtimes": {"kata": {}}}"#).unwrap(),
            None
        );
    }

    #[test]
    fn uninstall_leaves_a_missing_daemon_json_missing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.json");
        assert!(!uninstall_docker_runtime(&path).unwrap());
        assert!(!path.exists());
    }

    /// /etc/containerd/config.toml as Debian's containerd 1.7 package ships it.
    const DEBIAN_17: &str = r#"version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
"#;

    fn runtime_type(text: &str, plugin: &str) -> Option<String> {
        let doc: DocumentMut = text.parse().unwrap();
        doc.get("plugins")?
            .get(plugin)?
            .get("containerd")?
            .get("runtimes")?
            .get(RUNTIME_NAME)?
            .get("runtime_type")?
            .as_str()
            .map(str::to_owned)
    }

    /// An agentvm table from before pod annotations were passed, or with a list of the admin's
    /// own, gets `io.agentvm.*` added, keeping the rest; then nothing more changes.
    #[test]
    fn the_handler_passes_agentvm_pod_annotations() {
        let old = "version = 2\n\
                   [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n\
                   runtime_type = \"io.containerd.runc.v2\"\n\
                   [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.agentvm]\n\
                   runtime_type = \"io.containerd.agentvm.v1\"\n\
                   pod_annotations = [\"example.com/*\"]\n";
        let text = merge_containerd_toml(old).unwrap().text.unwrap();
        assert!(
            text.contains("pod_annotations = [\"example.com/*\", \"io.agentvm.*\"]"),
            "{text}"
        );
        assert_eq!(
            merge_containerd_toml(&text).unwrap().text,
            None,
            "idempotent"
        );
        let none = old.replace("pod_annotations = [\"example.com/*\"]\n", "");
        let text = merge_containerd_toml(&none).unwrap().text.unwrap();
        assert!(
            text.contains("pod_annotations = [\"io.agentvm.*\"]"),
            "{text}"
        );
    }

    #[test]
    fn containerd_17_debian_config_round_trips() {
        let edit = merge_containerd_toml(DEBIAN_17).unwrap();
        assert_eq!(edit.schema, CriSchema::V2);
        assert!(edit.default_runc);
        let text = edit.text.unwrap();
        // Appended: the original lines stay as they were; runc is written out because a
        // runtimes table replaces containerd's built-in one (the CRI plugin would not load).
        let expected = format!(
            "{DEBIAN_17}\n\
             # containerd's default runc runtime, written out by `agentvm install`: a runtimes\n\
             # table in this file replaces containerd's built-in one (`agentvm uninstall` removes it)\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n\
             runtime_type = \"io.containerd.runc.v2\"\n\
             \n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.agentvm]\n\
             runtime_type = \"io.containerd.agentvm.v1\"\n\
             pod_annotations = [\"io.agentvm.*\"]\n"
        );
        assert_eq!(text, expected);
        assert_eq!(
            runtime_type(&text, "io.containerd.grpc.v1.cri").as_deref(),
            Some(RUNTIME_TYPE)
        );
        assert_eq!(
            merge_containerd_toml(&text).unwrap().text,
            None,
            "idempotent"
        );

        let back = remove_from_containerd_toml(&text).unwrap();
        assert!(back.default_runc);
        assert_eq!(
            back.text.as_deref(),
            Some(DEBIAN_17),
            "uninstall restores the file"
        );
        assert_eq!(remove_from_containerd_toml(DEBIAN_17).unwrap().text, None);
    }

    #[test]
    fn containerd_default_runc_is_written_out_only_when_needed_and_removed_only_if_ours() {
        // Another runtime already there: the file's runtimes already replace the built-in
        // ones, runc or not; nothing but agentvm is added.
        let kata = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kata]\n  runtime_type = \"io.containerd.kata.v2\"\n";
        let edit = merge_containerd_toml(kata).unwrap();
        assert!(!edit.default_runc);
        assert!(!edit.text.as_deref().unwrap().contains("runc"));

        // A default other than runc: containerd has no built-in for it to write out.
        let crun = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  default_runtime_name = \"crun\"\n";
        let edit = merge_containerd_toml(crun).unwrap();
        assert!(!edit.default_runc);
        assert!(!edit.text.as_deref().unwrap().contains("runc"));

        // A runc table the user wrote (no mark) stays on uninstall, even when it is the
        // last runtime left.
        let own = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n";
        let text = merge_containerd_toml(own).unwrap().text.unwrap();
        assert!(!text.contains("agentvm install"), "{text}");
        let back = remove_from_containerd_toml(&text).unwrap();
        assert!(!back.default_runc);
        assert_eq!(back.text.as_deref(), Some(own));

        // The written-out runc stays while another runtime (added later) needs it.
        let mut doc: DocumentMut = merge_containerd_toml("")
            .unwrap()
            .text
            .unwrap()
            .parse()
            .unwrap();
        doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["kata"]
            ["runtime_type"] = toml_edit::value("io.containerd.kata.v2");
        let back = remove_from_containerd_toml(&doc.to_string()).unwrap();
        assert!(!back.default_runc);
        let back: DocumentMut = back.text.unwrap().parse().unwrap();
        let runtimes = &back["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"];
        assert_eq!(runtimes["runc"]["runtime_type"].as_str(), Some(RUNC_TYPE));
        assert!(runtimes.get(RUNTIME_NAME).is_none());
    }

    #[test]
    fn containerd_configs_keep_comments_and_other_runtimes() {
        let v2 = r#"# managed by hand
version = 2 # keep

[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc" # the default
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = true
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata]
    runtime_type = "io.containerd.kata.v2"
# trailing comment
"#;
        let text = merge_containerd_toml(v2).unwrap().text.unwrap();
        for line in v2.lines() {
            assert!(text.contains(line), "{line:?} kept in:\n{text}");
        }
        assert_eq!(
            runtime_type(&text, "io.containerd.grpc.v1.cri").as_deref(),
            Some(RUNTIME_TYPE)
        );
        let doc: DocumentMut = text.parse().unwrap();
        let runtimes = &doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"];
        assert_eq!(
            runtimes["runc"]["runtime_type"].as_str(),
            Some("io.containerd.runc.v2")
        );
        assert_eq!(
            runtimes["runc"]["options"]["SystemdCgroup"].as_bool(),
            Some(true)
        );
        assert_eq!(
            runtimes["kata"]["runtime_type"].as_str(),
            Some("io.containerd.kata.v2")
        );
        assert_eq!(merge_containerd_toml(&text).unwrap().text, None);
        let back = remove_from_containerd_toml(&text).unwrap().text.unwrap();
        assert_eq!(back, v2);

        let v3 = "version = 3\n\n[plugins.\"io.containerd.cri.v1.runtime\".containerd]\n  default_runtime_name = \"runc\"\n";
        let edit = merge_containerd_toml(v3).unwrap();
        assert_eq!(edit.schema, CriSchema::V3);
        let text = edit.text.unwrap();
        assert!(text.starts_with(v3), "{text}");
        assert!(text
            .contains("[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.agentvm]\n"));
        assert_eq!(
            runtime_type(&text, "io.containerd.cri.v1.runtime").as_deref(),
            Some(RUNTIME_TYPE)
        );
        assert_eq!(runtime_type(&text, "io.containerd.grpc.v1.cri"), None);
        assert_eq!(
            remove_from_containerd_toml(&text).unwrap().text.unwrap(),
            v3
        );
    }

    #[test]
    fn containerd_config_without_a_version_is_version_1_unless_empty() {
        // containerd reads a file without `version` as version 1: plugin sections by short ID.
        let v1 = "root = \"/var/lib/containerd\"\n";
        let edit = merge_containerd_toml(v1).unwrap();
        assert_eq!(edit.schema, CriSchema::V1);
        let text = edit.text.unwrap();
        assert_eq!(runtime_type(&text, "cri").as_deref(), Some(RUNTIME_TYPE));
        assert!(!text.contains("version"), "{text}");

        // A new (or empty) file gets `version = 2`.
        for empty in ["", "\n", "# nothing yet\n"] {
            let edit = merge_containerd_toml(empty).unwrap();
            assert_eq!(edit.schema, CriSchema::V2);
            let text = edit.text.unwrap();
            assert!(text.starts_with("version = 2\n"), "{text}");
            if empty.contains('#') {
                assert!(text.contains("# nothing yet"), "{text}");
            }
            let doc: DocumentMut = text.parse().unwrap();
            assert_eq!(doc["version"].as_integer(), Some(2));
            assert_eq!(
                runtime_type(&text, "io.containerd.grpc.v1.cri").as_deref(),
                Some(RUNTIME_TYPE)
            );
        }
    }

    #[test]
    fn containerd_existing_agentvm_table_gets_the_type_and_keeps_its_keys() {
        let custom = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.agentvm]\n  runtime_type = \"old\"\n  snapshotter = \"native\"\n";
        let text = merge_containerd_toml(custom).unwrap().text.unwrap();
        assert!(text.contains("snapshotter = \"native\""), "{text}");
        assert_eq!(
            runtime_type(&text, "io.containerd.grpc.v1.cri").as_deref(),
            Some(RUNTIME_TYPE)
        );

        // Dotted keys and inline tables are merged into in their own style.
        let dotted = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  containerd.runtimes.runc.runtime_type = \"io.containerd.runc.v2\"\n";
        let text = merge_containerd_toml(dotted).unwrap().text.unwrap();
        assert!(text.starts_with(dotted), "{text}");
        assert_eq!(
            runtime_type(&text, "io.containerd.grpc.v1.cri").as_deref(),
            Some(RUNTIME_TYPE)
        );
        assert_eq!(
            remove_from_containerd_toml(&text).unwrap().text.unwrap(),
            dotted
        );

        let inline = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  runtimes = { runc = { runtime_type = \"io.containerd.runc.v2\" } }\n";
        let text = merge_containerd_toml(inline).unwrap().text.unwrap();
        assert_eq!(
            runtime_type(&text, "io.containerd.grpc.v1.cri").as_deref(),
            Some(RUNTIME_TYPE)
        );
        let back = remove_from_containerd_toml(&text).unwrap().text.unwrap();
        let doc: DocumentMut = back.parse().unwrap();
        let runtimes = &doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"];
        assert!(runtimes.get("agentvm").is_none());
        assert!(runtimes.get("runc").is_some());
    }

    #[test]
    fn containerd_config_in_the_way_is_an_error() {
        for (bad, what) in [
            ("version = 2\nplugins = 3\n", "`plugins` is an integer"),
            (
                "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\ncontainerd = \"x\"\n",
                "`plugins.\"io.containerd.grpc.v1.cri\".containerd` is a string",
            ),
            (
                "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\nruntimes = [1]\n",
                "is an array",
            ),
            (
                "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes]\nagentvm = \"x\"\n",
                "runtimes.agentvm` is a string",
            ),
            ("version = 2\n[plugins\n", "not valid TOML"),
            ("version = 4\n", "unsupported containerd config version 4"),
            ("version = \"2\"\n", "unsupported containerd config version"),
        ] {
            let err = merge_containerd_toml(bad).unwrap_err().to_string();
            assert!(err.contains(what), "{bad:?}: {err}");
        }
        let err = remove_from_containerd_toml("version = 2\nplugins = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`plugins` is an integer"), "{err}");
        assert!(remove_from_containerd_toml("[x\n").is_err());
    }

    #[test]
    fn containerd_config_file_is_written_atomically_and_only_when_needed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("containerd/config.toml");
        assert!(uninstall_containerd_runtime(&path).unwrap().text.is_none());
        assert!(!path.exists(), "uninstall creates nothing");

        let edit = install_containerd_runtime(&path).unwrap();
        assert!(edit.text.is_some() && edit.default_runc);
        assert_eq!(edit.schema, CriSchema::V2);
        let first = std::fs::read_to_string(&path).unwrap();
        assert!(first.starts_with("version = 2\n"));
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(install_containerd_runtime(&path).unwrap().text.is_none());
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            mtime,
            "not rewritten"
        );

        std::fs::write(&path, DEBIAN_17).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(install_containerd_runtime(&path).unwrap().text.is_some());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640, "permissions kept");
        assert!(uninstall_containerd_runtime(&path).unwrap().text.is_some());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), DEBIAN_17);
        assert!(uninstall_containerd_runtime(&path).unwrap().text.is_none());

        std::fs::write(&path, "version = 2\nplugins = 3\n").unwrap();
        let err = install_containerd_runtime(&path).unwrap_err().to_string();
        assert!(err.starts_with(&path.display().to_string()), "{err}");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "version = 2\nplugins = 3\n",
            "unchanged"
        );
        let entries: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(entries.len(), 1, "no temp file left behind");
    }
}
