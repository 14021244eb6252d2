use super::*;

/// A toy file: an embedding table (rows only), a norm, `layers` layers of a norm and three
/// matrices, then a large output matrix.
fn toy(layers: usize, output_rows: u64) -> (Vec<PlanTensor>, u64) {
    let mut t = Vec::new();
    let mut off = 4096;
    let mut push = |len: u64, n_dims, rows, access| {
        t.push(PlanTensor {
            start: off,
            len,
            n_dims,
            rows,
            access,
            pin: false,
        });
        off += len.next_multiple_of(32);
    };
    push(1000 * 400, 2, 1000, Access::Rows);
    push(256, 1, 1, Access::Cycle(None));
    for l in 0..layers {
        push(256, 1, 1, Access::Cycle(Some(l)));
        for _ in 0..3 {
            push(300_000, 2, 750, Access::Cycle(Some(l)));
        }
    }
    push(output_rows * 400, 2, output_rows, Access::Cycle(None));
    (t, off)
}

fn check_invariants(t: &[PlanTensor], p: &Plan) {
    for g in &p.groups {
        for e in &g.extents {
            assert_eq!(e.start % 4096, 0);
            assert_eq!(e.len % 4096, 0);
            assert!(e.need <= e.len);
        }
        assert!(g.bytes <= p.slot_bytes);
    }
    for (i, pt) in t.iter().enumerate() {
        match &p.places[i] {
            Place::Group { group, offset } => assert!(offset + pt.len <= p.groups[*group].bytes),
            Place::Hot(off) => assert!(off + pt.len <= p.hot_bytes),
            Place::Parts {
                first,
                rows_per_part,
                offsets,
            } => {
                let row = pt.len / pt.rows;
                assert_eq!(offsets.len() as u64, pt.rows.div_ceil(*rows_per_part));
                for (k, off) in offsets.iter().enumerate() {
                    let rows = (*rows_per_part).min(pt.rows - k as u64 * rows_per_part);
                    assert!(off + rows * row <= p.groups[first + k].bytes);
                }
            }
            Place::Cold => assert_eq!(pt.access, Access::Rows),
        }
    }
}

#[test]
fn no_budget_keeps_everything_resident() {
    let (t, size) = toy(4, 1000);
    let p = plan(&t, size, None, None).unwrap();
    assert!(p.groups.is_empty());
    assert_eq!(p.window, 0);
    assert_eq!(p.resident_layers, 4);
    assert!(p.places.iter().all(|p| matches!(p, Place::Hot(_))));
    assert!(p.hot_bytes >= t.iter().map(|t| t.len).sum::<u64>());
    assert_eq!(plan(&t, size, Some(1 << 40), None).unwrap(), p);
    check_invariants(&t, &p);
}

#[test]
fn budget_streams_layers_and_cuts_the_output_into_parts() {
    let (t, size) = toy(8, 6000);
    let full = plan(&t, size, None, None).unwrap().hot_bytes;
    let budget = full * 3 / 10;
    let p = plan(&t, size, Some(budget), None).unwrap();
    assert!(
        p.ram_bytes() <= budget,
        "{} > budget {budget}",
        p.ram_bytes()
    );
    assert!(p.window >= 2);
    check_invariants(&t, &p);
    // The embedding table is read by rows, not held.
    assert_eq!(p.places[0], Place::Cold);
    // The output (2.4 MB) is bigger than a layer (0.9 MB): streamed in parts, last in the cycle.
    let last = t.len() - 1;
    let Place::Parts { first, offsets, .. } = &p.places[last] else {
        panic!("{:?}", p.places[last])
    };
    assert!(offsets.len() >= 3);
    assert_eq!(first + offsets.len(), p.groups.len());
    assert!(p.groups[*first..].iter().all(|g| g.layer.is_none()));
    // Layers stream in order after the resident ones.
    let layers: Vec<usize> = p.groups.iter().filter_map(|g| g.layer).collect();
    assert_eq!(layers, (p.resident_layers..8).collect::<Vec<_>>());
    // Norms stay resident.
    for (i, pt) in t.iter().enumerate() {
        if pt.n_dims == 1 {
            assert!(matches!(p.places[i], Place::Hot(_)));
        }
    }
}

#[test]
fn spare_budget_goes_to_layers_then_the_output_then_the_cold_table() {
    let (t, size) = toy(4, 1000);
    let full = plan(&t, size, None, None).unwrap().hot_bytes;
    // Everything but the embedding table fits beside a window.
    let p = plan(&t, size, Some(full - 200_000), None).unwrap();
    check_invariants(&t, &p);
    assert_eq!(p.places[0], Place::Cold);
    assert!(p.groups.is_empty());
    assert_eq!(p.window, 0);
    assert_eq!(p.resident_layers, 4);
    assert!(p.ram_bytes() <= full - 200_000);
}

#[test]
fn too_small_a_budget_is_refused_with_the_need() {
    let (t, size) = toy(4, 1000);
    let e = plan(&t, size, Some(200_000), None).unwrap_err();
    assert_eq!(e.window, 2);
    assert!(e.need_mib >= 1);
    assert!(e.to_string().contains("too small"));
}

#[test]
fn explicit_window_is_used() {
    let (t, size) = toy(8, 1000);
    let full = plan(&t, size, None, None).unwrap().hot_bytes;
    let p = plan(&t, size, Some(full / 2), Some(2)).unwrap();
    assert_eq!(p.window, 2);
    check_invariants(&t, &p);
}

#[test]
fn pinned_tensors_stay_resident_under_a_budget_and_leave_their_layer_group() {
    let (mut t, size) = toy(8, 6000);
    let full = plan(&t, size, None, None).unwrap().hot_bytes;
    let budget = full * 4 / 10;
    // Pin the embedding table (read by rows) and one matrix of the last layer.
    let last_layer_mat = t.len() - 2;
    t[0].pin = true;
    t[last_layer_mat].pin = true;
    let p = plan(&t, size, Some(budget), None).unwrap();
    check_invariants(&t, &p);
    assert!(p.ram_bytes() <= budget);
    assert!(matches!(p.places[0], Place::Hot(_)), "{:?}", p.places[0]);
    assert!(
        matches!(p.places[last_layer_mat], Place::Hot(_)),
        "{:?}",
        p.places[last_layer_mat]
    );
    // Its layer still streams, without it.
    let Place::Group { group, .. } = p.places[last_layer_mat - 1] else {
        panic!("{:?}", p.places[last_layer_mat - 1])
    };
    assert_eq!(p.groups[group].layer, Some(7));
    // A budget that cannot hold the pinned tensors beside a window is refused.
    t[1..]
        .iter_mut()
        .filter(|x| x.n_dims == 2)
        .for_each(|x| x.pin = true);
    assert!(plan(&t, size, Some(budget), None).is_err());
}
