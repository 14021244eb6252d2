//! Gated activations of the feed-forward block.

/// `gate = silu(gate) * up` (SwiGLU).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    debug_assert_eq!(gate.len(), up.len());
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `gate = gelu(gate) * up` (GeGLU) with the tanh approximation Gemma uses.
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    debug_assert_eq!(gate.len(), up.len());
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const COEF_A: f32 = 0.044_715;
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        let inner = SQRT_2_OVER_PI * x * (1.0 + COEF_A * x * x);
        *g = 0.5 * x * (1.0 + inner.tanh()) * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        let mut g = [0.0f32, 1.0, -1.0];
        silu_mul(&mut g, &[1.0, 2.0, 1.0]);
        assert!((g[0]).abs() < 1e-7);
        assert!((g[1] - 2.0 * 0.731_058_6).abs() < 1e-5);
        assert!((g[2] + 0.268_941_4).abs() < 1e-5);
        let mut g = [1.0f32, -3.0];
        gelu_tanh_mul(&mut g, &[1.0, 1.0]);
        assert!((g[0] - 0.841_192).abs() < 1e-4);
        assert!((g[1] + 0.003_637).abs() < 1e-4);
    }
}
