//! act.cu, the fused norms, moe.cu and sample.cu at the shapes a step runs them: a prefill
//! ubatch of 512 tokens (qwen2.5-1.5b's FFN width 8960, qwen3moe's router of 128 experts,
//! top-8) and one decode row of the real vocabularies. All are memory-bound: `bytes` is what
//! each must read and write at least.

use strata_kernels::ops::{act, moe, norm, sample};
use strata_kernels::{Device, KernelError};

use crate::Case;

pub(crate) fn cases(dev: &Device, quick: bool) -> Result<Vec<Case>, KernelError> {
    let tokens = if quick { 4 } else { 512 };
    let mut v = Vec::new();

    let ff = 8960;
    let (g, u) = (dev.alloc(tokens * ff * 4)?, dev.alloc(tokens * ff * 4)?);
    v.push(Case {
        family: "act",
        name: format!("swiglu {ff}x{tokens}"),
        bytes: (3 * tokens * ff * 4) as u64,
        flops: (4 * tokens * ff) as u64,
        run: Box::new(move |s| {
            act::glu(
                s,
                act::Glu::Silu,
                act::Rows::dense(&g, ff),
                act::Rows::dense(&u, ff),
                act::Rows::dense(&g, ff),
                tokens,
                ff,
            )
        }),
    });

    let e = 2048;
    let (x, y, w, xb) = (
        dev.alloc(tokens * e * 4)?,
        dev.alloc(tokens * e * 4)?,
        dev.alloc(e * 4)?,
        dev.alloc(tokens * e * 4)?,
    );
    v.push(Case {
        family: "norm",
        name: format!("add_rms_norm {e}x{tokens}"),
        bytes: (4 * tokens * e * 4) as u64,
        flops: (5 * tokens * e) as u64,
        run: Box::new(move |s| norm::add_rms_norm(s, &x, &y, &w, &xb, tokens, e, 1e-6)),
    });

    let (ne, k) = (128, 8);
    let (logits, ids, wts) = (
        dev.alloc(tokens * ne * 4)?,
        dev.alloc(tokens * k * 4)?,
        dev.alloc(tokens * k * 4)?,
    );
    // Router logits must be numbers for the grouping case below (fresh memory is poison on
    // the simulator): zeros route every token to experts 0..k.
    let s0 = dev.stream()?;
    s0.memset(&logits, 0, tokens * ne * 4, 0)?;
    moe::route(&s0, &logits, &ids, &wts, tokens, ne, k, true)?;
    s0.synchronize()?;
    let ids = std::rc::Rc::new(ids);
    let wts = std::rc::Rc::new(wts);
    {
        let (ids, wts) = (ids.clone(), wts.clone());
        v.push(Case {
            family: "moe",
            name: format!("route top-{k} of {ne} x{tokens}"),
            bytes: (tokens * ne * 4 + 2 * tokens * k * 4) as u64,
            flops: (tokens * ne * (4 + 2 * k)) as u64,
            run: Box::new(move |s| moe::route(s, &logits, &ids, &wts, tokens, ne, k, true)),
        });
    }
    let (counts, offsets, list, pos) = (
        dev.alloc(ne * 4)?,
        dev.alloc((ne + 1) * 4)?,
        dev.alloc(tokens * k * 4)?,
        dev.alloc(tokens * k * 4)?,
    );
    {
        let ids = ids.clone();
        v.push(Case {
            family: "moe",
            name: format!("group {tokens}x{k} by {ne} experts"),
            bytes: (tokens * k * 4 * 3) as u64,
            flops: 0,
            run: Box::new(move |s| {
                moe::group(s, &ids, tokens, k, ne, &counts, &offsets, &list, &pos)
            }),
        });
    }
    let (ys, out) = (dev.alloc(tokens * k * e * 4)?, dev.alloc(tokens * e * 4)?);
    v.push(Case {
        family: "moe",
        name: format!("weighted_sum {tokens}x{k}x{e}"),
        bytes: ((tokens * k * e + tokens * e) * 4) as u64,
        flops: (2 * tokens * k * e) as u64,
        run: Box::new(move |s| moe::weighted_sum(s, &ys, &wts, None, &out, tokens, k, e)),
    });

    for n in [151_936usize, 262_144] {
        let (x, out) = (dev.alloc(n * 4)?, dev.alloc(4)?);
        let scratch = dev.alloc(sample::argmax_scratch_bytes(1, n)?)?;
        v.push(Case {
            family: "sample",
            name: format!("argmax {n}"),
            bytes: (n * 4) as u64,
            flops: n as u64,
            run: Box::new(move |s| sample::argmax(s, &x, 1, n, &scratch, &out)),
        });
    }
    let n = 151_936;
    let k = 40;
    let (x, vals, idx) = (dev.alloc(n * 4)?, dev.alloc(k * 4)?, dev.alloc(k * 4)?);
    let scratch = dev.alloc(sample::top_k_scratch_bytes(1, n, k)?)?;
    let xl = dev.alloc(n * 4)?;
    let lsm = dev.alloc(n * 4)?;
    v.push(Case {
        family: "sample",
        name: format!("top_k {k} of {n}"),
        bytes: (n * 4) as u64,
        flops: 0,
        run: Box::new(move |s| sample::top_k(s, &x, 1, n, k, &scratch, &vals, &idx)),
    });
    v.push(Case {
        family: "sample",
        name: format!("log_softmax {n}"),
        bytes: (2 * n * 4) as u64,
        flops: (3 * n) as u64,
        run: Box::new(move |s| sample::log_softmax(s, &xl, &lsm, 1, n)),
    });
    Ok(v)
}
