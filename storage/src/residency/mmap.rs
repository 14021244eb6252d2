//! A read-only shared mapping of the whole file: `--mmap`, the way llama.cpp reads models, kept
//! for comparison with streaming (the page cache decides what stays, and a model larger than
//! memory is re-read through small page faults).

use std::fs::File;
use std::os::fd::AsRawFd;

pub(super) struct Mmap {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value until it is dropped.
unsafe impl Send for Mmap {}
// SAFETY: see above; only shared reads are handed out.
unsafe impl Sync for Mmap {}

impl Mmap {
    pub(super) fn map(file: &File, len: usize) -> std::io::Result<Self> {
        if len == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
        }
        // SAFETY: a fresh read-only private mapping of `len` bytes of an open file; the result
        // is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    pub(super) fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `map`, once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
