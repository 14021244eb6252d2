//! What the planner knows of a model: its matrices per layer and group with their types and
//! bytes, read from the tensor table (never from per-model arithmetic).

use strata_storage::gguf::GgufFile;
use strata_storage::quant::GgmlType;

use crate::error::EngineError;
use crate::model::ModelConfig;
use crate::model::names::{LayerTensor, OUTPUT, OUTPUT_NORM, TOKEN_EMBD};

/// One weight matrix (or one expert's slab of a stacked tensor).
#[derive(Clone, Debug, PartialEq)]
pub struct MatDesc {
    pub name: String,
    pub ty: GgmlType,
    pub rows: u64,
    pub cols: u64,
    pub bytes: u64,
}

/// A layer's stacked experts.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertsDesc {
    pub n_expert: usize,
    pub n_used: usize,
    /// One expert's gate, up and down slabs.
    pub slabs: Vec<MatDesc>,
}

impl ExpertsDesc {
    pub fn bytes_per_expert(&self) -> u64 {
        self.slabs.iter().map(|m| m.bytes).sum()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct LayerDesc {
    /// Q, K, V and the output projection.
    pub attn: Vec<MatDesc>,
    /// The dense FFN, or a MoE layer's router and shared expert.
    pub ffn: Vec<MatDesc>,
    pub experts: Option<ExpertsDesc>,
    /// Norm weights and biases (always resident, small).
    pub vector_bytes: u64,
    /// K and V values per position (the cache type sets bytes per value).
    pub kv_values_per_token: u64,
    /// Positions this layer's attention reads at most (a sliding window), or None for all.
    pub window: Option<u64>,
}

impl LayerDesc {
    pub fn attn_bytes(&self) -> u64 {
        self.attn.iter().map(|m| m.bytes).sum()
    }

    pub fn ffn_bytes(&self) -> u64 {
        self.ffn.iter().map(|m| m.bytes).sum()
    }

    pub fn expert_bytes(&self) -> u64 {
        self.experts
            .as_ref()
            .map_or(0, |x| x.bytes_per_expert() * x.n_expert as u64)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelDesc {
    pub name: String,
    pub arch: String,
    pub n_embd: u64,
    pub n_vocab: u64,
    pub layers: Vec<LayerDesc>,
    pub embedding: MatDesc,
    /// The output projection (the embedding table itself when tied).
    pub output: MatDesc,
    pub tied_output: bool,
    /// Output norm and anything else outside the layers.
    pub vector_bytes: u64,
}

impl ModelDesc {
    /// Every byte of weights.
    pub fn total_bytes(&self) -> u64 {
        self.layers
            .iter()
            .map(|l| l.attn_bytes() + l.ffn_bytes() + l.expert_bytes() + l.vector_bytes)
            .sum::<u64>()
            + self.embedding.bytes
            + if self.tied_output {
                0
            } else {
                self.output.bytes
            }
            + self.vector_bytes
    }

    /// Reads the description from a parsed header.
    pub fn from_gguf(name: &str, g: &GgufFile) -> Result<ModelDesc, EngineError> {
        let embd = g
            .tensor(TOKEN_EMBD)
            .ok_or_else(|| EngineError::Invalid(format!("{name}: no tensor `{TOKEN_EMBD}`")))?;
        let n_vocab = embd.n_rows();
        let cfg = ModelConfig::from_metadata(&g.metadata, n_vocab as usize)?;
        let mat = |n: &str| -> Option<MatDesc> {
            let t = g.tensor(n)?;
            Some(MatDesc {
                name: n.to_string(),
                ty: t.ty,
                rows: t.n_rows(),
                cols: t.dims.first().copied().unwrap_or(0),
                bytes: t.n_bytes,
            })
        };
        let embedding =
            mat(TOKEN_EMBD).ok_or_else(|| EngineError::Invalid("no embedding".into()))?;
        let (output, tied_output) = match mat(OUTPUT) {
            Some(o) => (o, false),
            None => (embedding.clone(), true),
        };
        let kv_values = (2 * cfg.kv_dim()) as u64;
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for il in 0..cfg.n_layer {
            let mut attn = Vec::new();
            let mut ffn = Vec::new();
            let mut vector_bytes = 0;
            let mut slabs = Vec::new();
            let mut n_expert = 0;
            for lt in LayerTensor::ALL {
                let n = lt.gguf_name(il);
                let Some(t) = g.tensor(&n) else { continue };
                if lt.is_vector() {
                    vector_bytes += t.n_bytes;
                    continue;
                }
                let m = mat(&n).ok_or_else(|| EngineError::Invalid(n.clone()))?;
                match lt {
                    LayerTensor::Q | LayerTensor::K | LayerTensor::V | LayerTensor::Output => {
                        attn.push(m)
                    }
                    LayerTensor::GateExps | LayerTensor::UpExps | LayerTensor::DownExps => {
                        let (count, slab) = t.slices();
                        n_expert = count as usize;
                        slabs.push(MatDesc {
                            rows: t.dims.get(1).copied().unwrap_or(0),
                            bytes: slab,
                            ..m
                        });
                    }
                    _ => ffn.push(m),
                }
            }
            let experts = (n_expert > 0).then(|| ExpertsDesc {
                n_expert,
                n_used: cfg.moe.map_or(1, |m| m.n_expert_used),
                slabs,
            });
            layers.push(LayerDesc {
                attn,
                ffn,
                experts,
                vector_bytes,
                kv_values_per_token: kv_values,
                window: cfg
                    .swa_layers
                    .get(il)
                    .copied()
                    .unwrap_or(false)
                    .then_some(cfg.sliding_window.map(|w| w as u64))
                    .flatten(),
            });
        }
        let vector_bytes = g.tensor(OUTPUT_NORM).map_or(0, |t| t.n_bytes);
        Ok(ModelDesc {
            name: name.to_string(),
            arch: cfg.arch.name().to_string(),
            n_embd: cfg.n_embd as u64,
            n_vocab,
            layers,
            embedding,
            output,
            tied_output,
            vector_bytes,
        })
    }
}
