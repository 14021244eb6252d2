//! The mixture-of-experts block against a plain reference: every weight dequantized to f32,
//! the router's softmax and top-k by hand, and a loop over the chosen experts.

use std::sync::Arc;

use strata_simd::pool::ThreadPool;
use strata_storage::quant::dequantize_row;

use super::CpuExec;
use crate::exec::Pass;
use crate::model::moe::route;
use crate::model::{Arch, Ffn, Mat, Model};
use crate::synth::{GenSpec, Vocab, to_bytes};

fn dense(m: &Model, mat: Mat, slab: usize, stacked: bool) -> Vec<f32> {
    let h = if stacked {
        m.weights.expert_slab(mat.id, slab).expect("slab")
    } else {
        m.weights.acquire(mat.id).expect("acquire")
    };
    let rb = mat.ty.row_bytes(mat.cols);
    let mut bytes = h.bytes()[..mat.rows * rb].to_vec();
    if m.cpu.layout(mat.id) == strata_simd::matmul::Layout::Interleaved {
        strata_simd::matmul::deinterleave(mat.ty, &mut bytes, mat.rows, mat.cols)
            .expect("deinterleave");
    }
    let mut out = vec![0f32; mat.rows * mat.cols];
    for r in 0..mat.rows {
        let src = &bytes[r * rb..(r + 1) * rb];
        dequantize_row(mat.ty, src, &mut out[r * mat.cols..(r + 1) * mat.cols])
            .expect("dequantize");
    }
    out
}

fn matvec(w: &[f32], cols: usize, x: &[f32]) -> Vec<f32> {
    w.chunks_exact(cols)
        .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn check(spec: GenSpec) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.gguf");
    std::fs::write(&path, to_bytes(&spec, Vocab::Bytes).expect("generate")).expect("write");
    // And with its experts laid out expert by expert (`strata optimize`).
    let fused = dir.path().join("fused.gguf");
    let mut quiet = strata_storage::store::NoProgress;
    crate::optimize::optimize(&path, &fused, &mut quiet).expect("optimize");
    // Resident experts are interleaved where the CPU has the kernels; strided ones keep the
    // file's layout.
    check_file(
        &spec,
        &path,
        strata_simd::matmul::can_interleave(spec.weight_type),
    );
    check_file(&spec, &fused, false);
}

fn check_file(spec: &GenSpec, path: &std::path::Path, interleaved: bool) {
    let m = Model::load(path).expect("load");
    let mc = m.config.moe.expect("a MoE model");
    let e = m.config.n_embd;
    let Ffn::Moe(moe) = &m.layers[0].ffn else {
        panic!("layer 0 is dense")
    };
    let want = if interleaved {
        strata_simd::matmul::Layout::Interleaved
    } else {
        strata_simd::matmul::Layout::Rows
    };
    assert_eq!(m.cpu.layout(moe.gate.mat.id), want, "{:?}", spec.arch);
    let n = 5;
    let mut rng = crate::sampler::SplitMix64(42);
    let x: Vec<f32> = (0..n * e)
        .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 23) as f32) - 1.0)
        .collect();

    let pool = Arc::new(ThreadPool::new(2));
    let pass = Pass {
        model: &m,
        pool: &pool,
        n,
    };
    let mut cpu = CpuExec::default();
    cpu.begin(&pass);
    cpu.b.xb.copy_from_slice(&x);
    cpu.moe(&pass, 0, moe).expect("moe");

    let router = dense(&m, moe.router, 0, false);
    let act = |g: f32, u: f32| g / (1.0 + (-g).exp()) * u;
    for t in 0..n {
        let xt = &x[t * e..(t + 1) * e];
        let mut logits = matvec(&router, e, xt);
        let mut chosen = Vec::new();
        route(
            &mut logits,
            &mut chosen,
            1,
            mc.n_expert,
            mc.n_expert_used,
            mc.norm_topk,
        );
        let mut want = vec![0f32; e];
        for (ex, w) in chosen {
            let g = matvec(&dense(&m, moe.gate.mat, ex, true), e, xt);
            let u = matvec(&dense(&m, moe.up.mat, ex, true), e, xt);
            let h: Vec<f32> = g.iter().zip(&u).map(|(&g, &u)| act(g, u)).collect();
            let y = matvec(&dense(&m, moe.down.mat, ex, true), mc.n_ff_exp, &h);
            want.iter_mut().zip(&y).for_each(|(a, y)| *a += w * y);
        }
        if let Some((gate, up, down, gi)) = &moe.shared {
            let g = matvec(&dense(&m, *gate, 0, false), e, xt);
            let u = matvec(&dense(&m, *up, 0, false), e, xt);
            let h: Vec<f32> = g.iter().zip(&u).map(|(&g, &u)| act(g, u)).collect();
            let y = matvec(&dense(&m, *down, 0, false), gate.rows, &h);
            let z: f32 = xt.iter().zip(gi).map(|(a, b)| a * b).sum();
            let s = 1.0 / (1.0 + (-z).exp());
            want.iter_mut().zip(&y).for_each(|(a, y)| *a += s * y);
        }
        let got = &cpu.b.xb[t * e..(t + 1) * e];
        let scale = want.iter().fold(1e-3f32, |a, v| a.max(v.abs()));
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
            / scale;
        // Activations are quantized to 8 bits inside the matmuls.
        assert!(
            err < 0.03,
            "{:?} token {t}: relative error {err}",
            spec.arch
        );
    }
}

#[test]
fn moe_block_matches_the_f32_reference_for_every_architecture() {
    check(GenSpec::tiny(Arch::Qwen3Moe));
    check(GenSpec::tiny(Arch::Qwen2Moe));
    check(GenSpec::tiny(Arch::Olmoe));
    check(GenSpec::moe(Arch::Llama, false));
}
