//! `norm.cu`: RMS normalisation.

use super::{dim, elems, need};
use crate::device::{Arg, DeviceBuffer, KernelError, LaunchConfig, Stream};

/// `y[r] = x[r] / sqrt(mean(x[r]²) + eps) * w` for `rows` rows of `n` f32.
pub fn rms_norm(
    s: &Stream,
    x: &DeviceBuffer,
    w: &DeviceBuffer,
    y: &DeviceBuffer,
    rows: usize,
    n: usize,
    eps: f32,
) -> Result<(), KernelError> {
    need(x, rows * n, 4, "rms_norm x")?;
    need(w, n, 4, "rms_norm w")?;
    need(y, rows * n, 4, "rms_norm y")?;
    if rows == 0 {
        return Ok(());
    }
    let k = s.device().kernel("rms_norm_f32")?;
    s.launch(
        k,
        LaunchConfig::linear(dim(rows, "rows")? as u32, 256),
        &[
            x.into(),
            w.into(),
            y.into(),
            Arg::I32(dim(n, "n")?),
            Arg::F32(eps),
        ],
    )
}

/// The residual add fused with the next norm, for `rows` rows of `n` f32: `x += y`, then
/// `xb = rms_norm(x) · w` (a pre-norm model's layer boundary).
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm(
    s: &Stream,
    x: &DeviceBuffer,
    y: &DeviceBuffer,
    w: &DeviceBuffer,
    xb: &DeviceBuffer,
    rows: usize,
    n: usize,
    eps: f32,
) -> Result<(), KernelError> {
    let total = elems(rows, n, "add_rms_norm")?;
    need(x, total, 4, "add_rms_norm x")?;
    need(y, total, 4, "add_rms_norm y")?;
    need(w, n, 4, "add_rms_norm w")?;
    need(xb, total, 4, "add_rms_norm xb")?;
    if total == 0 {
        return Ok(());
    }
    let k = s.device().kernel("add_rms_norm_f32")?;
    s.launch(
        k,
        LaunchConfig::linear(dim(rows, "rows")? as u32, 256),
        &[
            x.into(),
            y.into(),
            w.into(),
            xb.into(),
            Arg::I32(dim(n, "n")?),
            Arg::F32(eps),
        ],
    )
}

/// A post-norm model's layer boundary (Gemma 3), for `rows` rows of `n` f32:
/// `x += rms_norm(y) · w_post`, then `xb = rms_norm(x) · w`. `y` is left as it was.
#[allow(clippy::too_many_arguments)]
pub fn post_norm_add_rms_norm(
    s: &Stream,
    x: &DeviceBuffer,
    y: &DeviceBuffer,
    w_post: &DeviceBuffer,
    w: &DeviceBuffer,
    xb: &DeviceBuffer,
    rows: usize,
    n: usize,
    eps: f32,
) -> Result<(), KernelError> {
    let total = elems(rows, n, "post_norm_add_rms_norm")?;
    need(x, total, 4, "post_norm_add_rms_norm x")?;
    need(y, total, 4, "post_norm_add_rms_norm y")?;
    need(w_post, n, 4, "post_norm_add_rms_norm w_post")?;
    need(w, n, 4, "post_norm_add_rms_norm w")?;
    need(xb, total, 4, "post_norm_add_rms_norm xb")?;
    if total == 0 {
        return Ok(());
    }
    let k = s.device().kernel("post_norm_add_rms_norm_f32")?;
    s.launch(
        k,
        LaunchConfig::linear(dim(rows, "rows")? as u32, 256),
        &[
            x.into(),
            y.into(),
            w_post.into(),
            w.into(),
            xb.into(),
            Arg::I32(dim(n, "n")?),
            Arg::F32(eps),
        ],
    )
}
