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

/// [`AlignedBuf::zeroed_huge`] buffers at least this large (one x86-64 huge page) ask for
/// transparent huge pages.
pub const HUGE_PAGE: usize = 2 << 20;

/// Whether [`AlignedBuf::zeroed_huge`] asks the kernel for transparent huge pages
/// (`madvise(MADV_HUGEPAGE)`): only with `STRATA_HUGEPAGES=1`. Resident weights are read from
/// end to end every token, and with 4 KiB pages every page is a TLB miss. On an Intel Xeon
/// (Emerald Rapids, 260 MiB L3) huge pages raised gemma3-270m decode by 4–12% (its weights
/// mostly stay in that L3) and qwen2.5-coder-1.5b's by 0–4% (bound by DRAM), but a load took
/// 0.2–0.6 s longer per GiB (the kernel zeroes each 2 MiB page at first touch; with 4 KiB pages
/// most of that was not seen) and a `--ram-budget 50%` load of qwen 1.6–1.7 s instead of 0.6.
/// A gain that small does not pay for that by default.
pub fn huge_pages() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| huge_pages_from(std::env::var_os("STRATA_HUGEPAGES").as_deref()))
}

/// `STRATA_HUGEPAGES`'s value read: on only for `1`.
fn huge_pages_from(v: Option<&std::ffi::OsStr>) -> bool {
    v.is_some_and(|v| v == "1")
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
        Self::alloc(len, false)
    }

    /// As [`AlignedBuf::zeroed`], in transparent huge pages where the system grants them
    /// ([`huge_pages`]): for what stays for the process's life and is read end to end (the
    /// resident weights). Not for buffers that come and go or fill by disk reads (stream slots,
    /// the expert cache, KV pages), which gain nothing in a decode bound by the disk.
    pub fn zeroed_huge(len: usize) -> Result<Self, AllocError> {
        Self::alloc(len, huge_pages())
    }

    fn alloc(len: usize, huge: bool) -> Result<Self, AllocError> {
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
            if huge && size >= HUGE_PAGE {
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

    /// Large buffers asked for in huge pages carry the advice (`hg` in the mapping's flags);
    /// small ones and `zeroed` ones do not; all read back as zeroes and take writes.
    #[test]
    fn large_buffers_ask_for_huge_pages() {
        let mut big = AlignedBuf::alloc(3 * HUGE_PAGE + 12345, true).unwrap();
        let small = AlignedBuf::alloc(HUGE_PAGE / 2, true).unwrap();
        let plain = AlignedBuf::zeroed(3 * HUGE_PAGE).unwrap();
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
        assert!(
            !flags(&small).iter().any(|f| f == "hg"),
            "{:?}",
            flags(&small)
        );
        assert!(
            !flags(&plain).iter().any(|f| f == "hg"),
            "{:?}",
            flags(&plain)
        );
    }

    #[test]
    fn huge_pages_are_asked_for_only_with_strata_hugepages_1() {
        use std::ffi::OsStr;
        assert!(huge_pages_from(Some(OsStr::new("1"))));
        for v in [None, Some("0"), Some(""), Some("yes")] {
            assert!(!huge_pages_from(v.map(OsStr::new)), "{v:?}");
        }
    }
}
