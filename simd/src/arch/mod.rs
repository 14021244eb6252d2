//! Architecture-specific kernels, compiled for every x86-64 target and chosen at run time.

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_64;
