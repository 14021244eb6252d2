//! `act.cu`: gated activations, residual and bias adds, scaling, the post-norm residual.

use super::{dim, elems, need};
use crate::device::{Arg, DeviceBuffer, KernelError, LaunchConfig, Stream};

/// Threads per block and elements per block of the element-wise kernels (`ACT_THREADS`,
/// `ACT_TILE` in act.cu).
const THREADS: u32 = 256;
const TILE: usize = 1024;
/// The most blocks a grid-stride kernel is given: enough to fill any GPU several times over.
const MAX_BLOCKS: usize = 1 << 16;
/// The largest grid y (CUDA's limit); kernels loop over rows past it.
const MAX_GRID_Y: usize = 65_535;

/// The gated activation of a feed-forward block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Glu {
    /// SwiGLU: `silu(g) · u`.
    Silu,
    /// GeGLU with the tanh GELU (Gemma): `gelu_tanh(g) · u`.
    GeluTanh,
}

/// Rows of f32 in a device buffer: row `r` starts at element `offset + r · ld`.
#[derive(Clone, Copy, Debug)]
pub struct Rows<'a> {
    pub buf: &'a DeviceBuffer,
    /// Elements before row 0.
    pub offset: usize,
    /// Elements from one row to the next (at least the row length).
    pub ld: usize,
}

impl<'a> Rows<'a> {
    /// Rows of `ld` elements back to back from the start of `buf`.
    pub fn dense(buf: &'a DeviceBuffer, ld: usize) -> Self {
        Rows { buf, offset: 0, ld }
    }

    /// Checks that `rows` rows of `len` elements lie inside the buffer; returns row 0's address.
    fn check(&self, rows: usize, len: usize, what: &str) -> Result<u64, KernelError> {
        if self.ld < len {
            return Err(KernelError::Invalid(format!(
                "{what}: row stride {} is shorter than a row of {len}",
                self.ld
            )));
        }
        if rows > 0 {
            let end = (rows - 1)
                .checked_mul(self.ld)
                .and_then(|v| v.checked_add(self.offset))
                .and_then(|v| v.checked_add(len))
                .ok_or_else(|| KernelError::Invalid(format!("{what}: {rows} rows overflow")))?;
            need(self.buf, end, 4, what)?;
        }
        Ok(self.buf.at(self.offset * 4))
    }
}

/// Blocks for `n` elements in tiles, capped (the kernels stride over the rest).
fn blocks(n: usize) -> u32 {
    n.div_ceil(TILE).clamp(1, MAX_BLOCKS) as u32
}

/// A grid of column tiles × rows (rows past CUDA's grid-y limit are looped over).
fn grid_2d(cols: usize, rows: usize) -> Result<LaunchConfig, KernelError> {
    let x = u32::try_from(cols.div_ceil(TILE).max(1))
        .map_err(|_| KernelError::Invalid(format!("{cols} columns are too many")))?;
    Ok(LaunchConfig {
        grid: (x, rows.clamp(1, MAX_GRID_Y) as u32, 1),
        block: (THREADS, 1, 1),
    })
}

/// `out[r][i] = act(g[r][i]) · u[r][i]` for `rows` rows of `ff` (the scalar twins of
/// `strata_simd::ops::act`). `out` may be `g` or `u` (in place); each operand has its own row
/// stride, so a fused `[rows][2·ff]` gate|up output is read where it is.
pub fn glu(
    s: &Stream,
    act: Glu,
    g: Rows<'_>,
    u: Rows<'_>,
    out: Rows<'_>,
    rows: usize,
    ff: usize,
) -> Result<(), KernelError> {
    let name = match act {
        Glu::Silu => "swiglu_f32",
        Glu::GeluTanh => "geglu_f32",
    };
    let pg = g.check(rows, ff, "glu g")?;
    let pu = u.check(rows, ff, "glu u")?;
    let po = out.check(rows, ff, "glu out")?;
    if rows == 0 || ff == 0 {
        return Ok(());
    }
    let k = s.device().kernel(name)?;
    s.launch(
        k,
        grid_2d(ff, rows)?,
        &[
            Arg::Ptr(pg),
            Arg::Ptr(pu),
            Arg::Ptr(po),
            Arg::I32(dim(rows, "rows")?),
            Arg::I32(dim(ff, "ff")?),
            Arg::I32(dim(g.ld, "g stride")?),
            Arg::I32(dim(u.ld, "u stride")?),
            Arg::I32(dim(out.ld, "out stride")?),
        ],
    )
}

/// `x[i] += y[i]` for `n` f32 (the residual add).
pub fn add(s: &Stream, x: &DeviceBuffer, y: &DeviceBuffer, n: usize) -> Result<(), KernelError> {
    need(x, n, 4, "add x")?;
    need(y, n, 4, "add y")?;
    if n == 0 {
        return Ok(());
    }
    let k = s.device().kernel("add_f32")?;
    s.launch(
        k,
        LaunchConfig::linear(blocks(n), THREADS),
        &[x.into(), y.into(), Arg::I64(n as i64)],
    )
}

/// `x[i] *= factor` for `n` f32 (Gemma's embedding scale, `√n_embd`).
pub fn scale(s: &Stream, x: &DeviceBuffer, factor: f32, n: usize) -> Result<(), KernelError> {
    need(x, n, 4, "scale x")?;
    if n == 0 {
        return Ok(());
    }
    let k = s.device().kernel("scale_f32")?;
    s.launch(
        k,
        LaunchConfig::linear(blocks(n), THREADS),
        &[x.into(), Arg::F32(factor), Arg::I64(n as i64)],
    )
}

/// `x[r][i] += b[i]` for `rows` rows of `n` (a projection's bias, e.g. Qwen2's q/k/v).
pub fn add_bias(
    s: &Stream,
    x: Rows<'_>,
    b: &DeviceBuffer,
    rows: usize,
    n: usize,
) -> Result<(), KernelError> {
    let px = x.check(rows, n, "add_bias x")?;
    need(b, n, 4, "add_bias b")?;
    if rows == 0 || n == 0 {
        return Ok(());
    }
    let k = s.device().kernel("add_bias_f32")?;
    s.launch(
        k,
        grid_2d(n, rows)?,
        &[
            Arg::Ptr(px),
            b.into(),
            Arg::I32(dim(rows, "rows")?),
            Arg::I32(dim(n, "n")?),
            Arg::I32(dim(x.ld, "x stride")?),
        ],
    )
}

/// `x[r] += rms_norm(y[r]) · w` for `rows` rows of `n` (a post-norm model's residual, Gemma 3;
/// `y` is left as it was, unlike the CPU's in-place norm).
pub fn residual_post_norm(
    s: &Stream,
    x: &DeviceBuffer,
    y: &DeviceBuffer,
    w: &DeviceBuffer,
    rows: usize,
    n: usize,
    eps: f32,
) -> Result<(), KernelError> {
    let total = elems(rows, n, "residual_post_norm")?;
    need(x, total, 4, "residual_post_norm x")?;
    need(y, total, 4, "residual_post_norm y")?;
    need(w, n, 4, "residual_post_norm w")?;
    if rows == 0 || n == 0 {
        return Ok(());
    }
    let k = s.device().kernel("residual_post_norm_f32")?;
    s.launch(
        k,
        LaunchConfig::linear(dim(rows, "rows")? as u32, THREADS),
        &[
            x.into(),
            y.into(),
            w.into(),
            Arg::I32(dim(n, "n")?),
            Arg::F32(eps),
        ],
    )
}
