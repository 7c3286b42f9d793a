//! Progress reporting hooks; the binary renders them, the library only calls them.

/// Receives build progress. Every method has an empty default.
pub trait Progress: Send + Sync {
    /// A new phase started ("resolving", "building ext4", ...).
    fn phase(&self, _msg: &str) {}
    /// Layer `index` of `total` started; `size` is its compressed size when known.
    fn layer_start(&self, _index: usize, _total: usize, _digest: &str, _size: Option<u64>) {}
    /// `bytes` compressed bytes of the current layer have been read so far.
    fn layer_progress(&self, _bytes: u64) {}
    /// The current layer finished.
    fn layer_done(&self) {}
    /// Downloading layer blob `index` of `total` started (several may run at once).
    fn fetch_start(&self, _index: usize, _total: usize, _digest: &str, _size: Option<u64>) {}
    /// `bytes` of layer blob `index` have been downloaded so far.
    fn fetch_progress(&self, _index: usize, _bytes: u64) {}
    /// Layer blob `index` is downloaded and verified.
    fn fetch_done(&self, _index: usize) {}
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {}
