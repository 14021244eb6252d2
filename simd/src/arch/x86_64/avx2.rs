//! AVX2 + FMA + F16C kernels, ports of ggml's x86 `vec_dot_*` and activation quantizers.
//!
//! Every `unsafe fn` here has the same contract: the CPU supports AVX2, FMA and F16C, and the
//! slices hold at least the bytes of `n` elements in their formats (`n` a multiple of the
//! weight's block size). The wrappers in `matmul::kernels` check both.

use std::arch::x86_64::*;

use strata_storage::quant::QK_K;

/// Reads the f16 at `p` as f32.
///
/// # Safety
/// `p` must be valid for reading 2 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees 2 readable bytes; read_unaligned needs no alignment.
    let h = unsafe { p.cast::<u16>().read_unaligned() };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
}

/// The f16 at `p` as f32 in all 8 lanes.
///
/// Kernels take block scales through this rather than [`f16_at`]: for a scalar LLVM emits
/// `vpinsrw` into whatever register is free, often the accumulator, which chains every block
/// on the previous one (measured: legacy-type dot products 4x slower). Using all lanes forces
/// a real broadcast.
///
/// # Safety
/// `p` must be valid for reading 2 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn f16x8(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees 2 readable bytes.
    let h = unsafe { p.cast::<u16>().read_unaligned() };
    _mm256_cvtph_ps(_mm_set1_epi16(h as i16))
}

/// Reads the f32 at `p`.
///
/// # Safety
/// `p` must be valid for reading 4 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn f32_at(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees 4 readable bytes.
    unsafe { p.cast::<f32>().read_unaligned() }
}

/// Loads 32 bytes from `p`.
///
/// # Safety
/// `p` must be valid for reading 32 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn load(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 32 readable bytes; loadu needs no alignment.
    unsafe { _mm256_loadu_si256(p.cast()) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn hsum_f32x8(x: __m256) -> f32 {
    let r = _mm_add_ps(_mm256_extractf128_ps::<1>(x), _mm256_castps256_ps128(x));
    let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    let r = _mm_add_ss(r, _mm_movehdup_ps(r));
    _mm_cvtss_f32(r)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn hsum_i32x8(x: __m256i) -> i32 {
    let r = _mm_add_epi32(_mm256_extracti128_si256::<1>(x), _mm256_castsi256_si128(x));
    let r = _mm_add_epi32(r, _mm_unpackhi_epi64(r, r));
    let r = _mm_add_epi32(r, _mm_shuffle_epi32::<0b01>(r));
    _mm_cvtsi128_si32(r)
}

/// 32 nibbles from 16 bytes: low nibbles in bytes 0..16, high nibbles in bytes 16..32.
///
/// # Safety
/// `p` must be valid for reading 16 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn nibbles32(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 16 readable bytes.
    let lo = unsafe { _mm_loadu_si128(p.cast()) };
    let hi = _mm_srli_epi16::<4>(lo);
    _mm256_and_si256(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(0xF))
}

/// Byte `j` is 0xFF where bit `j` of the 32-bit word at `p` is set (ggml's `bytes_from_bits_32`).
///
/// # Safety
/// `p` must be valid for reading 4 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn bits32(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 4 readable bytes.
    let x = unsafe { p.cast::<u32>().read_unaligned() };
    let shuf = _mm256_set_epi64x(
        0x0303030303030303,
        0x0202020202020202,
        0x0101010101010101,
        0x0000000000000000,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x as i32), shuf);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

/// Sum of signed-byte products, in 8 i32 lanes as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn mul_sum_i8_pairs_f32(x: __m256i, y: __m256i) -> __m256 {
    let ax = _mm256_sign_epi8(x, x);
    let sy = _mm256_sign_epi8(y, x);
    mul_sum_us8_pairs_f32(ax, sy)
}

/// Sum of unsigned-by-signed byte products, in 8 i32 lanes as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn mul_sum_us8_pairs_f32(ax: __m256i, sy: __m256i) -> __m256 {
    let dot = _mm256_maddubs_epi16(ax, sy);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(dot, _mm256_set1_epi16(1)))
}

// ---------------------------------------------------------------------------------------------
// Float types

/// # Safety
/// See the module docs.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_f32(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let (x, y) = (w.as_ptr().cast::<f32>(), a.as_ptr().cast::<f32>());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (k, acc) in acc.iter_mut().enumerate() {
            // SAFETY: i + 8k + 8 <= n elements are readable in both rows.
            let (xv, yv) = unsafe {
                (
                    _mm256_loadu_ps(x.add(i + 8 * k)),
                    _mm256_loadu_ps(y.add(i + 8 * k)),
                )
            };
            *acc = _mm256_fmadd_ps(xv, yv, *acc);
        }
        i += 32;
    }
    while i + 8 <= n {
        // SAFETY: i + 8 <= n.
        let (xv, yv) = unsafe { (_mm256_loadu_ps(x.add(i)), _mm256_loadu_ps(y.add(i))) };
        acc[0] = _mm256_fmadd_ps(xv, yv, acc[0]);
        i += 8;
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut sum = hsum_f32x8(s);
    while i < n {
        // SAFETY: i < n.
        sum += unsafe { x.add(i).read_unaligned() * y.add(i).read_unaligned() };
        i += 1;
    }
    sum
}

/// # Safety
/// See the module docs.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_f16(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let (x, y) = (w.as_ptr(), a.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (k, acc) in acc.iter_mut().enumerate() {
            let o = 2 * (i + 8 * k);
            // SAFETY: elements i + 8k .. i + 8k + 8 < n are readable (2 bytes each).
            let (xv, yv) = unsafe {
                (
                    _mm_loadu_si128(x.add(o).cast()),
                    _mm_loadu_si128(y.add(o).cast()),
                )
            };
            *acc = _mm256_fmadd_ps(_mm256_cvtph_ps(xv), _mm256_cvtph_ps(yv), *acc);
        }
        i += 32;
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut sum = hsum_f32x8(s);
    while i < n {
        // SAFETY: i < n.
        sum += unsafe { f16_at(x.add(2 * i)) * f16_at(y.add(2 * i)) };
        i += 1;
    }
    sum
}

/// # Safety
/// See the module docs.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_bf16(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let (x, y) = (w.as_ptr(), a.as_ptr());
    let widen = |v: __m128i| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(v)));
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut i = 0;
    while i + 16 <= n {
        for (k, acc) in acc.iter_mut().enumerate() {
            let o = 2 * (i + 8 * k);
            // SAFETY: elements i + 8k .. i + 8k + 8 < n are readable.
            let (xv, yv) = unsafe {
                (
                    _mm_loadu_si128(x.add(o).cast()),
                    _mm_loadu_si128(y.add(o).cast()),
                )
            };
            *acc = _mm256_fmadd_ps(widen(xv), widen(yv), *acc);
        }
        i += 16;
    }
    let mut sum = hsum_f32x8(_mm256_add_ps(acc[0], acc[1]));
    let bf = |p: *const u8| {
        // SAFETY: called only for indices < n below.
        f32::from_bits((unsafe { p.cast::<u16>().read_unaligned() } as u32) << 16)
    };
    while i < n {
        // SAFETY: i < n (pointer arithmetic stays inside the rows).
        sum += bf(unsafe { x.add(2 * i) }) * bf(unsafe { y.add(2 * i) });
        i += 1;
    }
    sum
}

// ---------------------------------------------------------------------------------------------
// Legacy 32-element blocks against Q8_0 / Q8_1

/// # Safety
/// See the module docs.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for i in 0..n / 32 {
        // SAFETY: block i (34 bytes) is inside both rows.
        unsafe {
            let x = w.as_ptr().add(34 * i);
            let y = a.as_ptr().add(34 * i);
            let d = _mm256_mul_ps(f16x8(x), f16x8(y));
            let q = mul_sum_i8_pairs_f32(load(x.add(2)), load(y.add(2)));
            acc = _mm256_fmadd_ps(d, q, acc);
        }
    }
    hsum_f32x8(acc)
}

/// # Safety
/// See the module docs.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q4_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let off = _mm256_set1_epi8(8);
    for i in 0..n / 32 {
        // SAFETY: block i is inside both rows (18 and 34 bytes).
        unsafe {
            let x = w.as_ptr().add(18 * i);
            let y = a.as_ptr().add(34 * i);
            let d = _mm256_mul_ps(f16x8(x), f16x8(y));
            let qx = _mm256_sub_epi8(nibbles32(x.add(2)), off);
            let q = mul_sum_i8_pairs_f32(qx, load(y.add(2)));
            acc = _mm256_fmadd_ps(d, q, acc);
        }
    }
    hsum_f32x8(acc)
}

/// # Safety
/// See the module docs.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q5_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let f0 = _mm256_set1_epi8(0xF0u8 as i8);
    for i in 0..n / 32 {
        // SAFETY: block i is inside both rows (22 and 34 bytes).
        unsafe {
            let x = w.as_ptr().add(22 * i);
            let y = a.as_ptr().add(34 * i);
            let d = _mm256_mul_ps(f16x8(x), f16x8(y));
            // Where the fifth bit is clear, 0xF0 turns the nibble into nibble - 16.
            let hi = _mm256_andnot_si256(bits32(x.add(2)), f0);
            let qx = _mm256_or_si256(nibbles32(x.add(6)), hi);
            let q = mul_sum_i8_pairs_f32(qx, load(y.add(2)));
            acc = _mm256_fmadd_ps(d, q, acc);
        }
    }
    hsum_f32x8(acc)
}

/// # Safety
/// See the module docs.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q4_1(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut summs = _mm256_setzero_ps();
    for i in 0..n / 32 {
        // SAFETY: block i is inside both rows (20 and 36 bytes).
        unsafe {
            let x = w.as_ptr().add(20 * i);
            let y = a.as_ptr().add(36 * i);
            summs = _mm256_fmadd_ps(f16x8(x.add(2)), f16x8(y.add(2)), summs);
            let d = _mm256_mul_ps(f16x8(x), f16x8(y));
            let q = mul_sum_us8_pairs_f32(nibbles32(x.add(4)), load(y.add(4)));
            acc = _mm256_fmadd_ps(d, q, acc);
        }
    }
    hsum_f32x8(acc) + _mm256_cvtss_f32(summs)
}

/// # Safety
/// See the module docs.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q5_1(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut summs = _mm256_setzero_ps();
    let b4 = _mm256_set1_epi8(0x10);
    for i in 0..n / 32 {
        // SAFETY: block i is inside both rows (24 and 36 bytes).
        unsafe {
            let x = w.as_ptr().add(24 * i);
            let y = a.as_ptr().add(36 * i);
            summs = _mm256_fmadd_ps(f16x8(x.add(2)), f16x8(y.add(2)), summs);
            let d = _mm256_mul_ps(f16x8(x), f16x8(y));
            let hi = _mm256_and_si256(bits32(x.add(4)), b4);
            let qx = _mm256_or_si256(nibbles32(x.add(8)), hi);
            let q = mul_sum_us8_pairs_f32(qx, load(y.add(4)));
            acc = _mm256_fmadd_ps(d, q, acc);
        }
    }
    hsum_f32x8(acc) + _mm256_cvtss_f32(summs)
}

// ---------------------------------------------------------------------------------------------
// K-quants against Q8_K (d: f32 @0, qs: [i8; 256] @4, bsums: [i16; 16] @260)

const KMASK2: u32 = 0x0f0f0f0f;
const KMASK3: u32 = 0x03030303;

/// The 12 packed scale bytes of a Q4_K/Q5_K block as [scales 0..8 | mins 0..8], one byte each.
///
/// Scale and min `j < 4` are the low 6 bits of bytes `j` and `4 + j`; for `j >= 4` the low
/// and high nibbles of byte `4 + j` give their low 4 bits and the top 2 bits of bytes `j - 4`
/// and `j` their high 2. Done in vector registers (two shuffles and masks): in
/// general-purpose ones, through a copy in memory, it cost a row kernel more than the block's
/// multiply-adds.
///
/// # Safety
/// `p` must be valid for reading 16 bytes (the 12 scale bytes and 4 more: every K-quant
/// block has its quants after them).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn unpack_scales_mins_k4(p: *const u8) -> __m128i {
    // SAFETY: 16 readable bytes at p (the caller's contract); loadu needs no alignment.
    let v = unsafe { _mm_loadu_si128(p.cast()) };
    // [s0..4 | s8..12 | s4..8 | s8..12]: the low bits of every output byte.
    let a = _mm_shuffle_epi8(
        v,
        _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11),
    );
    // [0 | s0..4 | 0 | s4..8]: the bytes whose top 2 bits become bits 4-5 of outputs 4-8, 12-16.
    let z = -128i8;
    let b = _mm_shuffle_epi8(
        v,
        _mm_setr_epi8(z, z, z, z, 0, 1, 2, 3, z, z, z, z, 4, 5, 6, 7),
    );
    // Mins 4..8 take the high nibbles of s8..12: shift the last dword's bytes down by 4 bits.
    let a = _mm_blend_epi32::<0b1000>(a, _mm_srli_epi16::<4>(a));
    let lo = _mm_and_si128(
        a,
        _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f),
    );
    let hi = _mm_and_si128(
        _mm_srli_epi16::<2>(b),
        _mm_setr_epi32(0, 0x30303030, 0, 0x30303030),
    );
    _mm_or_si128(lo, hi)
}

/// Shuffle mask that broadcasts 16-bit lane `i` of a 128-bit value.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn bcast16(i: usize) -> __m256i {
    _mm256_set1_epi16((((2 * i + 1) << 8) | (2 * i)) as i16)
}

/// # Safety
/// See the module docs.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q4_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let m4 = _mm256_set1_epi8(0xF);
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = _mm_setzero_ps();
    for i in 0..n / QK_K {
        // SAFETY: block i is inside both rows (144 and 292 bytes); every offset below is
        // within those bounds.
        unsafe {
            let x = w.as_ptr().add(144 * i);
            let y = a.as_ptr().add(292 * i);
            let dy = _mm256_set1_ps(f32_at(y));
            let d = _mm256_mul_ps(dy, f16x8(x));
            let dmin = _mm256_castps256_ps128(_mm256_mul_ps(dy, f16x8(x.add(2))));
            let mins_scales = _mm256_cvtepu8_epi16(unpack_scales_mins_k4(x.add(4)));
            let bsums = load(y.add(260));
            let q8s = _mm_hadd_epi16(
                _mm256_castsi256_si128(bsums),
                _mm256_extracti128_si256::<1>(bsums),
            );
            let prod = _mm_madd_epi16(_mm256_extracti128_si256::<1>(mins_scales), q8s);
            acc_m = _mm_fnmadd_ps(dmin, _mm_cvtepi32_ps(prod), acc_m);
            let sc128 = _mm256_castsi256_si128(mins_scales);
            let scales = _mm256_set_m128i(sc128, sc128);

            let mut sumi = _mm256_setzero_si256();
            let q4 = x.add(16);
            let q8 = y.add(4);
            for j in 0..4 {
                let scale_l = _mm256_shuffle_epi8(scales, bcast16(2 * j));
                let scale_h = _mm256_shuffle_epi8(scales, bcast16(2 * j + 1));
                let bits = load(q4.add(32 * j));
                let q4l = _mm256_and_si256(bits, m4);
                let q4h = _mm256_and_si256(_mm256_srli_epi16::<4>(bits), m4);
                let pl = _mm256_maddubs_epi16(q4l, load(q8.add(64 * j)));
                let ph = _mm256_maddubs_epi16(q4h, load(q8.add(64 * j + 32)));
                let pl = _mm256_madd_epi16(scale_l, pl);
                let ph = _mm256_madd_epi16(scale_h, ph);
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
            }
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
        }
    }
    let acc_m = _mm_add_ps(acc_m, _mm_movehl_ps(acc_m, acc_m));
    let acc_m = _mm_add_ss(acc_m, _mm_movehdup_ps(acc_m));
    hsum_f32x8(acc) + _mm_cvtss_f32(acc_m)
}

/// # Safety
/// See the module docs.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q5_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let m4 = _mm256_set1_epi8(0xF);
    let b4 = _mm256_set1_epi8(16);
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = _mm_setzero_ps();
    for i in 0..n / QK_K {
        // SAFETY: block i is inside both rows (176 and 292 bytes).
        unsafe {
            let x = w.as_ptr().add(176 * i);
            let y = a.as_ptr().add(292 * i);
            let dy = _mm256_set1_ps(f32_at(y));
            let d = _mm256_mul_ps(dy, f16x8(x));
            let dmin = _mm256_castps256_ps128(_mm256_mul_ps(dy, f16x8(x.add(2))));
            let mins_scales = _mm256_cvtepu8_epi16(unpack_scales_mins_k4(x.add(4)));
            let bsums = load(y.add(260));
            let q8s = _mm_hadd_epi16(
                _mm256_castsi256_si128(bsums),
                _mm256_extracti128_si256::<1>(bsums),
            );
            let prod = _mm_madd_epi16(_mm256_extracti128_si256::<1>(mins_scales), q8s);
            acc_m = _mm_fnmadd_ps(dmin, _mm_cvtepi32_ps(prod), acc_m);
            let sc128 = _mm256_castsi256_si128(mins_scales);
            let scales = _mm256_set_m128i(sc128, sc128);

            let hbits = load(x.add(16));
            let mut hmask = _mm256_set1_epi8(1);
            let mut sumi = _mm256_setzero_si256();
            let q5 = x.add(48);
            let q8 = y.add(4);
            for j in 0..4 {
                let scale_l = _mm256_shuffle_epi8(scales, bcast16(2 * j));
                let scale_h = _mm256_shuffle_epi8(scales, bcast16(2 * j + 1));
                let bits = load(q5.add(32 * j));
                let hl =
                    _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hbits, hmask), hmask), b4);
                hmask = _mm256_slli_epi16::<1>(hmask);
                let hh =
                    _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hbits, hmask), hmask), b4);
                hmask = _mm256_slli_epi16::<1>(hmask);
                let q5l = _mm256_or_si256(_mm256_and_si256(bits, m4), hl);
                let q5h = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(bits), m4), hh);
                let pl = _mm256_maddubs_epi16(q5l, load(q8.add(64 * j)));
                let ph = _mm256_maddubs_epi16(q5h, load(q8.add(64 * j + 32)));
                let pl = _mm256_madd_epi16(scale_l, pl);
                let ph = _mm256_madd_epi16(scale_h, ph);
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
            }
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
        }
    }
    let acc_m = _mm_add_ps(acc_m, _mm_movehl_ps(acc_m, acc_m));
    let acc_m = _mm_add_ss(acc_m, _mm_movehdup_ps(acc_m));
    hsum_f32x8(acc) + _mm_cvtss_f32(acc_m)
}

/// # Safety
/// See the module docs.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q6_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let m4 = _mm256_set1_epi8(0xF);
    let m2 = _mm256_set1_epi8(3);
    let m32s = _mm256_set1_epi8(32);
    let mut acc = _mm256_setzero_ps();
    for i in 0..n / QK_K {
        // SAFETY: block i is inside both rows (210 and 292 bytes).
        unsafe {
            let x = w.as_ptr().add(210 * i);
            let y = a.as_ptr().add(292 * i);
            let d = _mm256_mul_ps(_mm256_set1_ps(f32_at(y)), f16x8(x.add(208)));
            let sc = _mm_loadu_si128(x.add(192).cast());
            let mut sumi = _mm256_setzero_si256();
            for j in 0..2 {
                let ql = x.add(64 * j);
                let qh = load(x.add(128 + 32 * j));
                let q8 = y.add(4 + 128 * j);
                let h0 = _mm256_slli_epi16::<4>(_mm256_and_si256(qh, m2));
                let h1 = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<2>(qh), m2));
                let h2 = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<4>(qh), m2));
                let h3 = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<6>(qh), m2));
                let b1 = load(ql);
                let b2 = load(ql.add(32));
                let q = [
                    _mm256_or_si256(_mm256_and_si256(b1, m4), h0),
                    _mm256_or_si256(_mm256_and_si256(b2, m4), h1),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(b1), m4), h2),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(b2), m4), h3),
                ];
                for (k, &qk) in q.iter().enumerate() {
                    let yk = load(q8.add(32 * k));
                    let p = _mm256_sub_epi16(
                        _mm256_maddubs_epi16(qk, yk),
                        _mm256_maddubs_epi16(m32s, yk),
                    );
                    // Elements 0..16 of this 32 use scale 8j + 2k, 16..32 use 8j + 2k + 1.
                    let s = (8 * j + 2 * k) as i64 * 0x0101010101010101;
                    let shuf = _mm_set_epi64x(s + 0x0101010101010101, s);
                    let scale = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc, shuf));
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(scale, p));
                }
            }
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
        }
    }
    hsum_f32x8(acc)
}

/// Shuffle mask for a vector whose two 128-bit halves both hold the same 8 i16 scales: the low
/// half gets scale `2k` in every lane, the high half scale `2k + 1`. In Q2_K and Q3_K a 32-byte
/// group of quants covers two 16-element sub-blocks, which `maddubs` leaves in those halves.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn pair16(k: usize) -> __m256i {
    let lo = (((4 * k + 1) << 8) | (4 * k)) as i16;
    let hi = (((4 * k + 3) << 8) | (4 * k + 2)) as i16;
    _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo))
}

/// The 16 signed 6-bit scales of a Q3_K block (12 packed bytes at `p`) as i8, minus 32.
///
/// # Safety
/// `p` must be valid for reading 12 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn unpack_scales_q3_k(p: *const u8) -> __m128i {
    let mut u = [0u32; 3];
    // SAFETY: 12 readable bytes at p, 12 writable bytes at u.
    unsafe { std::ptr::copy_nonoverlapping(p, u.as_mut_ptr().cast::<u8>(), 12) };
    // Scale j: low 4 bits from byte j % 8 (low nibble for j < 8, high above), high 2 bits
    // from byte 8 + j % 4 at bit 2 (j / 4).
    let t = u[2];
    let s0 = (u[0] & KMASK2) | ((t & KMASK3) << 4);
    let s1 = (u[1] & KMASK2) | (((t >> 2) & KMASK3) << 4);
    let s2 = ((u[0] >> 4) & KMASK2) | (((t >> 4) & KMASK3) << 4);
    let s3 = ((u[1] >> 4) & KMASK2) | (((t >> 6) & KMASK3) << 4);
    let v = _mm_set_epi32(s3 as i32, s2 as i32, s1 as i32, s0 as i32);
    _mm_sub_epi8(v, _mm_set1_epi8(32))
}

/// The four 2-bit planes of 32 bytes of Q2_K/Q3_K quants: plane `k` holds bits `2k..2k+2` of
/// every byte, one value in 0..4 per byte.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn planes2(bits: __m256i) -> [__m256i; 4] {
    let m3 = _mm256_set1_epi8(3);
    [
        _mm256_and_si256(bits, m3),
        _mm256_and_si256(_mm256_srli_epi16::<2>(bits), m3),
        _mm256_and_si256(_mm256_srli_epi16::<4>(bits), m3),
        _mm256_and_si256(_mm256_srli_epi16::<6>(bits), m3),
    ]
}

/// The high bits of Q3_K group `g` (0..8) as 4 or 0 per byte: bit `g` of each of the 32
/// hmask bytes, moved to bit 2.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn q3_k_high(hbits: __m256i, g: usize) -> __m256i {
    // Bits that cross a byte edge in the 16-bit shift are masked off.
    let h = _mm256_srl_epi16(hbits, _mm_cvtsi32_si128(g as i32));
    _mm256_and_si256(_mm256_slli_epi16::<2>(h), _mm256_set1_epi8(4))
}

/// Q3_K weights against Q8_K activations. Each weight is `q - 4` with `q = low2 | high << 2`
/// in 0..8, so the block's sum is `Σ sc·q·y - 4 Σ sc·bsum` over Q8_K's 16-element sums: one
/// unsigned multiply per group instead of two, exact in integers like ggml's.
///
/// # Safety
/// See the module docs.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q3_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for i in 0..n / QK_K {
        // SAFETY: block i is inside both rows (110 and 292 bytes).
        unsafe {
            let x = w.as_ptr().add(110 * i);
            let y = a.as_ptr().add(292 * i);
            let d = _mm256_mul_ps(_mm256_set1_ps(f32_at(y)), f16x8(x.add(108)));
            let sc16 = _mm256_cvtepi8_epi16(unpack_scales_q3_k(x.add(96)));
            let ms = _mm256_madd_epi16(sc16, load(y.add(260)));
            let mut sumi = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32::<2>(ms));
            let hbits = load(x);
            for half in 0..2 {
                let scales = if half == 0 {
                    _mm256_permute2x128_si256::<0x00>(sc16, sc16)
                } else {
                    _mm256_permute2x128_si256::<0x11>(sc16, sc16)
                };
                let q = planes2(load(x.add(32 + 32 * half)));
                let q8 = y.add(4 + 128 * half);
                for (k, &qk) in q.iter().enumerate() {
                    let q3 = _mm256_or_si256(qk, q3_k_high(hbits, 4 * half + k));
                    let p = _mm256_maddubs_epi16(q3, load(q8.add(32 * k)));
                    let s = _mm256_shuffle_epi8(scales, pair16(k));
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, s));
                }
            }
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
        }
    }
    hsum_f32x8(acc)
}

/// Q2_K weights against Q8_K activations; the mins go through Q8_K's 16-element sums, as for
/// Q4_K.
///
/// # Safety
/// See the module docs.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q2_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let m4 = _mm_set1_epi8(0xF);
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = _mm256_setzero_ps();
    for i in 0..n / QK_K {
        // SAFETY: block i is inside both rows (84 and 292 bytes).
        unsafe {
            let x = w.as_ptr().add(84 * i);
            let y = a.as_ptr().add(292 * i);
            let dy = _mm256_set1_ps(f32_at(y));
            let d = _mm256_mul_ps(dy, f16x8(x.add(80)));
            let dmin = _mm256_mul_ps(dy, f16x8(x.add(82)));
            let sm = _mm_loadu_si128(x.cast());
            let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(sm), m4));
            let prod = _mm256_madd_epi16(mins, load(y.add(260)));
            acc_m = _mm256_fnmadd_ps(dmin, _mm256_cvtepi32_ps(prod), acc_m);
            let sc16 = _mm256_cvtepu8_epi16(_mm_and_si128(sm, m4));
            let mut sumi = _mm256_setzero_si256();
            for half in 0..2 {
                let scales = if half == 0 {
                    _mm256_permute2x128_si256::<0x00>(sc16, sc16)
                } else {
                    _mm256_permute2x128_si256::<0x11>(sc16, sc16)
                };
                let q = planes2(load(x.add(16 + 32 * half)));
                let q8 = y.add(4 + 128 * half);
                for (k, &qk) in q.iter().enumerate() {
                    let p = _mm256_maddubs_epi16(qk, load(q8.add(32 * k)));
                    let s = _mm256_shuffle_epi8(scales, pair16(k));
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, s));
                }
            }
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
        }
    }
    hsum_f32x8(acc) + hsum_f32x8(acc_m)
}

// ---------------------------------------------------------------------------------------------
// Activation quantizers

/// Packs 32 i32 (four vectors of 8) into 32 i8 in order, saturating.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn pack32(i0: __m256i, i1: __m256i, i2: __m256i, i3: __m256i) -> __m256i {
    let a = _mm256_packs_epi32(i0, i1);
    let b = _mm256_packs_epi32(i2, i3);
    let c = _mm256_packs_epi16(a, b);
    _mm256_permutevar8x32_epi32(c, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hmax_f32x8(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_extractf128_ps::<1>(v), _mm256_castps256_ps128(v));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_movehdup_ps(m));
    _mm_cvtss_f32(m)
}

/// Q8_0 (`q8_1 == false`, 34-byte blocks) or Q8_1 (36-byte blocks with `s`).
///
/// # Safety
/// CPU supports AVX2/FMA/F16C; `x.len()` is a multiple of 32 and `y` holds its blocks.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_q8_0_or_1(x: &[f32], y: &mut [u8], q8_1: bool) {
    let bs = if q8_1 { 36 } else { 34 };
    let qoff = if q8_1 { 4 } else { 2 };
    let sign = _mm256_set1_ps(-0.0);
    for i in 0..x.len() / 32 {
        // SAFETY: block i: 32 floats readable from x, `bs` bytes writable in y.
        unsafe {
            let xp = x.as_ptr().add(32 * i);
            let yp = y.as_mut_ptr().add(bs * i);
            let v = [
                _mm256_loadu_ps(xp),
                _mm256_loadu_ps(xp.add(8)),
                _mm256_loadu_ps(xp.add(16)),
                _mm256_loadu_ps(xp.add(24)),
            ];
            let mut m = _mm256_andnot_ps(sign, v[0]);
            for &vk in &v[1..] {
                m = _mm256_max_ps(m, _mm256_andnot_ps(sign, vk));
            }
            let amax = hmax_f32x8(m);
            let d = amax / 127.0;
            let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
            let q = v.map(|vk| {
                _mm256_cvtps_epi32(_mm256_round_ps::<
                    { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                >(_mm256_mul_ps(vk, id)))
            });
            let dh = half::f16::from_f32(d).to_bits();
            yp.cast::<u16>().write_unaligned(dh);
            if q8_1 {
                let s =
                    _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
                let s = hsum_i32x8(s) as f32 * d;
                yp.add(2)
                    .cast::<u16>()
                    .write_unaligned(half::f16::from_f32(s).to_bits());
            }
            _mm256_storeu_si256(yp.add(qoff).cast(), pack32(q[0], q[1], q[2], q[3]));
        }
    }
}

/// # Safety
/// CPU supports AVX2/FMA/F16C; `x.len()` is a multiple of 32 and `y` holds its Q8_0 blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_q8_0(x: &[f32], y: &mut [u8]) {
    // SAFETY: forwarded contract.
    unsafe { quantize_q8_0_or_1(x, y, false) }
}

/// # Safety
/// CPU supports AVX2/FMA/F16C; `x.len()` is a multiple of 32 and `y` holds its Q8_1 blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_q8_1(x: &[f32], y: &mut [u8]) {
    // SAFETY: forwarded contract.
    unsafe { quantize_q8_0_or_1(x, y, true) }
}

/// Q8_K with ggml's reference semantics (scale from the signed value of largest magnitude,
/// round to nearest even), so it matches the scalar quantizer bit for bit except when `+m`
/// and `-m` are both the largest magnitude.
///
/// # Safety
/// CPU supports AVX2/FMA/F16C; `x.len()` is a multiple of 256 and `y` holds its Q8_K blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_q8_k(x: &[f32], y: &mut [u8]) {
    for i in 0..x.len() / QK_K {
        // SAFETY: block i: 256 floats readable, 292 bytes writable.
        unsafe {
            let xp = x.as_ptr().add(QK_K * i);
            let yp = y.as_mut_ptr().add(292 * i);
            let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
            let mut vmin = _mm256_set1_ps(f32::INFINITY);
            for k in 0..32 {
                let v = _mm256_loadu_ps(xp.add(8 * k));
                vmax = _mm256_max_ps(vmax, v);
                vmin = _mm256_min_ps(vmin, v);
            }
            let hi = hmax_f32x8(vmax);
            let lo = -hmax_f32x8(_mm256_sub_ps(_mm256_setzero_ps(), vmin));
            let max = if -lo > hi { lo } else { hi };
            if max == 0.0 || max.is_nan() {
                std::ptr::write_bytes(yp, 0, 292);
                continue;
            }
            let iscale = -127.0 / max;
            let vs = _mm256_set1_ps(iscale);
            let cap = _mm256_set1_epi32(127);
            for g in 0..8 {
                let mut q = [_mm256_setzero_si256(); 4];
                for (k, qk) in q.iter_mut().enumerate() {
                    let v = _mm256_loadu_ps(xp.add(32 * g + 8 * k));
                    *qk = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v, vs)), cap);
                }
                _mm256_storeu_si256(yp.add(4 + 32 * g).cast(), pack32(q[0], q[1], q[2], q[3]));
                let s0 = hsum_i32x8(_mm256_add_epi32(q[0], q[1])) as i16;
                let s1 = hsum_i32x8(_mm256_add_epi32(q[2], q[3])) as i16;
                yp.add(260 + 4 * g).cast::<i16>().write_unaligned(s0);
                yp.add(262 + 4 * g).cast::<i16>().write_unaligned(s1);
            }
            yp.cast::<f32>().write_unaligned(1.0 / iscale);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::unpack_scales_mins_k4;
    use crate::scalar::scale_min_k4;
    use std::arch::x86_64::*;

    /// The vector decoding of a K-quant block's 12 scale bytes gives ggml's scales and mins,
    /// on every value of each byte and on random bytes.
    #[test]
    fn vector_scale_unpack_matches_the_scalar_one() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let mut seed = 0x9e3779b97f4a7c15u64;
        for case in 0..4096u32 {
            let mut bytes = [0u8; 16];
            for (i, b) in bytes.iter_mut().enumerate() {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                *b = if case < 256 {
                    (case as u8).wrapping_add(i as u8 * 37)
                } else {
                    (seed >> 56) as u8
                };
            }
            let mut got = [0u8; 16];
            // SAFETY: AVX2 was detected; 16 readable and 16 writable bytes.
            unsafe {
                let v = unpack_scales_mins_k4(bytes.as_ptr());
                _mm_storeu_si128(got.as_mut_ptr().cast(), v);
            }
            for j in 0..8 {
                let (s, m) = scale_min_k4(j, &bytes[..12]);
                assert_eq!((got[j], got[8 + j]), (s, m), "pair {j} of {bytes:?}");
            }
        }
    }
}
