//! quantize → dequantize round trips with per-type error bounds (in the spirit of llama.cpp's
//! `test-quantize-fns`), the side sums of Q8_1/Q8_K, and the error paths (bad lengths,
//! unsupported types, hostile floats) — none of which may panic.

use rand::{Rng, SeedableRng, rngs::StdRng};
use strata_storage::quant::blocks::{BlockQ8_1, BlockQ8K, f16_bits_to_f32, read_block};
use strata_storage::quant::{GgmlType, QuantError, dequantize_row, quantize_row};

/// Types `quantize_row` supports, with the largest allowed RMSE relative to the signal's RMS
/// on Gaussian data (the worst case of the two signals below). Measured values are 75–80% of
/// these (`STRATA_PRINT_QUANT_ERR=1` prints them), so a regression in a quantizer or a layout
/// shows up here.
const BOUNDS: [(GgmlType, f64); 15] = [
    (GgmlType::F32, 0.0),
    (GgmlType::F16, 0.0003),
    (GgmlType::Bf16, 0.0025),
    (GgmlType::Q4_0, 0.11),
    (GgmlType::Q4_1, 0.10),
    (GgmlType::Q5_0, 0.055),
    (GgmlType::Q5_1, 0.05),
    (GgmlType::Q8_0, 0.007),
    (GgmlType::Q8_1, 0.007),
    (GgmlType::Q2K, 0.38),
    (GgmlType::Q3K, 0.19),
    (GgmlType::Q4K, 0.093),
    (GgmlType::Q5K, 0.047),
    (GgmlType::Q6K, 0.023),
    (GgmlType::Q8K, 0.009),
];

fn gaussian(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    // Box–Muller; rand 0.8 without rand_distr has no normal distribution.
    (0..n)
        .map(|_| {
            let u1: f32 = rng.r#gen::<f32>().max(1e-12);
            let u2: f32 = rng.r#gen();
            scale * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect()
}

fn relative_rmse(x: &[f32], y: &[f32]) -> f64 {
    let err: f64 = x
        .iter()
        .zip(y)
        .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
        .sum();
    let sig: f64 = x.iter().map(|a| f64::from(*a).powi(2)).sum();
    (err / sig).sqrt()
}

fn round_trip(ty: GgmlType, x: &[f32]) -> Vec<f32> {
    let mut q = vec![0u8; ty.row_bytes(x.len())];
    quantize_row(ty, x, &mut q).unwrap_or_else(|e| panic!("{ty}: {e}"));
    let mut y = vec![0f32; x.len()];
    dequantize_row(ty, &q, &mut y).unwrap_or_else(|e| panic!("{ty}: {e}"));
    y
}

#[test]
fn round_trip_error_is_bounded() {
    let mut rng = StdRng::seed_from_u64(7);
    let n = 256 * 64;
    for scale in [0.02f32, 1.0, 30.0] {
        let x = gaussian(&mut rng, n, scale);
        // llama.cpp's synthetic data: an offset cosine, which no type may get badly wrong.
        let c: Vec<f32> = (0..n)
            .map(|i| 0.1 + 2.0 * (i as f32 * 0.37).cos() * scale)
            .collect();
        for (ty, bound) in BOUNDS {
            for (what, data) in [("gaussian", &x), ("cosine", &c)] {
                let err = relative_rmse(data, &round_trip(ty, data));
                if std::env::var_os("STRATA_PRINT_QUANT_ERR").is_some() {
                    eprintln!("{ty} {what} scale {scale}: {err:.5}");
                }
                assert!(
                    err <= bound,
                    "{ty} {what} scale {scale}: relative RMSE {err:.5} > {bound}"
                );
            }
        }
    }
}

#[test]
fn zero_blocks_stay_zero() {
    let x = vec![0f32; 512];
    for (ty, _) in BOUNDS {
        assert!(round_trip(ty, &x).iter().all(|v| *v == 0.0), "{ty}");
    }
}

#[test]
fn q8_k_bsums_and_q8_1_sum() {
    let mut rng = StdRng::seed_from_u64(11);
    let x = gaussian(&mut rng, 256 * 4, 2.0);
    let mut q = vec![0u8; GgmlType::Q8K.row_bytes(x.len())];
    quantize_row(GgmlType::Q8K, &x, &mut q).expect("quantize Q8_K");
    for chunk in q.chunks(292) {
        let b: BlockQ8K = read_block(chunk).expect("block");
        for j in 0..16 {
            let sum: i32 = b.qs[16 * j..16 * j + 16]
                .iter()
                .map(|&v| i32::from(v))
                .sum();
            assert_eq!(i32::from(b.bsums[j]), sum, "bsum {j}");
        }
        assert!(
            b.qs.iter().any(|&v| v == -127 || v == 127),
            "the absmax maps to ±127"
        );
    }

    let mut q = vec![0u8; GgmlType::Q8_1.row_bytes(x.len())];
    quantize_row(GgmlType::Q8_1, &x, &mut q).expect("quantize Q8_1");
    for chunk in q.chunks(36) {
        let b: BlockQ8_1 = read_block(chunk).expect("block");
        let sum: i32 = b.qs.iter().map(|&v| i32::from(v)).sum();
        // ggml rounds s from the f32 d, before d itself is rounded to f16.
        let (s, approx) = (f16_bits_to_f32(b.s), sum as f32 * f16_bits_to_f32(b.d));
        assert!(
            (s - approx).abs() <= 2e-3 * approx.abs() + 1e-6,
            "s {s} vs d*sum {approx}"
        );
    }
}

#[test]
fn bad_lengths_are_errors() {
    for ty in GgmlType::ALL.into_iter().filter(|t| t.can_dequantize()) {
        let bs = ty.block_size();
        let good = ty.row_bytes(bs * 2);
        let mut f = vec![0f32; bs * 2];
        for bytes in [good - 1, good + 1, 0] {
            let src = vec![0u8; bytes];
            let err = dequantize_row(ty, &src, &mut f).expect_err("wrong byte count");
            assert!(
                matches!(err, QuantError::BadLength { expected_bytes, .. } if expected_bytes == good),
                "{ty}: {err}"
            );
            let mut dst = vec![0u8; bytes];
            assert!(
                matches!(
                    quantize_row(ty, &f, &mut dst),
                    Err(QuantError::BadLength { .. })
                ),
                "{ty}"
            );
        }
        if bs > 1 {
            let mut f = vec![0f32; bs + 1];
            let src = vec![0u8; ty.type_size()];
            let err = dequantize_row(ty, &src, &mut f).expect_err("partial block");
            assert!(
                matches!(
                    err,
                    QuantError::BadLength {
                        expected_bytes: 0,
                        ..
                    }
                ),
                "{ty}: {err}"
            );
        }
    }
}

#[test]
fn unsupported_types_are_errors() {
    let unsupported = [
        GgmlType::Iq2Xxs,
        GgmlType::Iq4Nl,
        GgmlType::I8,
        GgmlType::F64,
        GgmlType::Tq1_0,
        GgmlType::Mxfp4,
    ];
    for ty in unsupported {
        let n = ty.block_size();
        let mut f = vec![0f32; n];
        let mut b = vec![0u8; ty.type_size()];
        assert!(
            matches!(
                dequantize_row(ty, &b, &mut f),
                Err(QuantError::UnsupportedType {
                    op: "dequantize",
                    ..
                })
            ),
            "{ty}"
        );
        assert!(
            matches!(
                quantize_row(ty, &f, &mut b),
                Err(QuantError::UnsupportedType { op: "quantize", .. })
            ),
            "{ty}"
        );
    }
}

#[test]
fn hostile_floats_do_not_panic() {
    let mut x = vec![1.0f32; 512];
    x[3] = f32::NAN;
    x[40] = f32::INFINITY;
    x[41] = f32::NEG_INFINITY;
    x[300] = 3.0e38;
    x[301] = -3.0e38;
    x[302] = 1.0e-45;
    for (ty, _) in BOUNDS {
        let _ = round_trip(ty, &x);
    }
    // Any bytes dequantize to something (possibly inf/NaN from f16 inf scales), never a panic.
    let mut rng = StdRng::seed_from_u64(3);
    for ty in GgmlType::ALL.into_iter().filter(|t| t.can_dequantize()) {
        let src: Vec<u8> = (0..ty.row_bytes(512)).map(|_| rng.r#gen()).collect();
        let mut f = vec![0f32; 512];
        dequantize_row(ty, &src, &mut f).expect("any bytes");
    }
}

/// Rough throughput of the scalar dequantizer: `cargo test --release -p strata-storage --test
/// quant_roundtrip -- --ignored --nocapture`.
#[test]
#[ignore]
fn dequantize_throughput() {
    let n = 1 << 22;
    let x = gaussian(&mut StdRng::seed_from_u64(1), n, 1.0);
    for ty in [
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q6K,
    ] {
        let mut q = vec![0u8; ty.row_bytes(n)];
        quantize_row(ty, &x, &mut q).expect("quantize");
        let mut y = vec![0f32; n];
        let t = std::time::Instant::now();
        for _ in 0..10 {
            dequantize_row(ty, &q, &mut y).expect("dequantize");
        }
        let s = t.elapsed().as_secs_f64() / 10.0;
        eprintln!(
            "{ty}: {:.2} Gelem/s ({:.2} GB/s of f32 out)",
            n as f64 / s / 1e9,
            n as f64 * 4.0 / s / 1e9
        );
    }
}
