//! Image sources: `docker save` archives, OCI image layouts (directory or tar), and the
//! references that name them. Every blob read is checked against its digest.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::cache::{Cache, WorkDir};
use crate::config::ImageConfig;
use crate::digest::{self, HashingReader};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::registry::{RegistryOptions, Remote};

/// Largest JSON document (manifest, index, config) we read into memory.
const MAX_JSON: u64 = 8 << 20;

/// Names an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// `docker-archive:PATH[:NAME]`: a `docker save` tar.
    DockerArchive {
        /// The archive.
        path: PathBuf,
        /// Which image (a RepoTag) when the archive holds several.
        name: Option<String>,
    },
    /// `oci-archive:PATH[:TAG]`: a tar of an OCI image layout.
    OciArchive {
        /// The archive.
        path: PathBuf,
        /// `org.opencontainers.image.ref.name` to pick.
        tag: Option<String>,
    },
    /// `oci:DIR[:TAG]`: an OCI image layout directory.
    OciDir {
        /// The layout directory.
        path: PathBuf,
        /// `org.opencontainers.image.ref.name` to pick.
        tag: Option<String>,
    },
    /// `docker-daemon:NAME`: an image of the local Docker daemon, read with `docker save`.
    DockerDaemon(String),
    /// A registry reference, normalised (`alpine:3` → `docker.io/library/alpine:3`).
    Registry(String),
}

impl ImageRef {
    /// Parses `transport:PATH[:NAME]` or a registry reference.
    pub fn parse(s: &str) -> Result<Self> {
        let split = |rest: &str| -> (PathBuf, Option<String>) {
            if Path::new(rest).exists() {
                return (PathBuf::from(rest), None);
            }
            match rest.rsplit_once(':') {
                Some((p, n)) if !n.contains('/') && !n.is_empty() => {
                    (PathBuf::from(p), Some(n.to_owned()))
                }
                _ => (PathBuf::from(rest), None),
            }
        };
        if let Some(rest) = s.strip_prefix("docker-archive:") {
            let (path, name) = split(rest);
            return Ok(ImageRef::DockerArchive { path, name });
        }
        if let Some(rest) = s.strip_prefix("oci-archive:") {
            let (path, tag) = split(rest);
            return Ok(ImageRef::OciArchive { path, tag });
        }
        if let Some(rest) = s.strip_prefix("oci:") {
            let (path, tag) = split(rest);
            return Ok(ImageRef::OciDir { path, tag });
        }
        if let Some(name) = s.strip_prefix("docker-daemon:") {
            if name.is_empty() || name.starts_with('-') || name.contains(char::is_whitespace) {
                return Err(Error::Source(format!(
                    "malformed docker-daemon reference {s:?}: expected docker-daemon:NAME[:TAG]"
                )));
            }
            return Ok(ImageRef::DockerDaemon(name.to_owned()));
        }
        if s.is_empty() || s.contains(char::is_whitespace) {
            return Err(Error::Source(format!("malformed image reference {s:?}")));
        }
        Ok(ImageRef::Registry(crate::registry::normalize(s)?))
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (t, p, n) = match self {
            ImageRef::DockerArchive { path, name } => ("docker-archive", path, name),
            ImageRef::OciArchive { path, tag } => ("oci-archive", path, tag),
            ImageRef::OciDir { path, tag } => ("oci", path, tag),
            ImageRef::Registry(r) => return f.write_str(r),
            ImageRef::DockerDaemon(n) => return write!(f, "docker-daemon:{n}"),
        };
        write!(f, "{t}:{}", p.display())?;
        if let Some(n) = n {
            write!(f, ":{n}")?;
        }
        Ok(())
    }
}

/// `os/arch[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// `linux`.
    pub os: String,
    /// `amd64`, `arm64`, ...
    pub arch: String,
    /// `v8`, ... when given.
    pub variant: Option<String>,
}

impl Platform {
    /// Parses `os/arch[/variant]`.
    pub fn parse(s: &str) -> Result<Self> {
        let mut it = s.split('/');
        match (it.next(), it.next(), it.next(), it.next()) {
            (Some(os), Some(arch), variant, None) if !os.is_empty() && !arch.is_empty() => {
                Ok(Platform {
                    os: os.into(),
                    arch: arch.into(),
                    variant: variant.map(Into::into),
                })
            }
            _ => Err(Error::Source(format!(
                "malformed platform {s:?}: expected os/arch[/variant], e.g. linux/amd64"
            ))),
        }
    }

    /// The platform of this host (`linux/amd64` on x86_64).
    pub fn host() -> Self {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            other => other,
        };
        Platform {
            os: "linux".into(),
            arch: arch.into(),
            variant: None,
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// One layer to fetch.
#[derive(Debug, Clone)]
pub struct LayerDesc {
    /// Where the blob is inside the source.
    pub locator: String,
    /// Digest of the blob as stored (possibly compressed), when the source names one.
    pub digest: Option<String>,
    /// Size of the blob, when the source names one.
    pub size: Option<u64>,
    /// sha256 of the uncompressed tar, from the image config.
    pub diff_id: String,
}

/// An image whose metadata has been read and verified; layers are read on demand.
#[derive(Debug)]
pub struct Resolved {
    /// The parsed config.
    pub config: ImageConfig,
    /// The config exactly as published.
    pub config_raw: Vec<u8>,
    /// `sha256:` of `config_raw`.
    pub config_digest: String,
    /// Layers, bottom first.
    pub layers: Vec<LayerDesc>,
    store: Store,
    /// Scratch space the store reads from (a `docker save` archive), removed on drop.
    _scratch: Option<Scratch>,
}

#[derive(Debug)]
enum Scratch {
    Work(#[allow(dead_code)] WorkDir),
    Temp(#[allow(dead_code)] tempfile::TempDir),
}

impl Resolved {
    /// Makes every layer blob readable by [`Resolved::open_layer`]: for a registry,
    /// downloads those missing from the cache's blob store into `scratch` (a private dir
    /// on the cache's filesystem), checks them and moves them into the store. A no-op for
    /// local sources.
    pub fn fetch_layers(&self, scratch: &Path, progress: &dyn Progress) -> Result<()> {
        let Store::Registry { remote, root } = &self.store else {
            return Ok(());
        };
        let root = root.as_deref().ok_or_else(|| {
            Error::Source("registry layers need a cache directory to download into".into())
        })?;
        let mut missing = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let d = l.digest.clone().unwrap_or_default();
            let p = root.join(&l.locator);
            match File::options().write(true).open(&p) {
                // In use again: `prune` spares recently written blobs.
                Ok(f) => {
                    let _ = f.set_modified(std::time::SystemTime::now());
                }
                Err(_) => missing.push((i, d, l.size)),
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        remote.fetch(&missing, self.layers.len(), root, scratch, progress)
    }

    /// Opens a layer blob; the returned reader checks the blob's digest and size when
    /// read to the end (call [`VerifiedBlob::finish`]).
    pub fn open_layer(&self, layer: &LayerDesc) -> Result<VerifiedBlob<Box<dyn Read + '_>>> {
        let r = self.store.open(&layer.locator)?;
        Ok(VerifiedBlob {
            what: format!("layer blob {}", layer.locator),
            inner: HashingReader::new(r),
            digest: layer.digest.clone(),
            size: layer.size,
        })
    }
}

/// A blob reader that verifies digest and size at the end.
#[derive(Debug)]
pub struct VerifiedBlob<R> {
    what: String,
    inner: HashingReader<R>,
    digest: Option<String>,
    size: Option<u64>,
}

impl<R: Read> VerifiedBlob<R> {
    /// Drains the blob and checks it.
    pub fn finish(self) -> Result<()> {
        let (actual, n) = self
            .inner
            .finish()
            .map_err(|e| Error::io(format!("read {}", self.what), e))?;
        if let Some(size) = self.size {
            if size != n {
                return Err(Error::Source(format!(
                    "{} is {n} bytes, the manifest says {size} (corrupt or tampered image)",
                    self.what
                )));
            }
        }
        if let Some(d) = &self.digest {
            digest::verify(&self.what, d, &actual)?;
        }
        Ok(())
    }
}

impl<R: Read> Read for VerifiedBlob<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

/// Where blobs come from.
#[derive(Debug)]
enum Store {
    Dir(PathBuf),
    Tar(TarIndex),
    /// Manifests and configs from the registry; layers from `<root>/blobs/sha256/` once
    /// [`Resolved::fetch_layers`] put them there.
    Registry {
        remote: Box<Remote>,
        root: Option<PathBuf>,
    },
}

impl Store {
    fn open(&self, locator: &str) -> Result<Box<dyn Read + '_>> {
        match self {
            Store::Registry { root, .. } => {
                let p = root.as_deref().map(|r| r.join(locator));
                match p.as_deref().map(File::open) {
                    Some(Ok(f)) => Ok(Box::new(f)),
                    _ => Err(Error::Source(format!(
                        "{locator} has not been downloaded (Resolved::fetch_layers first)"
                    ))),
                }
            }
            Store::Dir(root) => {
                let p = root.join(locator);
                let f = File::open(&p).map_err(|e| {
                    Error::io(format!("open {} (is the layout complete?)", p.display()), e)
                })?;
                Ok(Box::new(f))
            }
            Store::Tar(idx) => idx.open(locator),
        }
    }

    fn read_small(&self, locator: &str) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.open(locator)?
            .take(MAX_JSON + 1)
            .read_to_end(&mut v)
            .map_err(|e| Error::io(format!("read {locator}"), e))?;
        if v.len() as u64 > MAX_JSON {
            return Err(Error::Source(format!(
                "{locator} is larger than {MAX_JSON} bytes"
            )));
        }
        Ok(v)
    }

    /// Reads a manifest or index named by digest, checking it.
    fn read_manifest(&self, d: &str) -> Result<Vec<u8>> {
        match self {
            Store::Registry { remote, .. } => Ok(remote.manifest(Some(d), MAX_JSON)?.0),
            _ => self.read_blob(d),
        }
    }

    /// Reads a blob named by digest, checking it.
    fn read_blob(&self, d: &str) -> Result<Vec<u8>> {
        if let Store::Registry { remote, .. } = self {
            return remote.small_blob(d, MAX_JSON);
        }
        let hex = digest::parse(d)?;
        let raw = self.read_small(&format!("blobs/sha256/{hex}"))?;
        digest::verify(format!("blob {d}"), d, &digest::sha256(&raw))?;
        Ok(raw)
    }
}

/// Member offsets of an uncompressed tar file, for random access without extraction.
#[derive(Debug)]
struct TarIndex {
    path: PathBuf,
    files: HashMap<String, (u64, u64)>,
    links: HashMap<String, String>,
}

fn clean_member(name: &[u8]) -> String {
    let s = String::from_utf8_lossy(name);
    s.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

impl TarIndex {
    fn build(path: &Path) -> Result<Self> {
        let f = File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        let mut ar = tar::Archive::new(f);
        let mut files = HashMap::new();
        let mut links = HashMap::new();
        let corrupt =
            |e: io::Error| Error::Source(format!("{}: not a readable tar: {e}", path.display()));
        for entry in ar.entries_with_seek().map_err(corrupt)? {
            let entry = entry.map_err(corrupt)?;
            let name = clean_member(&entry.path_bytes());
            match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    files.insert(name, (entry.raw_file_position(), entry.size()));
                }
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    if let Some(t) = entry.link_name_bytes() {
                        let t = t.into_owned();
                        let target = if entry.header().entry_type() == tar::EntryType::Symlink
                            && !t.starts_with(b"/")
                        {
                            let dir = name.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                            resolve_rel(dir, &String::from_utf8_lossy(&t))
                        } else {
                            clean_member(&t)
                        };
                        links.insert(name, target);
                    }
                }
                _ => {}
            }
        }
        Ok(TarIndex {
            path: path.to_owned(),
            files,
            links,
        })
    }

    fn open(&self, member: &str) -> Result<Box<dyn Read + '_>> {
        let mut name = clean_member(member.as_bytes());
        for _ in 0..8 {
            if let Some(&(off, size)) = self.files.get(&name) {
                let mut f = File::open(&self.path)
                    .map_err(|e| Error::io(format!("open {}", self.path.display()), e))?;
                f.seek(SeekFrom::Start(off))
                    .map_err(|e| Error::io(format!("seek in {}", self.path.display()), e))?;
                return Ok(Box::new(f.take(size)));
            }
            match self.links.get(&name) {
                Some(t) => name = t.clone(),
                None => break,
            }
        }
        Err(Error::Source(format!(
            "{} has no member {member} (incomplete archive?)",
            self.path.display()
        )))
    }
}

fn resolve_rel(dir: &str, rel: &str) -> String {
    let mut parts: Vec<&str> = dir.split('/').filter(|c| !c.is_empty()).collect();
    for c in rel.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join("/")
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    platform: Option<DescPlatform>,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

#[derive(Deserialize)]
struct DescPlatform {
    os: String,
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexOrManifest {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

fn json<'a, T: Deserialize<'a>>(what: &str, raw: &'a [u8]) -> Result<T> {
    serde_json::from_slice(raw).map_err(|source| Error::Json {
        what: what.to_owned(),
        source,
    })
}

/// Reads and verifies an image's metadata (registry references anonymously or with the
/// default Docker credentials; layers are not downloaded).
pub fn resolve(r: &ImageRef, platform: Option<&Platform>) -> Result<Resolved> {
    resolve_with(r, platform, &RegistryOptions::default(), None)
}

/// Reads and verifies an image's metadata. With a cache, registry layers are later
/// downloaded into its blob store and `docker save` output goes to one of its work dirs.
pub fn resolve_with(
    r: &ImageRef,
    platform: Option<&Platform>,
    registry: &RegistryOptions,
    cache: Option<&Cache>,
) -> Result<Resolved> {
    let host = Platform::host();
    let platform = platform.unwrap_or(&host);
    match r {
        ImageRef::DockerArchive { path, name } => {
            docker_archive(Store::Tar(TarIndex::build(path)?), name.as_deref())
        }
        ImageRef::OciArchive { path, tag } => {
            oci_layout(Store::Tar(TarIndex::build(path)?), tag.as_deref(), platform)
        }
        ImageRef::OciDir { path, tag } => {
            if !path.join("index.json").is_file() {
                return Err(Error::Source(format!(
                    "{} is not an OCI image layout (no index.json)",
                    path.display()
                )));
            }
            oci_layout(Store::Dir(path.clone()), tag.as_deref(), platform)
        }
        ImageRef::DockerDaemon(name) => {
            let scratch = match cache {
                Some(c) => Scratch::Work(c.work_dir()?),
                None => Scratch::Temp(
                    tempfile::tempdir().map_err(|e| Error::io("create a temporary dir", e))?,
                ),
            };
            let dir = match &scratch {
                Scratch::Work(w) => w.path().to_owned(),
                Scratch::Temp(t) => t.path().to_owned(),
            };
            let tar = dir.join("docker-save.tar");
            docker_save(name, &tar)?;
            // `docker save NAME` writes exactly one image, whatever NAME is (tag or ID).
            let mut res = docker_archive(Store::Tar(TarIndex::build(&tar)?), None)?;
            res._scratch = Some(scratch);
            Ok(res)
        }
        ImageRef::Registry(s) => {
            let remote = Remote::connect(s, registry)?;
            let (raw, digest) = remote.manifest(None, MAX_JSON)?;
            let store = Store::Registry {
                remote: Box::new(remote),
                root: cache.map(|c| c.root().to_owned()),
            };
            walk(store, raw, digest, String::new(), platform)
        }
    }
}

/// Runs `docker save -o tar name`.
fn docker_save(name: &str, tar: &Path) -> Result<()> {
    let mut cmd = std::process::Command::new("docker");
    cmd.arg("save")
        .arg("-o")
        .arg(tar)
        .arg(name)
        .stdin(std::process::Stdio::null());
    crate::fsutil::die_with_parent(&mut cmd);
    let out = cmd.output().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            Error::Source(format!(
                "docker-daemon:{name} needs the docker CLI, which is not on PATH (install \
                     Docker, or export the image elsewhere with `docker save` and build \
                     docker-archive:FILE)"
            ))
        } else {
            Error::io("run docker save", e)
        }
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        let hint = if stderr.contains("Cannot connect to the Docker daemon")
            || stderr.contains("Is the docker daemon running")
            || stderr.contains("docker.sock")
        {
            " (the Docker daemon is not running or not reachable: start it, e.g. \
             `systemctl start docker`, or check DOCKER_HOST)"
        } else if stderr.contains("No such image") || stderr.contains("reference does not exist") {
            " (pull or build the image first, e.g. `docker pull NAME`)"
        } else {
            ""
        };
        return Err(Error::Tool {
            tool: "docker save",
            status: out.status.to_string(),
            stderr: format!("{stderr}{hint}"),
        });
    }
    Ok(())
}

fn docker_archive(store: Store, name: Option<&str>) -> Result<Resolved> {
    let raw = store.read_small("manifest.json")?;
    let entries: Vec<DockerManifestEntry> = json("docker archive manifest.json", &raw)?;
    let entry = match name {
        Some(n) => {
            let want = if n.contains(':') {
                n.to_owned()
            } else {
                format!("{n}:latest")
            };
            entries
                .into_iter()
                .find(|e| {
                    e.repo_tags
                        .iter()
                        .flatten()
                        .any(|t| t == &want || t.ends_with(&format!("/{want}")))
                })
                .ok_or_else(|| Error::Source(format!("no image tagged {want} in the archive")))?
        }
        None => {
            if entries.len() != 1 {
                return Err(Error::Source(format!(
                    "the archive holds {} images: name one as docker-archive:PATH:NAME",
                    entries.len()
                )));
            }
            entries.into_iter().next().expect("one entry")
        }
    };
    let config_raw = store.read_small(&entry.config)?;
    let config_digest = digest::sha256(&config_raw);
    // Legacy archives name the config `<hex>.json`, newer ones `blobs/sha256/<hex>`.
    let stem = entry
        .config
        .rsplit('/')
        .next()
        .unwrap_or("")
        .trim_end_matches(".json");
    if stem.len() == 64 && stem.bytes().all(|b| b.is_ascii_hexdigit()) {
        digest::verify("image config", &format!("sha256:{stem}"), &config_digest)?;
    }
    let config = ImageConfig::parse(&config_raw)?;
    if config.rootfs.diff_ids.len() != entry.layers.len() {
        return Err(Error::Source(format!(
            "manifest lists {} layers but the config has {} diff_ids",
            entry.layers.len(),
            config.rootfs.diff_ids.len()
        )));
    }
    let layers = entry
        .layers
        .iter()
        .zip(&config.rootfs.diff_ids)
        .map(|(l, d)| {
            let hex = l.strip_prefix("blobs/sha256/").filter(|h| h.len() == 64);
            LayerDesc {
                locator: l.clone(),
                digest: hex.map(|h| format!("sha256:{h}")),
                size: None,
                diff_id: d.clone(),
            }
        })
        .collect();
    Ok(Resolved {
        config,
        config_raw,
        config_digest,
        layers,
        store,
        _scratch: None,
    })
}

const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

fn oci_layout(store: Store, tag: Option<&str>, platform: &Platform) -> Result<Resolved> {
    let raw = store.read_small("index.json")?;
    let index: IndexOrManifest = json("index.json", &raw)?;
    let manifests = index.manifests.unwrap_or_default();
    let desc = match tag {
        Some(t) => manifests
            .into_iter()
            .find(|d| {
                d.annotations
                    .get("org.opencontainers.image.ref.name")
                    .is_some_and(|n| n == t || n.ends_with(&format!(":{t}")))
            })
            .ok_or_else(|| Error::Source(format!("no manifest named {t:?} in index.json")))?,
        None if manifests.len() == 1 => manifests.into_iter().next().expect("one"),
        None => pick_platform(manifests, platform)?,
    };
    let raw = store.read_manifest(&desc.digest)?;
    check_size(&desc, &raw)?;
    walk(store, raw, desc.digest, desc.media_type, platform)
}

fn check_size(desc: &Descriptor, raw: &[u8]) -> Result<()> {
    match desc.size {
        Some(size) if size != raw.len() as u64 => Err(Error::Source(format!(
            "blob {} has the wrong size",
            desc.digest
        ))),
        _ => Ok(()),
    }
}

/// Follows indexes (picking `platform`) down to an image manifest, then reads its config.
/// `raw` is the first document, already checked against `digest`.
fn walk(
    store: Store,
    mut raw: Vec<u8>,
    mut digest: String,
    mut media_type: String,
    platform: &Platform,
) -> Result<Resolved> {
    for _ in 0..4 {
        let doc: IndexOrManifest = json(&format!("manifest {digest}"), &raw)?;
        let is_index = INDEX_TYPES.contains(&media_type.as_str())
            || doc
                .media_type
                .as_deref()
                .is_some_and(|m| INDEX_TYPES.contains(&m))
            || (doc.manifests.is_some() && doc.config.is_none());
        if is_index {
            let desc = pick_platform(doc.manifests.unwrap_or_default(), platform)?;
            raw = store.read_manifest(&desc.digest)?;
            check_size(&desc, &raw)?;
            digest = desc.digest;
            media_type = desc.media_type;
            continue;
        }
        let cdesc = doc
            .config
            .ok_or_else(|| Error::Source(format!("manifest {digest} has no config")))?;
        let config_raw = store.read_blob(&cdesc.digest)?;
        check_size(&cdesc, &config_raw)?;
        let config = ImageConfig::parse(&config_raw)?;
        let layer_descs = doc.layers.unwrap_or_default();
        if layer_descs.len() != config.rootfs.diff_ids.len() {
            return Err(Error::Source(format!(
                "manifest lists {} layers but the config has {} diff_ids",
                layer_descs.len(),
                config.rootfs.diff_ids.len()
            )));
        }
        let mut layers = Vec::new();
        for (l, d) in layer_descs.into_iter().zip(&config.rootfs.diff_ids) {
            let hex = digest::parse(&l.digest)?;
            layers.push(LayerDesc {
                locator: format!("blobs/sha256/{hex}"),
                digest: Some(l.digest.clone()),
                size: l.size,
                diff_id: d.clone(),
            });
        }
        return Ok(Resolved {
            config,
            config_digest: cdesc.digest,
            config_raw,
            layers,
            store,
            _scratch: None,
        });
    }
    Err(Error::Source("image indexes nest too deeply".into()))
}

fn pick_platform(manifests: Vec<Descriptor>, want: &Platform) -> Result<Descriptor> {
    let available: Vec<String> = manifests
        .iter()
        .filter_map(|d| d.platform.as_ref())
        .map(|p| format!("{}/{}", p.os, p.architecture))
        .collect();
    manifests
        .into_iter()
        .find(|d| {
            d.platform.as_ref().is_some_and(|p| {
                p.os == want.os
                    && p.architecture == want.arch
                    && (want.variant.is_none() || p.variant == want.variant)
            })
        })
        .ok_or_else(|| {
            Error::Source(format!(
                "no manifest for platform {want} (available: {}); choose one with --platform",
                available.join(", ")
            ))
        })
}

#[cfg(test)]
#[path = "source_tests.rs"]
mod tests;
