//! Model configurations: the shape of a GPT-2-style byte-level transformer.

use serde::{Deserialize, Serialize};

/// The shape of a model. Serialized as JSON into the safetensors metadata under `cllm.config`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Vocabulary size (256 for the byte-level models cllm trains).
    pub vocab: usize,
    /// Number of transformer blocks.
    pub layers: usize,
    /// Attention heads per block; must divide `embed`.
    pub heads: usize,
    /// Embedding width C.
    pub embed: usize,
    /// Maximum sequence length T (rows of the position embedding).
    pub context: usize,
}

/// Names of the built-in presets, in size order.
pub const PRESETS: [&str; 3] = ["tiny", "small", "seed"];

impl ModelConfig {
    /// 2 layers, 2 heads, width 32, context 16: for tests and gradient checks.
    pub const fn tiny() -> Self {
        ModelConfig { vocab: 256, layers: 2, heads: 2, embed: 32, context: 16 }
    }
    /// 4 layers, 4 heads, width 128, context 128: the default training config.
    pub const fn small() -> Self {
        ModelConfig { vocab: 256, layers: 4, heads: 4, embed: 128, context: 128 }
    }
    /// 6 layers, 8 heads, width 256, context 128: the benchmark config.
    pub const fn seed() -> Self {
        ModelConfig { vocab: 256, layers: 6, heads: 8, embed: 256, context: 128 }
    }

    /// Looks up a preset by name (`tiny`, `small`, `seed`).
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "tiny" => Some(Self::tiny()),
            "small" => Some(Self::small()),
            "seed" => Some(Self::seed()),
            _ => None,
        }
    }

    /// The reference batch size of a preset (from `bench/models.json`).
    pub fn preset_batch(name: &str) -> Option<usize> {
        match name {
            "tiny" => Some(4),
            "small" | "seed" => Some(8),
            _ => None,
        }
    }

    /// Checks that the shape is usable; the error names the bad field.
    pub fn validate(&self) -> Result<(), String> {
        if self.vocab == 0 || self.layers == 0 || self.heads == 0 || self.embed == 0 || self.context == 0 {
            return Err(format!("model config has a zero dimension: {self:?}"));
        }
        if !self.embed.is_multiple_of(self.heads) {
            return Err(format!("model config: heads ({}) must divide embed ({})", self.heads, self.embed));
        }
        Ok(())
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.embed / self.heads
    }

    /// Total number of parameters (tied output head counted once): the embeddings (V·C + T·C),
    /// per block two LayerNorms (4C), c_attn (3C² + 3C), attn.c_proj (C² + C), c_fc (4C² + 4C)
    /// and mlp.c_proj (4C² + C), and ln_f (2C). The model's parameter layout has exactly these
    /// tensors (a test in `model::params` checks the two agree).
    pub fn num_params(&self) -> usize {
        let (v, t, c) = (self.vocab, self.context, self.embed);
        let per_block = 12 * c * c + 13 * c;
        v * c + t * c + self.layers * per_block + 2 * c
    }

    /// Model FLOPs per trained token (forward + backward): 6·params + 12·layers·context·embed.
    pub fn flops_per_token(&self) -> f64 {
        6.0 * self.num_params() as f64 + 12.0 * (self.layers * self.context * self.embed) as f64
    }
}
