//! Instruction-set level detection, done once per process.
//!
//! [`level`] probes the CPU the first time it is called, caches the answer and logs it. The
//! environment variable `STRATA_SIMD=scalar|neon|avx2|avx512|avx512vnni` lowers the level (it
//! can never raise it above what the CPU has), so CI can exercise every path on one machine.

use std::sync::OnceLock;

/// A SIMD level; a higher level of the same architecture implies the lower ones.
///
/// - `Neon`: aarch64 Advanced SIMD (every aarch64 CPU); kernels additionally use `sdot` where
///   the CPU has the `dotprod` extension, detected separately (see [`level`]'s log line).
///   It sorts below the x86 levels so that x86 code's `level >= Level::Avx2` tests stay false
///   for it; it is never detected on x86 (nor x86 levels on aarch64), see [`available`].
/// - `Avx2`: AVX2 + FMA + F16C.
/// - `Avx512`: `Avx2` plus AVX-512 F/BW/VL/DQ.
/// - `Avx512Vnni`: `Avx512` plus AVX-512 VNNI (`vpdpbusd`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Scalar,
    Neon,
    Avx2,
    /// AVX2 with AVX-VNNI (`vpdpbusd` in 256-bit VEX form): Intel client cores from Alder
    /// Lake on, which have no AVX-512. Not implied by the levels above it (Skylake-X has
    /// AVX-512 without any VNNI, Zen 4 has AVX-512 VNNI without the VEX form): [`available`]
    /// asks the CPU, and kernels for it are handed out only where it has the feature.
    AvxVnni,
    Avx512,
    Avx512Vnni,
}

impl Level {
    /// Every level, lowest first.
    pub const ALL: [Level; 6] = [
        Level::Scalar,
        Level::Neon,
        Level::Avx2,
        Level::AvxVnni,
        Level::Avx512,
        Level::Avx512Vnni,
    ];

    /// The name `STRATA_SIMD` accepts.
    pub const fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Neon => "neon",
            Level::Avx2 => "avx2",
            Level::AvxVnni => "avxvnni",
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
                Some(forced) => highest_available_up_to(forced),
                None => {
                    tracing::warn!(value = %v, "STRATA_SIMD not understood; using the detected level");
                    detected
                }
            },
            Err(_) => detected,
        };
        #[cfg(target_arch = "aarch64")]
        tracing::info!(
            detected = detected.name(),
            chosen = chosen.name(),
            dotprod = crate::arch::aarch64::has_dotprod(),
            "SIMD level"
        );
        #[cfg(not(target_arch = "aarch64"))]
        tracing::info!(detected = detected.name(), chosen = chosen.name(), "SIMD level");
        chosen
    })
}

/// The highest level at most `l` that this CPU can run: `STRATA_SIMD=avx2` on an aarch64 CPU
/// means `neon`, and `neon` on an x86 CPU means `scalar`.
fn highest_available_up_to(l: Level) -> Level {
    Level::ALL
        .into_iter()
        .rev()
        .find(|&x| x <= l && available(x))
        .unwrap_or(Level::Scalar)
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
            return if has_avx_vnni() {
                Level::AvxVnni
            } else {
                Level::Avx2
            };
        }
        if is_x86_feature_detected!("avx512vnni") {
            Level::Avx512Vnni
        } else {
            Level::Avx512
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            Level::Neon
        } else {
            Level::Scalar
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        Level::Scalar
    }
}

/// Whether this CPU can run kernels of `l` (used by tests to skip absent levels). Levels of
/// another architecture are never available, whatever their place in the order.
pub fn available(l: Level) -> bool {
    let this_arch = match l {
        Level::Scalar => true,
        Level::Neon => cfg!(target_arch = "aarch64"),
        Level::Avx2 | Level::Avx512 | Level::Avx512Vnni => cfg!(target_arch = "x86_64"),
        Level::AvxVnni => has_avx_vnni(),
    };
    this_arch && l <= detected()
}

/// Whether this CPU has AVX2, FMA, F16C and AVX-VNNI (the VEX-encoded 256-bit `vpdpbusd`).
pub fn has_avx_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
            && is_x86_feature_detected!("avxvnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
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
        assert_eq!(Level::parse("neon"), Some(Level::Neon));
        assert_eq!(Level::parse("sve"), None);
        assert!(Level::Scalar < Level::Avx512Vnni);
        // x86 code tests `level >= Level::Avx2`; Neon must never pass that.
        assert!(Level::Neon < Level::Avx2);
        assert_eq!(Level::parse("avxvnni"), Some(Level::AvxVnni));
    }

    #[test]
    fn other_architectures_levels_are_unavailable() {
        assert!(available(Level::Scalar));
        assert!(available(detected()));
        if cfg!(target_arch = "x86_64") {
            assert!(!available(Level::Neon));
            assert_eq!(highest_available_up_to(Level::Neon), Level::Scalar);
        }
        if cfg!(target_arch = "aarch64") {
            assert_eq!(detected(), Level::Neon);
            assert!(!available(Level::Avx2));
            assert_eq!(highest_available_up_to(Level::Avx512Vnni), Level::Neon);
        }
        // AVX-VNNI is a feature of its own, not implied by the AVX-512 levels above it.
        assert_eq!(available(Level::AvxVnni), has_avx_vnni());
        if detected() == Level::AvxVnni {
            assert!(has_avx_vnni());
        }
        for l in Level::ALL {
            let h = highest_available_up_to(l);
            assert!(h <= l && available(h), "{l:?} -> {h:?}");
        }
    }
}
