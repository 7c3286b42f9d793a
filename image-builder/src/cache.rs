//! The content-addressed image cache.
//!
//! ```text
//! <root>/images/<key>/rootfs.ext4   published by renaming a finished work dir
//! <root>/images/<key>/image.json    what was built (diff_ids, size, time)
//! <root>/configs/<hex>.json         image configs, by config digest
//! <root>/refs/<hex>.json            reference -> key + config digest
//! <root>/locks/<key>.lock           flock held while a key is being built
//! <root>/tmp/<id>/                  work dirs; <id>/lock is held while alive
//! <root>/blobs/sha256/<hex>          registry layer blobs, verified, shared between images
//! ```
//!
//! The key hashes the builder format version and the ordered diff_id chain, so images
//! that share their layers share one ext4. Nothing under `images/` is ever partially
//! written: a build happens in `tmp/` and is published with one `rename`.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::digest;
use crate::error::{Error, Result};

/// Bumped whenever the ext4 layout or the unpack semantics change.
pub const FORMAT: &str = "agentvm-image/1 ext4 nojournal b4096 i256";

/// Default cache location.
pub const DEFAULT_DIR: &str = "/var/cache/agentvm/images";

/// Environment variable overriding the cache location.
pub const ENV_DIR: &str = "AGENTVM_IMAGE_CACHE";

/// The cache directory in force: `$AGENTVM_IMAGE_CACHE` or [`DEFAULT_DIR`].
pub fn default_dir() -> PathBuf {
    std::env::var_os(ENV_DIR)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
}

/// The cache key of a layer chain (plus an explicit size, which changes the output).
pub fn key(diff_ids: &[String], size: Option<u64>) -> String {
    let mut s = format!("{FORMAT}\n");
    if let Some(n) = size {
        s.push_str(&format!("size={n}\n"));
    }
    for d in diff_ids {
        s.push_str(d);
        s.push('\n');
    }
    digest::sha256(s.as_bytes())
        .trim_start_matches("sha256:")
        .to_owned()
}

/// Prefix of the chain ids of an image built from host layer directories (a container
/// engine's unpacked layers) rather than from registry layers.
pub const DIR_LAYER: &str = "dir:";

/// The chain id of host layer directory `path`: its device, inode and change time as well
/// as its path, so a directory removed and made again under the same name is a new layer.
pub fn dir_layer_id(path: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(path).map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
    Ok(format!(
        "{DIR_LAYER}{}:{}:{}.{}:{}",
        m.dev(),
        m.ino(),
        m.ctime(),
        m.ctime_nsec(),
        path.display()
    ))
}

/// What `images/<key>/image.json` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Cache key.
    pub key: String,
    /// Layer chain.
    pub diff_ids: Vec<String>,
    /// Apparent ext4 size in bytes.
    pub size: u64,
    /// Seconds since the epoch.
    pub built_at: u64,
}

impl ImageRecord {
    /// Whether this image was built from host layer directories of which one is gone or
    /// changed: nothing can use it any more.
    pub fn dir_layers_gone(&self) -> bool {
        self.diff_ids.iter().any(|id| {
            let Some(rest) = id.strip_prefix(DIR_LAYER) else {
                return false;
            };
            let path = rest.splitn(4, ':').nth(3).unwrap_or("");
            dir_layer_id(Path::new(path)).ok().as_deref() != Some(id.as_str())
        })
    }

    /// Whether this image was built from host layer directories.
    pub fn from_dirs(&self) -> bool {
        self.diff_ids.iter().any(|id| id.starts_with(DIR_LAYER))
    }
}

/// What `refs/<hex>.json` records.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RefRecord {
    /// The reference as the user wrote it.
    pub reference: String,
    /// Cache key of its rootfs.
    pub key: String,
    /// Digest of its config.
    pub config_digest: String,
    /// Seconds since the epoch.
    pub built_at: u64,
}

/// An open cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

/// A private work directory, removed on drop; its lock marks it alive for [`Cache::gc`].
#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
    _lock: Flock<File>,
}

impl WorkDir {
    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        // remove_dir_all does not follow symlinks, so image symlinks are safe here.
        let _ = fs::remove_dir_all(&self.path);
    }
}

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    // Unique per process and per call: concurrent writers (threads too) never share it.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp.{}.{seq}", std::process::id()));
    fs::write(&tmp, data).map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io(format!("publish {}", path.display()), e))
}

fn lock_file(path: &Path, arg: FlockArg) -> Result<Option<Flock<File>>> {
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(format!("open lock {}", path.display()), e))?;
    match Flock::lock(f, arg) {
        Ok(l) => Ok(Some(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(Error::nix(format!("lock {}", path.display()), e)),
    }
}

impl Cache {
    /// Opens (creating) the cache at `root`, with private permissions.
    pub fn open(root: &Path) -> Result<Self> {
        for sub in ["images", "configs", "refs", "locks", "tmp"] {
            let p = root.join(sub);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&p)
                .map_err(|e| Error::Cache {
                    path: root.to_owned(),
                    reason: format!(
                        "cannot create {}: {e} (run as root or set {ENV_DIR} to a writable \
                         directory)",
                        p.display()
                    ),
                })?;
        }
        Ok(Cache {
            root: root.to_owned(),
        })
    }

    /// The cache root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of a published image.
    pub fn image_dir(&self, key: &str) -> PathBuf {
        self.root.join("images").join(key)
    }

    /// The ext4 of a published image, if published.
    pub fn lookup(&self, key: &str) -> Option<PathBuf> {
        let p = self.image_dir(key).join("rootfs.ext4");
        p.is_file().then_some(p)
    }

    /// Takes the build lock of `key`, waiting for a concurrent builder to finish.
    pub fn lock_key(&self, key: &str) -> Result<Flock<File>> {
        lock_file(
            &self.root.join("locks").join(format!("{key}.lock")),
            FlockArg::LockExclusive,
        )?
        .ok_or_else(|| Error::Cache {
            path: self.root.clone(),
            reason: "lock unexpectedly busy".into(),
        })
    }

    /// Creates a private work directory under `tmp/`.
    ///
    /// The lock is created and flocked under a temporary name and then renamed to `lock`,
    /// so a visible `lock` is always already held: [`Cache::gc`] can never win it while
    /// the builder is alive. Only the instant between `mkdir` and that rename leaves the
    /// dir without `lock`, and gc removes lockless dirs only when they are old.
    pub fn work_dir(&self) -> Result<WorkDir> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = self
            .root
            .join("tmp")
            .join(format!("{}-{nanos}-{seq}", std::process::id()));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| Error::io(format!("create work dir {}", path.display()), e))?;
        let fresh = path.join("lock.new");
        let f = File::options()
            .create_new(true)
            .write(true)
            .open(&fresh)
            .map_err(|e| Error::io(format!("create lock {}", fresh.display()), e))?;
        let lock = Flock::lock(f, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| Error::nix(format!("lock {}", fresh.display()), e))?;
        let visible = path.join("lock");
        fs::rename(&fresh, &visible)
            .map_err(|e| Error::io(format!("publish lock {}", visible.display()), e))?;
        Ok(WorkDir { path, _lock: lock })
    }

    /// Publishes `dir` (holding rootfs.ext4 and image.json) as `key` with one rename.
    pub fn publish(&self, key: &str, dir: &Path) -> Result<PathBuf> {
        let dest = self.image_dir(key);
        match fs::rename(dir, &dest) {
            Ok(()) => {}
            // Someone else published the same content first: theirs is as good.
            Err(_) if self.lookup(key).is_some() => {}
            Err(e) => return Err(Error::io(format!("publish {}", dest.display()), e)),
        }
        Ok(dest.join("rootfs.ext4"))
    }

    /// Stores a config blob by digest and returns its path.
    pub fn put_config(&self, config_digest: &str, raw: &[u8]) -> Result<PathBuf> {
        let hex = digest::parse(config_digest)?;
        let p = self.root.join("configs").join(format!("{hex}.json"));
        if !p.is_file() {
            write_atomic(&p, raw)?;
        }
        Ok(p)
    }

    /// The path of a stored config.
    pub fn config_path(&self, config_digest: &str) -> Result<PathBuf> {
        let hex = digest::parse(config_digest)?;
        Ok(self.root.join("configs").join(format!("{hex}.json")))
    }

    fn ref_path(&self, reference: &str) -> PathBuf {
        let h = digest::sha256(reference.as_bytes());
        self.root
            .join("refs")
            .join(format!("{}.json", h.trim_start_matches("sha256:")))
    }

    /// Records that `reference` built to `key` with `config_digest`.
    pub fn put_ref(&self, rec: &RefRecord) -> Result<()> {
        let data = serde_json::to_vec_pretty(rec).expect("serializable");
        write_atomic(&self.ref_path(&rec.reference), &data)
    }

    /// The record of a reference.
    pub fn get_ref(&self, reference: &str) -> Option<RefRecord> {
        let data = fs::read(self.ref_path(reference)).ok()?;
        serde_json::from_slice(&data).ok()
    }

    /// All reference records, sorted by reference.
    pub fn refs(&self) -> Result<Vec<RefRecord>> {
        let dir = self.root.join("refs");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(|e| Error::io(format!("list {}", dir.display()), e))? {
            let e = e.map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
            if e.path().extension().is_some_and(|x| x == "json") {
                if let Ok(data) = fs::read(e.path()) {
                    if let Ok(r) = serde_json::from_slice::<RefRecord>(&data) {
                        out.push(r);
                    }
                }
            }
        }
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(out)
    }

    /// The record of a published image.
    pub fn image_record(&self, key: &str) -> Option<ImageRecord> {
        let data = fs::read(self.image_dir(key).join("image.json")).ok()?;
        serde_json::from_slice(&data).ok()
    }

    /// Forgets `reference`; removes its image when no other reference uses it.
    /// Returns whether anything was removed.
    pub fn remove_ref(&self, reference: &str) -> Result<bool> {
        let Some(rec) = self.get_ref(reference) else {
            return Ok(false);
        };
        let p = self.ref_path(reference);
        fs::remove_file(&p).map_err(|e| Error::io(format!("remove {}", p.display()), e))?;
        if !self.refs()?.iter().any(|r| r.key == rec.key) {
            self.remove_image(&rec.key)?;
        }
        Ok(true)
    }

    /// Removes a published image (readers that opened it keep their copy).
    pub fn remove_image(&self, key: &str) -> Result<()> {
        let _lock = self.lock_key(key)?;
        let dir = self.image_dir(key);
        if dir.exists() {
            // Move aside first so a reader never sees a half-deleted image.
            static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let trash = self
                .root
                .join("tmp")
                .join(format!("rm-{key}-{}-{seq}", std::process::id()));
            fs::rename(&dir, &trash)
                .map_err(|e| Error::io(format!("remove {}", dir.display()), e))?;
            // Already invisible; if this fails half-way, gc finishes it (lockless and old).
            let _ = fs::remove_dir_all(&trash);
        }
        Ok(())
    }

    /// Removes work dirs of dead builds, images no reference uses, unused configs, and
    /// downloaded layer blobs not written in the last [`LOCKLESS_GRACE`].
    /// Returns the number of entries removed.
    pub fn prune(&self) -> Result<usize> {
        let mut removed = self.gc()?;
        let refs = self.refs()?;
        let images = self.root.join("images");
        for e in fs::read_dir(&images).map_err(|e| Error::io("list images", e))? {
            let e = e.map_err(|e| Error::io("list images", e))?;
            let key = e.file_name().to_string_lossy().into_owned();
            // Images of host layer dirs have no reference: they live as long as their layers.
            let live_dirs = self
                .image_record(&key)
                .is_some_and(|r| r.from_dirs() && !r.dir_layers_gone());
            if !live_dirs && !refs.iter().any(|r| r.key == key) {
                self.remove_image(&key)?;
                removed += 1;
            }
        }
        // The blob store is only a download cache: drop what no build touched recently.
        let blobs = self.root.join("blobs/sha256");
        if let Ok(rd) = fs::read_dir(&blobs) {
            for e in rd.flatten() {
                if older_than(&e.path(), LOCKLESS_GRACE) && fs::remove_file(e.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        let configs = self.root.join("configs");
        for e in fs::read_dir(&configs).map_err(|e| Error::io("list configs", e))? {
            let e = e.map_err(|e| Error::io("list configs", e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let used = refs.iter().any(|r| {
                r.config_digest.trim_start_matches("sha256:") == name.trim_end_matches(".json")
            });
            if !used {
                let _ = fs::remove_file(e.path());
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Removes the images built from host layer directories that are gone (the engine
    /// removed the image), except `keep`. Returns how many were removed.
    pub fn evict_gone_dir_layers(&self, keep: &str) -> Result<usize> {
        let images = self.root.join("images");
        let mut removed = 0;
        for e in fs::read_dir(&images).map_err(|e| Error::io("list images", e))? {
            let Ok(e) = e else { continue };
            let key = e.file_name().to_string_lossy().into_owned();
            if key == keep {
                continue;
            }
            if self.image_record(&key).is_some_and(|r| r.dir_layers_gone()) {
                self.remove_image(&key)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Removes work dirs whose builder is gone (SIGKILL, crash). Safe to run any time:
    /// a live builder holds its dir's `lock`, which is visible only once held (see
    /// [`Cache::work_dir`]). A dir without `lock` is removed only when older than
    /// [`LOCKLESS_GRACE`]: it is a builder killed between `mkdir` and taking its lock, or
    /// a half-removed image.
    pub fn gc(&self) -> Result<usize> {
        let tmp = self.root.join("tmp");
        let mut removed = 0;
        for e in fs::read_dir(&tmp).map_err(|e| Error::io(format!("list {}", tmp.display()), e))? {
            let Ok(e) = e else { continue };
            let path = e.path();
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            // Held until the dir is gone, so nobody else sees it as dead meanwhile.
            let _held = match File::open(path.join("lock")) {
                Ok(f) => match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                    Ok(l) => l,
                    // EWOULDBLOCK: alive. Anything else: leave it, to be safe.
                    Err(_) => continue,
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if !older_than(&path, LOCKLESS_GRACE) {
                        continue;
                    }
                    if path.join("lock").exists() {
                        continue; // a lock appeared meanwhile: look again next time
                    }
                    if fs::remove_dir_all(&path).is_ok() {
                        removed += 1;
                    }
                    continue;
                }
                Err(_) => continue,
            };
            if fs::remove_dir_all(&path).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// How old a work dir without `lock` must be before [`Cache::gc`] removes it.
pub const LOCKLESS_GRACE: std::time::Duration = std::time::Duration::from_secs(600);

/// Whether `path` was last modified more than `age` ago.
fn older_than(path: &Path, age: std::time::Duration) -> bool {
    fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|a| a > age)
}

use std::os::unix::fs::DirBuilderExt;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_depends_on_order_and_size() {
        let a = "sha256:".to_owned() + &"a".repeat(64);
        let b = "sha256:".to_owned() + &"b".repeat(64);
        assert_ne!(
            key(&[a.clone(), b.clone()], None),
            key(&[b.clone(), a.clone()], None)
        );
        let one = std::slice::from_ref(&a);
        assert_ne!(key(one, None), key(one, Some(1 << 30)));
        assert_eq!(key(one, None), key(&[a.clone()][..], None));
    }

    #[test]
    fn images_of_host_layer_dirs_live_as_long_as_their_layers() {
        let t = tempfile::tempdir().unwrap();
        let c = Cache::open(&t.path().join("cache")).unwrap();
        let layers: Vec<PathBuf> = ["a:1", "b"].iter().map(|n| t.path().join(n)).collect();
        let publish = |ids: Vec<String>| {
            let k = key(&ids, None);
            let w = c.work_dir().unwrap();
            fs::write(w.path().join("rootfs.ext4"), b"").unwrap();
            let rec = ImageRecord {
                key: k.clone(),
                diff_ids: ids,
                size: 0,
                built_at: 0,
            };
            fs::write(
                w.path().join("image.json"),
                serde_json::to_vec(&rec).unwrap(),
            )
            .unwrap();
            c.publish(&k, w.path()).unwrap();
            k
        };
        for l in &layers {
            fs::create_dir(l).unwrap();
        }
        let ids: Vec<String> = layers.iter().map(|l| dir_layer_id(l).unwrap()).collect();
        assert!(ids[0].starts_with(DIR_LAYER) && ids[0].ends_with("/a:1"));
        let both = publish(ids.clone());
        let just_b = publish(ids[1..].to_vec());
        let rec = c.image_record(&both).unwrap();
        assert!(rec.from_dirs() && !rec.dir_layers_gone());
        // Not referenced, but its layers exist: prune keeps it.
        c.prune().unwrap();
        assert!(c.lookup(&both).is_some());
        // The engine removes layer a: the image of a+b goes, b's stays.
        fs::remove_dir(&layers[0]).unwrap();
        assert!(c.image_record(&both).unwrap().dir_layers_gone());
        assert_eq!(c.evict_gone_dir_layers("").unwrap(), 1);
        assert!(c.lookup(&both).is_none());
        assert!(c.lookup(&just_b).is_some());
        // A layer made again under the same name is a different layer.
        fs::remove_dir(&layers[1]).unwrap();
        fs::create_dir(&layers[1]).unwrap();
        assert_ne!(dir_layer_id(&layers[1]).unwrap(), ids[1]);
        assert_eq!(c.evict_gone_dir_layers(&just_b).unwrap(), 0, "kept");
        assert_eq!(c.evict_gone_dir_layers("").unwrap(), 1);
    }

    #[test]
    fn gc_removes_dead_work_dirs_only() {
        let t = tempfile::tempdir().unwrap();
        let c = Cache::open(t.path()).unwrap();
        let live = c.work_dir().unwrap();
        let dead = t.path().join("tmp/dead");
        fs::create_dir_all(dead.join("rootfs/x")).unwrap();
        File::create(dead.join("lock")).unwrap();
        let old = nix::sys::time::TimeSpec::new(1_000_000_000, 0);
        nix::sys::stat::utimensat(
            None,
            &dead,
            &old,
            &old,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
        std::os::unix::fs::symlink("/etc", dead.join("rootfs/x/etc")).unwrap();
        assert_eq!(c.gc().unwrap(), 1);
        assert!(!dead.exists());
        assert!(live.path().exists());
        assert!(Path::new("/etc/hostname").exists() || Path::new("/etc").exists());
        let p = live.path().to_owned();
        drop(live);
        assert!(!p.exists());
    }

    /// gc running flat out against builders creating work dirs in the same process
    /// (threads: flock conflicts between open file descriptions, so this is the hard
    /// case; separate processes behave the same) never removes a live dir.
    #[test]
    fn gc_never_removes_a_live_work_dir() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let t = tempfile::tempdir().unwrap();
        let c = Cache::open(t.path()).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let gcs: Vec<_> = (0..2)
            .map(|_| {
                let (c, stop) = (c.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        assert_eq!(c.gc().unwrap(), 0, "gc removed a live work dir");
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        let builders: Vec<_> = (0..3)
            .map(|i| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for j in 0..400 {
                        let w = c.work_dir().unwrap();
                        let f = w.path().join("data");
                        fs::write(&f, format!("{i}-{j}")).unwrap();
                        std::thread::yield_now();
                        assert!(w.path().join("lock").is_file());
                        assert_eq!(fs::read_to_string(&f).unwrap(), format!("{i}-{j}"));
                    }
                })
            })
            .collect();
        for b in builders {
            b.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        let rounds: u64 = gcs.into_iter().map(|g| g.join().unwrap()).sum();
        assert!(rounds > 10, "gc ran only {rounds} times");
        assert_eq!(fs::read_dir(t.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn gc_removes_lockless_dirs_only_when_old() {
        let t = tempfile::tempdir().unwrap();
        let c = Cache::open(t.path()).unwrap();
        let young = t.path().join("tmp/young");
        let old = t.path().join("tmp/old");
        fs::create_dir_all(&young).unwrap();
        fs::create_dir_all(old.join("x")).unwrap();
        let ts = nix::sys::time::TimeSpec::new(1_000_000_000, 0);
        nix::sys::stat::utimensat(
            None,
            &old,
            &ts,
            &ts,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
        assert_eq!(c.gc().unwrap(), 1);
        assert!(young.exists() && !old.exists());
    }

    #[test]
    fn refs_and_rm() {
        let t = tempfile::tempdir().unwrap();
        let c = Cache::open(t.path()).unwrap();
        fs::create_dir_all(c.image_dir("k1")).unwrap();
        fs::write(c.image_dir("k1").join("rootfs.ext4"), b"x").unwrap();
        for r in ["a", "b"] {
            c.put_ref(&RefRecord {
                reference: r.into(),
                key: "k1".into(),
                config_digest: digest::sha256(b"c"),
                built_at: 0,
            })
            .unwrap();
        }
        assert_eq!(c.refs().unwrap().len(), 2);
        assert!(c.remove_ref("a").unwrap());
        assert!(c.lookup("k1").is_some(), "still used by b");
        assert!(c.remove_ref("b").unwrap());
        assert!(c.lookup("k1").is_none());
        assert!(!c.remove_ref("b").unwrap());
    }
}
