//! Hardware profiles: what the planner's cost model knows about a machine. Shipped profiles
//! come from published figures (and, for the 2-core CPU machine, from `strata calibrate` on
//! this project's machines); `strata calibrate` measures the machine it runs on.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use strata_storage::quant::GgmlType;

use crate::error::EngineError;

/// A machine as the cost model sees it. Rates are bytes per second of weights (or KV cache)
/// processed, so that a phase's time is its bytes over its rate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HwProfile {
    pub name: String,
    /// Where the figures come from (a measurement's command, or the published sources).
    pub source: String,
    pub ram_bytes: u64,
    pub cpu: CpuProfile,
    pub disk: DiskProfile,
    #[serde(default)]
    pub gpu: Option<GpuProfile>,
    /// The CPU's decode kernels as `strata calibrate` chose them by measurement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode: Option<DecodeProfile>,
}

/// The decode kernels `strata calibrate` measured fastest on a CPU (`strata_simd::tune`: rows
/// or interleaved, 256- or 512-bit, and the prefetch distance, per weight type). A load on the
/// same CPU takes them instead of the SIMD level's defaults, without measuring: every process
/// then runs the measured kernels, and all of them the same ones (the same bits).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeProfile {
    /// The CPU they were measured on: its model name and SIMD level
    /// ([`crate::plan::calibrate::cpu_id`]). Another CPU ignores them.
    pub cpu: String,
    /// `Q4_K=interleaved256/4608 Q6_K=rows …` ([`strata_simd::tune::Tuning::summary`]).
    pub kernels: String,
    /// The kernels' revision they were measured with ([`strata_simd::tune::REVISION`]; 1 in
    /// files written before it was kept). Another revision's choice is measured again.
    #[serde(default = "first_revision")]
    pub revision: u32,
}

fn first_revision() -> u32 {
    1
}

/// The weight type an item of [`DecodeProfile::kernels`] (`Q4_K=rows`) names.
fn item_type(item: &str) -> Option<GgmlType> {
    strata_simd::tune::type_named(item.split_once('=').map_or(item, |(n, _)| n))
}

/// The largest decode memory file read (a few hundred bytes are written).
const DECODE_FILE_MAX: u64 = 64 << 10;

impl DecodeProfile {
    /// A choice measured now on the CPU `cpu` names, by this build's kernels, for the weight
    /// types `types` (those it names; a later load measures the others it meets).
    pub fn measured(cpu: String, tuning: &strata_simd::tune::Tuning, types: &[GgmlType]) -> Self {
        DecodeProfile {
            cpu,
            kernels: tuning.summary_of(types),
            revision: strata_simd::tune::REVISION,
        }
    }

    /// The weight types this choice names, in its order.
    pub fn types(&self) -> Vec<GgmlType> {
        self.kernels
            .split_whitespace()
            .filter_map(item_type)
            .collect()
    }

    /// Why this choice does not apply to the CPU `cpu` names with this build's kernels, if it
    /// does not: measured on another CPU, or by another revision of the kernels.
    pub fn mismatch(&self, cpu: &str) -> Option<String> {
        if self.cpu != cpu {
            Some(format!("measured on {}, not on this CPU ({cpu})", self.cpu))
        } else if self.revision != strata_simd::tune::REVISION {
            Some(format!(
                "measured with revision {} of the decode kernels (this build has {})",
                self.revision,
                strata_simd::tune::REVISION
            ))
        } else {
            None
        }
    }

    /// The file in `dir` that keeps the choice for the CPU `cpu` names
    /// ([`crate::plan::calibrate::cpu_id`]): one per CPU and SIMD level, so that runs at
    /// another level (`STRATA_SIMD`) or on another machine sharing the directory keep theirs.
    pub fn memory_file(dir: &std::path::Path, cpu: &str) -> std::path::PathBuf {
        let mut name: String = cpu
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        name.truncate(120);
        dir.join(format!("{name}.toml"))
    }

    /// The choice kept at `path` by an earlier load ([`DecodeProfile::remember`]): `None` when
    /// there is no file, an error naming the file and the problem when it cannot be read or
    /// is not a choice.
    pub fn recall(path: &std::path::Path) -> Result<Option<Self>, String> {
        let shown = path.display();
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{shown}: {e}")),
        };
        if meta.len() > DECODE_FILE_MAX {
            return Err(format!(
                "{shown}: {} bytes is too large for a decode choice",
                meta.len()
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{shown}: {e}"))?;
        let d: DecodeProfile = toml::from_str(&text).map_err(|e| format!("{shown}: {e}"))?;
        d.tuning(strata_simd::tune::Tuning::default_for(
            strata_simd::dispatch::Level::Scalar,
        ))
        .map_err(|e| format!("{shown}: {e}"))?;
        Ok(Some(d))
    }

    /// Keeps this choice at `path` for later loads and returns the choice the file holds
    /// after, which every process on the CPU then runs. A type the file already names for this
    /// CPU and kernel revision keeps the file's choice (another process measured it first);
    /// the others are added to it. A file for another CPU or kernel revision, or one that
    /// cannot be read, is replaced. Two processes keeping choices at once take turns (an
    /// exclusive `flock` on the directory), and the file is written whole before it appears
    /// (a rename of a finished temporary file), so a reader never sees half of one.
    pub fn remember(&self, path: &std::path::Path) -> Result<DecodeProfile, String> {
        let shown = path.display();
        let dir = path.parent().unwrap_or(std::path::Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let lock = std::fs::File::open(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // SAFETY: flock on a descriptor this function owns; released when `lock` is closed.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(format!("locking {}: {e}", dir.display()));
        }
        let kept = match Self::recall(path) {
            Ok(Some(d)) if d.cpu == self.cpu && d.revision == self.revision => {
                let have = d.types();
                let mut kernels = d.kernels.clone();
                for item in self.kernels.split_whitespace() {
                    if item_type(item).is_some_and(|ty| !have.contains(&ty)) {
                        if !kernels.is_empty() {
                            kernels.push(' ');
                        }
                        kernels.push_str(item);
                    }
                }
                if kernels == d.kernels {
                    return Ok(d);
                }
                DecodeProfile { kernels, ..d }
            }
            _ => self.clone(),
        };
        let text = toml::to_string_pretty(&kept).map_err(|e| format!("{shown}: {e}"))?;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("decode");
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let written = std::fs::write(&tmp, text)
            .map_err(|e| format!("{}: {e}", tmp.display()))
            .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| format!("{shown}: {e}")));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.map(|()| kept)
    }

    /// The choices over `base` (types not named keep `base`'s).
    pub fn tuning(
        &self,
        base: strata_simd::tune::Tuning,
    ) -> Result<strata_simd::tune::Tuning, String> {
        strata_simd::tune::Tuning::parse(&self.kernels, base)
            .map_err(|e| format!("decode.kernels: {e}"))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuProfile {
    pub description: String,
    pub threads: u32,
    /// Measured read bandwidth of the threads together.
    pub mem_read_gbs: f64,
    /// Decode (one token): GB of weights per second through a matrix-vector product, by type
    /// name (`q4_k`, `q6_k`, `q8_0`, `f16`, …); `default` for types not listed.
    pub matvec_gbs: BTreeMap<String, f64>,
    /// Fixed cost of one matrix product (thread-pool hand-off, activation quantization), µs.
    pub matvec_overhead_us: f64,
    /// Prefill: tokens × weight-GB per second through the batched kernels (a batch of n tokens
    /// over a matrix of b bytes takes n·b / (1e9 · rate) seconds), by type name.
    pub gemm_token_gbs: BTreeMap<String, f64>,
    /// Attention in decode: GB of f16 KV cache read per second.
    pub attention_gbs: f64,
    /// Everything else in a layer (norms, RoPE, activation, residuals) per token, µs.
    pub layer_overhead_us: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskProfile {
    pub description: String,
    /// Sequential O_DIRECT read bandwidth.
    pub read_gbs: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuProfile {
    pub name: String,
    pub vram_bytes: u64,
    /// Device memory bandwidth (published peak).
    pub mem_gbs: f64,
    /// Fraction of `mem_gbs` decode kernels reach (matrix-vector products and attention).
    pub matvec_efficiency: f64,
    /// Dense tensor-core throughput, TFLOPS (f16 with f32 accumulation) and TOPS (int8).
    pub f16_tflops: f64,
    pub int8_tops: f64,
    /// Fraction of the tensor-core peak prefill GEMMs reach.
    pub gemm_efficiency: f64,
    /// Host-to-device copy bandwidth from pinned memory.
    pub h2d_gbs: f64,
    /// Device-to-host.
    pub d2h_gbs: f64,
    /// One kernel launch (within a captured graph), µs.
    pub launch_us: f64,
    /// One small copy across PCIe and its synchronisation (a crossing), µs.
    pub crossing_us: f64,
}

impl HwProfile {
    /// A profile by shipped name, or from a TOML file at that path.
    pub fn load(name_or_path: &str) -> Result<HwProfile, EngineError> {
        if let Some(p) = shipped(name_or_path) {
            return Ok(p);
        }
        let path = std::path::Path::new(name_or_path);
        if !path.exists() {
            return Err(EngineError::Invalid(format!(
                "no hardware profile `{name_or_path}`: not a file, nor one of {}",
                SHIPPED
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let meta = std::fs::metadata(path)
            .map_err(|e| EngineError::Invalid(format!("{name_or_path}: {e}")))?;
        if meta.len() > 1 << 20 {
            return Err(EngineError::Invalid(format!(
                "{name_or_path}: {} bytes is too large for a hardware profile",
                meta.len()
            )));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| EngineError::Invalid(format!("{name_or_path}: {e}")))?;
        Self::from_toml(&text).map_err(|e| EngineError::Invalid(format!("{name_or_path}: {e}")))
    }

    pub fn from_toml(text: &str) -> Result<HwProfile, String> {
        let p: HwProfile = toml::from_str(text).map_err(|e| e.to_string())?;
        p.validate()?;
        Ok(p)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// Rates must be positive and finite: a zero would make the model predict infinite time.
    fn validate(&self) -> Result<(), String> {
        let pos = |what: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("{what} must be a positive number, not {v}"))
            }
        };
        pos("cpu.mem_read_gbs", self.cpu.mem_read_gbs)?;
        pos("cpu.attention_gbs", self.cpu.attention_gbs)?;
        pos("disk.read_gbs", self.disk.read_gbs)?;
        if !self.cpu.matvec_gbs.contains_key("default") {
            return Err("cpu.matvec_gbs needs a `default` rate".into());
        }
        if !self.cpu.gemm_token_gbs.contains_key("default") {
            return Err("cpu.gemm_token_gbs needs a `default` rate".into());
        }
        for (k, v) in self.cpu.matvec_gbs.iter().chain(&self.cpu.gemm_token_gbs) {
            pos(&format!("cpu rate `{k}`"), *v)?;
        }
        if let Some(g) = &self.gpu {
            for (what, v) in [
                ("gpu.mem_gbs", g.mem_gbs),
                ("gpu.matvec_efficiency", g.matvec_efficiency),
                ("gpu.f16_tflops", g.f16_tflops),
                ("gpu.int8_tops", g.int8_tops),
                ("gpu.gemm_efficiency", g.gemm_efficiency),
                ("gpu.h2d_gbs", g.h2d_gbs),
                ("gpu.d2h_gbs", g.d2h_gbs),
            ] {
                pos(what, v)?;
            }
            if g.vram_bytes == 0 {
                return Err("gpu.vram_bytes must not be 0".into());
            }
        }
        if let Some(d) = &self.decode {
            d.tuning(strata_simd::tune::Tuning::default_for(
                strata_simd::dispatch::Level::Scalar,
            ))?;
        }
        Ok(())
    }

    /// Decode rate of the CPU for weights of `ty`, GB/s.
    pub fn cpu_matvec_gbs(&self, ty: GgmlType) -> f64 {
        rate(&self.cpu.matvec_gbs, ty)
    }

    /// Prefill rate of the CPU for weights of `ty` (tokens × GB / s).
    pub fn cpu_gemm_token_gbs(&self, ty: GgmlType) -> f64 {
        rate(&self.cpu.gemm_token_gbs, ty)
    }
}

/// The type's key in the rate tables (`q4_k`, `f16`, …).
pub fn type_key(ty: GgmlType) -> String {
    ty.name().to_ascii_lowercase()
}

fn rate(table: &BTreeMap<String, f64>, ty: GgmlType) -> f64 {
    table
        .get(&type_key(ty))
        .or_else(|| table.get("default"))
        .copied()
        .unwrap_or(1.0)
}

/// The profiles strata ships, by name.
pub const SHIPPED: &[(&str, &str)] = &[
    ("cpu-2core", include_str!("../../profiles/cpu-2core.toml")),
    ("h100-sxm", include_str!("../../profiles/h100-sxm.toml")),
    ("h200", include_str!("../../profiles/h200.toml")),
    ("a100-80g", include_str!("../../profiles/a100-80g.toml")),
    ("l40s", include_str!("../../profiles/l40s.toml")),
    ("rtx4090", include_str!("../../profiles/rtx4090.toml")),
    ("rtx3090", include_str!("../../profiles/rtx3090.toml")),
    ("laptop-8g", include_str!("../../profiles/laptop-8g.toml")),
];

/// A shipped profile by name.
pub fn shipped(name: &str) -> Option<HwProfile> {
    SHIPPED
        .iter()
        .find(|(n, _)| *n == name)
        .and_then(|(_, text)| HwProfile::from_toml(text).ok())
}
