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

/// Mapped buffers at least this large (one x86-64 huge page) ask for transparent huge pages.
pub const HUGE_PAGE: usize = 2 << 20;

/// Whether large buffers ask the kernel for transparent huge pages (`madvise(MADV_HUGEPAGE)`):
/// yes unless `STRATA_HUGEPAGES=0`. Weights are read once per token from end to end; with 4 KiB
/// pages every page is a TLB miss and a page walk. Measured on an Intel Xeon (Emerald Rapids):
/// gemma3-270m decode +6–12%, qwen2.5-coder-1.5b unchanged (bound by DRAM). Where the system
/// sets THP to `never` the advice is ignored; with `always` it is the default anyway.
pub fn huge_pages() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("STRATA_HUGEPAGES").is_none_or(|v| v != "0"))
}

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
            if size >= HUGE_PAGE && huge_pages() {
                // Advice only: a kernel without THP (or with it set to `never`) says EINVAL or
                // ignores it, and the buffer works the same with small pages.
                // SAFETY: advice on the mapping just made, within its length.
                unsafe { libc::madvise(raw, size, libc::MADV_HUGEPAGE) };
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The `smaps` entry of the mapping that holds `p`: its header and fields.
    fn smaps_of(p: *const u8) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let holds = |l: &str| {
            let range = l.split_whitespace().next().unwrap_or("");
            let Some((a, b)) = range.split_once('-') else {
                return false;
            };
            match (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                (Ok(a), Ok(b)) => (a..b).contains(&(p as usize)),
                _ => false,
            }
        };
        // A header is the only kind of line whose first word is not `Name:`.
        let header = |l: &str| !l.split_whitespace().next().unwrap_or(":").ends_with(':');
        let mut lines = smaps.lines().skip_while(|l| !(header(l) && holds(l)));
        let mut out: Vec<&str> = lines.next().into_iter().collect();
        out.extend(lines.take_while(|l| !header(l)));
        out.join("\n")
    }

    /// Large buffers carry the huge-page advice (`hg` in the mapping's flags), small mapped
    /// ones do not; both read back as zeroes and take writes.
    #[test]
    fn large_buffers_ask_for_huge_pages() {
        assert!(huge_pages(), "STRATA_HUGEPAGES is not 0 in the tests");
        let mut big = AlignedBuf::zeroed(3 * HUGE_PAGE + 12345).unwrap();
        let small = AlignedBuf::zeroed(HUGE_PAGE / 2).unwrap();
        assert!(big.as_slice().iter().all(|&b| b == 0));
        big.as_mut_slice().fill(7);
        let flags = |b: &AlignedBuf| {
            let s = smaps_of(b.as_ptr());
            s.lines()
                .find_map(|l| l.strip_prefix("VmFlags:"))
                .unwrap_or_else(|| panic!("no VmFlags for the mapping at {:p}:\n{s}", b.as_ptr()))
                .split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        assert!(flags(&big).iter().any(|f| f == "hg"), "{:?}", flags(&big));
        assert!(!flags(&small).iter().any(|f| f == "hg"), "{:?}", flags(&small));
    }
}
