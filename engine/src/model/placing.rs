//! Where a model's phases run: at load, with a GPU, the planner's placement ([`crate::plan`])
//! turned into the executors' [`Placement`] and the GPU executor's weight preparation.

use strata_kernels::Device;
use strata_storage::residency::TensorId;
use strata_storage::residency::overrides::{Target, target_of};

use super::options::{DeviceSpec, ModelOptions};
use super::{Ffn, Layer, Mat};
use crate::error::EngineError;
use crate::exec::gpu::weights::{GpuWeights, gpu_err};
use crate::exec::{Dev, PhasePlacement, Placement};
use crate::plan::{
    self, Budgets, DeviceChoice, Exec, HwProfile, ModelDesc, Overrides, PinTarget, Tier,
};
use strata_storage::residency::Weights;

/// What loading decided: the executors' placement, the GPU's weights, the plan behind them.
pub(crate) struct Placed {
    pub placement: Placement,
    pub gpu: Option<GpuWeights>,
    pub plan: Option<plan::Placement>,
    /// Tensors the GPU copies from host memory (each step, or experts into its cache): the
    /// CPU must not repack them.
    pub streamed: Vec<TensorId>,
}

/// The device `spec` names (`None` for the CPU): a clear error where there is no driver.
pub fn open_device(spec: &DeviceSpec) -> Result<Option<Device>, EngineError> {
    match spec {
        DeviceSpec::Cpu => Ok(None),
        DeviceSpec::Cuda(i) => Device::cuda(*i).map(Some).map_err(gpu_err),
        DeviceSpec::Sim(cfg) => Device::sim(cfg.clone()).map(Some).map_err(gpu_err),
    }
}

/// The machine the planner models: the options' profile (or the shipped 2-core CPU's), with
/// the GPU part taken from the device where the profile has none or names another memory size.
fn profile(opts: &ModelOptions, dev: &Device) -> HwProfile {
    let mut hw = opts
        .gpu
        .profile
        .clone()
        .or_else(|| plan::profile::shipped("cpu-2core"))
        .unwrap_or_else(|| unreachable!("the shipped profiles parse (tested)"));
    let info = dev.info();
    let mut g = hw
        .gpu
        .clone()
        .or_else(|| {
            plan::profile::SHIPPED
                .iter()
                .filter_map(|(n, _)| plan::profile::shipped(n))
                .filter_map(|p| p.gpu)
                .find(|g| info.name.contains(g.name.trim_start_matches("NVIDIA ")))
        })
        .or_else(|| plan::profile::shipped("rtx4090").and_then(|p| p.gpu))
        .unwrap_or_else(|| unreachable!("the shipped profiles parse (tested)"));
    g.name = info.name.clone();
    g.vram_bytes = info.total_memory as u64;
    hw.gpu = Some(g);
    hw
}

fn pin_of(t: Target) -> PinTarget {
    match t {
        Target::Cpu | Target::Ram => PinTarget::Cpu,
        Target::Gpu(_) => PinTarget::Gpu,
    }
}

fn dev_of(e: Exec) -> Dev {
    match e {
        Exec::Cpu => Dev::Cpu,
        Exec::Gpu => Dev::Gpu,
    }
}

/// The placement of a model's phases and, with a GPU, its weights on the device.
pub(crate) fn place(
    opts: &ModelOptions,
    weights: &Weights,
    layers: &[Layer],
    output: Mat,
    token_embd: Mat,
    output_norm: &[f32],
) -> Result<Placed, EngineError> {
    let n = layers.len();
    let Some(dev) = open_device(&opts.gpu.device)? else {
        if let Some(t) = weights.gguf().tensors.iter().find(|t| {
            matches!(
                target_of(&opts.residency.overrides, &t.name),
                Some(Target::Gpu(_))
            )
        }) {
            return Err(EngineError::Invalid(format!(
                "tensor {} is sent to a GPU by an override (-ot …=CUDA0), but no GPU device was \
                 asked for (--device cuda, or sim for the simulated GPU)",
                t.name
            )));
        }
        if opts.gpu.n_gpu_layers.is_some_and(|n| n > 0) {
            return Err(EngineError::Invalid(
                "-ngl puts layers on a GPU, but no GPU device was asked for (--device cuda, or \
                 sim for the simulated GPU)"
                    .into(),
            ));
        }
        return Ok(Placed {
            placement: Placement::all(Dev::Cpu, n),
            gpu: None,
            plan: None,
            streamed: Vec::new(),
        });
    };
    let g = weights.gguf();
    let desc = ModelDesc::from_gguf("model", g)?;
    let hw = profile(opts, &dev);
    let mut pins = std::collections::HashMap::new();
    for t in &g.tensors {
        if let Some(target) = target_of(&opts.residency.overrides, &t.name) {
            pins.insert(t.name.clone(), pin_of(target));
        }
    }
    let budgets = Budgets {
        vram: opts.gpu.vram_budget,
        n_ctx: opts.gpu.n_ctx.unwrap_or(4096) as u64,
        ..Budgets::default()
    };
    let overrides = Overrides {
        device: DeviceChoice::Gpu,
        n_gpu_layers: opts.gpu.n_gpu_layers,
        no_kv_offload: opts.gpu.no_kv_offload,
        n_cpu_moe: None,
        pins,
    };
    let p = plan::plan(&desc, &hw, &budgets, &overrides)?;

    let mut placement = Placement::all(Dev::Cpu, n);
    let mut resident = Vec::new();
    let mut streamed = Vec::new();
    let mut gpu_layers = vec![false; n];
    let mut kv_layers = vec![false; n];
    let mut experts: Vec<Option<(usize, usize)>> = vec![None; n];
    for (il, (lp, layer)) in p.layers.iter().zip(layers).enumerate() {
        let attn = [layer.q.id, layer.k.id, layer.v.id, layer.o.id];
        let ffn: Vec<TensorId> = match &layer.ffn {
            Ffn::Dense { gate, up, down } => vec![gate.id, up.id, down.id],
            Ffn::Moe(m) => {
                let mut v = vec![m.router.id];
                if let Some((g, u, d, _)) = &m.shared {
                    v.extend([g.id, u.id, d.id]);
                }
                v
            }
        };
        // The experts run where the FFN phase does (on the GPU: from its VRAM expert cache,
        // or on the CPU expert by expert where that costs less).
        let ffn_exec = lp.ffn.exec;
        if let (Ffn::Moe(_), Some(e), Exec::Gpu) = (&layer.ffn, lp.experts, ffn_exec) {
            experts[il] = Some((e.vram.max(1), e.gpu_min_tokens));
        }
        placement.layers[il] = PhasePlacement {
            attn_in: dev_of(lp.attn.exec),
            attend: dev_of(lp.attend),
            ffn: dev_of(ffn_exec),
        };
        for (ids, place, exec) in [
            (&attn[..], lp.attn, lp.attn.exec),
            (&ffn[..], lp.ffn, ffn_exec),
        ] {
            if exec != Exec::Gpu {
                continue;
            }
            if place.tier == Tier::Vram {
                resident.extend_from_slice(ids);
            } else {
                streamed.extend_from_slice(ids);
            }
        }
        gpu_layers[il] = placement.layers[il] != PhasePlacement::all(Dev::Cpu);
        kv_layers[il] = lp.attend == Exec::Gpu;
    }
    placement.head = dev_of(p.output.exec);
    if p.output.exec == Exec::Gpu {
        if p.output.tier == Tier::Vram {
            resident.push(output.id);
        } else {
            streamed.push(output.id);
        }
    }
    // A table that is also the output projection in VRAM is gathered there.
    if output.id == token_embd.id && p.output.tier == Tier::Vram {
        placement.embed = Dev::Gpu;
    }
    let kv_budget = opts
        .gpu
        .kv_vram_budget
        .or_else(|| usize::try_from(p.kv.vram).ok());
    let gpu = GpuWeights::prepare(
        dev,
        weights,
        layers,
        output_norm,
        &resident,
        &gpu_layers,
        kv_layers,
        kv_budget,
        &experts,
        !streamed.is_empty(),
        !opts.no_gpu_graphs,
    )?;
    // The experts of layers whose FFN runs on the GPU are copied into its cache as the file
    // has them: the CPU leaves them in that layout too (it runs some of them from there).
    for (layer, e) in layers.iter().zip(&experts) {
        if let (Ffn::Moe(m), Some(_)) = (&layer.ffn, e) {
            streamed.extend([m.gate.mat.id, m.up.mat.id, m.down.mat.id]);
        }
    }
    tracing::info!(
        gpu = %gpu.dev.info().name,
        layers_on_gpu = p.gpu_layers(),
        vram = gpu.resident_bytes,
        "placement"
    );
    Ok(Placed {
        placement,
        gpu: Some(gpu),
        plan: Some(p),
        streamed,
    })
}
