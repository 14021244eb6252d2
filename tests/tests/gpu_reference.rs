//! gemma3-270m end to end on the simulated GPU: the CPU backend's greedy tokens up to the first
//! near tie with every phase on the GPU, with half the layers there, with the weights that do
//! not fit a VRAM budget streamed to it, and with attention on the CPU; and its perplexity with
//! half the layers on the GPU within 1% of the CPU's on the same chunks.
//!
//! The simulator runs the real kernels' text on this CPU (every thread a fiber, every access
//! checked), a few seconds a token for this model: the runs are short.

use std::sync::Arc;

use strata_engine::model::{DeviceSpec, GpuOptions, ModelOptions};
use strata_engine::perplexity::perplexity;
use strata_engine::sampler::argmax;
use strata_engine::{Logits, Model};
use strata_kernels::SimConfig;
use strata_simd::pool::ThreadPool;
use strata_storage::residency::LoadOptions;
use strata_storage::residency::overrides::parse_overrides;
use strata_tests::{GEMMA, PERPLEXITY_FILE, model_path};

/// Top-two logits closer than this make a near tie (as greedy_reference.rs counts them).
const TIE: f32 = 0.1;
const STEPS: usize = 4;

fn sim() -> DeviceSpec {
    // The race checker's shadow costs time and found nothing in the kernel tests' many seeds;
    // bounds, barrier and shuffle checks stay on.
    DeviceSpec::Sim(SimConfig {
        memory: 1 << 30,
        check_races: false,
        ..SimConfig::default()
    })
}

fn margin(l: &[f32]) -> f32 {
    let a = argmax(l) as usize;
    let b = (0..l.len())
        .filter(|&i| i != a)
        .max_by(|&x, &y| l[x].total_cmp(&l[y]))
        .unwrap_or(a);
    l[a] - l[b]
}

/// The greedy tokens and each step's top-two margin: the prefill chooses the first token and
/// `STEPS - 1` decode steps the others (no step is run whose logits nothing reads: each costs
/// seconds on the simulator).
fn greedy(model: &Model, prompt: &[u32]) -> (Vec<u32>, Vec<f32>) {
    let mut ctx = model.new_context(64, Arc::new(ThreadPool::new(2)));
    let mut logits = model
        .forward(&mut ctx, prompt, Logits::Last)
        .expect("prefill")
        .to_vec();
    let (mut toks, mut margins) = (Vec::new(), Vec::new());
    for step in 0..STEPS {
        let t = argmax(&logits);
        toks.push(t);
        margins.push(margin(&logits));
        if step + 1 < STEPS {
            logits = model
                .forward(&mut ctx, &[t], Logits::Last)
                .expect("decode")
                .to_vec();
        }
    }
    (toks, margins)
}

fn load(gpu: GpuOptions, overrides: Option<&str>) -> Model {
    let mut residency = LoadOptions::default();
    if let Some(o) = overrides {
        residency.overrides = parse_overrides(o).expect("overrides");
    }
    let opts = ModelOptions {
        residency,
        gpu,
        ..ModelOptions::default()
    };
    Model::load_with(&model_path(GEMMA), &opts).expect("load gemma3-270m")
}

#[test]
fn gemma3_greedy_on_the_simulated_gpu_matches_the_cpu() {
    let cpu = load(GpuOptions::default(), None);
    let prompt = cpu.tokenizer.encode("The capital of France is", true, true);
    let (want, want_margins) = greedy(&cpu, &prompt);
    let size = std::fs::metadata(model_path(GEMMA)).expect("model").len();
    let cases: [(&str, GpuOptions); 4] = [
        (
            "all on the GPU",
            GpuOptions {
                device: sim(),
                ..GpuOptions::default()
            },
        ),
        (
            "-ngl 10 (half)",
            GpuOptions {
                device: sim(),
                n_gpu_layers: Some(10),
                ..GpuOptions::default()
            },
        ),
        (
            "a VRAM budget of half the model",
            GpuOptions {
                device: sim(),
                vram_budget: Some(size / 2),
                ..GpuOptions::default()
            },
        ),
        (
            "-nkvo (attention on the CPU)",
            GpuOptions {
                device: sim(),
                no_kv_offload: true,
                ..GpuOptions::default()
            },
        ),
    ];
    for (what, opts) in cases {
        let gpu = load(opts, None);
        let plan = gpu.plan().expect("a GPU plan");
        eprintln!("{what}: {} layers on the GPU", plan.gpu_layers());
        assert!(plan.gpu_layers() > 0, "{what}");
        let (got, margins) = greedy(&gpu, &prompt);
        for i in 0..STEPS {
            if want_margins[i] < TIE || margins[i] < TIE {
                break;
            }
            assert_eq!(got[i], want[i], "{what}: token {i} ({got:?} vs {want:?})");
        }
    }
}

#[test]
fn gemma3_perplexity_with_half_the_layers_on_the_simulated_gpu() {
    // Two chunks, so the GPU's KV cache is cleared and refilled between them; 64 tokens each
    // take the same kernels (prefill, attention, the layer split) as longer ones, at half the
    // simulator's time of 128.
    const CTX: usize = 64;
    let text = std::fs::read_to_string(PERPLEXITY_FILE).expect("the GPL-3 text");
    let cpu = load(GpuOptions::default(), None);
    let tokens = cpu.tokenizer.encode(&text, true, false);
    let first = &tokens[..2 * CTX];
    let mut ctx = cpu.new_context(CTX, Arc::new(ThreadPool::new(2)));
    let want = perplexity(&cpu, &mut ctx, first, CTX, |_, _| {}).expect("perplexity");
    drop(cpu);
    // Layers 9-17 on the GPU (-ngl 10 counts the output, which the override keeps on the CPU).
    let gpu = load(
        GpuOptions {
            device: sim(),
            n_gpu_layers: Some(10),
            n_ctx: Some(CTX),
            ..GpuOptions::default()
        },
        Some("token_embd=CPU"),
    );
    assert_eq!(gpu.plan().expect("plan").gpu_layers(), 9);
    let mut ctx = gpu.new_context(CTX, Arc::new(ThreadPool::new(2)));
    let got = perplexity(&gpu, &mut ctx, first, CTX, |_, _| {}).expect("perplexity");
    eprintln!(
        "gemma3-270m, {} chunks of {CTX}: CPU {:.4}, half on the GPU {:.4}",
        got.chunks, want.ppl, got.ppl
    );
    assert_eq!(got.chunks, want.chunks);
    let rel = (got.ppl - want.ppl).abs() / want.ppl;
    assert!(
        rel < 0.01,
        "PPL {:.4} is {:.2}% from the CPU's {:.4}",
        got.ppl,
        rel * 100.0,
        want.ppl
    );
}
