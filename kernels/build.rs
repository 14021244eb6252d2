//! Compiles the kernel text for the simulator.
//!
//! Each `cuda/*.cu` file (and each broken variant in `sim/broken/`, which the tests expect the
//! simulator to catch) is compiled by the host C++ compiler against `sim/sim.h`, with
//! ThreadSanitizer's instrumentation so that every load and store calls into the runtime
//! (`sim/sim.cpp`, which defines those callbacks). The build then reads each object's symbol
//! table: the variables in its shared-memory section (their offsets, sizes and names, for the
//! bounds checks and messages) and writes `sim_tables.cpp`, the table of kernels and files the
//! runtime launches from. PTX for the GPU is not made here (see `strata-ptx`): users need no CUDA
//! toolkit to build.
//!
//! The simulator is built for x86-64 Linux (its fibers switch with a few lines of assembly);
//! elsewhere, or without a C++ compiler, the crate builds without it and `Device::sim` says why.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::{env, fs};

use object::{Object, ObjectSection, ObjectSymbol};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(strata_sim)");
    println!("cargo::rerun-if-changed=cuda");
    println!("cargo::rerun-if-changed=sim");
    println!("cargo::rerun-if-changed=ptx");
    if let Err(e) = embed_ptx() {
        panic!("embedding the PTX: {e}");
    }
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if arch != "x86_64" || os != "linux" {
        return;
    }
    match build_sim() {
        Ok(()) => println!("cargo::rustc-cfg=strata_sim"),
        Err(e) => println!("cargo::warning=the kernel simulator is not built: {e}"),
    }
}

/// Writes `ptx_modules.rs`: every committed `ptx/*.ptx`, embedded by `include_str!`.
fn embed_ptx() -> Result<(), String> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let out = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let mut list = Vec::new();
    if let Ok(rd) = fs::read_dir(root.join("ptx")) {
        for e in rd {
            let p = e.map_err(|e| e.to_string())?.path();
            if p.extension().is_some_and(|x| x == "ptx") {
                list.push(p);
            }
        }
    }
    list.sort();
    let mut s = String::from("/// Every kernel file's PTX.\npub const MODULES: &[Module] = &[\n");
    for p in &list {
        let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        let _ = writeln!(
            s,
            "    Module {{ name: {stem:?}, ptx: include_str!({:?}) }},",
            p.display().to_string()
        );
    }
    s.push_str("];\n");
    fs::write(out.join("ptx_modules.rs"), s).map_err(|e| e.to_string())
}

struct SharedVar {
    offset: u64,
    size: u64,
    name: String,
}

/// A shared variable outside the file's section (a template's static): reached by its
/// symbol; pads are kept to mark memory that belongs to no variable.
struct ExtraVar {
    symbol: String,
    size: u64,
    name: String,
    pad: bool,
}

struct KernelFile {
    stem: String,
    vars: Vec<SharedVar>,
    extra: Vec<ExtraVar>,
    kernels: Vec<String>,
}

fn build_sim() -> Result<(), String> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let out = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let compiler = cc::Build::new()
        .cpp(true)
        .try_get_compiler()
        .map_err(|e| format!("no C++ compiler: {e}"))?;
    let probe = std::process::Command::new(compiler.path())
        .arg("--version")
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        return Err(format!(
            "the C++ compiler {} does not run (install g++)",
            compiler.path().display()
        ));
    }
    let mut sources = cu_files(&root.join("cuda"))?;
    sources.extend(cu_files(&root.join("sim/broken"))?);

    let mut files = Vec::new();
    let mut objects = Vec::new();
    for src in &sources {
        let stem = src
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| format!("bad kernel file name {}", src.display()))?
            .to_string();
        if !stem.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "kernel file {} must be named with letters, digits and '_' (it names a section)",
                src.display()
            ));
        }
        // A wrapper so that the compiler takes the `.cu` file as C++ and messages name it.
        let wrapper = out.join(format!("sim_{stem}.cpp"));
        // Pads at both ends of the file's shared section, so that running off its first or
        // last variable never lands in the next file's.
        let pad = |which: &str| {
            format!(
                "__attribute__((section(\"sim_smem_{stem}\"), used)) static char sim_pad_{which}[64];\n"
            )
        };
        fs::write(
            &wrapper,
            format!(
                "{}#include \"{}\"\n{}",
                pad("begin"),
                src.display(),
                pad("end")
            ),
        )
        .map_err(|e| e.to_string())?;
        let objs = cc::Build::new()
            .cpp(true)
            .std("c++17")
            .opt_level(2)
            .file(&wrapper)
            .include(root.join("cuda"))
            .define("SIM_TU", stem.as_str())
            .flag("-fsanitize=thread")
            .flag("--param=tsan-instrument-func-entry-exit=0")
            .flag("-fno-toplevel-reorder")
            // Template and inline functions' statics (shared variables among them) then get
            // a section or a plain common symbol instead of a COMDAT group, which a named
            // section cannot hold; the table below reaches the common ones by name.
            .flag("-fno-weak")
            .flag("-fno-exceptions")
            .flag("-fno-rtti")
            .flag("-Wall")
            .flag("-Wno-unused-function")
            .flag("-Wno-unused-variable")
            .flag("-Wno-unknown-pragmas")
            .try_compile_intermediates()
            .unwrap_or_else(|e| {
                // A compiler is there (probed above): the kernel text is wrong. Fail loudly
                // rather than build without the simulator.
                panic!(
                    "{} does not compile for the simulator (the compiler's messages are above): {e}",
                    src.display()
                )
            });
        let text = fs::read_to_string(src).map_err(|e| e.to_string())?;
        let mut vars = Vec::new();
        let mut extra = Vec::new();
        for obj in &objs {
            let (v, x) = shared_vars(obj, &stem)?;
            vars.extend(v);
            extra.extend(x);
        }
        check_pads(&stem, &mut vars)?;
        files.push(KernelFile {
            stem,
            vars,
            extra,
            kernels: exports(&text),
        });
        objects.extend(objs);
    }

    let tables = out.join("sim_tables.cpp");
    fs::write(&tables, tables_cpp(&files)?).map_err(|e| e.to_string())?;
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .file(root.join("sim/sim.cpp"))
        .file(&tables)
        .include(root.join("sim"))
        .flag("-fno-exceptions")
        .flag("-fno-rtti")
        .objects(&objects)
        .try_compile("strata_sim")
        .map_err(|e| e.to_string())
}

fn cu_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut v = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(v),
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    };
    for e in rd {
        let p = e.map_err(|e| e.to_string())?.path();
        if p.extension().is_some_and(|x| x == "cu") {
            v.push(p);
        }
    }
    v.sort();
    Ok(v)
}

/// The kernels a file exports: the names in its `SIM_EXPORT(name)` lines.
fn exports(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("SIM_EXPORT("))
        .filter_map(|r| r.split(')').next())
        .map(|n| n.trim().to_string())
        .collect()
}

/// The shared variables of one compiled kernel file: the symbols in its `sim_smem_<stem>`
/// section, with their offsets in it; and those of template functions, which are common
/// symbols elsewhere (found through their pads: every `__shared__` declaration comes with a
/// `sim_pad_N` static of the same function).
fn shared_vars(obj: &Path, stem: &str) -> Result<(Vec<SharedVar>, Vec<ExtraVar>), String> {
    let data = fs::read(obj).map_err(|e| format!("{}: {e}", obj.display()))?;
    let file = object::File::parse(&*data).map_err(|e| format!("{}: {e}", obj.display()))?;
    let section = file.section_by_name(&format!("sim_smem_{stem}"));
    let demangle = |raw: &str| {
        cpp_demangle::Symbol::new(raw)
            .ok()
            .map(|s| s.to_string())
            .unwrap_or_else(|| raw.to_string())
    };
    let mut vars = Vec::new();
    let mut outside = Vec::new();
    for sym in file.symbols() {
        if sym.size() == 0 {
            continue;
        }
        let raw = sym.name().map_err(|e| e.to_string())?;
        match &section {
            Some(sec) if sym.section_index() == Some(sec.index()) => vars.push(SharedVar {
                offset: sym.address() - sec.address(),
                size: sym.size(),
                name: demangle(raw),
            }),
            _ if raw.starts_with("_ZZ") && sym.is_global() => {
                outside.push((raw.to_string(), sym.size()))
            }
            _ => {}
        }
    }
    // The functions (mangled prefixes `_ZZ…E`) whose pads lie outside the section.
    let prefixes: Vec<String> = outside
        .iter()
        .filter_map(|(raw, _)| {
            let i = raw.find("sim_pad_")?;
            let digits = raw[..i].trim_end_matches(|c: char| c.is_ascii_digit());
            digits.ends_with('E').then(|| digits.to_string())
        })
        .collect();
    let extra = outside
        .into_iter()
        .filter(|(raw, _)| prefixes.iter().any(|p| raw.starts_with(p.as_str())))
        .map(|(raw, size)| ExtraVar {
            pad: raw.contains("sim_pad_"),
            name: demangle(&raw),
            symbol: raw,
            size,
        })
        .collect();
    Ok((vars, extra))
}

/// Keeps the real variables, sorted, and checks that a pad lies between any two of them, so
/// that an access past the end of one never lands in the next.
fn check_pads(stem: &str, vars: &mut Vec<SharedVar>) -> Result<(), String> {
    vars.sort_by_key(|v| v.offset);
    let all: Vec<(u64, u64, bool)> = vars
        .iter()
        .map(|v| (v.offset, v.size, v.name.contains("sim_pad_")))
        .collect();
    for w in all.windows(2) {
        if !w[0].2 && !w[1].2 {
            return Err(format!(
                "{stem}.cu: two shared variables are adjacent with no pad between them (the \
                 compiler reordered them); the simulator cannot check their bounds"
            ));
        }
    }
    vars.retain(|v| !v.name.contains("sim_pad_"));
    Ok(())
}

fn tables_cpp(files: &[KernelFile]) -> Result<String, String> {
    let mut s = String::from(
        "// Generated by strata-kernels' build script: the simulator's kernels and shared \
         variables.\n#include <cstddef>\n#include <cstdint>\nextern \"C\" {\n\
         struct SimVar { uint32_t offset; uint32_t size; const char* name; };\n\
         struct SimExtra { char* addr; uint32_t size; const char* name; uint32_t pad; };\n\
         struct SimTu { const char* name; char* lo; char* hi; const SimVar* vars; uint32_t \
         n_vars; const SimExtra* extra; uint32_t n_extra; };\n\
         struct SimKernel { const char* name; void (*thunk)(void**); uint32_t tu; };\n",
    );
    let mut seen = BTreeMap::new();
    // One declaration per symbol: a template instantiated in two files is one variable.
    let mut symbols: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, f) in files.iter().enumerate() {
        let st = &f.stem;
        let _ = writeln!(
            s,
            "extern char __start_sim_smem_{st}[] __attribute__((weak));\n\
             extern char __stop_sim_smem_{st}[] __attribute__((weak));"
        );
        if !f.vars.is_empty() {
            let _ = write!(s, "static const SimVar vars_{st}[] = {{");
            for v in &f.vars {
                let name = v.name.replace('\\', "\\\\").replace('"', "\\\"");
                let _ = write!(s, "{{{}, {}, \"{name}\"}}, ", v.offset, v.size);
            }
            s.push_str("};\n");
        }
        if !f.extra.is_empty() {
            for x in &f.extra {
                let next = symbols.len();
                if let std::collections::btree_map::Entry::Vacant(e) = symbols.entry(&x.symbol) {
                    e.insert(next);
                    let _ = writeln!(s, "extern char sx_{next}[] asm(\"{}\");", x.symbol);
                }
            }
            let _ = write!(s, "static const SimExtra extra_{st}[] = {{");
            for x in &f.extra {
                let j = symbols[x.symbol.as_str()];
                let name = x.name.replace('\\', "\\\\").replace('"', "\\\"");
                let _ = write!(
                    s,
                    "{{sx_{j}, {}, \"{name}\", {}}}, ",
                    x.size,
                    u32::from(x.pad)
                );
            }
            s.push_str("};\n");
        }
        for k in &f.kernels {
            if let Some(other) = seen.insert(k.clone(), i) {
                return Err(format!(
                    "kernel `{k}` is exported by both {}.cu and {st}.cu",
                    files[other].stem
                ));
            }
            let _ = writeln!(s, "void strata_sim_thunk_{k}(void**);");
        }
    }
    s.push_str("static const SimTu tus[] = {\n");
    for f in files {
        let st = &f.stem;
        let (vars, n) = if f.vars.is_empty() {
            ("nullptr".to_string(), 0)
        } else {
            (format!("vars_{st}"), f.vars.len())
        };
        let (extra, nx) = if f.extra.is_empty() {
            ("nullptr".to_string(), 0)
        } else {
            (format!("extra_{st}"), f.extra.len())
        };
        let _ = writeln!(
            s,
            "  {{\"{st}\", __start_sim_smem_{st}, __stop_sim_smem_{st}, {vars}, {n}, {extra}, {nx}}},"
        );
    }
    s.push_str("};\nstatic const SimKernel kernels[] = {\n");
    let mut any = false;
    for (i, f) in files.iter().enumerate() {
        for k in &f.kernels {
            any = true;
            let _ = writeln!(s, "  {{\"{k}\", strata_sim_thunk_{k}, {i}}},");
        }
    }
    if !any {
        s.push_str("  {nullptr, nullptr, 0},\n");
    }
    let _ = write!(
        s,
        "}};\nconst SimKernel* strata_sim_kernels(size_t* n) {{ *n = {}; return kernels; }}\n\
         const SimTu* strata_sim_tus(size_t* n) {{ *n = {}; return tus; }}\n}}\n",
        if any {
            "sizeof kernels / sizeof kernels[0]"
        } else {
            "0"
        },
        files.len()
    );
    Ok(s)
}
