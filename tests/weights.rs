//! Model weights: GPT-2 initialisation and the safetensors file format.

use cllm::model::weights::{deserialize_safetensors, serialize_safetensors};
use cllm::model::{load_safetensors, save_safetensors, Model, ParamLayout};
use cllm::ModelConfig;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;

fn std_of(x: &[f32]) -> f64 {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    (x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt()
}

#[test]
fn same_seed_gives_the_same_weights_and_another_seed_does_not() {
    let a = Model::new(ModelConfig::small(), 42);
    let b = Model::new(ModelConfig::small(), 42);
    let c = Model::new(ModelConfig::small(), 43);
    assert!(a.params.iter().zip(&b.params).all(|(x, y)| x.to_bits() == y.to_bits()));
    assert_ne!(a.params, c.params);
}

#[test]
fn initialisation_follows_gpt2() {
    let cfg = ModelConfig::seed();
    let m = Model::new(cfg, 1);
    let residual = 0.02 / (2.0 * cfg.layers as f64).sqrt();
    for spec in &m.layout.tensors {
        let x = m.tensor(&spec.name).unwrap();
        if spec.name.ends_with(".bias") {
            assert!(x.iter().all(|&v| v == 0.0), "{} should be zero", spec.name);
        } else if spec.name.contains("ln_") {
            assert!(x.iter().all(|&v| v == 1.0), "{} should be one", spec.name);
        } else {
            let want = if spec.name.ends_with("c_proj.weight") { residual } else { 0.02 };
            let got = std_of(x);
            assert!((got / want - 1.0).abs() < 0.05, "{}: std {got} want {want}", spec.name);
        }
    }
}

#[test]
fn the_first_weights_of_seed_zero_are_pinned() {
    // Pins the PRNG stream (SplitMix64 + polar method, in src/model/init.rs): the same seed
    // must give the same weights on every machine and in every later version.
    let m = Model::new(ModelConfig::tiny(), 0);
    let bits: Vec<u32> = m.params[..3].iter().map(|x| x.to_bits()).collect();
    assert_eq!(bits, [1017204248, 3161019504, 3159093524], "values {:?}", &m.params[..3]);
}

#[test]
fn parameter_layout_uses_hugging_face_names_and_shapes() {
    let cfg = ModelConfig::small();
    let l = ParamLayout::new(&cfg);
    let c = cfg.embed;
    let shape = |n: &str| l.get(n).map(|s| s.shape.clone());
    assert_eq!(shape("wte.weight"), Some(vec![256, c]));
    assert_eq!(shape("wpe.weight"), Some(vec![cfg.context, c]));
    assert_eq!(shape("h.3.attn.c_attn.weight"), Some(vec![c, 3 * c]));
    assert_eq!(shape("h.3.attn.c_attn.bias"), Some(vec![3 * c]));
    assert_eq!(shape("h.0.attn.c_proj.weight"), Some(vec![c, c]));
    assert_eq!(shape("h.0.mlp.c_fc.weight"), Some(vec![c, 4 * c]));
    assert_eq!(shape("h.0.mlp.c_proj.weight"), Some(vec![4 * c, c]));
    assert_eq!(shape("ln_f.bias"), Some(vec![c]));
    assert_eq!(l.tensors.len(), 2 + 12 * cfg.layers + 2);
    let total: usize = l.tensors.iter().map(|t| t.len()).sum();
    assert_eq!(total, l.num_params());
}

#[test]
fn save_then_load_round_trips_bit_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let m = Model::new(ModelConfig::tiny(), 3);
    save_safetensors(&path, &m).unwrap();
    let back = load_safetensors(&path).unwrap();
    assert_eq!(back.config, m.config);
    assert!(back.params.iter().zip(&m.params).all(|(x, y)| x.to_bits() == y.to_bits()));
}

#[test]
fn the_same_weights_serialize_to_the_same_bytes() {
    let m = Model::new(ModelConfig::tiny(), 3);
    assert_eq!(serialize_safetensors(&m).unwrap(), serialize_safetensors(&m).unwrap());
}

/// Writes a safetensors file from (name, shape, dtype, f32 values) with the given config.
fn craft(tensors: &[(String, Vec<usize>, Dtype, Vec<u8>)], config: Option<&str>) -> Vec<u8> {
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(n, s, d, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    let meta = config.map(|c| HashMap::from([("cllm.config".to_string(), c.to_string())]));
    safetensors::tensor::serialize(views, &meta).unwrap()
}

fn tiny_tensors() -> Vec<(String, Vec<usize>, Dtype, Vec<u8>)> {
    let m = Model::new(ModelConfig::tiny(), 1);
    m.layout
        .tensors
        .iter()
        .map(|s| {
            let bytes = m.params[s.range()].iter().flat_map(|x| x.to_le_bytes()).collect();
            (s.name.clone(), s.shape.clone(), Dtype::F32, bytes)
        })
        .collect()
}

const TINY_JSON: &str = r#"{"vocab":256,"layers":2,"heads":2,"embed":32,"context":16}"#;

fn load_err(bytes: &[u8]) -> String {
    deserialize_safetensors(bytes).expect_err("should be rejected").to_string()
}

#[test]
fn a_missing_tensor_is_named() {
    let mut t = tiny_tensors();
    t.retain(|x| x.0 != "h.1.mlp.c_fc.bias");
    assert!(load_err(&craft(&t, Some(TINY_JSON))).contains("missing tensor \"h.1.mlp.c_fc.bias\""));
}

#[test]
fn a_wrong_shape_is_named() {
    let mut t = tiny_tensors();
    let e = t.iter_mut().find(|x| x.0 == "h.0.attn.c_attn.weight").unwrap();
    e.1 = vec![96, 32]; // transposed: the Conv1D layout is [in, out]
    let msg = load_err(&craft(&t, Some(TINY_JSON)));
    assert!(msg.contains("h.0.attn.c_attn.weight") && msg.contains("[96, 32]"), "{msg}");
}

#[test]
fn a_wrong_dtype_is_named() {
    let mut t = tiny_tensors();
    let e = t.iter_mut().find(|x| x.0 == "ln_f.weight").unwrap();
    e.2 = Dtype::I32;
    let msg = load_err(&craft(&t, Some(TINY_JSON)));
    assert!(msg.contains("ln_f.weight") && msg.contains("I32"), "{msg}");
}

#[test]
fn a_non_finite_value_is_named() {
    let mut t = tiny_tensors();
    let e = t.iter_mut().find(|x| x.0 == "wpe.weight").unwrap();
    e.3[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    let msg = load_err(&craft(&t, Some(TINY_JSON)));
    assert!(msg.contains("wpe.weight") && msg.contains("non-finite"), "{msg}");
}

#[test]
fn an_unknown_tensor_is_named() {
    let mut t = tiny_tensors();
    t.push(("h.7.attn.c_attn.weight".into(), vec![1], Dtype::F32, vec![0; 4]));
    assert!(load_err(&craft(&t, Some(TINY_JSON))).contains("h.7.attn.c_attn.weight"));
}

#[test]
fn missing_config_metadata_is_explained() {
    assert!(load_err(&craft(&tiny_tensors(), None)).contains("cllm.config"));
}

#[test]
fn hugging_face_extras_are_accepted() {
    // GPT2LMHeadModel exports prefix names with `transformer.` and carry mask buffers.
    let mut t: Vec<_> = tiny_tensors().into_iter().map(|(n, s, d, b)| (format!("transformer.{n}"), s, d, b)).collect();
    t.push(("transformer.h.0.attn.bias".into(), vec![1, 1, 16, 16], Dtype::F32, vec![0; 4 * 256]));
    let m = deserialize_safetensors(&craft(&t, Some(TINY_JSON))).unwrap();
    assert_eq!(m.params, Model::new(ModelConfig::tiny(), 1).params);
}

#[test]
fn truncated_and_garbage_files_are_rejected_without_panicking() {
    let bytes = serialize_safetensors(&Model::new(ModelConfig::tiny(), 1)).unwrap();
    for cut in [0, 7, 8, 100, bytes.len() / 2, bytes.len() - 1] {
        assert!(deserialize_safetensors(&bytes[..cut]).is_err(), "cut at {cut}");
    }
    assert!(deserialize_safetensors(b"hello, this is not a model file at all").is_err());
}
