//! The phase contract a second executor relies on: each phase reads only the activations it
//! declares ([`Phase::inputs`]) and leaves what later phases read in its declared outputs.
//! Checked by running every phase on a fresh executor that receives only the declared inputs
//! (the crossing a placement over several devices makes), against the ordinary pass.

use std::sync::Arc;

use strata_simd::pool::ThreadPool;

use super::{Act, Dev, Executor, Pass, Phase, Slot};
use crate::model::{Arch, Logits, Model};
use crate::synth::{GenSpec, Vocab, to_bytes};

/// Logits of every token of `tokens`, each phase on its own new executor.
fn phase_by_phase(m: &Model, pool: &ThreadPool, tokens: &[u32]) -> Vec<f32> {
    let mut ctx = m.new_context(64, Arc::new(ThreadPool::new(1)));
    let p = Pass {
        model: m,
        pool,
        n: tokens.len(),
    };
    let mut slots = [Slot {
        kv: &mut ctx.kv,
        pos0: 0,
        row0: 0,
        n: tokens.len(),
    }];
    let fresh = || {
        let mut e = Executor::new(Dev::Cpu);
        e.begin(&p).expect("begin");
        e
    };
    // Every executor made so far, and which one wrote each activation last.
    let mut execs = vec![fresh()];
    let mut latest = [0usize; Act::ALL.len()];
    execs[0].embed(&p, tokens).expect("embed");
    let mut run = |phase: Phase, execs: &mut Vec<Executor>, il: usize| {
        let mut e = fresh();
        for &act in phase.inputs() {
            let mut host = vec![0f32; p.n * act.width(m)];
            execs[latest[act as usize]]
                .read(&p, act, &mut host)
                .expect("read");
            e.write(&p, act, &host).expect("write");
        }
        if phase == Phase::Head {
            let mut out = vec![0f32; p.n * m.config.n_vocab];
            e.head(&p, 0..p.n, &mut out).expect("head");
            return out;
        }
        e.layer_phase(&p, phase, il, &mut slots).expect("phase");
        execs.push(e);
        for &act in phase.outputs() {
            latest[act as usize] = execs.len() - 1;
        }
        Vec::new()
    };
    for il in 0..m.config.n_layer {
        for phase in Phase::LAYER {
            run(phase, &mut execs, il);
        }
    }
    run(Phase::Head, &mut execs, 0)
}

fn check(spec: GenSpec) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.gguf");
    std::fs::write(&path, to_bytes(&spec, Vocab::Bytes).expect("generate")).expect("write");
    let m = Model::load(&path).expect("load");
    let pool = ThreadPool::new(2);
    let tokens = [1u32, 7, 3, 9, 4];
    let mut ctx = m.new_context(64, Arc::new(ThreadPool::new(2)));
    let want = m.forward(&mut ctx, &tokens, Logits::All).expect("forward");
    assert_eq!(
        phase_by_phase(&m, &pool, &tokens),
        want,
        "{:?}: a phase reads an activation it does not declare",
        spec.arch
    );
}

#[test]
fn each_phase_needs_only_its_declared_inputs() {
    for arch in [Arch::Llama, Arch::Gemma3, Arch::Qwen3Moe, Arch::Qwen2] {
        check(GenSpec::tiny(arch));
    }
}

#[test]
fn the_default_placement_is_every_phase_on_the_cpu() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.gguf");
    let spec = GenSpec::tiny(Arch::Llama);
    std::fs::write(&path, to_bytes(&spec, Vocab::Bytes).expect("generate")).expect("write");
    let m = Model::load(&path).expect("load");
    let p = m.placement();
    assert_eq!((p.embed, p.head), (Dev::Cpu, Dev::Cpu));
    assert_eq!(p.layers.len(), m.config.n_layer);
    assert!(
        p.layers
            .iter()
            .all(|l| *l == super::PhasePlacement::all(Dev::Cpu))
    );
}

/// Each phase of every layer on the CPU and on the simulated GPU from the same inputs: which
/// phase's outputs differ, and by how much (relative to the output's largest value).
fn gpu_phase_differences(spec: GenSpec, tokens: &[u32]) -> Vec<(usize, Phase, f32)> {
    use crate::model::{DeviceSpec, GpuOptions, ModelOptions};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.gguf");
    std::fs::write(&path, to_bytes(&spec, Vocab::Bytes).expect("generate")).expect("write");
    let opts = ModelOptions {
        gpu: GpuOptions {
            device: DeviceSpec::Sim(strata_kernels::SimConfig {
                memory: 256 << 20,
                ..strata_kernels::SimConfig::default()
            }),
            ..GpuOptions::default()
        },
        keep_file_layout: true,
        ..ModelOptions::default()
    };
    let m = Model::load_with(&path, &opts).expect("load");
    let pool = ThreadPool::new(2);
    let p = Pass {
        model: &m,
        pool: &pool,
        n: tokens.len(),
    };
    let mut cctx = m.new_context(64, Arc::new(ThreadPool::new(1)));
    let mut gctx = m.new_context(64, Arc::new(ThreadPool::new(1)));
    let mut cpu = Executor::new(Dev::Cpu);
    let mut gpu = Executor::new(Dev::Gpu);
    cpu.begin(&p).expect("begin");
    gpu.begin(&p).expect("begin");
    cpu.embed(&p, tokens).expect("embed");
    let mut out = Vec::new();
    for il in 0..m.config.n_layer {
        for phase in Phase::LAYER {
            for &act in phase.inputs() {
                let mut host = vec![0f32; p.n * act.width(&m)];
                cpu.read(&p, act, &mut host).expect("read");
                gpu.write(&p, act, &host).expect("write");
            }
            let mut cs = [Slot {
                kv: &mut cctx.kv,
                pos0: 0,
                row0: 0,
                n: tokens.len(),
            }];
            let mut gs = [Slot {
                kv: &mut gctx.kv,
                pos0: 0,
                row0: 0,
                n: tokens.len(),
            }];
            cpu.layer_phase(&p, phase, il, &mut cs).expect("cpu phase");
            gpu.layer_phase(&p, phase, il, &mut gs).expect("gpu phase");
            let mut worst = 0f32;
            for &act in phase.outputs() {
                let len = p.n * act.width(&m);
                let (mut a, mut b) = (vec![0f32; len], vec![0f32; len]);
                cpu.read(&p, act, &mut a).expect("read");
                gpu.read(&p, act, &mut b).expect("read");
                let scale = a.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
                let e = a
                    .iter()
                    .zip(&b)
                    .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
                    / scale;
                worst = worst.max(e);
            }
            out.push((il, phase, worst));
        }
    }
    out
}

/// From the same inputs, every phase on the simulated GPU gives the CPU's outputs to rounding.
/// The projections agree bit for bit but where an activation falls exactly half-way between two
/// quantization levels: the GPU rounds it away from zero (ggml's reference and CUDA kernels),
/// the CPU's AVX2 quantizer to even (ggml's AVX2 path), one level apart — a few 1e-4 of the
/// output. Attention differs where the CPU rounds probabilities to f16 and the GPU keeps them
/// in f32 (decode) or rounds before normalising (prefill): a few 1e-4 too.
#[test]
fn gpu_phases_match_the_cpu_from_the_same_inputs() {
    for arch in [Arch::Llama, Arch::Gemma3, Arch::Qwen2, Arch::Qwen3] {
        let mut spec = GenSpec::tiny(arch);
        spec.n_layer = 3;
        for n in [1usize, 4, 7, 12] {
            let tokens: Vec<u32> = (0..n as u32).map(|i| (i * 37 + 5) % 250).collect();
            for (il, phase, e) in gpu_phase_differences(spec.clone(), &tokens) {
                assert!(
                    e < 2e-3,
                    "{arch:?}, {n} tokens, layer {il} {phase:?}: {e:.2e}"
                );
            }
        }
    }
}
