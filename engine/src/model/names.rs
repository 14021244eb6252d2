//! GGUF tensor names mapped to the engine's roles, in one table.

/// A per-layer tensor's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayerTensor {
    AttnNorm,
    Q,
    K,
    V,
    QBias,
    KBias,
    VBias,
    QNorm,
    KNorm,
    Output,
    PostAttnNorm,
    FfnNorm,
    Gate,
    Up,
    Down,
    PostFfnNorm,
    /// The router of a mixture-of-experts layer: `[n_embd, n_expert]`.
    GateInp,
    /// The experts' matrices, stacked: `[cols, rows, n_expert]`.
    GateExps,
    UpExps,
    DownExps,
    /// qwen2moe's shared expert and its sigmoid gate (`[n_embd]`).
    GateInpShexp,
    GateShexp,
    UpShexp,
    DownShexp,
}

impl LayerTensor {
    pub const ALL: [LayerTensor; 24] = [
        Self::AttnNorm,
        Self::Q,
        Self::K,
        Self::V,
        Self::QBias,
        Self::KBias,
        Self::VBias,
        Self::QNorm,
        Self::KNorm,
        Self::Output,
        Self::PostAttnNorm,
        Self::FfnNorm,
        Self::Gate,
        Self::Up,
        Self::Down,
        Self::PostFfnNorm,
        Self::GateInp,
        Self::GateExps,
        Self::UpExps,
        Self::DownExps,
        Self::GateInpShexp,
        Self::GateShexp,
        Self::UpShexp,
        Self::DownShexp,
    ];

    /// The name's suffix after `blk.N.`.
    pub const fn gguf_suffix(self) -> &'static str {
        match self {
            Self::AttnNorm => "attn_norm.weight",
            Self::Q => "attn_q.weight",
            Self::K => "attn_k.weight",
            Self::V => "attn_v.weight",
            Self::QBias => "attn_q.bias",
            Self::KBias => "attn_k.bias",
            Self::VBias => "attn_v.bias",
            Self::QNorm => "attn_q_norm.weight",
            Self::KNorm => "attn_k_norm.weight",
            Self::Output => "attn_output.weight",
            Self::PostAttnNorm => "post_attention_norm.weight",
            Self::FfnNorm => "ffn_norm.weight",
            Self::Gate => "ffn_gate.weight",
            Self::Up => "ffn_up.weight",
            Self::Down => "ffn_down.weight",
            Self::PostFfnNorm => "post_ffw_norm.weight",
            Self::GateInp => "ffn_gate_inp.weight",
            Self::GateExps => "ffn_gate_exps.weight",
            Self::UpExps => "ffn_up_exps.weight",
            Self::DownExps => "ffn_down_exps.weight",
            Self::GateInpShexp => "ffn_gate_inp_shexp.weight",
            Self::GateShexp => "ffn_gate_shexp.weight",
            Self::UpShexp => "ffn_up_shexp.weight",
            Self::DownShexp => "ffn_down_shexp.weight",
        }
    }

    pub fn gguf_name(self, layer: usize) -> String {
        format!("blk.{layer}.{}", self.gguf_suffix())
    }

    /// One-dimensional tensors (norm weights, biases) are decoded to f32 once at load.
    pub const fn is_vector(self) -> bool {
        !matches!(
            self,
            Self::Q
                | Self::K
                | Self::V
                | Self::Output
                | Self::Gate
                | Self::Up
                | Self::Down
                | Self::GateInp
                | Self::GateExps
                | Self::UpExps
                | Self::DownExps
                | Self::GateShexp
                | Self::UpShexp
                | Self::DownShexp
        )
    }
}

pub const TOKEN_EMBD: &str = "token_embd.weight";
pub const OUTPUT_NORM: &str = "output_norm.weight";
pub const OUTPUT: &str = "output.weight";
