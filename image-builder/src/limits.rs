//! Resource limits applied while reading untrusted layers.

/// Bounds on what a set of layers may ask of the builder. Every one is enforced while
/// streaming, before the resource is spent, and exceeding one fails the build.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Sum of the uncompressed sizes of all layers, in bytes.
    pub max_total_size: u64,
    /// Number of tar entries across all layers.
    pub max_entries: u64,
    /// Number of path components of any resolved path.
    pub max_depth: usize,
    /// Bytes in one path component (ext4 allows 255).
    pub max_name_len: usize,
    /// Bytes in a whole entry name or symlink target.
    pub max_path_len: usize,
    /// Uncompressed bytes per compressed byte, checked once a layer exceeds
    /// `ratio_floor` uncompressed bytes.
    pub max_ratio: u64,
    /// Uncompressed size below which the ratio is not checked.
    pub ratio_floor: u64,
    /// Bytes in one extended attribute value.
    pub max_xattr_value: usize,
    /// Extended attributes per entry.
    pub max_xattrs: usize,
    /// Names to one inode (ext4 caps at 65000).
    pub max_links: u32,
    /// Symlinks followed while resolving one path.
    pub max_symlink_hops: u32,
    /// Layers in one image.
    pub max_layers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_total_size: 32 << 30,
            max_entries: 2_000_000,
            max_depth: 256,
            max_name_len: 255,
            max_path_len: 4096,
            max_ratio: 500,
            ratio_floor: 16 << 20,
            max_xattr_value: 64 << 10,
            max_xattrs: 128,
            max_links: 65_000,
            max_symlink_hops: 40,
            max_layers: 256,
        }
    }
}

/// `Ok` while `value` is within `limit`, else the [`crate::Error::Limit`] error that names the
/// knob raising it.
pub(crate) fn ensure(
    what: &'static str,
    value: u64,
    limit: u64,
    knob: &'static str,
) -> crate::Result<()> {
    if value > limit {
        return Err(crate::Error::Limit {
            what,
            value,
            limit,
            knob,
        });
    }
    Ok(())
}
