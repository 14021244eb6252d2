//! Mixture-of-experts routing as the model defines it, whatever device computes the experts:
//! each token goes to the `k` experts of highest router softmax, weighted by those
//! probabilities (renormalised over the chosen ones where the architecture does).

/// Top-`k` routing: for each of `n` rows of `ne` router logits, the softmax's `k` largest
/// entries as `(expert, weight)`, renormalised to sum to 1 when `norm`. Writes `n * k` pairs.
pub(crate) fn route(
    logits: &mut [f32],
    out: &mut Vec<(usize, f32)>,
    n: usize,
    ne: usize,
    k: usize,
    norm: bool,
) {
    out.clear();
    softmax_rows(&mut logits[..n * ne], ne);
    for row in logits.chunks_exact_mut(ne).take(n) {
        let start = out.len();
        for _ in 0..k {
            // Highest probability not yet taken; ties go to the lower expert id.
            let best = (0..ne)
                .filter(|i| !out[start..].iter().any(|p| p.0 == *i))
                .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
                .unwrap_or(0);
            out.push((best, row[best]));
        }
        if norm {
            let s: f32 = out[start..].iter().map(|p| p.1).sum();
            if s > 0.0 {
                out[start..].iter_mut().for_each(|p| p.1 /= s);
            }
        }
    }
}

/// Softmax of each row of `ne` values, in place.
pub(crate) fn softmax_rows(x: &mut [f32], ne: usize) {
    for row in x.chunks_exact_mut(ne) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sum = 0.0;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        row.iter_mut().for_each(|v| *v /= sum);
    }
}

#[cfg(test)]
mod tests {
    use super::route;

    #[test]
    fn routing_picks_the_top_k_softmax_weights() {
        let mut logits = vec![0.0, 2.0, 1.0, 2.0, -1.0, 0.5, 3.0, 0.0];
        let mut out = Vec::new();
        route(&mut logits, &mut out, 2, 4, 2, false);
        assert_eq!(
            out.iter().map(|p| p.0).collect::<Vec<_>>(),
            vec![1, 3, 2, 1]
        );
        let s: f32 = out[..2].iter().map(|p| p.1).sum();
        assert!(s < 1.0 && s > 0.5);
        let mut logits = vec![0.0, 2.0, 1.0, 2.0];
        route(&mut logits, &mut out, 1, 4, 2, true);
        assert!((out[0].1 + out[1].1 - 1.0).abs() < 1e-6);
        assert!((out[0].1 - 0.5).abs() < 1e-6);
    }
}
