//! Typed launchers, one module per kernel file. Each checks its arguments' sizes against the
//! buffers before anything is queued, so a wrong shape is an error here, not an out-of-bounds
//! access on the device.

pub mod act;
pub mod attention;
pub mod dequant;
pub mod gemm;
pub mod kv;
pub mod matmul;
pub mod matvec;
pub mod moe;
pub mod norm;
pub mod quantize;
pub mod rope;
pub mod sample;

use crate::device::{DeviceBuffer, KernelError};

/// Checks that `buf` holds at least `elems` values of `size` bytes (`what` names it).
pub(crate) fn need(
    buf: &DeviceBuffer,
    elems: usize,
    size: usize,
    what: &str,
) -> Result<(), KernelError> {
    let bytes = elems
        .checked_mul(size)
        .ok_or_else(|| KernelError::Invalid(format!("{what}: {elems} elements overflow")))?;
    if buf.len() < bytes {
        return Err(KernelError::Invalid(format!(
            "{what}: needs {bytes} bytes, the buffer has {}",
            buf.len()
        )));
    }
    Ok(())
}

/// A dimension as the kernels take it (`int`).
pub(crate) fn dim(v: usize, what: &str) -> Result<i32, KernelError> {
    i32::try_from(v).map_err(|_| KernelError::Invalid(format!("{what} = {v} is too large")))
}

/// `a · b` elements, or an error naming `what` when the product overflows.
pub(crate) fn elems(a: usize, b: usize, what: &str) -> Result<usize, KernelError> {
    a.checked_mul(b)
        .ok_or_else(|| KernelError::Invalid(format!("{what}: {a} × {b} elements overflow")))
}
