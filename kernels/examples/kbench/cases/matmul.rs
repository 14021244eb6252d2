//! The matmul family at the shapes the engine runs: decode (1 and 4 tokens; GB/s is what
//! matters) and prefill (512 tokens; TFLOPS) of Qwen2.5-1.5B's FFN (1536→8960, 8960→1536) and
//! logits (1536→151936), and a 7B's FFN (4096→14336), in the types real files use. Each case is
//! `ops::matmul::matmul`, activation quantization included; the `cuBLAS` cases are cuBLAS's f16
//! GEMM on the prefill shapes (weights already f16), for comparison.

use std::sync::Arc;

use strata_kernels::ops::matmul::{At, Weight, matmul, matmul_scratch_bytes};
use strata_kernels::{Device, KernelError};
use strata_storage::quant::GgmlType;

use crate::Case;

pub(crate) fn cases(dev: &Device, quick: bool) -> Result<Vec<Case>, KernelError> {
    // (name, rows, cols, type): rows = outputs, cols = inputs.
    let shapes = [
        ("1.5B ffn_up 1536→8960", 8960, 1536, GgmlType::Q4K),
        ("1.5B ffn_down 8960→1536", 1536, 8960, GgmlType::Q6K),
        ("1.5B logits 1536→151936", 151_936, 1536, GgmlType::Q6K),
        ("7B ffn_up 4096→14336", 14336, 4096, GgmlType::Q4K),
        ("7B ffn_up 4096→14336", 14336, 4096, GgmlType::Q8_0),
        ("7B ffn_up 4096→14336", 14336, 4096, GgmlType::F16),
    ];
    // The simulator runs a kernel a thousand times slower: a slice of the rows, fewer tokens.
    let prefill = if quick { 64 } else { 512 };
    let s = dev.stream()?;
    let mut v = Vec::new();
    for (name, rows, cols, ty) in shapes {
        let rows = if quick { rows.min(128) } else { rows };
        let wbytes = rows * ty.row_bytes(cols);
        let wb = Arc::new(dev.alloc(wbytes)?);
        // Benign weights (finite scales) rather than whatever the memory held.
        s.memset(&wb, 0, wbytes, 0x11)?;
        let w = Weight {
            ptr: wb.ptr(),
            ty,
            rows,
            cols,
        };
        for n in [1, 4, prefill] {
            let x = dev.alloc(n * cols * 4)?;
            s.memset(&x, 0, n * cols * 4, 0)?;
            let y = dev.alloc(n * rows * 4)?;
            let sc = dev.alloc(matmul_scratch_bytes(ty, cols, n).max(1))?;
            let keep = Arc::clone(&wb);
            v.push(Case {
                family: "matmul",
                name: format!("{} {name} n={n}", ty.name()),
                // The weights once, the activations in and the outputs out.
                bytes: (wbytes + n * cols * 4 + n * rows * 4) as u64,
                flops: (2 * rows * cols * n) as u64,
                run: Box::new(move |s| {
                    let _weights = &keep;
                    matmul(s, &w, At::from(&x), n, At::from(&y), At::from(&sc))
                }),
            });
        }
    }
    for (name, rows, cols) in [
        ("1.5B ffn_up 1536→8960", 8960, 1536),
        ("7B ffn_up 4096→14336", 14336, 4096),
    ] {
        let rows = if quick { rows.min(128) } else { rows };
        let n = prefill;
        let (a, b, c) = (
            dev.alloc(rows * cols * 2)?,
            dev.alloc(n * cols * 2)?,
            dev.alloc(n * rows * 4)?,
        );
        s.memset(&a, 0, rows * cols * 2, 0)?;
        s.memset(&b, 0, n * cols * 2, 0)?;
        v.push(Case {
            family: "matmul",
            name: format!("cuBLAS f16 {name} n={n}"),
            bytes: ((rows + n) * cols * 2 + n * rows * 4) as u64,
            flops: (2 * rows * cols * n) as u64,
            run: Box::new(move |s| s.gemm_f16(rows, n, cols, (&a, 0), (&b, 0), (&c, 0))),
        });
    }
    s.synchronize()?;
    Ok(v)
}
