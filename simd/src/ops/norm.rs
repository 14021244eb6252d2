//! RMSNorm.

/// `out = x / rms(x) * w`. The sum of squares is accumulated in f64, as ggml does, so long
/// rows do not lose precision.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    debug_assert_eq!(x.len(), w.len());
    debug_assert_eq!(x.len(), out.len());
    let scale = inv_rms(x, eps);
    for ((o, &xi), &wi) in out.iter_mut().zip(x).zip(w) {
        *o = xi * scale * wi;
    }
}

/// In-place [`rms_norm`].
pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    debug_assert_eq!(x.len(), w.len());
    let scale = inv_rms(x, eps);
    for (xi, &wi) in x.iter_mut().zip(w) {
        *xi = *xi * scale * wi;
    }
}

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    // Four f32 partial sums per f64 fold keep the loop vectorisable and the total exact enough.
    let mut sum = 0f64;
    for chunk in x.chunks(64) {
        let s: f32 = chunk.iter().map(|v| v * v).sum();
        sum += s as f64;
    }
    let mean = (sum / x.len().max(1) as f64) as f32;
    1.0 / (mean + eps).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_rms() {
        let x = [3.0f32, -4.0, 0.0, 0.0];
        let w = [1.0f32; 4];
        let mut out = [0f32; 4];
        rms_norm(&x, &w, 0.0, &mut out);
        // rms = sqrt(25/4) = 2.5
        assert!((out[0] - 1.2).abs() < 1e-6 && (out[1] + 1.6).abs() < 1e-6);
        let mut y = x;
        rms_norm_inplace(&mut y, &w, 0.0);
        assert_eq!(y, out);
    }
}
