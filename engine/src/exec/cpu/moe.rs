//! The mixture-of-experts FFN on the CPU: each token goes to its top-k experts by router
//! softmax ([`crate::model::moe::route`]); each expert runs once on the tokens routed to it
//! (slabs of the stacked 3-D expert tensors, from the expert cache when experts stream); the
//! outputs are summed with the routing weights in a fixed order, plus the gated shared expert
//! where the architecture has one.

use strata_simd::matmul::{MatRef, matmul};
use strata_storage::residency::TensorHandle;

use super::{CpuExec, activate, mat_mul, mat_mul_shared};
use crate::error::EngineError;
use crate::exec::Pass;
use crate::model::moe::route;
use crate::model::{Experts, Mat, Model, Moe};

/// The MoE FFN's buffers: router logits, (expert, weight) per token and slot, the experts
/// the routing uses and the order they run in, the tokens of one expert with their weights,
/// their gathered inputs and outputs, each slot's weighted output and the per-token sum.
#[derive(Default)]
pub(super) struct MoeBuffers {
    router: Vec<f32>,
    route: Vec<(usize, f32)>,
    used: Vec<bool>,
    order: Vec<usize>,
    picked: Vec<(usize, f32)>,
    ex_x: Vec<f32>,
    ex_y: Vec<f32>,
    slots: Vec<f32>,
    acc: Vec<f32>,
}

impl CpuExec {
    /// The MoE FFN of layer `il` on `xb` (the normed input, `p.n` rows), result in `xb`.
    pub(super) fn moe(&mut self, p: &Pass<'_>, il: usize, moe: &Moe) -> Result<(), EngineError> {
        let m = p.model;
        let (n, e) = (p.n, m.config.n_embd);
        let Some(mc) = m.config.moe else {
            return Err(EngineError::Invalid("MoE layer in a dense model".into()));
        };
        let (ne, k, nff) = (mc.n_expert, mc.n_expert_used, mc.n_ff_exp);
        let (b, mm, x) = (&mut self.b, &mut self.mm, &mut self.moe);
        x.router.resize(n * ne, 0.0);
        mat_mul(p, mm, moe.router, &b.xb, n, &mut x.router)?;
        route(&mut x.router, &mut x.route, n, ne, k, mc.norm_topk);
        x.used.clear();
        x.used.resize(ne, false);
        for &(ex, _) in &x.route {
            x.used[ex] = true;
        }
        m.score_prediction(&self.guesses, &x.used);
        // The experts this call uses, in the order they are computed: where they stream, those
        // held first, so that they compute while the rest are read.
        x.order.clear();
        x.order
            .extend((0..ne.min(moe.gate.n_expert)).filter(|&i| x.used[i]));
        let ids = [moe.gate.mat.id, moe.up.mat.id, moe.down.mat.id];
        if m.weights.experts_streamed(moe.gate.mat.id) {
            m.weights.experts_held_first(&ids, &mut x.order);
            // The cache learns the routing before the experts are asked for: it keeps those
            // it holds and reads the rest in the order they will run.
            m.weights.route_experts(&ids, &x.order)?;
        }
        // Each (token, slot)'s weighted expert output, summed per token in slot order below,
        // so that the result does not depend on the order the experts ran in.
        x.slots.clear();
        x.slots.resize(n * k * e, 0.0);
        for oi in 0..x.order.len() {
            let ex = x.order[oi];
            x.picked.clear();
            x.picked.extend(
                x.route
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.0 == ex)
                    .map(|(i, r)| (i, r.1)),
            );
            let rows = x.picked.len();
            if rows == 0 {
                continue;
            }
            x.ex_x.resize(rows * e, 0.0);
            for (i, &(s, _)) in x.picked.iter().enumerate() {
                let t = s / k;
                x.ex_x[i * e..(i + 1) * e].copy_from_slice(&b.xb[t * e..(t + 1) * e]);
            }
            b.g.resize(rows * nff, 0.0);
            b.u.resize(rows * nff, 0.0);
            // One expert's three matrices, from the expert cache when experts stream.
            let slab = |s: &Experts| -> Result<_, EngineError> {
                Ok((m.weights.expert_slab(s.mat.id, ex)?, s.mat))
            };
            let (hg, hu, hd) = (slab(&moe.gate)?, slab(&moe.up)?, slab(&moe.down)?);
            fn mat_ref<'h>(m: &Model, h: &'h (TensorHandle, Mat)) -> MatRef<'h> {
                MatRef {
                    ty: h.1.ty,
                    data: h.0.bytes(),
                    rows: h.1.rows,
                    cols: h.1.cols,
                    // Interleaved when the experts are resident or cached, or their streamed
                    // group's read was prepared.
                    layout: m.cpu.layout_of(h.1.id, &h.0),
                }
            }
            let (g, u) = (&mut b.g[..rows * nff], &mut b.u[..rows * nff]);
            matmul(p.pool, mat_ref(m, &hg), &x.ex_x, rows, g, mm)?;
            matmul(p.pool, mat_ref(m, &hu), &x.ex_x, rows, u, mm)?;
            activate(p.pool, m, g, u, nff);
            x.ex_y.resize(rows * e, 0.0);
            matmul(p.pool, mat_ref(m, &hd), g, rows, &mut x.ex_y, mm)?;
            for (i, &(s, w)) in x.picked.iter().enumerate() {
                x.slots[s * e..(s + 1) * e]
                    .iter_mut()
                    .zip(&x.ex_y[i * e..(i + 1) * e])
                    .for_each(|(a, y)| *a = w * y);
            }
        }
        x.acc.clear();
        x.acc.resize(n * e, 0.0);
        for (s, y) in x.slots.chunks_exact(e).enumerate() {
            let t = s / k;
            x.acc[t * e..(t + 1) * e]
                .iter_mut()
                .zip(y)
                .for_each(|(a, y)| *a += y);
        }
        if let Some((gate, up, down, gate_inp)) = &moe.shared {
            let sf = gate.rows;
            b.g.resize(n * sf, 0.0);
            b.u.resize(n * sf, 0.0);
            mat_mul_shared(p, mm, &[*gate, *up], &b.xb, n, [&mut b.g, &mut b.u])?;
            activate(p.pool, m, &mut b.g[..n * sf], &b.u[..n * sf], sf);
            x.ex_y.resize(n * e, 0.0);
            mat_mul(p, mm, *down, &b.g, n, &mut x.ex_y)?;
            for t in 0..n {
                let xt = &b.xb[t * e..(t + 1) * e];
                let z: f32 = xt.iter().zip(gate_inp).map(|(a, b)| a * b).sum();
                let s = 1.0 / (1.0 + (-z).exp());
                x.acc[t * e..(t + 1) * e]
                    .iter_mut()
                    .zip(&x.ex_y[t * e..(t + 1) * e])
                    .for_each(|(a, y)| *a += s * y);
            }
        }
        b.xb[..n * e].copy_from_slice(&x.acc);
        m.learn_prior(&x.route, il);
        Ok(())
    }
}
