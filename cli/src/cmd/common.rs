//! What several commands share: finding the model (pulling it on first use), loading it, and
//! the thread pool.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use strata_engine::Model;
use strata_simd::pool::ThreadPool;
use strata_storage::store::Store;

/// The model `strata run` uses when none is named.
pub const DEFAULT_MODEL: &str = "gemma3-270m";

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
    store
        .ensure(spec, &mut progress)
        .with_context(|| format!("model '{spec}'"))
}

/// Threads to compute on: `-t` when given, else one per available core.
pub fn threads(requested: Option<usize>) -> anyhow::Result<usize> {
    match requested {
        Some(0) => anyhow::bail!("--threads must be at least 1"),
        Some(n) if n > 1024 => anyhow::bail!("--threads {n} is more than any machine has"),
        Some(n) => Ok(n),
        None => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
    }
}

pub fn load(spec: &str, threads_req: Option<usize>) -> anyhow::Result<Loaded> {
    let path = resolve_model(spec)?;
    let n_threads = threads(threads_req)?;
    let t0 = Instant::now();
    let model = Model::load(&path).with_context(|| format!("loading {}", path.display()))?;
    let pool = Arc::new(ThreadPool::new(n_threads));
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
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

/// The context size for `-c`: 0 means the model's trained length.
pub fn ctx_size(model: &Model, requested: usize) -> anyhow::Result<usize> {
    let train = model.config.n_ctx_train;
    let n = if requested == 0 { train } else { requested };
    if n > train {
        anyhow::bail!("--ctx-size {n} exceeds the model's context length {train}");
    }
    Ok(n)
}
