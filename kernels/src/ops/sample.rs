//! `sample.cu`: argmax and top-k of logits rows, and log-softmax.
//!
//! Argmax and top-k split each row over many blocks and reduce their partial results in a
//! second kernel; the partial results live in a caller-owned scratch buffer
//! ([`argmax_scratch_bytes`], [`top_k_scratch_bytes`]), allocated once, not per call.

use super::{dim, elems, need};
use crate::device::{Arg, DeviceBuffer, KernelError, LaunchConfig, Stream};

/// The largest `k` [`top_k`] takes (`TOPK_MAX_K` in sample.cu).
pub const MAX_TOP_K: usize = 128;

/// Elements per block of the first pass (`ARGMAX_CHUNK`, `TOPK_CHUNK`).
const ARGMAX_CHUNK: usize = 2048;
const TOPK_CHUNK: usize = 4096;
const THREADS: u32 = 256;
/// Rows run along grid y.
const MAX_ROWS: usize = 65_535;

fn check_rows(rows: usize, what: &str) -> Result<(), KernelError> {
    if rows > MAX_ROWS {
        return Err(KernelError::Invalid(format!(
            "{what}: {rows} rows (at most {MAX_ROWS} per launch)"
        )));
    }
    Ok(())
}

/// Bytes of scratch [`argmax`] needs for `rows` rows of `n`.
pub fn argmax_scratch_bytes(rows: usize, n: usize) -> Result<usize, KernelError> {
    elems(
        elems(rows, n.div_ceil(ARGMAX_CHUNK), "argmax")?,
        8,
        "argmax",
    )
}

/// `out[r]` (i32) = the index of the largest of row `r`'s `n` f32 (`x`: `[rows][n]`), the
/// lowest index among equal maxima, as the CPU's greedy sampler picks. NaNs are never picked
/// (a row of NaNs gives 0). Greedy decode then copies back one integer per sequence.
pub fn argmax(
    s: &Stream,
    x: &DeviceBuffer,
    rows: usize,
    n: usize,
    scratch: &DeviceBuffer,
    out: &DeviceBuffer,
) -> Result<(), KernelError> {
    check_rows(rows, "argmax")?;
    if n == 0 {
        return Err(KernelError::Invalid("argmax of an empty row".into()));
    }
    let n_i = dim(n, "argmax n")?;
    need(x, elems(rows, n, "argmax x")?, 4, "argmax x")?;
    need(out, rows, 4, "argmax out")?;
    let chunks = n.div_ceil(ARGMAX_CHUNK);
    let part = elems(rows, chunks, "argmax")?;
    need(scratch, part, 8, "argmax scratch")?;
    if rows == 0 {
        return Ok(());
    }
    // Values first, then indices, in the scratch buffer.
    let (pv, pi) = (scratch.ptr(), scratch.at(part * 4));
    let k1 = s.device().kernel("argmax_partial_f32")?;
    s.launch(
        k1,
        LaunchConfig {
            grid: (chunks as u32, rows as u32, 1),
            block: (THREADS, 1, 1),
        },
        &[x.into(), Arg::Ptr(pv), Arg::Ptr(pi), Arg::I32(n_i)],
    )?;
    let k2 = s.device().kernel("argmax_final_f32")?;
    s.launch(
        k2,
        LaunchConfig::linear(rows as u32, THREADS),
        &[
            Arg::Ptr(pv),
            Arg::Ptr(pi),
            out.into(),
            Arg::I32(chunks as i32),
        ],
    )
}

/// `k` rounded up to a power of two: the run length of the bitonic top-k.
fn run_len(k: usize) -> usize {
    k.next_power_of_two()
}

/// Bytes of scratch [`top_k`] needs for `rows` rows of `n` and this `k`.
pub fn top_k_scratch_bytes(rows: usize, n: usize, k: usize) -> Result<usize, KernelError> {
    let runs = elems(rows, n.div_ceil(TOPK_CHUNK), "top_k")?;
    elems(elems(runs, run_len(k), "top_k")?, 8, "top_k")
}

/// The `k` largest of each row's `n` f32 (`x`: `[rows][n]`), largest first, as `values`
/// (`[rows][k]` f32) and `indices` (`[rows][k]` i32): ordered as `f32::total_cmp` orders them
/// (so `-0 < +0`), equal values by lower index. `1 ≤ k ≤ min(n, MAX_TOP_K)`.
#[allow(clippy::too_many_arguments)]
pub fn top_k(
    s: &Stream,
    x: &DeviceBuffer,
    rows: usize,
    n: usize,
    k: usize,
    scratch: &DeviceBuffer,
    values: &DeviceBuffer,
    indices: &DeviceBuffer,
) -> Result<(), KernelError> {
    check_rows(rows, "top_k")?;
    if k == 0 || k > MAX_TOP_K || k > n {
        return Err(KernelError::Invalid(format!(
            "top_k: k = {k} of {n} (1 to {MAX_TOP_K}, at most the row)"
        )));
    }
    let n_i = dim(n, "top_k n")?;
    need(x, elems(rows, n, "top_k x")?, 4, "top_k x")?;
    need(values, elems(rows, k, "top_k values")?, 4, "top_k values")?;
    need(
        indices,
        elems(rows, k, "top_k indices")?,
        4,
        "top_k indices",
    )?;
    need(
        scratch,
        top_k_scratch_bytes(rows, n, k)?,
        1,
        "top_k scratch",
    )?;
    if rows == 0 {
        return Ok(());
    }
    let chunks = n.div_ceil(TOPK_CHUNK);
    let k2 = run_len(k);
    let k1 = s.device().kernel("topk_partial_f32")?;
    s.launch(
        k1,
        LaunchConfig {
            grid: (chunks as u32, rows as u32, 1),
            block: (THREADS, 1, 1),
        },
        &[x.into(), scratch.into(), Arg::I32(n_i), Arg::I32(k2 as i32)],
    )?;
    let kf = s.device().kernel("topk_final_f32")?;
    s.launch(
        kf,
        LaunchConfig::linear(rows as u32, THREADS),
        &[
            scratch.into(),
            values.into(),
            indices.into(),
            Arg::I32(chunks as i32),
            Arg::I32(k2 as i32),
            Arg::I32(k as i32),
        ],
    )
}

/// `out[r][i] = x[r][i] − log Σ_j exp(x[r][j])` for `rows` rows of `n` f32 (log-probabilities;
/// computed with the row's max subtracted first).
pub fn log_softmax(
    s: &Stream,
    x: &DeviceBuffer,
    out: &DeviceBuffer,
    rows: usize,
    n: usize,
) -> Result<(), KernelError> {
    let total = elems(rows, n, "log_softmax")?;
    need(x, total, 4, "log_softmax x")?;
    need(out, total, 4, "log_softmax out")?;
    if total == 0 {
        return Ok(());
    }
    let kern = s.device().kernel("log_softmax_f32")?;
    s.launch(
        kern,
        LaunchConfig::linear(dim(rows, "rows")? as u32, 1024),
        &[x.into(), out.into(), Arg::I32(dim(n, "n")?)],
    )
}
