//! The decode step as a CUDA graph: a step whose every phase runs on the GPU over weights and
//! KV pages in VRAM is captured (its launches and copies recorded, not run), the executable
//! graph updated in place with the capture's arguments — or instantiated when its shape
//! changed — and launched as one. The captured copies read their bytes at launch time from
//! where they were captured, so a step's uploads (token ids, positions, page tables) go
//! through page-locked buffers kept from step to step, and its logits come back into one.
//! llama.cpp does the same (capture each token, `cudaGraphExecUpdate`); it saves the launch
//! overhead of the step's hundreds of small kernels.

use strata_kernels::{DeviceBuffer, Graph, GraphExec, HostBuffer, Stream};

use super::weights::gpu_err;
use crate::error::EngineError;

/// Alignment of each upload in the page-locked arena (a cache line).
const ALIGN: usize = 64;

/// What a context keeps for capturing its decode steps.
#[derive(Default)]
pub(crate) struct StepGraph {
    graph: Graph,
    exec: Option<GraphExec>,
    /// The step's uploads, page-locked at fixed addresses: what the graph's copies read.
    arena: Option<HostBuffer>,
    used: usize,
    /// Where the graph puts the logits (page-locked).
    logits: Option<HostBuffer>,
    /// Whether a capture is under way (uploads then go through the arena).
    capturing: bool,
    /// Set after a capture failed: this context's steps run without graphs from then on.
    pub(crate) off: bool,
}

/// How a captured step went, for the counters.
pub(crate) enum Replayed {
    /// The executable graph took the new capture's arguments.
    Updated,
    /// A graph was instantiated (the first step, or the step's shape changed).
    Instantiated,
}

impl StepGraph {
    pub(crate) fn capturing(&self) -> bool {
        self.capturing
    }

    /// Makes room for `upload_bytes` of uploads (counting each one's alignment) and
    /// `logit_bytes` of logits, before a capture: the buffers then stay put while it runs.
    pub(crate) fn reserve(
        &mut self,
        s: &Stream,
        upload_bytes: usize,
        logit_bytes: usize,
    ) -> Result<(), EngineError> {
        for (b, need) in [
            (&mut self.arena, upload_bytes),
            (&mut self.logits, logit_bytes),
        ] {
            if b.as_ref().is_none_or(|h| h.len() < need) {
                // The previous graph may still read the old one.
                s.synchronize().map_err(gpu_err)?;
                *b = None;
                *b = Some(
                    s.device()
                        .alloc_host(need.next_multiple_of(64 << 10))
                        .map_err(gpu_err)?,
                );
            }
        }
        self.used = 0;
        Ok(())
    }

    /// Starts capturing the step on `s`.
    pub(crate) fn begin(&mut self, s: &Stream) -> Result<(), EngineError> {
        s.begin_capture().map_err(gpu_err)?;
        self.capturing = true;
        Ok(())
    }

    /// Ends the capture; the error of a void one.
    pub(crate) fn end(&mut self, s: &Stream) -> Result<(), EngineError> {
        self.capturing = false;
        s.end_capture(&mut self.graph).map_err(gpu_err)
    }

    /// Updates the executable graph from the capture (instantiating it where that fails) and
    /// launches it on `s`.
    pub(crate) fn launch(&mut self, s: &Stream) -> Result<Replayed, EngineError> {
        let updated = match &mut self.exec {
            Some(e) => e.update(&self.graph).map_err(gpu_err)?,
            None => false,
        };
        let how = if updated {
            Replayed::Updated
        } else {
            self.exec = None;
            self.exec = Some(self.graph.instantiate().map_err(gpu_err)?);
            Replayed::Instantiated
        };
        let exec = self.exec.as_ref().expect("made above");
        s.launch_graph(exec).map_err(gpu_err)?;
        Ok(how)
    }

    /// `src` into `dst`: while capturing, through the arena (copied there now, read by the
    /// graph when it runs); otherwise a plain copy from `src`.
    pub(crate) fn upload(
        &mut self,
        s: &Stream,
        dst: &DeviceBuffer,
        src: &[u8],
    ) -> Result<(), EngineError> {
        if !self.capturing {
            return s.upload(dst, 0, src).map_err(gpu_err);
        }
        let off = self.used.next_multiple_of(ALIGN);
        let arena = self.arena.as_mut().ok_or_else(no_room)?;
        if off + src.len() > arena.len() {
            return Err(no_room());
        }
        arena.as_mut_slice()[off..off + src.len()].copy_from_slice(src);
        self.used = off + src.len();
        // SAFETY: the arena lives in `self` until the context drops, and is rewritten only by
        // the next step's capture, after this step's graph has run (the step ends waiting for
        // its logits; `reserve` synchronizes before replacing it).
        unsafe { s.upload_async(dst, 0, arena, off, src.len()) }.map_err(gpu_err)
    }

    /// The logits' landing place: `len` bytes of `src` copied there by the graph.
    pub(crate) fn download(
        &mut self,
        s: &Stream,
        src: &DeviceBuffer,
        len: usize,
    ) -> Result<(), EngineError> {
        let h = self.logits.as_ref().ok_or_else(no_room)?;
        // SAFETY: the buffer lives in `self`; it is read only after the step's graph has run
        // (`logits`, after a synchronize).
        unsafe { s.download_async(src, 0, h, 0, len) }.map_err(gpu_err)
    }

    /// The logits the last launch brought back (after the stream has been synchronized).
    pub(crate) fn logits(&self, out: &mut [f32]) -> Result<(), EngineError> {
        let h = self.logits.as_ref().ok_or_else(no_room)?;
        let bytes = h.as_slice().get(..out.len() * 4).ok_or_else(no_room)?;
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(())
    }
}

fn no_room() -> EngineError {
    EngineError::Invalid("a captured step's uploads outgrew the room reserved for them".into())
}
