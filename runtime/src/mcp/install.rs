//! `agentvm mcp install` / `uninstall`: register the MCP server with Claude Code, whose user
//! configuration `~/.claude.json` lists stdio servers under `mcpServers`:
//!
//! ```json
//! { "mcpServers": { "agentvm": { "type": "stdio", "command": "/usr/local/bin/agentvm", "args": ["mcp"], "env": {} } } }
//! ```
//!
//! Claude Code writes that file itself and keeps much else in it, so the edit touches
//! `mcpServers.agentvm` only: every other key keeps its place and its exact text (values are
//! carried as raw JSON), the file's permissions and owner stay, and it is replaced atomically.
//! Idempotent both ways. A missing file means Claude Code is not set up for this user: nothing
//! is created (`claude mcp add agentvm -- agentvm mcp` does the same once it is).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::error::{Error, Result};

/// The server's name in Claude Code.
pub const SERVER_NAME: &str = "agentvm";

/// A JSON object whose members keep their order and their text.
#[derive(Debug, Default)]
struct Ordered(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Ordered, A::Error> {
                let mut v = Vec::new();
                while let Some((k, val)) = m.next_entry::<String, Box<RawValue>>()? {
                    v.push((k, val));
                }
                Ok(Ordered(v))
            }
        }
        d.deserialize_map(V)
    }
}

impl Ordered {
    fn parse(text: &str, what: &str) -> Result<Ordered> {
        serde_json::from_str(text)
            .map_err(|e| Error::Invalid(format!("{what} is not a JSON object: {e}")))
    }

    fn get(&self, key: &str) -> Option<&RawValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| &**v)
    }

    fn set(&mut self, key: &str, value: Box<RawValue>) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.0.push((key.to_string(), value)),
        }
    }

    fn remove(&mut self, key: &str) -> bool {
        let before = self.0.len();
        self.0.retain(|(k, _)| k != key);
        self.0.len() != before
    }

    /// Renders with one member a line, indented `indent` spaces (members keep their text).
    fn render(&self, indent: usize) -> String {
        if self.0.is_empty() {
            return "{}".into();
        }
        let pad = " ".repeat(indent);
        let mut s = String::from("{\n");
        for (i, (k, v)) in self.0.iter().enumerate() {
            let key = serde_json::to_string(k).unwrap_or_default();
            let _ = write!(s, "{pad}{key}: {}", v.get());
            s.push_str(if i + 1 < self.0.len() { ",\n" } else { "\n" });
        }
        s.push_str(&" ".repeat(indent.saturating_sub(2)));
        s.push('}');
        s
    }
}

fn raw(v: &serde_json::Value) -> Box<RawValue> {
    RawValue::from_string(serde_json::to_string(v).unwrap_or_default())
        .expect("serde_json renders valid JSON")
}

/// The entry Claude Code gets for the server run as `command mcp`.
pub fn server_entry(command: &str) -> serde_json::Value {
    serde_json::json!({ "type": "stdio", "command": command, "args": ["mcp"], "env": {} })
}

/// Puts the server into the `~/.claude.json` text `current`. Returns the new text, or `None`
/// when it is registered so already.
pub fn merge(current: &str, command: &str) -> Result<Option<String>> {
    let mut root = Ordered::parse(current, "the Claude Code config")?;
    let mut servers = match root.get("mcpServers") {
        Some(s) => Ordered::parse(s.get(), "its \"mcpServers\"")?,
        None => Ordered::default(),
    };
    let wanted = server_entry(command);
    if let Some(have) = servers.get(SERVER_NAME) {
        let have: serde_json::Value = serde_json::from_str(have.get()).unwrap_or_default();
        if have == wanted {
            return Ok(None);
        }
    }
    servers.set(SERVER_NAME, raw(&wanted));
    let servers = RawValue::from_string(servers.render(4))
        .map_err(|e| Error::Invalid(format!("mcpServers: {e}")))?;
    root.set("mcpServers", servers);
    Ok(Some(root.render(2) + "\n"))
}

/// Takes the server out of the text `current`. Returns the new text, or `None` when it was not
/// registered.
pub fn remove(current: &str) -> Result<Option<String>> {
    let mut root = Ordered::parse(current, "the Claude Code config")?;
    let Some(s) = root.get("mcpServers") else {
        return Ok(None);
    };
    let mut servers = Ordered::parse(s.get(), "its \"mcpServers\"")?;
    if !servers.remove(SERVER_NAME) {
        return Ok(None);
    }
    let servers = RawValue::from_string(servers.render(4))
        .map_err(|e| Error::Invalid(format!("mcpServers: {e}")))?;
    root.set("mcpServers", servers);
    Ok(Some(root.render(2) + "\n"))
}

/// `~/.claude.json` of the user running this (`$HOME`).
pub fn default_config() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".claude.json"))
}

/// What install or uninstall did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Changed,
    Unchanged,
    /// The file does not exist: Claude Code is not set up here; nothing was written.
    NoConfig,
}

/// Registers `command mcp` in `path`.
pub fn install(path: &Path, command: &str) -> Result<Outcome> {
    edit(path, |t| merge(t, command))
}

/// Takes the server out of `path`.
pub fn uninstall(path: &Path) -> Result<Outcome> {
    edit(path, remove)
}

fn edit(path: &Path, f: impl FnOnce(&str) -> Result<Option<String>>) -> Result<Outcome> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Outcome::NoConfig),
        Err(e) => return Err(Error::io("read", path, e)),
    };
    let text = if text.trim().is_empty() { "{}" } else { &text };
    match f(text).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))? {
        None => Ok(Outcome::Unchanged),
        Some(new) => {
            write_atomic(path, &new)?;
            Ok(Outcome::Changed)
        }
    }
}

/// Replaces `path` by a sibling temp file renamed over it, with the original's mode and owner
/// (root editing a user's file must leave it the user's).
fn write_atomic(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| Error::io("read", path, e))?;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".agentvm-tmp");
    let tmp = path.with_file_name(name);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.set_permissions(meta.permissions())?;
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::fchown(&f, Some(meta.uid()), Some(meta.gid()))?;
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

    const CLAUDE: &str = r#"{
  "numStartups": 12,
  "theme": "dark",
  "mcpServers": {
    "other": {"type": "stdio", "command": "x", "args": []}
  },
  "projects": {"/home/u/p": {"allowedTools": ["a", "b"], "n": 1.50}},
  "zeta": null
}
"#;

    #[test]
    fn install_keeps_every_other_key_in_place_and_is_idempotent() {
        let once = merge(CLAUDE, "/usr/local/bin/agentvm").unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_str(&once).unwrap();
        assert_eq!(
            v["mcpServers"]["agentvm"],
            server_entry("/usr/local/bin/agentvm")
        );
        assert_eq!(v["mcpServers"]["other"]["command"], "x");
        // Other values keep their exact text (1.50 stays 1.50) and the keys their order.
        assert!(once.contains(r#""n": 1.50"#), "{once}");
        let keys: Vec<usize> = ["numStartups", "theme", "mcpServers", "projects", "zeta"]
            .iter()
            .map(|k| once.find(&format!("\"{k}\"")).unwrap())
            .collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{once}");
        assert_eq!(merge(&once, "/usr/local/bin/agentvm").unwrap(), None);
        // Another path updates the entry.
        let moved = merge(&once, "/opt/agentvm").unwrap().unwrap();
        assert!(moved.contains("/opt/agentvm"));
        // Uninstall takes only ours out, once.
        let back = remove(&once).unwrap().unwrap();
        let b: serde_json::Value = serde_json::from_str(&back).unwrap();
        let orig: serde_json::Value = serde_json::from_str(CLAUDE).unwrap();
        assert_eq!(b, orig);
        assert_eq!(remove(&back).unwrap(), None);
    }

    #[test]
    fn configs_without_servers_and_broken_ones() {
        let t = merge("{}", "agentvm").unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        assert_eq!(v["mcpServers"]["agentvm"]["args"][0], "mcp");
        assert_eq!(remove("{\"a\":1}").unwrap(), None);
        assert!(merge("[1]", "x").is_err());
        assert!(merge("{\"mcpServers\": 3}", "x").is_err());
        assert!(merge("{broken", "x").is_err());
    }

    #[test]
    fn files_are_edited_in_place_with_their_mode_and_left_alone_when_missing() {
        use std::os::unix::fs::PermissionsExt;
        let home = tempfile::tempdir().unwrap();
        let cfg = home.path().join(".claude.json");
        assert_eq!(install(&cfg, "/bin/agentvm").unwrap(), Outcome::NoConfig);
        assert!(!cfg.exists(), "a missing config must not be created");
        assert_eq!(uninstall(&cfg).unwrap(), Outcome::NoConfig);
        std::fs::write(&cfg, CLAUDE).unwrap();
        std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(install(&cfg, "/bin/agentvm").unwrap(), Outcome::Changed);
        assert_eq!(install(&cfg, "/bin/agentvm").unwrap(), Outcome::Unchanged);
        let mode = std::fs::metadata(&cfg).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(uninstall(&cfg).unwrap(), Outcome::Changed);
        assert_eq!(uninstall(&cfg).unwrap(), Outcome::Unchanged);
        let left: Vec<_> = std::fs::read_dir(home.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "temp files left: {left:?}");
    }
}
