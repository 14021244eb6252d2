//! Instruction-set level detection, done once per process.
//!
//! [`level`] probes the CPU the first time it is called, caches the answer and logs it. The
//! environment variable `STRATA_SIMD=scalar|avx2|avx512|avx512vnni` lowers the level (it can
//! never raise it above what the CPU has), so CI can exercise every path on one machine.

use std::sync::OnceLock;

/// A SIMD level; higher levels imply the lower ones.
///
/// - `Avx2`: AVX2 + FMA + F16C.
/// - `Avx512`: `Avx2` plus AVX-512 F/BW/VL/DQ.
/// - `Avx512Vnni`: `Avx512` plus AVX-512 VNNI (`vpdpbusd`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Scalar,
    Avx2,
    Avx512,
    Avx512Vnni,
}

impl Level {
    /// Every level, lowest first.
    pub const ALL: [Level; 4] = [Level::Scalar, Level::Avx2, Level::Avx512, Level::Avx512Vnni];

    /// The name `STRATA_SIMD` accepts.
    pub const fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
            Level::Avx512Vnni => "avx512vnni",
        }
    }

    fn parse(s: &str) -> Option<Level> {
        Level::ALL
            .into_iter()
            .find(|l| l.name().eq_ignore_ascii_case(s.trim()))
    }
}

/// The level this process computes at: detected once, lowered by `STRATA_SIMD` if set.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let detected = detected();
        let chosen = match std::env::var("STRATA_SIMD") {
            Ok(v) => match Level::parse(&v) {
                Some(forced) => forced.min(detected),
                None => {
                    tracing::warn!(value = %v, "STRATA_SIMD not understood; using the detected level");
                    detected
                }
            },
            Err(_) => detected,
        };
        tracing::info!(detected = detected.name(), chosen = chosen.name(), "SIMD level");
        chosen
    })
}

/// The highest level this CPU supports, ignoring `STRATA_SIMD`.
pub fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        if !avx2 {
            return Level::Scalar;
        }
        let avx512 = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512dq");
        if !avx512 {
            return Level::Avx2;
        }
        if is_x86_feature_detected!("avx512vnni") {
            Level::Avx512Vnni
        } else {
            Level::Avx512
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Level::Scalar
    }
}

/// Whether this CPU can run kernels of `l` (used by tests to skip absent levels).
pub fn available(l: Level) -> bool {
    l <= detected()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_names() {
        for l in Level::ALL {
            assert_eq!(Level::parse(l.name()), Some(l));
        }
        assert_eq!(Level::parse("AVX2"), Some(Level::Avx2));
        assert_eq!(Level::parse("neon"), None);
        assert!(Level::Scalar < Level::Avx512Vnni);
    }
}
