//! `rope.cu`: rotary position embedding of q and k in place, both layouts.

use super::{dim, need};
use crate::device::{Arg, DeviceBuffer, KernelError, LaunchConfig, Stream};

/// Which elements form a rotated pair (as `strata_simd::ops::rope::RopeKind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeKind {
    /// Adjacent pairs `(x[2i], x[2i+1])`: llama.
    Norm,
    /// Halves `(x[i], x[i + n_rot/2])`: NeoX, Qwen, Gemma.
    Neox,
}

/// One layer's rotation (layers may differ: gemma3's local and global bases).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeParams {
    pub kind: RopeKind,
    /// Rotated values per head (even, at most `head_dim` and 512).
    pub n_rot: usize,
    /// Frequency base.
    pub base: f32,
    /// Linear position scale (1.0 for none).
    pub freq_scale: f32,
}

/// Rotates `q` (`[n_tok][n_head_q][head_dim]` f32) and, when given, `k` (`[n_tok][n_head_k]
/// [head_dim]`), in place, token `t` at `positions[t]` (i32 on the device; a batch may hold
/// several sequences). The angles are the CPU's `Rope::angles`: `theta_scale` is computed here
/// by the same expression, and the kernel accumulates its powers by repeated multiplication.
#[allow(clippy::too_many_arguments)]
pub fn rope(
    s: &Stream,
    p: &RopeParams,
    head_dim: usize,
    positions: &DeviceBuffer,
    n_tok: usize,
    q: &DeviceBuffer,
    n_head_q: usize,
    k: Option<(&DeviceBuffer, usize)>,
) -> Result<(), KernelError> {
    if p.n_rot == 0 || !p.n_rot.is_multiple_of(2) || p.n_rot > head_dim || p.n_rot > 512 {
        return Err(KernelError::Invalid(format!(
            "rope: n_rot {} must be even, positive and at most head_dim {head_dim} (and 512)",
            p.n_rot
        )));
    }
    need(positions, n_tok, 4, "rope positions")?;
    need(q, n_tok * n_head_q * head_dim, 4, "rope q")?;
    let (kb, n_head_k) = match k {
        Some((b, n)) => {
            need(b, n_tok * n * head_dim, 4, "rope k")?;
            (Arg::Ptr(b.ptr()), n)
        }
        None => (Arg::Ptr(0), 0),
    };
    dim(n_tok * (n_head_q + n_head_k) * head_dim, "rope elements")?;
    if n_tok == 0 {
        return Ok(());
    }
    // The CPU's `Rope::new`, to the bit.
    let theta_scale = p.base.powf(-2.0 / p.n_rot as f32);
    let kern = s.device().kernel("rope_f32")?;
    s.launch(
        kern,
        LaunchConfig::linear(dim(n_tok, "tokens")? as u32, 256),
        &[
            q.into(),
            kb,
            positions.into(),
            Arg::I32(dim(n_head_q, "heads")?),
            Arg::I32(dim(n_head_k, "kv heads")?),
            Arg::I32(dim(head_dim, "head_dim")?),
            Arg::I32(dim(p.n_rot, "n_rot")?),
            Arg::F32(theta_scale),
            Arg::F32(p.freq_scale),
            Arg::I32(i32::from(p.kind == RopeKind::Neox)),
        ],
    )
}
