//! `attention.cu` and `attention_prefill.cu`: attention over the paged KV cache ([`super::kv`]).
//!
//! - [`paged_decode`]: one query token per sequence, several sequences per launch, each with its
//!   own pages and length (continuous batching), split along the sequence over blocks and
//!   combined by a second kernel ([`DecodePlan`] says how, and how much scratch it needs).
//! - [`paged_prefill`]: causal flash attention on f16 tensor cores for the tokens of one
//!   sequence, continuing its cache at any position.
//!
//! Both take any pair of [`super::kv::KvType`]s for K and V, GQA groups of any size, a sliding window and
//! soft-capping, and heads of 64, 128 or 256 values (every architecture strata loads).

use super::kv::{KvLayout, KvPageTables};
use super::{dim, need};
use crate::device::{Arg, Device, DeviceBuffer, KernelError, LaunchConfig, Stream};

/// Shape and options of one attention call (as `strata_simd::ops::attention::AttnParams`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnParams {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Multiplies q·k before the softmax.
    pub scale: f32,
    /// Sliding window: a query at position p sees keys at positions > p - window.
    pub window: Option<usize>,
    /// Logit soft-capping `cap * tanh(s / cap)`.
    pub softcap: Option<f32>,
}

/// Head sizes the kernels are built for.
pub const HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// The kernel of `names` (one per entry of [`HEAD_DIMS`]) for heads of `head_dim`: a static
/// name, so that a launch allocates nothing.
fn by_head_dim(head_dim: usize, names: [&'static str; 3]) -> Result<&'static str, KernelError> {
    HEAD_DIMS
        .iter()
        .position(|&d| d == head_dim)
        .map(|i| names[i])
        .ok_or_else(|| {
            KernelError::Invalid(format!(
                "attention kernels are built for heads of {HEAD_DIMS:?} values, not {head_dim}"
            ))
        })
}

/// Query heads one decode block serves (attention.cu's DEC_GMAX).
const DEC_GMAX: usize = 8;

impl AttnParams {
    fn check(&self, layout: &KvLayout) -> Result<(), KernelError> {
        if self.n_head_kv == 0 || !self.n_head.is_multiple_of(self.n_head_kv) {
            return Err(KernelError::Invalid(format!(
                "attention: {} heads are not a multiple of {} KV heads",
                self.n_head, self.n_head_kv
            )));
        }
        if !HEAD_DIMS.contains(&self.head_dim) {
            return Err(KernelError::Invalid(format!(
                "attention kernels are built for heads of {HEAD_DIMS:?} values, not {}",
                self.head_dim
            )));
        }
        if self.window == Some(0) {
            return Err(KernelError::Invalid(
                "attention: a window of 0 positions".into(),
            ));
        }
        if self.softcap.is_some_and(|c| c.is_nan() || c <= 0.0) {
            return Err(KernelError::Invalid(format!(
                "attention: softcap {:?} must be positive",
                self.softcap
            )));
        }
        layout.check(self.n_head_kv, self.head_dim)?;
        dim(self.n_head * self.head_dim, "attention q width")?;
        Ok(())
    }

    fn window_arg(&self) -> Result<i32, KernelError> {
        // A window past i32 sees everything a cache can hold.
        Ok(self.window.map_or(0, |w| w.min(i32::MAX as usize) as i32))
    }

    fn kv_args(&self, layout: &KvLayout) -> Result<[Arg; 7], KernelError> {
        Ok([
            Arg::I32(dim(self.n_head, "heads")?),
            Arg::I32(dim(self.n_head_kv, "kv heads")?),
            Arg::F32(self.scale),
            Arg::F32(self.softcap.unwrap_or(0.0)),
            Arg::I32(self.window_arg()?),
            Arg::I32(dim(layout.page_tokens, "page_tokens")?),
            Arg::I32(layout.k_type.code()),
        ])
    }
}

/// How a decode launch cuts its sequences: splits of `split` positions (cut at multiples of
/// `split`), at most `max_splits` per sequence, and the scratch that holds each split's partial
/// result. Made by [`DecodePlan::new`] for a device, or with an explicit split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodePlan {
    pub n_seq: usize,
    /// Positions of the longest sequence (a longer one is cut to it).
    pub max_len: usize,
    pub split: usize,
    pub max_splits: usize,
    /// Bytes of the scratch buffer [`paged_decode`] needs.
    pub scratch_bytes: usize,
}

impl DecodePlan {
    /// Positions of one tile of the decode kernel (16 KiB of f16 per side).
    pub fn tile(head_dim: usize) -> usize {
        8192 / head_dim
    }

    /// The plan for `dev`: the longest splits (up to 16 tiles) that still give every SM two
    /// blocks, so that a short context is not cut finer than it needs and a long one fills the
    /// GPU even with one sequence.
    pub fn new(
        dev: &Device,
        p: &AttnParams,
        n_seq: usize,
        max_len: usize,
    ) -> Result<DecodePlan, KernelError> {
        if !HEAD_DIMS.contains(&p.head_dim) || p.n_head_kv == 0 {
            return Err(KernelError::Invalid(format!(
                "attention kernels are built for heads of {HEAD_DIMS:?} values, not {}",
                p.head_dim
            )));
        }
        let sms = dev.multiprocessors().max(1) as usize;
        let blocks = n_seq * p.n_head_kv * (p.n_head / p.n_head_kv).div_ceil(DEC_GMAX);
        let tile = Self::tile(p.head_dim);
        let mut c = 16;
        while c > 1 && blocks * Self::splits(p, max_len, tile * c) < 2 * sms {
            c /= 2;
        }
        Self::with_split(p, n_seq, max_len, tile * c)
    }

    /// A plan with splits of `split` positions (a positive multiple of [`DecodePlan::tile`]).
    pub fn with_split(
        p: &AttnParams,
        n_seq: usize,
        max_len: usize,
        split: usize,
    ) -> Result<DecodePlan, KernelError> {
        if !HEAD_DIMS.contains(&p.head_dim) {
            return Err(KernelError::Invalid(format!(
                "attention kernels are built for heads of {HEAD_DIMS:?} values, not {}",
                p.head_dim
            )));
        }
        let tile = Self::tile(p.head_dim);
        if split == 0 || !split.is_multiple_of(tile) {
            return Err(KernelError::Invalid(format!(
                "decode splits of {split} positions: not a multiple of the {tile}-position tile"
            )));
        }
        let max_splits = Self::splits(p, max_len, split);
        let scratch_bytes = n_seq
            .checked_mul(p.n_head)
            .and_then(|x| x.checked_mul(max_splits))
            .and_then(|x| x.checked_mul((p.head_dim + 2) * 4))
            .ok_or_else(|| KernelError::Invalid("decode scratch size overflows".into()))?;
        Ok(DecodePlan {
            n_seq,
            max_len,
            split,
            max_splits,
            scratch_bytes,
        })
    }

    /// The most splits a sequence of at most `max_len` positions needs: its visible positions
    /// (the window's, with one split more where the window starts inside one).
    fn splits(p: &AttnParams, max_len: usize, split: usize) -> usize {
        let all = max_len.div_ceil(split);
        match p.window {
            Some(w) => all.min(w.div_ceil(split) + 1),
            None => all,
        }
        .max(1)
    }
}

/// Decode attention for `plan.n_seq` sequences, one query token each.
///
/// - `q`: `[n_seq][n_head][head_dim]` f32; `out` the same shape.
/// - `pages`: the layer's page tables, the pages of every sequence of the batch together.
/// - `seqs`: `[n_seq][2]` i32 on the device: the index in `pages` of the sequence's first page
///   (its pages follow in order), and its length (positions in the cache, this token's
///   included: the query is at position length − 1). Pages wholly before a sliding window are
///   never read, so their entries may be anything.
/// - `scratch`: at least `plan.scratch_bytes`.
///
/// Each sequence's keys are read once per KV head, by blocks of its query heads' group.
#[allow(clippy::too_many_arguments)]
pub fn paged_decode(
    s: &Stream,
    p: &AttnParams,
    layout: &KvLayout,
    pages: &KvPageTables<'_>,
    seqs: &DeviceBuffer,
    plan: &DecodePlan,
    q: &DeviceBuffer,
    scratch: &DeviceBuffer,
    out: &DeviceBuffer,
) -> Result<(), KernelError> {
    p.check(layout)?;
    let n_pages = pages.check()?;
    let check = DecodePlan::with_split(p, plan.n_seq, plan.max_len, plan.split)?;
    if check != *plan {
        return Err(KernelError::Invalid(format!(
            "decode plan {plan:?} was made for other attention parameters"
        )));
    }
    let n_seq = plan.n_seq;
    need(seqs, 2 * n_seq, 4, "decode seqs")?;
    need(q, n_seq * p.n_head * p.head_dim, 4, "decode q")?;
    need(out, n_seq * p.n_head * p.head_dim, 4, "decode out")?;
    need(scratch, plan.scratch_bytes, 1, "decode scratch")?;
    if n_seq == 0 {
        return Ok(());
    }
    let chunks = (p.n_head / p.n_head_kv).div_ceil(DEC_GMAX);
    let dev = s.device();
    let kern = dev.kernel(by_head_dim(
        p.head_dim,
        ["attn_decode_hd64", "attn_decode_hd128", "attn_decode_hd256"],
    )?)?;
    let [nh, nkv, scale, cap, window, pt, kt] = p.kv_args(layout)?;
    let n_seq_arg = dim(n_seq, "sequences")?;
    s.launch(
        kern,
        LaunchConfig {
            grid: (
                dim(plan.max_splits, "splits")? as u32,
                dim(p.n_head_kv * chunks, "kv heads")? as u32,
                n_seq_arg as u32,
            ),
            block: (128, 1, 1),
        },
        &[
            q.into(),
            pages.k.into(),
            pages.v.into(),
            Arg::I32(n_pages),
            seqs.into(),
            scratch.into(),
            nh,
            nkv,
            scale,
            cap,
            window,
            pt,
            kt,
            Arg::I32(layout.v_type.code()),
            Arg::I32(dim(plan.split, "split")?),
            Arg::I32(dim(plan.max_splits, "splits")?),
            Arg::I32(dim(plan.max_len, "max_len")?),
        ],
    )?;
    let comb = dev.kernel("attn_decode_combine")?;
    s.launch(
        comb,
        LaunchConfig {
            grid: (dim(p.n_head, "heads")? as u32, n_seq_arg as u32, 1),
            block: (128, 1, 1),
        },
        &[
            scratch.into(),
            seqs.into(),
            out.into(),
            nh,
            Arg::I32(dim(p.head_dim, "head_dim")?),
            window,
            Arg::I32(dim(plan.split, "split")?),
            Arg::I32(dim(plan.max_splits, "splits")?),
            Arg::I32(dim(plan.max_len, "max_len")?),
        ],
    )
}

/// Prefill attention for `n_tok` query tokens of one sequence at positions `pos0 ..`, causal,
/// over its pages (which already hold these tokens' keys and values: write them with
/// [`super::kv::kv_store`] first).
///
/// - `q`: `[n_tok][n_head][head_dim]` f32; `out` the same shape.
/// - `pages`: the sequence's page tables; they must cover positions `0 .. pos0 + n_tok` (pages
///   wholly before a sliding window are never read).
#[allow(clippy::too_many_arguments)]
pub fn paged_prefill(
    s: &Stream,
    p: &AttnParams,
    layout: &KvLayout,
    pages: &KvPageTables<'_>,
    q: &DeviceBuffer,
    n_tok: usize,
    pos0: usize,
    out: &DeviceBuffer,
) -> Result<(), KernelError> {
    p.check(layout)?;
    let n_pages = pages.check()?;
    let end = pos0
        .checked_add(n_tok)
        .ok_or_else(|| KernelError::Invalid("prefill positions overflow".into()))?;
    dim(end, "prefill positions")?;
    if (n_pages as usize) < end.div_ceil(layout.page_tokens) {
        return Err(KernelError::Invalid(format!(
            "prefill up to position {end} needs {} pages of {}, the tables have {n_pages}",
            end.div_ceil(layout.page_tokens),
            layout.page_tokens
        )));
    }
    need(q, n_tok * p.n_head * p.head_dim, 4, "prefill q")?;
    need(out, n_tok * p.n_head * p.head_dim, 4, "prefill out")?;
    if n_tok == 0 {
        return Ok(());
    }
    let rows = n_tok * (p.n_head / p.n_head_kv);
    let kern = s.device().kernel(by_head_dim(
        p.head_dim,
        [
            "attn_prefill_hd64",
            "attn_prefill_hd128",
            "attn_prefill_hd256",
        ],
    )?)?;
    let [nh, nkv, scale, cap, window, pt, kt] = p.kv_args(layout)?;
    s.launch(
        kern,
        LaunchConfig {
            grid: (
                dim(rows.div_ceil(64), "query rows")? as u32,
                dim(p.n_head_kv, "kv heads")? as u32,
                // attention_prefill.cu: heads of 256 are computed in two halves of columns.
                if p.head_dim == 256 { 2 } else { 1 },
            ),
            block: (128, 1, 1),
        },
        &[
            q.into(),
            pages.k.into(),
            pages.v.into(),
            Arg::I32(n_pages),
            out.into(),
            Arg::I32(dim(n_tok, "tokens")?),
            Arg::I32(dim(pos0, "pos0")?),
            nh,
            nkv,
            scale,
            cap,
            window,
            pt,
            kt,
            Arg::I32(layout.v_type.code()),
        ],
    )
}

/// Bytes of K and V a decode step reads for sequences of `lens` positions (for benchmarks).
pub fn decode_kv_bytes(p: &AttnParams, layout: &KvLayout, lens: &[usize]) -> u64 {
    let width = p.n_head_kv * p.head_dim;
    let row = (layout.k_type.row_bytes(width) + layout.v_type.row_bytes(width)) as u64;
    lens.iter()
        .map(|&l| p.window.map_or(l, |w| w.min(l)) as u64 * row)
        .sum()
}
