//! `moe.cu`: the router, grouping tokens by expert, gathering their rows, the weighted sum of
//! the expert outputs in slot order, and the shared expert's sigmoid gate.
//!
//! A prefill MoE pass on the device: [`route`] → [`group`] → per expert (or grouped)
//! [`gather`] and the expert GEMMs → [`weighted_sum`] (+ [`shared_gate`]). Decode needs only
//! [`route`]: the expert-id matvec reads `ids` directly.

use super::{dim, elems, need};
use crate::device::{Arg, DeviceBuffer, KernelError, LaunchConfig, Stream};

/// The most experts [`route`] takes (`ROUTE_MAX_EXPERTS` in moe.cu: 16 per lane of a warp).
pub const MAX_ROUTE_EXPERTS: usize = 512;
/// The most experts [`group`] takes (`GROUP_MAX_EXPERTS`, its shared histogram).
pub const MAX_GROUP_EXPERTS: usize = 1024;

/// Tokens per router block (`ROUTE_WARPS`: one warp each).
const ROUTE_WARPS: usize = 4;
const THREADS: u32 = 256;
const TILE: usize = 1024;
const MAX_GRID_Y: usize = 65_535;

fn grid_2d(cols: usize, rows: usize) -> LaunchConfig {
    LaunchConfig {
        // cols is an i32 dimension, so its tile count fits.
        grid: (
            cols.div_ceil(TILE).max(1) as u32,
            rows.clamp(1, MAX_GRID_Y) as u32,
            1,
        ),
        block: (THREADS, 1, 1),
    }
}

/// Top-`k` routing of `n` tokens over `n_expert` experts, as the CPU's `route`: per token,
/// the softmax of its `n_expert` logits (`logits`: `[n][n_expert]` f32), the `k` largest
/// probabilities (ties to the lower expert id) largest first as `ids` (`[n][k]` i32) and
/// `weights` (`[n][k]` f32), divided by their sum when `renorm` (and the sum is positive).
#[allow(clippy::too_many_arguments)]
pub fn route(
    s: &Stream,
    logits: &DeviceBuffer,
    ids: &DeviceBuffer,
    weights: &DeviceBuffer,
    n: usize,
    n_expert: usize,
    k: usize,
    renorm: bool,
) -> Result<(), KernelError> {
    if n_expert == 0 || n_expert > MAX_ROUTE_EXPERTS {
        return Err(KernelError::Invalid(format!(
            "route: {n_expert} experts (1 to {MAX_ROUTE_EXPERTS} supported)"
        )));
    }
    if k == 0 || k > n_expert {
        return Err(KernelError::Invalid(format!(
            "route: top-{k} of {n_expert} experts"
        )));
    }
    need(
        logits,
        elems(n, n_expert, "route logits")?,
        4,
        "route logits",
    )?;
    let nk = elems(n, k, "route ids")?;
    need(ids, nk, 4, "route ids")?;
    need(weights, nk, 4, "route weights")?;
    if n == 0 {
        return Ok(());
    }
    let kern = s.device().kernel("moe_route_f32")?;
    s.launch(
        kern,
        LaunchConfig::linear(
            dim(n.div_ceil(ROUTE_WARPS), "route blocks")? as u32,
            (ROUTE_WARPS * 32) as u32,
        ),
        &[
            logits.into(),
            ids.into(),
            weights.into(),
            Arg::I32(dim(n, "n")?),
            Arg::I32(n_expert as i32),
            Arg::I32(k as i32),
            Arg::I32(i32::from(renorm)),
        ],
    )
}

/// The routing grouped by expert, on the device, from `ids` (`[n][k]` i32, e.g. [`route`]'s):
/// - `counts` (`n_expert` i32): pairs routed to each expert;
/// - `offsets` (`n_expert + 1` i32): where each expert's pairs start in `list` (the last entry
///   is the number of pairs listed);
/// - `list` (`n · k` i32): `t · k + s` of each pair (token `t`, slot `s`), expert by expert,
///   and within an expert by token, then slot — the same order whatever the schedule;
/// - `pos` (`n · k` i32): where pair `t · k + s` sits in `list`.
///
/// Ids outside `[0, n_expert)` are left out of all four (their `pos` is -1).
#[allow(clippy::too_many_arguments)]
pub fn group(
    s: &Stream,
    ids: &DeviceBuffer,
    n: usize,
    k: usize,
    n_expert: usize,
    counts: &DeviceBuffer,
    offsets: &DeviceBuffer,
    list: &DeviceBuffer,
    pos: &DeviceBuffer,
) -> Result<(), KernelError> {
    if n_expert == 0 || n_expert > MAX_GROUP_EXPERTS {
        return Err(KernelError::Invalid(format!(
            "group: {n_expert} experts (1 to {MAX_GROUP_EXPERTS} supported)"
        )));
    }
    if k == 0 {
        return Err(KernelError::Invalid("group: k = 0".into()));
    }
    let nk = elems(n, k, "group ids")?;
    let nk_i = dim(nk, "group n·k")?;
    need(ids, nk, 4, "group ids")?;
    need(counts, n_expert, 4, "group counts")?;
    need(offsets, n_expert + 1, 4, "group offsets")?;
    need(list, nk, 4, "group list")?;
    need(pos, nk, 4, "group pos")?;
    s.memset(counts, 0, n_expert * 4, 0)?;
    // -1 for the pairs the scatter leaves out.
    s.memset(pos, 0, nk * 4, 0xff)?;
    let count = s.device().kernel("moe_count_i32")?;
    if nk > 0 {
        // Each block flushes its histogram with up to n_expert atomics: a few blocks suffice.
        let blocks = nk.div_ceil(4 * THREADS as usize).clamp(1, 64) as u32;
        s.launch(
            count,
            LaunchConfig::linear(blocks, THREADS),
            &[
                ids.into(),
                counts.into(),
                Arg::I32(nk_i),
                Arg::I32(n_expert as i32),
            ],
        )?;
    }
    let scatter = s.device().kernel("moe_scatter_i32")?;
    s.launch(
        scatter,
        LaunchConfig::linear(n_expert as u32, THREADS),
        &[
            ids.into(),
            counts.into(),
            offsets.into(),
            list.into(),
            pos.into(),
            Arg::I32(dim(n, "n")?),
            Arg::I32(dim(k, "k")?),
            Arg::I32(n_expert as i32),
        ],
    )
}

/// `out[i] = x[list[start + i] / k]` for `i < m`: the input rows of `m` listed pairs
/// (`x`: `[n][n_embd]` f32, `out`: `[m][n_embd]`), e.g. one expert's
/// `list[offsets[e]..offsets[e + 1]]` from [`group`]. An entry naming no token gives zeros.
#[allow(clippy::too_many_arguments)]
pub fn gather(
    s: &Stream,
    x: &DeviceBuffer,
    n: usize,
    n_embd: usize,
    list: &DeviceBuffer,
    start: usize,
    m: usize,
    k: usize,
    out: &DeviceBuffer,
) -> Result<(), KernelError> {
    if k == 0 {
        return Err(KernelError::Invalid("gather: k = 0".into()));
    }
    need(x, elems(n, n_embd, "gather x")?, 4, "gather x")?;
    let end = start
        .checked_add(m)
        .ok_or_else(|| KernelError::Invalid("gather: list range overflows".into()))?;
    need(list, end, 4, "gather list")?;
    need(out, elems(m, n_embd, "gather out")?, 4, "gather out")?;
    if m == 0 || n_embd == 0 {
        return Ok(());
    }
    let kern = s.device().kernel("moe_gather_f32")?;
    s.launch(
        kern,
        grid_2d(n_embd, m),
        &[
            x.into(),
            Arg::Ptr(list.at(start * 4)),
            out.into(),
            Arg::I32(dim(m, "m")?),
            Arg::I32(dim(n, "n")?),
            Arg::I32(dim(k, "k")?),
            Arg::I32(dim(n_embd, "n_embd")?),
        ],
    )
}

/// `out[t] = Σ_s w[t][s] · y[row(t, s)]`, the slots summed in order `s = 0, 1, ...` (so the
/// result does not depend on the order the experts ran in). `w`: `[n][k]` f32; `y`: `n · k`
/// rows of `n_embd` f32, `[n][k][n_embd]` (row `t · k + s`) without `pos`, or in [`group`]'s
/// list order with its `pos`; `out`: `[n][n_embd]`.
#[allow(clippy::too_many_arguments)]
pub fn weighted_sum(
    s: &Stream,
    y: &DeviceBuffer,
    w: &DeviceBuffer,
    pos: Option<&DeviceBuffer>,
    out: &DeviceBuffer,
    n: usize,
    k: usize,
    n_embd: usize,
) -> Result<(), KernelError> {
    let nk = elems(n, k, "weighted_sum w")?;
    dim(nk, "weighted_sum n·k")?;
    need(y, elems(nk, n_embd, "weighted_sum y")?, 4, "weighted_sum y")?;
    need(w, nk, 4, "weighted_sum w")?;
    if let Some(p) = pos {
        need(p, nk, 4, "weighted_sum pos")?;
    }
    need(
        out,
        elems(n, n_embd, "weighted_sum out")?,
        4,
        "weighted_sum out",
    )?;
    if n == 0 || n_embd == 0 {
        return Ok(());
    }
    let kern = s.device().kernel("moe_weighted_sum_f32")?;
    s.launch(
        kern,
        grid_2d(n_embd, n),
        &[
            y.into(),
            w.into(),
            Arg::Ptr(pos.map_or(0, DeviceBuffer::ptr)),
            out.into(),
            Arg::I32(dim(n, "n")?),
            Arg::I32(dim(k, "k")?),
            Arg::I32(dim(n_embd, "n_embd")?),
        ],
    )
}

/// `acc[t] += sigmoid(x[t] · gate_inp) · y[t]` for `n` tokens of `n_embd` f32: qwen2moe's
/// shared expert output `y`, gated per token by its input `x` (the FFN's normed input).
pub fn shared_gate(
    s: &Stream,
    x: &DeviceBuffer,
    gate_inp: &DeviceBuffer,
    y: &DeviceBuffer,
    acc: &DeviceBuffer,
    n: usize,
    n_embd: usize,
) -> Result<(), KernelError> {
    let total = elems(n, n_embd, "shared_gate")?;
    need(x, total, 4, "shared_gate x")?;
    need(gate_inp, n_embd, 4, "shared_gate gate_inp")?;
    need(y, total, 4, "shared_gate y")?;
    need(acc, total, 4, "shared_gate acc")?;
    if total == 0 {
        return Ok(());
    }
    let kern = s.device().kernel("moe_shared_gate_f32")?;
    s.launch(
        kern,
        LaunchConfig::linear(dim(n, "n")? as u32, THREADS),
        &[
            x.into(),
            gate_inp.into(),
            y.into(),
            acc.into(),
            Arg::I32(dim(n_embd, "n_embd")?),
        ],
    )
}
