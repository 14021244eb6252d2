//! Kernels over the interleaved weight layout (`matmul::interleave`) in 256-bit registers, for
//! CPUs with AVX2 and no VNNI (Zen 3 and older, Intel before Ice Lake) and for AVX-512 CPUs
//! where 256-bit kernels measure faster (`tune`). The layout is the one the AVX-512 VNNI
//! kernels read: a 64-byte group holds 4 columns of each of 16 rows, so one 256-bit load is 4
//! columns of 8 rows, one row per 32-bit lane, and a tile is two halves of 8 rows.
//!
//! Without `vpdpbusd`, one 32-bit lane's 4 products are `vpmaddubsw` (unsigned weights ×
//! signed activations, pairs summed into i16) and one `vpmaddwd`; the i16 sums of several
//! column quads are added first wherever they cannot overflow, and the `vpmaddwd` multiplies
//! by the per-row sub-block scale at the same time, so a Q4_K sub-block of 32 columns costs 8
//! `vpmaddubsw`, 7 i16 adds and one `vpmaddwd` per 8 rows, with no horizontal reduction.
//!
//! Contract of every `unsafe fn` here: the CPU has AVX2, FMA and F16C; the pointers are valid
//! for the bytes the function's docs name.

use std::arch::x86_64::*;

use super::avx2;
use super::interleaved::{prefetch, prefetch_part};
use crate::tune::Ahead;

use crate::matmul::interleave::{
    Nibbles, Q4K_TILE_BLOCK, Q5_0_HIGH, Q5_0_TILE_BLOCK, Q6K_TILE_BLOCK, Q8_0_TILE_BLOCK, q6k_high,
    q6k_low, q6k_scales,
};

/// Bytes of one Q8_K activation block: d (f32), 256 quants, 16 block sums (i16).
pub(super) const Q8K_BLOCK: usize = 292;
/// Bytes of one Q8_0 activation block: d (f16) and 32 quants.
pub(super) const Q8_0_ACT: usize = 34;
/// Bytes of one Q8_1 activation block: d (f16), s = d · Σ q (f16) and 32 quants.
pub(super) const Q8_1_ACT: usize = 36;

/// The 4 bytes at `p` in every 32-bit lane.
///
/// # Safety
/// `p` must be valid for reading 4 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn bcast4(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 4 readable bytes.
    _mm256_set1_epi32(unsafe { p.cast::<i32>().read_unaligned() })
}

/// Loads 32 bytes.
///
/// # Safety
/// `p` must be valid for reading 32 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn load(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 32 readable bytes.
    unsafe { _mm256_loadu_si256(p.cast()) }
}

/// The 8 f16 at `p` as f32.
///
/// # Safety
/// `p` must be valid for reading 16 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn f16_rows(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees 16 readable bytes.
    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p.cast()) })
}

/// Prefetches the block `ahead` bytes past block `b`. Past the tile's end that is the next
/// tile of the matrix, which the same thread most likely computes next (or bytes past the
/// matrix: a prefetch is a hint and never faults).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn prefetch_ahead(tile: *const u8, b: usize, block: usize, ahead: Ahead) {
    if ahead.bytes > 0 {
        prefetch(tile.wrapping_add(b * block + ahead.bytes), block, ahead.l2);
    }
}

/// Step `(j, k)` of a kernel's walk over a tile block's halves `h` and sub-blocks `s` (`n` of
/// them), as `(h, s)`. A batch's kernel (`NT` > 1) takes each half through the whole block
/// before the other, so that one half's sums for 4 tokens fit the 16 registers (the second
/// pass reads the block from L1); decode (`NT` = 1) has the registers for both halves and takes
/// them side by side, each sub-block's lines once, as they arrive from memory. A half's sums
/// run over the sub-blocks in the same order either way, so the bits are the same.
#[inline(always)]
pub(super) fn half_order<const NT: usize>(j: usize, k: usize, n: usize) -> (usize, usize) {
    if NT == 1 {
        let i = j * n + k;
        (i % 2, i / 2)
    } else {
        (j, k)
    }
}

/// 16 bytes holding one byte per row (rows 0..16) → 16 i16, each of rows `8 h..8 h + 8`'s
/// bytes twice (zero-extended): the per-row factor of a `vpmaddwd` over i16 pairs.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn per_row_u8<const H: usize>(v: __m128i) -> __m256i {
    let d = if H == 0 {
        _mm_unpacklo_epi8(v, v)
    } else {
        _mm_unpackhi_epi8(v, v)
    };
    _mm256_cvtepu8_epi16(d)
}

/// As [`per_row_u8`], sign-extended.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn per_row_i8<const H: usize>(v: __m128i) -> __m256i {
    let d = if H == 0 {
        _mm_unpacklo_epi8(v, v)
    } else {
        _mm_unpackhi_epi8(v, v)
    };
    _mm256_cvtepi8_epi16(d)
}

/// The mins of sub-blocks `2 p` and `2 p + 1` of rows `8 H..8 H + 8` as i16 pairs, one pair
/// per row.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn mins_pairs<const H: usize>(mn: &[__m128i; 8]) -> [__m256i; 4] {
    let mut mins = [_mm256_setzero_si256(); 4];
    for (p, m) in mins.iter_mut().enumerate() {
        let v = if H == 0 {
            _mm_unpacklo_epi8(mn[2 * p], mn[2 * p + 1])
        } else {
            _mm_unpackhi_epi8(mn[2 * p], mn[2 * p + 1])
        };
        *m = _mm256_cvtepu8_epi16(v);
    }
    mins
}

/// `2^SHIFT · Σ a` over the 32 activation quants at `p`, in every 32-bit lane: the offset
/// term of a type whose quants are stored plus `2^SHIFT` (Q4_0: 8, Q5_0: 16).
///
/// # Safety
/// `p` must be valid for reading 32 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn offset_sum<const SHIFT: i32>(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 32 readable bytes.
    let a = unsafe { load(p) };
    let s = _mm256_madd_epi16(
        _mm256_maddubs_epi16(_mm256_set1_epi8(1), a),
        _mm256_set1_epi16(1),
    );
    let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm256_broadcastd_epi32(_mm_slli_epi32::<SHIFT>(s))
}

/// Stores the two halves' results of token `t` at `out + t * out_stride`.
///
/// # Safety
/// `out + t * out_stride` valid for writing 16 f32 for every `t < NT`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn store<const NT: usize>(
    lo: &[__m256; NT],
    hi: &[__m256; NT],
    out: *mut f32,
    out_stride: usize,
) {
    for t in 0..NT {
        // SAFETY: 16 writable f32 at out + t * out_stride (caller).
        unsafe {
            _mm256_storeu_ps(out.add(t * out_stride), lo[t]);
            _mm256_storeu_ps(out.add(t * out_stride + 8), hi[t]);
        }
    }
}

/// The 8 sub-blocks' 6-bit scales and mins of 16 rows, from the 12 packed bytes of each row
/// transposed at `p` (byte `j` of row `r` at `p + 16 j + r`), one byte per row.
///
/// # Safety
/// `p` must be valid for reading 192 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn k4_scales(p: *const u8) -> ([__m128i; 8], [__m128i; 8]) {
    let m63 = _mm_set1_epi8(63);
    let m15 = _mm_set1_epi8(15);
    let m48 = _mm_set1_epi8(0x30);
    // SAFETY: byte 16 j + 15 < 192 for every j < 12 (caller).
    let q = |j: usize| unsafe { _mm_loadu_si128(p.add(16 * j).cast()) };
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
    (sc, mn)
}

/// As [`k4_block_end_f32`], for sums held as i32.
///
/// # Safety
/// As [`k4_block_end_f32`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn k4_block_end<const NT: usize>(
    x: *const u8,
    y: *const u8,
    act_row: usize,
    mn: &[__m128i; 8],
    isum: &[[__m256i; NT]; 2],
    acc: &mut [[__m256; NT]; 2],
) {
    let mut sums = [[_mm256_setzero_ps(); NT]; 2];
    for (s, i) in sums.iter_mut().flatten().zip(isum.iter().flatten()) {
        *s = _mm256_cvtepi32_ps(*i);
    }
    // SAFETY: forwarded (caller).
    unsafe { k4_block_end_f32(x, y, act_row, mn, &sums, acc) }
}

/// The end of a Q4_K / Q5_K tile block: `acc += d · dy · sum - dmin · dy · Σ min · bsum` per
/// row and token, `sum` the block's scaled quant products, `x` the tile block (`d` at 0,
/// `dmin` at 32), `y` token 0's Q8_K block.
///
/// # Safety
/// `x` valid for 64 bytes, `y + t * act_row` for a Q8_K block for every `t < NT`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn k4_block_end_f32<const NT: usize>(
    x: *const u8,
    y: *const u8,
    act_row: usize,
    mn: &[__m128i; 8],
    sums: &[[__m256; NT]; 2],
    acc: &mut [[__m256; NT]; 2],
) {
    let mins = [mins_pairs::<0>(mn), mins_pairs::<1>(mn)];
    for t in 0..NT {
        // SAFETY: token t's Q8_K block and the tile block's first 64 bytes (caller).
        unsafe {
            let yt = y.add(t * act_row);
            let bs = _mm256_loadu_si256(yt.add(260).cast());
            // The sums of each 32 columns, as i16: adjacent 16-column sums added.
            let b32 = _mm_hadd_epi16(
                _mm256_castsi256_si128(bs),
                _mm256_extracti128_si256::<1>(bs),
            );
            let pairs = [
                _mm256_set1_epi32(_mm_cvtsi128_si32(b32)),
                _mm256_set1_epi32(_mm_extract_epi32::<1>(b32)),
                _mm256_set1_epi32(_mm_extract_epi32::<2>(b32)),
                _mm256_set1_epi32(_mm_extract_epi32::<3>(b32)),
            ];
            let dy = _mm256_set1_ps(yt.cast::<f32>().read_unaligned());
            for h in 0..2 {
                let mut m = _mm256_setzero_si256();
                for (mp, pair) in mins[h].iter().zip(pairs) {
                    m = _mm256_add_epi32(m, _mm256_madd_epi16(*mp, pair));
                }
                let d = f16_rows(x.add(16 * h));
                let dmin = f16_rows(x.add(32 + 16 * h));
                let a = _mm256_fmadd_ps(sums[h][t], _mm256_mul_ps(d, dy), acc[h][t]);
                acc[h][t] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(m), _mm256_mul_ps(dmin, dy), a);
            }
        }
    }
}

/// 16 rows × `NT` tokens of a Q4_K tile: `out + t * out_stride` receives the 16 rows' results
/// for token `t`. `ahead` is the software prefetch distance in bytes (0: none).
///
/// # Safety
/// See the module docs; `tile` holds `nb` tile blocks, `act + t * act_row` holds `nb` Q8_K
/// blocks for every `t < NT`, and `out + t * out_stride` is valid for writing 16 f32.
#[target_feature(enable = "avx2,fma,f16c")]
#[expect(
    clippy::needless_range_loop,
    reason = "half and token indices address several register arrays in step"
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
    let m4 = _mm256_set1_epi8(0xF);
    let mut acc = [[_mm256_setzero_ps(); NT]; 2];
    for b in 0..nb {
        // SAFETY: block b of the tile and of every token's activations is in bounds (caller);
        // every offset below stays inside them.
        unsafe {
            let x = tile.add(b * Q4K_TILE_BLOCK);
            let (sc, mn) = k4_scales(x.add(64));
            let y = act.add(b * Q8K_BLOCK);
            // The halves in `half_order`.
            let mut isum = [[_mm256_setzero_si256(); NT]; 2];
            for j in 0..2 {
                for k in 0..8 {
                    let (h, s) = half_order::<NT>(j, k, 8);
                    if h == 0 {
                        prefetch_part::<NT>(x, Q4K_TILE_BLOCK, ahead, s, 8);
                    }
                    let g0 = x.add(256 + 256 * s + 32 * h);
                    let scale = if h == 0 {
                        per_row_u8::<0>(sc[s])
                    } else {
                        per_row_u8::<1>(sc[s])
                    };
                    // Eight products of at most 15 · 128 · 2 each: the i16 sums cannot overflow.
                    let mut p = [_mm256_setzero_si256(); NT];
                    for g in 0..4 {
                        let v = load(g0.add(64 * g));
                        let lo = _mm256_and_si256(v, m4);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
                        for t in 0..NT {
                            let a = y.add(t * act_row + 4 + 32 * s + 8 * g);
                            let pl = _mm256_maddubs_epi16(lo, bcast4(a));
                            let ph = _mm256_maddubs_epi16(hi, bcast4(a.add(4)));
                            p[t] = _mm256_add_epi16(p[t], _mm256_add_epi16(pl, ph));
                        }
                    }
                    for t in 0..NT {
                        isum[h][t] = _mm256_add_epi32(isum[h][t], _mm256_madd_epi16(p[t], scale));
                    }
                }
            }
            k4_block_end(x, y, act_row, &mn, &isum, &mut acc);
        }
    }
    // SAFETY: forwarded (caller).
    unsafe { store(&acc[0], &acc[1], out, out_stride) };
}

/// Columns 8g..8g + 4 and 8g + 4..8g + 8 of a 5-bit half-tile as unsigned bytes (0..32): the
/// low and high nibbles of `v` with bits 2g and 2g + 1 of each byte of `hb` (the fifth bits)
/// moved to bit 4.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn q5_pair(v: __m256i, hb: __m256i, g: usize) -> (__m256i, __m256i) {
    let m4 = _mm256_set1_epi8(0xF);
    let m16 = _mm256_set1_epi8(0x10);
    let (top_lo, top_hi) = match g {
        0 => (_mm256_slli_epi16::<4>(hb), _mm256_slli_epi16::<3>(hb)),
        1 => (_mm256_slli_epi16::<2>(hb), _mm256_slli_epi16::<1>(hb)),
        2 => (hb, _mm256_srli_epi16::<1>(hb)),
        _ => (_mm256_srli_epi16::<2>(hb), _mm256_srli_epi16::<3>(hb)),
    };
    (
        _mm256_or_si256(_mm256_and_si256(v, m4), _mm256_and_si256(top_lo, m16)),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4),
            _mm256_and_si256(top_hi, m16),
        ),
    )
}

/// The 4 column quads of a Q6_K sub-block's half-tile (values 0..64) from its low nibbles
/// `w0`, `w1` and high bits `hb`: top bits 2q..2q + 2 of each byte moved to bits 4..6.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn q6k_quads(w0: __m256i, w1: __m256i, hb: __m256i) -> [__m256i; 4] {
    let m4 = _mm256_set1_epi8(0xF);
    let m48 = _mm256_set1_epi8(0x30);
    [
        _mm256_or_si256(
            _mm256_and_si256(w0, m4),
            _mm256_and_si256(_mm256_slli_epi16::<4>(hb), m48),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(w0), m4),
            _mm256_and_si256(_mm256_slli_epi16::<2>(hb), m48),
        ),
        _mm256_or_si256(_mm256_and_si256(w1, m4), _mm256_and_si256(hb, m48)),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(w1), m4),
            _mm256_and_si256(_mm256_srli_epi16::<2>(hb), m48),
        ),
    ]
}

/// As [`q4k`], for a Q6_K tile. The quants' `- 32` comes out per 16-column sub-block as
/// `32 · scale · bsum` (Q8_K's block sums are exactly those 16-column sums).
///
/// # Safety
/// As [`q4k`], with Q6_K tile blocks.
#[target_feature(enable = "avx2,fma,f16c")]
#[expect(
    clippy::needless_range_loop,
    reason = "half and token indices address several register arrays in step"
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
    let mut acc = [[_mm256_setzero_ps(); NT]; 2];
    for b in 0..nb {
        // SAFETY: block b of the tile and of every token's activations is in bounds (caller);
        // every offset below stays inside them.
        unsafe {
            let x = tile.add(b * Q6K_TILE_BLOCK);
            let y = act.add(b * Q8K_BLOCK);
            let mut isum = [[_mm256_setzero_si256(); NT]; 2];
            let mut corr = [[_mm256_setzero_si256(); NT]; 2];
            // The halves in `half_order`.
            for j in 0..2 {
                for k in 0..16 {
                    let (h, s) = half_order::<NT>(j, k, 16);
                    if h == 0 {
                        prefetch_part::<NT>(x, Q6K_TILE_BLOCK, ahead, s, 16);
                    }
                    let sc = _mm_loadu_si128(x.add(q6k_scales(s)).cast());
                    let scale = if h == 0 {
                        per_row_i8::<0>(sc)
                    } else {
                        per_row_i8::<1>(sc)
                    };
                    let w0 = load(x.add(q6k_low(s) + 32 * h));
                    let w1 = load(x.add(q6k_low(s) + 64 + 32 * h));
                    let hb = load(x.add(q6k_high(s) + 32 * h));
                    let q = q6k_quads(w0, w1, hb);
                    for t in 0..NT {
                        let a = y.add(t * act_row + 4 + 16 * s);
                        // Two products of at most 63 · 128 · 2 each fit an i16; four do not.
                        let p0 = _mm256_add_epi16(
                            _mm256_maddubs_epi16(q[0], bcast4(a)),
                            _mm256_maddubs_epi16(q[1], bcast4(a.add(4))),
                        );
                        let p1 = _mm256_add_epi16(
                            _mm256_maddubs_epi16(q[2], bcast4(a.add(8))),
                            _mm256_maddubs_epi16(q[3], bcast4(a.add(12))),
                        );
                        isum[h][t] = _mm256_add_epi32(
                            isum[h][t],
                            _mm256_add_epi32(
                                _mm256_madd_epi16(p0, scale),
                                _mm256_madd_epi16(p1, scale),
                            ),
                        );
                    }
                    if s % 2 == 1 {
                        // Σ_s scale_s · bsum_s, two sub-blocks per vpmaddwd.
                        let sc0 = _mm_loadu_si128(x.add(q6k_scales(s - 1)).cast());
                        let pairs = if h == 0 {
                            _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(sc0, sc))
                        } else {
                            _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(sc0, sc))
                        };
                        for t in 0..NT {
                            let bs = y.add(t * act_row + 260 + 2 * (s - 1));
                            let bs = _mm256_set1_epi32(bs.cast::<i32>().read_unaligned());
                            corr[h][t] = _mm256_add_epi32(corr[h][t], _mm256_madd_epi16(pairs, bs));
                        }
                    }
                }
            }
            for t in 0..NT {
                let dy = _mm256_set1_ps(y.add(t * act_row).cast::<f32>().read_unaligned());
                for h in 0..2 {
                    let d = f16_rows(x.add(16 * h));
                    let total = _mm256_sub_epi32(isum[h][t], _mm256_slli_epi32::<5>(corr[h][t]));
                    acc[h][t] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), _mm256_mul_ps(d, dy), acc[h][t]);
                }
            }
        }
    }
    // SAFETY: forwarded (caller).
    unsafe { store(&acc[0], &acc[1], out, out_stride) };
}

/// As [`q4k`], for a Q8_0 (`Q5 = false`) or Q5_0 (`Q5 = true`) tile against Q8_0
/// activations. Q8_0's quants are stored plus 128; `vpmaddubsw` of those could overflow, so
/// they are made signed again and multiplied as `|w| · (a · sign w)`, as ggml's AVX2 Q8_0
/// kernel does. Q5_0's are stored plus 16, which comes out as `16 · Σ a` per block.
///
/// # Safety
/// As [`q4k`], with Q8_0 / Q5_0 tile blocks and Q8_0 activation blocks.
#[target_feature(enable = "avx2,fma,f16c")]
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
    let block = if Q5 { Q5_0_TILE_BLOCK } else { Q8_0_TILE_BLOCK };
    let flip = _mm256_set1_epi8(-128);
    let ones16 = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); NT]; 2];
    for b in 0..nb {
        prefetch_ahead(tile, b, block, ahead);
        // SAFETY: block b of the tile and of every token's activations is in bounds (caller);
        // every offset below stays inside them.
        unsafe {
            let x = tile.add(b * block);
            // Q5_0's offset times Σ a, per token.
            let mut offs = [_mm256_setzero_si256(); NT];
            if Q5 {
                for t in 0..NT {
                    offs[t] = offset_sum::<4>(act.add(t * act_row + b * Q8_0_ACT + 2));
                }
            }
            for h in 0..2 {
                let d = f16_rows(x.add(16 * h));
                let mut isum = [_mm256_setzero_si256(); NT];
                if Q5 {
                    let hb = load(x.add(Q5_0_HIGH + 32 * h));
                    // Column quad k's weights are made where they are used, one quad at a time:
                    // all eight unpacked at once (and their top bits) would take every register
                    // and spill inside the token loop.
                    let mut p2 = [[_mm256_setzero_si256(); NT]; 2];
                    for g in 0..4 {
                        let v = load(x.add(32 + 64 * g + 32 * h));
                        let (wl, wh) = q5_pair(v, hb, g);
                        let j = g / 2;
                        for t in 0..NT {
                            let y = act.add(t * act_row + b * Q8_0_ACT + 2 + 8 * g);
                            // Products of at most 31 · 128 · 2: four fit an i16.
                            let pl = _mm256_maddubs_epi16(wl, bcast4(y));
                            let ph = _mm256_maddubs_epi16(wh, bcast4(y.add(4)));
                            p2[j][t] = _mm256_add_epi16(p2[j][t], _mm256_add_epi16(pl, ph));
                        }
                    }
                    for t in 0..NT {
                        isum[t] = _mm256_sub_epi32(
                            _mm256_add_epi32(
                                _mm256_madd_epi16(p2[0][t], ones16),
                                _mm256_madd_epi16(p2[1][t], ones16),
                            ),
                            offs[t],
                        );
                    }
                } else {
                    for i in 0..8 {
                        let w = _mm256_xor_si256(load(x.add(32 + 64 * i + 32 * h)), flip);
                        let aw = _mm256_abs_epi8(w);
                        for t in 0..NT {
                            let a = bcast4(act.add(t * act_row + b * Q8_0_ACT + 2 + 4 * i));
                            let p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(a, w));
                            isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(p, ones16));
                        }
                    }
                }
                for t in 0..NT {
                    let dy = avx2::f16x8(act.add(t * act_row + b * Q8_0_ACT));
                    acc[h][t] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(isum[t]),
                        _mm256_mul_ps(d, dy),
                        acc[h][t],
                    );
                }
            }
        }
    }
    // SAFETY: forwarded (caller).
    unsafe { store(&acc[0], &acc[1], out, out_stride) };
}

/// As [`q4k`], for a tile of a legacy 4- or 5-bit type `L` (Q4_0, Q4_1, Q5_1) against Q8_0
/// activations (no min) or Q8_1 (with). The quants are unsigned as stored (0..16, or 0..32
/// with their fifth bits): Q4_0's `- 8` comes out as `8 · Σ a` per block, and Q4_1's and
/// Q5_1's min as `m · s`, Q8_1's `s` being `d · Σ a`. Each token's sums run in the same order
/// whatever `NT` is.
///
/// # Safety
/// As [`q4k`], with `L`'s tile blocks and Q8_0 / Q8_1 activation blocks.
#[target_feature(enable = "avx2,fma,f16c")]
#[expect(
    clippy::needless_range_loop,
    reason = "token indices address several register arrays in step"
)]
pub(crate) unsafe fn nibbles<const NT: usize, L: Nibbles>(
    nb: usize,
    tile: *const u8,
    act: *const u8,
    act_row: usize,
    out: *mut f32,
    out_stride: usize,
    ahead: Ahead,
) {
    // The activation block and where its quants start.
    let (act_block, aq) = if L::MIN { (Q8_1_ACT, 4) } else { (Q8_0_ACT, 2) };
    let m4 = _mm256_set1_epi8(0xF);
    let ones16 = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); NT]; 2];
    for b in 0..nb {
        prefetch_ahead(tile, b, L::TILE_BLOCK, ahead);
        // SAFETY: block b of the tile and of every token's activations is in bounds (caller);
        // every offset below stays inside them.
        unsafe {
            let x = tile.add(b * L::TILE_BLOCK);
            let y = act.add(b * act_block);
            // The types without a min: their offset times Σ a, per token.
            let mut offs = [_mm256_setzero_si256(); NT];
            if !L::MIN {
                for t in 0..NT {
                    let a = y.add(t * act_row + aq);
                    offs[t] = if L::HIGH.is_some() {
                        offset_sum::<4>(a)
                    } else {
                        offset_sum::<3>(a)
                    };
                }
            }
            for h in 0..2 {
                let mut isum = [_mm256_setzero_si256(); NT];
                if let Some(high) = L::HIGH {
                    let hb = load(x.add(high + 32 * h));
                    // As Q5_0's kernel ([`legacy`]): each quad's weights made where they are
                    // used, products of at most 31 · 128 · 2, four to an i16.
                    let mut p2 = [[_mm256_setzero_si256(); NT]; 2];
                    for g in 0..4 {
                        let v = load(x.add(L::QUANTS + 64 * g + 32 * h));
                        let (wl, wh) = q5_pair(v, hb, g);
                        for t in 0..NT {
                            let a = y.add(t * act_row + aq + 8 * g);
                            let pl = _mm256_maddubs_epi16(wl, bcast4(a));
                            let ph = _mm256_maddubs_epi16(wh, bcast4(a.add(4)));
                            p2[g / 2][t] = _mm256_add_epi16(p2[g / 2][t], _mm256_add_epi16(pl, ph));
                        }
                    }
                    for t in 0..NT {
                        isum[t] = _mm256_add_epi32(
                            _mm256_madd_epi16(p2[0][t], ones16),
                            _mm256_madd_epi16(p2[1][t], ones16),
                        );
                    }
                } else {
                    // Eight products of at most 15 · 128 · 2: all 32 columns fit an i16.
                    let mut p = [_mm256_setzero_si256(); NT];
                    for g in 0..4 {
                        let v = load(x.add(L::QUANTS + 64 * g + 32 * h));
                        let lo = _mm256_and_si256(v, m4);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
                        for t in 0..NT {
                            let a = y.add(t * act_row + aq + 8 * g);
                            let pl = _mm256_maddubs_epi16(lo, bcast4(a));
                            let ph = _mm256_maddubs_epi16(hi, bcast4(a.add(4)));
                            p[t] = _mm256_add_epi16(p[t], _mm256_add_epi16(pl, ph));
                        }
                    }
                    for t in 0..NT {
                        isum[t] = _mm256_madd_epi16(p[t], ones16);
                    }
                }
                let d = f16_rows(x.add(16 * h));
                for t in 0..NT {
                    let yt = y.add(t * act_row);
                    let dy = avx2::f16x8(yt);
                    if L::MIN {
                        let a = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(isum[t]),
                            _mm256_mul_ps(d, dy),
                            acc[h][t],
                        );
                        let m = f16_rows(x.add(32 + 16 * h));
                        acc[h][t] = _mm256_fmadd_ps(m, avx2::f16x8(yt.add(2)), a);
                    } else {
                        acc[h][t] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(_mm256_sub_epi32(isum[t], offs[t])),
                            _mm256_mul_ps(d, dy),
                            acc[h][t],
                        );
                    }
                }
            }
        }
    }
    // SAFETY: forwarded (caller).
    unsafe { store(&acc[0], &acc[1], out, out_stride) };
}
