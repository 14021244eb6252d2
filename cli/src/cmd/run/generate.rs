//! The generation loop every mode of `strata run` shares: read tokens into the context (on the
//! batch pool when `--threads-batch` asks for one), then sample until a stop.

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use strata_engine::sampler::Sampler;
use strata_engine::spec::Speculator;
use strata_engine::tokenizer::StreamDecoder;
use strata_engine::{Context, Logits, Model};
use strata_simd::pool::ThreadPool;

use super::text::find_reverse;
use crate::interrupt;

/// Timings in llama.cpp's terms.
#[derive(Default)]
pub struct Perf {
    pub prompt_ms: f64,
    pub prompt_tokens: usize,
    pub eval_ms: f64,
    pub eval_runs: usize,
}

/// The threads a pass runs on: `decode` for generating, `batch` (llama.cpp's
/// `--threads-batch`) for reading prompts when it differs.
pub struct Pools {
    pub decode: Arc<ThreadPool>,
    pub batch: Option<Arc<ThreadPool>>,
}

/// What ends an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The model ended it (an end-of-generation token).
    Eog,
    /// `-n` tokens were generated.
    Limit,
    /// A reverse prompt (`-r`) appeared.
    Reverse,
    /// The context is full.
    ContextFull,
    /// Ctrl-C.
    Interrupted,
}

/// An answer: its text, why it ended, and the last token it printed when that token is not in
/// the context yet (the pass that would have read it was not run), for a caller that goes on
/// from there.
pub struct Answer {
    pub text: String,
    pub stop: Stop,
    pub unfed: Option<u32>,
}

/// The settings of a generation that do not change between turns.
pub struct GenOptions {
    /// Tokens per answer; negative: until a stop.
    pub n_predict: i64,
    pub ignore_eos: bool,
    pub reverse: Vec<String>,
    /// Whether Ctrl-C stops the answer (conversation and interactive modes).
    pub interruptible: bool,
}

/// One model, one context and its sampler, generating.
pub struct Generator<'a> {
    pub model: &'a Model,
    pub ctx: &'a mut Context,
    pub sampler: &'a mut Sampler,
    pub pools: &'a Pools,
    pub opts: &'a GenOptions,
    pub perf: Perf,
    /// Drafts and verifies (a plain one without the speculative flags).
    pub spec: Speculator,
    /// The tokens the context holds.
    pub fed: Vec<u32>,
}

impl Generator<'_> {
    /// Cuts the context back to its first `n` tokens.
    pub fn truncate(&mut self, n: usize) -> anyhow::Result<()> {
        self.ctx.truncate(n)?;
        self.fed.truncate(n);
        Ok(())
    }

    /// Runs `tokens` through the model after what the context holds (no sampling), on the
    /// batch pool if there is one.
    pub fn prefill(&mut self, tokens: &[u32], logits: Logits) -> anyhow::Result<Vec<f32>> {
        if self.ctx.n_past() + tokens.len() > self.ctx.n_ctx() {
            anyhow::bail!(
                "the prompt needs {} tokens but the context has room for {} (raise --ctx-size)",
                tokens.len(),
                self.ctx.n_ctx() - self.ctx.n_past()
            );
        }
        if let Some(b) = &self.pools.batch {
            self.ctx.set_pool(b.clone());
        }
        let t0 = Instant::now();
        let r = self
            .model
            .forward(self.ctx, tokens, logits)
            .map(|l| l.to_vec());
        if self.pools.batch.is_some() {
            self.ctx.set_pool(self.pools.decode.clone());
        }
        let out = r?;
        self.fed.extend_from_slice(tokens);
        self.perf.prompt_ms += t0.elapsed().as_secs_f64() * 1e3;
        self.perf.prompt_tokens += tokens.len();
        tokens.iter().for_each(|&t| self.sampler.accept(t));
        Ok(out)
    }

    /// Feeds `tokens` after what the context holds and samples until a stop, writing the
    /// text to `out` as it comes.
    pub fn generate(&mut self, tokens: &[u32], out: &mut impl Write) -> anyhow::Result<Answer> {
        let _answering = self.opts.interruptible.then(interrupt::answering);
        let logits = self.prefill(tokens, Logits::Last)?;
        let mut next = self.sampler.sample(&logits);
        let tok = &self.model.tokenizer;
        let mut decoder = StreamDecoder::new();
        let mut text = String::new();
        let mut produced = 0i64;
        let mut unfed = None;
        let stop = loop {
            if self.opts.interruptible && interrupt::requested() {
                break Stop::Interrupted;
            }
            if !self.opts.ignore_eos && tok.is_eog(next) {
                break Stop::Eog;
            }
            unfed = Some(next);
            self.sampler.accept(next);
            let piece = decoder.push(&tok.token_to_piece(next, false));
            out.write_all(piece.as_bytes())?;
            out.flush()?;
            text.push_str(&piece);
            produced += 1;
            if find_reverse(&text, piece.len(), &self.opts.reverse) {
                break Stop::Reverse;
            }
            if self.opts.n_predict >= 0 && produced >= self.opts.n_predict {
                break Stop::Limit;
            }
            if self.ctx.n_past() + 1 > self.ctx.n_ctx() {
                eprintln!("\n[context full: {} tokens]", self.ctx.n_ctx());
                break Stop::ContextFull;
            }
            let t = Instant::now();
            next = self
                .spec
                .next(self.model, self.ctx, self.sampler, &mut self.fed, next)?;
            unfed = None;
            self.perf.eval_ms += t.elapsed().as_secs_f64() * 1e3;
            self.perf.eval_runs += 1;
        };
        // Tokens a verify pass chose past the stop leave the context.
        self.spec.settle(self.ctx, &mut self.fed)?;
        let rest = decoder.finish();
        out.write_all(rest.as_bytes())?;
        out.flush()?;
        text.push_str(&rest);
        Ok(Answer { text, stop, unfed })
    }

    /// `--prompt-cache`: resumes from the longest prefix of `tokens` saved in `path` (a file
    /// of another model or a damaged one is an error, and is left alone), reads the rest of
    /// the prompt but its last token, and saves the cache for next time. Returns the index of
    /// the first token still to be fed.
    pub fn prompt_cache(
        &mut self,
        path: &std::path::Path,
        tokens: &[u32],
        read_only: bool,
    ) -> anyhow::Result<usize> {
        let shown = path.display();
        let mut have = 0;
        if path.exists() {
            let t0 = Instant::now();
            let saved = self.model.load_session(self.ctx, path).with_context(|| {
                format!("loading the prompt cache {shown} (delete it to start over)")
            })?;
            have = saved.iter().zip(tokens).take_while(|(a, b)| a == b).count();
            // At least the last prompt token is fed again, for its logits.
            have = have.min(tokens.len() - 1);
            self.ctx.truncate(have)?;
            self.fed = saved[..have].to_vec();
            eprintln!(
                "strata: loaded a prompt cache of {} tokens from {shown} in {:.1} ms; {have} of the prompt's {} tokens reused",
                saved.len(),
                t0.elapsed().as_secs_f64() * 1e3,
                tokens.len()
            );
        }
        let upto = tokens.len() - 1;
        tokens[..have].iter().for_each(|&t| self.sampler.accept(t));
        if have < upto {
            self.prefill(&tokens[have..upto], Logits::None)?;
        }
        if !read_only && have < upto {
            let t0 = Instant::now();
            let bytes = self
                .model
                .save_session(self.ctx, &tokens[..upto], path)
                .with_context(|| format!("saving the prompt cache {shown}"))?;
            eprintln!(
                "strata: saved {upto} tokens ({:.1} MiB) to {shown} in {:.1} ms",
                bytes as f64 / 1048576.0,
                t0.elapsed().as_secs_f64() * 1e3
            );
        }
        Ok(upto)
    }
}

/// llama.cpp's timing lines on stderr.
pub fn print_perf(load_ms: f64, p: &Perf) {
    let line = |ms: f64, n: usize| {
        let per = if n > 0 { ms / n as f64 } else { 0.0 };
        let tps = if ms > 0.0 { 1e3 * n as f64 / ms } else { 0.0 };
        (per, tps)
    };
    let (pp, pt) = line(p.prompt_ms, p.prompt_tokens);
    let (ep, et) = line(p.eval_ms, p.eval_runs);
    eprintln!();
    eprintln!("strata_perf_context_print:        load time = {load_ms:10.2} ms");
    eprintln!(
        "strata_perf_context_print: prompt eval time = {:10.2} ms / {:5} tokens ({pp:8.2} ms per token, {pt:8.2} tokens per second)",
        p.prompt_ms, p.prompt_tokens
    );
    eprintln!(
        "strata_perf_context_print:        eval time = {:10.2} ms / {:5} runs   ({ep:8.2} ms per token, {et:8.2} tokens per second)",
        p.eval_ms, p.eval_runs
    );
    eprintln!(
        "strata_perf_context_print:       total time = {:10.2} ms / {:5} tokens",
        load_ms + p.prompt_ms + p.eval_ms,
        p.prompt_tokens + p.eval_runs
    );
}
