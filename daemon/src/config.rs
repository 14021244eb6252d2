//! stratad's settings, from four layers, each overriding the one before: built-in defaults,
//! the config file (`/etc/strata/strata.toml`, or `--config` / `$STRATA_CONFIG`), `STRATA_*`
//! environment variables, and flags. Every layer goes through the same parser per key, so a
//! bad value gets the same message wherever it came from, and the message names the key and
//! where it was set.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use strata_engine::kv::parse_cache_type;
use strata_engine::model::DeviceSpec;
use strata_engine::plan::HwProfile;
use strata_kernels::SimConfig;
use strata_storage::quant::GgmlType;
use strata_storage::residency::overrides::{Target, parse_overrides};

/// The config file read when neither `--config` nor `$STRATA_CONFIG` names one; its absence
/// is not an error.
pub const DEFAULT_CONFIG: &str = "/etc/strata/strata.toml";

/// Every key of the config file; the environment variable is `STRATA_` + the key in capitals,
/// the flag `--` + the key with `-` for `_`.
pub const KEYS: [&str; 35] = [
    "socket",
    "socket_group",
    "listen",
    "token_file",
    "models",
    "keep_alive",
    "max_queue",
    "parallel",
    "ctx_size",
    "threads",
    "drain_timeout",
    "allow_pull",
    "ram_budget",
    "mmap",
    "override_tensor",
    "prefetch",
    "session_dir",
    "cache_type_k",
    "cache_type_v",
    "kv_budget",
    "kv_dir",
    "prompt_cache",
    "max_connections",
    "max_connections_per_peer",
    "read_timeout",
    "device",
    "n_gpu_layers",
    "vram_budget",
    "no_kv_offload",
    "kv_vram_budget",
    "hw_profile",
    "spec_type",
    "model_draft",
    "spec_draft_n_max",
    "spec_draft_n_min",
];

/// The settings that put work on a GPU; without one each is an error naming it.
const GPU_KEYS: [&str; 4] = [
    "n_gpu_layers",
    "vram_budget",
    "kv_vram_budget",
    "no_kv_offload",
];

/// Where each model's GPU phases run (`device`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuDevice {
    Cpu,
    /// GPU `n` through the CUDA driver.
    Cuda(usize),
    /// The simulated GPU: the CUDA kernels' text run on this CPU (tests, trying placements).
    Sim,
}

impl GpuDevice {
    /// `cpu` (or `none`), `cuda` (GPU 0), `cuda:N` (or llama.cpp's `CUDA0`), `sim`.
    pub fn parse(s: &str) -> Result<GpuDevice, String> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "cpu" | "none" => Ok(GpuDevice::Cpu),
            "cuda" => Ok(GpuDevice::Cuda(0)),
            "sim" => Ok(GpuDevice::Sim),
            _ => t
                .strip_prefix("cuda:")
                .or_else(|| t.strip_prefix("cuda"))
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|&n| n < 64)
                .map(GpuDevice::Cuda)
                .ok_or_else(|| format!("expected cpu, cuda, cuda:N or sim, got {s:?}")),
        }
    }

    /// The engine's device: the simulator with the CLI's settings (`strata run --device
    /// sim`), so that the two give the same placements.
    pub fn spec(self) -> DeviceSpec {
        match self {
            GpuDevice::Cpu => DeviceSpec::Cpu,
            GpuDevice::Cuda(n) => DeviceSpec::Cuda(n),
            GpuDevice::Sim => DeviceSpec::Sim(SimConfig {
                memory: 8 << 30,
                check_races: false,
                ..SimConfig::default()
            }),
        }
    }
}

impl std::fmt::Display for GpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GpuDevice::Cpu => f.write_str("cpu"),
            GpuDevice::Cuda(n) => write!(f, "cuda:{n}"),
            GpuDevice::Sim => f.write_str("sim"),
        }
    }
}

/// Which non-name sources `POST /api/pull` may fetch from (names are always allowed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowPull {
    /// `https://` URLs: the daemon downloads what a client names.
    pub urls: bool,
    /// Local file paths, read with the daemon's own permissions.
    pub paths: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// `None`: the default path (daemon/API.md).
    pub socket: Option<PathBuf>,
    /// Group (name or number) the socket file is given; `None` keeps the daemon's own.
    pub socket_group: Option<String>,
    pub listen: Option<SocketAddr>,
    pub token_file: Option<PathBuf>,
    /// Store names loaded at start.
    pub models: Vec<String>,
    /// Seconds idle before a model is unloaded; 0 = never.
    pub keep_alive: u64,
    pub max_queue: usize,
    pub parallel: usize,
    /// 0 = the model's trained length.
    pub ctx_size: usize,
    /// `None`: one per core.
    pub threads: Option<usize>,
    pub drain_timeout: u64,
    pub allow_pull: AllowPull,
    /// RAM each model's weights may use, as written ("300M", "30%" of the model's weights);
    /// checked here, turned into bytes when a model loads. `None`: all of them when the model
    /// fits in available memory.
    pub ram_budget: Option<String>,
    /// Map model files instead of reading them (the page cache decides what stays in RAM).
    pub mmap: bool,
    /// Tensor placement rules (`PATTERN=TYPE`, as `strata run -ot`), checked at start.
    pub override_tensor: Vec<String>,
    /// Streaming buffers per model (the layer computing plus those read ahead).
    pub prefetch: Option<usize>,
    /// Where saved sessions live; `None`: `$STRATA_HOME/sessions` (module `sessions`).
    pub session_dir: Option<PathBuf>,
    /// KV cache types of keys and values (f16, q8_0, q4_0).
    pub cache_type_k: GgmlType,
    pub cache_type_v: GgmlType,
    /// RAM each sequence's KV cache may hold ("64M", or "25%" of a full context's cache); the
    /// older pages go to SSD. `None`: all in RAM (and idle caches stay there).
    pub kv_budget: Option<String>,
    /// Where KV pages on SSD go; `None`: `$STRATA_HOME/kv`.
    pub kv_dir: Option<PathBuf>,
    /// Finished sequences' caches kept per model so that a request sharing their prefix
    /// (a system prompt, the earlier turns of a chat) does not recompute it (0: none).
    pub prompt_cache: usize,
    /// Open connections in all, Unix socket and TCP together (module `conns`).
    pub max_connections: usize,
    /// Open connections per peer: per uid on the Unix socket, per address on TCP.
    pub max_connections_per_peer: usize,
    /// Seconds a request's head, and then its body, may take to arrive; also how long a
    /// kept-alive connection may sit idle.
    pub read_timeout: u64,
    /// `None`: cuda when an NVIDIA driver is present, else cpu ([`Settings::device`]).
    pub device: Option<GpuDevice>,
    /// llama.cpp's `-ngl`: the last N layers of each model on the GPU (the output counts as
    /// one). `None`: as many as the planner's cost model says.
    pub n_gpu_layers: Option<usize>,
    /// VRAM each model's weights and KV caches may use, as written ("6G", "80%" of the GPU's
    /// memory); checked here, turned into bytes when a model loads.
    pub vram_budget: Option<String>,
    /// llama.cpp's `-nkvo`: KV caches in host RAM, attention on the CPU.
    pub no_kv_offload: bool,
    /// VRAM each sequence's KV cache may hold (its older pages go to RAM); `None`: what the
    /// planner leaves for the KV caches.
    pub kv_vram_budget: Option<u64>,
    /// The machine as the planner models it (a shipped name or a file); `None`: the
    /// calibrated profile of `strata calibrate` when there is one (read in `main`).
    pub hw_profile: Option<HwProfile>,
    /// Speculative decoding of every model (llama.cpp's `--spec-type`); `None`: with a draft
    /// model where `model_draft` names one, else none.
    pub spec_type: Option<strata_engine::spec::SpecType>,
    /// Draft models, as `MODEL=DRAFT` store names (llama.cpp's `-md`, per model).
    pub model_draft: Vec<(String, String)>,
    pub spec_draft_n_max: Option<usize>,
    pub spec_draft_n_min: Option<usize>,
    /// Where each key that is not at its default was set ("--max-queue", "STRATA_MAX_QUEUE",
    /// "/etc/strata/strata.toml"), for messages.
    origin: BTreeMap<&'static str, String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            socket: None,
            socket_group: None,
            listen: None,
            token_file: None,
            models: Vec::new(),
            keep_alive: 300,
            max_queue: 64,
            parallel: 4,
            ctx_size: 4096,
            threads: None,
            drain_timeout: 10,
            allow_pull: AllowPull::default(),
            ram_budget: None,
            mmap: false,
            override_tensor: Vec::new(),
            prefetch: None,
            session_dir: None,
            cache_type_k: GgmlType::F16,
            cache_type_v: GgmlType::F16,
            kv_budget: None,
            kv_dir: None,
            prompt_cache: 4,
            max_connections: 512,
            max_connections_per_peer: 128,
            read_timeout: 15,
            device: None,
            n_gpu_layers: None,
            vram_budget: None,
            no_kv_offload: false,
            kv_vram_budget: None,
            hw_profile: None,
            spec_type: None,
            model_draft: Vec::new(),
            spec_draft_n_max: None,
            spec_draft_n_min: None,
            origin: BTreeMap::new(),
        }
    }
}

/// One value as a source gave it: typed in TOML, text in the environment and on the command
/// line (where a list is comma-separated or a repeated flag).
#[derive(Clone, Copy)]
pub enum Raw<'a> {
    Toml(&'a toml::Value),
    Text(&'a str),
    List(&'a [String]),
}

impl Raw<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Raw::Toml(v) => v.type_str(),
            Raw::Text(_) => "text",
            Raw::List(_) => "list",
        }
    }

    fn string(&self) -> Result<String, String> {
        match self {
            Raw::Toml(toml::Value::String(s)) => Ok(s.clone()),
            Raw::Text(s) => Ok((*s).to_owned()),
            Raw::List([s]) => Ok(s.clone()),
            other => Err(format!("expected a string, got {}", other.kind())),
        }
    }

    fn int(&self, lo: u64, hi: u64) -> Result<u64, String> {
        let n: i128 = match self {
            Raw::Toml(toml::Value::Integer(i)) => (*i).into(),
            Raw::Text(s) => s
                .trim()
                .parse()
                .map_err(|_| format!("expected an integer, got {s:?}"))?,
            Raw::List([s]) => s
                .trim()
                .parse()
                .map_err(|_| format!("expected an integer, got {s:?}"))?,
            other => return Err(format!("expected an integer, got {}", other.kind())),
        };
        if n < i128::from(lo) || n > i128::from(hi) {
            return Err(format!("must be in {lo}..={hi}, got {n}"));
        }
        Ok(n as u64)
    }

    fn bool(&self) -> Result<bool, String> {
        let text = |s: &str| match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(format!("expected true or false, got {s:?}")),
        };
        match self {
            Raw::Toml(toml::Value::Boolean(b)) => Ok(*b),
            Raw::Text(s) => text(s),
            Raw::List([s]) => text(s),
            other => Err(format!("expected a boolean, got {}", other.kind())),
        }
    }

    fn usize(&self, lo: usize, hi: usize) -> Result<usize, String> {
        self.int(lo as u64, hi as u64).map(|n| n as usize)
    }

    fn list(&self) -> Result<Vec<String>, String> {
        let split = |s: &str| {
            s.split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        match self {
            Raw::Toml(toml::Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    toml::Value::String(s) => Ok(s.clone()),
                    other => Err(format!(
                        "expected a list of strings, found {}",
                        other.type_str()
                    )),
                })
                .collect(),
            Raw::Text(s) => Ok(split(s)),
            Raw::List(items) => Ok(items.iter().flat_map(|s| split(s)).collect()),
            other => Err(format!("expected a list of strings, got {}", other.kind())),
        }
    }
}

fn path(s: String) -> Result<PathBuf, String> {
    if s.is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(PathBuf::from(s))
    }
}

impl Settings {
    /// Sets `key` from `raw`; `origin` says where it came from. The error names both.
    pub fn set(&mut self, key: &str, raw: Raw<'_>, origin: &str) -> Result<(), String> {
        let Some(&key) = KEYS.iter().find(|k| **k == key) else {
            return Err(format!(
                "unknown key '{key}' in {origin} (known keys: {})",
                KEYS.join(", ")
            ));
        };
        self.apply(key, raw)
            .map_err(|e| format!("{} (set by {origin}): {e}", describe(key, origin)))?;
        self.origin.insert(key, origin.to_owned());
        Ok(())
    }

    fn apply(&mut self, key: &'static str, raw: Raw<'_>) -> Result<(), String> {
        match key {
            "socket" => self.socket = Some(path(raw.string()?)?),
            "socket_group" => {
                let g = raw.string()?;
                if g.is_empty() {
                    return Err("must not be empty".into());
                }
                self.socket_group = Some(g);
            }
            "listen" => {
                let s = raw.string()?;
                let addr: SocketAddr = s
                    .parse()
                    .map_err(|_| format!("expected ADDRESS:PORT, got {s:?}"))?;
                if !addr.ip().is_loopback() {
                    return Err(format!("{addr}: only loopback addresses are served"));
                }
                self.listen = Some(addr);
            }
            "token_file" => self.token_file = Some(path(raw.string()?)?),
            "models" => {
                let models = raw.list()?;
                if let Some(bad) = models
                    .iter()
                    .find(|m| strata_storage::store::validate_name(m).is_err())
                {
                    return Err(format!("'{bad}' is not a store model name"));
                }
                self.models = models;
            }
            "keep_alive" => self.keep_alive = raw.int(0, 365 * 24 * 3600)?,
            "max_queue" => self.max_queue = raw.usize(1, 1_000_000)?,
            "parallel" => self.parallel = raw.usize(1, 256)?,
            "ctx_size" => self.ctx_size = raw.usize(0, 1 << 24)?,
            "threads" => self.threads = Some(raw.usize(1, 1024)?),
            "drain_timeout" => self.drain_timeout = raw.int(0, 3600)?,
            "allow_pull" => {
                let mut allow = AllowPull::default();
                for item in raw.list()? {
                    match item.as_str() {
                        "urls" => allow.urls = true,
                        "paths" => allow.paths = true,
                        "none" => {}
                        other => {
                            return Err(format!(
                                "unknown source '{other}' (expected 'urls', 'paths' or 'none')"
                            ));
                        }
                    }
                }
                self.allow_pull = allow;
            }
            "ram_budget" => {
                let s = raw.string()?;
                // A percentage is of each model's weights, known only at load; check the
                // spelling now so a typo stops the daemon at start, not at the first request.
                strata_storage::residency::parse_size(&s, 1 << 40)?;
                self.ram_budget = Some(s.trim().to_owned());
            }
            "mmap" => self.mmap = raw.bool()?,
            "override_tensor" => {
                let rules = raw.list()?;
                for r in &rules {
                    strata_storage::residency::overrides::parse_overrides(r)?;
                }
                self.override_tensor = rules;
            }
            "prefetch" => self.prefetch = Some(raw.usize(2, 64)?),
            "session_dir" => self.session_dir = Some(path(raw.string()?)?),
            "cache_type_k" => self.cache_type_k = parse_cache_type(raw.string()?.trim())?,
            "cache_type_v" => self.cache_type_v = parse_cache_type(raw.string()?.trim())?,
            "kv_budget" => {
                let s = raw.string()?;
                strata_storage::residency::parse_size(&s, 1 << 40)?;
                self.kv_budget = Some(s.trim().to_owned());
            }
            "kv_dir" => self.kv_dir = Some(path(raw.string()?)?),
            "prompt_cache" => self.prompt_cache = raw.usize(0, 1024)?,
            "max_connections" => self.max_connections = raw.usize(1, 1 << 20)?,
            "max_connections_per_peer" => {
                self.max_connections_per_peer = raw.usize(1, 1 << 20)?;
            }
            "read_timeout" => self.read_timeout = raw.int(1, 3600)?,
            "device" => self.device = Some(GpuDevice::parse(&raw.string()?)?),
            // llama.cpp's scripts pass -ngl 999 for "all of them".
            "n_gpu_layers" => self.n_gpu_layers = Some(raw.usize(0, 1 << 16)?),
            "vram_budget" => {
                let s = raw.string()?;
                // A percentage is of the GPU's memory, known once the device is open.
                strata_storage::residency::parse_size(&s, 1 << 40)?;
                self.vram_budget = Some(s.trim().to_owned());
            }
            "no_kv_offload" => self.no_kv_offload = raw.bool()?,
            "kv_vram_budget" => {
                let s = raw.string()?;
                if s.trim_end().ends_with('%') {
                    return Err(format!(
                        "{s:?}: give bytes with K/M/G (a percentage of what is not defined here)"
                    ));
                }
                self.kv_vram_budget = Some(strata_storage::residency::parse_size(&s, 0)?);
            }
            "hw_profile" => {
                let s = raw.string()?;
                if s.trim().is_empty() {
                    return Err("must not be empty".into());
                }
                self.hw_profile = Some(HwProfile::load(s.trim()).map_err(|e| e.to_string())?);
            }
            "spec_type" => self.spec_type = Some(raw.string()?.trim().parse()?),
            "model_draft" => {
                let mut pairs = Vec::new();
                for item in raw.list()? {
                    let Some((m, d)) = item.split_once('=') else {
                        return Err(format!(
                            "expected MODEL=DRAFT (store names), got {:?}",
                            strata_storage::text::clip(&item, 80)
                        ));
                    };
                    let (m, d) = (m.trim(), d.trim());
                    if m.is_empty() || d.is_empty() {
                        return Err(format!("expected MODEL=DRAFT, got {item:?}"));
                    }
                    pairs.push((m.to_owned(), d.to_owned()));
                }
                self.model_draft = pairs;
            }
            "spec_draft_n_max" => {
                self.spec_draft_n_max = Some(raw.usize(1, strata_engine::spec::tune::MAX_DRAFT)?);
            }
            "spec_draft_n_min" => {
                self.spec_draft_n_min = Some(raw.usize(0, strata_engine::spec::tune::MAX_DRAFT)?);
            }
            other => return Err(format!("no parser for key '{other}'")),
        }
        Ok(())
    }

    /// Applies a config file's text; `origin` names the file.
    pub fn apply_toml(&mut self, text: &str, origin: &str) -> Result<(), String> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| format!("{origin}: {}", e.to_string().trim_end()))?;
        for (key, value) in &table {
            self.set(key, Raw::Toml(value), origin)?;
        }
        Ok(())
    }

    /// Applies the `STRATA_*` variables of `env` that name keys.
    pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), String> {
        for key in KEYS {
            let var = env_var(key);
            if let Some(v) = env(&var) {
                self.set(key, Raw::Text(&v), &var)?;
            }
        }
        Ok(())
    }

    /// Checks what no single key can: combinations.
    pub fn check(&self) -> Result<(), String> {
        if self.listen.is_some() && self.token_file.is_none() {
            return Err(format!(
                "listen (set by {}) needs token_file: TCP clients must send a bearer token",
                self.origin_of("listen")
            ));
        }
        if self.mmap && (self.ram_budget.is_some() || self.prefetch.is_some()) {
            let other = if self.ram_budget.is_some() {
                "ram_budget"
            } else {
                "prefetch"
            };
            return Err(format!(
                "mmap (set by {}) cannot be combined with {other} (set by {}): a mapped file \
                 is held by the page cache, not streamed under a budget",
                self.origin_of("mmap"),
                self.origin_of(other)
            ));
        }
        if let (Some(lo), Some(hi)) = (self.spec_draft_n_min, self.spec_draft_n_max)
            && lo > hi
        {
            return Err(format!(
                "spec_draft_n_min ({lo}, set by {}) is larger than spec_draft_n_max ({hi}, set by {})",
                self.origin_of("spec_draft_n_min"),
                self.origin_of("spec_draft_n_max")
            ));
        }
        use strata_engine::spec::SpecType;
        match self.spec_type {
            Some(SpecType::Draft) if self.model_draft.is_empty() => {
                return Err(format!(
                    "spec_type draft (set by {}) needs model_draft = [\"MODEL=DRAFT\", …]",
                    self.origin_of("spec_type")
                ));
            }
            Some(k @ (SpecType::NgramSimple | SpecType::NgramMapK | SpecType::None))
                if !self.model_draft.is_empty() =>
            {
                return Err(format!(
                    "spec_type {} (set by {}) uses no draft model, but model_draft is set (by {})",
                    k.name(),
                    self.origin_of("spec_type"),
                    self.origin_of("model_draft")
                ));
            }
            _ => {}
        }
        self.check_gpu(strata_kernels::Device::cuda_driver_present())
    }

    /// The device models run on: `device`, else cuda when `cuda_present` (an NVIDIA driver
    /// can be loaded), else the CPU.
    pub fn device(&self, cuda_present: bool) -> GpuDevice {
        self.device.unwrap_or(if cuda_present {
            GpuDevice::Cuda(0)
        } else {
            GpuDevice::Cpu
        })
    }

    /// GPU settings need a GPU: each given without one is an error naming it (as `strata
    /// run -ngl 1` without `--device` is), so that a daemon that would quietly run on the CPU
    /// stops at start instead.
    pub fn check_gpu(&self, cuda_present: bool) -> Result<(), String> {
        let device = self.device(cuda_present);
        if device == GpuDevice::Sim && !strata_kernels::Device::sim_available() {
            return Err(format!(
                "device = sim (set by {}): this build of stratad has no GPU simulator",
                self.origin_of("device")
            ));
        }
        if device != GpuDevice::Cpu {
            return Ok(());
        }
        let why = if self.device.is_some() {
            format!("device is cpu (set by {})", self.origin_of("device"))
        } else {
            "there is no NVIDIA driver here (libcuda.so.1) and device is not set: set device = \
             \"sim\" for the simulated GPU, or drop it"
                .to_owned()
        };
        let given = |key: &str| match key {
            // -ngl 0 is llama.cpp's way of saying "all on the CPU".
            "n_gpu_layers" => self.n_gpu_layers.is_some_and(|n| n > 0),
            "vram_budget" => self.vram_budget.is_some(),
            "kv_vram_budget" => self.kv_vram_budget.is_some(),
            _ => self.no_kv_offload,
        };
        if let Some(key) = GPU_KEYS.iter().find(|k| given(k)) {
            return Err(format!(
                "{key} (set by {}) needs a GPU, but {why}",
                self.origin_of(key)
            ));
        }
        for rule in &self.override_tensor {
            let gpu = parse_overrides(rule)
                .ok()
                .and_then(|r| r.into_iter().find(|o| matches!(o.target, Target::Gpu(_))));
            if let Some(o) = gpu {
                return Err(format!(
                    "override_tensor (set by {}) sends {} to {}, which needs a GPU, but {why}",
                    self.origin_of("override_tensor"),
                    o.pattern.as_str(),
                    o.target
                ));
            }
        }
        Ok(())
    }

    /// Where `key` was last set, or "the default".
    pub fn origin_of(&self, key: &str) -> &str {
        self.origin.get(key).map_or("the default", String::as_str)
    }
}

/// `max_queue` → `STRATA_MAX_QUEUE`.
pub fn env_var(key: &str) -> String {
    format!("STRATA_{}", key.to_ascii_uppercase())
}

/// `max_queue` → `--max-queue`.
pub fn flag(key: &str) -> String {
    format!("--{}", key.replace('_', "-"))
}

/// How a key is called where it was set: its flag, its variable, or its name in a file.
fn describe(key: &str, origin: &str) -> String {
    if origin.starts_with("--") || origin.starts_with("STRATA_") {
        origin.to_owned()
    } else {
        key.to_owned()
    }
}

/// The config file to read: `--config`, else `$STRATA_CONFIG`, else the default. The bool
/// says whether it must exist (it must when named explicitly).
pub fn config_path(flag: Option<&Path>, env: Option<String>) -> (PathBuf, bool) {
    match (flag, env.filter(|e| !e.is_empty())) {
        (Some(p), _) => (p.to_path_buf(), true),
        (None, Some(e)) => (PathBuf::from(e), true),
        (None, None) => (PathBuf::from(DEFAULT_CONFIG), false),
    }
}

/// Defaults, then the file, then the environment; the caller applies flags on top.
pub fn load(flag: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> Result<Settings, String> {
    let mut s = Settings::default();
    let (file, required) = config_path(flag, env("STRATA_CONFIG"));
    match std::fs::read_to_string(&file) {
        Ok(text) => s.apply_toml(&text, &file.display().to_string())?,
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("reading the config file {}: {e}", file.display())),
    }
    s.apply_env(env)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn file_then_env_then_flags() -> Result<(), String> {
        let mut s = Settings::default();
        s.apply_toml(
            r#"
            socket = "/run/x.sock"
            max_queue = 8
            keep_alive = 60
            models = ["gemma3-270m", "qwen2.5-coder-1.5b"]
            allow_pull = ["urls"]
            "#,
            "f.toml",
        )?;
        s.apply_env(&env_of(&[
            ("STRATA_MAX_QUEUE", "16"),
            ("STRATA_MODELS", "a,b"),
        ]))?;
        s.set("keep_alive", Raw::Text("0"), "--keep-alive")?;
        assert_eq!(s.socket, Some(PathBuf::from("/run/x.sock")));
        assert_eq!(s.max_queue, 16);
        assert_eq!(s.keep_alive, 0);
        assert_eq!(s.models, vec!["a".to_string(), "b".to_string()]);
        assert!(s.allow_pull.urls && !s.allow_pull.paths);
        assert_eq!(s.origin_of("max_queue"), "STRATA_MAX_QUEUE");
        assert_eq!(s.origin_of("socket"), "f.toml");
        assert_eq!(s.origin_of("parallel"), "the default");
        Ok(())
    }

    #[test]
    fn errors_name_the_key_and_where_it_was_set() {
        let err = |toml: &str| {
            Settings::default()
                .apply_toml(toml, "/etc/strata/strata.toml")
                .err()
                .unwrap_or_default()
        };
        let e = err("max_qeue = 3");
        assert!(
            e.contains("unknown key 'max_qeue'") && e.contains("max_queue"),
            "{e}"
        );
        let e = err("max_queue = 0");
        assert!(e.contains("max_queue") && e.contains("1..=1000000"), "{e}");
        let e = err("max_queue = \"many\"");
        assert!(
            e.contains("max_queue") && e.contains("expected an integer"),
            "{e}"
        );
        let e = err("listen = \"0.0.0.0:80\"");
        assert!(e.contains("listen") && e.contains("loopback"), "{e}");
        let e = err("models = [\"../etc/passwd\"]");
        assert!(
            e.contains("models") && e.contains("not a store model name"),
            "{e}"
        );
        let e = err("allow_pull = [\"ftp\"]");
        assert!(e.contains("allow_pull") && e.contains("'ftp'"), "{e}");
        let e = err("ram_budget = \"lots\"");
        assert!(e.contains("ram_budget") && e.contains("K/M/G"), "{e}");
        let e = err("ram_budget = \"150%\"");
        assert!(e.contains("ram_budget") && e.contains("(0, 100]"), "{e}");
        let e = err("prefetch = 1");
        assert!(e.contains("prefetch") && e.contains("2..=64"), "{e}");
        let e = err("mmap = \"maybe\"");
        assert!(e.contains("mmap") && e.contains("boolean"), "{e}");
        let e = err("socket = ");
        assert!(e.contains("/etc/strata/strata.toml"), "{e}");
        let e = Settings::default()
            .apply_env(&env_of(&[("STRATA_PARALLEL", "-1")]))
            .err()
            .unwrap_or_default();
        assert!(
            e.contains("STRATA_PARALLEL") && e.contains("1..=256"),
            "{e}"
        );
        let e = Settings::default()
            .set("threads", Raw::Text("x"), "--threads")
            .err()
            .unwrap_or_default();
        assert!(e.starts_with("--threads"), "{e}");
    }

    #[test]
    fn the_example_config_is_valid_with_every_key_uncommented() -> Result<(), String> {
        let example = include_str!("../../systemd/strata.toml");
        let lines: Vec<&str> = example
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.split_once(" = ").is_some_and(|(k, _)| KEYS.contains(&k)))
            .collect();
        let mut s = Settings::default();
        s.apply_toml(&lines.join("\n"), "systemd/strata.toml")?;
        s.check()?;
        for key in KEYS {
            assert_eq!(
                s.origin_of(key),
                "systemd/strata.toml",
                "{key} is not in the example"
            );
        }
        Ok(())
    }

    #[test]
    fn residency_keys_parse_and_mmap_excludes_a_budget() -> Result<(), String> {
        let mut s = Settings::default();
        s.apply_toml("ram_budget = \"30%\"\nprefetch = 4", "f.toml")?;
        s.apply_env(&env_of(&[("STRATA_SESSION_DIR", "/srv/sessions")]))?;
        assert_eq!(s.ram_budget.as_deref(), Some("30%"));
        assert_eq!(s.prefetch, Some(4));
        assert_eq!(s.session_dir, Some(PathBuf::from("/srv/sessions")));
        s.check()?;
        s.set("mmap", Raw::Text("true"), "--mmap")?;
        let e = s.check().err().unwrap_or_default();
        assert!(
            e.contains("--mmap") && e.contains("ram_budget") && e.contains("f.toml"),
            "{e}"
        );
        Ok(())
    }

    #[test]
    fn gpu_keys_parse_in_every_layer() -> Result<(), String> {
        let mut s = Settings::default();
        s.apply_toml(
            "device = \"sim\"\nn_gpu_layers = 3\nvram_budget = \"50%\"\n\
             kv_vram_budget = \"64M\"\nhw_profile = \"rtx4090\"",
            "f.toml",
        )?;
        s.apply_env(&env_of(&[("STRATA_NO_KV_OFFLOAD", "1")]))?;
        s.set("n_gpu_layers", Raw::Text("999"), "--n-gpu-layers")?;
        assert_eq!(s.device, Some(GpuDevice::Sim));
        assert_eq!(s.n_gpu_layers, Some(999));
        assert_eq!(s.vram_budget.as_deref(), Some("50%"));
        assert_eq!(s.kv_vram_budget, Some(64 << 20));
        assert!(s.no_kv_offload);
        assert!(s.hw_profile.as_ref().is_some_and(|p| p.gpu.is_some()));
        assert_eq!(s.origin_of("n_gpu_layers"), "--n-gpu-layers");
        if strata_kernels::Device::sim_available() {
            s.check_gpu(false)?;
        }
        for (text, want) in [
            ("cpu", GpuDevice::Cpu),
            ("none", GpuDevice::Cpu),
            ("cuda", GpuDevice::Cuda(0)),
            ("cuda:2", GpuDevice::Cuda(2)),
            ("CUDA1", GpuDevice::Cuda(1)),
            (" Sim ", GpuDevice::Sim),
        ] {
            assert_eq!(GpuDevice::parse(text), Ok(want), "{text}");
        }
        Ok(())
    }

    #[test]
    fn bad_gpu_values_name_the_key() {
        let err = |toml: &str| {
            Settings::default()
                .apply_toml(toml, "f.toml")
                .err()
                .unwrap_or_default()
        };
        for (toml, key, what) in [
            ("device = \"tpu\"", "device", "cuda:N"),
            ("device = \"cuda:x\"", "device", "cuda:N"),
            ("device = 1", "device", "expected a string"),
            ("n_gpu_layers = -1", "n_gpu_layers", "0..=65536"),
            (
                "n_gpu_layers = \"all\"",
                "n_gpu_layers",
                "expected an integer",
            ),
            ("vram_budget = \"lots\"", "vram_budget", "K/M/G"),
            ("vram_budget = \"0%\"", "vram_budget", "(0, 100]"),
            ("kv_vram_budget = \"10%\"", "kv_vram_budget", "K/M/G"),
            ("no_kv_offload = 2", "no_kv_offload", "expected a boolean"),
            ("hw_profile = \"nope\"", "hw_profile", "no hardware profile"),
        ] {
            let e = err(toml);
            assert!(e.contains(key) && e.contains(what), "{toml}: {e}");
        }
        let e = Settings::default()
            .apply_env(&env_of(&[("STRATA_DEVICE", "gpu")]))
            .err()
            .unwrap_or_default();
        assert!(e.starts_with("STRATA_DEVICE") && e.contains("sim"), "{e}");
    }

    #[test]
    fn speculative_settings_are_checked_and_name_the_key() {
        let err = |toml: &str| {
            let mut s = Settings::default();
            match s.apply_toml(toml, "f.toml") {
                Err(e) => e,
                Ok(()) => s.check().err().unwrap_or_default(),
            }
        };
        for (toml, what) in [
            ("spec_type = \"ngram-foo\"", "unknown speculative type"),
            ("spec_type = \"ngram-mod\"", "not strata's"),
            ("model_draft = [\"qwen\"]", "MODEL=DRAFT"),
            ("spec_draft_n_max = 99", "1..=15"),
            ("spec_draft_n_min = 5\nspec_draft_n_max = 3", "larger than"),
            ("spec_type = \"draft\"", "needs model_draft"),
            (
                "spec_type = \"ngram-simple\"\nmodel_draft = [\"a=b\"]",
                "uses no draft model",
            ),
        ] {
            let e = err(toml);
            assert!(e.contains(what), "{toml}: {e}");
        }
        let mut s = Settings::default();
        s.apply_toml(
            "model_draft = [\"big = small\"]\nspec_draft_n_max = 8",
            "f.toml",
        )
        .expect("valid");
        assert_eq!(s.model_draft, [("big".to_owned(), "small".to_owned())]);
        assert_eq!(s.spec_draft_n_max, Some(8));
    }

    #[test]
    fn gpu_settings_without_a_gpu_are_an_error_naming_them() -> Result<(), String> {
        // No driver and no device: each GPU setting is refused by name.
        for (key, value) in [
            ("n_gpu_layers", "4"),
            ("vram_budget", "1G"),
            ("kv_vram_budget", "64M"),
            ("no_kv_offload", "true"),
        ] {
            let mut s = Settings::default();
            s.set(key, Raw::Text(value), &flag(key))?;
            let e = s.check_gpu(false).err().unwrap_or_default();
            assert!(
                e.starts_with(key) && e.contains(&flag(key)) && e.contains("no NVIDIA driver"),
                "{e}"
            );
            assert!(s.check_gpu(true).is_ok(), "{key} with a driver");
        }
        // An explicit cpu device names where it was set.
        let mut s = Settings::default();
        s.apply_toml("vram_budget = \"2G\"", "f.toml")?;
        s.set("device", Raw::Text("cpu"), "--device")?;
        let e = s.check_gpu(true).err().unwrap_or_default();
        assert!(
            e.contains("vram_budget (set by f.toml)")
                && e.contains("device is cpu (set by --device)"),
            "{e}"
        );
        // -ngl 0 is "all on the CPU", and a named CUDA device is the engine's to open.
        let mut s = Settings::default();
        s.set("n_gpu_layers", Raw::Text("0"), "--n-gpu-layers")?;
        s.check_gpu(false)?;
        s.set("n_gpu_layers", Raw::Text("2"), "--n-gpu-layers")?;
        s.set("device", Raw::Text("cuda:1"), "--device")?;
        s.check_gpu(false)?;
        assert_eq!(s.device(false), GpuDevice::Cuda(1));
        // A tensor sent to the GPU by an override needs one too.
        let mut s = Settings::default();
        s.set(
            "override_tensor",
            Raw::Text("ffn_.*=CUDA0"),
            "--override-tensor",
        )?;
        let e = s.check_gpu(false).err().unwrap_or_default();
        assert!(e.contains("override_tensor") && e.contains("CUDA0"), "{e}");
        assert_eq!(Settings::default().device(true), GpuDevice::Cuda(0));
        assert_eq!(Settings::default().device(false), GpuDevice::Cpu);
        Ok(())
    }

    #[test]
    fn listen_needs_a_token_file() {
        let mut s = Settings::default();
        assert!(
            s.set("listen", Raw::Text("127.0.0.1:8080"), "--listen")
                .is_ok()
        );
        let e = s.check().err().unwrap_or_default();
        assert!(e.contains("--listen") && e.contains("token_file"), "{e}");
    }

    #[test]
    fn an_explicit_config_file_must_exist() {
        let e = load(Some(Path::new("/nonexistent/strata.toml")), &env_of(&[]))
            .err()
            .unwrap_or_default();
        assert!(e.contains("/nonexistent/strata.toml"), "{e}");
        let e = load(None, &env_of(&[("STRATA_CONFIG", "/nonexistent/b.toml")]))
            .err()
            .unwrap_or_default();
        assert!(e.contains("/nonexistent/b.toml"), "{e}");
    }
}
