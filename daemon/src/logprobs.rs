//! Log-probabilities of sampled tokens, as OpenAI and llama-server report them: the
//! log-softmax of the model's raw logits, before repetition penalty, temperature or any
//! top-k/top-p/min-p filter.

/// Most alternatives a request may ask for (OpenAI's `top_logprobs` limit).
pub const MAX_TOP: usize = 20;

/// One generated token's log-probability and the most likely alternatives at its position.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    /// Up to the requested count, most likely first (lower id first on ties, as greedy
    /// decoding picks).
    pub top: Vec<(u32, f32)>,
}

/// The log-probability of `chosen` under `logits`, and the `k` most likely tokens.
pub fn token_logprob(logits: &[f32], chosen: u32, k: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| f64::from(x - max).exp()).sum();
    let log_z = f64::from(max) + sum.ln();
    // Rounding can push the most likely token a hair above 0.
    let lp = |x: f32| (f64::from(x) - log_z).min(0.0) as f32;
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k > 0 {
        for (i, &x) in logits.iter().enumerate() {
            if top.len() == k && top.last().is_some_and(|&(_, low)| x <= low) {
                continue;
            }
            // After every entry at least as large, so earlier ids stay first on ties.
            let at = top.partition_point(|&(_, v)| v >= x);
            top.insert(at, (i as u32, x));
            top.truncate(k);
        }
    }
    TokenLogprob {
        id: chosen,
        logprob: logits
            .get(chosen as usize)
            .map_or(f32::NEG_INFINITY, |&x| lp(x)),
        top: top.into_iter().map(|(i, x)| (i, lp(x))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_of_raw_logits() {
        let logits = [1.0f32, 3.0, 2.0, 3.0, -1.0];
        let z: f64 = logits.iter().map(|&x| f64::from(x).exp()).sum();
        let t = token_logprob(&logits, 2, 3);
        assert!((f64::from(t.logprob) - (2.0 - z.ln())).abs() < 1e-6);
        // Ties keep the lower id first.
        let ids: Vec<u32> = t.top.iter().map(|p| p.0).collect();
        assert_eq!(ids, vec![1, 3, 2]);
        assert!(t.top.windows(2).all(|w| w[0].1 >= w[1].1));
        let total: f64 = logits.iter().map(|&x| (f64::from(x) - z.ln()).exp()).sum();
        assert!((total - 1.0).abs() < 1e-9);
        assert!(token_logprob(&logits, 1, 0).top.is_empty());
        assert_eq!(token_logprob(&logits, 9, 1).logprob, f32::NEG_INFINITY);
        // A dominant token's logprob is 0, never above.
        assert_eq!(token_logprob(&[0.0, 200.0], 1, 1).logprob, 0.0);
    }
}
