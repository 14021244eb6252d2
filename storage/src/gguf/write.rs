//! A GGUF writer.
//!
//! It writes exactly what it is told: duplicate keys, a `general.alignment` of 3 or tensor data
//! of the wrong length are all written as given, because hostile-file tests build broken files
//! with it. Validation is the reader's job; a file built from sane input reads back equal.

use std::io::{self, Write};

use super::read::DEFAULT_ALIGNMENT;
use super::value::type_id;
use super::{ArrayValue, STRIDED_NAMES_KEY, STRIDED_STRIDES_KEY, STRIDED_SUFFIX, Value};
use crate::quant::GgmlType;

/// One tensor to be written.
#[derive(Clone, Debug)]
struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    data: Data,
    place: Place,
}

/// Where a tensor's bytes go in the data section.
#[derive(Clone, Copy, Debug)]
enum Place {
    /// Back to back, at the next aligned position.
    Own,
    /// The first tensor of a strided group: the group's records start at the next multiple of
    /// `align`, `stride` bytes each, and this tensor's slices open them.
    First { stride: u64, align: u64 },
    /// A later tensor of the group declared just before: its slices lie at `at` of each record.
    Member { stride: u64, at: u64 },
}

impl Place {
    fn stride(self) -> Option<u64> {
        match self {
            Place::Own => None,
            Place::First { stride, .. } | Place::Member { stride, .. } => Some(stride),
        }
    }
}

/// Where each tensor's slices lie in a record of a strided group, and the record's length:
/// `slices` (bytes of one slice of each tensor) one after another, each at a multiple of
/// `alignment`, the record padded to a multiple of `record_align`.
pub fn record_layout(slices: &[u64], alignment: u64, record_align: u64) -> (Vec<u64>, u64) {
    let mut at = Vec::with_capacity(slices.len());
    let mut end = 0u64;
    for &s in slices {
        let a = end.next_multiple_of(alignment.max(1));
        at.push(a);
        end = a + s;
    }
    (at, end.next_multiple_of(record_align.max(alignment).max(1)))
}

/// A tensor's bytes: given up front, or produced while the file is written (files larger than
/// memory).
#[derive(Clone, Debug)]
enum Data {
    Bytes(Vec<u8>),
    Deferred(u64),
    /// Written with the first tensor of its strided group.
    InGroup,
}

impl Data {
    fn len(&self) -> u64 {
        match self {
            Data::Bytes(b) => b.len() as u64,
            Data::Deferred(n) => *n,
            Data::InGroup => 0,
        }
    }
}

/// Builds a GGUF file in memory and writes it out.
///
/// ```
/// use strata_storage::gguf::{GgufBuilder, GgufFile, Value};
/// use strata_storage::quant::GgmlType;
///
/// let bytes = GgufBuilder::new()
///     .kv("general.architecture", Value::String("llama".into()))
///     .tensor("w", &[2, 2], GgmlType::F32, vec![0; 16])
///     .to_bytes();
/// let f = GgufFile::from_bytes(&bytes).unwrap();
/// assert_eq!(f.architecture().unwrap(), "llama");
/// ```
#[derive(Clone, Debug)]
pub struct GgufBuilder {
    version: u32,
    alignment: u64,
    kvs: Vec<(String, Value)>,
    tensors: Vec<PendingTensor>,
}

impl Default for GgufBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufBuilder {
    /// An empty version-3 file with the default alignment of 32.
    pub fn new() -> Self {
        Self {
            version: 3,
            alignment: DEFAULT_ALIGNMENT,
            kvs: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// Sets the version number written in the header.
    pub fn version(&mut self, v: u32) -> &mut Self {
        self.version = v;
        self
    }

    /// Sets the data alignment. When it is not 32, `general.alignment` (u32) is written as the
    /// first key unless a `general.alignment` key was added explicitly, in which case that value
    /// is written instead (so tests can write a lying one). Values of 0 are treated as 1 for
    /// padding purposes.
    pub fn alignment(&mut self, a: u64) -> &mut Self {
        self.alignment = a;
        self
    }

    /// Appends a metadata entry (duplicates are kept).
    pub fn kv(&mut self, key: &str, v: Value) -> &mut Self {
        self.kvs.push((key.to_owned(), v));
        self
    }

    /// Appends a tensor; its offset is the next aligned position in the data section. `data` is
    /// written as given, padded to the alignment.
    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> &mut Self {
        self.tensors.push(PendingTensor {
            name: name.to_owned(),
            dims: dims.to_vec(),
            ty,
            data: Data::Bytes(data),
            place: Place::Own,
        });
        self
    }

    /// Declares a tensor whose `ty.bytes_for(elements)` bytes [`GgufBuilder::write_with`] asks
    /// for when it reaches it, so a file of any size is written with bounded memory. Returns
    /// `None` when the dims are not a whole number of blocks or overflow.
    pub fn tensor_deferred(&mut self, name: &str, dims: &[u64], ty: GgmlType) -> Option<&mut Self> {
        let n = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d))?;
        let len = ty.bytes_for(n)?;
        self.tensors.push(PendingTensor {
            name: name.to_owned(),
            dims: dims.to_vec(),
            ty,
            data: Data::Deferred(len),
            place: Place::Own,
        });
        Some(self)
    }

    /// Declares tensors of strata's strided layout (`strata optimize`, see
    /// [`super::TensorInfo`]): all with the same outermost dimension `n`, their slices written
    /// record by record — record `i` holds slice `i` of each tensor at the offsets
    /// [`record_layout`] gives, and records start at a multiple of `record_align` (4096 for
    /// direct I/O, when the alignment is at least that). [`GgufBuilder::write_with`] asks for
    /// the whole group's `n` records under the first tensor's name. Returns `None` when the
    /// tensors disagree on `n`, are 1-D, or their sizes overflow.
    pub fn strided_group(
        &mut self,
        parts: &[(&str, &[u64], GgmlType)],
        record_align: u64,
    ) -> Option<&mut Self> {
        let n = *parts.first()?.1.last()?;
        let mut slices = Vec::with_capacity(parts.len());
        for &(_, dims, ty) in parts {
            if dims.len() < 2 || dims.last() != Some(&n) || n == 0 {
                return None;
            }
            let elems = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d))?;
            slices.push(ty.bytes_for(elems)? / n);
        }
        let (at, stride) = record_layout(&slices, self.pad_unit(), record_align);
        let total = stride.checked_mul(n)?;
        for (k, &(name, dims, ty)) in parts.iter().enumerate() {
            let (data, place) = if k == 0 {
                (
                    Data::Deferred(total),
                    Place::First {
                        stride,
                        align: record_align.max(1),
                    },
                )
            } else {
                (Data::InGroup, Place::Member { stride, at: at[k] })
            };
            self.tensors.push(PendingTensor {
                name: name.to_owned(),
                dims: dims.to_vec(),
                ty,
                data,
                place,
            });
        }
        Some(self)
    }

    /// Each tensor's offset in the data section, and where the data of a strided group starts.
    fn offsets(&self) -> Vec<u64> {
        let (mut next, mut base) = (0u64, 0u64);
        let mut out = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            let off = match t.place {
                Place::Own => next,
                Place::First { align, .. } => {
                    base = next.next_multiple_of(align);
                    base
                }
                Place::Member { at, .. } => base + at,
            };
            out.push(off);
            if !matches!(t.place, Place::Member { .. }) {
                next = (off + t.data.len()).next_multiple_of(self.pad_unit());
            }
        }
        out
    }

    /// The strided tensors' names and strides, for the metadata.
    fn strided(&self) -> (Vec<String>, Vec<u64>) {
        self.tensors
            .iter()
            .filter_map(|t| Some((t.name.clone(), t.place.stride()?)))
            .unzip()
    }

    /// The alignment used for padding; 0 would make padding meaningless.
    fn pad_unit(&self) -> u64 {
        self.alignment.max(1)
    }

    /// Whether `general.alignment` must be added by the builder itself.
    fn writes_alignment_key(&self) -> bool {
        self.alignment != DEFAULT_ALIGNMENT
            && !self.kvs.iter().any(|(k, _)| k == "general.alignment")
    }

    /// Header, metadata and tensor table, unpadded.
    fn header(&self) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(b"GGUF");
        h.extend_from_slice(&self.version.to_le_bytes());
        h.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        let (strided, strides) = self.strided();
        let extra = u64::from(self.writes_alignment_key()) + 2 * u64::from(!strided.is_empty());
        h.extend_from_slice(&(self.kvs.len() as u64 + extra).to_le_bytes());
        if self.writes_alignment_key() {
            put_str(&mut h, "general.alignment");
            h.extend_from_slice(&type_id::U32.to_le_bytes());
            // An alignment beyond u32 cannot be stored in the key GGUF defines; write the low bits
            // as gguf-py would refuse to, leaving it to the reader to reject.
            h.extend_from_slice(&(self.alignment as u32).to_le_bytes());
        }
        for (k, v) in &self.kvs {
            put_str(&mut h, k);
            h.extend_from_slice(&v.type_id().to_le_bytes());
            put_value(&mut h, v);
        }
        if !strided.is_empty() {
            let kvs = [
                (STRIDED_NAMES_KEY, Value::Array(ArrayValue::String(strided))),
                (STRIDED_STRIDES_KEY, Value::Array(ArrayValue::U64(strides))),
            ];
            for (k, v) in &kvs {
                put_str(&mut h, k);
                h.extend_from_slice(&v.type_id().to_le_bytes());
                put_value(&mut h, v);
            }
        }
        for (t, offset) in self.tensors.iter().zip(self.offsets()) {
            match t.place {
                Place::Own => put_str(&mut h, &t.name),
                _ => put_str(&mut h, &format!("{}{STRIDED_SUFFIX}", t.name)),
            }
            h.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                h.extend_from_slice(&d.to_le_bytes());
            }
            h.extend_from_slice(&t.ty.id().to_le_bytes());
            h.extend_from_slice(&offset.to_le_bytes());
        }
        h
    }

    /// Writes the whole file and returns the number of bytes written.
    pub fn write_to<W: Write>(&self, w: W) -> io::Result<u64> {
        self.write_with(w, |name, _| {
            Err(io::Error::other(format!(
                "tensor '{name}' was declared deferred; write it with write_with"
            )))
        })
    }

    /// Like [`GgufBuilder::write_to`], calling `produce(name, out)` for each deferred tensor to
    /// write exactly its declared number of bytes (checked); for a strided group, once under
    /// its first tensor's name for all its records.
    pub fn write_with<W: Write>(
        &self,
        mut w: W,
        mut produce: impl FnMut(&str, &mut dyn Write) -> io::Result<()>,
    ) -> io::Result<u64> {
        let header = self.header();
        w.write_all(&header)?;
        let mut pos = header.len() as u64;
        pos += pad(&mut w, pos, self.pad_unit())?;
        let data_start = pos;
        for (t, offset) in self.tensors.iter().zip(self.offsets()) {
            if matches!(t.place, Place::Member { .. }) {
                continue;
            }
            // A strided group's records start at their own alignment.
            let to = data_start + offset;
            zeros(&mut w, to.saturating_sub(pos))?;
            pos = pos.max(to);
            match &t.data {
                Data::Bytes(b) => w.write_all(b)?,
                Data::Deferred(len) => {
                    let mut counted = Counting {
                        inner: &mut w,
                        n: 0,
                    };
                    produce(&t.name, &mut counted)?;
                    if counted.n != *len {
                        return Err(io::Error::other(format!(
                            "tensor '{}': produced {} bytes, declared {len}",
                            t.name, counted.n
                        )));
                    }
                }
                Data::InGroup => {}
            }
            pos += t.data.len();
            pos += pad(&mut w, pos, self.pad_unit())?;
        }
        w.flush()?;
        Ok(pos)
    }

    /// The whole file as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        // Writing into a Vec cannot fail.
        let _ = self.write_to(&mut v);
        v
    }
}

/// Counts the bytes written through it.
struct Counting<'a, W: Write> {
    inner: &'a mut W,
    n: u64,
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k as u64;
        Ok(k)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes zeros up to the next multiple of `align`; returns how many.
fn pad<W: Write>(w: &mut W, pos: u64, align: u64) -> io::Result<u64> {
    let n = pos.next_multiple_of(align) - pos;
    zeros(w, n)?;
    Ok(n)
}

/// Writes `n` zero bytes.
pub(crate) fn zeros<W: Write + ?Sized>(w: &mut W, n: u64) -> io::Result<()> {
    let zeros = [0u8; 4096];
    let mut left = n;
    while left > 0 {
        let k = left.min(zeros.len() as u64) as usize;
        w.write_all(&zeros[..k])?;
        left -= k as u64;
    }
    Ok(())
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_str(out, s),
        Value::Array(a) => put_array(out, a),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

/// Element type, count, elements.
fn put_array(out: &mut Vec<u8>, a: &ArrayValue) {
    out.extend_from_slice(&a.elem_type_id().to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    macro_rules! le {
        ($v:expr) => {
            for x in $v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match a {
        ArrayValue::U8(v) => out.extend_from_slice(v),
        ArrayValue::I8(v) => le!(v),
        ArrayValue::U16(v) => le!(v),
        ArrayValue::I16(v) => le!(v),
        ArrayValue::U32(v) => le!(v),
        ArrayValue::I32(v) => le!(v),
        ArrayValue::F32(v) => le!(v),
        ArrayValue::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        ArrayValue::String(v) => v.iter().for_each(|s| put_str(out, s)),
        ArrayValue::U64(v) => le!(v),
        ArrayValue::I64(v) => le!(v),
        ArrayValue::F64(v) => le!(v),
        ArrayValue::Array(v) => v.iter().for_each(|inner| put_array(out, inner)),
    }
}
