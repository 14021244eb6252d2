//! Speculative decoding: a draft proposes the next few tokens, the target model reads them all
//! in one pass ([`Model::forward`] over several tokens: every weight read once for all of
//! them, which is nearly free when weights stream from disk), and the longest prefix the
//! target's sampler agrees with is kept, plus the target's own next token. The rule that judges
//! each drafted token ([`verify::judge`]) makes the output distributed exactly as the target's
//! sampler would have drawn it; greedy output is the same tokens (up to rounding, since a pass
//! over several tokens runs other kernels than a one-token step). The KV rows of rejected
//! tokens are cut back with [`Context::truncate`], which leaves the cache as if they had never
//! been written.
//!
//! - [`SpecConfig`] is llama.cpp's flags (`--spec-type`, `--spec-draft-n-max`,
//!   `--spec-draft-n-min`, `-md`); [`Draft`] the draft: prompt lookup ([`ngram`]) or a smaller
//!   model with the same vocabulary ([`DraftModel`], resident while the target streams).
//! - [`tune::Tuner`] picks each step's draft length from the measured cost of passes and the
//!   acceptance seen so far, 0 where speculation does not pay.
//! - [`Speculator::step`] is one step of generation, speculative or plain.

pub mod ngram;
#[cfg(test)]
mod tests;
pub mod tune;
pub mod verify;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use strata_simd::pool::ThreadPool;

use crate::error::EngineError;
use crate::sampler::{Sampler, SamplerConfig};
use crate::{Context, Logits, Model};
use ngram::{NgramMap, NgramScan};
use tune::Tuner;
use verify::Verdict;

/// What proposes drafts (llama.cpp's `--spec-type`; `draft` is implied by `-md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SpecType {
    /// No speculation.
    #[default]
    None,
    /// A draft model (`-md`).
    Draft,
    /// Prompt lookup by a backward scan for the last 3 (else 2) tokens.
    NgramSimple,
    /// Prompt lookup through a map from every 3 tokens to what followed them last.
    NgramMapK,
}

impl SpecType {
    pub const NAMES: &'static str = "none, draft, ngram-simple, ngram-map-k";

    pub fn name(self) -> &'static str {
        match self {
            SpecType::None => "none",
            SpecType::Draft => "draft",
            SpecType::NgramSimple => "ngram-simple",
            SpecType::NgramMapK => "ngram-map-k",
        }
    }
}

impl FromStr for SpecType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "none" => SpecType::None,
            "draft" => SpecType::Draft,
            "ngram-simple" => SpecType::NgramSimple,
            "ngram-map-k" => SpecType::NgramMapK,
            "ngram-map-k4v" | "ngram-mod" | "ngram-cache" => {
                return Err(format!(
                    "speculative type '{s}' is llama.cpp's but not strata's (strata has: {})",
                    Self::NAMES
                ));
            }
            _ => {
                return Err(format!(
                    "unknown speculative type '{}' (strata has: {})",
                    strata_storage::text::clip(s, 40),
                    Self::NAMES
                ));
            }
        })
    }
}

/// How to speculate: llama.cpp's flags, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecConfig {
    pub kind: SpecType,
    /// The most tokens one draft proposes (`--spec-draft-n-max`).
    pub n_max: usize,
    /// The fewest worth verifying (`--spec-draft-n-min`): shorter drafts are not verified.
    pub n_min: usize,
}

impl Default for SpecConfig {
    /// llama.cpp's defaults (16 and 0), within the batch a verify pass is costed for.
    fn default() -> Self {
        Self {
            kind: SpecType::None,
            n_max: tune::MAX_DRAFT,
            n_min: 0,
        }
    }
}

impl SpecConfig {
    /// What a front end's settings ask for: `kind` when given, else a draft model's presence
    /// asks for [`SpecType::Draft`] and its absence for none; unset lengths take the defaults.
    /// Not yet checked: see [`SpecConfig::validate`].
    pub fn from_settings(
        kind: Option<SpecType>,
        has_draft: bool,
        n_max: Option<usize>,
        n_min: Option<usize>,
    ) -> Self {
        let d = Self::default();
        Self {
            kind: kind.unwrap_or(if has_draft {
                SpecType::Draft
            } else {
                SpecType::None
            }),
            n_max: n_max.unwrap_or(d.n_max),
            n_min: n_min.unwrap_or(d.n_min),
        }
    }

    /// Checks the values together (a draft length range that is empty, or past what a verify
    /// pass takes).
    pub fn validate(&self) -> Result<(), String> {
        if self.n_max == 0 && self.kind != SpecType::None {
            return Err("--spec-draft-n-max must be at least 1".into());
        }
        if self.n_max > tune::MAX_DRAFT {
            return Err(format!(
                "--spec-draft-n-max is {}; strata verifies at most {} drafted tokens per pass",
                self.n_max,
                tune::MAX_DRAFT
            ));
        }
        if self.n_min > self.n_max {
            return Err(format!(
                "--spec-draft-n-min ({}) is larger than --spec-draft-n-max ({})",
                self.n_min, self.n_max
            ));
        }
        Ok(())
    }
}

/// What speculation did: target passes and the tokens they produced, drafted and accepted.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SpecStats {
    /// Target passes of generation (plain steps and verify passes).
    pub passes: u64,
    /// Of which verify passes (a draft was checked).
    pub verify_passes: u64,
    /// Tokens those passes produced.
    pub tokens: u64,
    pub drafted: u64,
    pub accepted: u64,
}

impl SpecStats {
    /// Accepted drafted tokens per drafted token (0 when nothing was drafted).
    pub fn acceptance(&self) -> f64 {
        if self.drafted == 0 {
            0.0
        } else {
            self.accepted as f64 / self.drafted as f64
        }
    }

    /// Tokens produced per target pass.
    pub fn tokens_per_pass(&self) -> f64 {
        if self.passes == 0 {
            0.0
        } else {
            self.tokens as f64 / self.passes as f64
        }
    }

    pub fn add(&mut self, o: &SpecStats) {
        self.passes += o.passes;
        self.verify_passes += o.verify_passes;
        self.tokens += o.tokens;
        self.drafted += o.drafted;
        self.accepted += o.accepted;
    }
}

/// A draft model: its own context, kept in step with the target's sequence, and a sampler
/// with the target's settings (so that its proposals are likely the target's choice).
pub struct DraftModel {
    model: Arc<Model>,
    ctx: Context,
    /// The tokens in `ctx`.
    fed: Vec<u32>,
    sampler: Sampler,
    /// The draft's distribution at each drafted position (sampling at a temperature).
    q: Vec<Vec<(u32, f64)>>,
}

impl DraftModel {
    /// A draft of `target` with `n_ctx` positions, computing on `pool`. The vocabularies must
    /// be the same, token for token: the draft's ids are the target's.
    pub fn new(
        model: Arc<Model>,
        target: &Model,
        n_ctx: usize,
        pool: Arc<ThreadPool>,
        sampler: &SamplerConfig,
    ) -> Result<Self, EngineError> {
        check_vocab(target, &model)?;
        let ctx = model.new_context(n_ctx, pool);
        Ok(Self {
            model,
            ctx,
            fed: Vec::new(),
            sampler: Sampler::new(draft_sampler_config(sampler)),
            q: Vec::new(),
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Proposes up to `n` tokens after `history` and `last`, into `out`.
    fn propose(
        &mut self,
        history: &[u32],
        last: u32,
        n: usize,
        out: &mut Vec<u32>,
    ) -> Result<(), EngineError> {
        out.clear();
        let total = history.len() + 1;
        if total + n > self.ctx.n_ctx() {
            return Ok(());
        }
        let seq = || history.iter().chain(std::iter::once(&last));
        let mut common = self
            .fed
            .iter()
            .zip(seq())
            .take_while(|(a, b)| a == b)
            .count();
        // The last token is fed again when the draft already holds it: its logits are needed.
        common = common.min(total - 1);
        self.ctx.truncate(common)?;
        self.fed.truncate(common);
        self.fed.extend(seq().skip(common));
        let mut logits = self
            .model
            .forward(&mut self.ctx, &self.fed[common..], Logits::Last)?;
        for i in 0..n {
            if self.q.len() <= i {
                self.q.push(Vec::new());
            }
            self.sampler.distribution(logits, &[], &mut self.q[i]);
            let t = self.sampler.draw(&self.q[i]).unwrap_or(self.q[i][0].0);
            out.push(t);
            if i + 1 < n {
                self.fed.push(t);
                logits = self.model.forward(&mut self.ctx, &[t], Logits::Last)?;
            }
        }
        Ok(())
    }

    /// The distribution the `i`-th drafted token was drawn from; `None` when it was certain.
    fn q(&self, i: usize) -> Option<&[(u32, f64)]> {
        let q = self.q.get(i)?;
        (q.len() > 1).then_some(q.as_slice())
    }
}

/// The draft model's sampling settings for a target sampling with `cfg`: the same chain, its
/// own seed, no repetition penalty (any draft distribution keeps the output exact).
fn draft_sampler_config(cfg: &SamplerConfig) -> SamplerConfig {
    SamplerConfig {
        repeat_penalty: 1.0,
        seed: cfg.seed ^ 0x5EC0_DE00_D2AF_7000,
        ..cfg.clone()
    }
}

/// Refuses a draft whose vocabulary differs from the target's, naming the difference.
pub fn check_vocab(target: &Model, draft: &Model) -> Result<(), EngineError> {
    let (a, b) = (&target.tokenizer, &draft.tokenizer);
    if a.n_vocab() != b.n_vocab() {
        return Err(EngineError::Invalid(format!(
            "the draft model's vocabulary has {} tokens and the target's {}: a draft must share the target's vocabulary",
            b.n_vocab(),
            a.n_vocab()
        )));
    }
    if target.config.n_vocab != draft.config.n_vocab {
        return Err(EngineError::Invalid(format!(
            "the draft model's output has {} logits per token and the target's {}: a draft must share the target's vocabulary",
            draft.config.n_vocab, target.config.n_vocab
        )));
    }
    for id in 0..a.n_vocab() as u32 {
        let (x, y) = (a.token_text(id), b.token_text(id));
        if x != y {
            return Err(EngineError::Invalid(format!(
                "token {id} is {:?} in the target's vocabulary and {:?} in the draft model's: a draft must share the target's vocabulary",
                strata_storage::text::clip(x.unwrap_or(""), 40),
                strata_storage::text::clip(y.unwrap_or(""), 40)
            )));
        }
    }
    if a.is_eog(0) != b.is_eog(0) || a.eos() != b.eos() {
        return Err(EngineError::Invalid(format!(
            "the draft model's end-of-sequence token is {:?} and the target's {:?}",
            b.eos(),
            a.eos()
        )));
    }
    Ok(())
}

/// The source of drafts.
pub enum Draft {
    None,
    Model(Box<DraftModel>),
    Scan(NgramScan),
    Map(NgramMap),
}

impl Draft {
    /// The draft for `cfg` (a draft model when one is given, which `--spec-type draft` needs).
    pub fn new(cfg: &SpecConfig, model: Option<DraftModel>) -> Result<Self, EngineError> {
        Ok(match (cfg.kind, model) {
            (SpecType::None, None) => Draft::None,
            (SpecType::None | SpecType::Draft, Some(m)) => Draft::Model(Box::new(m)),
            (SpecType::Draft, None) => {
                return Err(EngineError::Invalid(
                    "--spec-type draft needs a draft model (-md FILE)".into(),
                ));
            }
            (SpecType::NgramSimple, None) => Draft::Scan(NgramScan::default()),
            (SpecType::NgramMapK, None) => Draft::Map(NgramMap::default()),
            (k @ (SpecType::NgramSimple | SpecType::NgramMapK), Some(_)) => {
                return Err(EngineError::Invalid(format!(
                    "--spec-type {} drafts without a model; drop -md or use --spec-type draft",
                    k.name()
                )));
            }
        })
    }

    /// Whether drafting costs nothing worth measuring (lookup), so a draft can be made on a
    /// plain step too, to keep learning its acceptance.
    fn free(&self) -> bool {
        matches!(self, Draft::Scan(_) | Draft::Map(_))
    }

    fn propose(
        &mut self,
        history: &[u32],
        last: u32,
        n: usize,
        out: &mut Vec<u32>,
    ) -> Result<(), EngineError> {
        match self {
            Draft::None => {
                out.clear();
                Ok(())
            }
            Draft::Model(m) => m.propose(history, last, n, out),
            Draft::Scan(s) => {
                s.propose(history, last, n, out);
                Ok(())
            }
            Draft::Map(m) => {
                m.propose(history, last, n, out);
                Ok(())
            }
        }
    }
}

/// One sequence's speculative generation: the draft, the tuner and the counts.
pub struct Speculator {
    cfg: SpecConfig,
    draft: Draft,
    tuner: Tuner,
    stats: SpecStats,
    drafted: Vec<u32>,
    out: Vec<u32>,
    /// Tokens a verify pass chose that have not been handed out yet ([`Speculator::next`]).
    queue: std::collections::VecDeque<u32>,
    batch: Vec<u32>,
    p: Vec<(u32, f64)>,
    residual: Vec<(u32, f64)>,
}

impl Speculator {
    pub fn new(cfg: SpecConfig, draft: Draft) -> Result<Self, EngineError> {
        cfg.validate().map_err(EngineError::Invalid)?;
        Ok(Self {
            tuner: Tuner::new(cfg.n_min, cfg.n_max),
            cfg,
            draft,
            stats: SpecStats::default(),
            drafted: Vec::new(),
            out: Vec::new(),
            queue: std::collections::VecDeque::new(),
            batch: Vec::new(),
            p: Vec::new(),
            residual: Vec::new(),
        })
    }

    pub fn config(&self) -> &SpecConfig {
        &self.cfg
    }

    pub fn stats(&self) -> SpecStats {
        self.stats
    }

    pub fn tuner(&self) -> &Tuner {
        &self.tuner
    }

    /// A speculator that never drafts: [`Speculator::next`] is then exactly a plain step.
    pub fn plain() -> Self {
        Self::new(SpecConfig::default(), Draft::None).expect("the default configuration is valid")
    }

    /// The next token of a generation. `ctx` holds `history`; `last` is the latest token
    /// chosen (and recorded with `sampler.accept`), not fed yet. Returns the token after it,
    /// and leaves `last` in `ctx` and in `history`. A verify pass chooses several tokens at
    /// once: the later ones are handed out by the next calls, and `ctx` may already hold
    /// tokens past the one returned — call [`Speculator::settle`] before using `ctx` for
    /// anything else, so that it ends with `last` again, the token returned not fed.
    pub fn next(
        &mut self,
        model: &Model,
        ctx: &mut Context,
        sampler: &mut Sampler,
        history: &mut Vec<u32>,
        last: u32,
    ) -> Result<u32, EngineError> {
        if let Some(t) = self.queue.pop_front() {
            return Ok(t);
        }
        self.step(model, ctx, sampler, history, last)?;
        history.push(last);
        history.extend_from_slice(&self.out[..self.out.len() - 1]);
        self.queue.extend(self.out.iter().skip(1));
        Ok(self.out[0])
    }

    /// Cuts `ctx` and `history` back to where they would be after plain steps: holding every
    /// token handed out but the last, which is not fed. Drops what was not handed out.
    pub fn settle(&mut self, ctx: &mut Context, history: &mut Vec<u32>) -> Result<(), EngineError> {
        // Of the queued tokens, all but the last are fed, and so is the one handed out last.
        let cut = history.len().saturating_sub(self.queue.len());
        self.queue.clear();
        if cut < history.len() {
            history.truncate(cut);
            ctx.truncate(cut)?;
        }
        Ok(())
    }

    /// The sampling settings the draft model draws its proposals with (`None` without one).
    pub fn draft_sampler(&self) -> Option<&SamplerConfig> {
        match &self.draft {
            Draft::Model(m) => Some(m.sampler.config()),
            _ => None,
        }
    }

    /// Makes the draft model draw with `cfg`'s settings (a new request's), without its
    /// repetition penalty; its proposals stay valid whatever they are, but agree more often
    /// when drawn like the target's tokens.
    pub fn set_draft_sampler(&mut self, cfg: &SamplerConfig) {
        if let Draft::Model(m) = &mut self.draft {
            m.sampler = Sampler::new(draft_sampler_config(cfg));
        }
    }

    /// Whether steps may draft at all.
    pub fn active(&self) -> bool {
        !matches!(self.draft, Draft::None)
    }

    /// One step of generation. `ctx` holds `history` (its length is `ctx.n_past()`); `last`
    /// is the latest token chosen, not fed yet, already recorded with `sampler.accept`. Feeds
    /// `last` (and a draft, when one pays) and returns the tokens chosen after it, at least
    /// one: every one but the last is in `ctx` now, the last is not fed yet, like `last` was.
    /// None of them is recorded with `sampler.accept`: the caller does that as it emits them.
    pub fn step(
        &mut self,
        model: &Model,
        ctx: &mut Context,
        sampler: &mut Sampler,
        history: &[u32],
        last: u32,
    ) -> Result<&[u32], EngineError> {
        let n_past = ctx.n_past();
        if history.len() != n_past {
            return Err(EngineError::Invalid(format!(
                "speculative step over a history of {} tokens for a context of {n_past}",
                history.len()
            )));
        }
        let room = ctx.n_ctx().saturating_sub(n_past + 1);
        let n = if self.active() {
            self.tuner.choose(room)
        } else {
            0
        };
        self.drafted.clear();
        if n > 0 || self.draft.free() {
            let t = Instant::now();
            let want = if n > 0 { n } else { 1 };
            self.draft
                .propose(history, last, want.min(room), &mut self.drafted)?;
            if n > 0 {
                self.tuner
                    .draft_timed(self.drafted.len(), t.elapsed().as_secs_f64());
            }
        }
        self.out.clear();
        if n == 0 || self.drafted.is_empty() || self.drafted.len() < self.cfg.n_min {
            // A plain step, exactly as without speculation.
            let t = Instant::now();
            let next = sampler.sample(model.forward(ctx, &[last], Logits::Last)?);
            self.tuner.pass_timed(1, t.elapsed().as_secs_f64());
            if let Some(&d) = self.drafted.first() {
                // The draft's first token would have been kept with probability p(d), which
                // is what `next == d` is on average: acceptance is learned without verifying.
                self.tuner.judged(usize::from(next == d), next != d);
            }
            self.out.push(next);
            self.stats.passes += 1;
            self.stats.tokens += 1;
            return Ok(&self.out);
        }
        let k = self.drafted.len();
        self.batch.clear();
        self.batch.push(last);
        self.batch.extend_from_slice(&self.drafted);
        let t = Instant::now();
        let logits = model.forward(ctx, &self.batch, Logits::All)?;
        let n_vocab = model.config.n_vocab;
        let mut accepted = 0;
        let mut rejected = false;
        for i in 0..=k {
            let row = &logits[i * n_vocab..(i + 1) * n_vocab];
            sampler.distribution(row, &self.out, &mut self.p);
            if i == k {
                // Every drafted token kept: the target's own next token comes free.
                let x = sampler.draw(&self.p).unwrap_or(self.p[0].0);
                self.out.push(x);
                break;
            }
            let d = self.drafted[i];
            let q = match &self.draft {
                Draft::Model(m) => m.q(i),
                _ => None,
            };
            match verify::judge(&self.p, d, q, sampler, &mut self.residual) {
                Verdict::Accept => {
                    self.out.push(d);
                    accepted += 1;
                }
                Verdict::Reject(x) => {
                    self.out.push(x);
                    rejected = true;
                    break;
                }
            }
        }
        // The rejected drafted tokens' rows leave the cache.
        ctx.truncate(n_past + 1 + accepted)?;
        self.tuner.pass_timed(k + 1, t.elapsed().as_secs_f64());
        self.tuner.judged(accepted, rejected);
        self.stats.passes += 1;
        self.stats.verify_passes += 1;
        self.stats.tokens += self.out.len() as u64;
        self.stats.drafted += k as u64;
        self.stats.accepted += accepted as u64;
        Ok(&self.out)
    }
}
