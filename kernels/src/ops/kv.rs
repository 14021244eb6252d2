//! `kv.cu`: the paged KV cache's layout as the attention kernels address it, and writing K and
//! V rows into it in the cache type.
//!
//! A layer's keys (and its values) are pages of `page_tokens` positions; a position's row holds
//! every KV head (`[n_head_kv][head_dim]`) in f16, Q8_0 or Q4_0 quantized along the row in blocks
//! of 32 — byte for byte the CPU's `strata_simd::ops::attention::KvPages`, so that a page moves
//! between RAM and VRAM by a plain copy. The kernels find pages through a page table: a device
//! array of u64 page base addresses (16-byte aligned: f16 rows are read 16 bytes at a time).

use super::{dim, need};
use crate::device::{Arg, DeviceBuffer, KernelError, LaunchConfig, Stream};

/// A KV cache type (llama.cpp's `--cache-type-k/-v`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvType {
    F16,
    Q8_0,
    Q4_0,
}

impl KvType {
    pub const ALL: [KvType; 3] = [KvType::F16, KvType::Q8_0, KvType::Q4_0];

    /// Values per quantization block (the head dimension must be a multiple of it).
    pub fn block_size(self) -> usize {
        match self {
            KvType::F16 => 1,
            KvType::Q8_0 | KvType::Q4_0 => 32,
        }
    }

    /// Bytes of `width` values (a multiple of [`KvType::block_size`]).
    pub fn row_bytes(self, width: usize) -> usize {
        match self {
            KvType::F16 => 2 * width,
            KvType::Q8_0 => width / 32 * 34,
            KvType::Q4_0 => width / 32 * 18,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
            KvType::Q4_0 => "q4_0",
        }
    }

    /// The code the kernels take (kvcache.cuh's KV_*).
    pub(crate) fn code(self) -> i32 {
        match self {
            KvType::F16 => 0,
            KvType::Q8_0 => 1,
            KvType::Q4_0 => 2,
        }
    }
}

/// One layer's cache types and page size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub k_type: KvType,
    pub v_type: KvType,
    /// Positions per page (the engine's `PAGE_TOKENS`).
    pub page_tokens: usize,
}

impl KvLayout {
    /// Bytes of one page of keys and of values whose rows are `width` values.
    pub fn page_bytes(&self, width: usize) -> (usize, usize) {
        (
            self.page_tokens * self.k_type.row_bytes(width),
            self.page_tokens * self.v_type.row_bytes(width),
        )
    }

    /// Checks that rows of heads of `head_dim` values, `n_head_kv` of them, fit both types and
    /// that a page's offsets fit the kernels' 32-bit arithmetic.
    pub(crate) fn check(&self, n_head_kv: usize, head_dim: usize) -> Result<(), KernelError> {
        for ty in [self.k_type, self.v_type] {
            if head_dim == 0 || !head_dim.is_multiple_of(ty.block_size()) {
                return Err(KernelError::Invalid(format!(
                    "a {} KV cache needs heads of a multiple of {} values, not {head_dim}",
                    ty.name(),
                    ty.block_size()
                )));
            }
        }
        if self.page_tokens == 0 {
            return Err(KernelError::Invalid("KV pages of 0 positions".into()));
        }
        let width = n_head_kv
            .checked_mul(head_dim)
            .ok_or_else(|| KernelError::Invalid("KV row width overflows".into()))?;
        let (kb, vb) = self.page_bytes(width);
        dim(kb.max(vb).max(2 * width), "KV page bytes")?;
        Ok(())
    }
}

/// One layer's page tables: `n_pages` u64 page base addresses for the keys (`k`) and as many
/// for the values (`v`), numbered alike (page `i` of either holds positions
/// `i * page_tokens ..`). A key page holds `page_tokens * k_type.row_bytes(width)` bytes.
#[derive(Clone, Copy, Debug)]
pub struct KvPageTables<'a> {
    pub k: &'a DeviceBuffer,
    pub v: &'a DeviceBuffer,
    pub n_pages: usize,
}

impl KvPageTables<'_> {
    pub(crate) fn check(&self) -> Result<i32, KernelError> {
        need(self.k, self.n_pages, 8, "K page table")?;
        need(self.v, self.n_pages, 8, "V page table")?;
        dim(self.n_pages, "pages")
    }
}

/// Writes `n_tok` tokens' keys and values (`k_src`, `v_src`: `[n_tok][width]` f32) into their
/// rows of the pages, in the layout's types: f16 rounded to nearest even, Q8_0 and Q4_0 exactly
/// as `strata_storage::quant::quantize_row`. `positions` holds each token's position (i32 on
/// the device); a token whose page is past the tables is skipped.
#[allow(clippy::too_many_arguments)]
pub fn kv_store(
    s: &Stream,
    layout: &KvLayout,
    width: usize,
    pages: &KvPageTables<'_>,
    k_src: &DeviceBuffer,
    v_src: &DeviceBuffer,
    positions: &DeviceBuffer,
    n_tok: usize,
) -> Result<(), KernelError> {
    layout.check(1, width)?;
    let n_pages = pages.check()?;
    need(k_src, n_tok * width, 4, "kv_store k_src")?;
    need(v_src, n_tok * width, 4, "kv_store v_src")?;
    need(positions, n_tok, 4, "kv_store positions")?;
    if n_tok == 0 {
        return Ok(());
    }
    let k = s.device().kernel("kv_store")?;
    s.launch(
        k,
        LaunchConfig {
            grid: (dim(n_tok, "tokens")? as u32, 2, 1),
            block: (128, 1, 1),
        },
        &[
            k_src.into(),
            v_src.into(),
            positions.into(),
            pages.k.into(),
            pages.v.into(),
            Arg::I32(n_pages),
            Arg::I32(dim(layout.page_tokens, "page_tokens")?),
            Arg::I32(dim(width, "width")?),
            Arg::I32(layout.k_type.code()),
            Arg::I32(layout.v_type.code()),
        ],
    )
}
