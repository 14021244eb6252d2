//! The SSD tier of the KV cache: pages written to an unlinked file (`O_DIRECT` where the file
//! system allows, so the page cache holds no copy and the RAM budget is what the process
//! holds), read back with the storage reader (io_uring, or a pread pool) when attention needs
//! them. While one layer computes, an I/O thread reads the next layer's pages into spare
//! buffers; what that read-ahead missed (a page written to disk since) is read on the spot.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use strata_storage::buf::AlignedBuf;
use strata_storage::io::{IoError, ReadReq, Reader, ReaderOptions};

use crate::EngineError;

/// Where a cache's pages go when RAM is short.
#[derive(Clone, Debug)]
pub struct SpillConfig {
    /// Directory of the spill file (created there, then unlinked at once).
    pub dir: PathBuf,
    /// Bytes of pages the cache may keep in RAM.
    pub ram_budget: usize,
    /// How the spill file is read back (the I/O engine and injected faults).
    pub io: ReaderOptions,
}

/// What the SSD tier did, since the cache was made.
#[derive(Clone, Copy, Debug, Default)]
pub struct SpillStats {
    pub ram_budget: usize,
    /// Bytes of pages on disk now.
    pub disk_bytes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Time the forward pass waited for pages (reads not hidden behind computation).
    pub wait: Duration,
    /// Pages found already read ahead, and pages read on the spot.
    pub ahead_hits: u64,
    pub ahead_misses: u64,
}

/// A page to read: (side, page index, file offset, bytes).
pub(super) type Want = (usize, usize, u64, usize);
type Got = Vec<((usize, usize, u64), AlignedBuf)>;

struct Job {
    pages: Vec<(usize, usize, u64, AlignedBuf)>,
    reply: Sender<Result<Got, IoError>>,
}

pub(super) struct Spill {
    budget: usize,
    writer: File,
    reader: Arc<Reader>,
    /// End of the file; freed page slots by size.
    end: u64,
    free: HashMap<usize, Vec<u64>>,
    /// The pages of the layer being computed.
    cur: (usize, HashMap<(usize, usize), AlignedBuf>),
    /// The read-ahead in flight: its layer and where its result comes.
    ahead: Option<(usize, Receiver<Result<Got, IoError>>)>,
    /// A page was written or freed since the read-ahead started: its bytes may be stale.
    ahead_stale: bool,
    jobs: Option<Sender<Job>>,
    /// Buffers to reuse, by size.
    spare: HashMap<usize, Vec<AlignedBuf>>,
    written: u64,
    wait: Duration,
    hits: u64,
    misses: u64,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

fn kv_err(what: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Kv(format!("{what}: {e}"))
}

impl Spill {
    pub(super) fn new(cfg: &SpillConfig) -> Result<Self, EngineError> {
        std::fs::create_dir_all(&cfg.dir)
            .map_err(|e| kv_err(&format!("creating {}", cfg.dir.display()), e))?;
        let path = cfg.dir.join(format!(
            ".strata-kv-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let created = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| kv_err(&format!("creating the spill file {}", path.display()), e))?;
        // O_DIRECT where allowed (tmpfs refuses it: then through the page cache).
        let writer = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .unwrap_or(created);
        let reader = Reader::open(&path, &cfg.io);
        // The descriptors stay open; the name goes, so nothing is left behind on any exit.
        let _ = std::fs::remove_file(&path);
        let reader = Arc::new(reader.map_err(|e| kv_err("opening the spill file", e))?);
        let (tx, rx) = channel::<Job>();
        let r = reader.clone();
        std::thread::Builder::new()
            .name("strata-kv-io".into())
            .spawn(move || {
                for job in rx {
                    let _ = job.reply.send(read_all(&r, job.pages));
                }
            })
            .map_err(|e| kv_err("starting the KV I/O thread", e))?;
        Ok(Self {
            budget: cfg.ram_budget,
            writer,
            reader,
            end: 0,
            free: HashMap::new(),
            cur: (usize::MAX, HashMap::new()),
            ahead: None,
            ahead_stale: false,
            jobs: Some(tx),
            spare: HashMap::new(),
            written: 0,
            wait: Duration::ZERO,
            hits: 0,
            misses: 0,
        })
    }

    pub(super) fn budget(&self) -> usize {
        self.budget
    }

    pub(super) fn stats(&self, disk_bytes: u64) -> SpillStats {
        SpillStats {
            ram_budget: self.budget,
            disk_bytes,
            bytes_read: self.reader.stats().bytes,
            bytes_written: self.written,
            wait: self.wait,
            ahead_hits: self.hits,
            ahead_misses: self.misses,
        }
    }

    /// Writes a page (its length a multiple of 4 KiB) and returns its offset.
    pub(super) fn write_page(&mut self, data: &[u8]) -> Result<u64, EngineError> {
        let off = match self.free.get_mut(&data.len()).and_then(|v| v.pop()) {
            Some(off) => off,
            None => {
                let off = self.end;
                self.end += data.len() as u64;
                off
            }
        };
        self.writer
            .write_all_at(data, off)
            .map_err(|e| kv_err("writing a KV page to disk", e))?;
        self.written += data.len() as u64;
        self.ahead_stale = true;
        Ok(off)
    }

    /// Gives a page's slot back for reuse.
    pub(super) fn free(&mut self, off: u64, len: usize) {
        self.free.entry(len).or_default().push(off);
        self.ahead_stale = true;
    }

    /// Reads one page now.
    pub(super) fn read_page(&self, off: u64, len: usize) -> Result<AlignedBuf, EngineError> {
        let mut buf = AlignedBuf::zeroed(len).map_err(|e| kv_err("KV page", e))?;
        self.reader
            .read(&mut [ReadReq {
                offset: off,
                buf: buf.as_mut_slice(),
                need: len,
                fixed: None,
            }])
            .map_err(|e| kv_err("reading a KV page back", e))?;
        Ok(buf)
    }

    fn buffer(&mut self, len: usize) -> Result<AlignedBuf, EngineError> {
        match self.spare.get_mut(&len).and_then(|v| v.pop()) {
            Some(b) => Ok(b),
            None => AlignedBuf::zeroed(len).map_err(|e| kv_err("KV page", e)),
        }
    }

    /// Makes layer `il`'s pages on disk (`want`) readable through [`Spill::staged`].
    pub(super) fn stage(&mut self, il: usize, want: Vec<Want>) -> Result<(), EngineError> {
        // The previous layer's buffers go back to the spares.
        for ((_, _), b) in self.cur.1.drain() {
            self.spare.entry(b.len()).or_default().push(b);
        }
        self.cur.0 = il;
        let t0 = Instant::now();
        let mut got: HashMap<(usize, usize, u64), AlignedBuf> = HashMap::new();
        if let Some((layer, rx)) = self.ahead.take() {
            // Always collected: its buffers were in flight.
            match rx.recv() {
                Ok(Ok(pages)) if layer == il && !self.ahead_stale => got.extend(pages),
                Ok(Ok(pages)) => pages
                    .into_iter()
                    .for_each(|(_, b)| self.spare.entry(b.len()).or_default().push(b)),
                // A failed read-ahead: read again below (and report that read's error).
                Ok(Err(_)) | Err(_) => {}
            }
        }
        let mut missing = Vec::new();
        for (si, pi, off, len) in want {
            match got.remove(&(si, pi, off)) {
                Some(b) => {
                    self.hits += 1;
                    self.cur.1.insert((si, pi), b);
                }
                None => {
                    self.misses += 1;
                    let b = self.buffer(len)?;
                    missing.push((si, pi, off, b));
                }
            }
        }
        for (_, b) in got {
            self.spare.entry(b.len()).or_default().push(b);
        }
        if !missing.is_empty() {
            let read =
                read_all(&self.reader, missing).map_err(|e| kv_err("reading KV pages", e))?;
            for ((si, pi, _), b) in read {
                self.cur.1.insert((si, pi), b);
            }
        }
        self.wait += t0.elapsed();
        Ok(())
    }

    /// Starts reading layer `il`'s pages on disk in the background.
    pub(super) fn read_ahead(&mut self, il: usize, want: Vec<Want>) {
        if want.is_empty() || self.ahead.is_some() {
            return;
        }
        self.ahead_stale = false;
        let mut pages = Vec::with_capacity(want.len());
        for (si, pi, off, len) in want {
            match self.buffer(len) {
                Ok(b) => pages.push((si, pi, off, b)),
                Err(_) => return,
            }
        }
        let (reply, rx) = channel();
        if let Some(jobs) = &self.jobs
            && jobs.send(Job { pages, reply }).is_ok()
        {
            self.ahead = Some((il, rx));
        }
    }

    /// A staged page of the current layer.
    pub(super) fn staged(&self, il: usize, si: usize, pi: usize) -> &[u8] {
        debug_assert_eq!(self.cur.0, il);
        self.cur
            .1
            .get(&(si, pi))
            .expect("prepare staged every page on disk")
            .as_slice()
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        // Wait for a read in flight (its buffers), then let the I/O thread end.
        if let Some((_, rx)) = self.ahead.take() {
            let _ = rx.recv();
        }
        self.jobs = None;
    }
}

fn read_all(r: &Reader, mut pages: Vec<(usize, usize, u64, AlignedBuf)>) -> Result<Got, IoError> {
    let mut reqs: Vec<ReadReq> = pages
        .iter_mut()
        .map(|(_, _, off, b)| {
            let len = b.len();
            ReadReq {
                offset: *off,
                buf: b.as_mut_slice(),
                need: len,
                fixed: None,
            }
        })
        .collect();
    r.read(&mut reqs)?;
    drop(reqs);
    Ok(pages
        .into_iter()
        .map(|(si, pi, off, b)| ((si, pi, off), b))
        .collect())
}
