//! The speculative sampling rule (Leviathan et al., Chen et al.): a drafted token `t` drawn
//! from the draft's distribution `q` is kept with probability min(1, p(t)/q(t)), where `p` is
//! the target sampler's distribution at that position; on rejection the token emitted instead
//! is drawn from the residual max(0, p − q), normalised. Whatever `q` is, the emitted token is
//! then distributed as `p`. A model-free draft is a point mass (q(t) = 1): `t` is kept with
//! probability p(t), and the residual is `p` without `t`. Greedy `p` is a point mass too, so
//! the rule keeps `t` exactly when it is the target's argmax, and draws nothing.

use crate::sampler::Sampler;

/// The verdict on one drafted token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// Rejected: this token is emitted in its place, and the rest of the draft is dropped.
    Reject(u32),
}

/// Judges the drafted token `t` against the target's distribution `p` (token, probability).
/// `q` is the draft's distribution when it had one (a draft model sampling), `None` for a
/// point mass on `t`. `residual` is scratch space.
pub fn judge(
    p: &[(u32, f64)],
    t: u32,
    q: Option<&[(u32, f64)]>,
    sampler: &mut Sampler,
    residual: &mut Vec<(u32, f64)>,
) -> Verdict {
    let prob =
        |d: &[(u32, f64)], id: u32| d.iter().find(|&&(i, _)| i == id).map_or(0.0, |&(_, w)| w);
    let pt = prob(p, t);
    let qt = q.map_or(1.0, |q| prob(q, t));
    // A draft that gave its own token no probability is a caller's bug; treat it as certain.
    let ratio = if qt > 0.0 { pt / qt } else { pt };
    // Draws only when the outcome is uncertain, so a greedy run consumes no randomness.
    let keep = ratio >= 1.0 || (ratio > 0.0 && sampler.uniform() < ratio);
    if keep {
        return Verdict::Accept;
    }
    residual.clear();
    match q {
        None => residual.extend(p.iter().filter(|&&(i, _)| i != t).copied()),
        Some(q) => {
            residual.extend_from_slice(p);
            residual.sort_unstable_by_key(|&(i, _)| i);
            for &(i, w) in q {
                if let Ok(at) = residual.binary_search_by_key(&i, |&(j, _)| j) {
                    residual[at].1 -= w;
                }
            }
            residual.iter_mut().for_each(|e| e.1 = e.1.max(0.0));
        }
    }
    // The residual is empty only when p equals q (then nothing is ever rejected) or rounding
    // ate it; p itself is the right fallback.
    let mut positive = residual.iter().filter(|e| e.1 > 0.0);
    if let (Some(&(only, _)), None) = (positive.next(), positive.next()) {
        // One token left (greedy): certain, no draw.
        return Verdict::Reject(only);
    }
    let x = sampler
        .draw(residual)
        .or_else(|| sampler.draw(p))
        .unwrap_or(t);
    Verdict::Reject(x)
}
