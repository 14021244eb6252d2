//! The GPU executor: each phase of a layer as kernels of `strata-kernels` on the model's
//! device (a GPU through the driver, or the simulator), over activations kept in device memory
//! between phases, with weights from [`weights::GpuWeights`] (resident in VRAM, or copied
//! there each step) and, for attention, the KV pages of the context's VRAM tier.
//!
//! Everything is queued on the model's one compute stream, in order; the host waits only where
//! it must read a result (a crossing to the CPU, the logits).

mod graph;
mod stream;
pub(crate) mod weights;

use std::ops::Range;

use strata_kernels::ops::act::{Glu, Rows, add, add_bias, glu, residual_post_norm};
use strata_kernels::ops::attention::{AttnParams, DecodePlan, paged_decode, paged_prefill};
use strata_kernels::ops::dequant::get_rows;
use strata_kernels::ops::kv::{KvLayout, KvPageTables, KvType, kv_store};
use strata_kernels::ops::matmul::{At, Weight};
use strata_kernels::ops::norm::rms_norm;
use strata_kernels::ops::rope::{RopeKind, RopeParams, rope};
use strata_kernels::{DeviceBuffer, Stream};
use strata_storage::quant::GgmlType;

use super::{Act, Pass, Slot};
use crate::error::EngineError;
use crate::kv::{DeviceStaging, PAGE_TOKENS};
use crate::model::{Activation, Ffn, Model};
use weights::{GpuWeights, gpu_err};

/// `y = m · x` over the pass's rows, between two of the executor's buffers (fields named
/// directly, so that the borrows stay apart from `tmp`'s).
macro_rules! mm {
    ($e:ident, $p:expr, $n:expr, $m:expr, $x:ident -> $y:ident) => {
        gpu($p.model)?.matmul(
            &$p.model.weights,
            $m,
            At::from($e.$x.buf()?),
            $n,
            At::from($e.$y.buf()?),
            At::from($e.mm.buf()?),
            &mut $e.tmp,
        )
    };
}

// After the macro: the MoE module uses it.
pub(crate) mod moe;

/// A device buffer that grows to the largest size asked for and is then reused: a warm step
/// allocates nothing.
#[derive(Default)]
pub(crate) struct Grow(Option<DeviceBuffer>, Option<DeviceBuffer>);

impl Grow {
    /// At least `bytes`, on `s`'s device. A buffer that must grow is replaced only after `s`
    /// has run everything queued (which may still read or write the old one); while `s` is
    /// capturing a graph, whose earlier nodes may name the old buffer, the old one is kept
    /// aside (the second field) until the next growth outside a capture.
    pub(crate) fn get(&mut self, s: &Stream, bytes: usize) -> Result<&DeviceBuffer, EngineError> {
        let bytes = bytes.max(16);
        if self.0.as_ref().is_none_or(|b| b.len() < bytes) {
            if s.is_capturing() {
                if self.1.is_some() {
                    return Err(EngineError::Invalid(
                        "a GPU buffer grew twice in one captured step".into(),
                    ));
                }
                self.1 = self.0.take();
            } else {
                if self.0.is_some() || self.1.is_some() {
                    s.synchronize().map_err(gpu_err)?;
                }
                self.1 = None;
            }
            self.0 = None;
            // Room for a little growth, so that chunks of slowly rising size do not reallocate.
            self.0 = Some(
                s.device()
                    .alloc(bytes.next_multiple_of(4096))
                    .map_err(gpu_err)?,
            );
        }
        Ok(self.0.as_ref().expect("allocated above"))
    }

    fn buf(&self) -> Result<&DeviceBuffer, EngineError> {
        self.0
            .as_ref()
            .ok_or_else(|| EngineError::Invalid("a GPU buffer used before the pass began".into()))
    }
}

/// The GPU's activations and scratch for a pass, one row per token of the batch.
#[derive(Default)]
pub(crate) struct GpuExec {
    x: Grow,
    xb: Grow,
    q: Grow,
    k: Grow,
    v: Grow,
    att: Grow,
    g: Grow,
    u: Grow,
    logits: Grow,
    mm: Grow,
    tmp: Grow,
    /// Each row's position (RoPE), and its position in the batch's concatenated page tables
    /// (the KV writer), i32.
    pos: Grow,
    vpos: Grow,
    ids: Grow,
    /// Paged attention: page tables, per-sequence (first page, length), decode scratch.
    ktab: Grow,
    vtab: Grow,
    seqs: Grow,
    attn_scratch: Grow,
    staging: DeviceStaging,
    /// Mixture of experts: router logits, routing (ids, weights), the slots' cache ids, the
    /// experts' gate/up and outputs per (token, slot), `matmul_id`'s scratch, the shared
    /// expert's buffers, and the host side of a partly cached layer.
    rl: Grow,
    wts: Grow,
    sids: Grow,
    eg: Grow,
    eu: Grow,
    ey: Grow,
    mm_id: Grow,
    sg: Grow,
    su: Grow,
    sy: Grow,
    moe_host: moe::MoeHost,
    /// Host-side lists, reused.
    host_k: Vec<u64>,
    host_v: Vec<u64>,
    host_kall: Vec<u64>,
    host_vall: Vec<u64>,
    host_i32: Vec<i32>,
    host_seqs: Vec<i32>,
    host_f32: Vec<f32>,
    /// Whether this pass's positions are on the device yet.
    positions_ready: bool,
    /// The decode step captured as a CUDA graph, and its page-locked uploads.
    graph: graph::StepGraph,
}

fn gpu(m: &Model) -> Result<&GpuWeights, EngineError> {
    m.gpu
        .as_ref()
        .ok_or_else(|| EngineError::Invalid("a GPU phase on a model loaded without a GPU".into()))
}

/// Plain numbers: every byte initialised, every bit pattern a value.
pub(super) trait Plain: Copy {}
impl Plain for i32 {}
impl Plain for u64 {}
impl Plain for f32 {}

/// The bytes of `v` as the device reads them (little-endian, as every supported host is), by
/// reference: an upload allocates nothing.
pub(super) fn bytes_of<T: Plain>(v: &[T]) -> &[u8] {
    // SAFETY: `Plain` types have no padding, and u8 has alignment 1.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
}

/// `v`'s bytes to download into.
pub(super) fn bytes_of_mut<T: Plain>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: `Plain` types have no padding and take any bit pattern.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), std::mem::size_of_val(v)) }
}

#[cfg(target_endian = "big")]
compile_error!("the GPU executor uploads host numbers as they are: little-endian hosts only");

fn kv_type(ty: GgmlType) -> Result<KvType, EngineError> {
    match ty {
        GgmlType::F16 => Ok(KvType::F16),
        GgmlType::Q8_0 => Ok(KvType::Q8_0),
        GgmlType::Q4_0 => Ok(KvType::Q4_0),
        other => Err(EngineError::Invalid(format!(
            "KV cache type {} on the GPU",
            other.name()
        ))),
    }
}

impl GpuExec {
    pub(super) fn begin(&mut self, p: &Pass<'_>) -> Result<(), EngineError> {
        let m = p.model;
        let g = gpu(m)?;
        let c = &m.config;
        let n = p.n;
        let (e, qd, kvd, ff) = (
            c.n_embd,
            c.q_dim(),
            c.kv_dim(),
            c.n_ff.max(c.moe.map_or(0, |x| x.n_ff_exp)),
        );
        for (b, w) in [
            (&mut self.x, e),
            (&mut self.xb, e),
            (&mut self.q, qd),
            (&mut self.k, kvd),
            (&mut self.v, kvd),
            (&mut self.att, qd),
            (&mut self.g, ff),
            (&mut self.u, ff),
        ] {
            b.get(&g.stream, n * w * 4)?;
        }
        let mut mm = 0;
        for l in &m.layers {
            for mat in [l.q, l.k, l.v, l.o] {
                mm = mm.max(GpuWeights::scratch_bytes(mat, n));
            }
            match &l.ffn {
                Ffn::Dense { gate, up, down } => {
                    for mat in [*gate, *up, *down] {
                        mm = mm.max(GpuWeights::scratch_bytes(mat, n));
                    }
                }
                Ffn::Moe(x) => {
                    mm = mm.max(GpuWeights::scratch_bytes(x.router, n));
                    if let Some((g, u, d, _)) = &x.shared {
                        for mat in [*g, *u, *d] {
                            mm = mm.max(GpuWeights::scratch_bytes(mat, n));
                        }
                    }
                }
            }
        }
        mm = mm.max(GpuWeights::scratch_bytes(m.output, n));
        self.mm.get(&g.stream, mm)?;
        self.pos.get(&g.stream, n * 4)?;
        self.vpos.get(&g.stream, n * 4)?;
        self.positions_ready = false;
        Ok(())
    }

    fn buf(&self, act: Act) -> Result<&DeviceBuffer, EngineError> {
        match act {
            Act::X => self.x.buf(),
            Act::Q => self.q.buf(),
            Act::K => self.k.buf(),
            Act::V => self.v.buf(),
            Act::Att => self.att.buf(),
        }
    }

    /// Copies the first `dst.len()` floats of `act` to the host (waits for the stream).
    pub(super) fn read(
        &mut self,
        p: &Pass<'_>,
        act: Act,
        dst: &mut [f32],
    ) -> Result<(), EngineError> {
        let g = gpu(p.model)?;
        let mut bytes = std::mem::take(&mut self.host_f32);
        bytes.resize(dst.len(), 0.0);
        {
            // SAFETY: f32 is plain data; the slice covers exactly `bytes`' memory.
            let raw = unsafe {
                std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<u8>(), dst.len() * 4)
            };
            g.stream.download(self.buf(act)?, 0, raw).map_err(gpu_err)?;
        }
        dst.copy_from_slice(&bytes);
        self.host_f32 = bytes;
        g.counters
            .crossing_bytes
            .fetch_add((dst.len() * 4) as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Replaces the first `src.len()` floats of `act` with `src`.
    pub(super) fn write(&mut self, p: &Pass<'_>, act: Act, src: &[f32]) -> Result<(), EngineError> {
        let g = gpu(p.model)?;
        // SAFETY: f32 is plain data; the slice covers exactly `src`'s memory.
        let raw = unsafe { std::slice::from_raw_parts(src.as_ptr().cast::<u8>(), src.len() * 4) };
        g.stream.upload(self.buf(act)?, 0, raw).map_err(gpu_err)?;
        g.counters
            .crossing_bytes
            .fetch_add((src.len() * 4) as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Token embeddings into `x`, gathered on the device from the table in VRAM.
    pub(super) fn embed(&mut self, p: &Pass<'_>, tokens: &[u32]) -> Result<(), EngineError> {
        let m = p.model;
        let g = gpu(m)?;
        let c = &m.config;
        let emb = m.token_embd;
        let table = g.resident(emb.id).ok_or_else(|| {
            EngineError::Invalid("the embedding table is not in VRAM: embed on the CPU".into())
        })?;
        self.host_i32.clear();
        self.host_i32.extend(tokens.iter().map(|&t| t as i32));
        let ids = self.ids.get(&g.stream, tokens.len() * 4)?;
        self.graph
            .upload(&g.stream, ids, bytes_of(&self.host_i32))?;
        let w = Weight {
            ptr: table.ptr(),
            ty: emb.ty,
            rows: emb.rows,
            cols: emb.cols,
        };
        let scale = if c.traits.embed_scale {
            (c.n_embd as f32).sqrt()
        } else {
            1.0
        };
        get_rows(
            &g.stream,
            &w,
            At::from(self.ids.buf()?),
            tokens.len(),
            At::from(self.x.buf()?),
            scale,
        )
        .map_err(gpu_err)
    }

    /// Attention input: RMSNorm of `x`, the Q/K/V projections, biases and QK-norm.
    pub(super) fn attn_input(&mut self, p: &Pass<'_>, il: usize) -> Result<(), EngineError> {
        let m = p.model;
        let g = gpu(m)?;
        let s = &*g.stream;
        let c = &m.config;
        let layer = &m.layers[il];
        let vecs = layer_vecs(g, il)?;
        let n = p.n;
        let (e, qd, kvd) = (c.n_embd, c.q_dim(), c.kv_dim());
        rms_norm(
            s,
            self.x.buf()?,
            &vecs.attn_norm,
            self.xb.buf()?,
            n,
            e,
            c.rms_eps,
        )
        .map_err(gpu_err)?;
        mm!(self, p, n, layer.q, xb -> q)?;
        mm!(self, p, n, layer.k, xb -> k)?;
        mm!(self, p, n, layer.v, xb -> v)?;
        for (buf, bias, d) in [
            (self.q.buf()?, &vecs.q_bias, qd),
            (self.k.buf()?, &vecs.k_bias, kvd),
            (self.v.buf()?, &vecs.v_bias, kvd),
        ] {
            if let Some(b) = bias {
                let rows = Rows {
                    buf,
                    offset: 0,
                    ld: d,
                };
                add_bias(s, rows, b, n, d).map_err(gpu_err)?;
            }
        }
        if let (Some(qn), Some(kn), Some(lq), Some(lk)) =
            (&vecs.q_norm, &vecs.k_norm, &layer.q_norm, &layer.k_norm)
        {
            // Per head (the norm's length is head_dim) or over the whole row (OLMoE).
            let (q, k) = (self.q.buf()?, self.k.buf()?);
            rms_norm(s, q, qn, q, n * qd / lq.len(), lq.len(), c.rms_eps).map_err(gpu_err)?;
            rms_norm(s, k, kn, k, n * kvd / lk.len(), lk.len(), c.rms_eps).map_err(gpu_err)?;
        }
        Ok(())
    }

    /// Attention: RoPE, `k` and `v` into each slot's pages in VRAM, then paged attention
    /// (one query per sequence: flash-decoding over the batch; a chunk of one sequence:
    /// causal prefill).
    pub(super) fn attend(
        &mut self,
        p: &Pass<'_>,
        il: usize,
        slots: &mut [Slot<'_>],
    ) -> Result<(), EngineError> {
        let m = p.model;
        let g = gpu(m)?;
        let s = &*g.stream;
        let c = &m.config;
        let layer = &m.layers[il];
        let (n, kvd, hd) = (p.n, c.kv_dim(), c.head_dim);
        if !self.positions_ready {
            self.host_i32.clear();
            for slot in slots.iter() {
                self.host_i32
                    .extend((slot.pos0..slot.pos0 + slot.n).map(|x| x as i32));
            }
            self.graph
                .upload(s, self.pos.buf()?, bytes_of(&self.host_i32))?;
            self.positions_ready = true;
        }
        let (base, fscale) = if layer.swa {
            (c.traits.swa_rope_base.unwrap_or(c.rope_base), 1.0)
        } else {
            (c.rope_base, c.rope_freq_scale)
        };
        let rp = RopeParams {
            kind: match c.traits.rope {
                strata_simd::ops::RopeKind::Norm => RopeKind::Norm,
                strata_simd::ops::RopeKind::Neox => RopeKind::Neox,
            },
            n_rot: c.n_rot,
            base,
            freq_scale: fscale,
        };
        rope(
            s,
            &rp,
            hd,
            self.pos.buf()?,
            n,
            self.q.buf()?,
            c.n_head,
            Some((self.k.buf()?, c.n_head_kv)),
        )
        .map_err(gpu_err)?;

        let (tk, tv) = slots
            .first()
            .map(|sl| sl.kv.types())
            .ok_or_else(|| EngineError::Invalid("attention with no sequence".into()))?;
        let layout = KvLayout {
            k_type: kv_type(tk)?,
            v_type: kv_type(tv)?,
            page_tokens: PAGE_TOKENS,
        };
        // Every slot's pages, concatenated: each slot's first page's index in the tables, and
        // its rows' positions in that numbering (what the KV writer indexes pages by).
        self.host_kall.clear();
        self.host_vall.clear();
        self.host_i32.clear();
        self.host_seqs.clear();
        self.staging.reset();
        for slot in slots.iter_mut() {
            let end = slot.pos0 + slot.n;
            for pi in slot.pos0 / PAGE_TOKENS..end.div_ceil(PAGE_TOKENS) {
                slot.kv.device_page(il, 0, pi)?;
                slot.kv.device_page(il, 1, pi)?;
            }
            slot.kv.prepare(il)?;
            slot.kv.device_tables(
                il,
                end,
                &mut self.staging,
                &mut self.host_k,
                &mut self.host_v,
            )?;
            let first = self.host_kall.len();
            self.host_seqs.extend([first as i32, end as i32]);
            self.host_i32
                .extend((slot.pos0..end).map(|pos| (first * PAGE_TOKENS + pos) as i32));
            self.host_kall.extend_from_slice(&self.host_k);
            self.host_vall.extend_from_slice(&self.host_v);
        }
        let n_pages = self.host_kall.len();
        let ktab = self.ktab.get(&g.stream, n_pages * 8)?;
        self.graph.upload(s, ktab, bytes_of(&self.host_kall))?;
        let vtab = self.vtab.get(&g.stream, n_pages * 8)?;
        self.graph.upload(s, vtab, bytes_of(&self.host_vall))?;
        let vpos = self.vpos.buf()?;
        self.graph.upload(s, vpos, bytes_of(&self.host_i32))?;
        let tables = KvPageTables {
            k: self.ktab.buf()?,
            v: self.vtab.buf()?,
            n_pages,
        };
        kv_store(
            s,
            &layout,
            kvd,
            &tables,
            self.k.buf()?,
            self.v.buf()?,
            self.vpos.buf()?,
            n,
        )
        .map_err(gpu_err)?;
        let params = AttnParams {
            n_head: c.n_head,
            n_head_kv: c.n_head_kv,
            head_dim: hd,
            scale: c.attn_scale,
            window: if layer.swa { c.sliding_window } else { None },
            softcap: None,
        };
        if slots.len() == 1 && slots[0].n > 1 {
            let slot = &slots[0];
            paged_prefill(
                s,
                &params,
                &layout,
                &tables,
                self.q.buf()?,
                slot.n,
                slot.pos0,
                self.att.buf()?,
            )
            .map_err(gpu_err)?;
        } else {
            if slots.iter().any(|sl| sl.n != 1) {
                return Err(EngineError::Invalid(
                    "a batch of several sequences must bring one token each".into(),
                ));
            }
            let max_len = slots.iter().map(|sl| sl.pos0 + 1).max().unwrap_or(1);
            let plan = DecodePlan::new(&g.dev, &params, slots.len(), max_len).map_err(gpu_err)?;
            let seqb = self.seqs.get(&g.stream, self.host_seqs.len() * 4)?;
            self.graph.upload(s, seqb, bytes_of(&self.host_seqs))?;
            self.attn_scratch.get(&g.stream, plan.scratch_bytes)?;
            paged_decode(
                s,
                &params,
                &layout,
                &tables,
                self.seqs.buf()?,
                &plan,
                self.q.buf()?,
                self.attn_scratch.buf()?,
                self.att.buf()?,
            )
            .map_err(gpu_err)?;
        }
        Ok(())
    }

    /// Output and FFN: the output projection of `att` added to `x` (through the post-attention
    /// norm where there is one), the FFN on the normed `x`, added likewise.
    pub(super) fn ffn(&mut self, p: &Pass<'_>, il: usize) -> Result<(), EngineError> {
        let m = p.model;
        let g = gpu(m)?;
        let s = &*g.stream;
        let c = &m.config;
        let layer = &m.layers[il];
        let vecs = layer_vecs(g, il)?;
        let (n, e) = (p.n, c.n_embd);
        mm!(self, p, n, layer.o, att -> xb)?;
        self.residual(s, &vecs.post_attn_norm, n, e, c.rms_eps)?;
        rms_norm(
            s,
            self.x.buf()?,
            &vecs.ffn_norm,
            self.xb.buf()?,
            n,
            e,
            c.rms_eps,
        )
        .map_err(gpu_err)?;
        match &layer.ffn {
            Ffn::Dense { gate, up, down } => {
                let ff = gate.rows;
                mm!(self, p, n, *gate, xb -> g)?;
                mm!(self, p, n, *up, xb -> u)?;
                let act = match c.traits.act {
                    Activation::Silu => Glu::Silu,
                    Activation::GeluTanh => Glu::GeluTanh,
                };
                let (gb, ub) = (self.g.buf()?, self.u.buf()?);
                let rows = |buf| Rows {
                    buf,
                    offset: 0,
                    ld: ff,
                };
                glu(s, act, rows(gb), rows(ub), rows(gb), n, ff).map_err(gpu_err)?;
                mm!(self, p, n, *down, g -> xb)?;
            }
            Ffn::Moe(x) => self.moe(p, il, x)?,
        }
        self.residual(s, &vecs.post_ffn_norm, n, e, c.rms_eps)
    }

    /// `x += norm(xb)` (or `x += xb` without a post-norm).
    fn residual(
        &self,
        s: &Stream,
        post: &Option<DeviceBuffer>,
        n: usize,
        e: usize,
        eps: f32,
    ) -> Result<(), EngineError> {
        match post {
            Some(w) => residual_post_norm(s, self.x.buf()?, self.xb.buf()?, w, n, e, eps),
            None => add(s, self.x.buf()?, self.xb.buf()?, n * e),
        }
        .map_err(gpu_err)
    }

    /// Final norm and the output projection of batch rows `rows`, into `out` (host memory).
    pub(super) fn head(
        &mut self,
        p: &Pass<'_>,
        rows: Range<usize>,
        out: &mut [f32],
    ) -> Result<(), EngineError> {
        let m = p.model;
        let g = gpu(m)?;
        let s = &*g.stream;
        let c = &m.config;
        let (e, nv) = (c.n_embd, c.n_vocab);
        let k = rows.len();
        if k == 0 {
            return Ok(());
        }
        // The rows asked for, normed, at the start of xb.
        s.copy(
            self.xb.buf()?,
            0,
            self.x.buf()?,
            rows.start * e * 4,
            k * e * 4,
        )
        .map_err(gpu_err)?;
        let xb = self.xb.buf()?;
        rms_norm(s, xb, &g.output_norm, xb, k, e, c.rms_eps).map_err(gpu_err)?;
        self.logits.get(&g.stream, k * nv * 4)?;
        let mm_need = GpuWeights::scratch_bytes(m.output, k);
        self.mm.get(&g.stream, mm_need)?;
        mm!(self, p, k, m.output, xb -> logits)?;
        if self.graph.capturing() {
            // Into page-locked memory, read when the graph has run (`graph_step`).
            return self.graph.download(s, self.logits.buf()?, k * nv * 4);
        }
        // SAFETY: f32 is plain data; the slice covers exactly `out`'s memory.
        let raw =
            unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), k * nv * 4) };
        s.download(self.logits.buf()?, 0, raw).map_err(gpu_err)
    }
}

impl GpuExec {
    /// One decode step — every sequence bringing one token, every phase on the GPU — as a
    /// CUDA graph ([`graph`]): captured, updated into the executable graph (or instantiated),
    /// launched, and its logits copied into `out`. `Ok(false)`, having run nothing, where the
    /// step cannot be one: graphs turned off, a matrix or MoE layer outside VRAM, a KV page in
    /// host memory, a capture refused once before. The caller then runs it phase by phase.
    /// `x`: the embedding rows when the CPU gathered them (else the step gathers them here).
    pub(super) fn graph_step(
        &mut self,
        p: &Pass<'_>,
        tokens: &[u32],
        x: Option<&[f32]>,
        slots: &mut [Slot<'_>],
        out: &mut [f32],
    ) -> Result<bool, EngineError> {
        let m = p.model;
        let g = gpu(m)?;
        if self.graph.off
            || !g.graphable(m)
            || slots.len() != p.n
            || slots.iter().any(|sl| sl.n != 1)
            || out.len() != p.n * m.config.n_vocab
        {
            return Ok(false);
        }
        // The pages this step writes, made now as `attend` would make them: a capture only
        // records work, so their clearing must not be part of it.
        let n_layer = m.layers.len();
        let mut pages = 0;
        for slot in slots.iter_mut() {
            let end = slot.pos0 + 1;
            for il in 0..n_layer {
                for side in 0..2 {
                    slot.kv.device_page(il, side, slot.pos0 / PAGE_TOKENS)?;
                }
            }
            if !slot.kv.all_in_vram(end) {
                return Ok(false);
            }
            pages += end.div_ceil(PAGE_TOKENS);
        }
        self.begin(p)?;
        let n = p.n;
        let per_layer = 2 * (pages * 8 + 64) + (n * 4 + 64) + (n * 8 + 64);
        let uploads = 2 * (n * 4 + 64) + x.map_or(0, |x| x.len() * 4 + 64) + n_layer * per_layer;
        self.graph
            .reserve(&g.stream, uploads, n * m.config.n_vocab * 4)?;
        self.graph.begin(&g.stream)?;
        let ran = self.captured(p, tokens, x, slots, out);
        let ended = self.graph.end(&g.stream);
        if let Err(e) = ran.and(ended) {
            tracing::warn!(
                error = %e,
                "the decode step could not be captured as a CUDA graph: this context's steps \
                 run kernel by kernel from now on"
            );
            self.graph.off = true;
            return Ok(false);
        }
        let how = self.graph.launch(&g.stream)?;
        g.stream.synchronize().map_err(gpu_err)?;
        self.graph.logits(out)?;
        use std::sync::atomic::Ordering::Relaxed;
        g.counters.graph_steps.fetch_add(1, Relaxed);
        if let graph::Replayed::Instantiated = how {
            g.counters.graph_instantiations.fetch_add(1, Relaxed);
        }
        Ok(true)
    }

    /// The step's phases, queued while the stream captures.
    fn captured(
        &mut self,
        p: &Pass<'_>,
        tokens: &[u32],
        x: Option<&[f32]>,
        slots: &mut [Slot<'_>],
        out: &mut [f32],
    ) -> Result<(), EngineError> {
        match x {
            Some(x) => self
                .graph
                .upload(&gpu(p.model)?.stream, self.x.buf()?, bytes_of(x))?,
            None => self.embed(p, tokens)?,
        }
        for il in 0..p.model.layers.len() {
            self.attn_input(p, il)?;
            self.attend(p, il, slots)?;
            self.ffn(p, il)?;
        }
        self.head(p, 0..p.n, out)
    }
}

fn layer_vecs(g: &GpuWeights, il: usize) -> Result<&weights::LayerVecs, EngineError> {
    g.layers
        .get(il)
        .and_then(Option::as_ref)
        .ok_or_else(|| EngineError::Invalid(format!("layer {il} has no phase on the GPU")))
}
