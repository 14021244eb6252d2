//! Cross-layer expert prediction: when a MoE model's experts stream from disk, guess which
//! experts the next layers will route to and read them while this layer computes.
//!
//! The policy is the model's, whatever the device: an executor hands it the router
//! probabilities it computed (a closure applies a router matrix to the FFN input) and the
//! routing each MoE layer really chose; this module decides what to read ahead, learns the
//! per-layer activation-frequency prior, and scores each guess (precision and recall).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::moe::{route, softmax_rows};
use super::{Ffn, Mat, Model};
use crate::error::EngineError;

/// How the next layer's experts are fetched ahead when they stream from disk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ExpertPrefetch {
    /// Guess with the next layer's router on this layer's input (the default).
    #[default]
    Predict,
    /// No read-ahead: every expert is read when its layer needs it.
    Off,
    /// Predict, and record which experts each MoE layer call really used.
    Record,
    /// Read ahead exactly the experts a recorded run used (a perfect-knowledge oracle).
    Replay(Arc<Vec<Vec<usize>>>),
}

/// The prediction policy's settings. The CLI and the daemon read them once from the
/// environment ([`ExpertSettings::from_vars`]) and pass them in at load.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertSettings {
    /// How experts are read ahead at first (`STRATA_EXPERT_PREFETCH=off`: no guesses, for a
    /// disk too slow to spare reads).
    pub prefetch: ExpertPrefetch,
    /// MoE layers ahead whose experts are guessed and read (`STRATA_EXPERT_LOOKAHEAD`, 1 to
    /// 8): further guesses are less often right but give the disk more time.
    pub lookahead: usize,
    /// λ, the weight of the activation-frequency prior in a guess (`STRATA_EXPERT_PRIOR`, 0
    /// to 1).
    pub prior: f32,
    /// Extra experts guessed per token beyond the `k` the router will pick
    /// (`STRATA_EXPERT_MARGIN`, at most 64): more guesses raise recall but spend disk
    /// bandwidth on wrong ones.
    pub margin: usize,
}

impl Default for ExpertSettings {
    fn default() -> Self {
        Self {
            prefetch: ExpertPrefetch::Predict,
            lookahead: 2,
            prior: 0.2,
            margin: 0,
        }
    }
}

impl ExpertSettings {
    /// The settings from variables as `var` looks them up (the process environment, at the
    /// edge: `|k| std::env::var(k).ok()`); unset ones keep their defaults, and a value that
    /// does not parse or is out of range is an error naming the variable.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let mut s = Self::default();
        if let Some(v) = var("STRATA_EXPERT_PREFETCH") {
            s.prefetch = match v.as_str() {
                "off" => ExpertPrefetch::Off,
                "predict" | "on" | "" => ExpertPrefetch::Predict,
                _ => {
                    return Err(format!(
                        "STRATA_EXPERT_PREFETCH={v:?}: expected \"off\" or \"predict\""
                    ));
                }
            };
        }
        fn num<T: std::str::FromStr + PartialOrd + std::fmt::Display>(
            var: &impl Fn(&str) -> Option<String>,
            name: &str,
            range: std::ops::RangeInclusive<T>,
            into: &mut T,
        ) -> Result<(), String> {
            let Some(v) = var(name) else { return Ok(()) };
            match v.trim().parse::<T>() {
                Ok(x) if range.contains(&x) => {
                    *into = x;
                    Ok(())
                }
                _ => Err(format!(
                    "{name}={v:?}: expected a number from {} to {}",
                    range.start(),
                    range.end()
                )),
            }
        }
        num(&var, "STRATA_EXPERT_LOOKAHEAD", 1..=8, &mut s.lookahead)?;
        num(&var, "STRATA_EXPERT_PRIOR", 0.0..=1.0, &mut s.prior)?;
        num(&var, "STRATA_EXPERT_MARGIN", 0..=64, &mut s.margin)?;
        Ok(s)
    }
}

#[derive(Default)]
pub(crate) struct ExpertControl {
    pub mode: ExpertPrefetch,
    /// MoE layer calls so far (the index into a recording).
    pub calls: usize,
    pub log: Vec<Vec<usize>>,
    /// Per layer, each expert's decayed count of routed tokens: the activation-frequency
    /// prior that predictions are blended with.
    pub prior: Vec<Vec<f32>>,
}

/// Experts guessed for the next layer, experts it really used, and guesses that were right.
#[derive(Default)]
pub(crate) struct PredictionCounters {
    pub guessed: AtomicU64,
    pub actual: AtomicU64,
    pub right: AtomicU64,
}

/// Precision and recall of expert prediction so far.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PredictionStats {
    pub guessed: u64,
    pub actual: u64,
    pub right: u64,
}

impl PredictionStats {
    /// Share of guessed experts that were used.
    pub fn precision(&self) -> f64 {
        if self.guessed == 0 {
            0.0
        } else {
            self.right as f64 / self.guessed as f64
        }
    }

    /// Share of used experts that were guessed.
    pub fn recall(&self) -> f64 {
        if self.actual == 0 {
            0.0
        } else {
            self.right as f64 / self.actual as f64
        }
    }
}

/// Per-call decay of the activation-frequency prior (a half-life of about 14 calls).
const PRIOR_DECAY: f32 = 0.95;

/// The prediction's buffers, kept by an executor between steps so that guessing allocates
/// nothing once warm.
#[derive(Default)]
pub(crate) struct Guesses {
    /// Experts guessed for this layer and for the next (one flag per expert; empty when not
    /// predicting).
    pred: Vec<bool>,
    pred_next: Vec<bool>,
    /// Router probabilities of the layer being predicted, and their top picks.
    router: Vec<f32>,
    route: Vec<(usize, f32)>,
    /// Per expert: guessed for the layer being predicted, and the guess's summed probability.
    pick: Vec<bool>,
    score: Vec<f32>,
    /// A guess as a list, the likeliest first.
    guess: Vec<usize>,
}

impl Guesses {
    /// Moves on to the next layer: the guess made for it is scored when it runs.
    pub(crate) fn next_layer(&mut self) {
        std::mem::swap(&mut self.pred, &mut self.pred_next);
    }
}

impl Model {
    /// Cross-layer expert prediction at layer `il` for a batch of `n` rows: when the next
    /// layers' experts stream from disk, apply the routers of the next `lookahead` MoE layers
    /// to this layer's FFN input (the residual stream changes little from layer to layer) and
    /// read their likely experts (top-k plus a margin) while this layer computes, the next
    /// layer's first and the likeliest first. `router(m, out)` writes the router `m`'s logits
    /// for the batch's FFN input into `out` (`n` rows of `n_expert`). The next layer's guess
    /// is kept in `g` and scored against the real routing when that layer runs.
    pub(crate) fn predict_experts(
        &self,
        g: &mut Guesses,
        il: usize,
        n: usize,
        mut router: impl FnMut(Mat, &mut [f32]) -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        g.pred_next.clear();
        let Some(mc) = self.config.moe else {
            return Ok(());
        };
        let ne = mc.n_expert;
        let set = &self.expert_settings;
        // The MoE calls made so far, and the recorded routing when replaying.
        let (calls, log) = {
            let c = self.experts.lock().unwrap_or_else(|p| p.into_inner());
            match &c.mode {
                ExpertPrefetch::Off => return Ok(()),
                ExpertPrefetch::Replay(log) => (c.calls, Some(Arc::clone(log))),
                _ => (c.calls, None),
            }
        };
        let is_moe = matches!(self.layers.get(il).map(|l| &l.ffn), Some(Ffn::Moe(_)));
        let mut ahead = 0;
        for (d, layer) in self.layers.iter().enumerate().skip(il + 1) {
            let Ffn::Moe(next) = &layer.ffn else {
                continue;
            };
            ahead += 1;
            if ahead > set.lookahead {
                break;
            }
            if !self.weights.experts_streamed(next.gate.mat.id) {
                continue;
            }
            g.pick.clear();
            g.pick.resize(ne, false);
            g.score.clear();
            g.score.resize(ne, 0.0);
            match &log {
                // The MoE call of layer `d` is `ahead` calls after this layer's (or, when
                // this layer is dense, after the last one).
                Some(log) => {
                    let call = calls + ahead - usize::from(!is_moe);
                    for &x in log.get(call).map(Vec::as_slice).unwrap_or(&[]) {
                        if x < ne {
                            g.pick[x] = true;
                        }
                    }
                }
                None => {
                    g.router.resize(n * ne, 0.0);
                    router(next.router, &mut g.router)?;
                    softmax_rows(&mut g.router[..n * ne], ne);
                    // Blended with the layer's activation-frequency prior:
                    // (1 − λ)·p(router) + λ·π(layer).
                    let lambda = set.prior;
                    if lambda > 0.0 {
                        let c = self.experts.lock().unwrap_or_else(|p| p.into_inner());
                        if let Some(f) = c.prior.get(d).filter(|f| f.len() == ne) {
                            let total: f32 = f.iter().sum();
                            if total > 0.0 {
                                for row in g.router[..n * ne].chunks_exact_mut(ne) {
                                    row.iter_mut().zip(f).for_each(|(p, &v)| {
                                        *p = (1.0 - lambda) * *p + lambda * v / total
                                    });
                                }
                            }
                        }
                    }
                    let k = (mc.n_expert_used + set.margin).min(ne);
                    // `route` takes logits: the logarithm keeps the order.
                    g.router[..n * ne]
                        .iter_mut()
                        .for_each(|p| *p = p.max(f32::MIN_POSITIVE).ln());
                    route(&mut g.router, &mut g.route, n, ne, k, false);
                    // Ranked by probability summed over the batch's tokens.
                    for &(ex, w) in &g.route {
                        g.pick[ex] = true;
                        g.score[ex] += w;
                    }
                }
            }
            if d == il + 1 {
                g.pred_next.clone_from(&g.pick);
            }
            // The likeliest first: read first, and the last to be dropped when the routing
            // comes before they are read.
            g.guess.clear();
            g.guess.extend((0..ne).filter(|&x| g.pick[x]));
            let score = &g.score;
            g.guess
                .sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
            let ids = [next.gate.mat.id, next.up.mat.id, next.down.mat.id];
            self.weights.prefetch_experts(&ids, &g.guess)?;
        }
        Ok(())
    }

    /// Adds layer `il`'s routing to its activation-frequency prior, decayed per call so that
    /// it follows the text. Only while predicting.
    pub(crate) fn learn_prior(&self, route: &[(usize, f32)], il: usize) {
        let Some(mc) = self.config.moe else { return };
        if !self.weights.experts_streamed_any() {
            return;
        }
        let mut c = self.experts.lock().unwrap_or_else(|p| p.into_inner());
        if !matches!(c.mode, ExpertPrefetch::Predict) {
            return;
        }
        if c.prior.len() <= il {
            c.prior.resize_with(il + 1, Vec::new);
        }
        let f = &mut c.prior[il];
        f.resize(mc.n_expert, 0.0);
        f.iter_mut().for_each(|v| *v *= PRIOR_DECAY);
        for &(ex, _) in route {
            if let Some(v) = f.get_mut(ex) {
                *v += 1.0;
            }
        }
    }

    /// Precision and recall of the last guess against `used` (per expert, whether this MoE
    /// call routed a token to it); counts the MoE call and records its experts when
    /// recording.
    pub(crate) fn score_prediction(&self, g: &Guesses, used: &[bool]) {
        let ne = used.len();
        {
            let mut c = self.experts.lock().unwrap_or_else(|p| p.into_inner());
            c.calls += 1;
            if matches!(c.mode, ExpertPrefetch::Record) {
                c.log.push((0..ne).filter(|&x| used[x]).collect());
            }
        }
        if g.pred.len() != ne {
            return;
        }
        let guessed = g.pred.iter().filter(|&&p| p).count() as u64;
        let actual = used.iter().filter(|&&u| u).count() as u64;
        let right = (0..ne).filter(|&x| used[x] && g.pred[x]).count() as u64;
        let p = &self.prediction;
        p.guessed.fetch_add(guessed, Relaxed);
        p.actual.fetch_add(actual, Relaxed);
        p.right.fetch_add(right, Relaxed);
    }

    /// Chooses how experts are read ahead (see [`ExpertPrefetch`]); resets the call count, and
    /// returns the routing recorded since the last call.
    pub fn set_expert_prefetch(&self, mode: ExpertPrefetch) -> Vec<Vec<usize>> {
        let mut c = self.experts.lock().unwrap_or_else(|p| p.into_inner());
        c.mode = mode;
        c.calls = 0;
        c.prior.clear();
        std::mem::take(&mut c.log)
    }

    /// How well the next layer's experts were predicted (all zero unless experts stream).
    pub fn prediction_stats(&self) -> PredictionStats {
        let p = &self.prediction;
        PredictionStats {
            guessed: p.guessed.load(Relaxed),
            actual: p.actual.load(Relaxed),
            right: p.right.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_come_from_the_variables_and_bad_values_name_theirs() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            ExpertSettings::from_vars(vars(&[])).unwrap(),
            ExpertSettings::default()
        );
        let s = ExpertSettings::from_vars(vars(&[
            ("STRATA_EXPERT_PREFETCH", "off"),
            ("STRATA_EXPERT_LOOKAHEAD", "3"),
            ("STRATA_EXPERT_PRIOR", "0.5"),
            ("STRATA_EXPERT_MARGIN", "2"),
        ]))
        .unwrap();
        assert_eq!(s.prefetch, ExpertPrefetch::Off);
        assert_eq!((s.lookahead, s.prior, s.margin), (3, 0.5, 2));
        for (k, v) in [
            ("STRATA_EXPERT_LOOKAHEAD", "9"),
            ("STRATA_EXPERT_PRIOR", "x"),
            ("STRATA_EXPERT_MARGIN", "-1"),
            ("STRATA_EXPERT_PREFETCH", "sometimes"),
        ] {
            let e =
                ExpertSettings::from_vars(|n: &str| (n == k).then(|| v.to_string())).unwrap_err();
            assert!(e.contains(k), "{e}");
        }
    }
}
