//! The GGUF parser: header, metadata and tensor table, validated as hostile input.
//!
//! The rule throughout is that nothing is allocated on the word of a length or count field
//! until the bytes left in the file could actually hold what it claims, and even then large
//! buffers grow as bytes arrive rather than being reserved up front: `file_size` comes from the
//! caller and a reader may end early, so a claimed length alone never sizes an allocation.

use std::collections::HashMap;
use std::io::{ErrorKind, Read};

use super::value::type_id;
use super::{
    ArrayValue, GgufError, GgufFile, Metadata, STRIDED_NAMES_KEY, STRIDED_STRIDES_KEY,
    STRIDED_SUFFIX, TensorInfo, Value,
};
use crate::quant::GgmlType;

/// Alignment when `general.alignment` is absent (GGUF's default).
pub(crate) const DEFAULT_ALIGNMENT: u64 = 32;

/// Largest `general.alignment` accepted. Real files use 32 or 64; the cap exists because code
/// downstream sizes aligned buffers by the file's alignment.
pub(crate) const MAX_ALIGNMENT: u64 = 1 << 24;

/// ggml's `GGML_MAX_DIMS`.
pub(crate) const MAX_DIMS: u32 = 4;

/// Deepest nesting of arrays of arrays accepted. Real files use none; the bound keeps the
/// recursion (and the stack) small on hostile input.
pub(crate) const MAX_ARRAY_DEPTH: usize = 8;

/// Smallest encoded metadata entry: empty key (u64 length) + value type (u32) + a u8 value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;

/// Smallest encoded tensor entry: empty name + n_dims + one dim + type + offset.
const MIN_TENSOR_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

/// Smallest encoded inner array: element type (u32) + count (u64).
const MIN_INNER_ARRAY_BYTES: u64 = 4 + 8;

/// Largest number of elements or entries reserved before they are read; beyond this,
/// collections grow as data actually arrives.
const MAX_PREALLOC: usize = 1 << 16;

/// Strings longer than this are read incrementally instead of into one up-front buffer.
const MAX_STRING_PREALLOC: u64 = 1 << 20;

/// Bytes per chunk when reading fixed-size array elements.
const CHUNK_BYTES: usize = 64 * 1024;

/// A low-level read failure, before the caller has said which field it was reading.
enum Fault {
    Truncated {
        offset: u64,
        needed: u64,
        available: u64,
    },
    TooLong {
        offset: u64,
        len: u64,
        remaining: u64,
    },
    Utf8 {
        offset: u64,
        source: std::str::Utf8Error,
    },
    Io {
        offset: u64,
        source: std::io::Error,
    },
}

impl Fault {
    /// Names the field; `field` is only called on the error path, so the happy path formats
    /// nothing.
    fn named(self, field: impl FnOnce() -> String) -> GgufError {
        match self {
            Self::Truncated {
                offset,
                needed,
                available,
            } => GgufError::Truncated {
                field: field(),
                offset,
                needed,
                available,
            },
            Self::TooLong {
                offset,
                len,
                remaining,
            } => GgufError::LengthTooLarge {
                field: field(),
                offset,
                len,
                remaining,
            },
            Self::Utf8 { offset, source } => GgufError::InvalidUtf8 {
                field: field(),
                offset,
                source,
            },
            Self::Io { offset, source } => GgufError::Io {
                field: field(),
                offset,
                source,
            },
        }
    }
}

/// A reader that knows its position and how many bytes the file has left, and never reads past
/// the declared size.
struct Src<R> {
    r: R,
    pos: u64,
    size: u64,
}

impl<R: Read> Src<R> {
    /// Bytes between the position and the declared end of file. `pos <= size` always holds
    /// because every read is checked against `remaining` first.
    fn remaining(&self) -> u64 {
        self.size - self.pos
    }

    /// Fills `buf` completely or reports how much was missing. A reader that ends before the
    /// declared size is reported as truncation at the point it ended.
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), Fault> {
        let offset = self.pos;
        let needed = buf.len() as u64;
        if needed > self.remaining() {
            return Err(Fault::Truncated {
                offset,
                needed,
                available: self.remaining(),
            });
        }
        let mut done = 0;
        while done < buf.len() {
            match self.r.read(&mut buf[done..]) {
                Ok(0) => {
                    return Err(Fault::Truncated {
                        offset,
                        needed,
                        available: done as u64,
                    });
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(Fault::Io {
                        offset: offset + done as u64,
                        source,
                    });
                }
            }
        }
        self.pos += needed;
        Ok(())
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Fault> {
        let mut b = [0u8; N];
        self.fill(&mut b)?;
        Ok(b)
    }

    fn u8(&mut self) -> Result<u8, Fault> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, Fault> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, Fault> {
        self.array().map(u64::from_le_bytes)
    }

    /// Reads a u64 length or count and checks that `len * unit` bytes are left.
    fn len_prefix(&mut self, unit: u64) -> Result<(u64, u64), Fault> {
        let offset = self.pos;
        let len = self.u64()?;
        if len.checked_mul(unit).is_none_or(|b| b > self.remaining()) {
            return Err(Fault::TooLong {
                offset,
                len,
                remaining: self.remaining(),
            });
        }
        Ok((offset, len))
    }

    /// A GGUF string: u64 length, then that many UTF-8 bytes.
    fn string(&mut self) -> Result<String, Fault> {
        let (offset, len) = self.len_prefix(1)?;
        let bytes = if len <= MAX_STRING_PREALLOC {
            // `len` is at most 1 MiB here, so the cast cannot truncate.
            let mut b = vec![0u8; len as usize];
            self.fill(&mut b)?;
            b
        } else {
            let mut b = Vec::new();
            let mut chunk = vec![0u8; CHUNK_BYTES];
            let mut left = len;
            while left > 0 {
                let n = left.min(CHUNK_BYTES as u64) as usize;
                self.fill(&mut chunk[..n])?;
                b.extend_from_slice(&chunk[..n]);
                left -= n as u64;
            }
            b
        };
        String::from_utf8(bytes).map_err(|e| Fault::Utf8 {
            offset,
            source: e.utf8_error(),
        })
    }
}

/// Parses the header and tensor table from `r`, which holds a file of `file_size` bytes.
pub(crate) fn parse<R: Read>(r: R, file_size: u64) -> Result<GgufFile, GgufError> {
    let mut src = Src {
        r,
        pos: 0,
        size: file_size,
    };

    let magic: [u8; 4] = src.array().map_err(|f| f.named(|| "magic".into()))?;
    if &magic != b"GGUF" {
        return Err(GgufError::BadMagic { found: magic });
    }
    let version = src.u32().map_err(|f| f.named(|| "version".into()))?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::UnsupportedVersion { version });
    }
    let tensor_count = src.u64().map_err(|f| f.named(|| "tensor count".into()))?;
    let kv_offset = src.pos;
    let kv_count = src
        .u64()
        .map_err(|f| f.named(|| "metadata key count".into()))?;

    // Both tables have to fit in what is left; check each alone and then together so a huge
    // count is named precisely.
    let remaining = src.remaining();
    let too_many = |field: &str, offset, count, min| GgufError::CountTooLarge {
        field: field.to_owned(),
        offset,
        count,
        remaining,
        min_entry_bytes: min,
    };
    let kv_min = kv_count
        .checked_mul(MIN_KV_BYTES)
        .filter(|&b| b <= remaining);
    let Some(kv_min) = kv_min else {
        return Err(too_many(
            "metadata key count",
            kv_offset,
            kv_count,
            MIN_KV_BYTES,
        ));
    };
    let tensor_min = tensor_count.checked_mul(MIN_TENSOR_BYTES);
    if tensor_min
        .and_then(|t| t.checked_add(kv_min))
        .is_none_or(|b| b > remaining)
    {
        return Err(too_many("tensor count", 8, tensor_count, MIN_TENSOR_BYTES));
    }

    let (metadata, alignment) = parse_metadata(&mut src, kv_count)?;
    let strides = strided_table(&metadata, alignment)?;
    let (tensors, index, entry_offsets) =
        parse_tensor_table(&mut src, tensor_count, alignment, &strides)?;

    let Some(data_offset) = src.pos.checked_next_multiple_of(alignment) else {
        return Err(GgufError::BadAlignment {
            offset: 0,
            reason: format!("alignment {alignment} puts the data section past any possible file"),
        });
    };
    check_tensor_bounds(&tensors, &entry_offsets, data_offset, file_size)?;

    Ok(GgufFile {
        version,
        alignment,
        metadata,
        tensors,
        data_offset,
        file_size,
        index,
    })
}

/// Reads `kv_count` entries and returns them with the validated alignment.
fn parse_metadata<R: Read>(src: &mut Src<R>, kv_count: u64) -> Result<(Metadata, u64), GgufError> {
    let mut metadata = Metadata::new();
    // The count was checked against the bytes left, but still cap the reservation (see module doc).
    metadata.reserve(kv_count.min(MAX_PREALLOC as u64) as usize);
    let mut alignment_at = None;
    for i in 0..kv_count {
        let entry_offset = src.pos;
        let key = src
            .string()
            .map_err(|f| f.named(|| format!("key of metadata entry {i}")))?;
        let ty_offset = src.pos;
        let ty = src
            .u32()
            .map_err(|f| f.named(|| format!("value type of metadata '{key}'")))?;
        let value = read_value(src, &key, ty, ty_offset)?;
        if key == "general.alignment" {
            alignment_at = Some(ty_offset);
        }
        if let Err(_value) = metadata.insert(key.clone(), value) {
            return Err(GgufError::DuplicateKey {
                key,
                offset: entry_offset,
            });
        }
    }
    let alignment = match (metadata.get("general.alignment"), alignment_at) {
        (Some(v), Some(offset)) => {
            let a = match *v {
                Value::U32(a) => u64::from(a),
                Value::U64(a) => a,
                ref other => {
                    return Err(GgufError::BadAlignment {
                        offset,
                        reason: format!("stored as {}, expected u32", other.type_name()),
                    });
                }
            };
            if !a.is_power_of_two() {
                return Err(GgufError::BadAlignment {
                    offset,
                    reason: format!("{a} is not a non-zero power of two"),
                });
            }
            if a > MAX_ALIGNMENT {
                return Err(GgufError::BadAlignment {
                    offset,
                    reason: format!("{a} is larger than the {MAX_ALIGNMENT} strata accepts"),
                });
            }
            a
        }
        _ => DEFAULT_ALIGNMENT,
    };
    Ok((metadata, alignment))
}

/// Reads one value of type `ty` (whose id was at byte `ty_offset`) for metadata `key`.
fn read_value<R: Read>(
    src: &mut Src<R>,
    key: &str,
    ty: u32,
    ty_offset: u64,
) -> Result<Value, GgufError> {
    let named = |f: Fault| f.named(|| format!("metadata '{key}'"));
    let offset = src.pos;
    Ok(match ty {
        type_id::U8 => Value::U8(src.u8().map_err(named)?),
        type_id::I8 => Value::I8(src.u8().map_err(named)? as i8),
        type_id::U16 => Value::U16(u16::from_le_bytes(src.array().map_err(named)?)),
        type_id::I16 => Value::I16(i16::from_le_bytes(src.array().map_err(named)?)),
        type_id::U32 => Value::U32(src.u32().map_err(named)?),
        type_id::I32 => Value::I32(i32::from_le_bytes(src.array().map_err(named)?)),
        type_id::F32 => Value::F32(f32::from_le_bytes(src.array().map_err(named)?)),
        type_id::BOOL => Value::Bool(to_bool(src.u8().map_err(named)?, key, offset)?),
        type_id::STRING => Value::String(src.string().map_err(named)?),
        type_id::ARRAY => Value::Array(read_array(src, key, 1)?),
        type_id::U64 => Value::U64(src.u64().map_err(named)?),
        type_id::I64 => Value::I64(i64::from_le_bytes(src.array().map_err(named)?)),
        type_id::F64 => Value::F64(f64::from_le_bytes(src.array().map_err(named)?)),
        type_id => {
            return Err(GgufError::BadValueType {
                key: key.to_owned(),
                offset: ty_offset,
                type_id,
            });
        }
    })
}

fn to_bool(byte: u8, key: &str, offset: u64) -> Result<bool, GgufError> {
    match byte {
        0 => Ok(false),
        1 => Ok(true),
        byte => Err(GgufError::BadBool {
            key: key.to_owned(),
            offset,
            byte,
        }),
    }
}

/// Encoded bytes per element of a fixed-size type; strings count their u64 length prefix and
/// inner arrays their header, the least each can take.
fn min_elem_bytes(ty: u32) -> Option<u64> {
    Some(match ty {
        type_id::U8 | type_id::I8 | type_id::BOOL => 1,
        type_id::U16 | type_id::I16 => 2,
        type_id::U32 | type_id::I32 | type_id::F32 => 4,
        type_id::U64 | type_id::I64 | type_id::F64 => 8,
        type_id::STRING => 8,
        type_id::ARRAY => MIN_INNER_ARRAY_BYTES,
        _ => return None,
    })
}

/// Reads fixed-size elements in chunks, converting each `N`-byte group with `conv`, so memory
/// grows only as bytes arrive.
fn read_fixed<R: Read, T, const N: usize>(
    src: &mut Src<R>,
    count: u64,
    key: &str,
    mut conv: impl FnMut([u8; N], u64) -> Result<T, GgufError>,
) -> Result<Vec<T>, GgufError> {
    let mut out = Vec::with_capacity(count.min((CHUNK_BYTES / N) as u64) as usize);
    // `count * N` fits: the caller checked it against the bytes left.
    let mut buf = vec![0u8; count.saturating_mul(N as u64).min(CHUNK_BYTES as u64) as usize];
    let mut left = count;
    while left > 0 {
        let n = left.min((CHUNK_BYTES / N) as u64) as usize;
        let start = src.pos;
        src.fill(&mut buf[..n * N])
            .map_err(|f| f.named(|| format!("metadata '{key}'")))?;
        for (i, c) in buf[..n * N].chunks_exact(N).enumerate() {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            out.push(conv(a, start + (i * N) as u64)?);
        }
        left -= n as u64;
    }
    Ok(out)
}

/// Reads an array's element type, count and elements. `depth` is 1 for a top-level array.
fn read_array<R: Read>(src: &mut Src<R>, key: &str, depth: usize) -> Result<ArrayValue, GgufError> {
    let named = |f: Fault| f.named(|| format!("metadata '{key}'"));
    if depth > MAX_ARRAY_DEPTH {
        return Err(GgufError::ArrayTooDeep {
            key: key.to_owned(),
            offset: src.pos,
            max_depth: MAX_ARRAY_DEPTH,
        });
    }
    let ty_offset = src.pos;
    let ty = src.u32().map_err(named)?;
    let Some(unit) = min_elem_bytes(ty) else {
        return Err(GgufError::BadValueType {
            key: key.to_owned(),
            offset: ty_offset,
            type_id: ty,
        });
    };
    let (_, count) = src.len_prefix(unit).map_err(named)?;
    Ok(match ty {
        type_id::U8 => ArrayValue::U8(read_fixed(src, count, key, |[b], _| Ok(b))?),
        type_id::I8 => ArrayValue::I8(read_fixed(src, count, key, |[b], _| Ok(b as i8))?),
        type_id::U16 => ArrayValue::U16(read_fixed(src, count, key, |b, _| {
            Ok(u16::from_le_bytes(b))
        })?),
        type_id::I16 => ArrayValue::I16(read_fixed(src, count, key, |b, _| {
            Ok(i16::from_le_bytes(b))
        })?),
        type_id::U32 => ArrayValue::U32(read_fixed(src, count, key, |b, _| {
            Ok(u32::from_le_bytes(b))
        })?),
        type_id::I32 => ArrayValue::I32(read_fixed(src, count, key, |b, _| {
            Ok(i32::from_le_bytes(b))
        })?),
        type_id::F32 => ArrayValue::F32(read_fixed(src, count, key, |b, _| {
            Ok(f32::from_le_bytes(b))
        })?),
        type_id::U64 => ArrayValue::U64(read_fixed(src, count, key, |b, _| {
            Ok(u64::from_le_bytes(b))
        })?),
        type_id::I64 => ArrayValue::I64(read_fixed(src, count, key, |b, _| {
            Ok(i64::from_le_bytes(b))
        })?),
        type_id::F64 => ArrayValue::F64(read_fixed(src, count, key, |b, _| {
            Ok(f64::from_le_bytes(b))
        })?),
        type_id::BOOL => {
            ArrayValue::Bool(read_fixed(src, count, key, |[b], at| to_bool(b, key, at))?)
        }
        type_id::STRING => {
            let mut v = Vec::with_capacity(count.min(MAX_PREALLOC as u64) as usize);
            for i in 0..count {
                let s = src
                    .string()
                    .map_err(|f| f.named(|| format!("metadata '{key}'[{i}]")))?;
                v.push(s);
            }
            ArrayValue::String(v)
        }
        _ => {
            // Only ARRAY is left: `min_elem_bytes` rejected every unknown id above.
            let mut v = Vec::with_capacity(count.min(MAX_PREALLOC as u64) as usize);
            for _ in 0..count {
                v.push(read_array(src, key, depth + 1)?);
            }
            ArrayValue::Array(v)
        }
    })
}

/// The strided tensors the metadata declares (strata's layout, `TensorInfo::stride`): name →
/// bytes from one slice to the next. Empty when the file has none.
fn strided_table(metadata: &Metadata, alignment: u64) -> Result<HashMap<String, u64>, GgufError> {
    let names = metadata.get_str_array(STRIDED_NAMES_KEY)?;
    let strides: Option<Vec<u64>> = match metadata.get_array(STRIDED_STRIDES_KEY)? {
        None => None,
        Some(ArrayValue::U64(v)) => Some(v.clone()),
        Some(ArrayValue::U32(v)) => Some(v.iter().map(|&s| u64::from(s)).collect()),
        Some(other) => {
            return Err(GgufError::WrongType {
                key: STRIDED_STRIDES_KEY.into(),
                expected: "an array of u64",
                found: format!("an array of {}", other.type_name()),
            });
        }
    };
    let (names, strides) = match (names, strides) {
        (None, None) => return Ok(HashMap::new()),
        (Some(n), Some(s)) if n.len() == s.len() => (n, s),
        (Some(n), Some(s)) => {
            return Err(GgufError::WrongType {
                key: STRIDED_STRIDES_KEY.into(),
                expected: "one stride per name",
                found: format!("{} strides for {} names", s.len(), n.len()),
            });
        }
        (None, Some(_)) => {
            return Err(GgufError::MissingKey {
                key: STRIDED_NAMES_KEY.into(),
            });
        }
        (Some(_), None) => {
            return Err(GgufError::MissingKey {
                key: STRIDED_STRIDES_KEY.into(),
            });
        }
    };
    let mut table = HashMap::with_capacity(names.len());
    for (name, &stride) in names.iter().zip(&strides) {
        let bad = |reason: String| GgufError::Strided {
            tensor: name.clone(),
            reason,
        };
        if stride == 0 || stride % alignment != 0 {
            return Err(bad(format!(
                "stride {stride} is not a positive multiple of the alignment {alignment}"
            )));
        }
        if table.insert(name.clone(), stride).is_some() {
            return Err(bad(format!("listed twice in {STRIDED_NAMES_KEY}")));
        }
    }
    Ok(table)
}

/// The tensor table, its name index, and the byte offset of each entry's `offset` field (where
/// bounds and overlap errors point).
type TensorTable = (Vec<TensorInfo>, HashMap<String, usize>, Vec<u64>);

fn parse_tensor_table<R: Read>(
    src: &mut Src<R>,
    tensor_count: u64,
    alignment: u64,
    strides: &HashMap<String, u64>,
) -> Result<TensorTable, GgufError> {
    let cap = tensor_count.min(MAX_PREALLOC as u64) as usize;
    let mut tensors = Vec::with_capacity(cap);
    let mut index = HashMap::with_capacity(cap);
    let mut offsets = Vec::with_capacity(cap);
    for i in 0..tensor_count {
        let entry_offset = src.pos;
        let name = src
            .string()
            .map_err(|f| f.named(|| format!("name of tensor {i}")))?;
        let named = |f: Fault| f.named(|| format!("tensor '{name}'"));

        let n_dims_at = src.pos;
        let n_dims = src.u32().map_err(named)?;
        if !(1..=MAX_DIMS).contains(&n_dims) {
            return Err(GgufError::BadDimCount {
                tensor: name,
                offset: n_dims_at,
                n_dims,
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        let mut n_elements: Option<u64> = Some(1);
        for index in 0..n_dims as usize {
            let at = src.pos;
            let d = src.u64().map_err(named)?;
            if d == 0 {
                return Err(GgufError::ZeroDim {
                    tensor: name,
                    offset: at,
                    index,
                });
            }
            n_elements = n_elements.and_then(|n| n.checked_mul(d));
            dims.push(d);
        }
        let Some(n_elements) = n_elements else {
            return Err(GgufError::ElementCountOverflow {
                tensor: name,
                offset: n_dims_at,
                dims,
            });
        };

        let ty_at = src.pos;
        let type_id = src.u32().map_err(named)?;
        let Some(ty) = GgmlType::from_id(type_id) else {
            return Err(GgufError::UnknownType {
                tensor: name,
                offset: ty_at,
                type_id,
            });
        };
        let block_size = ty.block_size() as u64;
        if dims[0] % block_size != 0 {
            let row = dims[0];
            return Err(GgufError::RowNotBlockMultiple {
                tensor: name,
                offset: ty_at,
                ty,
                row,
                block_size,
            });
        }
        // A whole number of rows of whole blocks, so only overflow can make this fail.
        let Some(n_bytes) = ty.bytes_for(n_elements) else {
            return Err(GgufError::ElementCountOverflow {
                tensor: name,
                offset: n_dims_at,
                dims,
            });
        };

        let offset_at = src.pos;
        let offset = src.u64().map_err(named)?;
        if offset % alignment != 0 {
            return Err(GgufError::MisalignedTensor {
                tensor: name,
                offset: offset_at,
                data_offset: offset,
                alignment,
            });
        }
        let (name, stride) = match name.strip_suffix(STRIDED_SUFFIX) {
            None => (name, None),
            Some(own) => {
                let bad = |reason: String| GgufError::Strided {
                    tensor: own.to_owned(),
                    reason,
                };
                let Some(&stride) = strides.get(own) else {
                    return Err(bad(format!("not listed in {STRIDED_NAMES_KEY}")));
                };
                let slice = match dims.as_slice() {
                    [.., n] if dims.len() >= 2 => n_bytes / n,
                    _ => return Err(bad("a 1-D tensor has no slices to stride".into())),
                };
                if slice > stride {
                    return Err(bad(format!(
                        "its slices are {slice} bytes, more than the stride {stride}"
                    )));
                }
                (own.to_owned(), Some(stride))
            }
        };
        if index.contains_key(&name) {
            return Err(GgufError::DuplicateTensor {
                tensor: name,
                offset: entry_offset,
            });
        }
        index.insert(name.clone(), tensors.len());
        offsets.push(offset_at);
        tensors.push(TensorInfo {
            name,
            dims,
            ty,
            offset,
            n_elements,
            n_bytes,
            stride,
        });
    }
    if let Some(missing) = strides.keys().find(|n| {
        index
            .get(n.as_str())
            .and_then(|&i| tensors.get(i))
            .is_none_or(|t| t.stride.is_none())
    }) {
        return Err(GgufError::Strided {
            tensor: missing.clone(),
            reason: format!(
                "listed in {STRIDED_NAMES_KEY}, but the file has no tensor '{missing}{STRIDED_SUFFIX}'"
            ),
        });
    }
    Ok((tensors, index, offsets))
}

/// Every tensor inside the file, and no two sharing a byte. Strided tensors are checked as
/// groups: those with the same stride and slice count whose first slices lie within one stride
/// of the group's first share its records, where their slices must not overlap; the group's
/// whole span is then one range among the others.
fn check_tensor_bounds(
    tensors: &[TensorInfo],
    entry_offsets: &[u64],
    data_offset: u64,
    file_size: u64,
) -> Result<(), GgufError> {
    let mut ranges = Vec::with_capacity(tensors.len());
    // Each strided tensor's first and last byte, checked with its group below.
    let mut spans = vec![(0u64, 0u64); tensors.len()];
    for (i, t) in tensors.iter().enumerate() {
        let start = data_offset.checked_add(t.offset);
        let span = match t.stride {
            None => Some(t.n_bytes),
            Some(s) => {
                let (n, slice) = t.slices();
                (n - 1).checked_mul(s).and_then(|b| b.checked_add(slice))
            }
        };
        let end = start.zip(span).and_then(|(s, n)| s.checked_add(n));
        match (start, end) {
            (Some(start), Some(end)) if end <= file_size => {
                if t.stride.is_some() {
                    spans[i] = (start, end);
                } else {
                    ranges.push((start, end, i));
                }
            }
            _ => {
                return Err(GgufError::TensorOutOfBounds {
                    tensor: t.name.clone(),
                    offset: entry_offsets[i],
                    start: start.unwrap_or(u64::MAX),
                    end: end.unwrap_or(u64::MAX),
                    file_size,
                });
            }
        }
    }
    for group in super::strided_groups(tensors) {
        let first = group[0];
        let (base, _) = spans[first];
        // The stride comes from the file: a huge one must not overflow.
        let record_end = base.saturating_add(tensors[first].stride.unwrap_or(0));
        let mut end = base;
        let mut prev: Option<(u64, u64, usize)> = None;
        for &i in &group {
            let (start, span_end) = spans[i];
            let slice_end = start + tensors[i].slices().1;
            let clash = match prev {
                Some(p) if start < p.1 => Some(p),
                _ if slice_end > record_end => Some((
                    record_end,
                    record_end.saturating_add(tensors[first].slices().1),
                    first,
                )),
                _ => None,
            };
            if let Some((other_start, other_end, o)) = clash {
                return Err(GgufError::TensorOverlap {
                    tensor: tensors[i].name.clone(),
                    offset: entry_offsets[i],
                    start,
                    end: slice_end,
                    other: tensors[o].name.clone(),
                    other_start,
                    other_end,
                });
            }
            end = end.max(span_end);
            prev = Some((start, slice_end, i));
        }
        ranges.push((base, end, first));
    }
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        let ((a_start, a_end, a), (b_start, b_end, b)) = (w[0], w[1]);
        if b_start < a_end {
            // Name the later tensor in file order: the earlier one was written first.
            let ((start, end, i), (other_start, other_end, j)) = if b > a {
                ((b_start, b_end, b), (a_start, a_end, a))
            } else {
                ((a_start, a_end, a), (b_start, b_end, b))
            };
            return Err(GgufError::TensorOverlap {
                tensor: tensors[i].name.clone(),
                offset: entry_offsets[i],
                start,
                end,
                other: tensors[j].name.clone(),
                other_start,
                other_end,
            });
        }
    }
    Ok(())
}
