//! Reading one layer stream (gzip, zstd or plain tar) and applying it to a [`Tree`].
//!
//! Nothing here touches the host file system except the private blob spool: names are
//! resolved in the model, links are recorded, devices are metadata.

use std::cell::{Cell, RefCell};
use std::io::{self, BufRead, BufReader, Read};
use std::rc::Rc;

use tar::EntryType;

use crate::blobs::BlobStore;
use crate::digest::{self, HashingReader};
use crate::error::{Error, Result};
use crate::limits;
use crate::progress::Progress;
use crate::tree::{normalize, Kind, Meta, Tree, ROOT};

/// Running totals across the layers of one build.
#[derive(Debug, Default, Clone)]
pub struct Totals {
    /// Uncompressed stream bytes read so far.
    pub stream_bytes: u64,
    /// File content bytes spooled so far (sparse files count expanded).
    pub content_bytes: u64,
    /// Tar entries seen so far.
    pub entries: u64,
}

/// What one layer contained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerStats {
    /// sha256 of the uncompressed stream.
    pub diff_id: String,
    /// Uncompressed size.
    pub uncompressed: u64,
    /// Entries applied.
    pub entries: u64,
    /// Detected compression.
    pub compression: Compression,
}

/// Compression of a layer stream, detected from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip (possibly multi-member).
    Gzip,
    /// zstd.
    Zstd,
}

/// Detects the compression of a stream from its magic bytes.
pub fn detect(head: &[u8]) -> Result<Compression> {
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Compression::Gzip)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Compression::Zstd)
    } else if head.starts_with(b"BZh") {
        Err(Error::UnsupportedCompression("bzip2"))
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Err(Error::UnsupportedCompression("xz"))
    } else {
        Ok(Compression::None)
    }
}

/// Counts compressed bytes and reports progress.
struct Counted<'p, R> {
    inner: R,
    count: Rc<Cell<u64>>,
    progress: &'p dyn Progress,
    reported: u64,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let c = self.count.get() + n as u64;
        self.count.set(c);
        if c - self.reported >= 1 << 20 || n == 0 {
            self.reported = c;
            self.progress.layer_progress(c);
        }
        Ok(n)
    }
}

impl<R: BufRead> BufRead for Counted<'_, R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.inner.fill_buf()
    }
    fn consume(&mut self, amt: usize) {
        let c = self.count.get() + amt as u64;
        self.count.set(c);
        if c - self.reported >= 1 << 20 {
            self.reported = c;
            self.progress.layer_progress(c);
        }
        self.inner.consume(amt);
    }
}

/// Enforces the total-size and decompression-ratio limits on the uncompressed stream.
/// A violation is parked in `failure` (the tar crate only passes `io::Error` through).
struct Guarded<R> {
    inner: R,
    compressed: Option<Rc<Cell<u64>>>,
    read: u64,
    total_before: u64,
    max_total: u64,
    max_ratio: u64,
    ratio_floor: u64,
    failure: Rc<RefCell<Option<Error>>>,
}

impl<R: Read> Read for Guarded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        let total = self.total_before + self.read;
        let err = if total > self.max_total {
            Some(Error::Limit {
                what: "total uncompressed image size",
                value: total,
                limit: self.max_total,
                knob: "--max-size / Limits::max_total_size",
            })
        } else {
            match &self.compressed {
                Some(c)
                    if self.read > self.ratio_floor
                        && self.read / c.get().max(1) > self.max_ratio =>
                {
                    Some(Error::Limit {
                        what: "decompression ratio",
                        value: self.read / c.get().max(1),
                        limit: self.max_ratio,
                        knob: "Limits::max_ratio",
                    })
                }
                _ => None,
            }
        };
        if let Some(e) = err {
            *self.failure.borrow_mut() = Some(e);
            return Err(io::Error::other("build limit exceeded"));
        }
        Ok(n)
    }
}

/// Applies one layer stream to `tree`, spooling file content into `blobs`. When
/// `expected_diff_id` is given, the sha256 of the uncompressed stream must match it.
pub fn apply_layer<R: Read>(
    tree: &mut Tree,
    blobs: &mut BlobStore,
    reader: R,
    expected_diff_id: Option<&str>,
    totals: &mut Totals,
    progress: &dyn Progress,
) -> Result<LayerStats> {
    let compressed = Rc::new(Cell::new(0u64));
    let mut buffered = Counted {
        inner: BufReader::with_capacity(64 << 10, reader),
        count: compressed.clone(),
        progress,
        reported: 0,
    };
    let head = buffered.fill_buf().map_err(Error::CorruptStream)?;
    let compression = detect(head)?;
    let decoded: Box<dyn Read + '_> = match compression {
        Compression::None => Box::new(buffered),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
        Compression::Zstd => {
            let mut d =
                zstd::stream::read::Decoder::with_buffer(buffered).map_err(Error::CorruptStream)?;
            // Bounds decoder memory to a 128 MiB window.
            d.window_log_max(27).map_err(Error::CorruptStream)?;
            Box::new(d)
        }
    };
    let limits = tree.limits().clone();
    let failure = Rc::new(RefCell::new(None));
    let guarded = Guarded {
        inner: decoded,
        compressed: (compression != Compression::None).then_some(compressed),
        read: 0,
        total_before: totals.stream_bytes,
        max_total: limits.max_total_size,
        max_ratio: limits.max_ratio,
        ratio_floor: limits.ratio_floor,
        failure: failure.clone(),
    };
    let mut hashing = HashingReader::new(guarded);
    let io_err = |e: io::Error| -> Error {
        failure
            .borrow_mut()
            .take()
            .unwrap_or(Error::CorruptStream(e))
    };

    tree.begin_layer();
    let mut entries_here = 0u64;
    {
        let mut archive = tar::Archive::new(&mut hashing);
        for entry in archive.entries().map_err(io_err)? {
            let mut entry = entry.map_err(io_err)?;
            totals.entries += 1;
            entries_here += 1;
            limits::ensure(
                "number of entries",
                totals.entries,
                limits.max_entries,
                "Limits::max_entries",
            )?;
            apply_entry(tree, blobs, &mut entry, totals).map_err(|e| match e {
                Error::CorruptStream(io) => io_err(io),
                other => other,
            })?;
            tree.reclaim(blobs);
        }
    }
    let (diff_id, uncompressed) = hashing.finish().map_err(io_err)?;
    totals.stream_bytes += uncompressed;
    if let Some(expected) = expected_diff_id {
        digest::verify("layer diff_id (uncompressed content)", expected, &diff_id)?;
    }
    Ok(LayerStats {
        diff_id,
        uncompressed,
        entries: entries_here,
        compression,
    })
}

const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";
const AUFS_META: &[u8] = b".wh..wh.";

fn apply_entry<R: Read>(
    tree: &mut Tree,
    blobs: &mut BlobStore,
    entry: &mut tar::Entry<'_, R>,
    totals: &mut Totals,
) -> Result<()> {
    let raw = entry.path_bytes().into_owned();
    let header = entry.header().clone();
    let etype = header.entry_type();
    if etype == EntryType::XGlobalHeader {
        return Ok(());
    }
    let limits = tree.limits().clone();
    let comps = normalize(&raw, &limits)?;
    let meta = entry_meta(&raw, entry, &header, &limits)?;

    if comps[..comps.len().saturating_sub(1)]
        .iter()
        .any(|c| c.starts_with(WHITEOUT))
    {
        return Err(Error::invalid(
            &raw,
            "a whiteout name is used as a directory",
        ));
    }
    if let Some(last) = comps.last() {
        if last.as_slice() == OPAQUE {
            let dir = tree.parent_dir(&raw, &comps)?;
            tree.opaque(dir);
            return Ok(());
        }
        if last.starts_with(AUFS_META) {
            // aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs): never part of the image.
            return Ok(());
        }
        if let Some(target) = last.strip_prefix(WHITEOUT) {
            if target.is_empty() || target == b"." || target == b".." {
                return Err(Error::invalid(&raw, "whiteout names no file"));
            }
            let dir = tree.parent_dir(&raw, &comps)?;
            tree.whiteout(dir, target);
            return Ok(());
        }
    }

    let Some(name) = comps.last().cloned() else {
        // `.`, `/`, `./`: the image root itself.
        if etype != EntryType::Directory {
            return Err(Error::invalid(
                &raw,
                "the image root may only be a directory",
            ));
        }
        tree.node_mut(ROOT).meta = meta;
        return Ok(());
    };

    match etype {
        EntryType::Directory => {
            let parent = tree.parent_dir(&raw, &comps)?;
            let existing = tree
                .children(parent)
                .find(|(n, _)| **n == name)
                .map(|(_, c)| c.node);
            match existing {
                Some(id) if matches!(tree.node(id).kind, Kind::Dir(_)) => {
                    tree.node_mut(id).meta = meta;
                    // Re-link to mark the entry as written by this layer.
                    tree.touch(parent, &name);
                }
                _ => {
                    let id = tree.alloc(Kind::Dir(Default::default()), meta);
                    tree.link(parent, name, id)?;
                }
            }
        }
        EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
            let parent = tree.parent_dir(&raw, &comps)?;
            let remaining = limits.max_total_size.saturating_sub(totals.content_bytes);
            let declared = entry.size();
            limits::ensure(
                "total file content size",
                totals.content_bytes.saturating_add(declared),
                limits.max_total_size,
                "--max-size / Limits::max_total_size",
            )?;
            let (blob, size) = if declared == 0 && etype != EntryType::GNUSparse {
                (None, 0)
            } else {
                let (id, mut file) = blobs.create_blob()?;
                let n = io::copy(&mut (&mut *entry).take(remaining + 1), &mut file).map_err(
                    |e| match e.kind() {
                        io::ErrorKind::Other
                        | io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::InvalidData => Error::CorruptStream(e),
                        _ => Error::io(
                            format!("spool file content into {}", blobs.path().display()),
                            e,
                        ),
                    },
                )?;
                limits::ensure(
                    "total file content size",
                    totals.content_bytes + n,
                    limits.max_total_size,
                    "--max-size / Limits::max_total_size",
                )?;
                if etype != EntryType::GNUSparse && n != declared {
                    return Err(Error::CorruptStream(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "entry {:?} is truncated ({n} of {declared} bytes)",
                            String::from_utf8_lossy(&raw)
                        ),
                    )));
                }
                totals.content_bytes += n;
                (Some(id), n)
            };
            let id = tree.alloc(Kind::File { blob, size }, meta);
            tree.link(parent, name, id)?;
        }
        EntryType::Symlink => {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| Error::invalid(&raw, "symlink without a target"))?
                .into_owned();
            if target.is_empty() || target.len() > limits.max_path_len || target.contains(&0) {
                return Err(Error::invalid(
                    &raw,
                    "symlink target is empty, too long or has a NUL",
                ));
            }
            let parent = tree.parent_dir(&raw, &comps)?;
            let id = tree.alloc(Kind::Symlink(target), meta);
            tree.link(parent, name, id)?;
        }
        EntryType::Link => {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| Error::invalid(&raw, "hardlink without a target"))?
                .into_owned();
            if target.len() > limits.max_path_len || target.contains(&0) {
                return Err(Error::invalid(
                    &raw,
                    "hardlink target is too long or has a NUL",
                ));
            }
            let node = tree.find_nofollow(&target)?.ok_or_else(|| {
                Error::invalid(
                    &raw,
                    format!(
                        "hardlink target {:?} is not in the image",
                        String::from_utf8_lossy(&target)
                    ),
                )
            })?;
            if matches!(tree.node(node).kind, Kind::Dir(_)) {
                return Err(Error::invalid(&raw, "hardlink to a directory"));
            }
            let parent = tree.parent_dir(&raw, &comps)?;
            tree.link(parent, name, node)?;
        }
        EntryType::Char | EntryType::Block => {
            let bad = |_| Error::invalid(&raw, "device numbers are malformed or out of range");
            let major = header.device_major().map_err(bad)?.unwrap_or(0);
            let minor = header.device_minor().map_err(bad)?.unwrap_or(0);
            // Linux dev_t: 12-bit major, 20-bit minor.
            if major > 0xfff || minor > 0xf_ffff {
                return Err(Error::invalid(&raw, "device numbers out of range"));
            }
            let kind = if etype == EntryType::Char {
                Kind::CharDev { major, minor }
            } else {
                Kind::BlockDev { major, minor }
            };
            let parent = tree.parent_dir(&raw, &comps)?;
            let id = tree.alloc(kind, meta);
            tree.link(parent, name, id)?;
        }
        EntryType::Fifo => {
            let parent = tree.parent_dir(&raw, &comps)?;
            let id = tree.alloc(Kind::Fifo, meta);
            tree.link(parent, name, id)?;
        }
        other => {
            return Err(Error::invalid(
                &raw,
                format!("unsupported tar entry type {:?}", other.as_byte() as char),
            ))
        }
    }
    Ok(())
}

/// Metadata of an entry: permission bits, owner (PAX-aware via the tar crate), mtime
/// (PAX-aware here) and extended attributes from `SCHILY.xattr.*` records.
fn entry_meta<R: Read>(
    raw: &[u8],
    entry: &mut tar::Entry<'_, R>,
    header: &tar::Header,
    limits: &crate::limits::Limits,
) -> Result<Meta> {
    let bad = |what: &str| Error::invalid(raw, format!("malformed {what} field"));
    // Like Go's archive/tar, an empty (all NUL or space) numeric field reads as 0.
    let old = header.as_old();
    let num = |r: io::Result<u64>, field: &[u8], what: &str| -> Result<u64> {
        match r {
            Ok(v) => Ok(v),
            Err(_) if field.iter().all(|b| *b == 0 || *b == b' ') => Ok(0),
            Err(_) => Err(bad(what)),
        }
    };
    let mode = num(header.mode().map(u64::from), &old.mode, "mode")? as u32 & 0o7777;
    let uid = u32::try_from(num(header.uid(), &old.uid, "uid")?)
        .map_err(|_| Error::invalid(raw, "uid does not fit in 32 bits"))?;
    let gid = u32::try_from(num(header.gid(), &old.gid, "gid")?)
        .map_err(|_| Error::invalid(raw, "gid does not fit in 32 bits"))?;
    let mtime = num(header.mtime(), &old.mtime, "mtime")?;
    let mut mtime = i64::try_from(mtime).unwrap_or(i64::MAX);
    let mut xattrs = std::collections::BTreeMap::new();
    if let Some(exts) = entry.pax_extensions().map_err(Error::CorruptStream)? {
        for ext in exts {
            let ext = ext.map_err(Error::CorruptStream)?;
            let key = ext.key_bytes();
            if key == b"mtime" {
                let v = String::from_utf8_lossy(ext.value_bytes()).into_owned();
                let secs = v.split('.').next().unwrap_or("");
                mtime = secs.parse().map_err(|_| bad("PAX mtime"))?;
            } else if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                if !keep_xattr(name) {
                    continue;
                }
                let value = ext.value_bytes();
                if value.len() > limits.max_xattr_value || name.len() > 255 {
                    return Err(Error::Limit {
                        what: "extended attribute size",
                        value: value.len().max(name.len()) as u64,
                        limit: limits.max_xattr_value as u64,
                        knob: "Limits::max_xattr_value",
                    });
                }
                xattrs.insert(name.to_vec(), value.to_vec());
                limits::ensure(
                    "extended attributes on one entry",
                    xattrs.len() as u64,
                    limits.max_xattrs as u64,
                    "Limits::max_xattrs",
                )?;
            }
        }
    }
    Ok(Meta {
        mode,
        uid,
        gid,
        mtime,
        xattrs,
    })
}

/// Which extended attributes enter the image: the Linux namespaces, minus overlayfs's
/// private ones (they would change how the guest's overlay reads the rootfs).
fn keep_xattr(name: &[u8]) -> bool {
    if name.starts_with(b"trusted.overlay.") {
        return false;
    }
    [&b"user."[..], b"trusted.", b"security.", b"system."]
        .iter()
        .any(|ns| name.starts_with(ns) && name.len() > ns.len())
}

#[cfg(test)]
#[path = "layer_tests.rs"]
mod tests;
