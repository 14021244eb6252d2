//! The io_uring engine: both descriptors registered as fixed files, optional registered
//! buffers, one submission per chunk.

use std::os::fd::RawFd;

use io_uring::{IoUring, opcode, types};

use super::{Chunk, Engine};

pub(super) struct Uring {
    ring: IoUring,
    /// Fixed-file index of the `O_DIRECT` descriptor (the buffered one when there is none).
    direct_idx: u32,
    buffered_idx: u32,
    /// Registered buffers as `(start, len)`; a chunk uses `READ_FIXED` only when it lies inside
    /// the one it names.
    fixed: Vec<(usize, usize)>,
    capacity: usize,
}

impl Uring {
    pub(super) fn new(depth: usize, fds: (Option<RawFd>, RawFd)) -> std::io::Result<Self> {
        let entries = depth.next_power_of_two().clamp(8, 4096) as u32;
        let ring = IoUring::new(entries)?;
        let (list, direct_idx) = match fds.0 {
            Some(d) => (vec![d, fds.1], 0),
            None => (vec![fds.1], 0),
        };
        ring.submitter().register_files(&list)?;
        let buffered_idx = list.len() as u32 - 1;
        Ok(Self {
            ring,
            direct_idx,
            buffered_idx,
            fixed: Vec::new(),
            capacity: entries as usize,
        })
    }
}

impl Engine for Uring {
    fn submit(&mut self, tag: usize, c: &Chunk, direct: bool) {
        let fd = types::Fixed(if direct {
            self.direct_idx
        } else {
            self.buffered_idx
        });
        let len = c.len as u32;
        let inside = c.fixed.filter(|&i| {
            self.fixed.get(i as usize).is_some_and(|&(start, n)| {
                let p = c.ptr as usize;
                p >= start && p + c.len <= start + n
            })
        });
        let sqe = match inside {
            Some(i) => opcode::ReadFixed::new(fd, c.ptr, len, i)
                .offset(c.off)
                .build(),
            None => opcode::Read::new(fd, c.ptr, len).offset(c.off).build(),
        }
        .user_data(tag as u64);
        loop {
            // SAFETY: the buffer stays valid until this tag's completion is reaped: `Reader::run`
            // owns the chunk in its in-flight table until then and does not return before.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return;
            }
            // The submission queue is full: hand what is queued to the kernel and retry.
            if let Err(e) = self.ring.submit() {
                wait_error(e);
            }
        }
    }

    fn wait(&mut self, out: &mut Vec<(usize, i64)>) {
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) => wait_error(e),
            }
            for cqe in self.ring.completion() {
                out.push((cqe.user_data() as usize, i64::from(cqe.result())));
            }
            if !out.is_empty() {
                return;
            }
        }
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    unsafe fn register(&mut self, bufs: &[(*mut u8, usize)]) -> bool {
        let iov: Vec<libc::iovec> = bufs
            .iter()
            .map(|&(p, n)| libc::iovec {
                iov_base: p.cast(),
                iov_len: n,
            })
            .collect();
        let _ = self.ring.submitter().unregister_buffers();
        // SAFETY: the caller keeps every region allocated until the engine is dropped.
        match unsafe { self.ring.submitter().register_buffers(&iov) } {
            Ok(()) => {
                self.fixed = bufs.iter().map(|&(p, n)| (p as usize, n)).collect();
                true
            }
            Err(e) => {
                tracing::debug!("io_uring buffer registration refused: {e}");
                self.fixed.clear();
                false
            }
        }
    }
}

/// `io_uring_enter` failing for a reason other than an interruption means the ring's state is
/// unknown while reads may still be writing into our buffers; freeing them would be unsound, so
/// the only safe exit is to stop the process.
fn wait_error(e: std::io::Error) {
    match e.raw_os_error() {
        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY) => {}
        _ => {
            eprintln!("strata: io_uring_enter failed with reads in flight: {e}; aborting");
            std::process::abort();
        }
    }
}
