//! The GPU executor's weight preparation: the matrices the planner keeps in VRAM uploaded once
//! at load, the norm and bias vectors of every layer with a phase on the GPU (as f32), and the
//! matrices streamed to the GPU each step (from RAM, or from SSD through storage's streaming)
//! into staging buffers on the device.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use strata_kernels::ops::matmul::{At, Weight, matmul, matmul_scratch_bytes};
use strata_kernels::{Device, DeviceBuffer, KernelError, Stream};
use strata_storage::residency::{TensorId, Weights};

use crate::error::EngineError;
use crate::model::{Ffn, Layer, Mat};

pub(crate) fn gpu_err(e: KernelError) -> EngineError {
    EngineError::Gpu(e.to_string())
}

/// One layer's vectors on the device.
pub(crate) struct LayerVecs {
    pub attn_norm: DeviceBuffer,
    pub ffn_norm: DeviceBuffer,
    pub q_bias: Option<DeviceBuffer>,
    pub k_bias: Option<DeviceBuffer>,
    pub v_bias: Option<DeviceBuffer>,
    pub q_norm: Option<DeviceBuffer>,
    pub k_norm: Option<DeviceBuffer>,
    pub post_attn_norm: Option<DeviceBuffer>,
    pub post_ffn_norm: Option<DeviceBuffer>,
    /// qwen2moe's shared-expert gate weights.
    pub shexp_gate: Option<DeviceBuffer>,
}

/// What the GPU has moved and waited for, for `run --verbose`, `/api/ps` and `/metrics`.
#[derive(Default)]
pub(crate) struct GpuCounters {
    /// Weight bytes copied host → device each step (streamed matrices and experts).
    pub streamed_bytes: AtomicU64,
    /// Of those, the bytes copied straight from storage's page-locked buffers (no staging
    /// copy on the CPU).
    pub streamed_direct_bytes: AtomicU64,
    /// Activation bytes crossing between the devices.
    pub crossing_bytes: AtomicU64,
    /// Time the host waited for those copies to be queued and done, µs.
    pub wait_us: AtomicU64,
    /// Decode steps run as a CUDA graph, and how many of those instantiated one (the rest
    /// updated the previous one in place).
    pub graph_steps: AtomicU64,
    pub graph_instantiations: AtomicU64,
}

pub(crate) struct GpuWeights {
    pub dev: Device,
    /// The compute stream: every kernel, and the copies that must be ordered with them.
    pub stream: Arc<Stream>,
    resident: HashMap<TensorId, DeviceBuffer>,
    /// Bytes uploaded at load (weights resident in VRAM and the vectors).
    pub resident_bytes: u64,
    pub layers: Vec<Option<LayerVecs>>,
    pub output_norm: DeviceBuffer,
    /// The matrices streamed to the device each step, through two buffers on a copy stream.
    ring: Mutex<super::stream::Ring>,
    pub counters: GpuCounters,
    /// Which layers keep their KV pages in VRAM, and at most how many bytes of them per
    /// context.
    pub kv_layers: Vec<bool>,
    pub kv_vram_budget: Option<usize>,
    /// Per layer: the VRAM expert cache of a MoE layer whose FFN runs on the GPU.
    pub moe: Vec<Option<super::moe::MoeGpu>>,
    /// Whether decode steps may run as CUDA graphs (`STRATA_GPU_GRAPHS=0` says no), and
    /// whether this model's can (found at the first step).
    graphs: bool,
    graphable: OnceLock<bool>,
}

fn upload_f32(s: &Stream, v: &[f32]) -> Result<DeviceBuffer, EngineError> {
    let d = s.device().alloc(v.len() * 4).map_err(gpu_err)?;
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    s.upload(&d, 0, &bytes).map_err(gpu_err)?;
    Ok(d)
}

fn upload_opt(s: &Stream, v: &Option<Vec<f32>>) -> Result<Option<DeviceBuffer>, EngineError> {
    v.as_ref().map(|v| upload_f32(s, v)).transpose()
}

impl GpuWeights {
    /// Uploads the tensors in `resident` and the vectors of the layers marked in `gpu_layers`;
    /// `streams_weights`: some matrices are copied to the GPU each step (the ring then
    /// page-locks the weights' host buffers).
    // The placement's parts, each from its own place in `placing`; a struct would only
    // rename them.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn prepare(
        dev: Device,
        weights: &Weights,
        layers: &[Layer],
        output_norm: &[f32],
        resident: &[TensorId],
        gpu_layers: &[bool],
        kv_layers: Vec<bool>,
        kv_vram_budget: Option<usize>,
        experts: &[Option<(usize, usize)>],
        streams_weights: bool,
        graphs: bool,
    ) -> Result<GpuWeights, EngineError> {
        let stream = Arc::new(dev.stream().map_err(gpu_err)?);
        let s = &*stream;
        let mut map = HashMap::new();
        let mut bytes = 0u64;
        for &id in resident {
            if map.contains_key(&id) {
                continue;
            }
            let h = weights.acquire(id)?;
            let data = h.bytes();
            let d = dev.alloc(data.len()).map_err(gpu_err)?;
            s.upload(&d, 0, data).map_err(gpu_err)?;
            bytes += data.len() as u64;
            map.insert(id, d);
        }
        let mut vecs = Vec::with_capacity(layers.len());
        for (l, &on) in layers.iter().zip(gpu_layers) {
            if !on {
                vecs.push(None);
                continue;
            }
            let shexp_gate = match &l.ffn {
                Ffn::Moe(m) => m
                    .shared
                    .as_ref()
                    .map(|(_, _, _, g)| upload_f32(s, g))
                    .transpose()?,
                Ffn::Dense { .. } => None,
            };
            let v = LayerVecs {
                attn_norm: upload_f32(s, &l.attn_norm)?,
                ffn_norm: upload_f32(s, &l.ffn_norm)?,
                q_bias: upload_opt(s, &l.q_bias)?,
                k_bias: upload_opt(s, &l.k_bias)?,
                v_bias: upload_opt(s, &l.v_bias)?,
                q_norm: upload_opt(s, &l.q_norm)?,
                k_norm: upload_opt(s, &l.k_norm)?,
                post_attn_norm: upload_opt(s, &l.post_attn_norm)?,
                post_ffn_norm: upload_opt(s, &l.post_ffn_norm)?,
                shexp_gate,
            };
            vecs.push(Some(v));
        }
        let output_norm = upload_f32(s, output_norm)?;
        let mut moe = Vec::with_capacity(layers.len());
        for (l, x) in layers.iter().zip(experts) {
            moe.push(match (&l.ffn, x) {
                (Ffn::Moe(m), Some((slots, min_tokens))) => {
                    Some(super::moe::MoeGpu::new(s, weights, m, *slots, *min_tokens)?)
                }
                _ => None,
            });
        }
        bytes += moe
            .iter()
            .flatten()
            .map(super::moe::MoeGpu::bytes)
            .sum::<u64>();
        s.synchronize().map_err(gpu_err)?;
        let ring = super::stream::Ring::new(&dev, weights, streams_weights)?;
        if streams_weights {
            tracing::info!(
                direct = ring.direct(),
                "weights streamed to the GPU (direct: copied from storage's page-locked buffers)"
            );
        }
        let ring = Mutex::new(ring);
        Ok(GpuWeights {
            dev,
            stream,
            resident: map,
            resident_bytes: bytes,
            layers: vecs,
            output_norm,
            ring,
            counters: GpuCounters::default(),
            kv_layers,
            kv_vram_budget,
            moe,
            graphs,
            graphable: OnceLock::new(),
        })
    }

    /// Whether `model`'s decode step can be a CUDA graph: graphs are on, and every layer is
    /// dense with its phases, matrices and KV pages on the GPU, the output in VRAM — nothing
    /// the step reads lies in host memory, and nothing makes the host wait mid-step (MoE
    /// routing does).
    pub(crate) fn graphable(&self, model: &crate::model::Model) -> bool {
        *self.graphable.get_or_init(|| {
            let dense = |l: &Layer| match &l.ffn {
                Ffn::Dense { gate, up, down } => [*gate, *up, *down]
                    .iter()
                    .all(|m| self.resident.contains_key(&m.id)),
                Ffn::Moe(_) => false,
            };
            self.graphs
                && self.layers.iter().all(Option::is_some)
                && self.kv_layers.iter().all(|&k| k)
                && model.layers.iter().all(|l| {
                    dense(l)
                        && [l.q, l.k, l.v, l.o]
                            .iter()
                            .all(|m| self.resident.contains_key(&m.id))
                })
                && self.resident.contains_key(&model.output.id)
        })
    }

    /// A resident tensor's device buffer.
    pub(crate) fn resident(&self, id: TensorId) -> Option<&DeviceBuffer> {
        self.resident.get(&id)
    }

    /// `y = m · x` for `n` rows: from VRAM when the matrix is resident there, else copied to
    /// the device first (part by part for a matrix storage streams in row ranges).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn matmul(
        &self,
        weights: &Weights,
        m: Mat,
        x: At<'_>,
        n: usize,
        y: At<'_>,
        scratch: At<'_>,
        tmp: &mut super::Grow,
    ) -> Result<(), EngineError> {
        let s = &*self.stream;
        if let Some(d) = self.resident.get(&m.id) {
            let w = Weight {
                ptr: d.ptr(),
                ty: m.ty,
                rows: m.rows,
                cols: m.cols,
            };
            return matmul(s, &w, x, n, y, scratch).map_err(gpu_err);
        }
        let parts = weights.parts(m.id)?;
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        for part in 0..parts {
            let (ptr, rows, slot) = ring.get(s, (m.id, part), weights, &self.counters)?;
            let (r0, r1) = if parts == 1 {
                (0, m.rows)
            } else {
                (rows.start as usize, rows.end as usize)
            };
            let w = Weight {
                ptr,
                ty: m.ty,
                rows: r1 - r0,
                cols: m.cols,
            };
            if parts == 1 {
                matmul(s, &w, x, n, y, scratch).map_err(gpu_err)?;
            } else if n == 1 {
                matmul(s, &w, x, 1, y.skip(r0 * 4), scratch).map_err(gpu_err)?;
            } else {
                // Each token's rows of this part go to its row of y.
                let tmp = tmp.get(s, n * (r1 - r0) * 4)?;
                matmul(s, &w, x, n, At::from(tmp), scratch).map_err(gpu_err)?;
                let per = (r1 - r0) * 4;
                for t in 0..n {
                    s.copy(y.buf, y.offset + (t * m.rows + r0) * 4, tmp, t * per, per)
                        .map_err(gpu_err)?;
                }
            }
            ring.used(s, slot, weights, &self.counters)?;
        }
        Ok(())
    }

    /// Scratch bytes a product of `n` rows through `m` needs.
    pub(crate) fn scratch_bytes(m: Mat, n: usize) -> usize {
        matmul_scratch_bytes(m.ty, m.cols, n)
    }
}
