//! `norm.cu`: RMS normalisation.

use super::{dim, need};
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
