//! Several matrices that read the same activations — a layer's Q, K and V projections, its gate
//! and up projections — multiplied in one pass of the pool.
//!
//! A decode step multiplies each matrix by one token. Done one matrix at a time, every matrix
//! costs the pool a wake-up and a barrier (and the activations are quantized again for each):
//! about 200 barriers per token for a 28-layer model, at each of which the faster thread waits
//! for the slower one. Here the activations are quantized once and the threads claim chunks of
//! rows across all the matrices from one counter, so the whole group waits at one barrier.
//!
//! Every row goes through the same kernel, with the same quantized activations, as
//! [`super::matmul`] would run it: the results are the same bits.

use std::sync::atomic::AtomicUsize;

use super::kernels::{INTERLEAVED_TOKENS, InterleavedFn, Kernel, kernel};
use super::{
    INTERLEAVE_ROWS, Layout, MIN_PARALLEL_WORK, MatRef, MatmulScratch, SimdError, check_shapes,
    claim, interleaved_job, matmul, rows_job,
};
use crate::dispatch;
use crate::pool::{SyncPtr, ThreadPool};
use crate::tune::{self, Decode};

/// The most matrices one [`matmul_shared`] call multiplies together.
pub const MAX_SHARED: usize = 4;

/// The most tokens for which [`matmul_shared`] runs the matrices together: decode steps and
/// small batches. Longer batches run one matrix at a time, where a barrier costs nothing beside
/// the work (and types with a tiled GEMM use it).
pub const SHARED_MAX_TOKENS: usize = INTERLEAVED_TOKENS;

/// One matrix of a group: its kernels and where its output goes.
#[derive(Clone, Copy)]
struct Part<'a> {
    w: MatRef<'a>,
    k: Kernel,
    il: Option<InterleavedFn>,
    ahead: tune::Ahead,
    out: SyncPtr<f32>,
    /// Work units: 16 rows each (a tile of an interleaved matrix, whose rows after the last
    /// whole tile are one more unit), the last one shorter where the rows end.
    units: usize,
}

/// `outs[i] = ws[i] · x` for every `i`, as [`matmul`] computes each, in one pass of the pool
/// when the matrices can share it (the same columns and activation format, at most
/// [`SHARED_MAX_TOKENS`] tokens, at most [`MAX_SHARED`] matrices); otherwise one [`matmul`]
/// after another. The results are the same bits either way.
pub fn matmul_shared(
    pool: &ThreadPool,
    ws: &[MatRef<'_>],
    x: &[f32],
    n_tok: usize,
    outs: &mut [&mut [f32]],
    scratch: &mut MatmulScratch,
) -> Result<(), SimdError> {
    if ws.len() != outs.len() {
        return Err(SimdError::Shape {
            what: "one output per matrix",
            expected: ws.len(),
            actual: outs.len(),
        });
    }
    let one_by_one = |outs: &mut [&mut [f32]], scratch: &mut MatmulScratch| {
        for (w, out) in ws.iter().zip(outs.iter_mut()) {
            matmul(pool, *w, x, n_tok, out, scratch)?;
        }
        Ok(())
    };
    let Some(first) = ws.first() else {
        return Ok(());
    };
    if ws.len() == 1
        || ws.len() > MAX_SHARED
        || n_tok == 0
        || n_tok > SHARED_MAX_TOKENS
        || first.cols == 0
        || ws.iter().any(|w| w.cols != first.cols || w.rows == 0)
    {
        return one_by_one(outs, scratch);
    }
    let level = dispatch::level();
    let tuning = tune::current();
    let mut parts: [Option<Part<'_>>; MAX_SHARED] = [None; MAX_SHARED];
    for (i, (w, out)) in ws.iter().zip(outs.iter_mut()).enumerate() {
        let wide = tuning.decode(w.ty) != Decode::Interleaved256;
        let k = kernel(w.ty, level, wide).ok_or(SimdError::UnsupportedType { ty: w.ty })?;
        check_shapes(w, k, x, n_tok, out)?;
        let il = match w.layout {
            Layout::Rows => None,
            Layout::Interleaved => Some(k.interleaved.ok_or(SimdError::NoInterleavedKernel {
                ty: w.ty,
                level: level.min(dispatch::detected()).name(),
            })?),
        };
        parts[i] = Some(Part {
            w: *w,
            k,
            il,
            ahead: tuning.ahead(w.ty),
            out: SyncPtr(out.as_mut_ptr()),
            units: w.rows.div_ceil(INTERLEAVE_ROWS),
        });
    }
    let Some(k0) = parts[0].map(|p| p.k) else {
        return one_by_one(outs, scratch);
    };
    if parts.iter().flatten().any(|p| p.k.act != k0.act) {
        return one_by_one(outs, scratch);
    }
    // No allocation: a decode step allocates nothing once warm.
    let n_parts = ws.len();

    // Quantize the activations once; every matrix reads them.
    let act_row = k0.act.ty().row_bytes(first.cols);
    let act_len = act_row * n_tok;
    if scratch.act.len() < act_len {
        scratch.act.resize(act_len, 0);
    }
    let act = &mut scratch.act[..act_len];
    for (t, dst) in act.chunks_exact_mut(act_row).enumerate() {
        (k0.quantize)(&x[t * first.cols..(t + 1) * first.cols], dst);
    }
    let act: &[u8] = act;

    let nth = pool.n_threads();
    let total_rows: usize = ws.iter().map(|w| w.rows).sum();
    let parts = &parts[..n_parts];
    let n_units: usize = parts.iter().flatten().map(|p| p.units).sum();
    let next = AtomicUsize::new(0);
    // Units `u0..u1` of part `p`, rows `16 u0..16 u1` (those past the last whole tile of an
    // interleaved matrix through its row kernel).
    let run = |p: &Part<'_>, u0: usize, u1: usize| match p.il {
        Some(il) => {
            let tiles = p.w.rows / INTERLEAVE_ROWS;
            if u0 < tiles {
                // SAFETY: `claim` hands out each unit once, so rows u0 * 16..u1 * 16 of this
                // matrix's output are this thread's alone; the shapes were checked.
                unsafe {
                    interleaved_job(
                        il,
                        &p.w,
                        act,
                        act_row,
                        n_tok,
                        u0,
                        u1.min(tiles),
                        p.ahead,
                        p.out.get(),
                    )
                };
            }
            if u1 > tiles {
                // The rows after the last whole tile: this matrix's last unit.
                // SAFETY: as above, for those rows.
                unsafe {
                    rows_job(
                        p.k,
                        &p.w,
                        act,
                        act_row,
                        n_tok,
                        tiles * INTERLEAVE_ROWS,
                        p.w.rows,
                        p.ahead,
                        p.out.get(),
                    )
                };
            }
        }
        None => {
            let (r0, r1) = (u0 * INTERLEAVE_ROWS, (u1 * INTERLEAVE_ROWS).min(p.w.rows));
            // SAFETY: as above: rows r0..r1 of this matrix's output are this thread's.
            unsafe { rows_job(p.k, &p.w, act, act_row, n_tok, r0, r1, p.ahead, p.out.get()) };
        }
    };
    // The threads claim pieces of all the matrices' units, one after another, from one
    // counter (a piece may end in one matrix and go on in the next).
    let job = |_ith: usize, nth: usize| {
        while let Some((c0, c1)) = claim(&next, n_units, nth) {
            let mut base = 0;
            for p in parts.iter().flatten() {
                let (u0, u1) = (
                    c0.max(base) - base,
                    c1.min(base + p.units).saturating_sub(base),
                );
                if u0 < u1 {
                    run(p, u0, u1);
                }
                base += p.units;
            }
        }
    };
    let work = total_rows.saturating_mul(first.cols).saturating_mul(n_tok);
    if work >= MIN_PARALLEL_WORK && nth > 1 {
        pool.run(job);
    } else {
        job(0, 1);
    }
    Ok(())
}
