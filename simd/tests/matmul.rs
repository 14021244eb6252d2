//! matmul against references: every SIMD level this CPU has against the scalar level, and the
//! scalar level against dequantize-then-f32-dot (the activation quantization error bound per
//! type, as llama.cpp's test-quantize-fns checks it).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use strata_simd::dispatch::{self, Level};
use strata_simd::matmul::{
    Layout, MatRef, MatmulScratch, SimdError, deinterleave, interleave, interleave_always, matmul,
    matmul_at, matmul_tuned, supports,
};
use strata_simd::pool::ThreadPool;
use strata_simd::tune::{Decode, Tuning};
use strata_storage::quant::{GgmlType, dequantize_row, quantize_row};

const TYPES: [GgmlType; 13] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Bf16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2K,
    GgmlType::Q3K,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

fn random_f32(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

/// Weights from the reference quantizer applied to random floats.
fn quantized_weights(rng: &mut StdRng, ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let rb = ty.row_bytes(cols);
    let mut data = vec![0u8; rows * rb];
    for r in 0..rows {
        let src = random_f32(rng, cols);
        quantize_row(ty, &src, &mut data[r * rb..(r + 1) * rb]).expect("quantize_row");
    }
    data
}

/// Byte offsets of the f16 scales in a block, which random bytes must not make inf/NaN.
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q2K => &[80, 82],
        GgmlType::Q3K => &[108],
        GgmlType::Q6K => &[208],
        _ => &[],
    }
}

/// Random bytes with sane f16 scales: reaches bit patterns a quantizer never emits.
fn random_weights(rng: &mut StdRng, ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    if matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16) {
        return quantized_weights(rng, ty, rows, cols);
    }
    let mut data: Vec<u8> = (0..rows * ty.row_bytes(cols))
        .map(|_| rng.r#gen())
        .collect();
    for block in data.chunks_exact_mut(ty.type_size()) {
        for &off in f16_fields(ty) {
            let v = half::f16::from_f32(rng.gen_range(0.001f32..0.02));
            block[off..off + 2].copy_from_slice(&v.to_bits().to_le_bytes());
        }
    }
    data
}

fn run(
    level: Level,
    pool: &ThreadPool,
    w: MatRef<'_>,
    x: &[f32],
    n_tok: usize,
    scratch: &mut MatmulScratch,
) -> Vec<f32> {
    let mut out = vec![f32::NAN; n_tok * w.rows];
    matmul_at(level, pool, w, x, n_tok, &mut out, scratch).expect("matmul");
    out
}

/// Normalised mean squared error of `got` against `want`.
fn nmse(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(g, w)| ((g - w) as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|w| (*w as f64).powi(2)).sum();
    num / den.max(1e-30)
}

fn shapes(ty: GgmlType) -> Vec<(usize, usize)> {
    let bs = ty.block_size().max(32);
    let k = if bs == 256 { 256 } else { 32 };
    // Rows that are not multiples of the row tile or of the thread count; columns of one
    // block, a few blocks, and an odd count.
    vec![(1, k), (7, 2 * k), (33, 3 * k), (67, 256 * 3), (130, 512)]
}

#[test]
fn every_level_matches_scalar() {
    let pools = [ThreadPool::new(1), ThreadPool::new(3)];
    let mut scratch = MatmulScratch::new();
    let mut rng = StdRng::seed_from_u64(7);
    let levels: Vec<Level> = Level::ALL
        .into_iter()
        .filter(|&l| l > Level::Scalar && dispatch::available(l))
        .collect();
    eprintln!("levels under test: {levels:?}");
    for ty in TYPES {
        for (rows, cols) in shapes(ty) {
            // 1 is the decode path; 2..=5 and 7 cover every remainder of the multi-token
            // kernels' groups of four; 8, 13 and 17 reach the tiled GEMM (groups of eight).
            for n_tok in [1, 2, 3, 4, 5, 7, 8, 13, 17] {
                for random_bytes in [false, true] {
                    let data = if random_bytes {
                        random_weights(&mut rng, ty, rows, cols)
                    } else {
                        quantized_weights(&mut rng, ty, rows, cols)
                    };
                    let w = MatRef {
                        ty,
                        data: &data,
                        rows,
                        cols,
                        layout: Layout::Rows,
                    };
                    let x = random_f32(&mut rng, n_tok * cols);
                    let want = run(Level::Scalar, &pools[0], w, &x, n_tok, &mut scratch);
                    for &level in &levels {
                        for pool in &pools {
                            let got = run(level, pool, w, &x, n_tok, &mut scratch);
                            let e = nmse(&got, &want);
                            // Not 0: the x86 Q8_0/Q8_1 quantizers round ties to even (as
                            // ggml's x86 path does), the scalar one away from zero (ggml's
                            // reference), so an activation exactly at a tie moves one step:
                            // seen up to 1.3e-6 (Q5_1, whose Q8_1 sum moves too); a wrong
                            // kernel (scale, block or lane mix-up) is >1e-3.
                            assert!(
                                e < 5e-6,
                                "{ty} {level:?} {rows}x{cols} n_tok={n_tok} threads={} \
                                 random_bytes={random_bytes}: nmse {e:e}",
                                pool.n_threads()
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Interleaved matrices (where this CPU has the kernels) give what the scalar kernels give on
/// the row-major bytes, for every token count and with tail rows past the last tile.
#[test]
fn interleaved_layout_matches_scalar_rows() {
    let pools = [ThreadPool::new(1), ThreadPool::new(3)];
    let mut scratch = MatmulScratch::new();
    let mut rng = StdRng::seed_from_u64(23);
    let mut tested = 0;
    // Every interleaved kernel family this CPU has: AVX2's, AVX-VNNI's, and at AVX-512 VNNI
    // the 512-bit ones (the level's default) and the 256-bit EVEX ones (`tune`'s narrow
    // choice).
    let candidates: Vec<(Level, Tuning)> = [
        (Level::Avx2, Decode::Interleaved256),
        (Level::AvxVnni, Decode::Interleaved256),
        (Level::Avx512Vnni, Decode::Interleaved512),
        (Level::Avx512Vnni, Decode::Interleaved256),
    ]
    .into_iter()
    .filter(|&(l, _)| dispatch::available(l))
    .map(|(l, d)| (l, Tuning::default_for(l).with_decode(d)))
    .collect();
    eprintln!("interleaved kernels under test: {candidates:?}");
    for ty in TYPES {
        for (rows, cols) in [
            (16, 256),
            (33, 768),
            (130, 512),
            (64, 2560),
            (256, 1536),
            (64, 8960),
        ] {
            for random_bytes in [false, true] {
                let data = if random_bytes {
                    random_weights(&mut rng, ty, rows, cols)
                } else {
                    quantized_weights(&mut rng, ty, rows, cols)
                };
                let mut il = data.clone();
                if !interleave_always(ty, &mut il, rows, cols).expect("interleave") {
                    continue;
                }
                let mut back = il.clone();
                deinterleave(ty, &mut back, rows, cols).expect("deinterleave");
                assert_eq!(back, data, "{ty}: deinterleave is not the inverse");
                tested += 1;
                let rows_w = MatRef {
                    ty,
                    data: &data,
                    rows,
                    cols,
                    layout: Layout::Rows,
                };
                let il_w = MatRef {
                    data: &il,
                    layout: Layout::Interleaved,
                    ..rows_w
                };
                for n_tok in [1, 2, 3, 4, 5, 9, 11, 17, 19] {
                    let x = random_f32(&mut rng, n_tok * cols);
                    let want = run(Level::Scalar, &pools[0], rows_w, &x, n_tok, &mut scratch);
                    for &(level, tuning) in &candidates {
                        for pool in &pools {
                            let mut got = vec![f32::NAN; n_tok * rows];
                            matmul_tuned(
                                level,
                                tuning,
                                pool,
                                il_w,
                                &x,
                                n_tok,
                                &mut got,
                                &mut scratch,
                            )
                            .expect("matmul");
                            let e = nmse(&got, &want);
                            let width = tuning.decode(ty).name();
                            assert!(
                                e < 5e-6,
                                "{ty} interleaved {rows}x{cols} n_tok={n_tok} {level:?} \
                                 {width} threads={} random_bytes={random_bytes}: nmse {e:e}",
                                pool.n_threads()
                            );
                        }
                    }
                }
                // A lower level has no kernel for this layout: an error, not wrong numbers.
                let x = random_f32(&mut rng, cols);
                let mut out = vec![0f32; rows];
                assert!(matches!(
                    matmul_at(
                        Level::Scalar,
                        &pools[0],
                        il_w,
                        &x,
                        1,
                        &mut out,
                        &mut scratch
                    ),
                    Err(SimdError::NoInterleavedKernel { .. })
                ));
            }
        }
    }
    eprintln!("interleaved cases tested: {tested} (0: this CPU has no kernel for the layout)");
}

/// AVX2's and AVX-VNNI's tiled GEMMs (interleaved Q4_K and Q6_K, from 16 tokens) do their
/// level's interleaved kernels' arithmetic step for step: a token gets the same bits in a
/// batch as alone, so a prompt's logits do not depend on whether its batch reached the GEMM.
#[test]
fn avx2_gemm_equals_its_interleaved_kernels_exactly() {
    let levels: Vec<Level> = [Level::Avx2, Level::AvxVnni]
        .into_iter()
        .filter(|&l| dispatch::available(l))
        .collect();
    eprintln!("levels under test: {levels:?}");
    let pools = [ThreadPool::new(1), ThreadPool::new(2)];
    let mut scratch = MatmulScratch::new();
    let mut rng = StdRng::seed_from_u64(31);
    let shapes = [(16, 256), (48, 1536), (33, 2560)];
    for (ty, (rows, cols)) in [GgmlType::Q4K, GgmlType::Q6K]
        .into_iter()
        .flat_map(|ty| shapes.map(|s| (ty, s)))
    {
        for random_bytes in [false, true] {
            let data = if random_bytes {
                random_weights(&mut rng, ty, rows, cols)
            } else {
                quantized_weights(&mut rng, ty, rows, cols)
            };
            let mut il = data.clone();
            assert!(interleave_always(ty, &mut il, rows, cols).expect("interleave"));
            let w = MatRef {
                ty,
                data: &il,
                rows,
                cols,
                layout: Layout::Interleaved,
            };
            for (&level, pool) in levels
                .iter()
                .flat_map(|l| pools.iter().map(move |p| (l, p)))
            {
                let tuning = Tuning::default_for(level).with_decode(Decode::Interleaved256);
                for n_tok in [16, 17, 19, 22] {
                    let x = random_f32(&mut rng, n_tok * cols);
                    let mut batched = vec![f32::NAN; n_tok * rows];
                    matmul_tuned(
                        level,
                        tuning,
                        pool,
                        w,
                        &x,
                        n_tok,
                        &mut batched,
                        &mut scratch,
                    )
                    .expect("matmul");
                    for t in 0..n_tok {
                        let mut one = vec![f32::NAN; rows];
                        let x1 = &x[t * cols..(t + 1) * cols];
                        matmul_tuned(level, tuning, pool, w, x1, 1, &mut one, &mut scratch)
                            .expect("matmul");
                        let got = &batched[t * rows..(t + 1) * rows];
                        for (r, (g, o)) in got.iter().zip(&one).enumerate() {
                            assert!(
                                g.to_bits() == o.to_bits(),
                                "{ty} {level:?} {rows}x{cols} n_tok={n_tok} threads={} \
                                 random_bytes={random_bytes} token {t} row {r}: batched {g} vs \
                                 alone {o}",
                                pool.n_threads()
                            );
                        }
                    }
                }
            }
        }
    }
}

/// The error the activation quantization may add, per weight type: squared error against an
/// f32 dot of the dequantized weights, over the sum of squared products. Uniform rounding to
/// 8 bits predicts about 1.5e-5.
fn reference_bound(ty: GgmlType) -> f64 {
    match ty {
        GgmlType::F32 => 1e-10,
        GgmlType::F16 => 1e-6,
        GgmlType::Bf16 => 2e-5,
        _ => 3e-4,
    }
}

#[test]
fn scalar_matches_dequantized_reference() {
    let pool = ThreadPool::new(2);
    let mut scratch = MatmulScratch::new();
    let mut rng = StdRng::seed_from_u64(11);
    for ty in TYPES {
        let mut worst = 0.0f64;
        for (rows, cols) in shapes(ty) {
            for n_tok in [1, 3, 17] {
                let data = quantized_weights(&mut rng, ty, rows, cols);
                let w = MatRef {
                    ty,
                    data: &data,
                    rows,
                    cols,
                    layout: Layout::Rows,
                };
                let x = random_f32(&mut rng, n_tok * cols);
                let got = run(Level::Scalar, &pool, w, &x, n_tok, &mut scratch);
                let rb = ty.row_bytes(cols);
                let mut deq = vec![0f32; cols];
                let mut want = vec![0f32; n_tok * rows];
                // Σ (w·x)² over every product: the error scale when nothing cancels, so a dot
                // that happens to be near zero does not inflate the relative error.
                let mut scale = 0f64;
                for r in 0..rows {
                    dequantize_row(ty, &data[r * rb..(r + 1) * rb], &mut deq).expect("dequantize");
                    for t in 0..n_tok {
                        let xt = &x[t * cols..(t + 1) * cols];
                        want[t * rows + r] = deq
                            .iter()
                            .zip(xt)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>() as f32;
                        scale += deq
                            .iter()
                            .zip(xt)
                            .map(|(a, b)| (*a as f64 * *b as f64).powi(2))
                            .sum::<f64>();
                    }
                }
                let e = got
                    .iter()
                    .zip(&want)
                    .map(|(g, w)| ((g - w) as f64).powi(2))
                    .sum::<f64>()
                    / scale.max(1e-30);
                worst = worst.max(e);
                assert!(
                    e < reference_bound(ty),
                    "{ty} {rows}x{cols} n_tok={n_tok}: nmse {e:e} > {:e}",
                    reference_bound(ty)
                );
            }
        }
        eprintln!("{ty}: worst nmse vs dequantized f32 reference {worst:.3e}");
    }
}

#[test]
fn public_entry_uses_the_process_level() {
    let pool = ThreadPool::new(2);
    let mut scratch = MatmulScratch::new();
    let mut rng = StdRng::seed_from_u64(3);
    let (rows, cols, n_tok) = (40, 512, 5);
    let data = quantized_weights(&mut rng, GgmlType::Q4K, rows, cols);
    let w = MatRef {
        ty: GgmlType::Q4K,
        data: &data,
        rows,
        cols,
        layout: Layout::Rows,
    };
    let x = random_f32(&mut rng, n_tok * cols);
    let mut out = vec![0f32; n_tok * rows];
    matmul(&pool, w, &x, n_tok, &mut out, &mut scratch).expect("matmul");
    let want = run(dispatch::level(), &pool, w, &x, n_tok, &mut scratch);
    assert_eq!(out, want);
}

#[test]
fn bad_shapes_are_errors() {
    let pool = ThreadPool::new(2);
    let mut s = MatmulScratch::new();
    let data = vec![0u8; 4 * GgmlType::Q4K.row_bytes(256)];
    let x = vec![0f32; 256];
    let mut out = vec![0f32; 4];
    let w = MatRef {
        ty: GgmlType::Q4K,
        data: &data,
        rows: 4,
        cols: 256,
        layout: Layout::Rows,
    };
    assert!(matmul(&pool, w, &x, 1, &mut out, &mut s).is_ok());

    let short = MatRef {
        data: &data[..data.len() - 1],
        ..w
    };
    assert!(matches!(
        matmul(&pool, short, &x, 1, &mut out, &mut s),
        Err(SimdError::Shape { .. })
    ));
    let odd_cols = MatRef { cols: 100, ..w };
    assert!(matches!(
        matmul(&pool, odd_cols, &x[..100], 1, &mut out, &mut s),
        Err(SimdError::Shape { .. })
    ));
    assert!(matches!(
        matmul(&pool, w, &x[..255], 1, &mut out, &mut s),
        Err(SimdError::Shape { .. })
    ));
    assert!(matches!(
        matmul(&pool, w, &x, 2, &mut out, &mut s),
        Err(SimdError::Shape { .. })
    ));
    assert!(matches!(
        matmul(&pool, w, &x, 1, &mut out[..3], &mut s),
        Err(SimdError::Shape { .. })
    ));
    let huge = MatRef {
        rows: usize::MAX / 2,
        ..w
    };
    assert!(matches!(
        matmul(&pool, huge, &x, 1, &mut out, &mut s),
        Err(SimdError::Shape { .. })
    ));
    let q8k = MatRef {
        ty: GgmlType::Q8K,
        data: &data,
        rows: 1,
        cols: 256,
        layout: Layout::Rows,
    };
    assert!(matches!(
        matmul(&pool, q8k, &x, 1, &mut out[..1], &mut s),
        Err(SimdError::UnsupportedType { .. })
    ));
    assert!(!supports(GgmlType::Iq2Xxs));
    for ty in TYPES {
        assert!(supports(ty), "{ty}");
    }
    // Empty shapes are fine and touch nothing.
    let empty = MatRef {
        rows: 0,
        data: &[],
        ..w
    };
    assert!(matmul(&pool, empty, &x, 1, &mut [], &mut s).is_ok());
    assert!(matmul(&pool, w, &[], 0, &mut [], &mut s).is_ok());
}

/// Prefill runs the multi-token kernels and decode the single-token ones; both must give each
/// token the same outputs, or a prompt's logits would depend on how it was batched.
#[test]
fn batched_tokens_equal_one_at_a_time() {
    let pool = ThreadPool::new(2);
    let mut scratch = MatmulScratch::new();
    let mut rng = StdRng::seed_from_u64(23);
    for ty in TYPES {
        for (rows, cols) in [(37, ty.block_size().max(32) * 3), (130, 512)] {
            let data = random_weights(&mut rng, ty, rows, cols);
            let w = MatRef {
                ty,
                data: &data,
                rows,
                cols,
                layout: Layout::Rows,
            };
            for level in Level::ALL.into_iter().filter(|&l| dispatch::available(l)) {
                for n_tok in [2, 4, 7, 17] {
                    let x = random_f32(&mut rng, n_tok * cols);
                    let batched = run(level, &pool, w, &x, n_tok, &mut scratch);
                    for t in 0..n_tok {
                        let one = run(
                            level,
                            &pool,
                            w,
                            &x[t * cols..(t + 1) * cols],
                            1,
                            &mut scratch,
                        );
                        // Kernels may split the exact integer block sums over different lanes
                        // before scaling them in f32, so allow rounding relative to the outputs'
                        // size, not to one output (which may be a near-cancelling sum).
                        let rms = (one.iter().map(|v| v * v).sum::<f32>() / rows as f32).sqrt();
                        let got = &batched[t * rows..(t + 1) * rows];
                        for (r, (g, o)) in got.iter().zip(&one).enumerate() {
                            assert!(
                                (g - o).abs() <= 1e-5 * rms.max(1e-3),
                                "{ty} {level:?} n_tok={n_tok} token {t} row {r}: batched {g} vs \
                             alone {o}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Every token gets the same bits whether it comes alone (decode) or in a batch (prefill, a
/// speculative check), in both layouts: a cached prompt's last token, evaluated alone, must
/// give the logits the whole prompt did (the daemon's prompt cache relies on it). The tiled
/// GEMM (from 16 tokens) of AVX-512 VNNI is outside this promise; those below it keep it
/// (`avx2_gemm_equals_its_interleaved_kernels_exactly`).
#[test]
fn batched_tokens_equal_one_at_a_time_exactly() {
    let pools = [ThreadPool::new(1), ThreadPool::new(2)];
    let mut scratch = MatmulScratch::new();
    let mut rng = StdRng::seed_from_u64(29);
    for ty in TYPES {
        for (rows, cols) in [(16, 256), (130, 512), (256, 1536)] {
            let data = quantized_weights(&mut rng, ty, rows, cols);
            let mut il = data.clone();
            let interleaved = interleave(ty, &mut il, rows, cols).expect("interleave");
            let layouts = [(Layout::Rows, &data), (Layout::Interleaved, &il)];
            for (layout, bytes) in layouts.into_iter().take(1 + interleaved as usize) {
                let w = MatRef {
                    ty,
                    data: bytes,
                    rows,
                    cols,
                    layout,
                };
                for pool in &pools {
                    for n_tok in [2, 3, 4, 5, 7, 15] {
                        let x = random_f32(&mut rng, n_tok * cols);
                        let level = dispatch::level();
                        let batched = run(level, pool, w, &x, n_tok, &mut scratch);
                        for t in 0..n_tok {
                            let x1 = &x[t * cols..(t + 1) * cols];
                            let one = run(level, pool, w, x1, 1, &mut scratch);
                            let got = &batched[t * rows..(t + 1) * rows];
                            for (r, (g, o)) in got.iter().zip(&one).enumerate() {
                                assert!(
                                    g.to_bits() == o.to_bits(),
                                    "{ty} {layout:?} {rows}x{cols} n_tok={n_tok} threads={} \
                                     token {t} row {r}: batched {g} vs alone {o}",
                                    pool.n_threads()
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
