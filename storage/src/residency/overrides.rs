//! Tensor placement overrides: llama.cpp's `-ot PATTERN=BUFFER` (and the rules the engine makes
//! of `--cpu-moe` and `--n-cpu-moe N`), plus strata's own `RAM` target.
//!
//! Rules are tried in order against each tensor's name (a regular expression searched anywhere
//! in the name, as llama.cpp does); the first that matches decides. Targets:
//! - `CPU`: computed on the CPU from host memory; which host tier (RAM or streamed from SSD)
//!   the RAM budget decides.
//! - `RAM`: like `CPU`, and held in RAM: counted against the budget first, and a plan whose
//!   pinned tensors do not fit in it fails.
//! - `CUDA0`, `CUDA1`, …: a GPU. The engine places these (storage reads them like any other),
//!   and refuses them when no GPU device was asked for, naming the
//!   tensor, so a command line written for a GPU machine fails clearly instead of silently
//!   computing somewhere else.

use regex::Regex;

/// Where an override sends a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Cpu,
    Ram,
    Gpu(u32),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Cpu => f.write_str("CPU"),
            Target::Ram => f.write_str("RAM"),
            Target::Gpu(i) => write!(f, "CUDA{i}"),
        }
    }
}

/// One `PATTERN=TARGET` rule.
#[derive(Clone, Debug)]
pub struct TensorOverride {
    pub pattern: Regex,
    pub target: Target,
}

/// Longest pattern accepted (a command-line argument, not a file).
const MAX_PATTERN: usize = 4096;

fn parse_target(s: &str) -> Result<Target, String> {
    let upper = s.trim().to_ascii_uppercase();
    match upper.as_str() {
        "CPU" => Ok(Target::Cpu),
        "RAM" => Ok(Target::Ram),
        _ => match upper.strip_prefix("CUDA").map(str::parse::<u32>) {
            Some(Ok(i)) if i < 64 => Ok(Target::Gpu(i)),
            _ => Err(format!(
                "unknown buffer type {s:?} (expected CPU, RAM or CUDA0, CUDA1, …)"
            )),
        },
    }
}

/// Parses one `-ot` value: `PATTERN=TARGET[,PATTERN=TARGET…]` (llama.cpp accepts lists).
pub fn parse_overrides(spec: &str) -> Result<Vec<TensorOverride>, String> {
    let mut out = Vec::new();
    for rule in spec.split(',') {
        let (pattern, target) = rule
            .rsplit_once('=')
            .ok_or_else(|| format!("{rule:?} is not PATTERN=BUFFER_TYPE"))?;
        if pattern.is_empty() {
            return Err(format!("{rule:?}: the tensor name pattern is empty"));
        }
        if pattern.len() > MAX_PATTERN {
            return Err(format!(
                "a pattern of {} bytes is longer than the {MAX_PATTERN} accepted",
                pattern.len()
            ));
        }
        let target = parse_target(target)?;
        let pattern = regex::RegexBuilder::new(pattern)
            .size_limit(1 << 20)
            .build()
            .map_err(|e| format!("pattern {pattern:?}: {e}"))?;
        out.push(TensorOverride { pattern, target });
    }
    Ok(out)
}

/// The target of the first rule matching `name`.
pub fn target_of(rules: &[TensorOverride], name: &str) -> Option<Target> {
    rules
        .iter()
        .find(|r| r.pattern.is_match(name))
        .map(|r| r.target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_the_first_match_decides() {
        let r = parse_overrides(r"blk\.1\.ffn_.*=RAM,exps=cpu").unwrap();
        assert_eq!(target_of(&r, "blk.1.ffn_up_exps.weight"), Some(Target::Ram));
        assert_eq!(target_of(&r, "blk.2.ffn_up_exps.weight"), Some(Target::Cpu));
        assert_eq!(target_of(&r, "blk.2.attn_q.weight"), None);
        let g = parse_overrides("attn=CUDA1").unwrap();
        assert_eq!(g[0].target, Target::Gpu(1));
    }

    #[test]
    fn bad_rules_name_the_problem() {
        let e = parse_overrides("exps").unwrap_err();
        assert!(e.contains("PATTERN=BUFFER_TYPE"), "{e}");
        let e = parse_overrides("exps=VRAM").unwrap_err();
        assert!(e.contains("unknown buffer type \"VRAM\""), "{e}");
        let e = parse_overrides("(exps=CPU").unwrap_err();
        assert!(e.contains("pattern \"(exps\""), "{e}");
        let e = parse_overrides("=CPU").unwrap_err();
        assert!(e.contains("empty"), "{e}");
        let e = parse_overrides(&format!("{}=CPU", "a".repeat(5000))).unwrap_err();
        assert!(e.contains("longer"), "{e}");
        // A pattern whose automaton would be huge is refused, not built.
        let e = parse_overrides(r"\w{1000}\w{1000}=CPU").unwrap_err();
        assert!(e.contains("pattern"), "{e}");
    }
}
