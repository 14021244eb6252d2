//! Tiled GEMM for prefill in 256-bit registers: AVX2 (Zen 3 and older, Intel before Ice Lake,
//! and AVX-512 CPUs without VNNI) and AVX-VNNI (`vnni`: Intel client cores from Alder Lake on).
//! A 16-row tile of an interleaved Q4_K or Q6_K matrix is unpacked once into a thread's
//! scratch, then multiplied into every token of the batch.
//!
//! The interleaved kernels (`interleaved_avx2`, `interleaved_vnni256::vex`) unpack each
//! 32-byte load of nibbles (Q6_K: and of top bits) for every group of four tokens, rebuild the
//! per-row scales and mins from their 6-bit packing for every block, and fold the Q8_K block
//! sums into pairs for every token and half. AVX2's Q4_K kernel is bound by its count of vector
//! operations (about 84 per 128 weight bytes and four tokens; `vpmaddubsw` can issue on two
//! ports, the adds and the unpacking on three), so the unpacking is a sixth of its time, and
//! more of Q6_K's. Here it is paid once per tile for the whole batch:
//!
//! - the quants as bytes (Q4_K 0..15, Q6_K 0..63), in the order the kernel reads them;
//! - each sub-block's scales as the i16 pairs `vpmaddwd` multiplies by (AVX2) or as f32
//!   (AVX-VNNI), and the Q4_K mins (Q6_K on AVX2: the scales) paired for two sub-blocks;
//! - `d` and `dmin` as f32;
//!
//! and each token's Q8_K block sums are folded once, as side data: Q4_K's into 32-column sums,
//! Q6_K's for AVX-VNNI into `-32 · bsum` (the value each sub-block's dot product starts from).
//!
//! The arithmetic is the level's interleaved kernel's, step for step: the same integer sums
//! over the same columns, the same scaling, the same f32 operations in the same order. A token
//! gets the same bits from either, so a prompt's logits do not depend on whether its batch was
//! large enough for the GEMM (`simd/tests/matmul.rs::avx2_gemm_equals_its_interleaved_kernels_exactly`).
//!
//! Contract of every `unsafe fn` here: the CPU has AVX2, FMA and F16C (and AVX-VNNI in
//! `vnni`); the pointers are valid for the bytes the function's docs name. The kernels keep a
//! half's running results in `out` between blocks, so `out` is read as well as written.

use std::arch::x86_64::*;

use super::interleaved_avx2::{
    Q8K_BLOCK, bcast4, f16_rows, k4_scales, load, mins_pairs, per_row_i8, per_row_u8, q6k_quads,
};
use crate::matmul::interleave::{Q4K_TILE_BLOCK, Q6K_TILE_BLOCK, q6k_high, q6k_low, q6k_scales};

/// The 8 bytes of half `h` (rows `8 h..8 h + 8`) of 16 bytes with one byte per row, in the
/// low 8 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn half(v: __m128i, h: usize) -> __m128i {
    if h == 0 { v } else { _mm_unpackhi_epi64(v, v) }
}

/// Half `h`'s running results for token `t`, kept in the output rather than in registers (a
/// half's sums for four tokens fill the 16 registers; the running results are touched once per
/// block): nothing before block 0, else what the previous block stored.
///
/// # Safety
/// `o` valid for reading 8 f32 when `b > 0`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn running(o: *const f32, b: usize) -> __m256 {
    if b == 0 {
        _mm256_setzero_ps()
    } else {
        // SAFETY: the caller guarantees 8 readable f32.
        unsafe { _mm256_loadu_ps(o) }
    }
}

/// Tokens per micro-kernel call: a half tile's block and sub-block sums for four tokens take 8
/// of the 16 vector registers.
pub(crate) const TILE_TOKENS: usize = 4;

/// One half (8 rows) of one packed Q4_K block (256 columns): the quants `[8 s][4 g][2][32]`
/// (sub-block `s`, column octet `g`, low then high nibbles: 4 columns of 8 rows, one row per
/// 32-bit lane), the scales `[8 s][8 rows][2]` (i16, twice each), the mins `[4 p][8 rows][2]`
/// (sub-blocks `2 p` and `2 p + 1`, i16), `d` `[8]` and `dmin` `[8]` (f32).
///
/// A packed tile is every block's half 0, then every block's half 1: the kernel walks one half
/// through the whole row before the other.
struct Half;

impl Half {
    const SCALES: usize = 2048;
    const MINS: usize = Self::SCALES + 8 * 32;
    const D: usize = Self::MINS + 4 * 32;
    const DMIN: usize = Self::D + 32;
    const BYTES: usize = Self::DMIN + 32;
}

/// Bytes of one packed Q4_K block (both halves).
pub(crate) const Q4K_PACKED: usize = 2 * Half::BYTES;
/// Bytes of side data per Q8_K block: its eight 32-column sums (i16).
pub(crate) const Q4K_SIDE: usize = 16;

/// Unpacks `nb` interleaved Q4_K tile blocks at `tile` into `dst`.
///
/// # Safety
/// `tile` valid for reading `nb` tile blocks (`Q4K_TILE_BLOCK` bytes each), `dst` for writing
/// `nb * Q4K_PACKED` bytes.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn pack_q4k_interleaved<const VNNI: bool>(
    tile: *const u8,
    nb: usize,
    dst: *mut u8,
) {
    let m4 = _mm256_set1_epi8(0xF);
    for b in 0..nb {
        // SAFETY: tile block b and packed halves (0, b) and (1, b) are in bounds (caller).
        unsafe {
            let x = tile.add(b * Q4K_TILE_BLOCK);
            let (sc, mn) = k4_scales(x.add(64));
            for h in 0..2 {
                let o = dst.add((h * nb + b) * Half::BYTES);
                let put = |off: usize, v: __m256i| _mm256_storeu_si256(o.add(off).cast(), v);
                for (s, &sc) in sc.iter().enumerate() {
                    for g in 0..4 {
                        let v = load(x.add(256 + 256 * s + 32 * h + 64 * g));
                        let q = 256 * s + 64 * g;
                        put(q, _mm256_and_si256(v, m4));
                        put(q + 32, _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4));
                    }
                    let scale = if VNNI {
                        _mm256_castps_si256(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(half(sc, h))))
                    } else if h == 0 {
                        per_row_u8::<0>(sc)
                    } else {
                        per_row_u8::<1>(sc)
                    };
                    put(Half::SCALES + 32 * s, scale);
                }
                let mins = if h == 0 {
                    mins_pairs::<0>(&mn)
                } else {
                    mins_pairs::<1>(&mn)
                };
                for (p, m) in mins.into_iter().enumerate() {
                    put(Half::MINS + 32 * p, m);
                }
                let f = |off: usize, v: __m256| _mm256_storeu_ps(o.add(off).cast(), v);
                f(Half::D, f16_rows(x.add(16 * h)));
                f(Half::DMIN, f16_rows(x.add(32 + 16 * h)));
            }
        }
    }
}

/// The side data of one Q8_K activation row of `nb` blocks: each block's eight 32-column
/// sums as i16 (adjacent 16-column sums added), 16 bytes per block.
///
/// # Safety
/// `act` valid for reading `nb` Q8_K blocks, `side` for writing `nb * Q4K_SIDE` bytes.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn side_q4k(act: *const u8, nb: usize, side: *mut u8) {
    for b in 0..nb {
        // SAFETY: block b's sums (bytes 260..292) and side bytes are in bounds (caller).
        unsafe {
            let bs = load(act.add(b * Q8K_BLOCK + 260));
            let b32 = _mm_hadd_epi16(
                _mm256_castsi256_si128(bs),
                _mm256_extracti128_si256::<1>(bs),
            );
            _mm_storeu_si128(side.add(b * Q4K_SIDE).cast(), b32);
        }
    }
}

/// The end of packed Q4_K half-block `x` (block `b`) for one token: its running results at `o`
/// plus `d · dy · sum - dmin · dy · Σ min · bsum`, where `sum` is the half-block's scaled
/// quant products, `yt` the token's Q8_K block and `st` its side data (as
/// `interleaved_avx2::k4_block_end_f32` computes it, operation for operation).
///
/// # Safety
/// `x` is a packed half-block, `yt` a Q8_K block, `st` valid for `Q4K_SIDE` bytes, `o` for
/// reading (when `b > 0`) and writing 8 f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_half_end(
    x: *const u8,
    yt: *const u8,
    st: *const u8,
    sum: __m256,
    o: *mut f32,
    b: usize,
) {
    // SAFETY: the bytes named above (caller).
    unsafe {
        let mut m = _mm256_setzero_si256();
        for pr in 0..4 {
            let mp = load(x.add(Half::MINS + 32 * pr));
            m = _mm256_add_epi32(m, _mm256_madd_epi16(mp, bcast4(st.add(4 * pr))));
        }
        let d = _mm256_loadu_ps(x.add(Half::D).cast());
        let dmin = _mm256_loadu_ps(x.add(Half::DMIN).cast());
        let dy = _mm256_set1_ps(yt.cast::<f32>().read_unaligned());
        let a = _mm256_fmadd_ps(sum, _mm256_mul_ps(d, dy), running(o, b));
        let r = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(m), _mm256_mul_ps(dmin, dy), a);
        _mm256_storeu_ps(o, r);
    }
}

/// A packed Q4_K tile of `nb` blocks times `NT` tokens: `out + t * out_stride` receives the 16
/// rows' results for token `t`.
///
/// # Safety
/// `packed` holds `nb` packed blocks; `act + t * act_row` holds `nb` Q8_K blocks and `side + t *
/// side_row` their side data for every `t < NT`; `out + t * out_stride` is valid for reading
/// and writing 16 f32; `nb` is at least 1.
#[target_feature(enable = "avx2,fma,f16c")]
#[expect(
    clippy::needless_range_loop,
    reason = "token indices address several register arrays in step"
)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn q4k<const NT: usize>(
    nb: usize,
    packed: *const u8,
    act: *const u8,
    act_row: usize,
    side: *const u8,
    side_row: usize,
    out: *mut f32,
    out_stride: usize,
) {
    for h in 0..2 {
        for b in 0..nb {
            // SAFETY: packed half (h, b), block b of every token's activations and side data
            // are in bounds (caller); every offset below stays inside them.
            unsafe {
                let x = packed.add((h * nb + b) * Half::BYTES);
                let y = act.add(b * Q8K_BLOCK);
                let mut isum = [_mm256_setzero_si256(); NT];
                for s in 0..8 {
                    // Eight products of at most 15 · 128 · 2 each: the i16 sums cannot overflow.
                    let mut p = [_mm256_setzero_si256(); NT];
                    for g in 0..4 {
                        let q = x.add(256 * s + 64 * g);
                        let (lo, hi) = (load(q), load(q.add(32)));
                        for t in 0..NT {
                            let a = y.add(t * act_row + 4 + 32 * s + 8 * g);
                            let pl = _mm256_maddubs_epi16(lo, bcast4(a));
                            let ph = _mm256_maddubs_epi16(hi, bcast4(a.add(4)));
                            p[t] = _mm256_add_epi16(p[t], _mm256_add_epi16(pl, ph));
                        }
                    }
                    let scale = load(x.add(Half::SCALES + 32 * s));
                    for t in 0..NT {
                        isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(p[t], scale));
                    }
                }
                for t in 0..NT {
                    let st = side.add(t * side_row + b * Q4K_SIDE);
                    let o = out.add(t * out_stride + 8 * h);
                    let sum = _mm256_cvtepi32_ps(isum[t]);
                    q4k_half_end(x, y.add(t * act_row), st, sum, o, b);
                }
            }
        }
    }
}

/// One half (8 rows) of one packed Q6_K block: the quants `[16 s][4 q][32]` (sub-block `s` of
/// 16 columns, column quad `q`: 4 columns of 8 rows, values 0..64), the scales `[16 s][8
/// rows][2]` (i16, twice each), the scale pairs `[8 p][8 rows][2]` (sub-blocks `2 p` and `2 p
/// + 1`, i16) that multiply Q8_K's block sums for the quants' `- 32`, and `d` `[8]` (f32).
struct Half6;

impl Half6 {
    const SCALES: usize = 2048;
    const PAIRS: usize = Self::SCALES + 16 * 32;
    const D: usize = Self::PAIRS + 8 * 32;
    const BYTES: usize = Self::D + 32;
}

/// Bytes of one packed Q6_K block (both halves).
pub(crate) const Q6K_PACKED: usize = 2 * Half6::BYTES;

/// Unpacks `nb` interleaved Q6_K tile blocks at `tile` into `dst`.
///
/// # Safety
/// `tile` valid for reading `nb` tile blocks (`Q6K_TILE_BLOCK` bytes each), `dst` for writing
/// `nb * Q6K_PACKED` bytes.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn pack_q6k_interleaved<const VNNI: bool>(
    tile: *const u8,
    nb: usize,
    dst: *mut u8,
) {
    for b in 0..nb {
        // SAFETY: tile block b and packed halves (0, b) and (1, b) are in bounds (caller).
        unsafe {
            let x = tile.add(b * Q6K_TILE_BLOCK);
            let sc = |s: usize| _mm_loadu_si128(x.add(q6k_scales(s)).cast());
            for h in 0..2 {
                let o = dst.add((h * nb + b) * Half6::BYTES);
                let put = |off: usize, v: __m256i| _mm256_storeu_si256(o.add(off).cast(), v);
                for s in 0..16 {
                    let w0 = load(x.add(q6k_low(s) + 32 * h));
                    let w1 = load(x.add(q6k_low(s) + 64 + 32 * h));
                    let hb = load(x.add(q6k_high(s) + 32 * h));
                    for (q, v) in q6k_quads(w0, w1, hb).into_iter().enumerate() {
                        put(128 * s + 32 * q, v);
                    }
                    let scale = if VNNI {
                        let v = _mm256_cvtepi8_epi32(half(sc(s), h));
                        _mm256_castps_si256(_mm256_cvtepi32_ps(v))
                    } else if h == 0 {
                        per_row_i8::<0>(sc(s))
                    } else {
                        per_row_i8::<1>(sc(s))
                    };
                    put(Half6::SCALES + 32 * s, scale);
                }
                // VNNI's kernel takes the `- 32` out of each sub-block's dot product instead.
                for p in (0..8).filter(|_| !VNNI) {
                    let (s0, s1) = (sc(2 * p), sc(2 * p + 1));
                    let pairs = if h == 0 {
                        _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(s0, s1))
                    } else {
                        _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(s0, s1))
                    };
                    put(Half6::PAIRS + 32 * p, pairs);
                }
                _mm256_storeu_ps(o.add(Half6::D).cast(), f16_rows(x.add(16 * h)));
            }
        }
    }
}

/// As [`q4k`], for a packed Q6_K tile. It reads no side data (`_side`, `_side_row`: the
/// quants' `- 32` comes out through Q8_K's own 16-column block sums).
///
/// # Safety
/// As [`q4k`], with packed Q6_K blocks.
#[target_feature(enable = "avx2,fma,f16c")]
#[expect(
    clippy::needless_range_loop,
    reason = "token indices address several register arrays in step"
)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn q6k<const NT: usize>(
    nb: usize,
    packed: *const u8,
    act: *const u8,
    act_row: usize,
    _side: *const u8,
    _side_row: usize,
    out: *mut f32,
    out_stride: usize,
) {
    for h in 0..2 {
        for b in 0..nb {
            // SAFETY: packed half (h, b) and block b of every token's activations are in
            // bounds (caller); every offset below stays inside them.
            unsafe {
                let x = packed.add((h * nb + b) * Half6::BYTES);
                let y = act.add(b * Q8K_BLOCK);
                let mut isum = [_mm256_setzero_si256(); NT];
                let mut corr = [_mm256_setzero_si256(); NT];
                for s in 0..16 {
                    let q = x.add(128 * s);
                    let scale = load(x.add(Half6::SCALES + 32 * s));
                    let (q0, q1) = (load(q), load(q.add(32)));
                    let (q2, q3) = (load(q.add(64)), load(q.add(96)));
                    for t in 0..NT {
                        let a = y.add(t * act_row + 4 + 16 * s);
                        // Two products of at most 63 · 128 · 2 each fit an i16; four do not.
                        let p0 = _mm256_add_epi16(
                            _mm256_maddubs_epi16(q0, bcast4(a)),
                            _mm256_maddubs_epi16(q1, bcast4(a.add(4))),
                        );
                        let p1 = _mm256_add_epi16(
                            _mm256_maddubs_epi16(q2, bcast4(a.add(8))),
                            _mm256_maddubs_epi16(q3, bcast4(a.add(12))),
                        );
                        isum[t] = _mm256_add_epi32(
                            isum[t],
                            _mm256_add_epi32(
                                _mm256_madd_epi16(p0, scale),
                                _mm256_madd_epi16(p1, scale),
                            ),
                        );
                    }
                    if s % 2 == 1 {
                        let pairs = load(x.add(Half6::PAIRS + 16 * (s - 1)));
                        for t in 0..NT {
                            let bs = bcast4(y.add(t * act_row + 260 + 2 * (s - 1)));
                            corr[t] = _mm256_add_epi32(corr[t], _mm256_madd_epi16(pairs, bs));
                        }
                    }
                }
                let d = _mm256_loadu_ps(x.add(Half6::D).cast());
                for t in 0..NT {
                    let dy = _mm256_set1_ps(y.add(t * act_row).cast::<f32>().read_unaligned());
                    let total = _mm256_sub_epi32(isum[t], _mm256_slli_epi32::<5>(corr[t]));
                    let o = out.add(t * out_stride + 8 * h);
                    let dd = _mm256_mul_ps(d, dy);
                    _mm256_storeu_ps(
                        o,
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), dd, running(o, b)),
                    );
                }
            }
        }
    }
}

/// Bytes of side data per Q8_K block for AVX-VNNI's Q6_K kernel: `-32 · bsum` of each
/// 16-column sub-block (i32), the value its dot products start from.
pub(crate) const Q6K_SIDE_VNNI: usize = 64;

/// The side data of one Q8_K activation row of `nb` blocks for [`vnni::q6k`].
///
/// # Safety
/// `act` valid for reading `nb` Q8_K blocks, `side` for writing `nb * Q6K_SIDE_VNNI` bytes.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn side_q6k_vnni(act: *const u8, nb: usize, side: *mut u8) {
    for b in 0..nb {
        // SAFETY: block b's sums (bytes 260..292) and side bytes are in bounds (caller).
        unsafe {
            let bs = _mm_loadu_si128(act.add(b * Q8K_BLOCK + 260).cast());
            let bs2 = _mm_loadu_si128(act.add(b * Q8K_BLOCK + 276).cast());
            let m32 = _mm256_set1_epi32(-32);
            let o = side.add(b * Q6K_SIDE_VNNI).cast::<__m256i>();
            _mm256_storeu_si256(o, _mm256_mullo_epi32(_mm256_cvtepi16_epi32(bs), m32));
            _mm256_storeu_si256(
                o.add(1),
                _mm256_mullo_epi32(_mm256_cvtepi16_epi32(bs2), m32),
            );
        }
    }
}

/// The same GEMM for CPUs with AVX-VNNI and no AVX-512 (Intel client cores from Alder Lake
/// on): the tiles packed with `VNNI` (scales as f32), one `vpdpbusd` where AVX2 spends a
/// `vpmaddubsw` and an i16 add, and the arithmetic of `interleaved_vnni256::vex` step for
/// step (the same bits as that level's decode).
pub(crate) mod vnni {
    use std::arch::x86_64::*;

    use super::super::interleaved_avx2::{Q8K_BLOCK, bcast4, load};
    use super::{Half, Half6, Q4K_SIDE, Q6K_SIDE_VNNI, q4k_half_end, running};

    /// `acc` plus the 4 products of each 32-bit lane: unsigned bytes of `w` times signed bytes
    /// of `a`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    fn dp(acc: __m256i, w: __m256i, a: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(acc, w, a)
    }

    /// As [`super::q4k`], for a tile packed with `VNNI`.
    ///
    /// # Safety
    /// As [`super::q4k`]; the CPU also has AVX-VNNI.
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    #[expect(
        clippy::needless_range_loop,
        reason = "token indices address several register arrays in step"
    )]
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn q4k<const NT: usize>(
        nb: usize,
        packed: *const u8,
        act: *const u8,
        act_row: usize,
        side: *const u8,
        side_row: usize,
        out: *mut f32,
        out_stride: usize,
    ) {
        for h in 0..2 {
            for b in 0..nb {
                // SAFETY: packed half (h, b), block b of every token's activations and side
                // data are in bounds (caller); every offset below stays inside them.
                unsafe {
                    let x = packed.add((h * nb + b) * Half::BYTES);
                    let y = act.add(b * Q8K_BLOCK);
                    let mut accb = [_mm256_setzero_ps(); NT];
                    for s in 0..8 {
                        let mut dot = [_mm256_setzero_si256(); NT];
                        for g in 0..4 {
                            let q = x.add(256 * s + 64 * g);
                            let (lo, hi) = (load(q), load(q.add(32)));
                            for t in 0..NT {
                                let a = y.add(t * act_row + 4 + 32 * s + 8 * g);
                                dot[t] = dp(dot[t], lo, bcast4(a));
                                dot[t] = dp(dot[t], hi, bcast4(a.add(4)));
                            }
                        }
                        let scf = _mm256_loadu_ps(x.add(Half::SCALES + 32 * s).cast());
                        for t in 0..NT {
                            accb[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[t]), scf, accb[t]);
                        }
                    }
                    for t in 0..NT {
                        let st = side.add(t * side_row + b * Q4K_SIDE);
                        let o = out.add(t * out_stride + 8 * h);
                        q4k_half_end(x, y.add(t * act_row), st, accb[t], o, b);
                    }
                }
            }
        }
    }

    /// As [`super::q6k`], for a tile packed with `VNNI`; `side` holds each token's
    /// `side_q6k_vnni` rows, `side_row` bytes apart.
    ///
    /// # Safety
    /// As [`super::q6k`]; the CPU also has AVX-VNNI, and `side + t * side_row` holds `nb`
    /// blocks' side data for every `t < NT`.
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    #[expect(
        clippy::needless_range_loop,
        reason = "token indices address several register arrays in step"
    )]
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn q6k<const NT: usize>(
        nb: usize,
        packed: *const u8,
        act: *const u8,
        act_row: usize,
        side: *const u8,
        side_row: usize,
        out: *mut f32,
        out_stride: usize,
    ) {
        for h in 0..2 {
            for b in 0..nb {
                // SAFETY: packed half (h, b), block b of every token's activations and side
                // data are in bounds (caller); every offset below stays inside them.
                unsafe {
                    let x = packed.add((h * nb + b) * Half6::BYTES);
                    let y = act.add(b * Q8K_BLOCK);
                    let mut accb = [_mm256_setzero_ps(); NT];
                    for s in 0..16 {
                        let q = x.add(128 * s);
                        let (q0, q1) = (load(q), load(q.add(32)));
                        let (q2, q3) = (load(q.add(64)), load(q.add(96)));
                        let scf = _mm256_loadu_ps(x.add(Half6::SCALES + 32 * s).cast());
                        for t in 0..NT {
                            let a = y.add(t * act_row + 4 + 16 * s);
                            let st = side.add(t * side_row + b * Q6K_SIDE_VNNI + 4 * s);
                            let mut dot = bcast4(st);
                            dot = dp(dot, q0, bcast4(a));
                            dot = dp(dot, q1, bcast4(a.add(4)));
                            dot = dp(dot, q2, bcast4(a.add(8)));
                            dot = dp(dot, q3, bcast4(a.add(12)));
                            accb[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scf, accb[t]);
                        }
                    }
                    let d = _mm256_loadu_ps(x.add(Half6::D).cast());
                    for t in 0..NT {
                        let dy = _mm256_set1_ps(y.add(t * act_row).cast::<f32>().read_unaligned());
                        let o = out.add(t * out_stride + 8 * h);
                        let r = _mm256_fmadd_ps(accb[t], _mm256_mul_ps(d, dy), running(o, b));
                        _mm256_storeu_ps(o, r);
                    }
                }
            }
        }
    }
}
