//! Token sampling: greedy, or llama.cpp's chain — repetition penalty, top-k, top-p, min-p,
//! temperature — then a seeded draw.

use std::collections::VecDeque;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplerConfig {
    /// 0 (or less) means greedy.
    pub temp: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0.0 disables.
    pub min_p: f32,
    /// 1.0 disables.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplerConfig {
    /// llama.cpp's defaults.
    fn default() -> Self {
        Self {
            temp: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0xFFFF_FFFF,
        }
    }
}

impl SamplerConfig {
    pub fn greedy() -> Self {
        Self {
            temp: 0.0,
            ..Self::default()
        }
    }

    /// Rejects values no sampler could honour.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temp.is_finite() {
            return Err(format!("temperature must be finite, got {}", self.temp));
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return Err(format!("top-p must be in [0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min-p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return Err(format!(
                "repeat penalty must be positive, got {}",
                self.repeat_penalty
            ));
        }
        Ok(())
    }
}

pub struct Sampler {
    cfg: SamplerConfig,
    rng: SplitMix64,
    recent: VecDeque<u32>,
    cand: Vec<(u32, f32)>,
    weights: Vec<f64>,
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Self {
        Self {
            rng: SplitMix64(cfg.seed),
            recent: VecDeque::with_capacity(cfg.repeat_last_n),
            cand: Vec::new(),
            weights: Vec::new(),
            cfg,
        }
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// Records a token (prompt or generated) for the repetition penalty.
    pub fn accept(&mut self, tok: u32) {
        if self.cfg.repeat_last_n == 0 {
            return;
        }
        if self.recent.len() == self.cfg.repeat_last_n {
            self.recent.pop_front();
        }
        self.recent.push_back(tok);
    }

    pub fn reset(&mut self) {
        self.recent.clear();
    }

    /// Picks the next token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        match self.candidates(logits, &[]) {
            Pick::One(id) => id,
            Pick::Weighted(total) => {
                let r = self.rng.next_f64() * total;
                self.draw_weighted(r)
            }
        }
    }

    /// The distribution [`Sampler::sample`] draws from for `logits`, as if the `pending`
    /// tokens had been accepted after the recent ones: `out` is cleared and filled with
    /// (token, probability), the probabilities summing to 1 (greedy: one token, probability
    /// 1). Speculative decoding judges drafted tokens against it, so that what it emits is
    /// distributed exactly as what `sample` would have drawn.
    pub fn distribution(&mut self, logits: &[f32], pending: &[u32], out: &mut Vec<(u32, f64)>) {
        out.clear();
        match self.candidates(logits, pending) {
            Pick::One(id) => out.push((id, 1.0)),
            Pick::Weighted(total) => out.extend(
                self.cand
                    .iter()
                    .zip(&self.weights)
                    .map(|(&(id, _), &w)| (id, w / total)),
            ),
        }
    }

    /// A uniform draw from [0, 1) off the sampler's seeded generator.
    pub fn uniform(&mut self) -> f64 {
        self.rng.next_f64()
    }

    /// Draws a token from `weights` (token, weight ≥ 0), in proportion to the weights; `None`
    /// when they sum to zero.
    pub fn draw(&mut self, weights: &[(u32, f64)]) -> Option<u32> {
        let total: f64 = weights.iter().map(|&(_, w)| w.max(0.0)).sum();
        if total <= 0.0 || !total.is_finite() {
            return None;
        }
        let mut r = self.rng.next_f64() * total;
        let mut last = None;
        for &(id, w) in weights {
            let w = w.max(0.0);
            if w > 0.0 {
                if r < w {
                    return Some(id);
                }
                r -= w;
                last = Some(id);
            }
        }
        last
    }

    /// Runs the chain (penalties over the recent tokens and `pending`, top-k, top-p, min-p,
    /// temperature) and leaves the survivors in `cand` and their weights in `weights`.
    fn candidates(&mut self, logits: &[f32], pending: &[u32]) -> Pick {
        let c = &self.cfg;
        let window = if c.repeat_last_n == 0 {
            0
        } else {
            (self.recent.len() + pending.len()).min(c.repeat_last_n)
        };
        let penalised = c.repeat_penalty != 1.0 && window > 0;
        if c.temp <= 0.0 && !penalised {
            return Pick::One(argmax(logits));
        }
        self.cand.clear();
        self.cand
            .extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        if penalised {
            let skip = self.recent.len() + pending.len() - window;
            for &t in self.recent.iter().chain(pending).skip(skip) {
                if let Some(e) = self.cand.get_mut(t as usize) {
                    e.1 = if e.1 > 0.0 {
                        e.1 / c.repeat_penalty
                    } else {
                        e.1 * c.repeat_penalty
                    };
                }
            }
        }
        if c.temp <= 0.0 {
            return Pick::One(
                self.cand
                    .iter()
                    .fold((0u32, f32::NEG_INFINITY), |best, &(i, l)| {
                        if l > best.1 { (i, l) } else { best }
                    })
                    .0,
            );
        }
        // Sort descending by logit, keeping only top-k (the whole vocab when disabled).
        let k = if c.top_k == 0 {
            self.cand.len()
        } else {
            c.top_k.min(self.cand.len())
        };
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
        if k < self.cand.len() {
            self.cand.select_nth_unstable_by(k - 1, by_logit);
            self.cand.truncate(k);
        }
        self.cand.sort_unstable_by(by_logit);
        // Softmax (before temperature, as llama.cpp's top-p/min-p see it).
        let max = self.cand[0].1;
        let mut probs: Vec<f32> = self.cand.iter().map(|&(_, l)| (l - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        let mut keep = probs.len();
        if c.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, p) in probs.iter().enumerate() {
                cum += p;
                if cum >= c.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if c.min_p > 0.0 {
            let floor = probs[0] * c.min_p;
            keep = keep.min(probs.iter().take_while(|&&p| p >= floor).count().max(1));
        }
        self.cand.truncate(keep);
        // Temperature.
        self.weights.clear();
        self.weights.extend(
            self.cand
                .iter()
                .map(|&(_, l)| (((l - max) / c.temp) as f64).exp()),
        );
        Pick::Weighted(self.weights.iter().sum())
    }

    /// The candidate that a draw `r` in [0, total) lands on.
    fn draw_weighted(&self, mut r: f64) -> u32 {
        for (&(id, _), w) in self.cand.iter().zip(&self.weights) {
            if r < *w {
                return id;
            }
            r -= w;
        }
        self.cand[self.cand.len() - 1].0
    }
}

/// What the chain left: one certain token, or the candidates' weights and their sum.
enum Pick {
    One(u32),
    Weighted(f64),
}

/// Index of the largest value; the first one on ties, as llama.cpp's greedy sampler picks.
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// A small, fast, seedable generator (SplitMix64), shared with `synth`; sampling needs reproducibility, not
/// cryptographic strength.
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_first_max() {
        let mut s = Sampler::new(SamplerConfig::greedy());
        assert_eq!(s.sample(&[0.1, 2.0, 2.0, -1.0]), 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_top_k() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let cfg = SamplerConfig {
            temp: 1.0,
            top_k: 5,
            top_p: 1.0,
            min_p: 0.0,
            seed: 42,
            ..SamplerConfig::default()
        };
        let mut top: Vec<u32> = (0..100).collect();
        top.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        let a: Vec<u32> = {
            let mut s = Sampler::new(cfg.clone());
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(cfg);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        assert!(a.iter().all(|t| top[..5].contains(t)));
        assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 1);
    }

    #[test]
    fn repeat_penalty_discourages_recent() {
        let mut s = Sampler::new(SamplerConfig {
            repeat_penalty: 2.0,
            ..SamplerConfig::greedy()
        });
        s.accept(0);
        assert_eq!(s.sample(&[3.0, 2.0, 1.0]), 1);
    }

    #[test]
    fn validate_rejects_nonsense() {
        let bad = SamplerConfig {
            top_p: 1.5,
            ..SamplerConfig::default()
        };
        assert!(bad.validate().is_err());
        assert!(SamplerConfig::default().validate().is_ok());
    }
}
