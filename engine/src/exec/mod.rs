//! Executors: how a device runs the phases of a forward pass that the model describes.
//!
//! The model says *what* a layer computes, once for every architecture and device (DESIGN.md
//! invariant 3); an executor says *how* on its device. A layer is three [`Phase`]s:
//! - [`Phase::AttnIn`], attention input: attention RMSNorm, the Q/K/V projections, biases and
//!   QK-norm, from `x` to `q`, `k`, `v`;
//! - [`Phase::Attend`], attention: RoPE, `k` and `v` stored in each sequence's paged KV cache,
//!   and attention per sequence slot, from `q`, `k`, `v` to `att`;
//! - [`Phase::Ffn`], output and FFN: the output projection of `att`, the residual (with the
//!   post-attention norm), the FFN norm, the dense FFN or the mixture of experts (with expert
//!   prediction), and the residual (with the post-FFN norm), from `x` and `att` to `x`.
//!
//! Around the layers, [`Phase::Embed`] turns token ids into `x`, and [`Phase::Head`] applies
//! the final norm and the output projection to rows of `x` (logits, always on the host).
//!
//! Each executor keeps the named activations ([`Act`]) in its own buffers (host memory for
//! the CPU; device memory for a GPU). [`Placement`] says on which device each phase of each
//! layer runs; [`run_layers`] walks the layers and, before each phase, moves the activations
//! that phase reads to its device when they are not there yet ([`Residence::cross`]): the one
//! point where activations cross between devices (mistral.rs's `mapper.map(xs, i)`), so that
//! consecutive phases placed on one device keep their activations there.
//!
//! Two executors exist: the CPU's ([`cpu::CpuExec`], the SIMD kernels of `strata-simd`) and the
//! GPU's ([`gpu::GpuExec`], the kernels of `strata-kernels` on the model's device, a GPU or the
//! simulated one); [`Executor`] is the closed set the loop dispatches over.

pub(crate) mod cpu;
pub(crate) mod gpu;

use std::ops::Range;

use strata_simd::pool::ThreadPool;

use crate::error::EngineError;
use crate::kv::KvCache;
use crate::model::Model;

/// A device a phase can run on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Dev {
    /// The host CPU, with the SIMD kernels.
    #[default]
    Cpu,
    /// The model's GPU (or the simulated one), with the kernels of `strata-kernels`.
    Gpu,
}

impl Dev {
    /// Every device, in [`Dev::index`] order.
    pub const ALL: [Dev; 2] = [Dev::Cpu, Dev::Gpu];

    /// The device's slot in per-device tables.
    pub const fn index(self) -> usize {
        match self {
            Dev::Cpu => 0,
            Dev::Gpu => 1,
        }
    }
}

/// The steps of a forward pass that can be placed on a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Token ids → `x`.
    Embed,
    /// `x` → `q`, `k`, `v`.
    AttnIn,
    /// `q`, `k`, `v` (and the KV cache) → `att`.
    Attend,
    /// `x`, `att` → `x`.
    Ffn,
    /// `x` → logits (host memory).
    Head,
}

impl Phase {
    /// The phases of one layer, in order.
    pub const LAYER: [Phase; 3] = [Phase::AttnIn, Phase::Attend, Phase::Ffn];

    /// The activations this phase reads: what must be on its device before it runs.
    pub const fn inputs(self) -> &'static [Act] {
        match self {
            Phase::Embed => &[],
            Phase::AttnIn => &[Act::X],
            Phase::Attend => &[Act::Q, Act::K, Act::V],
            Phase::Ffn => &[Act::X, Act::Att],
            Phase::Head => &[Act::X],
        }
    }

    /// The activations this phase writes: afterwards only its device holds them.
    pub const fn outputs(self) -> &'static [Act] {
        match self {
            Phase::Embed => &[Act::X],
            Phase::AttnIn => &[Act::Q, Act::K, Act::V],
            Phase::Attend => &[Act::Att],
            Phase::Ffn => &[Act::X],
            Phase::Head => &[],
        }
    }
}

/// The activations that pass between phases, one row per token of the batch: `x` (the
/// residual stream, `n_embd` wide), `q` and `att` (`q_dim`), `k` and `v` (`kv_dim`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    X,
    Q,
    K,
    V,
    Att,
}

impl Act {
    pub const ALL: [Act; 5] = [Act::X, Act::Q, Act::K, Act::V, Act::Att];

    const fn index(self) -> usize {
        self as usize
    }

    /// Floats per row.
    pub fn width(self, m: &Model) -> usize {
        let c = &m.config;
        match self {
            Act::X => c.n_embd,
            Act::Q | Act::Att => c.q_dim(),
            Act::K | Act::V => c.kv_dim(),
        }
    }
}

/// Where the phases of one layer run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PhasePlacement {
    pub attn_in: Dev,
    pub attend: Dev,
    pub ffn: Dev,
}

impl PhasePlacement {
    /// Everything on one device.
    pub const fn all(dev: Dev) -> Self {
        Self {
            attn_in: dev,
            attend: dev,
            ffn: dev,
        }
    }

    /// The device of one of the layer's phases.
    pub const fn of(&self, phase: Phase) -> Dev {
        match phase {
            Phase::AttnIn => self.attn_in,
            Phase::Attend => self.attend,
            // Embed and Head are not a layer's; a layer places only its own three.
            Phase::Ffn | Phase::Embed | Phase::Head => self.ffn,
        }
    }
}

/// Where every phase of a pass runs: the embedding lookup, each layer's three phases, and the
/// head (final norm and logits).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub embed: Dev,
    pub layers: Vec<PhasePlacement>,
    pub head: Dev,
}

impl Placement {
    /// Every phase of `n_layer` layers on one device.
    pub fn all(dev: Dev, n_layer: usize) -> Self {
        Self {
            embed: dev,
            layers: vec![PhasePlacement::all(dev); n_layer],
            head: dev,
        }
    }

    /// Whether any phase runs on `dev`.
    fn uses(&self, dev: Dev) -> bool {
        self.embed == dev
            || self.head == dev
            || self
                .layers
                .iter()
                .any(|p| Phase::LAYER.iter().any(|&ph| p.of(ph) == dev))
    }
}

/// Rows `row0..row0 + n` of a batch: `n` tokens of one sequence at positions `pos0..`, whose
/// keys and values go to `kv`.
pub(crate) struct Slot<'a> {
    pub kv: &'a mut KvCache,
    pub pos0: usize,
    pub row0: usize,
    pub n: usize,
}

/// What every phase of one pass reads besides its activations: the model, the threads the
/// CPU computes on, and the batch's number of rows.
pub(crate) struct Pass<'a> {
    pub model: &'a Model,
    pub pool: &'a ThreadPool,
    pub n: usize,
}

/// One device's executor: its activation buffers and whatever else it keeps between passes.
/// The closed set of devices; each phase is dispatched here to the executor's own code.
// One executor per device per context, made once and never moved on a hot path: the size of
// the larger variant costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Executor {
    Cpu(cpu::CpuExec),
    Gpu(gpu::GpuExec),
}

impl Executor {
    fn new(dev: Dev) -> Self {
        match dev {
            Dev::Cpu => Executor::Cpu(cpu::CpuExec::default()),
            Dev::Gpu => Executor::Gpu(gpu::GpuExec::default()),
        }
    }

    /// Makes room for `p.n` rows of every activation (allocating only when the batch is
    /// larger than any before).
    fn begin(&mut self, p: &Pass<'_>) -> Result<(), EngineError> {
        match self {
            Executor::Cpu(e) => {
                e.begin(p);
                Ok(())
            }
            Executor::Gpu(e) => e.begin(p),
        }
    }

    fn embed(&mut self, p: &Pass<'_>, tokens: &[u32]) -> Result<(), EngineError> {
        match self {
            Executor::Cpu(e) => e.embed(p, tokens),
            Executor::Gpu(e) => e.embed(p, tokens),
        }
    }

    fn attn_input(&mut self, p: &Pass<'_>, il: usize) -> Result<(), EngineError> {
        match self {
            Executor::Cpu(e) => e.attn_input(p, il),
            Executor::Gpu(e) => e.attn_input(p, il),
        }
    }

    fn attend(
        &mut self,
        p: &Pass<'_>,
        il: usize,
        slots: &mut [Slot<'_>],
    ) -> Result<(), EngineError> {
        match self {
            Executor::Cpu(e) => e.attend(p, il, slots),
            Executor::Gpu(e) => e.attend(p, il, slots),
        }
    }

    fn ffn(&mut self, p: &Pass<'_>, il: usize) -> Result<(), EngineError> {
        match self {
            Executor::Cpu(e) => e.ffn(p, il),
            Executor::Gpu(e) => e.ffn(p, il),
        }
    }

    /// Runs one of layer `il`'s phases ([`Phase::LAYER`]).
    fn layer_phase(
        &mut self,
        p: &Pass<'_>,
        phase: Phase,
        il: usize,
        slots: &mut [Slot<'_>],
    ) -> Result<(), EngineError> {
        match phase {
            Phase::AttnIn => self.attn_input(p, il),
            Phase::Attend => self.attend(p, il, slots),
            Phase::Ffn => self.ffn(p, il),
            Phase::Embed | Phase::Head => Err(EngineError::Invalid(format!(
                "{phase:?} is not a phase of a layer"
            ))),
        }
    }

    /// Final norm and output projection of batch rows `rows` into `out` (host memory,
    /// `rows.len() * n_vocab` floats).
    fn head(
        &mut self,
        p: &Pass<'_>,
        rows: Range<usize>,
        out: &mut [f32],
    ) -> Result<(), EngineError> {
        match self {
            Executor::Cpu(e) => e.head(p, rows, out),
            Executor::Gpu(e) => e.head(p, rows, out),
        }
    }

    /// Copies the first `dst.len()` floats of activation `act` to host memory.
    fn read(&mut self, p: &Pass<'_>, act: Act, dst: &mut [f32]) -> Result<(), EngineError> {
        match self {
            Executor::Cpu(e) => {
                e.read(act, dst);
                Ok(())
            }
            Executor::Gpu(e) => e.read(p, act, dst),
        }
    }

    /// Replaces the first `src.len()` floats of activation `act` with `src` (host memory).
    fn write(&mut self, p: &Pass<'_>, act: Act, src: &[f32]) -> Result<(), EngineError> {
        match self {
            Executor::Cpu(e) => {
                e.write(act, src);
                Ok(())
            }
            Executor::Gpu(e) => e.write(p, act, src),
        }
    }
}

/// The executors of a sequence (or of a batch of them), one per device a placement has used,
/// made on first use and kept with their buffers so that a step allocates nothing.
#[derive(Default)]
pub(crate) struct Executors {
    devs: Vec<Option<Executor>>,
    /// Host copy of an activation crossing between two devices that are not the CPU.
    staging: Vec<f32>,
}

impl Executors {
    fn get(&mut self, dev: Dev) -> &mut Executor {
        let i = dev.index();
        if self.devs.len() <= i {
            self.devs.resize_with(i + 1, || None);
        }
        self.devs[i].get_or_insert_with(|| Executor::new(dev))
    }

    /// Readies the executors of every device `placement` uses for a pass of `p.n` rows.
    fn begin(&mut self, p: &Pass<'_>, placement: &Placement) -> Result<(), EngineError> {
        for dev in Dev::ALL {
            if placement.uses(dev) {
                self.get(dev).begin(p)?;
            }
        }
        Ok(())
    }

    /// Moves the first `len` floats of `act` from `from`'s buffers to `to`'s, through host
    /// memory.
    fn copy(
        &mut self,
        p: &Pass<'_>,
        act: Act,
        from: Dev,
        to: Dev,
        len: usize,
    ) -> Result<(), EngineError> {
        let mut staging = std::mem::take(&mut self.staging);
        staging.resize(len, 0.0);
        let r = self
            .get(from)
            .read(p, act, &mut staging)
            .and_then(|()| self.get(to).write(p, act, &staging));
        self.staging = staging;
        r
    }
}

/// Which devices hold the current value of each activation during a pass (a bit per
/// [`Dev::index`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Residence {
    valid: [u32; Act::ALL.len()],
}

impl Residence {
    /// Makes `phase`'s inputs current on `dev`, copying from a device that holds them: the
    /// crossing point of the layer loop. Returns the number of activations moved.
    fn cross(
        &mut self,
        execs: &mut Executors,
        phase: Phase,
        dev: Dev,
        p: &Pass<'_>,
    ) -> Result<usize, EngineError> {
        let mut moved = 0;
        for &act in phase.inputs() {
            let have = self.valid[act.index()];
            if have & (1 << dev.index()) != 0 {
                continue;
            }
            let from = Dev::ALL
                .into_iter()
                .find(|d| have & (1 << d.index()) != 0)
                .ok_or_else(|| {
                    EngineError::Invalid(format!(
                        "{phase:?} reads {act:?}, which no earlier phase of this pass wrote"
                    ))
                })?;
            execs.copy(p, act, from, dev, p.n * act.width(p.model))?;
            self.valid[act.index()] |= 1 << dev.index();
            moved += 1;
        }
        Ok(moved)
    }

    /// Records that `phase` wrote its outputs on `dev` (other devices' copies are stale).
    fn wrote(&mut self, phase: Phase, dev: Dev) {
        for &act in phase.outputs() {
            self.valid[act.index()] = 1 << dev.index();
        }
    }
}

/// One pass of `tokens` through every layer as `placement` says, row `i` of the batch
/// belonging to the slot that covers it. Leaves the final hidden states in the executors and
/// returns where they are, for [`head`].
pub(crate) fn run_layers(
    p: &Pass<'_>,
    placement: &Placement,
    execs: &mut Executors,
    tokens: &[u32],
    slots: &mut [Slot<'_>],
) -> Result<Residence, EngineError> {
    let layers = &p.model.layers;
    if placement.layers.len() != layers.len() {
        return Err(EngineError::Invalid(format!(
            "a placement of {} layers for a model of {}",
            placement.layers.len(),
            layers.len()
        )));
    }
    execs.begin(p, placement)?;
    let mut at = Residence::default();
    execs.get(placement.embed).embed(p, tokens)?;
    at.wrote(Phase::Embed, placement.embed);
    for (il, place) in placement.layers.iter().enumerate() {
        for phase in Phase::LAYER {
            let dev = place.of(phase);
            // The crossing point: the activations this phase reads move to its device here,
            // and only here, when the previous phase that wrote them ran elsewhere.
            at.cross(execs, phase, dev, p)?;
            execs.get(dev).layer_phase(p, phase, il, slots)?;
            at.wrote(phase, dev);
        }
    }
    Ok(at)
}

/// A decode step (one token per slot) run whole as a CUDA graph, its logits (every row) into
/// `out`, where the placement puts every layer and the head on the GPU (the embedding rows
/// may be gathered on the CPU) and the GPU executor can capture it
/// ([`gpu::GpuExec::graph_step`]). `Ok(false)`, having run nothing, otherwise: then run the
/// step with [`run_layers`] and [`head`].
pub(crate) fn graph_step(
    p: &Pass<'_>,
    placement: &Placement,
    execs: &mut Executors,
    tokens: &[u32],
    slots: &mut [Slot<'_>],
    out: &mut [f32],
) -> Result<bool, EngineError> {
    let gpu_only = |pl: &Placement| {
        pl.head == Dev::Gpu
            && pl
                .layers
                .iter()
                .all(|l| Phase::LAYER.iter().all(|&ph| l.of(ph) == Dev::Gpu))
    };
    if !gpu_only(placement) || placement.layers.len() != p.model.layers.len() {
        return Ok(false);
    }
    // An embedding table kept on the CPU: the rows are gathered there first, and the graph
    // copies them in.
    let mut x = std::mem::take(&mut execs.staging);
    x.clear();
    let r = (|| {
        if placement.embed == Dev::Cpu {
            let cpu = execs.get(Dev::Cpu);
            cpu.begin(p)?;
            cpu.embed(p, tokens)?;
            x.resize(p.n * Act::X.width(p.model), 0.0);
            cpu.read(p, Act::X, &mut x)?;
        }
        let x = (placement.embed == Dev::Cpu).then_some(&x[..]);
        match execs.get(Dev::Gpu) {
            Executor::Gpu(e) => e.graph_step(p, tokens, x, slots, out),
            Executor::Cpu(_) => Ok(false),
        }
    })();
    execs.staging = x;
    r
}

/// The final norm and logits of batch rows `rows` into `out`, on the placement's head device
/// (the final hidden states crossing to it first when they are elsewhere).
pub(crate) fn head(
    p: &Pass<'_>,
    placement: &Placement,
    execs: &mut Executors,
    at: &mut Residence,
    rows: Range<usize>,
    out: &mut [f32],
) -> Result<(), EngineError> {
    at.cross(execs, Phase::Head, placement.head, p)?;
    execs.get(placement.head).head(p, rows, out)
}

#[cfg(test)]
mod tests;
