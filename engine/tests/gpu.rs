//! The CPU+GPU split end to end on the simulated GPU: every placement gives the CPU backend's
//! logits (to rounding: the GPU quantizes activations to q8_1 where the CPU uses Q8_K, and
//! sums in another order) and its greedy tokens.

use std::sync::Arc;

use strata_engine::model::{Arch, DeviceSpec, GpuOptions, ModelOptions};
use strata_engine::synth::{GenSpec, Vocab, to_bytes};
use strata_engine::{Logits, Model};
use strata_kernels::SimConfig;
use strata_simd::pool::ThreadPool;

fn model_file(spec: &GenSpec) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.gguf");
    std::fs::write(&path, to_bytes(spec, Vocab::Bytes).expect("generate")).expect("write");
    (dir, path)
}

fn sim(memory: usize) -> DeviceSpec {
    DeviceSpec::Sim(SimConfig {
        memory,
        ..SimConfig::default()
    })
}

fn load(path: &std::path::Path, gpu: GpuOptions) -> Model {
    let opts = ModelOptions {
        gpu,
        keep_file_layout: true,
        ..ModelOptions::default()
    };
    Model::load_with(path, &opts).expect("load")
}

const PROMPT: [u32; 7] = [5, 77, 130, 9, 201, 44, 18];

/// Prefill, then `steps` greedy steps: every step's logits and the tokens chosen.
fn run(model: &Model, steps: usize) -> (Vec<Vec<f32>>, Vec<u32>) {
    let pool = Arc::new(ThreadPool::new(2));
    let mut ctx = model.new_context(64, pool);
    let mut logits = vec![
        model
            .forward(&mut ctx, &PROMPT, Logits::Last)
            .expect("prefill")
            .to_vec(),
    ];
    let mut toks = Vec::new();
    for _ in 0..steps {
        let last = logits.last().expect("logits");
        let next = (0..last.len())
            .max_by(|&a, &b| last[a].total_cmp(&last[b]))
            .expect("argmax") as u32;
        toks.push(next);
        logits.push(
            model
                .forward(&mut ctx, &[next], Logits::Last)
                .expect("decode")
                .to_vec(),
        );
    }
    (logits, toks)
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn all_on_the_gpu_matches_the_cpu() {
    let spec = GenSpec::tiny(Arch::Llama);
    let (_d, path) = model_file(&spec);
    let cpu = load(&path, GpuOptions::default());
    let gpu = load(
        &path,
        GpuOptions {
            device: sim(256 << 20),
            ..GpuOptions::default()
        },
    );
    assert!(gpu.gpu_device().is_some());
    eprintln!("{:?}", gpu.plan().map(|p| (p.gpu_layers(), p.output)));
    let (lc, tc) = run(&cpu, 4);
    let (lg, tg) = run(&gpu, 4);
    for (i, (a, b)) in lc.iter().zip(&lg).enumerate() {
        let e = max_rel(a, b);
        eprintln!("step {i}: max relative difference {e:.2e}");
        assert!(e < 0.05, "step {i}: {e}");
    }
    assert_eq!(tc, tg);
}
