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

mod spill;

use std::sync::Arc;

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
        }
    }
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
                    dir: cfg.dir.clone(),
                    ram_budget: cfg.ram_budget.max(floor),
                })?)
            }
            None => None,
        };
        Ok(Self {
            n_ctx,
            kv_dim,
            layers: (0..n_layer)
                .map(|_| [side(opts.type_k), side(opts.type_v)])
                .collect(),
            len: 0,
            spill,
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

    /// Forgets every position from `n` on; pages past it are given back (RAM and disk).
    pub fn truncate(&mut self, n: usize) {
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
    }

    pub fn clear(&mut self) {
        self.truncate(0);
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
        // Page by page across layers, so every layer keeps the same recent positions.
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
        for (si, src) in [k, v].into_iter().enumerate() {
            let rb = self.layers[il][si].row_bytes;
            let per_page = PAGE_TOKENS * rb;
            for (pi, chunk) in src.chunks(per_page).enumerate() {
                let buf = self.page_mut(il, si, pi)?;
                buf.as_mut_slice()[..chunk.len()].copy_from_slice(chunk);
            }
            debug_assert_eq!(src.len() % rb, 0);
        }
        self.enforce_budget(false)
    }

    pub(crate) fn kv_dim(&self) -> usize {
        self.kv_dim
    }
}

#[cfg(test)]
mod tests;
