//! What attention reads: one layer's keys or values, in pages of positions, in f16, Q8_0 or
//! Q4_0 (llama.cpp's `--cache-type-k/-v`).
//!
//! A position's row holds every KV head (`[kv_head][head_dim]`) in the cache type; quantized
//! types quantize along the head dimension in blocks of 32, so one head's part of a row is a
//! whole number of blocks and can be taken out alone. Pages are slices the caller owns (the
//! engine's paged cache, or one contiguous buffer); where they live is the caller's business.

use half::f16;
use strata_storage::quant::{GgmlType, dequantize_row, quantize_row};

/// The cache types attention reads.
pub const KV_TYPES: [GgmlType; 3] = [GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_0];

/// Whether `ty` can hold a KV cache whose heads are `head_dim` wide.
pub fn kv_type_fits(ty: GgmlType, head_dim: usize) -> bool {
    KV_TYPES.contains(&ty) && head_dim.is_multiple_of(ty.block_size())
}

/// Writes `src` (`width` f32 values: one position, every KV head) as a row of `ty`.
///
/// # Panics
/// When `ty` is not one of [`KV_TYPES`] or the lengths do not match it (a caller's bug).
pub fn kv_store_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) {
    assert!(KV_TYPES.contains(&ty), "{ty:?} is not a KV cache type");
    if let Err(e) = quantize_row(ty, src, dst) {
        panic!(
            "KV row of {} values into {} bytes: {e}",
            src.len(),
            dst.len()
        );
    }
}

/// One layer's keys (or values): positions `0..pages.len() * page_tokens`, each a row of
/// `row_bytes` bytes in `ty`.
#[derive(Clone, Copy)]
pub struct KvPages<'a> {
    ty: GgmlType,
    page_tokens: usize,
    row_bytes: usize,
    pages: &'a [&'a [u8]],
}

impl<'a> KvPages<'a> {
    /// A view of `pages`, each holding `page_tokens` rows of `width` values in `ty`.
    ///
    /// # Panics
    /// When `ty` is not a cache type, `width` is not a whole number of its blocks, a page is
    /// shorter than `page_tokens` rows, or an f16 page is not 2-byte aligned (callers' bugs).
    pub fn new(ty: GgmlType, page_tokens: usize, width: usize, pages: &'a [&'a [u8]]) -> Self {
        assert!(KV_TYPES.contains(&ty), "{ty:?} is not a KV cache type");
        assert!(width.is_multiple_of(ty.block_size()) && page_tokens > 0);
        let row_bytes = ty.row_bytes(width);
        for p in pages {
            assert!(p.len() >= page_tokens * row_bytes, "KV page too short");
            assert!(ty != GgmlType::F16 || p.as_ptr().cast::<f16>().is_aligned());
        }
        Self {
            ty,
            page_tokens,
            row_bytes,
            pages,
        }
    }

    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// Positions the pages hold.
    pub fn positions(&self) -> usize {
        self.pages.len() * self.page_tokens
    }

    /// Bytes of one KV head's part of a row.
    #[inline]
    fn head_bytes(&self, hd: usize) -> usize {
        self.ty.row_bytes(hd)
    }

    /// Head `kvh`'s part (`hd` values) of position `pos`, in the cache type.
    #[inline]
    pub(super) fn head(&self, pos: usize, kvh: usize, hd: usize) -> &'a [u8] {
        let page = self.pages[pos / self.page_tokens];
        let hb = self.head_bytes(hd);
        let off = (pos % self.page_tokens) * self.row_bytes + kvh * hb;
        &page[off..off + hb]
    }

    /// [`KvPages::head`] as f16 values (an f16 cache only).
    #[inline]
    pub(super) fn head_f16(&self, pos: usize, kvh: usize, hd: usize) -> &'a [f16] {
        debug_assert_eq!(self.ty, GgmlType::F16);
        let b = self.head(pos, kvh, hd);
        // SAFETY: `new` checked that f16 pages are 2-byte aligned, and row offsets of an f16
        // cache are even; f16 is a plain 2-byte value valid for any bits.
        unsafe { std::slice::from_raw_parts(b.as_ptr().cast::<f16>(), hd) }
    }

    /// Head `kvh` of position `pos` as f32 values.
    pub(super) fn head_to_f32(&self, pos: usize, kvh: usize, hd: usize, dst: &mut [f32]) {
        // Lengths are consistent by construction (`new`), so this cannot fail.
        let _ = dequantize_row(self.ty, self.head(pos, kvh, hd), &mut dst[..hd]);
    }
}

/// An f16 slice as its bytes (for a contiguous f16 cache viewed as one page).
pub fn f16_bytes(x: &[f16]) -> &[u8] {
    // SAFETY: f16 is 2 plain bytes with no padding; the byte slice covers the same memory.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}
