//! The in-memory model of an image's file system, onto which layers are applied.
//!
//! Nodes live in an arena and are referred to by [`NodeId`]; a directory maps names to
//! nodes, so two names mapping to one node are hardlinks. Paths are resolved entirely
//! inside the model: symlinks are followed here, clamped at the image root, and never on
//! the host.

use std::collections::{BTreeMap, VecDeque};

use crate::blobs::{BlobId, BlobStore};
use crate::error::{Error, Result};
use crate::limits::{self, Limits};

/// Index of a node in the arena.
pub type NodeId = usize;

/// The root directory's id.
pub const ROOT: NodeId = 0;

/// What kind of file a node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A directory and its entries.
    Dir(BTreeMap<Vec<u8>, Child>),
    /// A regular file; `blob` is `None` for an empty file.
    File {
        /// Spooled content.
        blob: Option<BlobId>,
        /// Content length in bytes.
        size: u64,
    },
    /// A symbolic link and its (unresolved) target.
    Symlink(Vec<u8>),
    /// A character device.
    CharDev {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A block device.
    BlockDev {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A named pipe.
    Fifo,
}

/// A directory entry: the node it names and the layer that last wrote or crossed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Child {
    /// The node.
    pub node: NodeId,
    /// Index of the layer that created or last touched this entry.
    pub layer: u32,
}

/// Ownership, permissions, time and extended attributes of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits including setuid, setgid and sticky (`0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Extended attributes, name to value.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// One inode of the image.
#[derive(Debug, Clone)]
pub struct Node {
    /// Its type and content.
    pub kind: Kind,
    /// Its metadata.
    pub meta: Meta,
    /// Number of directory entries naming it (directories: 1 while attached).
    pub nlink: u32,
}

/// The image file system being assembled.
#[derive(Debug)]
pub struct Tree {
    nodes: Vec<Node>,
    layer: u32,
    limits: Limits,
    dead_blobs: Vec<BlobId>,
}

/// Splits a name into components lexically: drops empty and `.` components, keeps `..`.
pub(crate) fn split(name: &[u8]) -> Vec<&[u8]> {
    name.split(|b| *b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .collect()
}

/// Normalises an entry name inside the image root: strips leading `/` and `./`, folds
/// `..` lexically, and rejects a `..` that would climb above the root.
pub fn normalize(name: &[u8], limits: &Limits) -> Result<Vec<Vec<u8>>> {
    limits::ensure(
        "entry name length",
        name.len() as u64,
        limits.max_path_len as u64,
        "Limits::max_path_len",
    )?;
    if name.contains(&0) {
        return Err(Error::invalid(name, "name contains a NUL byte"));
    }
    let mut out: Vec<Vec<u8>> = Vec::new();
    for c in split(name) {
        if c == b".." {
            if out.pop().is_none() {
                return Err(Error::invalid(
                    name,
                    "path escapes the image root with '..'",
                ));
            }
            continue;
        }
        limits::ensure(
            "path component length",
            c.len() as u64,
            limits.max_name_len as u64,
            "Limits::max_name_len",
        )?;
        out.push(c.to_vec());
    }
    limits::ensure(
        "path depth",
        out.len() as u64,
        limits.max_depth as u64,
        "Limits::max_depth",
    )?;
    Ok(out)
}

impl Tree {
    /// An image with an empty root directory (0755, root:root).
    pub fn new(limits: Limits) -> Self {
        Tree {
            nodes: vec![Node {
                kind: Kind::Dir(BTreeMap::new()),
                meta: Meta {
                    mode: 0o755,
                    ..Meta::default()
                },
                nlink: 1,
            }],
            layer: 0,
            limits,
            dead_blobs: Vec::new(),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Starts applying the next layer; whiteouts only hide entries of earlier layers.
    pub fn begin_layer(&mut self) {
        self.layer += 1;
    }

    /// A node by id.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id]
    }

    pub(crate) fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id]
    }

    /// The entries of a directory node (empty for other kinds).
    pub fn children(&self, id: NodeId) -> impl Iterator<Item = (&Vec<u8>, &Child)> {
        let map = match &self.nodes[id].kind {
            Kind::Dir(m) => Some(m),
            _ => None,
        };
        map.into_iter().flat_map(|m| m.iter())
    }

    /// Adds a detached node to the arena.
    pub fn alloc(&mut self, kind: Kind, meta: Meta) -> NodeId {
        self.nodes.push(Node {
            kind,
            meta,
            nlink: 0,
        });
        self.nodes.len() - 1
    }

    fn lookup(&self, dir: NodeId, name: &[u8]) -> Option<Child> {
        match &self.nodes[dir].kind {
            Kind::Dir(m) => m.get(name).copied(),
            _ => None,
        }
    }

    fn dir_map_mut(&mut self, dir: NodeId) -> &mut BTreeMap<Vec<u8>, Child> {
        match &mut self.nodes[dir].kind {
            Kind::Dir(m) => m,
            _ => unreachable!("caller checked that {dir} is a directory"),
        }
    }

    /// Resolves `comps` from the root, following every symlink met (including the last
    /// component when `follow_last`), with `..` clamped at the root. With `create`,
    /// missing directories are made (0755 root:root) and crossed entries are marked as
    /// touched by the current layer. Returns the node reached.
    fn walk(
        &mut self,
        orig: &[u8],
        comps: &[&[u8]],
        follow_last: bool,
        create: bool,
    ) -> Result<Option<NodeId>> {
        let mut stack: Vec<NodeId> = vec![ROOT];
        // (component, is_last_of_the_original_path)
        let mut queue: VecDeque<(Vec<u8>, bool)> = comps
            .iter()
            .enumerate()
            .map(|(i, c)| (c.to_vec(), i + 1 == comps.len()))
            .collect();
        let mut hops = 0u32;
        while let Some((c, last)) = queue.pop_front() {
            if c.is_empty() || c == b"." {
                continue;
            }
            if c == b".." {
                if stack.len() > 1 {
                    stack.pop();
                }
                continue;
            }
            let cur = *stack.last().expect("stack holds the root");
            let child = match self.lookup(cur, &c) {
                Some(child) => child,
                None if create => {
                    if c.len() > self.limits.max_name_len {
                        return Err(Error::invalid(
                            orig,
                            "a symlink target component is too long",
                        ));
                    }
                    let id = self.alloc(
                        Kind::Dir(BTreeMap::new()),
                        Meta {
                            mode: 0o755,
                            ..Meta::default()
                        },
                    );
                    self.link(cur, c.clone(), id)?;
                    Child {
                        node: id,
                        layer: self.layer,
                    }
                }
                None => return Ok(None),
            };
            match &self.nodes[child.node].kind {
                Kind::Dir(_) => {
                    if create {
                        let layer = self.layer;
                        if let Some(e) = self.dir_map_mut(cur).get_mut(&c) {
                            e.layer = layer;
                        }
                    }
                    stack.push(child.node);
                    limits::ensure(
                        "path depth",
                        (stack.len() as u64).saturating_sub(1),
                        self.limits.max_depth as u64,
                        "Limits::max_depth",
                    )?;
                }
                Kind::Symlink(target) if !last || follow_last => {
                    hops += 1;
                    if hops > self.limits.max_symlink_hops {
                        return Err(Error::invalid(orig, "too many levels of symbolic links"));
                    }
                    let target = target.clone();
                    if target.first() == Some(&b'/') {
                        stack.truncate(1);
                    }
                    let parts = split(&target);
                    let n = parts.len();
                    for (i, p) in parts.into_iter().enumerate().rev() {
                        queue.push_front((p.to_vec(), last && i + 1 == n));
                    }
                }
                _ if last => return Ok(Some(child.node)),
                _ => {
                    return Err(Error::invalid(
                        orig,
                        "a parent path component is not a directory",
                    ))
                }
            }
        }
        Ok(Some(*stack.last().expect("stack holds the root")))
    }

    /// Resolves the parent directory of an entry named by normalised `comps`, creating
    /// missing directories. Intermediate symlinks are followed inside the image.
    pub fn parent_dir(&mut self, orig: &[u8], comps: &[Vec<u8>]) -> Result<NodeId> {
        let parents: Vec<&[u8]> = comps[..comps.len().saturating_sub(1)]
            .iter()
            .map(|c| c.as_slice())
            .collect();
        let id = self
            .walk(orig, &parents, true, true)?
            .expect("walk with create always reaches a node");
        match self.nodes[id].kind {
            Kind::Dir(_) => Ok(id),
            _ => Err(Error::invalid(orig, "parent is not a directory")),
        }
    }

    /// Finds the node named by `target` (a hardlink target) without creating anything;
    /// `..` and absolute symlinks are clamped at the image root, the last component is not
    /// followed.
    pub fn find_nofollow(&mut self, target: &[u8]) -> Result<Option<NodeId>> {
        let comps = split(target);
        self.walk(target, &comps, false, false)
    }

    /// Looks up a path, following symlinks (for tests and inspection).
    pub fn lookup_path(&mut self, path: &str) -> Option<NodeId> {
        let comps = split(path.as_bytes());
        self.walk(path.as_bytes(), &comps, true, false)
            .ok()
            .flatten()
    }

    /// Looks up a path without following a final symlink.
    pub fn lookup_path_nofollow(&mut self, path: &str) -> Option<NodeId> {
        self.find_nofollow(path.as_bytes()).ok().flatten()
    }

    /// Makes `name` in `dir` refer to `node`, replacing (and releasing) what was there.
    pub fn link(&mut self, dir: NodeId, name: Vec<u8>, node: NodeId) -> Result<()> {
        if matches!(self.nodes[node].kind, Kind::Dir(_)) {
            if self.nodes[node].nlink > 0 {
                return Err(Error::invalid(&name, "a directory cannot have two names"));
            }
        } else if self.nodes[node].nlink >= self.limits.max_links {
            return Err(Error::Limit {
                what: "hardlinks to one file",
                value: u64::from(self.nodes[node].nlink) + 1,
                limit: u64::from(self.limits.max_links),
                knob: "Limits::max_links",
            });
        }
        self.nodes[node].nlink += 1;
        let layer = self.layer;
        let old = self.dir_map_mut(dir).insert(name, Child { node, layer });
        if let Some(old) = old {
            self.release(old.node);
        }
        Ok(())
    }

    /// Marks the entry `name` of `dir` as written by the current layer.
    pub fn touch(&mut self, dir: NodeId, name: &[u8]) {
        let layer = self.layer;
        if let Some(c) = self.dir_map_mut(dir).get_mut(name) {
            c.layer = layer;
        }
    }

    /// Removes `name` from `dir`, releasing its subtree.
    pub fn unlink(&mut self, dir: NodeId, name: &[u8]) {
        if let Some(old) = self.dir_map_mut(dir).remove(name) {
            self.release(old.node);
        }
    }

    /// Drops one name of `node`; when the last goes, its content goes too (iteratively
    /// for directories, so deep trees cannot overflow the stack).
    fn release(&mut self, node: NodeId) {
        let mut work = vec![node];
        while let Some(id) = work.pop() {
            let n = &mut self.nodes[id];
            n.nlink = n.nlink.saturating_sub(1);
            if n.nlink > 0 {
                continue;
            }
            match std::mem::replace(&mut n.kind, Kind::Fifo) {
                Kind::Dir(m) => work.extend(m.into_values().map(|c| c.node)),
                Kind::File {
                    blob: Some(blob), ..
                } => self.dead_blobs.push(blob),
                _ => {}
            }
        }
    }

    /// Blobs whose last name was removed since the previous call.
    pub fn take_dead_blobs(&mut self) -> Vec<BlobId> {
        std::mem::take(&mut self.dead_blobs)
    }

    /// Deletes the spooled content of files that left the image.
    pub fn reclaim(&mut self, blobs: &BlobStore) {
        for b in self.take_dead_blobs() {
            blobs.remove(b);
        }
    }

    /// Applies a whiteout: hides `name` in `dir` if an earlier layer put it there.
    pub fn whiteout(&mut self, dir: NodeId, name: &[u8]) {
        if let Some(c) = self.lookup(dir, name) {
            if c.layer < self.layer {
                self.unlink(dir, name);
            }
        }
    }

    /// Makes `dir` opaque: removes every entry below it that earlier layers put there,
    /// keeping what the current layer wrote, wherever the marker sits in the layer.
    pub fn opaque(&mut self, dir: NodeId) {
        let layer = self.layer;
        let mut work = vec![dir];
        while let Some(d) = work.pop() {
            let entries: Vec<(Vec<u8>, Child)> =
                self.children(d).map(|(n, c)| (n.clone(), *c)).collect();
            for (name, c) in entries {
                if c.layer < layer {
                    self.unlink(d, &name);
                } else if matches!(self.nodes[c.node].kind, Kind::Dir(_)) {
                    work.push(c.node);
                }
            }
        }
    }

    /// Depth-first listing of every path (for tests and debugging): `(path, node)`.
    pub fn walk_all(&self) -> Vec<(String, NodeId)> {
        let mut out = Vec::new();
        let mut work = vec![(String::new(), ROOT)];
        while let Some((p, id)) = work.pop() {
            for (name, c) in self.children(id) {
                let path = format!("{p}/{}", String::from_utf8_lossy(name));
                out.push((path.clone(), c.node));
                if matches!(self.nodes[c.node].kind, Kind::Dir(_)) {
                    work.push((path, c.node));
                }
            }
        }
        out.sort();
        out
    }
}
