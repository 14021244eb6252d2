//! Hyperparameters a malformed or hostile header gets wrong are refused by name, before any
//! buffer is sized from them (issue 21).

use strata_engine::model::ModelConfig;
use strata_storage::gguf::{GgufBuilder, GgufFile, Value};
use strata_storage::quant::GgmlType;

fn config(arch: &str, extra: &[(&str, Value)]) -> Result<ModelConfig, String> {
    let mut b = GgufBuilder::new();
    b.kv("general.architecture", Value::String(arch.into()))
        .kv(&format!("{arch}.block_count"), Value::U32(2))
        .kv(&format!("{arch}.embedding_length"), Value::U32(64))
        .kv(&format!("{arch}.feed_forward_length"), Value::U32(128))
        .kv(&format!("{arch}.attention.head_count"), Value::U32(4));
    for (k, v) in extra {
        b.kv(&format!("{arch}.{k}"), v.clone());
    }
    let bytes = b.tensor("w", &[8], GgmlType::F32, vec![0; 32]).to_bytes();
    let file = GgufFile::from_bytes(&bytes).map_err(|e| e.to_string())?;
    ModelConfig::from_metadata(&file.metadata, 256).map_err(|e| e.to_string())
}

#[test]
fn a_sound_header_parses() {
    let c = config("llama", &[]).expect("config");
    assert_eq!((c.n_layer, c.head_dim), (2, 16));
    assert!(c.rms_eps > 0.0 && c.rope_base > 0.0);
}

#[test]
fn non_positive_or_non_finite_norms_and_rope_are_refused_by_name() {
    for (key, v) in [
        ("attention.layer_norm_rms_epsilon", 0.0),
        ("attention.layer_norm_rms_epsilon", -1e-6),
        ("attention.layer_norm_rms_epsilon", f32::NAN),
        ("rope.freq_base", 0.0),
        ("rope.freq_base", f32::INFINITY),
    ] {
        let err = config("llama", &[(key, Value::F32(v))]).expect_err(key);
        assert!(
            err.contains(key)
                && (err.contains("not a positive number") || err.contains("expected a finite")),
            "{err}"
        );
    }
    let err = config(
        "llama",
        &[
            ("rope.scaling.type", Value::String("linear".into())),
            ("rope.scaling.factor", Value::F32(-2.0)),
        ],
    )
    .expect_err("negative scaling");
    assert!(err.contains("rope.scaling.factor"), "{err}");
    let c = config(
        "llama",
        &[
            ("rope.scaling.type", Value::String("linear".into())),
            ("rope.scaling.factor", Value::F32(4.0)),
        ],
    )
    .expect("linear scaling");
    assert_eq!(c.rope_freq_scale, 0.25);
}

#[test]
fn an_unknown_architecture_is_quoted_short_and_escaped() {
    let name = format!("\x1b[2J{}", "y".repeat(100_000));
    let err = config(&name, &[]).expect_err("unknown arch");
    assert!(err.len() < 400, "{} bytes", err.len());
    assert!(!err.contains('\x1b'), "{err:?}");
    assert!(err.contains("unknown architecture"), "{err}");
}
