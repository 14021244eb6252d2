//! Saved sessions: a KV cache and the token ids that produced it, in a file that says what it
//! belongs to, carries a checksum per chunk, and is written so that a crash never leaves a
//! partial file where a good one was expected.
//!
//! Layout (little-endian):
//! ```text
//! "STRATAKV" | version u32 | chunk* | "KVEND\0\0\0"
//! chunk = len u64 | payload (len bytes) | SHA-256(payload)
//! ```
//! The first chunk is the header ([`SessionMeta`]); `n_chunks` data chunks follow. Reading
//! validates everything — sizes against the bytes present before any allocation, every
//! checksum, the chunk count, the end marker — before returning anything, so a caller never
//! touches live state with a bad file.
//!
//! Writing ([`write_atomic`]): a temp file in the same directory, written in full, `fsync`,
//! renamed over the target, then the directory `fsync`ed. The previous file stays intact until
//! the rename, also when the disk fills up mid-write.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

const MAGIC: &[u8; 8] = b"STRATAKV";
const END: &[u8; 8] = b"KVEND\0\0\0";
pub const VERSION: u32 = 1;
/// Longest session name accepted.
const MAX_NAME: usize = 128;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    #[error(
        "invalid session name {0:?}: use 1-128 letters, digits, '.', '_' or '-', not starting with '.'"
    )]
    BadName(String),
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a strata session file ({reason})")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Mismatch { path: PathBuf, reason: String },
    #[error("session {0:?} does not exist")]
    NotFound(String),
}

/// What a session belongs to, and its tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionMeta {
    /// SHA-256 of the model file (or of its header and size when the store has no manifest).
    pub model_id: [u8; 32],
    /// SHA-256 of the tokenizer's vocabulary.
    pub tokenizer_id: [u8; 32],
    /// Element type of the cached keys and values (a ggml type id: 1 = F16).
    pub kv_type: u32,
    pub n_layer: u32,
    pub kv_dim: u32,
    /// Token ids whose keys and values the chunks hold, in order.
    pub tokens: Vec<u32>,
    /// Data chunks that follow the header.
    pub n_chunks: u32,
}

impl SessionMeta {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(96 + 4 * self.tokens.len());
        b.extend_from_slice(&self.model_id);
        b.extend_from_slice(&self.tokenizer_id);
        for v in [
            self.kv_type,
            self.n_layer,
            self.kv_dim,
            self.tokens.len() as u32,
            self.n_chunks,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for t in &self.tokens {
            b.extend_from_slice(&t.to_le_bytes());
        }
        b
    }

    fn decode(b: &[u8]) -> Option<Self> {
        let u32_at = |o: usize| Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?));
        let n_tokens = u32_at(76)? as usize;
        if b.len() != 84 + 4 * n_tokens {
            return None;
        }
        Some(Self {
            model_id: b[0..32].try_into().ok()?,
            tokenizer_id: b[32..64].try_into().ok()?,
            kv_type: u32_at(64)?,
            n_layer: u32_at(68)?,
            kv_dim: u32_at(72)?,
            n_chunks: u32_at(80)?,
            tokens: b[84..]
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        })
    }
}

/// Checks a session name: it becomes a file name in the state directory, so no separators,
/// no `..`, nothing hidden.
pub fn validate_name(name: &str) -> Result<(), SessionError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(SessionError::BadName(name.to_string()))
    }
}

fn io_err<'a>(
    path: &'a Path,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> SessionError + 'a {
    move |source| SessionError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// Writes `meta` and `chunks` to `path` crash-safely (see the module docs). Returns the bytes
/// written.
pub fn write_atomic(
    path: &Path,
    meta: &SessionMeta,
    chunks: &[&[u8]],
) -> Result<u64, SessionError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| SessionError::BadName(path.display().to_string()))?;
    // Unique per process and per save, so concurrent saves of one name never share a file.
    static SAVES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SAVES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp, "create"))?;
        let mut meta = meta.clone();
        meta.n_chunks = chunks.len() as u32;
        let mut written = 0u64;
        let mut put = |f: &mut File, b: &[u8]| -> Result<(), SessionError> {
            f.write_all(b).map_err(io_err(&tmp, "write"))?;
            written += b.len() as u64;
            Ok(())
        };
        put(&mut f, MAGIC)?;
        put(&mut f, &VERSION.to_le_bytes())?;
        let header = meta.encode();
        for payload in std::iter::once(&header[..]).chain(chunks.iter().copied()) {
            put(&mut f, &(payload.len() as u64).to_le_bytes())?;
            put(&mut f, payload)?;
            put(&mut f, &Sha256::digest(payload))?;
        }
        put(&mut f, END)?;
        f.sync_all().map_err(io_err(&tmp, "fsync"))?;
        drop(f);
        fs::rename(&tmp, path).map_err(io_err(path, "rename into place"))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir, "fsync directory"))?;
        Ok(written)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reads and fully validates a session file; nothing is returned unless all of it is good.
pub fn read(path: &Path) -> Result<(SessionMeta, Vec<Vec<u8>>), SessionError> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_err(path, "open"))?;
    let size = f.metadata().map_err(io_err(path, "stat"))?.len();
    let corrupt = |reason: String| SessionError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let mut left = size;
    let mut take = |f: &mut File, n: u64, what: &str| -> Result<Vec<u8>, SessionError> {
        if n > left {
            return Err(corrupt(format!(
                "{what} needs {n} bytes but only {left} remain (truncated?)"
            )));
        }
        left -= n;
        let mut b = vec![0u8; n as usize];
        f.read_exact(&mut b).map_err(io_err(path, "read"))?;
        Ok(b)
    };
    if take(&mut f, 8, "magic")? != MAGIC {
        return Err(corrupt("bad magic".into()));
    }
    let version = u32::from_le_bytes(take(&mut f, 4, "version")?.try_into().unwrap_or([0; 4]));
    if version != VERSION {
        return Err(corrupt(format!(
            "format version {version}, this build reads {VERSION}"
        )));
    }
    let mut chunk = |f: &mut File, i: usize| -> Result<Vec<u8>, SessionError> {
        let len = u64::from_le_bytes(take(f, 8, "chunk length")?.try_into().unwrap_or([0; 8]));
        let payload = take(f, len, &format!("chunk {i}"))?;
        let sum = take(f, 32, "checksum")?;
        if Sha256::digest(&payload)[..] != sum[..] {
            return Err(corrupt(format!("checksum mismatch in chunk {i}")));
        }
        Ok(payload)
    };
    let header = chunk(&mut f, 0)?;
    let meta = SessionMeta::decode(&header).ok_or_else(|| corrupt("malformed header".into()))?;
    let mut chunks = Vec::new();
    for i in 0..meta.n_chunks as usize {
        chunks.push(chunk(&mut f, i + 1)?);
    }
    let end = take(&mut f, 8, "end marker")?;
    if end != END {
        return Err(corrupt("missing end marker".into()));
    }
    if left != 0 {
        return Err(corrupt(format!("{left} trailing bytes")));
    }
    Ok((meta, chunks))
}

/// The directory sessions are saved in, one `NAME.kv` file each.
pub struct SessionDir {
    root: PathBuf,
}

impl SessionDir {
    /// Creates (0700, and any missing parent too) and opens the directory; one that exists is
    /// used with the permissions it has.
    pub fn open(root: &Path) -> Result<Self, SessionError> {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(io_err(root, "create directory"))?;
        let root = root.canonicalize().map_err(io_err(root, "resolve"))?;
        // Temp files of saves killed midway (".NAME.kv.PID.N.tmp" of a process that is gone).
        if let Ok(entries) = fs::read_dir(&root) {
            for e in entries.flatten() {
                let name = e.file_name();
                let Some(n) = name.to_str() else { continue };
                let pid = n
                    .strip_prefix('.')
                    .and_then(|r| r.strip_suffix(".tmp"))
                    .and_then(|r| r.rsplit('.').nth(1))
                    .and_then(|p| p.parse::<i32>().ok());
                // SAFETY: kill with signal 0 only checks whether the process exists.
                if let Some(pid) = pid
                    && pid > 0
                    && unsafe { libc::kill(pid, 0) } != 0
                    && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
                {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(Self { root })
    }

    /// `$STRATA_HOME/sessions`, else `$XDG_STATE_HOME/strata/sessions`, else
    /// `~/.local/state/strata/sessions`.
    pub fn default_root() -> PathBuf {
        let env = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        if let Some(h) = env("STRATA_HOME") {
            return h.join("sessions");
        }
        if let Some(s) = env("XDG_STATE_HOME") {
            return s.join("strata/sessions");
        }
        env("HOME")
            .unwrap_or_else(|| PathBuf::from("/tmp"))
            .join(".local/state/strata/sessions")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file of session `name`; refuses bad names and anything that is not a plain file
    /// (a symlink out of the directory, say).
    pub fn path(&self, name: &str) -> Result<PathBuf, SessionError> {
        validate_name(name)?;
        let p = self.root.join(format!("{name}.kv"));
        match fs::symlink_metadata(&p) {
            Ok(m) if !m.file_type().is_file() => Err(SessionError::Corrupt {
                path: p,
                reason: "not a regular file (symlinks are refused)".into(),
            }),
            _ => Ok(p),
        }
    }

    pub fn save(
        &self,
        name: &str,
        meta: &SessionMeta,
        chunks: &[&[u8]],
    ) -> Result<u64, SessionError> {
        write_atomic(&self.path(name)?, meta, chunks)
    }

    pub fn load(&self, name: &str) -> Result<(SessionMeta, Vec<Vec<u8>>), SessionError> {
        let p = self.path(name)?;
        if !p.exists() {
            return Err(SessionError::NotFound(name.to_string()));
        }
        read(&p)
    }

    /// Removes session `name`, whatever its entry is: a file, a symlink (itself, never what it
    /// points to), a FIFO, or a directory and what it holds — an entry that cannot be used as
    /// a session must still be removable.
    pub fn remove(&self, name: &str) -> Result<(), SessionError> {
        validate_name(name)?;
        let p = self.root.join(format!("{name}.kv"));
        let not_found = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::NotFound => SessionError::NotFound(name.to_string()),
            _ => io_err(&p, "remove")(e),
        };
        let meta = fs::symlink_metadata(&p).map_err(not_found)?;
        if meta.is_dir() {
            // remove_dir_all does not follow symlinks inside the tree.
            fs::remove_dir_all(&p).map_err(not_found)
        } else {
            fs::remove_file(&p).map_err(not_found)
        }
    }

    /// Names of saved sessions.
    pub fn list(&self) -> Result<Vec<String>, SessionError> {
        let mut out: Vec<String> = fs::read_dir(&self.root)
            .map_err(io_err(&self.root, "list"))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".kv")
                    .map(str::to_string)
            })
            .filter(|n| validate_name(n).is_ok())
            .collect();
        out.sort();
        Ok(out)
    }
}

/// The identity of a model file for sessions: the SHA-256 its store manifest records (a
/// `NAME.json` beside `NAME.gguf`), else a SHA-256 over its first `header_len` bytes (the GGUF
/// header and tensor table), its size, and the first and last 4 KiB of every range in
/// `tensors` (absolute offset, length) — cheap even for a file larger than RAM, and different
/// for two fine-tunes of one base model, whose headers match.
pub fn model_identity(
    path: &Path,
    header_len: u64,
    file_size: u64,
    tensors: &[(u64, u64)],
) -> [u8; 32] {
    let manifest = fs::read_to_string(path.with_extension("json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v.get("sha256")?.as_str().map(str::to_string));
    if let Some(hex) = manifest
        && hex.len() == 64
    {
        let mut out = [0u8; 32];
        let ok = (0..32).all(|i| {
            u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map(|b| out[i] = b)
                .is_ok()
        });
        if ok {
            return out;
        }
    }
    use std::os::unix::fs::FileExt;
    let mut h = Sha256::new();
    if let Ok(f) = File::open(path) {
        let mut head = vec![0u8; header_len.min(64 << 20) as usize];
        if f.read_exact_at(&mut head, 0).is_ok() {
            h.update(&head);
        }
        let mut buf = vec![0u8; 4096];
        for &(off, len) in tensors {
            let n = len.min(4096) as usize;
            for at in [off, off + len - n as u64] {
                if f.read_exact_at(&mut buf[..n], at).is_ok() {
                    h.update(&buf[..n]);
                }
            }
        }
    }
    h.update(file_size.to_le_bytes());
    h.finalize().into()
}

#[cfg(test)]
mod tests;
