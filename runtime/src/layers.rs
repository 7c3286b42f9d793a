//! The container root as image layers on a block device under the engine's own writable
//! layer.
//!
//! Docker's overlay2 driver and containerd's overlayfs snapshotter hand the runtime an
//! overlay: read-only image layers (`lowerdir`) under the container's writable layer
//! (`upperdir`). Sharing the whole merged tree with the VM makes every file access of the
//! workload a round trip to the host. Instead:
//!
//! - the image layers become one ext4 image, built once per layer chain with the
//!   image-builder library ([`agentvm_image::ext4::build_dir_image`]), cached, and attached
//!   read-only as a virtio-blk disk: reads stay in the guest's page cache;
//! - Docker's per-container init layer (`<id>-init`: `/etc/hosts` and friends as empty
//!   placeholders) is not part of the image, so it gets a small ext4 of its own in the
//!   sandbox state dir;
//! - the directory holding the writable layer is shared over virtio-fs, and the guest's
//!   overlayfs writes into the engine's own upper dir, in the format the engine reads
//!   (whiteouts, opaque dirs), so `docker diff`, `docker commit`, `docker export` and
//!   `docker cp` see what the workload wrote.
//!
//! docs/decisions.md ("Container root: image layers on a cached ext4 disk ...") has the design and
//! the measurements.

use std::collections::HashMap;
use std::ffi::{CString, OsString};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use agentvm_image::cache::{self, Cache, ImageRecord};
use agentvm_image::ext4::{self, DirImage, Ext4Options};

use crate::error::{Error, Result};

/// Annotation choosing how the container root reaches the VM: `layers` (image layers on a
/// block device, the writable layer shared; the default where possible) or `share` (the
/// whole merged root shared).
pub const ROOTFS_ANNOTATION: &str = "io.agentvm.rootfs";
/// The overlay work directory the guest makes beside the writable layer (the engine's own
/// work dir belongs to its host mount).
pub const GUEST_WORKDIR: &str = "agentvm-work";

/// What [`ROOTFS_ANNOTATION`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootMode {
    /// Layers when the root is an overlay and virtiofsd is installed, else the share.
    Auto,
    /// Layers, or an error saying why not.
    Layers,
    /// The whole merged root over a share.
    Share,
}

impl RootMode {
    /// The mode [`ROOTFS_ANNOTATION`] asks for; naming a transport for the shared root
    /// ([`crate::mounts::ROOT_ANNOTATION`]) asks for the share.
    pub fn from_annotations(annotations: &HashMap<String, String>) -> Result<Self> {
        let share_transport = annotations
            .get(crate::mounts::ROOT_ANNOTATION)
            .is_some_and(|v| !v.trim().is_empty());
        match annotations.get(ROOTFS_ANNOTATION).map(|v| v.trim()) {
            None | Some("") if share_transport => Ok(RootMode::Share),
            None | Some("") => Ok(RootMode::Auto),
            Some("layers") if share_transport => Err(Error::Invalid(format!(
                "annotation {} applies to a shared root: drop it or use {ROOTFS_ANNOTATION}=share",
                crate::mounts::ROOT_ANNOTATION
            ))),
            Some("layers") => Ok(RootMode::Layers),
            Some("share") => Ok(RootMode::Share),
            Some(other) => Err(Error::Invalid(format!(
                "annotation {ROOTFS_ANNOTATION}={other:?}: use \"layers\" or \"share\""
            ))),
        }
    }
}

/// An overlay mount: lower layers top first, the writable layer and its work dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    pub lower: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
}

/// Undoes the octal escapes of `/proc/self/mountinfo` (`\040` for a space; overlayfs also
/// escapes `,` and `=` in its options).
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

fn path_of(bytes: Vec<u8>) -> PathBuf {
    PathBuf::from(OsString::from_vec(bytes))
}

/// Splits overlayfs's `lowerdir` list at `:` (a literal colon is written `\:`). An empty
/// entry (`::`, data-only layers) makes the list unusable here: `None`.
fn split_lower(v: &[u8]) -> Option<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut i = 0;
    while i < v.len() {
        match v[i] {
            b'\\' if v.get(i + 1) == Some(&b':') => {
                cur.push(b':');
                i += 2;
                continue;
            }
            b':' => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
        i += 1;
    }
    out.push(cur);
    if out.iter().any(|p| p.is_empty()) {
        return None;
    }
    Some(out.into_iter().map(path_of).collect())
}

/// The overlay's layers from its super options (`lowerdir=a:b,upperdir=..,workdir=..`, or
/// `lowerdir+=a,lowerdir+=b` as newer kernels show them). `None` without a writable layer or
/// with data-only layers.
fn parse_options(opts: &str) -> Option<Overlay> {
    let (mut lower, mut upper, mut work) = (Vec::new(), None, None);
    for o in opts.split(',') {
        let (k, v) = o.split_once('=').unwrap_or((o, ""));
        let v = unescape(v);
        match k {
            "lowerdir" => lower.extend(split_lower(&v)?),
            "lowerdir+" => lower.push(path_of(v)),
            "upperdir" => upper = Some(path_of(v)),
            "workdir" => work = Some(path_of(v)),
            "datadir+" => return None,
            _ => {}
        }
    }
    if lower.is_empty() {
        return None;
    }
    Some(Overlay {
        lower,
        upper: upper?,
        work: work?,
    })
}

/// The overlay mounted on top at `mount_point`, from `/proc/self/mountinfo` text. Relative
/// layer paths (Docker mounts from its overlay2 dir when the options would be too long) are
/// resolved against `base`.
pub fn parse_mountinfo(text: &str, mount_point: &Path, base: &Path) -> Option<Overlay> {
    let mut o = parse_options(&overlay_options(text, mount_point)?)?;
    let abs = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
    o.lower = o.lower.into_iter().map(abs).collect();
    o.upper = abs(o.upper);
    o.work = abs(o.work);
    Some(o)
}

/// The super options of the overlay on top at `mount_point` (as mountinfo shows them, still
/// escaped), or `None` when the mount on top there is not an overlay.
fn overlay_options(text: &str, mount_point: &Path) -> Option<String> {
    overlay_mount(text, mount_point).map(|(_, opts)| opts)
}

/// The per-mount and the super options of the overlay on top at `mount_point`.
fn overlay_mount(text: &str, mount_point: &Path) -> Option<(String, String)> {
    let mut found = None;
    for line in text.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let mut pre = pre.split(' ');
        let (Some(mp), Some(per_mount)) = (pre.nth(4), pre.next()) else {
            continue;
        };
        if path_of(unescape(mp)) != mount_point {
            continue;
        }
        // The last mount on a path is the one on top.
        let mut post = post.split(' ');
        found = match (post.next(), post.nth(1)) {
            (Some("overlay"), Some(opts)) => Some((per_mount.to_owned(), opts.to_owned())),
            _ => None,
        };
    }
    found
}

/// The super options of an overlay other than its layers and `rw`/`ro`, unescaped: what a
/// remount of the same layers passes on.
fn other_options(opts: &str) -> Vec<(String, Option<String>)> {
    opts.split(',')
        .filter_map(|o| {
            let (k, v) = match o.split_once('=') {
                Some((k, v)) => (k, Some(String::from_utf8_lossy(&unescape(v)).into_owned())),
                None => (o, None),
            };
            let layer = matches!(
                k,
                "lowerdir" | "lowerdir+" | "upperdir" | "workdir" | "datadir+" | "rw" | "ro" | ""
            );
            (!layer).then(|| (k.to_owned(), v))
        })
        .collect()
}

/// The host's own mount of a layered container root: Docker's `merged` dir (or the shim's
/// mount of a snapshotter's layers), which Docker reads for `docker diff`, `docker cp` and
/// `docker export`. The guest writes the same upper dir from another kernel, so this host
/// overlay's cached view of a directory it looked at before the guest changed it goes stale;
/// [`HostView::refresh`] mounts it afresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    pub mount_point: PathBuf,
    /// The overlay's super options besides its layers, unescaped (`index=off`, ...).
    pub options: Vec<(String, Option<String>)>,
    /// Its mount attributes (`MOUNT_ATTR_*`: nosuid, nodev, ...).
    pub attrs: u64,
    /// What relative layer paths in the options resolve against.
    pub base: PathBuf,
    /// The image's layers (and Docker's init layer), top first, resolved (no symlink on
    /// their paths: Docker names them through `l/<short>` links).
    pub lower: Vec<PathBuf>,
    /// The writable layer, resolved.
    pub upper: PathBuf,
    /// The overlay's work dir, resolved.
    pub work: PathBuf,
    /// Device and inode of the writable layer and of the mount point's parent when found:
    /// what [`HostView::untouched`] compares.
    pub ids: [(u64, u64); 2],
    /// Mode, owner and group of the directory shared with the guest (the layer's parent):
    /// the guest can change them (Landlock does not cover chmod and chown), the shim puts
    /// them back after the VM ([`HostView::restore_share_dir`]).
    pub share_dir_attrs: (u32, u32, u32),
}

/// Device and inode of a directory that is not a symlink.
fn dir_id(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(p).ok()?;
    m.is_dir().then(|| (m.dev(), m.ino()))
}

impl HostView {
    /// The overlay at `root`, if there is one.
    pub fn find(root: &Path) -> Option<HostView> {
        let mount_point = std::fs::canonicalize(root).ok()?;
        let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        // Docker: <root>/overlay2/<id>/merged, relative layers are under <root>/overlay2.
        let base = mount_point
            .parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("/"))
            .to_path_buf();
        let (per_mount, raw) = overlay_mount(&text, &mount_point)?;
        let Overlay { lower, upper, work } = parse_mountinfo(&text, &mount_point, &base)?;
        // Resolved now, before the guest runs: a refresh then opens each of them with no
        // symlink allowed anywhere on its path.
        let resolve = |p: PathBuf| std::fs::canonicalize(p).ok();
        let lower = lower.into_iter().map(resolve).collect::<Option<Vec<_>>>()?;
        let (upper, work) = (resolve(upper)?, resolve(work)?);
        let options = other_options(&raw);
        let attrs = crate::fsmount::mount_attrs(&per_mount);
        let ids = [dir_id(&upper)?, dir_id(mount_point.parent()?)?];
        let share_dir_attrs = {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::symlink_metadata(upper.parent()?).ok()?;
            (m.mode() & 0o7777, m.uid(), m.gid())
        };
        Some(HostView {
            mount_point,
            options,
            attrs,
            base,
            lower,
            upper,
            work,
            ids,
            share_dir_attrs,
        })
    }

    /// Puts back the mode and owner the shared directory had at start. Call once the VM is
    /// gone (nothing races it then); the directory is opened without following a symlink
    /// and changed through its descriptor all the same.
    pub fn restore_share_dir(&self) -> Result<()> {
        let Some(dir) = self.upper.parent() else {
            return Ok(());
        };
        let fd = crate::fsmount::open_dir_rdonly(dir)
            .map_err(|e| Error::io("open (no symlinks)", dir, e))?;
        let st = nix::sys::stat::fstat(fd.as_raw_fd())
            .map_err(|e| Error::io("inspect", dir, e.into()))?;
        let (mode, uid, gid) = self.share_dir_attrs;
        if (st.st_uid, st.st_gid) != (uid, gid) {
            nix::unistd::fchown(fd.as_raw_fd(), Some(uid.into()), Some(gid.into()))
                .map_err(|e| Error::io("restore the owner of", dir, e.into()))?;
        }
        if st.st_mode & 0o7777 != mode {
            nix::sys::stat::fchmod(
                fd.as_raw_fd(),
                nix::sys::stat::Mode::from_bits_truncate(mode),
            )
            .map_err(|e| Error::io("restore the mode of", dir, e.into()))?;
        }
        Ok(())
    }

    /// Checks that the writable layer and the directory holding the mount point are the
    /// directories found at start (no symlink or other directory in their place): the guest
    /// writes beside the one and must never steer a host mount or an engine's walk elsewhere.
    pub fn untouched(&self) -> Result<()> {
        let parent = self.mount_point.parent().unwrap_or(Path::new("/"));
        for (p, id) in [(self.upper.as_path(), self.ids[0]), (parent, self.ids[1])] {
            if dir_id(p) != Some(id) {
                return Err(Error::Invalid(format!(
                    "{} is no longer the directory the container started with (replaced or a \
                     symlink now): refusing to use it",
                    p.display()
                )));
            }
        }
        Ok(())
    }

    /// A token that changes when the host overlay copies something up or deletes something
    /// from the image (its `work/work` dir holds every such operation for an instant): the
    /// host changed the root (`docker cp` into the container). A mount remakes the dir too.
    pub fn host_writes(&self) -> Option<(u64, i64, i64)> {
        dir_token(&self.work.join("work"))
    }

    /// The same token for the guest's overlay ([`GUEST_WORKDIR`] beside the writable layer):
    /// it changes when the guest copies a directory or file of the image up, or deletes one,
    /// which is what a host overlay that looked there before cannot see.
    pub fn guest_writes(&self) -> Option<(u64, i64, i64)> {
        let share = self.upper.parent()?;
        dir_token(&share.join(GUEST_WORKDIR).join("work"))
    }

    /// Replaces the overlay at the mount point by a fresh mount of the same layers, which
    /// drops the cached view. Does nothing when the overlay is no longer there (the engine
    /// unmounted it). The path is empty for the instant between the two.
    ///
    /// No path is resolved twice and no symlink is followed: the layers and the directory
    /// holding the mount point are opened once (`openat2`, no symlinks), checked against the
    /// identities found at start, and the old overlay is unmounted and the new one created
    /// and attached through those descriptors (the new mount API), so what the guest swaps
    /// in beside the layer meanwhile cannot redirect the mount.
    pub fn refresh(&self) -> Result<()> {
        use crate::fsmount;
        let open =
            |p: &Path| fsmount::open_dir(p).map_err(|e| Error::io("open (no symlinks)", p, e));
        let same = |fd: &std::os::fd::OwnedFd, p: &Path, id: (u64, u64)| match fsmount::identity(
            fd.as_fd(),
        ) {
            Ok(found) if found == id => Ok(()),
            _ => Err(Error::Invalid(format!(
                "{} is no longer the directory the container started with: refusing to \
                 remount the container root",
                p.display()
            ))),
        };
        let (parent_path, name) = match (self.mount_point.parent(), self.mount_point.file_name()) {
            (Some(p), Some(n)) => (p, n),
            _ => {
                return Err(Error::Invalid(format!(
                    "{}: no mount point",
                    self.mount_point.display()
                )))
            }
        };
        let parent = open(parent_path)?;
        same(&parent, parent_path, self.ids[1])?;
        let root = fsmount::open_dir_in(parent.as_fd(), name)
            .map_err(|e| Error::io("open (no symlinks)", &self.mount_point, e))?;
        // An overlay mounted on the mount point, or the engine has unmounted it: leave it.
        // (Not read from mountinfo: a layer given by descriptor is shown there by the path
        // it had when it was given.)
        let mounted = fsmount::is_overlay(root.as_fd()).unwrap_or(false)
            && fsmount::identity(root.as_fd()).map(|(dev, _)| dev).ok() != Some(self.ids[1].0);
        if !mounted {
            return Ok(());
        }
        let upper = open(&self.upper)?;
        same(&upper, &self.upper, self.ids[0])?;
        let work = open(&self.work)?;
        let lower = self
            .lower
            .iter()
            .map(|p| open(p))
            .collect::<Result<Vec<_>>>()?;
        let pending = fsmount::PendingOverlay::new(&fsmount::OverlayLayers {
            lower: &lower,
            upper: &upper,
            work: &work,
            paths: (&self.lower, &self.upper, &self.work),
            options: &self.options,
        })
        .map_err(|e| Error::io("set up an overlay of", &self.upper, e))?;
        fsmount::detach_overlay(root.as_fd())
            .map_err(|e| Error::io("unmount", &self.mount_point, e))?;
        // The descriptor holds the old overlay alive: gone before the new one exists.
        drop(root);
        // The mount point itself, now uncovered, must be a directory too.
        let target = fsmount::open_dir_in(parent.as_fd(), name).map_err(|e| {
            Error::Invalid(format!(
                "{} is not a directory after unmounting the root ({e}): not remounting",
                self.mount_point.display()
            ))
        })?;
        pending.mount(target.as_fd(), self.attrs).map_err(|e| {
            Error::Invalid(format!(
                "remount the container root at {}: {e}",
                self.mount_point.display()
            ))
        })
    }
}

fn dir_token(dir: &Path) -> Option<(u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    // The guest's work dir is the guest's: never follow a symlink it put there.
    let m = std::fs::symlink_metadata(dir).ok()?;
    Some((m.ino(), m.mtime(), m.mtime_nsec()))
}

/// Whether `layer` (a resolved lower dir) is Docker's per-container init layer
/// (`<overlay2>/<id>-init/diff`), which no other container shares.
fn is_private(layer: &Path) -> bool {
    layer
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|n| n.as_bytes().ends_with(b"-init"))
}

/// The lower layers resolved (Docker names them through `l/<short>` symlinks) and split into
/// the container's private layers on top and the image's chain below.
pub fn split_layers(lower: &[PathBuf]) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let mut resolved = Vec::with_capacity(lower.len());
    for l in lower {
        let r = std::fs::canonicalize(l).map_err(|e| Error::io("resolve layer", l, e))?;
        resolved.push(r);
    }
    let n = resolved.iter().take_while(|l| is_private(l)).count();
    let chain = resolved.split_off(n);
    Ok((resolved, chain))
}

/// Builds an ext4 image of the merged `layers` (top first) at `out`. One layer is copied
/// as is; several are first merged by a read-only overlay mounted inside mkfs's own mount
/// namespace (made by the child before it runs mkfs), so no mount outlives the build, even
/// when the shim is killed. `scratch` is a private directory for the mount point.
pub fn build_layers_image(layers: &[PathBuf], scratch: &Path, out: &Path) -> Result<u64> {
    let opts = Ext4Options::default();
    let img_err = |e: agentvm_image::Error| Error::Invalid(format!("build the layers image: {e}"));
    let [first, ..] = layers else {
        return Err(Error::Invalid("no layers to build an image of".into()));
    };
    if layers.len() == 1 {
        return ext4::build_from_dir(first, out, &opts)
            .map(|s| s.size)
            .map_err(img_err);
    }
    // Short relative names keep the mount options under a page for 100+ layers.
    let links = scratch.join("l");
    let target = scratch.join("merged");
    for d in [&links, &target] {
        std::fs::create_dir_all(d).map_err(|e| Error::io("create", d, e))?;
    }
    let mut names = Vec::new();
    let (mut size, mut inodes, mut lost_found) = (0, 0, false);
    for (i, l) in layers.iter().enumerate() {
        let link = links.join(i.to_string());
        std::os::unix::fs::symlink(l, &link).map_err(|e| Error::io("link", &link, e))?;
        names.push(i.to_string());
        // Shadowed files count twice: the image is sparse, an overestimate costs little.
        let (s, n) = ext4::estimate_dir(l).map_err(img_err)?;
        size += s;
        inodes += n;
        lost_found |= l.join("lost+found").symlink_metadata().is_ok();
    }
    let data = CString::new(format!("lowerdir={}", names.join(":")))
        .map_err(|_| Error::Invalid("layer names hold a NUL byte".into()))?;
    let target_c = CString::new(target.as_os_str().as_bytes())
        .map_err(|_| Error::Invalid(format!("{} holds a NUL byte", target.display())))?;
    let prepare = move |cmd: &mut Command| {
        use std::os::unix::process::CommandExt;
        let (data, target) = (data.clone(), target_c.clone());
        cmd.current_dir(&links);
        // SAFETY: runs in the forked child before exec; it only makes syscalls (unshare,
        // mount) on buffers allocated before the fork, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::unshare(libc::CLONE_NEWNS) != 0
                    || libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ) != 0
                    || libc::mount(
                        c"overlay".as_ptr(),
                        target.as_ptr(),
                        c"overlay".as_ptr(),
                        libc::MS_RDONLY,
                        data.as_ptr().cast(),
                    ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    };
    let image = DirImage {
        src: &scratch.join("merged"),
        root: first,
        lost_found,
        estimate: (size, inodes),
    };
    ext4::build_dir_image(&image, out, &opts, &prepare)
        .map(|s| s.size)
        .map_err(img_err)
}

/// The cached ext4 of an image's layer `chain` (top first): looked up by the layers'
/// identity, else built once (concurrent starts of the same image wait for one build) and
/// published. Images of layers the engine has removed since are evicted afterwards.
pub fn chain_image(cache: &Cache, chain: &[PathBuf]) -> Result<PathBuf> {
    let img_err = |e: agentvm_image::Error| Error::Invalid(format!("layers image cache: {e}"));
    let ids = chain
        .iter()
        .map(|l| cache::dir_layer_id(l))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(img_err)?;
    let key = cache::key(&ids, None);
    if let Some(p) = cache.lookup(&key) {
        return Ok(p);
    }
    let _lock = cache.lock_key(&key).map_err(img_err)?;
    if let Some(p) = cache.lookup(&key) {
        return Ok(p);
    }
    let started = std::time::Instant::now();
    let work = cache.work_dir().map_err(img_err)?;
    let out = work.path().join("rootfs.ext4");
    let size = build_layers_image(chain, &work.path().join("scratch"), &out)?;
    let record = ImageRecord {
        key: key.clone(),
        diff_ids: ids,
        size,
        built_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    let json = serde_json::to_vec_pretty(&record)
        .map_err(|e| Error::Invalid(format!("encode image record: {e}")))?;
    let rec_path = work.path().join("image.json");
    std::fs::write(&rec_path, json).map_err(|e| Error::io("write", &rec_path, e))?;
    let _ = std::fs::remove_dir_all(work.path().join("scratch"));
    let published = cache.publish(&key, work.path()).map_err(img_err)?;
    tracing::info!(
        "built the layers image of {} layers in {:?}: {}",
        chain.len(),
        started.elapsed(),
        published.display()
    );
    match cache.evict_gone_dir_layers(&key) {
        Ok(0) => {}
        Ok(n) => tracing::info!("evicted {n} layers images of removed images"),
        Err(e) => tracing::warn!("evict layers images: {e}"),
    }
    Ok(published)
}

/// A container root on block devices: the disks (top first) and the writable layer's dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayeredRoot {
    /// ext4 images, top first: the container's private layers (if any), then the image.
    pub disks: Vec<PathBuf>,
    /// The directory shared with the guest: the writable layer's parent.
    pub share_dir: PathBuf,
    /// The writable layer, relative to `share_dir`.
    pub upper: String,
}

/// Prepares the layered root of the overlay `view` (found with [`HostView::find`]): builds (or
/// finds cached) the images of its layers and says what to attach. `Ok(None)` when its
/// writable layer has no parent directory to share.
pub fn prepare(view: &HostView, cache_dir: &Path, state_dir: &Path) -> Result<Option<LayeredRoot>> {
    let (private, chain) = split_layers(&view.lower)?;
    let upper = std::fs::canonicalize(&view.upper)
        .map_err(|e| Error::io("resolve upper dir", &view.upper, e))?;
    let (Some(share_dir), Some(name)) = (upper.parent(), upper.file_name()) else {
        return Ok(None);
    };
    // The share's jail (vmm::share_jail) needs Landlock to keep the guest out of the
    // engine's files beside the layer.
    if crate::jail::landlock_abi().unwrap_or(0) < crate::jail::LANDLOCK_MIN_ABI {
        return Err(Error::Missing {
            what: format!(
                "Landlock ABI {} (Linux 5.19+, landlock in the lsm= list)",
                crate::jail::LANDLOCK_MIN_ABI
            ),
            hint: format!(
                "the layered root shares the directory of the engine's writable layer and \
                 needs it to keep the guest away from the engine's metadata; without it \
                 use {ROOTFS_ANNOTATION}=share"
            ),
        });
    }
    // agentvm's overlay work dir beside the layer, made here: the guest may create nothing
    // in that directory.
    let guest_work = share_dir.join(GUEST_WORKDIR);
    match std::fs::symlink_metadata(&guest_work) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::Invalid(format!(
                "{} is not a directory: refusing the layered root",
                guest_work.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&guest_work)
                .map_err(|e| Error::io("create", &guest_work, e))?;
        }
        Err(e) => return Err(Error::io("inspect", &guest_work, e)),
    }
    let name = name
        .to_str()
        .ok_or_else(|| Error::Invalid(format!("upper dir {} is not UTF-8", upper.display())))?;
    let mut disks = Vec::new();
    if !private.is_empty() {
        let out = state_dir.join("init-layer.ext4");
        let scratch = state_dir.join("init-layer.d");
        let built = build_layers_image(&private, &scratch, &out);
        let _ = std::fs::remove_dir_all(&scratch);
        built?;
        disks.push(out);
    }
    if !chain.is_empty() {
        let cache = Cache::open(cache_dir)
            .map_err(|e| Error::Invalid(format!("layers image cache: {e}")))?;
        disks.push(chain_image(&cache, &chain)?);
    }
    Ok(Some(LayeredRoot {
        disks,
        share_dir: share_dir.to_path_buf(),
        upper: name.to_owned(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCKER: &str = "1286 1207 0:77 / /var/lib/docker/overlay2/abc/merged rw,relatime shared:640 - overlay overlay rw,lowerdir=/var/lib/docker/overlay2/l/INIT:/var/lib/docker/overlay2/l/L1:/var/lib/docker/overlay2/l/L2,upperdir=/var/lib/docker/overlay2/abc/diff,workdir=/var/lib/docker/overlay2/abc/work,nouserxattr";

    #[test]
    fn docker_overlay2_mount_is_found_with_its_layers() {
        let text = format!("22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n{DOCKER}\n");
        let o = parse_mountinfo(
            &text,
            Path::new("/var/lib/docker/overlay2/abc/merged"),
            Path::new("/x"),
        )
        .unwrap();
        assert_eq!(
            o.lower,
            ["INIT", "L1", "L2"].map(|l| PathBuf::from(format!("/var/lib/docker/overlay2/l/{l}")))
        );
        assert_eq!(o.upper, Path::new("/var/lib/docker/overlay2/abc/diff"));
        assert_eq!(o.work, Path::new("/var/lib/docker/overlay2/abc/work"));
        assert_eq!(
            parse_mountinfo(
                &text,
                Path::new("/var/lib/docker/overlay2/other/merged"),
                Path::new("/")
            ),
            None
        );
    }

    #[test]
    fn relative_escaped_and_new_style_layers() {
        // Docker mounts relative to its overlay2 dir when the options are long; overlayfs
        // escapes commas and spaces; lowerdir+ is how newer kernels list layers.
        let text = "5 1 0:9 / /b/c\\040d rw - overlay overlay rw,lowerdir=l/A:/abs/x\\054y\\:z,upperdir=c/diff,workdir=c/work\n\
                    6 1 0:9 / /new rw - overlay overlay rw,lowerdir+=/l1,lowerdir+=/l2,upperdir=/u,workdir=/w\n";
        let o = parse_mountinfo(text, Path::new("/b/c d"), Path::new("/base")).unwrap();
        assert_eq!(
            o.lower,
            [PathBuf::from("/base/l/A"), PathBuf::from("/abs/x,y:z")]
        );
        assert_eq!(o.upper, Path::new("/base/c/diff"));
        let o = parse_mountinfo(text, Path::new("/new"), Path::new("/")).unwrap();
        assert_eq!(o.lower, [PathBuf::from("/l1"), PathBuf::from("/l2")]);
    }

    #[test]
    fn not_a_usable_overlay() {
        let cases = [
            // A bind mount (containerd's single-layer view), a read-only overlay, data-only
            // layers, and an overlay covered by another mount on the same path.
            "1 1 0:1 / /r rw - ext4 /dev/vda rw",
            "1 1 0:1 / /r rw - overlay overlay rw,lowerdir=/a:/b",
            "1 1 0:1 / /r rw - overlay overlay rw,lowerdir=/a::/d,upperdir=/u,workdir=/w",
            "1 1 0:1 / /r rw - overlay overlay rw,lowerdir=/a,upperdir=/u,workdir=/w\n2 1 0:2 / /r rw - tmpfs tmpfs rw",
        ];
        for c in cases {
            assert_eq!(
                parse_mountinfo(c, Path::new("/r"), Path::new("/")),
                None,
                "{c}"
            );
        }
    }

    #[test]
    fn dockers_init_layer_is_private_and_the_image_chain_is_shared() {
        let t = tempfile::tempdir().unwrap();
        let mk = |p: &str| {
            let d = t.path().join(p);
            std::fs::create_dir_all(&d).unwrap();
            d
        };
        let init = mk("abc-init/diff");
        let l1 = mk("l1/diff");
        std::os::unix::fs::symlink(&init, t.path().join("INIT")).unwrap();
        let (private, chain) = split_layers(&[t.path().join("INIT"), l1.clone()]).unwrap();
        assert_eq!(private, [init.canonicalize().unwrap()]);
        assert_eq!(chain, [l1.canonicalize().unwrap()]);
        // containerd's snapshots have no init layer.
        let (private, chain) = split_layers(std::slice::from_ref(&l1)).unwrap();
        assert!(private.is_empty() && chain.len() == 1);
        assert!(split_layers(&[t.path().join("gone")]).is_err());
    }

    #[test]
    fn root_mode_annotation() {
        let a = |v: &str| HashMap::from([(ROOTFS_ANNOTATION.to_string(), v.to_string())]);
        assert_eq!(
            RootMode::from_annotations(&HashMap::new()).unwrap(),
            RootMode::Auto
        );
        assert_eq!(
            RootMode::from_annotations(&a("layers")).unwrap(),
            RootMode::Layers
        );
        assert_eq!(
            RootMode::from_annotations(&a("share")).unwrap(),
            RootMode::Share
        );
        let e = RootMode::from_annotations(&a("block"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("use \"layers\" or \"share\""), "{e}");
        // A transport for the shared root means the shared root.
        let mut ann =
            HashMap::from([(crate::mounts::ROOT_ANNOTATION.to_string(), "9p".to_string())]);
        assert_eq!(RootMode::from_annotations(&ann).unwrap(), RootMode::Share);
        ann.insert(ROOTFS_ANNOTATION.into(), "layers".into());
        assert!(RootMode::from_annotations(&ann).is_err());
    }

    /// Needs root (mounts, ownership) and e2fsprogs.
    #[test]
    fn merged_layers_become_one_cached_image() {
        if !nix::unistd::geteuid().is_root() || ext4_tools_missing() {
            eprintln!("SKIP merged_layers_become_one_cached_image: needs root and e2fsprogs");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let top = t.path().join("top");
        let bottom = t.path().join("bottom");
        std::fs::create_dir_all(bottom.join("etc")).unwrap();
        std::fs::write(bottom.join("etc/os"), "bottom\n").unwrap();
        std::fs::write(bottom.join("etc/gone"), "x").unwrap();
        std::fs::create_dir_all(top.join("etc")).unwrap();
        std::fs::write(top.join("etc/os"), "top\n").unwrap();
        // An overlay whiteout hides the lower file.
        nix::sys::stat::mknod(
            &top.join("etc/gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            0,
        )
        .unwrap();
        let cache = Cache::open(&t.path().join("cache")).unwrap();
        let chain = [top.clone(), bottom.clone()];
        let img = chain_image(&cache, &chain).unwrap();
        let cat = |p: &str| debugfs(&img, &format!("cat {p}"));
        assert_eq!(cat("/etc/os").lines().next(), Some("top"));
        assert!(
            cat("/etc/gone").contains("File not found"),
            "{}",
            cat("/etc/gone")
        );
        // Nothing stays mounted, the second start finds the image.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(t.path().to_str().unwrap()), "{mounts}");
        assert_eq!(chain_image(&cache, &chain).unwrap(), img);
        // A single layer is copied as is.
        let one = chain_image(&cache, std::slice::from_ref(&bottom)).unwrap();
        assert_ne!(one, img);
        assert!(debugfs(&one, "cat /etc/gone").starts_with('x'));
    }

    /// Needs root (mounts).
    #[test]
    fn host_view_refresh_sees_what_another_writer_put_in_the_upper_dir() {
        if !crate::test_support::as_root(
            "host_view_refresh_sees_what_another_writer_put_in_the_upper_dir",
        ) {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let d = |p: &str| {
            let d = t.path().join(p);
            std::fs::create_dir_all(&d).unwrap();
            d
        };
        let (lower, upper, merged) = (d("lower/etc"), d("c/diff"), d("c/merged"));
        d("c/work");
        let lower = lower.parent().unwrap().to_path_buf();
        std::fs::create_dir(lower.join("srv")).unwrap();
        std::fs::write(lower.join("srv/file"), "image").unwrap();
        crate::test_support::mount_overlay(
            &lower,
            merged.parent().unwrap(),
            nix::mount::MsFlags::empty(),
        );
        let view = HostView::find(&merged).unwrap();
        assert_eq!(view.upper, upper);
        // The host looks at /etc while it is only in the image; then the guest (another
        // kernel, here: a direct write) copies it up and adds a file.
        assert!(!merged.join("etc/new").exists());
        std::fs::create_dir(upper.join("etc")).unwrap();
        std::fs::write(upper.join("etc/new"), "x").unwrap();
        let before = view.host_writes();
        assert!(before.is_some());
        view.refresh().unwrap();
        assert!(merged.join("etc/new").exists());
        // A remount remakes the work dir; a copy-up by the host changes it.
        let after = view.host_writes();
        assert_ne!(before, after);
        // The host copies a file of the image up (docker cp into the container).
        std::fs::write(merged.join("srv/file"), "changed").unwrap();
        assert_ne!(view.host_writes(), after);
        nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH).unwrap();
        // Gone: refresh leaves the path alone.
        view.refresh().unwrap();
        assert!(!merged.join("etc").exists());
    }

    /// A racer with no Landlock to stop it (a host thread) swaps the directory that holds
    /// the writable layer and the mount point for a symlink to a complete decoy layer dir,
    /// as fast as it can, while the host refreshes its view: each refresh either mounts the
    /// same layers at the real mount point or refuses with an error; nothing is ever mounted
    /// in the decoy and the decoy's layer is never used. Needs root (mounts).
    #[test]
    fn a_refresh_never_follows_a_swapped_in_symlink() {
        if !crate::test_support::as_root("a_refresh_never_follows_a_swapped_in_symlink") {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let root = t.path().canonicalize().unwrap();
        let d = |p: &str| {
            let d = root.join(p);
            std::fs::create_dir_all(&d).unwrap();
            d
        };
        let (lower, layer, decoy) = (d("lower"), d("overlay2/abc"), d("decoy"));
        for sub in ["diff", "work", "merged"] {
            d(&format!("overlay2/abc/{sub}"));
            d(&format!("decoy/{sub}"));
        }
        std::fs::write(lower.join("image-file"), "image").unwrap();
        std::fs::write(decoy.join("diff/decoy-file"), "decoy").unwrap();
        let merged = layer.join("merged");
        crate::test_support::mount_overlay(&lower, &layer, nix::mount::MsFlags::MS_NOSUID);
        let view = HostView::find(&merged).unwrap();
        assert_eq!(view.attrs, 0x2, "nosuid is kept");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let racer = {
            let (stop, layer) = (stop.clone(), layer.clone());
            let aside = root.join("overlay2/abc.real");
            let decoy = decoy.clone();
            std::thread::spawn(move || {
                let mut swaps = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::fs::rename(&layer, &aside).unwrap();
                    std::os::unix::fs::symlink(&decoy, &layer).unwrap();
                    std::thread::yield_now();
                    std::fs::remove_file(&layer).unwrap();
                    std::fs::rename(&aside, &layer).unwrap();
                    swaps += 1;
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
                swaps
            })
        };
        let (mut ok, mut refused) = (0, 0);
        let mut why = std::collections::BTreeSet::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while std::time::Instant::now() < deadline {
            match view.refresh() {
                Ok(()) => ok += 1,
                Err(e) => {
                    refused += 1;
                    why.insert(e.to_string().replace(&root.display().to_string(), "T"));
                }
            }
            let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            assert!(!mi.contains(&decoy.display().to_string()), "{mi}");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let swaps = racer.join().unwrap();
        view.refresh().unwrap();
        // The same layers, mounted where they were, with the same attributes (mountinfo may
        // show a layer by the path it had while the racer had it renamed).
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let (per_mount, _) = overlay_mount(&mi, &merged).expect("the root is mounted");
        assert!(per_mount.contains("nosuid"), "{per_mount}");
        assert_eq!(
            std::fs::read_to_string(merged.join("image-file")).unwrap(),
            "image"
        );
        assert!(!merged.join("decoy-file").exists(), "{why:?}");
        std::fs::write(merged.join("written"), "w").unwrap();
        assert!(layer.join("diff/written").exists());
        nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH).unwrap();
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mi.contains(&root.display().to_string()),
            "a mount is left: {mi}"
        );
        assert!(
            swaps > 100 && ok > 3,
            "{swaps} swaps, {ok} refreshes, {refused} refused"
        );
        eprintln!("{swaps} swaps, {ok} refreshes, {refused} refused: {why:?}");
    }

    fn ext4_tools_missing() -> bool {
        ["mkfs.ext4", "debugfs"].iter().any(|t| {
            !["/usr/sbin", "/sbin", "/usr/bin"]
                .iter()
                .any(|d| Path::new(d).join(t).exists())
        })
    }

    fn debugfs(img: &Path, req: &str) -> String {
        let out = Command::new("debugfs")
            .arg("-R")
            .arg(req)
            .arg(img)
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}
