//! Synthetic models: writes GGUF models of any supported architecture with deterministic
//! random weights, for tests and for files larger than any model at hand.
//!
//! The tensor list comes from the same name table and [`ArchTraits`] the loader uses, so a
//! generated file exercises exactly the code paths a real one of that architecture does.
//! Tensors are declared first and produced row by row while the file is written, so a file
//! larger than RAM takes a few MB of memory to write. Each tensor draws from its own seeded
//! generator, so the bytes depend only on the spec and the seed.

use std::io::Write;
use std::path::Path;

use half::f16;
use strata_storage::gguf::{ArrayValue, GgufBuilder, Metadata, Value};
use strata_storage::quant::{GgmlType, quantize_row};
use strata_storage::store::{NoProgress, Progress};

use crate::error::EngineError;
use crate::model::names::{self, LayerTensor};
use crate::model::{Arch, ArchTraits};
use crate::sampler::SplitMix64;

/// The shape of a generated model.
#[derive(Clone, Debug)]
pub struct GenSpec {
    pub arch: Arch,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub n_ctx: usize,
    /// Type of the attention and gate/up matrices.
    pub weight_type: GgmlType,
    /// Type of `attn_v`, `ffn_down` and the output projection (Q4_K_M files use Q6_K there).
    pub down_type: GgmlType,
    /// Type of the token embeddings.
    pub embd_type: GgmlType,
    /// Sliding window (architectures with sliding-window layers only).
    pub sliding_window: usize,
    pub seed: u64,
    /// Fill quantized blocks with random bytes and sane scales instead of quantizing random
    /// floats: as valid, and fast enough that a 30 GB file is bound by the disk.
    pub random_blocks: bool,
    /// Mixture of experts: experts per layer (0 = a dense FFN), experts per token, an
    /// expert's hidden size, and the shared expert's (qwen2moe).
    pub n_expert: usize,
    pub n_expert_used: usize,
    pub n_ff_exp: usize,
    pub n_ff_shexp: Option<usize>,
}

impl GenSpec {
    /// A model of a few MB: every block present, dims that suit every block size.
    pub fn tiny(arch: Arch) -> Self {
        Self::tiny_dense(arch).with_moe_defaults()
    }

    fn tiny_dense(arch: Arch) -> Self {
        Self {
            arch,
            n_layer: 6,
            n_embd: 256,
            n_head: 4,
            n_head_kv: 2,
            head_dim: 64,
            n_ff: 512,
            n_ctx: 512,
            weight_type: GgmlType::Q8_0,
            down_type: GgmlType::Q8_0,
            embd_type: GgmlType::Q8_0,
            sliding_window: 4,
            seed: 1,
            random_blocks: false,
            n_expert: 0,
            n_expert_used: 0,
            n_ff_exp: 0,
            n_ff_shexp: None,
        }
    }

    /// About 30 GB in Q4_K/Q6_K (a 70B-class shape with 60 layers): larger than this
    /// machine's RAM.
    pub fn big(arch: Arch) -> Self {
        Self::big_dense(arch).with_moe_defaults()
    }

    fn big_dense(arch: Arch) -> Self {
        Self {
            arch,
            n_layer: 60,
            n_embd: 8192,
            n_head: 64,
            n_head_kv: 8,
            head_dim: 128,
            n_ff: 28672,
            n_ctx: 4096,
            weight_type: GgmlType::Q4K,
            down_type: GgmlType::Q6K,
            embd_type: GgmlType::Q8_0,
            sliding_window: 1024,
            seed: 1,
            random_blocks: true,
            n_expert: 0,
            n_expert_used: 0,
            n_ff_exp: 0,
            n_ff_shexp: None,
        }
    }

    /// A mixture-of-experts shape for `tiny` or `big`: 8 experts (2 per token) of hidden size
    /// 256 for tests; for `big`, a Qwen3-30B-A3B-like layer (2048 wide, 128 experts of 768,
    /// 8 per token) over 48 layers, about 31 GB with Q8_0 experts.
    pub fn moe(arch: Arch, big: bool) -> Self {
        let mut s = if big {
            Self::big_dense(arch)
        } else {
            Self::tiny_dense(arch)
        };
        if big {
            s.n_layer = 48;
            s.n_embd = 2048;
            s.n_head = 32;
            s.n_head_kv = 4;
            s.head_dim = 128;
            s.n_ff = 6144;
            s.n_expert = 128;
            s.n_expert_used = 8;
            s.n_ff_exp = 768;
            s.weight_type = GgmlType::Q8_0;
            s.down_type = GgmlType::Q8_0;
        } else {
            s.n_expert = 8;
            s.n_expert_used = 2;
            s.n_ff_exp = 256;
        }
        if arch == Arch::Qwen2Moe {
            s.n_ff_shexp = Some(if big { 5632 } else { 512 });
        }
        // Mixtral (llama) and OLMoE size their experts with feed_forward_length; OLMoE has
        // no GQA.
        if matches!(arch, Arch::Llama | Arch::Olmoe) {
            s.n_ff = s.n_ff_exp;
        }
        if arch == Arch::Olmoe {
            s.n_head_kv = s.n_head;
        }
        s
    }

    /// MoE architectures always have experts.
    fn with_moe_defaults(self) -> Self {
        if matches!(self.arch, Arch::Qwen2Moe | Arch::Qwen3Moe | Arch::Olmoe) && self.n_expert == 0
        {
            Self::moe(self.arch, self.random_blocks)
        } else {
            self
        }
    }
}

/// Where the generated model's vocabulary comes from.
pub enum Vocab<'a> {
    /// 259 tokens: `<unk>`, `<s>`, `</s>` and the 256 byte tokens (SentencePiece model).
    Bytes,
    /// Every `tokenizer.*` key of a real model.
    From(&'a Metadata),
}

/// How one tensor's values are drawn.
#[derive(Clone, Copy)]
enum Fill {
    /// Uniform in ±scale.
    Matrix { scale: f32 },
    /// `base` ± 0.1 (norm weights around 1, biases around 0).
    Vector { base: f32 },
}

struct Plan {
    name: String,
    ty: GgmlType,
    cols: usize,
    rows: usize,
    /// Matrices stacked along a third dimension (experts); 1 for a plain matrix.
    stack: usize,
    fill: Fill,
}

/// Writes the model to `w`; returns the bytes written.
pub fn write(spec: &GenSpec, vocab: Vocab<'_>, w: impl Write) -> Result<u64, EngineError> {
    write_reporting(spec, vocab, w, &mut NoProgress)
}

/// As [`write`], reporting the tensor bytes written to `progress` (a big model takes minutes).
fn write_reporting(
    spec: &GenSpec,
    vocab: Vocab<'_>,
    w: impl Write,
    progress: &mut dyn Progress,
) -> Result<u64, EngineError> {
    let (builder, plans) = declare(spec, vocab)?;
    let bytes = |p: &Plan| (p.ty.row_bytes(p.cols) * p.rows * p.stack) as u64;
    progress.start("writing tensors", Some(plans.iter().map(bytes).sum()));
    let mut index = 0usize;
    let written = builder
        .write_with(w, |name, out| {
            // Tensors are produced in declaration order.
            let plan = &plans[index];
            debug_assert_eq!(plan.name, name);
            let mut rng =
                SplitMix64(spec.seed ^ (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            index += 1;
            produce(plan, spec.random_blocks, &mut rng, out)?;
            progress.advance(bytes(plan));
            Ok(())
        })
        .map_err(|e| EngineError::Invalid(format!("writing the model: {e}")));
    progress.finish();
    written
}

/// Writes the model to a file (created or truncated), reporting to `progress` as it goes.
pub fn write_file(
    spec: &GenSpec,
    vocab: Vocab<'_>,
    path: &Path,
    progress: &mut dyn Progress,
) -> Result<u64, EngineError> {
    let file = std::fs::File::create(path)
        .map_err(|e| EngineError::Invalid(format!("{}: {e}", path.display())))?;
    let written = write_reporting(
        spec,
        vocab,
        std::io::BufWriter::with_capacity(8 << 20, file),
        progress,
    );
    // A shape refused, or a write that failed, leaves no file behind.
    if written.is_err() {
        let _ = std::fs::remove_file(path);
    }
    written
}

/// The whole model in memory (test-sized models).
pub fn to_bytes(spec: &GenSpec, vocab: Vocab<'_>) -> Result<Vec<u8>, EngineError> {
    let mut v = Vec::new();
    write(spec, vocab, &mut v)?;
    Ok(v)
}

fn declare(spec: &GenSpec, vocab: Vocab<'_>) -> Result<(GgufBuilder, Vec<Plan>), EngineError> {
    let s = spec;
    for ty in [s.weight_type, s.down_type, s.embd_type] {
        let bs = ty.block_size();
        for (what, d) in [
            ("n_embd", s.n_embd),
            ("n_ff", s.n_ff),
            ("q dim", s.n_head * s.head_dim),
        ] {
            if d % bs != 0 {
                return Err(EngineError::Invalid(format!(
                    "{what} = {d} is not a multiple of {ty}'s block size {bs}"
                )));
            }
        }
    }
    if s.n_head_kv == 0 || !s.n_head.is_multiple_of(s.n_head_kv) || s.n_layer == 0 {
        return Err(EngineError::Invalid(
            "need at least one layer, and heads a multiple of KV heads".into(),
        ));
    }
    let mut b = GgufBuilder::new();
    let arch = s.arch.name();
    let n_vocab = add_vocab(&mut b, vocab)?;
    let u = |v: usize| Value::U32(v as u32);
    b.kv("general.architecture", Value::String(arch.into()));
    b.kv(
        "general.name",
        Value::String(format!("strata-synth {arch}")),
    );
    b.kv("general.file_type", Value::U32(file_type(s.weight_type)));
    b.kv("general.quantization_version", Value::U32(2));
    b.kv(&format!("{arch}.block_count"), u(s.n_layer));
    b.kv(&format!("{arch}.context_length"), u(s.n_ctx));
    b.kv(&format!("{arch}.embedding_length"), u(s.n_embd));
    b.kv(&format!("{arch}.feed_forward_length"), u(s.n_ff));
    b.kv(&format!("{arch}.attention.head_count"), u(s.n_head));
    b.kv(&format!("{arch}.attention.head_count_kv"), u(s.n_head_kv));
    b.kv(&format!("{arch}.attention.key_length"), u(s.head_dim));
    b.kv(&format!("{arch}.attention.value_length"), u(s.head_dim));
    b.kv(&format!("{arch}.rope.dimension_count"), u(s.head_dim));
    b.kv(
        &format!("{arch}.attention.layer_norm_rms_epsilon"),
        Value::F32(1e-6),
    );
    b.kv(&format!("{arch}.rope.freq_base"), Value::F32(10_000.0));
    let traits = s.arch.traits();
    if traits.swa_pattern.is_some() {
        b.kv(
            &format!("{arch}.attention.sliding_window"),
            u(s.sliding_window),
        );
    }
    if s.n_expert > 0 {
        if s.n_expert_used == 0 || s.n_expert_used > s.n_expert {
            return Err(EngineError::Invalid(format!(
                "{} experts per token of {}: must be between 1 and the number of experts",
                s.n_expert_used, s.n_expert
            )));
        }
        // The down projection is quantized along the expert's hidden size.
        for ty in [s.weight_type, s.down_type] {
            let bs = ty.block_size();
            if !s.n_ff_exp.is_multiple_of(bs) {
                return Err(EngineError::Invalid(format!(
                    "expert hidden size {} is not a multiple of {ty}'s block size {bs}",
                    s.n_ff_exp
                )));
            }
        }
        b.kv(&format!("{arch}.expert_count"), u(s.n_expert));
        b.kv(&format!("{arch}.expert_used_count"), u(s.n_expert_used));
        b.kv(&format!("{arch}.expert_feed_forward_length"), u(s.n_ff_exp));
        if let Some(sf) = s.n_ff_shexp {
            b.kv(&format!("{arch}.expert_shared_feed_forward_length"), u(sf));
        }
    }

    let (e, q, kv, ff) = (
        s.n_embd,
        s.n_head * s.head_dim,
        s.n_head_kv * s.head_dim,
        s.n_ff,
    );
    // Scaled by fan-in so activations stay in a realistic range through many layers.
    let m = |name: String, ty, cols: usize, rows, scale: Option<f32>| Plan {
        name,
        ty,
        cols,
        rows,
        stack: 1,
        fill: Fill::Matrix {
            scale: scale.unwrap_or(1.0 / (cols as f32).sqrt()),
        },
    };
    let mut plans = vec![m(
        names::TOKEN_EMBD.into(),
        s.embd_type,
        e,
        n_vocab,
        Some(1.0),
    )];
    for il in 0..s.n_layer {
        let n = |t: LayerTensor| t.gguf_name(il);
        let (wt, dt) = (s.weight_type, s.down_type);
        plans.extend([
            m(n(LayerTensor::Q), wt, e, q, None),
            m(n(LayerTensor::K), wt, e, kv, None),
            m(n(LayerTensor::V), dt, e, kv, None),
            m(n(LayerTensor::Output), wt, q, e, None),
        ]);
        if s.n_expert == 0 {
            plans.extend([
                m(n(LayerTensor::Gate), wt, e, ff, None),
                m(n(LayerTensor::Up), wt, e, ff, None),
                m(n(LayerTensor::Down), dt, ff, e, None),
            ]);
        } else {
            let x = |t, ty, cols: usize, rows| Plan {
                stack: s.n_expert,
                ..m(n(t), ty, cols, rows, None)
            };
            plans.extend([
                // The router in f32, as converters write it; scaled up so routing is decisive.
                m(
                    n(LayerTensor::GateInp),
                    GgmlType::F32,
                    e,
                    s.n_expert,
                    Some(4.0 / (e as f32).sqrt()),
                ),
                x(LayerTensor::GateExps, wt, e, s.n_ff_exp),
                x(LayerTensor::UpExps, wt, e, s.n_ff_exp),
                x(LayerTensor::DownExps, dt, s.n_ff_exp, e),
            ]);
            if let Some(sf) = s.n_ff_shexp {
                plans.extend([
                    m(n(LayerTensor::GateShexp), wt, e, sf, None),
                    m(n(LayerTensor::UpShexp), wt, e, sf, None),
                    m(n(LayerTensor::DownShexp), dt, sf, e, None),
                ]);
                plans.push(Plan {
                    name: n(LayerTensor::GateInpShexp),
                    ty: GgmlType::F32,
                    cols: e,
                    rows: 1,
                    stack: 1,
                    fill: Fill::Vector { base: 0.0 },
                });
            }
        }
        for (t, len) in vectors(s.arch, &traits, e, q, kv, s.head_dim) {
            let base = if t.gguf_suffix().ends_with("bias") {
                0.0
            } else {
                1.0
            };
            plans.push(Plan {
                name: n(t),
                ty: GgmlType::F32,
                cols: len,
                rows: 1,
                stack: 1,
                fill: Fill::Vector { base },
            });
        }
    }
    plans.push(Plan {
        name: names::OUTPUT_NORM.into(),
        ty: GgmlType::F32,
        cols: e,
        rows: 1,
        stack: 1,
        fill: Fill::Vector { base: 1.0 },
    });
    plans.push(m(names::OUTPUT.into(), s.down_type, e, n_vocab, None));
    for p in &plans {
        let dims: Vec<u64> = match p.fill {
            Fill::Vector { .. } => vec![p.cols as u64],
            Fill::Matrix { .. } if p.stack > 1 => {
                vec![p.cols as u64, p.rows as u64, p.stack as u64]
            }
            Fill::Matrix { .. } => vec![p.cols as u64, p.rows as u64],
        };
        b.tensor_deferred(&p.name, &dims, p.ty).ok_or_else(|| {
            EngineError::Invalid(format!("tensor '{}' has an impossible size", p.name))
        })?;
    }
    Ok((b, plans))
}

fn produce(
    plan: &Plan,
    random_blocks: bool,
    rng: &mut SplitMix64,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let rb = plan.ty.row_bytes(plan.cols);
    let mut row = vec![0f32; plan.cols];
    let mut bytes = vec![0u8; rb];
    for _ in 0..plan.rows * plan.stack {
        match plan.fill {
            Fill::Vector { base } => row.iter_mut().for_each(|v| *v = base + 0.1 * rng.uniform()),
            Fill::Matrix { scale } => {
                if random_blocks && random_row(plan.ty, scale, rng, &mut bytes) {
                    out.write_all(&bytes)?;
                    continue;
                }
                row.iter_mut().for_each(|v| *v = scale * rng.uniform());
            }
        }
        quantize_row(plan.ty, &row, &mut bytes).map_err(std::io::Error::other)?;
        out.write_all(&bytes)?;
    }
    Ok(())
}

/// Fills a row of `ty` blocks with random quants and scales chosen so the weights are about
/// ±`scale`; false for types without a fast path.
fn random_row(ty: GgmlType, scale: f32, rng: &mut SplitMix64, row: &mut [u8]) -> bool {
    // (offset of the f16 d, offset of the f16 dmin if any, d for weights of about ±scale)
    let (d_at, dmin_at, d) = match ty {
        GgmlType::Q4K => (0, Some(2), scale / 256.0),
        GgmlType::Q6K => (208, None, scale / 1024.0),
        GgmlType::Q8_0 => (0, None, scale / 64.0),
        _ => return false,
    };
    for chunk in row.chunks_mut(8) {
        let r = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&r[..chunk.len()]);
    }
    let d = f16::from_f32(d).to_le_bytes();
    for block in row.chunks_exact_mut(ty.type_size()) {
        block[d_at..d_at + 2].copy_from_slice(&d);
        if let Some(m) = dmin_at {
            block[m..m + 2].copy_from_slice(&d);
        }
    }
    true
}

/// llama.cpp's `general.file_type` for a file whose main weights are `ty`.
fn file_type(ty: GgmlType) -> u32 {
    match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q8_0 => 7,
        GgmlType::Q5_0 => 8,
        GgmlType::Q5_1 => 9,
        GgmlType::Q2K => 10,
        GgmlType::Q3K => 12,
        GgmlType::Q4K => 15,
        GgmlType::Q5K => 17,
        GgmlType::Q6K => 18,
        GgmlType::Bf16 => 32,
        _ => 0,
    }
}

/// The one-dimensional tensors each layer of `arch` has.
fn vectors(
    arch: Arch,
    traits: &ArchTraits,
    e: usize,
    q: usize,
    kv: usize,
    hd: usize,
) -> Vec<(LayerTensor, usize)> {
    let mut v = vec![(LayerTensor::AttnNorm, e), (LayerTensor::FfnNorm, e)];
    if traits.qkv_bias {
        v.extend([
            (LayerTensor::QBias, q),
            (LayerTensor::KBias, kv),
            (LayerTensor::VBias, kv),
        ]);
    }
    if traits.qk_norm && arch == Arch::Olmoe {
        v.extend([(LayerTensor::QNorm, q), (LayerTensor::KNorm, kv)]);
    } else if traits.qk_norm {
        v.extend([(LayerTensor::QNorm, hd), (LayerTensor::KNorm, hd)]);
    }
    if traits.post_norms {
        v.extend([
            (LayerTensor::PostAttnNorm, e),
            (LayerTensor::PostFfnNorm, e),
        ]);
    }
    v
}

fn add_vocab(b: &mut GgufBuilder, vocab: Vocab<'_>) -> Result<usize, EngineError> {
    match vocab {
        Vocab::Bytes => {
            let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
            tokens.extend((0..=255u8).map(|c| format!("<0x{c:02X}>")));
            let mut types = vec![2i32, 3, 3];
            types.extend(std::iter::repeat_n(6i32, 256));
            let n = tokens.len();
            b.kv("tokenizer.ggml.model", Value::String("llama".into()));
            b.kv(
                "tokenizer.ggml.tokens",
                Value::Array(ArrayValue::String(tokens)),
            );
            b.kv(
                "tokenizer.ggml.scores",
                Value::Array(ArrayValue::F32(vec![0.0; n])),
            );
            b.kv(
                "tokenizer.ggml.token_type",
                Value::Array(ArrayValue::I32(types)),
            );
            b.kv("tokenizer.ggml.unknown_token_id", Value::U32(0));
            b.kv("tokenizer.ggml.bos_token_id", Value::U32(1));
            b.kv("tokenizer.ggml.eos_token_id", Value::U32(2));
            b.kv("tokenizer.ggml.add_bos_token", Value::Bool(true));
            b.kv("tokenizer.ggml.add_space_prefix", Value::Bool(false));
            Ok(n)
        }
        Vocab::From(md) => {
            let mut n = None;
            for (k, v) in md.iter().filter(|(k, _)| k.starts_with("tokenizer.")) {
                if k == "tokenizer.ggml.tokens" {
                    n = Some(match v {
                        Value::Array(a) => a.len(),
                        _ => 0,
                    });
                }
                b.kv(k, v.clone());
            }
            n.filter(|&n| n > 0).ok_or_else(|| {
                EngineError::MissingKey("tokenizer.ggml.tokens (in the vocabulary source)".into())
            })
        }
    }
}

/// The uniform draw the weights are made of, on the sampler's SplitMix64.
impl SplitMix64 {
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}
