//! A loaded model: its configuration, its tensors (held through the residency API) and the
//! forward pass. One implementation serves every architecture; what differs between them is
//! the data in [`config::ArchTraits`].

pub mod config;
mod forward;
pub(crate) mod moe;
pub mod names;
mod options;
mod placing;
pub(crate) mod predict;

use std::path::Path;
use std::sync::Arc;

use strata_simd::ops::Rope;
use strata_simd::pool::ThreadPool;
use strata_storage::gguf::GgufFile;
use strata_storage::quant::{GgmlType, dequantize_row};
use strata_storage::residency::{TensorId, Weights};

pub use config::{Activation, Arch, ArchTraits, ModelConfig};
pub use forward::{Context, Logits, Scratch};
use names::LayerTensor;
pub use options::{
    CpuMoe, DecodeSetting, DeviceSpec, EnvSettings, GpuOptions, LoadSettings, ModelOptions,
    SettingNames,
};
pub use placing::open_device;
use predict::{ExpertControl, PredictionCounters};
pub use predict::{ExpertPrefetch, ExpertSettings, PredictionStats};

use crate::error::EngineError;
use crate::exec::Placement;
use crate::exec::cpu::repack::CpuWeights;
use crate::kv::KvOptions;
use crate::tokenizer::Tokenizer;

/// What the GPU holds and what crossed the link, for `run --verbose`, `/api/ps` and `/metrics`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuStats {
    pub device: String,
    /// Dense weights resident in VRAM.
    pub weights_vram: u64,
    /// The VRAM expert caches.
    pub experts_vram: u64,
    pub vram_free: u64,
    pub vram_total: u64,
    /// Weight bytes copied to the device each step (streamed matrices, experts copied in).
    pub streamed_bytes: u64,
    /// Of those, bytes copied straight from storage's page-locked buffers, where io_uring's
    /// reads put them (the rest went through a staging buffer).
    pub streamed_direct_bytes: u64,
    /// Activation bytes that crossed between the CPU and the GPU.
    pub crossing_bytes: u64,
    /// Every host → device and device → host byte.
    pub h2d_bytes: u64,
    pub d2h_bytes: u64,
    /// Time the GPU's work waited on weight copies, µs.
    pub wait_us: u64,
    pub launches: u64,
    /// Decode steps run as a CUDA graph, and how many of those instantiated one (the rest
    /// updated the last one in place).
    pub graph_steps: u64,
    pub graph_instantiations: u64,
}

/// A matrix the forward pass multiplies by: which tensor, and its shape.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mat {
    pub id: TensorId,
    pub ty: GgmlType,
    /// Output features.
    pub rows: usize,
    /// Input features (the contiguous dimension).
    pub cols: usize,
}

/// One transformer block's tensors. Vectors (norms, biases) are decoded to f32 at load; the
/// matrices stay in storage and are acquired for each step.
pub(crate) struct Layer {
    pub attn_norm: Vec<f32>,
    pub q: Mat,
    pub k: Mat,
    pub v: Mat,
    pub q_bias: Option<Vec<f32>>,
    pub k_bias: Option<Vec<f32>>,
    pub v_bias: Option<Vec<f32>>,
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub o: Mat,
    pub post_attn_norm: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    pub ffn: Ffn,
    pub post_ffn_norm: Option<Vec<f32>>,
    pub swa: bool,
}

/// A block's feed-forward network: one gated FFN, or a router over experts.
pub(crate) enum Ffn {
    Dense { gate: Mat, up: Mat, down: Mat },
    Moe(Moe),
}

/// Stacked expert matrices: expert `e`'s `rows × cols` matrix is the `e`-th slab.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Experts {
    pub mat: Mat,
    pub n_expert: usize,
}

pub(crate) struct Moe {
    pub router: Mat,
    pub gate: Experts,
    pub up: Experts,
    pub down: Experts,
    /// qwen2moe's shared expert: gate, up, down and the sigmoid gate's weights.
    pub shared: Option<(Mat, Mat, Mat, Vec<f32>)>,
}

pub struct Model {
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    /// The GPU executor's weights, when a GPU was asked for. Declared before `weights`: its
    /// copies read the weights' buffers, which it page-locked, so it lets go of them first.
    pub(crate) gpu: Option<crate::exec::gpu::weights::GpuWeights>,
    pub(crate) weights: Weights,
    pub(crate) layers: Vec<Layer>,
    pub(crate) token_embd: Mat,
    pub(crate) output: Mat,
    pub(crate) output_norm: Vec<f32>,
    pub(crate) rope_global: Rope,
    pub(crate) rope_swa: Rope,
    /// The CPU executor's view of the weights (its repacked layouts).
    pub(crate) cpu: CpuWeights,
    /// Where each phase of each layer runs.
    pub(crate) placement: Placement,
    /// The planner's placement behind `placement`, when there is a GPU.
    pub(crate) plan: Option<crate::plan::Placement>,
    pub(crate) expert_settings: ExpertSettings,
    /// How well cross-layer expert prediction guesses (MoE models with streamed experts).
    pub(crate) prediction: PredictionCounters,
    pub(crate) experts: std::sync::Mutex<ExpertControl>,
    /// Model and tokenizer identity for sessions, computed on first use.
    pub(crate) session_ids: std::sync::OnceLock<([u8; 32], [u8; 32])>,
}

impl Model {
    /// Parses, validates and loads a GGUF model file with the default options: resident when
    /// it fits in memory and streamed from disk when it does not.
    pub fn load(path: &Path) -> Result<Self, EngineError> {
        Self::load_with(path, &ModelOptions::default())
    }

    /// [`Model::load`] with explicit options (RAM budget, streaming window, mmap, I/O engine,
    /// expert prediction).
    pub fn load_with(path: &Path, opts: &ModelOptions) -> Result<Self, EngineError> {
        let gguf = GgufFile::open(path)?;
        let arch = gguf.architecture()?.to_string();
        Arch::from_name(&arch)?;
        let tokenizer = Tokenizer::from_gguf(&gguf.metadata)?;
        let config = ModelConfig::from_metadata(&gguf.metadata, tokenizer.n_vocab())?;
        // How each tensor is read, from the name table (storage groups and streams by it).
        let mut residency = opts.residency.clone();
        residency.tensor_uses = names::tensor_uses(&gguf.tensors);
        let weights = Weights::open(path, gguf, &residency)?;
        Self::from_weights(config, tokenizer, weights, opts)
    }

    fn from_weights(
        config: ModelConfig,
        tokenizer: Tokenizer,
        mut weights: Weights,
        opts: &ModelOptions,
    ) -> Result<Self, EngineError> {
        let c = &config;
        let (e, q, kv, ff) = (c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff);
        let token_embd = mat(&weights, names::TOKEN_EMBD, e, c.n_vocab)?;
        let output = if weights.id(names::OUTPUT).is_some() {
            mat(&weights, names::OUTPUT, e, c.n_vocab)?
        } else {
            token_embd
        };
        let output_norm = vector(&weights, names::OUTPUT_NORM, e)?;
        let mut layers = Vec::with_capacity(c.n_layer);
        for il in 0..c.n_layer {
            let name = |t: LayerTensor| t.gguf_name(il);
            let m = |t, cols, rows| mat(&weights, &name(t), cols, rows);
            let v = |t, len| vector(&weights, &name(t), len);
            let ov = |t: LayerTensor, len| -> Result<Option<Vec<f32>>, EngineError> {
                match weights.id(&name(t)) {
                    Some(_) => Ok(Some(vector(&weights, &name(t), len)?)),
                    None => Ok(None),
                }
            };
            let req =
                |t: LayerTensor, len, needed: bool| -> Result<Option<Vec<f32>>, EngineError> {
                    let got = ov(t, len)?;
                    if needed && got.is_none() {
                        return Err(EngineError::MissingTensor(name(t)));
                    }
                    Ok(got)
                };
            let tr = &c.traits;
            // Q/K norms act on each head (`head_dim` weights) or, in OLMoE, on the whole
            // projection (`full` weights); the tensor's length says which.
            let qk_norm = |t: LayerTensor, full: usize| -> Result<Option<Vec<f32>>, EngineError> {
                let len = match weights.id(&name(t)).map(|id| weights.info(id)) {
                    Some(Ok(info)) if info.dims == [full as u64] => full,
                    _ => c.head_dim,
                };
                req(t, len, tr.qk_norm)
            };
            layers.push(Layer {
                attn_norm: v(LayerTensor::AttnNorm, e)?,
                q: m(LayerTensor::Q, e, q)?,
                k: m(LayerTensor::K, e, kv)?,
                v: m(LayerTensor::V, e, kv)?,
                q_bias: ov(LayerTensor::QBias, q)?,
                k_bias: ov(LayerTensor::KBias, kv)?,
                v_bias: ov(LayerTensor::VBias, kv)?,
                q_norm: qk_norm(LayerTensor::QNorm, q)?,
                k_norm: qk_norm(LayerTensor::KNorm, kv)?,
                o: m(LayerTensor::Output, q, e)?,
                post_attn_norm: req(LayerTensor::PostAttnNorm, e, tr.post_norms)?,
                ffn_norm: v(LayerTensor::FfnNorm, e)?,
                ffn: match &c.moe {
                    None => Ffn::Dense {
                        gate: m(LayerTensor::Gate, e, ff)?,
                        up: m(LayerTensor::Up, e, ff)?,
                        down: m(LayerTensor::Down, ff, e)?,
                    },
                    Some(mc) => {
                        let x = |t: LayerTensor, cols, rows| {
                            experts(&weights, &name(t), cols, rows, mc.n_expert)
                        };
                        let shared = match mc.n_ff_shexp {
                            None => None,
                            Some(sf) => Some((
                                m(LayerTensor::GateShexp, e, sf)?,
                                m(LayerTensor::UpShexp, e, sf)?,
                                m(LayerTensor::DownShexp, sf, e)?,
                                v(LayerTensor::GateInpShexp, e)?,
                            )),
                        };
                        Ffn::Moe(Moe {
                            router: m(LayerTensor::GateInp, e, mc.n_expert)?,
                            gate: x(LayerTensor::GateExps, e, mc.n_ff_exp)?,
                            up: x(LayerTensor::UpExps, e, mc.n_ff_exp)?,
                            down: x(LayerTensor::DownExps, mc.n_ff_exp, e)?,
                            shared,
                        })
                    }
                },
                post_ffn_norm: req(LayerTensor::PostFfnNorm, e, tr.post_norms)?,
                swa: c.swa_layers[il],
            });
        }
        // Where the phases run; with a GPU, its weights are uploaded before the CPU repacks
        // its own (the GPU reads the file's layout).
        let placed = placing::place(opts, &weights, &layers, output, token_embd, &output_norm)?;
        // The CPU executor's weight preparation: its decode kernels chosen (measured on this
        // CPU at the first load), then its repacked layout.
        if !opts.keep_file_layout {
            crate::exec::cpu::repack::choose_decode(
                opts.decode,
                opts.gpu.profile.as_ref().and_then(|p| p.decode.as_ref()),
                opts.decode_memory.as_deref(),
                &layers,
                output,
                weights
                    .resident_bytes()
                    .iter()
                    .any(|&(tier, _)| tier != strata_storage::residency::Tier::Ram),
            );
        }
        let cpu = CpuWeights::prepare(
            &mut weights,
            &layers,
            output,
            token_embd.id,
            !opts.keep_file_layout,
            &placed.streamed,
        )?;
        let placement = placed.placement;
        let kind = c.traits.rope;
        let rope_global = Rope::new(kind, c.n_rot, c.rope_base, c.rope_freq_scale);
        let rope_swa = Rope::new(
            kind,
            c.n_rot,
            c.traits.swa_rope_base.unwrap_or(c.rope_base),
            1.0,
        );
        Ok(Self {
            config,
            tokenizer,
            weights,
            layers,
            token_embd,
            output,
            output_norm,
            rope_global,
            rope_swa,
            cpu,
            placement,
            gpu: placed.gpu,
            plan: placed.plan,
            expert_settings: opts.experts.clone(),
            session_ids: std::sync::OnceLock::new(),
            prediction: PredictionCounters::default(),
            experts: std::sync::Mutex::new(ExpertControl {
                mode: opts.experts.prefetch.clone(),
                ..ExpertControl::default()
            }),
        })
    }

    /// A fresh context (KV cache and scratch buffers) of `n_ctx` positions, computing on `pool`.
    pub fn new_context(&self, n_ctx: usize, pool: Arc<ThreadPool>) -> Context {
        match self.new_context_with(n_ctx, pool, &KvOptions::default()) {
            Ok(c) => c,
            Err(e) => unreachable!("an f16 cache with the model's VRAM tier cannot fail: {e}"),
        }
    }

    /// [`Model::new_context`] with a KV cache of other types, or one that may spill to SSD.
    /// The layers whose attention runs on the GPU keep their pages in its VRAM tier.
    pub fn new_context_with(
        &self,
        n_ctx: usize,
        pool: Arc<ThreadPool>,
        kv: &KvOptions,
    ) -> Result<Context, EngineError> {
        let mut kv = kv.clone();
        if let Some(g) = &self.gpu
            && g.kv_layers.iter().any(|&l| l)
        {
            kv.gpu = Some(crate::kv::KvGpu {
                stream: Arc::clone(&g.stream),
                layers: g.kv_layers.clone(),
                vram_budget: g.kv_vram_budget,
            });
        }
        Context::new(&self.config, n_ctx, pool, &kv)
    }

    /// The device the GPU phases run on, if any.
    pub fn gpu_device(&self) -> Option<strata_kernels::DeviceInfo> {
        self.gpu.as_ref().map(|g| g.dev.info())
    }

    /// What the GPU holds and has moved so far (`None` without a GPU).
    pub fn gpu_stats(&self) -> Option<GpuStats> {
        use std::sync::atomic::Ordering::Relaxed;
        let g = self.gpu.as_ref()?;
        let (free, total) = g.dev.memory().unwrap_or((0, 0));
        let experts: u64 = g.moe.iter().flatten().map(|m| m.bytes()).sum();
        let t = g.dev.transfer_stats();
        Some(GpuStats {
            device: g.dev.info().name,
            weights_vram: g.resident_bytes.saturating_sub(experts),
            experts_vram: experts,
            vram_free: free as u64,
            vram_total: total as u64,
            streamed_bytes: g.counters.streamed_bytes.load(Relaxed),
            streamed_direct_bytes: g.counters.streamed_direct_bytes.load(Relaxed),
            crossing_bytes: g.counters.crossing_bytes.load(Relaxed),
            h2d_bytes: t.h2d_bytes,
            d2h_bytes: t.d2h_bytes,
            wait_us: g.counters.wait_us.load(Relaxed),
            launches: t.launches,
            graph_steps: g.counters.graph_steps.load(Relaxed),
            graph_instantiations: g.counters.graph_instantiations.load(Relaxed),
        })
    }

    /// The planner's placement (with a GPU), for `strata run` and `/api/ps` to show.
    pub fn plan(&self) -> Option<&crate::plan::Placement> {
        self.plan.as_ref()
    }

    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// Where each phase of each layer runs.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// Total bytes of the weight tensors.
    pub fn size_bytes(&self) -> u64 {
        self.weights.gguf().tensors.iter().map(|t| t.n_bytes).sum()
    }

    /// Weight bytes one decode step reads: every tensor once, except the embedding table of
    /// which only one row is read (unless it doubles as the output projection), and stacked
    /// experts, of which a token uses `n_expert_used` of `n_expert`.
    pub fn decode_bytes_per_token(&self) -> u64 {
        let tensors = &self.weights.gguf().tensors;
        let embd = self
            .weights
            .info(self.token_embd.id)
            .map_or(0, |t| t.n_bytes);
        let tied = self.output.id == self.token_embd.id;
        let all: u64 = tensors
            .iter()
            .map(|t| match (self.config.moe, t.dims.as_slice()) {
                (Some(mc), [_, _, n]) if *n as usize == mc.n_expert && mc.n_expert > 0 => {
                    t.n_bytes / mc.n_expert as u64 * mc.n_expert_used as u64
                }
                _ => t.n_bytes,
            })
            .sum();
        if tied { all } else { all - embd }
    }

    /// Total number of weight elements.
    pub fn n_params(&self) -> u64 {
        self.weights
            .gguf()
            .tensors
            .iter()
            .map(|t| t.n_elements)
            .sum()
    }
}

fn mat(weights: &Weights, name: &str, cols: usize, rows: usize) -> Result<Mat, EngineError> {
    let (id, ty) = matrix(weights, name, vec![cols as u64, rows as u64])?;
    Ok(Mat { id, ty, rows, cols })
}

/// A weight matrix (or stack of them) by name, checked to have `expected` dims and a type the
/// matmul computes with.
fn matrix(
    weights: &Weights,
    name: &str,
    expected: Vec<u64>,
) -> Result<(TensorId, GgmlType), EngineError> {
    let id = weights
        .id(name)
        .ok_or_else(|| EngineError::MissingTensor(name.to_string()))?;
    let info = weights.info(id)?;
    if info.dims != expected {
        return Err(EngineError::TensorShape {
            name: name.to_string(),
            expected,
            actual: info.dims.clone(),
        });
    }
    if !strata_simd::matmul::supports(info.ty) {
        return Err(EngineError::UnsupportedType {
            name: name.to_string(),
            ty: info.ty.to_string(),
        });
    }
    Ok((id, info.ty))
}

fn vector(weights: &Weights, name: &str, len: usize) -> Result<Vec<f32>, EngineError> {
    let id = weights
        .id(name)
        .ok_or_else(|| EngineError::MissingTensor(name.to_string()))?;
    let info = weights.info(id)?;
    if info.dims != [len as u64] {
        return Err(EngineError::TensorShape {
            name: name.to_string(),
            expected: vec![len as u64],
            actual: info.dims.clone(),
        });
    }
    let handle = weights.acquire(id)?;
    let mut out = vec![0f32; len];
    dequantize_row(info.ty, handle.bytes(), &mut out).map_err(|_| {
        EngineError::UnsupportedType {
            name: name.to_string(),
            ty: info.ty.to_string(),
        }
    })?;
    Ok(out)
}

fn experts(
    weights: &Weights,
    name: &str,
    cols: usize,
    rows: usize,
    n_expert: usize,
) -> Result<Experts, EngineError> {
    let dims = vec![cols as u64, rows as u64, n_expert as u64];
    let (id, ty) = matrix(weights, name, dims)?;
    Ok(Experts {
        mat: Mat { id, ty, rows, cols },
        n_expert,
    })
}
