//! The model `cllm train` trains: a preset (`--config`), a shape file (`--model-config`), or
//! existing weights (`--init-from`), with Hugging Face GPT2Config's names as overrides
//! (`--n-layer --n-head --n-embd --n-positions --vocab-size`).
//!
//! A resumed run's shape is the checkpoint's: any of these flags that says otherwise is an
//! error. Weights given by `--init-from` fix the shape the same way.

use std::path::{Path, PathBuf};

use clap::Args;

use super::{usage, CliResult};
use crate::checkpoint::{self, Checkpoint};
use crate::config::{ModelConfig, PRESETS};
use crate::model::{hf, Model};

/// The preset name a run records when its shape is not exactly a preset's.
pub const CUSTOM: &str = "custom";
/// Byte-level data has 256 symbols: a smaller vocabulary could not embed them.
pub const BYTE_VOCAB: usize = 256;
/// Largest `--model-config` file read.
const MAX_SHAPE_FILE_BYTES: u64 = 1 << 20;

/// The model flags besides `--config`.
#[derive(Debug, Args, Default, Clone)]
pub struct ShapeArgs {
    /// The model's shape as JSON: cllm's keys {vocab, layers, heads, embed, context} (a
    /// checkpoint's `cllm.config`), or a Hugging Face GPT2Config (config.json).
    #[arg(long, value_name = "FILE.json", help_heading = "Model")]
    pub model_config: Option<PathBuf>,
    /// Start from these weights (a cllm checkpoint or run directory, a model.safetensors, or a
    /// Hugging Face GPT-2 export), with a fresh optimizer, at step 0: fine-tuning.
    #[arg(long, value_name = "PATH", help_heading = "Model")]
    pub init_from: Option<PathBuf>,
    /// Transformer blocks. [default: the preset's]
    #[arg(long, value_name = "N", help_heading = "Model")]
    pub n_layer: Option<usize>,
    /// Attention heads per block; must divide --n-embd. [default: the preset's]
    #[arg(long, value_name = "N", help_heading = "Model")]
    pub n_head: Option<usize>,
    /// Embedding width. [default: the preset's]
    #[arg(long, value_name = "N", help_heading = "Model")]
    pub n_embd: Option<usize>,
    /// Positions the model has: its longest context (--context is the training length, at most
    /// this). [default: the preset's]
    #[arg(long, value_name = "N", help_heading = "Model")]
    pub n_positions: Option<usize>,
    /// Vocabulary size, at least 256 for byte-level data. [default: the preset's]
    #[arg(long, value_name = "N", help_heading = "Model")]
    pub vocab_size: Option<usize>,
}

/// A field of the shape, for the override flags.
type Field = fn(&mut ModelConfig) -> &mut usize;

impl ShapeArgs {
    /// The override flags given, as (flag, value, field).
    fn overrides(&self) -> Vec<(&'static str, usize, Field)> {
        let all: [(&'static str, Option<usize>, Field); 5] = [
            ("--n-layer", self.n_layer, |c| &mut c.layers),
            ("--n-head", self.n_head, |c| &mut c.heads),
            ("--n-embd", self.n_embd, |c| &mut c.embed),
            ("--n-positions", self.n_positions, |c| &mut c.context),
            ("--vocab-size", self.vocab_size, |c| &mut c.vocab),
        ];
        all.into_iter().filter_map(|(f, v, set)| v.map(|v| (f, v, set))).collect()
    }
}

/// The resolved model: the name recorded in `state.json`, the shape, and the starting weights
/// when `--init-from` gave them.
pub struct Shape {
    pub name: String,
    pub config: ModelConfig,
    pub init: Option<Model>,
}

/// The run's model: see the module docs. `preset` is `--config`. With a tokenizer of
/// `tokenizer_vocab` tokens, the vocabulary is the tokenizer's unless `--vocab-size`,
/// `--model-config`, `--init-from` or the resumed checkpoint fixes it (then it must cover the
/// tokenizer's).
pub fn resolve(
    preset: Option<&str>,
    args: &ShapeArgs,
    resumed: Option<&Checkpoint>,
    default: &str,
    tokenizer_vocab: Option<usize>,
) -> CliResult<Shape> {
    if args.model_config.is_some() && preset.is_some() {
        usage!("--config and --model-config both give the model's shape: pass one of them");
    }
    if let (Some(_), Some(_)) = (&args.init_from, resumed) {
        usage!("--init-from starts a new run from existing weights, --resume continues one: pass one of them");
    }
    let init = match &args.init_from {
        Some(path) => Some(checkpoint::load_model(path)?.0),
        None => None,
    };
    let preset_config = |name: &str| {
        ModelConfig::preset(name).ok_or_else(|| {
            super::Failure::usage(format!("unknown --config {name:?} (expected one of: {})", PRESETS.join(", ")))
        })
    };
    let (mut name, mut config) = match (&args.model_config, &init, preset, resumed) {
        (Some(file), _, _, _) => (CUSTOM.to_string(), read_shape_file(file)?),
        (None, Some(m), Some(p), _) => {
            if preset_config(p)? != m.config {
                usage!("--config {p} is not the shape of the --init-from weights {}", m.config.summary());
            }
            (p.to_string(), m.config)
        }
        (None, Some(m), None, _) => (CUSTOM.to_string(), m.config),
        (None, None, Some(p), _) => (p.to_string(), preset_config(p)?),
        (None, None, None, Some(c)) => (c.state.options.config_name.clone(), c.model.config),
        (None, None, None, None) => (default.to_string(), preset_config(default)?),
    };
    for (flag, value, set) in args.overrides() {
        let field = set(&mut config);
        if let Some(m) = &init {
            if *field != value {
                usage!(
                    "{flag} {value} contradicts the --init-from weights' {} (their shape is {})",
                    *field,
                    m.config.summary()
                );
            }
        }
        if *field != value {
            name = CUSTOM.to_string();
        }
        *field = value;
    }
    match tokenizer_vocab {
        Some(tv) => {
            let fixed = args.vocab_size.is_some() || args.model_config.is_some() || init.is_some() || resumed.is_some();
            if !fixed && config.vocab != tv {
                config.vocab = tv;
                name = CUSTOM.to_string();
            }
            if config.vocab < tv {
                usage!(
                    "the model's vocabulary of {} (--vocab-size, --model-config or --init-from) is smaller than the \
                     tokenizer's {tv} tokens",
                    config.vocab
                );
            }
        }
        None if config.vocab < BYTE_VOCAB => {
            usage!(
                "vocabulary {} is smaller than the {BYTE_VOCAB} byte values of the data (--vocab-size)",
                config.vocab
            )
        }
        None => {}
    }
    config.validate().map_err(super::Failure::usage)?;
    if let Some(c) = resumed {
        if config != c.model.config {
            let flags = model_flags(preset, args);
            usage!(
                "{flags} give the model {}, which contradicts the checkpoint's {} ({}); drop them to resume, or start a new run",
                config.summary(),
                c.model.config.summary(),
                c.dir.join(checkpoint::STATE_FILE).display()
            );
        }
        name = c.state.options.config_name.clone();
    }
    Ok(Shape { name, config, init })
}

/// A `--model-config` file: cllm's `cllm.config` keys, or a Hugging Face GPT2Config (any file
/// with `model_type` or `n_layer`), read bounded; unknown cllm keys are errors (a typo).
fn read_shape_file(path: &Path) -> CliResult<ModelConfig> {
    let bytes = crate::data::text::read_regular_file(path, MAX_SHAPE_FILE_BYTES, "--model-config file")?;
    let shown = path.display();
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| crate::err!("{shown}: not valid JSON: {e}"))?;
    let obj = value.as_object().ok_or_else(|| crate::err!("{shown}: expected a JSON object"))?;
    if obj.contains_key("model_type") || obj.contains_key("n_layer") {
        return Ok(hf::parse_config(&bytes).map_err(|e| e.context(&shown))?);
    }
    const KEYS: [&str; 5] = ["vocab", "layers", "heads", "embed", "context"];
    if let Some(k) = obj.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(crate::err!("{shown}: unknown key {k:?} (expected {})", KEYS.join(", ")).into());
    }
    let config: ModelConfig = serde_json::from_value(value.clone())
        .map_err(|e| crate::err!("{shown}: not a model shape {{{}}}: {e}", KEYS.join(", ")))?;
    config.validate().map_err(|e| crate::err!("{shown}: {e}"))?;
    Ok(config)
}

/// The model flags given, for messages: "--config small", "--n-layer 3 --n-head 2".
fn model_flags(preset: Option<&str>, args: &ShapeArgs) -> String {
    let mut parts: Vec<String> = preset.map(|p| format!("--config {p}")).into_iter().collect();
    if let Some(f) = &args.model_config {
        parts.push(format!("--model-config {}", f.display()));
    }
    parts.extend(args.overrides().into_iter().map(|(flag, v, _)| format!("{flag} {v}")));
    parts.join(" ")
}
