//! A GGUF writer.
//!
//! It writes exactly what it is told: duplicate keys, a `general.alignment` of 3 or tensor data
//! of the wrong length are all written as given, because hostile-file tests build broken files
//! with it. Validation is the reader's job; a file built from sane input reads back equal.

use std::io::{self, Write};

use super::read::DEFAULT_ALIGNMENT;
use super::value::type_id;
use super::{ArrayValue, Value};
use crate::quant::GgmlType;

/// One tensor to be written.
#[derive(Clone, Debug)]
struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    data: Data,
}

/// A tensor's bytes: given up front, or produced while the file is written (files larger than
/// memory).
#[derive(Clone, Debug)]
enum Data {
    Bytes(Vec<u8>),
    Deferred(u64),
}

impl Data {
    fn len(&self) -> u64 {
        match self {
            Data::Bytes(b) => b.len() as u64,
            Data::Deferred(n) => *n,
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
        });
        Some(self)
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
        let extra = u64::from(self.writes_alignment_key());
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
        let mut offset = 0u64;
        for t in &self.tensors {
            put_str(&mut h, &t.name);
            h.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                h.extend_from_slice(&d.to_le_bytes());
            }
            h.extend_from_slice(&t.ty.id().to_le_bytes());
            h.extend_from_slice(&offset.to_le_bytes());
            offset = (offset + t.data.len()).next_multiple_of(self.pad_unit());
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
    /// write exactly its declared number of bytes (checked).
    pub fn write_with<W: Write>(
        &self,
        mut w: W,
        mut produce: impl FnMut(&str, &mut dyn Write) -> io::Result<()>,
    ) -> io::Result<u64> {
        let header = self.header();
        w.write_all(&header)?;
        let mut pos = header.len() as u64;
        pos += pad(&mut w, pos, self.pad_unit())?;
        for t in &self.tensors {
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

/// Writes zeros up to the next multiple of `align`; returns how many.
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

fn pad<W: Write>(w: &mut W, pos: u64, align: u64) -> io::Result<u64> {
    let n = pos.next_multiple_of(align) - pos;
    let zeros = [0u8; 256];
    let mut left = n;
    while left > 0 {
        let k = left.min(zeros.len() as u64) as usize;
        w.write_all(&zeros[..k])?;
        left -= k as u64;
    }
    Ok(n)
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
