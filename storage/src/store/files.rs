//! File-system pieces of the store: temp files that vanish unless kept (and are found and
//! removed when the process that wrote them died), the per-model lock, manifests, streaming
//! copies that hash as they go, and UTC time stamps.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::{IoContext, Result, StoreError};
use super::progress::{Progress, Transfer};

/// Chunk size for streaming copies: large enough to keep syscalls rare, small enough that
/// progress moves smoothly.
const CHUNK: usize = 1 << 20;

/// The suffix of every temp file; [`remove_stale`] looks only at names that end with it.
const PARTIAL: &str = ".partial";

/// A file under the store's `tmp/` (or beside any file being written, as `strata optimize`
/// does) that is deleted when dropped unless [`TempFile::persist`] moved it into place. This
/// is what guarantees a failed pull leaves nothing behind; a writer killed outright (kill -9,
/// a power cut) cannot run its drop, so the file carries an exclusive `flock` for as long as
/// its writer has it open, and [`remove_stale`] deletes the ones nobody holds.
pub struct TempFile {
    path: PathBuf,
    file: Option<File>,
}

impl TempFile {
    /// Creates a fresh, empty temp file in `dir` whose name starts with `stem`.
    pub fn create(dir: &Path, stem: &str) -> Result<TempFile> {
        TempFile::create_mode(dir, stem, 0o666)
    }

    /// Like [`TempFile::create`], with the permission bits the file is created with (before the
    /// umask): the store passes fewer when its root is not open to group or others.
    pub(crate) fn create_mode(dir: &Path, stem: &str, mode: u32) -> Result<TempFile> {
        let path = fresh_path(dir, stem)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .io("create", &path)?;
        // Nobody else can have opened a file created just now, so this cannot fail with
        // WouldBlock; a file system without flock support is reported as the error it is.
        let t = TempFile {
            path,
            file: Some(file),
        };
        if let Some(f) = &t.file {
            f.try_lock().map_err(|e| StoreError::Io {
                op: "lock",
                path: t.path.clone(),
                source: e.into(),
            })?;
        }
        Ok(t)
    }

    /// Picks a fresh temp path in `dir` without creating anything there; the caller creates
    /// the file (by hard-linking), and it is still deleted on drop. Such a file carries no
    /// lock of its own: the caller holds the model name's lock, which [`remove_stale`] checks.
    pub(crate) fn reserve(dir: &Path, stem: &str) -> Result<TempFile> {
        Ok(TempFile {
            path: fresh_path(dir, stem)?,
            file: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open handle; `None` only after `persist`, which consumes `self`.
    pub fn file(&mut self) -> Result<&mut File> {
        let path = &self.path;
        self.file.as_mut().ok_or_else(|| StoreError::Io {
            op: "use",
            path: path.clone(),
            source: std::io::Error::other("temp file already closed"),
        })
    }

    /// Flushes the data to disk and renames the file to `dest`, then syncs `dest`'s directory so
    /// the rename itself survives a crash.
    pub fn persist(mut self, dest: &Path) -> Result<()> {
        if let Some(f) = &self.file {
            f.sync_all().io("sync", &self.path)?;
        }
        fs::rename(&self.path, dest).io("rename into place", dest)?;
        // rename(2) does nothing when both names are links to one inode (re-importing a file
        // that was hard-linked in before), leaving the temp name behind; drop it.
        if fs::symlink_metadata(&self.path).is_ok() {
            fs::remove_file(&self.path).io("remove", &self.path)?;
        }
        // The lock goes with the handle, after the rename: until then the name is in `tmp/`
        // and must not look abandoned.
        self.file.take();
        // A bare file name's parent is "": the current directory (issue 22: `strata optimize
        // m.gguf -o out.gguf` failed with "sync directory : No such file or directory").
        match dest.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir)?,
            _ => sync_dir(Path::new("."))?,
        }
        // The temp path no longer exists; keep Drop from touching whatever appears there.
        self.path = PathBuf::new();
        Ok(())
    }
}

/// `dir/stem.PID.N.partial`, unique within this process; the directory is created if needed.
fn fresh_path(dir: &Path, stem: &str) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    fs::create_dir_all(dir).io("create directory", dir)?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    Ok(dir.join(format!("{stem}.{}.{n}{PARTIAL}", std::process::id())))
}

impl Drop for TempFile {
    fn drop(&mut self) {
        // Unlink while still holding the lock, so that no cleaner sees an unlocked file.
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
        self.file.take();
    }
}

/// Deletes the temp files in `dir` that no live writer holds: those of processes that were
/// killed before they could clean up. A file is stale when its `flock` can be taken (a writer
/// holds it while the file is open) and `name_free` says, from the file's stem, that no pull
/// it belongs to is running — which covers a hard-linked import (no lock of its own) and a
/// file caught between its creation and its writer's flock. Returns how many files were
/// removed; unreadable entries are left alone.
pub(crate) fn remove_stale(dir: &Path, name_free: &dyn Fn(&str) -> bool) -> Result<usize> {
    let read = match fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).io("read directory", dir),
    };
    let mut removed = 0;
    for entry in read.flatten() {
        let file_name = entry.file_name();
        let Some(stem) = file_name.to_str().and_then(temp_stem) else {
            continue;
        };
        let path = entry.path();
        // Only regular files are ours; O_NONBLOCK keeps a FIFO planted here from blocking us.
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.file_type().is_file() {
            continue;
        }
        let Ok(f) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
            .open(&path)
        else {
            continue;
        };
        if f.try_lock().is_err() || !name_free(stem) {
            continue;
        }
        // Unlocked, and no pull of its name runs: abandoned. Unlinked while we hold the lock.
        if fs::remove_file(&path).is_ok() {
            removed += 1;
            tracing::info!("removed abandoned temp file {}", path.display());
        }
    }
    if removed > 0 {
        sync_dir(dir)?;
    }
    Ok(removed)
}

/// The stem of a temp file's name (`NAME` of `NAME.PID.N.partial`), or `None` for other names.
fn temp_stem(file_name: &str) -> Option<&str> {
    let rest = file_name.strip_suffix(PARTIAL)?;
    let (rest, n) = rest.rsplit_once('.')?;
    let (stem, pid) = rest.rsplit_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(n) && digits(pid) && !stem.is_empty()).then_some(stem)
}

/// Syncs a directory so renames and unlinks in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .io("sync directory", dir)
}

/// An exclusive lock on one model name, held while the model is written or removed, so that a
/// second `pull` of the same model waits for the first and then finds it present. The lock
/// file is removed on release, so `locks/` holds only the names being worked on.
pub(crate) struct NameLock {
    path: PathBuf,
    _file: File,
}

impl NameLock {
    /// Waits for the lock on `name`.
    pub(crate) fn acquire(lock_dir: &Path, name: &str) -> Result<NameLock> {
        loop {
            let (path, file) = open_lock(lock_dir, name)?;
            // flock-style locks are released by the kernel when the handle closes, even if the
            // process dies, so a crashed pull never wedges the store.
            file.lock().io("lock", &path)?;
            if let Some(l) = NameLock::check(path, file)? {
                return Ok(l);
            }
        }
    }

    /// The lock on `name` if nobody holds it now, else `None`.
    pub(crate) fn try_acquire(lock_dir: &Path, name: &str) -> Result<Option<NameLock>> {
        loop {
            let (path, file) = open_lock(lock_dir, name)?;
            match file.try_lock() {
                Ok(()) => {}
                Err(fs::TryLockError::WouldBlock) => return Ok(None),
                Err(fs::TryLockError::Error(e)) => return Err(e).io("lock", &path),
            }
            if let Some(l) = NameLock::check(path, file)? {
                return Ok(Some(l));
            }
        }
    }

    /// The holder before us unlinks the file before it unlocks, so a lock taken on a file
    /// that is no longer at `path` excludes nobody: the caller opens the path again.
    fn check(path: PathBuf, file: File) -> Result<Option<NameLock>> {
        let held = file.metadata().io("stat", &path)?;
        match fs::metadata(&path) {
            Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => {
                Ok(Some(NameLock { path, _file: file }))
            }
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).io("stat", &path),
        }
    }
}

fn open_lock(lock_dir: &Path, name: &str) -> Result<(PathBuf, File)> {
    fs::create_dir_all(lock_dir).io("create directory", lock_dir)?;
    let path = lock_dir.join(format!("{name}.lock"));
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .io("open lock", &path)?;
    Ok((path, file))
}

impl Drop for NameLock {
    fn drop(&mut self) {
        // Unlinked while still locked (the handle closes after this), so a waiter that opened
        // the old file sees it gone and opens a new one (`NameLock::check`).
        let _ = fs::remove_file(&self.path);
    }
}

/// The sidecar `models/<name>.json` written after a successful pull.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Where the bytes came from: a URL, `file:<path>`, or `pypi:<packages>==<version>`.
    pub source: String,
    /// SHA-256 of the model file, lowercase hex.
    pub sha256: String,
    /// Size of the model file in bytes.
    pub size: u64,
    /// When the pull finished, RFC 3339 UTC.
    pub pulled_at: String,
}

impl Manifest {
    /// Reads a manifest; a missing or unreadable one is `None`, because a model file without a
    /// manifest is still a usable model.
    pub(crate) fn read(path: &Path) -> Option<Manifest> {
        let bytes = fs::read(path).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!("ignoring unreadable manifest {}: {e}", path.display());
                None
            }
        }
    }

    /// Writes the manifest of model `name` to a temp file in `tmp_dir` (created with `mode`)
    /// and syncs it; [`TempFile::persist`] then puts it in place atomically.
    pub(crate) fn write_temp(&self, tmp_dir: &Path, name: &str, mode: u32) -> Result<TempFile> {
        let mut tmp = TempFile::create_mode(tmp_dir, name, mode)?;
        let tmp_path = tmp.path().to_path_buf();
        let json = serde_json::to_vec_pretty(self).map_err(|e| StoreError::Io {
            op: "serialize manifest",
            path: tmp_path.clone(),
            source: std::io::Error::other(e),
        })?;
        let f = tmp.file()?;
        f.write_all(&json).io("write", &tmp_path)?;
        f.sync_all().io("sync", &tmp_path)?;
        Ok(tmp)
    }
}

/// Lowercase hex of a digest.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// What a streaming copy read, and its digest.
pub(crate) struct Copied {
    pub(crate) bytes: u64,
    pub(crate) sha256: String,
}

/// Where a copy's bytes come from, for error messages: reads from the network and reads from
/// a file fail in different ways and deserve different errors.
pub(crate) enum ReadSide<'a> {
    Url(&'a str),
    File(&'a Path),
}

impl ReadSide<'_> {
    fn error(&self, e: std::io::Error) -> StoreError {
        match self {
            ReadSide::Url(url) => StoreError::Network {
                url: (*url).to_owned(),
                source: Box::new(e),
            },
            ReadSide::File(path) => StoreError::Io {
                op: "read",
                path: path.to_path_buf(),
                source: e,
            },
        }
    }
}

/// Copies `reader` into `writer` (when given), hashing every byte, advancing `transfer`, and
/// refusing to go past `limit` bytes so a hostile source cannot fill the disk.
pub(crate) fn copy_hashed(
    reader: &mut dyn Read,
    from: ReadSide<'_>,
    mut writer: Option<(&mut File, &Path)>,
    hasher: &mut Sha256,
    limit: Option<(u64, &str)>,
    transfer: &mut Option<&mut Transfer<'_>>,
) -> Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(from.error(e)),
        };
        total += n as u64;
        if let Some((limit, what)) = limit
            && total > limit
        {
            return Err(StoreError::TooLarge {
                what: what.to_owned(),
                limit,
            });
        }
        let chunk = &buf[..n];
        hasher.update(chunk);
        if let Some((w, path)) = writer.as_mut() {
            w.write_all(chunk).io("write", *path)?;
        }
        if let Some(t) = transfer.as_mut() {
            t.advance(n as u64);
        }
    }
    Ok(total)
}

/// Hashes a whole file, reporting progress as `label`.
pub(crate) fn hash_file(path: &Path, label: &str, progress: &mut dyn Progress) -> Result<Copied> {
    let mut f = File::open(path).io("open", path)?;
    let len = f.metadata().io("stat", path)?.len();
    let mut t = Transfer::start(progress, label, Some(len));
    let mut hasher = Sha256::new();
    let bytes = copy_hashed(
        &mut f,
        ReadSide::File(path),
        None,
        &mut hasher,
        None,
        &mut Some(&mut t),
    )?;
    Ok(Copied {
        bytes,
        sha256: hex(&hasher.finalize()),
    })
}

/// `t` as RFC 3339 UTC (`2025-11-22T03:05:00Z`), without a date-time crate.
pub fn format_utc(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_763_780_700);
        assert_eq!(format_utc(t), "2025-11-22T03:05:00Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(format_utc(leap), "2000-02-29T00:00:00Z");
    }
}
