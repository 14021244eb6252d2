//! The small kernels of a transformer step: RMSNorm, RoPE, activations, and attention over an
//! f16 KV cache. Each has a plain Rust body the compiler vectorises; the f16 inner loops
//! ([`f16v`]) pick AVX-512/F16C paths at run time through [`crate::dispatch::level`].

pub mod act;
pub mod attention;
pub mod f16v;
pub mod norm;
pub mod rope;

pub use act::{gelu_tanh_mul, silu_mul};
pub use attention::{AttnParams, attention};
pub use norm::{rms_norm, rms_norm_inplace};
pub use rope::{Rope, RopeKind};
