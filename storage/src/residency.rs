//! Residency: the one way model code reaches weight bytes (DESIGN.md invariant 1).
//!
//! A model asks [`Weights::acquire`] for a tensor and gets a [`TensorHandle`]: it says which
//! tier the bytes live in now and keeps them there while it is held. Model code never sees a
//! file, an mmap or an offset, so the storage layer is free to stream, evict or prefetch any
//! tensor without the model knowing.
//!
//! In this first form every tensor is loaded once into one aligned RAM buffer at load time.
//! Loading reads the file with plain large `read`s into memory we own (not an mmap), so the
//! resident size is exactly what [`Weights::resident_bytes`] reports and a truncated file is
//! caught at load, not at the first token.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

use crate::gguf::{GgufFile, TensorInfo};

/// Where a tensor's bytes are right now, fastest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// GPU memory.
    Vram,
    /// Page-locked host memory a GPU can copy from directly.
    Pinned,
    /// Ordinary host memory.
    Ram,
    /// Not resident; must be read from the file.
    Ssd,
}

impl Tier {
    pub const fn name(self) -> &'static str {
        match self {
            Tier::Vram => "vram",
            Tier::Pinned => "pinned",
            Tier::Ram => "ram",
            Tier::Ssd => "ssd",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResidencyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: file is {actual} bytes but its header describes {expected} bytes (truncated or modified since it was parsed)"
    )]
    SizeMismatch {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("cannot allocate {bytes} bytes for tensor data")]
    Alloc { bytes: u64 },
    #[error(
        "{path}: the weights need {need_mib} MiB of RAM but only {available_mib} MiB are available (models larger than memory need streaming from SSD, not yet supported)"
    )]
    WontFit {
        path: PathBuf,
        need_mib: u64,
        available_mib: u64,
    },
    #[error("unknown tensor id {0}")]
    UnknownTensor(u32),
}

/// A heap buffer with a chosen alignment (4 KiB here, so the same buffers can later take
/// O_DIRECT reads and be registered with io_uring).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Box<[u8]>; sharing `&AlignedBuf`
// only hands out shared `&[u8]` views.
unsafe impl Send for AlignedBuf {}
// SAFETY: see above; no interior mutability.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub const ALIGN: usize = 4096;

    /// A zeroed buffer of `len` bytes; fails instead of aborting when memory is short.
    pub fn zeroed(len: usize) -> Result<Self, ResidencyError> {
        let size = len.max(1);
        let layout = Layout::from_size_align(size, Self::ALIGN)
            .map_err(|_| ResidencyError::Alloc { bytes: len as u64 })?;
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or(ResidencyError::Alloc { bytes: len as u64 })?;
        Ok(Self { ptr, len, layout })
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `layout.size() >= len` initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
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
        // SAFETY: `ptr` was allocated with exactly `layout` and is freed once.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Bytes this process can still fill without being reclaimed or killed: the kernel's
/// `MemAvailable`, lowered to the room left under a cgroup memory limit (v2 `memory.max`, v1
/// `memory.limit_in_bytes`) when one is set. `None` when none of these can be read.
pub fn available_memory() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let num = |p: &str| read(p).and_then(|s| s.trim().parse::<u64>().ok());
    let meminfo = read("/proc/meminfo").and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    // This process's own group: "0::/path" (v2) or "N:memory:/path" (v1) in /proc/self/cgroup.
    let groups = read("/proc/self/cgroup").unwrap_or_default();
    let v2 = groups.lines().find_map(|l| l.strip_prefix("0::"));
    let v1 = groups.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctrl, path) = (parts.next()?, parts.next()?, parts.next()?);
        ctrl.split(',').any(|c| c == "memory").then_some(path)
    });
    let cgroup = v2
        .and_then(|g| {
            let max = num(&format!("/sys/fs/cgroup{g}/memory.max"))?;
            let cur = num(&format!("/sys/fs/cgroup{g}/memory.current"))?;
            Some(max.saturating_sub(cur))
        })
        .or_else(|| {
            let g = v1?;
            let limit = num(&format!("/sys/fs/cgroup/memory{g}/memory.limit_in_bytes"))?;
            let usage = num(&format!("/sys/fs/cgroup/memory{g}/memory.usage_in_bytes"))?;
            // An unlimited v1 group reports a limit near 2^63.
            (limit < (1 << 60)).then(|| limit.saturating_sub(usage))
        });
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A tensor's index in its model's tensor table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TensorId(u32);

impl TensorId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A held tensor: its bytes stay where [`TensorHandle::tier`] says until the handle is dropped.
#[derive(Clone)]
pub struct TensorHandle {
    buf: Arc<AlignedBuf>,
    start: usize,
    len: usize,
    tier: Tier,
}

impl TensorHandle {
    pub fn bytes(&self) -> &[u8] {
        &self.buf.as_slice()[self.start..self.start + self.len]
    }

    pub fn tier(&self) -> Tier {
        self.tier
    }
}

/// The weights of one model file and where each tensor lives.
pub struct Weights {
    path: PathBuf,
    gguf: GgufFile,
    ids: HashMap<String, TensorId>,
    data: Arc<AlignedBuf>,
}

impl Weights {
    /// Loads every tensor of `gguf` (already parsed from `path`) into RAM.
    pub fn load(path: &Path, gguf: GgufFile) -> Result<Self, ResidencyError> {
        let io = |source| ResidencyError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(io)?;
        let actual = file.metadata().map_err(io)?.len();
        if actual != gguf.file_size {
            return Err(ResidencyError::SizeMismatch {
                path: path.to_path_buf(),
                expected: gguf.file_size,
                actual,
            });
        }
        // The parser guarantees every tensor lies inside [data_offset, file_size).
        let data_len = gguf.file_size.saturating_sub(gguf.data_offset);
        if let Some(available) = available_memory()
            && data_len > available
        {
            return Err(ResidencyError::WontFit {
                path: path.to_path_buf(),
                need_mib: data_len >> 20,
                available_mib: available >> 20,
            });
        }
        let data_len_usize =
            usize::try_from(data_len).map_err(|_| ResidencyError::Alloc { bytes: data_len })?;
        let mut buf = AlignedBuf::zeroed(data_len_usize)?;
        file.seek(SeekFrom::Start(gguf.data_offset)).map_err(io)?;
        // Large reads: one syscall per 8 MiB keeps the page cache's readahead busy.
        for chunk in buf.as_mut_slice().chunks_mut(8 << 20) {
            file.read_exact(chunk).map_err(io)?;
        }
        let ids = gguf
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), TensorId(i as u32)))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            gguf,
            ids,
            data: Arc::new(buf),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed header: metadata and the tensor table.
    pub fn gguf(&self) -> &GgufFile {
        &self.gguf
    }

    pub fn id(&self, name: &str) -> Option<TensorId> {
        self.ids.get(name).copied()
    }

    pub fn info(&self, id: TensorId) -> Result<&TensorInfo, ResidencyError> {
        self.gguf
            .tensors
            .get(id.index())
            .ok_or(ResidencyError::UnknownTensor(id.0))
    }

    /// Holds a tensor resident and returns a view of its bytes.
    pub fn acquire(&self, id: TensorId) -> Result<TensorHandle, ResidencyError> {
        let info = self.info(id)?;
        Ok(TensorHandle {
            buf: Arc::clone(&self.data),
            start: info.offset as usize,
            len: info.n_bytes as usize,
            tier: Tier::Ram,
        })
    }

    /// Bytes resident per tier.
    pub fn resident_bytes(&self) -> Vec<(Tier, u64)> {
        vec![(Tier::Ram, self.data.len() as u64)]
    }
}
