//! The planner's decisions, case by case, on synthetic models of known sizes and on shipped
//! profiles.

use std::collections::HashMap;

use strata_storage::quant::GgmlType;

use super::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn mat(name: &str, ty: GgmlType, rows: u64, cols: u64) -> MatDesc {
    MatDesc {
        name: name.into(),
        ty,
        rows,
        cols,
        bytes: ty.row_bytes(cols as usize) as u64 * rows,
    }
}

/// A llama-like dense model: `n_layer` layers of width `e`, FFN `ff`, Q4_K weights.
fn dense(n_layer: usize, e: u64, ff: u64, vocab: u64) -> ModelDesc {
    let q = GgmlType::Q4K;
    let layers = (0..n_layer)
        .map(|il| LayerDesc {
            attn: vec![
                mat(&format!("blk.{il}.attn_q.weight"), q, e, e),
                mat(&format!("blk.{il}.attn_k.weight"), q, e / 4, e),
                mat(&format!("blk.{il}.attn_v.weight"), q, e / 4, e),
                mat(&format!("blk.{il}.attn_output.weight"), q, e, e),
            ],
            ffn: vec![
                mat(&format!("blk.{il}.ffn_gate.weight"), q, ff, e),
                mat(&format!("blk.{il}.ffn_up.weight"), q, ff, e),
                mat(&format!("blk.{il}.ffn_down.weight"), GgmlType::Q6K, e, ff),
            ],
            experts: None,
            vector_bytes: 8 * e,
            kv_values_per_token: 2 * e / 4,
            window: None,
        })
        .collect();
    ModelDesc {
        name: "dense".into(),
        arch: "llama".into(),
        n_embd: e,
        n_vocab: vocab,
        layers,
        embedding: mat("token_embd.weight", q, vocab, e),
        output: mat("output.weight", GgmlType::Q6K, vocab, e),
        tied_output: false,
        vector_bytes: 4 * e,
    }
}

/// A qwen3moe-like model: 128 experts of width `eff`, 8 used.
fn moe(n_layer: usize) -> ModelDesc {
    let mut m = dense(n_layer, 2048, 0, 151936);
    let q = GgmlType::Q4K;
    for (il, l) in m.layers.iter_mut().enumerate() {
        l.ffn = vec![mat(
            &format!("blk.{il}.ffn_gate_inp.weight"),
            GgmlType::F32,
            128,
            2048,
        )];
        l.experts = Some(ExpertsDesc {
            n_expert: 128,
            n_used: 8,
            slabs: vec![
                mat(&format!("blk.{il}.ffn_gate_exps.weight"), q, 768, 2048),
                mat(&format!("blk.{il}.ffn_up_exps.weight"), q, 768, 2048),
                mat(
                    &format!("blk.{il}.ffn_down_exps.weight"),
                    GgmlType::Q6K,
                    2048,
                    768,
                ),
            ],
        });
    }
    m.name = "moe".into();
    m
}

fn hw(name: &str) -> HwProfile {
    profile::shipped(name).unwrap_or_else(|| panic!("shipped profile {name}"))
}

#[test]
fn every_shipped_profile_parses_and_round_trips() {
    for (name, _) in profile::SHIPPED {
        let p = hw(name);
        assert_eq!(&p.name, name);
        assert_eq!(HwProfile::from_toml(&p.to_toml()).unwrap(), p);
    }
}

#[test]
fn bad_profiles_are_refused_with_the_field() {
    let mut p = hw("rtx4090");
    p.cpu.attention_gbs = 0.0;
    let e = HwProfile::from_toml(&p.to_toml()).unwrap_err();
    assert!(e.contains("cpu.attention_gbs"), "{e}");
    let e = HwProfile::from_toml("name = 3").unwrap_err();
    assert!(e.contains("name"), "{e}");
    assert!(HwProfile::load("no-such-profile").is_err());
}

#[test]
fn cpu_only_fits_in_ram() {
    let m = dense(28, 1536, 8960, 151936);
    let p = plan(
        &m,
        &hw("cpu-2core"),
        &Budgets::default(),
        &Overrides::default(),
    )
    .unwrap();
    assert!(p.gpu.is_none());
    assert!(
        p.layers
            .iter()
            .all(|l| l.attn == Place::CPU && l.ffn == Place::CPU && l.attend == Exec::Cpu)
    );
    assert_eq!(p.weights.vram, 0);
    assert_eq!(p.weights.ssd, 0);
    assert_eq!(p.decode.bottleneck, Bottleneck::CpuCompute);
}

#[test]
fn cpu_only_under_a_ram_budget_streams_the_last_layers_from_disk() {
    let m = dense(28, 1536, 8960, 151936);
    let b = Budgets {
        ram: Some(m.total_bytes() / 3),
        ..Budgets::default()
    };
    let p = plan(&m, &hw("cpu-2core"), &b, &Overrides::default()).unwrap();
    assert_eq!(
        p.layers[0].attn.tier,
        Tier::Ram,
        "layers from 0 stay resident"
    );
    assert_eq!(p.layers[27].ffn.tier, Tier::Ssd);
    assert!(p.weights.ssd > m.total_bytes() / 2);
    assert!(p.decode.disk_s > 0.0);
}

#[test]
fn a_model_that_fits_runs_entirely_on_the_gpu() {
    let m = dense(32, 4096, 14336, 32000);
    let p = plan(
        &m,
        &hw("h100-sxm"),
        &Budgets::default(),
        &Overrides::default(),
    )
    .unwrap();
    assert_eq!(p.gpu_layers(), 32);
    assert!(
        p.layers
            .iter()
            .all(|l| l.attn == Place::GPU && l.ffn == Place::GPU && l.kv == Tier::Vram)
    );
    assert_eq!(p.output, Place::GPU);
    assert_eq!(p.decode.bottleneck, Bottleneck::GpuCompute);
    assert_eq!(
        p.weights.ram,
        m.vector_bytes + m.embedding.bytes,
        "only the embedding rows stay on the host"
    );
    // A 7B Q4 model on an H100: a few ms a token (llama.cpp reports 143-164 t/s on H100 PCIe).
    assert!(
        p.decode.tokens_per_s > 100.0 && p.decode.tokens_per_s < 1000.0,
        "{:?}",
        p.decode
    );
}

#[test]
fn ngl_half_puts_the_last_layers_and_the_output_on_the_gpu() {
    let m = dense(32, 4096, 14336, 32000);
    let o = Overrides {
        n_gpu_layers: Some(17),
        ..Overrides::default()
    };
    let p = plan(&m, &hw("rtx4090"), &Budgets::default(), &o).unwrap();
    // llama.cpp: the output counts as the last of n_layer + 1, so 17 = output + 16 layers.
    assert_eq!(p.output, Place::GPU);
    assert_eq!(p.gpu_layers(), 16);
    assert_eq!(p.layers[15].attn, Place::CPU);
    assert_eq!(p.layers[16].attn, Place::GPU);
    assert!(
        p.decode.crossing_s > 0.0,
        "the hidden state crosses once at layer 16"
    );
}

#[test]
fn ngl_that_does_not_fit_names_the_bytes() {
    let m = dense(32, 4096, 14336, 32000);
    let o = Overrides {
        n_gpu_layers: Some(99),
        ..Overrides::default()
    };
    let b = Budgets {
        vram: Some(2 * GIB),
        ..Budgets::default()
    };
    match plan(&m, &hw("rtx4090"), &b, &o) {
        Err(PlanError::VramTooSmall { needed, budget, .. }) => {
            assert_eq!(budget, 2 * GIB);
            assert!(needed > 3 * GIB, "{needed}");
            let msg = plan(&m, &hw("rtx4090"), &b, &o).unwrap_err().to_string();
            assert!(
                msg.contains(&needed.to_string()) && msg.contains("VRAM"),
                "{msg}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn no_kv_offload_keeps_attention_on_the_cpu() {
    let m = dense(32, 4096, 14336, 32000);
    let o = Overrides {
        no_kv_offload: true,
        ..Overrides::default()
    };
    let b = Budgets {
        n_ctx: 16384,
        depth: 16000,
        ..Budgets::default()
    };
    let p = plan(&m, &hw("h100-sxm"), &b, &o).unwrap();
    assert!(
        p.layers
            .iter()
            .all(|l| l.attn == Place::GPU && l.attend == Exec::Cpu && l.kv == Tier::Ram)
    );
    assert_eq!(p.kv.vram, 0);
    assert!(p.kv.ram > GIB);
    assert!(p.decode.crossing_s > 0.0 && p.decode.cpu_s > 0.0);
}

#[test]
fn a_vram_budget_below_the_model_keeps_the_first_layers_off_the_gpu() {
    let m = dense(32, 4096, 14336, 32000);
    let b = Budgets {
        vram: Some(m.total_bytes() / 2 + 768 * MIB),
        ..Budgets::default()
    };
    let p = plan(&m, &hw("rtx4090"), &b, &Overrides::default()).unwrap();
    assert!(p.layers[31].attn.tier == Tier::Vram && p.layers[0].attn.tier != Tier::Vram);
    assert!(p.weights.vram <= m.total_bytes() / 2 + 768 * MIB);
    let off: Vec<&LayerPlan> = p
        .layers
        .iter()
        .filter(|l| l.attn.tier != Tier::Vram)
        .collect();
    assert!(!off.is_empty());
}

#[test]
fn layers_off_the_gpu_are_streamed_while_pcie_has_time_to_spare() {
    // PCIe copies overlap compute: streaming some of the layers that do not fit VRAM takes
    // their time off the serial compute, until the PCIe time catches up with it.
    let m = dense(32, 4096, 14336, 32000);
    let b = Budgets {
        vram: Some(2 * GIB),
        ..Budgets::default()
    };
    for name in ["laptop-8g", "rtx4090", "h100-sxm"] {
        let h = hw(name);
        let p = plan(&m, &h, &b, &Overrides::default()).unwrap();
        let mut all_cpu = p.layers.clone();
        for l in &mut all_cpu {
            if l.attn.tier != Tier::Vram {
                l.attn.exec = Exec::Cpu;
            }
            if l.ffn.tier != Tier::Vram {
                l.ffn.exec = Exec::Cpu;
            }
        }
        let base = cost::decode(&m, &h, &all_cpu, p.output, &b);
        let streamed = p
            .layers
            .iter()
            .flat_map(|l| [l.attn, l.ffn])
            .filter(|g| g.tier == Tier::Ram && g.exec == Exec::Gpu)
            .count();
        assert!(streamed > 0, "{name}: {}", p.explain(&m, &h));
        assert!(p.decode.tokens_per_s > base.tokens_per_s, "{name}");
        let compute = p.decode.cpu_s + p.decode.gpu_s + p.decode.crossing_s;
        assert!(p.decode.pcie_s <= compute * 1.1, "{name}: {:?}", p.decode);
    }
}

#[test]
fn moe_larger_than_vram_splits_experts_over_three_tiers() {
    let m = moe(48);
    let total = m.total_bytes();
    let b = Budgets {
        vram: Some(total / 4),
        ram: Some(total / 3),
        ..Budgets::default()
    };
    let p = plan(&m, &hw("rtx4090"), &b, &Overrides::default()).unwrap();
    for l in &p.layers {
        let e = l.experts.unwrap();
        assert!(e.vram > 0 && e.ram > 0 && e.ssd > 0, "{e:?}");
        assert_eq!(e.vram + e.ram + e.ssd, 128);
    }
    let e = p.layers[0].experts.unwrap();
    assert!(
        p.layers.iter().all(|l| l.attn == Place::GPU),
        "dense parts first"
    );
    assert!(
        e.gpu_min_tokens > 1 && e.gpu_min_tokens < 4096,
        "{}",
        e.gpu_min_tokens
    );
    assert!(p.weights.ssd > 0 && p.decode.disk_s > 0.0);
}

#[test]
fn cpu_moe_keeps_experts_on_the_cpu() {
    let m = moe(8);
    let o = Overrides {
        n_cpu_moe: Some(usize::MAX),
        ..Overrides::default()
    };
    let p = plan(&m, &hw("h100-sxm"), &Budgets::default(), &o).unwrap();
    assert!(
        p.layers
            .iter()
            .all(|l| l.experts.unwrap().vram == 0 && l.attn == Place::GPU)
    );
}

#[test]
fn gpu_words_without_a_gpu_are_refused() {
    let m = dense(4, 512, 1024, 1000);
    let o = Overrides {
        n_gpu_layers: Some(4),
        ..Overrides::default()
    };
    assert_eq!(
        plan(&m, &hw("cpu-2core"), &Budgets::default(), &o),
        Err(PlanError::NoGpu("-ngl"))
    );
}

#[test]
fn pins_move_single_groups() {
    let m = dense(8, 1024, 4096, 32000);
    let mut pins = HashMap::new();
    pins.insert("blk.3.attn_q.weight".to_string(), PinTarget::Cpu);
    let o = Overrides {
        pins,
        ..Overrides::default()
    };
    let p = plan(&m, &hw("rtx4090"), &Budgets::default(), &o).unwrap();
    assert_eq!(p.layers[3].attn, Place::CPU);
    assert_eq!(p.layers[3].ffn, Place::GPU);
    assert_eq!(p.layers[2].attn, Place::GPU);
}

#[test]
fn the_explanation_names_placement_tiers_and_the_limit() {
    let m = dense(32, 4096, 14336, 32000);
    let o = Overrides {
        n_gpu_layers: Some(17),
        ..Overrides::default()
    };
    let h = hw("rtx4090");
    let p = plan(&m, &h, &Budgets::default(), &o).unwrap();
    let s = p.explain(&m, &h);
    assert!(
        s.contains("layers 0-15") && s.contains("layers 16-31"),
        "{s}"
    );
    assert!(s.contains("CPU (RAM)") && s.contains("GPU (VRAM)"), "{s}");
    assert!(
        s.contains("decode at depth 0") && s.contains("limited by"),
        "{s}"
    );
}

#[test]
fn real_models_describe_themselves_from_their_tensor_tables() {
    let store = std::env::var_os("STRATA_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| std::path::PathBuf::from(h).join(".local/share/strata"))
        });
    let Some(store) = store else { return };
    for (name, layers, tied) in [("gemma3-270m", 18, true), ("qwen2.5-coder-1.5b", 28, false)] {
        let path = store.join("models").join(format!("{name}.gguf"));
        if !path.exists() {
            eprintln!("skipping {name}: not in the store");
            continue;
        }
        let g = strata_storage::gguf::GgufFile::open(&path).unwrap();
        let m = ModelDesc::from_gguf(name, &g).unwrap();
        assert_eq!(m.layers.len(), layers);
        assert_eq!(m.tied_output, tied);
        let file = std::fs::metadata(&path).unwrap().len();
        assert!(
            m.total_bytes() <= file && m.total_bytes() > file * 9 / 10,
            "{name}: {} of {file}",
            m.total_bytes()
        );
        let p = plan(
            &m,
            &hw("cpu-2core"),
            &Budgets::default(),
            &Overrides::default(),
        )
        .unwrap();
        assert!(p.decode.tokens_per_s > 1.0);
    }
}

#[test]
fn a_profile_keeps_the_decode_kernels_calibrate_chose() {
    use strata_simd::tune::{Decode, Tuning};
    let mut p = hw("cpu-2core");
    assert_eq!(p.decode, None, "shipped profiles name no CPU's kernels");
    p.decode = Some(profile::DecodeProfile {
        cpu: "Some CPU (avx2)".into(),
        kernels: "Q4_K=rows Q6_K=interleaved256/9216".into(),
        revision: strata_simd::tune::REVISION,
    });
    let back = HwProfile::from_toml(&p.to_toml()).expect("round trip");
    assert_eq!(back, p);
    let d = back.decode.expect("decode");
    let base = Tuning::default_for(strata_simd::dispatch::Level::Scalar);
    let t = d.tuning(base).expect("tuning");
    assert_eq!(t.decode(strata_storage::quant::GgmlType::Q4K), Decode::Rows);
    assert_eq!(t.prefetch(strata_storage::quant::GgmlType::Q6K), 9216);
    // A malformed choice is refused at load, naming the field and the item.
    let bad = p.to_toml().replace("Q4_K=rows", "Q4_K=fastest");
    let e = HwProfile::from_toml(&bad).expect_err("bad kernels");
    assert!(
        e.contains("decode.kernels") && e.contains("Q4_K=fastest"),
        "{e}"
    );
}

/// The decode choice a first load measures is kept in a file for later loads: read back as
/// written, the first choice for a CPU kept when a second process measures at the same time,
/// another CPU's or a malformed file replaced, and a malformed file named in the error.
#[test]
fn the_decode_memory_file_keeps_the_first_choice_for_a_cpu() {
    use profile::DecodeProfile;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sub").join("decode.toml");
    assert_eq!(DecodeProfile::recall(&path), Ok(None), "no file yet");
    let mine = DecodeProfile {
        cpu: "CPU A (avx512vnni)".into(),
        kernels: "Q4_K=interleaved256/4608 Q6_K=rows".into(),
        revision: strata_simd::tune::REVISION,
    };
    assert_eq!(mine.remember(&path), Ok(mine.clone()));
    assert_eq!(DecodeProfile::recall(&path), Ok(Some(mine.clone())));
    // Another process on the same CPU measured otherwise: the first choice stands.
    let late = DecodeProfile {
        kernels: "Q4_K=interleaved512/4608".into(),
        ..mine.clone()
    };
    assert_eq!(late.remember(&path), Ok(mine.clone()));
    // A later model's other types are added to the choice; the types it names keep theirs.
    let more = DecodeProfile {
        kernels: "Q4_K=rows Q8_0=interleaved512/1088".into(),
        ..mine.clone()
    };
    let both = DecodeProfile {
        kernels: "Q4_K=interleaved256/4608 Q6_K=rows Q8_0=interleaved512/1088".into(),
        ..mine.clone()
    };
    assert_eq!(more.remember(&path), Ok(both.clone()));
    assert_eq!(DecodeProfile::recall(&path), Ok(Some(both.clone())));
    use strata_storage::quant::GgmlType;
    assert_eq!(both.types(), [GgmlType::Q4K, GgmlType::Q6K, GgmlType::Q8_0]);
    // Another CPU (a home directory shared, a VM moved): its choice replaces the file.
    let other = DecodeProfile {
        cpu: "CPU B (avx2)".into(),
        kernels: "Q4_K=rows".into(),
        ..mine.clone()
    };
    assert_eq!(other.remember(&path), Ok(other.clone()));
    assert_eq!(DecodeProfile::recall(&path), Ok(Some(other.clone())));
    // A choice this CPU's older kernels measured (a file from before the revision was kept):
    // read as revision 1, not applied, and replaced by the next choice kept.
    std::fs::write(
        &path,
        "cpu = \"CPU A (avx512vnni)\"\nkernels = \"Q4_K=rows\"\n",
    )
    .expect("write");
    let old = DecodeProfile::recall(&path)
        .expect("read")
        .expect("a choice");
    assert_eq!(old.revision, 1);
    assert_eq!(mine.mismatch(&mine.cpu), None);
    let why = old.mismatch(&mine.cpu).expect("older kernels");
    assert!(why.contains("revision 1"), "{why}");
    assert_eq!(mine.remember(&path), Ok(mine.clone()));
    assert!(
        other
            .mismatch(&mine.cpu)
            .expect("another CPU")
            .contains("CPU B")
    );
    // A malformed file: named in the error when read, replaced when a choice is kept.
    std::fs::write(&path, "cpu = \"CPU A\"\nkernels = \"Q4_K=fastest\"\n").expect("write");
    let e = DecodeProfile::recall(&path).expect_err("malformed");
    assert!(
        e.contains("decode.toml") && e.contains("Q4_K=fastest"),
        "{e}"
    );
    std::fs::write(&path, "\u{0}\u{1}not toml").expect("write");
    assert!(DecodeProfile::recall(&path).is_err());
    assert_eq!(mine.remember(&path), Ok(mine.clone()));
    // No temporary files are left beside it.
    let names: Vec<_> = std::fs::read_dir(path.parent().expect("dir"))
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, ["decode.toml"]);
}

/// Processes that keep choices for different types at once take turns: none of them is lost
/// (each writes the whole file, so without the lock the last rename would drop the others').
#[test]
fn choices_kept_at_once_are_all_kept() {
    use profile::DecodeProfile;
    use strata_simd::tune::{TYPES, Tuning};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("decode.toml");
    let base = Tuning::default_for(strata_simd::dispatch::Level::Scalar);
    std::thread::scope(|s| {
        for ty in TYPES {
            let path = &path;
            s.spawn(move || {
                let mine = DecodeProfile::measured("CPU A (avx2)".into(), &base, &[ty]);
                let kept = mine.remember(path).expect("remember");
                assert!(kept.types().contains(&ty), "{}", kept.kernels);
            });
        }
    });
    let kept = DecodeProfile::recall(&path)
        .expect("read")
        .expect("a choice");
    let mut types = kept.types();
    types.sort_by_key(|t| TYPES.iter().position(|u| u == t));
    assert_eq!(types, TYPES, "{}", kept.kernels);
}
