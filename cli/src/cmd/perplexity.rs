//! `strata perplexity`: llama-perplexity's method and output.

use std::io::Write;
use std::time::Instant;

use anyhow::Context as _;
use strata_engine::perplexity::perplexity;

use super::common::{DEFAULT_MODEL, LoadArgs, load_with};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(short = 'm', long, default_value = DEFAULT_MODEL)]
    model: String,
    /// The text to score.
    #[arg(short = 'f', long)]
    file: std::path::PathBuf,
    /// Tokens per chunk.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 512)]
    ctx_size: usize,
    #[arg(short = 't', long)]
    threads: Option<usize>,
    /// Score at most this many chunks.
    #[arg(long)]
    chunks: Option<usize>,
    #[command(flatten)]
    residency: LoadArgs,
    #[command(flatten)]
    kv: super::kvargs::KvArgs,
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let loaded = load_with(&args.model, args.threads, &args.residency)?;
    let model = &loaded.model;
    if args.ctx_size > model.config.n_ctx_train {
        anyhow::bail!(
            "--ctx-size {} exceeds the model's context length {}",
            args.ctx_size,
            model.config.n_ctx_train
        );
    }
    let mut tokens = model.tokenizer.encode(&text, true, false);
    if let Some(max) = args.chunks {
        tokens.truncate(max.saturating_mul(args.ctx_size));
    }
    let n_chunks = tokens.len() / args.ctx_size.max(1);
    eprintln!(
        "perplexity: tokenized {} tokens, {n_chunks} chunks of {}",
        tokens.len(),
        args.ctx_size
    );
    let mut ctx = args.kv.context(model, args.ctx_size, loaded.pool.clone())?;
    let t0 = Instant::now();
    let mut out = std::io::stdout().lock();
    let result = perplexity(model, &mut ctx, &tokens, args.ctx_size, |i, ppl| {
        let _ = write!(out, "[{}]{ppl:.4},", i + 1);
        let _ = out.flush();
    })?;
    writeln!(out)?;
    writeln!(
        out,
        "Final estimate: PPL = {:.4} +/- {:.5}",
        result.ppl, result.ppl_err
    )?;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "perplexity: {} chunks in {secs:.2} s ({:.1} tokens per second)",
        result.chunks,
        (result.chunks * args.ctx_size) as f64 / secs
    );
    Ok(())
}
