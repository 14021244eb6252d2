//! A forward pass as callers see it: [`Model::forward`] (one sequence, many tokens: prefill
//! in chunks, and decode) and [`Model::decode_batch`] (one new token for each of several
//! sequences), over each sequence's [`Context`]. Both hand the layers to
//! [`crate::exec::run_layers`], which runs each phase on the executor its placement names.

use std::ops::Range;
use std::sync::Arc;

use strata_simd::pool::ThreadPool;

use super::{Model, ModelConfig};
use crate::error::EngineError;
use crate::exec::{self, Executors, Pass, Slot};
use crate::kv::{KvCache, KvOptions, SpillStats};

/// Which of a call's tokens get logits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token (generation).
    Last,
    /// Every token.
    All,
    /// Tokens in this range of the call's batch (perplexity).
    Range(Range<usize>),
    /// None (filling the cache only).
    None,
}

/// The per-sequence state of a model: its KV cache and the scratch buffers of the forward
/// pass, reused from step to step so that a decode step allocates nothing.
pub struct Context {
    pub(crate) kv: KvCache,
    pool: Arc<ThreadPool>,
    scratch: Scratch,
    n_ubatch: usize,
}

/// The activations of one forward pass, one row per token of the batch, kept between calls so
/// that a decode step allocates nothing: the executors of the devices the model's placement
/// uses, each with its own buffers. Each [`Context`] has one; a scheduler that decodes several
/// sequences together with [`Model::decode_batch`] keeps one for the batch.
#[derive(Default)]
pub struct Scratch {
    pub(crate) execs: Executors,
    logits: Vec<f32>,
}

impl Scratch {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Context {
    pub(crate) fn new(
        c: &ModelConfig,
        n_ctx: usize,
        pool: Arc<ThreadPool>,
        kv: &KvOptions,
    ) -> Result<Self, EngineError> {
        Ok(Self {
            kv: KvCache::new(c.n_layer, n_ctx, c.kv_dim(), c.head_dim, kv)?,
            pool,
            scratch: Scratch::default(),
            n_ubatch: 512,
        })
    }

    /// Positions already in the cache.
    pub fn n_past(&self) -> usize {
        self.kv.len()
    }

    pub fn n_ctx(&self) -> usize {
        self.kv.n_ctx()
    }

    /// Drops every cached position from `n` on (to reuse a shared prefix, or to take back a
    /// speculative draft's rejected tokens), leaving the cache as if they had never been
    /// written. Fails only when a page on disk that must come back cannot be read.
    pub fn truncate(&mut self, n: usize) -> Result<(), EngineError> {
        self.kv.truncate(n)
    }

    pub fn clear(&mut self) {
        self.kv.clear();
    }

    pub fn pool(&self) -> &ThreadPool {
        &self.pool
    }

    /// Computes the next passes on `pool` instead (llama.cpp's `--threads-batch`: one pool for
    /// reading a prompt, another for decoding). The scratch buffers do not depend on it.
    pub fn set_pool(&mut self, pool: Arc<ThreadPool>) {
        self.pool = pool;
    }

    /// Bytes the cached positions take, wherever they are.
    pub fn kv_bytes(&self) -> usize {
        self.kv.size_bytes()
    }

    /// Bytes of KV pages held in RAM.
    pub fn kv_ram_bytes(&self) -> usize {
        self.kv.ram_bytes()
    }

    /// Bytes of KV pages held in VRAM (the layers whose attention runs on the GPU).
    pub fn kv_vram_bytes(&self) -> usize {
        self.kv.vram_bytes()
    }

    /// The KV cache's SSD tier, when it has one.
    pub fn kv_spill_stats(&self) -> Option<SpillStats> {
        self.kv.spill_stats()
    }

    /// Writes the whole cache to its SSD tier and gives the RAM back (an idle sequence);
    /// it is read again when next used. Does nothing without a spill directory.
    pub fn kv_spill_all(&mut self) -> Result<(), EngineError> {
        self.kv.spill_all()
    }

    /// Makes this context hold the first `n` positions of `other`'s cache (a shared prompt
    /// prefix) without recomputing them: full pages are shared, not copied.
    pub fn share_prefix(&mut self, other: &Context, n: usize) -> Result<(), EngineError> {
        self.kv.share_prefix(&other.kv, n)
    }

    /// Sets how many tokens one pass through the layers takes at most (prefill chunking).
    pub fn set_n_ubatch(&mut self, n: usize) {
        self.n_ubatch = n.max(1);
    }
}

impl Model {
    /// Appends `tokens` to the context's sequence and returns logits for the rows `logits`
    /// asks for, `n_vocab` floats per row.
    pub fn forward<'c>(
        &self,
        ctx: &'c mut Context,
        tokens: &[u32],
        logits: Logits,
    ) -> Result<&'c [f32], EngineError> {
        let n = tokens.len();
        let c = &self.config;
        if n == 0 {
            return Err(EngineError::Invalid("forward called with no tokens".into()));
        }
        let pos0 = ctx.kv.len();
        if pos0 + n > ctx.kv.n_ctx() {
            return Err(EngineError::ContextFull {
                needed: pos0 + n,
                n_ctx: ctx.kv.n_ctx(),
            });
        }
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= c.n_vocab) {
            return Err(EngineError::BadToken {
                id,
                n_vocab: c.n_vocab,
            });
        }
        let want = match logits {
            Logits::Last => n - 1..n,
            Logits::All => 0..n,
            Logits::None => 0..0,
            Logits::Range(r) if r.start <= r.end && r.end <= n => r,
            Logits::Range(r) => {
                return Err(EngineError::Invalid(format!(
                    "logits range {r:?} outside a batch of {n}"
                )));
            }
        };
        let Context {
            kv,
            pool,
            scratch,
            n_ubatch,
        } = ctx;
        let mut logits = std::mem::take(&mut scratch.logits);
        logits.resize(want.len() * c.n_vocab, 0.0);
        let mut start = 0;
        while start < n {
            let end = (start + *n_ubatch).min(n);
            let mut slot = [Slot {
                kv: &mut *kv,
                pos0: pos0 + start,
                row0: 0,
                n: end - start,
            }];
            let pass = Pass {
                model: self,
                pool,
                n: end - start,
            };
            crate::exec::cpu::repack::prepare_reads_for(&self.weights, pass.n);
            let execs = &mut scratch.execs;
            let (lo, hi) = (want.start.max(start), want.end.min(end));
            // A decode step whose logits are wanted may run whole as a CUDA graph.
            if end - start == 1 && lo < hi {
                let out = &mut logits[(lo - want.start) * c.n_vocab..(hi - want.start) * c.n_vocab];
                if exec::graph_step(
                    &pass,
                    &self.placement,
                    execs,
                    &tokens[start..end],
                    &mut slot,
                    out,
                )? {
                    kv.set_len(pos0 + end)?;
                    start = end;
                    continue;
                }
            }
            let mut at = exec::run_layers(
                &pass,
                &self.placement,
                execs,
                &tokens[start..end],
                &mut slot,
            )?;
            kv.set_len(pos0 + end)?;
            if lo < hi {
                let out = &mut logits[(lo - want.start) * c.n_vocab..(hi - want.start) * c.n_vocab];
                let rows = lo - start..hi - start;
                exec::head(&pass, &self.placement, execs, &mut at, rows, out)?;
            }
            start = end;
        }
        scratch.logits = logits;
        // Nothing queued on the GPU may outlive the call: the caller may drop or reuse the
        // buffers its pages and scratch live in.
        self.gpu_sync()?;
        Ok(&ctx.scratch.logits)
    }

    /// `decode_batch`'s pass: as one CUDA graph where it can be, else phase by phase; every
    /// sequence's length moves on by one.
    fn decode_pass(
        &self,
        pass: &Pass<'_>,
        execs: &mut Executors,
        tokens: &[u32],
        slots: &mut [Slot<'_>],
        logits: &mut [f32],
    ) -> Result<(), EngineError> {
        let graphed = exec::graph_step(pass, &self.placement, execs, tokens, slots, logits)?;
        let mut at = if graphed {
            None
        } else {
            Some(exec::run_layers(
                pass,
                &self.placement,
                execs,
                tokens,
                slots,
            )?)
        };
        let mut spilled = Ok(());
        for s in slots.iter_mut() {
            // Every length moves on; a failed write to disk only leaves pages in RAM.
            let r = s.kv.set_len(s.pos0 + 1);
            spilled = spilled.and(r);
        }
        spilled?;
        match &mut at {
            Some(at) => exec::head(pass, &self.placement, execs, at, 0..tokens.len(), logits),
            None => Ok(()),
        }
    }

    fn gpu_sync(&self) -> Result<(), EngineError> {
        match &self.gpu {
            Some(g) => g
                .stream
                .synchronize()
                .map_err(|e| EngineError::Gpu(e.to_string())),
            None => Ok(()),
        }
    }

    /// One decode step for several sequences at once (continuous batching): `tokens[i]` is
    /// appended to `ctxs[i]`, every weight matrix is read once for all of them, and the result
    /// holds one row of `n_vocab` logits per sequence, in order. Attention still runs per
    /// sequence, over each one's own KV cache.
    pub fn decode_batch<'s>(
        &self,
        pool: &ThreadPool,
        ctxs: &mut [&mut Context],
        tokens: &[u32],
        scratch: &'s mut Scratch,
    ) -> Result<&'s [f32], EngineError> {
        let c = &self.config;
        if ctxs.len() != tokens.len() || tokens.is_empty() {
            return Err(EngineError::Invalid(format!(
                "decode_batch needs one token per sequence, got {} tokens for {} sequences",
                tokens.len(),
                ctxs.len()
            )));
        }
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= c.n_vocab) {
            return Err(EngineError::BadToken {
                id,
                n_vocab: c.n_vocab,
            });
        }
        if let Some(full) = ctxs.iter().find(|x| x.kv.len() >= x.kv.n_ctx()) {
            return Err(EngineError::ContextFull {
                needed: full.kv.len() + 1,
                n_ctx: full.kv.n_ctx(),
            });
        }
        let mut slots: Vec<Slot<'_>> = ctxs
            .iter_mut()
            .enumerate()
            .map(|(i, x)| {
                let pos0 = x.kv.len();
                Slot {
                    kv: &mut x.kv,
                    pos0,
                    row0: i,
                    n: 1,
                }
            })
            .collect();
        let pass = Pass {
            model: self,
            pool,
            n: tokens.len(),
        };
        crate::exec::cpu::repack::prepare_reads_for(&self.weights, pass.n);
        let execs = &mut scratch.execs;
        let n = tokens.len();
        let mut logits = std::mem::take(&mut scratch.logits);
        logits.resize(n * c.n_vocab, 0.0);
        let r = self.decode_pass(&pass, execs, tokens, &mut slots, &mut logits);
        scratch.logits = logits;
        r?;
        self.gpu_sync()?;
        Ok(&scratch.logits)
    }
}
