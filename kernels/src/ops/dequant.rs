//! `dequant.cu`: weights back to floats — whole matrices to f16 (the cuBLAS comparison path),
//! rows picked by token id to f32 (the embedding lookup), and f32 activations to f16/bf16.

use super::matmul::{At, Weight, check_weight, is_quantized, kernel_names, size};
use crate::device::{Arg, KernelError, LaunchConfig, Stream};

const THREADS: usize = 256;
const DEQUANT_F16: [&str; 13] = kernel_names!("dequant_f16_", "");
const GET_ROWS: [&str; 13] = kernel_names!("get_rows_", "");

/// Threads a launch over `rows` rows of `cols` values of `w`'s type needs: one per 32-value
/// sub-block of quantized rows, one per value of float rows.
fn items(quantized: bool, rows: usize, cols: usize) -> Result<usize, KernelError> {
    let per_row = if quantized { cols / 32 } else { cols };
    rows.checked_mul(per_row)
        .filter(|&n| n.div_ceil(THREADS) <= i32::MAX as usize)
        .ok_or_else(|| KernelError::Invalid(format!("{rows} rows of {cols} is too large")))
}

/// `y` f16 `[rows][cols]` = `w` dequantized (each value rounded once to f16, to nearest).
pub fn dequant_f16(s: &Stream, w: &Weight, y: At<'_>) -> Result<(), KernelError> {
    let ti = check_weight(w.ty, w.ptr, w.rows, w.cols, "dequant_f16 weights")?;
    let yp = y.check(size(&[w.rows, w.cols, 2]), 16, "dequant_f16 y")?;
    let n = items(is_quantized(w.ty), w.rows, w.cols)?;
    if n == 0 {
        return Ok(());
    }
    let k = s.device().kernel(DEQUANT_F16[ti])?;
    s.launch(
        k,
        LaunchConfig::linear(n.div_ceil(THREADS) as u32, THREADS as u32),
        &[
            Arg::Ptr(w.ptr),
            Arg::Ptr(yp),
            Arg::I32(w.cols as i32),
            Arg::I64(n as i64),
        ],
    )
}

/// `y` f32 `[n_ids][cols]`: row `ids[i]` of `table` (`table.rows` rows) times `scale`, for the
/// `n_ids` i32 ids on the device (ggml's GET_ROWS: the embedding lookup; Gemma's `scale` is
/// √n_embd, others pass 1). An id outside the table gives a NaN row.
pub fn get_rows(
    s: &Stream,
    table: &Weight,
    ids: At<'_>,
    n_ids: usize,
    y: At<'_>,
    scale: f32,
) -> Result<(), KernelError> {
    let ti = check_weight(
        table.ty,
        table.ptr,
        table.rows,
        table.cols,
        "get_rows table",
    )?;
    let ip = ids.check(size(&[n_ids, 4]), 4, "get_rows ids")?;
    let yp = y.check(size(&[n_ids, table.cols, 4]), 16, "get_rows y")?;
    let n = items(is_quantized(table.ty), n_ids, table.cols)?;
    if n == 0 {
        return Ok(());
    }
    let k = s.device().kernel(GET_ROWS[ti])?;
    s.launch(
        k,
        LaunchConfig::linear(n.div_ceil(THREADS) as u32, THREADS as u32),
        &[
            Arg::Ptr(table.ptr),
            Arg::Ptr(ip),
            Arg::Ptr(yp),
            Arg::I32(table.rows as i32),
            Arg::I32(table.cols as i32),
            Arg::I64(n as i64),
            Arg::F32(scale),
        ],
    )
}

fn convert(s: &Stream, kernel: &str, x: At<'_>, y: At<'_>, n: usize) -> Result<(), KernelError> {
    let xp = x.check(size(&[n, 4]), 4, "convert x")?;
    let yp = y.check(size(&[n, 2]), 2, "convert y")?;
    let blocks = n.div_ceil(THREADS);
    if blocks > i32::MAX as usize {
        return Err(KernelError::Invalid(format!(
            "convert: {n} values is too many"
        )));
    }
    if n == 0 {
        return Ok(());
    }
    let k = s.device().kernel(kernel)?;
    if kernel == "convert_f32_bf16" {
        s.launch(
            k,
            LaunchConfig::linear(blocks as u32, THREADS as u32),
            &[Arg::Ptr(xp), Arg::Ptr(yp), Arg::I64(n as i64)],
        )
    } else {
        // dequant_f16_f32(w, y, cols, n): cols is unused by the float kernels.
        s.launch(
            k,
            LaunchConfig::linear(blocks as u32, THREADS as u32),
            &[Arg::Ptr(xp), Arg::Ptr(yp), Arg::I32(0), Arg::I64(n as i64)],
        )
    }
}

/// `y` f16 `[n]` = `x` f32 `[n]`, rounded to nearest (even).
pub fn convert_f32_f16(s: &Stream, x: At<'_>, y: At<'_>, n: usize) -> Result<(), KernelError> {
    convert(s, "dequant_f16_f32", x, y, n)
}

/// `y` bf16 `[n]` = `x` f32 `[n]`, rounded to nearest (even).
pub fn convert_f32_bf16(s: &Stream, x: At<'_>, y: At<'_>, n: usize) -> Result<(), KernelError> {
    convert(s, "convert_f32_bf16", x, y, n)
}
