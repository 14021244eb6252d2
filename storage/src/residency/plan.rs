//! Which tensors stay resident and which are streamed, under a RAM budget: a pure function of
//! the tensor table, the budget and the window (DESIGN.md invariant 2 in miniature).
//!
//! Each step uses the weights in a cycle: layer 0, 1, …, n−1, then the tensors outside the
//! layers (the output projection), then layer 0 again for the next token.
//! - Small tensors (1-D: norms, biases) and pinned ones (`-ot …=RAM`) are always resident.
//! - Each layer's matrices form a *group*, read together as a few large aligned extents; the
//!   matrices outside the layers form the last group. A group larger than the largest layer is
//!   cut by rows into *parts* (each its own group) so that one slot size fits all.
//! - Tensors only ever read a few rows at a time ([`Access::Rows`]: an embedding table that is
//!   not also the output) are *cold*: their rows are read on demand, unless budget is left.
//! - The window — `window` slot buffers of the largest group's size — holds the group being
//!   computed and those being read ahead.
//! - What budget is left makes groups resident (layers from the first on, then the output's
//!   parts), and last the cold tensors.

use crate::io::DIRECT_ALIGN;

/// Ranges closer than this are read as one extent (reading a small gap beats another request).
const MERGE_GAP: u64 = 64 << 10;

/// How a tensor is read during a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Whole, once per step, in the cycle position of this layer (`None`: after the layers).
    Cycle(Option<usize>),
    /// A few rows at a time (an embedding lookup).
    Rows,
}

/// A tensor as the planner sees it: absolute file range, rank, rows and how it is read.
#[derive(Clone, Debug)]
pub struct PlanTensor {
    pub start: u64,
    pub len: u64,
    pub n_dims: usize,
    /// Rows (the outermost dimension); the tensor is `rows` equal runs of bytes.
    pub rows: u64,
    pub access: Access,
    /// Held in RAM whatever the budget (an `-ot PATTERN=RAM` override).
    pub pin: bool,
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

/// Where a tensor's bytes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// At this offset of the resident buffer.
    Hot(u64),
    /// In group `group`, at this offset of whichever slot holds it.
    Group { group: usize, offset: u64 },
    /// Cut by rows into groups `first..first + offsets.len()`; part `i` holds rows
    /// `i * rows_per_part ..` at `offsets[i]` of its slot.
    Parts {
        first: usize,
        rows_per_part: u64,
        offsets: Vec<u64>,
    },
    /// On disk only; rows are read on demand.
    Cold,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// Position in the cycle: a layer index, or `None` for the tensors after the layers.
    pub layer: Option<usize>,
    pub extents: Vec<Extent>,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub hot: Vec<Extent>,
    pub hot_bytes: u64,
    /// Streamed groups in cycle order.
    pub groups: Vec<Group>,
    /// Slot buffers for streamed groups (0 when nothing is streamed).
    pub window: usize,
    pub slot_bytes: u64,
    pub places: Vec<Place>,
    /// Layers held resident.
    pub resident_layers: usize,
    pub n_layers: usize,
}

impl Plan {
    /// RAM this plan holds for weights: the resident buffer and the window.
    pub fn ram_bytes(&self) -> u64 {
        self.hot_bytes + self.window as u64 * self.slot_bytes
    }

    /// Bytes read from the file per pass through the cycle.
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

/// A unit the planner places: whole tensors (`rows: None`) or one row range of one tensor.
#[derive(Clone, Debug)]
struct Unit {
    tensors: Vec<usize>,
    rows: Option<(u64, u64)>,
    layer: Option<usize>,
    bytes: u64,
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
    let everything: Vec<usize> = (0..tensors.len()).collect();
    let total = extents(tensors, &everything, None, file_size).1;
    let n_layers = tensors
        .iter()
        .filter_map(|t| match t.access {
            Access::Cycle(l) => l,
            Access::Rows => None,
        })
        .max()
        .map_or(0, |l| l + 1);
    let budget = match budget {
        Some(b) if b < total => b,
        _ => return Ok(resident(tensors, file_size, n_layers)),
    };
    let small = |t: &PlanTensor| t.n_dims < 2 || t.pin;
    let pinned: Vec<usize> = everything
        .iter()
        .copied()
        .filter(|&i| small(&tensors[i]))
        .collect();
    let cold: Vec<usize> = everything
        .iter()
        .copied()
        .filter(|&i| !small(&tensors[i]) && tensors[i].access == Access::Rows)
        .collect();
    // The cycle's groups: each layer, then what comes after the layers.
    let mut units: Vec<Unit> = Vec::new();
    for layer in (0..n_layers).map(Some).chain([None]) {
        let ix: Vec<usize> = everything
            .iter()
            .copied()
            .filter(|&i| !small(&tensors[i]) && tensors[i].access == Access::Cycle(layer))
            .collect();
        if !ix.is_empty() {
            let bytes = extents(tensors, &ix, None, file_size).1;
            units.push(Unit {
                tensors: ix,
                rows: None,
                layer,
                bytes,
            });
        }
    }
    // One slot size: the largest layer (at least 1 MiB); bigger groups are cut by rows.
    let slot = units
        .iter()
        .filter(|u| u.layer.is_some())
        .map(|u| u.bytes)
        .max()
        .unwrap_or(0)
        .max(1 << 20);
    let units: Vec<Unit> = units
        .into_iter()
        .flat_map(|u| split(tensors, u, slot, file_size))
        .collect();
    let slot = units.iter().map(|u| u.bytes).max().unwrap_or(0);
    let pinned_bytes = extents(tensors, &pinned, None, file_size).1;
    // Everything but the cold tables fits: no window needed.
    let cycle_bytes: u64 = units.iter().map(|u| u.bytes).sum();
    if pinned_bytes + cycle_bytes <= budget {
        let mut hot = pinned;
        hot.extend(units.iter().flat_map(|u| u.tensors.iter().copied()));
        let hot_unit = Unit {
            tensors: hot,
            rows: None,
            layer: None,
            bytes: pinned_bytes + cycle_bytes,
        };
        return Ok(layout(
            tensors,
            file_size,
            &[hot_unit],
            &[],
            &cold,
            0,
            n_layers,
            n_layers,
        ));
    }
    let min_window = window.unwrap_or(2).max(2);
    let floor = pinned_bytes + min_window as u64 * slot;
    if floor > budget {
        return Err(BudgetTooSmall {
            budget_mib: budget >> 20,
            need_mib: floor.div_ceil(1 << 20),
            window: min_window,
        });
    }
    let window = window
        .unwrap_or(if pinned_bytes + 3 * slot <= budget {
            3
        } else {
            2
        })
        .max(2);
    // Spend what is left: groups in cycle order, then the cold tensors.
    let mut used = pinned_bytes + window as u64 * slot;
    let mut kept = 0;
    while kept < units.len() && used + units[kept].bytes <= budget {
        used += units[kept].bytes;
        kept += 1;
    }
    let mut hot_units: Vec<Unit> = vec![Unit {
        tensors: pinned,
        rows: None,
        layer: None,
        bytes: pinned_bytes,
    }];
    hot_units.extend(units[..kept].iter().cloned());
    let mut cold_left = Vec::new();
    for ix in overlapping(tensors, &cold) {
        let bytes = extents(tensors, &ix, None, file_size).1;
        if kept == units.len() && used + bytes <= budget {
            used += bytes;
            hot_units.push(Unit {
                tensors: ix,
                rows: None,
                layer: None,
                bytes,
            });
        } else {
            cold_left.extend(ix);
        }
    }
    if kept == units.len() && cold_left.is_empty() {
        return Ok(resident(tensors, file_size, n_layers));
    }
    let streamed = &units[kept..];
    let resident_layers = units[..kept]
        .iter()
        .filter_map(|u| u.layer)
        .collect::<std::collections::BTreeSet<_>>()
        .len()
        .min(n_layers);
    Ok(layout(
        tensors,
        file_size,
        &hot_units,
        streamed,
        &cold_left,
        if streamed.is_empty() { 0 } else { window },
        resident_layers,
        n_layers,
    ))
}

/// `ix` in clusters whose file ranges overlap (strided tensors share their group's range: one
/// decision, and one read, for all of them), in file order.
fn overlapping(tensors: &[PlanTensor], ix: &[usize]) -> Vec<Vec<usize>> {
    let mut sorted = ix.to_vec();
    sorted.sort_by_key(|&i| tensors[i].start);
    let mut out: Vec<(u64, Vec<usize>)> = Vec::new();
    for i in sorted {
        let t = &tensors[i];
        match out.last_mut() {
            Some((end, v)) if t.start < *end => {
                *end = (*end).max(t.start + t.len);
                v.push(i);
            }
            _ => out.push((t.start + t.len, vec![i])),
        }
    }
    out.into_iter().map(|(_, v)| v).collect()
}

/// Everything resident.
fn resident(tensors: &[PlanTensor], file_size: u64, n_layers: usize) -> Plan {
    let all = Unit {
        tensors: (0..tensors.len()).collect(),
        rows: None,
        layer: None,
        bytes: 0,
    };
    layout(tensors, file_size, &[all], &[], &[], 0, n_layers, n_layers)
}

/// Cuts a unit bigger than `slot` into row ranges of single tensors that fit.
fn split(tensors: &[PlanTensor], u: Unit, slot: u64, file_size: u64) -> Vec<Unit> {
    if u.bytes <= slot {
        return vec![u];
    }
    let mut out = Vec::new();
    for &i in &u.tensors {
        let t = &tensors[i];
        let rows = t.rows.max(1);
        let row_bytes = t.len / rows;
        // Leave room for alignment on both ends of each part.
        let per =
            ((slot.saturating_sub(2 * DIRECT_ALIGN as u64)) / row_bytes.max(1)).clamp(1, rows);
        let mut r0 = 0;
        while r0 < rows {
            let r1 = (r0 + per).min(rows);
            let bytes = extents(tensors, &[i], Some((r0, r1)), file_size).1;
            out.push(Unit {
                tensors: vec![i],
                rows: Some((r0, r1)),
                layer: u.layer,
                bytes,
            });
            r0 = r1;
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn layout(
    tensors: &[PlanTensor],
    file_size: u64,
    hot: &[Unit],
    streamed: &[Unit],
    cold: &[usize],
    window: usize,
    resident_layers: usize,
    n_layers: usize,
) -> Plan {
    let mut places = vec![Place::Cold; tensors.len()];
    for &i in cold {
        places[i] = Place::Cold;
    }
    // The resident buffer: whole tensors only (row-cut parts that became resident are read
    // whole; a tensor is either all resident or all streamed).
    let mut hot_ix: Vec<usize> = hot.iter().flat_map(|u| u.tensors.iter().copied()).collect();
    hot_ix.sort_unstable();
    hot_ix.dedup();
    // A tensor with some parts streamed stays streamed as a whole.
    let streamed_ix: std::collections::BTreeSet<usize> = streamed
        .iter()
        .flat_map(|u| u.tensors.iter().copied())
        .collect();
    hot_ix.retain(|i| !streamed_ix.contains(i));
    let (hot_ext, hot_bytes) = extents(tensors, &hot_ix, None, file_size);
    for &i in &hot_ix {
        places[i] = Place::Hot(locate(&hot_ext, tensors[i].start));
    }
    // Parts of a tensor cut by rows: every part of it is streamed (resident ones included).
    let mut groups = Vec::new();
    let mut units: Vec<Unit> = Vec::new();
    for u in hot.iter().chain(streamed) {
        if u.rows.is_some() && streamed_ix.contains(&u.tensors[0]) {
            units.push(u.clone());
        }
    }
    for u in streamed {
        if u.rows.is_none() {
            units.push(u.clone());
        }
    }
    // Cycle order: layers, then the rest; parts by row.
    units.sort_by_key(|u| {
        (
            u.layer.map_or(usize::MAX, |l| l),
            u.tensors[0],
            u.rows.map(|r| r.0),
        )
    });
    units.dedup_by(|a, b| a.tensors == b.tensors && a.rows == b.rows);
    for u in &units {
        let (ext, bytes) = extents(tensors, &u.tensors, u.rows, file_size);
        let g = groups.len();
        match u.rows {
            None => {
                for &i in &u.tensors {
                    places[i] = Place::Group {
                        group: g,
                        offset: locate(&ext, tensors[i].start),
                    };
                }
            }
            Some((r0, r1)) => {
                let i = u.tensors[0];
                let t = &tensors[i];
                let row_bytes = t.len / t.rows.max(1);
                let at = locate(&ext, t.start + r0 * row_bytes);
                match &mut places[i] {
                    Place::Parts { offsets, .. } => offsets.push(at),
                    p => {
                        *p = Place::Parts {
                            first: g,
                            rows_per_part: r1 - r0,
                            offsets: vec![at],
                        }
                    }
                }
            }
        }
        groups.push(Group {
            layer: u.layer,
            extents: ext,
            bytes,
        });
    }
    let slot_bytes = groups.iter().map(|g| g.bytes).max().unwrap_or(0);
    Plan {
        hot: hot_ext,
        hot_bytes,
        window: if groups.is_empty() { 0 } else { window.max(2) },
        slot_bytes,
        places,
        resident_layers,
        n_layers,
        groups,
    }
}

/// The merged, 4 KiB-aligned extents covering tensors `ix` (or rows `rows` of the single
/// tensor in `ix`), laid out back to back, and their total length.
fn extents(
    tensors: &[PlanTensor],
    ix: &[usize],
    rows: Option<(u64, u64)>,
    file_size: u64,
) -> (Vec<Extent>, u64) {
    let a = DIRECT_ALIGN as u64;
    let mut ranges: Vec<(u64, u64)> = ix
        .iter()
        .map(|&i| {
            let t = &tensors[i];
            match rows {
                Some((r0, r1)) => {
                    let rb = t.len / t.rows.max(1);
                    (t.start + r0 * rb, t.start + r1 * rb)
                }
                None => (t.start, t.start + t.len),
            }
        })
        .collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in ranges {
        match merged.last_mut() {
            Some(last) if s <= last.1 + MERGE_GAP => last.1 = last.1.max(e),
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
mod tests;
