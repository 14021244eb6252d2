//! `strata-ptx`: makes and checks the kernels' PTX with NVIDIA's own compilers.
//!
//! ```text
//! strata-ptx gen --include DIR [--out DIR] [--check]
//!     NVRTC (libnvrtc.so.12 on LD_LIBRARY_PATH) compiles each kernels/cuda/*.cu for
//!     compute_80 with DIR as the CUDA headers (cuda_fp16.h …) and writes kernels/ptx/<file>.ptx;
//!     with --check, writes nothing and fails if any differs from what is committed.
//! strata-ptx ptxas --ptxas PATH [--archs sm_80,sm_86,sm_89,sm_90] [--dir kernels/ptx]
//!     assembles every PTX file for each architecture and prints a table of each kernel's
//!     registers, spills, shared memory and the most threads a block can have; fails on any
//!     spill or a resource over the architecture's limit.
//! ```
//! `kernels/tools/ci.sh` fetches the compilers (Python wheels) and runs both.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("gen") => generate(&args[1..]),
        Some("ptxas") => ptxas(&args[1..]),
        _ => Err(
            "usage: strata-ptx gen --include DIR [--out DIR] [--check] | strata-ptx ptxas \
                  --ptxas PATH [--archs LIST] [--dir DIR]"
                .into(),
        ),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn kernels_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn cu_files() -> Result<Vec<PathBuf>, String> {
    let dir = kernels_dir().join("cuda");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    v.sort();
    Ok(v)
}

fn generate(args: &[String]) -> Result<(), String> {
    let include = flag(args, "--include").ok_or("--include DIR (the CUDA headers) is required")?;
    let out = flag(args, "--out").map_or_else(|| kernels_dir().join("ptx"), PathBuf::from);
    let check = args.iter().any(|a| a == "--check");
    // SAFETY: only tries to open the library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(
            "libnvrtc.so.12 not found: put the lib/ folder of the Python package \
                    nvidia-cuda-nvrtc-cu12 on LD_LIBRARY_PATH (kernels/tools/ci.sh does)"
                .into(),
        );
    }
    let cuda = kernels_dir().join("cuda");
    let mut stale = Vec::new();
    for src in cu_files()? {
        let name = src
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or("bad file name")?
            .to_string();
        let text = std::fs::read_to_string(&src).map_err(|e| format!("{name}: {e}"))?;
        let opts = CompileOptions {
            arch: Some("compute_80"),
            include_paths: vec![cuda.display().to_string(), include.to_string()],
            options: vec!["--std=c++17".into(), "-DNDEBUG".into()],
            name: Some(name.clone()),
            ..Default::default()
        };
        let ptx = compile_ptx_with_opts(&text, opts).map_err(|e| format!("{name}: {e:?}"))?;
        let ptx = ptx.to_src();
        let stem = name.trim_end_matches(".cu");
        let dst = out.join(format!("{stem}.ptx"));
        if check {
            let old = std::fs::read_to_string(&dst).unwrap_or_default();
            if old != ptx {
                stale.push(dst.display().to_string());
            }
        } else {
            std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
            std::fs::write(&dst, &ptx).map_err(|e| format!("{}: {e}", dst.display()))?;
            println!(
                "{} ({} kernels)",
                dst.display(),
                strata_kernels::ptx::entries(&ptx).count()
            );
        }
    }
    if check {
        // Committed PTX of a kernel file that no longer exists is stale too.
        let have: Vec<String> = cu_files()?
            .iter()
            .filter_map(|p| p.file_stem()?.to_str().map(|s| format!("{s}.ptx")))
            .collect();
        if let Ok(rd) = std::fs::read_dir(&out) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.ends_with(".ptx") && !have.contains(&n) {
                    stale.push(format!("{} (no such kernel file)", e.path().display()));
                }
            }
        }
        if !stale.is_empty() {
            return Err(format!(
                "the committed PTX differs from what NVRTC makes of the sources: {} — run \
                 kernels/tools/ci.sh --regen and commit kernels/ptx/",
                stale.join(", ")
            ));
        }
        println!("PTX up to date ({} files)", have.len());
    }
    Ok(())
}

#[derive(Clone, Debug, Default)]
struct Usage {
    registers: u32,
    spill_stores: u32,
    spill_loads: u32,
    stack: u32,
    smem: u32,
}

/// Register file per block and static shared memory per block: the same for sm_80 … sm_90.
const REGISTERS_PER_BLOCK: u32 = 65536;
const STATIC_SMEM: u32 = 48 * 1024;

impl Usage {
    /// The most threads a block may have with this many registers per thread (registers are
    /// given to warps in units of 256).
    fn max_threads(&self) -> u32 {
        if self.registers == 0 {
            return 1024;
        }
        let per_warp = (self.registers * 32).div_ceil(256) * 256;
        ((REGISTERS_PER_BLOCK / per_warp) * 32).min(1024)
    }
}

fn number_before(line: &str, word: &str) -> Option<u32> {
    let i = line.find(word)?;
    line[..i].split_whitespace().last()?.parse().ok()
}

fn parse_ptxas(out: &str) -> BTreeMap<String, Usage> {
    let mut map: BTreeMap<String, Usage> = BTreeMap::new();
    let mut current = String::new();
    for line in out.lines() {
        if let Some(i) = line.find("Compiling entry function '") {
            let rest = &line[i + "Compiling entry function '".len()..];
            current = rest.split('\'').next().unwrap_or_default().to_string();
            map.entry(current.clone()).or_default();
        } else if let Some(i) = line.find("Function properties for ") {
            current = line[i + "Function properties for ".len()..]
                .trim()
                .to_string();
        } else if let Some(u) = map.get_mut(&current) {
            if let Some(n) = number_before(line, "bytes stack frame") {
                u.stack = n;
            }
            if let Some(n) = number_before(line, "bytes spill stores") {
                u.spill_stores = n;
            }
            if let Some(n) = number_before(line, "bytes spill loads") {
                u.spill_loads = n;
            }
            if let Some(n) = number_before(line, "registers") {
                u.registers = n;
            }
            if let Some(n) = number_before(line, "bytes smem") {
                u.smem = n;
            }
        }
    }
    map
}

fn ptxas(args: &[String]) -> Result<(), String> {
    let bin = flag(args, "--ptxas").ok_or("--ptxas PATH is required")?;
    let archs: Vec<&str> = flag(args, "--archs")
        .unwrap_or("sm_80,sm_86,sm_89,sm_90")
        .split(',')
        .collect();
    let dir = flag(args, "--dir").map_or_else(|| kernels_dir().join("ptx"), PathBuf::from);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "ptx"))
        .collect();
    files.sort();
    // kernel → arch → usage
    let mut table: BTreeMap<String, BTreeMap<String, Usage>> = BTreeMap::new();
    for f in &files {
        for arch in &archs {
            let usage = assemble(bin, f, arch)?;
            for (k, u) in usage {
                table.entry(k).or_default().insert((*arch).to_string(), u);
            }
        }
    }
    let width = table.keys().map(String::len).max().unwrap_or(6).max(6);
    print!("{:width$}", "kernel");
    for a in &archs {
        print!(" | {a:^26}");
    }
    println!();
    print!("{:width$}", "");
    for _ in &archs {
        print!(
            " | {:>4} {:>5} {:>6} {:>8}",
            "regs", "spill", "smem", "max thr"
        );
    }
    println!();
    let mut failures = Vec::new();
    for (k, per) in &table {
        print!("{k:width$}");
        for a in &archs {
            match per.get(*a) {
                Some(u) => {
                    print!(
                        " | {:>4} {:>5} {:>6} {:>8}",
                        u.registers,
                        u.spill_stores + u.spill_loads,
                        u.smem,
                        u.max_threads()
                    );
                    if u.spill_stores + u.spill_loads > 0 {
                        failures.push(format!(
                            "{k} on {a}: {} bytes spilled",
                            u.spill_stores + u.spill_loads
                        ));
                    }
                    if u.smem > STATIC_SMEM {
                        failures.push(format!(
                            "{k} on {a}: {} bytes of static shared memory",
                            u.smem
                        ));
                    }
                    if u.registers > 255 {
                        failures.push(format!("{k} on {a}: {} registers", u.registers));
                    }
                }
                None => print!(" | {:^26}", "-"),
            }
        }
        println!();
    }
    println!(
        "{} kernels in {} PTX files, {} architectures",
        table.len(),
        files.len(),
        archs.len()
    );
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("ptxas limits: {}", failures.join("; ")))
    }
}

fn assemble(bin: &str, ptx: &Path, arch: &str) -> Result<BTreeMap<String, Usage>, String> {
    let out = Command::new(bin)
        .arg(format!("-arch={arch}"))
        .arg("-v")
        .arg(ptx)
        .arg("-o")
        .arg("/dev/null")
        .output()
        .map_err(|e| format!("{bin}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(format!(
            "ptxas -arch={arch} {} failed:\n{text}",
            ptx.display()
        ));
    }
    Ok(parse_ptxas(&text))
}
