//! A model's weights in memory ([`Model`]) and on disk as safetensors with Hugging Face GPT-2
//! tensor names and layouts, F32, with the config as JSON under the metadata key `cllm.config`.
//!
//! A file without that key (a `GPT2LMHeadModel.save_pretrained` export) is read with the
//! Hugging Face `config.json` beside it ([`super::hf`]); where both exist they must agree. An
//! `lm_head.weight` is accepted only as a copy of `wte.weight` (a tied head): cllm has no
//! separate output head, and dropping a different one would give wrong results silently.

use super::hf;
use super::init::init_gpt2;
use super::params::ParamLayout;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::{bail, err};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Metadata key holding the config JSON.
pub const CONFIG_KEY: &str = "cllm.config";

/// Tensors other tools write that carry no learned state (causal-mask buffers): accepted and
/// ignored on load.
const IGNORED_SUFFIXES: [&str; 2] = [".attn.bias", ".attn.masked_bias"];
/// The output head of an export; must equal `wte.weight` (a tied head).
const LM_HEAD: &str = "lm_head.weight";
/// Largest `config.json` read.
const MAX_HF_CONFIG_BYTES: u64 = 1 << 20;

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
    read_model_file(path)?.parse().map_err(|e| e.context(path.display()))
}

/// A model file read into memory, and the config it is parsed with.
pub struct ModelFile {
    pub bytes: Vec<u8>,
    pub config: ModelConfig,
}

impl ModelFile {
    /// The model: names, shapes, dtype and finiteness checked (see [`deserialize_safetensors`]).
    pub fn parse(&self) -> Result<Model> {
        deserialize_with_config(&self.bytes, self.config)
    }
}

/// The safetensors header fields cllm reads before the whole file: only the metadata.
#[derive(serde::Deserialize)]
struct HeaderMetadata {
    #[serde(rename = "__metadata__")]
    metadata: Option<HashMap<String, String>>,
}

/// Largest safetensors header read (the `safetensors` crate's own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Reads a model file whole, but only after its config (see [`file_config`]) has passed
/// [`ModelConfig::validate`] and the file's length is at most what that config's tensors (plus
/// the ignored buffers other tools add) can occupy: nothing is allocated from a declared size
/// that the file on disk does not back. Only regular files are read (a FIFO would block).
pub fn read_model_file(path: &Path) -> Result<ModelFile> {
    let shown = path.display();
    let (header, header_len) = read_header(path)?;
    let config = file_config(path, header.metadata.as_ref())?;
    let cap = max_file_bytes(&config, header_len)
        .ok_or_else(|| err!("{shown}: config {}: the model is too large to load", config.summary()))?;
    let what = format!("model file of config {}", config.summary());
    let bytes = crate::data::text::read_regular_file(path, cap, &what)?;
    Ok(ModelFile { bytes, config })
}

/// The config of the model file `path`: its `cllm.config` metadata, else the Hugging Face
/// `config.json` in the same directory. Where both exist, they must describe the same shape.
fn file_config(path: &Path, metadata: Option<&HashMap<String, String>>) -> Result<ModelConfig> {
    let beside = path.parent().map(|d| d.join(hf::CONFIG_FILE)).filter(|p| p.exists());
    let from_hf = beside.as_deref().map(read_hf_config).transpose()?;
    if metadata.is_some_and(|m| m.contains_key(CONFIG_KEY)) {
        let config = config_from_metadata(metadata).map_err(|e| e.context(path.display()))?;
        if let (Some(h), Some(p)) = (from_hf, &beside) {
            if h != config {
                bail!(
                    "{} describes {} but the metadata \"{CONFIG_KEY}\" of {} describes {}: which is right is a guess",
                    p.display(),
                    h.summary(),
                    path.display(),
                    config.summary()
                );
            }
        }
        return Ok(config);
    }
    from_hf.ok_or_else(|| {
        err!(
            "{}: missing metadata key \"{CONFIG_KEY}\" (the model config as JSON) and no {} beside it",
            path.display(),
            hf::CONFIG_FILE
        )
    })
}

/// A Hugging Face `config.json`, read (bounded) and checked by [`hf::parse_config`].
fn read_hf_config(path: &Path) -> Result<ModelConfig> {
    let bytes = crate::data::text::read_regular_file(path, MAX_HF_CONFIG_BYTES, "Hugging Face config.json")?;
    hf::parse_config(&bytes).map_err(|e| e.context(path.display()))
}

/// The header of the safetensors file `path` and its length, read with a bounded buffer.
fn read_header(path: &Path) -> Result<(HeaderMetadata, u64)> {
    use std::io::Read;
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| crate::data::text::io_error(path, &e))?;
    // The size is bounded later, once the header's config says what the file may hold.
    crate::data::text::check_regular_file(path, &meta, u64::MAX, ".safetensors model file")?;
    let mut file = std::fs::File::open(path).map_err(|e| crate::data::text::io_error(path, &e))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|_| err!("{shown}: not a valid safetensors file: shorter than its 8-byte header length"))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER_BYTES || n > meta.len().saturating_sub(8) {
        bail!("{shown}: not a valid safetensors file: header length {n} exceeds the file ({} bytes) or {MAX_HEADER_BYTES}", meta.len());
    }
    let mut header = Vec::with_capacity(n as usize);
    file.take(n).read_to_end(&mut header).map_err(|e| crate::data::text::io_error(path, &e))?;
    let parsed =
        serde_json::from_slice(&header).map_err(|e| err!("{shown}: not a valid safetensors file: header: {e}"))?;
    Ok((parsed, n))
}

/// The bytes a model file of `config` with a header of `header_len` bytes may hold at most:
/// its F32 tensors, plus what GPT-2 exports add and the loader ignores (per layer `attn.bias`
/// and `attn.masked_bias`, each at most context² values, and an untied `lm_head.weight`).
fn max_file_bytes(config: &ModelConfig, header_len: u64) -> Option<u64> {
    let params = u64::try_from(config.checked_num_params()?).ok()?;
    let t = config.context as u64;
    let masks = (config.layers as u64).checked_mul(2)?.checked_mul(t.checked_mul(t)?)?;
    let head = (config.vocab as u64).checked_mul(config.embed as u64)?;
    let floats = params.checked_add(masks)?.checked_add(head)?;
    floats.checked_mul(4)?.checked_add(header_len)?.checked_add(8)
}

/// The config stored under [`CONFIG_KEY`], parsed and within the bounds.
fn config_from_metadata(metadata: Option<&HashMap<String, String>>) -> Result<ModelConfig> {
    let config_json = metadata
        .and_then(|m| m.get(CONFIG_KEY))
        .ok_or_else(|| err!("missing metadata key \"{CONFIG_KEY}\" (the model config as JSON)"))?;
    let config: ModelConfig =
        serde_json::from_str(config_json).map_err(|e| err!("metadata \"{CONFIG_KEY}\" is not a valid config: {e}"))?;
    config.validate().map_err(|e| err!("metadata \"{CONFIG_KEY}\": {e}"))?;
    Ok(config)
}

/// Parses safetensors bytes into a model, checking names, shapes, dtype and finiteness.
///
/// The `safetensors` crate checks that the tensors' byte ranges tile the data section exactly
/// (contiguous from 0, each range the size its shape and dtype give, overflow-checked, ending
/// at the end of the buffer). Here: the config is within [`ModelConfig::validate`]'s bounds,
/// every name (after stripping `transformer.`) is known and given once, every tensor of the
/// layout is present as F32 of the right shape, and their values sum to the config's parameter
/// count, all before the parameter buffer is allocated, so it never exceeds the input's size.
/// Tensors are visited in name order: nothing depends on hash-map iteration order.
/// The config comes from the `cllm.config` metadata.
pub fn deserialize_safetensors(bytes: &[u8]) -> Result<Model> {
    let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| err!("not a valid safetensors file: {e:?}"))?;
    deserialize_with_config(bytes, config_from_metadata(metadata.metadata().as_ref())?)
}

/// [`deserialize_safetensors`] with the config given (validated here again).
fn deserialize_with_config(bytes: &[u8], config: ModelConfig) -> Result<Model> {
    config.validate().map_err(Error)?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| err!("not a valid safetensors file: {e:?}"))?;
    let layout = ParamLayout::new(&config);
    let by_name = tensors_by_name(&st, &layout, &config)?;
    let mut total = 0usize;
    for spec in &layout.tensors {
        let view = by_name
            .get(spec.name.as_str())
            .ok_or_else(|| err!("missing tensor \"{}\" (expected shape {:?})", spec.name, spec.shape))?;
        if view.dtype() != Dtype::F32 {
            bail!("tensor \"{}\": dtype {:?}, expected F32", spec.name, view.dtype());
        }
        if view.shape() != spec.shape.as_slice() {
            bail!("tensor \"{}\": shape {:?}, expected {:?}", spec.name, view.shape(), spec.shape);
        }
        total = total.checked_add(view.data().len() / 4).ok_or_else(|| err!("tensor sizes overflow"))?;
    }
    if total != layout.num_params() || total.checked_mul(4).is_none_or(|b| b > bytes.len()) {
        bail!("the tensors hold {total} values, the config {} needs {}", config.summary(), layout.num_params());
    }
    let mut params = vec![0.0f32; layout.num_params()];
    for spec in &layout.tensors {
        let view = &by_name[spec.name.as_str()];
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

/// The tensors of `st` the layout uses, by short name (the `transformer.` prefix that
/// GPT2LMHeadModel exports use stripped). Two tensors with the same short name are an error:
/// which one to use would be a guess.
fn tensors_by_name<'a>(
    st: &'a SafeTensors<'a>,
    layout: &ParamLayout,
    config: &ModelConfig,
) -> Result<BTreeMap<String, TensorView<'a>>> {
    let mut tensors = st.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut by_name: BTreeMap<String, TensorView<'a>> = BTreeMap::new();
    let mut full_names: BTreeMap<String, String> = BTreeMap::new();
    let mut head = None;
    for (name, view) in tensors {
        let short = name.strip_prefix("transformer.").unwrap_or(&name).to_string();
        if IGNORED_SUFFIXES.iter().any(|s| short.ends_with(s)) {
            continue;
        }
        if short == LM_HEAD {
            head = Some(view);
            continue;
        }
        if layout.get(&short).is_none() {
            bail!("unexpected tensor \"{name}\" for config {}", config.summary());
        }
        if let Some(first) = full_names.insert(short.clone(), name.clone()) {
            bail!("tensors \"{first}\" and \"{name}\" both give \"{short}\": which one to use is ambiguous");
        }
        by_name.insert(short, view);
    }
    if let Some(head) = head {
        let tied = by_name
            .get("wte.weight")
            .is_some_and(|wte| wte.dtype() == head.dtype() && wte.shape() == head.shape() && wte.data() == head.data());
        if !tied {
            bail!("tensor \"{LM_HEAD}\" differs from \"wte.weight\": an untied output head is not supported (cllm's output head is the token embedding)");
        }
    }
    Ok(by_name)
}
