//! `strata run`: llama-cli in-process — generate from a prompt, or chat with `-cnv`.

use std::io::{BufRead, Write};
use std::time::Instant;

use anyhow::Context as _;
use strata_engine::chat::{ChatMessage, ChatTemplate};
use strata_engine::sampler::{Sampler, SamplerConfig};
use strata_engine::tokenizer::StreamDecoder;
use strata_engine::{Context, Logits, Model};

use strata_storage::residency::ResidencyMode;

use super::common::{DEFAULT_MODEL, LoadArgs, Loaded, ctx_size, load_with, print_residency};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model: a store name (pulled on first use), a path to a .gguf file, or an https URL.
    #[arg(short = 'm', long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// The prompt (in conversation mode: the system prompt).
    #[arg(short = 'p', long)]
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(short = 'f', long, conflicts_with = "prompt")]
    pub file: Option<std::path::PathBuf>,
    /// Tokens to generate; -1 means until the model ends its answer or the context is full.
    #[arg(short = 'n', long = "n-predict", default_value_t = -1, allow_negative_numbers = true)]
    pub n_predict: i64,
    /// Context size in tokens; 0 means the model's trained length (default: 4096, or the
    /// trained length when that is shorter).
    #[arg(short = 'c', long = "ctx-size")]
    pub ctx_size: Option<usize>,
    /// Threads to compute on (default: one per core).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
    pub temp: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long = "top-k", default_value_t = 40)]
    pub top_k: usize,
    /// Keep the most likely tokens up to this total probability (1.0 = off).
    #[arg(long = "top-p", default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens less likely than this fraction of the best one (0.0 = off).
    #[arg(long = "min-p", default_value_t = 0.05)]
    pub min_p: f32,
    /// Penalise tokens seen in the last --repeat-last-n tokens (1.0 = off).
    #[arg(long = "repeat-penalty", default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long = "repeat-last-n", default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Random seed; -1 picks one.
    #[arg(short = 's', long, default_value_t = -1, allow_negative_numbers = true)]
    pub seed: i64,
    /// Chat with the model using its chat template (llama.cpp's -cnv).
    #[arg(long)]
    pub conversation: bool,
    /// Plain completion even when the model has a chat template (llama.cpp's -no-cnv).
    #[arg(long, conflicts_with = "conversation")]
    pub no_conversation: bool,
    /// System prompt for conversation mode (llama.cpp's -sys).
    #[arg(long = "system-prompt")]
    pub system_prompt: Option<String>,
    /// Do not echo the prompt before the generated text.
    #[arg(long)]
    pub no_display_prompt: bool,
    /// Keep generating past end-of-generation tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Tokens per forward pass while reading the prompt.
    #[arg(short = 'b', long = "batch-size", default_value_t = 512)]
    pub batch_size: usize,
    /// Save the prompt's KV cache to FILE after reading the prompt, and on later runs resume
    /// from the longest prefix the file shares with the new prompt (llama.cpp's flag).
    #[arg(long = "prompt-cache", value_name = "FILE")]
    pub prompt_cache: Option<std::path::PathBuf>,
    /// Use --prompt-cache without updating the file.
    #[arg(long = "prompt-cache-ro", requires = "prompt_cache")]
    pub prompt_cache_ro: bool,
    #[command(flatten)]
    pub residency: LoadArgs,
    #[command(flatten)]
    pub kv: super::kvargs::KvArgs,
    /// Also report how the weights are held, bytes read from disk, I/O stall time, read
    /// bandwidth, hits per tier and the peak RSS.
    #[arg(long)]
    pub verbose: bool,
    /// Generate through the stratad listening on this Unix socket instead of in-process (the
    /// model must then be a store name; the daemon's context and threads apply).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<std::path::PathBuf>,
}

/// Timings in llama.cpp's terms.
#[derive(Default)]
struct Perf {
    prompt_ms: f64,
    prompt_tokens: usize,
    eval_ms: f64,
    eval_runs: usize,
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    let sampler_cfg = SamplerConfig {
        temp: args.temp,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repeat_penalty: args.repeat_penalty,
        repeat_last_n: args.repeat_last_n,
        seed: if args.seed < 0 {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        } else {
            args.seed as u64
        },
    };
    sampler_cfg.validate().map_err(anyhow::Error::msg)?;
    if args.batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    let prompt = match (&args.prompt, &args.file) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(f)) => {
            Some(std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?)
        }
        (None, None) => None,
    };
    if let Some(socket) = args.socket.clone() {
        return super::run_daemon::exec(&args, socket, prompt);
    }
    let loaded = load_with(&args.model, args.threads, &args.residency)?;
    let n_ctx = match args.ctx_size {
        Some(c) => ctx_size(&loaded.model, c)?,
        None => loaded.model.config.n_ctx_train.min(4096),
    };
    let mut ctx = args.kv.context(&loaded.model, n_ctx, loaded.pool.clone())?;
    ctx.set_n_ubatch(args.batch_size);
    let mut sampler = Sampler::new(sampler_cfg);
    let mut perf = Perf::default();
    let result = if args.conversation {
        converse(&loaded, &mut ctx, &mut sampler, &args, prompt, &mut perf)
    } else {
        complete(&loaded, &mut ctx, &mut sampler, &args, prompt, &mut perf)
    };
    print_perf(loaded.load_ms, &perf);
    if args.verbose || loaded.model.weights().stats().mode != ResidencyMode::Resident {
        print_residency(&loaded.model);
    }
    if let Some(s) = ctx.kv_spill_stats() {
        let mib = |b: f64| b / 1048576.0;
        eprintln!(
            "strata_perf_context_print:    KV cache = {:.1} MiB, {:.1} MiB in RAM (budget {:.1} MiB), {:.1} MiB on SSD; {:.1} MiB read back, waited {:.1} ms",
            mib(ctx.kv_bytes() as f64),
            mib(ctx.kv_ram_bytes() as f64),
            mib(s.ram_budget as f64),
            mib(s.disk_bytes as f64),
            mib(s.bytes_read as f64),
            s.wait.as_secs_f64() * 1e3
        );
    }
    result
}

fn complete(
    loaded: &Loaded,
    ctx: &mut Context,
    sampler: &mut Sampler,
    args: &Args,
    prompt: Option<String>,
    perf: &mut Perf,
) -> anyhow::Result<()> {
    let model = &loaded.model;
    let prompt = prompt.unwrap_or_default();
    let tokens = model.tokenizer.encode(&prompt, true, true);
    if tokens.is_empty() {
        anyhow::bail!("the prompt is empty and this model adds no BOS token; give one with -p");
    }
    let mut out = std::io::stdout().lock();
    if !args.no_display_prompt {
        out.write_all(prompt.as_bytes())?;
        out.flush()?;
    }
    let start = match &args.prompt_cache {
        Some(path) => prompt_cache(
            model,
            ctx,
            sampler,
            path,
            &tokens,
            args.prompt_cache_ro,
            perf,
        )?,
        None => 0,
    };
    generate(model, ctx, sampler, &tokens[start..], args, perf, &mut out)?;
    writeln!(out)?;
    Ok(())
}

/// `--prompt-cache`: resumes from the longest prefix of `tokens` saved in `path` (a file of
/// another model or a damaged one is an error, and is left alone), reads the rest of the prompt
/// but its last token, and saves the cache for next time. Returns the index of the first token
/// still to be fed.
fn prompt_cache(
    model: &Model,
    ctx: &mut Context,
    sampler: &mut Sampler,
    path: &std::path::Path,
    tokens: &[u32],
    read_only: bool,
    perf: &mut Perf,
) -> anyhow::Result<usize> {
    let shown = path.display();
    let mut have = 0;
    if path.exists() {
        let t0 = Instant::now();
        let saved = model.load_session(ctx, path).with_context(|| {
            format!("loading the prompt cache {shown} (delete it to start over)")
        })?;
        have = saved.iter().zip(tokens).take_while(|(a, b)| a == b).count();
        // At least the last prompt token is fed again, for its logits.
        have = have.min(tokens.len() - 1);
        ctx.truncate(have);
        eprintln!(
            "strata: loaded a prompt cache of {} tokens from {shown} in {:.1} ms; {have} of the prompt's {} tokens reused",
            saved.len(),
            t0.elapsed().as_secs_f64() * 1e3,
            tokens.len()
        );
    }
    let upto = tokens.len() - 1;
    tokens[..have].iter().for_each(|&t| sampler.accept(t));
    if have < upto {
        if ctx.n_past() + upto - have > ctx.n_ctx() {
            anyhow::bail!(
                "the prompt needs {} tokens but the context has room for {} (raise --ctx-size)",
                tokens.len(),
                ctx.n_ctx()
            );
        }
        let t0 = Instant::now();
        model.forward(ctx, &tokens[have..upto], Logits::None)?;
        perf.prompt_ms += t0.elapsed().as_secs_f64() * 1e3;
        perf.prompt_tokens += upto - have;
        tokens[have..upto].iter().for_each(|&t| sampler.accept(t));
    }
    if !read_only && have < upto {
        let t0 = Instant::now();
        let bytes = model
            .save_session(ctx, &tokens[..upto], path)
            .with_context(|| format!("saving the prompt cache {shown}"))?;
        eprintln!(
            "strata: saved {upto} tokens ({:.1} MiB) to {shown} in {:.1} ms",
            bytes as f64 / 1048576.0,
            t0.elapsed().as_secs_f64() * 1e3
        );
    }
    Ok(upto)
}

/// Feeds `tokens` after what the context holds and samples until the end of the answer;
/// returns the generated text.
fn generate(
    model: &Model,
    ctx: &mut Context,
    sampler: &mut Sampler,
    tokens: &[u32],
    args: &Args,
    perf: &mut Perf,
    out: &mut impl Write,
) -> anyhow::Result<String> {
    let tok = &model.tokenizer;
    if ctx.n_past() + tokens.len() > ctx.n_ctx() {
        anyhow::bail!(
            "the prompt needs {} tokens but the context has room for {} (raise --ctx-size)",
            tokens.len(),
            ctx.n_ctx() - ctx.n_past()
        );
    }
    tokens.iter().for_each(|&t| sampler.accept(t));
    let t0 = Instant::now();
    let mut next = sampler.sample(model.forward(ctx, tokens, Logits::Last)?);
    perf.prompt_ms += t0.elapsed().as_secs_f64() * 1e3;
    perf.prompt_tokens += tokens.len();
    let mut decoder = StreamDecoder::new();
    let mut text = String::new();
    let mut produced = 0i64;
    loop {
        if !args.ignore_eos && tok.is_eog(next) {
            break;
        }
        sampler.accept(next);
        let piece = decoder.push(&tok.token_to_piece(next, false));
        out.write_all(piece.as_bytes())?;
        out.flush()?;
        text.push_str(&piece);
        produced += 1;
        if args.n_predict >= 0 && produced >= args.n_predict {
            break;
        }
        if ctx.n_past() + 1 > ctx.n_ctx() {
            eprintln!("\n[context full: {} tokens]", ctx.n_ctx());
            break;
        }
        let t = Instant::now();
        next = sampler.sample(model.forward(ctx, &[next], Logits::Last)?);
        perf.eval_ms += t.elapsed().as_secs_f64() * 1e3;
        perf.eval_runs += 1;
    }
    let rest = decoder.finish();
    out.write_all(rest.as_bytes())?;
    text.push_str(&rest);
    Ok(text)
}

fn converse(
    loaded: &Loaded,
    ctx: &mut Context,
    sampler: &mut Sampler,
    args: &Args,
    prompt: Option<String>,
    perf: &mut Perf,
) -> anyhow::Result<()> {
    let model = &loaded.model;
    let md = &model.weights().gguf().metadata;
    let template = ChatTemplate::from_gguf(md, model.config.arch.name())?;
    let mut history = Vec::new();
    if let Some(sys) = args.system_prompt.clone().or(prompt) {
        history.push(ChatMessage {
            role: "system".into(),
            content: sys,
        });
    }
    // Tokens the context holds, so each turn only evaluates what is new.
    let mut cached: Vec<u32> = Vec::new();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut out = std::io::stdout().lock();
    loop {
        write!(out, "\n> ")?;
        out.flush()?;
        let Some(line) = lines.next() else { break };
        let line = line.context("reading standard input")?;
        if line.trim().is_empty() {
            continue;
        }
        history.push(ChatMessage {
            role: "user".into(),
            content: line,
        });
        let rendered = template.render(&history, true)?;
        // The tokenizer adds BOS itself; drop the template's copy so there is only one.
        let text = template
            .bos_prefix()
            .and_then(|p| rendered.strip_prefix(p))
            .unwrap_or(&rendered);
        let tokens = model.tokenizer.encode(text, true, true);
        let common = cached
            .iter()
            .zip(&tokens)
            .take_while(|(a, b)| a == b)
            .count()
            .min(tokens.len().saturating_sub(1));
        ctx.truncate(common);
        let answer = generate(model, ctx, sampler, &tokens[common..], args, perf, &mut out)?;
        writeln!(out)?;
        cached = tokens;
        history.push(ChatMessage {
            role: "assistant".into(),
            content: answer,
        });
        // The answer's own tokens are re-derived from the template on the next turn.
        cached.truncate(ctx.n_past());
    }
    Ok(())
}

fn print_perf(load_ms: f64, p: &Perf) {
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
