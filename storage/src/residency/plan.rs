//! Which tensors stay resident and which are streamed, under a RAM budget: a pure function of
//! the tensor table, the budget and the window (DESIGN.md invariant 2 in miniature).
//!
//! - The hot set is always resident: every tensor outside the `blk.N.` layers (embeddings,
//!   output, final norm) and every 1-D tensor (norms, biases: tiny, read at load).
//! - Each layer's matrices form a *group*, read together as a few large aligned extents.
//! - The window — `window` slot buffers, each as large as the largest group — holds the layer
//!   being computed and the ones being read ahead.
//! - What budget is left after the hot set and the window makes whole layers resident, from the
//!   first layer on; the rest are streamed every step.

use crate::io::DIRECT_ALIGN;

/// Ranges closer than this are read as one extent (reading a small gap beats another request).
const MERGE_GAP: u64 = 64 << 10;

/// A tensor as the planner sees it: absolute file range, layer, rank.
#[derive(Clone, Debug)]
pub struct PlanTensor {
    pub start: u64,
    pub len: u64,
    pub layer: Option<usize>,
    pub n_dims: usize,
}

/// One large aligned read: `[start, start + len)` of the file lands at `dst` in its buffer;
/// the file must supply the first `need` bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub len: u64,
    pub need: u64,
    pub dst: u64,
}

/// Where a tensor's bytes are in its buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// At this offset of the resident buffer.
    Hot(u64),
    /// In group `group`, at this offset of whichever slot holds it.
    Group { group: usize, offset: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub layer: usize,
    pub extents: Vec<Extent>,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub hot: Vec<Extent>,
    pub hot_bytes: u64,
    pub groups: Vec<Group>,
    /// Slot buffers for streamed groups (0 when nothing is streamed).
    pub window: usize,
    pub slot_bytes: u64,
    pub places: Vec<Place>,
    /// Layers held resident.
    pub resident_layers: usize,
}

impl Plan {
    /// RAM this plan holds for weights: the resident buffer and the window.
    pub fn ram_bytes(&self) -> u64 {
        self.hot_bytes + self.window as u64 * self.slot_bytes
    }

    /// Bytes read from the file per pass through all layers.
    pub fn streamed_bytes(&self) -> u64 {
        self.groups
            .iter()
            .flat_map(|g| &g.extents)
            .map(|e| e.len)
            .sum()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "a RAM budget of {budget_mib} MiB is too small: the resident tensors and {window} streaming buffers need {need_mib} MiB"
)]
pub struct BudgetTooSmall {
    pub budget_mib: u64,
    pub need_mib: u64,
    pub window: usize,
}

/// Plans residency for `tensors` in a file of `file_size` bytes. `budget: None` keeps every
/// tensor resident. `window` (at least 2) overrides the default of 3 buffers (2 when the
/// budget only allows 2).
pub fn plan(
    tensors: &[PlanTensor],
    file_size: u64,
    budget: Option<u64>,
    window: Option<usize>,
) -> Result<Plan, BudgetTooSmall> {
    let n_layers = tensors
        .iter()
        .filter_map(|t| t.layer)
        .max()
        .map_or(0, |l| l + 1);
    let streamable = |t: &PlanTensor| t.layer.is_some() && t.n_dims >= 2;
    let base: Vec<usize> = (0..tensors.len())
        .filter(|&i| !streamable(&tensors[i]))
        .collect();
    let by_layer: Vec<Vec<usize>> = (0..n_layers)
        .map(|l| {
            (0..tensors.len())
                .filter(|&i| streamable(&tensors[i]) && tensors[i].layer == Some(l))
                .collect()
        })
        .collect();
    let layer_bytes: Vec<u64> = by_layer
        .iter()
        .map(|ix| extents(tensors, ix, file_size).1)
        .collect();
    let base_bytes = extents(tensors, &base, file_size).1;
    let max_group = layer_bytes.iter().copied().max().unwrap_or(0);
    let total = base_bytes + layer_bytes.iter().sum::<u64>();

    let budget = match budget {
        Some(b) if b < total => b,
        _ => return Ok(layout(tensors, file_size, &base, &by_layer, n_layers, 0)),
    };
    let min_window = window.unwrap_or(2).max(2);
    if base_bytes + min_window as u64 * max_group > budget {
        return Err(BudgetTooSmall {
            budget_mib: budget >> 20,
            need_mib: (base_bytes + min_window as u64 * max_group).div_ceil(1 << 20),
            window: min_window,
        });
    }
    let window = window.unwrap_or(if base_bytes + 3 * max_group <= budget {
        3
    } else {
        2
    });
    let mut used = base_bytes + window as u64 * max_group;
    let mut resident = 0;
    while resident < n_layers && used + layer_bytes[resident] <= budget {
        used += layer_bytes[resident];
        resident += 1;
    }
    let mut hot = base;
    for ix in &by_layer[..resident] {
        hot.extend(ix);
    }
    Ok(layout(
        tensors, file_size, &hot, &by_layer, resident, window,
    ))
}

/// The plan with `hot` resident and layers `resident..` streamed through `window` slots.
fn layout(
    tensors: &[PlanTensor],
    file_size: u64,
    hot: &[usize],
    by_layer: &[Vec<usize>],
    resident: usize,
    window: usize,
) -> Plan {
    let mut places = vec![Place::Hot(0); tensors.len()];
    let all_hot: Vec<usize>;
    let hot = if resident >= by_layer.len() {
        all_hot = (0..tensors.len()).collect();
        &all_hot[..]
    } else {
        hot
    };
    let (hot_ext, hot_bytes) = extents(tensors, hot, file_size);
    for &i in hot {
        places[i] = Place::Hot(locate(&hot_ext, tensors[i].start));
    }
    let mut groups = Vec::new();
    if resident < by_layer.len() {
        for (layer, ix) in by_layer.iter().enumerate().skip(resident) {
            let (ext, bytes) = extents(tensors, ix, file_size);
            for &i in ix {
                places[i] = Place::Group {
                    group: groups.len(),
                    offset: locate(&ext, tensors[i].start),
                };
            }
            groups.push(Group {
                layer,
                extents: ext,
                bytes,
            });
        }
    }
    let slot_bytes = groups.iter().map(|g| g.bytes).max().unwrap_or(0);
    Plan {
        hot: hot_ext,
        hot_bytes,
        window: if groups.is_empty() { 0 } else { window },
        slot_bytes,
        places,
        resident_layers: if groups.is_empty() {
            by_layer.len()
        } else {
            resident
        },
        groups,
    }
}

/// The merged, 4 KiB-aligned extents covering tensors `ix`, laid out back to back, and their
/// total length.
fn extents(tensors: &[PlanTensor], ix: &[usize], file_size: u64) -> (Vec<Extent>, u64) {
    let a = DIRECT_ALIGN as u64;
    let mut ranges: Vec<(u64, u64)> = ix
        .iter()
        .map(|&i| (tensors[i].start, tensors[i].start + tensors[i].len))
        .collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in ranges {
        match merged.last_mut() {
            Some(last) if s <= last.1 + MERGE_GAP => {
                last.1 = last.1.max(e);
            }
            _ => merged.push((s, e)),
        }
    }
    let mut out = Vec::with_capacity(merged.len());
    let mut dst = 0;
    for (s, e) in merged {
        let start = s / a * a;
        let len = e.next_multiple_of(a) - start;
        out.push(Extent {
            start,
            len,
            need: e.min(file_size).max(start) - start,
            dst,
        });
        dst += len;
    }
    (out, dst)
}

/// The buffer offset of file offset `at`, inside one of `ext`.
fn locate(ext: &[Extent], at: u64) -> u64 {
    ext.iter()
        .find(|e| at >= e.start && at < e.start + e.len)
        .map_or(0, |e| e.dst + (at - e.start))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy file: 2 global tensors, then `layers` layers of a norm and three matrices.
    fn toy(layers: usize) -> (Vec<PlanTensor>, u64) {
        let mut t = Vec::new();
        let mut off = 4096;
        let mut push = |len: u64, layer, n_dims| {
            t.push(PlanTensor {
                start: off,
                len,
                layer,
                n_dims,
            });
            off += len.next_multiple_of(32);
        };
        push(100_000, None, 2);
        push(256, None, 1);
        for l in 0..layers {
            push(256, Some(l), 1);
            for _ in 0..3 {
                push(300_000, Some(l), 2);
            }
        }
        (t, off)
    }

    #[test]
    fn no_budget_keeps_everything_resident() {
        let (t, size) = toy(4);
        let p = plan(&t, size, None, None).unwrap();
        assert!(p.groups.is_empty());
        assert_eq!(p.window, 0);
        assert!(p.places.iter().all(|p| matches!(p, Place::Hot(_))));
        assert!(p.hot_bytes >= t.iter().map(|t| t.len).sum::<u64>());
        let big = plan(&t, size, Some(1 << 40), None).unwrap();
        assert_eq!(big, p);
    }

    #[test]
    fn budget_streams_layers_through_a_window() {
        let (t, size) = toy(8);
        let full = plan(&t, size, None, None).unwrap().hot_bytes;
        let p = plan(&t, size, Some(full * 6 / 10), None).unwrap();
        assert!(p.ram_bytes() <= full * 6 / 10, "{} > budget", p.ram_bytes());
        assert!(!p.groups.is_empty());
        assert!(p.window >= 2);
        // Streamed layers are the last ones; their matrices live in groups, norms stay hot.
        assert_eq!(p.groups[0].layer, p.resident_layers);
        for (i, pt) in t.iter().enumerate() {
            let streamed = pt.n_dims >= 2 && pt.layer.is_some_and(|l| l >= p.resident_layers);
            assert_eq!(
                matches!(p.places[i], Place::Group { .. }),
                streamed,
                "tensor {i}"
            );
        }
        // Every extent is aligned, and the tensors fit in their group's slot.
        for g in &p.groups {
            for e in &g.extents {
                assert_eq!(e.start % 4096, 0);
                assert_eq!(e.len % 4096, 0);
                assert!(e.need <= e.len);
            }
            assert!(g.bytes <= p.slot_bytes);
        }
        for (i, pt) in t.iter().enumerate() {
            if let Place::Group { group, offset } = p.places[i] {
                assert!(offset + pt.len <= p.groups[group].bytes);
            }
        }
    }

    #[test]
    fn too_small_a_budget_is_refused_with_the_need() {
        let (t, size) = toy(4);
        let e = plan(&t, size, Some(200_000), None).unwrap_err();
        assert_eq!(e.window, 2);
        assert!(e.need_mib >= 1);
        assert!(e.to_string().contains("too small"));
    }

    #[test]
    fn explicit_window_is_used() {
        let (t, size) = toy(8);
        let full = plan(&t, size, None, None).unwrap().hot_bytes;
        let p = plan(&t, size, Some(full / 2), Some(2)).unwrap();
        assert_eq!(p.window, 2);
    }
}
