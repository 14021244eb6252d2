//! Host buffers aligned for `O_DIRECT` reads and io_uring registration.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;

#[derive(Debug, thiserror::Error)]
#[error("cannot allocate {bytes} bytes")]
pub struct AllocError {
    pub bytes: u64,
}

/// A zeroed heap buffer aligned to 4 KiB, so that the same memory can take `O_DIRECT` reads
/// and be registered with io_uring.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// `Some`: allocated from the heap with this layout; `None`: an anonymous mapping of
    /// `len` rounded up to pages (large buffers: returned to the kernel exactly on drop, so a
    /// cache that churns through them keeps an honest resident size).
    layout: Option<Layout>,
}

/// Buffers at least this large are mapped rather than taken from the heap.
const MAP_THRESHOLD: usize = 256 << 10;

// SAFETY: AlignedBuf owns its allocation exclusively, like a Box<[u8]>; sharing `&AlignedBuf`
// only hands out shared `&[u8]` views (writers through `as_ptr` synchronise themselves).
unsafe impl Send for AlignedBuf {}
// SAFETY: see above.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub const ALIGN: usize = 4096;

    /// A zeroed buffer of `len` bytes; fails instead of aborting when memory is short.
    pub fn zeroed(len: usize) -> Result<Self, AllocError> {
        let size = len.max(1).next_multiple_of(Self::ALIGN);
        if size >= MAP_THRESHOLD {
            // SAFETY: a fresh private anonymous mapping; the result is checked before use.
            let raw = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if raw == libc::MAP_FAILED {
                return Err(AllocError { bytes: len as u64 });
            }
            let ptr = NonNull::new(raw.cast()).ok_or(AllocError { bytes: len as u64 })?;
            return Ok(Self {
                ptr,
                len,
                layout: None,
            });
        }
        let layout = Layout::from_size_align(size, Self::ALIGN)
            .map_err(|_| AllocError { bytes: len as u64 })?;
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or(AllocError { bytes: len as u64 })?;
        Ok(Self {
            ptr,
            len,
            layout: Some(layout),
        })
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `layout.size() >= len` initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The start of the buffer, for writers that synchronise access themselves.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        match self.layout {
            // SAFETY: `ptr` was allocated with exactly `layout` and is freed once.
            Some(layout) => unsafe { dealloc(self.ptr.as_ptr(), layout) },
            // SAFETY: unmaps exactly the mapping made in `zeroed`, once.
            None => unsafe {
                libc::munmap(
                    self.ptr.as_ptr().cast(),
                    self.len.max(1).next_multiple_of(Self::ALIGN),
                );
            },
        }
    }
}
