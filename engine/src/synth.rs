//! Synthetic models: writes GGUF models of any supported architecture with deterministic random weights, for
//! tests and for files larger than any model at hand.
//!
//! The tensor list comes from the same name table and [`ArchTraits`] the loader uses, so a
//! generated file exercises exactly the code paths a real one of that architecture does.

use strata_storage::gguf::{ArrayValue, GgufBuilder, Metadata, Value};
use strata_storage::quant::{GgmlType, quantize_row};

use crate::error::EngineError;
use crate::model::names::{self, LayerTensor};
use crate::model::{Arch, ArchTraits};

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
    /// Type of the big matrices; norms and biases are F32.
    pub weight_type: GgmlType,
    /// Sliding window (architectures with sliding-window layers only).
    pub sliding_window: usize,
    pub seed: u64,
}

impl GenSpec {
    /// A model of a few MB: every block present, dims that suit every block size.
    pub fn tiny(arch: Arch) -> Self {
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
            sliding_window: 4,
            seed: 1,
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

/// Builds the whole file in memory (fine for test-sized models).
pub fn build(spec: &GenSpec, vocab: Vocab<'_>) -> Result<GgufBuilder, EngineError> {
    let s = spec;
    let bs = s.weight_type.block_size();
    for (what, d) in [
        ("n_embd", s.n_embd),
        ("n_ff", s.n_ff),
        ("q dim", s.n_head * s.head_dim),
    ] {
        if d % bs != 0 {
            return Err(EngineError::Invalid(format!(
                "{what} = {d} is not a multiple of {}'s block size {bs}",
                s.weight_type
            )));
        }
    }
    if s.n_head_kv == 0 || s.n_head % s.n_head_kv != 0 {
        return Err(EngineError::Invalid(
            "heads must be a multiple of KV heads".into(),
        ));
    }
    let mut b = GgufBuilder::new();
    let arch = s.arch.name();
    let n_vocab = add_vocab(&mut b, vocab)?;
    let u = |v: usize| Value::U32(v as u32);
    b.kv("general.architecture", Value::String(arch.into()));
    b.kv("general.name", Value::String(format!("strata-gen {arch}")));
    b.kv(&format!("{arch}.block_count"), u(s.n_layer));
    b.kv(&format!("{arch}.context_length"), u(s.n_ctx));
    b.kv(&format!("{arch}.embedding_length"), u(s.n_embd));
    b.kv(&format!("{arch}.feed_forward_length"), u(s.n_ff));
    b.kv(&format!("{arch}.attention.head_count"), u(s.n_head));
    b.kv(&format!("{arch}.attention.head_count_kv"), u(s.n_head_kv));
    b.kv(&format!("{arch}.attention.key_length"), u(s.head_dim));
    b.kv(&format!("{arch}.attention.value_length"), u(s.head_dim));
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

    let mut rng = Rng(s.seed);
    let (e, q, kv, ff) = (
        s.n_embd,
        s.n_head * s.head_dim,
        s.n_head_kv * s.head_dim,
        s.n_ff,
    );
    let ty = s.weight_type;
    let mat = |b: &mut GgufBuilder, name: &str, cols, rows, scale, rng: &mut Rng| {
        random_matrix(b, name, ty, cols, rows, scale, rng)
    };
    // Scaled so activations stay in a realistic range through many layers.
    let w_scale = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
    mat(&mut b, names::TOKEN_EMBD, e, n_vocab, 1.0, &mut rng)?;
    for il in 0..s.n_layer {
        let n = |t: LayerTensor| t.gguf_name(il);
        mat(&mut b, &n(LayerTensor::Q), e, q, w_scale(e), &mut rng)?;
        mat(&mut b, &n(LayerTensor::K), e, kv, w_scale(e), &mut rng)?;
        mat(&mut b, &n(LayerTensor::V), e, kv, w_scale(e), &mut rng)?;
        mat(&mut b, &n(LayerTensor::Output), q, e, w_scale(q), &mut rng)?;
        mat(&mut b, &n(LayerTensor::Gate), e, ff, w_scale(e), &mut rng)?;
        mat(&mut b, &n(LayerTensor::Up), e, ff, w_scale(e), &mut rng)?;
        mat(&mut b, &n(LayerTensor::Down), ff, e, w_scale(ff), &mut rng)?;
        for (t, len) in vectors(s.arch, &traits, e, q, kv, s.head_dim) {
            let base = if t.gguf_suffix().ends_with("bias") {
                0.0
            } else {
                1.0
            };
            let v: Vec<f32> = (0..len).map(|_| base + 0.1 * rng.uniform()).collect();
            b.tensor(&n(t), &[len as u64], GgmlType::F32, f32_bytes(&v));
        }
    }
    let norm: Vec<f32> = (0..e).map(|_| 1.0 + 0.1 * rng.uniform()).collect();
    b.tensor(
        names::OUTPUT_NORM,
        &[e as u64],
        GgmlType::F32,
        f32_bytes(&norm),
    );
    mat(&mut b, names::OUTPUT, e, n_vocab, w_scale(e), &mut rng)?;
    Ok(b)
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
    if arch == Arch::Qwen2 {
        v.extend([
            (LayerTensor::QBias, q),
            (LayerTensor::KBias, kv),
            (LayerTensor::VBias, kv),
        ]);
    }
    if traits.qk_norm {
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

/// A `rows × cols` matrix of uniform values in ±`scale`, quantized to `ty`.
fn random_matrix(
    b: &mut GgufBuilder,
    name: &str,
    ty: GgmlType,
    cols: usize,
    rows: usize,
    scale: f32,
    rng: &mut Rng,
) -> Result<(), EngineError> {
    let rb = ty.row_bytes(cols);
    let mut data = vec![0u8; rb * rows];
    let mut row = vec![0f32; cols];
    for chunk in data.chunks_exact_mut(rb) {
        row.iter_mut().for_each(|v| *v = rng.uniform() * scale);
        quantize_row(ty, &row, chunk).map_err(|err| EngineError::Invalid(err.to_string()))?;
    }
    b.tensor(name, &[cols as u64, rows as u64], ty, data);
    Ok(())
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// SplitMix64: deterministic, seedable, fast.
struct Rng(u64);

impl Rng {
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}
