use super::ngram::{NgramMap, lookup_scan};
use super::tune::Tuner;
use super::verify::{Verdict, judge};
use crate::sampler::{Sampler, SamplerConfig};

/// The 1 − 10⁻⁶ quantile of χ² with `df` degrees of freedom (index `df`): a correct sampler
/// fails a test at this threshold once in a million seeds, and each test's seed is fixed, so
/// it is not flaky; a sampler off by a few percent in one cell, over the draws below, lands far
/// beyond it (a shift δ of a cell of probability p adds about N·δ²/p: 40 000 draws, δ = 0.02,
/// p = 0.3 add 53).
const CHI2_1E6: [f64; 11] = [
    0.0, 23.93, 27.63, 30.66, 33.38, 35.89, 38.26, 40.52, 42.70, 44.81, 46.86,
];

const LOGITS: [f32; 10] = [2.0, 1.7, 1.5, 0.3, 1.1, -0.5, 0.9, -2.0, 1.6, 0.0];

/// The target's sampler: llama.cpp's whole chain at temperature 0.8, with a repetition
/// penalty over recent tokens.
fn target_cfg(seed: u64) -> SamplerConfig {
    SamplerConfig {
        temp: 0.8,
        top_k: 7,
        top_p: 0.97,
        min_p: 0.02,
        repeat_penalty: 1.3,
        repeat_last_n: 4,
        seed,
    }
}

fn target(seed: u64) -> Sampler {
    let mut s = Sampler::new(target_cfg(seed));
    // Token 0 is the likeliest but recent; the window holds 4 with the pending one below.
    for t in [9, 0, 0, 2] {
        s.accept(t);
    }
    s
}

/// The pending token the judged position comes after (accepted earlier in the same draft).
const PENDING: [u32; 1] = [8];

/// χ² of `counts` against `p` over `p`'s support; panics on a token outside it.
fn chi2(counts: &[u64], p: &[(u32, f64)], n: u64) -> (f64, usize) {
    for (id, &c) in counts.iter().enumerate() {
        if c > 0 {
            assert!(
                p.iter().any(|&(i, _)| i as usize == id),
                "token {id} drawn {c} times, outside the target's support {p:?}"
            );
        }
    }
    let x = p
        .iter()
        .map(|&(id, pr)| {
            let e = pr * n as f64;
            (counts[id as usize] as f64 - e).powi(2) / e
        })
        .sum();
    (x, p.len() - 1)
}

fn assert_fits(what: &str, counts: &[u64], p: &[(u32, f64)], n: u64) {
    let (x, df) = chi2(counts, p, n);
    assert!(
        x < CHI2_1E6[df],
        "{what}: χ² = {x:.1} over {df} degrees of freedom (threshold {}); counts {counts:?}, p {p:?}",
        CHI2_1E6[df]
    );
}

fn target_p() -> Vec<(u32, f64)> {
    let mut p = Vec::new();
    target(1).distribution(&LOGITS, &PENDING, &mut p);
    p
}

#[test]
fn distribution_is_what_sample_draws() {
    let p = target_p();
    assert!(
        p.len() >= 4 && p.len() < LOGITS.len(),
        "the chain prunes: {p:?}"
    );
    let total: f64 = p.iter().map(|e| e.1).sum();
    assert!((total - 1.0).abs() < 1e-9);
    let n = 40_000;
    let mut s = target(7);
    s.accept(PENDING[0]);
    let mut counts = vec![0u64; LOGITS.len()];
    for _ in 0..n {
        counts[s.sample(&LOGITS) as usize] += 1;
    }
    assert_fits("sample", &counts, &p, n);
}

#[test]
fn speculative_sampling_with_a_lookup_draft_draws_from_the_target() {
    let p = target_p();
    let n = 40_000;
    // The likeliest token, a middling one, one the chain pruned, and the penalised one.
    for (seed, d) in [(11, 1u32), (12, 6), (13, 7), (14, 0)] {
        let mut s = target(seed);
        let (mut pd, mut res) = (Vec::new(), Vec::new());
        let mut counts = vec![0u64; LOGITS.len()];
        let mut kept = 0u64;
        for _ in 0..n {
            s.distribution(&LOGITS, &PENDING, &mut pd);
            let t = match judge(&pd, d, None, &mut s, &mut res) {
                Verdict::Accept => {
                    kept += 1;
                    d
                }
                Verdict::Reject(x) => x,
            };
            counts[t as usize] += 1;
        }
        assert_fits(&format!("draft {d}"), &counts, &p, n);
        let pd_d = p.iter().find(|e| e.0 == d).map_or(0.0, |e| e.1);
        // Kept with probability p(d): within 6 standard deviations.
        let sd = (pd_d * (1.0 - pd_d) / n as f64).sqrt();
        assert!((kept as f64 / n as f64 - pd_d).abs() <= 6.0 * sd + 1e-12);
    }
}

#[test]
fn speculative_sampling_with_a_draft_distribution_draws_from_the_target() {
    let p = target_p();
    let n = 40_000;
    // A draft model's sampler: other logits, no pruning, its own temperature.
    let draft_logits: [f32; 10] = [1.0, 2.0, 0.2, 0.8, 1.4, 0.5, 1.2, 0.6, 0.3, 0.1];
    let mut draft = Sampler::new(SamplerConfig {
        temp: 1.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        repeat_penalty: 1.0,
        repeat_last_n: 0,
        seed: 99,
    });
    let mut q = Vec::new();
    draft.distribution(&draft_logits, &[], &mut q);
    assert_eq!(q.len(), 10);
    let mut s = target(21);
    let (mut pd, mut res) = (Vec::new(), Vec::new());
    let mut counts = vec![0u64; LOGITS.len()];
    for _ in 0..n {
        let d = draft.draw(&q).expect("q sums to 1");
        s.distribution(&LOGITS, &PENDING, &mut pd);
        let t = match judge(&pd, d, Some(&q), &mut s, &mut res) {
            Verdict::Accept => d,
            Verdict::Reject(x) => x,
        };
        counts[t as usize] += 1;
    }
    assert_fits("draft model", &counts, &p, n);
}

#[test]
fn greedy_judging_keeps_exactly_the_argmax_and_draws_nothing() {
    let mut s = Sampler::new(SamplerConfig::greedy());
    let mut p = Vec::new();
    s.distribution(&LOGITS, &[], &mut p);
    assert_eq!(p, vec![(0, 1.0)]);
    let mut res = Vec::new();
    assert_eq!(judge(&p, 0, None, &mut s, &mut res), Verdict::Accept);
    assert_eq!(judge(&p, 3, None, &mut s, &mut res), Verdict::Reject(0));
    // No randomness was used: the generator is where a fresh one starts.
    assert_eq!(s.uniform(), Sampler::new(SamplerConfig::greedy()).uniform());
}

#[test]
fn lookup_finds_the_latest_earlier_occurrence() {
    let seq = [1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 6, 2, 3];
    let mut out = Vec::new();
    // "2 3" last seen before the end at 7..9, followed by 7 8 6.
    lookup_scan(&seq, 3, &mut out);
    assert_eq!(out, [7, 8, 6]);
    lookup_scan(&[5, 6, 7], 4, &mut out);
    assert!(out.is_empty());
    let mut m = NgramMap::default();
    let hist = [10, 11, 12, 13, 14, 10, 11];
    m.propose(&hist, 12, 4, &mut out);
    assert_eq!(out, [13, 14, 10, 11]);
    // Cut back and replaced: the map forgets the old tokens.
    m.propose(&[10, 11, 12, 99, 14, 10, 11], 12, 4, &mut out);
    assert_eq!(out, [99, 14, 10, 11]);
    m.propose(&[1, 2], 3, 4, &mut out);
    assert!(out.is_empty());
}

#[test]
fn the_tuner_drafts_where_passes_are_cheap_and_backs_off_where_not() {
    // Streaming: a pass over 16 tokens costs what one does.
    let mut t = Tuner::new(1, 15);
    for m in 1..=16 {
        t.pass_timed(m, 0.3);
    }
    for _ in 0..20 {
        t.judged(3, true);
    }
    assert!(t.choose(100) >= 4, "chose {}", t.choose(100));
    assert_eq!(t.choose(2), 2, "capped by the room left");
    // Resident: a pass costs in proportion to its tokens; nothing pays.
    let mut r = Tuner::new(1, 15);
    for m in 1..=16 {
        r.pass_timed(m, 0.02 * m as f64);
    }
    for _ in 0..20 {
        r.judged(3, true);
    }
    assert_eq!(r.choose(100), 0);
    // Drafts that are never right stop being tried once a pass over more tokens costs a
    // little more (with passes exactly free, any acceptance at all pays).
    let mut w = Tuner::new(1, 15);
    for m in 1..=16 {
        w.pass_timed(m, 0.3 * (1.0 + 0.1 * (m - 1) as f64));
    }
    assert!(w.choose(100) > 0, "the prior tries drafting");
    // A fresh tuner drafts one token until it has timed a pass over several.
    let mut f = Tuner::new(1, 15);
    f.pass_timed(1, 0.3);
    assert_eq!(f.choose(100), 1);
    f.pass_timed(2, 0.3);
    assert!(f.choose(100) > 1);
    for _ in 0..100 {
        w.judged(0, true);
    }
    assert_eq!(w.choose(100), 0);
    // Nothing is drafted before a plain step has been timed.
    assert_eq!(Tuner::new(1, 8).choose(100), 0);
}
