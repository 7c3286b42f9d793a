//! The OCI image configuration: what the runtime needs to start the container.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The parts of an OCI/Docker image config this project uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// CPU architecture (`amd64`, `arm64`, ...).
    #[serde(default)]
    pub architecture: String,
    /// Operating system (`linux`).
    #[serde(default)]
    pub os: String,
    /// Process defaults.
    #[serde(default)]
    pub config: ContainerConfig,
    /// The layer chain.
    #[serde(default)]
    pub rootfs: RootFs,
}

/// Process defaults of an image (`config` in the OCI image config).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    /// `ENTRYPOINT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// `CMD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// `ENV`, as `KEY=value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    /// `WORKDIR`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// `USER`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `STOPSIGNAL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
}

/// `rootfs` of the image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    /// Always `layers`.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// sha256 of each uncompressed layer, bottom first.
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

impl ImageConfig {
    /// Parses and sanity-checks a config blob.
    pub fn parse(raw: &[u8]) -> Result<Self> {
        let cfg: ImageConfig = serde_json::from_slice(raw).map_err(|source| Error::Json {
            what: "image config".into(),
            source,
        })?;
        if !cfg.rootfs.kind.is_empty() && cfg.rootfs.kind != "layers" {
            return Err(Error::Source(format!(
                "image config rootfs type {:?} is not \"layers\"",
                cfg.rootfs.kind
            )));
        }
        for d in &cfg.rootfs.diff_ids {
            crate::digest::parse(d)?;
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_style_config() {
        let raw = br#"{"architecture":"amd64","os":"linux",
            "config":{"Entrypoint":["/bin/sh","-c"],"Cmd":["echo hi"],"Env":["PATH=/bin"],
                      "WorkingDir":"/w","User":"1000:1000","Labels":{"a":"b"}},
            "rootfs":{"type":"layers","diff_ids":["sha256:0000000000000000000000000000000000000000000000000000000000000000"]},
            "history":[]}"#;
        let c = ImageConfig::parse(raw).unwrap();
        assert_eq!(
            c.config.entrypoint.as_deref(),
            Some(&["/bin/sh".to_string(), "-c".into()][..])
        );
        assert_eq!(c.config.working_dir.as_deref(), Some("/w"));
        assert_eq!(c.config.user.as_deref(), Some("1000:1000"));
        assert_eq!(c.rootfs.diff_ids.len(), 1);
    }

    #[test]
    fn rejects_bad_diff_ids() {
        let raw = br#"{"rootfs":{"type":"layers","diff_ids":["sha256:../../etc"]}}"#;
        assert!(ImageConfig::parse(raw).is_err());
    }
}
