//! How a model is loaded, and the one place that turns settings as a user writes them (the
//! CLI's flags, the daemon's config keys, `STRATA_*` variables) into those options. The CLI
//! and the daemon read their flags, keys and the environment once, at the edge; the engine
//! reads nothing itself.

use strata_storage::io::{IoKind, ReaderOptions};
use strata_storage::residency::{ExpertPolicy, LoadOptions};

use super::names;
use super::predict::ExpertSettings;

/// How to load a model: where its weights are held (storage's residency options) and the
/// engine's own settings.
#[derive(Clone, Debug, Default)]
pub struct ModelOptions {
    pub residency: LoadOptions,
    /// Where the GPU executor runs and what the planner may put there (none: CPU only).
    pub gpu: GpuOptions,
    pub experts: ExpertSettings,
    /// Keep every matrix in the file's row-major layout, even where the CPU executor would
    /// repack a resident one for its kernels (`STRATA_INTERLEAVE=0`; comparisons that need
    /// identical arithmetic whatever the placement).
    pub keep_file_layout: bool,
    /// Run every GPU decode step kernel by kernel, never as a CUDA graph
    /// (`STRATA_GPU_GRAPHS=0`; llama.cpp's `GGML_CUDA_DISABLE_GRAPHS`).
    pub no_gpu_graphs: bool,
    /// How the CPU's decode kernels are chosen (`STRATA_DECODE`, `STRATA_PREFETCH`).
    pub decode: DecodeSetting,
    /// Where this machine keeps the decode kernels a first load measured (the model store's
    /// `decode/`, a file per CPU and SIMD level; set by the CLI and the daemon): with
    /// `STRATA_DECODE` unset and no
    /// `strata calibrate` choice for this CPU, the first load measures every candidate and
    /// keeps its choice there, and later loads take it. `None` (the library's default):
    /// only the default kernels' prefetch distance is measured.
    pub decode_memory: Option<std::path::PathBuf>,
}

/// How the CPU's decode kernels are chosen for each weight type: row or interleaved kernels,
/// 256- or 512-bit, and the interleaved kernels' prefetch distance (`strata_simd::tune`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DecodeSetting {
    /// Whatever the process holds already (the SIMD level's defaults until something is set):
    /// tests, and loads after the first.
    #[default]
    Current,
    /// Measured on this CPU at the first load of the process, the prefetch distance fixed
    /// when given (`STRATA_PREFETCH`). `kernels` false (`STRATA_DECODE` unset): only the
    /// prefetch distance of the SIMD level's default kernels, which changes no result; true
    /// (`STRATA_DECODE=auto`): also rows against interleaved and the vector width, which may
    /// be faster on a CPU where the default loses, but can round differently from process to
    /// process (`strata_simd::tune::measure`).
    Measure {
        prefetch: Option<usize>,
        kernels: bool,
    },
    /// Every type that has the interleaved layout decoded one way (`STRATA_DECODE=rows`,
    /// `interleaved256`, `interleaved512`).
    Fixed {
        decode: strata_simd::tune::Decode,
        prefetch: Option<usize>,
    },
}

impl DecodeSetting {
    /// `STRATA_DECODE` and `STRATA_PREFETCH` as `var` looks them up.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let prefetch = match var("STRATA_PREFETCH") {
            None => None,
            Some(v) => Some(v.trim().parse::<usize>().map_err(|_| {
                format!("STRATA_PREFETCH={v:?}: expected a distance in bytes (0: none)")
            })?),
        };
        Ok(match var("STRATA_DECODE").as_deref().map(str::trim) {
            None | Some("") => DecodeSetting::Measure {
                prefetch,
                kernels: false,
            },
            Some("auto") => DecodeSetting::Measure {
                prefetch,
                kernels: true,
            },
            Some(v) => match strata_simd::tune::Decode::parse(v) {
                Some(decode) => DecodeSetting::Fixed { decode, prefetch },
                None => {
                    return Err(format!(
                        "STRATA_DECODE={v:?}: expected auto, rows, interleaved256 or \
                         interleaved512"
                    ));
                }
            },
        })
    }
}

impl From<LoadOptions> for ModelOptions {
    fn from(residency: LoadOptions) -> Self {
        Self {
            residency,
            ..Self::default()
        }
    }
}

/// Which device the GPU phases run on.
#[derive(Clone, Debug, Default)]
pub enum DeviceSpec {
    /// No GPU: every phase on the CPU.
    #[default]
    Cpu,
    /// GPU `n` through the CUDA driver.
    Cuda(usize),
    /// The simulated GPU (the kernels' text run on this CPU): tests, and `--device sim`.
    Sim(strata_kernels::SimConfig),
}

/// The GPU half of loading: the device, the user's placement words, and the hardware the
/// planner's cost model assumes.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    pub device: DeviceSpec,
    /// llama.cpp's `-ngl`: the last N of the layers (the output counts as one) on the GPU.
    pub n_gpu_layers: Option<usize>,
    /// VRAM the weights and KV cache may use (default: 90% of the device's).
    pub vram_budget: Option<u64>,
    /// KV cache VRAM for each context (the rest of a GPU layer's pages in RAM); default: what
    /// the planner left after the weights.
    pub kv_vram_budget: Option<usize>,
    /// llama.cpp's `-nkvo`: the KV cache in host RAM, attention on the CPU.
    pub no_kv_offload: bool,
    /// The machine as the planner models it (`strata calibrate`'s profile, or a shipped one);
    /// the GPU part is filled from the device when absent.
    pub profile: Option<crate::plan::HwProfile>,
    /// Context size the planner sizes the KV cache for.
    pub n_ctx: Option<usize>,
}

/// The settings that come from `STRATA_*` variables rather than flags or config keys.
#[derive(Clone, Debug, Default)]
pub struct EnvSettings {
    /// `STRATA_IO`, `STRATA_IO_FAULTS`.
    pub io: ReaderOptions,
    /// `STRATA_EXPERT_PREFETCH`, `_LOOKAHEAD`, `_PRIOR`, `_MARGIN`.
    pub experts: ExpertSettings,
    /// `STRATA_EXPERT_POLICY`.
    pub expert_policy: ExpertPolicy,
    /// `STRATA_INTERLEAVE=0`.
    pub keep_file_layout: bool,
    /// `STRATA_GPU_GRAPHS=0`.
    pub no_gpu_graphs: bool,
    /// `STRATA_DECODE`, `STRATA_PREFETCH`.
    pub decode: DecodeSetting,
}

impl EnvSettings {
    /// The settings from variables as `var` looks them up (at the edge:
    /// `|k| std::env::var(k).ok()`); a bad value is an error naming its variable.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let io = ReaderOptions::from_vars(&var).map_err(|e| e.to_string())?;
        let experts = ExpertSettings::from_vars(&var)?;
        let expert_policy = match var("STRATA_EXPERT_POLICY") {
            Some(v) => {
                ExpertPolicy::from_name(&v).map_err(|e| format!("STRATA_EXPERT_POLICY: {e}"))?
            }
            None => ExpertPolicy::default(),
        };
        let keep_file_layout = match var("STRATA_INTERLEAVE").as_deref() {
            None | Some("" | "1") => false,
            Some("0") => true,
            Some(v) => return Err(format!("STRATA_INTERLEAVE={v:?}: expected 0 or 1")),
        };
        let no_gpu_graphs = match var("STRATA_GPU_GRAPHS").as_deref() {
            None | Some("" | "1") => false,
            Some("0") => true,
            Some(v) => return Err(format!("STRATA_GPU_GRAPHS={v:?}: expected 0 or 1")),
        };
        let decode = DecodeSetting::from_vars(&var)?;
        Ok(Self {
            io,
            experts,
            expert_policy,
            keep_file_layout,
            no_gpu_graphs,
            decode,
        })
    }
}

/// llama.cpp's `--cpu-moe` and `--n-cpu-moe N`: the expert tensors of every layer, or of the
/// first N, kept on the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuMoe {
    All,
    First(usize),
}

/// What the residency settings are called where they were written, for error messages.
#[derive(Clone, Copy, Debug)]
pub struct SettingNames {
    pub ram_budget: &'static str,
    pub prefetch: &'static str,
    pub override_tensor: &'static str,
    pub n_cpu_moe: &'static str,
}

impl SettingNames {
    /// As `strata`'s flags.
    pub const FLAGS: Self = Self {
        ram_budget: "--ram-budget",
        prefetch: "--prefetch",
        override_tensor: "--override-tensor",
        n_cpu_moe: "--n-cpu-moe",
    };
    /// As `stratad`'s config keys.
    pub const KEYS: Self = Self {
        ram_budget: "ram_budget",
        prefetch: "prefetch",
        override_tensor: "override_tensor",
        n_cpu_moe: "n_cpu_moe",
    };
}

/// How a model's weights are held, as a user writes it.
#[derive(Clone, Debug, Default)]
pub struct LoadSettings {
    /// A size ("6G") or a share of the model's weights ("30%").
    pub ram_budget: Option<String>,
    /// Streaming buffers (2 to 64).
    pub prefetch: Option<usize>,
    pub mmap: bool,
    /// The I/O engine, over `STRATA_IO`.
    pub io: Option<IoKind>,
    /// `PATTERN=TYPE[,…]` rules.
    pub override_tensor: Vec<String>,
    pub cpu_moe: Option<CpuMoe>,
}

impl LoadSettings {
    /// The options for a model whose file is `file_bytes` long: these settings over what the
    /// environment said. An error names the setting as `names` call it.
    pub fn options(
        &self,
        file_bytes: u64,
        names: &SettingNames,
        env: &EnvSettings,
    ) -> Result<ModelOptions, String> {
        if let Some(w) = self.prefetch
            && !(2..=64).contains(&w)
        {
            return Err(format!(
                "{} must be between 2 and 64 buffers, not {w}",
                names.prefetch
            ));
        }
        let mut residency = LoadOptions::from_settings(
            self.ram_budget.as_deref(),
            file_bytes,
            &self.override_tensor,
            (names.ram_budget, names.override_tensor),
        )?;
        match self.cpu_moe {
            None => {}
            Some(CpuMoe::All) => residency.overrides.push(names::cpu_moe(None)),
            Some(CpuMoe::First(n)) if n > 4096 => {
                return Err(format!(
                    "{} {n}: more layers than any model has",
                    names.n_cpu_moe
                ));
            }
            Some(CpuMoe::First(n)) => residency.overrides.push(names::cpu_moe(Some(n))),
        }
        residency.window = self.prefetch;
        residency.mmap = self.mmap;
        residency.io = env.io.clone();
        if let Some(kind) = self.io {
            residency.io.kind = Some(kind);
        }
        residency.expert_policy = env.expert_policy;
        Ok(ModelOptions {
            residency,
            gpu: GpuOptions::default(),
            experts: env.experts.clone(),
            keep_file_layout: env.keep_file_layout,
            no_gpu_graphs: env.no_gpu_graphs,
            decode: env.decode,
            decode_memory: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_simd::tune::Decode;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let v: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| v.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn decode_setting_from_variables() {
        assert_eq!(
            DecodeSetting::from_vars(vars(&[])),
            Ok(DecodeSetting::Measure {
                prefetch: None,
                kernels: false
            })
        );
        assert_eq!(
            DecodeSetting::from_vars(vars(&[("STRATA_DECODE", "auto")])),
            Ok(DecodeSetting::Measure {
                prefetch: None,
                kernels: true
            })
        );
        assert_eq!(
            DecodeSetting::from_vars(vars(&[
                ("STRATA_DECODE", "interleaved256"),
                ("STRATA_PREFETCH", "0")
            ])),
            Ok(DecodeSetting::Fixed {
                decode: Decode::Interleaved256,
                prefetch: Some(0)
            })
        );
        let e = DecodeSetting::from_vars(vars(&[("STRATA_DECODE", "fast")])).unwrap_err();
        assert!(e.contains("STRATA_DECODE"), "{e}");
        let e = DecodeSetting::from_vars(vars(&[("STRATA_PREFETCH", "-1")])).unwrap_err();
        assert!(e.contains("STRATA_PREFETCH"), "{e}");
    }
}
