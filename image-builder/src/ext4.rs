//! Turning a [`Tree`] into an ext4 image.
//!
//! 1. The model is materialised into a private staging directory with fd-relative calls
//!    only (`mkdirat`, `openat(O_NOFOLLOW)`, `symlinkat`, `linkat`, `renameat`), on
//!    directories this process created. No image-supplied symlink is ever followed on the
//!    host and nothing is `mknod`ed there: device nodes and FIFOs are placeholders.
//! 2. `mkfs.ext4 -d` copies the staging tree into a sparse image file.
//! 3. `debugfs -w` applies what a host directory should not hold: device nodes, FIFOs,
//!    extended attributes (never set on the host, where an LSM would interpret them),
//!    the root directory's metadata, and ownership when not running as root.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::fcntl::{renameat, AtFlags, OFlag};
use nix::sys::stat::{fchmod, futimens, mkdirat, utimensat, Mode, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, linkat, symlinkat, Gid, Uid};

use crate::blobs::BlobStore;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::tree::{Kind, Meta, NodeId, Tree, ROOT};

const BLOCK: u64 = 4096;
const INODE_SIZE: u64 = 256;

/// How to make the file system.
#[derive(Debug, Clone, Default)]
pub struct Ext4Options {
    /// Image size in bytes; computed from the content when `None`.
    pub size: Option<u64>,
    /// File system UUID (`mkfs.ext4 -U`); random when `None`.
    pub uuid: Option<String>,
}

/// What was built.
#[derive(Debug, Clone)]
pub struct Ext4Stats {
    /// Apparent size of the image file.
    pub size: u64,
    /// Inodes in use (files, directories, links counted once).
    pub inodes: u64,
}

/// Estimates the ext4 size needed for `tree`: content blocks, directory and symlink
/// blocks, inode tables, plus headroom for metadata. The file is sparse, so headroom
/// costs no host disk.
pub fn estimate(tree: &Tree) -> (u64, u64) {
    let mut blocks = 0u64;
    let mut inodes = 0u64;
    let mut seen = std::collections::HashSet::new();
    let mut work = vec![ROOT];
    while let Some(id) = work.pop() {
        if !seen.insert(id) {
            continue;
        }
        inodes += 1;
        let node = tree.node(id);
        if !node.meta.xattrs.is_empty() {
            blocks += 1;
        }
        match &node.kind {
            Kind::Dir(children) => {
                let bytes: u64 = children.keys().map(|n| 12 + n.len() as u64).sum();
                blocks += 1 + bytes / BLOCK;
                work.extend(children.values().map(|c| c.node));
            }
            Kind::File { size, .. } => {
                let b = size.div_ceil(BLOCK);
                // Extent tree blocks for very fragmented or large files.
                blocks += b + b / 1024;
            }
            Kind::Symlink(t) if t.len() >= 60 => blocks += 1,
            _ => {}
        }
    }
    let inodes = inodes + inodes / 10 + 256;
    let raw = blocks * BLOCK + inodes * INODE_SIZE;
    let size = raw + raw / 5 + (32 << 20);
    (size.div_ceil(1 << 20) * (1 << 20), inodes)
}

/// Builds an ext4 image of `tree` at `out` (which must not exist), using `work` (a private
/// directory) for staging. Consumes the spooled file content in `blobs`.
pub fn build(
    tree: &Tree,
    blobs: &BlobStore,
    work: &Path,
    out: &Path,
    opts: &Ext4Options,
) -> Result<Ext4Stats> {
    let mkfs = find_tool("mkfs.ext4")?;
    let debugfs = find_tool("debugfs")?;
    let staging = work.join("rootfs");
    let mut fixups = stage(tree, blobs, &staging, work)?;

    let (auto_size, inodes) = estimate(tree);
    let size = mkfs_from_dir(
        &mkfs,
        &staging,
        out,
        opts,
        (auto_size, inodes),
        "0:0",
        &|_| {},
    )?;

    if !tree
        .children(ROOT)
        .any(|(n, _)| n.as_slice() == b"lost+found")
    {
        fixups.cmds.insert(0, "rmdir /lost+found".to_owned());
    }
    let root = &tree.node(ROOT).meta;
    fixups.meta(b"/", 0o040000, root, true);
    debugfs_script(&debugfs, &work.join("debugfs.cmds"), &fixups.cmds, out)?;
    Ok(Ext4Stats { size, inodes })
}

/// Runs `mkfs.ext4 -d src` into a fresh sparse file `out` of `size` bytes (grown by half, up
/// to three times, when the content does not fit and the size was not given). Returns the
/// final size.
fn mkfs_from_dir(
    mkfs: &Path,
    src: &Path,
    out: &Path,
    opts: &Ext4Options,
    (auto_size, inodes): (u64, u64),
    root_owner: &str,
    prepare: &dyn Fn(&mut Command),
) -> Result<u64> {
    let mut size = opts.size.unwrap_or(auto_size);
    let mut attempt = 0;
    loop {
        let _ = std::fs::remove_file(out);
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(out)
            .map_err(|e| Error::io(format!("create {}", out.display()), e))?;
        file.set_len(size)
            .map_err(|e| Error::io(format!("size {}", out.display()), e))?;
        drop(file);
        let mut cmd = Command::new(mkfs);
        cmd.args([
            "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0",
        ])
        // The disk is attached read-only: a journal would only cost space.
        .args(["-O", "^has_journal"])
        .arg("-E")
        .arg(format!("root_owner={root_owner},nodiscard"))
        .args(["-L", "agentvm-root"])
        .arg("-N")
        .arg(inodes.to_string())
        .arg("-d")
        .arg(src);
        if let Some(uuid) = &opts.uuid {
            cmd.arg("-U").arg(uuid);
        }
        cmd.arg(out).env("MKE2FS_SYNC", "0");
        prepare(&mut cmd);
        match run(cmd, "mkfs.ext4") {
            Ok(_) => return Ok(size),
            Err(Error::Tool { stderr, .. })
                if opts.size.is_none()
                    && attempt < 3
                    && (stderr.contains("Could not allocate")
                        || stderr.contains("No space left")
                        || stderr.contains("Not enough space")) =>
            {
                attempt += 1;
                size += size / 2;
            }
            Err(Error::Tool { stderr, status, .. }) if opts.size.is_some() => {
                return Err(Error::Tool {
                    tool: "mkfs.ext4",
                    status,
                    stderr: format!("{stderr} (is --size {size} big enough for the image?)"),
                })
            }
            Err(e) => return Err(e),
        }
    }
}

/// Estimates the ext4 size and inode count for the host directory tree at `src`, like
/// [`estimate`] does for a [`Tree`]: symlinks are not followed, hard links count once.
pub fn estimate_dir(src: &Path) -> Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut blocks = 0u64;
    let mut inodes = 0u64;
    let mut linked = std::collections::HashSet::new();
    let mut work = vec![src.to_path_buf()];
    while let Some(dir) = work.pop() {
        inodes += 1;
        let mut names = 0u64;
        let entries =
            std::fs::read_dir(&dir).map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
        for e in entries {
            let e = e.map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
            names += 12 + e.file_name().len() as u64;
            let m = e
                .metadata()
                .map_err(|err| Error::io(format!("stat {}", e.path().display()), err))?;
            if m.is_dir() {
                work.push(e.path());
                continue;
            }
            if m.nlink() > 1 && !linked.insert((m.dev(), m.ino())) {
                continue;
            }
            inodes += 1;
            if m.is_file() {
                let b = m.len().div_ceil(BLOCK);
                blocks += b + b / 1024;
            } else if m.file_type().is_symlink() && m.len() >= 60 {
                blocks += 1;
            }
        }
        blocks += 1 + names / BLOCK;
    }
    // Extended attributes (file capabilities, ACLs) may take a block per inode.
    blocks += inodes / 16;
    let inodes = inodes + inodes / 10 + 256;
    let raw = blocks * BLOCK + inodes * INODE_SIZE;
    let size = raw + raw / 5 + (32 << 20);
    Ok((size.div_ceil(1 << 20) * (1 << 20), inodes))
}

/// A host directory tree to copy into ext4 with [`build_dir_image`].
#[derive(Debug, Clone)]
pub struct DirImage<'a> {
    /// The directory `mkfs.ext4 -d` copies. It may exist only where mkfs runs (a mount in
    /// mkfs's own mount namespace, made by the `prepare` hook).
    pub src: &'a Path,
    /// The directory whose owner, mode and mtime the image's root gets.
    pub root: &'a Path,
    /// Whether the tree has a `/lost+found` of its own (mkfs's is removed otherwise).
    pub lost_found: bool,
    /// Size and inode count, e.g. from [`estimate_dir`].
    pub estimate: (u64, u64),
}

/// Builds an ext4 image at `out` (which must not exist) holding a copy of the host
/// directory `src`, as `mkfs.ext4 -d` copies it: ownership, modes, times, device nodes,
/// FIFOs, hard links, symlinks (never followed) and extended attributes. For trusted trees
/// (a container engine's unpacked image layers); untrusted layers go through [`build`].
pub fn build_from_dir(src: &Path, out: &Path, opts: &Ext4Options) -> Result<Ext4Stats> {
    let image = DirImage {
        src,
        root: src,
        lost_found: std::fs::symlink_metadata(src.join("lost+found")).is_ok(),
        estimate: estimate_dir(src)?,
    };
    build_dir_image(&image, out, opts, &|_| {})
}

/// [`build_from_dir`] with everything explicit; `prepare` adjusts the mkfs command before
/// it runs (e.g. a `pre_exec` that mounts `src` in a mount namespace of mkfs's own).
pub fn build_dir_image(
    image: &DirImage<'_>,
    out: &Path,
    opts: &Ext4Options,
    prepare: &dyn Fn(&mut Command),
) -> Result<Ext4Stats> {
    use std::os::unix::fs::MetadataExt;
    let mkfs = find_tool("mkfs.ext4")?;
    let debugfs = find_tool("debugfs")?;
    let root = std::fs::metadata(image.root)
        .map_err(|e| Error::io(format!("stat {}", image.root.display()), e))?;
    let (_, inodes) = image.estimate;
    let owner = format!("{}:{}", root.uid(), root.gid());
    let size = mkfs_from_dir(&mkfs, image.src, out, opts, image.estimate, &owner, prepare)?;
    // mkfs makes /lost+found and gives the root its own mode and times; the copy should
    // match the source.
    let mut cmds = Vec::new();
    if !image.lost_found {
        cmds.push("rmdir /lost+found".to_owned());
    }
    cmds.push(format!(
        "sif / mode 0{:o}",
        0o040000 | (root.mode() & 0o7777)
    ));
    for field in ["mtime", "atime", "ctime"] {
        cmds.push(format!("sif / {field} @{}", root.mtime()));
    }
    let script = out.with_extension("debugfs");
    let result = debugfs_script(&debugfs, &script, &cmds, out);
    let _ = std::fs::remove_file(&script);
    result?;
    Ok(Ext4Stats { size, inodes })
}

/// Writes `cmds` to `script` and runs them with `debugfs -w` on `image`.
fn debugfs_script(debugfs: &Path, script: &Path, cmds: &[String], image: &Path) -> Result<()> {
    std::fs::write(script, cmds.join("\n") + "\n")
        .map_err(|e| Error::io(format!("write {}", script.display()), e))?;
    let mut cmd = Command::new(debugfs);
    cmd.arg("-w").arg("-f").arg(script).arg(image);
    let output = run(cmd, "debugfs")?;
    // debugfs exits 0 even when a command fails; its diagnostics go to stderr.
    let errors: Vec<&str> = output
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("debugfs "))
        .collect();
    if !errors.is_empty() {
        return Err(Error::Tool {
            tool: "debugfs",
            status: "command errors".into(),
            stderr: errors.join("; "),
        });
    }
    Ok(())
}

/// Commands for debugfs, built while staging.
#[derive(Debug, Default)]
struct Fixups {
    cmds: Vec<String>,
    xattr_files: u64,
    work: PathBuf,
    as_root: bool,
}

impl Fixups {
    /// Sets mode/owner/mtime of `path` (always for special files, else only when the
    /// staging copy could not carry them).
    fn meta(&mut self, path: &[u8], type_bits: u32, meta: &Meta, always: bool) {
        let p = quote(path);
        if always || !self.as_root {
            self.cmds
                .push(format!("sif {p} mode 0{:o}", type_bits | meta.mode));
            self.cmds.push(format!("sif {p} uid {}", meta.uid));
            self.cmds.push(format!("sif {p} gid {}", meta.gid));
            self.cmds.push(format!("sif {p} mtime @{}", meta.mtime));
        }
    }

    fn xattrs(&mut self, path: &[u8], meta: &Meta) -> Result<()> {
        for (name, value) in &meta.xattrs {
            let file = self.work.join(format!("xattr.{}", self.xattr_files));
            self.xattr_files += 1;
            std::fs::write(&file, value)
                .map_err(|e| Error::io(format!("write {}", file.display()), e))?;
            let mut cmd = String::new();
            let _ = write!(
                cmd,
                "ea_set -f {} {} {}",
                quote(file.as_os_str().as_bytes()),
                quote(path),
                quote(name)
            );
            self.cmds.push(cmd);
        }
        Ok(())
    }
}

/// Quotes an argument for debugfs's command parser (libss): wrap in double quotes and
/// double any inner quote. Newlines cannot be expressed, so names holding one are
/// rejected before they get here.
fn quote(arg: &[u8]) -> String {
    let s = String::from_utf8_lossy(arg);
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn debugfs_safe(path: &[u8]) -> Result<()> {
    if path.contains(&b'\n') || path.contains(&b'\r') || std::str::from_utf8(path).is_err() {
        return Err(Error::invalid(
            path,
            "a device node, FIFO or xattr-bearing file has a name with a newline or invalid \
             UTF-8, which this builder cannot write into ext4",
        ));
    }
    Ok(())
}

enum Step {
    Enter(NodeId, Vec<u8>, OwnedFd),
    Leave(NodeId, OwnedFd),
}

/// Materialises `tree` below `staging` (created here, 0700). Returns debugfs fix-ups.
fn stage(tree: &Tree, blobs: &BlobStore, staging: &Path, work: &Path) -> Result<Fixups> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(staging)
        .map_err(|e| Error::io(format!("create staging {}", staging.display()), e))?;
    let root_fd = fsutil::open_dir(staging)?;
    let mut fixups = Fixups {
        work: work.to_owned(),
        as_root: nix::unistd::geteuid().is_root(),
        ..Fixups::default()
    };
    fixups.xattrs(b"/", &tree.node(ROOT).meta)?;
    // First staged path of every multiply-linked node, relative to the staging root.
    let mut first_name: HashMap<NodeId, Vec<u8>> = HashMap::new();
    let mut work_stack = vec![Step::Enter(ROOT, Vec::new(), fsutil::open_dir(staging)?)];
    while let Some(step) = work_stack.pop() {
        let (dir, prefix, dir_fd) = match step {
            Step::Leave(id, fd) => {
                apply_meta_fd(&fd, &tree.node(id).meta, fixups.as_root)?;
                continue;
            }
            Step::Enter(id, prefix, fd) => (id, prefix, fd),
        };
        let mut subdirs = Vec::new();
        for (name, child) in tree.children(dir) {
            let rel = if prefix.is_empty() {
                name.clone()
            } else {
                [&prefix[..], b"/", name].concat()
            };
            let abs = [&b"/"[..], &rel].concat();
            let node = tree.node(child.node);
            let meta = &node.meta;
            let cname = OsStr::from_bytes(name);
            if !matches!(node.kind, Kind::Dir(_)) && node.nlink > 1 {
                if let Some(first) = first_name.get(&child.node) {
                    if !matches!(
                        node.kind,
                        Kind::CharDev { .. } | Kind::BlockDev { .. } | Kind::Fifo
                    ) {
                        linkat(
                            Some(root_fd.as_raw_fd()),
                            OsStr::from_bytes(first),
                            Some(dir_fd.as_raw_fd()),
                            cname,
                            AtFlags::empty(),
                        )
                        .map_err(|e| Error::nix(format!("stage hardlink {}", show(&abs)), e))?;
                        continue;
                    }
                } else {
                    first_name.insert(child.node, rel.clone());
                }
            }
            match &node.kind {
                Kind::Dir(_) => {
                    mkdirat(
                        Some(dir_fd.as_raw_fd()),
                        cname,
                        Mode::from_bits_truncate(0o700),
                    )
                    .map_err(|e| Error::nix(format!("stage directory {}", show(&abs)), e))?;
                    let fd = fsutil::open_subdir(&dir_fd, name)?;
                    fixups.xattrs(&abs, meta)?;
                    if !meta.xattrs.is_empty() {
                        debugfs_safe(&abs)?;
                    }
                    fixups.meta(&abs, 0o040000, meta, false);
                    subdirs.push((child.node, rel, fd));
                }
                Kind::File { blob, .. } => {
                    if let Some(b) = blob {
                        renameat(
                            Some(blobs.dir().as_raw_fd()),
                            OsStr::from_bytes(&BlobStore::name(*b)),
                            Some(dir_fd.as_raw_fd()),
                            cname,
                        )
                        .map_err(|e| Error::nix(format!("stage file {}", show(&abs)), e))?;
                    }
                    let fd = fsutil::open_at(
                        &dir_fd,
                        name,
                        if blob.is_some() {
                            OFlag::O_RDONLY
                        } else {
                            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY
                        },
                        0o600,
                    )?;
                    apply_meta_fd(&fd, meta, fixups.as_root)?;
                    if !meta.xattrs.is_empty() {
                        debugfs_safe(&abs)?;
                    }
                    fixups.xattrs(&abs, meta)?;
                    fixups.meta(&abs, 0o100000, meta, false);
                }
                Kind::Symlink(target) => {
                    symlinkat(OsStr::from_bytes(target), Some(dir_fd.as_raw_fd()), cname)
                        .map_err(|e| Error::nix(format!("stage symlink {}", show(&abs)), e))?;
                    if fixups.as_root {
                        fchownat(
                            Some(dir_fd.as_raw_fd()),
                            cname,
                            Some(Uid::from_raw(meta.uid)),
                            Some(Gid::from_raw(meta.gid)),
                            AtFlags::AT_SYMLINK_NOFOLLOW,
                        )
                        .map_err(|e| Error::nix(format!("chown symlink {}", show(&abs)), e))?;
                    }
                    let t = TimeSpec::new(meta.mtime, 0);
                    utimensat(
                        Some(dir_fd.as_raw_fd()),
                        cname,
                        &t,
                        &t,
                        UtimensatFlags::NoFollowSymlink,
                    )
                    .map_err(|e| Error::nix(format!("set times of symlink {}", show(&abs)), e))?;
                    if !meta.xattrs.is_empty() {
                        debugfs_safe(&abs)?;
                    }
                    fixups.xattrs(&abs, meta)?;
                    // Symlink permission bits are meaningless; owner only.
                    if !fixups.as_root {
                        let p = quote(&abs);
                        fixups.cmds.push(format!("sif {p} uid {}", meta.uid));
                        fixups.cmds.push(format!("sif {p} gid {}", meta.gid));
                    }
                }
                Kind::CharDev { .. } | Kind::BlockDev { .. } | Kind::Fifo => {
                    debugfs_safe(&abs)?;
                    // A placeholder keeps the directory entry order; debugfs swaps it.
                    drop(fsutil::open_at(
                        &dir_fd,
                        name,
                        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY,
                        0o600,
                    )?);
                    let (spec, bits) = match node.kind {
                        Kind::CharDev { major, minor } => (format!("c {major} {minor}"), 0o020000),
                        Kind::BlockDev { major, minor } => (format!("b {major} {minor}"), 0o060000),
                        _ => ("p".to_owned(), 0o010000),
                    };
                    let parent = if prefix.is_empty() {
                        b"/".to_vec()
                    } else {
                        [&b"/"[..], &prefix].concat()
                    };
                    fixups.cmds.push(format!("rm {}", quote(&abs)));
                    fixups.cmds.push(format!("cd {}", quote(&parent)));
                    // debugfs mknod links the name into the cwd verbatim (no path walk).
                    fixups.cmds.push(format!("mknod {} {spec}", quote(name)));
                    fixups.cmds.push("cd /".to_owned());
                    fixups.meta(&abs, bits, meta, true);
                    fixups.xattrs(&abs, meta)?;
                }
            }
        }
        work_stack.push(Step::Leave(dir, dir_fd));
        for (id, rel, fd) in subdirs.into_iter().rev() {
            work_stack.push(Step::Enter(id, rel, fd));
        }
    }
    // The root's own metadata goes through debugfs (mkfs -d does not copy it).
    Ok(fixups)
}

/// Owner, permissions and mtime through a descriptor (no path lookup). Ownership first:
/// chown clears setuid/setgid.
fn apply_meta_fd(fd: &OwnedFd, meta: &Meta, as_root: bool) -> Result<()> {
    if as_root {
        fchown(
            fd.as_raw_fd(),
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
        )
        .map_err(|e| Error::nix("chown staged file", e))?;
    }
    fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(meta.mode))
        .map_err(|e| Error::nix("chmod staged file", e))?;
    let t = TimeSpec::new(meta.mtime, 0);
    futimens(fd.as_raw_fd(), &t, &t).map_err(|e| Error::nix("set times of staged file", e))?;
    Ok(())
}

fn show(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// Finds a tool on PATH or in the sbin directories (often not on a user's PATH).
pub(crate) fn find_tool(name: &'static str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(Error::ToolMissing { tool: name })
}

/// Runs a tool, returning its stderr; fails on a non-zero exit.
fn run(mut cmd: Command, tool: &'static str) -> Result<String> {
    crate::fsutil::die_with_parent(&mut cmd);
    let output = cmd
        .output()
        .map_err(|e| Error::io(format!("run {tool}"), e))?;
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    if !output.status.success() {
        return Err(Error::Tool {
            tool,
            status: output.status.to_string(),
            stderr,
        });
    }
    Ok(stderr)
}

use std::os::unix::fs::DirBuilderExt;

#[cfg(test)]
#[path = "ext4_tests.rs"]
mod tests;
