//! Spool for regular-file content: one private file per image inode, so that file data
//! never sits in memory and can later be moved (renamed) into the staging tree without a
//! second copy.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;

use crate::error::{Error, Result};
use crate::fsutil;

/// Identifies one spooled file.
pub type BlobId = u64;

/// A directory of spooled file contents, owned by one build.
#[derive(Debug)]
pub struct BlobStore {
    dir: OwnedFd,
    path: PathBuf,
    next: BlobId,
}

impl BlobStore {
    /// Creates the store in `path`, which must not exist yet; its parent must be private.
    pub fn create(path: &Path) -> Result<Self> {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(path)
            .map_err(|e| Error::io(format!("create spool {}", path.display()), e))?;
        let dir = fsutil::open_dir(path)?;
        Ok(BlobStore {
            dir,
            path: path.to_owned(),
            next: 0,
        })
    }

    /// Where the store lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The store's directory descriptor.
    pub(crate) fn dir(&self) -> &OwnedFd {
        &self.dir
    }

    /// The file name of a blob inside the store.
    pub(crate) fn name(id: BlobId) -> Vec<u8> {
        id.to_string().into_bytes()
    }

    /// Creates a new empty blob for writing.
    pub fn create_blob(&mut self) -> Result<(BlobId, File)> {
        let id = self.next;
        self.next += 1;
        let fd = fsutil::open_at(
            &self.dir,
            &Self::name(id),
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR,
            0o600,
        )?;
        Ok((id, fsutil::into_file(fd)))
    }

    /// Opens a blob for reading.
    pub fn open(&self, id: BlobId) -> Result<File> {
        Ok(fsutil::into_file(fsutil::open_at(
            &self.dir,
            &Self::name(id),
            OFlag::O_RDONLY,
            0,
        )?))
    }

    /// Deletes a blob whose inode left the image; frees its disk space early.
    pub fn remove(&self, id: BlobId) {
        // Best effort: the whole store is removed at the end of the build anyway.
        let _ = nix::unistd::unlinkat(
            Some(self.dir.as_raw_fd()),
            Self::name(id).as_slice(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
    }
}

use std::os::unix::fs::DirBuilderExt;
