//! `quantize.cu`: f32 activations to q8_1 for the integer dot products, in the decode layout
//! (ggml's `block_q8_1`) or the prefill layout the GEMM copies from (quants and f32 scales apart).

use super::dim;
use super::matmul::{At, size};
use crate::device::{Arg, KernelError, LaunchConfig, Stream};

/// Warps (q8_1 blocks) per launched block of 256 threads.
const BLOCKS_PER_LAUNCH_BLOCK: usize = 8;
/// Bytes of one `block_q8_1`: f16 d, f16 s, 32 quants.
pub const Q8_1_BLOCK: usize = 36;

/// Bytes of `n` rows of `cols` values as q8_1 blocks.
pub fn q8_1_bytes(n: usize, cols: usize) -> usize {
    size(&[n, cols / 32, Q8_1_BLOCK])
}

/// Bytes of the prefill layout's two parts: the quants (`n · cols`) and the scales (`n · cols / 32`
/// float4s).
pub fn q8_1_mmq_bytes(n: usize, cols: usize) -> (usize, usize) {
    (size(&[n, cols]), size(&[n, cols / 32, 16]))
}

fn check_shape(n: usize, cols: usize, what: &str) -> Result<usize, KernelError> {
    if !cols.is_multiple_of(32) {
        return Err(KernelError::Invalid(format!(
            "{what}: {cols} columns is not a multiple of 32"
        )));
    }
    let blocks = n
        .checked_mul(cols / 32)
        .filter(|&b| b.div_ceil(BLOCKS_PER_LAUNCH_BLOCK) <= i32::MAX as usize)
        .ok_or_else(|| KernelError::Invalid(format!("{what}: {n} rows of {cols} is too large")))?;
    dim(cols, "cols")?;
    Ok(blocks)
}

/// `x` f32 `[n][cols]` → `y` `block_q8_1` `[n][cols / 32]` ([`q8_1_bytes`]): per 32 values
/// `d = amax / 127`, `q = round(x / d)`, `s = d · Σq` (ggml's `quantize_row_q8_1`, byte for byte).
pub fn quantize_q8_1(
    s: &Stream,
    x: At<'_>,
    y: At<'_>,
    n: usize,
    cols: usize,
) -> Result<(), KernelError> {
    let blocks = check_shape(n, cols, "quantize_q8_1")?;
    let xp = x.check(size(&[n, cols, 4]), 4, "quantize_q8_1 x")?;
    let yp = y.check(q8_1_bytes(n, cols), 4, "quantize_q8_1 y")?;
    if blocks == 0 {
        return Ok(());
    }
    let k = s.device().kernel("quantize_q8_1")?;
    s.launch(
        k,
        LaunchConfig::linear(blocks.div_ceil(BLOCKS_PER_LAUNCH_BLOCK) as u32, 256),
        &[Arg::Ptr(xp), Arg::Ptr(yp), Arg::I64(blocks as i64)],
    )
}

/// `x` f32 `[n][cols]` → the prefill layout: `qs` int8 `[n][cols]` (the same quants as
/// [`quantize_q8_1`]) and `ds` float4 `[n][cols / 32]` = `{d, d·Σq, d·Σq[..16], d·Σq[16..]}` in
/// f32 (sizes: [`q8_1_mmq_bytes`]). Both 16-byte aligned: the GEMM copies them with cp.async.
pub fn quantize_q8_1_mmq(
    s: &Stream,
    x: At<'_>,
    qs: At<'_>,
    ds: At<'_>,
    n: usize,
    cols: usize,
) -> Result<(), KernelError> {
    let blocks = check_shape(n, cols, "quantize_q8_1_mmq")?;
    let (qb, db) = q8_1_mmq_bytes(n, cols);
    let xp = x.check(size(&[n, cols, 4]), 4, "quantize_q8_1_mmq x")?;
    let qp = qs.check(qb, 16, "quantize_q8_1_mmq qs")?;
    let dp = ds.check(db, 16, "quantize_q8_1_mmq ds")?;
    if blocks == 0 {
        return Ok(());
    }
    let k = s.device().kernel("quantize_q8_1_mmq")?;
    s.launch(
        k,
        LaunchConfig::linear(blocks.div_ceil(BLOCKS_PER_LAUNCH_BLOCK) as u32, 256),
        &[
            Arg::Ptr(xp),
            Arg::Ptr(qp),
            Arg::Ptr(dp),
            Arg::I64(blocks as i64),
        ],
    )
}
