//! The KV cache flags `run`, `perplexity`, `bench` and `chat` share: llama.cpp's cache types,
//! and strata's RAM budget with the SSD tier beneath it.

use std::path::PathBuf;

use strata_engine::kv::{KvOptions, SpillConfig, parse_cache_type, parse_kv_budget};
use strata_engine::{Context, Model};
use strata_simd::pool::ThreadPool;
use strata_storage::io::ReaderOptions;
use strata_storage::store::Store;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct KvArgs {
    /// KV cache type for keys: f16 (default), q8_0 or q4_0 (llama.cpp's -ctk).
    #[arg(long = "cache-type-k", value_name = "TYPE")]
    pub cache_type_k: Option<String>,
    /// KV cache type for values: f16 (default), q8_0 or q4_0 (llama.cpp's -ctv).
    #[arg(long = "cache-type-v", value_name = "TYPE")]
    pub cache_type_v: Option<String>,
    /// RAM the KV cache may hold: bytes with a K/M/G suffix, or a percentage of the full
    /// cache of the context ("25%"). Older pages go to SSD and are read back for attention.
    /// Default: all of it in RAM.
    #[arg(long = "kv-budget", value_name = "SIZE")]
    pub kv_budget: Option<String>,
    /// Directory for KV pages on SSD (an unlinked file; default: kv/ in the model store).
    #[arg(long = "kv-dir", value_name = "DIR", requires = "kv_budget")]
    pub kv_dir: Option<PathBuf>,
}

impl KvArgs {
    /// Whether any of these flags was given.
    pub fn is_given(&self) -> bool {
        self.cache_type_k.is_some() || self.cache_type_v.is_some() || self.kv_budget.is_some()
    }

    /// The cache options for `n_ctx` positions of `model`.
    pub fn options(&self, model: &Model, n_ctx: usize) -> anyhow::Result<KvOptions> {
        let ty = |flag: &str, v: &Option<String>| -> anyhow::Result<_> {
            match v {
                Some(s) => parse_cache_type(s).map_err(|e| anyhow::anyhow!("--{flag}: {e}")),
                None => Ok(strata_storage::quant::GgmlType::F16),
            }
        };
        let type_k = ty("cache-type-k", &self.cache_type_k)?;
        let type_v = ty("cache-type-v", &self.cache_type_v)?;
        let spill = match &self.kv_budget {
            None => None,
            Some(s) => {
                let ram_budget = parse_kv_budget(s, &model.config, n_ctx, type_k, type_v)
                    .map_err(|e| anyhow::anyhow!("--kv-budget {s:?}: {e}"))?;
                let dir = match &self.kv_dir {
                    Some(d) => d.clone(),
                    None => Store::open_default()?.root().join("kv"),
                };
                Some(SpillConfig {
                    dir,
                    ram_budget,
                    io: ReaderOptions::from_env()?,
                })
            }
        };
        let opts = KvOptions {
            type_k,
            type_v,
            spill,
            // The model adds its VRAM tier when it makes the context.
            gpu: None,
        };
        // Issue 22: `--kv-budget 1M` silently kept 7 MiB.
        if let (Some(s), Some(budget)) = (&opts.spill, &self.kv_budget) {
            let floor = opts.min_ram_budget(model.config.n_layer, model.config.kv_dim());
            if s.ram_budget < floor {
                eprintln!(
                    "warning: --kv-budget {budget} is below what the KV cache holds in RAM at \
                     least ({:.1} MiB: each layer's page of {} positions of keys and of values \
                     stays while it fills); keeping {:.1} MiB",
                    floor as f64 / 1048576.0,
                    strata_engine::kv::PAGE_TOKENS,
                    floor as f64 / 1048576.0
                );
            }
        }
        Ok(opts)
    }

    /// A context of `n_ctx` positions with these options.
    pub fn context(
        &self,
        model: &Model,
        n_ctx: usize,
        pool: std::sync::Arc<ThreadPool>,
    ) -> anyhow::Result<Context> {
        let opts = self.options(model, n_ctx)?;
        Ok(model.new_context_with(n_ctx, pool, &opts)?)
    }
}
