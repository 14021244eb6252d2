//! `strata chat --local`: the engine in this process, keeping the KV cache between turns so
//! each question only evaluates what is new since the last answer.

use std::time::Instant;

use strata_engine::chat::{ChatMessage, ChatTemplate};
use strata_engine::sampler::{Sampler, SamplerConfig};
use strata_engine::spec::Speculator;
use strata_engine::tokenizer::StreamDecoder;
use strata_engine::{Context, Logits};

use super::session::Stats;
use crate::cmd::common::{Loaded, chat_template, ctx_size, load_with, resolve_model};
use crate::interrupt;

pub struct Local {
    loaded: Loaded,
    ctx: Context,
    sampler: Sampler,
    template: ChatTemplate,
    /// The tokens whose keys and values the context holds, in order.
    cached: Vec<u32>,
    /// Most tokens per answer; `None` until the end of the answer or the context.
    max_tokens: Option<usize>,
    spec: Speculator,
}

impl Local {
    /// `model` with the `--local` flags of `args`.
    pub fn new(model: &str, sampler: SamplerConfig, args: &super::Args) -> anyhow::Result<Local> {
        let (max_tokens, n_ctx, kv) = (args.n_predict, args.ctx_size, &args.kv);
        sampler.validate().map_err(anyhow::Error::msg)?;
        args.spec.config()?;
        // A model that cannot chat is said so before its weights load.
        let template = chat_template(&resolve_model(model)?, model, args.chat_template.as_deref())?;
        let loaded = load_with(model, args.threads, &args.residency)?;
        let n_ctx = ctx_size(&loaded.model, n_ctx)?;
        let ctx = kv.context(&loaded.model, n_ctx, loaded.pool.clone())?;
        let spec = args
            .spec
            .speculator(&loaded.model, n_ctx, &loaded.pool, &sampler)?;
        Ok(Local {
            spec,
            loaded,
            ctx,
            sampler: Sampler::new(sampler),
            template,
            cached: Vec::new(),
            max_tokens,
        })
    }

    /// Forgets the cache (after `/reset` or `/load` nothing of it will be reused anyway).
    pub fn reset(&mut self) {
        self.ctx.clear();
        self.cached.clear();
        self.sampler.reset();
    }

    /// Answers the last user message of `messages`, sending each piece of text to `out` as it
    /// is decoded; Ctrl-C ends the answer early with what was produced so far.
    pub fn answer(
        &mut self,
        messages: &[ChatMessage],
        out: &mut dyn FnMut(&str) -> std::io::Result<()>,
    ) -> anyhow::Result<(String, Stats)> {
        let model = &self.loaded.model;
        let tok = &model.tokenizer;
        let rendered = self.template.render(messages, true)?;
        // The tokenizer adds BOS itself; drop the template's copy so there is only one.
        let text = self
            .template
            .bos_prefix()
            .and_then(|p| rendered.strip_prefix(p))
            .unwrap_or(&rendered);
        let tokens = tok.encode(text, true, true);
        if tokens.is_empty() {
            anyhow::bail!("the chat template rendered an empty prompt");
        }
        if tokens.len() >= self.ctx.n_ctx() {
            anyhow::bail!(
                "the conversation is {} tokens but the context holds {}; /reset to start over",
                tokens.len(),
                self.ctx.n_ctx()
            );
        }
        // Reuse the cached prefix, but always evaluate at least one token to get logits.
        let common = self
            .cached
            .iter()
            .zip(&tokens)
            .take_while(|(a, b)| a == b)
            .count()
            .min(tokens.len() - 1);
        self.ctx.truncate(common)?;
        self.cached.truncate(common);
        let mut stats = Stats {
            prompt_tokens: Some(tokens.len() - common),
            ..Stats::default()
        };
        let t0 = Instant::now();
        let new = &tokens[common..];
        new.iter().for_each(|&t| self.sampler.accept(t));
        let logits = model.forward(&mut self.ctx, new, Logits::Last)?;
        self.cached.extend_from_slice(new);
        let mut next = self.sampler.sample(logits);
        stats.first_token_ms = t0.elapsed().as_secs_f64() * 1e3;
        let t_first = Instant::now();
        let mut decoder = StreamDecoder::new();
        let mut answer = String::new();
        loop {
            if tok.is_eog(next) {
                break;
            }
            if interrupt::requested() {
                stats.interrupted = true;
                break;
            }
            self.sampler.accept(next);
            let piece = decoder.push(&tok.token_to_piece(next, false));
            out(&piece)?;
            answer.push_str(&piece);
            stats.tokens += 1;
            stats.gen_ms = t_first.elapsed().as_secs_f64() * 1e3;
            if self.max_tokens.is_some_and(|m| stats.tokens >= m) {
                break;
            }
            if self.ctx.n_past() + 1 > self.ctx.n_ctx() {
                out("\n[the context is full; /reset to start over]")?;
                break;
            }
            next = self.spec.next(
                model,
                &mut self.ctx,
                &mut self.sampler,
                &mut self.cached,
                next,
            )?;
        }
        // Tokens a verify pass chose past the end of the answer leave the cache.
        self.spec.settle(&mut self.ctx, &mut self.cached)?;
        let rest = decoder.finish();
        out(&rest)?;
        answer.push_str(&rest);
        Ok((answer, stats))
    }
}
