//! A loaded model: its configuration, its tensors (held through the residency API) and the
//! forward pass. One implementation serves every architecture; what differs between them is
//! the data in [`config::ArchTraits`].

pub mod config;
mod forward;
pub mod names;

use std::path::Path;
use std::sync::Arc;

use strata_simd::matmul::{INTERLEAVE_ROWS, Layout};
use strata_simd::ops::Rope;
use strata_simd::pool::ThreadPool;
use strata_storage::gguf::GgufFile;
use strata_storage::io::ReaderOptions;
use strata_storage::quant::{GgmlType, dequantize_row};
use strata_storage::residency::{LoadOptions, ResidencyError, TensorId, Weights};

pub use config::{Activation, Arch, ArchTraits, ModelConfig};
pub use forward::{Context, Logits, Scratch};
use names::LayerTensor;

use crate::error::EngineError;
use crate::kv::KvOptions;
use crate::tokenizer::Tokenizer;

/// A matrix the forward pass multiplies by: which tensor, and its shape.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mat {
    pub id: TensorId,
    pub ty: GgmlType,
    /// Output features.
    pub rows: usize,
    /// Input features (the contiguous dimension).
    pub cols: usize,
    /// Row-major as in the file, or interleaved for the decode kernels at load.
    pub layout: Layout,
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

impl Layer {
    /// The layer's dense matrices (not the stacked experts, nor the router, which expert
    /// prediction reads on its own).
    fn dense_mats_mut(&mut self) -> Vec<&mut Mat> {
        let mut v = vec![&mut self.q, &mut self.k, &mut self.v, &mut self.o];
        match &mut self.ffn {
            Ffn::Dense { gate, up, down } => v.extend([gate, up, down]),
            Ffn::Moe(m) => {
                if let Some((g, u, d, _)) = &mut m.shared {
                    v.extend([g, u, d]);
                }
            }
        }
        v
    }
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

/// How the next layer's experts are fetched ahead when they stream from disk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ExpertPrefetch {
    /// Guess with the next layer's router on this layer's input (the default).
    #[default]
    Predict,
    /// No read-ahead: every expert is read when its layer needs it.
    Off,
    /// Predict, and record which experts each MoE layer call really used.
    Record,
    /// Read ahead exactly the experts a recorded run used (a perfect-knowledge oracle).
    Replay(std::sync::Arc<Vec<Vec<usize>>>),
}

#[derive(Default)]
pub(crate) struct ExpertControl {
    pub mode: ExpertPrefetch,
    /// MoE layer calls so far (the index into a recording).
    pub calls: usize,
    pub log: Vec<Vec<usize>>,
    /// Per layer, each expert's decayed count of routed tokens: the activation-frequency
    /// prior that predictions are blended with.
    pub prior: Vec<Vec<f32>>,
}

/// Experts guessed for the next layer, experts it really used, and guesses that were right.
#[derive(Default)]
pub(crate) struct PredictionCounters {
    pub guessed: std::sync::atomic::AtomicU64,
    pub actual: std::sync::atomic::AtomicU64,
    pub right: std::sync::atomic::AtomicU64,
}

/// Precision and recall of expert prediction so far.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PredictionStats {
    pub guessed: u64,
    pub actual: u64,
    pub right: u64,
}

impl PredictionStats {
    /// Share of guessed experts that were used.
    pub fn precision(&self) -> f64 {
        if self.guessed == 0 {
            0.0
        } else {
            self.right as f64 / self.guessed as f64
        }
    }

    /// Share of used experts that were guessed.
    pub fn recall(&self) -> f64 {
        if self.actual == 0 {
            0.0
        } else {
            self.right as f64 / self.actual as f64
        }
    }
}

pub struct Model {
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    weights: Weights,
    layers: Vec<Layer>,
    token_embd: Mat,
    output: Mat,
    output_norm: Vec<f32>,
    rope_global: Rope,
    rope_swa: Rope,
    /// How well cross-layer expert prediction guesses (MoE models with streamed experts).
    pub(crate) prediction: PredictionCounters,
    pub(crate) experts: std::sync::Mutex<ExpertControl>,
    /// Model and tokenizer identity for sessions, computed on first use.
    pub(crate) session_ids: std::sync::OnceLock<([u8; 32], [u8; 32])>,
}

impl Model {
    /// Parses, validates and loads a GGUF model file, resident when it fits in memory and
    /// streamed from disk when it does not (I/O settings from `STRATA_IO`).
    pub fn load(path: &Path) -> Result<Self, EngineError> {
        let io = ReaderOptions::from_env().map_err(|e| ResidencyError::Read(Arc::new(e)))?;
        Self::load_with(
            path,
            &LoadOptions {
                io,
                ..LoadOptions::default()
            },
        )
    }

    /// [`Model::load`] with explicit residency options (RAM budget, streaming window, mmap).
    pub fn load_with(path: &Path, opts: &LoadOptions) -> Result<Self, EngineError> {
        let gguf = GgufFile::open(path)?;
        let arch = gguf.architecture()?.to_string();
        Arch::from_name(&arch)?;
        let tokenizer = Tokenizer::from_gguf(&gguf.metadata)?;
        let config = ModelConfig::from_metadata(&gguf.metadata, tokenizer.n_vocab())?;
        // An embedding table that is not also the output is only read a row per token.
        let mut opts = opts.clone();
        if gguf.tensors.iter().any(|t| t.name == names::OUTPUT) {
            opts.row_access.push(names::TOKEN_EMBD.to_string());
        }
        let interleave = !opts.keep_file_layout && interleave_enabled();
        let weights = Weights::open(path, gguf, &opts)?;
        Self::from_weights(config, tokenizer, weights, interleave)
    }

    fn from_weights(
        config: ModelConfig,
        tokenizer: Tokenizer,
        mut weights: Weights,
        interleave: bool,
    ) -> Result<Self, EngineError> {
        let c = &config;
        let (e, q, kv, ff) = (c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff);
        let token_embd = mat(&weights, names::TOKEN_EMBD, e, c.n_vocab)?;
        let mut output = if weights.id(names::OUTPUT).is_some() {
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
        // Resident matrices are interleaved for the decode kernels where the CPU has them. An
        // embedding table that is also the output projection is too (the output is the largest
        // product of a step); its rows are then taken out of their tile at lookup. A separate
        // embedding table keeps its rows.
        let mut token_embd = token_embd;
        if interleave {
            for l in &mut layers {
                for m in l.dense_mats_mut() {
                    interleave_mat(&mut weights, m)?;
                }
                // Resident experts too, slab by slab (streamed ones keep the file's layout).
                if let Ffn::Moe(m) = &mut l.ffn {
                    for x in [&mut m.gate, &mut m.up, &mut m.down] {
                        interleave_experts(&mut weights, x)?;
                    }
                }
            }
            let tied = output.id == token_embd.id;
            interleave_mat(&mut weights, &mut output)?;
            if tied {
                token_embd = output;
            }
        }
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
            session_ids: std::sync::OnceLock::new(),
            prediction: PredictionCounters::default(),
            experts: std::sync::Mutex::new(ExpertControl {
                // `STRATA_EXPERT_PREFETCH=off`: no guesses (a disk too slow to spare reads).
                mode: match std::env::var("STRATA_EXPERT_PREFETCH").as_deref() {
                    Ok("off") => ExpertPrefetch::Off,
                    _ => ExpertPrefetch::Predict,
                },
                ..ExpertControl::default()
            }),
        })
    }

    /// A fresh context (KV cache and scratch buffers) of `n_ctx` positions, computing on `pool`.
    pub fn new_context(&self, n_ctx: usize, pool: Arc<ThreadPool>) -> Context {
        match Context::new(&self.config, n_ctx, pool, &KvOptions::default()) {
            Ok(c) => c,
            Err(e) => unreachable!("an f16 cache in RAM needs nothing that can fail: {e}"),
        }
    }

    /// [`Model::new_context`] with a KV cache of other types, or one that may spill to SSD.
    pub fn new_context_with(
        &self,
        n_ctx: usize,
        pool: Arc<ThreadPool>,
        kv: &KvOptions,
    ) -> Result<Context, EngineError> {
        Context::new(&self.config, n_ctx, pool, kv)
    }

    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// Chooses how experts are read ahead (see [`ExpertPrefetch`]); resets the call count, and
    /// returns the routing recorded since the last call.
    pub fn set_expert_prefetch(&self, mode: ExpertPrefetch) -> Vec<Vec<usize>> {
        let mut c = self.experts.lock().unwrap_or_else(|p| p.into_inner());
        c.mode = mode;
        c.calls = 0;
        c.prior.clear();
        std::mem::take(&mut c.log)
    }

    /// How well the next layer's experts were predicted (all zero unless experts stream).
    pub fn prediction_stats(&self) -> PredictionStats {
        use std::sync::atomic::Ordering::Relaxed;
        let p = &self.prediction;
        PredictionStats {
            guessed: p.guessed.load(Relaxed),
            actual: p.actual.load(Relaxed),
            right: p.right.load(Relaxed),
        }
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

/// Whether to interleave resident matrices at load (`STRATA_INTERLEAVE=0` keeps the file's
/// row-major layout, for comparisons).
fn interleave_enabled() -> bool {
    std::env::var("STRATA_INTERLEAVE").map_or(true, |v| v != "0")
}

/// Interleaves `m` in place when it is resident and its type has the layout at this SIMD level.
fn interleave_mat(weights: &mut Weights, m: &mut Mat) -> Result<(), EngineError> {
    if m.rows < INTERLEAVE_ROWS || !strata_simd::matmul::can_interleave(m.ty) {
        return Ok(());
    }
    let (ty, rows, cols) = (m.ty, m.rows, m.cols);
    let done = weights.rewrite_resident(m.id, |bytes| {
        strata_simd::matmul::interleave(ty, bytes, rows, cols)
    })?;
    if done {
        m.layout = Layout::Interleaved;
    }
    Ok(())
}

/// Interleaves each expert's slab of a resident stacked tensor in place, as
/// [`interleave_mat`] does a matrix.
fn interleave_experts(weights: &mut Weights, x: &mut Experts) -> Result<(), EngineError> {
    let m = &mut x.mat;
    if m.rows < INTERLEAVE_ROWS || !strata_simd::matmul::can_interleave(m.ty) {
        return Ok(());
    }
    let (ty, rows, cols) = (m.ty, m.rows, m.cols);
    let slab = ty.row_bytes(cols) * rows;
    let done = weights.rewrite_resident(m.id, |bytes| {
        if slab == 0 || bytes.len() != slab * x.n_expert {
            return Ok::<_, strata_simd::matmul::SimdError>(false);
        }
        for s in bytes.chunks_exact_mut(slab) {
            if !strata_simd::matmul::interleave(ty, s, rows, cols)? {
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    if done {
        m.layout = Layout::Interleaved;
    }
    Ok(())
}

fn mat(weights: &Weights, name: &str, cols: usize, rows: usize) -> Result<Mat, EngineError> {
    let (id, ty) = matrix(weights, name, vec![cols as u64, rows as u64])?;
    Ok(Mat {
        id,
        ty,
        rows,
        cols,
        layout: Layout::Rows,
    })
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
        mat: Mat {
            id,
            ty,
            rows,
            cols,
            layout: Layout::Rows,
        },
        n_expert,
    })
}
