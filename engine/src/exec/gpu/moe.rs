//! The mixture-of-experts FFN on the GPU.
//!
//! The router's logits, the top-k routing and the weighted sum run on the device. The experts
//! come from a VRAM expert cache of the planner's size per layer:
//! - every expert in it: the experts' products run over slabs chosen on the device from the
//!   routing (`matmul_id`), nothing crosses to the host;
//! - some in it: the routing comes back to the host (a few bytes a token), and each expert the
//!   step uses runs where it costs least (Fiddler's rule, the planner's `gpu_min_tokens`):
//!   on the GPU when cached, or when enough of the step's tokens go to it that copying its
//!   weights into the cache (over the least recently used expert) is cheaper than computing
//!   it where it lies; otherwise on the CPU, from the RAM cache or SSD through storage's expert
//!   cache. The CPU's results are copied into their (token, slot) rows before the weighted sum,
//!   which adds the slots in a fixed order: the result does not depend on where each expert ran.

use std::sync::atomic::Ordering;
use std::sync::{Mutex, PoisonError};

use strata_kernels::ops::act::{Glu, Rows, glu};
use strata_kernels::ops::matmul::{At, Experts, matmul_id, matmul_id_scratch_bytes};
use strata_kernels::ops::moe::{route, shared_gate, weighted_sum};
use strata_kernels::{DeviceBuffer, Stream};
use strata_simd::matmul::{MatRef, MatmulScratch, matmul};
use strata_storage::residency::Weights;

use super::weights::gpu_err;
use super::{GpuExec, bytes_of, bytes_of_mut, gpu};
use crate::error::EngineError;
use crate::exec::Pass;
use crate::model::{Activation, Moe};

/// One MoE layer's VRAM expert cache: `slots` experts' gate, up and down slabs, each matrix's
/// slabs back to back (the layout `matmul_id` reads).
pub(crate) struct MoeGpu {
    bufs: [DeviceBuffer; 3],
    slab: [usize; 3],
    slots: usize,
    /// Every expert cached (slot = expert): the routing never leaves the device.
    pub all: bool,
    pub gpu_min_tokens: usize,
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    slot_of: Vec<Option<usize>>,
    expert_of: Vec<Option<usize>>,
    last_use: Vec<u64>,
    clock: u64,
}

impl MoeGpu {
    /// A cache of `slots` experts of `moe`, filled with experts `0..slots`.
    pub(crate) fn new(
        s: &Stream,
        weights: &Weights,
        moe: &Moe,
        slots: usize,
        gpu_min_tokens: usize,
    ) -> Result<MoeGpu, EngineError> {
        let ne = moe.gate.n_expert;
        let slots = slots.min(ne).max(1);
        let mats = [moe.gate.mat, moe.up.mat, moe.down.mat];
        let slab = mats.map(|m| m.ty.row_bytes(m.cols) * m.rows);
        let mut bufs = Vec::with_capacity(3);
        for sb in slab {
            bufs.push(s.device().alloc(sb * slots).map_err(gpu_err)?);
        }
        let bufs: [DeviceBuffer; 3] = bufs
            .try_into()
            .unwrap_or_else(|_| unreachable!("three matrices"));
        let me = MoeGpu {
            bufs,
            slab,
            slots,
            all: slots >= ne,
            gpu_min_tokens,
            state: Mutex::new(CacheState {
                slot_of: vec![None; ne],
                expert_of: vec![None; slots],
                last_use: vec![0; slots],
                clock: 0,
            }),
        };
        for e in 0..slots {
            me.load(s, weights, moe, e, e)?;
        }
        let mut st = me.state.lock().unwrap_or_else(PoisonError::into_inner);
        for e in 0..slots {
            st.slot_of[e] = Some(e);
            st.expert_of[e] = Some(e);
        }
        drop(st);
        Ok(me)
    }

    /// Copies expert `e`'s three slabs into slot `slot`.
    fn load(
        &self,
        s: &Stream,
        weights: &Weights,
        moe: &Moe,
        e: usize,
        slot: usize,
    ) -> Result<u64, EngineError> {
        let mut bytes = 0;
        for (i, x) in [moe.gate, moe.up, moe.down].iter().enumerate() {
            let h = weights.expert_slab(x.mat.id, e)?;
            let data = h.bytes();
            if data.len() != self.slab[i] {
                return Err(EngineError::Invalid(format!(
                    "expert {e}'s slab is {} bytes, not {}",
                    data.len(),
                    self.slab[i]
                )));
            }
            s.upload(&self.bufs[i], slot * self.slab[i], data)
                .map_err(gpu_err)?;
            bytes += data.len() as u64;
        }
        Ok(bytes)
    }

    fn experts(&self, i: usize, moe: &Moe) -> Experts {
        let m = [moe.gate.mat, moe.up.mat, moe.down.mat][i];
        Experts {
            ptr: self.bufs[i].ptr(),
            ty: m.ty,
            rows: m.rows,
            cols: m.cols,
            n_expert: self.slots,
            stride: self.slab[i],
        }
    }

    /// Bytes of VRAM the cache holds.
    pub(crate) fn bytes(&self) -> u64 {
        (self.slab.iter().sum::<usize>() * self.slots) as u64
    }
}

/// The host side of a step whose experts are not all in VRAM.
#[derive(Default)]
pub(super) struct MoeHost {
    ids: Vec<i32>,
    wts: Vec<f32>,
    slot_ids: Vec<i32>,
    /// Per (token, slot): computed on the CPU.
    on_cpu: Vec<bool>,
    count: Vec<usize>,
    route: Vec<(usize, f32)>,
    used: Vec<bool>,
    xb: Vec<f32>,
    ex_x: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    ex_y: Vec<f32>,
    picked: Vec<usize>,
    /// The (token, slot) pairs routed to the expert the CPU computes now.
    pairs: Vec<usize>,
    mm: MatmulScratch,
}

impl GpuExec {
    /// Layer `il`'s experts on `xb` (the normed input), the result in `xb`.
    pub(super) fn moe(&mut self, p: &Pass<'_>, il: usize, moe: &Moe) -> Result<(), EngineError> {
        let m = p.model;
        let g = gpu(m)?;
        let s = &*g.stream;
        let c = &m.config;
        let Some(mc) = c.moe else {
            return Err(EngineError::Invalid("MoE layer in a dense model".into()));
        };
        let cache = g.moe.get(il).and_then(Option::as_ref).ok_or_else(|| {
            EngineError::Invalid(format!("layer {il}'s experts have no VRAM cache"))
        })?;
        let (n, e, ne, k, nff) = (p.n, c.n_embd, mc.n_expert, mc.n_expert_used, mc.n_ff_exp);
        self.rl.get(s, n * ne * 4)?;
        mm!(self, p, n, moe.router, xb -> rl)?;
        self.ids.get(s, n * k * 4)?;
        self.wts.get(s, n * k * 4)?;
        route(
            s,
            self.rl.buf()?,
            self.ids.buf()?,
            self.wts.buf()?,
            n,
            ne,
            k,
            mc.norm_topk,
        )
        .map_err(gpu_err)?;
        self.eg.get(s, n * k * nff * 4)?;
        self.eu.get(s, n * k * nff * 4)?;
        self.ey.get(s, n * k * e * 4)?;
        let scratch = [0, 1, 2]
            .map(|i| {
                let mt = [moe.gate.mat, moe.up.mat, moe.down.mat][i];
                matmul_id_scratch_bytes(mt.ty, mt.cols, n, k, cache.slots, i == 2)
            })
            .into_iter()
            .max()
            .unwrap_or(0);
        self.mm_id.get(s, scratch)?;
        // The routing on the host (when some experts are not cached), the slots' cache ids.
        let ids_dev: &DeviceBuffer = if cache.all {
            self.ids.buf()?
        } else {
            self.host_moe(p, il, moe, cache)?;
            self.sids.buf()?
        };
        for (i, out) in [(0usize, &self.eg), (1, &self.eu)] {
            matmul_id(
                s,
                &cache.experts(i, moe),
                At::from(self.xb.buf()?),
                false,
                At::from(ids_dev),
                n,
                k,
                At::from(out.buf()?),
                At::from(self.mm_id.buf()?),
            )
            .map_err(gpu_err)?;
        }
        let act = match c.traits.act {
            Activation::Silu => Glu::Silu,
            Activation::GeluTanh => Glu::GeluTanh,
        };
        let rows = |buf| Rows {
            buf,
            offset: 0,
            ld: nff,
        };
        let (gb, ub) = (self.eg.buf()?, self.eu.buf()?);
        glu(s, act, rows(gb), rows(ub), rows(gb), n * k, nff).map_err(gpu_err)?;
        matmul_id(
            s,
            &cache.experts(2, moe),
            At::from(self.eg.buf()?),
            true,
            At::from(ids_dev),
            n,
            k,
            At::from(self.ey.buf()?),
            At::from(self.mm_id.buf()?),
        )
        .map_err(gpu_err)?;
        if !cache.all {
            self.cpu_experts(p, moe)?;
        }
        // The slots summed in order, into `u` (free now), then the shared expert.
        let out = self.u.buf()?;
        weighted_sum(s, self.ey.buf()?, self.wts.buf()?, None, out, n, k, e).map_err(gpu_err)?;
        if let Some((sg, su, sd, _)) = &moe.shared {
            let sf = sg.rows;
            self.sg.get(s, n * sf * 4)?;
            self.su.get(s, n * sf * 4)?;
            self.sy.get(s, n * e * 4)?;
            mm!(self, p, n, *sg, xb -> sg)?;
            mm!(self, p, n, *su, xb -> su)?;
            let rows = |buf| Rows {
                buf,
                offset: 0,
                ld: sf,
            };
            let (a, b) = (self.sg.buf()?, self.su.buf()?);
            glu(s, act, rows(a), rows(b), rows(a), n, sf).map_err(gpu_err)?;
            mm!(self, p, n, *sd, sg -> sy)?;
            let gate = g
                .layers
                .get(il)
                .and_then(Option::as_ref)
                .and_then(|v| v.shexp_gate.as_ref())
                .ok_or_else(|| EngineError::Invalid("shared expert without its gate".into()))?;
            shared_gate(s, self.xb.buf()?, gate, self.sy.buf()?, self.u.buf()?, n, e)
                .map_err(gpu_err)?;
        }
        s.copy(self.xb.buf()?, 0, self.u.buf()?, 0, n * e * 4)
            .map_err(gpu_err)
    }

    /// Brings the routing to the host, decides where each used expert runs (loading into the
    /// cache those worth copying), and writes each (token, slot)'s cache slot to the device
    /// (the CPU's slots point at slot 0; their rows are replaced afterwards).
    fn host_moe(
        &mut self,
        p: &Pass<'_>,
        il: usize,
        moe: &Moe,
        cache: &MoeGpu,
    ) -> Result<(), EngineError> {
        let m = p.model;
        let g = gpu(m)?;
        let s = &*g.stream;
        let mc = m
            .config
            .moe
            .ok_or_else(|| EngineError::Invalid("no MoE config".into()))?;
        let (n, ne, k) = (p.n, mc.n_expert, mc.n_expert_used);
        let h = &mut self.moe_host;
        h.ids.resize(n * k, 0);
        h.wts.resize(n * k, 0.0);
        s.download(self.ids.buf()?, 0, bytes_of_mut(&mut h.ids))
            .map_err(gpu_err)?;
        s.download(self.wts.buf()?, 0, bytes_of_mut(&mut h.wts))
            .map_err(gpu_err)?;
        h.route.clear();
        h.route.extend(
            h.ids
                .iter()
                .zip(&h.wts)
                .map(|(&e, &w)| (e.max(0) as usize, w)),
        );
        h.used.clear();
        h.used.resize(ne, false);
        h.count.clear();
        h.count.resize(ne, 0);
        for &(e, _) in &h.route {
            if e < ne {
                h.used[e] = true;
                h.count[e] += 1;
            }
        }
        m.learn_prior(&h.route, il);
        let mut st = cache.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.clock += 1;
        let now = st.clock;
        h.on_cpu.clear();
        h.on_cpu.resize(n * k, false);
        h.slot_ids.clear();
        h.slot_ids.resize(n * k, 0);
        // The experts the CPU computes, for storage's expert cache to read in order.
        h.picked.clear();
        for ex in 0..ne {
            if !h.used[ex] {
                continue;
            }
            let slot = match st.slot_of[ex] {
                Some(sl) => Some(sl),
                None if h.count[ex] >= cache.gpu_min_tokens => {
                    // Worth copying: over the least recently used expert not used this step.
                    let victim = (0..cache.slots)
                        .filter(|&sl| st.last_use[sl] != now)
                        .min_by_key(|&sl| st.last_use[sl]);
                    match victim {
                        Some(sl) => {
                            if let Some(old) = st.expert_of[sl] {
                                st.slot_of[old] = None;
                            }
                            let bytes = cache.load(s, &m.weights, moe, ex, sl)?;
                            g.counters
                                .streamed_bytes
                                .fetch_add(bytes, Ordering::Relaxed);
                            st.expert_of[sl] = Some(ex);
                            st.slot_of[ex] = Some(sl);
                            Some(sl)
                        }
                        None => None,
                    }
                }
                None => None,
            };
            match slot {
                Some(sl) => st.last_use[sl] = now,
                None => h.picked.push(ex),
            }
        }
        for (i, &(ex, _)) in h.route.iter().enumerate() {
            match st.slot_of.get(ex).copied().flatten() {
                Some(sl) if !h.picked.contains(&ex) => h.slot_ids[i] = sl as i32,
                _ => {
                    h.on_cpu[i] = true;
                    h.slot_ids[i] = 0;
                }
            }
        }
        drop(st);
        let ids = [moe.gate.mat.id, moe.up.mat.id, moe.down.mat.id];
        if !h.picked.is_empty() && m.weights.experts_streamed(moe.gate.mat.id) {
            m.weights.experts_held_first(&ids, &mut h.picked);
            m.weights.route_experts(&ids, &h.picked)?;
        }
        let sids = self.sids.get(s, n * k * 4)?;
        s.upload(sids, 0, bytes_of(&self.moe_host.slot_ids))
            .map_err(gpu_err)
    }

    /// The experts the host computes: each on the tokens routed to it, from its slabs where
    /// storage holds them, its rows then copied over the device's placeholder rows.
    fn cpu_experts(&mut self, p: &Pass<'_>, moe: &Moe) -> Result<(), EngineError> {
        let m = p.model;
        let g = gpu(m)?;
        let s = &*g.stream;
        let c = &m.config;
        let mc = c
            .moe
            .ok_or_else(|| EngineError::Invalid("no MoE config".into()))?;
        let (n, e, k, nff) = (p.n, c.n_embd, mc.n_expert_used, mc.n_ff_exp);
        if self.moe_host.picked.is_empty() {
            return Ok(());
        }
        let xb = self.xb.buf()?;
        let ey = self.ey.buf()?;
        let h = &mut self.moe_host;
        h.xb.resize(n * e, 0.0);
        s.download(xb, 0, bytes_of_mut(&mut h.xb))
            .map_err(gpu_err)?;
        for pi in 0..h.picked.len() {
            let ex = h.picked[pi];
            h.pairs.clear();
            h.pairs
                .extend((0..n * k).filter(|&i| h.on_cpu[i] && h.route[i].0 == ex));
            let rows = h.pairs.len();
            if rows == 0 {
                continue;
            }
            h.ex_x.resize(rows * e, 0.0);
            for (r, &i) in h.pairs.iter().enumerate() {
                let t = i / k;
                h.ex_x[r * e..(r + 1) * e].copy_from_slice(&h.xb[t * e..(t + 1) * e]);
            }
            let slab = |x: &crate::model::Experts| m.weights.expert_slab(x.mat.id, ex);
            let (hg, hu, hd) = (slab(&moe.gate)?, slab(&moe.up)?, slab(&moe.down)?);
            // Slabs the CPU holds are in its layout (interleaved where it repacks them).
            fn mref<'h>(
                m: &crate::model::Model,
                h: &'h strata_storage::residency::TensorHandle,
                x: &crate::model::Experts,
            ) -> MatRef<'h> {
                MatRef {
                    ty: x.mat.ty,
                    data: h.bytes(),
                    rows: x.mat.rows,
                    cols: x.mat.cols,
                    layout: m.cpu.layout(x.mat.id),
                }
            }
            h.g.resize(rows * nff, 0.0);
            h.u.resize(rows * nff, 0.0);
            h.ex_y.resize(rows * e, 0.0);
            matmul(
                p.pool,
                mref(m, &hg, &moe.gate),
                &h.ex_x,
                rows,
                &mut h.g,
                &mut h.mm,
            )?;
            matmul(
                p.pool,
                mref(m, &hu, &moe.up),
                &h.ex_x,
                rows,
                &mut h.u,
                &mut h.mm,
            )?;
            match c.traits.act {
                Activation::Silu => strata_simd::ops::silu_mul(&mut h.g, &h.u),
                Activation::GeluTanh => strata_simd::ops::gelu_tanh_mul(&mut h.g, &h.u),
            }
            matmul(
                p.pool,
                mref(m, &hd, &moe.down),
                &h.g,
                rows,
                &mut h.ex_y,
                &mut h.mm,
            )?;
            for (r, &i) in h.pairs.iter().enumerate() {
                s.upload(ey, i * e * 4, bytes_of(&h.ex_y[r * e..(r + 1) * e]))
                    .map_err(gpu_err)?;
            }
        }
        Ok(())
    }
}
