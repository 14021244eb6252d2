//! Tiled GEMM for prefill on AVX-512 VNNI: a tile of [`TILE_ROWS`] weight rows is unpacked
//! once into a VNNI-friendly layout, then multiplied into every token of the batch.
//!
//! The multi-token kernels of `multi.rs` keep one weight row in the vector lanes and reload
//! every token's activations for every row, so each 64 multiply-adds cost about six
//! instructions. Here the tile is transposed so that one 512-bit register holds four
//! consecutive weights of each of the 16 rows (one row per 32-bit lane); an activation's four
//! bytes are broadcast to all lanes, and one `vpdpbusd` performs 16 rows × 4 columns for one
//! token. A micro-kernel keeps [`TILE_TOKENS`] tokens' accumulators in registers, so each
//! loaded weight vector is used that many times, and the result for a token is one 16-float
//! store (16 consecutive rows of `out`). This is the layout llama.cpp's repacked GEMMs use,
//! built on the fly per tile in a thread's scratch instead of stored at load time: the unpack
//! (gathers and nibble masks) costs about as much as a few tokens' worth of dot products and is
//! paid once per tile for the whole batch.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes, so every packed weight is unsigned: K-quants
//! store their quants unsigned already (Q6_K's `- 32` is taken out with Q8_K's block sums, as
//! Q4_K's mins are); the legacy types are stored with an offset (Q4_0 + 8, Q5_0 + 16,
//! Q8_0 + 128) that the caller removes through the per-block side data (`-offset · Σ a`, see
//! [`legacy_side`]). Block sums stay exact integers; they are scaled and summed in f32 per
//! sub-block, so results match the single-token kernels to rounding.
//!
//! Contract of every `unsafe fn` here: the CPU has AVX-512 F/BW/VL/DQ and VNNI (plus AVX2,
//! FMA, F16C); pointers are valid for the bytes the function's docs name.

use std::arch::x86_64::*;

use strata_storage::quant::blocks::get_scale_min_k4;

/// Weight rows per tile: one per 32-bit lane of a 512-bit register.
pub(crate) const TILE_ROWS: usize = 16;
/// Tokens per micro-kernel call: three accumulators each, within the 32 vector registers.
pub(crate) const TILE_TOKENS: usize = 8;

/// The packed layout of one K-quant block (256 columns of a 16-row tile) with `SUBS` scaled
/// sub-blocks: quants `[64][16][4]` (unsigned), sub-block scales as f32 `[SUBS][16]`, eight
/// i16 pairs per lane that multiply Q8_K's sixteen block sums `[8][16][2]` (Q4_K: each mins
/// twice; Q6_K: the scales), d as f32 `[16]`, and the f32 factor of that block-sum term
/// `[16]` (Q4_K: `-dmin`; Q6_K: `-32 d`, its quants' offset).
struct KLayout<const SUBS: usize>;

impl<const SUBS: usize> KLayout<SUBS> {
    const SCALES: usize = 4096;
    const PAIRS: usize = Self::SCALES + 64 * SUBS;
    const D: usize = Self::PAIRS + 512;
    const CORR: usize = Self::D + 64;
    const BYTES: usize = Self::CORR + 64;
}

/// Bytes of one packed Q4_K block.
pub(crate) const Q4K_PACKED: usize = KLayout::<8>::BYTES;
/// Bytes of one packed Q6_K block.
pub(crate) const Q6K_PACKED: usize = KLayout::<16>::BYTES;
/// Bytes of one packed legacy block (32 columns of 16 rows): quants `[8][16][4]`, d `[16]`.
pub(crate) const LEGACY_PACKED: usize = 512 + 64;

/// The 32-bit word at `p` in all 16 lanes.
///
/// # Safety
/// `p` must be valid for reading 4 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
unsafe fn bcast(p: *const u8) -> __m512i {
    // SAFETY: the caller guarantees 4 readable bytes.
    _mm512_set1_epi32(unsafe { p.cast::<i32>().read_unaligned() })
}

/// The f32 at `p` in all 16 lanes.
///
/// # Safety
/// `p` must be valid for reading 4 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
unsafe fn bcast_f32(p: *const u8) -> __m512 {
    // SAFETY: the caller guarantees 4 readable bytes.
    _mm512_set1_ps(unsafe { p.cast::<f32>().read_unaligned() })
}

/// The 32-bit words at `base + offs[r]` for the 16 lanes `r`.
///
/// # Safety
/// Every `base + offs[r]` must be valid for reading 4 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
unsafe fn gather(base: *const u8, offs: __m512i) -> __m512i {
    // SAFETY: forwarded contract.
    unsafe { _mm512_i32gather_epi32::<1>(offs, base.cast()) }
}

/// Byte offsets of the tile's 16 rows.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
fn row_offsets(row_bytes: usize) -> __m512i {
    let rb = row_bytes as i32;
    _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        _mm512_set1_epi32(rb),
    )
}

/// Reads the f16 at `p` as f32.
///
/// # Safety
/// `p` must be valid for reading 2 bytes.
#[inline]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees 2 readable bytes.
    half::f16::from_bits(unsafe { p.cast::<u16>().read_unaligned() }).to_f32()
}

/// # Safety
/// `p` must be valid for writing 64 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
unsafe fn store(p: *mut u8, v: __m512i) {
    // SAFETY: the caller guarantees 64 writable bytes.
    unsafe { _mm512_storeu_si512(p.cast(), v) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
unsafe fn load(p: *const u8) -> __m512i {
    // SAFETY: the caller guarantees 64 readable bytes.
    unsafe { _mm512_loadu_si512(p.cast()) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
unsafe fn load_ps(p: *const u8) -> __m512 {
    // SAFETY: the caller guarantees 64 readable bytes.
    unsafe { _mm512_loadu_ps(p.cast()) }
}

/// Writes one f32 or i32 per row: `f(r)` for the 16 rows of the tile.
///
/// # Safety
/// `dst` must be valid for writing 64 bytes.
#[inline]
unsafe fn put_lanes<T: Copy>(dst: *mut u8, f: impl Fn(usize) -> T) {
    debug_assert_eq!(size_of::<T>(), 4);
    for r in 0..TILE_ROWS {
        // SAFETY: 16 lanes of 4 bytes are inside the caller's 64 bytes.
        unsafe { dst.cast::<T>().add(r).write_unaligned(f(r)) };
    }
}

/// Packs 16 Q4_K rows of `nb` blocks (`row_bytes` apart from `w`) into `nb` blocks of
/// [`Q4K_PACKED`] bytes at `dst`.
///
/// # Safety
/// `w` must be valid for 16 rows of `nb` Q4_K blocks `row_bytes` apart (`16 * row_bytes` must
/// fit in i32); `dst` for `nb * Q4K_PACKED` bytes.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
pub(crate) unsafe fn pack_q4_k(w: *const u8, row_bytes: usize, nb: usize, dst: *mut u8) {
    let offs = row_offsets(row_bytes);
    let m4 = _mm512_set1_epi8(0xF);
    for b in 0..nb {
        // SAFETY: block b of each row (144 bytes at 144·b) and packed block b are in bounds
        // (contract).
        unsafe {
            let x = w.add(144 * b);
            let p = dst.add(Q4K_PACKED * b);
            for pair in 0..4 {
                for g in 0..8 {
                    let v = gather(x.add(16 + 32 * pair + 4 * g), offs);
                    store(p.add(64 * (16 * pair + g)), _mm512_and_si512(v, m4));
                    let hi = _mm512_and_si512(_mm512_srli_epi32::<4>(v), m4);
                    store(p.add(64 * (16 * pair + 8 + g)), hi);
                }
            }
            let row = |r: usize| x.add(r * row_bytes);
            let sm = |r: usize| -> [u8; 12] { *row(r).add(4).cast::<[u8; 12]>() };
            type L = KLayout<8>;
            for j in 0..8 {
                put_lanes(p.add(L::SCALES + 64 * j), |r| {
                    get_scale_min_k4(j, &sm(r)).0 as f32
                });
                put_lanes(p.add(L::PAIRS + 64 * j), |r| {
                    let m = u32::from(get_scale_min_k4(j, &sm(r)).1);
                    m | (m << 16)
                });
            }
            put_lanes(p.add(L::D), |r| f16_at(row(r)));
            put_lanes(p.add(L::CORR), |r| -f16_at(row(r).add(2)));
        }
    }
}

/// Packs one interleaved Q4_K tile (`matmul::interleave`: `nb` tile blocks at `w`) into `nb`
/// blocks of [`Q4K_PACKED`] bytes at `dst`: the quants are already grouped by row lanes, so
/// this is masks and stores, no gathers.
///
/// # Safety
/// `w` must be valid for `nb * Q4K_TILE_BLOCK` bytes; `dst` for `nb * Q4K_PACKED` bytes.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
pub(crate) unsafe fn pack_q4_k_interleaved(w: *const u8, nb: usize, dst: *mut u8) {
    use crate::matmul::interleave::Q4K_TILE_BLOCK;
    let m4 = _mm512_set1_epi8(0xF);
    for b in 0..nb {
        // SAFETY: tile block b and packed block b are in bounds (contract).
        unsafe {
            let x = w.add(Q4K_TILE_BLOCK * b);
            let p = dst.add(Q4K_PACKED * b);
            for g in 0..32 {
                let v = load(x.add(256 + 64 * g));
                store(p.add(64 * (2 * g)), _mm512_and_si512(v, m4));
                let hi = _mm512_and_si512(_mm512_srli_epi32::<4>(v), m4);
                store(p.add(64 * (2 * g + 1)), hi);
            }
            let sm = |r: usize| -> [u8; 12] { std::array::from_fn(|j| *x.add(64 + 16 * j + r)) };
            type L = KLayout<8>;
            for j in 0..8 {
                put_lanes(p.add(L::SCALES + 64 * j), |r| {
                    get_scale_min_k4(j, &sm(r)).0 as f32
                });
                put_lanes(p.add(L::PAIRS + 64 * j), |r| {
                    let m = u32::from(get_scale_min_k4(j, &sm(r)).1);
                    m | (m << 16)
                });
            }
            put_lanes(p.add(L::D), |r| f16_at(x.add(2 * r)));
            put_lanes(p.add(L::CORR), |r| -f16_at(x.add(32 + 2 * r)));
        }
    }
}

/// Packs one interleaved Q6_K tile (`nb` tile blocks at `w`) into `nb` blocks of
/// [`Q6K_PACKED`] bytes at `dst`.
///
/// # Safety
/// `w` must be valid for `nb * Q6K_TILE_BLOCK` bytes; `dst` for `nb * Q6K_PACKED` bytes.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
pub(crate) unsafe fn pack_q6_k_interleaved(w: *const u8, nb: usize, dst: *mut u8) {
    use crate::matmul::interleave::{Q6K_TILE_BLOCK, q6k_high, q6k_low, q6k_scales};
    let m4 = _mm512_set1_epi8(0xF);
    let m48 = _mm512_set1_epi8(0x30);
    for b in 0..nb {
        // SAFETY: tile block b and packed block b are in bounds (contract).
        unsafe {
            let x = w.add(Q6K_TILE_BLOCK * b);
            let p = dst.add(Q6K_PACKED * b);
            for s in 0..16 {
                let w0 = load(x.add(q6k_low(s)));
                let w1 = load(x.add(q6k_low(s) + 64));
                let h = load(x.add(q6k_high(s)));
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
                for (i, qi) in q.into_iter().enumerate() {
                    store(p.add(64 * (4 * s + i)), qi);
                }
            }
            let sc = |r: usize, s: usize| *x.add(q6k_scales(s) + r).cast::<i8>();
            type L = KLayout<16>;
            for s in 0..16 {
                put_lanes(p.add(L::SCALES + 64 * s), |r| sc(r, s) as f32);
            }
            for pair in 0..8 {
                put_lanes(p.add(L::PAIRS + 64 * pair), |r| {
                    let lo = sc(r, 2 * pair) as i16 as u16 as u32;
                    let hi = sc(r, 2 * pair + 1) as i16 as u16 as u32;
                    lo | (hi << 16)
                });
            }
            put_lanes(p.add(L::D), |r| f16_at(x.add(2 * r)));
            put_lanes(p.add(L::CORR), |r| -32.0 * f16_at(x.add(2 * r)));
        }
    }
}

/// Packs 16 Q6_K rows of `nb` blocks into `nb` blocks of [`Q6K_PACKED`] bytes at `dst`.
///
/// # Safety
/// As [`pack_q4_k`], for Q6_K blocks and [`Q6K_PACKED`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
pub(crate) unsafe fn pack_q6_k(w: *const u8, row_bytes: usize, nb: usize, dst: *mut u8) {
    let offs = row_offsets(row_bytes);
    let m4 = _mm512_set1_epi8(0xF);
    let m2 = _mm512_set1_epi8(3);
    let hi2 = |h: __m512i| _mm512_slli_epi32::<4>(_mm512_and_si512(h, m2));
    for b in 0..nb {
        // SAFETY: block b of each row (210 bytes at 210·b) and packed block b are in bounds
        // (contract).
        unsafe {
            let x = w.add(210 * b);
            let p = dst.add(Q6K_PACKED * b);
            // Element 128n + 32k + l (l < 32) is quarter k of half n: low or high nibble of
            // ql[64n + l (+32 for odd k)], with bits 2k..2k+2 of qh[32n + l] on top.
            for n in 0..2 {
                for g in 0..8 {
                    let a = gather(x.add(64 * n + 4 * g), offs);
                    let bq = gather(x.add(64 * n + 32 + 4 * g), offs);
                    let h = gather(x.add(128 + 32 * n + 4 * g), offs);
                    let c = 32 * n + g;
                    let q0 = _mm512_or_si512(_mm512_and_si512(a, m4), hi2(h));
                    let q1 =
                        _mm512_or_si512(_mm512_and_si512(bq, m4), hi2(_mm512_srli_epi32::<2>(h)));
                    let q2 = _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi32::<4>(a), m4),
                        hi2(_mm512_srli_epi32::<4>(h)),
                    );
                    let q3 = _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi32::<4>(bq), m4),
                        hi2(_mm512_srli_epi32::<6>(h)),
                    );
                    store(p.add(64 * c), q0);
                    store(p.add(64 * (c + 8)), q1);
                    store(p.add(64 * (c + 16)), q2);
                    store(p.add(64 * (c + 24)), q3);
                }
            }
            let row = |r: usize| x.add(r * row_bytes);
            let sc = |r: usize, s: usize| *row(r).add(192 + s).cast::<i8>();
            type L = KLayout<16>;
            for s in 0..16 {
                put_lanes(p.add(L::SCALES + 64 * s), |r| sc(r, s) as f32);
            }
            for pair in 0..8 {
                put_lanes(p.add(L::PAIRS + 64 * pair), |r| {
                    let lo = sc(r, 2 * pair) as i16 as u16 as u32;
                    let hi = sc(r, 2 * pair + 1) as i16 as u16 as u32;
                    lo | (hi << 16)
                });
            }
            put_lanes(p.add(L::D), |r| f16_at(row(r).add(208)));
            put_lanes(p.add(L::CORR), |r| -32.0 * f16_at(row(r).add(208)));
        }
    }
}

/// The legacy types the tiled GEMM packs: their block size in bytes and the offset that makes
/// their quants unsigned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Legacy {
    Q4_0,
    Q5_0,
    Q8_0,
}

impl Legacy {
    pub(crate) const fn offset(self) -> i32 {
        match self {
            Legacy::Q4_0 => 8,
            Legacy::Q5_0 => 16,
            Legacy::Q8_0 => 128,
        }
    }

    const fn block_bytes(self) -> usize {
        match self {
            Legacy::Q4_0 => 18,
            Legacy::Q5_0 => 22,
            Legacy::Q8_0 => 34,
        }
    }
}

/// Packs 16 rows of `nb` 32-element blocks of type `ty` into `nb` blocks of
/// [`LEGACY_PACKED`] bytes at `dst`, quants stored as `q + ty.offset()`.
///
/// # Safety
/// As [`pack_q4_k`], for blocks of `ty` and [`LEGACY_PACKED`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
pub(crate) unsafe fn pack_legacy(
    ty: Legacy,
    w: *const u8,
    row_bytes: usize,
    nb: usize,
    dst: *mut u8,
) {
    let offs = row_offsets(row_bytes);
    let m4 = _mm512_set1_epi8(0xF);
    let bs = ty.block_bytes();
    for b in 0..nb {
        // SAFETY: block b of each row (`bs` bytes at bs·b) and packed block b are in bounds
        // (contract).
        unsafe {
            let x = w.add(bs * b);
            let p = dst.add(LEGACY_PACKED * b);
            match ty {
                Legacy::Q8_0 => {
                    let flip = _mm512_set1_epi8(0x80u8 as i8);
                    for c in 0..8 {
                        let v = gather(x.add(2 + 4 * c), offs);
                        store(p.add(64 * c), _mm512_xor_si512(v, flip));
                    }
                }
                Legacy::Q4_0 => {
                    for g in 0..4 {
                        let v = gather(x.add(2 + 4 * g), offs);
                        store(p.add(64 * g), _mm512_and_si512(v, m4));
                        let hi = _mm512_and_si512(_mm512_srli_epi32::<4>(v), m4);
                        store(p.add(64 * (g + 4)), hi);
                    }
                }
                Legacy::Q5_0 => {
                    // Bit e of qh is the fifth bit of element e; elements 4c..4c+4 take bits
                    // 4c..4c+4, spread to bit 4 of each byte (x · 0x204081 moves bit i to bit
                    // 8i without carries).
                    let qh = gather(x.add(2), offs);
                    let spread = |c: u32| {
                        let nib = _mm512_and_si512(
                            _mm512_srlv_epi32(qh, _mm512_set1_epi32(4 * c as i32)),
                            _mm512_set1_epi32(0xF),
                        );
                        let bits = _mm512_and_si512(
                            _mm512_mullo_epi32(nib, _mm512_set1_epi32(0x0020_4081)),
                            _mm512_set1_epi32(0x0101_0101),
                        );
                        _mm512_slli_epi32::<4>(bits)
                    };
                    for g in 0..4 {
                        let v = gather(x.add(6 + 4 * g), offs);
                        let lo = _mm512_or_si512(_mm512_and_si512(v, m4), spread(g as u32));
                        store(p.add(64 * g), lo);
                        let hi = _mm512_and_si512(_mm512_srli_epi32::<4>(v), m4);
                        let hi = _mm512_or_si512(hi, spread(g as u32 + 4));
                        store(p.add(64 * (g + 4)), hi);
                    }
                }
            }
            put_lanes(p.add(512), |r| f16_at(x.add(r * row_bytes)));
        }
    }
}

/// Packs one interleaved Q8_0 or Q5_0 tile (`matmul::interleave`: `nb` tile blocks at `w`)
/// into `nb` blocks of [`LEGACY_PACKED`] bytes: the interleaved quants are the packed ones
/// already (same offsets), only Q5_0's fifth bits are merged in.
///
/// # Safety
/// `w` must be valid for `nb` tile blocks of `ty`; `dst` for `nb * LEGACY_PACKED` bytes; `ty`
/// is Q8_0 or Q5_0.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
pub(crate) unsafe fn pack_legacy_interleaved(ty: Legacy, w: *const u8, nb: usize, dst: *mut u8) {
    use crate::matmul::interleave::{Q5_0_HIGH, Q5_0_TILE_BLOCK, Q8_0_TILE_BLOCK};
    let m4 = _mm512_set1_epi8(0xF);
    let m16 = _mm512_set1_epi8(0x10);
    let block = if ty == Legacy::Q5_0 {
        Q5_0_TILE_BLOCK
    } else {
        Q8_0_TILE_BLOCK
    };
    for b in 0..nb {
        // SAFETY: tile block b and packed block b are in bounds (contract).
        unsafe {
            let x = w.add(block * b);
            let p = dst.add(LEGACY_PACKED * b);
            if ty == Legacy::Q5_0 {
                let h = load(x.add(Q5_0_HIGH));
                // Bit i of each byte to bit 4: i = 2g for the low nibbles, 2g + 1 for the high.
                let bit = |i: u32| {
                    let v = if i <= 4 {
                        _mm512_sllv_epi16(h, _mm512_set1_epi16(4 - i as i16))
                    } else {
                        _mm512_srlv_epi16(h, _mm512_set1_epi16(i as i16 - 4))
                    };
                    _mm512_and_si512(v, m16)
                };
                for g in 0..4 {
                    let v = load(x.add(32 + 64 * g));
                    let lo = _mm512_or_si512(_mm512_and_si512(v, m4), bit(2 * g as u32));
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4);
                    store(p.add(64 * (2 * g)), lo);
                    store(
                        p.add(64 * (2 * g + 1)),
                        _mm512_or_si512(hi, bit(2 * g as u32 + 1)),
                    );
                }
            } else {
                for c in 0..8 {
                    store(p.add(64 * c), load(x.add(32 + 64 * c)));
                }
            }
            put_lanes(p.add(512), |r| f16_at(x.add(2 * r)));
        }
    }
}

macro_rules! legacy_packers {
    ($($name:ident => $ty:ident),*) => {$(
        /// [`pack_legacy`] for one type.
        ///
        /// # Safety
        /// As [`pack_legacy`].
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
        pub(crate) unsafe fn $name(w: *const u8, row_bytes: usize, nb: usize, dst: *mut u8) {
            // SAFETY: forwarded contract.
            unsafe { pack_legacy(Legacy::$ty, w, row_bytes, nb, dst) }
        }
    )*};
}
legacy_packers!(pack_q4_0 => Q4_0, pack_q5_0 => Q5_0, pack_q8_0 => Q8_0);

/// Per-block side data of Q8_0 activations for a legacy weight type: the block's scale as f32
/// and `-offset · Σ a`, which removes the packed quants' offset from the integer block sum.
/// `side` holds 8 bytes per block of `act`.
pub(crate) fn legacy_side(ty: Legacy, act: &[u8], side: &mut [u8]) {
    for (y, s) in act.chunks_exact(34).zip(side.chunks_exact_mut(8)) {
        let d = half::f16::from_bits(u16::from_le_bytes([y[0], y[1]])).to_f32();
        let sum: i32 = y[2..].iter().map(|&q| i32::from(q as i8)).sum();
        s[..4].copy_from_slice(&d.to_le_bytes());
        s[4..].copy_from_slice(&(-ty.offset() * sum).to_le_bytes());
    }
}

/// A K-quant tile × `NT` Q8_K tokens: `out[t * out_stride + r] = Σ_c W[r][c] · a_t[c]` for
/// the tile's 16 rows. `SUBS` is 8 for Q4_K ([`pack_q4_k`]) and 16 for Q6_K ([`pack_q6_k`]).
/// Per block and token: `d · dy · Σ_s sc_s · (exact i32 sub-block sum) + corr · dy · Σ_p
/// pair_p · bsums_p`.
///
/// # Safety
/// `pk` valid for `nb` blocks packed as `KLayout<SUBS>`; `a` for `NT` Q8_K rows of `nb`
/// blocks `act_row` bytes apart; `out + t * out_stride` writable for 16 f32 for each `t < NT`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
pub(crate) unsafe fn k_quant<const NT: usize, const SUBS: usize>(
    nb: usize,
    pk: *const u8,
    a: *const u8,
    act_row: usize,
    out: *mut f32,
    out_stride: usize,
) {
    let words = 64 / SUBS;
    let mut acc = [_mm512_setzero_ps(); NT];
    for b in 0..nb {
        // SAFETY: packed block b and block b of every token's row are readable (contract).
        unsafe {
            let p = pk.add(KLayout::<SUBS>::BYTES * b);
            let y: [*const u8; NT] = std::array::from_fn(|t| a.add(t * act_row + 292 * b));
            let mut blk = [_mm512_setzero_ps(); NT];
            for s in 0..SUBS {
                let mut isum = [_mm512_setzero_si512(); NT];
                for k in 0..words {
                    let c = words * s + k;
                    let wv = load(p.add(64 * c));
                    for t in 0..NT {
                        isum[t] = _mm512_dpbusd_epi32(isum[t], wv, bcast(y[t].add(4 + 4 * c)));
                    }
                }
                let sc = load_ps(p.add(KLayout::<SUBS>::SCALES + 64 * s));
                for t in 0..NT {
                    blk[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t]), sc, blk[t]);
                }
            }
            let d = load_ps(p.add(KLayout::<SUBS>::D));
            let corr = load_ps(p.add(KLayout::<SUBS>::CORR));
            for t in 0..NT {
                let dy = bcast_f32(y[t]);
                acc[t] = _mm512_fmadd_ps(blk[t], _mm512_mul_ps(d, dy), acc[t]);
                let mut m = _mm512_setzero_si512();
                for pair in 0..8 {
                    let pv = load(p.add(KLayout::<SUBS>::PAIRS + 64 * pair));
                    m = _mm512_dpwssd_epi32(m, pv, bcast(y[t].add(260 + 4 * pair)));
                }
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(m), _mm512_mul_ps(corr, dy), acc[t]);
            }
        }
    }
    for (t, v) in acc.iter().enumerate() {
        // SAFETY: 16 writable f32 at out + t·out_stride (contract).
        unsafe { _mm512_storeu_ps(out.add(t * out_stride), *v) };
    }
}

/// Legacy tile (any [`Legacy`] type once packed) × `NT` Q8_0 tokens, with their side data
/// ([`legacy_side`], `side_row` bytes per token).
///
/// # Safety
/// As [`k_quant`], for packed legacy blocks and Q8_0 rows; `side` valid for `NT` rows of `nb`
/// 8-byte entries `side_row` bytes apart.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn legacy<const NT: usize>(
    nb: usize,
    pk: *const u8,
    a: *const u8,
    act_row: usize,
    side: *const u8,
    side_row: usize,
    out: *mut f32,
    out_stride: usize,
) {
    let mut acc = [_mm512_setzero_ps(); NT];
    for b in 0..nb {
        // SAFETY: packed block b, block b of every token's row and its side entry are
        // readable (contract).
        unsafe {
            let p = pk.add(LEGACY_PACKED * b);
            let y: [*const u8; NT] = std::array::from_fn(|t| a.add(t * act_row + 34 * b));
            let s: [*const u8; NT] = std::array::from_fn(|t| side.add(t * side_row + 8 * b));
            let mut isum: [__m512i; NT] = std::array::from_fn(|t| bcast(s[t].add(4)));
            for c in 0..8 {
                let wv = load(p.add(64 * c));
                for t in 0..NT {
                    isum[t] = _mm512_dpbusd_epi32(isum[t], wv, bcast(y[t].add(2 + 4 * c)));
                }
            }
            let d = load_ps(p.add(512));
            for t in 0..NT {
                let dd = _mm512_mul_ps(d, bcast_f32(s[t]));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t]), dd, acc[t]);
            }
        }
    }
    for (t, v) in acc.iter().enumerate() {
        // SAFETY: 16 writable f32 at out + t·out_stride (contract).
        unsafe { _mm512_storeu_ps(out.add(t * out_stride), *v) };
    }
}
