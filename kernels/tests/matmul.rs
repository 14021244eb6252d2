//! The matmul family on random data, on the simulator (and the GPU with STRATA_TEST_CUDA=1),
//! against the CPU reference: activation quantization byte for byte, the decode matvec for
//! every weight type and 1–8 tokens, the prefill GEMM on ragged shapes, the entry point, the
//! dequantization to f16, the embedding lookup and the cuBLAS comparison path.
//!
//! Two references per product: the weights dequantized by `strata_storage` times the
//! activations as the kernel sees them (q8_1 values for quantized weights, f16/bf16 for the
//! tensor-core GEMM), which must agree to within float rounding — a decode bug shows as an
//! error near 1 — and times the f32 activations, within the activation quantization's error.

mod common;
#[path = "matmul/support.rs"]
mod support;

use strata_kernels::ops::matmul::{
    At, Weight, matmul, matmul_cublas, matmul_cublas_scratch_bytes, matmul_scratch_bytes,
};
use strata_kernels::ops::{dequant, gemm, matvec, quantize};
use strata_storage::quant::{GgmlType, dequantize_row, quantize_block_q8_1};
use support::*;

/// The error quantizing activations to 8 bits may add, against the f32 activations (as
/// strata-simd's tests bound it): uniform rounding to 8 bits predicts about 1.5e-5.
const Q8_BOUND: f64 = 3e-4;

#[test]
fn quantize_q8_1_is_byte_exact() {
    for dev in common::devices() {
        let s = dev.stream().unwrap();
        let mut rng = rng(1);
        let (n, cols) = (5, 96);
        let mut x = random_f32(&mut rng, n * cols);
        x[32..64].fill(0.0); // an all-zero block: d = 0, quants 0
        x[70] = 3.5; // a lone large value
        let xb = put(&s, &x);
        let y = scratch(&s, quantize::q8_1_bytes(n, cols));
        quantize::quantize_q8_1(&s, At::from(&xb), At::from(&y), n, cols).unwrap();
        let got: Vec<u8> = get(&s, &y, 0, quantize::q8_1_bytes(n, cols));
        let (qb, db) = quantize::q8_1_mmq_bytes(n, cols);
        let (qs, ds) = (scratch(&s, qb), scratch(&s, db));
        quantize::quantize_q8_1_mmq(&s, At::from(&xb), At::from(&qs), At::from(&ds), n, cols)
            .unwrap();
        let gq: Vec<i8> = get(&s, &qs, 0, qb);
        let gd: Vec<f32> = get(&s, &ds, 0, db / 4);
        for (b, xs) in x.chunks_exact(32).enumerate() {
            let want = quantize_block_q8_1(xs.try_into().unwrap());
            let g = &got[b * 36..(b + 1) * 36];
            assert_eq!(u16::from_le_bytes([g[0], g[1]]), want.d, "block {b}: d");
            assert_eq!(u16::from_le_bytes([g[2], g[3]]), want.s, "block {b}: s");
            assert_eq!(&g[4..], want.qs.map(|q| q as u8), "block {b}: quants");
            // The prefill layout: the same quants, d and the sums in f32.
            assert_eq!(
                &gq[b * 32..(b + 1) * 32],
                &want.qs,
                "block {b}: prefill quants"
            );
            let amax = xs.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let sum: i32 = want.qs.iter().map(|&q| i32::from(q)).sum();
            let lo: i32 = want.qs[..16].iter().map(|&q| i32::from(q)).sum();
            assert_eq!(
                &gd[4 * b..4 * b + 4],
                &[d, sum as f32 * d, lo as f32 * d, (sum - lo) as f32 * d],
                "block {b}: prefill scales"
            );
        }
    }
}

/// Columns for the matvec tests: 40 sub-blocks of 32, so that lanes 0–7 take two and the rest
/// one (a ragged last step), and for float weights also an odd count (the one-at-a-time path).
fn matvec_cols(ty: GgmlType) -> Vec<usize> {
    if is_quantized(ty) {
        vec![1280]
    } else {
        vec![1280, 131]
    }
}

#[test]
fn matvec_every_type_and_token_count() {
    for dev in common::devices() {
        let s = dev.stream().unwrap();
        let mut rng = rng(2);
        // Every type's result in one report, not just the first failure.
        let mut failures = Vec::new();
        // 37 rows: the last block of four rows has one.
        let rows = 37;
        for ty in TYPES {
            for cols in matvec_cols(ty) {
                let data = weights(&mut rng, ty, rows, cols, true);
                let wf = dequant(ty, &data, rows, cols);
                let (_wb, w) = put_weight(&s, ty, &data, rows, cols);
                let x = random_f32(&mut rng, 8 * cols);
                let xb = put(&s, &x);
                let qa = scratch(&s, quantize::q8_1_bytes(8, cols));
                if is_quantized(ty) {
                    quantize::quantize_q8_1(&s, At::from(&xb), At::from(&qa), 8, cols).unwrap();
                }
                let xq = q8_values(&x, true);
                for n in 1..=8 {
                    let y = scratch(&s, n * rows * 4);
                    let xa = if is_quantized(ty) {
                        At::from(&qa)
                    } else {
                        At::from(&xb)
                    };
                    matvec::matvec(&s, &w, xa, n, At::from(&y)).unwrap();
                    let got: Vec<f32> = get(&s, &y, 0, n * rows);
                    let (want, scale) = reference(&wf, &x[..n * cols], rows, cols, n);
                    let loose = error(&got, &want, scale);
                    if is_quantized(ty) {
                        let (wq, scale_q) = reference(&wf, &xq[..n * cols], rows, cols, n);
                        let tight = error(&got, &wq, scale_q);
                        if n == 8 {
                            eprintln!(
                                "matvec {ty}: {tight:.2e} against q8_1 values, {loose:.2e} against f32"
                            );
                        }
                        if tight >= tight_bound(ty, true) || loose >= Q8_BOUND {
                            failures.push(format!(
                                "{ty} n={n}: {tight:e} against q8_1 values, {loose:e} against f32"
                            ));
                        }
                    } else if loose >= 1e-10 {
                        // f32 sums of exact products (f16/bf16 weights widen exactly).
                        failures.push(format!("{ty} cols={cols} n={n}: {loose:e}"));
                    }
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}

/// GEMM shapes: rows and tokens that are not multiples of the 64 × 64 tile, columns that end
/// inside a 128-column step where the block allows it (96: three sub-blocks; K-quants come in
/// whole 256s).
fn gemm_shapes(ty: GgmlType) -> Vec<(usize, usize, usize)> {
    match block(ty) {
        256 => vec![(70, 256, 9), (130, 768, 67)],
        32 => vec![(70, 96, 9), (130, 416, 67)],
        _ => vec![(70, 96, 9), (130, 200, 67)],
    }
}

#[test]
fn gemm_every_type_on_ragged_shapes() {
    for dev in common::devices() {
        let s = dev.stream().unwrap();
        let mut rng = rng(3);
        let mut failures = Vec::new();
        for ty in TYPES {
            for (rows, cols, n) in gemm_shapes(ty) {
                let data = weights(&mut rng, ty, rows, cols, true);
                let wf = dequant(ty, &data, rows, cols);
                let (_wb, w) = put_weight(&s, ty, &data, rows, cols);
                let x = random_f32(&mut rng, n * cols);
                let xb = put(&s, &x);
                let y = scratch(&s, n * rows * 4);
                // Every buffer lives until the results are downloaded (the stream runs later).
                let h = scratch(&s, n * cols * 2);
                let (qb, db) = quantize::q8_1_mmq_bytes(n, cols);
                let (qs, ds) = (scratch(&s, qb), scratch(&s, db));
                let (seen, tight) = match ty {
                    GgmlType::F32 => {
                        gemm::gemm(&s, &w, gemm::Acts::F32(At::from(&xb)), n, At::from(&y))
                            .unwrap();
                        // f32 sums of f32 products.
                        (x.clone(), 1e-10)
                    }
                    GgmlType::F16 | GgmlType::Bf16 => {
                        let seen: Vec<f32> = if ty == GgmlType::F16 {
                            dequant::convert_f32_f16(&s, At::from(&xb), At::from(&h), n * cols)
                                .unwrap();
                            x.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect()
                        } else {
                            dequant::convert_f32_bf16(&s, At::from(&xb), At::from(&h), n * cols)
                                .unwrap();
                            x.iter()
                                .map(|v| half::bf16::from_f32(*v).to_f32())
                                .collect()
                        };
                        gemm::gemm(&s, &w, gemm::Acts::Half(At::from(&h)), n, At::from(&y))
                            .unwrap();
                        // The tensor cores multiply the rounded activations exactly and sum in f32.
                        (seen, 1e-10)
                    }
                    _ => {
                        quantize::quantize_q8_1_mmq(
                            &s,
                            At::from(&xb),
                            At::from(&qs),
                            At::from(&ds),
                            n,
                            cols,
                        )
                        .unwrap();
                        gemm::gemm(
                            &s,
                            &w,
                            gemm::Acts::Q8_1 {
                                qs: At::from(&qs),
                                ds: At::from(&ds),
                            },
                            n,
                            At::from(&y),
                        )
                        .unwrap();
                        (q8_values(&x, false), tight_bound(ty, false))
                    }
                };
                let got: Vec<f32> = get(&s, &y, 0, n * rows);
                let (want, scale) = reference(&wf, &seen, rows, cols, n);
                let e_seen = error(&got, &want, scale);
                eprintln!(
                    "gemm {ty} {rows}x{cols} n={n}: {e_seen:.2e} against what the kernel sees"
                );
                let (want, scale) = reference(&wf, &x, rows, cols, n);
                let e = error(&got, &want, scale);
                // Activation rounding: 8 bits (Q8_BOUND), bf16 (2⁻⁸ relative: ~5e-6), f16.
                let bound = match ty {
                    GgmlType::F32 => 1e-10,
                    GgmlType::F16 => 1e-6,
                    GgmlType::Bf16 => 3e-5,
                    _ => Q8_BOUND,
                };
                if e_seen >= tight || e >= bound {
                    failures.push(format!(
                        "{ty} {rows}x{cols} n={n}: {e_seen:e} against what the kernel sees, {e:e} against f32"
                    ));
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}

#[test]
fn matmul_entry_picks_matvec_or_gemm() {
    for dev in common::devices() {
        let s = dev.stream().unwrap();
        let mut rng = rng(4);
        let (rows, cols) = (66, 512);
        for ty in [
            GgmlType::Q4K,
            GgmlType::Q8_0,
            GgmlType::F16,
            GgmlType::Bf16,
            GgmlType::F32,
        ] {
            let data = weights(&mut rng, ty, rows, cols, false);
            let wf = dequant(ty, &data, rows, cols);
            let (_wb, w) = put_weight(&s, ty, &data, rows, cols);
            // 1 and 8: matvec; 9 and 20: the GEMM (or, for f32/f16 weights, whichever applies).
            for n in [1, 8, 9, 20] {
                let x = random_f32(&mut rng, n * cols);
                let xb = put(&s, &x);
                let y = scratch(&s, n * rows * 4);
                let sc = scratch(&s, matmul_scratch_bytes(ty, cols, n));
                matmul(&s, &w, At::from(&xb), n, At::from(&y), At::from(&sc)).unwrap();
                let got: Vec<f32> = get(&s, &y, 0, n * rows);
                let (want, scale) = reference(&wf, &x, rows, cols, n);
                let e = error(&got, &want, scale);
                let bound = match ty {
                    GgmlType::F32 => 1e-10,
                    GgmlType::F16 => 1e-6,
                    GgmlType::Bf16 => 3e-5,
                    _ => Q8_BOUND,
                };
                assert!(e < bound, "{ty} n={n}: {e:e}");
            }
        }
        // Float weights whose rows are not 16-byte aligned take the matvec path, 8 tokens at a
        // time, for any count.
        let (rows, cols, n) = (5, 131, 19);
        let data = weights(&mut rng, GgmlType::F16, rows, cols, false);
        let wf = dequant(GgmlType::F16, &data, rows, cols);
        let (_wb, w) = put_weight(&s, GgmlType::F16, &data, rows, cols);
        let x = random_f32(&mut rng, n * cols);
        let xb = put(&s, &x);
        let y = scratch(&s, n * rows * 4);
        let sc = scratch(&s, matmul_scratch_bytes(GgmlType::F16, cols, n));
        matmul(&s, &w, At::from(&xb), n, At::from(&y), At::from(&sc)).unwrap();
        let (want, scale) = reference(&wf, &x, rows, cols, n);
        let e = error(&get(&s, &y, 0, n * rows), &want, scale);
        assert!(e < 1e-10, "F16 131 columns: {e:e}");
    }
}

#[test]
fn matmul_refuses_bad_arguments_before_queueing() {
    let dev = common::sim();
    let s = dev.stream().unwrap();
    let buf = scratch(&s, 1 << 16);
    let w = Weight {
        ptr: buf.ptr(),
        ty: GgmlType::Q4K,
        rows: 4,
        cols: 256,
    };
    let small = scratch(&s, 16);
    let e = |r: Result<(), strata_kernels::KernelError>| r.unwrap_err().to_string();
    // Activations too small for 2 tokens.
    let m = e(matmul(
        &s,
        &w,
        At::from(&small),
        2,
        At::from(&buf),
        At::from(&buf),
    ));
    assert!(m.contains("x") && m.contains("needs 2048 bytes"), "{m}");
    // A type the kernels do not take.
    let bad = Weight {
        ty: GgmlType::Iq2Xxs,
        ..w
    };
    let m = e(matmul(
        &s,
        &bad,
        At::from(&buf),
        1,
        At::from(&buf),
        At::from(&buf),
    ));
    assert!(m.contains("IQ2_XXS"), "{m}");
    // Columns that are not whole blocks.
    let bad = Weight { cols: 100, ..w };
    let m = e(matmul(
        &s,
        &bad,
        At::from(&buf),
        1,
        At::from(&buf),
        At::from(&buf),
    ));
    assert!(m.contains("100 columns"), "{m}");
    // Misaligned weights.
    let bad = Weight {
        ptr: w.ptr + 2,
        ..w
    };
    let m = e(matmul(
        &s,
        &bad,
        At::from(&buf),
        1,
        At::from(&buf),
        At::from(&buf),
    ));
    assert!(m.contains("16-byte aligned"), "{m}");
    // Too many tokens for one matvec launch.
    let m = e(matvec::matvec(&s, &w, At::from(&buf), 9, At::from(&buf)));
    assert!(m.contains("9 tokens"), "{m}");
    // Scratch too small for the GEMM's activations.
    let m = e(matmul(
        &s,
        &w,
        At::from(&buf),
        20,
        At::from(&buf),
        At::from(&small),
    ));
    assert!(m.contains("needs"), "{m}");
    s.synchronize().unwrap();
    assert_eq!(dev.transfer_stats().launches, 0, "nothing was queued");
}

#[test]
fn dequant_f16_and_get_rows_equal_the_cpu() {
    for dev in common::devices() {
        let s = dev.stream().unwrap();
        let mut rng = rng(5);
        for ty in TYPES {
            let (rows, cols) = (6, if is_quantized(ty) { 512 } else { 200 });
            let data = weights(&mut rng, ty, rows, cols, true);
            let wf = dequant(ty, &data, rows, cols);
            let (_wb, w) = put_weight(&s, ty, &data, rows, cols);
            // Every value is exactly the CPU's (see quant.cuh), then rounded once to f16.
            let y = scratch(&s, rows * cols * 2);
            dequant::dequant_f16(&s, &w, At::from(&y)).unwrap();
            let got: Vec<u16> = get(&s, &y, 0, rows * cols);
            for (i, (g, v)) in got.iter().zip(&wf).enumerate() {
                let want = half::f16::from_f32(*v);
                assert!(
                    half::f16::from_bits(*g) == want,
                    "{ty} value {i}: {:?} vs {want:?}",
                    half::f16::from_bits(*g)
                );
            }
            // Rows 4, 0, 4 and an id out of range, times a scale: (value × scale) rounded once.
            let ids = [4i32, 0, 4, 6];
            let idb = put(&s, &ids);
            let out = scratch(&s, ids.len() * cols * 4);
            let scale = 25.298_22_f32; // √640, Gemma's embedding scale
            dequant::get_rows(&s, &w, At::from(&idb), ids.len(), At::from(&out), scale).unwrap();
            let got: Vec<f32> = get(&s, &out, 0, ids.len() * cols);
            for (k, &id) in ids.iter().enumerate() {
                let g = &got[k * cols..(k + 1) * cols];
                if id as usize >= rows {
                    assert!(
                        g.iter().all(|v| v.is_nan()),
                        "{ty}: an id out of range gives NaN"
                    );
                    continue;
                }
                let mut want = vec![0f32; cols];
                let rb = ty.row_bytes(cols);
                dequantize_row(ty, &data[id as usize * rb..][..rb], &mut want).unwrap();
                for (c, (a, b)) in g.iter().zip(&want).enumerate() {
                    assert!(
                        *a == b * scale,
                        "{ty} id {id} col {c}: {a} vs {}",
                        b * scale
                    );
                }
            }
        }
    }
}

#[test]
fn cublas_path_matches_the_cpu() {
    for dev in common::devices() {
        let s = dev.stream().unwrap();
        let mut rng = rng(6);
        let (rows, cols, n) = (40, 256, 12);
        for ty in [GgmlType::Q6K, GgmlType::Q4_0, GgmlType::F32] {
            let data = weights(&mut rng, ty, rows, cols, false);
            let wf = dequant(ty, &data, rows, cols);
            let (_wb, w) = put_weight(&s, ty, &data, rows, cols);
            let x = random_f32(&mut rng, n * cols);
            let xb = put(&s, &x);
            let y = scratch(&s, n * rows * 4);
            let sc = scratch(&s, matmul_cublas_scratch_bytes(rows, cols, n));
            matmul_cublas(&s, &w, At::from(&xb), n, At::from(&y), At::from(&sc)).unwrap();
            let got: Vec<f32> = get(&s, &y, 0, n * rows);
            // Weights and activations rounded to f16 (2⁻¹¹ relative each: ~3e-7 together), then
            // exact products and f32 sums.
            let wh: Vec<f32> = wf
                .iter()
                .map(|v| half::f16::from_f32(*v).to_f32())
                .collect();
            let xh: Vec<f32> = x.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect();
            let (want, scale) = reference(&wh, &xh, rows, cols, n);
            let e = error(&got, &want, scale);
            assert!(e < 1e-10, "{ty}: {e:e} against the f16-rounded reference");
            let (want, scale) = reference(&wf, &x, rows, cols, n);
            let e = error(&got, &want, scale);
            assert!(e < 2e-6, "{ty}: {e:e} against f32");
        }
    }
}
