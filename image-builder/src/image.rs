//! The build pipeline: resolve the source, look up the cache, apply layers, make ext4,
//! publish.

use std::path::PathBuf;

use crate::blobs::BlobStore;
use crate::cache::{self, Cache, ImageRecord, RefRecord};
use crate::config::ImageConfig;
use crate::error::{Error, Result};
use crate::ext4::{self, Ext4Options};
use crate::layer::{apply_layer, Totals};
use crate::limits::{self, Limits};
use crate::progress::{NoProgress, Progress};
use crate::registry::RegistryOptions;
use crate::source::{self, ImageRef, Platform};
use crate::tree::Tree;

/// How to build.
#[derive(Clone, Copy)]
pub struct BuildOptions<'a> {
    /// Cache root ([`cache::default_dir`] by default).
    pub cache_dir: &'a std::path::Path,
    /// Fixed ext4 size in bytes instead of the computed one.
    pub size: Option<u64>,
    /// Platform to pick from a multi-platform index (host platform by default).
    pub platform: Option<&'a Platform>,
    /// Limits on untrusted layer content.
    pub limits: &'a Limits,
    /// Progress sink.
    pub progress: &'a dyn Progress,
    /// Insecure registries and the credentials file.
    pub registry: &'a RegistryOptions,
}

impl std::fmt::Debug for BuildOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuildOptions")
            .field("cache_dir", &self.cache_dir)
            .field("size", &self.size)
            .field("platform", &self.platform)
            .field("limits", &self.limits)
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

static DEFAULT_LIMITS: std::sync::LazyLock<Limits> = std::sync::LazyLock::new(Limits::default);
static DEFAULT_REGISTRY: std::sync::LazyLock<RegistryOptions> =
    std::sync::LazyLock::new(RegistryOptions::default);

impl<'a> BuildOptions<'a> {
    /// Defaults with the given cache root: computed size, host platform, default limits,
    /// no progress output.
    pub fn new(cache_dir: &'a std::path::Path) -> Self {
        BuildOptions {
            cache_dir,
            size: None,
            platform: None,
            limits: &DEFAULT_LIMITS,
            progress: &NoProgress,
            registry: &DEFAULT_REGISTRY,
        }
    }
}

/// A built (or cached) image, ready for the runtime.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// Cache key (hash of the layer chain).
    pub key: String,
    /// The ext4 root filesystem, to attach read-only.
    pub rootfs: PathBuf,
    /// The image config JSON as published, stored beside the cache.
    pub config_path: PathBuf,
    /// Digest of the config.
    pub config_digest: String,
    /// The parsed config (entrypoint, cmd, env, working dir, user).
    pub config: ImageConfig,
    /// Whether the ext4 came from the cache without building.
    pub cached: bool,
}

/// Runs `f` on a plain thread when called from inside a tokio runtime (as from
/// `agentvm run`'s async main), else right here: registry pulls drive their own runtime, and
/// tokio panics when a runtime is entered or dropped inside another one.
fn outside_async<T: Send>(f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

/// Builds `source` into a cached ext4 root filesystem, or returns the cached one.
/// Blocking; may be called from inside a tokio runtime.
pub fn build(source: &ImageRef, opts: &BuildOptions<'_>) -> Result<BuiltImage> {
    outside_async(|| build_here(source, opts))
}

fn build_here(source: &ImageRef, opts: &BuildOptions<'_>) -> Result<BuiltImage> {
    let progress = opts.progress;
    let cache = Cache::open(opts.cache_dir)?;
    // Leftovers of killed builds are never served; clear them now.
    let _ = cache.gc();
    progress.phase(&format!("resolving {source}"));
    let resolved = source::resolve_with(source, opts.platform, opts.registry, Some(&cache))?;
    limits::ensure(
        "number of layers",
        resolved.layers.len() as u64,
        opts.limits.max_layers as u64,
        "Limits::max_layers",
    )?;
    let key = cache::key(&resolved.config.rootfs.diff_ids, opts.size);
    let config_path = cache.put_config(&resolved.config_digest, &resolved.config_raw)?;
    let finish = |rootfs: PathBuf, cached: bool| -> Result<BuiltImage> {
        cache.put_ref(&RefRecord {
            reference: source.to_string(),
            key: key.clone(),
            config_digest: resolved.config_digest.clone(),
            built_at: cache::now(),
        })?;
        Ok(BuiltImage {
            key: key.clone(),
            rootfs,
            config_path: config_path.clone(),
            config_digest: resolved.config_digest.clone(),
            config: resolved.config.clone(),
            cached,
        })
    };
    if let Some(p) = cache.lookup(&key) {
        return finish(p, true);
    }
    let _lock = cache.lock_key(&key)?;
    if let Some(p) = cache.lookup(&key) {
        // A concurrent build of the same layers finished while we waited.
        return finish(p, true);
    }

    let work = cache.work_dir()?;
    let declared: u64 = resolved.layers.iter().filter_map(|l| l.size).sum();
    limits::ensure(
        "total size of the layer blobs",
        declared,
        opts.limits.max_total_size,
        "--max-size / Limits::max_total_size",
    )?;
    resolved.fetch_layers(work.path(), progress)?;
    let mut blobs = BlobStore::create(&work.path().join("blobs"))?;
    let mut tree = Tree::new(opts.limits.clone());
    let mut totals = Totals::default();
    let n = resolved.layers.len();
    for (i, l) in resolved.layers.iter().enumerate() {
        let name = l.digest.as_deref().unwrap_or(&l.diff_id);
        let wrap = |e: Error| Error::Layer {
            index: i,
            digest: name.to_owned(),
            source: Box::new(e),
        };
        progress.layer_start(i, n, name, l.size);
        let mut blob = resolved.open_layer(l).map_err(wrap)?;
        apply_layer(
            &mut tree,
            &mut blobs,
            &mut blob,
            Some(&l.diff_id),
            &mut totals,
            progress,
        )
        .map_err(wrap)?;
        blob.finish().map_err(wrap)?;
        progress.layer_done();
    }

    progress.phase("building ext4");
    let out_dir = work.path().join("out");
    std::fs::create_dir(&out_dir)
        .map_err(|e| Error::io(format!("create {}", out_dir.display()), e))?;
    let out = out_dir.join("rootfs.ext4");
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        &key[0..8],
        &key[8..12],
        &key[12..16],
        &key[16..20],
        &key[20..32]
    );
    let stats = ext4::build(
        &tree,
        &blobs,
        work.path(),
        &out,
        &Ext4Options {
            size: opts.size,
            uuid: Some(uuid),
        },
    )?;
    // Durable before it becomes visible.
    std::fs::File::open(&out)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(format!("sync {}", out.display()), e))?;
    let record = ImageRecord {
        key: key.clone(),
        diff_ids: resolved.config.rootfs.diff_ids.clone(),
        size: stats.size,
        built_at: cache::now(),
    };
    std::fs::write(
        out_dir.join("image.json"),
        serde_json::to_vec_pretty(&record).expect("serializable"),
    )
    .map_err(|e| Error::io("write image.json", e))?;
    let rootfs = cache.publish(&key, &out_dir)?;
    finish(rootfs, false)
}

/// The config of an image: from the cache when it was built, else read from the source.
/// Blocking; may be called from inside a tokio runtime.
pub fn inspect(
    source: &ImageRef,
    opts: &BuildOptions<'_>,
) -> Result<(ImageConfig, Option<PathBuf>)> {
    outside_async(|| inspect_here(source, opts))
}

fn inspect_here(
    source: &ImageRef,
    opts: &BuildOptions<'_>,
) -> Result<(ImageConfig, Option<PathBuf>)> {
    let cache = Cache::open(opts.cache_dir)?;
    if let Some(rec) = cache.get_ref(&source.to_string()) {
        let p = cache.config_path(&rec.config_digest)?;
        if let Ok(raw) = std::fs::read(&p) {
            return Ok((ImageConfig::parse(&raw)?, cache.lookup(&rec.key)));
        }
    }
    let resolved = source::resolve_with(source, opts.platform, opts.registry, None)?;
    Ok((resolved.config, None))
}

#[cfg(test)]
#[path = "image_tests.rs"]
mod tests;
