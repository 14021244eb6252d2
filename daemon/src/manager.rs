//! Loaded models: loading by store name on first use or on request, the keep-alive reaper,
//! and unloading. A model is addressed only by a store name, never by a path, so no request
//! can make the daemon open a file outside the store.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_engine::Model;
use strata_engine::chat::{ChatMessage, ChatTemplate};
use strata_engine::kv::{KvOptions, SpillConfig, parse_kv_budget};
use strata_engine::model::{
    DeviceSpec, EnvSettings, GpuOptions, LoadSettings, ModelConfig, ModelOptions, SettingNames,
};
use strata_engine::plan::HwProfile;
use strata_engine::spec::{SpecConfig, SpecType};
use strata_simd::pool::ThreadPool;
use strata_storage::io::ReaderOptions;
use strata_storage::quant::GgmlType;
use strata_storage::store::{Store, StoreError};

use crate::error::ApiError;
use crate::metrics::{GpuGauges, Metrics, ModelGauges};
use crate::notify;
use crate::shutdown::Shutdown;
use crate::watchdog::Watchdog;
use crate::worker::{self, WorkerConfig, WorkerHandle};

#[derive(Clone, Debug)]
pub struct ManagerConfig {
    /// 0: the model's trained length.
    pub ctx_size: usize,
    pub parallel: usize,
    pub max_queue: usize,
    pub threads: usize,
    /// `None`: never unload.
    pub keep_alive: Option<Duration>,
    /// The models named at start (`--model`, `models = […]`): never unloaded for being idle;
    /// the keep-alive applies to the ones loaded on demand.
    pub keep_loaded: Vec<String>,
    pub residency: Residency,
    pub kv: KvSettings,
    pub gpu: GpuSettings,
    pub spec: SpecSettings,
}

/// Speculative decoding (`spec_type`, `model_draft`, `spec_draft_n_max/min`); `config`
/// checked them. The engine thread speculates while one sequence decodes.
#[derive(Clone, Debug, Default)]
pub struct SpecSettings {
    /// `None`: a draft model where `drafts` names one for the model, else none.
    pub kind: Option<SpecType>,
    /// (model, draft) store names.
    pub drafts: Vec<(String, String)>,
    pub n_max: Option<usize>,
    pub n_min: Option<usize>,
}

impl SpecSettings {
    /// What the model `name` speculates with, and the store name of its draft model.
    pub fn for_model(&self, name: &str) -> (SpecConfig, Option<String>) {
        let draft = self
            .drafts
            .iter()
            .find(|(m, _)| m == name)
            .map(|(_, d)| d.clone());
        // A draft asked for by type but with no model named for this one: plain decoding.
        let asked = match self.kind {
            Some(SpecType::Draft) if draft.is_none() => Some(SpecType::None),
            k => k,
        };
        let cfg = SpecConfig::from_settings(asked, draft.is_some(), self.n_max, self.n_min);
        let kind = cfg.kind;
        (cfg, draft.filter(|_| kind == SpecType::Draft))
    }
}

/// Where each model computes (`device`, `n_gpu_layers`, `vram_budget`, `no_kv_offload`,
/// `kv_vram_budget`, `hw_profile`), applied at load; `config` checked them.
#[derive(Clone, Debug, Default)]
pub struct GpuSettings {
    pub device: DeviceSpec,
    pub n_gpu_layers: Option<usize>,
    /// As configured ("6G", "80%" of the GPU's memory).
    pub vram_budget: Option<String>,
    pub no_kv_offload: bool,
    /// Per sequence.
    pub kv_vram_budget: Option<usize>,
    pub profile: Option<HwProfile>,
}

impl GpuSettings {
    fn on_gpu(&self) -> bool {
        !matches!(self.device, DeviceSpec::Cpu)
    }

    /// The engine's GPU options for a model whose KV caches hold `kv_positions` positions
    /// in all (every sequence that may run at once).
    pub fn options(&self, kv_positions: usize) -> Result<GpuOptions, String> {
        let vram_budget = match &self.vram_budget {
            None => None,
            Some(s) => {
                // A percentage is of the GPU's memory: the simulator's is configured, a real
                // one's is asked of the driver.
                let total = match &self.device {
                    DeviceSpec::Sim(c) => c.memory as u64,
                    _ if s.ends_with('%') => strata_engine::model::open_device(&self.device)
                        .map_err(|e| e.to_string())?
                        .map_or(0, |d| d.info().total_memory as u64),
                    _ => 0,
                };
                Some(
                    strata_storage::residency::parse_size(s, total)
                        .map_err(|e| format!("vram_budget {s:?}: {e}"))?,
                )
            }
        };
        Ok(GpuOptions {
            device: self.device.clone(),
            n_gpu_layers: self.n_gpu_layers,
            vram_budget,
            kv_vram_budget: self.kv_vram_budget,
            no_kv_offload: self.no_kv_offload,
            profile: self.profile.clone(),
            n_ctx: Some(kv_positions),
        })
    }
}

/// The context size of each sequence: `ctx_size` (0: the trained length), at most the
/// trained length.
fn context_size(ctx_size: usize, train: usize) -> usize {
    if ctx_size == 0 {
        train
    } else {
        ctx_size.min(train)
    }
}

/// How each sequence's KV cache is kept (`cache_type_k/v`, `kv_budget`, `kv_dir`) and how
/// many finished ones stay for prefix reuse (`prompt_cache`).
#[derive(Clone, Debug)]
pub struct KvSettings {
    pub type_k: GgmlType,
    pub type_v: GgmlType,
    /// As configured ("64M", "25%" of a full context's cache); checked by `config`.
    pub budget: Option<String>,
    pub dir: std::path::PathBuf,
    pub prompt_cache: usize,
}

impl Default for KvSettings {
    fn default() -> Self {
        Self {
            type_k: GgmlType::F16,
            type_v: GgmlType::F16,
            budget: None,
            dir: std::env::temp_dir(),
            prompt_cache: 4,
        }
    }
}

impl KvSettings {
    /// The cache options for sequences of `n_ctx` positions of `model`.
    pub fn options(&self, model: &Model, n_ctx: usize) -> Result<KvOptions, String> {
        let spill = match &self.budget {
            None => None,
            Some(s) => Some(SpillConfig {
                dir: self.dir.clone(),
                ram_budget: parse_kv_budget(s, &model.config, n_ctx, self.type_k, self.type_v)
                    .map_err(|e| format!("kv_budget {s:?}: {e}"))?,
                io: ReaderOptions::from_env().map_err(|e| e.to_string())?,
            }),
        };
        Ok(KvOptions {
            type_k: self.type_k,
            type_v: self.type_v,
            spill,
            gpu: None,
        })
    }
}

/// How each model's weights are held (`ram_budget`, `prefetch`, `mmap`), applied at load.
#[derive(Clone, Debug, Default)]
pub struct Residency {
    /// As configured ("6G", "30%" of the model's weights); checked by `config`.
    pub ram_budget: Option<String>,
    pub prefetch: Option<usize>,
    pub mmap: bool,
    /// `PATTERN=TYPE` rules; checked by `config`.
    pub override_tensor: Vec<String>,
}

impl Residency {
    /// The load options for a model whose file is `file_bytes` long. I/O and expert
    /// settings (`STRATA_IO`, `STRATA_EXPERT_*`, and `STRATA_IO_FAULTS` in tests) come from
    /// the environment.
    pub fn options(&self, file_bytes: u64) -> Result<ModelOptions, String> {
        let env = EnvSettings::from_vars(|k| std::env::var(k).ok())?;
        let settings = LoadSettings {
            ram_budget: self.ram_budget.clone(),
            prefetch: self.prefetch,
            mmap: self.mmap,
            io: None,
            override_tensor: self.override_tensor.clone(),
            cpu_moe: None,
        };
        let mut opts = settings.options(file_bytes, &SettingNames::KEYS, &env)?;
        // The decode kernels a first load measures, kept in the store for every later one.
        opts.decode_memory = Store::open_default().ok().map(|s| s.decode_dir());
        Ok(opts)
    }
}

pub struct LoadedModel {
    pub name: String,
    pub model: Arc<Model>,
    /// `Err` holds why the file's chat template cannot be used; only chat requests care.
    pub template: Result<ChatTemplate, String>,
    pub worker: WorkerHandle,
    /// The model's compute threads; a resumed session's context is built on them.
    pub pool: Arc<ThreadPool>,
    pub n_ctx: usize,
    pub parallel: usize,
    /// How its sequences' KV caches are kept (a resumed session's too).
    pub kv: KvOptions,
}

impl LoadedModel {
    /// The token ids of a rendered conversation, ready for generation.
    pub fn chat_tokens(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, ApiError> {
        let template = self.template.as_ref().map_err(|e| {
            ApiError::BadRequest(format!(
                "model '{}' has no usable chat template: {e}",
                self.name
            ))
        })?;
        let rendered = template
            .render(messages, true)
            .map_err(|e| ApiError::BadRequest(format!("rendering the chat template: {e}")))?;
        // The tokenizer adds BOS itself; drop the template's copy so there is only one.
        let text = template
            .bos_prefix()
            .and_then(|p| rendered.strip_prefix(p))
            .unwrap_or(&rendered);
        Ok(self.model.tokenizer.encode(text, true, true))
    }

    /// Plain completion: the caller's text with BOS when the model wants one; special-token
    /// text in a prompt is not parsed, so a prompt cannot forge control tokens.
    pub fn completion_tokens(&self, prompt: &str) -> Vec<u32> {
        self.model.tokenizer.encode(prompt, true, false)
    }
}

pub struct Manager {
    cfg: ManagerConfig,
    loaded: Mutex<BTreeMap<String, Arc<LoadedModel>>>,
    /// Loads run one at a time: two requests for the same new model load it once, and two
    /// different loads do not compete for memory bandwidth.
    load_lock: tokio::sync::Mutex<()>,
    /// Models asked for and not loaded yet (waiting for `load_lock` or loading), for
    /// `/api/ps`: a client started right after the daemon sees what it is waiting for.
    loading: Mutex<Vec<String>>,
    metrics: Arc<Metrics>,
    shutdown: Arc<Shutdown>,
    /// Each engine thread registers its heartbeat here (module `watchdog`).
    watchdog: Option<Arc<Watchdog>>,
}

pub enum LoadOutcome {
    Loaded { ms: f64 },
    AlreadyLoaded,
}

impl Manager {
    pub fn new(
        cfg: ManagerConfig,
        metrics: Arc<Metrics>,
        shutdown: Arc<Shutdown>,
        watchdog: Option<Arc<Watchdog>>,
    ) -> Self {
        Self {
            cfg,
            loaded: Mutex::new(BTreeMap::new()),
            load_lock: tokio::sync::Mutex::new(()),
            loading: Mutex::new(Vec::new()),
            metrics,
            shutdown,
            watchdog,
        }
    }

    /// Tells systemd how many models are ready (`STATUS=`, shown by `systemctl status`).
    pub fn report_ready(&self) {
        let n = self.loaded.lock().map_or(0, |m| m.len());
        let plural = if n == 1 { "" } else { "s" };
        notify::status(&format!("ready: {n} model{plural}"));
    }

    fn lookup(&self, name: &str) -> Option<Arc<LoadedModel>> {
        self.loaded.lock().ok()?.get(name).cloned()
    }

    pub fn snapshot(&self) -> Vec<Arc<LoadedModel>> {
        self.loaded
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Models being loaded (or waiting to be), oldest request first.
    pub fn loading(&self) -> Vec<String> {
        let mut v = self.loading.lock().map(|l| l.clone()).unwrap_or_default();
        v.dedup();
        v
    }

    /// The configured keep-alive (`None`: never unload).
    pub fn keep_alive(&self) -> Option<Duration> {
        self.cfg.keep_alive
    }

    /// How long `name` may stay idle before it is unloaded; `None`: it stays.
    pub fn keep_alive_of(&self, name: &str) -> Option<Duration> {
        if self.cfg.keep_loaded.iter().any(|k| k == name) {
            None
        } else {
            self.cfg.keep_alive
        }
    }

    pub async fn get(&self, name: &str) -> Result<Arc<LoadedModel>, ApiError> {
        self.ensure(name).await.map(|(m, _)| m)
    }

    pub async fn ensure(&self, name: &str) -> Result<(Arc<LoadedModel>, LoadOutcome), ApiError> {
        if let Some(m) = self.lookup(name) {
            return Ok((m, LoadOutcome::AlreadyLoaded));
        }
        let _loading = Loading::mark(&self.loading, name);
        let _guard = self.load_lock.lock().await;
        if let Some(m) = self.lookup(name) {
            return Ok((m, LoadOutcome::AlreadyLoaded));
        }
        let path = store_path(name)?;
        notify::status(&format!("loading {name}\u{2026}"));
        let result = self.load(name, path).await;
        self.report_ready();
        result
    }

    async fn load(
        &self,
        name: &str,
        path: std::path::PathBuf,
    ) -> Result<(Arc<LoadedModel>, LoadOutcome), ApiError> {
        let t0 = Instant::now();
        let cfg = self.cfg.clone();
        let owned = name.to_owned();
        let (spec, draft_name) = self.cfg.spec.for_model(name);
        let draft_path = draft_name.as_deref().map(store_path).transpose()?;
        let (model, template, pool, draft) = tokio::task::spawn_blocking(move || {
            let failed = |e: String| ApiError::Internal(format!("loading model '{owned}': {e}"));
            let file_bytes = std::fs::metadata(&path)
                .map_err(|e| failed(format!("{}: {e}", path.display())))?
                .len();
            let mut opts = cfg.residency.options(file_bytes).map_err(failed)?;
            if cfg.gpu.on_gpu() {
                // The planner sizes the VRAM left for KV caches by the positions they may
                // hold: every sequence that runs at once (as Ollama's num_ctx × num_parallel),
                // so placing weights never starves a batch of its caches.
                let gguf = strata_storage::gguf::GgufFile::open(&path)
                    .map_err(|e| failed(e.to_string()))?;
                let config = ModelConfig::from_metadata(&gguf.metadata, 0)
                    .map_err(|e| failed(e.to_string()))?;
                let n_ctx = context_size(cfg.ctx_size, config.n_ctx_train);
                opts.gpu = cfg
                    .gpu
                    .options(n_ctx.saturating_mul(cfg.parallel))
                    .map_err(failed)?;
            }
            let model = Model::load_with(&path, &opts).map_err(|e| failed(e.to_string()))?;
            let template =
                ChatTemplate::from_gguf(&model.weights().gguf().metadata, model.config.arch.name())
                    .map_err(|e| e.to_string());
            let pool = Arc::new(ThreadPool::new(cfg.threads));
            // The draft is kept resident (it is small, and read every step), whatever the
            // target's budget, and must share its vocabulary.
            let draft = match &draft_path {
                Some(p) => {
                    let d = Model::load_with(p, &ModelOptions::default())
                        .map_err(|e| failed(format!("draft model {}: {e}", p.display())))?;
                    strata_engine::spec::check_vocab(&model, &d)
                        .map_err(|e| failed(format!("draft model {}: {e}", p.display())))?;
                    Some(Arc::new(d))
                }
                None => None,
            };
            Ok::<_, ApiError>((Arc::new(model), template, pool, draft))
        })
        .await
        .map_err(|e| ApiError::Internal(format!("model loader task failed: {e}")))??;
        let n_ctx = context_size(self.cfg.ctx_size, model.config.n_ctx_train);
        let kv = self
            .cfg
            .kv
            .options(&model, n_ctx)
            .map_err(ApiError::Internal)?;
        if let Some(s) = &kv.spill {
            let floor = kv.min_ram_budget(model.config.n_layer, model.config.kv_dim());
            if s.ram_budget < floor {
                tracing::warn!(
                    model = name,
                    "kv_budget of {} bytes is below what a sequence's KV cache holds in RAM at \
                     least ({floor} bytes: each layer's page of keys and of values being filled); \
                     keeping {floor}",
                    s.ram_budget
                );
            }
        }
        // A cache type the model cannot hold is the configuration's fault: say so at load.
        model
            .new_context_with(
                1,
                pool.clone(),
                &KvOptions {
                    spill: None,
                    ..kv.clone()
                },
            )
            .map_err(|e| ApiError::Internal(format!("model '{name}': {e}")))?;
        let wcfg = WorkerConfig {
            n_ctx,
            parallel: self.cfg.parallel,
            max_queue: self.cfg.max_queue,
            prefill_chunk: 256,
            kv: kv.clone(),
            prompt_cache: self.cfg.kv.prompt_cache,
            spec,
            draft,
        };
        let worker = worker::spawn(
            name,
            model.clone(),
            pool.clone(),
            wcfg,
            self.metrics.clone(),
            self.shutdown.clone(),
            self.watchdog.clone(),
        )
        .map_err(|e| ApiError::Internal(format!("starting the engine thread: {e}")))?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let w = model.weights().stats();
        tracing::info!(
            model = name,
            arch = model.config.arch.name(),
            n_ctx,
            weights = w.mode.name(),
            ram_mib = w.ram_bytes >> 20,
            streamed_mib = w.streamed_per_pass >> 20,
            "loaded in {ms:.0} ms"
        );
        if let (Some(g), Some(p)) = (model.gpu_stats(), model.plan()) {
            tracing::info!(
                model = name,
                device = %g.device,
                gpu_layers = p.gpu_layers(),
                layers = p.layers.len(),
                vram_mib = (g.weights_vram + g.experts_vram) >> 20,
                predicted_decode_tps = format!("{:.1}", p.decode.tokens_per_s),
                "on the GPU; decode limited by {}",
                p.decode.bottleneck.describe()
            );
        }
        let loaded = Arc::new(LoadedModel {
            name: name.to_owned(),
            model,
            template,
            worker,
            pool,
            n_ctx,
            parallel: self.cfg.parallel,
            kv,
        });
        if let Ok(mut map) = self.loaded.lock() {
            map.insert(name.to_owned(), loaded.clone());
        }
        Ok((loaded, LoadOutcome::Loaded { ms }))
    }

    /// Removes a model from the table; its engine thread ends once running requests finish.
    pub fn unload(&self, name: &str) -> bool {
        let removed = self.loaded.lock().ok().and_then(|mut m| m.remove(name));
        if removed.is_some() {
            tracing::info!(model = name, "unloaded");
            self.report_ready();
        }
        removed.is_some()
    }

    /// Unloads models idle past the keep-alive (never the ones named at start).
    pub fn reap_idle(&self) {
        let idle: Vec<String> = self
            .snapshot()
            .iter()
            .filter(|m| {
                let Some(keep) = self.keep_alive_of(&m.name) else {
                    return false;
                };
                m.worker
                    .stats
                    .active
                    .load(std::sync::atomic::Ordering::Relaxed)
                    == 0
                    && m.worker.queued() == 0
                    && m.worker.stats.idle_s() >= keep.as_secs_f64()
            })
            .map(|m| m.name.clone())
            .collect();
        for name in idle {
            tracing::info!(model = %name, "idle past keep-alive");
            self.unload(&name);
        }
    }

    pub fn gauges(&self) -> Vec<ModelGauges> {
        use std::sync::atomic::Ordering::Relaxed;
        self.snapshot()
            .iter()
            .map(|m| ModelGauges {
                name: m.name.clone(),
                queued: m.worker.queued(),
                active: m
                    .worker
                    .stats
                    .active
                    .load(std::sync::atomic::Ordering::Relaxed),
                kv_bytes: m
                    .worker
                    .stats
                    .kv_bytes
                    .load(std::sync::atomic::Ordering::Relaxed),
                weights: m.model.weights().stats(),
                tiers: m.model.weights().resident_bytes(),
                kv_vram_bytes: m.worker.stats.kv_vram_bytes.load(Relaxed),
                decode: m.worker.stats.decode_counts(),
                gpu: GpuGauges::of(&m.model),
            })
            .collect()
    }

    /// Sequences running or queued over all models.
    pub fn busy(&self) -> usize {
        self.gauges().iter().map(|g| g.active + g.queued).sum()
    }
}

/// A name in [`Manager::loading`] for as long as the guard lives (a failed or cancelled load
/// included).
struct Loading<'a> {
    list: &'a Mutex<Vec<String>>,
    name: String,
}

impl<'a> Loading<'a> {
    fn mark(list: &'a Mutex<Vec<String>>, name: &str) -> Loading<'a> {
        if let Ok(mut l) = list.lock() {
            l.push(name.to_owned());
        }
        Loading {
            list,
            name: name.to_owned(),
        }
    }
}

impl Drop for Loading<'_> {
    fn drop(&mut self) {
        if let Ok(mut l) = self.list.lock()
            && let Some(i) = l.iter().position(|n| *n == self.name)
        {
            l.remove(i);
        }
    }
}

/// The file of store model `name`; a bad name is a 400, an absent model a 404.
pub fn store_path(name: &str) -> Result<std::path::PathBuf, ApiError> {
    let store = Store::open_default()
        .map_err(|e| ApiError::Internal(format!("opening the model store: {e}")))?;
    let path = store.model_path(name).map_err(|e| match e {
        StoreError::BadName { .. } => ApiError::BadRequest(format!("bad model name: {e}")),
        other => ApiError::Internal(other.to_string()),
    })?;
    if path.is_file() {
        Ok(path)
    } else {
        Err(ApiError::NotFound(format!(
            "model '{name}' is not in the store (pull it with `strata pull {name}`)"
        )))
    }
}

/// Names of the models in the store, for `/v1/models`.
pub fn store_models() -> Result<Vec<String>, ApiError> {
    let store = Store::open_default()
        .map_err(|e| ApiError::Internal(format!("opening the model store: {e}")))?;
    let list = store
        .list()
        .map_err(|e| ApiError::Internal(format!("listing the model store: {e}")))?;
    Ok(list.into_iter().map(|e| e.name).collect())
}
