//! `matvec.cu`: decode, `y[t] = W · x[t]` for 1 to 8 tokens per read of the weights, and its
//! mixture-of-experts form.

use super::matmul::{
    At, Experts, MATVEC_MAX_TOKENS, Weight, check_weight, is_quantized, kernel_names, size,
};
use super::quantize::q8_1_bytes;
use crate::device::{Arg, KernelError, LaunchConfig, Stream};

/// Rows per block (a warp each).
const ROWS_PER_BLOCK: usize = 4;

const MATVEC: [[&str; 13]; MATVEC_MAX_TOKENS] = [
    kernel_names!("matvec_", "_n1"),
    kernel_names!("matvec_", "_n2"),
    kernel_names!("matvec_", "_n3"),
    kernel_names!("matvec_", "_n4"),
    kernel_names!("matvec_", "_n5"),
    kernel_names!("matvec_", "_n6"),
    kernel_names!("matvec_", "_n7"),
    kernel_names!("matvec_", "_n8"),
];
const MATVEC_ID: [&str; 13] = kernel_names!("matvec_id_", "");

/// Checks the activations of `rows` rows for weights of `w`'s type; returns their address and,
/// for float weights, whether the 16-byte path applies.
fn check_x(
    x: At<'_>,
    quantized: bool,
    rows: usize,
    cols: usize,
) -> Result<(u64, i32), KernelError> {
    if quantized {
        Ok((x.check(q8_1_bytes(rows, cols), 4, "matvec x (q8_1)")?, 0))
    } else {
        let p = x.check(size(&[rows, cols, 4]), 4, "matvec x (f32)")?;
        // Eight values per lane and step need 16-byte rows of weights (address checked by
        // check_weight) and of activations.
        Ok((p, i32::from(cols.is_multiple_of(8) && p.is_multiple_of(16))))
    }
}

/// `y[t][r] = Σ_c W[r][c] · x[t][c]` for `n` (at most 8) tokens. `x`: for quantized weights the
/// q8_1 blocks of [`super::quantize::quantize_q8_1`] (`[n][cols / 32]`), for F32/F16/BF16
/// weights f32 `[n][cols]`; `y` f32 `[n][rows]`.
pub fn matvec(s: &Stream, w: &Weight, x: At<'_>, n: usize, y: At<'_>) -> Result<(), KernelError> {
    let ti = check_weight(w.ty, w.ptr, w.rows, w.cols, "matvec weights")?;
    if n > MATVEC_MAX_TOKENS {
        return Err(KernelError::Invalid(format!(
            "matvec: {n} tokens (at most {MATVEC_MAX_TOKENS} per launch)"
        )));
    }
    let quant = is_quantized(w.ty);
    let (xp, vec) = check_x(x, quant, n, w.cols)?;
    let yp = y.check(size(&[n, w.rows, 4]), 4, "matvec y")?;
    if n == 0 || w.rows == 0 {
        return Ok(());
    }
    let k = s.device().kernel(MATVEC[n - 1][ti])?;
    let grid = LaunchConfig::linear(w.rows.div_ceil(ROWS_PER_BLOCK) as u32, 128);
    let (rows, cols) = (Arg::I32(w.rows as i32), Arg::I32(w.cols as i32));
    if quant {
        s.launch(
            k,
            grid,
            &[Arg::Ptr(w.ptr), Arg::Ptr(xp), Arg::Ptr(yp), rows, cols],
        )
    } else {
        s.launch(
            k,
            grid,
            &[
                Arg::Ptr(w.ptr),
                Arg::Ptr(xp),
                Arg::Ptr(yp),
                rows,
                cols,
                Arg::I32(vec),
            ],
        )
    }
}

/// Mixture of experts, one token per weight read: for each pair `p = t · n_slot + k`,
/// `y[p] = W[ids[p]] · x[row]` with `row` = `t` (`x_per_slot` false) or `p` (true). `x` as for
/// [`matvec`] with that many rows; `ids` i32 `[n_tok][n_slot]` on the device; `y` f32
/// `[n_tok][n_slot][rows]`, NaN rows for ids outside `0..n_expert`.
#[allow(clippy::too_many_arguments)]
pub fn matvec_id(
    s: &Stream,
    w: &Experts,
    x: At<'_>,
    x_per_slot: bool,
    ids: At<'_>,
    n_tok: usize,
    n_slot: usize,
    y: At<'_>,
) -> Result<(), KernelError> {
    let ti = check_weight(w.ty, w.ptr, w.rows, w.cols, "matvec_id experts")?;
    check_experts(w)?;
    let n_pairs = size(&[n_tok, n_slot]);
    if n_pairs > 65535 {
        return Err(KernelError::Invalid(format!(
            "matvec_id: {n_pairs} (token, slot) pairs (at most 65535 per launch)"
        )));
    }
    let quant = is_quantized(w.ty);
    let x_rows = if x_per_slot { n_pairs } else { n_tok };
    let (xp, vec) = check_x(x, quant, x_rows, w.cols)?;
    let ip = ids.check(size(&[n_pairs, 4]), 4, "matvec_id ids")?;
    let yp = y.check(size(&[n_pairs, w.rows, 4]), 4, "matvec_id y")?;
    if n_pairs == 0 || w.rows == 0 {
        return Ok(());
    }
    let k = s.device().kernel(MATVEC_ID[ti])?;
    let grid = LaunchConfig {
        grid: (w.rows.div_ceil(ROWS_PER_BLOCK) as u32, n_pairs as u32, 1),
        block: (128, 1, 1),
    };
    let args = [
        Arg::Ptr(w.ptr),
        Arg::I64(w.stride as i64),
        Arg::I32(w.n_expert as i32),
        Arg::Ptr(ip),
        Arg::I32(n_slot as i32),
        Arg::Ptr(xp),
        Arg::I32(i32::from(x_per_slot)),
        Arg::Ptr(yp),
        Arg::I32(w.rows as i32),
        Arg::I32(w.cols as i32),
        Arg::I32(vec),
    ];
    // Float weights take the `vec` flag as their last argument.
    s.launch(k, grid, &args[..if quant { 10 } else { 11 }])
}

/// Checks an expert stack's count and stride.
pub(crate) fn check_experts(w: &Experts) -> Result<(), KernelError> {
    let bytes = size(&[w.rows, w.ty.row_bytes(w.cols)]);
    if w.n_expert == 0 || w.n_expert > i32::MAX as usize {
        return Err(KernelError::Invalid(format!(
            "experts: {} experts",
            w.n_expert
        )));
    }
    if w.n_expert > 1 && (w.stride < bytes || !w.stride.is_multiple_of(16)) {
        return Err(KernelError::Invalid(format!(
            "experts: a stride of {} bytes between {bytes}-byte matrices (must be at least a \
             matrix and a multiple of 16)",
            w.stride
        )));
    }
    Ok(())
}
