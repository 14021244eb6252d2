//! The fallback engine: a few persistent threads calling `pread`, for kernels or sandboxes that
//! refuse io_uring (`ENOSYS`, `EPERM` under seccomp) and for `STRATA_IO=pread`.

use std::os::fd::RawFd;
use std::thread::JoinHandle;

use crossbeam::channel::{Receiver, Sender, unbounded};

use super::{Chunk, Engine};

/// Threads per reader: enough to keep an NVMe queue busy with large chunks.
const THREADS: usize = 8;

struct Job {
    tag: usize,
    fd: RawFd,
    /// The destination as an address: the pointer crosses threads, the buffer's owner waits for
    /// the completion before touching it again.
    ptr: usize,
    len: usize,
    off: u64,
}

pub(super) struct PreadPool {
    fds: (Option<RawFd>, RawFd),
    jobs: Option<Sender<Job>>,
    done: Receiver<(usize, i64)>,
    threads: Vec<JoinHandle<()>>,
    /// Completions of reads done on the caller's thread.
    inline: Vec<(usize, i64)>,
}

/// One `pread`: bytes read, or a negative errno.
fn pread_job(j: &Job) -> i64 {
    // SAFETY: `Reader::run` keeps the destination (valid for `len` bytes) alive and untouched
    // until this job's completion has been received.
    let n = unsafe { libc::pread(j.fd, j.ptr as *mut libc::c_void, j.len, j.off as i64) };
    if n < 0 {
        -i64::from(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        )
    } else {
        n as i64
    }
}

impl PreadPool {
    pub(super) fn new(fds: (Option<RawFd>, RawFd)) -> Self {
        let (jobs, rx) = unbounded::<Job>();
        let (tx, done) = unbounded();
        let threads = (0..THREADS)
            .filter_map(|i| {
                let rx = rx.clone();
                let tx = tx.clone();
                std::thread::Builder::new()
                    .name(format!("strata-pread-{i}"))
                    .spawn(move || {
                        for j in rx {
                            if tx.send((j.tag, pread_job(&j))).is_err() {
                                return;
                            }
                        }
                    })
                    .ok()
            })
            .collect();
        Self {
            fds,
            jobs: Some(jobs),
            done,
            threads,
            inline: Vec::new(),
        }
    }
}

impl Engine for PreadPool {
    fn submit(&mut self, tag: usize, c: &Chunk, direct: bool) {
        let fd = match (direct, self.fds.0) {
            (true, Some(d)) => d,
            _ => self.fds.1,
        };
        let job = Job {
            tag,
            fd,
            ptr: c.ptr as usize,
            len: c.len,
            off: c.off,
        };
        let sent = match &self.jobs {
            Some(tx) if !self.threads.is_empty() => tx.send(job).map_err(|e| e.0),
            _ => Err(job),
        };
        if let Err(j) = sent {
            // No thread could be started: read on the caller's thread instead.
            self.inline.push((j.tag, pread_job(&j)));
        }
    }

    fn wait(&mut self, out: &mut Vec<(usize, i64)>) {
        if !self.inline.is_empty() {
            out.append(&mut self.inline);
            return;
        }
        match self.done.recv() {
            Ok(first) => out.push(first),
            // Every worker is gone with reads in flight: their buffers can't be released safely.
            Err(_) => {
                eprintln!("strata: every pread thread exited with reads in flight; aborting");
                std::process::abort();
            }
        }
        out.extend(self.done.try_iter());
    }

    fn capacity(&self) -> usize {
        usize::MAX
    }

    unsafe fn register(&mut self, _bufs: &[(*mut u8, usize)]) -> bool {
        false
    }
}

impl Drop for PreadPool {
    fn drop(&mut self) {
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
