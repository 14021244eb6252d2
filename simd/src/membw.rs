//! Memory read bandwidth: the roofline every decode step is measured against (decode reads
//! each weight byte once per token, so t/s ≤ bandwidth ÷ bytes per token).

use std::time::Instant;

use crate::pool::ThreadPool;
use crate::tune::Ahead;

/// Reads `buf` `passes` times with every thread of `pool` (each its own contiguous slice) and
/// returns the read bandwidth in bytes per second of the fastest pass: of a plain streaming
/// read (the hardware prefetchers alone) and of reads that also prefetch in software
/// [`PREFETCH_AHEAD`] bytes ahead, into L1 and into L2, alternating, since decode's kernels
/// prefetch in software (`tune::Ahead`) and on some CPUs read faster than a plain loop does (on
/// an Emerald Rapids Xeon, qwen2.5 decode read 12.2 GB/s at one thread against a plain loop's
/// 11.7).
pub fn read_bandwidth(pool: &ThreadPool, buf: &[u64], passes: usize) -> f64 {
    let mut best = 0f64;
    for _ in 0..passes.max(1) {
        let prefetched = PREFETCH_AHEAD
            .into_iter()
            .flat_map(|bytes| [false, true].map(|l2| Ahead { bytes, l2 }));
        for ahead in [Ahead::NONE].into_iter().chain(prefetched) {
            let t0 = Instant::now();
            pool.run(|ith, nth| {
                let n = buf.len();
                let part = &buf[n * ith / nth..n * (ith + 1) / nth];
                std::hint::black_box(sum(part, ahead));
            });
            let secs = t0.elapsed().as_secs_f64();
            best = best.max(std::mem::size_of_val(buf) as f64 / secs);
        }
    }
    best
}

/// The software prefetch distances [`read_bandwidth`] tries besides none, in bytes.
pub const PREFETCH_AHEAD: [usize; 2] = [2048, 8192];

/// XOR-reduces a slice with eight independent lanes so the loop is bound by loads, not by a
/// dependency chain; the compiler vectorises it to the widest loads the build allows. With
/// `ahead.bytes` > 0 each 64 bytes read first ask for the line that far further, into L2 only
/// when `ahead.l2` (a hint: past the end it reads nothing and never faults). Elsewhere than
/// x86-64 no software prefetch is issued: those passes read as the plain one.
fn sum(v: &[u64], ahead: Ahead) -> u64 {
    let mut acc = [0u64; 8];
    let chunks = v.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        if ahead.bytes > 0 {
            #[cfg(target_arch = "x86_64")]
            crate::arch::x86_64::interleaved::prefetch(
                c.as_ptr().cast::<u8>().wrapping_add(ahead.bytes),
                1,
                ahead.l2,
            );
        }
        for (a, x) in acc.iter_mut().zip(c) {
            *a ^= x;
        }
    }
    acc.iter().chain(rest).fold(0, |a, x| a ^ x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_something_positive() {
        let pool = ThreadPool::new(2);
        let buf: Vec<u64> = (0..1 << 16).collect();
        let bw = read_bandwidth(&pool, &buf, 2);
        assert!(bw.is_finite() && bw > 0.0);
        assert_eq!(sum(&[1, 2, 4], Ahead::NONE), 7);
        let v: Vec<u64> = (0..1000).map(|i| i * 7919).collect();
        for bytes in PREFETCH_AHEAD {
            for l2 in [false, true] {
                assert_eq!(
                    sum(&v, Ahead { bytes, l2 }),
                    sum(&v, Ahead::NONE),
                    "prefetching changes no bit"
                );
            }
        }
    }
}
