//! Residency: the one way model code reaches weight bytes (DESIGN.md invariant 1).
//!
//! A model asks [`Weights::acquire`] for a tensor and gets a [`TensorHandle`]: it says which
//! tier the bytes live in now and keeps them there while it is held. Model code never sees a
//! file, an mmap or an offset, so the storage layer is free to stream, evict or prefetch any
//! tensor without the model knowing.
//!
//! Three ways to hold the weights, chosen at load ([`LoadOptions`]):
//! - **resident** (the default when the model fits): every tensor is read once, with large
//!   `O_DIRECT` reads through [`crate::io::Reader`], into one aligned buffer we own, so the
//!   resident size is exactly what [`Weights::resident_bytes`] reports;
//! - **streamed** (under `--ram-budget`, or when the model does not fit in available memory):
//!   [`plan`] keeps the hot set resident and streams the other layers through a window of slot
//!   buffers that an I/O thread fills ahead of the computation (`stream`). With `O_DIRECT` the
//!   page cache holds no second copy, so the budget is honest;
//! - **mapped** (`--mmap`): the file is mapped and the page cache decides, as llama.cpp does.
//!
//! A truncated file is caught at load (its size must match its header), never at a token.

mod experts;
mod mmap;
pub mod overrides;
pub mod plan;
mod size;
mod stream;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::buf::AlignedBuf;
use crate::gguf::{GgufFile, TensorInfo};
use crate::io::{IoError, IoKind, IoStats, ReadReq, Reader, ReaderOptions};
pub use experts::Policy as ExpertPolicy;
use plan::{Access, BudgetTooSmall, Place, PlanTensor};
pub use size::parse_size;

/// Where a tensor's bytes are right now, fastest first. (GPU memory and page-locked host
/// memory join when there is a GPU backend to use them.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// Ordinary host memory.
    Ram,
    /// Not resident; must be read from the file.
    Ssd,
}

impl Tier {
    pub const fn name(self) -> &'static str {
        match self {
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
    #[error(transparent)]
    Read(Arc<IoError>),
    #[error(transparent)]
    Budget(#[from] BudgetTooSmall),
    #[error("unknown tensor id {0}")]
    UnknownTensor(u32),
    #[error("tensor {tensor} is held in {parts} parts; there is no part {part}")]
    NoPart {
        tensor: String,
        part: usize,
        parts: usize,
    },
    #[error("tensor {tensor}: {problem}")]
    BadRows { tensor: String, problem: String },
    #[error("tensor {tensor} has no expert {expert} (it is not a stack of {expert}+ experts)")]
    NoExpert { tensor: String, expert: usize },
    /// The plan placed a tensor where the way the weights are held cannot reach it (a bug).
    #[error("tensor {0} is placed where its backing cannot reach it")]
    Unreachable(String),
    /// A placement override that cannot be carried out (`-ot`, `--cpu-moe`).
    #[error("{0}")]
    Override(String),
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

/// What a model does to an expert's slab after each read from disk, before any handle shows
/// it (the engine's CPU executor repacks it into its kernels' layout): called with the tensor
/// and the slab's bytes.
pub type Prepare = Arc<dyn Fn(TensorId, &mut [u8]) + Send + Sync>;

/// What a model does to a streamed layer group's matrix after a read, while asked to
/// ([`Weights::prepare_groups_on_read`]): called with the tensor and its bytes in the slot;
/// `false` when it left them unchanged (the read is then made again, unprepared).
pub type PrepareChecked = Arc<dyn Fn(TensorId, &mut [u8]) -> bool + Send + Sync>;

/// A tensor's index in its model's tensor table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TensorId(u32);

impl TensorId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// What keeps a handle's bytes where they are (held only for its `Drop`).
#[derive(Clone)]
#[expect(dead_code, reason = "the fields are held for their Drop")]
enum Keep {
    Buf(Arc<AlignedBuf>),
    Map(Arc<mmap::Mmap>),
    Slot(stream::SlotPin),
}

/// A held tensor: its bytes stay where [`TensorHandle::tier`] says until the handle is dropped.
#[derive(Clone)]
pub struct TensorHandle {
    ptr: *const u8,
    len: usize,
    tier: Tier,
    /// The bytes went through the streamed groups' preparation
    /// ([`Weights::prepare_groups_on_read`]) on their way here.
    prepared: bool,
    _keep: Keep,
}

// SAFETY: a handle is a read-only view of bytes that `_keep` (an `Arc` of a buffer or mapping,
// or a pin of a window slot, all shareable across threads) keeps alive and unwritten while it
// lives; nothing about it is tied to the thread that acquired it.
unsafe impl Send for TensorHandle {}
// SAFETY: as above; shared access only reads.
unsafe impl Sync for TensorHandle {}

impl TensorHandle {
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `keep` holds the buffer, mapping or pinned slot that `ptr..ptr + len` lies in
        // for as long as this handle lives, and nothing writes to it meanwhile.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn tier(&self) -> Tier {
        self.tier
    }

    /// Whether these bytes are a streamed group's matrix that the preparation set by
    /// [`Weights::prepare_groups_on_read`] rewrote after its read (else they are the file's).
    pub fn prepared(&self) -> bool {
        self.prepared
    }
}

/// How to hold a model's weights.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Bytes of RAM the weights may use. `None`: all of them when they fit in available memory,
    /// else 70% of what is available, streaming the rest.
    pub ram_budget: Option<u64>,
    /// Streaming buffers (the layer computing plus those read ahead); at least 2.
    pub window: Option<usize>,
    /// Map the file instead of reading it (the page cache decides what stays in RAM).
    pub mmap: bool,
    /// How the model reads each tensor in a step, in the file's tensor order (the engine's
    /// name table fills this in: storage knows nothing about models). Tensors past its end
    /// are [`TensorUse::Other`].
    pub tensor_uses: Vec<TensorUse>,
    pub io: ReaderOptions,
    /// How the expert cache chooses what to evict (`STRATA_EXPERT_POLICY`, for comparisons).
    pub expert_policy: ExpertPolicy,
    /// Placement rules (`-ot`, `--cpu-moe`), tried in order against each tensor's name.
    pub overrides: Vec<overrides::TensorOverride>,
}

impl LoadOptions {
    /// Options from settings as a user writes them: the RAM budget as a size or a share of
    /// `whole` bytes ("6G", "30%") and `PATTERN=TYPE` placement rules. An error names the
    /// setting as the caller calls it (`names`: the budget's, the rules').
    pub fn from_settings(
        ram_budget: Option<&str>,
        whole: u64,
        rules: &[String],
        names: (&str, &str),
    ) -> Result<Self, String> {
        let ram_budget = ram_budget
            .map(|s| parse_size(s, whole).map_err(|e| format!("{} {s:?}: {e}", names.0)))
            .transpose()?;
        let mut overrides = Vec::new();
        for r in rules {
            overrides
                .extend(overrides::parse_overrides(r).map_err(|e| format!("{}: {e}", names.1))?);
        }
        Ok(Self {
            ram_budget,
            overrides,
            ..Self::default()
        })
    }
}

/// How a model reads a tensor during a step: what the planner groups and streams by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TensorUse {
    /// Whole, once per step, with layer N's tensors.
    Layer(usize),
    /// Stacked experts of layer N (`[cols, rows, n_expert]`): a step reads a few of them, so
    /// under a budget they stay on disk and single experts are read into the expert cache.
    Experts(usize),
    /// A few rows at a time (an embedding table that is not also the output): under a budget
    /// it stays on disk and rows are read on demand.
    Rows,
    /// Whole, once per step, after the layers (the output projection and the rest).
    #[default]
    Other,
}

enum Backing {
    Mapped(Arc<mmap::Mmap>),
    Read {
        hot: Arc<AlignedBuf>,
        streamer: Option<stream::Streamer>,
        /// Reads rows of cold tensors (its own reader, so it never waits behind a layer read).
        cold: Option<Box<Reader>>,
        /// Single experts of stacked MoE tensors that are not resident.
        experts: Option<Box<experts::ExpertCache>>,
    },
}

/// How a model's weights are held.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ResidencyMode {
    /// Every tensor read once into memory this process owns.
    #[default]
    Resident,
    /// Some layers, experts or rows read from disk during the steps.
    Streamed,
    /// The file mapped (the page cache decides).
    Mapped,
}

impl ResidencyMode {
    /// As `--verbose`, `/api/ps` and `/metrics` print it.
    pub const fn name(self) -> &'static str {
        match self {
            ResidencyMode::Resident => "resident",
            ResidencyMode::Streamed => "streamed",
            ResidencyMode::Mapped => "mmap",
        }
    }
}

impl std::fmt::Display for ResidencyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the weights are and how reading them went, for `--verbose`, `bench` and `/metrics`.
#[derive(Clone, Debug, Default)]
pub struct ResidencyStats {
    pub mode: ResidencyMode,
    /// "io_uring" or "pread" (empty for mmap).
    pub io: &'static str,
    pub direct: bool,
    /// RAM held for weights (resident set plus streaming window).
    pub ram_bytes: u64,
    /// Bytes read from the file per pass through the layers (0 when nothing streams).
    pub streamed_per_pass: u64,
    pub resident_layers: usize,
    pub streamed_layers: usize,
    pub window: usize,
    /// Acquires served from the resident set.
    pub hot_hits: u64,
    /// Acquires of streamed groups found ready in the window.
    pub window_hits: u64,
    /// Acquires that waited for a read already under way.
    pub stalls: u64,
    /// Acquires that had to start their own read.
    pub misses: u64,
    pub prefetches: u64,
    /// Reads of streamed groups whose matrices were prepared ([`Weights::prepare_groups_on_read`]).
    pub groups_prepared: u64,
    /// Rows read on demand from cold tensors.
    pub cold_rows: u64,
    /// Expert cache (MoE models whose experts are not all resident): hits, misses (read on
    /// demand), prefetches issued, hits on prefetched experts, bytes held.
    pub expert_hits: u64,
    pub expert_misses: u64,
    pub expert_prefetches: u64,
    pub expert_prefetch_hits: u64,
    pub expert_cache_bytes: u64,
    /// Time the forward pass waited for experts being read.
    pub expert_wait: std::time::Duration,
    /// What the expert cache read (its requests are `chunks` when each is at most a chunk).
    pub expert_read: IoStats,
    pub expert_policy: &'static str,
    /// Time acquires waited for reads.
    pub stall: Duration,
    /// Everything read since load (including the resident set).
    pub read: IoStats,
}

/// A strided tensor's place in its group's records (strata's layout, `strata optimize`): the
/// group's first tensor (whose index names the record in the expert cache), where this
/// tensor's slice lies in a record, and how many bytes of a record hold slices. `counts`: this
/// tensor's use of a record is the one counted in the cache's hits and misses (the first of
/// the group that streams; the others are pinned by `-ot` or share the read).
#[derive(Clone, Copy, Debug)]
struct Record {
    first: u32,
    at: u64,
    len: u64,
    counts: bool,
}

/// Where expert `e` of a stacked tensor is read from: the cache key, the file range read for
/// it (the slab, or its whole record when strided), where the slab lies in that range, and
/// whether its use is the one counted in hit rates.
struct SlabLoc {
    key: experts::Key,
    start: u64,
    len: usize,
    at: usize,
    slab: usize,
    counts: bool,
}

/// The records of every strided tensor (indexed as the tensor table), in the groups the parser
/// checked ([`crate::gguf::strided_groups`]). `cold`: whether a tensor streams through the
/// expert cache.
fn records(gguf: &GgufFile, cold: impl Fn(usize) -> bool) -> Vec<Option<Record>> {
    let mut out = vec![None; gguf.tensors.len()];
    for group in crate::gguf::strided_groups(&gguf.tensors) {
        let first = group[0];
        let base = gguf.tensors[first].offset;
        let at = |i: usize| gguf.tensors[i].offset - base;
        let len = group
            .iter()
            .map(|&i| at(i) + gguf.tensors[i].slices().1)
            .max()
            .unwrap_or(0);
        // In offset order: the first that streams counts.
        let counted = group.iter().copied().find(|&i| cold(i));
        for &i in &group {
            out[i] = Some(Record {
                first: first as u32,
                at: at(i),
                len,
                counts: counted == Some(i),
            });
        }
    }
    out
}

/// The weights of one model file and where each tensor lives.
pub struct Weights {
    path: PathBuf,
    gguf: GgufFile,
    ids: HashMap<String, TensorId>,
    places: Vec<Place>,
    /// Per tensor: its record, when strided.
    records: Vec<Option<Record>>,
    /// The expert keys of a routing or a guess, kept for their capacity.
    keys: std::sync::Mutex<Vec<(experts::Key, u64, usize)>>,
    backing: Backing,
    /// The I/O engine reading the file (`None` when mapped).
    io_kind: Option<IoKind>,
    summary: ResidencyStats,
    hot_hits: AtomicU64,
    cold_rows: AtomicU64,
}

/// Applies the placement rules to the tensor table: the names held in RAM whatever the budget,
/// or an error naming a tensor sent where it cannot go. Logs what each rule matched, and warns
/// of a rule that matched nothing (llama.cpp ignores those silently).
fn check_overrides(
    gguf: &GgufFile,
    rules: &[overrides::TensorOverride],
    mmap: bool,
) -> Result<std::collections::HashSet<String>, ResidencyError> {
    use overrides::Target;
    let mut pins = std::collections::HashSet::new();
    if rules.is_empty() {
        return Ok(pins);
    }
    let mut matched = vec![0usize; rules.len()];
    for t in &gguf.tensors {
        let Some(i) = rules.iter().position(|r| r.pattern.is_match(&t.name)) else {
            continue;
        };
        matched[i] += 1;
        match rules[i].target {
            Target::Cpu => {}
            Target::Ram if mmap => {
                return Err(ResidencyError::Override(format!(
                    "tensor {} is placed in RAM by the override {:?}, but --mmap leaves \
                     residency to the page cache (drop --mmap, or use CPU)",
                    t.name,
                    rules[i].pattern.as_str()
                )));
            }
            Target::Ram => {
                pins.insert(t.name.clone());
            }
            // The engine places GPU tensors (and refuses them without a GPU); for storage they
            // are read like any other.
            Target::Gpu(_) => {}
        }
    }
    for (r, n) in rules.iter().zip(matched) {
        if n == 0 {
            tracing::warn!(
                "tensor override {:?}={} matches no tensor",
                r.pattern.as_str(),
                r.target
            );
        } else {
            tracing::info!(
                "tensor override {:?}={}: {n} tensors",
                r.pattern.as_str(),
                r.target
            );
        }
    }
    Ok(pins)
}

/// Rows of a tensor: every dimension but the innermost.
fn rows_of(t: &TensorInfo) -> u64 {
    t.dims.iter().skip(1).product::<u64>().max(1)
}

fn read_err(e: IoError) -> ResidencyError {
    ResidencyError::Read(Arc::new(e))
}

/// Reads `len` bytes at `start` of the file into a buffer of their aligned pages; returns it
/// and where the bytes begin in it.
fn read_span(
    reader: &Reader,
    start: u64,
    len: usize,
) -> Result<(Arc<AlignedBuf>, usize), ResidencyError> {
    let a = crate::io::DIRECT_ALIGN as u64;
    let lo = start / a * a;
    let hi = (start + len as u64).next_multiple_of(a);
    let mut buf = AlignedBuf::zeroed((hi - lo) as usize)
        .map_err(|e| ResidencyError::Alloc { bytes: e.bytes })?;
    let skip = (start - lo) as usize;
    reader
        .read(&mut [ReadReq {
            offset: lo,
            buf: buf.as_mut_slice(),
            need: skip + len,
            fixed: None,
        }])
        .map_err(read_err)?;
    Ok((Arc::new(buf), skip))
}

fn io_err(path: &Path, source: std::io::Error) -> ResidencyError {
    ResidencyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn usize_of(b: u64) -> Result<usize, ResidencyError> {
    usize::try_from(b).map_err(|_| ResidencyError::Alloc { bytes: b })
}

/// Each tensor's name to its id.
fn tensor_ids(gguf: &GgufFile) -> HashMap<String, TensorId> {
    gguf.tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), TensorId(i as u32)))
        .collect()
}

/// The tensor table as the planner sees it: file ranges, and how the model reads each tensor
/// (`opts.tensor_uses`), under a budget or not.
fn plan_tensors(
    gguf: &GgufFile,
    opts: &LoadOptions,
    pins: &std::collections::HashSet<String>,
    budget: bool,
) -> Vec<PlanTensor> {
    gguf.tensors
        .iter()
        .enumerate()
        .map(|(i, t)| PlanTensor {
            start: gguf.data_offset + t.offset,
            // A strided tensor's range holds its group's other tensors too: the planner
            // merges the overlapping ranges and places each tensor in them.
            len: t.span(),
            n_dims: t.dims.len(),
            rows: rows_of(t),
            pin: pins.contains(&t.name),
            // Embedding tables read by rows, and (under a budget) stacked experts, of which a
            // step uses a few: both stay on disk until needed (strided ones always: they
            // cannot be cut by rows).
            access: match opts.tensor_uses.get(i).copied().unwrap_or_default() {
                TensorUse::Rows => Access::Rows,
                TensorUse::Experts(_) if budget => Access::Rows,
                _ if budget && t.stride.is_some() => Access::Rows,
                TensorUse::Layer(l) | TensorUse::Experts(l) => Access::Cycle(Some(l)),
                TensorUse::Other => Access::Cycle(None),
            },
        })
        .collect()
}

/// The plan's resident set, read as its merged extents into one aligned buffer.
fn read_hot(reader: &Reader, plan: &plan::Plan) -> Result<AlignedBuf, ResidencyError> {
    let mut hot = AlignedBuf::zeroed_huge(usize_of(plan.hot_bytes)?)
        .map_err(|e| ResidencyError::Alloc { bytes: e.bytes })?;
    let mut reqs = Vec::with_capacity(plan.hot.len());
    let mut rest = hot.as_mut_slice();
    let mut at = 0u64;
    for e in &plan.hot {
        let (_, tail) = rest.split_at_mut((e.dst - at) as usize);
        let (buf, tail) = tail.split_at_mut(e.len as usize);
        reqs.push(ReadReq {
            offset: e.start,
            buf,
            need: e.need as usize,
            fixed: None,
        });
        rest = tail;
        at = e.dst + e.len;
    }
    reader.read(&mut reqs).map_err(read_err)?;
    drop(reqs);
    Ok(hot)
}

impl Weights {
    /// Loads `gguf` (already parsed from `path`) as `opts` say.
    pub fn open(path: &Path, gguf: GgufFile, opts: &LoadOptions) -> Result<Self, ResidencyError> {
        let file = File::open(path).map_err(|e| io_err(path, e))?;
        let actual = file.metadata().map_err(|e| io_err(path, e))?.len();
        if actual != gguf.file_size {
            return Err(ResidencyError::SizeMismatch {
                path: path.to_path_buf(),
                expected: gguf.file_size,
                actual,
            });
        }
        let pins = check_overrides(&gguf, &opts.overrides, opts.mmap)?;
        if opts.mmap {
            return Self::open_mapped(path, &file, gguf);
        }
        drop(file);
        Self::open_read(path, gguf, opts, &pins)
    }

    /// Every tensor in a mapping of the file (`--mmap`).
    fn open_mapped(path: &Path, file: &File, gguf: GgufFile) -> Result<Self, ResidencyError> {
        let len = usize::try_from(gguf.file_size).map_err(|_| ResidencyError::Alloc {
            bytes: gguf.file_size,
        })?;
        let map = Arc::new(mmap::Mmap::map(file, len).map_err(|e| io_err(path, e))?);
        let places = gguf
            .tensors
            .iter()
            .map(|t| Place::Hot(gguf.data_offset + t.offset))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            records: records(&gguf, |_| false),
            keys: Default::default(),
            ids: tensor_ids(&gguf),
            places,
            backing: Backing::Mapped(map),
            io_kind: None,
            summary: ResidencyStats {
                mode: ResidencyMode::Mapped,
                // The parser guarantees every tensor lies inside [data_offset, file_size).
                ram_bytes: gguf.file_size.saturating_sub(gguf.data_offset),
                ..ResidencyStats::default()
            },
            gguf,
            hot_hits: AtomicU64::new(0),
            cold_rows: AtomicU64::new(0),
        })
    }

    /// The tensors read with our own reader: the resident set at once, the rest (under a
    /// budget) streamed by layer, by rows or by expert as the plan says.
    fn open_read(
        path: &Path,
        gguf: GgufFile,
        opts: &LoadOptions,
        pins: &std::collections::HashSet<String>,
    ) -> Result<Self, ResidencyError> {
        let data_len = gguf.file_size.saturating_sub(gguf.data_offset);
        let budget = opts.ram_budget.or_else(|| {
            let available = available_memory()?;
            (data_len > available / 10 * 9).then(|| {
                tracing::info!(
                    "{}: {} MiB of weights in {} MiB of available memory: streaming from disk",
                    path.display(),
                    data_len >> 20,
                    available >> 20
                );
                available / 10 * 7
            })
        });
        let tensors = plan_tensors(&gguf, opts, pins, budget.is_some());
        let plan = plan::plan(&tensors, gguf.file_size, budget, opts.window)?;
        let reader = Reader::open(path, &opts.io).map_err(read_err)?;
        let hot = read_hot(&reader, &plan)?;
        let has_cold = plan.places.iter().any(|p| matches!(p, Place::Cold));
        let cold = if has_cold {
            Some(Box::new(Reader::open(path, &opts.io).map_err(read_err)?))
        } else {
            None
        };
        let stacked_cold = gguf
            .tensors
            .iter()
            .zip(&plan.places)
            .any(|(t, p)| matches!(p, Place::Cold) && t.dims.len() == 3);
        let experts = if stacked_cold {
            let cache_budget = budget.unwrap_or(0).saturating_sub(plan.ram_bytes());
            tracing::info!(
                "{}: experts stream from disk through a {} MiB cache",
                path.display(),
                cache_budget >> 20
            );
            let readers = (0..=experts::IO_THREADS)
                .map(|_| Reader::open(path, &opts.io).map_err(read_err))
                .collect::<Result<Vec<_>, _>>()?;
            Some(Box::new(
                experts::ExpertCache::with_policy(readers, cache_budget, opts.expert_policy)
                    .map_err(|e| io_err(path, e))?,
            ))
        } else {
            None
        };
        let mut summary = ResidencyStats {
            mode: if plan.groups.is_empty() && !has_cold {
                ResidencyMode::Resident
            } else {
                ResidencyMode::Streamed
            },
            io: reader.kind().name(),
            direct: reader.is_direct(),
            ram_bytes: plan.ram_bytes(),
            streamed_per_pass: plan.streamed_bytes(),
            resident_layers: plan.resident_layers,
            streamed_layers: plan.n_layers - plan.resident_layers,
            window: plan.window,
            read: reader.stats(),
            ..ResidencyStats::default()
        };
        let io_kind = Some(reader.kind());
        let streamer = if plan.groups.is_empty() {
            summary.window = 0;
            None
        } else {
            tracing::info!(
                "{}: {} of {} layers resident, {} groups streamed through {} buffers of {} MiB ({} MiB of RAM for weights)",
                path.display(),
                plan.resident_layers,
                plan.n_layers,
                plan.groups.len(),
                plan.window,
                plan.slot_bytes >> 20,
                plan.ram_bytes() >> 20
            );
            Some(stream::Streamer::new(
                reader,
                plan.groups,
                plan.window,
                usize_of(plan.slot_bytes)?,
            )?)
        };
        Ok(Self {
            path: path.to_path_buf(),
            records: records(&gguf, |i| matches!(plan.places.get(i), Some(Place::Cold))),
            keys: Default::default(),
            ids: tensor_ids(&gguf),
            gguf,
            places: plan.places,
            backing: Backing::Read {
                hot: Arc::new(hot),
                streamer,
                cold,
                experts,
            },
            io_kind,
            summary,
            hot_hits: AtomicU64::new(0),
            cold_rows: AtomicU64::new(0),
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

    fn place(&self, id: TensorId) -> Result<&Place, ResidencyError> {
        self.places
            .get(id.index())
            .ok_or(ResidencyError::UnknownTensor(id.0))
    }

    /// Rewrites a resident tensor's bytes in place with `f` (a layout change of the same size,
    /// such as interleaving rows for the decode kernels), before any handle to it exists.
    /// Returns `Ok(false)` without calling `f` when the tensor is not resident in this
    /// process's own memory (streamed, cold, mapped from the file, or already handed out):
    /// such bytes are read again from the file and must keep the file's layout.
    pub fn rewrite_resident<E>(
        &mut self,
        id: TensorId,
        f: impl FnOnce(&mut [u8]) -> Result<bool, E>,
    ) -> Result<bool, E> {
        let (Some(info), Some(Place::Hot(off))) = (
            self.gguf.tensors.get(id.index()),
            self.places.get(id.index()),
        ) else {
            return Ok(false);
        };
        if info.stride.is_some() {
            return Ok(false);
        }
        let (off, len) = (*off as usize, info.n_bytes as usize);
        let Backing::Read { hot, .. } = &mut self.backing else {
            return Ok(false);
        };
        match Arc::get_mut(hot) {
            Some(buf) if off + len <= buf.len() => f(&mut buf.as_mut_slice()[off..off + len]),
            _ => Ok(false),
        }
    }

    /// Has `prepare` run on every later read of those of `ids` whose experts are read from
    /// disk one by one into the expert cache (`prepare` sees one expert's slab, before the
    /// slab enters the cache, so a cached expert is prepared once for all its uses). Returns
    /// those; the others are left alone (resident ones are the caller's to rewrite,
    /// [`Weights::rewrite_resident`]). Slabs read before are read again. Once per weights; an
    /// error while a slab is held.
    ///
    /// Streamed layer groups are read once per use, so their preparation is switched on and
    /// off ([`Weights::prepare_groups_on_read`]): always on, a pass over them on the streaming
    /// thread (measured: qwen2.5-coder-1.5b with half its layers streamed, 3.3 against 1.5
    /// tokens/s) holds up the next decode step's read for longer than it saves.
    pub fn prepare_on_read(
        &self,
        ids: &[TensorId],
        prepare: Prepare,
    ) -> Result<Vec<TensorId>, ResidencyError> {
        let Some(x) = self.expert_cache() else {
            return Ok(Vec::new());
        };
        let mut taken = Vec::new();
        let mut slabs: HashMap<u32, Vec<(TensorId, usize, usize)>> = HashMap::new();
        for &id in ids {
            let info = self.info(id)?;
            if matches!(self.place(id)?, Place::Cold) && info.dims.len() == 3 {
                let loc = self.slab_loc(id, 0)?;
                slabs
                    .entry(loc.key.0)
                    .or_default()
                    .push((id, loc.at, loc.slab));
                taken.push(id);
            }
        }
        if slabs.is_empty() {
            return Ok(taken);
        }
        x.set_prepare(Box::new(move |key, bytes| {
            for &(id, at, len) in slabs.get(&key.0).into_iter().flatten() {
                if let Some(slab) = bytes.get_mut(at..at + len) {
                    prepare(id, slab);
                }
            }
        }))
        .map_err(ResidencyError::Unreachable)?;
        Ok(taken)
    }

    /// Has `prepare` run, while [`Weights::set_preparing`] asks, on later reads of those of
    /// `ids` that stream as part of a layer group (held whole in a streaming slot, not cut by
    /// rows), each on its bytes in the slot before any handle shows them; the handles of
    /// prepared bytes say so ([`TensorHandle::prepared`]), those of other reads show the
    /// file's. Returns those; once per weights (later calls take nothing).
    ///
    /// Streamed groups are read again every step, so the pass is worth making only when a
    /// step does enough work per byte (a prompt's batch, not a decode step): the caller
    /// switches it on and off.
    pub fn prepare_groups_on_read(
        &self,
        ids: &[TensorId],
        prepare: PrepareChecked,
    ) -> Result<Vec<TensorId>, ResidencyError> {
        let Backing::Read {
            streamer: Some(s), ..
        } = &self.backing
        else {
            return Ok(Vec::new());
        };
        let mut by_group: Vec<Vec<(usize, usize, TensorId)>> =
            vec![Vec::new(); s.shared().n_groups()];
        let mut taken = Vec::new();
        for &id in ids {
            let info = self.info(id)?;
            if info.stride.is_some() {
                continue;
            }
            if let Place::Group { group, offset } = self.place(id)?
                && let Some(list) = by_group.get_mut(*group)
            {
                list.push((*offset as usize, info.n_bytes as usize, id));
                taken.push(id);
            }
        }
        if taken.is_empty() || !s.set_prepare(stream::GroupPrepare { by_group, prepare }) {
            return Ok(Vec::new());
        }
        Ok(taken)
    }

    /// Whether streamed groups read from now on run the preparation set by
    /// [`Weights::prepare_groups_on_read`] (nothing without one).
    pub fn set_preparing(&self, on: bool) {
        if let Backing::Read {
            streamer: Some(s), ..
        } = &self.backing
        {
            s.set_preparing(on);
        }
    }

    /// The buffers weights lie in when they were read (not mapped), as (address, length): the
    /// resident set, and the streaming window's slots that io_uring's O_DIRECT reads land in.
    /// A GPU page-locks them so that its copies read the weights where the reads put them.
    /// They live as long as these weights.
    pub fn host_buffers(&self) -> Vec<(*const u8, usize)> {
        match &self.backing {
            Backing::Read { hot, streamer, .. } => {
                let mut v = Vec::new();
                if !hot.is_empty() {
                    v.push((hot.as_ptr().cast_const(), hot.len()));
                }
                if let Some(s) = streamer {
                    v.extend(s.buffers());
                }
                v
            }
            Backing::Mapped(_) => Vec::new(),
        }
    }

    /// In how many row ranges the tensor is held; [`Weights::acquire_part`] takes each. A
    /// tensor larger than a streaming buffer is cut by rows; every other tensor has one part.
    pub fn parts(&self, id: TensorId) -> Result<usize, ResidencyError> {
        Ok(match self.place(id)? {
            Place::Parts { offsets, .. } => offsets.len(),
            _ => 1,
        })
    }

    /// Holds part `part` of a tensor in memory; returns it and the rows it covers.
    pub fn acquire_part(
        &self,
        id: TensorId,
        part: usize,
    ) -> Result<(TensorHandle, std::ops::Range<u64>), ResidencyError> {
        let info = self.info(id)?;
        let rows = rows_of(info);
        match self.place(id)? {
            Place::Parts {
                first,
                rows_per_part,
                offsets,
            } => {
                let &offset = offsets.get(part).ok_or_else(|| ResidencyError::NoPart {
                    tensor: info.name.clone(),
                    part,
                    parts: offsets.len(),
                })?;
                let r0 = part as u64 * rows_per_part;
                let r1 = (r0 + rows_per_part).min(rows);
                let row_bytes = info.n_bytes / rows;
                let Backing::Read {
                    streamer: Some(s), ..
                } = &self.backing
                else {
                    return Err(ResidencyError::Unreachable(info.name.clone()));
                };
                let h = s.acquire(
                    first + part,
                    offset as usize,
                    ((r1 - r0) * row_bytes) as usize,
                )?;
                Ok((h, r0..r1))
            }
            _ if part == 0 => Ok((self.acquire(id)?, 0..rows)),
            _ => Err(ResidencyError::NoPart {
                tensor: info.name.clone(),
                part,
                parts: 1,
            }),
        }
    }

    /// Holds a whole tensor in memory and returns a view of its bytes; for a streamed layer
    /// this may wait for (or start) its read. A tensor held in parts is assembled into a fresh
    /// buffer (use [`Weights::acquire_part`] to avoid that copy). A strided tensor's view is
    /// its [`TensorInfo::span`], other tensors' slices between its own.
    pub fn acquire(&self, id: TensorId) -> Result<TensorHandle, ResidencyError> {
        let info = self.info(id)?;
        let len = info.span() as usize;
        let from_buf = |buf: &Arc<AlignedBuf>, off: u64| {
            self.hot_hits.fetch_add(1, Ordering::Relaxed);
            TensorHandle {
                // SAFETY: the planner placed the tensor's `len` bytes inside the buffer.
                ptr: unsafe { buf.as_ptr().add(off as usize) },
                len,
                tier: Tier::Ram,
                prepared: false,
                _keep: Keep::Buf(Arc::clone(buf)),
            }
        };
        match (&self.backing, self.place(id)?) {
            (Backing::Mapped(map), Place::Hot(off)) => {
                debug_assert!(*off as usize + len <= map.len());
                self.hot_hits.fetch_add(1, Ordering::Relaxed);
                Ok(TensorHandle {
                    // SAFETY: the parser checked the tensor lies inside the file, all mapped.
                    ptr: unsafe { map.as_ptr().add(*off as usize) },
                    len,
                    tier: Tier::Ram,
                    prepared: false,
                    _keep: Keep::Map(Arc::clone(map)),
                })
            }
            (Backing::Read { hot, .. }, Place::Hot(off)) => Ok(from_buf(hot, *off)),
            (
                Backing::Read {
                    streamer: Some(s), ..
                },
                Place::Group { group, offset },
            ) => s.acquire(*group, *offset as usize, len),
            (Backing::Read { cold: Some(r), .. }, Place::Cold) if info.stride.is_some() => {
                // Rare: read the whole span into a buffer of its own.
                let start = self.gguf.data_offset + info.offset;
                let (buf, skip) = read_span(r, start, len)?;
                Ok(TensorHandle {
                    // SAFETY: `buf` holds the span's `len` bytes from `skip` on.
                    ptr: unsafe { buf.as_ptr().add(skip) },
                    len,
                    tier: Tier::Ram,
                    prepared: false,
                    _keep: Keep::Buf(buf),
                })
            }
            (Backing::Read { .. }, Place::Cold | Place::Parts { .. }) => {
                // Rare: read the whole tensor into a buffer of its own.
                let mut buf = AlignedBuf::zeroed(len)
                    .map_err(|e| ResidencyError::Alloc { bytes: e.bytes })?;
                let rows = rows_of(info);
                let all: Vec<u64> = (0..rows).collect();
                self.read_rows(id, &all, buf.as_mut_slice())?;
                let buf = Arc::new(buf);
                Ok(TensorHandle {
                    ptr: buf.as_ptr(),
                    len,
                    tier: Tier::Ram,
                    prepared: false,
                    _keep: Keep::Buf(buf),
                })
            }
            _ => Err(ResidencyError::Unreachable(info.name.clone())),
        }
    }

    /// Copies rows `rows` of a tensor, back to back, into `dst` (`rows.len()` × the row size):
    /// an embedding lookup. Cold tensors are read from disk, a page or two per row.
    pub fn read_rows(
        &self,
        id: TensorId,
        rows: &[u64],
        dst: &mut [u8],
    ) -> Result<(), ResidencyError> {
        let info = self.info(id)?;
        let n_rows = rows_of(info);
        let row_bytes = (info.n_bytes / n_rows) as usize;
        let bad = |problem: String| ResidencyError::BadRows {
            tensor: info.name.clone(),
            problem,
        };
        if dst.len() != rows.len() * row_bytes {
            return Err(bad(format!(
                "{} rows of {row_bytes} bytes do not fill {} bytes",
                rows.len(),
                dst.len()
            )));
        }
        if let Some(r) = rows.iter().find(|&&r| r >= n_rows) {
            return Err(bad(format!("row {r} of {n_rows}")));
        }
        if info.stride.is_some() {
            return Err(bad("a strided tensor is not read by rows".into()));
        }
        let cold = match (&self.backing, self.place(id)?) {
            (Backing::Read { cold: Some(r), .. }, Place::Cold) => r,
            // A tied embedding that is also the output, cut by rows: take each row from its
            // part (`acquire` would assemble the whole tensor through this very function).
            (_, Place::Parts { rows_per_part, .. }) => {
                return self.rows_from_parts(id, *rows_per_part, rows, row_bytes, dst);
            }
            _ => {
                let h = self.acquire(id)?;
                if h.prepared() {
                    return Err(bad(
                        "its streamed bytes were rearranged after the read".into()
                    ));
                }
                for (k, &r) in rows.iter().enumerate() {
                    let at = r as usize * row_bytes;
                    dst[k * row_bytes..(k + 1) * row_bytes]
                        .copy_from_slice(&h.bytes()[at..at + row_bytes]);
                }
                return Ok(());
            }
        };
        self.cold_rows
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
        let a = crate::io::DIRECT_ALIGN as u64;
        let start = self.gguf.data_offset + info.offset;
        // Up to 64 rows per call, all in flight together, each as its aligned pages.
        for (c, chunk) in rows.chunks(64).enumerate() {
            let spans: Vec<(u64, u64, u64)> = chunk
                .iter()
                .map(|&r| {
                    let lo = start + r * row_bytes as u64;
                    let hi = lo + row_bytes as u64;
                    (lo, lo / a * a, hi.next_multiple_of(a))
                })
                .collect();
            let total: u64 = spans.iter().map(|&(_, alo, ahi)| ahi - alo).sum();
            let mut buf = AlignedBuf::zeroed(total as usize)
                .map_err(|e| ResidencyError::Alloc { bytes: e.bytes })?;
            {
                let mut rest = buf.as_mut_slice();
                let mut reqs = Vec::with_capacity(spans.len());
                for &(lo, alo, ahi) in &spans {
                    let (piece, tail) = rest.split_at_mut((ahi - alo) as usize);
                    reqs.push(ReadReq {
                        offset: alo,
                        buf: piece,
                        need: (lo - alo) as usize + row_bytes,
                        fixed: None,
                    });
                    rest = tail;
                }
                cold.read(&mut reqs).map_err(read_err)?;
            }
            let mut at = 0usize;
            for (k, &(lo, alo, ahi)) in spans.iter().enumerate() {
                let skip = at + (lo - alo) as usize;
                let d = c * 64 + k;
                dst[d * row_bytes..(d + 1) * row_bytes]
                    .copy_from_slice(&buf.as_slice()[skip..skip + row_bytes]);
                at += (ahi - alo) as usize;
            }
        }
        Ok(())
    }

    /// Expert `e` of a stacked `[cols, rows, n_expert]` tensor: from the expert cache when the
    /// experts stream from disk, else a view into the held tensor.
    pub fn expert_slab(&self, id: TensorId, e: usize) -> Result<TensorHandle, ResidencyError> {
        let loc = self.slab_loc(id, e)?;
        if let (Some(x), Place::Cold) = (self.expert_cache(), self.place(id)?) {
            // A record serves its group's tensors: one use of it is counted.
            let (buf, skip) = x
                .get(loc.key, loc.start, loc.len, loc.counts)
                .map_err(read_err)?;
            return Ok(TensorHandle {
                // SAFETY: the cache read `loc.len` bytes at `skip` of `buf`, and the slab lies
                // inside them.
                ptr: unsafe { buf.as_ptr().add(skip + loc.at) },
                len: loc.slab,
                tier: Tier::Ram,
                prepared: false,
                _keep: Keep::Buf(buf),
            });
        }
        let whole = self.acquire(id)?;
        let info = self.info(id)?;
        let at = e as u64 * info.stride.unwrap_or(loc.slab as u64);
        Ok(TensorHandle {
            // SAFETY: slab `e` lies inside the tensor's span, which `whole` holds.
            ptr: unsafe { whole.ptr.add(at as usize) },
            len: loc.slab,
            tier: whole.tier,
            // A prepared stack of experts was prepared slab by slab.
            prepared: whole.prepared,
            _keep: whole._keep,
        })
    }

    /// The expert cache, when experts stream from disk.
    fn expert_cache(&self) -> Option<&experts::ExpertCache> {
        match &self.backing {
            Backing::Read { experts, .. } => experts.as_deref(),
            Backing::Mapped(_) => None,
        }
    }

    /// Whether any experts stream from disk.
    pub fn experts_streamed_any(&self) -> bool {
        self.expert_cache().is_some()
    }

    /// Whether the experts of a stacked tensor stream from disk (so predicting them pays).
    pub fn experts_streamed(&self, id: TensorId) -> bool {
        self.expert_cache().is_some() && matches!(self.places.get(id.index()), Some(Place::Cold))
    }

    /// The routing of the MoE pass about to run: experts `es` of each of the stacked tensors
    /// `ids` (a layer's gate, up and down), in the order they will be used. Where experts
    /// stream, those cached are kept until used and the rest are read in the background, an
    /// expert's slabs together; otherwise nothing happens.
    pub fn route_experts(&self, ids: &[TensorId], es: &[usize]) -> Result<(), ResidencyError> {
        if let Some(x) = self.expert_cache() {
            let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            self.expert_keys(ids, es, &mut keys)?;
            if !keys.is_empty() {
                x.route(&keys);
            }
        }
        Ok(())
    }

    /// The cache keys and file ranges of experts `es` of the streamed tensors among `ids`,
    /// expert by expert.
    fn expert_keys(
        &self,
        ids: &[TensorId],
        es: &[usize],
        keys: &mut Vec<(experts::Key, u64, usize)>,
    ) -> Result<(), ResidencyError> {
        keys.clear();
        for &e in es {
            let this = keys.len();
            for &id in ids {
                if !matches!(self.place(id)?, Place::Cold) {
                    continue;
                }
                let loc = self.slab_loc(id, e)?;
                // The tensors of one record share it.
                if !keys[this..].iter().any(|k| k.0 == loc.key) {
                    keys.push((loc.key, loc.start, loc.len));
                }
            }
        }
        Ok(())
    }

    /// Orders experts `es` of the stacked tensors `ids` so that those that can be had without
    /// waiting for a read come first (the order within each part kept); nothing moves unless
    /// the experts stream from disk.
    pub fn experts_held_first(&self, ids: &[TensorId], es: &mut [usize]) {
        let Some(x) = self.expert_cache() else {
            return;
        };
        // The cache keys' tensors (a record's is its group's first; one repeated is only
        // looked up again).
        let cold = ids
            .iter()
            .filter(|id| matches!(self.places.get(id.index()), Some(Place::Cold)))
            .map(|id| {
                self.records
                    .get(id.index())
                    .copied()
                    .flatten()
                    .map_or(id.0, |r| r.first)
            });
        x.sort_held_first(cold, es);
    }

    /// Empties the expert cache of every expert not in use, so that a measurement starts
    /// cold (`strata bench --moe-prefetch` between modes).
    pub fn clear_expert_cache(&self) {
        if let Some(x) = self.expert_cache() {
            x.clear();
        }
    }

    /// Starts reading experts `es` of the stacked tensors `ids` ahead of need, in that order
    /// (the likeliest first), an expert's slabs together.
    pub fn prefetch_experts(&self, ids: &[TensorId], es: &[usize]) -> Result<(), ResidencyError> {
        if let Some(x) = self.expert_cache() {
            let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            self.expert_keys(ids, es, &mut keys)?;
            x.prefetch(&keys);
        }
        Ok(())
    }

    /// [`Weights::read_rows`] of a tensor held in parts: each part that holds a wanted row is
    /// acquired once (parts in order, so a batch's rows cost one pass over them at most).
    fn rows_from_parts(
        &self,
        id: TensorId,
        rows_per_part: u64,
        rows: &[u64],
        row_bytes: usize,
        dst: &mut [u8],
    ) -> Result<(), ResidencyError> {
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&k| rows[k]);
        let mut held: Option<(u64, TensorHandle, u64)> = None;
        for k in order {
            let r = rows[k];
            let part = r / rows_per_part.max(1);
            if held.as_ref().is_none_or(|(p, _, _)| *p != part) {
                let (h, range) = self.acquire_part(id, part as usize)?;
                held = Some((part, h, range.start));
            }
            let missing = || ResidencyError::BadRows {
                tensor: self.gguf.tensors[id.index()].name.clone(),
                problem: format!("row {r} is not in part {part}"),
            };
            let Some((_, h, r0)) = &held else {
                return Err(missing());
            };
            let at = (r.checked_sub(*r0).ok_or_else(missing)?) as usize * row_bytes;
            let src = h.bytes().get(at..at + row_bytes).ok_or_else(missing)?;
            dst[k * row_bytes..(k + 1) * row_bytes].copy_from_slice(src);
        }
        Ok(())
    }

    /// Where expert `e`'s slab is read from: the slab itself, or the record it shares with its
    /// group's other tensors when strided.
    fn slab_loc(&self, id: TensorId, e: usize) -> Result<SlabLoc, ResidencyError> {
        let info = self.info(id)?;
        let n = match info.dims.as_slice() {
            [_, _, n] if (e as u64) < *n => *n,
            _ => {
                return Err(ResidencyError::NoExpert {
                    tensor: info.name.clone(),
                    expert: e,
                });
            }
        };
        let slab = info.n_bytes / n;
        let base = self.gguf.data_offset + info.offset;
        Ok(
            match (info.stride, self.records.get(id.index()).copied().flatten()) {
                (Some(stride), Some(r)) => SlabLoc {
                    key: (r.first, e as u32),
                    start: base - r.at + e as u64 * stride,
                    len: r.len as usize,
                    at: r.at as usize,
                    slab: slab as usize,
                    counts: r.counts,
                },
                _ => SlabLoc {
                    key: (id.0, e as u32),
                    start: base + e as u64 * slab,
                    len: slab as usize,
                    at: 0,
                    slab: slab as usize,
                    counts: true,
                },
            },
        )
    }

    /// Bytes held per tier: RAM for the resident set and the window, SSD for what is streamed.
    pub fn resident_bytes(&self) -> Vec<(Tier, u64)> {
        let s = &self.summary;
        let mut v = vec![(Tier::Ram, s.ram_bytes)];
        if s.streamed_per_pass > 0 {
            v.push((Tier::Ssd, s.streamed_per_pass));
        }
        v
    }

    /// How the weights are held, and the counters of reads and waits so far.
    pub fn stats(&self) -> ResidencyStats {
        let mut s = self.summary.clone();
        s.hot_hits = self.hot_hits.load(Ordering::Relaxed);
        s.cold_rows = self.cold_rows.load(Ordering::Relaxed);
        if let Some(x) = self.expert_cache() {
            let c = &x.shared().counters;
            s.expert_hits = c.hits.load(Ordering::Relaxed);
            s.expert_misses = c.misses.load(Ordering::Relaxed);
            s.expert_prefetches = c.prefetches.load(Ordering::Relaxed);
            s.expert_prefetch_hits = c.prefetch_hits.load(Ordering::Relaxed);
            s.expert_cache_bytes = x.bytes();
            s.expert_wait = std::time::Duration::from_nanos(c.wait_ns.load(Ordering::Relaxed));
            s.expert_read = x.io_stats();
            s.expert_policy = x.policy().name();
        }
        if let Backing::Read {
            streamer,
            cold,
            experts,
            ..
        } = &self.backing
        {
            if let Some(st) = streamer {
                let c = &st.shared().counters;
                s.window_hits = c.hits.load(Ordering::Relaxed);
                s.stalls = c.stalls.load(Ordering::Relaxed);
                s.misses = c.misses.load(Ordering::Relaxed);
                s.prefetches = c.prefetches.load(Ordering::Relaxed);
                s.groups_prepared = c.groups_prepared.load(Ordering::Relaxed);
                s.stall = stream::stall(c);
                // The streamer's reader also read the resident set at load.
                s.read = st.io_stats();
            }
            let extra = cold
                .iter()
                .map(|r| r.stats())
                .chain(experts.iter().map(|x| x.io_stats()));
            for c in extra {
                s.read += c;
            }
        }
        s
    }

    /// The I/O engine reading this model's file (`None` for a mapped file).
    pub fn io_kind(&self) -> Option<IoKind> {
        self.io_kind
    }
}

/// What a handle keeps alive may move between threads (the `Send`/`Sync` of `TensorHandle`).
const _: () = {
    const fn shareable<T: Send + Sync>() {}
    shareable::<Keep>();
};
