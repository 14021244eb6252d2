//! GGUF tensor names mapped to the engine's roles, in one table; and what storage needs to
//! know of them (which layer a tensor belongs to, which hold stacked experts), handed to it as
//! data so that storage knows nothing about models.

use strata_storage::gguf::TensorInfo;
use strata_storage::residency::TensorUse;
use strata_storage::residency::overrides::{Target, TensorOverride};

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

/// The layer a tensor belongs to: `blk.N.…` → N.
pub fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// Whether a tensor holds a layer's experts stacked (`blk.N.ffn_{gate,up,down}_exps`).
pub fn is_experts(name: &str) -> bool {
    let suffix = name
        .strip_prefix("blk.")
        .and_then(|r| r.split_once('.'))
        .map(|(_, s)| s);
    let exps = [
        LayerTensor::GateExps,
        LayerTensor::UpExps,
        LayerTensor::DownExps,
    ];
    exps.iter().any(|t| Some(t.gguf_suffix()) == suffix)
}

/// How a model reads each of `tensors` in a step, for storage's planner: with its layer's
/// group, as stacked experts of its layer (only when there are several), read by rows (an
/// embedding table that is not also the output), or after the layers.
pub fn tensor_uses(tensors: &[TensorInfo]) -> Vec<TensorUse> {
    let tied = !tensors.iter().any(|t| t.name == OUTPUT);
    tensors
        .iter()
        .map(|t| match layer_of(&t.name) {
            Some(l) if is_experts(&t.name) && t.dims.get(2).is_some_and(|&n| n > 1) => {
                TensorUse::Experts(l)
            }
            Some(l) => TensorUse::Layer(l),
            None if t.name == TOKEN_EMBD && !tied => TensorUse::Rows,
            None => TensorUse::Other,
        })
        .collect()
}

/// llama.cpp's `--cpu-moe` (`n_layers: None`: every layer) and `--n-cpu-moe N` (the first N
/// layers) as a placement rule: the expert tensors of those layers on the CPU (llama.cpp's
/// pattern, which also matches the fused and chunked expert names of other converters).
pub fn cpu_moe(n_layers: Option<usize>) -> TensorOverride {
    let pattern = match n_layers {
        None => r"\.ffn_(up|down|gate|gate_up)_(ch|)exps".to_owned(),
        Some(n) => format!(r"^blk\.({})\.ffn_(up|down|gate|gate_up)_(ch|)exps", {
            let layers: Vec<String> = (0..n).map(|i| i.to_string()).collect();
            if layers.is_empty() {
                "-".to_owned() // matches no layer
            } else {
                layers.join("|")
            }
        }),
    };
    TensorOverride {
        pattern: regex::Regex::new(&pattern).expect("a fixed pattern"),
        target: Target::Cpu,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_storage::residency::overrides::target_of;

    #[test]
    fn cpu_moe_matches_the_expert_tensors_of_the_layers_asked_for() {
        let all = [cpu_moe(None)];
        assert!(target_of(&all, "blk.47.ffn_down_exps.weight").is_some());
        assert!(target_of(&all, "blk.0.ffn_gate_up_exps.weight").is_some());
        assert!(target_of(&all, "blk.0.ffn_down_shexp.weight").is_none());
        let first2 = [cpu_moe(Some(2))];
        assert!(target_of(&first2, "blk.1.ffn_up_exps.weight").is_some());
        assert!(target_of(&first2, "blk.12.ffn_up_exps.weight").is_none());
        assert!(target_of(&[cpu_moe(Some(0))], "blk.0.ffn_up_exps.weight").is_none());
        // As many layers as the flag accepts still make a valid rule.
        assert!(target_of(&[cpu_moe(Some(4096))], "blk.4095.ffn_up_exps.weight").is_some());
    }

    #[test]
    fn layers_experts_and_row_tables_are_told_apart_by_name() {
        assert_eq!(layer_of("blk.12.attn_q.weight"), Some(12));
        assert_eq!(layer_of("output.weight"), None);
        assert!(is_experts("blk.3.ffn_down_exps.weight"));
        assert!(!is_experts("blk.3.ffn_down_shexp.weight"));
        assert!(!is_experts("ffn_down_exps.weight"));
    }
}
