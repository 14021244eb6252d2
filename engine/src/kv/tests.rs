use super::*;

const LAYERS: usize = 3;
const KV_DIM: usize = 64;
const HD: usize = 32;

fn fill(cache: &mut KvCache, from: usize, to: usize) {
    for pos in from..to {
        for il in 0..LAYERS {
            let k: Vec<f32> = (0..KV_DIM)
                .map(|i| ((pos * 31 + il * 7 + i) % 97) as f32 / 50.0 - 1.0)
                .collect();
            let v: Vec<f32> = k.iter().map(|x| -x * 0.5).collect();
            cache.store(il, pos, &k, &v).unwrap();
        }
        cache.set_len(pos + 1).unwrap();
    }
}

/// Every layer's rows as attention sees them, after `prepare`.
fn rows(cache: &mut KvCache) -> Vec<Vec<u8>> {
    let n = cache.len();
    let mut out = Vec::new();
    for il in 0..LAYERS {
        cache.prepare(il).unwrap();
        let (mut k, mut v) = (Vec::new(), Vec::new());
        cache.view(il, n, &mut k, &mut v);
        for side in [k, v] {
            let mut all: Vec<u8> = side.iter().flat_map(|p| p.iter().copied()).collect();
            let rb = all.len() / (side.len() * PAGE_TOKENS);
            all.truncate(n * rb);
            out.push(all);
        }
    }
    out
}

fn opts(ty: GgmlType, spill: Option<SpillConfig>) -> KvOptions {
    KvOptions {
        type_k: ty,
        type_v: ty,
        spill,
        gpu: None,
    }
}

#[test]
fn pages_fill_share_and_copy_on_write() {
    let mut a = KvCache::new(LAYERS, 2048, KV_DIM, HD, &opts(GgmlType::F16, None)).unwrap();
    fill(&mut a, 0, 600);
    assert_eq!(a.ram_bytes(), LAYERS * 2 * 3 * PAGE_TOKENS * KV_DIM * 2);
    let before = rows(&mut a);
    let mut b = KvCache::new(LAYERS, 2048, KV_DIM, HD, &opts(GgmlType::F16, None)).unwrap();
    b.share_prefix(&a, 520).unwrap();
    assert_eq!(b.len(), 520);
    // The two full pages are shared, the third copied.
    let (Page::Ram(pa), Page::Ram(pb)) = (&a.layers[0][0].pages[1], &b.layers[0][0].pages[1])
    else {
        panic!("in RAM")
    };
    assert!(Arc::ptr_eq(pa, pb));
    // Writing into a shared page copies it: the other cache keeps its bytes.
    b.truncate(300).unwrap();
    fill(&mut b, 300, 700);
    assert_eq!(rows(&mut a), before);
    let (Page::Ram(pa), Page::Ram(pb)) = (&a.layers[0][0].pages[1], &b.layers[0][0].pages[1])
    else {
        panic!("in RAM")
    };
    assert!(!Arc::ptr_eq(pa, pb));
    // Shapes must agree.
    let mut c = KvCache::new(LAYERS, 2048, KV_DIM, HD, &opts(GgmlType::Q8_0, None)).unwrap();
    assert!(c.share_prefix(&a, 10).is_err());
}

#[test]
fn unsupported_head_size_is_refused() {
    let e = KvCache::new(LAYERS, 64, 48, 16, &opts(GgmlType::Q4_0, None));
    assert!(matches!(e, Err(EngineError::Invalid(m)) if m.contains("multiple of 32")));
    assert!(parse_cache_type("q5_1").is_err());
    assert_eq!(parse_cache_type("Q8_0"), Ok(GgmlType::Q8_0));
}

#[test]
fn spilled_pages_read_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    for ty in [GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_0] {
        let mut ram = KvCache::new(LAYERS, 4096, KV_DIM, HD, &opts(ty, None)).unwrap();
        let page = ram_page_bytes(ty);
        let cfg = SpillConfig {
            dir: dir.path().to_path_buf(),
            ram_budget: 2 * LAYERS * 2 * page,
            io: Default::default(),
        };
        let mut ssd = KvCache::new(LAYERS, 4096, KV_DIM, HD, &opts(ty, Some(cfg))).unwrap();
        fill(&mut ram, 0, 1300);
        fill(&mut ssd, 0, 1300);
        // 6 pages per side, 2 in RAM: the 4 oldest full ones went to disk.
        assert!(ssd.ram_bytes() <= 2 * LAYERS * 2 * page, "{ty:?}");
        assert_eq!(ssd.disk_bytes(), (4 * LAYERS * 2 * page) as u64);
        assert_eq!(rows(&mut ssd), rows(&mut ram), "{ty:?}");
        // A second pass uses the read-ahead.
        assert_eq!(rows(&mut ssd), rows(&mut ram), "{ty:?}");
        let st = ssd.spill_stats().unwrap();
        assert!(st.ahead_hits > 0 && st.bytes_read > 0, "{st:?}");
        // Cutting into a page on disk and writing again brings it back, then re-spills.
        ram.truncate(400).unwrap();
        ssd.truncate(400).unwrap();
        fill(&mut ram, 400, 900);
        fill(&mut ssd, 400, 900);
        assert_eq!(rows(&mut ssd), rows(&mut ram), "{ty:?}");
        assert_eq!(ssd.export(1).unwrap(), ram.export(1).unwrap());
        // An idle cache gives all its RAM back and still reads the same.
        ssd.spill_all().unwrap();
        assert_eq!(ssd.ram_bytes(), 0);
        assert_eq!(rows(&mut ssd), rows(&mut ram), "{ty:?}");
        fill(&mut ram, 900, 1000);
        fill(&mut ssd, 900, 1000);
        assert_eq!(rows(&mut ssd), rows(&mut ram), "{ty:?}");
        // A prefix shared out of pages on disk.
        let mut c = KvCache::new(LAYERS, 4096, KV_DIM, HD, &opts(ty, None)).unwrap();
        c.share_prefix(&ssd, 1000).unwrap();
        assert_eq!(rows(&mut c), rows(&mut ram), "{ty:?}");
    }
    // The spill files were unlinked at once.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

fn ram_page_bytes(ty: GgmlType) -> usize {
    (PAGE_TOKENS * ty.row_bytes(KV_DIM)).next_multiple_of(AlignedBuf::ALIGN)
}

/// Issue 22: `--kv-budget 1M` silently kept 7 MiB. The floor is one page of keys and one of
/// values per layer, and a smaller budget is reported as the floor it acts as.
#[test]
fn a_budget_below_the_floor_acts_as_the_floor_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let ty = GgmlType::F16;
    let page = ram_page_bytes(ty);
    let o = opts(ty, None);
    assert_eq!(o.min_ram_budget(LAYERS, KV_DIM), LAYERS * 2 * page);
    let cfg = SpillConfig {
        dir: dir.path().to_path_buf(),
        ram_budget: 1,
        io: Default::default(),
    };
    let mut c = KvCache::new(LAYERS, 4096, KV_DIM, HD, &opts(ty, Some(cfg))).unwrap();
    fill(&mut c, 0, 600);
    let s = c.spill_stats().expect("spilling");
    assert_eq!(s.ram_budget, LAYERS * 2 * page);
    // Two full pages per side went to disk; the one filling stayed.
    assert_eq!(c.ram_bytes(), LAYERS * 2 * page);
}

/// Rows a speculative draft wrote and then lost: other values than `fill`'s.
fn fill_rejected(cache: &mut KvCache, from: usize, to: usize) {
    for pos in from..to {
        for il in 0..LAYERS {
            let k: Vec<f32> = (0..KV_DIM).map(|i| ((pos + i) % 13) as f32 - 6.0).collect();
            cache.store(il, pos, &k, &k).unwrap();
        }
        cache.set_len(pos + 1).unwrap();
    }
}

/// Every page of every layer and side: where it is, and all its bytes (past the filled rows
/// too), read back from disk for pages there.
fn pages(cache: &KvCache) -> Vec<(char, Vec<u8>)> {
    let mut out = Vec::new();
    for side in cache.layers.iter().flatten() {
        for p in &side.pages {
            out.push(match p {
                Page::Ram(b) => ('r', b.as_slice().to_vec()),
                Page::Disk(off) => {
                    let s = cache.spill.as_ref().unwrap();
                    let b = s.read_page(*off, side.page_bytes()).unwrap();
                    ('d', b.as_slice().to_vec())
                }
                Page::Vram(_) => panic!("no VRAM tier here"),
            });
        }
    }
    out
}

/// Speculative decoding writes a draft's rows and cuts the rejected ones off: the cache must
/// then hold, page by page and tier by tier, what one that never held them holds — in RAM,
/// and under a KV budget whether the cut lands in a page that had gone to disk (it is partial
/// again) or the draft's rows had pushed an older page out to disk (it comes back).
#[test]
fn a_rejected_draft_leaves_the_pages_as_a_plain_run_does() {
    let dir = tempfile::tempdir().unwrap();
    let ty = GgmlType::Q8_0;
    let page = ram_page_bytes(ty);
    let spill = |pages_per_side: usize| SpillConfig {
        dir: dir.path().to_path_buf(),
        ram_budget: pages_per_side * LAYERS * 2 * page,
        io: Default::default(),
    };
    // (RAM budget in pages per side, accepted positions before the draft, rows drafted, kept)
    let cases = [
        (None, 250, 12, 3),
        (Some(1), 250, 12, 3),
        (Some(2), 512, 8, 0),
        (Some(2), 505, 15, 4),
        (Some(1), 700, 16, 16),
    ];
    for (budget, before, drafted, kept) in cases {
        let what = format!("budget {budget:?}, {before} + {kept} of {drafted}");
        let o = opts(ty, budget.map(spill));
        let mut spec = KvCache::new(LAYERS, 4096, KV_DIM, HD, &o).unwrap();
        let mut plain = KvCache::new(LAYERS, 4096, KV_DIM, HD, &o).unwrap();
        fill(&mut spec, 0, before + kept);
        fill_rejected(&mut spec, before + kept, before + drafted);
        spec.truncate(before + kept).unwrap();
        fill(&mut plain, 0, before + kept);
        assert_eq!(spec.len(), plain.len(), "{what}");
        assert!(pages(&spec) == pages(&plain), "{what}: pages differ");
        // And they go on alike.
        fill(&mut spec, before + kept, before + 300);
        fill(&mut plain, before + kept, before + 300);
        assert!(pages(&spec) == pages(&plain), "{what}: pages differ later");
        assert_eq!(rows(&mut spec), rows(&mut plain), "{what}");
    }
}
