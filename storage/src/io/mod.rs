//! Reading model bytes from disk: large aligned reads, many in flight, straight into memory we
//! own.
//!
//! [`Reader`] splits each [`ReadReq`] into chunks and keeps up to `depth` of them in flight on
//! one of two engines: io_uring (fixed files, registered buffers, `O_DIRECT`) or, when the kernel
//! or a sandbox refuses io_uring (or `STRATA_IO=pread`), a small pool of threads calling
//! `pread`. Both run the same completion loop, which resubmits short reads, tells end-of-file
//! from a read past the bytes that were needed, and types every error with the file, offset and
//! length.
//!
//! Ownership: [`Reader::read`] borrows the destination buffers and returns only after every
//! chunk it submitted has completed — also when one of them failed — so no buffer is freed or
//! reused while the kernel or a pread thread may still write into it.
//!
//! Faults (DESIGN.md invariant 6): a [`Faults`] plan (from `STRATA_IO_FAULTS` or a test) is
//! applied to completions before the loop sees them, so injected EIO, short reads, early EOF
//! and delays exercise the real recovery paths of both engines.

mod faults;
mod pread;
mod uring;

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use faults::Faults;

/// The alignment `O_DIRECT` reads use for file offsets, lengths and buffer addresses.
pub const DIRECT_ALIGN: usize = 4096;

/// Which engine carries the reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    Uring,
    Pread,
}

impl IoKind {
    pub const fn name(self) -> &'static str {
        match self {
            IoKind::Uring => "io_uring",
            IoKind::Pread => "pread",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IoError {
    #[error("{path}: cannot open: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: read of {len} bytes at offset {offset} failed: {source}")]
    Read {
        path: PathBuf,
        offset: u64,
        len: usize,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: unexpected end of file at offset {offset} ({missing} more bytes were expected; is the file truncated?)"
    )]
    Eof {
        path: PathBuf,
        offset: u64,
        missing: u64,
    },
    #[error("STRATA_IO={0:?} is not one of: uring, pread")]
    BadKind(String),
    #[error("STRATA_IO_FAULTS: {0}")]
    BadFaults(String),
    #[error(
        "{path}: read request at offset {offset} asks for {need} bytes into a {len}-byte buffer"
    )]
    BadRequest {
        path: PathBuf,
        offset: u64,
        need: usize,
        len: usize,
    },
}

/// How a [`Reader`] is set up.
#[derive(Clone, Debug)]
pub struct ReaderOptions {
    /// `None`: io_uring unless `STRATA_IO=pread`, falling back to pread when refused.
    pub kind: Option<IoKind>,
    /// Open with `O_DIRECT` (bypassing the page cache) where the file system allows it.
    pub direct: bool,
    /// Chunks in flight at once.
    pub depth: usize,
    /// Bytes per chunk.
    pub chunk: usize,
    /// Injected faults (tests; `STRATA_IO_FAULTS`).
    pub faults: Option<Faults>,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        Self {
            kind: None,
            direct: true,
            depth: 64,
            chunk: 1 << 20,
            faults: None,
        }
    }
}

impl ReaderOptions {
    /// The defaults, with `STRATA_IO` and `STRATA_IO_FAULTS` applied.
    pub fn from_env() -> Result<Self, IoError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// The defaults, with `STRATA_IO` and `STRATA_IO_FAULTS` as `var` looks them up (an
    /// edge that reads the environment once passes its lookup).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, IoError> {
        let mut o = Self::default();
        match var("STRATA_IO").as_deref() {
            None | Some("") | Some("auto") => {}
            Some("uring" | "io_uring") => o.kind = Some(IoKind::Uring),
            Some("pread") => o.kind = Some(IoKind::Pread),
            Some(other) => return Err(IoError::BadKind(other.to_string())),
        }
        if let Some(spec) = var("STRATA_IO_FAULTS")
            && !spec.is_empty()
        {
            o.faults = Some(Faults::parse(&spec).map_err(IoError::BadFaults)?);
        }
        Ok(o)
    }
}

/// One read: fill `buf` from file offset `offset`. The first `need` bytes must come from the
/// file (end-of-file before them is an error); the rest of `buf` is padding that an aligned
/// read may fill or leave when the file ends. `fixed` names the registered buffer that `buf`
/// lies in (see [`Reader::register_buffers`]).
pub struct ReadReq<'a> {
    pub offset: u64,
    pub buf: &'a mut [u8],
    pub need: usize,
    pub fixed: Option<u16>,
}

/// Counters since the reader was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct IoStats {
    pub bytes: u64,
    pub chunks: u64,
    /// Time spent inside [`Reader::read`].
    pub busy: Duration,
    /// Short reads resubmitted.
    pub resubmits: u64,
}

impl std::ops::AddAssign for IoStats {
    /// Counters of several readers together.
    fn add_assign(&mut self, o: Self) {
        self.bytes += o.bytes;
        self.chunks += o.chunks;
        self.busy += o.busy;
        self.resubmits += o.resubmits;
    }
}

impl IoStats {
    /// Bytes per second while reading.
    pub fn bandwidth(&self) -> f64 {
        let s = self.busy.as_secs_f64();
        if s > 0.0 { self.bytes as f64 / s } else { 0.0 }
    }
}

/// A piece of a request in flight: the bytes `[off, off + len)` go to `ptr`, and the file must
/// supply at least up to `need_end`.
#[derive(Clone, Copy, Debug)]
struct Chunk {
    off: u64,
    ptr: *mut u8,
    len: usize,
    need_end: u64,
    fixed: Option<u16>,
}

/// What carries chunks to the file and back: io_uring or the pread pool.
trait Engine: Send {
    /// Starts `c` with tag `tag`; `direct` chooses the `O_DIRECT` descriptor.
    fn submit(&mut self, tag: usize, c: &Chunk, direct: bool);
    /// Waits for at least one completion and appends `(tag, result)` pairs: bytes read, or a
    /// negative errno. Must not return before a completion arrives.
    fn wait(&mut self, out: &mut Vec<(usize, i64)>);
    /// Most chunks this engine can hold in flight.
    fn capacity(&self) -> usize;
    /// # Safety
    /// Each region must stay allocated, and be used only for reads into it, until the engine
    /// is dropped.
    unsafe fn register(&mut self, bufs: &[(*mut u8, usize)]) -> bool;
}

/// Reads one file. `read` may be called from several threads; calls are serialised.
pub struct Reader {
    path: PathBuf,
    size: u64,
    direct: bool,
    kind: IoKind,
    chunk: usize,
    depth: usize,
    faults: Option<Faults>,
    engine: Mutex<Box<dyn Engine>>,
    bytes: AtomicU64,
    chunks: AtomicU64,
    busy_ns: AtomicU64,
    resubmits: AtomicU64,
    // The descriptors the engine reads through; declared after `engine` so they outlive it.
    _files: (Option<File>, File),
}

impl Reader {
    pub fn open(path: &Path, opts: &ReaderOptions) -> Result<Self, IoError> {
        let open_err = |source| IoError::Open {
            path: path.to_path_buf(),
            source,
        };
        let buffered = File::open(path).map_err(open_err)?;
        let size = buffered.metadata().map_err(open_err)?.len();
        // Some file systems (tmpfs, some FUSE) refuse O_DIRECT; those read through the cache.
        let direct = if opts.direct {
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)
                .ok()
        } else {
            None
        };
        use std::os::fd::AsRawFd;
        let fds = (direct.as_ref().map(|f| f.as_raw_fd()), buffered.as_raw_fd());
        let depth = opts.depth.clamp(1, 4096);
        let want = match opts.kind {
            Some(k) => k,
            None => ReaderOptions::from_env()?.kind.unwrap_or(IoKind::Uring),
        };
        let (kind, engine): (IoKind, Box<dyn Engine>) = match want {
            IoKind::Uring => match uring::Uring::new(depth, fds) {
                Ok(u) => (IoKind::Uring, Box::new(u)),
                Err(e) => {
                    tracing::info!("io_uring unavailable ({e}); reading with a pread pool");
                    (IoKind::Pread, Box::new(pread::PreadPool::new(fds)))
                }
            },
            IoKind::Pread => (IoKind::Pread, Box::new(pread::PreadPool::new(fds))),
        };
        Ok(Self {
            path: path.to_path_buf(),
            size,
            direct: direct.is_some(),
            kind,
            chunk: opts.chunk.max(DIRECT_ALIGN) / DIRECT_ALIGN * DIRECT_ALIGN,
            depth: depth.min(engine.capacity()),
            faults: opts.faults.clone(),
            engine: Mutex::new(engine),
            bytes: AtomicU64::new(0),
            chunks: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            resubmits: AtomicU64::new(0),
            _files: (direct, buffered),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's size when it was opened.
    pub fn file_size(&self) -> u64 {
        self.size
    }

    pub fn kind(&self) -> IoKind {
        self.kind
    }

    /// Whether aligned reads bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Registers buffers with io_uring so reads into them skip the per-read page pinning
    /// (`IORING_OP_READ_FIXED`); a request names its buffer by index in `bufs`. Returns false
    /// (and reads go on unregistered) with the pread engine or when the kernel refuses.
    ///
    /// # Safety
    /// Every region must stay allocated until this reader is dropped, and must not be used for
    /// anything but reads through it while a read into it is in flight.
    pub unsafe fn register_buffers(&self, bufs: &[(*mut u8, usize)]) -> bool {
        let mut engine = self.engine.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: forwarded from this function's contract.
        unsafe { engine.register(bufs) }
    }

    pub fn stats(&self) -> IoStats {
        IoStats {
            bytes: self.bytes.load(Ordering::Relaxed),
            chunks: self.chunks.load(Ordering::Relaxed),
            busy: Duration::from_nanos(self.busy_ns.load(Ordering::Relaxed)),
            resubmits: self.resubmits.load(Ordering::Relaxed),
        }
    }

    /// Performs every request, up to `depth` chunks in flight at once. Returns after all
    /// submitted chunks have completed; the first error is returned (later chunks of a failed
    /// call are not started).
    pub fn read(&self, reqs: &mut [ReadReq<'_>]) -> Result<(), IoError> {
        let mut pending = VecDeque::new();
        for r in reqs.iter_mut() {
            if r.need > r.buf.len() {
                return Err(IoError::BadRequest {
                    path: self.path.clone(),
                    offset: r.offset,
                    need: r.need,
                    len: r.buf.len(),
                });
            }
            let need_end = r.offset + r.need as u64;
            let base = r.buf.as_mut_ptr();
            let mut done = 0;
            while done < r.buf.len() {
                let len = self.chunk.min(r.buf.len() - done);
                let off = r.offset + done as u64;
                // Padding past the end of the file is never requested.
                if off >= self.size.max(need_end) {
                    break;
                }
                pending.push_back(Chunk {
                    off,
                    // SAFETY: `done < buf.len()`, so the pointer stays inside the buffer.
                    ptr: unsafe { base.add(done) },
                    len,
                    need_end,
                    fixed: r.fixed,
                });
                done += len;
            }
        }
        let t0 = Instant::now();
        let mut engine = self.engine.lock().unwrap_or_else(|p| p.into_inner());
        let r = self.run(&mut **engine, pending);
        drop(engine);
        self.busy_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        r
    }

    /// The completion loop shared by both engines.
    fn run(&self, engine: &mut dyn Engine, mut pending: VecDeque<Chunk>) -> Result<(), IoError> {
        let mut table: Vec<Option<Chunk>> = vec![None; self.depth];
        let mut free: Vec<usize> = (0..self.depth).rev().collect();
        let mut in_flight = 0usize;
        let mut first_err: Option<IoError> = None;
        let mut done = Vec::new();
        loop {
            if first_err.is_none() {
                while let Some(tag) = free.last().copied() {
                    let Some(c) = pending.pop_front() else { break };
                    free.pop();
                    let direct = self.direct && aligned(&c);
                    engine.submit(tag, &c, direct);
                    table[tag] = Some(c);
                    in_flight += 1;
                }
            }
            if in_flight == 0 {
                break;
            }
            done.clear();
            engine.wait(&mut done);
            for &(tag, res) in &done {
                let Some(c) = table[tag].take() else { continue };
                free.push(tag);
                in_flight -= 1;
                let res = match &self.faults {
                    Some(f) => f.apply(c.off, c.len, res),
                    None => res,
                };
                match classify(&c, res) {
                    Outcome::Done(n) => {
                        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
                        self.chunks.fetch_add(1, Ordering::Relaxed);
                    }
                    Outcome::Retry => pending.push_front(c),
                    Outcome::Rest(n) => {
                        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
                        self.resubmits.fetch_add(1, Ordering::Relaxed);
                        pending.push_front(Chunk {
                            off: c.off + n as u64,
                            // SAFETY: n < c.len, so the pointer stays inside the chunk.
                            ptr: unsafe { c.ptr.add(n) },
                            len: c.len - n,
                            ..c
                        });
                    }
                    Outcome::Eof => {
                        first_err.get_or_insert(IoError::Eof {
                            path: self.path.clone(),
                            offset: c.off,
                            missing: c.need_end - c.off,
                        });
                    }
                    Outcome::Err(errno) => {
                        first_err.get_or_insert(IoError::Read {
                            path: self.path.clone(),
                            offset: c.off,
                            len: c.len,
                            source: std::io::Error::from_raw_os_error(errno),
                        });
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

enum Outcome {
    /// Complete, `n` bytes read.
    Done(usize),
    /// Interrupted before reading anything: submit again.
    Retry,
    /// A short read of `n` bytes, with bytes still needed after it.
    Rest(usize),
    Eof,
    Err(i32),
}

fn classify(c: &Chunk, res: i64) -> Outcome {
    if res < 0 {
        let errno = (-res) as i32;
        return if errno == libc::EINTR || errno == libc::EAGAIN {
            Outcome::Retry
        } else {
            Outcome::Err(errno)
        };
    }
    let n = (res as usize).min(c.len);
    if n == c.len || c.off + n as u64 >= c.need_end {
        // Everything asked for, or everything needed (the rest is padding past the file's end).
        return Outcome::Done(n);
    }
    if n == 0 {
        return Outcome::Eof;
    }
    Outcome::Rest(n)
}

fn aligned(c: &Chunk) -> bool {
    let a = DIRECT_ALIGN as u64;
    c.off.is_multiple_of(a)
        && c.len.is_multiple_of(DIRECT_ALIGN)
        && (c.ptr as usize).is_multiple_of(DIRECT_ALIGN)
}

/// Reads up to `limit` bytes of `path` from the start, sequentially, through a fresh reader
/// with `opts`, and returns the bytes read and the seconds it took: the disk's read bandwidth
/// for `strata bench --disk` (with `O_DIRECT`, the page cache does not flatter it).
pub fn measure_read(path: &Path, limit: u64, opts: &ReaderOptions) -> Result<(u64, f64), IoError> {
    let size = std::fs::metadata(path)
        .map_err(|source| IoError::Open {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let total = limit.min(size) / DIRECT_ALIGN as u64 * DIRECT_ALIGN as u64;
    // Large calls keep the queue full: it only drains at the end of each one. The buffer is
    // registered with io_uring, as the streaming window's slots are.
    let window = (512usize << 20).min(total.max(DIRECT_ALIGN as u64) as usize);
    let mut buf = crate::buf::AlignedBuf::zeroed(window).map_err(|_| IoError::Read {
        path: path.to_path_buf(),
        offset: 0,
        len: window,
        source: std::io::Error::from(std::io::ErrorKind::OutOfMemory),
    })?;
    // Fault the pages in first, so the timing is the disk's and not the page allocator's.
    buf.as_mut_slice()
        .iter_mut()
        .step_by(4096)
        .for_each(|b| *b = 1);
    let reader = Reader::open(path, opts)?;
    // SAFETY: `buf` is declared before `reader`, so it outlives the registration.
    unsafe { reader.register_buffers(&[(buf.as_ptr(), buf.len())]) };
    let t0 = Instant::now();
    let mut off = 0u64;
    while off < total {
        let len = window.min((total - off) as usize);
        reader.read(&mut [ReadReq {
            offset: off,
            buf: &mut buf.as_mut_slice()[..len],
            need: len,
            fixed: Some(0),
        }])?;
        off += len as u64;
    }
    Ok((total, t0.elapsed().as_secs_f64()))
}

#[cfg(test)]
mod tests;
