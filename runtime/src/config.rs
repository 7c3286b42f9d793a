//! The host admin's settings for agentvm: `/etc/agentvm/config.toml` (or `$AGENTVM_CONFIG`).
//!
//! ```toml
//! # Run containers under QEMU's TCG software emulation when KVM is not usable. TCG is a
//! # test-and-development mode: slow, and a larger attack surface than KVM.
//! allow_tcg = true
//! # When a container's root cannot be set up as image layers on disks (no virtiofsd, no
//! # Landlock, a failed build), share the whole root instead of failing the start.
//! shared_root_fallback = false
//! ```
//!
//! A missing file means the defaults; a malformed one is an error that names it.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub const CONFIG_PATH: &str = "/etc/agentvm/config.toml";

/// The settings, with their defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostConfig {
    /// Containers (the shim) may run under TCG when KVM is not usable.
    pub allow_tcg: bool,
    /// A container root that cannot be layered is shared whole instead of failing the start.
    pub shared_root_fallback: bool,
    /// The first of the [`SANDBOX_UID_COUNT`] host uids (and gids) agentvm gives its
    /// sandboxes' QEMU and vhost-device-vsock, one per sandbox (`sandbox_uid_base`).
    pub sandbox_uid_base: Option<u32>,
}

/// Where the sandboxes' uids start unless the config says otherwise: far above login users,
/// systemd's dynamic users and the usual subordinate-id ranges of /etc/subuid.
pub const DEFAULT_SANDBOX_UID_BASE: u32 = 0x7a00_0000;
/// How many sandbox uids there are (and so how many sandboxes at once at most).
pub const SANDBOX_UID_COUNT: u32 = 65536;

impl HostConfig {
    /// The sandboxes' first uid.
    pub fn sandbox_uid_base(&self) -> u32 {
        self.sandbox_uid_base.unwrap_or(DEFAULT_SANDBOX_UID_BASE)
    }
}

/// Where the config lives: `$AGENTVM_CONFIG`, else [`CONFIG_PATH`].
pub fn path() -> PathBuf {
    std::env::var_os("AGENTVM_CONFIG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(CONFIG_PATH))
}

impl HostConfig {
    /// Reads the host's config ([`path`]).
    pub fn load() -> Result<HostConfig> {
        Self::load_from(&path())
    }

    pub fn load_from(p: &Path) -> Result<HostConfig> {
        match std::fs::read_to_string(p) {
            Ok(text) => Self::parse(&text).map_err(|e| {
                Error::Invalid(format!("{}: {e}; fix the file or remove it", p.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HostConfig::default()),
            Err(e) => Err(Error::io("read", p, e)),
        }
    }

    fn parse(text: &str) -> std::result::Result<HostConfig, String> {
        let doc: toml_edit::DocumentMut = text.parse().map_err(|e| format!("{e}"))?;
        let mut cfg = HostConfig::default();
        for (key, item) in doc.iter() {
            let flag = || {
                item.as_bool()
                    .ok_or_else(|| format!("{key} must be true or false"))
            };
            match key {
                "allow_tcg" => cfg.allow_tcg = flag()?,
                "shared_root_fallback" => cfg.shared_root_fallback = flag()?,
                "sandbox_uid_base" => {
                    let base = item
                        .as_integer()
                        .and_then(|v| u32::try_from(v).ok())
                        .filter(|&v| v >= 1000 && v.checked_add(SANDBOX_UID_COUNT).is_some())
                        .ok_or_else(|| {
                            format!(
                                "sandbox_uid_base must be an integer from 1000 to {} (the \
                                 first of {SANDBOX_UID_COUNT} host uids no one else uses)",
                                u32::MAX - SANDBOX_UID_COUNT
                            )
                        })?;
                    cfg.sandbox_uid_base = Some(base);
                }
                other => {
                    return Err(format!(
                        "unknown setting {other:?} (known: allow_tcg, shared_root_fallback, \
                         sandbox_uid_base)"
                    ))
                }
            }
        }
        Ok(cfg)
    }

    /// Sets `allow_tcg` in the file at `p`, keeping everything else in it; creates it (and
    /// its directory) when missing. Returns whether the file changed.
    pub fn set_allow_tcg(p: &Path, allow: bool) -> Result<bool> {
        let text = match std::fs::read_to_string(p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Error::io("read", p, e)),
        };
        Self::parse(&text).map_err(|e| Error::Invalid(format!("{}: {e}", p.display())))?;
        let mut doc: toml_edit::DocumentMut = text
            .parse()
            .map_err(|e| Error::Invalid(format!("{}: {e}", p.display())))?;
        if doc.get("allow_tcg").and_then(|i| i.as_bool()) == Some(allow) {
            return Ok(false);
        }
        doc["allow_tcg"] = toml_edit::value(allow);
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
        }
        std::fs::write(p, doc.to_string()).map_err(|e| Error::io("write", p, e))?;
        Ok(true)
    }
}

/// The refusal of a container under TCG without the admin's consent.
pub fn tcg_refused(reason: &str) -> Error {
    Error::Invalid(format!(
        "KVM is not usable on this host ({reason}) and agentvm does not run containers under \
         TCG software emulation unless the host's admin allows it (a test-and-development \
         mode: slow, and a larger attack surface): set allow_tcg = true in {} (`agentvm \
         install --allow-tcg`)",
        path().display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_is_the_defaults_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.toml");
        assert_eq!(HostConfig::load_from(&p).unwrap(), HostConfig::default());
        std::fs::write(&p, "allow_tcg = \"yes\"\n").unwrap();
        let e = HostConfig::load_from(&p).unwrap_err().to_string();
        assert!(
            e.contains("config.toml") && e.contains("true or false"),
            "{e}"
        );
        std::fs::write(&p, "allow_tgc = true\n").unwrap();
        let e = HostConfig::load_from(&p).unwrap_err().to_string();
        assert!(e.contains("unknown setting \"allow_tgc\""), "{e}");
        std::fs::write(&p, "allow_tcg = \n").unwrap();
        assert!(HostConfig::load_from(&p).is_err());
        std::fs::write(&p, "shared_root_fallback = true\n").unwrap();
        let c = HostConfig::load_from(&p).unwrap();
        assert!(c.shared_root_fallback && !c.allow_tcg);
        assert_eq!(c.sandbox_uid_base(), DEFAULT_SANDBOX_UID_BASE);
        std::fs::write(&p, "sandbox_uid_base = 3000000000\n").unwrap();
        assert_eq!(
            HostConfig::load_from(&p).unwrap().sandbox_uid_base(),
            3_000_000_000
        );
        for bad in ["0", "-5", "4294967295", "\"x\""] {
            std::fs::write(&p, format!("sandbox_uid_base = {bad}\n")).unwrap();
            let e = HostConfig::load_from(&p).unwrap_err().to_string();
            assert!(e.contains("sandbox_uid_base must be"), "{bad}: {e}");
        }
    }

    #[test]
    fn allow_tcg_is_set_keeping_comments() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("etc/agentvm/config.toml");
        assert!(HostConfig::set_allow_tcg(&p, true).unwrap());
        assert!(HostConfig::load_from(&p).unwrap().allow_tcg);
        assert!(!HostConfig::set_allow_tcg(&p, true).unwrap());
        std::fs::write(&p, "# the admin's note\nallow_tcg = true\n").unwrap();
        assert!(HostConfig::set_allow_tcg(&p, false).unwrap());
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("# the admin's note"), "{text}");
        assert!(!HostConfig::load_from(&p).unwrap().allow_tcg);
    }
}
