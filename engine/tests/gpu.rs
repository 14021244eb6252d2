//! The CPU+GPU split end to end on the simulated GPU: every placement gives the CPU backend's
//! logits (to rounding: the GPU quantizes activations to q8_1 where the CPU uses Q8_K, and
//! sums in another order) and its greedy tokens.
//!
//! The simulator's shared-memory race checker (a shadow cell per shared byte, most of a
//! simulated launch's time) is on in `every_architecture_all_on_the_gpu`, which runs every
//! architecture's kernels, and in the CUDA graph test; the tests whose point is placement,
//! streaming, KV tiering or cache types run the same kernels with it off ([`sim_unchecked`]).
//! Bounds, barrier, shuffle and host-access checks stay on everywhere, and the kernels crate's
//! own tests race-check every kernel under many schedules.

use std::sync::Arc;

use strata_engine::model::{Arch, DeviceSpec, GpuOptions, ModelOptions};
use strata_engine::synth::{GenSpec, Vocab, to_bytes};
use strata_engine::{Logits, Model};
use strata_kernels::SimConfig;
use strata_simd::pool::ThreadPool;

fn model_file(spec: &GenSpec) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.gguf");
    std::fs::write(&path, to_bytes(spec, Vocab::Bytes).expect("generate")).expect("write");
    (dir, path)
}

fn sim(memory: usize) -> DeviceSpec {
    DeviceSpec::Sim(SimConfig {
        memory,
        ..SimConfig::default()
    })
}

/// A simulated device without the race checker, for tests whose point is where the work runs:
/// their kernels are race-checked in `every_architecture_all_on_the_gpu` and the kernel tests.
fn sim_unchecked(memory: usize) -> DeviceSpec {
    DeviceSpec::Sim(SimConfig {
        memory,
        check_races: false,
        ..SimConfig::default()
    })
}

fn load(path: &std::path::Path, gpu: GpuOptions) -> Model {
    let opts = ModelOptions {
        gpu,
        keep_file_layout: true,
        ..ModelOptions::default()
    };
    Model::load_with(path, &opts).expect("load")
}

const PROMPT: [u32; 7] = [5, 77, 130, 9, 201, 44, 18];

/// Prefill, then `steps` greedy steps: every step's logits and the tokens chosen.
fn run(model: &Model, steps: usize) -> (Vec<Vec<f32>>, Vec<u32>) {
    let pool = Arc::new(ThreadPool::new(2));
    let mut ctx = model.new_context(64, pool);
    let mut logits = vec![
        model
            .forward(&mut ctx, &PROMPT, Logits::Last)
            .expect("prefill")
            .to_vec(),
    ];
    let mut toks = Vec::new();
    for _ in 0..steps {
        let last = logits.last().expect("logits");
        let next = (0..last.len())
            .max_by(|&a, &b| last[a].total_cmp(&last[b]))
            .expect("argmax") as u32;
        toks.push(next);
        logits.push(
            model
                .forward(&mut ctx, &[next], Logits::Last)
                .expect("decode")
                .to_vec(),
        );
    }
    (logits, toks)
}

/// The largest difference relative to the largest logit; infinite where either is not finite
/// (`f32::max` would pass a NaN over).
fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    if a.iter().chain(b).any(|v| !v.is_finite()) {
        return f32::INFINITY;
    }
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

const ARCHS: [Arch; 8] = [
    Arch::Llama,
    Arch::Qwen2,
    Arch::Qwen3,
    Arch::Gemma3,
    Arch::Qwen2Moe,
    Arch::Qwen3Moe,
    Arch::Olmoe,
    Arch::Llama,
];

/// The gap between the two largest logits.
fn top_gap(l: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &v in l {
        if v > a {
            b = a;
            a = v;
        } else if v > b {
            b = v;
        }
    }
    a - b
}

/// Greedy tokens equal up to the first near tie (the two largest logits within `tie` in
/// either run), as the reference tests against llama.cpp count them.
fn assert_same_tokens(
    what: &str,
    lc: &[Vec<f32>],
    tc: &[u32],
    lg: &[Vec<f32>],
    tg: &[u32],
    tie: f32,
) {
    for i in 0..tc.len() {
        if top_gap(&lc[i]) < tie || top_gap(&lg[i]) < tie {
            return;
        }
        assert_eq!(tc[i], tg[i], "{what}: token {i}");
    }
}

/// Each placement of a tiny model against the CPU backend.
fn check(spec: &GenSpec, what: &str, gpu: GpuOptions) {
    let (_d, path) = model_file(spec);
    check_model(spec, what, &path, &load(&path, gpu));
}

/// A model loaded from `path` with a GPU placement against the CPU backend's resident one.
fn check_model(spec: &GenSpec, what: &str, path: &std::path::Path, dev: &Model) {
    let cpu = load(path, GpuOptions::default());
    let (lc, tc) = run(&cpu, 4);
    let (lg, tg) = run(dev, 4);
    let worst = lc
        .iter()
        .zip(&lg)
        .map(|(a, b)| max_rel(a, b))
        .fold(0f32, f32::max);
    let what = format!("{:?} {what}", spec.arch);
    eprintln!(
        "{what}: {} layers on the GPU, worst relative difference {worst:.2e}",
        dev.plan().map_or(0, |p| p.gpu_layers())
    );
    // The phases agree to a few 1e-4 (exec::tests); through random weights that compounds to
    // about 1% of the largest logit. A MoE layer's routing can flip between near-equal experts
    // and move more, so for those only the tokens are held to.
    if spec.n_expert == 0 {
        assert!(worst < 0.05, "{what}: {worst}");
    }
    assert_same_tokens(&what, &lc, &tc, &lg, &tg, 0.02);
}

#[test]
fn every_architecture_all_on_the_gpu() {
    for (i, arch) in ARCHS.into_iter().enumerate() {
        let mut spec = GenSpec::tiny(arch);
        if i == 7 {
            // Mixtral: llama with experts.
            spec = GenSpec::moe(Arch::Llama, false);
        }
        check(
            &spec,
            "all on the GPU",
            GpuOptions {
                device: sim(256 << 20),
                ..GpuOptions::default()
            },
        );
    }
}

#[test]
fn every_architecture_half_on_the_gpu() {
    for arch in ARCHS.into_iter().take(7) {
        let spec = GenSpec::tiny(arch);
        let half = spec.n_layer / 2 + 1;
        check(
            &spec,
            "-ngl half",
            GpuOptions {
                device: sim_unchecked(256 << 20),
                n_gpu_layers: Some(half),
                ..GpuOptions::default()
            },
        );
    }
}

#[test]
fn cpu_attention_with_the_weights_on_the_gpu() {
    for arch in [Arch::Llama, Arch::Gemma3, Arch::Qwen2] {
        let spec = GenSpec::tiny(arch);
        check(
            &spec,
            "-nkvo",
            GpuOptions {
                device: sim_unchecked(256 << 20),
                no_kv_offload: true,
                ..GpuOptions::default()
            },
        );
    }
}

#[test]
fn a_vram_budget_below_the_model_streams_the_rest() {
    for arch in [Arch::Llama, Arch::Qwen3] {
        let spec = GenSpec::tiny(arch);
        let (_d, path) = model_file(&spec);
        let bytes = std::fs::metadata(&path).unwrap().len();
        check(
            &spec,
            "VRAM budget of a third",
            GpuOptions {
                device: sim_unchecked(256 << 20),
                vram_budget: Some(bytes / 3),
                ..GpuOptions::default()
            },
        );
    }
}

#[test]
fn moe_experts_split_between_vram_and_the_cpu() {
    // A VRAM budget that holds the dense parts and part of each layer's experts: the rest run
    // on the CPU (or are copied in when enough tokens go to them).
    for arch in [Arch::Qwen3Moe, Arch::Qwen2Moe, Arch::Olmoe] {
        let spec = GenSpec::tiny(arch);
        let (_d, path) = model_file(&spec);
        let bytes = std::fs::metadata(&path).unwrap().len();
        let opts = |tenths: u64| GpuOptions {
            device: sim_unchecked(256 << 20),
            vram_budget: Some(bytes * tenths / 10),
            ..GpuOptions::default()
        };
        // The smallest budget of these that caches some but not all experts.
        let (tenths, e) = (4..10)
            .find_map(|t| {
                let m = load(&path, opts(t));
                let e = m.plan().and_then(|p| p.layers[0].experts)?;
                (e.vram > 0 && e.vram < spec.n_expert).then_some((t, e))
            })
            .unwrap_or_else(|| panic!("{arch:?}: no budget splits the experts"));
        check(
            &spec,
            &format!("experts {} of {} in VRAM", e.vram, spec.n_expert),
            opts(tenths),
        );
    }
}

/// The tiny MoE model at `path` loaded with the first VRAM budget (in tenths of the file) that
/// puts some but not all of layer 0's experts in VRAM, under `ram_budget`, in the file's layout
/// or the CPU's own; with that layer's expert split.
fn split_experts(
    spec: &GenSpec,
    path: &std::path::Path,
    ram_budget: Option<u64>,
    keep_file_layout: bool,
) -> (Model, strata_engine::plan::ExpertPlan) {
    let bytes = std::fs::metadata(path).unwrap().len();
    (3..10)
        .find_map(|tenths| {
            let opts = ModelOptions {
                residency: strata_storage::residency::LoadOptions {
                    ram_budget,
                    ..Default::default()
                },
                gpu: GpuOptions {
                    device: sim_unchecked(256 << 20),
                    vram_budget: Some(bytes * tenths / 10),
                    ..GpuOptions::default()
                },
                keep_file_layout,
                ..ModelOptions::default()
            };
            let m = Model::load_with(path, &opts).expect("load");
            let e = m.plan().and_then(|p| p.layers[0].experts)?;
            (e.vram > 0 && e.vram < spec.n_expert).then_some((m, e))
        })
        .expect("a VRAM budget that splits the experts")
}

/// The same split with the CPU's own layout on (the default: the CPU repacks what it holds),
/// and the experts resident or streamed through the expert cache: the slabs the GPU copies into
/// its VRAM cache must still be in the file's layout, those the CPU runs in its own.
#[test]
fn moe_experts_on_the_gpu_keep_the_files_layout_where_the_cpu_repacks() {
    let spec = GenSpec::tiny(Arch::Qwen3Moe);
    let (_d, path) = model_file(&spec);
    let bytes = std::fs::metadata(&path).unwrap().len();
    for ram in [None, Some(bytes * 4 / 10)] {
        let (m, e) = split_experts(&spec, &path, ram, false);
        assert_eq!(m.weights().experts_streamed_any(), ram.is_some());
        check_model(
            &spec,
            &format!(
                "experts {} of {} in VRAM, the CPU's layout on, RAM budget {ram:?}",
                e.vram, spec.n_expert
            ),
            &path,
            &m,
        );
    }
}

/// Experts in all three tiers: some cached in VRAM, the rest of the RAM budget's in RAM and
/// the others read from SSD when routed to, computed on the CPU or copied in.
#[test]
fn moe_experts_split_across_vram_ram_and_ssd() {
    let spec = GenSpec::tiny(Arch::Qwen3Moe);
    let (_d, path) = model_file(&spec);
    let bytes = std::fs::metadata(&path).unwrap().len();
    let (m, e) = split_experts(&spec, &path, Some(bytes * 4 / 10), true);
    assert!(m.weights().experts_streamed_any(), "no expert on SSD");
    check_model(
        &spec,
        &format!(
            "experts {} of {} in VRAM, the rest in RAM and on SSD",
            e.vram, spec.n_expert
        ),
        &path,
        &m,
    );
}

#[test]
fn all_on_the_gpu_matches_the_cpu() {
    let spec = GenSpec::tiny(Arch::Llama);
    let (_d, path) = model_file(&spec);
    let cpu = load(&path, GpuOptions::default());
    let gpu = load(
        &path,
        GpuOptions {
            device: sim_unchecked(256 << 20),
            ..GpuOptions::default()
        },
    );
    assert!(gpu.gpu_device().is_some());
    eprintln!("{:?}", gpu.plan().map(|p| (p.gpu_layers(), p.output)));
    let (lc, tc) = run(&cpu, 4);
    let (lg, tg) = run(&gpu, 4);
    for (i, (a, b)) in lc.iter().zip(&lg).enumerate() {
        let e = max_rel(a, b);
        eprintln!("step {i}: max relative difference {e:.2e}");
        assert!(e < 0.05, "step {i}: {e}");
    }
    assert_eq!(tc, tg);
}

/// The greedy run of `prompt_len` prompt tokens and a few decode steps on `ctx`.
fn long_run(model: &Model, ctx: &mut strata_engine::Context, prompt_len: usize) -> Vec<Vec<f32>> {
    let prompt: Vec<u32> = (0..prompt_len as u32)
        .map(|i| (i * 37 + 11) % 250)
        .collect();
    let mut out = vec![
        model
            .forward(ctx, &prompt, Logits::Last)
            .expect("prefill")
            .to_vec(),
    ];
    for _ in 0..3 {
        let last = out.last().expect("logits");
        let next = (0..last.len())
            .max_by(|&a, &b| last[a].total_cmp(&last[b]))
            .expect("argmax") as u32;
        out.push(
            model
                .forward(ctx, &[next], Logits::Last)
                .expect("decode")
                .to_vec(),
        );
    }
    out
}

#[test]
fn kv_pages_move_from_vram_to_ram_and_ssd_and_attention_reads_them_all() {
    // 600 positions: three pages per layer and side. With VRAM for one page of each, the two
    // oldest go to RAM; with a RAM budget of nothing, on to SSD (the spill tier keeps one page
    // per layer and side in RAM whatever its budget, so it takes the third page to reach it).
    // The pages are the same bytes wherever they are, and the GPU stages the ones not in VRAM:
    // the logits are identical. Two layers: the tiers hold pages per layer, and more layers
    // would only repeat the same moves at several times the simulator's time.
    let mut spec = GenSpec::tiny(Arch::Llama);
    spec.n_layer = 2;
    let (_d, path) = model_file(&spec);
    let page = 256 * spec.n_head_kv * spec.head_dim * 2; // f16 rows of one side
    let pool = Arc::new(ThreadPool::new(2));
    let gpu_opts = |kv_vram: Option<usize>| GpuOptions {
        device: sim_unchecked(256 << 20),
        kv_vram_budget: kv_vram,
        n_ctx: Some(1024),
        ..GpuOptions::default()
    };
    let full = load(&path, gpu_opts(None));
    let mut ctx = full.new_context(1024, pool.clone());
    let want = long_run(&full, &mut ctx, 600);
    assert_eq!(ctx.kv_ram_bytes(), 0);
    assert!(ctx.kv_vram_bytes() >= 3 * 2 * spec.n_layer * page);
    drop(ctx);
    drop(full);

    let budget = 2 * spec.n_layer * page;
    let tiered = load(&path, gpu_opts(Some(budget)));
    let mut ctx = tiered.new_context(1024, pool.clone());
    assert_eq!(long_run(&tiered, &mut ctx, 600), want);
    assert!(
        ctx.kv_vram_bytes() <= budget,
        "{} > {budget}",
        ctx.kv_vram_bytes()
    );
    assert!(
        ctx.kv_ram_bytes() >= 2 * spec.n_layer * page,
        "the oldest pages went to RAM"
    );
    drop(ctx);

    let dir = tempfile::tempdir().expect("tempdir");
    let kv = strata_engine::kv::KvOptions {
        spill: Some(strata_engine::kv::SpillConfig {
            dir: dir.path().to_path_buf(),
            ram_budget: 0,
            io: Default::default(),
        }),
        ..Default::default()
    };
    let mut ctx = tiered.new_context_with(1024, pool, &kv).expect("context");
    assert_eq!(long_run(&tiered, &mut ctx, 600), want);
    let spill = ctx.kv_spill_stats().expect("a spill file");
    assert!(spill.disk_bytes > 0, "{spill:?}");
}

/// An 8-layer model and a VRAM budget of a quarter of it, for weights streamed to the GPU.
fn streaming_setup() -> (tempfile::TempDir, std::path::PathBuf, u64, GpuOptions) {
    let mut spec = GenSpec::tiny(Arch::Llama);
    spec.n_layer = 8;
    let (d, path) = model_file(&spec);
    let size = std::fs::metadata(&path).unwrap().len();
    let gpu = GpuOptions {
        device: sim_unchecked(256 << 20),
        vram_budget: Some(size / 4),
        ..GpuOptions::default()
    };
    (d, path, size, gpu)
}

/// Options that stream what VRAM does not hold from disk (a RAM budget below the model) to
/// the GPU, read by io_uring through a window of `window` buffers, with injected `faults`.
fn from_disk(
    size: u64,
    gpu: &GpuOptions,
    window: Option<usize>,
    faults: Option<&str>,
) -> ModelOptions {
    use strata_storage::io::{Faults, IoKind, ReaderOptions};
    ModelOptions {
        residency: strata_storage::residency::LoadOptions {
            ram_budget: Some(size * 45 / 100),
            window,
            io: ReaderOptions {
                kind: Some(IoKind::Uring),
                faults: faults.map(|f| Faults::parse(f).expect("faults")),
                ..ReaderOptions::default()
            },
            ..Default::default()
        },
        gpu: gpu.clone(),
        keep_file_layout: true,
        ..ModelOptions::default()
    }
}

#[test]
fn a_read_error_while_streaming_to_the_gpu_fails_the_step_and_the_next_succeeds() {
    let (_d, path, size, gpu) = streaming_setup();
    let want = run(&load(&path, gpu.clone()), 0).0;
    // A read a few chunks after loading fails.
    let opts = |faults: Option<String>| from_disk(size, &gpu, None, faults.as_deref());
    let at_load = Model::load_with(&path, &opts(None))
        .expect("load")
        .weights()
        .stats()
        .read
        .chunks;
    let m = Model::load_with(&path, &opts(Some(format!("eio={}", at_load + 3)))).expect("load");
    let pool = Arc::new(ThreadPool::new(2));
    let (mut failed, mut ok_after) = (false, false);
    for _ in 0..8 {
        let mut ctx = m.new_context(64, pool.clone());
        match m.forward(&mut ctx, &PROMPT, Logits::Last) {
            Ok(l) => {
                assert!(
                    max_rel(l, &want[0]) < 1e-6,
                    "a streamed step gives the resident one's logits"
                );
                ok_after |= failed;
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("Input/output error") && msg.contains("m.gguf"),
                    "{msg}"
                );
                failed = true;
            }
        }
    }
    assert!(failed, "the injected error never surfaced");
    assert!(ok_after, "no step succeeded after the error");
}

#[test]
fn a_placement_that_cannot_fit_vram_names_the_bytes() {
    let spec = GenSpec::tiny(Arch::Llama);
    let (_d, path) = model_file(&spec);
    let opts = ModelOptions {
        gpu: GpuOptions {
            device: sim_unchecked(256 << 20),
            n_gpu_layers: Some(99),
            vram_budget: Some(1 << 20),
            ..GpuOptions::default()
        },
        ..ModelOptions::default()
    };
    let e = Model::load_with(&path, &opts)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("bytes of VRAM") && e.contains("1048576"), "{e}");
    // A device too small for what the planner itself chose is out of memory, said as such.
    let opts = ModelOptions {
        gpu: GpuOptions {
            device: sim_unchecked(64 << 10),
            n_gpu_layers: Some(99),
            vram_budget: Some(256 << 20),
            ..GpuOptions::default()
        },
        ..ModelOptions::default()
    };
    let e = Model::load_with(&path, &opts)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("out of device memory") && e.contains("bytes requested"),
        "{e}"
    );
}

/// Weights streamed from disk to the GPU are copied from the buffers io_uring's O_DIRECT reads
/// land in (page-locked with the device), with no staging copy on the CPU; a window of two
/// buffers, which the copies' held handles could starve, goes through a staging buffer. Both
/// give the resident placement's logits.
#[test]
fn weights_streamed_from_disk_are_copied_to_the_gpu_from_where_the_reads_land() {
    let (_d, path, size, gpu) = streaming_setup();
    let want = run(&load(&path, gpu.clone()), 2).0;
    for (window, direct) in [(None, true), (Some(2), false)] {
        let m = Model::load_with(&path, &from_disk(size, &gpu, window, None)).expect("load");
        assert!(m.weights().stats().streamed_layers > 0, "layers on disk");
        let got = run(&m, 2).0;
        for (g, w) in got.iter().zip(&want) {
            assert!(
                max_rel(g, w) < 1e-6,
                "window {window:?}: streamed logits differ"
            );
        }
        let s = m.gpu_stats().expect("gpu");
        assert!(s.streamed_bytes > 0, "nothing streamed to the GPU");
        if direct {
            assert_eq!(
                s.streamed_direct_bytes, s.streamed_bytes,
                "all copied in place"
            );
        } else {
            assert_eq!(s.streamed_direct_bytes, 0, "window of two: staged");
        }
    }
}

/// Attention on the GPU over quantized KV caches: the kernels write and read q8_0 and q4_0
/// pages as the CPU's caches hold them (two pages, so a full one and a filling one), and the
/// logits follow the CPU backend's with the same cache type. Two layers: each runs the same
/// cache kernels, and the 300 positions a second page needs are most of the simulator's time.
#[test]
fn gpu_attention_over_quantized_kv_caches_follows_the_cpu() {
    use strata_storage::quant::GgmlType;
    let mut spec = GenSpec::tiny(Arch::Qwen3);
    spec.n_layer = 2;
    let (_d, path) = model_file(&spec);
    let cpu = load(&path, GpuOptions::default());
    let gpu = load(
        &path,
        GpuOptions {
            device: sim_unchecked(256 << 20),
            ..GpuOptions::default()
        },
    );
    assert!(gpu.plan().is_some_and(|p| {
        p.layers
            .iter()
            .all(|l| l.attend == strata_engine::plan::Exec::Gpu)
    }));
    let pool = Arc::new(ThreadPool::new(2));
    for ty in [GgmlType::Q8_0, GgmlType::Q4_0] {
        let kv = strata_engine::kv::KvOptions {
            type_k: ty,
            type_v: ty,
            ..Default::default()
        };
        let mut c = cpu
            .new_context_with(512, pool.clone(), &kv)
            .expect("context");
        let mut g = gpu
            .new_context_with(512, pool.clone(), &kv)
            .expect("context");
        let (lc, lg) = (long_run(&cpu, &mut c, 300), long_run(&gpu, &mut g, 300));
        let argmax = |l: &[f32]| (0..l.len()).max_by(|&x, &y| l[x].total_cmp(&l[y]));
        for (i, (a, b)) in lc.iter().zip(&lg).enumerate() {
            let e = max_rel(a, b);
            eprintln!(
                "{ty:?} step {i}: relative difference {e:.2e}, top gaps {:.3} {:.3}",
                top_gap(a),
                top_gap(b)
            );
            assert!(e < 0.05, "{ty:?} step {i}: relative difference {e}");
            if argmax(a) != argmax(b) {
                // Each run feeds its own choice on: past a near tie they part.
                assert!(
                    top_gap(a) < 0.02 || top_gap(b) < 0.02,
                    "{ty:?} step {i}: tokens differ"
                );
                break;
            }
        }
    }
}

/// A greedy run of `prompt` and `steps` steps on `model`, every logits row kept.
fn greedy(model: &Model, prompt: &[u32], steps: usize) -> Vec<Vec<f32>> {
    let mut ctx = model.new_context(512, Arc::new(ThreadPool::new(2)));
    let mut out = vec![
        model
            .forward(&mut ctx, prompt, Logits::Last)
            .expect("prefill")
            .to_vec(),
    ];
    for _ in 0..steps {
        let next = strata_engine::sampler::argmax(out.last().expect("logits"));
        out.push(
            model
                .forward(&mut ctx, &[next], Logits::Last)
                .expect("step")
                .to_vec(),
        );
    }
    out
}

#[test]
fn the_decode_step_runs_as_one_cuda_graph_and_computes_what_its_kernels_do_one_by_one() {
    let spec = GenSpec::tiny(Arch::Gemma3);
    let (_d, path) = model_file(&spec);
    let load_graphs = |graphs: bool| {
        let opts = ModelOptions {
            gpu: GpuOptions {
                device: sim(256 << 20),
                ..GpuOptions::default()
            },
            keep_file_layout: true,
            no_gpu_graphs: !graphs,
            ..ModelOptions::default()
        };
        Model::load_with(&path, &opts).expect("load")
    };
    let (on, off) = (load_graphs(true), load_graphs(false));
    // 250 prompt tokens, then steps across the KV cache's first page boundary (256), where
    // the page tables grow and the attention's split changes shape.
    let prompt: Vec<u32> = (0..250).map(|i| (i * 37 + 11) % 250).collect();
    let steps = 10;
    let (a, b) = (greedy(&on, &prompt, steps), greedy(&off, &prompt, steps));
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let e = max_rel(x, y);
        assert!(
            e < 1e-5,
            "step {i}: graph and kernel-by-kernel logits differ by {e:.2e}"
        );
    }
    let s = on.gpu_stats().expect("gpu");
    eprintln!(
        "{} graph steps, {} instantiations",
        s.graph_steps, s.graph_instantiations
    );
    assert_eq!(s.graph_steps, steps as u64, "{s:?}");
    assert!(
        (1..steps as u64 / 2).contains(&s.graph_instantiations),
        "most steps update the graph in place: {s:?}"
    );
    assert_eq!(off.gpu_stats().expect("gpu").graph_steps, 0);

    // Continuous batching: two sequences of different lengths in one captured step.
    let batch = |m: &Model| {
        let pool = Arc::new(ThreadPool::new(2));
        let mut c1 = m.new_context(64, Arc::clone(&pool));
        let mut c2 = m.new_context(64, Arc::clone(&pool));
        m.forward(&mut c1, &PROMPT, Logits::Last).expect("prefill");
        m.forward(&mut c2, &PROMPT[..3], Logits::Last)
            .expect("prefill");
        let mut scratch = strata_engine::model::Scratch::new();
        let mut rows = Vec::new();
        let mut toks = [1u32, 2];
        for _ in 0..3 {
            let l = m
                .decode_batch(&pool, &mut [&mut c1, &mut c2], &toks, &mut scratch)
                .expect("batch")
                .to_vec();
            let nv = l.len() / 2;
            toks = [
                strata_engine::sampler::argmax(&l[..nv]),
                strata_engine::sampler::argmax(&l[nv..]),
            ];
            rows.push(l);
        }
        rows
    };
    let before = on.gpu_stats().expect("gpu").graph_steps;
    for (i, (x, y)) in batch(&on).iter().zip(&batch(&off)).enumerate() {
        let e = max_rel(x, y);
        assert!(e < 1e-5, "batched step {i}: {e:.2e}");
    }
    assert_eq!(on.gpu_stats().expect("gpu").graph_steps, before + 3);
}
