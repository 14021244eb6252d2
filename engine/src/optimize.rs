//! `strata optimize`: a mixture-of-experts model rewritten so that each expert's gate, up and
//! down matrices lie side by side — one record per expert, aligned for direct I/O — and the
//! expert cache reads an expert with one request instead of three (strata's strided layout,
//! see [`strata_storage::gguf::TensorInfo`]). Every other tensor and all metadata are copied
//! as they are, and the weights are the same bytes: the model computes exactly what the
//! original does.
//!
//! The rewrite streams: it holds one record and one copy buffer, so a file larger than RAM can
//! be rewritten. The output is written to a temporary file beside the target (the store's
//! `TempFile`: removed unless kept), checked by parsing it back, then synced and renamed into
//! place.
//!
//! Other GGUF readers cannot read the result (a strided tensor's name carries a suffix, so
//! llama.cpp stops at a missing tensor instead of reading wrong weights): keep the original.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use strata_storage::gguf::{GgufBuilder, GgufFile, TensorInfo, record_layout};
use strata_storage::io::DIRECT_ALIGN;
use strata_storage::store::{Progress, TempFile};

use crate::EngineError;
use crate::model::names::LayerTensor;

/// What [`optimize`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Optimized {
    /// MoE layers whose experts were laid out expert by expert.
    pub layers: usize,
    /// Bytes of one expert's record (gate, up and down, aligned) in the first such layer.
    pub record_bytes: u64,
    pub bytes_written: u64,
}

/// A MoE layer's stacked expert tensors: gate, up, down (indices into the tensor table).
struct Group {
    parts: [usize; 3],
}

fn invalid(msg: String) -> EngineError {
    EngineError::Invalid(msg)
}

/// The layers whose three stacked expert tensors agree on their expert count.
fn groups(g: &GgufFile) -> Vec<Group> {
    let mut out = Vec::new();
    for layer in 0.. {
        let roles = [
            LayerTensor::GateExps,
            LayerTensor::UpExps,
            LayerTensor::DownExps,
        ];
        let found: Vec<Option<usize>> = roles
            .iter()
            .map(|r| {
                let name = r.gguf_name(layer);
                g.tensors.iter().position(|t| t.name == name)
            })
            .collect();
        if !g
            .tensors
            .iter()
            .any(|t| t.name.starts_with(&format!("blk.{layer}.")))
        {
            break;
        }
        let [Some(a), Some(b), Some(c)] = found[..] else {
            continue;
        };
        let n = |i: usize| match g.tensors[i].dims.as_slice() {
            [_, _, n] if *n > 1 => Some(*n),
            _ => None,
        };
        if n(a).is_some() && n(a) == n(b) && n(a) == n(c) {
            out.push(Group { parts: [a, b, c] });
        }
    }
    out
}

/// Rewrites the model at `input` into `output` with each MoE layer's experts laid out expert by
/// expert. Fails, naming the problem, when the input has no stacked experts, is already laid
/// out so, or when `output` is `input`; `output` is untouched unless it succeeds.
pub fn optimize(
    input: &Path,
    output: &Path,
    progress: &mut dyn Progress,
) -> Result<Optimized, EngineError> {
    let g = GgufFile::open(input)?;
    if g.tensors.iter().any(|t| t.stride.is_some()) {
        return Err(invalid(format!(
            "{}: already optimized (its experts are laid out expert by expert)",
            input.display()
        )));
    }
    let same = |a: &Path, b: &Path| {
        let (Ok(a), Ok(b)) = (a.canonicalize(), b.canonicalize()) else {
            return false;
        };
        a == b
    };
    if same(input, output) {
        return Err(invalid(format!(
            "{}: the output must be a new file, not the model itself",
            output.display()
        )));
    }
    let groups = groups(&g);
    if groups.is_empty() {
        return Err(invalid(format!(
            "{}: nothing to optimize: no layer has stacked expert tensors (blk.N.ffn_{{gate,up,down}}_exps.weight)",
            input.display()
        )));
    }
    let align = DIRECT_ALIGN as u64;
    let mut b = GgufBuilder::new();
    b.version(g.version).alignment(g.alignment.max(align));
    for (k, v) in g.metadata.iter() {
        if k != "general.alignment" {
            b.kv(k, v.clone());
        }
    }
    // Tensors in file order; a group where its first part was.
    let group_of = |i: usize| groups.iter().position(|gr| gr.parts.contains(&i));
    let mut declared = vec![false; groups.len()];
    // What each declared item produces, in declaration order.
    enum Item {
        Copy(usize),
        Records(usize),
    }
    let mut items = Vec::new();
    for (i, t) in g.tensors.iter().enumerate() {
        match group_of(i) {
            None => {
                b.tensor_deferred(&t.name, &t.dims, t.ty)
                    .ok_or_else(|| invalid(format!("tensor {}: size overflows", t.name)))?;
                items.push(Item::Copy(i));
            }
            Some(k) if !declared[k] => {
                declared[k] = true;
                let parts: Vec<(&str, &[u64], _)> = groups[k]
                    .parts
                    .iter()
                    .map(|&p| {
                        let t = &g.tensors[p];
                        (t.name.as_str(), t.dims.as_slice(), t.ty)
                    })
                    .collect();
                b.strided_group(&parts, align).ok_or_else(|| {
                    invalid(format!("layer of {}: expert tensors do not stack", t.name))
                })?;
                items.push(Item::Records(k));
            }
            Some(_) => {}
        }
    }
    let layout = |k: usize| {
        let slabs: Vec<u64> = groups[k]
            .parts
            .iter()
            .map(|&p| g.tensors[p].slices().1)
            .collect();
        (record_layout(&slabs, g.alignment.max(align), align), slabs)
    };
    let record_bytes = layout(0).0.1;

    let open = || File::open(input).map_err(|e| invalid(format!("{}: {e}", input.display())));
    // One descriptor per tensor of a record, so that each keeps its own read-ahead.
    let srcs = [open()?, open()?, open()?];
    let src = &srcs[0];
    // Beside the output, so that the rename into place is atomic; removed unless kept.
    let dir = match output.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let stem = output
        .file_name()
        .map_or_else(|| "model".into(), |n| format!(".{}", n.to_string_lossy()));
    let store_err = |e: strata_storage::store::StoreError| invalid(e.to_string());
    let mut tmp = TempFile::create(dir, &stem).map_err(store_err)?;
    let total: u64 = g.tensors.iter().map(|t| t.n_bytes).sum();
    progress.start("optimizing", Some(total));
    let mut buf = vec![0u8; 8 << 20];
    let mut next = 0usize;
    let file = tmp.file().map_err(store_err)?;
    let written = b.write_with(BufWriter::with_capacity(8 << 20, file), |_, out| {
        let item = items
            .get(next)
            .ok_or_else(|| std::io::Error::other("more tensors written than declared"))?;
        next += 1;
        match *item {
            Item::Copy(i) => {
                let t = &g.tensors[i];
                copy(src, g.data_offset + t.offset, t.n_bytes, &mut buf, out)?;
                progress.advance(t.n_bytes);
            }
            Item::Records(k) => {
                let ((at, stride), slabs) = layout(k);
                let parts: Vec<&TensorInfo> =
                    groups[k].parts.iter().map(|&p| &g.tensors[p]).collect();
                let mut rec = vec![0u8; stride as usize];
                for e in 0..parts[0].slices().0 {
                    rec.fill(0);
                    for (((t, &a), &s), f) in parts.iter().zip(&at).zip(&slabs).zip(&srcs) {
                        let dst = &mut rec[a as usize..(a + s) as usize];
                        f.read_exact_at(dst, g.data_offset + t.offset + e * s)?;
                    }
                    out.write_all(&rec)?;
                    progress.advance(slabs.iter().sum());
                }
            }
        }
        Ok(())
    });
    progress.finish();
    let bytes_written =
        written.map_err(|e| invalid(format!("writing {}: {e}", tmp.path().display())))?;
    // The result must read back as a valid file with the same tensors.
    match GgufFile::open(tmp.path()) {
        Ok(o) if o.tensors.len() == g.tensors.len() => {}
        Ok(_) => return Err(invalid("the rewritten file lost tensors".into())),
        Err(e) => return Err(invalid(format!("the rewritten file does not parse: {e}"))),
    }
    tmp.persist(output).map_err(store_err)?;
    Ok(Optimized {
        layers: groups.len(),
        record_bytes,
        bytes_written,
    })
}

/// Copies `len` bytes at `at` of `src` to `out` through `buf`.
fn copy(
    src: &File,
    mut at: u64,
    len: u64,
    buf: &mut [u8],
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let end = at + len;
    while at < end {
        let k = (end - at).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..k], at)?;
        out.write_all(&buf[..k])?;
        at += k as u64;
    }
    Ok(())
}
