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
        e.begin(&p);
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
            execs[latest[act as usize]].read(act, &mut host);
            e.write(act, &host);
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
