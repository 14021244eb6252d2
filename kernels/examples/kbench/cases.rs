//! Every family's cases, gathered. Each kernel family adds a module here with a
//! `cases(dev, quick) -> Result<Vec<Case>, KernelError>` function.

mod attention;
mod matmul;
mod misc;
mod norm;

use strata_kernels::{Device, KernelError};

use crate::Case;

pub(crate) fn all(dev: &Device, quick: bool) -> Result<Vec<Case>, KernelError> {
    let mut v = Vec::new();
    v.extend(norm::cases(dev, quick)?);
    v.extend(attention::cases(dev, quick)?);
    v.extend(matmul::cases(dev, quick)?);
    v.extend(misc::cases(dev, quick)?);
    Ok(v)
}
