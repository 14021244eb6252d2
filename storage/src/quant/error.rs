//! The one error type of the quant module.

use super::GgmlType;

/// Why a row could not be (de)quantized or a byte slice could not be viewed as blocks.
///
/// Every variant names the type and the sizes involved, so a caller several layers up (a
/// tensor load, an embedding lookup) can report what was wrong without re-deriving it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QuantError {
    /// The operation is not implemented for this element type (e.g. dequantizing IQ2_XXS).
    #[error("{op} is not supported for {ty}")]
    UnsupportedType {
        /// The element type asked for.
        ty: GgmlType,
        /// The operation: "dequantize", "quantize", ...
        op: &'static str,
    },
    /// The element count is not a whole number of blocks, or the byte length does not match it.
    #[error(
        "{ty}: {elements} elements need {expected_bytes} bytes (and a multiple of the block size), got {bytes}"
    )]
    BadLength {
        /// The element type.
        ty: GgmlType,
        /// Number of elements (the f32 side).
        elements: usize,
        /// Number of bytes given (the quantized side).
        bytes: usize,
        /// Number of bytes `elements` take, when that is a whole number of blocks; else 0.
        expected_bytes: usize,
    },
    /// A byte slice could not be viewed as blocks because it is not a whole number of them.
    #[error("{ty}: {bytes} bytes is not a whole number of {block_bytes}-byte blocks")]
    NotWholeBlocks {
        /// The block's element type.
        ty: GgmlType,
        /// Bytes given.
        bytes: usize,
        /// Bytes per block.
        block_bytes: usize,
    },
    /// A byte slice could not be viewed as blocks because its start is not aligned for them.
    #[error("{ty}: block data at address {addr:#x} is not {align}-byte aligned")]
    Misaligned {
        /// The block's element type.
        ty: GgmlType,
        /// The slice's start address.
        addr: usize,
        /// The alignment the block struct needs.
        align: usize,
    },
}
