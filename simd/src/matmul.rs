//! Quantized matrix × activations, the hot path of every forward pass.
//!
//! [`matmul`] computes `out[t * w.rows + r] = Σ_c W[r][c] · x[t * w.cols + c]` for each token
//! `t`. As llama.cpp does it, the f32 activations are first converted once per call to the
//! weight type's partner format (Q8_K for the K-quants, Q8_0 for Q4_0/Q5_0/Q8_0, Q8_1 for
//! Q4_1/Q5_1, f16 for F16, bf16 for BF16), then every output is an integer dot product per
//! block summed in f32 with the block scales.
//!
//! Work is split over the pool by rows: each thread takes one contiguous slab (an interleaved
//! matrix: chunks of tiles claimed from a shared counter, so that a late or slower thread does
//! not hold the others), and walks it in tiles of [`ROW_TILE`] rows; for several tokens (prefill) each tile is dotted with every
//! token before moving on, so the tile's weight bytes are read from memory once and then
//! served from cache.

pub(crate) mod interleave;
mod kernels;
mod shared;

use std::sync::atomic::{AtomicUsize, Ordering};

use strata_storage::quant::GgmlType;

use crate::dispatch::{self, Level};
use crate::pool::{SyncPtr, ThreadPool};
use crate::tune::{self, Decode, Tuning};
use kernels::{
    GEMM_ROWS, Gemm, INTERLEAVED_TOKENS, InterleavedFn, Kernel, MULTI_TOKENS, PackFn, kernel,
};

pub use interleave::TILE_ROWS as INTERLEAVE_ROWS;
pub use shared::{MAX_SHARED, SHARED_MAX_TOKENS, matmul_shared};

/// A borrowed weight matrix: `rows` rows of `cols` elements of type `ty`, `ty.row_bytes(cols)`
/// bytes per row, laid out as `layout` says.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub ty: GgmlType,
    pub data: &'a [u8],
    pub rows: usize,
    pub cols: usize,
    pub layout: Layout,
}

/// How a matrix's bytes are arranged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Layout {
    /// One row after another, as in the GGUF file.
    #[default]
    Rows,
    /// Whole tiles of 16 rows interleaved for the decode kernels ([`interleave`]), then the
    /// remaining rows row-major: what [`interleave`] makes of a `Rows` matrix, in place and
    /// in the same bytes.
    Interleaved,
}

/// Whether matrices of `ty` are to be interleaved: the type has the layout, the process's SIMD
/// level has kernels for it (AVX2 and above), the level's prefill GEMM for the type (if any)
/// can read the layout (AVX-512 VNNI's Q4_0 GEMM cannot: interleaving would cost prefill its
/// GEMM), and the process's tuning ([`crate::tune`]) did not choose the row kernels for it.
pub fn can_interleave(ty: GgmlType) -> bool {
    let level = dispatch::level();
    interleave::has_layout(ty)
        && kernels::interleaved(ty, level, false).is_some()
        && kernel(ty, level, false)
            .and_then(|k| k.gemm)
            .is_none_or(|g| g.pack_interleaved.is_some())
        && tune::current().decode(ty) != Decode::Rows
}

/// Whether a batch of tokens (a prompt's) over a matrix of `ty` gains from the matrix being
/// interleaved at this process's level: it is to be interleaved ([`can_interleave`]) and the
/// level has no tiled GEMM for the type. Where the GEMM exists (AVX-512 VNNI) it packs tiles
/// from either layout and runs the same loop, so a batch costs the same both ways (qwen2.5-coder
/// pp512 on Emerald Rapids: 213 t/s interleaved, 227 and 183 in rows, two runs); below it, the
/// interleaved kernels are the fast path (the same CPU at `STRATA_SIMD=avx2`: 107 against 47).
pub fn interleave_speeds_batches(ty: GgmlType) -> bool {
    can_interleave(ty) && !has_row_gemm(ty, dispatch::level())
}

/// Whether `level` has a tiled GEMM for `ty` that reads the file's rows: where it has not, a
/// matrix kept in rows runs a prompt's batch through the slower row kernels.
pub(crate) fn has_row_gemm(ty: GgmlType, level: Level) -> bool {
    kernel(ty, level, false).is_some_and(|k| k.gemm.is_some_and(|g| g.pack.is_some()))
}

/// Whether `ty` has a 512-bit interleaved kernel at `level` on this CPU (the others run the
/// 256-bit one under either width).
pub(crate) fn has_interleaved_512(ty: GgmlType, level: Level) -> bool {
    kernels::has_interleaved_512(ty, level)
}

/// Rearranges a row-major matrix of `rows` × `cols` elements of `ty` into
/// [`Layout::Interleaved`], in place. Returns `false` (and leaves `data` alone) when `ty` has no
/// such layout at this SIMD level ([`can_interleave`]).
pub fn interleave(
    ty: GgmlType,
    data: &mut [u8],
    rows: usize,
    cols: usize,
) -> Result<bool, SimdError> {
    if !can_interleave(ty) {
        return Ok(false);
    }
    pack_checked(ty, data, rows, cols, true)
}

/// [`interleave`] on the calling thread alone: for a matrix repacked after each read on an
/// I/O thread, which should not start threads of its own beside the computing ones.
pub fn interleave_here(
    ty: GgmlType,
    data: &mut [u8],
    rows: usize,
    cols: usize,
) -> Result<bool, SimdError> {
    if !can_interleave(ty) {
        return Ok(false);
    }
    pack_checked(ty, data, rows, cols, false)
}

/// [`interleave`] whatever this process's level and tuning would choose, for every type that
/// has the layout (for tests: the layout is the same at every level, and each level's kernels
/// are tested on it even where the process would keep a type in rows, as AVX-512 VNNI keeps
/// Q4_0 for its GEMM).
#[doc(hidden)]
pub fn interleave_always(
    ty: GgmlType,
    data: &mut [u8],
    rows: usize,
    cols: usize,
) -> Result<bool, SimdError> {
    if !interleave::has_layout(ty) {
        return Ok(false);
    }
    pack_checked(ty, data, rows, cols, true)
}

/// Packs a matrix whose type has the layout, after checking its size (`parallel`: on the
/// interleave packers' threads, else on the calling thread).
fn pack_checked(
    ty: GgmlType,
    data: &mut [u8],
    rows: usize,
    cols: usize,
    parallel: bool,
) -> Result<bool, SimdError> {
    check_bytes(ty, data.len(), rows, cols)?;
    interleave::pack(ty, data, rows, cols, parallel);
    Ok(true)
}

/// The inverse of [`interleave`] (for tests).
#[doc(hidden)]
pub fn deinterleave(
    ty: GgmlType,
    data: &mut [u8],
    rows: usize,
    cols: usize,
) -> Result<(), SimdError> {
    if interleave::has_layout(ty) {
        check_bytes(ty, data.len(), rows, cols)?;
        interleave::unpack(ty, data, rows, cols);
    }
    Ok(())
}

/// The 16 row-major rows of one tile of an interleaved matrix (`tile` and `dst` are both
/// `16 * ty.row_bytes(cols)` bytes): how an interleaved embedding table gives a token's row.
pub fn deinterleave_tile(
    ty: GgmlType,
    tile: &[u8],
    cols: usize,
    dst: &mut [u8],
) -> Result<(), SimdError> {
    if !interleave::has_layout(ty) {
        return Err(SimdError::NoInterleavedKernel {
            ty,
            level: dispatch::level().name(),
        });
    }
    check_bytes(ty, tile.len(), INTERLEAVE_ROWS, cols)?;
    check_bytes(ty, dst.len(), INTERLEAVE_ROWS, cols)?;
    interleave::unpack_tile(ty, tile, cols, dst);
    Ok(())
}

fn check_bytes(ty: GgmlType, len: usize, rows: usize, cols: usize) -> Result<(), SimdError> {
    if !cols.is_multiple_of(ty.block_size()) {
        return Err(SimdError::Shape {
            what: "columns must be a multiple of the block size",
            expected: ty.block_size(),
            actual: cols,
        });
    }
    let want = rows.saturating_mul(ty.row_bytes(cols));
    if want != len {
        return Err(SimdError::Shape {
            what: "weight bytes",
            expected: want,
            actual: len,
        });
    }
    Ok(())
}

/// Reusable buffers for [`matmul`]; once it has seen the largest shape, calls allocate nothing.
#[derive(Debug, Default)]
pub struct MatmulScratch {
    act: Vec<u8>,
    /// Per-block side data of the activations for the tiled GEMM (legacy types).
    side: Vec<u8>,
}

impl MatmulScratch {
    pub fn new() -> Self {
        Self::default()
    }
}

/// Why a matmul was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimdError {
    #[error("matmul does not support weight type {ty}")]
    UnsupportedType { ty: GgmlType },
    #[error("weight type {ty} has no interleaved kernel at SIMD level {level}")]
    NoInterleavedKernel { ty: GgmlType, level: &'static str },
    #[error("matmul shape error: {what}: expected {expected}, got {actual}")]
    Shape {
        what: &'static str,
        expected: usize,
        actual: usize,
    },
}

/// Whether [`matmul`] accepts weights of type `ty`.
pub fn supports(ty: GgmlType) -> bool {
    kernels::Act::for_weight(ty).is_some()
}

/// Rows per tile: a tile of a 1536-column Q4_K matrix is 14 KiB, well inside L1.
const ROW_TILE: usize = 16;

/// Claims the next piece of `0..total` from `next` for one of `nth` threads (guided
/// scheduling): a `1 / (2 nth)` share of what is left, at least one. The first pieces are long
/// (each a contiguous stream the prefetchers follow) and the last ones a single tile, so a
/// thread that finishes while another still computes waits for at most one tile, where equal
/// chunks of `1 / (8 nth)` of the work left it waiting half a chunk on average (3% of qwen2.5
/// decode at 2 threads). `None` when all is claimed.
pub(crate) fn claim(next: &AtomicUsize, total: usize, nth: usize) -> Option<(usize, usize)> {
    let mut cur = next.load(Ordering::Relaxed);
    loop {
        if cur >= total {
            return None;
        }
        let end = cur + ((total - cur) / (2 * nth.max(1))).max(1);
        match next.compare_exchange_weak(cur, end, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return Some((cur, end)),
            Err(now) => cur = now,
        }
    }
}

/// Below this many multiply-adds the pool's wake-up costs more than it saves.
const MIN_PARALLEL_WORK: usize = 1 << 16;

/// From this many tokens on, types with a tiled GEMM use it: packing a tile costs about as
/// much as a few tokens' dot products, so below this the multi-token kernels win (a decode
/// batch of a few streams is much slower through the tiled path).
const GEMM_MIN_TOKENS: usize = 16;

/// `out[t * w.rows + r] = Σ_c W[r][c] · x[t * w.cols + c]` for `t` in `0..n_tok`, at the
/// process's SIMD level ([`dispatch::level`]).
///
/// `x` must hold exactly `n_tok * w.cols` values, `out` exactly `n_tok * w.rows`, and
/// `w.data` exactly `w.rows * w.ty.row_bytes(w.cols)` bytes; `w.cols` must be a multiple of the
/// type's block size.
pub fn matmul(
    pool: &ThreadPool,
    w: MatRef<'_>,
    x: &[f32],
    n_tok: usize,
    out: &mut [f32],
    scratch: &mut MatmulScratch,
) -> Result<(), SimdError> {
    matmul_at(dispatch::level(), pool, w, x, n_tok, out, scratch)
}

/// [`matmul`] at an explicit SIMD level (lowered to what the CPU has), for tests and benches
/// that compare levels within one process.
#[doc(hidden)]
pub fn matmul_at(
    level: Level,
    pool: &ThreadPool,
    w: MatRef<'_>,
    x: &[f32],
    n_tok: usize,
    out: &mut [f32],
    scratch: &mut MatmulScratch,
) -> Result<(), SimdError> {
    matmul_tuned(level, tune::current(), pool, w, x, n_tok, out, scratch)
}

/// [`matmul_at`] under an explicit tuning (the interleaved kernels' width and prefetch
/// distance), for `tune`'s measurements and for tests of every kernel this CPU has.
#[allow(clippy::too_many_arguments)]
pub fn matmul_tuned(
    level: Level,
    tuning: Tuning,
    pool: &ThreadPool,
    w: MatRef<'_>,
    x: &[f32],
    n_tok: usize,
    out: &mut [f32],
    scratch: &mut MatmulScratch,
) -> Result<(), SimdError> {
    let wide = tuning.decode(w.ty) != Decode::Interleaved256;
    let k = kernel(w.ty, level, wide).ok_or(SimdError::UnsupportedType { ty: w.ty })?;
    check_shapes(&w, k, x, n_tok, out)?;
    let interleaved = match w.layout {
        Layout::Rows => None,
        Layout::Interleaved => Some(k.interleaved.ok_or(SimdError::NoInterleavedKernel {
            ty: w.ty,
            level: level.min(dispatch::detected()).name(),
        })?),
    };
    if n_tok == 0 || w.rows == 0 {
        return Ok(());
    }
    if w.cols == 0 {
        out.fill(0.0);
        return Ok(());
    }

    // The tiled GEMM takes whole tiles of rows; the remainder goes through the row kernels.
    // An interleaved matrix reaches it through its own packer.
    let gemm = k
        .gemm
        .filter(|_| n_tok >= GEMM_MIN_TOKENS && w.rows >= GEMM_ROWS)
        .and_then(|g| {
            let pack = match w.layout {
                Layout::Rows => g.pack,
                Layout::Interleaved => g.pack_interleaved,
            };
            Some((g, pack?))
        });

    // Quantize the activations once; every row's dot product reads them.
    let act_row = k.act.ty().row_bytes(w.cols);
    let act_len = act_row * n_tok;
    if scratch.act.len() < act_len {
        scratch.act.resize(act_len, 0);
    }
    let side_row = gemm.map_or(0, |(g, _)| w.cols / k.act.ty().block_size() * g.side_bytes);
    if scratch.side.len() < side_row * n_tok {
        scratch.side.resize(side_row * n_tok, 0);
    }
    let act = &mut scratch.act[..act_len];
    let side = &mut scratch.side[..side_row * n_tok];
    let side_fn = gemm.and_then(|(g, _)| g.side);
    let prepare = |t: usize, dst: &mut [u8], side: &mut [u8]| {
        (k.quantize)(&x[t * w.cols..(t + 1) * w.cols], dst);
        if let Some(f) = side_fn {
            f(dst, side);
        }
    };
    let parallel = w.rows.saturating_mul(w.cols).saturating_mul(n_tok) >= MIN_PARALLEL_WORK
        && pool.n_threads() > 1;
    if parallel && n_tok >= pool.n_threads() {
        let act_ptr = SyncPtr(act.as_mut_ptr());
        let side_ptr = SyncPtr(side.as_mut_ptr());
        pool.run(|ith, nth| {
            let (t0, t1) = split(n_tok, ith, nth);
            for t in t0..t1 {
                // SAFETY: token t's slices of `act` and `side` are written by this thread only
                // (token ranges are disjoint), and `run` returns before they are used again.
                let (dst, sd) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(act_ptr.get().add(t * act_row), act_row),
                        std::slice::from_raw_parts_mut(side_ptr.get().add(t * side_row), side_row),
                    )
                };
                prepare(t, dst, sd);
            }
        });
    } else {
        for t in 0..n_tok {
            let sd = &mut side[t * side_row..(t + 1) * side_row];
            prepare(t, &mut act[t * act_row..(t + 1) * act_row], sd);
        }
    }
    let act: &[u8] = act;
    let side: &[u8] = side;

    let out_ptr = SyncPtr(out.as_mut_ptr());
    let ahead = tuning.ahead(w.ty);
    let next = AtomicUsize::new(0);
    let job = |ith: usize, nth: usize| match (interleaved, gemm) {
        (Some(il), None) => {
            let tiles = w.rows / INTERLEAVE_ROWS;
            // Tiles are claimed in pieces rather than split in halves up front: a thread that
            // starts late (woken from its park) or runs slower (another tenant on its core, a
            // smaller core) leaves its share to the others instead of holding every thread at
            // the end of the matmul.
            while let Some((t0, t1)) = claim(&next, tiles, nth) {
                // SAFETY: as for the tiled GEMM below: tiles t0..t1 were claimed by this
                // thread alone (the counter hands each out once), so it writes only their rows.
                unsafe {
                    interleaved_job(il, &w, act, act_row, n_tok, t0, t1, ahead, out_ptr.get());
                }
            }
            // SAFETY: the rows after every tile are the last thread's alone.
            unsafe {
                if ith + 1 == nth {
                    let r0 = tiles * INTERLEAVE_ROWS;
                    rows_job(k, &w, act, act_row, n_tok, r0, w.rows, ahead, out_ptr.get());
                }
            }
        }
        (_, Some((g, pack))) => {
            let tiles = w.rows / GEMM_ROWS;
            let (t0, t1) = split(tiles, ith, nth);
            // SAFETY: this thread writes only the rows of its own tiles (and the last thread
            // the rows after every tile), which no other thread touches; `out` outlives the
            // pool run.
            unsafe {
                tiles_job(
                    g,
                    pack,
                    &w,
                    act,
                    act_row,
                    side,
                    side_row,
                    n_tok,
                    t0,
                    t1,
                    out_ptr.get(),
                );
                if ith + 1 == nth {
                    let r0 = tiles * GEMM_ROWS;
                    rows_job(k, &w, act, act_row, n_tok, r0, w.rows, ahead, out_ptr.get());
                }
            }
        }
        (None, None) => {
            let (r0, r1) = split(w.rows, ith, nth);
            // SAFETY: this thread writes only `out[t * rows + r]` for r in its own row range,
            // which no other thread touches, and `out` outlives the pool run.
            unsafe { rows_job(k, &w, act, act_row, n_tok, r0, r1, ahead, out_ptr.get()) };
        }
    };
    if parallel {
        pool.run(job);
    } else {
        job(0, 1);
    }
    Ok(())
}

/// Weight bytes of the tiles a prefill walks for one group of tokens before the next group:
/// the block stays in L2 while every group's activations (a few KiB) stay in L1. Walking one
/// tile through every group instead reads all the batch's activations again for each tile,
/// from L2 once they outgrow L1 (and a 20 KiB Q6_K tile beside them leaves L1 no room).
const TILE_BLOCK_BYTES: usize = 128 << 10;

/// Tiles `tile0..tile1` of an interleaved matrix, every token, in groups of
/// [`INTERLEAVED_TOKENS`]: blocks of tiles of about [`TILE_BLOCK_BYTES`], each block through
/// every group in turn. A token's arithmetic is the same whatever the order.
///
/// `ahead` is the kernels' software prefetch.
///
/// # Safety
/// As [`rows_job`], for rows `tile0 * 16..tile1 * 16`.
#[allow(clippy::too_many_arguments)]
unsafe fn interleaved_job(
    il: InterleavedFn,
    w: &MatRef<'_>,
    act: &[u8],
    act_row: usize,
    n_tok: usize,
    tile0: usize,
    tile1: usize,
    ahead: tune::Ahead,
    out: *mut f32,
) {
    let tile_bytes = INTERLEAVE_ROWS * w.ty.row_bytes(w.cols);
    let nb = w.cols / w.ty.block_size();
    let per_block = (TILE_BLOCK_BYTES / tile_bytes.max(1)).max(1);
    let mut b0 = tile0;
    while b0 < tile1 {
        let b1 = (b0 + per_block).min(tile1);
        let mut t0 = 0;
        while t0 < n_tok {
            let nt = (n_tok - t0).min(INTERLEAVED_TOKENS);
            // Only the first group reads the block from memory; the others find it in L2,
            // where a software prefetch is a wasted load slot (a quarter of the Q4_K kernel's
            // time in an AVX2 prefill's profile).
            let ahead = if t0 == 0 { ahead } else { tune::Ahead::NONE };
            for tile in b0..b1 {
                let data = &w.data[tile * tile_bytes..(tile + 1) * tile_bytes];
                // SAFETY: rows tile * 16.. + 16 of tokens t0..t0 + nt are this thread's
                // (caller's contract) and inside `out`.
                unsafe {
                    il(
                        nb,
                        data,
                        &act[t0 * act_row..],
                        act_row,
                        nt,
                        out.add(t0 * w.rows + tile * INTERLEAVE_ROWS),
                        w.rows,
                        ahead,
                    )
                };
            }
            t0 += nt;
        }
        b0 = b1;
    }
}

thread_local! {
    // Pool threads are persistent, so each packs its tiles into one buffer for the process's
    // life (the largest tile seen: 16 rows × 8960 Q4_K columns is 184 KiB, inside L2).
    static PACKED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Tiles `tile0..tile1` of the output through the tiled GEMM, every token.
///
/// # Safety
/// As [`rows_job`], for rows `tile0 * GEMM_ROWS..tile1 * GEMM_ROWS`; `side` holds `n_tok` rows
/// of `side_row` bytes.
#[allow(clippy::too_many_arguments)]
unsafe fn tiles_job(
    g: Gemm,
    pack: PackFn,
    w: &MatRef<'_>,
    act: &[u8],
    act_row: usize,
    side: &[u8],
    side_row: usize,
    n_tok: usize,
    tile0: usize,
    tile1: usize,
    out: *mut f32,
) {
    let row_bytes = w.ty.row_bytes(w.cols);
    let packed_len = w.cols / g.block_k * g.packed_block;
    PACKED.with(|cell| {
        let mut buf = cell.borrow_mut();
        // 64 spare bytes to start the tile on a cache line.
        if buf.len() < packed_len + 64 {
            buf.resize(packed_len + 64, 0);
        }
        let align = buf.as_ptr().align_offset(64);
        let packed = &mut buf[align..align + packed_len];
        for tile in tile0..tile1 {
            let r0 = tile * GEMM_ROWS;
            pack(w.cols, &w.data[r0 * row_bytes..], row_bytes, packed);
            // SAFETY: rows r0..r0 + 16 of every token are this thread's (caller's contract),
            // and out + t * rows + r0 .. + 16 lies inside `out`.
            unsafe {
                (g.run)(
                    w.cols,
                    packed,
                    act,
                    act_row,
                    side,
                    side_row,
                    n_tok,
                    out.add(r0),
                    w.rows,
                )
            };
        }
    });
}

fn check_shapes(
    w: &MatRef<'_>,
    k: Kernel,
    x: &[f32],
    n_tok: usize,
    out: &[f32],
) -> Result<(), SimdError> {
    let bs = w.ty.block_size().max(k.act.ty().block_size());
    if !w.cols.is_multiple_of(bs) {
        return Err(SimdError::Shape {
            what: "columns must be a multiple of the block size",
            expected: bs,
            actual: w.cols,
        });
    }
    let shape = |what, expected: Option<usize>, actual| match expected {
        Some(e) if e == actual => Ok(()),
        Some(e) => Err(SimdError::Shape {
            what,
            expected: e,
            actual,
        }),
        None => Err(SimdError::Shape {
            what: "size overflows usize",
            expected: usize::MAX,
            actual,
        }),
    };
    shape(
        "weight bytes",
        w.rows.checked_mul(w.ty.row_bytes(w.cols)),
        w.data.len(),
    )?;
    shape(
        "activation length (n_tok * cols)",
        n_tok.checked_mul(w.cols),
        x.len(),
    )?;
    shape(
        "output length (n_tok * rows)",
        n_tok.checked_mul(w.rows),
        out.len(),
    )?;
    Ok(())
}

/// The `ith` of `nth` contiguous ranges of `0..n`.
fn split(n: usize, ith: usize, nth: usize) -> (usize, usize) {
    (n * ith / nth, n * (ith + 1) / nth)
}

/// Computes rows `r0..r1` of the output for every token.
///
/// # Safety
/// `out` must point at `n_tok * w.rows` writable f32 that no other thread writes in columns
/// `r0..r1`; `act` holds `n_tok` rows of `act_row` bytes; `w` passed `check_shapes`. `ahead` is
/// the software prefetch along the rows (a hint: it reads past no bound).
#[allow(clippy::too_many_arguments)]
unsafe fn rows_job(
    k: Kernel,
    w: &MatRef<'_>,
    act: &[u8],
    act_row: usize,
    n_tok: usize,
    r0: usize,
    r1: usize,
    ahead: tune::Ahead,
    out: *mut f32,
) {
    let row_bytes = w.ty.row_bytes(w.cols);
    // The rows of a piece are one contiguous stream. In a batch, as the first group of tokens
    // starts each row, the row `ahead.bytes` further on is asked for (the later groups find it
    // cached): without it the row kernels streamed Q4_K from DRAM at half the interleaved
    // kernels' rate (Emerald Rapids: 6.9 against 15.0 GB/s at one thread).
    let prefetch_row = |r: usize| {
        if ahead.bytes > 0 {
            let p = w.data.as_ptr().wrapping_add(r * row_bytes + ahead.bytes);
            prefetch_span(p, row_bytes, ahead.l2);
        }
    };
    if let (1, Some(rd)) = (n_tok, k.row_decode) {
        // Decode (what a step over mapped files and streamed layers, kept in the file's layout,
        // runs): its own kernel, with the token's activations rearranged once for the whole
        // piece and the prefetch spread over each row's blocks. Asked for a row at a time, a
        // long row's lines filled the core's queues in a burst: one thread streamed
        // 1536 × 8960 Q4_K from L3 at 10.7 GiB/s at AVX2, 13.8 so.
        let run = |a: &[u8]| {
            for r in r0..r1 {
                let wr = &w.data[r * row_bytes..(r + 1) * row_bytes];
                let v = (rd.dot)(w.cols, wr, a, ahead);
                // SAFETY: r < rows, inside `out` (one token); column r is this thread's.
                unsafe { out.add(r).write(v) };
            }
        };
        let a = &act[..act_row];
        match rd.prep {
            Some(prep) => PREPARED_ACT.with_borrow_mut(|buf| {
                // `prep` writes every byte of the row's blocks: no need to clear what the last
                // matmul left.
                buf.resize(a.len(), 0);
                prep(w.cols, a, buf);
                run(buf);
            }),
            None => run(a),
        }
        return;
    }
    let mut tile = r0;
    while tile < r1 {
        let tile_end = (tile + ROW_TILE).min(r1);
        match k.multi {
            // Prefill: each weight row is unpacked once per group of tokens. A lone token
            // (decode) goes through the same kernel, so that its bits do not depend on the
            // batch it came in: each token's arithmetic in `multi` is the same for every group
            // size, while the single-token `dot` may sum its lanes in another order.
            Some(multi) => {
                let mut res = [0f32; MULTI_TOKENS];
                let mut t0 = 0;
                while t0 < n_tok {
                    let nt = (n_tok - t0).min(MULTI_TOKENS);
                    let a = &act[t0 * act_row..(t0 + nt) * act_row];
                    for r in tile..tile_end {
                        if t0 == 0 {
                            prefetch_row(r);
                        }
                        let wr = &w.data[r * row_bytes..(r + 1) * row_bytes];
                        multi(w.cols, wr, a, act_row, &mut res[..nt]);
                        for (t, &v) in res[..nt].iter().enumerate() {
                            // SAFETY: t0 + t < n_tok and r < rows, inside `out`; column r is
                            // this thread's.
                            unsafe { out.add((t0 + t) * w.rows + r).write(v) };
                        }
                    }
                    t0 += nt;
                }
            }
            _ => {
                for t in 0..n_tok {
                    let a = &act[t * act_row..(t + 1) * act_row];
                    for r in tile..tile_end {
                        if t == 0 {
                            prefetch_row(r);
                        }
                        let wr = &w.data[r * row_bytes..(r + 1) * row_bytes];
                        let v = (k.dot)(w.cols, wr, a);
                        // SAFETY: t < n_tok and r < rows, inside `out`; column r is this
                        // thread's.
                        unsafe { out.add(t * w.rows + r).write(v) };
                    }
                }
            }
        }
        tile = tile_end;
    }
}

thread_local! {
    /// A thread's rearranged activation row for [`kernels::RowDecode`] (one token's: a few
    /// KiB, kept for the next matmul).
    static PREPARED_ACT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Asks for the `len` bytes at `p` to be brought into the cache (L2 only with `l2`), as a
/// hint: it never faults, even past the end of an allocation. A no-op off x86-64.
#[inline]
fn prefetch_span(p: *const u8, len: usize, l2: bool) {
    #[cfg(target_arch = "x86_64")]
    crate::arch::x86_64::interleaved::prefetch(p, len, l2);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len, l2);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Threads claiming at once get every index exactly once, in pieces that shrink to single
    /// tiles at the end; the first piece is a `1 / (2 nth)` share.
    #[test]
    fn claimed_pieces_cover_the_work_once_and_shrink() {
        for (total, nth) in [
            (0, 2),
            (1, 2),
            (7, 1),
            (96, 2),
            (560, 2),
            (1000, 3),
            (4096, 8),
        ] {
            let next = AtomicUsize::new(0);
            let pieces = std::sync::Mutex::new(Vec::new());
            std::thread::scope(|s| {
                for _ in 0..nth {
                    s.spawn(|| {
                        while let Some(p) = claim(&next, total, nth) {
                            pieces.lock().expect("lock").push(p);
                        }
                    });
                }
            });
            let mut pieces = pieces.into_inner().expect("lock");
            pieces.sort_unstable();
            let mut at = 0;
            for &(a, b) in &pieces {
                assert!(a == at && b > a, "{total}/{nth}: {pieces:?}");
                at = b;
            }
            assert_eq!(at, total);
            if total > 0 {
                assert_eq!(pieces.last().map(|p| p.1 - p.0), Some(1), "{pieces:?}");
                assert_eq!(pieces[0].1, (total / (2 * nth)).max(1));
            }
        }
    }
}
