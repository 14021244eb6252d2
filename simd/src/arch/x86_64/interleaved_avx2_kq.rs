//! 256-bit kernels over the interleaved layouts of Q5_K, Q3_K and Q2_K
//! (`matmul::interleave::kq`), built as `interleaved_avx2`'s: 8 rows per register, one per
//! 32-bit lane, `vpmaddubsw` of unsigned weights by broadcast activations, then a `vpmaddwd`
//! that multiplies by the per-row sub-block scale. There are no 512-bit twins: on AVX-512 VNNI
//! these types run these kernels.
//!
//! Q3_K's signed quants are made unsigned (plus 4); the offset comes out per 16-column
//! sub-block as `4 · scale · bsum`, as Q6_K's does. Q5_K's and Q2_K's mins come out of Q8_K's
//! block sums as Q4_K's do.
//!
//! Contract of every `unsafe fn` here: the CPU has AVX2, FMA and F16C; the pointers are valid
//! for the bytes the function's docs name.

use std::arch::x86_64::*;

use super::interleaved::prefetch_part;
use super::interleaved_avx2::{
    Q8K_BLOCK, bcast4, f16_rows, k4_block_end, k4_scales, load, per_row_i8, per_row_u8, store,
};
use crate::matmul::interleave::kq::{
    Q2K_PARTS, Q2K_SUB, Q2K_TILE_BLOCK, Q3K_PARTS, Q3K_SCALES, Q3K_SUB, Q3K_TILE_BLOCK, Q5K_PARTS,
    Q5K_SUB, Q5K_TILE_BLOCK,
};
use crate::tune::Ahead;

/// Bit `b` of each byte of `v` moved to bit `to` (other bits: garbage, to be masked; the
/// 16-bit shifts move at most 5 bits across a byte boundary, never onto bit `to`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn bit_to(v: __m256i, b: i32, to: i32) -> __m256i {
    if b > to {
        _mm256_srl_epi16(v, _mm_cvtsi32_si128(b - to))
    } else {
        _mm256_sll_epi16(v, _mm_cvtsi32_si128(to - b))
    }
}

/// 16 rows × `NT` tokens of a Q5_K tile: `out + t * out_stride` receives the 16 rows' results
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
pub(crate) unsafe fn q5k<const NT: usize>(
    nb: usize,
    tile: *const u8,
    act: *const u8,
    act_row: usize,
    out: *mut f32,
    out_stride: usize,
    ahead: Ahead,
) {
    let m4 = _mm256_set1_epi8(0xF);
    let m16 = _mm256_set1_epi8(0x10);
    let mut acc = [[_mm256_setzero_ps(); NT]; 2];
    for b in 0..nb {
        // SAFETY: block b of the tile and of every token's activations is in bounds (caller);
        // every offset below stays inside them.
        unsafe {
            let x = tile.add(b * Q5K_TILE_BLOCK);
            let (sc, mn) = k4_scales(x.add(64));
            let y = act.add(b * Q8K_BLOCK);
            let mut isum = [[_mm256_setzero_si256(); NT]; 2];
            for s in 0..8 {
                prefetch_part::<NT>(x, Q5K_TILE_BLOCK, ahead, s, 8);
                let part = x.add(Q5K_PARTS + Q5K_SUB * s);
                let scale = [per_row_u8::<0>(sc[s]), per_row_u8::<1>(sc[s])];
                for h in 0..2 {
                    let hb = load(part.add(32 * h));
                    // Products of at most 31 · 128 · 2: four fit an i16, eight do not.
                    for j in 0..2 {
                        let mut p = [_mm256_setzero_si256(); NT];
                        for g in 2 * j..2 * j + 2 {
                            let v = load(part.add(64 + 64 * g + 32 * h));
                            // Column quads 2g and 2g + 1 have their 5th bits at bits 2g, 2g + 1.
                            let g = g as i32;
                            let wl = _mm256_or_si256(
                                _mm256_and_si256(v, m4),
                                _mm256_and_si256(bit_to(hb, 2 * g, 4), m16),
                            );
                            let wh = _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4),
                                _mm256_and_si256(bit_to(hb, 2 * g + 1, 4), m16),
                            );
                            for t in 0..NT {
                                let a = y.add(t * act_row + 4 + 32 * s + 8 * g as usize);
                                let pl = _mm256_maddubs_epi16(wl, bcast4(a));
                                let ph = _mm256_maddubs_epi16(wh, bcast4(a.add(4)));
                                p[t] = _mm256_add_epi16(p[t], _mm256_add_epi16(pl, ph));
                            }
                        }
                        for t in 0..NT {
                            isum[h][t] =
                                _mm256_add_epi32(isum[h][t], _mm256_madd_epi16(p[t], scale[h]));
                        }
                    }
                }
            }
            k4_block_end(x, y, act_row, &mn, &isum, &mut acc);
        }
    }
    // SAFETY: forwarded (caller).
    unsafe { store(&acc[0], &acc[1], out, out_stride) };
}

/// The signed 6-bit scales of 16-column sub-block `s` of 16 rows, one i8 per row, from Q3_K's
/// 12 packed bytes per row transposed at `p` (byte `j` of row `r` at `p + 16 j + r`).
///
/// # Safety
/// `p` must be valid for reading 192 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q3k_scale(p: *const u8, s: usize) -> __m128i {
    let m15 = _mm_set1_epi8(15);
    let m3 = _mm_set1_epi8(3);
    // SAFETY: bytes 16 j..16 j + 16 for j < 12 (caller).
    let q = |j: usize| unsafe { _mm_loadu_si128(p.add(16 * j).cast()) };
    let low = if s < 8 {
        _mm_and_si128(q(s), m15)
    } else {
        _mm_and_si128(_mm_srli_epi16::<4>(q(s - 8)), m15)
    };
    let shift = _mm_cvtsi32_si128(2 * (s / 4) as i32);
    let high = _mm_and_si128(_mm_srl_epi16(q(8 + s % 4), shift), m3);
    let v = _mm_or_si128(low, _mm_slli_epi16::<4>(high));
    _mm_sub_epi8(v, _mm_set1_epi8(32))
}

/// As [`q5k`], for a Q3_K tile.
///
/// # Safety
/// As [`q5k`], with Q3_K tile blocks.
#[target_feature(enable = "avx2,fma,f16c")]
#[expect(
    clippy::needless_range_loop,
    reason = "half and token indices address several register arrays in step"
)]
pub(crate) unsafe fn q3k<const NT: usize>(
    nb: usize,
    tile: *const u8,
    act: *const u8,
    act_row: usize,
    out: *mut f32,
    out_stride: usize,
    ahead: Ahead,
) {
    let m3 = _mm256_set1_epi8(3);
    let m4 = _mm256_set1_epi8(4);
    let mut acc = [[_mm256_setzero_ps(); NT]; 2];
    for b in 0..nb {
        // SAFETY: block b of the tile and of every token's activations is in bounds (caller);
        // every offset below stays inside them.
        unsafe {
            let x = tile.add(b * Q3K_TILE_BLOCK);
            let y = act.add(b * Q8K_BLOCK);
            let mut isum = [[_mm256_setzero_si256(); NT]; 2];
            let mut corr = [[_mm256_setzero_si256(); NT]; 2];
            for p in 0..8 {
                prefetch_part::<NT>(x, Q3K_TILE_BLOCK, ahead, p, 8);
                let part = x.add(Q3K_PARTS + Q3K_SUB * p);
                let sc = [
                    q3k_scale(x.add(Q3K_SCALES), 2 * p),
                    q3k_scale(x.add(Q3K_SCALES), 2 * p + 1),
                ];
                for h in 0..2 {
                    let hb = load(part.add(32 * h));
                    for sb in 0..2 {
                        let lb = load(part.add(64 + 64 * sb + 32 * h));
                        let scale = if h == 0 {
                            per_row_i8::<0>(sc[sb])
                        } else {
                            per_row_i8::<1>(sc[sb])
                        };
                        // Column quad i of the sub-block: its 2 bits at 2i of `lb`, its hmask
                        // bit at 4 sb + i of `hb`; the weight is the quant plus 4, 0..8.
                        let mut w = [_mm256_setzero_si256(); 4];
                        for (i, wi) in w.iter_mut().enumerate() {
                            let i = i as i32;
                            *wi = _mm256_or_si256(
                                _mm256_and_si256(bit_to(lb, 2 * i, 0), m3),
                                _mm256_and_si256(bit_to(hb, 4 * sb as i32 + i, 2), m4),
                            );
                        }
                        for t in 0..NT {
                            let a = y.add(t * act_row + 4 + 32 * p + 16 * sb);
                            // Products of at most 7 · 128 · 2: the four fit an i16.
                            let p01 = _mm256_add_epi16(
                                _mm256_maddubs_epi16(w[0], bcast4(a)),
                                _mm256_maddubs_epi16(w[1], bcast4(a.add(4))),
                            );
                            let p23 = _mm256_add_epi16(
                                _mm256_maddubs_epi16(w[2], bcast4(a.add(8))),
                                _mm256_maddubs_epi16(w[3], bcast4(a.add(12))),
                            );
                            isum[h][t] = _mm256_add_epi32(
                                isum[h][t],
                                _mm256_madd_epi16(_mm256_add_epi16(p01, p23), scale),
                            );
                        }
                    }
                }
                // Σ_s scale_s · bsum_s over sub-blocks 2p and 2p + 1, in one vpmaddwd.
                let pairs = [
                    _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(sc[0], sc[1])),
                    _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(sc[0], sc[1])),
                ];
                for t in 0..NT {
                    let bs = y.add(t * act_row + 260 + 4 * p);
                    let bs = _mm256_set1_epi32(bs.cast::<i32>().read_unaligned());
                    for h in 0..2 {
                        corr[h][t] = _mm256_add_epi32(corr[h][t], _mm256_madd_epi16(pairs[h], bs));
                    }
                }
            }
            for t in 0..NT {
                let dy = _mm256_set1_ps(y.add(t * act_row).cast::<f32>().read_unaligned());
                for h in 0..2 {
                    let d = f16_rows(x.add(16 * h));
                    let total = _mm256_sub_epi32(isum[h][t], _mm256_slli_epi32::<2>(corr[h][t]));
                    acc[h][t] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), _mm256_mul_ps(d, dy), acc[h][t]);
                }
            }
        }
    }
    // SAFETY: forwarded (caller).
    unsafe { store(&acc[0], &acc[1], out, out_stride) };
}

/// As [`q5k`], for a Q2_K tile.
///
/// # Safety
/// As [`q5k`], with Q2_K tile blocks.
#[target_feature(enable = "avx2,fma,f16c")]
#[expect(
    clippy::needless_range_loop,
    reason = "half and token indices address several register arrays in step"
)]
pub(crate) unsafe fn q2k<const NT: usize>(
    nb: usize,
    tile: *const u8,
    act: *const u8,
    act_row: usize,
    out: *mut f32,
    out_stride: usize,
    ahead: Ahead,
) {
    let m3 = _mm256_set1_epi8(3);
    let m15 = _mm_set1_epi8(15);
    let mut acc = [[_mm256_setzero_ps(); NT]; 2];
    for b in 0..nb {
        // SAFETY: block b of the tile and of every token's activations is in bounds (caller);
        // every offset below stays inside them.
        unsafe {
            let x = tile.add(b * Q2K_TILE_BLOCK);
            let y = act.add(b * Q8K_BLOCK);
            let mut isum = [[_mm256_setzero_si256(); NT]; 2];
            let mut corr = [[_mm256_setzero_si256(); NT]; 2];
            let mut prev = _mm_setzero_si128();
            for s in 0..16 {
                prefetch_part::<NT>(x, Q2K_TILE_BLOCK, ahead, s, 16);
                let part = x.add(Q2K_PARTS + Q2K_SUB * s);
                let sm = _mm_loadu_si128(part.cast());
                let sc = _mm_and_si128(sm, m15);
                let scale = [per_row_u8::<0>(sc), per_row_u8::<1>(sc)];
                for h in 0..2 {
                    let lb = load(part.add(16 + 32 * h));
                    let w = [
                        _mm256_and_si256(lb, m3),
                        _mm256_and_si256(_mm256_srli_epi16::<2>(lb), m3),
                        _mm256_and_si256(_mm256_srli_epi16::<4>(lb), m3),
                        _mm256_and_si256(_mm256_srli_epi16::<6>(lb), m3),
                    ];
                    for t in 0..NT {
                        let a = y.add(t * act_row + 4 + 16 * s);
                        // Products of at most 3 · 128 · 2: the four fit an i16.
                        let p01 = _mm256_add_epi16(
                            _mm256_maddubs_epi16(w[0], bcast4(a)),
                            _mm256_maddubs_epi16(w[1], bcast4(a.add(4))),
                        );
                        let p23 = _mm256_add_epi16(
                            _mm256_maddubs_epi16(w[2], bcast4(a.add(8))),
                            _mm256_maddubs_epi16(w[3], bcast4(a.add(12))),
                        );
                        isum[h][t] = _mm256_add_epi32(
                            isum[h][t],
                            _mm256_madd_epi16(_mm256_add_epi16(p01, p23), scale[h]),
                        );
                    }
                }
                if s % 2 == 1 {
                    // Σ_s min_s · bsum_s over sub-blocks s - 1 and s, in one vpmaddwd.
                    let m0 = _mm_and_si128(_mm_srli_epi16::<4>(prev), m15);
                    let m1 = _mm_and_si128(_mm_srli_epi16::<4>(sm), m15);
                    let pairs = [
                        _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m0, m1)),
                        _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(m0, m1)),
                    ];
                    for t in 0..NT {
                        let bs = y.add(t * act_row + 260 + 2 * (s - 1));
                        let bs = _mm256_set1_epi32(bs.cast::<i32>().read_unaligned());
                        for h in 0..2 {
                            corr[h][t] =
                                _mm256_add_epi32(corr[h][t], _mm256_madd_epi16(pairs[h], bs));
                        }
                    }
                }
                prev = sm;
            }
            for t in 0..NT {
                let dy = _mm256_set1_ps(y.add(t * act_row).cast::<f32>().read_unaligned());
                for h in 0..2 {
                    let d = f16_rows(x.add(16 * h));
                    let dmin = f16_rows(x.add(32 + 16 * h));
                    let a = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(isum[h][t]),
                        _mm256_mul_ps(d, dy),
                        acc[h][t],
                    );
                    acc[h][t] = _mm256_fnmadd_ps(
                        _mm256_cvtepi32_ps(corr[h][t]),
                        _mm256_mul_ps(dmin, dy),
                        a,
                    );
                }
            }
        }
    }
    // SAFETY: forwarded (caller).
    unsafe { store(&acc[0], &acc[1], out, out_stride) };
}
