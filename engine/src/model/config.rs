//! Hyperparameters parsed once from GGUF metadata, and what distinguishes each architecture —
//! written as data over the shared blocks rather than as code per model.

use strata_simd::ops::RopeKind;
use strata_storage::gguf::Metadata;

use crate::error::EngineError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Also Mixtral: llama with `expert_count` set.
    Llama,
    Qwen2,
    Qwen3,
    Gemma3,
    Qwen2Moe,
    Qwen3Moe,
    Olmoe,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU: silu(gate) * up.
    Silu,
    /// GeGLU with the tanh approximation.
    GeluTanh,
}

/// How an architecture composes the shared blocks.
#[derive(Clone, Copy, Debug)]
pub struct ArchTraits {
    pub rope: RopeKind,
    pub act: Activation,
    /// RMSNorm on each head of Q and K before RoPE.
    pub qk_norm: bool,
    /// RMSNorm on the attention and FFN outputs before the residual add.
    pub post_norms: bool,
    /// Token embeddings multiplied by sqrt(n_embd).
    pub embed_scale: bool,
    /// Every `n`-th layer is global, the others use the sliding window.
    pub swa_pattern: Option<usize>,
    /// RoPE base of sliding-window layers, when it differs from the global one.
    pub swa_rope_base: Option<f32>,
    /// Q, K and V projections carry biases.
    pub qkv_bias: bool,
    /// Mixture-of-experts models: renormalise the chosen experts' weights to sum to 1.
    pub moe_norm_topk: bool,
}

impl Arch {
    pub fn from_name(name: &str) -> Result<Self, EngineError> {
        Ok(match name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "gemma3" => Arch::Gemma3,
            "qwen2moe" => Arch::Qwen2Moe,
            "qwen3moe" => Arch::Qwen3Moe,
            "olmoe" => Arch::Olmoe,
            other => {
                // A hostile header may put anything here: quote a short, escaped prefix.
                let shown = strata_storage::text::clip(other, strata_storage::text::QUOTE_CHARS);
                return Err(EngineError::UnknownArch(shown.into_owned()));
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3",
            Arch::Qwen2Moe => "qwen2moe",
            Arch::Qwen3Moe => "qwen3moe",
            Arch::Olmoe => "olmoe",
        }
    }

    pub fn traits(self) -> ArchTraits {
        let base = ArchTraits {
            rope: RopeKind::Neox,
            act: Activation::Silu,
            qk_norm: false,
            post_norms: false,
            embed_scale: false,
            swa_pattern: None,
            swa_rope_base: None,
            qkv_bias: false,
            moe_norm_topk: false,
        };
        match self {
            // Mixtral's router keeps the softmax over the chosen experts: renormalised.
            Arch::Llama => ArchTraits {
                rope: RopeKind::Norm,
                moe_norm_topk: true,
                ..base
            },
            Arch::Qwen2 | Arch::Qwen2Moe => ArchTraits {
                qkv_bias: true,
                ..base
            },
            Arch::Qwen3 => ArchTraits {
                qk_norm: true,
                ..base
            },
            Arch::Qwen3Moe => ArchTraits {
                qk_norm: true,
                moe_norm_topk: true,
                ..base
            },
            // OLMoE normalises the whole Q and K vectors (not each head) before RoPE.
            Arch::Olmoe => ArchTraits {
                qk_norm: true,
                ..base
            },
            // Gemma 3: five sliding-window layers (RoPE base 10k) then one global layer.
            Arch::Gemma3 => ArchTraits {
                act: Activation::GeluTanh,
                qk_norm: true,
                post_norms: true,
                embed_scale: true,
                swa_pattern: Some(6),
                swa_rope_base: Some(10_000.0),
                ..base
            },
        }
    }
}

/// Everything the forward pass needs to know about the model's shape.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    pub traits: ArchTraits,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
    pub n_ctx_train: usize,
    pub rms_eps: f32,
    pub n_rot: usize,
    pub rope_base: f32,
    pub rope_freq_scale: f32,
    pub sliding_window: Option<usize>,
    /// Per layer: does it use the sliding window?
    pub swa_layers: Vec<bool>,
    pub attn_scale: f32,
    /// Mixture-of-experts FFN, when the model has one.
    pub moe: Option<MoeConfig>,
}

/// The expert FFN of a mixture-of-experts model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeConfig {
    pub n_expert: usize,
    /// Experts each token is routed to.
    pub n_expert_used: usize,
    /// Hidden size of one expert.
    pub n_ff_exp: usize,
    /// Hidden size of the shared expert (qwen2moe), which every token also goes through.
    pub n_ff_shexp: Option<usize>,
    pub norm_topk: bool,
}

/// Upper bounds that no real model exceeds; a file claiming more is malformed, and checking
/// here keeps a hostile header from sizing huge buffers.
const MAX_DIM: usize = 1 << 20;

impl ModelConfig {
    pub fn from_metadata(md: &Metadata, n_vocab: usize) -> Result<Self, EngineError> {
        let arch_name = md
            .get_str("general.architecture")?
            .ok_or_else(|| EngineError::MissingKey("general.architecture".into()))?;
        let arch = Arch::from_name(arch_name)?;
        let traits = arch.traits();
        let key = |k: &str| format!("{arch_name}.{k}");
        let req = |k: &str| -> Result<usize, EngineError> {
            let full = key(k);
            let v = md
                .get_u64(&full)?
                .ok_or(EngineError::MissingKey(full.clone()))?;
            bounded(&full, v)
        };
        let opt = |k: &str| -> Result<Option<usize>, EngineError> {
            let full = key(k);
            md.get_u64(&full)?.map(|v| bounded(&full, v)).transpose()
        };
        let optf = |k: &str| -> Result<Option<f32>, EngineError> { Ok(md.get_f32(&key(k))?) };

        let n_layer = req("block_count")?;
        let n_embd = req("embedding_length")?;
        let n_ff = req("feed_forward_length")?;
        let n_head = req("attention.head_count")?;
        let n_head_kv = opt("attention.head_count_kv")?.unwrap_or(n_head);
        if n_head == 0 || n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(EngineError::BadMetadata {
                key: key("attention.head_count_kv"),
                problem: format!("{n_head} heads cannot be grouped over {n_head_kv} KV heads"),
            });
        }
        let head_dim = opt("attention.key_length")?.unwrap_or(n_embd / n_head);
        let v_dim = opt("attention.value_length")?.unwrap_or(head_dim);
        if v_dim != head_dim {
            return Err(EngineError::BadMetadata {
                key: key("attention.value_length"),
                problem: format!("value length {v_dim} differs from key length {head_dim}"),
            });
        }
        let n_rot = opt("rope.dimension_count")?.unwrap_or(head_dim);
        if n_rot > head_dim || n_rot % 2 != 0 {
            return Err(EngineError::BadMetadata {
                key: key("rope.dimension_count"),
                problem: format!("{n_rot} rotated dims for heads of {head_dim}"),
            });
        }
        // A zero, negative or non-finite value here would make every logit NaN (or the RoPE
        // angles meaningless) without a word: refuse it by name instead.
        let positive = |k: &str, default: f32| -> Result<f32, EngineError> {
            match optf(k)? {
                None => Ok(default),
                Some(v) if v.is_finite() && v > 0.0 => Ok(v),
                Some(v) => Err(EngineError::BadMetadata {
                    key: key(k),
                    problem: format!("{v} is not a positive number"),
                }),
            }
        };
        let rms_eps = positive("attention.layer_norm_rms_epsilon", 1e-6)?;
        let rope_base = positive("rope.freq_base", 10_000.0)?;
        let rope_freq_scale = match md.get_str(&key("rope.scaling.type"))? {
            Some("linear") => 1.0 / positive("rope.scaling.factor", 1.0)?,
            _ => 1.0,
        };
        // Context lengths run past MAX_DIM (1M-token models exist); they only cap `-c`.
        let n_ctx_train = md
            .get_u64(&key("context_length"))?
            .map_or(4096, |v| v.clamp(1, 1 << 30) as usize);
        let sliding_window = opt("attention.sliding_window")?.filter(|&w| w > 0);
        let swa_layers = (0..n_layer)
            .map(|il| match (traits.swa_pattern, sliding_window) {
                (Some(p), Some(_)) => il % p < p - 1,
                _ => false,
            })
            .collect();
        let moe = match opt("expert_count")? {
            None | Some(1) if !matches!(arch, Arch::Qwen2Moe | Arch::Qwen3Moe | Arch::Olmoe) => {
                None
            }
            None => return Err(EngineError::MissingKey(key("expert_count"))),
            Some(n_expert) => {
                let n_expert_used = opt("expert_used_count")?.unwrap_or(2);
                if n_expert_used > n_expert || n_expert > 4096 {
                    return Err(EngineError::BadMetadata {
                        key: key("expert_used_count"),
                        problem: format!("{n_expert_used} of {n_expert} experts"),
                    });
                }
                Some(MoeConfig {
                    n_expert,
                    n_expert_used,
                    // Mixtral (llama) and OLMoE size experts with feed_forward_length.
                    n_ff_exp: match arch {
                        Arch::Llama | Arch::Olmoe => n_ff,
                        _ => opt("expert_feed_forward_length")?.unwrap_or(n_ff),
                    },
                    n_ff_shexp: opt("expert_shared_feed_forward_length")?,
                    norm_topk: traits.moe_norm_topk,
                })
            }
        };
        Ok(Self {
            moe,
            arch,
            traits,
            n_layer,
            n_embd,
            n_head,
            n_head_kv,
            head_dim,
            n_ff,
            n_vocab,
            n_ctx_train,
            rms_eps,
            n_rot,
            rope_base,
            rope_freq_scale,
            sliding_window,
            swa_layers,
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
        })
    }

    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
}

fn bounded(key: &str, v: u64) -> Result<usize, EngineError> {
    if v == 0 || v > MAX_DIM as u64 {
        return Err(EngineError::BadMetadata {
            key: key.to_string(),
            problem: format!("{v} is outside 1..={MAX_DIM}"),
        });
    }
    Ok(v as usize)
}
