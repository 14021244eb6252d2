//! GGUF: the model file format of llama.cpp, read as hostile input and written for tests and
//! tools.
//!
//! [`GgufFile`] is the header, the metadata ([`Metadata`] of [`Value`]s) and the tensor table
//! ([`TensorInfo`]); it never holds tensor data, which is reached through `residency` by the
//! absolute byte range [`GgufFile::tensor_range`] gives. Everything a file claims is checked
//! before anything is sized by it (see `read.rs`); every rejection is a [`GgufError`] naming
//! the field and the byte offset. [`GgufBuilder`] writes files.
//!
//! Layout (v2/v3, little-endian): `GGUF`, u32 version, u64 tensor count, u64 key count; the
//! keys (string, u32 type, value); the tensor entries (string name, u32 n_dims, n_dims × u64,
//! u32 ggml type, u64 offset); zero padding to the alignment; the data section.

mod error;
mod read;
mod value;
mod write;

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::ops::Range;
use std::path::Path;

pub use error::GgufError;
pub use value::{ArrayValue, Metadata, Value};
pub use write::{GgufBuilder, record_layout};

use crate::quant::GgmlType;

/// ggml's limit on tensor dimensions.
pub const MAX_DIMS: usize = read::MAX_DIMS as usize;

/// The largest `general.alignment` the reader accepts.
pub const MAX_ALIGNMENT: u64 = read::MAX_ALIGNMENT;

/// The deepest nesting of metadata arrays the reader accepts.
pub const MAX_ARRAY_DEPTH: usize = read::MAX_ARRAY_DEPTH;

/// A parsed GGUF header: metadata and the tensor table, without tensor data.
#[derive(Clone, Debug)]
pub struct GgufFile {
    /// 2 or 3.
    pub version: u32,
    /// `general.alignment`, or 32 when absent.
    pub alignment: u64,
    pub metadata: Metadata,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
    /// Absolute file offset of the (aligned) tensor data section.
    pub data_offset: u64,
    pub file_size: u64,
    /// Tensor name → position in `tensors`.
    index: HashMap<String, usize>,
}

/// The metadata keys of strata's strided layout (`strata optimize`): the names of the strided
/// tensors and, in the same order, the bytes from one slice of each to the next.
pub const STRIDED_NAMES_KEY: &str = "strata.strided.names";
pub const STRIDED_STRIDES_KEY: &str = "strata.strided.strides";

/// What a strided tensor's name carries in the file's tensor table, after its own name: other
/// GGUF readers, which would take its bytes as back to back, find no tensor of the name they
/// look for and stop (llama.cpp: "missing tensor"), instead of reading wrong weights.
pub const STRIDED_SUFFIX: &str = ".strided";

/// One entry of the tensor table, validated: known type, whole blocks per row, data inside the
/// file and overlapping no other tensor.
///
/// A *strided* tensor (`stride: Some(s)`, strata's own layout, written by `strata optimize`)
/// keeps its slices along the outermost dimension `s` bytes apart instead of back to back, so
/// that other tensors' slices can sit between them: a MoE layer's gate, up and down experts
/// interleaved expert by expert, each expert one contiguous read. Its name in the file ends in
/// [`STRIDED_SUFFIX`] (taken off here) and the metadata lists it under [`STRIDED_NAMES_KEY`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous row length. 1 to 4 entries, each at least 1.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Relative to [`GgufFile::data_offset`]; a multiple of the alignment.
    pub offset: u64,
    pub n_elements: u64,
    /// The tensor's own bytes (in a strided tensor, its slices' bytes together).
    pub n_bytes: u64,
    /// Bytes from one slice along the outermost dimension to the next, when they are not back
    /// to back (see above); `None` for every ordinary tensor.
    pub stride: Option<u64>,
}

impl TensorInfo {
    /// Number of rows: the product of all dimensions after the first.
    pub fn n_rows(&self) -> u64 {
        self.dims.iter().skip(1).product()
    }

    /// Slices along the outermost dimension (experts of a stacked tensor), and the bytes of one.
    pub fn slices(&self) -> (u64, u64) {
        let n = self.dims.last().copied().unwrap_or(1).max(1);
        (n, self.n_bytes / n)
    }

    /// The bytes of the file from the tensor's first byte to its last: `n_bytes`, or for a
    /// strided tensor the slices and what lies between them (saturating for hand-made infos).
    pub fn span(&self) -> u64 {
        match self.stride {
            None => self.n_bytes,
            Some(s) => {
                let (n, slice) = self.slices();
                (n - 1).saturating_mul(s).saturating_add(slice)
            }
        }
    }
}

/// The strided tensors of `tensors` in the groups that share records: the same stride and
/// slice count, and first slices less than one stride after the group's first. Each group is
/// a list of indices into `tensors` in offset order, its base first. The parser checks each
/// group's slices against each other; residency reads a group's records whole.
pub(crate) fn strided_groups(tensors: &[TensorInfo]) -> Vec<Vec<usize>> {
    let mut strided: Vec<(u64, u64, u64, usize)> = tensors
        .iter()
        .enumerate()
        .filter_map(|(i, t)| Some((t.stride?, t.slices().0, t.offset, i)))
        .collect();
    strided.sort_unstable();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut base: Option<(u64, u64, u64)> = None;
    for (stride, n, off, i) in strided {
        match (base, groups.last_mut()) {
            (Some((s, m, b)), Some(g)) if s == stride && m == n && off < b.saturating_add(s) => {
                g.push(i);
            }
            _ => {
                base = Some((stride, n, off));
                groups.push(vec![i]);
            }
        }
    }
    groups
}

impl GgufFile {
    /// Reads the header and tensor table of the file at `path` through a buffered reader; the
    /// tensor data is never read.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let open_err = |source| GgufError::Open {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(open_err)?;
        let file_size = file.metadata().map_err(open_err)?.len();
        Self::read_from(BufReader::with_capacity(1 << 16, file), file_size)
    }

    /// Parses a whole file held in memory.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, GgufError> {
        Self::read_from(bytes, bytes.len() as u64)
    }

    /// Parses from `r`, positioned at the start of a file of `file_size` bytes. Reads only the
    /// header and tensor table; a reader that ends early is reported as truncation.
    pub fn read_from<R: std::io::Read>(r: R, file_size: u64) -> Result<Self, GgufError> {
        read::parse(r, file_size)
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// `general.architecture` ("llama", "gemma3", ...).
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.metadata.require_str("general.architecture")
    }

    /// The absolute byte range of `t`'s data in the file ([`TensorInfo::span`]: for a strided
    /// tensor, other tensors' slices lie between its own).
    pub fn tensor_range(&self, t: &TensorInfo) -> Range<u64> {
        // Validated at parse time for this file's tensors; saturate for hand-made infos.
        let start = self.data_offset.saturating_add(t.offset);
        start..start.saturating_add(t.span())
    }

    /// `t`'s bytes within the whole file `file_bytes` (its [`GgufFile::tensor_range`]), or
    /// `None` if they are not all there.
    pub fn tensor_bytes<'a>(&self, file_bytes: &'a [u8], t: &TensorInfo) -> Option<&'a [u8]> {
        let r = self.tensor_range(t);
        let start = usize::try_from(r.start).ok()?;
        let end = usize::try_from(r.end).ok()?;
        file_bytes.get(start..end)
    }

    /// Total bytes of tensor data.
    pub fn total_tensor_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.n_bytes).sum()
    }
}
