//! The one error type of the library.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while turning an image into an ext4 root filesystem.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A layer tar stream is malformed or hostile; the image is rejected.
    #[error("invalid archive: entry {path:?}: {reason} (the image is malformed or hostile; rebuild it with a standard tool)")]
    InvalidArchive {
        /// The entry name as it appears in the tar stream (lossy).
        path: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The tar stream itself could not be parsed (corrupt, truncated, bad checksum).
    #[error("corrupt layer stream: {0} (the blob is truncated or damaged; fetch the image again)")]
    CorruptStream(#[source] io::Error),

    /// A configured limit was exceeded.
    #[error("limit exceeded: {what} is {value}, the limit is {limit} (if the image is trusted, raise the limit with {knob})")]
    Limit {
        /// Which limit.
        what: &'static str,
        /// The value that was reached.
        value: u64,
        /// The configured limit.
        limit: u64,
        /// How to raise it.
        knob: &'static str,
    },

    /// A content digest did not match what the manifest or config promised.
    #[error("digest mismatch for {what}: expected {expected}, got {actual} (the image is corrupt or was tampered with)")]
    DigestMismatch {
        /// What was verified.
        what: String,
        /// The digest the metadata promised.
        expected: String,
        /// The digest of the bytes read.
        actual: String,
    },

    /// The layer uses a compression we do not read.
    #[error("unsupported layer compression ({0}); only gzip, zstd and uncompressed tar layers are supported")]
    UnsupportedCompression(&'static str),

    /// A layer failed; wraps the cause with the layer's position and digest.
    #[error("layer {index} ({digest}): {source}")]
    Layer {
        /// Zero-based layer index.
        index: usize,
        /// The layer's digest as named by the manifest.
        digest: String,
        /// The cause.
        #[source]
        source: Box<Error>,
    },

    /// The image source (archive, layout, reference) is unusable.
    #[error("image source: {0}")]
    Source(String),

    /// A JSON document (manifest, index, config) is malformed.
    #[error("malformed {what}: {source}")]
    Json {
        /// Which document.
        what: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },

    /// A required host tool is missing.
    #[error("{tool} not found on PATH: install e2fsprogs (apt-get install e2fsprogs)")]
    ToolMissing {
        /// The tool name.
        tool: &'static str,
    },

    /// A host tool ran and failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        /// The tool name.
        tool: &'static str,
        /// Exit status as text.
        status: String,
        /// Its diagnostic output, trimmed.
        stderr: String,
    },

    /// An I/O error, with what we were doing.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, including the path.
        context: String,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// The image is not in the cache.
    #[error("image {0} is not in the cache (build it first: agentvm-image build {0})")]
    NotCached(String),

    /// The cache directory is unusable.
    #[error("cache directory {path}: {reason}")]
    Cache {
        /// The cache path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl Error {
    pub(crate) fn invalid(path: &[u8], reason: impl Into<String>) -> Self {
        Error::InvalidArchive {
            path: String::from_utf8_lossy(path).into_owned(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn nix(context: impl Into<String>, errno: nix::errno::Errno) -> Self {
        Error::io(context, io::Error::from(errno))
    }

    /// Whether this error (or the one it wraps) is an invalid-archive rejection.
    pub fn is_invalid_archive(&self) -> bool {
        match self {
            Error::InvalidArchive { .. } => true,
            Error::Layer { source, .. } => source.is_invalid_archive(),
            _ => false,
        }
    }

    /// Whether this error (or the one it wraps) is a limit violation.
    pub fn is_limit(&self) -> bool {
        match self {
            Error::Limit { .. } => true,
            Error::Layer { source, .. } => source.is_limit(),
            _ => false,
        }
    }
}

/// Result alias for the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;
