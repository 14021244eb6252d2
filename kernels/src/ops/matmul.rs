//! The matrix products the engine calls for every projection: `y[t] = W · x[t]` with `W` in any
//! weight type the engine loads, on the device.
//!
//! [`matmul`] is the one entry point: it quantizes f32 activations to q8_1 where the weights are
//! quantized and picks the decode kernel (`matvec.cu`, up to [`MATVEC_MAX_TOKENS`] tokens per
//! read of the weights) or the prefill GEMM (`gemm.cu`, tensor cores). [`matmul_id`] does the
//! same for a mixture of experts, the expert of each (token, slot) chosen on the device.
//! [`matmul_cublas`] is the comparison path: weights dequantized to f16 and cuBLAS's GEMM (on
//! the simulator, a reference loop).
//!
//! Weights are named by device address ([`Weight`], [`Experts`]): the engine keeps many tensors
//! in one allocation. The caller guarantees that the address holds the tensor; the simulator
//! checks every access the kernels make, a GPU faults. Activations, outputs and scratch are
//! [`At`]s, checked against their buffers before anything is queued.

use strata_storage::quant::GgmlType;

use super::{dequant, gemm, matvec, quantize};
use crate::device::{DeviceBuffer, KernelError, Stream};

/// Tokens the decode kernels take per read of the weights; more go to the GEMM.
pub const MATVEC_MAX_TOKENS: usize = 8;

/// A place in device memory: a buffer and a byte offset into it.
#[derive(Clone, Copy, Debug)]
pub struct At<'a> {
    pub buf: &'a DeviceBuffer,
    pub offset: usize,
}

impl<'a> At<'a> {
    pub fn new(buf: &'a DeviceBuffer, offset: usize) -> Self {
        At { buf, offset }
    }

    /// The place `bytes` further on.
    pub fn skip(self, bytes: usize) -> Self {
        At {
            buf: self.buf,
            offset: self.offset.saturating_add(bytes),
        }
    }

    /// The device address, after checking that `bytes` fit from here and that the address is
    /// `align`-byte aligned (`what` names the operand in errors).
    pub(crate) fn check(self, bytes: usize, align: u64, what: &str) -> Result<u64, KernelError> {
        if self
            .offset
            .checked_add(bytes)
            .is_none_or(|e| e > self.buf.len())
        {
            return Err(KernelError::Invalid(format!(
                "{what}: needs {bytes} bytes at offset {}, the buffer has {}",
                self.offset,
                self.buf.len()
            )));
        }
        let p = self.buf.at(self.offset);
        if !p.is_multiple_of(align) {
            return Err(KernelError::Invalid(format!(
                "{what}: device address {p:#x} is not {align}-byte aligned"
            )));
        }
        Ok(p)
    }
}

impl<'a> From<&'a DeviceBuffer> for At<'a> {
    fn from(buf: &'a DeviceBuffer) -> Self {
        At { buf, offset: 0 }
    }
}

/// A weight matrix in device memory: `rows` rows of `cols` values of type `ty`, row-major, each
/// row `ty.row_bytes(cols)` bytes (GGUF's layout), starting at device address `ptr`.
#[derive(Clone, Copy, Debug)]
pub struct Weight {
    pub ptr: u64,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
}

/// `n_expert` weight matrices of one shape, `stride` bytes apart (a MoE layer's experts).
#[derive(Clone, Copy, Debug)]
pub struct Experts {
    pub ptr: u64,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub n_expert: usize,
    pub stride: usize,
}

impl Experts {
    /// Expert `e`'s matrix.
    pub fn expert(&self, e: usize) -> Weight {
        Weight {
            ptr: self.ptr.wrapping_add(e.saturating_mul(self.stride) as u64),
            ty: self.ty,
            rows: self.rows,
            cols: self.cols,
        }
    }
}

/// Every weight type the kernels take: the types the engine loads.
pub const TYPES: [GgmlType; 13] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Bf16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2K,
    GgmlType::Q3K,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

/// Whether the kernels take weights of type `ty`.
pub fn supported(ty: GgmlType) -> bool {
    type_index(ty).is_some()
}

/// `ty`'s place in [`TYPES`], which orders the kernel-name tables.
pub(crate) fn type_index(ty: GgmlType) -> Option<usize> {
    TYPES.iter().position(|&t| t == ty)
}

/// One kernel name per type of [`TYPES`], in its order: `prefix` + type + `suffix`, made at
/// compile time so that a launch allocates nothing.
macro_rules! kernel_names {
    ($prefix:literal, $suffix:literal) => {
        [
            concat!($prefix, "f32", $suffix),
            concat!($prefix, "f16", $suffix),
            concat!($prefix, "bf16", $suffix),
            concat!($prefix, "q4_0", $suffix),
            concat!($prefix, "q4_1", $suffix),
            concat!($prefix, "q5_0", $suffix),
            concat!($prefix, "q5_1", $suffix),
            concat!($prefix, "q8_0", $suffix),
            concat!($prefix, "q2_K", $suffix),
            concat!($prefix, "q3_K", $suffix),
            concat!($prefix, "q4_K", $suffix),
            concat!($prefix, "q5_K", $suffix),
            concat!($prefix, "q6_K", $suffix),
        ]
    };
}
pub(crate) use kernel_names;

/// Whether `ty` is one of the quantized types (activations go as q8_1).
pub(crate) fn is_quantized(ty: GgmlType) -> bool {
    !matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16)
}

/// Checks a weight's type and shape and its address's alignment; returns the type's index in
/// [`TYPES`]. Weight addresses must be 16-byte aligned (GGUF aligns tensor data to 32): the
/// kernels read blocks with 2- to 16-byte loads.
pub(crate) fn check_weight(
    ty: GgmlType,
    ptr: u64,
    rows: usize,
    cols: usize,
    what: &str,
) -> Result<usize, KernelError> {
    let index = type_index(ty).ok_or_else(|| {
        KernelError::Invalid(format!("{what}: the GPU kernels do not take {ty} weights"))
    })?;
    let bs = if is_quantized(ty) { ty.block_size() } else { 1 };
    if cols == 0 || !cols.is_multiple_of(bs) {
        return Err(KernelError::Invalid(format!(
            "{what}: {cols} columns is not a positive multiple of {ty}'s block of {bs}"
        )));
    }
    if !ptr.is_multiple_of(16) {
        return Err(KernelError::Invalid(format!(
            "{what}: weights at {ptr:#x} are not 16-byte aligned"
        )));
    }
    super::dim(rows, "rows")?;
    super::dim(cols, "cols")?;
    Ok(index)
}

fn align256(v: usize) -> usize {
    v.div_ceil(256).saturating_mul(256)
}

/// The product of `parts`, saturating: a size too large for memory then fails the bounds
/// checks with its number instead of wrapping around.
pub(crate) fn size(parts: &[usize]) -> usize {
    parts.iter().fold(1usize, |a, &b| a.saturating_mul(b))
}

/// How [`matmul`] computes `n` tokens against weights of type `ty`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plan {
    /// q8_1 activations in scratch, then `matvec`.
    Q8Matvec,
    /// q8_1 activations (prefill layout) in scratch, then the int8 GEMM.
    Q8Gemm,
    /// f32 activations straight to `matvec` (float weights), 8 tokens per launch.
    FloatMatvec,
    /// activations converted to the weights' f16/bf16 in scratch, then the tensor-core GEMM.
    HalfGemm,
    /// f32 weights and activations, the tiled GEMM.
    F32Gemm,
}

fn plan(ty: GgmlType, cols: usize, n: usize) -> Plan {
    if is_quantized(ty) {
        return if n <= MATVEC_MAX_TOKENS {
            Plan::Q8Matvec
        } else {
            Plan::Q8Gemm
        };
    }
    if n <= MATVEC_MAX_TOKENS {
        return Plan::FloatMatvec;
    }
    match ty {
        GgmlType::F32 => Plan::F32Gemm,
        // The tensor-core GEMM copies 8 values (16 bytes) at a time: rows must be 16-byte
        // aligned (the matrix is, check_weight). Other shapes take the matvec path, 8 tokens per
        // launch.
        _ if cols.is_multiple_of(8) => Plan::HalfGemm,
        _ => Plan::FloatMatvec,
    }
}

/// Scratch bytes [`matmul`] needs for `n` tokens of `cols` values against weights of type `ty`.
pub fn matmul_scratch_bytes(ty: GgmlType, cols: usize, n: usize) -> usize {
    match plan(ty, cols, n) {
        Plan::Q8Matvec => quantize::q8_1_bytes(n, cols),
        Plan::Q8Gemm => {
            let (qs, ds) = quantize::q8_1_mmq_bytes(n, cols);
            align256(qs).saturating_add(ds)
        }
        Plan::HalfGemm => size(&[n, cols, 2]),
        Plan::FloatMatvec | Plan::F32Gemm => 0,
    }
}

/// `y[t][r] = Σ_c W[r][c] · x[t][c]` for `n` tokens: `x` f32 `[n][w.cols]`, `y` f32
/// `[n][w.rows]`, `scratch` at least [`matmul_scratch_bytes`]`(w.ty, w.cols, n)` bytes (16-byte
/// aligned) that nothing else uses until the stream has run this call's work.
pub fn matmul(
    s: &Stream,
    w: &Weight,
    x: At<'_>,
    n: usize,
    y: At<'_>,
    scratch: At<'_>,
) -> Result<(), KernelError> {
    check_weight(w.ty, w.ptr, w.rows, w.cols, "matmul weights")?;
    super::dim(n, "matmul tokens")?;
    if n == 0 {
        return Ok(());
    }
    let cols = w.cols;
    match plan(w.ty, cols, n) {
        Plan::Q8Matvec => {
            quantize::quantize_q8_1(s, x, scratch, n, cols)?;
            matvec::matvec(s, w, scratch, n, y)
        }
        Plan::Q8Gemm => {
            let (qs, _) = quantize::q8_1_mmq_bytes(n, cols);
            let ds = scratch.skip(align256(qs));
            quantize::quantize_q8_1_mmq(s, x, scratch, ds, n, cols)?;
            gemm::gemm(s, w, gemm::Acts::Q8_1 { qs: scratch, ds }, n, y)
        }
        Plan::FloatMatvec => {
            // Eight tokens per launch: each launch reads the weights once.
            let mut t = 0;
            while t < n {
                let k = (n - t).min(MATVEC_MAX_TOKENS);
                let (xs, ys) = (size(&[t, cols, 4]), size(&[t, w.rows, 4]));
                matvec::matvec(s, w, x.skip(xs), k, y.skip(ys))?;
                t += k;
            }
            Ok(())
        }
        Plan::HalfGemm => {
            convert_half(s, w.ty, x, scratch, size(&[n, cols]))?;
            gemm::gemm(s, w, gemm::Acts::Half(scratch), n, y)
        }
        Plan::F32Gemm => gemm::gemm(s, w, gemm::Acts::F32(x), n, y),
    }
}

/// f32 activations to the f16 or bf16 of `ty`'s weights.
fn convert_half(
    s: &Stream,
    ty: GgmlType,
    x: At<'_>,
    y: At<'_>,
    n: usize,
) -> Result<(), KernelError> {
    if ty == GgmlType::Bf16 {
        dequant::convert_f32_bf16(s, x, y, n)
    } else {
        dequant::convert_f32_f16(s, x, y, n)
    }
}

/// Whether [`matmul_id`] groups the pairs for the GEMM (else each pair is a matrix-vector
/// product): past [`MATVEC_MAX_TOKENS`] tokens, where the GEMM takes the weights (float rows of
/// 16 bytes for the tensor cores).
fn id_grouped(ty: GgmlType, cols: usize, n_tok: usize) -> bool {
    n_tok > MATVEC_MAX_TOKENS && (is_quantized(ty) || ty == GgmlType::F32 || cols.is_multiple_of(8))
}

/// Scratch bytes [`matmul_id`] needs (see there for the arguments).
pub fn matmul_id_scratch_bytes(
    ty: GgmlType,
    cols: usize,
    n_tok: usize,
    n_slot: usize,
    n_expert: usize,
    x_per_slot: bool,
) -> usize {
    let n_pairs = size(&[n_tok, n_slot]);
    let x_rows = if x_per_slot { n_pairs } else { n_tok };
    if !id_grouped(ty, cols, n_tok) {
        return if is_quantized(ty) {
            quantize::q8_1_bytes(x_rows, cols)
        } else {
            0
        };
    }
    let acts = if is_quantized(ty) {
        let (qs, ds) = quantize::q8_1_mmq_bytes(x_rows, cols);
        align256(qs).saturating_add(align256(ds))
    } else if ty == GgmlType::F32 {
        0
    } else {
        align256(size(&[x_rows, cols, 2]))
    };
    acts.saturating_add(align256(size(&[n_pairs, 4])))
        .saturating_add(size(&[gemm::moe_max_tiles(n_pairs, n_expert), 16]))
}

/// Mixture of experts (ggml's MUL_MAT_ID): for every token `t` and slot `k`,
/// `y[t][k] = W[ids[t][k]] · x[row]` with `row` = `t` (`x_per_slot` false: x f32 `[n_tok][cols]`,
/// as the gate and up projections take it) or `t · n_slot + k` (true: x `[n_tok][n_slot][cols]`,
/// the down projection). `ids` is i32 `[n_tok][n_slot]` in device memory (the router's output:
/// nothing goes through the host); `y` f32 `[n_tok][n_slot][rows]`; an id outside
/// `0..n_expert` gives a NaN row. `scratch`: [`matmul_id_scratch_bytes`].
///
/// Up to [`MATVEC_MAX_TOKENS`] tokens each pair is a matrix-vector product; more are grouped by
/// expert on the device (`moe_group`) and each expert's tokens multiplied as a GEMM, so each
/// expert's weights are read once per tile of 64 of its tokens.
#[allow(clippy::too_many_arguments)]
pub fn matmul_id(
    s: &Stream,
    w: &Experts,
    x: At<'_>,
    x_per_slot: bool,
    ids: At<'_>,
    n_tok: usize,
    n_slot: usize,
    y: At<'_>,
    scratch: At<'_>,
) -> Result<(), KernelError> {
    check_weight(w.ty, w.ptr, w.rows, w.cols, "matmul_id experts")?;
    let n_pairs = size(&[n_tok, n_slot]);
    super::dim(n_pairs, "matmul_id (token, slot) pairs")?;
    if n_pairs == 0 {
        return Ok(());
    }
    let cols = w.cols;
    let x_rows = if x_per_slot { n_pairs } else { n_tok };
    let quant = is_quantized(w.ty);
    if !id_grouped(w.ty, cols, n_tok) {
        let xa = if quant {
            quantize::quantize_q8_1(s, x, scratch, x_rows, cols)?;
            scratch
        } else {
            x
        };
        // One launch takes up to 65535 pairs (its grid's y): whole tokens at a time.
        let per = (65535 / n_slot).max(1);
        let row = if quant {
            quantize::q8_1_bytes(1, cols)
        } else {
            cols * 4
        };
        let mut t = 0;
        while t < n_tok {
            let k = (n_tok - t).min(per);
            let xs = size(&[if x_per_slot { t * n_slot } else { t }, row]);
            matvec::matvec_id(
                s,
                w,
                xa.skip(xs),
                x_per_slot,
                ids.skip(size(&[t, n_slot, 4])),
                k,
                n_slot,
                y.skip(size(&[t, n_slot, w.rows, 4])),
            )?;
            t += k;
        }
        return Ok(());
    }
    let (acts, used) = if quant {
        let (qs, ds) = quantize::q8_1_mmq_bytes(x_rows, cols);
        let dsat = scratch.skip(align256(qs));
        quantize::quantize_q8_1_mmq(s, x, scratch, dsat, x_rows, cols)?;
        let acts = gemm::Acts::Q8_1 {
            qs: scratch,
            ds: dsat,
        };
        (acts, align256(qs).saturating_add(align256(ds)))
    } else if w.ty == GgmlType::F32 {
        (gemm::Acts::F32(x), 0)
    } else {
        convert_half(s, w.ty, x, scratch, size(&[x_rows, cols]))?;
        (
            gemm::Acts::Half(scratch),
            align256(size(&[x_rows, cols, 2])),
        )
    };
    let pairs = scratch.skip(used);
    let tiles = pairs.skip(align256(size(&[n_pairs, 4])));
    gemm::moe_group(s, ids, n_pairs, w.n_expert, pairs, tiles)?;
    gemm::gemm_id(s, w, acts, x_per_slot, pairs, tiles, n_tok, n_slot, y)
}

/// Scratch bytes [`matmul_cublas`] needs.
pub fn matmul_cublas_scratch_bytes(rows: usize, cols: usize, n: usize) -> usize {
    align256(size(&[rows, cols, 2])).saturating_add(size(&[n, cols, 2]))
}

/// The comparison path: the weights dequantized to f16, the activations converted to f16, and
/// cuBLAS's GEMM with f32 sums ([`Stream::gemm_f16`]; on the simulator a reference loop).
/// Shapes as [`matmul`]; `scratch`: [`matmul_cublas_scratch_bytes`].
pub fn matmul_cublas(
    s: &Stream,
    w: &Weight,
    x: At<'_>,
    n: usize,
    y: At<'_>,
    scratch: At<'_>,
) -> Result<(), KernelError> {
    check_weight(w.ty, w.ptr, w.rows, w.cols, "matmul_cublas weights")?;
    super::dim(n, "matmul_cublas tokens")?;
    if n == 0 {
        return Ok(());
    }
    let wh = scratch;
    let xh = scratch.skip(align256(size(&[w.rows, w.cols, 2])));
    dequant::dequant_f16(s, w, wh)?;
    dequant::convert_f32_f16(s, x, xh, size(&[n, w.cols]))?;
    s.gemm_f16(
        w.rows,
        n,
        w.cols,
        (wh.buf, wh.offset),
        (xh.buf, xh.offset),
        (y.buf, y.offset),
    )
}
