//! act.cu and norm.cu's fused kernels on the simulator (and the GPU when asked), against the
//! CPU: simd's scalar twins for the activations and the norm, the engine's residual for the
//! adds. Random rows with the extremes activations reach, the real models' norms, biases and
//! embedding rows, and the real shapes.

mod common;
mod misc;

use common::{devices, get, put, rand_f32};
use misc::{close, model, rows};
use strata_kernels::ops::act::{self, Glu, Rows};
use strata_kernels::ops::norm;
use strata_kernels::{KernelError, Stream};
use strata_simd::ops::act::{gelu_tanh_mul_scalar, silu_mul_scalar};
use strata_simd::ops::{rms_norm, rms_norm_inplace};

const EPS: f32 = f32::EPSILON;

/// The CPU's gated activation (simd's scalar twins).
fn cpu_glu(act: Glu, g: &[f32], u: &[f32]) -> Vec<f32> {
    let mut out = g.to_vec();
    match act {
        Glu::Silu => silu_mul_scalar(&mut out, u),
        Glu::GeluTanh => gelu_tanh_mul_scalar(&mut out, u),
    }
    out
}

/// How far the device may be from the scalar twin, per element.
///
/// SwiGLU `g / (1 + e^-g) · u` has no sum of products to fuse and CUDA's `expf` is within
/// 2 ulp, so a few ulp of the result: 4·2⁻²³ relative covers it. GeGLU
/// `½x(1 + tanh(inner))·u` has the same relative error, plus the cancellation in `1 + tanh`
/// where tanh nears −1: an error of a few ulp of 1 in tanh (`tanhf` is within 2 ulp; the
/// GPU may fuse `1 + a·x·x`) becomes an absolute error of about ½|x·u|·4·2⁻²⁴.
fn glu_tol(act: Glu, x: f32, u: f32, want: f32) -> f32 {
    let rel = 4.0 * EPS * want.abs();
    match act {
        Glu::Silu => rel + f32::MIN_POSITIVE,
        Glu::GeluTanh => rel + 2.0 * EPS * (x * u).abs() + f32::MIN_POSITIVE,
    }
}

/// Gate values over the range activations reach, plus the saturated ends and zero.
fn gate_values(n: usize, seed: u64) -> Vec<f32> {
    let mut g: Vec<f32> = rand_f32(n, seed).iter().map(|v| v * 12.0).collect();
    for (i, v) in [-200.0f32, 200.0, 0.0, -0.0, -88.0, 88.0, 1e-30, -9.0, 9.0]
        .into_iter()
        .enumerate()
    {
        if i < n {
            g[i * n / 9] = v;
        }
    }
    g
}

fn run_glu(
    s: &Stream,
    act: Glu,
    g: &[f32],
    u: &[f32],
    rows_: usize,
    ff: usize,
) -> Result<Vec<f32>, KernelError> {
    let (bg, bu, bo) = (put(s, g), put(s, u), s.device().alloc(g.len() * 4)?);
    act::glu(
        s,
        act,
        Rows::dense(&bg, ff),
        Rows::dense(&bu, ff),
        Rows::dense(&bo, ff),
        rows_,
        ff,
    )?;
    Ok(get(s, &bo, rows_ * ff))
}

#[test]
fn glu_matches_the_scalar_twins() {
    for dev in devices() {
        let s = dev.stream().unwrap();
        // Tails of a tile (1000, 1025), one element, and the real widths: qwen2.5-1.5b's
        // SwiGLU (8960) and gemma3-270m's GeGLU (2048).
        for (act, rows_, ff) in [
            (Glu::Silu, 3, 1000),
            (Glu::Silu, 1, 1),
            (Glu::Silu, 2, 8960),
            (Glu::GeluTanh, 3, 1025),
            (Glu::GeluTanh, 2, 2048),
        ] {
            let g = gate_values(rows_ * ff, ff as u64);
            let u: Vec<f32> = rand_f32(rows_ * ff, 7 + ff as u64)
                .iter()
                .map(|v| v * 4.0)
                .collect();
            let got = run_glu(&s, act, &g, &u, rows_, ff).unwrap();
            let want = cpu_glu(act, &g, &u);
            for i in 0..got.len() {
                close(
                    got[i],
                    want[i],
                    glu_tol(act, g[i], u[i], want[i]),
                    &format!("{act:?} {rows_}x{ff} [{i}] g={} u={}", g[i], u[i]),
                );
            }
        }
    }
}

#[test]
fn glu_in_place_and_on_a_fused_gate_up_layout() {
    for dev in devices() {
        let s = dev.stream().unwrap();
        let (rows_, ff) = (3, 700);
        // [rows][2·ff]: gate in the first half of each row, up in the second; the result
        // written over the gate half.
        let gu = rand_f32(rows_ * 2 * ff, 11)
            .iter()
            .map(|v| v * 6.0)
            .collect::<Vec<_>>();
        let b = put(&s, &gu);
        let g = Rows::dense(&b, 2 * ff);
        let u = Rows {
            buf: &b,
            offset: ff,
            ld: 2 * ff,
        };
        act::glu(&s, Glu::Silu, g, u, g, rows_, ff).unwrap();
        let got: Vec<f32> = get(&s, &b, rows_ * 2 * ff);
        for r in 0..rows_ {
            let row = &gu[r * 2 * ff..(r + 1) * 2 * ff];
            let want = cpu_glu(Glu::Silu, &row[..ff], &row[ff..]);
            for i in 0..ff {
                close(
                    got[r * 2 * ff + i],
                    want[i],
                    glu_tol(Glu::Silu, row[i], row[ff + i], want[i]),
                    &format!("fused row {r} [{i}]"),
                );
                // The up half is untouched.
                assert_eq!(got[r * 2 * ff + ff + i].to_bits(), row[ff + i].to_bits());
            }
        }
    }
}

/// The adds and the scale are one rounding each, the same operation as the CPU's: equal bits.
#[test]
fn add_scale_and_bias_equal_the_cpu_bit_for_bit() {
    for dev in devices() {
        let s = dev.stream().unwrap();
        let n = 5000;
        let x = rand_f32(n, 21);
        let y = rand_f32(n, 22);
        // Every buffer a queued launch uses is bound until the results are read back (a
        // temporary would be freed while the launch is still queued).
        let (bx, by) = (put(&s, &x), put(&s, &y));
        act::add(&s, &bx, &by, n).unwrap();
        let got: Vec<f32> = get(&s, &bx, n);
        for i in 0..n {
            assert_eq!(got[i].to_bits(), (x[i] + y[i]).to_bits(), "add [{i}]");
        }
        let factor = (640f32).sqrt();
        act::scale(&s, &bx, factor, n).unwrap();
        let got2: Vec<f32> = get(&s, &bx, n);
        for i in 0..n {
            assert_eq!(
                got2[i].to_bits(),
                (got[i] * factor).to_bits(),
                "scale [{i}]"
            );
        }
        // Bias over rows with a stride (a q|k|v row: the bias added to its middle part).
        let (rows_, width, ld, off) = (4, 1100, 1500, 300);
        let xr = rand_f32(rows_ * ld, 23);
        let b = rand_f32(width, 24);
        let (bxr, bb) = (put(&s, &xr), put(&s, &b));
        act::add_bias(
            &s,
            Rows {
                buf: &bxr,
                offset: off,
                ld,
            },
            &bb,
            rows_,
            width,
        )
        .unwrap();
        let got: Vec<f32> = get(&s, &bxr, rows_ * ld);
        for r in 0..rows_ {
            for i in 0..ld {
                let want = if (off..off + width).contains(&i) {
                    xr[r * ld + i] + b[i - off]
                } else {
                    xr[r * ld + i]
                };
                assert_eq!(got[r * ld + i].to_bits(), want.to_bits(), "bias {r} {i}");
            }
        }
    }
}

/// The CPU's `residual` with a post-norm: `rms_norm_inplace(y, w)`, then `x += y`.
fn cpu_post_residual(x: &mut [f32], y: &[f32], w: &[f32], n: usize, eps: f32) {
    for (xr, yr) in x.chunks_exact_mut(n).zip(y.chunks_exact(n)) {
        let mut yn = yr.to_vec();
        rms_norm_inplace(&mut yn, w, eps);
        xr.iter_mut().zip(&yn).for_each(|(a, b)| *a += b);
    }
}

/// The tolerance of a normed value `v = y·scale·w` added to `x`: the device's scale is a tree
/// sum of squares in f32 (the CPU sums 64-element f32 chunks in f64) and `rsqrtf` (2 ulp);
/// for rows of a few thousand that is within about 8 ulp of the scale, then two roundings of
/// the products and one of the add (or a fused multiply-add).
fn norm_tol(x: f32, v: f32) -> f32 {
    12.0 * EPS * v.abs() + 2.0 * EPS * (x + v).abs() + f32::MIN_POSITIVE
}

#[test]
fn post_norm_residual_matches_the_cpu() {
    let gemma = model("gemma3-270m.gguf");
    for dev in devices() {
        let s = dev.stream().unwrap();
        // (what, x, y, w, n)
        type Case = (String, Vec<f32>, Vec<f32>, Vec<f32>, usize);
        let mut cases: Vec<Case> = Vec::new();
        // Random rows at gemma3-270m's width and a ragged one; a row of large values.
        for (rows_, n) in [(3usize, 640usize), (2, 1000)] {
            let x = rand_f32(rows_ * n, 31);
            let mut y = rand_f32(rows_ * n, 32);
            y[..n].iter_mut().for_each(|v| *v *= 3e4);
            let w: Vec<f32> = rand_f32(n, 33).iter().map(|v| 1.0 + v).collect();
            cases.push((format!("random {rows_}x{n}"), x, y, w, n));
        }
        // gemma3-270m's own post-norm weights on embedding rows.
        if let Some((p, f)) = &gemma {
            let (w, n) = rows(p, f, "blk.0.post_attention_norm.weight", 0, 1);
            let (x, _) = rows(p, f, "token_embd.weight", 1000, 3);
            let (y, _) = rows(p, f, "token_embd.weight", 2000, 3);
            cases.push(("gemma3 post_attention_norm".into(), x, y, w, n));
        }
        for (what, x, y, w, n) in cases {
            let rows_ = x.len() / n;
            let (bx, by, bw) = (put(&s, &x), put(&s, &y), put(&s, &w));
            act::residual_post_norm(&s, &bx, &by, &bw, rows_, n, 1e-6).unwrap();
            let got: Vec<f32> = get(&s, &bx, rows_ * n);
            let mut want = x.clone();
            cpu_post_residual(&mut want, &y, &w, n, 1e-6);
            for i in 0..got.len() {
                close(
                    got[i],
                    want[i],
                    norm_tol(x[i], want[i] - x[i]),
                    &format!("{what} [{i}]"),
                );
            }
            // y is left as it was.
            let y_after: Vec<f32> = get(&s, &by, rows_ * n);
            assert_eq!(y_after, y, "{what}: y changed");
        }
    }
}

#[test]
fn fused_residual_and_next_norm_match_the_cpu() {
    let gemma = model("gemma3-270m.gguf");
    let qwen = model("qwen2.5-coder-1.5b.gguf");
    for dev in devices() {
        let s = dev.stream().unwrap();
        // (what, x, y, post-norm weight or none, next norm weight, n)
        type Case = (
            String,
            Vec<f32>,
            Vec<f32>,
            Option<Vec<f32>>,
            Vec<f32>,
            usize,
        );
        let mut cases: Vec<Case> = Vec::new();
        let n = 1536;
        let w: Vec<f32> = rand_f32(n, 41).iter().map(|v| 1.0 + 0.5 * v).collect();
        cases.push((
            "random".into(),
            rand_f32(4 * n, 42),
            rand_f32(4 * n, 43),
            None,
            w.clone(),
            n,
        ));
        cases.push((
            "random post".into(),
            rand_f32(2 * n, 44),
            rand_f32(2 * n, 45).iter().map(|v| v * 100.0).collect(),
            Some(rand_f32(n, 46)),
            w,
            n,
        ));
        if let Some((p, f)) = &qwen {
            let (w, n) = rows(p, f, "blk.0.ffn_norm.weight", 0, 1);
            let (x, _) = rows(p, f, "token_embd.weight", 500, 2);
            let (y, _) = rows(p, f, "token_embd.weight", 9000, 2);
            cases.push(("qwen2.5 ffn_norm".into(), x, y, None, w, n));
        }
        if let Some((p, f)) = &gemma {
            let (wp, n) = rows(p, f, "blk.3.post_ffw_norm.weight", 0, 1);
            let (w, _) = rows(p, f, "blk.4.attn_norm.weight", 0, 1);
            let (x, _) = rows(p, f, "token_embd.weight", 77, 2);
            let (y, _) = rows(p, f, "token_embd.weight", 4242, 2);
            cases.push(("gemma3 post_ffw_norm".into(), x, y, Some(wp), w, n));
        }
        for (what, x, y, wp, w, n) in cases {
            let rows_ = x.len() / n;
            let (bx, by, bw, bxb) = (
                put(&s, &x),
                put(&s, &y),
                put(&s, &w),
                dev.alloc(rows_ * n * 4).unwrap(),
            );
            let bwp = wp.as_ref().map(|wp| put(&s, wp));
            let mut want_x = x.clone();
            match (&wp, &bwp) {
                (Some(wp), Some(bwp)) => {
                    norm::post_norm_add_rms_norm(&s, &bx, &by, bwp, &bw, &bxb, rows_, n, 1e-6)
                        .unwrap();
                    cpu_post_residual(&mut want_x, &y, wp, n, 1e-6);
                }
                _ => {
                    norm::add_rms_norm(&s, &bx, &by, &bw, &bxb, rows_, n, 1e-6).unwrap();
                    want_x.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
                }
            }
            let got_x: Vec<f32> = get(&s, &bx, rows_ * n);
            let got_xb: Vec<f32> = get(&s, &bxb, rows_ * n);
            for i in 0..got_x.len() {
                if wp.is_none() {
                    assert_eq!(got_x[i].to_bits(), want_x[i].to_bits(), "{what} x [{i}]");
                } else {
                    close(
                        got_x[i],
                        want_x[i],
                        norm_tol(x[i], want_x[i] - x[i]),
                        &format!("{what} x [{i}]"),
                    );
                }
            }
            // The next norm of the device's own x (so that only the norm is compared here).
            for r in 0..rows_ {
                let mut want_xb = vec![0f32; n];
                rms_norm(&got_x[r * n..(r + 1) * n], &w, 1e-6, &mut want_xb);
                for i in 0..n {
                    close(
                        got_xb[r * n + i],
                        want_xb[i],
                        norm_tol(0.0, want_xb[i]),
                        &format!("{what} xb [{r}][{i}]"),
                    );
                }
            }
        }
    }
}

/// Real tensors: gemma3's embedding scale √n_embd on its embedding rows, qwen2.5's q bias on
/// its embedding rows (bit for bit, as the CPU computes them).
#[test]
fn embedding_scale_and_bias_on_real_tensors() {
    let gemma = model("gemma3-270m.gguf");
    let qwen = model("qwen2.5-coder-1.5b.gguf");
    for dev in devices() {
        let s = dev.stream().unwrap();
        if let Some((p, f)) = &gemma {
            let (x, n) = rows(p, f, "token_embd.weight", 100, 4);
            let bx = put(&s, &x);
            let factor = (n as f32).sqrt();
            act::scale(&s, &bx, factor, x.len()).unwrap();
            let got: Vec<f32> = get(&s, &bx, x.len());
            for i in 0..x.len() {
                assert_eq!(got[i].to_bits(), (x[i] * factor).to_bits(), "scale [{i}]");
            }
        }
        if let Some((p, f)) = &qwen {
            let (b, n) = rows(p, f, "blk.0.attn_q.bias", 0, 1);
            let (x, _) = rows(p, f, "token_embd.weight", 300, 3);
            assert_eq!(x.len(), 3 * n, "q is n_embd wide in qwen2.5-1.5b");
            let (bx, bb) = (put(&s, &x), put(&s, &b));
            act::add_bias(&s, Rows::dense(&bx, n), &bb, 3, n).unwrap();
            let got: Vec<f32> = get(&s, &bx, x.len());
            for i in 0..x.len() {
                assert_eq!(got[i].to_bits(), (x[i] + b[i % n]).to_bits(), "bias [{i}]");
            }
        }
    }
}

#[test]
fn wrong_shapes_are_errors_naming_the_operand() {
    let dev = common::sim();
    let s = dev.stream().unwrap();
    let small = dev.alloc(400).unwrap();
    let big = dev.alloc(4000).unwrap();
    let e = act::glu(
        &s,
        Glu::Silu,
        Rows::dense(&big, 100),
        Rows::dense(&small, 100),
        Rows::dense(&big, 100),
        2,
        100,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("glu u") && e.contains("needs 800 bytes"), "{e}");
    let e = act::add_bias(&s, Rows::dense(&big, 50), &big, 2, 100)
        .unwrap_err()
        .to_string();
    assert!(e.contains("row stride 50 is shorter"), "{e}");
    let e = act::add(&s, &big, &small, 1000).unwrap_err().to_string();
    assert!(e.contains("add y"), "{e}");
    let e = norm::add_rms_norm(&s, &big, &big, &small, &big, 1, 1000, 1e-6)
        .unwrap_err()
        .to_string();
    assert!(e.contains("add_rms_norm w"), "{e}");
    let e = act::residual_post_norm(&s, &big, &big, &big, usize::MAX, 2, 1e-6)
        .unwrap_err()
        .to_string();
    assert!(e.contains("overflow"), "{e}");
}
