//! Hugging Face interop: the `config.json` of a `GPT2LMHeadModel` (a `GPT2Config`), written
//! into every checkpoint directory and read when a model file has no `cllm.config` metadata.
//!
//! cllm's tensors already use Hugging Face GPT-2's names and layouts (see
//! [`super::weights`]), so a `config.json` is all `GPT2LMHeadModel.from_pretrained(dir)` needs.
//! Reading goes the other way and is strict: every `GPT2Config` setting that changes the model's
//! arithmetic either matches what cllm computes or is an error naming the setting. Nothing is
//! approximated silently (an exact-erf GELU run as the tanh approximation, or an untied output
//! head dropped, would give wrong losses without a word). Settings that only matter to
//! training in PyTorch (dropout) or to other heads (`summary_*`) do not change the forward
//! pass, and are accepted.

use crate::config::ModelConfig;
use crate::error::Result;
use crate::model::layers::LN_EPS;
use crate::{bail, err};
use serde_json::{json, Map, Value};

/// The file name Hugging Face reads beside the weights.
pub const CONFIG_FILE: &str = "config.json";

/// The activations that are GPT-2's tanh approximation, the GELU cllm computes.
const TANH_GELUS: [&str; 2] = ["gelu_new", "gelu_pytorch_tanh"];

/// The `GPT2Config` JSON of `c`: loads with `GPT2LMHeadModel.from_pretrained` as it is.
pub fn config_json(c: &ModelConfig) -> Value {
    json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab,
        "n_positions": c.context,
        "n_embd": c.embed,
        "n_layer": c.layers,
        "n_head": c.heads,
        "n_inner": null,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": LN_EPS,
        "tie_word_embeddings": true,
        "scale_attn_weights": true,
        "scale_attn_by_inverse_layer_idx": false,
        "reorder_and_upcast_attn": false,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        // Byte-level models have no special tokens (GPT2Config's default 50256 would lie
        // outside a 256-entry vocabulary).
        "bos_token_id": null,
        "eos_token_id": null,
        "torch_dtype": "float32",
    })
}

/// The bytes of `config.json` for `c` (pretty, newline-terminated).
pub fn config_bytes(c: &ModelConfig) -> Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(&config_json(c))?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Parses a `GPT2Config` (`config.json`) into the shape cllm runs, refusing every setting it
/// does not compute as Hugging Face would. Absent keys take `GPT2Config`'s defaults, as
/// `from_pretrained` does.
pub fn parse_config(bytes: &[u8]) -> Result<ModelConfig> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| err!("not a valid JSON config: {e}"))?;
    let obj = value.as_object().ok_or_else(|| err!("not a GPT2Config: expected a JSON object"))?;
    check_supported(obj)?;
    let config = ModelConfig {
        vocab: size(obj, "vocab_size", 50257)?,
        layers: size(obj, "n_layer", 12)?,
        heads: size(obj, "n_head", 12)?,
        embed: size(obj, "n_embd", 768)?,
        context: size(obj, "n_positions", 1024)?,
    };
    config.validate().map_err(|e| err!("{e}"))?;
    if let Some(inner) = obj.get("n_inner").filter(|v| !v.is_null()) {
        if inner.as_u64() != Some(4 * config.embed as u64) {
            bail!("n_inner {inner} is not supported: cllm's MLP is 4 x n_embd = {} wide", 4 * config.embed);
        }
    }
    Ok(config)
}

/// Errors for the settings that change the arithmetic in ways cllm does not implement.
fn check_supported(obj: &Map<String, Value>) -> Result<()> {
    if let Some(t) = obj.get("model_type") {
        if t.as_str() != Some("gpt2") {
            bail!("model_type {t} is not supported: cllm runs GPT-2 (\"gpt2\") models");
        }
    }
    if let Some(a) = obj.get("activation_function") {
        if !a.as_str().is_some_and(|a| TANH_GELUS.contains(&a)) {
            bail!(
                "activation_function {a} is not supported: cllm computes GPT-2's tanh GELU (\"gelu_new\" or \"gelu_pytorch_tanh\")"
            );
        }
    }
    if flag(obj, "tie_word_embeddings", true)? != Some(true) {
        bail!("tie_word_embeddings false is not supported: cllm's output head is the token embedding (wte)");
    }
    if flag(obj, "scale_attn_weights", true)? != Some(true) {
        bail!("scale_attn_weights false is not supported: cllm scales attention scores by 1/sqrt(head size)");
    }
    if flag(obj, "scale_attn_by_inverse_layer_idx", false)? != Some(false) {
        bail!("scale_attn_by_inverse_layer_idx true is not supported");
    }
    if flag(obj, "add_cross_attention", false)? != Some(false) {
        bail!("add_cross_attention true is not supported: cllm models are decoder-only");
    }
    if let Some(eps) = obj.get("layer_norm_epsilon") {
        if eps.as_f64().map(|e| e as f32) != Some(LN_EPS) {
            bail!("layer_norm_epsilon {eps} is not supported: cllm's layer norm uses {LN_EPS:e}");
        }
    }
    Ok(())
}

/// A boolean setting, `default` where absent or null; `None` is never returned for a valid
/// value, and a non-boolean is an error.
fn flag(obj: &Map<String, Value>, key: &str, default: bool) -> Result<Option<bool>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(Some(default)),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => bail!("{key} {v} is not a boolean"),
    }
}

/// A positive integer setting, `default` where absent.
fn size(obj: &Map<String, Value>, key: &str, default: usize) -> Result<usize> {
    match obj.get(key) {
        None => Ok(default),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| err!("{key} {v} is not a positive integer")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(key: &str, value: Value) -> Vec<u8> {
        let mut v = config_json(&ModelConfig::tiny());
        v[key] = value;
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn written_config_parses_back_to_the_same_shape() {
        for c in [ModelConfig::tiny(), ModelConfig::small(), ModelConfig::seed()] {
            assert_eq!(parse_config(&config_bytes(&c).unwrap()).unwrap(), c);
        }
    }

    #[test]
    fn absent_keys_take_gpt2_defaults() {
        let c = parse_config(b"{}").unwrap();
        assert_eq!((c.vocab, c.layers, c.heads, c.embed, c.context), (50257, 12, 12, 768, 1024));
    }

    #[test]
    fn settings_cllm_does_not_compute_are_errors_naming_them() {
        for (key, value, named) in [
            ("activation_function", json!("gelu"), "activation_function"),
            ("activation_function", json!("relu"), "activation_function"),
            ("tie_word_embeddings", json!(false), "tie_word_embeddings"),
            ("scale_attn_weights", json!(false), "scale_attn_weights"),
            ("scale_attn_by_inverse_layer_idx", json!(true), "scale_attn_by_inverse_layer_idx"),
            ("add_cross_attention", json!(true), "add_cross_attention"),
            ("layer_norm_epsilon", json!(1e-6), "layer_norm_epsilon"),
            ("model_type", json!("llama"), "model_type"),
            ("n_inner", json!(100), "n_inner"),
            ("n_layer", json!(0), "n_layer"),
            ("n_embd", json!(-3), "n_embd"),
            ("n_head", json!(3), "heads"),
            ("n_layer", json!(1_000_000), "layers"),
        ] {
            let e = parse_config(&with(key, value.clone())).expect_err(&format!("{key} {value}")).to_string();
            assert!(e.contains(named), "{key} {value}: {e}");
        }
    }

    #[test]
    fn training_only_settings_are_accepted() {
        let mut v = config_json(&ModelConfig::tiny());
        v["resid_pdrop"] = json!(0.1);
        v["summary_type"] = json!("cls_index");
        v["activation_function"] = json!("gelu_pytorch_tanh");
        v["n_inner"] = json!(4 * 32);
        assert_eq!(parse_config(&serde_json::to_vec(&v).unwrap()).unwrap(), ModelConfig::tiny());
    }
}
