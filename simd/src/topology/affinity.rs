//! The calling thread's CPU affinity through `sched_getaffinity`/`sched_setaffinity`.
//!
//! Masks are sized at run time rather than with libc's fixed 1024-bit `cpu_set_t`, so a
//! machine with more CPUs than that is read whole instead of failing with `EINVAL`.

use std::io;

/// A mask is an array of `unsigned long`, bit `i % WORD_BITS` of word `i / WORD_BITS` for CPU `i`.
type Word = libc::c_ulong;
const WORD_BITS: usize = Word::BITS as usize;

/// The largest mask tried when reading: the kernel's `NR_CPUS` ceiling is 8192 today, so this
/// leaves room without letting a misbehaving kernel make us allocate without bound.
const MAX_CPUS: usize = 1 << 16;

/// The OS indices of the CPUs the calling thread may run on, ascending.
pub(super) fn current_thread() -> io::Result<Vec<usize>> {
    let mut words = 1024 / WORD_BITS;
    loop {
        let mut mask = vec![0 as Word; words];
        // SAFETY: `mask` is a writable buffer of exactly `size_of_val(mask)` bytes, which is
        // the size passed; the kernel writes at most that many bytes. pid 0 is this thread.
        let r = unsafe {
            libc::sched_getaffinity(
                0,
                std::mem::size_of_val(mask.as_slice()),
                mask.as_mut_ptr().cast::<libc::cpu_set_t>(),
            )
        };
        if r == 0 {
            return Ok(cpus_of(&mask));
        }
        let err = io::Error::last_os_error();
        // EINVAL: the kernel's mask is wider than ours; try a wider one.
        if err.raw_os_error() == Some(libc::EINVAL) && words * WORD_BITS < MAX_CPUS {
            words *= 2;
            continue;
        }
        return Err(err);
    }
}

/// Restricts the calling thread to the one CPU `cpu` (an OS index).
pub(super) fn pin_current_thread(cpu: usize) -> io::Result<()> {
    if cpu >= MAX_CPUS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("CPU index {cpu} is past the largest mask this process builds ({MAX_CPUS})"),
        ));
    }
    let mut mask = vec![0 as Word; cpu / WORD_BITS + 1];
    mask[cpu / WORD_BITS] |= 1 << (cpu % WORD_BITS);
    // SAFETY: `mask` is a readable buffer of exactly the size passed; pid 0 is this thread.
    let r = unsafe {
        libc::sched_setaffinity(
            0,
            std::mem::size_of_val(mask.as_slice()),
            mask.as_ptr().cast::<libc::cpu_set_t>(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The set bits of a kernel CPU mask.
fn cpus_of(mask: &[Word]) -> Vec<usize> {
    let mut cpus = Vec::new();
    for (w, &word) in mask.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let b = bits.trailing_zeros() as usize;
            cpus.push(w * WORD_BITS + b);
            bits &= bits - 1;
        }
    }
    cpus
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_bits_become_cpu_indices() {
        assert_eq!(
            cpus_of(&[0b1011, 0, 1 << (WORD_BITS - 1)]),
            vec![0, 1, 3, 3 * WORD_BITS - 1]
        );
        assert_eq!(cpus_of(&[]), Vec::<usize>::new());
    }

    #[test]
    fn this_thread_may_run_somewhere() {
        let cpus = current_thread().expect("sched_getaffinity");
        assert!(!cpus.is_empty());
        assert!(cpus.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn an_absurd_cpu_is_refused_not_allocated() {
        assert!(pin_current_thread(usize::MAX).is_err());
    }
}
