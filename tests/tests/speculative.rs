//! Speculative decoding on the real models: greedy output with speculation is the output
//! without it, up to the first near tie, resident and under `--ram-budget 30%` (and with the KV
//! cache spilling to SSD); a draft model with the target's vocabulary is accepted and one with
//! another is refused by name.
//!
//! Speculation verifies drafted tokens in one pass over several tokens, which runs the
//! multi-token kernels where a plain step runs the one-token ones; the two agree to rounding,
//! not bit for bit (see `greedy_reference.rs`), so where the plain run's top two logits are
//! within [`TIE`] the runs may part, and only the tokens before that are compared.

use std::path::Path;
use std::sync::Arc;

use strata_engine::kv::{KvOptions, SpillConfig};
use strata_engine::model::ModelOptions;
use strata_engine::sampler::{Sampler, SamplerConfig, argmax};
use strata_engine::spec::{Draft, DraftModel, SpecConfig, SpecStats, SpecType, Speculator};
use strata_engine::{Logits, Model};
use strata_simd::pool::ThreadPool;
use strata_storage::residency::LoadOptions;
use strata_tests::{GEMMA, QWEN, model_path};

const TIE: f32 = 0.1;
const N_GEN: usize = 16;
/// A prompt an answer copies from: lookup drafts are mostly right, and now and then wrong.
const PROMPT: &str = "fn add(a: i32, b: i32) -> i32 { a + b }\nfn sub(a: i32, b: i32) -> i32 { a - b }\nfn mul(a: i32, b: i32) -> i32 {";

fn load(path: &Path, budget_pct: Option<u64>) -> Model {
    let ram_budget =
        budget_pct.map(|p| std::fs::metadata(path).expect("model file").len() * p / 100);
    let opts = ModelOptions::from(LoadOptions {
        ram_budget,
        ..LoadOptions::default()
    });
    Model::load_with(path, &opts).expect("load model")
}

/// `N_GEN` greedy tokens after the prompt, through `spec`; with the margin between the top two
/// logits at each step when the run is plain (a speculating run's rows come in batches).
fn generate(
    model: &Model,
    spec: &mut Speculator,
    kv: &KvOptions,
    pool: &Arc<ThreadPool>,
) -> (Vec<u32>, Vec<f32>) {
    let prompt = model.tokenizer.encode(PROMPT, true, true);
    let mut ctx = model
        .new_context_with(512, pool.clone(), kv)
        .expect("context");
    let mut sampler = Sampler::new(SamplerConfig::greedy());
    let logits = model
        .forward(&mut ctx, &prompt, Logits::Last)
        .expect("prompt");
    let mut margins = vec![margin(logits)];
    let mut next = sampler.sample(logits);
    let mut history = prompt.clone();
    let mut out = vec![next];
    while out.len() < N_GEN {
        sampler.accept(next);
        if spec.active() {
            next = spec
                .next(model, &mut ctx, &mut sampler, &mut history, next)
                .expect("step");
        } else {
            let l = model
                .forward(&mut ctx, &[next], Logits::Last)
                .expect("step");
            history.push(next);
            margins.push(margin(l));
            next = sampler.sample(l);
        }
        out.push(next);
    }
    spec.settle(&mut ctx, &mut history).expect("settle");
    assert_eq!(ctx.n_past(), history.len());
    assert_eq!(history.len(), prompt.len() + N_GEN - 1);
    (out, margins)
}

fn margin(logits: &[f32]) -> f32 {
    let first = argmax(logits) as usize;
    let second = logits
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != first)
        .map(|(_, &l)| l)
        .fold(f32::NEG_INFINITY, f32::max);
    logits[first] - second
}

/// The speculating run's tokens equal the plain run's up to the plain run's first near tie.
fn assert_same_until_tie(what: &str, plain: &[u32], margins: &[f32], spec: &[u32]) {
    let tie = margins.iter().position(|&m| m < TIE).unwrap_or(plain.len());
    let first_diff = plain.iter().zip(spec).position(|(a, b)| a != b);
    if let Some(i) = first_diff {
        assert!(
            i >= tie,
            "{what}: token {i} differs ({} vs {}) before the first near tie at {tie}\nplain {plain:?}\nspec  {spec:?}",
            plain[i],
            spec[i]
        );
    }
}

fn lookup(kind: SpecType) -> Speculator {
    let cfg = SpecConfig {
        kind,
        ..SpecConfig::default()
    };
    Speculator::new(cfg.clone(), Draft::new(&cfg, None).expect("draft")).expect("speculator")
}

fn check(
    (name, model, budget): (&str, &Model, Option<u64>),
    kinds: &[SpecType],
    kv: &KvOptions,
    pool: &Arc<ThreadPool>,
) -> SpecStats {
    let what = format!(
        "{name}, budget {budget:?}%, KV spill {}",
        kv.spill.is_some()
    );
    let (plain, margins) = generate(model, &mut Speculator::plain(), kv, pool);
    let mut stats = SpecStats::default();
    for &kind in kinds {
        let mut s = lookup(kind);
        let (spec, _) = generate(model, &mut s, kv, pool);
        assert_same_until_tie(&format!("{what}, {}", kind.name()), &plain, &margins, &spec);
        stats.add(&s.stats());
    }
    stats
}

#[test]
fn greedy_speculation_matches_plain_generation_on_gemma() {
    let pool = Arc::new(ThreadPool::new(2));
    let dir = tempfile::tempdir().expect("tempdir");
    let spill = KvOptions {
        // The floor: each layer's page being filled; every full page goes to SSD.
        spill: Some(SpillConfig {
            dir: dir.path().to_path_buf(),
            ram_budget: 1,
            io: Default::default(),
        }),
        ..KvOptions::default()
    };
    let both = [SpecType::NgramSimple, SpecType::NgramMapK];
    let path = model_path(GEMMA);
    let target = Arc::new(load(&path, None));
    let streamed = load(&path, Some(30));
    let mut stats = SpecStats::default();
    stats.add(&check(
        (GEMMA, &target, None),
        &both,
        &KvOptions::default(),
        &pool,
    ));
    stats.add(&check((GEMMA, &streamed, Some(30)), &both, &spill, &pool));
    // Drafts were verified, and some were wrong: both paths of the rule ran.
    assert!(stats.verify_passes > 0 && stats.accepted > 0, "{stats:?}");
    // A draft model with the target's vocabulary: itself.
    let draft = Arc::clone(&target);
    let cfg = SpecConfig {
        kind: SpecType::Draft,
        n_max: 4,
        n_min: 0,
    };
    let d = DraftModel::new(draft, &target, 512, pool.clone(), &SamplerConfig::greedy())
        .expect("same vocabulary");
    let mut s = Speculator::new(cfg.clone(), Draft::new(&cfg, Some(d)).expect("draft"))
        .expect("speculator");
    let (plain, margins) = generate(
        &target,
        &mut Speculator::plain(),
        &KvOptions::default(),
        &pool,
    );
    let (spec, _) = generate(&target, &mut s, &KvOptions::default(), &pool);
    assert_same_until_tie("gemma drafting for itself", &plain, &margins, &spec);
}

#[test]
fn greedy_speculation_matches_plain_generation_on_qwen_and_a_foreign_draft_is_refused() {
    let pool = Arc::new(ThreadPool::new(2));
    let path = model_path(QWEN);
    let kv = KvOptions::default();
    let resident = load(&path, None);
    check(
        (QWEN, &resident, None),
        &[SpecType::NgramSimple],
        &kv,
        &pool,
    );
    drop(resident);
    let target = load(&path, Some(30));
    check(
        (QWEN, &target, Some(30)),
        &[SpecType::NgramMapK],
        &kv,
        &pool,
    );
    let gemma = Arc::new(load(&model_path(GEMMA), None));
    let err = DraftModel::new(gemma, &target, 64, pool, &SamplerConfig::greedy())
        .err()
        .expect("a draft with another vocabulary is refused");
    let msg = err.to_string();
    assert!(
        msg.contains("vocabulary") && msg.contains("262144") && msg.contains("151936"),
        "{msg}"
    );
}
