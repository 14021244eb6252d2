//! `strata run`: llama-cli in-process — complete a prompt, chat with `-cnv`, or take turns
//! with raw text with `-i` — and Ollama's `strata run MODEL [PROMPT]`.
//!
//! With no prompt, `run` chats (as llama-cli and Ollama do) when a person is at the terminal;
//! otherwise it says that a prompt is missing before loading anything.

mod daemon;
mod generate;
mod modes;
mod text;

use std::io::IsTerminal as _;
use std::sync::Arc;

use anyhow::Context as _;
use strata_engine::sampler::{Sampler, SamplerConfig};
use strata_simd::pool::ThreadPool;
use strata_storage::residency::ResidencyMode;

use super::common::{
    DEFAULT_CHAT_MODEL, DEFAULT_MODEL, LoadArgs, chat_template, ctx_size, load_with,
    print_residency, resolve_model, threads,
};
use generate::{GenOptions, Generator, Pools, print_perf};
use text::{Palette, process_escapes};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model, as -m gives it (Ollama's `strata run MODEL`).
    #[arg(value_name = "MODEL")]
    pub model_arg: Option<String>,
    /// The prompt, as -p gives it (Ollama's `strata run MODEL PROMPT`).
    #[arg(value_name = "PROMPT", conflicts_with_all = ["prompt", "file"])]
    pub prompt_arg: Option<String>,
    /// Model: a store name (pulled on first use), a path to a .gguf file, or an https URL.
    /// Default: gemma3-270m to complete a prompt, qwen2.5-coder-1.5b to chat (gemma3-270m is a
    /// base model that was never taught to chat).
    #[arg(short = 'm', long)]
    pub model: Option<String>,
    /// The prompt; in conversation mode the first message (as in llama-cli). Escapes such as
    /// \n are processed unless --no-escape.
    #[arg(short = 'p', long)]
    pub prompt: Option<String>,
    /// Read the prompt from a file (taken as it is: no escape processing).
    #[arg(short = 'f', long, conflicts_with = "prompt")]
    pub file: Option<std::path::PathBuf>,
    /// Tokens to generate (per answer when chatting); -1 means until the model ends its answer
    /// or the context is full. Given twice, the last counts (as in llama.cpp).
    #[arg(short = 'n', long = "n-predict", default_value_t = -1, allow_negative_numbers = true)]
    pub n_predict: i64,
    /// Context size in tokens; 0 means the model's trained length (default: 4096, or the
    /// trained length when that is shorter).
    #[arg(short = 'c', long = "ctx-size")]
    pub ctx_size: Option<usize>,
    /// Threads to compute on (default: one per core).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Threads for reading prompts, when different from --threads (llama.cpp's -tb).
    #[arg(long = "threads-batch", value_name = "N")]
    pub threads_batch: Option<usize>,
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
    /// Chat with the model using its chat template (llama.cpp's -cnv). Also what `run` does
    /// with no prompt at a terminal.
    #[arg(long)]
    pub conversation: bool,
    /// Plain completion, never chat (llama.cpp's -no-cnv).
    #[arg(long, conflicts_with = "conversation")]
    pub no_conversation: bool,
    /// System prompt for conversation mode (llama.cpp's -sys); implies -cnv.
    #[arg(long = "system-prompt")]
    pub system_prompt: Option<String>,
    /// Conversation mode: answer once, then exit (llama.cpp's -st); implies -cnv.
    #[arg(long = "single-turn")]
    pub single_turn: bool,
    /// Chat template instead of the model's: a built-in name (chatml, gemma, llama3, llama2)
    /// or a Jinja template.
    #[arg(long = "chat-template", value_name = "NAME|JINJA")]
    pub chat_template: Option<String>,
    /// Accepted for llama.cpp's scripts: strata always renders a model's own Jinja template.
    #[arg(long)]
    pub jinja: bool,
    /// Interactive: the prompt is continued as plain text (no chat template), and whenever
    /// generation stops (end of text, -n, a reverse prompt, Ctrl-C) a line you type is
    /// appended and generation goes on (llama.cpp's -i).
    #[arg(short = 'i', long, conflicts_with = "conversation")]
    pub interactive: bool,
    /// As -i, but you type first (llama.cpp's -if).
    #[arg(long = "interactive-first", conflicts_with = "conversation")]
    pub interactive_first: bool,
    /// Stop when the output contains TEXT; in -i and -cnv, your turn begins (llama.cpp's -r).
    /// Repeatable.
    #[arg(short = 'r', long = "reverse-prompt", value_name = "TEXT")]
    pub reverse_prompt: Vec<String>,
    /// Process escapes in the prompt and reverse prompts: \n \r \t \' \" \\ \xHH (the default,
    /// as in llama.cpp).
    #[arg(short = 'e', long, overrides_with = "no_escape")]
    pub escape: bool,
    /// Take the prompt and reverse prompts as typed.
    #[arg(long = "no-escape", overrides_with = "escape")]
    pub no_escape: bool,
    /// Colour the prompt and your input apart from generated text: on, off, or auto (when
    /// standard output is a terminal); bare --color is on (llama.cpp's -co).
    #[arg(long, value_name = "WHEN", num_args = 0..=1, default_missing_value = "on",
          value_parser = ["on", "off", "auto"])]
    pub color: Option<String>,
    /// Do not echo the prompt before the generated text.
    #[arg(long)]
    pub no_display_prompt: bool,
    /// Keep generating past end-of-generation tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Logical batch: most prompt tokens submitted at once (llama.cpp's -b); a pass reads at
    /// most min(batch, ubatch) tokens.
    #[arg(short = 'b', long = "batch-size", default_value_t = 2048)]
    pub batch_size: usize,
    /// Tokens per forward pass while reading the prompt (llama.cpp's -ub).
    #[arg(long = "ubatch-size", default_value_t = 512)]
    pub ubatch_size: usize,
    /// Accepted for llama.cpp's scripts (on, off, auto): strata has one attention kernel on
    /// the CPU, so every setting computes the same (llama.cpp's -fa).
    #[arg(long = "flash-attn", value_name = "on|off|auto", num_args = 0..=1,
          default_missing_value = "on", value_parser = ["on", "off", "auto", "1", "0"])]
    pub flash_attn: Option<String>,
    /// Accepted for llama.cpp's scripts (none, layer, row): strata computes on one device, the
    /// CPU, where the three are the same (llama.cpp's -sm).
    #[arg(long = "split-mode", value_parser = ["none", "layer", "row"])]
    pub split_mode: Option<String>,
    /// Lock the process's memory (the weights, the KV cache) in RAM so it is never swapped out
    /// (mlockall; needs a memlock limit as large as the model).
    #[arg(long)]
    pub mlock: bool,
    /// Accepted for llama.cpp's scripts: strata runs no warm-up pass.
    #[arg(long = "no-warmup")]
    pub no_warmup: bool,
    /// Do not print the timings at the end.
    #[arg(long = "no-perf")]
    pub no_perf: bool,
    /// No logs and no timings on stderr (llama.cpp's --log-disable); errors still show.
    #[arg(long = "log-disable")]
    pub log_disable: bool,
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
    #[command(flatten)]
    pub spec: super::specargs::SpecArgs,
    /// Also report how the weights are held, bytes read from disk, I/O stall time, read
    /// bandwidth, hits per tier and the peak RSS; and log what was loaded (llama.cpp's -v).
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// Generate through the stratad listening on this Unix socket instead of in-process (the
    /// model must then be a store name; the daemon's context and threads apply).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<std::path::PathBuf>,
}

/// How `run` talks to the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Complete,
    Converse,
    /// `-i`; `first`: the user types before anything is generated.
    Interactive {
        first: bool,
    },
}

impl Args {
    /// The model named positionally or with -m (not both, unless they agree).
    pub fn model_spec(&self) -> anyhow::Result<Option<String>> {
        match (&self.model_arg, &self.model) {
            (Some(a), Some(m)) if a != m => {
                anyhow::bail!("two models named: {a} and -m {m}; give one")
            }
            (a, m) => Ok(a.clone().or_else(|| m.clone())),
        }
    }

    /// The prompt from -p, the positional PROMPT or -f, with escapes processed as asked.
    fn prompt_text(&self) -> anyhow::Result<Option<String>> {
        let typed = self.prompt.as_ref().or(self.prompt_arg.as_ref());
        match (typed, &self.file) {
            (Some(p), _) if self.no_escape => Ok(Some(p.clone())),
            (Some(p), _) => Ok(Some(process_escapes(p).map_err(anyhow::Error::msg)?)),
            (None, Some(f)) => Ok(Some(
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
            )),
            (None, None) => Ok(None),
        }
    }

    fn mode(&self, has_prompt: bool) -> anyhow::Result<Mode> {
        Ok(if self.conversation || self.single_turn {
            Mode::Converse
        } else if self.interactive || self.interactive_first {
            Mode::Interactive {
                first: self.interactive_first || !has_prompt,
            }
        } else if has_prompt && self.system_prompt.is_none() {
            Mode::Complete
        } else if self.no_conversation {
            anyhow::bail!("no prompt: give one with -p TEXT or -f FILE");
        } else if self.system_prompt.is_some() || std::io::stdin().is_terminal() {
            // llama-cli chats when the model has a template and no prompt is given; Ollama's
            // `run MODEL` does too.
            Mode::Converse
        } else {
            anyhow::bail!(
                "no prompt: give one with -p TEXT or -f FILE, or chat with -cnv (standard \
                 input is not a terminal, so strata run does not start a chat by itself)"
            );
        })
    }
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
    args.spec.config()?;
    if args.batch_size == 0 || args.ubatch_size == 0 {
        anyhow::bail!("--batch-size and --ubatch-size must be at least 1");
    }
    let prompt = args.prompt_text()?;
    let mode = args.mode(prompt.is_some())?;
    let spec = args.model_spec()?;
    if let Some(socket) = args.socket.clone() {
        if mode != Mode::Complete {
            anyhow::bail!("--socket completes a prompt; chat with a daemon through `strata chat`");
        }
        let model = spec.unwrap_or_else(|| DEFAULT_MODEL.to_owned());
        return daemon::exec(&args, &model, socket, prompt);
    }
    let reverse: Vec<String> = if args.no_escape {
        args.reverse_prompt.clone()
    } else {
        args.reverse_prompt
            .iter()
            .map(|r| process_escapes(r).map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<_>>()?
    };
    let model_name = spec.unwrap_or_else(|| {
        if mode == Mode::Converse {
            DEFAULT_CHAT_MODEL
        } else {
            DEFAULT_MODEL
        }
        .to_owned()
    });
    // Before the weights load: a model that cannot chat is said so at once.
    let template = match mode {
        Mode::Converse => {
            let path = resolve_model(&model_name)?;
            Some(chat_template(
                &path,
                &model_name,
                args.chat_template.as_deref(),
            )?)
        }
        _ => None,
    };
    let loaded = load_with(&model_name, args.threads, &args.residency)?;
    let n_ctx = match args.ctx_size {
        Some(c) => ctx_size(&loaded.model, c)?,
        None => loaded.model.config.n_ctx_train.min(4096),
    };
    let mut ctx = args.kv.context(&loaded.model, n_ctx, loaded.pool.clone())?;
    ctx.set_n_ubatch(args.batch_size.min(args.ubatch_size));
    let batch = match args.threads_batch {
        Some(tb) if tb != loaded.pool.n_threads() => {
            Some(Arc::new(ThreadPool::new(threads(Some(tb))?)))
        }
        _ => None,
    };
    let pools = Pools {
        decode: loaded.pool.clone(),
        batch,
    };
    if args.mlock {
        lock_memory();
    }
    let spec = args
        .spec
        .speculator(&loaded.model, n_ctx, &loaded.pool, &sampler_cfg)?;
    let mut sampler = Sampler::new(sampler_cfg);
    let opts = GenOptions {
        n_predict: args.n_predict,
        ignore_eos: args.ignore_eos,
        reverse,
        interruptible: mode != Mode::Complete,
    };
    if opts.interruptible {
        crate::interrupt::install().context("installing the Ctrl-C handler")?;
    }
    let io = modes::Io {
        palette: Palette::from_flag(args.color.as_deref()),
        display_prompt: !args.no_display_prompt,
        prompt_cache: args
            .prompt_cache
            .as_deref()
            .map(|p| (p, args.prompt_cache_ro)),
    };
    let mut g = Generator {
        model: &loaded.model,
        ctx: &mut ctx,
        sampler: &mut sampler,
        pools: &pools,
        opts: &opts,
        perf: Default::default(),
        spec,
        fed: Vec::new(),
    };
    let result = match (mode, &template) {
        (Mode::Converse, Some(t)) => {
            if std::io::stdin().is_terminal() && !args.log_disable {
                eprintln!(
                    "chatting with {model_name}; type a message, Ctrl-C stops an answer, Ctrl-D leaves"
                );
            }
            modes::converse(
                &mut g,
                &io,
                t,
                args.system_prompt.clone(),
                prompt,
                args.single_turn,
            )
        }
        (Mode::Interactive { first }, _) => {
            modes::interactive(&mut g, &io, prompt.as_deref(), first)
        }
        _ => modes::complete(&mut g, &io, prompt.as_deref().unwrap_or_default()),
    };
    let perf = std::mem::take(&mut g.perf);
    let spec = (g.spec.active() || args.verbose)
        .then(|| super::specargs::describe(g.spec.config().kind, &g.spec.stats()));
    if args.log_disable || args.no_perf {
        return result;
    }
    print_perf(loaded.load_ms, &perf);
    if let Some(line) = spec {
        eprintln!("strata_perf_context_print: {line}");
    }
    if args.verbose || loaded.model.weights().stats().mode != ResidencyMode::Resident {
        print_residency(&loaded.model);
    }
    if args.verbose || loaded.model.gpu_stats().is_some() {
        super::common::print_gpu(&loaded.model);
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

/// `--mlock`: pins everything mapped now (the weights, the context) in RAM. A refusal (the
/// memlock limit) is a warning, as in llama.cpp: the run goes on, unlocked.
fn lock_memory() {
    // SAFETY: mlockall takes flags only and touches no memory of ours.
    if unsafe { libc::mlockall(libc::MCL_CURRENT) } != 0 {
        let e = std::io::Error::last_os_error();
        eprintln!(
            "warning: --mlock: could not lock the model in RAM ({e}); raise the limit with \
             `ulimit -l` or LimitMEMLOCK= (running unlocked)"
        );
    }
}
