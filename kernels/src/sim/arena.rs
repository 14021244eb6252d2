//! The simulated GPU's memory: one reserved range of virtual memory, handed out first-fit with
//! a red zone after every buffer, and a shadow byte per 8 bytes that says how many of them are
//! addressable (0 for none: free memory and red zones). The runtime's access checks read the
//! shadow; this side writes it.

use std::collections::BTreeMap;

use crate::device::KernelError;

/// Alignment of every buffer (as `cudaMalloc` gives at least 256 bytes).
const ALIGN: u64 = 256;
/// Unaddressable bytes after each buffer, so that running off its end is caught.
const RED_ZONE: u64 = 256;

pub(crate) struct Arena {
    base: *mut u8,
    size: u64,
    shadow: *mut u8,
    /// Free ranges by offset.
    free: BTreeMap<u64, u64>,
    /// Live buffers: offset → (rounded length, requested length).
    live: BTreeMap<u64, (u64, u64)>,
    /// Bytes counted against the device's memory.
    used: u64,
    capacity: u64,
}

// SAFETY: the raw pointers are to mappings owned by the arena; access is under the device's
// mutex.
unsafe impl Send for Arena {}

fn map(len: u64) -> Result<*mut u8, KernelError> {
    // SAFETY: an anonymous private mapping; no existing memory is touched.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(KernelError::Invalid(format!(
            "cannot reserve {len} bytes of address space for the simulated GPU: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(p.cast())
}

impl Arena {
    /// Device memory of `capacity` bytes.
    pub(crate) fn new(capacity: u64) -> Result<Arena, KernelError> {
        // Room for red zones and alignment on top of the capacity.
        let size = (capacity + (capacity / 8) + (64 << 20)).next_multiple_of(4096 * 8);
        let base = map(size)?;
        let shadow = match map(size / 8) {
            Ok(s) => s,
            Err(e) => {
                // SAFETY: base was mapped above with this size.
                unsafe { libc::munmap(base.cast(), size as usize) };
                return Err(e);
            }
        };
        let mut free = BTreeMap::new();
        // The first page stays unused, so that address 0 of the arena is never a buffer.
        free.insert(4096, size - 4096);
        Ok(Arena {
            base,
            size,
            shadow,
            free,
            live: BTreeMap::new(),
            used: 0,
            capacity,
        })
    }

    pub(crate) fn base(&self) -> u64 {
        self.base as u64
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn shadow(&self) -> *const u8 {
        self.shadow
    }

    /// (free, total) as the device reports them.
    pub(crate) fn memory(&self) -> (usize, usize) {
        ((self.capacity - self.used) as usize, self.capacity as usize)
    }

    /// A buffer of `len` bytes filled with 0xff; returns its device address.
    pub(crate) fn alloc(&mut self, len: u64, device: &str) -> Result<u64, KernelError> {
        let rounded = len.max(1).next_multiple_of(ALIGN);
        let oom = |a: &Arena| KernelError::OutOfMemory {
            device: device.to_string(),
            requested: len as usize,
            free: (a.capacity - a.used) as usize,
            total: a.capacity as usize,
        };
        if self.used + rounded > self.capacity {
            return Err(oom(self));
        }
        let need = rounded + RED_ZONE;
        let Some((&off, &flen)) = self.free.iter().find(|&(_, &l)| l >= need) else {
            return Err(oom(self));
        };
        self.free.remove(&off);
        if flen > need {
            self.free.insert(off + need, flen - need);
        }
        self.live.insert(off, (need, len));
        self.used += rounded;
        // SAFETY: [off, off + len) lies inside the mapping (the free list only holds ranges
        // of it).
        unsafe { std::ptr::write_bytes(self.base.add(off as usize), 0xff, len as usize) };
        self.set_shadow(off, len, true);
        Ok(self.base as u64 + off)
    }

    /// Frees the buffer at `ptr` (a no-op for an address that is not a live buffer).
    pub(crate) fn free(&mut self, ptr: u64) {
        let off = ptr.wrapping_sub(self.base as u64);
        let Some((need, len)) = self.live.remove(&off) else {
            return;
        };
        self.used -= need - RED_ZONE;
        self.set_shadow(off, len, false);
        // Give whole pages back to the system.
        let lo = off.next_multiple_of(4096);
        let hi = (off + need) / 4096 * 4096;
        if hi > lo {
            // SAFETY: [lo, hi) lies inside the freed buffer, inside the mapping.
            unsafe {
                libc::madvise(
                    self.base.add(lo as usize).cast(),
                    (hi - lo) as usize,
                    libc::MADV_DONTNEED,
                )
            };
        }
        // Coalesce with the free neighbours.
        let (mut start, mut end) = (off, off + need);
        if let Some((&p, &l)) = self.free.range(..start).next_back()
            && p + l == start
        {
            self.free.remove(&p);
            start = p;
        }
        if let Some(&l) = self.free.get(&end) {
            self.free.remove(&end);
            end += l;
        }
        self.free.insert(start, end - start);
    }

    fn set_shadow(&mut self, off: u64, len: u64, live: bool) {
        debug_assert!(off.is_multiple_of(8));
        let g0 = (off / 8) as usize;
        let full = (len / 8) as usize;
        let rest = (len % 8) as u8;
        // SAFETY: the shadow mapping has size/8 bytes and off + len < size.
        unsafe {
            let s = self.shadow.add(g0);
            std::ptr::write_bytes(s, if live { 8 } else { 0 }, full);
            if rest != 0 {
                *s.add(full) = if live { rest } else { 0 };
            }
        }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: both mappings were made in `new` with these sizes and are not used after.
        unsafe {
            libc::munmap(self.base.cast(), self.size as usize);
            libc::munmap(self.shadow.cast(), (self.size / 8) as usize);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_poisoned_bounded_and_reused() {
        let mut a = Arena::new(1 << 20).unwrap();
        let p = a.alloc(100, "sim").unwrap();
        let off = (p - a.base()) as usize;
        // SAFETY: p is a live 100-byte buffer.
        let bytes = unsafe { std::slice::from_raw_parts(p as *const u8, 100) };
        assert!(bytes.iter().all(|&b| b == 0xff));
        // SAFETY: the shadow covers the arena.
        let shadow = unsafe { std::slice::from_raw_parts(a.shadow().add(off / 8), 14) };
        assert_eq!(&shadow[..12], &[8; 12]);
        assert_eq!(shadow[12], 4, "the last 4 bytes of 100");
        assert_eq!(shadow[13], 0, "red zone");
        a.free(p);
        assert_eq!(a.memory().0, 1 << 20);
        // SAFETY: as above.
        assert_eq!(
            unsafe { *a.shadow().add(off / 8) },
            0,
            "freed memory is unaddressable"
        );
        let q = a.alloc(100, "sim").unwrap();
        assert_eq!(p, q, "freed ranges are coalesced and reused");
    }

    #[test]
    fn running_out_names_the_sizes() {
        let mut a = Arena::new(4096).unwrap();
        let _p = a.alloc(4000, "sim").unwrap();
        match a.alloc(512, "sim") {
            Err(KernelError::OutOfMemory {
                requested, total, ..
            }) => {
                assert_eq!(requested, 512);
                assert_eq!(total, 4096);
            }
            other => panic!("{other:?}"),
        }
    }
}
