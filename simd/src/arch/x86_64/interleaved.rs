//! Kernels over the interleaved weight layout (`matmul::interleave`): one tile of 16 rows against 1 to 4
//! tokens, AVX-512 VNNI. Each 512-bit weight vector holds 4 columns of each of the 16 rows;
//! an activation's 4 bytes are broadcast and one `vpdpbusd` adds 16 rows × 4 products, so the
//! 16 results build up in the lanes without any horizontal reduction.
//!
//! Contract of every `unsafe fn` here: the CPU has AVX-512 F/BW/VL/DQ and VNNI (plus AVX2,
//! FMA, F16C); the pointers are valid for the bytes the function's docs name.

use std::arch::x86_64::*;

use super::avx2::f16_at;
use crate::matmul::interleave::{
    Q4K_TILE_BLOCK, Q5_0_HIGH, Q5_0_TILE_BLOCK, Q6K_TILE_BLOCK, Q8_0_TILE_BLOCK, q6k_high, q6k_low,
    q6k_scales,
};
use crate::tune::Ahead;

/// Bytes of one Q8_K activation block: d (f32), 256 quants, 16 block sums (i16).
const Q8K_BLOCK: usize = 292;

/// The 4 bytes at `p` in every 32-bit lane.
///
/// # Safety
/// `p` must be valid for reading 4 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
unsafe fn bcast4(p: *const u8) -> __m512i {
    // SAFETY: the caller guarantees 4 readable bytes.
    _mm512_set1_epi32(unsafe { p.cast::<i32>().read_unaligned() })
}

/// Asks for the `len` bytes at `p` to be brought into the cache: into L1 (`prefetcht0`), or
/// into L2 only (`prefetcht1`) when `l2`. A hint: it never faults. SSE only, so the 256-bit
/// kernels (`interleaved_avx2`) share it.
#[inline]
pub(crate) fn prefetch(p: *const u8, len: usize, l2: bool) {
    let mut off = 0;
    while off < len {
        let at = p.wrapping_add(off).cast();
        // A hint: it does not fault, even past the end of an allocation.
        // SAFETY: SSE is part of x86_64's baseline, so the intrinsic's feature is present.
        unsafe {
            if l2 {
                _mm_prefetch::<_MM_HINT_T1>(at);
            } else {
                _mm_prefetch::<_MM_HINT_T0>(at);
            }
        }
        off += 64;
    }
}

/// A row kernel's software prefetch for its block of `len` bytes at `x`: the lines that start
/// within `[x + ahead.bytes, x + ahead.bytes + len)`, so that a row streamed block by block asks
/// for each line once, spread over the row (nothing when `ahead.bytes` is 0). A hint: it never
/// faults.
#[inline]
pub(crate) fn prefetch_block(x: *const u8, len: usize, ahead: Ahead) {
    if ahead.bytes == 0 {
        return;
    }
    let p = x.wrapping_add(ahead.bytes);
    if let Some((skip, n)) = block_lines(p as usize, len) {
        prefetch(p.wrapping_add(skip), n, ahead.l2);
    }
}

/// For [`prefetch_block`]: the offset of the first line start in `[at, at + len)` and the
/// bytes from it to the span's end, if a line starts there.
#[inline]
fn block_lines(at: usize, len: usize) -> Option<(usize, usize)> {
    let skip = at.wrapping_neg() % 64;
    (skip < len).then(|| (skip, len - skip))
}

/// Part `i` of `n` of the software prefetch of a tile block of `block` bytes at
/// `x + ahead.bytes` (0: none), for a kernel of `NT` tokens that asks for part `i` as it starts
/// sub-block `i` of `n`.
///
/// Decode (`NT` 1) spreads the block's prefetches over the time the block takes: part `i` is
/// lines `l i / n..l (i + 1) / n` of its `l` lines. Issued all at the block's start, a K-quant
/// block's 21 to 53 lines filled the core's line-fill buffers ahead of the kernel's own loads;
/// spread, qwen2.5-coder-1.5b decode ran 3-11% faster on Emerald Rapids, in the 256- and
/// 512-bit kernels alike. A batch's kernel (`NT` > 1) computes longer per byte and reads most
/// blocks from L2: there the spread's per-sub-block work cost more than it gained (qwen pp512
/// at `STRATA_SIMD=avx2`: 7% slower), so it keeps one burst at the block's start.
#[inline(always)]
pub(super) fn prefetch_part<const NT: usize>(
    x: *const u8,
    block: usize,
    ahead: Ahead,
    i: usize,
    n: usize,
) {
    if ahead.bytes == 0 {
        return;
    }
    for l in part_lines::<NT>(block, i, n) {
        prefetch(x.wrapping_add(ahead.bytes + 64 * l), 1, ahead.l2);
    }
}

/// The lines of a `block`-byte tile block that [`prefetch_part`] asks for in part `i` of `n`.
#[inline(always)]
fn part_lines<const NT: usize>(block: usize, i: usize, n: usize) -> std::ops::Range<usize> {
    let lines = block.div_ceil(64);
    if NT == 1 {
        lines * i / n..lines * (i + 1) / n
    } else if i == 0 {
        0..lines
    } else {
        0..0
    }
}

/// 16 lanes × `NT` tokens of a Q4_K tile: `out + t * out_stride` receives the 16 rows'
/// results for token `t`. `ahead` is the software prefetch (distance in bytes, 0: none, and the
/// cache it fills): decode streams the weights from DRAM once, and the hardware prefetcher
/// alone leaves a good part of the speed on some CPUs (`tune` measures it). The prefetches run
/// on past the tile's end into the next tile, which the same thread most likely computes next
/// (or past the matrix: a hint never faults). Stopped at each tile's end they left the first
/// blocks of every tile to the hardware prefetcher: qwen2.5-coder-1.5b's 1536-column tiles are
/// 6 blocks, a third of them unprefetched at 2 blocks ahead.
///
/// # Safety
/// See the module docs; `tile` holds `nb` tile blocks, `act + t * act_row` holds `nb` Q8_K
/// blocks for every `t < NT`, and `out + t * out_stride` is valid for writing 16 f32.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
#[expect(
    clippy::needless_range_loop,
    reason = "token and sub-block indices address several register arrays in step"
)]
pub(crate) unsafe fn q4k<const NT: usize>(
    nb: usize,
    tile: *const u8,
    act: *const u8,
    act_row: usize,
    out: *mut f32,
    out_stride: usize,
    ahead: Ahead,
) {
    let m4 = _mm512_set1_epi8(0xF);
    let m63 = _mm_set1_epi8(63);
    let m15 = _mm_set1_epi8(15);
    let m48 = _mm_set1_epi8(0x30);
    // vpermd indices broadcasting i32 lane p of a 128-bit vector.
    let pick = [
        _mm512_set1_epi32(0),
        _mm512_set1_epi32(1),
        _mm512_set1_epi32(2),
        _mm512_set1_epi32(3),
    ];
    let mut acc = [_mm512_setzero_ps(); NT];
    for b in 0..nb {
        // SAFETY: block b of the tile and of every token's activations is in bounds (caller);
        // every offset below stays inside them.
        unsafe {
            let x = tile.add(b * Q4K_TILE_BLOCK);
            let dvec = _mm512_cvtph_ps(_mm256_loadu_si256(x.cast()));
            let mvec = _mm512_cvtph_ps(_mm256_loadu_si256(x.add(32).cast()));
            let q = |j: usize| _mm_loadu_si128(x.add(64 + 16 * j).cast());
            // The 6-bit scales and mins of the 8 sub-blocks, one byte per row.
            let mut sc = [_mm_setzero_si128(); 8];
            let mut mn = [_mm_setzero_si128(); 8];
            for s in 0..4 {
                sc[s] = _mm_and_si128(q(s), m63);
                mn[s] = _mm_and_si128(q(s + 4), m63);
            }
            for s in 4..8 {
                // (byte >> 6) << 4 is (byte >> 2) & 0x30.
                let top_s = _mm_and_si128(_mm_srli_epi16::<2>(q(s - 4)), m48);
                let top_m = _mm_and_si128(_mm_srli_epi16::<2>(q(s)), m48);
                sc[s] = _mm_or_si128(_mm_and_si128(q(s + 4), m15), top_s);
                mn[s] = _mm_or_si128(_mm_and_si128(_mm_srli_epi16::<4>(q(s + 4)), m15), top_m);
            }
            // Mins against the block sums: Σ_s min_s · bsum_s per row, as i16 pairs.
            let mut mins = [_mm512_setzero_si512(); 4];
            for p in 0..4 {
                let lo = _mm_unpacklo_epi8(mn[2 * p], mn[2 * p + 1]);
                let hi = _mm_unpackhi_epi8(mn[2 * p], mn[2 * p + 1]);
                mins[p] = _mm512_cvtepu8_epi16(_mm256_set_m128i(hi, lo));
            }
            for t in 0..NT {
                let y = act.add(t * act_row + b * Q8K_BLOCK);
                let bs = _mm256_loadu_si256(y.add(260).cast());
                // bsum of sub-block s (32 columns) = the two 16-column sums.
                let bsum = _mm_hadd_epi16(
                    _mm256_castsi256_si128(bs),
                    _mm256_extracti128_si256::<1>(bs),
                );
                let bsum = _mm512_castsi128_si512(bsum);
                let mut m = _mm512_setzero_si512();
                for p in 0..4 {
                    let pair = _mm512_permutexvar_epi32(pick[p], bsum);
                    m = _mm512_add_epi32(m, _mm512_madd_epi16(mins[p], pair));
                }
                let dy = _mm512_set1_ps(y.cast::<f32>().read_unaligned());
                acc[t] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(m), _mm512_mul_ps(mvec, dy), acc[t]);
            }
            let mut accb = [_mm512_setzero_ps(); NT];
            for s in 0..8 {
                prefetch_part::<NT>(x, Q4K_TILE_BLOCK, ahead, s, 8);
                let g0 = x.add(256 + 256 * s);
                let mut lo = [_mm512_setzero_si512(); 4];
                let mut hi = [_mm512_setzero_si512(); 4];
                for g in 0..4 {
                    let w = _mm512_loadu_si512(g0.add(64 * g).cast());
                    lo[g] = _mm512_and_si512(w, m4);
                    hi[g] = _mm512_and_si512(_mm512_srli_epi16::<4>(w), m4);
                }
                let scf = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(sc[s]));
                for t in 0..NT {
                    let a = act.add(t * act_row + b * Q8K_BLOCK + 4 + 32 * s);
                    let mut isum = _mm512_setzero_si512();
                    for g in 0..4 {
                        isum = _mm512_dpbusd_epi32(isum, lo[g], bcast4(a.add(8 * g)));
                        isum = _mm512_dpbusd_epi32(isum, hi[g], bcast4(a.add(8 * g + 4)));
                    }
                    accb[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scf, accb[t]);
                }
            }
            for t in 0..NT {
                let y = act.add(t * act_row + b * Q8K_BLOCK);
                let dy = _mm512_set1_ps(y.cast::<f32>().read_unaligned());
                acc[t] = _mm512_fmadd_ps(accb[t], _mm512_mul_ps(dvec, dy), acc[t]);
            }
        }
    }
    for (t, a) in acc.iter().enumerate() {
        // SAFETY: 16 writable f32 at out + t * out_stride (caller).
        unsafe { _mm512_storeu_ps(out.add(t * out_stride), *a) };
    }
}

/// As [`q4k`], for a Q6_K tile. The quants' `- 32` comes out per 16-column sub-block as
/// `32 · bsum` (Q8_K's block sums are exactly those 16-column sums).
///
/// # Safety
/// As [`q4k`], with Q6_K tile blocks.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
#[expect(
    clippy::needless_range_loop,
    reason = "token indices address several register arrays in step"
)]
pub(crate) unsafe fn q6k<const NT: usize>(
    nb: usize,
    tile: *const u8,
    act: *const u8,
    act_row: usize,
    out: *mut f32,
    out_stride: usize,
    ahead: Ahead,
) {
    let m4 = _mm512_set1_epi8(0xF);
    let m48 = _mm512_set1_epi8(0x30);
    let mut acc = [_mm512_setzero_ps(); NT];
    for b in 0..nb {
        // SAFETY: block b of the tile and of every token's activations is in bounds (caller);
        // every offset below stays inside them.
        unsafe {
            let x = tile.add(b * Q6K_TILE_BLOCK);
            let dvec = _mm512_cvtph_ps(_mm256_loadu_si256(x.cast()));
            let mut accb = [_mm512_setzero_ps(); NT];
            for s in 0..16 {
                prefetch_part::<NT>(x, Q6K_TILE_BLOCK, ahead, s, 16);
                let w0 = _mm512_loadu_si512(x.add(q6k_low(s)).cast());
                let w1 = _mm512_loadu_si512(x.add(q6k_low(s) + 64).cast());
                let h = _mm512_loadu_si512(x.add(q6k_high(s)).cast());
                // Top bits 2q..2q + 2 of each byte moved to bits 4..6.
                let q = [
                    _mm512_or_si512(
                        _mm512_and_si512(w0, m4),
                        _mm512_and_si512(_mm512_slli_epi16::<4>(h), m48),
                    ),
                    _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi16::<4>(w0), m4),
                        _mm512_and_si512(_mm512_slli_epi16::<2>(h), m48),
                    ),
                    _mm512_or_si512(_mm512_and_si512(w1, m4), _mm512_and_si512(h, m48)),
                    _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi16::<4>(w1), m4),
                        _mm512_and_si512(_mm512_srli_epi16::<2>(h), m48),
                    ),
                ];
                let sc = _mm_loadu_si128(x.add(q6k_scales(s)).cast());
                let scf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc));
                for t in 0..NT {
                    let y = act.add(t * act_row + b * Q8K_BLOCK);
                    let a = y.add(4 + 16 * s);
                    let bsum = i32::from(y.add(260 + 2 * s).cast::<i16>().read_unaligned());
                    let mut isum = _mm512_set1_epi32(-32 * bsum);
                    for (i, qi) in q.iter().enumerate() {
                        isum = _mm512_dpbusd_epi32(isum, *qi, bcast4(a.add(4 * i)));
                    }
                    accb[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scf, accb[t]);
                }
            }
            for t in 0..NT {
                let y = act.add(t * act_row + b * Q8K_BLOCK);
                let dy = _mm512_set1_ps(y.cast::<f32>().read_unaligned());
                acc[t] = _mm512_fmadd_ps(accb[t], _mm512_mul_ps(dvec, dy), acc[t]);
            }
        }
    }
    for (t, a) in acc.iter().enumerate() {
        // SAFETY: 16 writable f32 at out + t * out_stride (caller).
        unsafe { _mm512_storeu_ps(out.add(t * out_stride), *a) };
    }
}

/// Bytes of one Q8_0 activation block: d (f16) and 32 quants.
const Q8_0_ACT: usize = 34;

/// As [`q4k`], for a Q8_0 (`Q5 = false`) or Q5_0 (`Q5 = true`) tile against Q8_0
/// activations. The weights are stored unsigned with an offset (Q8_0 + 128, Q5_0 + 16), which
/// comes out as `offset · Σ a` per block.
///
/// # Safety
/// As [`q4k`], with Q8_0 / Q5_0 tile blocks and Q8_0 activation blocks.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
#[expect(
    clippy::needless_range_loop,
    reason = "token indices address several register arrays in step"
)]
pub(crate) unsafe fn legacy<const NT: usize, const Q5: bool>(
    nb: usize,
    tile: *const u8,
    act: *const u8,
    act_row: usize,
    out: *mut f32,
    out_stride: usize,
    ahead: Ahead,
) {
    let (block, offset) = if Q5 {
        (Q5_0_TILE_BLOCK, 16)
    } else {
        (Q8_0_TILE_BLOCK, 128)
    };
    let m4 = _mm512_set1_epi8(0xF);
    let m16 = _mm512_set1_epi8(0x10);
    let ones8 = _mm256_set1_epi8(1);
    let ones16 = _mm256_set1_epi16(1);
    let mut acc = [_mm512_setzero_ps(); NT];
    for b in 0..nb {
        // SAFETY: block b of the tile and of every token's activations is in bounds (caller);
        // every offset below stays inside them.
        unsafe {
            let x = tile.add(b * block);
            if ahead.bytes > 0 {
                prefetch(x.wrapping_add(ahead.bytes), block, ahead.l2);
            }
            let dvec = _mm512_cvtph_ps(_mm256_loadu_si256(x.cast()));
            // w[i]: columns 4i..4i + 4 of the 16 rows, unsigned.
            let mut w = [_mm512_setzero_si512(); 8];
            if Q5 {
                let h = _mm512_loadu_si512(x.add(Q5_0_HIGH).cast());
                // Bit i of each byte moved to bit 4.
                let top = [
                    _mm512_and_si512(_mm512_slli_epi16::<4>(h), m16),
                    _mm512_and_si512(_mm512_slli_epi16::<3>(h), m16),
                    _mm512_and_si512(_mm512_slli_epi16::<2>(h), m16),
                    _mm512_and_si512(_mm512_slli_epi16::<1>(h), m16),
                    _mm512_and_si512(h, m16),
                    _mm512_and_si512(_mm512_srli_epi16::<1>(h), m16),
                    _mm512_and_si512(_mm512_srli_epi16::<2>(h), m16),
                    _mm512_and_si512(_mm512_srli_epi16::<3>(h), m16),
                ];
                for g in 0..4 {
                    let v = _mm512_loadu_si512(x.add(32 + 64 * g).cast());
                    w[2 * g] = _mm512_or_si512(_mm512_and_si512(v, m4), top[2 * g]);
                    w[2 * g + 1] = _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4),
                        top[2 * g + 1],
                    );
                }
            } else {
                for (i, wi) in w.iter_mut().enumerate() {
                    *wi = _mm512_loadu_si512(x.add(32 + 64 * i).cast());
                }
            }
            for t in 0..NT {
                let y = act.add(t * act_row + b * Q8_0_ACT);
                let mut isum = _mm512_setzero_si512();
                for (i, wi) in w.iter().enumerate() {
                    isum = _mm512_dpbusd_epi32(isum, *wi, bcast4(y.add(2 + 4 * i)));
                }
                // Σ a over the block, times the offset.
                let a = _mm256_loadu_si256(y.add(2).cast());
                let s = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, a), ones16);
                let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
                let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
                let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
                let corr = _mm512_broadcastd_epi32(_mm_mullo_epi32(s, _mm_set1_epi32(offset)));
                let isum = _mm512_sub_epi32(isum, corr);
                let dy = _mm512_set1_ps(f16_at(y));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dvec, dy), acc[t]);
            }
        }
    }
    for (t, a) in acc.iter().enumerate() {
        // SAFETY: 16 writable f32 at out + t * out_stride (caller).
        unsafe { _mm512_storeu_ps(out.add(t * out_stride), *a) };
    }
}

#[cfg(test)]
mod tests {
    use super::{block_lines, part_lines};

    /// A row of blocks prefetched block by block asks for every line once: the line starts in
    /// each block's span, whatever the block size and the row's alignment.
    #[test]
    fn a_row_prefetched_block_by_block_asks_for_each_line_once() {
        for bs in [18, 22, 34, 84, 110, 144, 176, 210] {
            for start in 0..128 {
                let mut lines = Vec::new();
                for b in 0..64 {
                    let at = start + b * bs;
                    if let Some((skip, n)) = block_lines(at, bs) {
                        assert!(skip < 64 && skip + n == bs, "block {bs} at {at}");
                        lines.extend((0..n).step_by(64).map(|o| at + skip + o));
                    }
                }
                let want: Vec<usize> = (start.div_ceil(64) * 64..start + 64 * bs)
                    .step_by(64)
                    .collect();
                assert_eq!(lines, want, "block {bs}, row at {start}");
            }
        }
    }
    use crate::matmul::interleave::kq::{Q2K_TILE_BLOCK, Q3K_TILE_BLOCK, Q5K_TILE_BLOCK};
    use crate::matmul::interleave::{Q4K_TILE_BLOCK, Q6K_TILE_BLOCK};

    /// Every line of a tile block is prefetched once over its parts: spread over them in
    /// decode, all in the first for a batch.
    #[test]
    fn the_parts_of_a_prefetch_cover_each_line_of_the_block_once() {
        for (block, n) in [
            (Q4K_TILE_BLOCK, 8),
            (Q5K_TILE_BLOCK, 8),
            (Q3K_TILE_BLOCK, 8),
            (Q6K_TILE_BLOCK, 16),
            (Q2K_TILE_BLOCK, 16),
        ] {
            let lines = block.div_ceil(64);
            let decode: Vec<usize> = (0..n).flat_map(|i| part_lines::<1>(block, i, n)).collect();
            assert_eq!(decode, (0..lines).collect::<Vec<_>>(), "block {block}");
            let most = (0..n).map(|i| part_lines::<1>(block, i, n).len()).max();
            assert!(most <= Some(lines.div_ceil(n)), "block {block}: a burst");
            let batch: Vec<usize> = (0..n).flat_map(|i| part_lines::<4>(block, i, n)).collect();
            assert_eq!(batch, (0..lines).collect::<Vec<_>>(), "block {block}");
            assert_eq!(part_lines::<4>(block, 0, n), 0..lines);
        }
    }
}
