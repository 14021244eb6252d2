//! `strata bench`: llama-bench's tests and table, so results compare line by line.
//!
//! `pp N` times one forward pass over N prompt tokens from an empty context; `tg N` times N
//! single-token decode steps from an empty context. Each configuration runs once to warm up,
//! then `-r` times; the table shows mean ± standard deviation of tokens per second.

use std::io::Write;
use std::time::Instant;

use anyhow::Context as _;
use std::sync::Arc;
use strata_engine::model::ExpertPrefetch;
use strata_engine::{Context, Logits, Model};
use strata_simd::pool::ThreadPool;

use strata_storage::io::{IoKind, ReaderOptions, measure_read};

use super::common::{DEFAULT_MODEL, LoadArgs, open_model, threads};
use super::kvargs::KvArgs;
use super::specargs::SpecArgs;
use strata_engine::sampler::{Sampler, SamplerConfig};
use strata_engine::spec::Speculator;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model(s): store names, paths or URLs, comma-separated.
    #[arg(short = 'm', long, default_value = DEFAULT_MODEL, value_delimiter = ',')]
    model: Vec<String>,
    /// Prompt lengths to test (0 to skip), comma-separated.
    #[arg(
        short = 'p',
        long = "n-prompt",
        default_value = "512",
        value_delimiter = ','
    )]
    n_prompt: Vec<usize>,
    /// Generation lengths to test (0 to skip), comma-separated.
    #[arg(
        short = 'n',
        long = "n-gen",
        default_value = "128",
        value_delimiter = ','
    )]
    n_gen: Vec<usize>,
    /// Thread counts, comma-separated (default: one per core).
    #[arg(short = 't', long, value_delimiter = ',')]
    threads: Vec<usize>,
    /// Prompt then generation in one test (llama-bench's -pg PP,TG: t/s over both, from an
    /// empty context); repeatable.
    #[arg(long = "prompt-gen", value_name = "PP,TG")]
    prompt_gen: Vec<String>,
    /// Logical batch sizes, comma-separated (llama-bench's -b): a pass reads at most
    /// min(batch, ubatch) prompt tokens.
    #[arg(
        short = 'b',
        long = "batch-size",
        default_value = "2048",
        value_delimiter = ','
    )]
    batch: Vec<usize>,
    /// Tokens per forward pass while reading a prompt, comma-separated (llama-bench's -ub).
    #[arg(long = "ubatch-size", default_value = "512", value_delimiter = ',')]
    ubatch: Vec<usize>,
    /// Accepted for llama-bench's scripts (0, 1, on, off, auto): strata has one attention kernel
    /// on the CPU, so every setting measures the same.
    #[arg(long = "flash-attn", value_delimiter = ',',
          value_parser = ["0", "1", "on", "off", "auto"])]
    flash_attn: Vec<String>,
    /// Repetitions of each test.
    #[arg(short = 'r', long, default_value_t = 5)]
    repetitions: usize,
    /// Output format: md, json or csv (llama-bench's columns where strata has them).
    #[arg(short = 'o', long, default_value = "md", value_parser = ["md", "json", "csv"])]
    output: String,
    /// Say on stderr which test runs, and each repetition (llama-bench's --progress).
    #[arg(long)]
    progress: bool,
    /// Also measure this machine's memory read bandwidth (1 and N threads) and report the
    /// fraction of it each decode test reaches.
    #[arg(long)]
    membw: bool,
    /// Also measure the read bandwidth of the disk holding the model (O_DIRECT, io_uring,
    /// 64 reads of 1 MiB in flight; up to 16 GiB of the file, 3 times) and report the fraction of
    /// it that streamed decode reaches.
    #[arg(long)]
    disk: bool,
    /// MoE models whose experts stream: run each decode test with expert read-ahead `on`
    /// (cross-layer prediction), `off`, and `oracle` (the routing of a recorded run replayed:
    /// the ceiling), comma-separated; reports hits, reads and prediction precision/recall.
    #[arg(long = "moe-prefetch", value_delimiter = ',', value_parser = ["on", "off", "oracle"])]
    moe_prefetch: Vec<String>,
    /// Context already filled before each test (llama-bench's -d): random tokens prefilled
    /// once per thread count, cut back to this depth between runs.
    #[arg(short = 'd', long = "n-depth", default_value_t = 0)]
    depth: usize,
    /// With --n-depth: take the depth's KV cache from this session file when it holds
    /// exactly that many tokens of this model, else prefill and save it there.
    #[arg(long = "depth-session", value_name = "FILE", requires = "depth")]
    depth_session: Option<std::path::PathBuf>,
    #[command(flatten)]
    residency: LoadArgs,
    #[command(flatten)]
    kv: KvArgs,
    /// With speculative flags (-md, --spec-type), each tg test generates greedily after this
    /// text (a file; default "Once upon a time"), once plainly and once speculating, and
    /// reports the acceptance rate and tokens per target pass.
    #[arg(long = "spec-prompt", value_name = "FILE")]
    spec_prompt: Option<std::path::PathBuf>,
    #[command(flatten)]
    spec: SpecArgs,
}

struct Row {
    model: String,
    /// llama-bench's backend column: CPU, CUDA, or SIM (the simulated GPU).
    backend: &'static str,
    n_batch: usize,
    n_ubatch: usize,
    size: u64,
    params: u64,
    threads: usize,
    test: String,
    n_prompt: usize,
    n_gen: usize,
    samples: Vec<f64>,
    bytes_per_token: u64,
    /// Bytes read from disk per token, and the read bandwidth while testing (streamed weights).
    disk_per_token: f64,
    disk_gbs: f64,
}

/// The backend column: where the model's GPU phases run, if it has any.
fn backend_name(model: &strata_engine::Model) -> &'static str {
    match model.gpu_stats() {
        None => "CPU",
        Some(g) if g.device.contains("simulator") => "SIM",
        Some(_) => "CUDA",
    }
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    if args.repetitions == 0 {
        anyhow::bail!("--repetitions must be at least 1");
    }
    if args.batch.contains(&0) || args.ubatch.contains(&0) {
        anyhow::bail!("--batch-size and --ubatch-size must be at least 1");
    }
    let spec_cfg = args.spec.config()?;
    let speculating = args.spec.is_given() && spec_cfg.kind != strata_engine::spec::SpecType::None;
    let spec_text = match &args.spec_prompt {
        Some(f) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        None => "Once upon a time".to_owned(),
    };
    let pg: Vec<(usize, usize)> = args
        .prompt_gen
        .iter()
        .map(|s| parse_pg(s))
        .collect::<anyhow::Result<_>>()?;
    let batches: Vec<(usize, usize)> = args
        .batch
        .iter()
        .flat_map(|&b| args.ubatch.iter().map(move |&u| (b, u)))
        .collect();
    let thread_counts = if args.threads.is_empty() {
        vec![threads(None)?]
    } else {
        args.threads
            .iter()
            .map(|&t| threads(Some(t)))
            .collect::<anyhow::Result<_>>()?
    };
    let membw = if args.membw {
        Some(measure_membw(&thread_counts)?)
    } else {
        None
    };
    let mut rows = Vec::new();
    let mut disk = None;
    let mut expert_lines: Vec<String> = Vec::new();
    for spec in &args.model {
        let path = super::common::resolve_model(spec)?;
        if args.disk && disk.is_none() {
            disk = Some(measure_disk(&path)?);
        }
        let model = open_model(&path, &args.residency)?;
        let desc = describe(&model);
        for &nt in &thread_counts {
            let pool = Arc::new(ThreadPool::new(nt));
            let longest = args
                .n_prompt
                .iter()
                .chain(&args.n_gen)
                .copied()
                .chain(pg.iter().map(|(p, n)| p + n))
                .max()
                .unwrap_or(0);
            let spec_prompt = model.tokenizer.encode(&spec_text, true, true);
            let spec_len = if speculating { spec_prompt.len() } else { 0 };
            let n_ctx = (args.depth + longest + spec_len).max(1);
            let mut ctx = args.kv.context(&model, n_ctx, pool.clone())?;
            if args.depth > 0 {
                fill_depth(&model, &mut ctx, args.depth, args.depth_session.as_deref())?;
            }
            let tests = args
                .n_prompt
                .iter()
                .filter(|&&p| p > 0)
                .map(|&p| (p, 0))
                .chain(args.n_gen.iter().filter(|&&n| n > 0).map(|&n| (0, n)))
                .chain(pg.iter().copied());
            let spec_name = spec_cfg.kind.name();
            let modes: Vec<Option<&str>> = if speculating {
                vec![Some("plain"), Some(spec_name)]
            } else if args.moe_prefetch.is_empty() {
                vec![None]
            } else {
                args.moe_prefetch.iter().map(|m| Some(m.as_str())).collect()
            };
            let tests: Vec<(usize, usize, Option<&str>)> = tests
                .flat_map(|(p, n)| {
                    let ms = if n > 0 { modes.clone() } else { vec![None] };
                    ms.into_iter().map(move |m| (p, n, m))
                })
                .collect();
            // Every test at every (batch, ubatch) pair.
            let tests: Vec<_> = batches
                .iter()
                .flat_map(|&b| tests.iter().map(move |&t| (b, t)))
                .collect();
            for (i, ((n_batch, n_ubatch), (p, n, mode))) in tests.iter().copied().enumerate() {
                ctx.set_n_ubatch(n_batch.min(n_ubatch));
                let progress = args.progress.then(|| {
                    format!(
                        "strata bench: {desc}, t={nt}, test {}/{}: {}",
                        i + 1,
                        tests.len(),
                        test_name(p, n, mode)
                    )
                });
                match mode {
                    Some("off") => {
                        model.set_expert_prefetch(ExpertPrefetch::Off);
                    }
                    Some("oracle") => {
                        // Record the routing of the same token stream, then replay it.
                        model.set_expert_prefetch(ExpertPrefetch::Record);
                        run_test(&model, &mut ctx, args.depth, p, n, args.repetitions, None)?;
                        let log = model.set_expert_prefetch(ExpertPrefetch::Predict);
                        model.set_expert_prefetch(ExpertPrefetch::Replay(std::sync::Arc::new(log)));
                    }
                    _ => {
                        model.set_expert_prefetch(ExpertPrefetch::Predict);
                    }
                }
                if mode.is_some() {
                    // Each mode decodes the same token stream: it starts from an empty expert
                    // cache, so that none profits from what the one before read.
                    model.weights().clear_expert_cache();
                }
                let before = model.weights().stats();
                let pred0 = model.prediction_stats();
                let kv0 = ctx.kv_spill_stats();
                let t0 = Instant::now();
                let samples = if speculating && n > 0 {
                    let mut spec = if mode == Some("plain") {
                        Speculator::plain()
                    } else {
                        args.spec
                            .speculator(&model, n_ctx, &pool, &SamplerConfig::greedy())?
                    };
                    let s = run_spec_test(
                        &model,
                        &mut ctx,
                        &mut spec,
                        (args.depth, &spec_prompt),
                        n,
                        args.repetitions,
                        progress.as_deref(),
                    )?;
                    if spec.active() {
                        expert_lines.push(format!(
                            "{desc} {} t={nt}: {}",
                            test_name(p, n, mode),
                            super::specargs::describe(spec.config().kind, &spec.stats())
                        ));
                    }
                    s
                } else {
                    run_test(
                        &model,
                        &mut ctx,
                        args.depth,
                        p,
                        n,
                        args.repetitions,
                        progress.as_deref(),
                    )?
                };
                let secs = t0.elapsed().as_secs_f64();
                let after = model.weights().stats();
                let read = after.read.bytes - before.read.bytes;
                let tokens = ((p + n) * (args.repetitions + 1)) as f64;
                if let Some(m) = mode.filter(|_| !speculating) {
                    let pred = model.prediction_stats();
                    let (g, a, r) = (
                        pred.guessed - pred0.guessed,
                        pred.actual - pred0.actual,
                        pred.right - pred0.right,
                    );
                    let pct = |x: u64, y: u64| {
                        if y == 0 {
                            0.0
                        } else {
                            100.0 * x as f64 / y as f64
                        }
                    };
                    let lookups = (after.expert_hits - before.expert_hits)
                        + (after.expert_misses - before.expert_misses);
                    expert_lines.push(format!(
                        "{desc} tg{n} t={nt} prefetch {m}: {:.2} t/s, {:.1} MiB read per token, expert hit rate {:.1}% ({} of {} lookups, {} read on demand), waited {:.0}% of the time for experts, prediction precision {:.1}% recall {:.1}%",
                        tokens / secs,
                        read as f64 / tokens / 1048576.0,
                        pct(after.expert_hits - before.expert_hits, lookups),
                        after.expert_hits - before.expert_hits,
                        lookups,
                        after.expert_misses - before.expert_misses,
                        100.0 * (after.expert_wait - before.expert_wait).as_secs_f64() / secs,
                        pct(r, g),
                        pct(r, a),
                    ));
                }
                if let (Some(a), Some(b)) = (kv0, ctx.kv_spill_stats()) {
                    let mib = |x: f64| x / 1048576.0;
                    expert_lines.push(format!(
                        "{desc} {} @ d{} t={nt} KV cache: {:.0} MiB, {:.0} MiB in RAM (budget {:.0} MiB), {:.0} MiB on SSD; {:.1} MiB read per token, {:.1} MiB written per token; waited {:.1}% of the time for reads ({} pages read ahead, {} on demand)",
                        test_name(p, n, None),
                        args.depth,
                        mib(ctx.kv_bytes() as f64),
                        mib(ctx.kv_ram_bytes() as f64),
                        mib(b.ram_budget as f64),
                        mib(b.disk_bytes as f64),
                        mib((b.bytes_read - a.bytes_read) as f64) / tokens,
                        mib((b.bytes_written - a.bytes_written) as f64) / tokens,
                        100.0 * (b.wait - a.wait).as_secs_f64() / secs,
                        b.ahead_hits - a.ahead_hits,
                        b.ahead_misses - a.ahead_misses,
                    ));
                }
                rows.push(Row {
                    model: desc.clone(),
                    backend: backend_name(&model),
                    n_batch,
                    n_ubatch,
                    size: model.size_bytes(),
                    params: model.n_params(),
                    threads: nt,
                    test: test_name(p, n, mode)
                        + &if args.depth > 0 {
                            format!(" @ d{}", args.depth)
                        } else {
                            String::new()
                        },
                    n_prompt: p,
                    n_gen: n,
                    samples,
                    bytes_per_token: model.decode_bytes_per_token(),
                    disk_per_token: read as f64 / tokens,
                    disk_gbs: read as f64 / secs / 1e9,
                });
            }
        }
    }
    let mut out = std::io::stdout().lock();
    // llama-bench shows the batch columns only when they are not the defaults.
    let batch_cols = args.batch != [2048] || args.ubatch != [512];
    match args.output.as_str() {
        "json" => print_json(&mut out, &rows, membw.as_deref())?,
        "csv" => print_csv(&mut out, &rows, &args.kv, args.depth)?,
        _ => print_md(&mut out, &rows, membw.as_deref(), batch_cols)?,
    }
    if args.output != "md" {
        print_disk(&mut std::io::stderr(), &rows, disk.as_ref())?;
        expert_lines.iter().for_each(|l| eprintln!("{l}"));
    } else {
        print_disk(&mut out, &rows, disk.as_ref())?;
        for l in &expert_lines {
            writeln!(out, "{l}")?;
        }
    }
    Ok(())
}

/// The disk's sequential O_DIRECT read bandwidth over (up to) 16 GiB of `path`: every run's
/// GB/s, in order.
pub(crate) fn measure_disk(path: &std::path::Path) -> anyhow::Result<Vec<f64>> {
    let opts = ReaderOptions {
        kind: Some(IoKind::Uring),
        ..ReaderOptions::default()
    };
    (0..3)
        .map(|_| {
            let (bytes, secs) = measure_read(path, 16 << 30, &opts)
                .with_context(|| format!("measuring the read bandwidth of {}", path.display()))?;
            Ok(bytes as f64 / secs / 1e9)
        })
        .collect()
}

/// Streamed tests' disk traffic, against the disk's measured bandwidth when `--disk` ran.
fn print_disk(out: &mut impl Write, rows: &[Row], disk: Option<&Vec<f64>>) -> anyhow::Result<()> {
    let best = disk.map(|d| d.iter().copied().fold(0.0, f64::max));
    if let Some(d) = disk {
        let runs: Vec<String> = d.iter().map(|g| format!("{g:.2}")).collect();
        writeln!(
            out,
            "\ndisk read bandwidth (O_DIRECT, io_uring, 64 × 1 MiB in flight, 512 MiB per call): {:.2} GB/s best (runs: {})",
            best.unwrap_or(0.0),
            runs.join(", ")
        )?;
    }
    for r in rows.iter().filter(|r| r.disk_per_token > 0.0) {
        write!(
            out,
            "{} {} t={}: {:.1} MiB read from disk per token at {:.2} GB/s",
            r.model,
            r.test,
            r.threads,
            r.disk_per_token / (1u64 << 20) as f64,
            r.disk_gbs
        )?;
        match best {
            Some(b) if b > 0.0 => writeln!(
                out,
                " = {:.0}% of the disk's bandwidth",
                100.0 * r.disk_gbs / b
            )?,
            _ => writeln!(out)?,
        }
    }
    Ok(())
}

/// Random tokens, the same for every run (llama-bench draws its prompts the same way).
fn token_stream(model: &Model, seed: u64) -> impl FnMut() -> u32 {
    let n_vocab = model.config.n_vocab as u64;
    let mut seed = seed;
    move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 33) % n_vocab) as u32
    }
}

/// Fills `ctx` with `depth` positions: from `session` when it holds exactly that, else by
/// prefilling random tokens (and saving them to `session`).
fn fill_depth(
    model: &Model,
    ctx: &mut Context,
    depth: usize,
    session: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    if let Some(path) = session
        && path.exists()
    {
        let t0 = Instant::now();
        match model.load_session(ctx, path) {
            Ok(tokens) if tokens.len() == depth => {
                eprintln!(
                    "depth {depth}: KV cache loaded from {} in {:.1} s",
                    path.display(),
                    t0.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            Ok(tokens) => eprintln!(
                "{} holds {} tokens, not {depth}: prefilling",
                path.display(),
                tokens.len()
            ),
            Err(e) => eprintln!("{}: {e}; prefilling", path.display()),
        }
    }
    ctx.clear();
    let mut next = token_stream(model, 0xDEE9);
    let tokens: Vec<u32> = (0..depth).map(|_| next()).collect();
    let t0 = Instant::now();
    for chunk in tokens.chunks(512) {
        model.forward(ctx, chunk, Logits::None)?;
    }
    eprintln!(
        "depth {depth}: prefilled in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    if let Some(path) = session {
        let bytes = model.save_session(ctx, &tokens, path)?;
        eprintln!("depth {depth}: saved {bytes} bytes to {}", path.display());
    }
    Ok(())
}

/// llama-bench's test names: `pp512`, `tg128`, `pp512+tg128` (with `-pg`), and the expert
/// prefetch mode after a decode test's.
fn test_name(p: usize, n: usize, mode: Option<&str>) -> String {
    let base = match (p, n) {
        (0, n) => format!("tg{n}"),
        (p, 0) => format!("pp{p}"),
        (p, n) => format!("pp{p}+tg{n}"),
    };
    match mode {
        Some(m) if n > 0 => format!("{base} {m}"),
        _ => base,
    }
}

/// `-pg PP,TG`.
fn parse_pg(s: &str) -> anyhow::Result<(usize, usize)> {
    let parsed = s
        .split_once(',')
        .and_then(|(p, n)| Some((p.trim().parse().ok()?, n.trim().parse().ok()?)));
    match parsed {
        Some((p, n)) if p > 0 && n > 0 => Ok((p, n)),
        _ => anyhow::bail!(
            "-pg {s:?}: expected two token counts above 0, the prompt's and the generation's, \
             as in -pg 512,128"
        ),
    }
}

/// Times `reps` runs (after one warm-up) of `n_gen` tokens generated greedily through `spec`
/// after `prompt` (read untimed, after `depth` positions). One speculator serves every run, so
/// its measurements carry over from the warm-up.
fn run_spec_test(
    model: &Model,
    ctx: &mut Context,
    spec: &mut Speculator,
    (depth, prompt): (usize, &[u32]),
    n_gen: usize,
    reps: usize,
    progress: Option<&str>,
) -> anyhow::Result<Vec<f64>> {
    let mut samples = Vec::with_capacity(reps);
    let mut history = Vec::new();
    // The depth's tokens, as `fill_depth` drew them.
    let mut draw = token_stream(model, 0xDEE9);
    let depth_tokens: Vec<u32> = (0..depth).map(|_| draw()).collect();
    for rep in 0..=reps {
        if let Some(p) = progress {
            match rep {
                0 => eprintln!("{p}: warm-up"),
                r => eprintln!("{p}: repetition {r}/{reps}"),
            }
        }
        ctx.truncate(depth)?;
        history.clear();
        history.extend_from_slice(&depth_tokens);
        let mut sampler = Sampler::new(SamplerConfig::greedy());
        prompt.iter().for_each(|&t| sampler.accept(t));
        let logits = model.forward(ctx, prompt, Logits::Last)?;
        history.extend_from_slice(prompt);
        let mut next = sampler.sample(logits);
        let t0 = Instant::now();
        for _ in 0..n_gen {
            sampler.accept(next);
            next = spec.next(model, ctx, &mut sampler, &mut history, next)?;
        }
        let secs = t0.elapsed().as_secs_f64();
        spec.settle(ctx, &mut history)?;
        if rep > 0 {
            samples.push(n_gen as f64 / secs);
        }
    }
    Ok(samples)
}

/// Times `reps` runs (after one warm-up) of: `n_prompt` tokens in one pass, then `n_gen`
/// single-token steps. Returns each run's tokens per second.
fn run_test(
    model: &Model,
    ctx: &mut Context,
    depth: usize,
    n_prompt: usize,
    n_gen: usize,
    reps: usize,
    progress: Option<&str>,
) -> anyhow::Result<Vec<f64>> {
    let mut next_token = token_stream(model, 0x5EED);
    let mut samples = Vec::with_capacity(reps);
    // One warm-up run, then the measured ones.
    for rep in 0..=reps {
        if let Some(p) = progress {
            match rep {
                0 => eprintln!("{p}: warm-up"),
                r => eprintln!("{p}: repetition {r}/{reps}"),
            }
        }
        ctx.truncate(depth)?;
        let t0 = Instant::now();
        if n_prompt > 0 {
            let tokens: Vec<u32> = (0..n_prompt).map(|_| next_token()).collect();
            model.forward(ctx, &tokens, Logits::Last)?;
        }
        for _ in 0..n_gen {
            model.forward(ctx, &[next_token()], Logits::Last)?;
        }
        let secs = t0.elapsed().as_secs_f64();
        if rep > 0 {
            samples.push((n_prompt + n_gen) as f64 / secs);
        }
    }
    Ok(samples)
}

/// `(threads, bytes per second)` for 1 thread and each requested count.
fn measure_membw(thread_counts: &[usize]) -> anyhow::Result<Vec<(usize, f64)>> {
    // The kind of memory resident weights live in (`AlignedBuf::zeroed_huge`: huge pages with
    // STRATA_HUGEPAGES=1), so the percentage of it that decode reads compares like with like.
    let bytes = 2usize << 30;
    let mem = strata_storage::buf::AlignedBuf::zeroed_huge(bytes)
        .map_err(|e| anyhow::anyhow!("allocating 2 GiB to measure memory bandwidth: {e}"))?;
    // SAFETY: the buffer is 4 KiB-aligned, `bytes` long, zeroed (a valid u64 for every 8
    // bytes) and owned here for as long as `buf` is used.
    let buf: &mut [u64] =
        unsafe { std::slice::from_raw_parts_mut(mem.as_ptr().cast::<u64>(), bytes / 8) };
    for (i, w) in buf.iter_mut().enumerate() {
        *w = (i as u64).wrapping_mul(0x9E37_79B9);
    }
    let buf = &*buf;
    let mut counts = vec![1];
    counts.extend(thread_counts.iter().copied().filter(|&t| t != 1));
    Ok(counts
        .into_iter()
        .map(|t| {
            let pool = ThreadPool::new(t);
            (t, strata_simd::membw::read_bandwidth(&pool, buf, 5))
        })
        .collect())
}

/// llama.cpp's model description: "arch size-label file-type".
fn describe(model: &Model) -> String {
    let md = &model.weights().gguf().metadata;
    let label = md
        .get_str("general.size_label")
        .ok()
        .flatten()
        .map(str::to_string)
        .unwrap_or_else(|| human_params(model.n_params()));
    let ftype = md
        .get_u32("general.file_type")
        .ok()
        .flatten()
        .map_or("?", ftype_name);
    format!("{} {label} {ftype}", model.config.arch.name())
}

fn ftype_name(ft: u32) -> &'static str {
    match ft {
        0 => "all F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K - Medium",
        11 => "Q3_K - Small",
        12 => "Q3_K - Medium",
        13 => "Q3_K - Large",
        14 => "Q4_K - Small",
        15 => "Q4_K - Medium",
        16 => "Q5_K - Small",
        17 => "Q5_K - Medium",
        18 => "Q6_K",
        32 => "BF16",
        _ => "?",
    }
}

fn human_params(n: u64) -> String {
    if n >= 1_000_000_000 {
        format!("{:.1}B", n as f64 / 1e9)
    } else {
        format!("{}M", n / 1_000_000)
    }
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

fn print_md(
    out: &mut impl Write,
    rows: &[Row],
    membw: Option<&[(usize, f64)]>,
    batch_cols: bool,
) -> anyhow::Result<()> {
    let (bh, bs) = if batch_cols {
        (" n_batch | n_ubatch |", " ------: | -------: |")
    } else {
        ("", "")
    };
    writeln!(
        out,
        "| model                          |       size |     params | backend    | threads |{bh}            test |                  t/s |"
    )?;
    writeln!(
        out,
        "| ------------------------------ | ---------: | ---------: | ---------- | ------: |{bs} --------------: | -------------------: |"
    )?;
    for r in rows {
        let (m, sd) = mean_sd(&r.samples);
        let params = if r.params >= 1_000_000_000 {
            format!("{:.2} B", r.params as f64 / 1e9)
        } else {
            format!("{:.2} M", r.params as f64 / 1e6)
        };
        let batch = if batch_cols {
            format!(" {:>7} | {:>8} |", r.n_batch, r.n_ubatch)
        } else {
            String::new()
        };
        writeln!(
            out,
            "| {:<30} | {:>6.2} MiB | {:>10} | {:<10} | {:>7} |{batch} {:>15} | {:>20} |",
            r.model,
            r.size as f64 / (1u64 << 20) as f64,
            params,
            r.backend,
            r.threads,
            r.test,
            format!("{m:.2} ± {sd:.2}")
        )?;
    }
    for r in rows.iter().filter(|r| r.n_gen > 0 && r.n_prompt == 0) {
        let (m, _) = mean_sd(&r.samples);
        let gbs = m * r.bytes_per_token as f64 / 1e9;
        write!(
            out,
            "\n{} {} t={}: {:.2} GiB of weights per token → {gbs:.2} GB/s",
            r.model,
            r.test,
            r.threads,
            r.bytes_per_token as f64 / (1u64 << 30) as f64
        )?;
        if let Some(bw) = membw.and_then(|b| b.iter().find(|(t, _)| *t == r.threads)) {
            write!(
                out,
                " = {:.0}% of the measured {}-thread read bandwidth",
                100.0 * gbs * 1e9 / bw.1,
                r.threads
            )?;
        }
    }
    if let Some(bw) = membw {
        writeln!(out)?;
        for (t, b) in bw {
            write!(
                out,
                "\nmemory read bandwidth, {t} thread(s): {:.1} GB/s",
                b / 1e9
            )?;
        }
    }
    writeln!(out)?;
    Ok(())
}

fn print_json(
    out: &mut impl Write,
    rows: &[Row],
    membw: Option<&[(usize, f64)]>,
) -> anyhow::Result<()> {
    let items: Vec<String> = rows
        .iter()
        .map(|r| {
            let (m, sd) = mean_sd(&r.samples);
            let samples: Vec<String> = r.samples.iter().map(|s| format!("{s:.4}")).collect();
            format!(
                "  {{\"model_type\": {:?}, \"model_size\": {}, \"model_n_params\": {}, \"backends\": \"{}\", \"n_batch\": {}, \"n_ubatch\": {}, \"n_threads\": {}, \"n_prompt\": {}, \"n_gen\": {}, \"avg_ts\": {m:.6}, \"stddev_ts\": {sd:.6}, \"samples_ts\": [{}], \"weight_bytes_per_token\": {}}}",
                r.model,
                r.size,
                r.params,
                r.backend,
                r.n_batch,
                r.n_ubatch,
                r.threads,
                r.n_prompt,
                r.n_gen,
                samples.join(", "),
                r.bytes_per_token
            )
        })
        .collect();
    writeln!(out, "[\n{}\n]", items.join(",\n"))?;
    if let Some(bw) = membw {
        for (t, b) in bw {
            eprintln!("memory read bandwidth, {t} thread(s): {:.1} GB/s", b / 1e9);
        }
    }
    Ok(())
}

/// llama-bench's CSV: its header names, for the columns strata has.
fn print_csv(out: &mut impl Write, rows: &[Row], kv: &KvArgs, depth: usize) -> anyhow::Result<()> {
    writeln!(
        out,
        "model_type,model_size,model_n_params,backends,n_batch,n_ubatch,n_threads,type_k,type_v,n_prompt,n_gen,n_depth,avg_ns,stddev_ns,avg_ts,stddev_ts"
    )?;
    let ty = |t: &Option<String>| t.clone().unwrap_or_else(|| "f16".to_owned());
    for r in rows {
        let (m, sd) = mean_sd(&r.samples);
        let tokens = (r.n_prompt + r.n_gen) as f64;
        let ns: Vec<f64> = r.samples.iter().map(|ts| tokens / ts * 1e9).collect();
        let (mns, sdns) = mean_sd(&ns);
        writeln!(
            out,
            "\"{}\",{},{},\"{}\",{},{},{},\"{}\",\"{}\",{},{},{depth},{:.0},{:.0},{m:.6},{sd:.6}",
            r.model.replace('"', "\"\""),
            r.size,
            r.params,
            r.backend,
            r.n_batch,
            r.n_ubatch,
            r.threads,
            ty(&kv.cache_type_k),
            ty(&kv.cache_type_v),
            r.n_prompt,
            r.n_gen,
            mns,
            sdns
        )?;
    }
    Ok(())
}
