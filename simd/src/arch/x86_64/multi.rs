//! Multi-token kernels for prefill: one weight row against `NT` (1..=4) activation tokens.
//!
//! The single-token dot products unpack every weight block (nibble masks, scale decoding) for
//! each token; here a block is unpacked once and multiplied into all `NT` tokens, which is
//! where prefill spends its time. The integer arithmetic is the same as the single-token
//! kernels' (and ggml's): exact block sums, scaled and summed in f32 per block.
//!
//! One macro body is instantiated twice: for AVX2 (`maddubs` + `madd` + `add`) and for
//! AVX-512 VNNI, where `vpdpwssd`/`vpdpbusd` fuse the widening multiply-add with the
//! accumulation and AVX-512VL gives the compiler 32 vector registers, enough to keep four
//! tokens' accumulators live beside the unpacked block.
//!
//! Each kernel takes a software prefetch (`ahead`), issued block by block over the row:
//! decode's row kernels (`kernels::RowDecode`) use it; a batch passes none, and its rows are
//! prefetched a row at a time, which a kernel computing for several tokens has time for.
//!
//! Contract of every `unsafe fn`: the CPU has the module's features; `w` is valid for one row
//! of `n` elements of the weight type; `a` is valid for `NT` activation rows of `n` elements in
//! the partner format, `act_row` bytes apart.

/// The kernels, generated for one instruction set. `$madd_acc(acc, p, s)` adds the pairwise
/// products of i16 `p` and `s` to the i32 lanes of `acc`; `$dot_us(a, b)` is the pairwise sum
/// of unsigned-by-signed byte products, in 8 i32 lanes.
macro_rules! multi_kernels {
    ($features:literal) => {
        use std::arch::x86_64::*;

        use crate::arch::x86_64::avx2::{
            bits32, f16x8, f32_at, hsum_f32x8, load, nibbles32, pair16, planes2, q3_k_high,
            unpack_scales_mins_k4, unpack_scales_q3_k,
        };
        use crate::arch::x86_64::interleaved::prefetch_block;
        use crate::tune::Ahead;

        /// Shuffle mask that broadcasts 16-bit lane `i` of a 128-bit value.
        #[inline]
        #[target_feature(enable = $features)]
        fn bcast16(i: usize) -> __m256i {
            _mm256_set1_epi16((((2 * i + 1) << 8) | (2 * i)) as i16)
        }

        #[inline]
        #[target_feature(enable = $features)]
        fn hsum_f32x4(x: __m128) -> f32 {
            let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
            _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)))
        }

        /// Q4_K weights against Q8_K activations.
        ///
        /// # Safety
        /// See the module docs.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn q4_k<const NT: usize>(
            n: usize,
            w: *const u8,
            a: *const u8,
            act_row: usize,
            out: &mut [f32; NT],
            ahead: Ahead,
        ) {
            let m4 = _mm256_set1_epi8(0xF);
            let mut acc = [_mm256_setzero_ps(); NT];
            let mut acc_m = [_mm_setzero_ps(); NT];
            for i in 0..n / 256 {
                // SAFETY: block i of the weight row (144 bytes) and of each token's
                // activation row (292 bytes) is readable (module contract).
                unsafe {
                    let x = w.add(144 * i);
                    prefetch_block(x, 144, ahead);
                    let y: [*const u8; NT] = std::array::from_fn(|t| a.add(t * act_row + 292 * i));
                    let dx = f16x8(x);
                    let dminx = _mm256_castps256_ps128(f16x8(x.add(2)));
                    let mins_scales = _mm256_cvtepu8_epi16(unpack_scales_mins_k4(x.add(4)));
                    let mins = _mm256_extracti128_si256::<1>(mins_scales);
                    let sc128 = _mm256_castsi256_si128(mins_scales);
                    let scales = _mm256_set_m128i(sc128, sc128);
                    let mut sumi = [_mm256_setzero_si256(); NT];
                    for t in 0..NT {
                        let dy = _mm_set1_ps(f32_at(y[t]));
                        let bsums = load(y[t].add(260));
                        let q8s = _mm_hadd_epi16(
                            _mm256_castsi256_si128(bsums),
                            _mm256_extracti128_si256::<1>(bsums),
                        );
                        let prod = _mm_madd_epi16(mins, q8s);
                        acc_m[t] =
                            _mm_fnmadd_ps(_mm_mul_ps(dy, dminx), _mm_cvtepi32_ps(prod), acc_m[t]);
                    }
                    let q4 = x.add(16);
                    for j in 0..4 {
                        let scale_l = _mm256_shuffle_epi8(scales, bcast16(2 * j));
                        let scale_h = _mm256_shuffle_epi8(scales, bcast16(2 * j + 1));
                        let bits = load(q4.add(32 * j));
                        let q4l = _mm256_and_si256(bits, m4);
                        let q4h = _mm256_and_si256(_mm256_srli_epi16::<4>(bits), m4);
                        for t in 0..NT {
                            let q8 = y[t].add(4 + 64 * j);
                            let pl = _mm256_maddubs_epi16(q4l, load(q8));
                            let ph = _mm256_maddubs_epi16(q4h, load(q8.add(32)));
                            sumi[t] = madd_acc(sumi[t], pl, scale_l);
                            sumi[t] = madd_acc(sumi[t], ph, scale_h);
                        }
                    }
                    for t in 0..NT {
                        let d = _mm256_mul_ps(_mm256_set1_ps(f32_at(y[t])), dx);
                        acc[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi[t]), acc[t]);
                    }
                }
            }
            for t in 0..NT {
                out[t] = hsum_f32x8(acc[t]) + hsum_f32x4(acc_m[t]);
            }
        }

        /// Q6_K weights against Q8_K activations. The `- 32` offset of every weight is taken
        /// out of the inner loop: `Σ sc·(q - 32)·y = Σ sc·q·y - 32 Σ sc·bsum`, with Q8_K's
        /// 16-element sums — exact in integers, so the result equals ggml's.
        ///
        /// # Safety
        /// See the module docs.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn q6_k<const NT: usize>(
            n: usize,
            w: *const u8,
            a: *const u8,
            act_row: usize,
            out: &mut [f32; NT],
            ahead: Ahead,
        ) {
            let m4 = _mm256_set1_epi8(0xF);
            let m2 = _mm256_set1_epi8(3);
            let mut acc = [_mm256_setzero_ps(); NT];
            for i in 0..n / 256 {
                // SAFETY: block i of the weight row (210 bytes) and of each token's
                // activation row (292 bytes) is readable (module contract).
                unsafe {
                    let x = w.add(210 * i);
                    prefetch_block(x, 210, ahead);
                    let y: [*const u8; NT] = std::array::from_fn(|t| a.add(t * act_row + 292 * i));
                    let dx = f16x8(x.add(208));
                    let sc = _mm_loadu_si128(x.add(192).cast());
                    let sc16 = _mm256_cvtepi8_epi16(sc);
                    let mut sumi = [_mm256_setzero_si256(); NT];
                    for t in 0..NT {
                        // -32 · Σ sc_g · bsum_g, as the starting value of the block's sum.
                        let ms = _mm256_madd_epi16(sc16, load(y[t].add(260)));
                        sumi[t] = _mm256_sub_epi32(sumi[t], _mm256_slli_epi32::<5>(ms));
                    }
                    for j in 0..2 {
                        let ql = x.add(64 * j);
                        let qh = load(x.add(128 + 32 * j));
                        let h0 = _mm256_slli_epi16::<4>(_mm256_and_si256(qh, m2));
                        let h1 = _mm256_slli_epi16::<4>(_mm256_and_si256(
                            _mm256_srli_epi16::<2>(qh),
                            m2,
                        ));
                        let h2 = _mm256_slli_epi16::<4>(_mm256_and_si256(
                            _mm256_srli_epi16::<4>(qh),
                            m2,
                        ));
                        let h3 = _mm256_slli_epi16::<4>(_mm256_and_si256(
                            _mm256_srli_epi16::<6>(qh),
                            m2,
                        ));
                        let b1 = load(ql);
                        let b2 = load(ql.add(32));
                        let q = [
                            _mm256_or_si256(_mm256_and_si256(b1, m4), h0),
                            _mm256_or_si256(_mm256_and_si256(b2, m4), h1),
                            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(b1), m4), h2),
                            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(b2), m4), h3),
                        ];
                        for (k, &qk) in q.iter().enumerate() {
                            // Elements 0..16 of this 32 use scale 8j + 2k, 16..32 use the next.
                            let s = (8 * j + 2 * k) as i64 * 0x0101010101010101;
                            let shuf = _mm_set_epi64x(s + 0x0101010101010101, s);
                            let scale = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc, shuf));
                            for t in 0..NT {
                                let yk = load(y[t].add(4 + 128 * j + 32 * k));
                                let p = _mm256_maddubs_epi16(qk, yk);
                                sumi[t] = madd_acc(sumi[t], p, scale);
                            }
                        }
                    }
                    for t in 0..NT {
                        let d = _mm256_mul_ps(_mm256_set1_ps(f32_at(y[t])), dx);
                        acc[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi[t]), acc[t]);
                    }
                }
            }
            for t in 0..NT {
                out[t] = hsum_f32x8(acc[t]);
            }
        }

        /// Q3_K weights against Q8_K activations. As in the single-token kernel, the weights
        /// go in as `q = low2 | high << 2` (0..8) and the `- 4` comes out of the block sum as
        /// `-4 Σ sc·bsum` — exact in integers.
        ///
        /// # Safety
        /// See the module docs.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn q3_k<const NT: usize>(
            n: usize,
            w: *const u8,
            a: *const u8,
            act_row: usize,
            out: &mut [f32; NT],
            ahead: Ahead,
        ) {
            let mut acc = [_mm256_setzero_ps(); NT];
            for i in 0..n / 256 {
                // SAFETY: block i of the weight row (110 bytes) and of each token's
                // activation row (292 bytes) is readable (module contract).
                unsafe {
                    let x = w.add(110 * i);
                    prefetch_block(x, 110, ahead);
                    let y: [*const u8; NT] = std::array::from_fn(|t| a.add(t * act_row + 292 * i));
                    let dx = f16x8(x.add(108));
                    let sc16 = _mm256_cvtepi8_epi16(unpack_scales_q3_k(x.add(96)));
                    let mut sumi = [_mm256_setzero_si256(); NT];
                    for t in 0..NT {
                        let ms = _mm256_madd_epi16(sc16, load(y[t].add(260)));
                        sumi[t] = _mm256_sub_epi32(sumi[t], _mm256_slli_epi32::<2>(ms));
                    }
                    let hbits = load(x);
                    for half in 0..2 {
                        let scales = if half == 0 {
                            _mm256_permute2x128_si256::<0x00>(sc16, sc16)
                        } else {
                            _mm256_permute2x128_si256::<0x11>(sc16, sc16)
                        };
                        let q = planes2(load(x.add(32 + 32 * half)));
                        for (k, &qk) in q.iter().enumerate() {
                            let q3 = _mm256_or_si256(qk, q3_k_high(hbits, 4 * half + k));
                            let s = _mm256_shuffle_epi8(scales, pair16(k));
                            for t in 0..NT {
                                let yk = load(y[t].add(4 + 128 * half + 32 * k));
                                sumi[t] = madd_acc(sumi[t], _mm256_maddubs_epi16(q3, yk), s);
                            }
                        }
                    }
                    for t in 0..NT {
                        let d = _mm256_mul_ps(_mm256_set1_ps(f32_at(y[t])), dx);
                        acc[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi[t]), acc[t]);
                    }
                }
            }
            for t in 0..NT {
                out[t] = hsum_f32x8(acc[t]);
            }
        }

        /// Q2_K weights against Q8_K activations; the mins go through Q8_K's 16-element sums.
        ///
        /// # Safety
        /// See the module docs.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn q2_k<const NT: usize>(
            n: usize,
            w: *const u8,
            a: *const u8,
            act_row: usize,
            out: &mut [f32; NT],
            ahead: Ahead,
        ) {
            let m4 = _mm_set1_epi8(0xF);
            let mut acc = [_mm256_setzero_ps(); NT];
            let mut acc_m = [_mm256_setzero_ps(); NT];
            for i in 0..n / 256 {
                // SAFETY: block i of the weight row (84 bytes) and of each token's
                // activation row (292 bytes) is readable (module contract).
                unsafe {
                    let x = w.add(84 * i);
                    prefetch_block(x, 84, ahead);
                    let y: [*const u8; NT] = std::array::from_fn(|t| a.add(t * act_row + 292 * i));
                    let dx = f16x8(x.add(80));
                    let dminx = f16x8(x.add(82));
                    let sm = _mm_loadu_si128(x.cast());
                    let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(sm), m4));
                    let sc16 = _mm256_cvtepu8_epi16(_mm_and_si128(sm, m4));
                    for t in 0..NT {
                        let dy = _mm256_set1_ps(f32_at(y[t]));
                        let prod = _mm256_madd_epi16(mins, load(y[t].add(260)));
                        acc_m[t] = _mm256_fnmadd_ps(
                            _mm256_mul_ps(dy, dminx),
                            _mm256_cvtepi32_ps(prod),
                            acc_m[t],
                        );
                    }
                    let mut sumi = [_mm256_setzero_si256(); NT];
                    for half in 0..2 {
                        let scales = if half == 0 {
                            _mm256_permute2x128_si256::<0x00>(sc16, sc16)
                        } else {
                            _mm256_permute2x128_si256::<0x11>(sc16, sc16)
                        };
                        let q = planes2(load(x.add(16 + 32 * half)));
                        for (k, &qk) in q.iter().enumerate() {
                            let s = _mm256_shuffle_epi8(scales, pair16(k));
                            for t in 0..NT {
                                let yk = load(y[t].add(4 + 128 * half + 32 * k));
                                sumi[t] = madd_acc(sumi[t], _mm256_maddubs_epi16(qk, yk), s);
                            }
                        }
                    }
                    for t in 0..NT {
                        let d = _mm256_mul_ps(_mm256_set1_ps(f32_at(y[t])), dx);
                        acc[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi[t]), acc[t]);
                    }
                }
            }
            for t in 0..NT {
                out[t] = hsum_f32x8(acc[t]) + hsum_f32x8(acc_m[t]);
            }
        }

        /// Signed 32-element weight blocks (Q4_0, Q5_0, Q8_0) against Q8_0 activations, with
        /// `unpack` turning a block's bytes into its 32 signed weights. The weights' absolute
        /// values go in as the unsigned operand and their signs move onto the activations
        /// (ggml's trick for the unsigned-by-signed byte multiply).
        ///
        /// # Safety
        /// See the module docs; `bs` is the weight block size in bytes and `unpack` reads
        /// only within one block.
        #[inline]
        #[target_feature(enable = $features)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn legacy<const NT: usize>(
            n: usize,
            w: *const u8,
            a: *const u8,
            act_row: usize,
            out: &mut [f32; NT],
            ahead: Ahead,
            bs: usize,
            unpack: impl Fn(*const u8) -> __m256i,
        ) {
            let mut acc = [_mm256_setzero_ps(); NT];
            for i in 0..n / 32 {
                // SAFETY: block i of the weight row (`bs` bytes) and of each token's
                // activation row (34 bytes) is readable (module contract).
                unsafe {
                    let x = w.add(bs * i);
                    prefetch_block(x, bs, ahead);
                    let dx = f16x8(x);
                    let qx = unpack(x);
                    let ax = _mm256_sign_epi8(qx, qx);
                    for t in 0..NT {
                        let y = a.add(t * act_row + 34 * i);
                        let d = _mm256_mul_ps(dx, f16x8(y));
                        let sy = _mm256_sign_epi8(load(y.add(2)), qx);
                        let q = _mm256_cvtepi32_ps(dot_us(ax, sy));
                        acc[t] = _mm256_fmadd_ps(d, q, acc[t]);
                    }
                }
            }
            for t in 0..NT {
                out[t] = hsum_f32x8(acc[t]);
            }
        }

        /// Q8_0 weights against Q8_0 activations.
        ///
        /// # Safety
        /// See the module docs.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn q8_0<const NT: usize>(
            n: usize,
            w: *const u8,
            a: *const u8,
            act_row: usize,
            out: &mut [f32; NT],
            ahead: Ahead,
        ) {
            // SAFETY: forwarded contract; the unpack reads bytes 2..34 of a 34-byte block.
            unsafe { legacy(n, w, a, act_row, out, ahead, 34, |x| load(x.add(2))) }
        }

        /// Q4_0 weights against Q8_0 activations.
        ///
        /// # Safety
        /// See the module docs.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn q4_0<const NT: usize>(
            n: usize,
            w: *const u8,
            a: *const u8,
            act_row: usize,
            out: &mut [f32; NT],
            ahead: Ahead,
        ) {
            let off = _mm256_set1_epi8(8);
            // SAFETY: forwarded contract; the unpack reads bytes 2..18 of an 18-byte block.
            unsafe {
                legacy(n, w, a, act_row, out, ahead, 18, |x| {
                    _mm256_sub_epi8(nibbles32(x.add(2)), off)
                })
            }
        }

        /// Q5_0 weights against Q8_0 activations.
        ///
        /// # Safety
        /// See the module docs.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn q5_0<const NT: usize>(
            n: usize,
            w: *const u8,
            a: *const u8,
            act_row: usize,
            out: &mut [f32; NT],
            ahead: Ahead,
        ) {
            let f0 = _mm256_set1_epi8(0xF0u8 as i8);
            // SAFETY: forwarded contract; the unpack reads bytes 2..22 of a 22-byte block.
            unsafe {
                legacy(n, w, a, act_row, out, ahead, 22, |x| {
                    // Where the fifth bit is clear, 0xF0 turns the nibble into nibble - 16.
                    let hi = _mm256_andnot_si256(bits32(x.add(2)), f0);
                    _mm256_or_si256(nibbles32(x.add(6)), hi)
                })
            }
        }
    };
}

/// AVX2 + FMA + F16C.
pub(crate) mod avx2 {
    multi_kernels!("avx2,fma,f16c");

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn madd_acc(acc: __m256i, p: __m256i, s: __m256i) -> __m256i {
        _mm256_add_epi32(acc, _mm256_madd_epi16(p, s))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_us(a: __m256i, b: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
    }
}

/// AVX-512 F/BW/VL/DQ + VNNI, on 256-bit vectors.
pub(crate) mod vnni {
    multi_kernels!("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni");

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
    fn madd_acc(acc: __m256i, p: __m256i, s: __m256i) -> __m256i {
        _mm256_dpwssd_epi32(acc, p, s)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
    fn dot_us(a: __m256i, b: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b)
    }
}
