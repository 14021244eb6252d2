//! What several commands share: finding the model (pulling it on first use), loading it, and
//! the thread pool.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use strata_engine::Model;
use strata_engine::chat::ChatTemplate;
use strata_engine::model::{
    CpuMoe, DeviceSpec, EnvSettings, GpuOptions, LoadSettings, ModelOptions, SettingNames,
};
use strata_kernels::SimConfig;
use strata_simd::pool::ThreadPool;
use strata_storage::io::IoKind;
use strata_storage::residency::ResidencyMode;
use strata_storage::store::Store;

/// The model `strata run` completes prompts with when none is named.
pub const DEFAULT_MODEL: &str = "gemma3-270m";

/// The model chats use when none is named (`run -cnv`, `chat --local`): an instruct model with
/// a chat template. The default model is a base model, which was never taught to chat.
pub const DEFAULT_CHAT_MODEL: &str = "qwen2.5-coder-1.5b";

pub struct Loaded {
    pub model: Model,
    pub pool: Arc<ThreadPool>,
    pub load_ms: f64,
}

/// A path to the model file for `spec` (a file path, a store name or a URL), pulling it into
/// the store first if needed.
pub fn resolve_model(spec: &str) -> anyhow::Result<PathBuf> {
    let store = Store::open_default().context("opening the model store")?;
    let mut progress = crate::progress::BarProgress::new();
    store.ensure(spec, &mut progress).map_err(|e| {
        // Most store errors name the model or URL already; say it once.
        if e.to_string().contains(spec) {
            anyhow::Error::new(e)
        } else {
            anyhow::Error::new(e).context(format!("model '{spec}'"))
        }
    })
}

/// The chat template of the model file at `path` (`name` as the user gave it), read from its
/// header before the weights load: `choice` (`--chat-template`) when given, else the file's
/// own. A file without one is a base model, never taught to chat: that is an error saying so
/// rather than a guessed format producing nonsense.
pub fn chat_template(
    path: &std::path::Path,
    name: &str,
    choice: Option<&str>,
) -> anyhow::Result<ChatTemplate> {
    let gguf = strata_storage::gguf::GgufFile::open(path)
        .with_context(|| format!("reading {}", path.display()))?;
    let md = &gguf.metadata;
    let arch = md
        .get_str("general.architecture")
        .ok()
        .flatten()
        .unwrap_or_default();
    let t = ChatTemplate::from_gguf_with(md, arch, choice)
        .with_context(|| format!("the chat template of {name}"))?;
    if t.guessed() {
        anyhow::bail!(
            "{name} has no chat template: it is a base model, not trained to chat, so its \
             answers would be nonsense. Chat with an instruct model ({DEFAULT_CHAT_MODEL}, the \
             default for chats), complete a prompt with -p, or name a template with \
             --chat-template {} if you know the model follows it",
            t.name()
        );
    }
    Ok(t)
}

/// Threads to compute on: `-t` when given, else one per available core.
pub fn threads(requested: Option<usize>) -> anyhow::Result<usize> {
    match requested {
        Some(0) => anyhow::bail!("--threads must be at least 1"),
        Some(n) if n > 1024 => anyhow::bail!("--threads {n} is more than any machine has"),
        Some(n) => Ok(n),
        // One worker per physical core: SMT siblings share the units the kernels saturate.
        None => Ok(strata_simd::topology::physical_cores()),
    }
}

/// How the weights are held: the residency flags `run`, `perplexity` and `bench` share.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct LoadArgs {
    /// RAM the weights may use: bytes with an optional K/M/G suffix (powers of 1024), or a
    /// percentage of the model's weights ("30%"). Layers that do not fit are streamed from
    /// disk every step. Default: all of them when they fit in available memory.
    #[arg(long = "ram-budget", value_name = "SIZE")]
    pub ram_budget: Option<String>,
    /// Streaming buffers: the layer computing plus those read ahead (at least 2; default 3).
    #[arg(long, value_name = "N")]
    pub prefetch: Option<usize>,
    /// Map the file and let the page cache decide what stays in RAM (llama.cpp's default),
    /// instead of reading it with O_DIRECT.
    #[arg(long, conflicts_with_all = ["ram_budget", "prefetch"])]
    pub mmap: bool,
    /// Read the weights into memory instead of mapping the file: strata's default, accepted
    /// for llama.cpp's scripts.
    #[arg(long = "no-mmap", conflicts_with = "mmap")]
    pub no_mmap: bool,
    /// I/O engine for reading weights: uring or pread (default: uring, falling back to pread;
    /// also STRATA_IO).
    #[arg(long, value_name = "ENGINE", value_parser = ["uring", "pread"])]
    pub io: Option<String>,
    /// Tensor placement as llama.cpp's -ot: PATTERN=TYPE[,…], a regular expression searched in
    /// each tensor's name, the first matching rule deciding. TYPE: CPU (host memory; RAM or
    /// SSD as the budget says), RAM (held in RAM, counted against --ram-budget first), CUDA0…
    /// (the GPU of --device; refused without one). Repeatable.
    #[arg(long = "override-tensor", value_name = "PATTERN=TYPE")]
    pub override_tensor: Vec<String>,
    /// Keep every MoE expert tensor on the CPU (llama.cpp's --cpu-moe): in host memory,
    /// computed there.
    #[arg(long = "cpu-moe")]
    pub cpu_moe: bool,
    /// Keep the expert tensors of the first N layers on the CPU (llama.cpp's --n-cpu-moe).
    #[arg(long = "n-cpu-moe", value_name = "N", conflicts_with = "cpu_moe")]
    pub n_cpu_moe: Option<usize>,
    #[command(flatten)]
    pub gpu: GpuArgs,
}

/// Where the GPU phases run (llama.cpp's words): `run`, `perplexity`, `bench`, `chat --local`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct GpuArgs {
    /// cpu, cuda (GPU 0), cuda:N, or sim (the simulated GPU: the CUDA kernels run on this
    /// CPU). Default: cuda when an NVIDIA driver is present, else cpu.
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<String>,
    /// llama.cpp's -ngl: the last N layers on the GPU (the output projection counts as one).
    /// Default: as many as fit the VRAM budget, the rest streamed to it or computed on the CPU
    /// as the planner's cost model says (`strata plan` shows it).
    #[arg(long = "n-gpu-layers", visible_alias = "gpu-layers", value_name = "N")]
    pub n_gpu_layers: Option<usize>,
    /// VRAM the weights and KV cache may use: bytes with K/M/G, or a % of the GPU's.
    #[arg(long = "vram-budget", value_name = "SIZE")]
    pub vram_budget: Option<String>,
    /// Keep the KV cache in host RAM and run attention on the CPU (llama.cpp's -nkvo).
    #[arg(long = "no-kv-offload")]
    pub no_kv_offload: bool,
    /// KV cache VRAM for each context (bytes with K/M/G); the oldest pages of GPU layers go
    /// to RAM beyond it. Default: what the planner left after the weights.
    #[arg(long = "kv-vram-budget", value_name = "SIZE")]
    pub kv_vram_budget: Option<String>,
    /// The hardware profile the planner's cost model uses (a shipped name or a file; default:
    /// this machine's from `strata calibrate`, or the shipped 2-core CPU's).
    #[arg(long = "hw", value_name = "PROFILE")]
    pub hw: Option<String>,
}

impl GpuArgs {
    /// The engine's GPU options: the device (probing the driver when none is named), the
    /// placement words and budgets.
    pub fn options(&self, n_ctx: Option<usize>) -> anyhow::Result<GpuOptions> {
        let wants_gpu = self.n_gpu_layers.is_some_and(|n| n > 0)
            || self.vram_budget.is_some()
            || self.kv_vram_budget.is_some()
            || self.no_kv_offload;
        let device = match self.device.as_deref() {
            None if strata_kernels::Device::cuda_driver_present() => DeviceSpec::Cuda(0),
            None if wants_gpu => anyhow::bail!(
                "GPU flags were given, but there is no NVIDIA driver here (libcuda.so.1): pass \
                 --device sim for the simulated GPU, or drop them"
            ),
            None | Some("cpu") => DeviceSpec::Cpu,
            Some("cuda") => DeviceSpec::Cuda(0),
            Some("sim") => DeviceSpec::Sim(SimConfig {
                memory: 8 << 30,
                check_races: false,
                ..SimConfig::default()
            }),
            Some(other) => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => DeviceSpec::Cuda(n),
                _ => anyhow::bail!("--device {other}: expected cpu, cuda, cuda:N or sim"),
            },
        };
        if matches!(device, DeviceSpec::Cpu) && wants_gpu {
            anyhow::bail!(
                "-ngl, --vram-budget, --kv-vram-budget and -nkvo need a GPU, but --device is cpu"
            );
        }
        let vram_budget = match (&self.vram_budget, &device) {
            (None, _) => None,
            (Some(s), DeviceSpec::Sim(c)) => Some(
                strata_storage::residency::parse_size(s, c.memory as u64)
                    .map_err(|e| anyhow::anyhow!("--vram-budget {s:?}: {e}"))?,
            ),
            (Some(s), _) => {
                // A percentage of the GPU's memory needs the device; sizes do not.
                let total = if s.trim_end().ends_with('%') {
                    strata_engine::model::open_device(&device)?
                        .map_or(0, |d| d.info().total_memory as u64)
                } else {
                    0
                };
                Some(
                    strata_storage::residency::parse_size(s, total)
                        .map_err(|e| anyhow::anyhow!("--vram-budget {s:?}: {e}"))?,
                )
            }
        };
        let kv_vram_budget = match &self.kv_vram_budget {
            None => None,
            Some(s) if s.trim_end().ends_with('%') => {
                anyhow::bail!("--kv-vram-budget {s:?}: give a size (bytes with K/M/G), not a %")
            }
            Some(s) => {
                let b = strata_storage::residency::parse_size(s, 0)
                    .map_err(|e| anyhow::anyhow!("--kv-vram-budget {s:?}: {e}"))?;
                Some(usize::try_from(b).map_err(|_| {
                    anyhow::anyhow!("--kv-vram-budget {s:?}: too large for this machine")
                })?)
            }
        };
        let profile = match &self.hw {
            Some(h) => Some(strata_engine::plan::HwProfile::load(h)?),
            None => {
                let path = super::plan::calibrated_path()?;
                path.exists()
                    .then(|| strata_engine::plan::HwProfile::load(&path.display().to_string()))
                    .transpose()?
            }
        };
        Ok(GpuOptions {
            device,
            n_gpu_layers: self.n_gpu_layers,
            vram_budget,
            kv_vram_budget,
            no_kv_offload: self.no_kv_offload,
            profile,
            n_ctx,
        })
    }
}

impl LoadArgs {
    /// Whether any of these flags was given.
    pub fn is_given(&self) -> bool {
        self.ram_budget.is_some()
            || self.prefetch.is_some()
            || self.mmap
            || self.io.is_some()
            || !self.override_tensor.is_empty()
            || self.cpu_moe
            || self.n_cpu_moe.is_some()
            || self.gpu.device.is_some()
            || self.gpu.n_gpu_layers.is_some()
            || self.gpu.vram_budget.is_some()
            || self.gpu.no_kv_offload
    }

    /// The options for a model whose weights take `weight_bytes`: these flags over the
    /// `STRATA_*` variables (read here, once per load).
    pub fn options(&self, weight_bytes: u64) -> anyhow::Result<ModelOptions> {
        let env = EnvSettings::from_vars(|k| std::env::var(k).ok()).map_err(anyhow::Error::msg)?;
        let settings = LoadSettings {
            ram_budget: self.ram_budget.clone(),
            prefetch: self.prefetch,
            mmap: self.mmap,
            io: match self.io.as_deref() {
                Some("pread") => Some(IoKind::Pread),
                Some(_) => Some(IoKind::Uring),
                None => None,
            },
            override_tensor: self.override_tensor.clone(),
            cpu_moe: match (self.cpu_moe, self.n_cpu_moe) {
                (true, _) => Some(CpuMoe::All),
                (false, Some(n)) => Some(CpuMoe::First(n)),
                (false, None) => None,
            },
        };
        let mut opts = settings
            .options(weight_bytes, &SettingNames::FLAGS, &env)
            .map_err(anyhow::Error::msg)?;
        opts.gpu = self.gpu.options(None)?;
        opts.decode_memory = decode_memory();
        Ok(opts)
    }
}

/// Where the model store keeps this machine's measured decode kernels (see
/// `ModelOptions::decode_memory`); none when there is no store.
pub fn decode_memory() -> Option<std::path::PathBuf> {
    Store::open_default().ok().map(|s| s.decode_dir())
}

pub fn load_with(spec: &str, threads_req: Option<usize>, how: &LoadArgs) -> anyhow::Result<Loaded> {
    let path = resolve_model(spec)?;
    let n_threads = threads(threads_req)?;
    let t0 = Instant::now();
    let model = open_model(&path, how)?;
    let pool = Arc::new(ThreadPool::new(n_threads));
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    print_device(&model);
    tracing::info!(
        arch = model.config.arch.name(),
        layers = model.config.n_layer,
        threads = n_threads,
        "loaded {} in {load_ms:.0} ms",
        path.display()
    );
    Ok(Loaded {
        model,
        pool,
        load_ms,
    })
}

/// Loads the model at `path` as `how` says.
pub fn open_model(path: &std::path::Path, how: &LoadArgs) -> anyhow::Result<Model> {
    let weight_bytes = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    let opts = how.options(weight_bytes)?;
    Model::load_with(path, &opts).with_context(|| format!("loading {}", path.display()))
}

/// One line on stderr saying where the model computes: the CPU, or the GPU with how many
/// layers and how much VRAM.
pub fn print_device(model: &Model) {
    match (model.gpu_stats(), model.plan()) {
        (Some(g), Some(p)) => eprintln!(
            "strata: device {}: {} of {} layers on the GPU, {:.0} MiB of weights in VRAM (of {:.0} MiB); \
             predicted {:.1} t/s decode, limited by {}",
            g.device,
            p.gpu_layers(),
            p.layers.len(),
            (g.weights_vram + g.experts_vram) as f64 / 1048576.0,
            g.vram_total as f64 / 1048576.0,
            p.decode.tokens_per_s,
            p.decode.bottleneck.describe()
        ),
        _ => tracing::info!("device: CPU"),
    }
}

/// The GPU's traffic for `run --verbose`.
pub fn print_gpu(model: &Model) {
    if let Some(g) = model.gpu_stats() {
        let mib = |b: u64| b as f64 / 1048576.0;
        eprintln!(
            "strata_perf_context_print:              gpu = {}: {:.1} MiB weights + {:.1} MiB experts in VRAM; {:.1} MiB of weights streamed to it, {:.1} MiB of activations crossed, {:.2} ms waiting on copies, {} launches, {} decode steps as CUDA graphs ({} instantiated)",
            g.device,
            mib(g.weights_vram),
            mib(g.experts_vram),
            mib(g.streamed_bytes),
            mib(g.crossing_bytes),
            g.wait_us as f64 / 1e3,
            g.launches,
            g.graph_steps,
            g.graph_instantiations
        );
    }
}

/// `strata_perf_context_print:` lines about the weights: how they are held, what was read from
/// disk and how long steps waited for it, and the peak resident set of the process.
pub fn print_residency(model: &Model) {
    let s = model.weights().stats();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    if s.mode == ResidencyMode::Mapped {
        eprintln!(
            "strata_perf_context_print:          weights = mmap, {:.1} MiB mapped (the page cache decides what stays in RAM)",
            mib(s.ram_bytes)
        );
        if let Some(peak) = peak_rss() {
            eprintln!(
                "strata_perf_context_print:         peak RSS = {:.1} MiB",
                mib(peak)
            );
        }
        return;
    }
    eprintln!(
        "strata_perf_context_print:          weights = {} ({}{}), {:.1} MiB in RAM, {} layers resident, {} streamed through {} buffers",
        s.mode,
        s.io,
        if s.direct { ", O_DIRECT" } else { "" },
        mib(s.ram_bytes),
        s.resident_layers,
        s.streamed_layers,
        s.window
    );
    let secs = s.read.busy.as_secs_f64();
    eprintln!(
        "strata_perf_context_print:        disk read = {:.1} MiB in {:.2} s ({:.2} GB/s), {} resubmitted; I/O stall {:.2} ms",
        mib(s.read.bytes),
        secs,
        if secs > 0.0 {
            s.read.bytes as f64 / secs / 1e9
        } else {
            0.0
        },
        s.read.resubmits,
        s.stall.as_secs_f64() * 1e3
    );
    eprintln!(
        "strata_perf_context_print:          acquire = {} resident, {} window hits, {} waited, {} missed ({} read ahead)",
        s.hot_hits, s.window_hits, s.stalls, s.misses, s.prefetches
    );
    if s.expert_hits + s.expert_misses > 0 {
        let p = model.prediction_stats();
        eprintln!(
            "strata_perf_context_print:          experts = {:.1} MiB cache ({}), {} hits ({} prefetched in time), {} read on demand, {} read ahead; prediction precision {:.1}%, recall {:.1}%",
            mib(s.expert_cache_bytes),
            s.expert_policy,
            s.expert_hits,
            s.expert_prefetch_hits,
            s.expert_misses,
            s.expert_prefetches,
            100.0 * p.precision(),
            100.0 * p.recall()
        );
    }
    if let Some(peak) = peak_rss() {
        eprintln!(
            "strata_perf_context_print:         peak RSS = {:.1} MiB",
            mib(peak)
        );
    }
}

/// The process's peak resident set (`VmHWM`), in bytes.
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The context size for `-c`: 0 means the model's trained length.
pub fn ctx_size(model: &Model, requested: usize) -> anyhow::Result<usize> {
    let train = model.config.n_ctx_train;
    let n = if requested == 0 { train } else { requested };
    if n > train {
        anyhow::bail!("--ctx-size {n} exceeds the model's context length {train}");
    }
    Ok(n)
}
