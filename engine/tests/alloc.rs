//! DESIGN's "no allocation per decode step once the context's buffers are warm", counted: a
//! global allocator that counts the allocations made on the calling thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use strata_engine::model::{Arch, ExpertPrefetch};
use strata_engine::synth::{GenSpec, Vocab, to_bytes};
use strata_engine::{Logits, Model};
use strata_simd::pool::ThreadPool;
use strata_storage::residency::LoadOptions;
use strata_storage::residency::overrides::parse_overrides;

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded to the system allocator unchanged; the count is a side effect.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: as the caller promised for `l`.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from `alloc` with `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: as the caller promised.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(Cell::get)
}

/// Allocations on this thread by each of `steps` decode steps after `warm` of them.
fn decode_allocs(model: &Model, warm: usize, steps: usize) -> Vec<u64> {
    let pool = Arc::new(ThreadPool::new(2));
    let mut ctx = model.new_context(256, pool);
    let mut next = 5u32;
    model
        .forward(&mut ctx, &[1, 2, 3, 4], Logits::Last)
        .expect("prefill");
    let mut out = Vec::with_capacity(steps);
    for i in 0..warm + steps {
        let before = allocs();
        let logits = model
            .forward(&mut ctx, &[next], Logits::Last)
            .expect("decode");
        next = (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap_or(0) as u32;
        if i >= warm {
            out.push(allocs() - before);
        }
    }
    out
}

fn load(spec: &GenSpec, budget: Option<f64>) -> (tempfile::TempDir, Model) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.gguf");
    let bytes = to_bytes(spec, Vocab::Bytes).expect("generate");
    std::fs::write(&path, &bytes).expect("write");
    // The embedding table held in RAM: a cold one is read from disk a row per token, and a
    // read allocates its request lists.
    let opts = LoadOptions {
        ram_budget: budget.map(|f| (bytes.len() as f64 * f) as u64),
        overrides: parse_overrides("token_embd=RAM").expect("rule"),
        ..LoadOptions::default()
    };
    let m = Model::load_with(&path, &opts.into()).expect("load");
    (dir, m)
}

#[test]
fn decode_steps_allocate_nothing_once_warm() {
    let (_d, dense) = load(&GenSpec::tiny(Arch::Llama), None);
    assert_eq!(decode_allocs(&dense, 4, 8), vec![0; 8], "dense, resident");
    let (_d, moe) = load(&GenSpec::tiny(Arch::Qwen3Moe), None);
    assert_eq!(decode_allocs(&moe, 4, 8), vec![0; 8], "MoE, resident");
    // Experts streamed from disk: routing, guessing and waiting for reads allocate nothing
    // on the computing thread (the I/O threads' reads are theirs).
    let (_d, streamed) = load(&GenSpec::tiny(Arch::Qwen3Moe), Some(0.4));
    assert!(streamed.weights().experts_streamed_any());
    for mode in [ExpertPrefetch::Off, ExpertPrefetch::Predict] {
        streamed.set_expert_prefetch(mode.clone());
        assert_eq!(decode_allocs(&streamed, 4, 8), vec![0; 8], "{mode:?}");
    }
    // Dense layers streamed through the window.
    let mut spec = GenSpec::tiny(Arch::Llama);
    spec.n_layer = 8;
    let (_d, layers) = load(&spec, Some(0.5));
    assert!(layers.weights().stats().streamed_layers > 0);
    assert_eq!(decode_allocs(&layers, 4, 8), vec![0; 8], "streamed layers");
}

/// The same on the simulated GPU: queueing kernels, copies and events, streaming weights to
/// the device and computing the experts VRAM does not hold on the CPU allocate nothing on the
/// computing thread (the simulator's stream threads are the GPU's).
#[test]
fn gpu_decode_steps_allocate_nothing_once_warm() {
    use strata_engine::model::{DeviceSpec, GpuOptions, ModelOptions};
    use strata_kernels::SimConfig;

    fn load_gpu(spec: &GenSpec, gpu: impl Fn(u64) -> GpuOptions) -> (tempfile::TempDir, Model) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.gguf");
        let bytes = to_bytes(spec, Vocab::Bytes).expect("generate");
        std::fs::write(&path, &bytes).expect("write");
        let mut opts: ModelOptions = LoadOptions {
            overrides: parse_overrides("token_embd=RAM").expect("rule"),
            ..LoadOptions::default()
        }
        .into();
        opts.gpu = gpu(bytes.len() as u64);
        let m = Model::load_with(&path, &opts).expect("load");
        (dir, m)
    }
    let sim = || {
        DeviceSpec::Sim(SimConfig {
            memory: 256 << 20,
            check_races: false,
            ..SimConfig::default()
        })
    };
    let dense = GenSpec::tiny(Arch::Llama);
    let (_d, all) = load_gpu(&dense, |_| GpuOptions {
        device: sim(),
        ..GpuOptions::default()
    });
    assert_eq!(decode_allocs(&all, 4, 6), vec![0; 6], "all on the GPU");
    let (_d, half) = load_gpu(&dense, |_| GpuOptions {
        device: sim(),
        n_gpu_layers: Some(dense.n_layer / 2),
        ..GpuOptions::default()
    });
    assert_eq!(
        decode_allocs(&half, 4, 6),
        vec![0; 6],
        "half the layers on the GPU"
    );
    let (_d, nkvo) = load_gpu(&dense, |_| GpuOptions {
        device: sim(),
        no_kv_offload: true,
        ..GpuOptions::default()
    });
    assert_eq!(
        decode_allocs(&nkvo, 4, 6),
        vec![0; 6],
        "attention on the CPU"
    );
    let (_d, streamed) = load_gpu(&dense, |bytes| GpuOptions {
        device: sim(),
        vram_budget: Some(bytes / 3),
        ..GpuOptions::default()
    });
    assert_eq!(
        decode_allocs(&streamed, 4, 6),
        vec![0; 6],
        "weights streamed to VRAM"
    );
    assert!(streamed.gpu_stats().is_some_and(|s| s.streamed_bytes > 0));
    let moe = GenSpec::tiny(Arch::Qwen3Moe);
    let split = (4..10)
        .find_map(|t| {
            let (d, m) = load_gpu(&moe, |bytes| GpuOptions {
                device: sim(),
                vram_budget: Some(bytes * t / 10),
                ..GpuOptions::default()
            });
            let e = m.plan().and_then(|p| p.layers[0].experts)?;
            (e.vram > 0 && e.vram < moe.n_expert).then_some((d, m))
        })
        .expect("a budget that splits the experts");
    assert_eq!(decode_allocs(&split.1, 4, 6), vec![0; 6], "experts split");
}
