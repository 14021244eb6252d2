//! Kernels over the interleaved weight layout (`matmul::interleave`) in 256-bit registers with
//! `vpdpbusd`: for CPUs with AVX-VNNI and no AVX-512 (Intel client cores from Alder Lake on,
//! `vex`), and for AVX-512 VNNI CPUs where 256-bit kernels measure faster than 512-bit ones
//! (Zen 4 executes 512-bit instructions in two halves; `evex`, chosen by `tune`). The two
//! modules are one source: the same instruction, VEX- or EVEX-encoded.
//!
//! A tile is two halves of 8 rows, one row per 32-bit lane, as for the AVX2 kernels
//! (`interleaved_avx2`); where those spend `vpmaddubsw`, an i16 add and a `vpmaddwd` on 4
//! columns, one `vpdpbusd` adds the 4 products straight into the row's i32 lane. Each half is
//! computed through the whole tile block before the other (the second pass reads the block
//! from L1), so one half's accumulators for 4 tokens fit the 16 registers AVX-VNNI has.
//!
//! Contract of every `unsafe fn` here: the CPU has the module's features (AVX2, FMA, F16C and
//! AVX-VNNI, or AVX-512 F/BW/VL/DQ and VNNI); the pointers are valid for the bytes the
//! function's docs name.

macro_rules! vnni256_kernels {
    ($m:ident, $features:literal, $dp:ident) => {
        pub(crate) mod $m {
            use std::arch::x86_64::*;

            use super::super::avx2;
            use super::super::interleaved::prefetch_part;
            use super::super::interleaved_avx2::{
                Q8_0_ACT, Q8_1_ACT, Q8K_BLOCK, bcast4, f16_rows, half_order, k4_block_end_f32,
                k4_scales, load, offset_sum, prefetch_ahead, q5_pair, q6k_quads, store,
            };
            use super::super::interleaved_avx2_kq::{bit_to, q3k_scale};
            use crate::matmul::interleave::kq::{
                Q2K_PARTS, Q2K_SUB, Q2K_TILE_BLOCK, Q3K_PARTS, Q3K_SCALES, Q3K_SUB, Q3K_TILE_BLOCK,
                Q5K_PARTS, Q5K_SUB, Q5K_TILE_BLOCK,
            };
            use crate::matmul::interleave::{
                Nibbles, Q4K_TILE_BLOCK, Q5_0_HIGH, Q5_0_TILE_BLOCK, Q6K_TILE_BLOCK,
                Q8_0_TILE_BLOCK, q6k_high, q6k_low, q6k_scales,
            };
            use crate::tune::Ahead;

            /// `acc` plus the 4 products of each 32-bit lane: unsigned bytes of `w` times
            /// signed bytes of `a`.
            #[inline]
            #[target_feature(enable = $features)]
            fn dp(acc: __m256i, w: __m256i, a: __m256i) -> __m256i {
                $dp(acc, w, a)
            }

            /// The 8 bytes of half `h` (rows `8 h..8 h + 8`) of 16 bytes with one byte per row,
            /// in the low 8 bytes.
            #[inline]
            #[target_feature(enable = $features)]
            fn half(v: __m128i, h: usize) -> __m128i {
                if h == 0 { v } else { _mm_unpackhi_epi64(v, v) }
            }

            /// 16 rows × `NT` tokens of a Q4_K tile: `out + t * out_stride` receives the 16
            /// rows' results for token `t`. `ahead` is the software prefetch distance in bytes
            /// (0: none).
            ///
            /// # Safety
            /// See the module docs; `tile` holds `nb` tile blocks, `act + t * act_row` holds
            /// `nb` Q8_K blocks for every `t < NT`, and `out + t * out_stride` is valid for
            /// writing 16 f32.
            #[target_feature(enable = $features)]
            #[allow(
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
                    // SAFETY: block b of the tile and of every token's activations is in
                    // bounds (caller); every offset below stays inside them.
                    unsafe {
                        let x = tile.add(b * Q4K_TILE_BLOCK);
                        let (sc, mn) = k4_scales(x.add(64));
                        let y = act.add(b * Q8K_BLOCK);
                        let mut accb = [[_mm256_setzero_ps(); NT]; 2];
                        for j in 0..2 {
                            for k in 0..8 {
                                let (h, s) = half_order::<NT>(j, k, 8);
                                if h == 0 {
                                    prefetch_part::<NT>(x, Q4K_TILE_BLOCK, ahead, s, 8);
                                }
                                let g0 = x.add(256 + 256 * s + 32 * h);
                                let scf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(half(sc[s], h)));
                                let mut dot = [_mm256_setzero_si256(); NT];
                                for g in 0..4 {
                                    let v = load(g0.add(64 * g));
                                    let lo = _mm256_and_si256(v, m4);
                                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
                                    for t in 0..NT {
                                        let a = y.add(t * act_row + 4 + 32 * s + 8 * g);
                                        dot[t] = dp(dot[t], lo, bcast4(a));
                                        dot[t] = dp(dot[t], hi, bcast4(a.add(4)));
                                    }
                                }
                                for t in 0..NT {
                                    accb[h][t] = _mm256_fmadd_ps(
                                        _mm256_cvtepi32_ps(dot[t]),
                                        scf,
                                        accb[h][t],
                                    );
                                }
                            }
                        }
                        // acc += d · dy · Σ scale · dot - dmin · dy · Σ min · bsum.
                        k4_block_end_f32(x, y, act_row, &mn, &accb, &mut acc);
                    }
                }
                // SAFETY: forwarded (caller).
                unsafe { store(&acc[0], &acc[1], out, out_stride) };
            }

            /// As [`q4k`], for a Q5_K tile: each quad's fifth bits moved in beside its nibble.
            ///
            /// # Safety
            /// As [`q4k`], with Q5_K tile blocks.
            #[target_feature(enable = $features)]
            #[allow(
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
                    // SAFETY: block b of the tile and of every token's activations is in
                    // bounds (caller); every offset below stays inside them.
                    unsafe {
                        let x = tile.add(b * Q5K_TILE_BLOCK);
                        let (sc, mn) = k4_scales(x.add(64));
                        let y = act.add(b * Q8K_BLOCK);
                        let mut accb = [[_mm256_setzero_ps(); NT]; 2];
                        for h in 0..2 {
                            for s in 0..8 {
                                if h == 0 {
                                    prefetch_part::<NT>(x, Q5K_TILE_BLOCK, ahead, s, 8);
                                }
                                let part = x.add(Q5K_PARTS + Q5K_SUB * s);
                                let hb = load(part.add(32 * h));
                                let scf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(half(sc[s], h)));
                                let mut dot = [_mm256_setzero_si256(); NT];
                                for g in 0..4 {
                                    let v = load(part.add(64 + 64 * g + 32 * h));
                                    // Column quads 2g and 2g + 1 have their 5th bits at bits
                                    // 2g and 2g + 1.
                                    let gi = g as i32;
                                    let lo = _mm256_or_si256(
                                        _mm256_and_si256(v, m4),
                                        _mm256_and_si256(bit_to(hb, 2 * gi, 4), m16),
                                    );
                                    let hi = _mm256_or_si256(
                                        _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4),
                                        _mm256_and_si256(bit_to(hb, 2 * gi + 1, 4), m16),
                                    );
                                    for t in 0..NT {
                                        let a = y.add(t * act_row + 4 + 32 * s + 8 * g);
                                        dot[t] = dp(dot[t], lo, bcast4(a));
                                        dot[t] = dp(dot[t], hi, bcast4(a.add(4)));
                                    }
                                }
                                for t in 0..NT {
                                    accb[h][t] = _mm256_fmadd_ps(
                                        _mm256_cvtepi32_ps(dot[t]),
                                        scf,
                                        accb[h][t],
                                    );
                                }
                            }
                        }
                        k4_block_end_f32(x, y, act_row, &mn, &accb, &mut acc);
                    }
                }
                // SAFETY: forwarded (caller).
                unsafe { store(&acc[0], &acc[1], out, out_stride) };
            }

            /// As [`q4k`], for a Q3_K tile. The quants are made unsigned (plus 4); the offset
            /// comes out per 16-column sub-block as `4 · scale · bsum`.
            ///
            /// # Safety
            /// As [`q4k`], with Q3_K tile blocks.
            #[target_feature(enable = $features)]
            #[allow(
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
                    // SAFETY: block b of the tile and of every token's activations is in
                    // bounds (caller); every offset below stays inside them.
                    unsafe {
                        let x = tile.add(b * Q3K_TILE_BLOCK);
                        let y = act.add(b * Q8K_BLOCK);
                        for h in 0..2 {
                            let mut accb = [_mm256_setzero_ps(); NT];
                            let mut corr = [_mm256_setzero_si256(); NT];
                            for p in 0..8 {
                                if h == 0 {
                                    prefetch_part::<NT>(x, Q3K_TILE_BLOCK, ahead, p, 8);
                                }
                                let part = x.add(Q3K_PARTS + Q3K_SUB * p);
                                let sc = [
                                    q3k_scale(x.add(Q3K_SCALES), 2 * p),
                                    q3k_scale(x.add(Q3K_SCALES), 2 * p + 1),
                                ];
                                let hb = load(part.add(32 * h));
                                for sb in 0..2 {
                                    let lb = load(part.add(64 + 64 * sb + 32 * h));
                                    let scf =
                                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(half(sc[sb], h)));
                                    // Column quad i: its 2 bits at 2i of `lb`, its hmask bit
                                    // at 4 sb + i of `hb`; the weight is the quant plus 4.
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
                                        let mut dot = _mm256_setzero_si256();
                                        for (i, wi) in w.iter().enumerate() {
                                            dot = dp(dot, *wi, bcast4(a.add(4 * i)));
                                        }
                                        accb[t] =
                                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scf, accb[t]);
                                    }
                                }
                                // Σ_s scale_s · bsum_s over sub-blocks 2p and 2p + 1.
                                let pairs = if h == 0 {
                                    _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(sc[0], sc[1]))
                                } else {
                                    _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(sc[0], sc[1]))
                                };
                                for t in 0..NT {
                                    let bs = y.add(t * act_row + 260 + 4 * p);
                                    let bs = _mm256_set1_epi32(bs.cast::<i32>().read_unaligned());
                                    corr[t] =
                                        _mm256_add_epi32(corr[t], _mm256_madd_epi16(pairs, bs));
                                }
                            }
                            let d = f16_rows(x.add(16 * h));
                            for t in 0..NT {
                                let dy = _mm256_set1_ps(
                                    y.add(t * act_row).cast::<f32>().read_unaligned(),
                                );
                                let total = _mm256_sub_ps(
                                    accb[t],
                                    _mm256_cvtepi32_ps(_mm256_slli_epi32::<2>(corr[t])),
                                );
                                acc[h][t] = _mm256_fmadd_ps(total, _mm256_mul_ps(d, dy), acc[h][t]);
                            }
                        }
                    }
                }
                // SAFETY: forwarded (caller).
                unsafe { store(&acc[0], &acc[1], out, out_stride) };
            }

            /// As [`q4k`], for a Q2_K tile: 4-bit scales and mins per 16-column sub-block, the
            /// mins out of Q8_K's block sums.
            ///
            /// # Safety
            /// As [`q4k`], with Q2_K tile blocks.
            #[target_feature(enable = $features)]
            #[allow(
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
                    // SAFETY: block b of the tile and of every token's activations is in
                    // bounds (caller); every offset below stays inside them.
                    unsafe {
                        let x = tile.add(b * Q2K_TILE_BLOCK);
                        let y = act.add(b * Q8K_BLOCK);
                        for h in 0..2 {
                            let mut accb = [_mm256_setzero_ps(); NT];
                            let mut corr = [_mm256_setzero_si256(); NT];
                            let mut prev = _mm_setzero_si128();
                            for s in 0..16 {
                                if h == 0 {
                                    prefetch_part::<NT>(x, Q2K_TILE_BLOCK, ahead, s, 16);
                                }
                                let part = x.add(Q2K_PARTS + Q2K_SUB * s);
                                let sm = _mm_loadu_si128(part.cast());
                                let sc = _mm_and_si128(sm, m15);
                                let scf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(half(sc, h)));
                                let lb = load(part.add(16 + 32 * h));
                                let w = [
                                    _mm256_and_si256(lb, m3),
                                    _mm256_and_si256(_mm256_srli_epi16::<2>(lb), m3),
                                    _mm256_and_si256(_mm256_srli_epi16::<4>(lb), m3),
                                    _mm256_and_si256(_mm256_srli_epi16::<6>(lb), m3),
                                ];
                                for t in 0..NT {
                                    let a = y.add(t * act_row + 4 + 16 * s);
                                    let mut dot = _mm256_setzero_si256();
                                    for (i, wi) in w.iter().enumerate() {
                                        dot = dp(dot, *wi, bcast4(a.add(4 * i)));
                                    }
                                    accb[t] =
                                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scf, accb[t]);
                                }
                                if s % 2 == 1 {
                                    // Σ_s min_s · bsum_s over sub-blocks s - 1 and s.
                                    let m0 = _mm_and_si128(_mm_srli_epi16::<4>(prev), m15);
                                    let m1 = _mm_and_si128(_mm_srli_epi16::<4>(sm), m15);
                                    let pairs = if h == 0 {
                                        _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m0, m1))
                                    } else {
                                        _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(m0, m1))
                                    };
                                    for t in 0..NT {
                                        let bs = y.add(t * act_row + 260 + 2 * (s - 1));
                                        let bs =
                                            _mm256_set1_epi32(bs.cast::<i32>().read_unaligned());
                                        corr[t] =
                                            _mm256_add_epi32(corr[t], _mm256_madd_epi16(pairs, bs));
                                    }
                                }
                                prev = sm;
                            }
                            let d = f16_rows(x.add(16 * h));
                            let dmin = f16_rows(x.add(32 + 16 * h));
                            for t in 0..NT {
                                let dy = _mm256_set1_ps(
                                    y.add(t * act_row).cast::<f32>().read_unaligned(),
                                );
                                let a = _mm256_fmadd_ps(accb[t], _mm256_mul_ps(d, dy), acc[h][t]);
                                acc[h][t] = _mm256_fnmadd_ps(
                                    _mm256_cvtepi32_ps(corr[t]),
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

            /// As [`q4k`], for a Q6_K tile. The quants' `- 32` starts each 16-column
            /// sub-block's sum at `-32 · bsum` (Q8_K's block sums are those 16-column sums).
            ///
            /// # Safety
            /// As [`q4k`], with Q6_K tile blocks.
            #[target_feature(enable = $features)]
            #[allow(
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
                    // SAFETY: block b of the tile and of every token's activations is in
                    // bounds (caller); every offset below stays inside them.
                    unsafe {
                        let x = tile.add(b * Q6K_TILE_BLOCK);
                        let y = act.add(b * Q8K_BLOCK);
                        let mut accb = [[_mm256_setzero_ps(); NT]; 2];
                        for j in 0..2 {
                            for k in 0..16 {
                                let (h, s) = half_order::<NT>(j, k, 16);
                                if h == 0 {
                                    prefetch_part::<NT>(x, Q6K_TILE_BLOCK, ahead, s, 16);
                                }
                                let sc = _mm_loadu_si128(x.add(q6k_scales(s)).cast());
                                let scf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(half(sc, h)));
                                let w0 = load(x.add(q6k_low(s) + 32 * h));
                                let w1 = load(x.add(q6k_low(s) + 64 + 32 * h));
                                let hb = load(x.add(q6k_high(s) + 32 * h));
                                let q = q6k_quads(w0, w1, hb);
                                for t in 0..NT {
                                    let yt = y.add(t * act_row);
                                    let a = yt.add(4 + 16 * s);
                                    let bsum = i32::from(
                                        yt.add(260 + 2 * s).cast::<i16>().read_unaligned(),
                                    );
                                    let mut dot = _mm256_set1_epi32(-32 * bsum);
                                    for (i, qi) in q.iter().enumerate() {
                                        dot = dp(dot, *qi, bcast4(a.add(4 * i)));
                                    }
                                    accb[h][t] =
                                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scf, accb[h][t]);
                                }
                            }
                        }
                        for h in 0..2 {
                            let d = f16_rows(x.add(16 * h));
                            for t in 0..NT {
                                let dy = _mm256_set1_ps(
                                    y.add(t * act_row).cast::<f32>().read_unaligned(),
                                );
                                acc[h][t] =
                                    _mm256_fmadd_ps(accb[h][t], _mm256_mul_ps(d, dy), acc[h][t]);
                            }
                        }
                    }
                }
                // SAFETY: forwarded (caller).
                unsafe { store(&acc[0], &acc[1], out, out_stride) };
            }

            /// As [`q4k`], for a Q8_0 (`Q5 = false`) or Q5_0 (`Q5 = true`) tile against Q8_0
            /// activations. The weights are stored unsigned with an offset (Q8_0 + 128, Q5_0
            /// + 16), which comes out as `offset · Σ a` per block.
            ///
            /// # Safety
            /// As [`q4k`], with Q8_0 / Q5_0 tile blocks and Q8_0 activation blocks.
            #[target_feature(enable = $features)]
            #[allow(
                clippy::needless_range_loop,
                reason = "half and token indices address several register arrays in step"
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
                let mut acc = [[_mm256_setzero_ps(); NT]; 2];
                for b in 0..nb {
                    prefetch_ahead(tile, b, block, ahead);
                    // SAFETY: block b of the tile and of every token's activations is in
                    // bounds (caller); every offset below stays inside them.
                    unsafe {
                        let x = tile.add(b * block);
                        // The offset times Σ a, per token, subtracted up front.
                        let mut start = [_mm256_setzero_si256(); NT];
                        for t in 0..NT {
                            let a = act.add(t * act_row + b * Q8_0_ACT + 2);
                            let off = if Q5 {
                                offset_sum::<4>(a)
                            } else {
                                offset_sum::<7>(a)
                            };
                            start[t] = _mm256_sub_epi32(_mm256_setzero_si256(), off);
                        }
                        for h in 0..2 {
                            let d = f16_rows(x.add(16 * h));
                            // w[i]: columns 4i..4i + 4 of the half's 8 rows, unsigned.
                            let mut w = [_mm256_setzero_si256(); 8];
                            if Q5 {
                                let hb = load(x.add(Q5_0_HIGH + 32 * h));
                                for g in 0..4 {
                                    let v = load(x.add(32 + 64 * g + 32 * h));
                                    let (wl, wh) = q5_pair(v, hb, g);
                                    w[2 * g] = wl;
                                    w[2 * g + 1] = wh;
                                }
                            } else {
                                for (i, wi) in w.iter_mut().enumerate() {
                                    *wi = load(x.add(32 + 64 * i + 32 * h));
                                }
                            }
                            for t in 0..NT {
                                let yt = act.add(t * act_row + b * Q8_0_ACT);
                                let mut isum = start[t];
                                for (i, wi) in w.iter().enumerate() {
                                    isum = dp(isum, *wi, bcast4(yt.add(2 + 4 * i)));
                                }
                                let dy = avx2::f16x8(yt);
                                acc[h][t] = _mm256_fmadd_ps(
                                    _mm256_cvtepi32_ps(isum),
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
            /// As [`q4k`], for a tile of a legacy 4- or 5-bit type `L` (Q4_0, Q4_1, Q5_1)
            /// against Q8_0 activations (no min) or Q8_1 (with), as the AVX2 `nibbles`: Q4_0's
            /// `- 8` comes out as `8 · Σ a` per block, Q4_1's and Q5_1's min as `m · s`.
            ///
            /// # Safety
            /// As [`q4k`], with `L`'s tile blocks and Q8_0 / Q8_1 activation blocks.
            #[target_feature(enable = $features)]
            #[allow(
                clippy::needless_range_loop,
                reason = "half and token indices address several register arrays in step"
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
                let mut acc = [[_mm256_setzero_ps(); NT]; 2];
                for b in 0..nb {
                    prefetch_ahead(tile, b, L::TILE_BLOCK, ahead);
                    // SAFETY: block b of the tile and of every token's activations is in
                    // bounds (caller); every offset below stays inside them.
                    unsafe {
                        let x = tile.add(b * L::TILE_BLOCK);
                        let y = act.add(b * act_block);
                        // The types without a min: their offset times Σ a, subtracted up front.
                        let mut start = [_mm256_setzero_si256(); NT];
                        if !L::MIN {
                            for t in 0..NT {
                                let a = y.add(t * act_row + aq);
                                let off = if L::HIGH.is_some() {
                                    offset_sum::<4>(a)
                                } else {
                                    offset_sum::<3>(a)
                                };
                                start[t] = _mm256_sub_epi32(_mm256_setzero_si256(), off);
                            }
                        }
                        for h in 0..2 {
                            let mut isum = start;
                            let hb = L::HIGH.map(|high| load(x.add(high + 32 * h)));
                            for g in 0..4 {
                                let v = load(x.add(L::QUANTS + 64 * g + 32 * h));
                                let (lo, hi) = match hb {
                                    Some(hb) => q5_pair(v, hb, g),
                                    None => (
                                        _mm256_and_si256(v, m4),
                                        _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4),
                                    ),
                                };
                                for t in 0..NT {
                                    let a = y.add(t * act_row + aq + 8 * g);
                                    isum[t] = dp(isum[t], lo, bcast4(a));
                                    isum[t] = dp(isum[t], hi, bcast4(a.add(4)));
                                }
                            }
                            let d = f16_rows(x.add(16 * h));
                            for t in 0..NT {
                                let yt = y.add(t * act_row);
                                let dy = avx2::f16x8(yt);
                                let a = _mm256_fmadd_ps(
                                    _mm256_cvtepi32_ps(isum[t]),
                                    _mm256_mul_ps(d, dy),
                                    acc[h][t],
                                );
                                acc[h][t] = if L::MIN {
                                    let m = f16_rows(x.add(32 + 16 * h));
                                    _mm256_fmadd_ps(m, avx2::f16x8(yt.add(2)), a)
                                } else {
                                    a
                                };
                            }
                        }
                    }
                }
                // SAFETY: forwarded (caller).
                unsafe { store(&acc[0], &acc[1], out, out_stride) };
            }
        }
    };
}

vnni256_kernels!(vex, "avx2,fma,f16c,avxvnni", _mm256_dpbusd_avx_epi32);
vnni256_kernels!(
    evex,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni",
    _mm256_dpbusd_epi32
);
