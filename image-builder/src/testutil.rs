//! Builders for test tar streams, including hostile ones the `tar` crate refuses to write.

use std::io::Write;

use tar::{EntryType, Header};

/// Builds one layer tar stream entry by entry.
pub struct LayerBuilder {
    b: tar::Builder<Vec<u8>>,
}

impl LayerBuilder {
    pub fn new() -> Self {
        LayerBuilder {
            b: tar::Builder::new(Vec::new()),
        }
    }

    /// Appends an entry with raw name bytes (no validation at all).
    #[allow(clippy::too_many_arguments)]
    pub fn raw(
        mut self,
        name: &[u8],
        kind: EntryType,
        link: &[u8],
        data: &[u8],
        mode: u32,
        uid: u64,
        gid: u64,
    ) -> Self {
        assert!(
            name.len() <= 100 && link.len() <= 100,
            "use pax for long names"
        );
        let mut h = Header::new_ustar();
        h.as_mut_bytes()[..name.len()].copy_from_slice(name);
        h.as_mut_bytes()[157..157 + link.len()].copy_from_slice(link);
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    pub fn file(self, name: &str, data: &[u8]) -> Self {
        self.raw(name.as_bytes(), EntryType::Regular, b"", data, 0o644, 0, 0)
    }

    pub fn file_owned(self, name: &str, data: &[u8], mode: u32, uid: u64, gid: u64) -> Self {
        self.raw(
            name.as_bytes(),
            EntryType::Regular,
            b"",
            data,
            mode,
            uid,
            gid,
        )
    }

    pub fn dir(self, name: &str) -> Self {
        self.raw(name.as_bytes(), EntryType::Directory, b"", b"", 0o755, 0, 0)
    }

    pub fn dir_mode(self, name: &str, mode: u32) -> Self {
        self.raw(name.as_bytes(), EntryType::Directory, b"", b"", mode, 0, 0)
    }

    pub fn symlink(self, name: &str, target: &str) -> Self {
        self.raw(
            name.as_bytes(),
            EntryType::Symlink,
            target.as_bytes(),
            b"",
            0o777,
            0,
            0,
        )
    }

    pub fn hardlink(self, name: &str, target: &str) -> Self {
        self.raw(
            name.as_bytes(),
            EntryType::Link,
            target.as_bytes(),
            b"",
            0o644,
            0,
            0,
        )
    }

    pub fn device(mut self, name: &str, kind: EntryType, major: u32, minor: u32) -> Self {
        let mut h = Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_entry_type(kind);
        h.set_mode(0o666);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        h.set_cksum();
        self.b.append(&h, &b""[..]).unwrap();
        self
    }

    /// A regular file preceded by a PAX header with the given records.
    pub fn pax_file(mut self, name: &str, records: &[(&str, &[u8])], data: &[u8]) -> Self {
        self.b
            .append_pax_extensions(records.iter().copied())
            .unwrap();
        self.file(name, data)
    }

    /// Appends raw bytes (already block-aligned headers and data).
    pub fn raw_bytes(mut self, bytes: &[u8]) -> Self {
        self.b.get_mut().write_all(bytes).unwrap();
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(data, 3).unwrap()
}

/// An image config JSON for `layers` (uncompressed tars), with a recognisable Cmd.
pub fn config_json(layers: &[Vec<u8>], arch: &str, cmd: &str) -> Vec<u8> {
    let diff_ids: Vec<String> = layers.iter().map(|l| crate::digest::sha256(l)).collect();
    serde_json::to_vec(&serde_json::json!({
        "architecture": arch, "os": "linux",
        "config": {"Cmd": [cmd], "Env": ["PATH=/usr/bin:/bin"], "WorkingDir": "/", "User": "0"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap()
}

fn put_blob(dir: &std::path::Path, data: &[u8]) -> serde_json::Value {
    let d = crate::digest::sha256(data);
    let hex = d.strip_prefix("sha256:").unwrap();
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("blobs/sha256").join(hex), data).unwrap();
    serde_json::json!({"digest": d, "size": data.len()})
}

fn put_manifest(
    dir: &std::path::Path,
    layers: &[Vec<u8>],
    arch: &str,
    cmd: &str,
) -> serde_json::Value {
    let config = put_blob(dir, &config_json(layers, arch, cmd));
    let layer_descs: Vec<serde_json::Value> = layers
        .iter()
        .map(|l| {
            let mut d = put_blob(dir, &gzip(l));
            d["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip".into();
            d
        })
        .collect();
    let mut cfg = config;
    cfg["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": cfg, "layers": layer_descs,
    });
    let mut d = put_blob(dir, &serde_json::to_vec(&manifest).unwrap());
    d["mediaType"] = "application/vnd.oci.image.manifest.v1+json".into();
    d
}

/// Writes an OCI image layout with one image (gzip layers) named `tag`.
pub fn write_oci_layout(dir: &std::path::Path, layers: &[Vec<u8>], tag: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let mut d = put_manifest(dir, layers, "amd64", "single");
    d["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [d]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

/// Writes an OCI layout whose index.json points at a multi-platform index.
pub fn write_multiarch_layout(dir: &std::path::Path, amd64: &[Vec<u8>], arm64: &[Vec<u8>]) {
    std::fs::create_dir_all(dir).unwrap();
    let mut a = put_manifest(dir, amd64, "amd64", "amd64");
    a["platform"] = serde_json::json!({"os": "linux", "architecture": "amd64"});
    let mut b = put_manifest(dir, arm64, "arm64", "arm64");
    b["platform"] = serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"});
    let inner = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [b, a],
    });
    let mut d = put_blob(dir, &serde_json::to_vec(&inner).unwrap());
    d["mediaType"] = "application/vnd.oci.image.index.v1+json".into();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [d]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

/// Tars a directory (for oci-archive: fixtures).
pub fn tar_dir(dir: &std::path::Path, out: &std::path::Path) {
    let mut b = tar::Builder::new(std::fs::File::create(out).unwrap());
    b.append_dir_all(".", dir).unwrap();
    b.finish().unwrap();
}

/// Writes a legacy `docker save` archive (uncompressed `<id>/layer.tar` layers).
pub fn write_docker_archive(out: &std::path::Path, layers: &[Vec<u8>], tag: &str) {
    let config = config_json(layers, "amd64", "docker");
    let chex = crate::digest::sha256(&config)
        .strip_prefix("sha256:")
        .unwrap()
        .to_owned();
    let mut b = tar::Builder::new(std::fs::File::create(out).unwrap());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = Header::new_gnu();
        h.set_path(name).unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, data).unwrap();
    };
    add(&format!("{chex}.json"), &config);
    let mut names = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let name = format!("layer{i}/layer.tar");
        add(&name, l);
        names.push(name);
    }
    let manifest = serde_json::json!([{
        "Config": format!("{chex}.json"), "RepoTags": [tag], "Layers": names,
    }]);
    add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    b.finish().unwrap();
}
