//! The one error type of the GGUF reader.
//!
//! Every variant that comes from the file names the field it was reading (a metadata key, a
//! tensor name, or a description such as "key of metadata entry 3") and the absolute byte offset
//! where the problem was found, so that a user holding a broken file can see what is wrong
//! without a hex editor.

use std::io;
use std::path::PathBuf;

use crate::quant::GgmlType;

/// A string of the file (a key, a tensor name), or a message built around one, as a message
/// quotes it: at most a short prefix, escaped, so that a 10 MB name is not echoed whole.
fn clip(s: &str) -> std::borrow::Cow<'_, str> {
    // Room for a quoted key inside a field's description ("value type of metadata '…'").
    crate::text::clip(s, 2 * crate::text::QUOTE_CHARS)
}

/// Why a GGUF file was rejected, or why a metadata lookup failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// The file could not be opened or its size read.
    #[error("cannot open GGUF file {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },

    /// The underlying reader failed with something other than end of file.
    #[error("{field} at byte {offset}: read failed: {source}", field = clip(field))]
    Io {
        field: String,
        offset: u64,
        source: io::Error,
    },

    /// The first four bytes are not `GGUF`.
    #[error("not a GGUF file: magic at byte 0 is {found:02x?}, expected \"GGUF\" [47, 47, 55, 46]")]
    BadMagic { found: [u8; 4] },

    /// Only versions 2 and 3 exist in the wild with 64-bit counts; version 1 used 32-bit ones.
    #[error("GGUF version {version} at byte 4 is not supported (only 2 and 3 are){}", version_hint(*version))]
    UnsupportedVersion { version: u32 },

    /// A fixed-size field needs more bytes than are left in the file.
    #[error(
        "{field} at byte {offset}: needs {needed} bytes but only {available} are left in the file",
        field = clip(field)
    )]
    Truncated {
        field: String,
        offset: u64,
        needed: u64,
        available: u64,
    },

    /// The tensor or metadata count could not possibly be encoded in the bytes that remain.
    #[error(
        "{field} at byte {offset}: {count} entries cannot fit in the {remaining} bytes left \
         (each takes at least {min_entry_bytes} bytes)",
        field = clip(field)
    )]
    CountTooLarge {
        field: String,
        offset: u64,
        count: u64,
        remaining: u64,
        min_entry_bytes: u64,
    },

    /// A string or array length is larger than the rest of the file.
    #[error(
        "{field} at byte {offset}: length {len} exceeds the {remaining} bytes left in the file",
        field = clip(field)
    )]
    LengthTooLarge {
        field: String,
        offset: u64,
        len: u64,
        remaining: u64,
    },

    /// A string is not valid UTF-8.
    #[error("{field} at byte {offset}: string is not valid UTF-8 ({source})", field = clip(field))]
    InvalidUtf8 {
        field: String,
        offset: u64,
        source: std::str::Utf8Error,
    },

    /// A metadata value (or array element) type id is not one of 0..=12.
    #[error("metadata '{key}' at byte {offset}: unknown value type {type_id}", key = clip(key))]
    BadValueType {
        key: String,
        offset: u64,
        type_id: u32,
    },

    /// A bool is stored as a byte other than 0 or 1.
    #[error("metadata '{key}' at byte {offset}: bool byte is {byte}, expected 0 or 1", key = clip(key))]
    BadBool { key: String, offset: u64, byte: u8 },

    /// Arrays of arrays nest deeper than any real file needs; refused to bound the recursion.
    #[error("metadata '{key}' at byte {offset}: arrays nested deeper than {max_depth} levels", key = clip(key))]
    ArrayTooDeep {
        key: String,
        offset: u64,
        max_depth: usize,
    },

    /// The same metadata key appears twice.
    #[error("metadata key '{key}' at byte {offset} appears twice", key = clip(key))]
    DuplicateKey { key: String, offset: u64 },

    /// `general.alignment` is not a non-zero power of two stored as u32 or u64.
    #[error("metadata 'general.alignment' at byte {offset}: {reason}", reason = clip(reason))]
    BadAlignment { offset: u64, reason: String },

    /// A tensor has no dimensions or more than ggml's four.
    #[error("tensor '{tensor}' at byte {offset}: {n_dims} dimensions; GGUF allows 1 to 4", tensor = clip(tensor))]
    BadDimCount {
        tensor: String,
        offset: u64,
        n_dims: u32,
    },

    /// A tensor dimension is zero.
    #[error("tensor '{tensor}' at byte {offset}: dimension {index} is 0", tensor = clip(tensor))]
    ZeroDim {
        tensor: String,
        offset: u64,
        index: usize,
    },

    /// The product of the dimensions (or the byte size) does not fit in 64 bits.
    #[error("tensor '{tensor}' at byte {offset}: dimensions {dims:?} overflow the element count", tensor = clip(tensor))]
    ElementCountOverflow {
        tensor: String,
        offset: u64,
        dims: Vec<u64>,
    },

    /// The ggml type id is not one any known writer produces.
    #[error("tensor '{tensor}' at byte {offset}: unknown ggml type id {type_id}", tensor = clip(tensor))]
    UnknownType {
        tensor: String,
        offset: u64,
        type_id: u32,
    },

    /// A row (dims[0]) is not a whole number of quantization blocks.
    #[error(
        "tensor '{tensor}' at byte {offset}: row length {row} is not a multiple of {ty}'s \
         block size {block_size}",
        tensor = clip(tensor)
    )]
    RowNotBlockMultiple {
        tensor: String,
        offset: u64,
        ty: GgmlType,
        row: u64,
        block_size: u64,
    },

    /// A tensor's data offset is not a multiple of the file's alignment.
    #[error(
        "tensor '{tensor}' at byte {offset}: data offset {data_offset} is not a multiple of \
         the alignment {alignment}",
        tensor = clip(tensor)
    )]
    MisalignedTensor {
        tensor: String,
        offset: u64,
        data_offset: u64,
        alignment: u64,
    },

    /// A tensor's bytes (absolute range `[start, end)`) run past the end of the file.
    #[error(
        "tensor '{tensor}' at byte {offset}: data [{start}, {end}) runs past end of file \
         (size {file_size})",
        tensor = clip(tensor)
    )]
    TensorOutOfBounds {
        tensor: String,
        offset: u64,
        start: u64,
        end: u64,
        file_size: u64,
    },

    /// Two tensors share bytes.
    #[error(
        "tensor '{tensor}' at byte {offset}: data [{start}, {end}) overlaps tensor '{other}' \
         [{other_start}, {other_end})",
        tensor = clip(tensor), other = clip(other)
    )]
    TensorOverlap {
        tensor: String,
        offset: u64,
        start: u64,
        end: u64,
        other: String,
        other_start: u64,
        other_end: u64,
    },

    /// A tensor of strata's strided layout that the file does not describe consistently.
    #[error("strided tensor '{tensor}': {reason}", tensor = clip(tensor), reason = clip(reason))]
    Strided { tensor: String, reason: String },

    /// The same tensor name appears twice.
    #[error("tensor name '{tensor}' at byte {offset} appears twice", tensor = clip(tensor))]
    DuplicateTensor { tensor: String, offset: u64 },

    /// A required metadata key is absent.
    #[error("metadata key '{key}' is missing", key = clip(key))]
    MissingKey { key: String },

    /// A metadata key is present with a type (or value) the caller cannot use.
    #[error("metadata '{key}' is {found}, expected {expected}", key = clip(key))]
    WrongType {
        key: String,
        expected: &'static str,
        found: String,
    },
}

/// Points at the likely cause of an odd version number: a big-endian file or a truncated one.
fn version_hint(version: u32) -> &'static str {
    if version == 1 {
        "; version 1 files predate 64-bit counts, convert them with llama.cpp's tools"
    } else if (1..=3).contains(&version.swap_bytes()) {
        "; this looks like a big-endian GGUF file, which strata does not read"
    } else {
        ""
    }
}
