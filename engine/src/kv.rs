//! The KV cache: keys and values of every past position, per layer, in pages of
//! [`PAGE_TOKENS`] positions, in f16, Q8_0 or Q4_0 (`--cache-type-k/-v`).
//!
//! A page holds `[position][kv_head][head_dim]` rows of one layer's keys (or values), so a
//! position's row is contiguous (appending writes one run) and attention reads a head's part
//! of each row. Pages are allocated as positions fill them, shared between caches by
//! reference (a common prefix: [`KvCache::share_prefix`]; a shared page is copied before it is
//! written), and, with a [`SpillConfig`], kept under a RAM budget: the oldest full pages are
//! written to an unlinked file on SSD and read back with io_uring for each attention over
//! them, the next layer's pages read while this layer computes (module [`spill`]).
//!
//! The layers whose attention runs on the GPU ([`KvGpu`]) keep their pages in VRAM, in the
//! same bytes: the newest pages stay there, and under a VRAM budget the oldest move down to RAM
//! (and from there, under the RAM budget, to SSD); for attention, a page that is not in VRAM
//! is staged into device memory first, as a page on SSD is read back for the CPU.

mod spill;

use std::sync::Arc;

use strata_kernels::{DeviceBuffer, Stream};

use strata_simd::ops::attention::{KvPages, kv_store_row, kv_type_fits};
use strata_storage::buf::AlignedBuf;
use strata_storage::quant::GgmlType;

pub use spill::{SpillConfig, SpillStats};

use crate::EngineError;

/// Positions per page.
pub const PAGE_TOKENS: usize = 256;

/// How a context's cache is laid out and where it may live.
#[derive(Clone, Debug)]
pub struct KvOptions {
    pub type_k: GgmlType,
    pub type_v: GgmlType,
    /// Keep at most this many bytes of pages in RAM, the rest on SSD (`None`: all in RAM).
    pub spill: Option<SpillConfig>,
    /// The VRAM tier of the layers whose attention runs on the GPU (set by the model).
    pub gpu: Option<KvGpu>,
}

impl KvOptions {
    /// The least RAM a cache under a budget holds: each layer's page of keys and its page of
    /// values stay in RAM while they fill (only full pages go to disk). A smaller budget acts
    /// as this one; callers say so rather than let a user believe theirs holds.
    pub fn min_ram_budget(&self, n_layer: usize, kv_dim: usize) -> usize {
        let page =
            |ty: GgmlType| (PAGE_TOKENS * ty.row_bytes(kv_dim)).next_multiple_of(AlignedBuf::ALIGN);
        n_layer * (page(self.type_k) + page(self.type_v))
    }
}

impl Default for KvOptions {
    fn default() -> Self {
        Self {
            type_k: GgmlType::F16,
            type_v: GgmlType::F16,
            spill: None,
            gpu: None,
        }
    }
}

/// The VRAM tier: which layers keep their pages in device memory, at most how many bytes of
/// them (the oldest pages beyond it move to RAM), and the stream their copies go on (the
/// model's compute stream, so that they are ordered with the kernels that write the pages).
#[derive(Clone)]
pub struct KvGpu {
    pub stream: Arc<Stream>,
    pub layers: Vec<bool>,
    pub vram_budget: Option<usize>,
}

impl std::fmt::Debug for KvGpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvGpu")
            .field("layers", &self.layers.iter().filter(|&&g| g).count())
            .field("vram_budget", &self.vram_budget)
            .finish()
    }
}

/// The one parser of a KV cache's RAM budget as a user writes it (`--kv-budget`, the daemon's
/// `kv_budget`): bytes with a K/M/G suffix, or a percentage of the full cache of `n_ctx`
/// positions of a model shaped as `c` in types `type_k` and `type_v` ("25%").
pub fn parse_kv_budget(
    s: &str,
    c: &crate::model::ModelConfig,
    n_ctx: usize,
    type_k: GgmlType,
    type_v: GgmlType,
) -> Result<usize, String> {
    let full =
        (c.n_layer * n_ctx * (type_k.row_bytes(c.kv_dim()) + type_v.row_bytes(c.kv_dim()))) as u64;
    let bytes = strata_storage::residency::parse_size(s, full)?;
    Ok(usize::try_from(bytes).unwrap_or(usize::MAX))
}

/// Parses a `--cache-type-k/-v` value: `f16`, `q8_0` or `q4_0`, as llama.cpp names them.
pub fn parse_cache_type(s: &str) -> Result<GgmlType, String> {
    match s.to_ascii_lowercase().as_str() {
        "f16" => Ok(GgmlType::F16),
        "q8_0" => Ok(GgmlType::Q8_0),
        "q4_0" => Ok(GgmlType::Q4_0),
        _ => Err(format!(
            "unknown KV cache type '{s}' (supported: f16, q8_0, q4_0)"
        )),
    }
}

/// Where one page of one layer's keys or values is.
#[derive(Clone)]
enum Page {
    Ram(Arc<AlignedBuf>),
    /// Written to the spill file at this offset.
    Disk(u64),
    /// In device memory (a layer whose attention runs on the GPU).
    Vram(Arc<DeviceBuffer>),
}

/// Keys or values of one layer.
struct Side {
    ty: GgmlType,
    /// Bytes of one position's row.
    row_bytes: usize,
    pages: Vec<Page>,
}

impl Side {
    fn page_bytes(&self) -> usize {
        (PAGE_TOKENS * self.row_bytes).next_multiple_of(AlignedBuf::ALIGN)
    }
}

pub struct KvCache {
    n_ctx: usize,
    kv_dim: usize,
    /// Per layer: keys, values.
    layers: Vec<[Side; 2]>,
    len: usize,
    spill: Option<spill::Spill>,
    gpu: Option<KvGpu>,
}

impl KvCache {
    /// A cache for `n_ctx` positions of `n_layer` layers with `kv_dim` values per position
    /// (heads of `head_dim`). Pages are allocated as positions fill them.
    pub fn new(
        n_layer: usize,
        n_ctx: usize,
        kv_dim: usize,
        head_dim: usize,
        opts: &KvOptions,
    ) -> Result<Self, EngineError> {
        for ty in [opts.type_k, opts.type_v] {
            if !kv_type_fits(ty, head_dim) {
                return Err(EngineError::Invalid(format!(
                    "KV cache type {} needs heads of a multiple of {} values; this model's are {head_dim}",
                    ty.name(),
                    ty.block_size()
                )));
            }
        }
        let side = |ty: GgmlType| Side {
            ty,
            row_bytes: ty.row_bytes(kv_dim),
            pages: Vec::new(),
        };
        let spill = match &opts.spill {
            Some(cfg) => {
                // What the cache will hold whatever the budget, so its stats tell the truth.
                let floor = opts.min_ram_budget(n_layer, kv_dim);
                Some(spill::Spill::new(&SpillConfig {
                    ram_budget: cfg.ram_budget.max(floor),
                    ..cfg.clone()
                })?)
            }
            None => None,
        };
        if let Some(g) = &opts.gpu
            && g.layers.len() != n_layer
        {
            return Err(EngineError::Invalid(format!(
                "a VRAM tier for {} layers of a {n_layer}-layer cache",
                g.layers.len()
            )));
        }
        Ok(Self {
            n_ctx,
            kv_dim,
            layers: (0..n_layer)
                .map(|_| [side(opts.type_k), side(opts.type_v)])
                .collect(),
            len: 0,
            spill,
            gpu: opts.gpu.clone(),
        })
    }

    /// Positions filled.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    pub fn types(&self) -> (GgmlType, GgmlType) {
        (self.layers[0][0].ty, self.layers[0][1].ty)
    }

    /// Forgets every position from `n` on, as if they had never been written (speculative
    /// decoding cuts rejected tokens off this way): pages past it are given back (RAM, VRAM
    /// and disk); the rows past `n` of the page it ends in are zeroed, as in a page never
    /// written so far (that page is read back first when it had gone to disk whole, and copied
    /// first when shared); and with a RAM budget, pages that went to disk only because the
    /// cache had grown past `n` come back, newest first, while they fit. A cache cut back
    /// holds the same bytes in the same tiers as one that never went further.
    pub fn truncate(&mut self, n: usize) -> Result<(), EngineError> {
        let old = self.len;
        self.len = self.len.min(n);
        let keep = self.len.div_ceil(PAGE_TOKENS);
        for side in self.layers.iter_mut().flatten() {
            let bytes = side.page_bytes();
            for p in side.pages.drain(keep.min(side.pages.len())..) {
                if let (Page::Disk(off), Some(s)) = (p, &mut self.spill) {
                    s.free(off, bytes);
                }
            }
        }
        let rows = self.len % PAGE_TOKENS;
        if old > self.len && rows != 0 {
            let pi = self.len / PAGE_TOKENS;
            for il in 0..self.layers.len() {
                for si in 0..2 {
                    let side = &self.layers[il][si];
                    let (from, bytes) = (rows * side.row_bytes, side.page_bytes());
                    match side.pages.get(pi) {
                        None => {}
                        Some(Page::Vram(_)) => {
                            let stream =
                                Arc::clone(&self.gpu.as_ref().expect("a VRAM tier").stream);
                            let d = self.device_page(il, si, pi)?;
                            stream.memset(d, from, bytes - from, 0).map_err(kv_err)?;
                        }
                        Some(_) => self.page_mut(il, si, pi)?.as_mut_slice()[from..].fill(0),
                    }
                }
            }
        }
        self.unspill_within_budget()
    }

    /// Reads pages back from disk, newest first, while RAM stays within the budget: after a
    /// truncation, what a cache that never grew further would hold in RAM.
    fn unspill_within_budget(&mut self) -> Result<(), EngineError> {
        let Some(budget) = self.spill.as_ref().map(|s| s.budget()) else {
            return Ok(());
        };
        let mut ram = self.ram_bytes();
        let n_pages = self.len.div_ceil(PAGE_TOKENS);
        let Self { layers, spill, .. } = self;
        let spill = spill.as_mut().expect("checked above");
        for pi in (0..n_pages).rev() {
            let on_disk: usize = layers
                .iter()
                .flatten()
                .filter(|s| matches!(s.pages.get(pi), Some(Page::Disk(_))))
                .map(|s| s.page_bytes())
                .sum();
            if on_disk == 0 {
                continue;
            }
            if ram + on_disk > budget {
                break;
            }
            for side in layers.iter_mut().flatten() {
                let bytes = side.page_bytes();
                if let Some(Page::Disk(off)) = side.pages.get(pi) {
                    let off = *off;
                    let buf = spill.read_page(off, bytes)?;
                    spill.free(off, bytes);
                    side.pages[pi] = Page::Ram(Arc::new(buf));
                }
            }
            ram += on_disk;
        }
        Ok(())
    }

    pub fn clear(&mut self) {
        // Dropping every page touches no page's bytes: nothing to fail.
        self.len = 0;
        for side in self.layers.iter_mut().flatten() {
            let bytes = side.page_bytes();
            for p in side.pages.drain(..) {
                if let (Page::Disk(off), Some(s)) = (p, &mut self.spill) {
                    s.free(off, bytes);
                }
            }
        }
    }

    /// Bytes the filled positions take (wherever their pages are).
    pub fn size_bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|s| s.row_bytes * self.len)
            .sum()
    }

    /// Bytes of pages held in RAM.
    pub fn ram_bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|s| s.pages.iter().filter(|p| matches!(p, Page::Ram(_))).count() * s.page_bytes())
            .sum()
    }

    /// Bytes of pages held in VRAM.
    pub fn vram_bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|s| {
                s.pages
                    .iter()
                    .filter(|p| matches!(p, Page::Vram(_)))
                    .count()
                    * s.page_bytes()
            })
            .sum()
    }

    /// Whether layer `il`'s pages live in VRAM (its attention runs on the GPU).
    pub(crate) fn on_gpu(&self, il: usize) -> bool {
        self.gpu
            .as_ref()
            .is_some_and(|g| g.layers.get(il).copied().unwrap_or(false))
    }

    /// What the SSD tier has done (`None` without one).
    pub fn spill_stats(&self) -> Option<SpillStats> {
        self.spill.as_ref().map(|s| s.stats(self.disk_bytes()))
    }

    fn disk_bytes(&self) -> u64 {
        self.layers
            .iter()
            .flatten()
            .map(|s| {
                (s.pages
                    .iter()
                    .filter(|p| matches!(p, Page::Disk(_)))
                    .count()
                    * s.page_bytes()) as u64
            })
            .sum()
    }

    /// Writes `n` positions starting at `pos0` for layer `il` (k and v are `n × kv_dim` f32).
    pub(crate) fn store(
        &mut self,
        il: usize,
        pos0: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), EngineError> {
        let kd = self.kv_dim;
        let n = k.len() / kd;
        for (si, src) in [k, v].into_iter().enumerate() {
            let (ty, rb) = (self.layers[il][si].ty, self.layers[il][si].row_bytes);
            for t in 0..n {
                let pos = pos0 + t;
                let (pi, r) = (pos / PAGE_TOKENS, pos % PAGE_TOKENS);
                let buf = self.page_mut(il, si, pi)?;
                kv_store_row(
                    ty,
                    &src[t * kd..(t + 1) * kd],
                    &mut buf.as_mut_slice()[r * rb..(r + 1) * rb],
                );
            }
        }
        Ok(())
    }

    /// Page `pi` of layer `il`'s side `si`, in RAM and this cache's alone, to be written:
    /// allocated when new, read back when on disk, copied when shared.
    fn page_mut(
        &mut self,
        il: usize,
        si: usize,
        pi: usize,
    ) -> Result<&mut AlignedBuf, EngineError> {
        let bytes = self.layers[il][si].page_bytes();
        let pages = &mut self.layers[il][si].pages;
        while pages.len() <= pi {
            let b = AlignedBuf::zeroed(bytes).map_err(|e| EngineError::Kv(e.to_string()))?;
            pages.push(Page::Ram(Arc::new(b)));
        }
        if let Page::Disk(off) = pages[pi] {
            let spill = self
                .spill
                .as_mut()
                .expect("a page on disk has a spill file");
            let buf = spill.read_page(off, bytes)?;
            spill.free(off, bytes);
            pages[pi] = Page::Ram(Arc::new(buf));
        }
        if let Page::Vram(d) = &pages[pi] {
            let buf = download_page(&self.gpu, d, bytes)?;
            pages[pi] = Page::Ram(Arc::new(buf));
        }
        let Page::Ram(arc) = &mut pages[pi] else {
            unreachable!("made resident above")
        };
        if Arc::get_mut(arc).is_none() {
            let mut copy = AlignedBuf::zeroed(bytes).map_err(|e| EngineError::Kv(e.to_string()))?;
            copy.as_mut_slice().copy_from_slice(arc.as_slice());
            *arc = Arc::new(copy);
        }
        Ok(Arc::get_mut(arc).expect("unique after the copy"))
    }

    /// Marks positions up to `n` as filled, after every layer has stored them; with a RAM
    /// budget, full pages past it go to disk.
    pub(crate) fn set_len(&mut self, n: usize) -> Result<(), EngineError> {
        self.len = n;
        self.enforce_budget(false)
    }

    /// Writes pages to disk, oldest first, until RAM holds at most the budget (`all`: every
    /// page, the partial last one included — an idle cache giving its RAM back).
    fn enforce_budget(&mut self, all: bool) -> Result<(), EngineError> {
        self.enforce_vram_budget()?;
        let Some(spill) = &mut self.spill else {
            return Ok(());
        };
        let budget = if all { 0 } else { spill.budget() };
        let full = self.len / PAGE_TOKENS;
        let limit = if all {
            self.len.div_ceil(PAGE_TOKENS)
        } else {
            full
        };
        let mut ram: usize = self
            .layers
            .iter()
            .flatten()
            .map(|s| s.pages.iter().filter(|p| matches!(p, Page::Ram(_))).count() * s.page_bytes())
            .sum();
        // Page by page across layers, so every layer keeps the same recent positions (pages in
        // VRAM stay there: the VRAM budget moves them down first).
        for pi in 0..limit {
            if ram <= budget {
                break;
            }
            for side in self.layers.iter_mut().flatten() {
                if let Some(Page::Ram(buf)) = side.pages.get(pi) {
                    let off = spill.write_page(buf.as_slice())?;
                    side.pages[pi] = Page::Disk(off);
                    ram -= side.page_bytes();
                }
            }
        }
        Ok(())
    }

    /// Moves the oldest full pages of the GPU's layers from VRAM to RAM until VRAM holds at
    /// most the VRAM budget.
    fn enforce_vram_budget(&mut self) -> Result<(), EngineError> {
        let Some(budget) = self.gpu.as_ref().and_then(|g| g.vram_budget) else {
            return Ok(());
        };
        let mut vram = self.vram_bytes();
        let full = self.len / PAGE_TOKENS;
        for pi in 0..full {
            if vram <= budget {
                break;
            }
            for il in 0..self.layers.len() {
                for si in 0..2 {
                    let bytes = self.layers[il][si].page_bytes();
                    if let Some(Page::Vram(d)) = self.layers[il][si].pages.get(pi) {
                        let buf = download_page(&self.gpu, d, bytes)?;
                        self.layers[il][si].pages[pi] = Page::Ram(Arc::new(buf));
                        vram -= bytes;
                    }
                }
            }
        }
        Ok(())
    }

    /// Page `pi` of layer `il`'s side `si` in VRAM and this cache's alone, for the GPU to
    /// write: allocated (zeroed) when new, uploaded when in RAM or on disk, copied when shared.
    pub(crate) fn device_page(
        &mut self,
        il: usize,
        si: usize,
        pi: usize,
    ) -> Result<&DeviceBuffer, EngineError> {
        let gpu = self.gpu.as_ref().ok_or_else(|| {
            EngineError::Invalid("a device page of a cache without a VRAM tier".into())
        })?;
        let stream = Arc::clone(&gpu.stream);
        let bytes = self.layers[il][si].page_bytes();
        let new_page = |stream: &Stream| -> Result<DeviceBuffer, EngineError> {
            let d = stream.device().alloc(bytes).map_err(kv_err)?;
            Ok(d)
        };
        let pages = &mut self.layers[il][si].pages;
        while pages.len() <= pi {
            let d = new_page(&stream)?;
            stream.memset(&d, 0, bytes, 0).map_err(kv_err)?;
            pages.push(Page::Vram(Arc::new(d)));
        }
        let host: Option<AlignedBuf> = match &pages[pi] {
            Page::Vram(_) => None,
            Page::Ram(b) => {
                let mut c =
                    AlignedBuf::zeroed(bytes).map_err(|e| EngineError::Kv(e.to_string()))?;
                c.as_mut_slice().copy_from_slice(b.as_slice());
                Some(c)
            }
            Page::Disk(off) => {
                let spill = self
                    .spill
                    .as_mut()
                    .expect("a page on disk has a spill file");
                let buf = spill.read_page(*off, bytes)?;
                spill.free(*off, bytes);
                Some(buf)
            }
        };
        if let Some(h) = host {
            let d = new_page(&stream)?;
            stream.upload(&d, 0, h.as_slice()).map_err(kv_err)?;
            pages[pi] = Page::Vram(Arc::new(d));
        }
        let Page::Vram(arc) = &mut pages[pi] else {
            unreachable!("made a device page above")
        };
        if Arc::get_mut(arc).is_none() {
            let d = new_page(&stream)?;
            stream.copy(&d, 0, arc, 0, bytes).map_err(kv_err)?;
            *arc = Arc::new(d);
        }
        Ok(Arc::get_mut(arc).expect("unique after the copy"))
    }

    /// Whether every page of every layer holding positions below `end` is in VRAM (a step
    /// over them reads no host memory).
    pub(crate) fn all_in_vram(&self, end: usize) -> bool {
        let n_pages = end.div_ceil(PAGE_TOKENS);
        self.gpu.is_some()
            && self.layers.iter().flatten().all(|side| {
                side.pages.len() >= n_pages
                    && side.pages[..n_pages]
                        .iter()
                        .all(|p| matches!(p, Page::Vram(_)))
            })
    }

    /// Device addresses of layer `il`'s first `n` positions' pages (keys into `k`, values into
    /// `v`, cleared first) for attention on the GPU: pages in VRAM as they are, the others
    /// staged into `staging` (call [`KvCache::prepare`] first for those on disk).
    pub(crate) fn device_tables(
        &self,
        il: usize,
        n: usize,
        staging: &mut DeviceStaging,
        k: &mut Vec<u64>,
        v: &mut Vec<u64>,
    ) -> Result<(), EngineError> {
        let gpu = self.gpu.as_ref().ok_or_else(|| {
            EngineError::Invalid("device pages of a cache without a VRAM tier".into())
        })?;
        let n_pages = n.div_ceil(PAGE_TOKENS);
        for (si, out) in [(0, k), (1, v)] {
            let side = &self.layers[il][si];
            out.clear();
            for (pi, p) in side.pages[..n_pages.min(side.pages.len())]
                .iter()
                .enumerate()
            {
                let ptr = match p {
                    Page::Vram(d) => d.ptr(),
                    Page::Ram(b) => staging.stage(&gpu.stream, b.as_slice())?,
                    Page::Disk(_) => {
                        let spill = self
                            .spill
                            .as_ref()
                            .expect("a page on disk has a spill file");
                        staging.stage(&gpu.stream, spill.staged(il, si, pi))?
                    }
                };
                out.push(ptr);
            }
        }
        Ok(())
    }

    /// Writes every page to disk and gives their RAM back (an idle session). The cache
    /// reads them again when it is next used. Without a spill file, does nothing.
    pub fn spill_all(&mut self) -> Result<(), EngineError> {
        self.enforce_budget(true)
    }

    /// Reads layer `il`'s pages that are on disk (waiting for the read ahead when one was
    /// started) and starts reading the next layer's. Call before [`KvCache::view`].
    pub(crate) fn prepare(&mut self, il: usize) -> Result<(), EngineError> {
        let Some(spill) = &mut self.spill else {
            return Ok(());
        };
        let n_layer = self.layers.len();
        let wanted = |layer: &[Side; 2]| -> Vec<(usize, usize, u64, usize)> {
            let mut v = Vec::new();
            for (si, side) in layer.iter().enumerate() {
                for (pi, p) in side.pages.iter().enumerate() {
                    if let Page::Disk(off) = p {
                        v.push((si, pi, *off, side.page_bytes()));
                    }
                }
            }
            v
        };
        spill.stage(il, wanted(&self.layers[il]))?;
        let next = (il + 1) % n_layer;
        spill.read_ahead(next, wanted(&self.layers[next]));
        Ok(())
    }

    /// Layer `il`'s keys and values for attention over `n` positions, into `k` and `v`
    /// (cleared first).
    pub(crate) fn view<'a>(
        &'a self,
        il: usize,
        n: usize,
        k: &mut Vec<&'a [u8]>,
        v: &mut Vec<&'a [u8]>,
    ) {
        let n_pages = n.div_ceil(PAGE_TOKENS);
        let side = |si: usize, out: &mut Vec<&'a [u8]>| {
            let s = &self.layers[il][si];
            let len = PAGE_TOKENS * s.row_bytes;
            out.clear();
            out.extend(
                s.pages[..n_pages]
                    .iter()
                    .enumerate()
                    .map(|(pi, p)| match p {
                        Page::Ram(b) => &b.as_slice()[..len],
                        Page::Vram(_) => unreachable!(
                            "layer {il}'s pages are in VRAM: its attention runs on the GPU"
                        ),
                        Page::Disk(_) => {
                            let spill = self
                                .spill
                                .as_ref()
                                .expect("a page on disk has a spill file");
                            &spill.staged(il, si, pi)[..len]
                        }
                    }),
            );
        };
        side(0, k);
        side(1, v);
    }

    /// Wraps [`KvCache::view`]'s pages for attention.
    pub(crate) fn pages<'a>(&self, si: usize, pages: &'a [&'a [u8]]) -> KvPages<'a> {
        KvPages::new(self.layers[0][si].ty, PAGE_TOKENS, self.kv_dim, pages)
    }

    /// Makes this (empty or longer) cache hold `other`'s first `n` positions: full pages in
    /// RAM are shared by reference, pages on `other`'s disk are read, the partial last page is
    /// copied. Both caches must have the same shape and types.
    pub fn share_prefix(&mut self, other: &KvCache, n: usize) -> Result<(), EngineError> {
        if self.layers.len() != other.layers.len()
            || self.kv_dim != other.kv_dim
            || self.types() != other.types()
        {
            return Err(EngineError::Invalid(
                "caches of different shapes cannot share a prefix".into(),
            ));
        }
        let n = n.min(other.len).min(self.n_ctx);
        self.clear();
        let n_pages = n.div_ceil(PAGE_TOKENS);
        for (mine, theirs) in self.layers.iter_mut().zip(&other.layers) {
            for (ms, ts) in mine.iter_mut().zip(theirs) {
                for (pi, p) in ts.pages[..n_pages].iter().enumerate() {
                    let partial = (pi + 1) * PAGE_TOKENS > n;
                    let page = match p {
                        Page::Vram(d) if !partial => Page::Vram(d.clone()),
                        Page::Vram(d) => {
                            let stream = &other
                                .gpu
                                .as_ref()
                                .expect("a device page has a VRAM tier")
                                .stream;
                            let c = stream.device().alloc(d.len()).map_err(kv_err)?;
                            stream.copy(&c, 0, d, 0, d.len()).map_err(kv_err)?;
                            Page::Vram(Arc::new(c))
                        }
                        Page::Ram(b) if !partial => Page::Ram(b.clone()),
                        Page::Ram(b) => {
                            let mut c = AlignedBuf::zeroed(b.len())
                                .map_err(|e| EngineError::Kv(e.to_string()))?;
                            c.as_mut_slice().copy_from_slice(b.as_slice());
                            Page::Ram(Arc::new(c))
                        }
                        Page::Disk(off) => {
                            let spill = other.spill.as_ref().expect("page on disk");
                            Page::Ram(Arc::new(spill.read_page(*off, ts.page_bytes())?))
                        }
                    };
                    ms.pages.push(page);
                }
            }
        }
        self.len = n;
        self.enforce_budget(false)
    }

    /// The filled positions of layer `il` in the cache types: keys, then values.
    pub(crate) fn export(&self, il: usize) -> Result<(Vec<u8>, Vec<u8>), EngineError> {
        let mut out: [Vec<u8>; 2] = Default::default();
        for (si, o) in out.iter_mut().enumerate() {
            let side = &self.layers[il][si];
            let total = self.len * side.row_bytes;
            o.reserve_exact(total);
            for p in side.pages.iter() {
                let left = total - o.len();
                if left == 0 {
                    break;
                }
                let take = left.min(PAGE_TOKENS * side.row_bytes);
                match p {
                    Page::Ram(b) => o.extend_from_slice(&b.as_slice()[..take]),
                    Page::Disk(off) => {
                        let spill = self.spill.as_ref().expect("page on disk");
                        let b = spill.read_page(*off, side.page_bytes())?;
                        o.extend_from_slice(&b.as_slice()[..take]);
                    }
                    Page::Vram(d) => {
                        let b = download_page(&self.gpu, d, side.page_bytes())?;
                        o.extend_from_slice(&b.as_slice()[..take]);
                    }
                }
            }
        }
        let [k, v] = out;
        Ok((k, v))
    }

    /// Bytes of `n` positions of keys and of values.
    pub(crate) fn export_len(&self, n: usize) -> (usize, usize) {
        let l = &self.layers[0];
        (n * l[0].row_bytes, n * l[1].row_bytes)
    }

    /// Empties the cache to take `n` positions from [`KvCache::import`], layer by layer.
    pub(crate) fn begin_import(&mut self, n: usize) {
        self.clear();
        self.len = n;
    }

    /// Replaces layer `il`'s first positions with `k` and `v` (as from [`KvCache::export`],
    /// lengths checked by the caller, after [`KvCache::begin_import`]); under a RAM budget the
    /// pages go to disk as they come, so a long session never needs its whole size in RAM.
    pub(crate) fn import(&mut self, il: usize, k: &[u8], v: &[u8]) -> Result<(), EngineError> {
        let on_gpu = self.on_gpu(il);
        for (si, src) in [k, v].into_iter().enumerate() {
            let rb = self.layers[il][si].row_bytes;
            let per_page = PAGE_TOKENS * rb;
            for (pi, chunk) in src.chunks(per_page).enumerate() {
                if on_gpu {
                    let stream = Arc::clone(&self.gpu.as_ref().expect("on the GPU").stream);
                    let d = self.device_page(il, si, pi)?;
                    stream.upload(d, 0, chunk).map_err(kv_err)?;
                } else {
                    let buf = self.page_mut(il, si, pi)?;
                    buf.as_mut_slice()[..chunk.len()].copy_from_slice(chunk);
                }
            }
            debug_assert_eq!(src.len() % rb, 0);
        }
        self.enforce_budget(false)
    }

    pub(crate) fn kv_dim(&self) -> usize {
        self.kv_dim
    }
}

fn kv_err(e: strata_kernels::KernelError) -> EngineError {
    EngineError::Kv(e.to_string())
}

/// A device page's bytes in host memory.
fn download_page(
    gpu: &Option<KvGpu>,
    d: &DeviceBuffer,
    bytes: usize,
) -> Result<AlignedBuf, EngineError> {
    let stream = &gpu
        .as_ref()
        .ok_or_else(|| EngineError::Invalid("a device page without a VRAM tier".into()))?
        .stream;
    let mut buf = AlignedBuf::zeroed(bytes).map_err(|e| EngineError::Kv(e.to_string()))?;
    stream
        .download(d, 0, &mut buf.as_mut_slice()[..bytes.min(d.len())])
        .map_err(kv_err)?;
    Ok(buf)
}

/// Device buffers that pages not in VRAM are copied into for one attention call; reused from
/// layer to layer (the copies and the attention are on one stream, in order).
#[derive(Default)]
pub(crate) struct DeviceStaging {
    bufs: Vec<DeviceBuffer>,
    used: usize,
}

impl DeviceStaging {
    /// Starts a new attention call's staging.
    pub(crate) fn reset(&mut self) {
        self.used = 0;
    }

    fn stage(&mut self, stream: &Stream, bytes: &[u8]) -> Result<u64, EngineError> {
        if self.used == self.bufs.len() || self.bufs[self.used].len() < bytes.len() {
            if self.used < self.bufs.len() {
                // The buffer replaced may still feed a queued attention.
                stream.synchronize().map_err(kv_err)?;
            }
            let d = stream.device().alloc(bytes.len()).map_err(kv_err)?;
            if self.used == self.bufs.len() {
                self.bufs.push(d);
            } else {
                self.bufs[self.used] = d;
            }
        }
        let d = &self.bufs[self.used];
        stream.upload(d, 0, bytes).map_err(kv_err)?;
        self.used += 1;
        Ok(d.ptr())
    }
}

#[cfg(test)]
mod tests;
