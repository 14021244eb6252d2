//! The eviction policy measured on routing traces replayed through the real cache (real file,
//! real reads): hit rates of LRU and LFU with decay at several budgets.
//!
//! Random weights route uniformly, where no policy can beat the budget's fraction; real MoE
//! routing is skewed (a few experts per layer take most tokens) and drifts with the text. The
//! traces here model both: per layer a Zipf popularity over a random ranking of the experts,
//! re-ranked every `shift` tokens. `cargo test -p strata-storage --release expert_policy --
//! --nocapture` prints the table.

use std::io::Write;

use super::{ExpertCache, Key, Policy};
use crate::io::{Reader, ReaderOptions};

const LAYERS: u32 = 8;
const EXPERTS: u32 = 64;
const TOP_K: usize = 8;
const SLAB: usize = 4096;

/// SplitMix64: a small deterministic generator for the traces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn shuffle(&mut self, v: &mut [u32]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// The experts each token uses, layer by layer: `TOP_K` distinct ones per layer drawn with
/// probability ∝ 1/(rank+1)^`skew` (0: uniform), each layer's ranking shuffled anew every
/// `shift` tokens. One entry per layer pass.
fn trace(tokens: usize, skew: f64, shift: usize, seed: u64) -> Vec<(u32, Vec<u32>)> {
    let mut rng = Rng(seed);
    let weights: Vec<f64> = (0..EXPERTS)
        .map(|r| 1.0 / ((r + 1) as f64).powf(skew))
        .collect();
    let mut ranking: Vec<Vec<u32>> = Vec::new();
    let mut out = Vec::with_capacity(tokens * LAYERS as usize);
    for t in 0..tokens {
        if t % shift == 0 {
            ranking = (0..LAYERS)
                .map(|_| {
                    let mut r: Vec<u32> = (0..EXPERTS).collect();
                    rng.shuffle(&mut r);
                    r
                })
                .collect();
        }
        for (layer, rank) in ranking.iter().enumerate() {
            let mut chosen: Vec<usize> = Vec::with_capacity(TOP_K);
            while chosen.len() < TOP_K {
                let left: f64 = (0..EXPERTS as usize)
                    .filter(|r| !chosen.contains(r))
                    .map(|r| weights[r])
                    .sum();
                let mut x = rng.unit() * left;
                let mut pick = None;
                for r in (0..EXPERTS as usize).filter(|r| !chosen.contains(r)) {
                    pick = Some(r);
                    x -= weights[r];
                    if x <= 0.0 {
                        break;
                    }
                }
                chosen.push(pick.expect("an expert is left"));
            }
            let mut experts: Vec<u32> = chosen.iter().map(|&r| rank[r]).collect();
            experts.sort_unstable();
            out.push((layer as u32, experts));
        }
    }
    out
}

/// Replays `passes` through a cache of `slabs` slabs under `policy` as the forward pass uses
/// it (the routing first, then each expert); the hit rate.
fn hit_rate(reader: Reader, passes: &[(u32, Vec<u32>)], slabs: usize, policy: Policy) -> f64 {
    let cache = ExpertCache::with_policy(vec![reader], (slabs * SLAB) as u64, policy)
        .expect("cache thread");
    let range = |layer: u32, expert: u32| ((layer * EXPERTS + expert) as usize * SLAB) as u64;
    for (layer, experts) in passes {
        let keys: Vec<(Key, u64, usize)> = experts
            .iter()
            .map(|&e| ((*layer, e), range(*layer, e), SLAB))
            .collect();
        cache.route(&keys);
        for &e in experts {
            let (buf, skip) = cache
                .get((*layer, e), range(*layer, e), SLAB, true)
                .expect("read");
            // The slab read is the slab asked for (each is filled with its own number).
            assert_eq!(buf.as_slice()[skip], ((layer * EXPERTS + e) % 251) as u8);
        }
    }
    let c = &cache.shared().counters;
    let hits = c.hits.load(std::sync::atomic::Ordering::Relaxed) as f64;
    let misses = c.misses.load(std::sync::atomic::Ordering::Relaxed) as f64;
    hits / (hits + misses)
}

#[test]
fn expert_policy_next_use_beats_lru_on_skewed_routing_and_keeps_up_elsewhere() {
    let mut file = tempfile::NamedTempFile::new_in(std::env::temp_dir()).expect("temp file");
    for i in 0..LAYERS * EXPERTS {
        file.write_all(&[(i % 251) as u8; SLAB]).expect("write");
    }
    file.flush().expect("flush");
    let open = || Reader::open(file.path(), &ReaderOptions::default()).expect("reader");

    let cases = [
        ("uniform (random weights)", 0.0, usize::MAX),
        ("zipf 0.8, fixed", 0.8, usize::MAX),
        ("zipf 1.0, fixed", 1.0, usize::MAX),
        ("zipf 1.0, re-ranked / 150 tokens", 1.0, 150),
    ];
    let total = (LAYERS * EXPERTS) as usize;
    eprintln!("trace                             budget    LRU  LFU+decay  next-use");
    for (name, skew, shift) in cases {
        let passes = trace(600, skew, shift, 7);
        for frac in [0.125, 0.25, 0.5] {
            let slabs = (total as f64 * frac) as usize;
            let lru = hit_rate(open(), &passes, slabs, Policy::Lru);
            let lfu = hit_rate(open(), &passes, slabs, Policy::LfuDecay);
            let next = hit_rate(open(), &passes, slabs, Policy::NextUse);
            eprintln!(
                "{name:<33} {:>5.1}%  {:>5.1}%  {:>8.1}%  {:>7.1}%",
                frac * 100.0,
                lru * 100.0,
                lfu * 100.0,
                next * 100.0
            );
            // Uniform routing has nothing to learn (no policy beats the budget's fraction by
            // more than noise); skewed routing must beat LRU clearly, and LFU (which wins only
            // where popularity never changes and the budget is large) must not be ahead.
            if skew == 0.0 {
                assert!(
                    next > lru - 0.01,
                    "{name} at {frac}: LRU {lru}, next-use {next}"
                );
            } else {
                assert!(
                    next > lru + 0.02,
                    "{name} at {frac}: LRU {lru}, next-use {next}"
                );
            }
            assert!(
                next > lfu - 0.015,
                "{name} at {frac}: LFU {lfu}, next-use {next}"
            );
        }
    }
}

#[test]
fn batches_take_routed_reads_first_in_their_order_and_guesses_only_when_allowed() {
    use super::{GUESS_BATCH_BYTES, Why, take_batch};
    use std::collections::VecDeque;
    let slab = GUESS_BATCH_BYTES / 2;
    let mut q: VecDeque<super::Job> = VecDeque::new();
    q.push_back(((0, 1), 0, slab, Why::Guess));
    q.push_back(((1, 7), 0, slab, Why::Routed));
    q.push_back(((0, 2), 0, slab, Why::Guess));
    q.push_back(((1, 3), 0, slab, Why::Routed));
    q.push_back(((0, 3), 0, slab, Why::Guess));
    // Routed reads go first, in queue order, whatever `guesses` says.
    let (b, why) = take_batch(&mut q, false).expect("routed batch");
    assert!(why == Why::Routed);
    assert_eq!(b.iter().map(|j| j.0).collect::<Vec<_>>(), [(1, 7), (1, 3)]);
    // Guesses only when allowed, and no more than a batch's bytes.
    assert!(take_batch(&mut q, false).is_none());
    let (b, why) = take_batch(&mut q, true).expect("guess batch");
    assert!(why == Why::Guess);
    assert_eq!(b.iter().map(|j| j.0).collect::<Vec<_>>(), [(0, 1), (0, 2)]);
    assert_eq!(q.len(), 1);
}
