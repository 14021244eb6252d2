//! Architecture-specific kernels, compiled for every target of their architecture and chosen
//! at run time.

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_64;

#[cfg(target_arch = "aarch64")]
pub(crate) mod aarch64;
