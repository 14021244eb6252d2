//! llama.cpp's speculative decoding flags, shared by `run`, `chat --local` and `bench`: a
//! draft model (`-md`), the kind of draft (`--spec-type`) and its length (`--spec-draft-n-max`,
//! `--spec-draft-n-min`; within that range strata picks each step's length from measurement).

use std::sync::Arc;

use anyhow::Context as _;
use strata_engine::Model;
use strata_engine::model::ModelOptions;
use strata_engine::sampler::SamplerConfig;
use strata_engine::spec::{Draft, DraftModel, SpecConfig, SpecStats, SpecType, Speculator};
use strata_simd::pool::ThreadPool;

use super::common::resolve_model;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct SpecArgs {
    /// Draft model for speculative decoding (llama.cpp's -md): a store name, a .gguf path or
    /// an https URL, with the same vocabulary as the model. It is kept in RAM while the model
    /// streams.
    #[arg(long = "model-draft", value_name = "FILE")]
    pub model_draft: Option<String>,
    /// What drafts tokens: none, draft (the -md model; the default with -md), ngram-simple
    /// (prompt lookup: the tokens that followed the last 3 tokens' latest earlier
    /// occurrence) or ngram-map-k (the same through a map of every 3 tokens).
    #[arg(long = "spec-type", value_name = "TYPE")]
    pub spec_type: Option<String>,
    /// Most tokens drafted per step (1..=15; strata drafts fewer, or none, where the measured
    /// cost of a pass says it does not pay).
    #[arg(long = "spec-draft-n-max", value_name = "N")]
    pub n_max: Option<usize>,
    /// Fewest drafted tokens worth verifying; shorter drafts are not.
    #[arg(long = "spec-draft-n-min", value_name = "N")]
    pub n_min: Option<usize>,
}

impl SpecArgs {
    /// Whether any of these flags was given.
    pub fn is_given(&self) -> bool {
        self.model_draft.is_some()
            || self.spec_type.is_some()
            || self.n_max.is_some()
            || self.n_min.is_some()
    }

    /// The checked configuration (before any model loads).
    pub fn config(&self) -> anyhow::Result<SpecConfig> {
        let asked = self
            .spec_type
            .as_deref()
            .map(|t| t.parse::<SpecType>())
            .transpose()
            .map_err(|e| anyhow::anyhow!("--spec-type: {e}"))?;
        let cfg =
            SpecConfig::from_settings(asked, self.model_draft.is_some(), self.n_max, self.n_min);
        let kind = cfg.kind;
        cfg.validate().map_err(anyhow::Error::msg)?;
        match (kind, &self.model_draft) {
            (SpecType::Draft, None) => {
                anyhow::bail!("--spec-type draft needs a draft model: -md FILE")
            }
            (SpecType::NgramSimple | SpecType::NgramMapK | SpecType::None, Some(_))
                if self.spec_type.is_some() =>
            {
                anyhow::bail!(
                    "--spec-type {} does not use a draft model; drop -md or use --spec-type draft",
                    kind.name()
                )
            }
            _ => {}
        }
        Ok(cfg)
    }

    /// The speculator for `target` (a plain one without these flags), loading the draft model
    /// when one is named: resident, computing on `pool`.
    pub fn speculator(
        &self,
        target: &Model,
        n_ctx: usize,
        pool: &Arc<ThreadPool>,
        sampler: &SamplerConfig,
    ) -> anyhow::Result<Speculator> {
        let cfg = self.config()?;
        let draft = match (&self.model_draft, cfg.kind) {
            (Some(name), SpecType::Draft) => {
                let path = resolve_model(name)?;
                let model = Model::load_with(&path, &ModelOptions::default())
                    .with_context(|| format!("loading the draft model {}", path.display()))?;
                let d = DraftModel::new(Arc::new(model), target, n_ctx, pool.clone(), sampler)
                    .with_context(|| format!("draft model {name}"))?;
                Some(d)
            }
            _ => None,
        };
        let draft = Draft::new(&cfg, draft)?;
        Ok(Speculator::new(cfg, draft)?)
    }
}

/// One line of what speculation did, for run's and chat's timings.
pub fn describe(kind: SpecType, s: &SpecStats) -> String {
    format!(
        "speculative ({}): {} drafted, {} accepted ({:.1}%), {} target passes for {} tokens ({:.2} tokens per pass; {} verify passes)",
        kind.name(),
        s.drafted,
        s.accepted,
        100.0 * s.acceptance(),
        s.passes,
        s.tokens,
        s.tokens_per_pass(),
        s.verify_passes
    )
}
