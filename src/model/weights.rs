//! A model's weights in memory ([`Model`]) and on disk as safetensors with Hugging Face GPT-2
//! tensor names and layouts, F32, with the config as JSON under the metadata key `cllm.config`.

use super::init::init_gpt2;
use super::params::ParamLayout;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::{bail, err};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::path::Path;

/// Metadata key holding the config JSON.
pub const CONFIG_KEY: &str = "cllm.config";

/// Tensors other tools write that carry no learned state (causal-mask buffers, the tied
/// output head): accepted and ignored on load.
const IGNORED_SUFFIXES: [&str; 2] = [".attn.bias", ".attn.masked_bias"];
const IGNORED_NAMES: [&str; 1] = ["lm_head.weight"];

/// A config, its parameter layout, and the flat parameter buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    pub config: ModelConfig,
    pub layout: ParamLayout,
    pub params: Vec<f32>,
}

impl Model {
    /// A freshly initialised model (GPT-2 init, deterministic in `seed`).
    pub fn new(config: ModelConfig, seed: u64) -> Self {
        let layout = ParamLayout::new(&config);
        let mut params = vec![0.0f32; layout.num_params()];
        init_gpt2(&layout, &mut params, seed);
        Model { config, layout, params }
    }

    /// Wraps an existing parameter buffer, checking its length.
    pub fn from_params(config: ModelConfig, params: Vec<f32>) -> Result<Self> {
        config.validate().map_err(Error)?;
        let layout = ParamLayout::new(&config);
        if params.len() != layout.num_params() {
            bail!("parameter buffer has {} values, config {:?} needs {}", params.len(), config, layout.num_params());
        }
        Ok(Model { config, layout, params })
    }

    /// The named tensor's values.
    pub fn tensor(&self, name: &str) -> Option<&[f32]> {
        self.layout.get(name).map(|s| &self.params[s.range()])
    }
}

/// The safetensors bytes of `model`.
pub fn serialize_safetensors(model: &Model) -> Result<Vec<u8>> {
    let bytes: Vec<u8> = model.params.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut views = Vec::with_capacity(model.layout.tensors.len());
    for spec in &model.layout.tensors {
        let data = &bytes[spec.offset * 4..(spec.offset + spec.len()) * 4];
        let view = TensorView::new(Dtype::F32, spec.shape.clone(), data)
            .map_err(|e| err!("cannot serialize tensor {}: {e}", spec.name))?;
        views.push((spec.name.clone(), view));
    }
    // One metadata key only: safetensors writes a HashMap in iteration order, which varies
    // between processes, and the same weights must give the same bytes.
    let mut meta = HashMap::new();
    meta.insert(CONFIG_KEY.to_string(), serde_json::to_string(&model.config)?);
    safetensors::tensor::serialize(views, &Some(meta)).map_err(|e| err!("cannot serialize model: {e}"))
}

/// Writes `model` to `path` (plain write; callers wanting atomicity write to a temp path and
/// rename, as the checkpoint module does).
pub fn save_safetensors(path: &Path, model: &Model) -> Result<()> {
    let bytes = serialize_safetensors(model)?;
    std::fs::write(path, bytes).map_err(|e| err!("cannot write {}: {e}", path.display()))
}

/// Reads a model from `path`; errors name the file and the offending tensor.
pub fn load_safetensors(path: &Path) -> Result<Model> {
    if path.is_dir() {
        bail!("{}: is a directory, expected a .safetensors file", path.display());
    }
    let bytes = std::fs::read(path).map_err(|e| err!("cannot read {}: {e}", path.display()))?;
    deserialize_safetensors(&bytes).map_err(|e| e.context(path.display()))
}

/// Parses safetensors bytes into a model, checking names, shapes, dtype and finiteness.
pub fn deserialize_safetensors(bytes: &[u8]) -> Result<Model> {
    let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| err!("not a valid safetensors file: {e:?}"))?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| err!("not a valid safetensors file: {e:?}"))?;
    let config_json = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get(CONFIG_KEY))
        .ok_or_else(|| err!("missing metadata key \"{CONFIG_KEY}\" (the model config as JSON)"))?;
    let config: ModelConfig =
        serde_json::from_str(config_json).map_err(|e| err!("metadata \"{CONFIG_KEY}\" is not a valid config: {e}"))?;
    config.validate().map_err(|e| err!("metadata \"{CONFIG_KEY}\": {e}"))?;
    let layout = ParamLayout::new(&config);
    let mut params = vec![0.0f32; layout.num_params()];

    // Accept the `transformer.` prefix that GPT2LMHeadModel exports use.
    let mut by_name: HashMap<String, TensorView> = HashMap::new();
    for (name, view) in st.tensors() {
        let short = name.strip_prefix("transformer.").unwrap_or(&name).to_string();
        if IGNORED_NAMES.contains(&short.as_str()) || IGNORED_SUFFIXES.iter().any(|s| short.ends_with(s)) {
            continue;
        }
        if layout.get(&short).is_none() {
            bail!("unexpected tensor \"{name}\" for config {}", config_summary(&config));
        }
        by_name.insert(short, view);
    }
    for spec in &layout.tensors {
        let view = by_name
            .get(&spec.name)
            .ok_or_else(|| err!("missing tensor \"{}\" (expected shape {:?})", spec.name, spec.shape))?;
        if view.dtype() != Dtype::F32 {
            bail!("tensor \"{}\": dtype {:?}, expected F32", spec.name, view.dtype());
        }
        if view.shape() != spec.shape.as_slice() {
            bail!("tensor \"{}\": shape {:?}, expected {:?}", spec.name, view.shape(), spec.shape);
        }
        let dst = &mut params[spec.range()];
        for (i, (d, chunk)) in dst.iter_mut().zip(view.data().chunks_exact(4)).enumerate() {
            let x = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            if !x.is_finite() {
                bail!("tensor \"{}\": non-finite value {x} at flat index {i}", spec.name);
            }
            *d = x;
        }
    }
    Ok(Model { config, layout, params })
}

fn config_summary(c: &ModelConfig) -> String {
    format!("(layers {}, heads {}, embed {}, context {}, vocab {})", c.layers, c.heads, c.embed, c.context, c.vocab)
}
