//! Rotary position embedding, in both layouts GGUF models use.

/// Which elements form a rotated pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeKind {
    /// Adjacent pairs `(x[2i], x[2i+1])` — llama and its descendants as converted to GGUF.
    Norm,
    /// Halves `(x[i], x[i + n_rot/2])` — GPT-NeoX, Qwen, Gemma.
    Neox,
}

/// RoPE for one base frequency. Angles are computed the way ggml computes them (the angle of
/// pair `i` is `pos * scale^i` accumulated by repeated multiplication in f32), so that our
/// activations track llama.cpp's bit for bit where possible.
#[derive(Clone, Debug)]
pub struct Rope {
    kind: RopeKind,
    n_rot: usize,
    theta_scale: f32,
    freq_scale: f32,
}

impl Rope {
    /// `n_rot` rotated dims per head (even), `base` the frequency base, `freq_scale` the linear
    /// position scale (1.0 for none).
    pub fn new(kind: RopeKind, n_rot: usize, base: f32, freq_scale: f32) -> Self {
        let theta_scale = base.powf(-2.0 / n_rot as f32);
        Self {
            kind,
            n_rot,
            theta_scale,
            freq_scale,
        }
    }

    /// Fills `cs` with (cos, sin) of each pair's angle at `pos`; `cs.len()` must be `n_rot/2`.
    pub fn angles(&self, pos: usize, cs: &mut [(f32, f32)]) {
        let mut theta = pos as f32;
        for c in cs.iter_mut().take(self.n_rot / 2) {
            let t = theta * self.freq_scale;
            *c = (t.cos(), t.sin());
            theta *= self.theta_scale;
        }
    }

    /// Rotates every head of `x` (heads of `head_dim` elements, back to back) with angles from
    /// [`Rope::angles`].
    pub fn apply(&self, x: &mut [f32], head_dim: usize, cs: &[(f32, f32)]) {
        let half = self.n_rot / 2;
        for head in x.chunks_exact_mut(head_dim) {
            match self.kind {
                RopeKind::Norm => {
                    for (i, &(c, s)) in cs.iter().take(half).enumerate() {
                        let (a, b) = (head[2 * i], head[2 * i + 1]);
                        head[2 * i] = a * c - b * s;
                        head[2 * i + 1] = a * s + b * c;
                    }
                }
                RopeKind::Neox => {
                    let (lo, hi) = head[..self.n_rot].split_at_mut(half);
                    for ((a, b), &(c, s)) in lo.iter_mut().zip(hi.iter_mut()).zip(cs) {
                        let (x0, x1) = (*a, *b);
                        *a = x0 * c - x1 * s;
                        *b = x0 * s + x1 * c;
                    }
                }
            }
        }
    }

    pub fn n_rot(&self) -> usize {
        self.n_rot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_zero_is_identity_and_norm_preserved() {
        for kind in [RopeKind::Norm, RopeKind::Neox] {
            let r = Rope::new(kind, 8, 10000.0, 1.0);
            let mut cs = [(0f32, 0f32); 4];
            r.angles(0, &mut cs);
            let orig: Vec<f32> = (0..16).map(|i| i as f32 * 0.1 - 0.7).collect();
            let mut x = orig.clone();
            r.apply(&mut x, 8, &cs);
            assert_eq!(x, orig);
            r.angles(37, &mut cs);
            r.apply(&mut x, 8, &cs);
            let n0: f32 = orig.iter().map(|v| v * v).sum();
            let n1: f32 = x.iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() < 1e-4);
        }
    }

    #[test]
    fn neox_pairs_halves() {
        let r = Rope::new(RopeKind::Neox, 4, 10000.0, 1.0);
        let mut cs = [(0f32, 0f32); 2];
        r.angles(1, &mut cs);
        // Pair 0 rotates by 1 radian: (x[0], x[2]).
        let mut x = [1.0f32, 0.0, 0.0, 0.0];
        r.apply(&mut x, 4, &cs);
        assert!((x[0] - 1f32.cos()).abs() < 1e-6 && (x[2] - 1f32.sin()).abs() < 1e-6);
        assert_eq!(x[1], 0.0);
    }
}
