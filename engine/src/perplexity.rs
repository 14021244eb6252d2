//! Perplexity over a token stream, computed the way llama-perplexity does so numbers compare:
//! the text is cut into chunks of `n_ctx` tokens, each evaluated from an empty cache (its first
//! token replaced by BOS when the model adds one), and the negative log-likelihood of the
//! tokens in the second half of each chunk is averaged.

use crate::error::EngineError;
use crate::model::{Context, Logits, Model};

#[derive(Clone, Debug)]
pub struct PerplexityResult {
    pub ppl: f64,
    /// llama.cpp's uncertainty estimate of the PPL.
    pub ppl_err: f64,
    pub chunks: usize,
    pub tokens_scored: usize,
}

/// Scores `tokens` in chunks of `n_ctx`; `on_chunk(i, running_ppl)` is called after each.
pub fn perplexity(
    model: &Model,
    ctx: &mut Context,
    tokens: &[u32],
    n_ctx: usize,
    mut on_chunk: impl FnMut(usize, f64),
) -> Result<PerplexityResult, EngineError> {
    if n_ctx < 4 {
        return Err(EngineError::Invalid(format!(
            "perplexity needs a context of at least 4 tokens, got {n_ctx}"
        )));
    }
    let n_chunks = tokens.len() / n_ctx;
    if n_chunks == 0 {
        return Err(EngineError::Invalid(format!(
            "the text has {} tokens, fewer than one chunk of {n_ctx}; use a smaller -c",
            tokens.len()
        )));
    }
    let n_vocab = model.config.n_vocab;
    let first = n_ctx / 2;
    let bos = model
        .tokenizer
        .add_bos()
        .then(|| model.tokenizer.bos())
        .flatten();
    let (mut nll, mut nll2, mut count) = (0f64, 0f64, 0usize);
    let mut chunk = Vec::with_capacity(n_ctx);
    for i in 0..n_chunks {
        chunk.clear();
        chunk.extend_from_slice(&tokens[i * n_ctx..(i + 1) * n_ctx]);
        if let Some(b) = bos {
            chunk[0] = b;
        }
        ctx.clear();
        let logits = model.forward(ctx, &chunk, Logits::Range(first..n_ctx - 1))?;
        for (j, row) in logits.chunks_exact(n_vocab).enumerate() {
            let target = chunk[first + j + 1] as usize;
            let v = -log_softmax_at(row, target);
            nll += v;
            nll2 += v * v;
            count += 1;
        }
        on_chunk(i, (nll / count as f64).exp());
    }
    let mean = nll / count as f64;
    let var = (nll2 / count as f64 - mean * mean).max(0.0);
    let ppl = mean.exp();
    let ppl_err = if count > 1 {
        ppl * (var / (count - 1) as f64).sqrt()
    } else {
        0.0
    };
    Ok(PerplexityResult {
        ppl,
        ppl_err,
        chunks: n_chunks,
        tokens_scored: count,
    })
}

fn log_softmax_at(row: &[f32], idx: usize) -> f64 {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&l| ((l - max) as f64).exp()).sum();
    (row[idx] - max) as f64 - sum.ln()
}
