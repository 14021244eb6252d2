use strata_kernels::{Device, KernelError, ops};

use crate::Case;

pub(crate) fn cases(dev: &Device, quick: bool) -> Result<Vec<Case>, KernelError> {
    let mut v = Vec::new();
    for &(rows, n) in &[(1usize, 4096usize), (512, 4096)] {
        let rows = if quick { rows.min(4) } else { rows };
        let (x, w, y) = (
            dev.alloc(rows * n * 4)?,
            dev.alloc(n * 4)?,
            dev.alloc(rows * n * 4)?,
        );
        v.push(Case {
            family: "norm",
            name: format!("rms_norm {rows}x{n}"),
            bytes: (2 * rows * n * 4 + n * 4) as u64,
            flops: (4 * rows * n) as u64,
            run: Box::new(move |s| ops::norm::rms_norm(s, &x, &w, &y, rows, n, 1e-6)),
        });
    }
    Ok(v)
}
