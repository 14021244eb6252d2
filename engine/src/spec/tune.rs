//! How many tokens to draft, from measurement: the time a target pass takes for each batch size
//! seen so far, the time a draft takes per token, and the rate at which drafted tokens are
//! accepted. With a per-token acceptance rate `a`, a draft of `n` yields on average
//! `(1 − a^(n+1)) / (1 − a)` tokens (the accepted prefix and the target's own next token) for
//! the cost of one pass over `n + 1` tokens plus drafting `n`; the draft length chosen is the
//! one with the most tokens per second, `0` (a plain step) included. Where weights stream from
//! disk a pass costs about the same for 1 token as for 8, so long drafts win even at modest
//! acceptance; where everything is in RAM a pass over more tokens costs more, and speculation
//! backs off unless drafts are mostly right.

/// The largest batch a verify pass is costed for (drafts longer than this are cut).
pub const MAX_DRAFT: usize = 15;

/// Weight of the newest timing in its running average.
const EMA: f64 = 0.2;
/// How much each acceptance observation's predecessors fade (a window of about 30 drafted
/// tokens): acceptance moves with the text being written.
const DECAY: f64 = 0.97;
/// The prior on the acceptance rate (as this many pseudo-trials at [`PRIOR_RATE`]): optimistic
/// enough that a fresh run tries drafting, weak enough that a few misses stop it.
const PRIOR_TRIALS: f64 = 2.0;
const PRIOR_RATE: f64 = 0.5;
/// Before passes over several tokens have been timed at two sizes, each extra token is assumed
/// to cost this much of a one-token pass (cheap, as when weights stream); the first verify
/// pass, of one drafted token, starts measuring the truth.
const PRIOR_SLOPE: f64 = 0.1;

/// A draft must promise this many times a plain step's speed: the timings it is priced by
/// move by more than a few percent from step to step (other work on the machine, the page
/// cache), and a draft that would gain less than that is as likely to lose.
const MIN_GAIN: f64 = 1.1;

#[derive(Clone, Debug)]
pub struct Tuner {
    n_min: usize,
    n_max: usize,
    /// Seconds per target pass of `m` tokens, index `m` (0 unused); 0 when not measured.
    pass: [f64; MAX_DRAFT + 2],
    /// Seconds to draft one token.
    draft: f64,
    /// Decayed counts of drafted tokens judged and of those accepted.
    trials: f64,
    accepted: f64,
}

impl Tuner {
    pub fn new(n_min: usize, n_max: usize) -> Self {
        Self {
            n_min: n_min.max(1),
            n_max: n_max.min(MAX_DRAFT),
            pass: [0.0; MAX_DRAFT + 2],
            draft: 0.0,
            trials: 0.0,
            accepted: 0.0,
        }
    }

    /// Records a target pass over `m` tokens that took `secs`.
    pub fn pass_timed(&mut self, m: usize, secs: f64) {
        if m == 0 || m >= self.pass.len() || !secs.is_finite() {
            return;
        }
        let c = &mut self.pass[m];
        *c = if *c == 0.0 {
            secs
        } else {
            *c + EMA * (secs - *c)
        };
    }

    /// Records drafting `n` tokens in `secs`.
    pub fn draft_timed(&mut self, n: usize, secs: f64) {
        if n == 0 || !secs.is_finite() {
            return;
        }
        let per = secs / n as f64;
        self.draft = if self.draft == 0.0 {
            per
        } else {
            self.draft + EMA * (per - self.draft)
        };
    }

    /// Records the outcome of judging a draft: `accepted` tokens kept, and whether the
    /// draft ended with a rejected token (its trial counts too).
    pub fn judged(&mut self, accepted: usize, rejected: bool) {
        let trials = accepted + usize::from(rejected);
        for i in 0..trials {
            self.trials = self.trials * DECAY + 1.0;
            self.accepted = self.accepted * DECAY + if i < accepted { 1.0 } else { 0.0 };
        }
    }

    /// The acceptance rate per drafted token, as estimated now.
    pub fn rate(&self) -> f64 {
        (self.accepted + PRIOR_RATE * PRIOR_TRIALS) / (self.trials + PRIOR_TRIALS)
    }

    /// The seconds a pass over `m` tokens is expected to take.
    fn pass_cost(&self, m: usize) -> f64 {
        if self.pass[m] > 0.0 {
            return self.pass[m];
        }
        // The measured sizes around m: extrapolate along the line through the nearest two
        // measured, or from a one-token pass with the prior slope.
        let below = (1..m).rev().find(|&j| self.pass[j] > 0.0);
        let above = (m + 1..self.pass.len()).find(|&j| self.pass[j] > 0.0);
        match (below, above) {
            (Some(a), Some(b)) => {
                let f = (m - a) as f64 / (b - a) as f64;
                self.pass[a] + f * (self.pass[b] - self.pass[a])
            }
            (Some(a), None) => {
                let lower = (1..a).rev().find(|&j| self.pass[j] > 0.0);
                let slope = match lower {
                    Some(l) => ((self.pass[a] - self.pass[l]) / (a - l) as f64).max(0.0),
                    None => PRIOR_SLOPE * self.pass[a],
                };
                self.pass[a] + slope * (m - a) as f64
            }
            (None, Some(b)) => self.pass[b],
            (None, None) => 0.0,
        }
    }

    /// Expected tokens per second when drafting `n` (0: a plain step).
    pub fn speed(&self, n: usize) -> f64 {
        let cost = self.pass_cost(n + 1) + n as f64 * self.draft;
        if cost <= 0.0 {
            return 0.0;
        }
        let a = self.rate().min(0.999_999);
        ((1.0 - a.powi(n as i32 + 1)) / (1.0 - a)) / cost
    }

    /// The draft length to try now, at most `cap`: 0 or one in `n_min..=n_max`.
    pub fn choose(&self, cap: usize) -> usize {
        if self.pass[1] == 0.0 {
            // Time a plain step first: every estimate is relative to it.
            return 0;
        }
        // Until a pass over several tokens has been timed, draft one token: the cheapest
        // way to learn what a verify pass costs here (a pass over 5 tokens all in RAM can
        // cost 3 one-token steps; streamed, about one).
        let measured = self.pass[2..].iter().any(|&c| c > 0.0);
        let hi = if measured { self.n_max } else { 1 }.min(cap);
        let mut best = (0, self.speed(0) * MIN_GAIN);
        for n in self.n_min..=hi {
            let s = self.speed(n);
            if s > best.1 {
                best = (n, s);
            }
        }
        best.0
    }
}
