//! `gemm.cu`: prefill, `y[t] = W · x[t]` for many tokens on tensor cores, and its
//! mixture-of-experts form (tokens grouped by expert on the device).

use strata_storage::quant::GgmlType;

use super::matmul::{At, Experts, Weight, check_weight, is_quantized, kernel_names, size};
use super::matvec::check_experts;
use super::quantize::q8_1_mmq_bytes;
use crate::device::{Arg, KernelError, LaunchConfig, Stream};

/// The tile every GEMM computes: 64 weight rows × 64 tokens.
pub const TILE: usize = 64;

const GEMM: [&str; 13] = kernel_names!("gemm_", "");
const GEMM_ID: [&str; 13] = kernel_names!("gemm_id_", "");

/// The activations a GEMM takes, by weight type.
#[derive(Clone, Copy, Debug)]
pub enum Acts<'a> {
    /// For quantized weights: the prefill q8_1 layout of
    /// [`super::quantize::quantize_q8_1_mmq`].
    Q8_1 { qs: At<'a>, ds: At<'a> },
    /// For F16 (BF16) weights: f16 (bf16) `[rows][cols]`, 16-byte aligned.
    Half(At<'a>),
    /// For F32 weights: f32 `[rows][cols]`.
    F32(At<'a>),
}

/// The checked activation addresses for `x_rows` rows: one or two pointers.
fn check_acts(
    acts: Acts<'_>,
    ty: GgmlType,
    x_rows: usize,
    cols: usize,
) -> Result<(u64, Option<u64>), KernelError> {
    match (acts, ty) {
        (Acts::Q8_1 { qs, ds }, t) if is_quantized(t) => {
            let (qb, db) = q8_1_mmq_bytes(x_rows, cols);
            Ok((
                qs.check(qb, 16, "gemm activations (quants)")?,
                Some(ds.check(db, 16, "gemm activations (scales)")?),
            ))
        }
        (Acts::Half(x), GgmlType::F16 | GgmlType::Bf16) => {
            if !cols.is_multiple_of(8) {
                return Err(KernelError::Invalid(format!(
                    "gemm: {ty} weights of {cols} columns (the tensor-core GEMM takes multiples \
                     of 8)"
                )));
            }
            Ok((
                x.check(size(&[x_rows, cols, 2]), 16, "gemm activations")?,
                None,
            ))
        }
        (Acts::F32(x), GgmlType::F32) => Ok((
            x.check(size(&[x_rows, cols, 4]), 4, "gemm activations")?,
            None,
        )),
        _ => Err(KernelError::Invalid(format!(
            "gemm: these activations do not go with {ty} weights"
        ))),
    }
}

fn threads(ty: GgmlType) -> u32 {
    if ty == GgmlType::F32 { 256 } else { 128 }
}

fn row_tiles(rows: usize) -> Result<u32, KernelError> {
    let t = rows.div_ceil(TILE);
    if t > 65535 {
        return Err(KernelError::Invalid(format!(
            "gemm: {rows} rows (at most {} per launch)",
            65535 * TILE
        )));
    }
    Ok(t as u32)
}

/// `y[t][r] = Σ_c W[r][c] · x[t][c]` for `n` tokens: `acts` as [`Acts`] says for `w.ty`, `y`
/// f32 `[n][rows]`.
pub fn gemm(
    s: &Stream,
    w: &Weight,
    acts: Acts<'_>,
    n: usize,
    y: At<'_>,
) -> Result<(), KernelError> {
    let ti = check_weight(w.ty, w.ptr, w.rows, w.cols, "gemm weights")?;
    let (xa, xb) = check_acts(acts, w.ty, n, w.cols)?;
    let yp = y.check(size(&[n, w.rows, 4]), 4, "gemm y")?;
    super::dim(n, "gemm tokens")?;
    if n == 0 || w.rows == 0 {
        return Ok(());
    }
    let k = s.device().kernel(GEMM[ti])?;
    let cfg = LaunchConfig {
        grid: (n.div_ceil(TILE) as u32, row_tiles(w.rows)?, 1),
        block: (threads(w.ty), 1, 1),
    };
    let (rows, cols, n) = (
        Arg::I32(w.rows as i32),
        Arg::I32(w.cols as i32),
        Arg::I32(n as i32),
    );
    match xb {
        Some(ds) => s.launch(
            k,
            cfg,
            &[
                Arg::Ptr(w.ptr),
                Arg::Ptr(xa),
                Arg::Ptr(ds),
                Arg::Ptr(yp),
                rows,
                cols,
                n,
            ],
        ),
        None => s.launch(
            k,
            cfg,
            &[Arg::Ptr(w.ptr), Arg::Ptr(xa), Arg::Ptr(yp), rows, cols, n],
        ),
    }
}

/// Tiles `moe_group` may make for `n_pairs` pairs among `n_expert` experts (and the bucket of
/// ids out of range): each expert's last tile may be partial.
pub fn moe_max_tiles(n_pairs: usize, n_expert: usize) -> usize {
    n_pairs
        .div_ceil(TILE)
        .saturating_add(n_expert)
        .saturating_add(1)
}

/// The experts `moe_group` takes at most.
pub const MOE_MAX_EXPERTS: usize = 1023;

/// Groups `n_pairs` (token, slot) pairs by the expert `ids` (i32 `[n_pairs]`, on the device)
/// chose: `pairs` i32 `[n_pairs]` gets the pair indices ordered by expert (stable), `tiles`
/// `[moe_max_tiles]` × 4 i32 `{expert (-1: id out of range), first entry of pairs, count ≤ 64,
/// 0}`, unused tiles with count 0.
pub fn moe_group(
    s: &Stream,
    ids: At<'_>,
    n_pairs: usize,
    n_expert: usize,
    pairs: At<'_>,
    tiles: At<'_>,
) -> Result<(), KernelError> {
    if n_expert == 0 || n_expert > MOE_MAX_EXPERTS {
        return Err(KernelError::Invalid(format!(
            "moe_group: {n_expert} experts (1 to {MOE_MAX_EXPERTS})"
        )));
    }
    let max_tiles = moe_max_tiles(n_pairs, n_expert);
    let ip = ids.check(size(&[n_pairs, 4]), 4, "moe_group ids")?;
    let pp = pairs.check(size(&[n_pairs, 4]), 4, "moe_group pairs")?;
    let tp = tiles.check(size(&[max_tiles, 16]), 16, "moe_group tiles")?;
    super::dim(max_tiles, "moe_group tiles")?;
    let k = s.device().kernel("moe_group")?;
    s.launch(
        k,
        LaunchConfig::linear(1, 256),
        &[
            Arg::Ptr(ip),
            Arg::I32(n_pairs as i32),
            Arg::I32(n_expert as i32),
            Arg::Ptr(pp),
            Arg::Ptr(tp),
            Arg::I32(max_tiles as i32),
        ],
    )
}

/// The grouped GEMM over [`moe_group`]'s `pairs` and `tiles`: for each pair `p = t · n_slot + k`,
/// `y[p] = W[ids[p]] · x[row]`, `row` = `t` or (`x_per_slot`) `p`; `acts` for that many rows as
/// [`Acts`] says; `y` f32 `[n_tok][n_slot][rows]`, NaN rows for ids out of range.
#[allow(clippy::too_many_arguments)]
pub fn gemm_id(
    s: &Stream,
    w: &Experts,
    acts: Acts<'_>,
    x_per_slot: bool,
    pairs: At<'_>,
    tiles: At<'_>,
    n_tok: usize,
    n_slot: usize,
    y: At<'_>,
) -> Result<(), KernelError> {
    let ti = check_weight(w.ty, w.ptr, w.rows, w.cols, "gemm_id experts")?;
    check_experts(w)?;
    let n_pairs = size(&[n_tok, n_slot]);
    let x_rows = if x_per_slot { n_pairs } else { n_tok };
    let (xa, xb) = check_acts(acts, w.ty, x_rows, w.cols)?;
    let max_tiles = moe_max_tiles(n_pairs, w.n_expert);
    let pp = pairs.check(size(&[n_pairs, 4]), 4, "gemm_id pairs")?;
    let tp = tiles.check(size(&[max_tiles, 16]), 16, "gemm_id tiles")?;
    let yp = y.check(size(&[n_pairs, w.rows, 4]), 4, "gemm_id y")?;
    super::dim(n_pairs, "gemm_id pairs")?;
    if n_pairs == 0 || w.rows == 0 {
        return Ok(());
    }
    let k = s.device().kernel(GEMM_ID[ti])?;
    let cfg = LaunchConfig {
        grid: (max_tiles as u32, row_tiles(w.rows)?, 1),
        block: (threads(w.ty), 1, 1),
    };
    let tail = [
        Arg::Ptr(pp),
        Arg::Ptr(tp),
        Arg::I32(n_slot as i32),
        Arg::I32(i32::from(x_per_slot)),
        Arg::Ptr(yp),
        Arg::I32(w.rows as i32),
        Arg::I32(w.cols as i32),
    ];
    let head = [Arg::Ptr(w.ptr), Arg::I64(w.stride as i64), Arg::Ptr(xa)];
    match xb {
        Some(ds) => {
            let mut a = [Arg::I32(0); 11];
            a[..3].copy_from_slice(&head);
            a[3] = Arg::Ptr(ds);
            a[4..].copy_from_slice(&tail);
            s.launch(k, cfg, &a)
        }
        None => {
            let mut a = [Arg::I32(0); 10];
            a[..3].copy_from_slice(&head);
            a[3..].copy_from_slice(&tail);
            s.launch(k, cfg, &a)
        }
    }
}
