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

/// Upper bounds on a model's shape, checked by [`ModelConfig::validate`] before anything is
/// allocated from a config read from a file. They admit every GPT-2 size up to XL (48 layers,
/// 25 heads, width 1600, context 1024, vocabulary 50257, 1.56e9 parameters) with room to spare,
/// and refuse the absurd shapes a damaged or hostile file may declare.
pub const MAX_LAYERS: usize = 128;
/// See [`MAX_LAYERS`].
pub const MAX_HEADS: usize = 128;
/// See [`MAX_LAYERS`].
pub const MAX_EMBED: usize = 8192;
/// See [`MAX_LAYERS`].
pub const MAX_CONTEXT: usize = 8192;
/// See [`MAX_LAYERS`]: 2^20.
pub const MAX_VOCAB: usize = 1 << 20;
/// At most 4·10^9 parameters (16 GB of f32): every field may be within its bound and the
/// product still absurd.
pub const MAX_PARAMS: usize = 4_000_000_000;

/// Names of the built-in presets, in size order.
pub const PRESETS: [&str; 5] = ["tiny", "small", "seed", "gpt2", "gpt2-medium"];

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

    /// GPT-2 124M: 12 layers, 12 heads, width 768, context 1024, GPT-2's vocabulary of 50257.
    pub const fn gpt2() -> Self {
        ModelConfig { vocab: 50257, layers: 12, heads: 12, embed: 768, context: 1024 }
    }
    /// GPT-2 medium (355M): 24 layers, 16 heads, width 1024, context 1024, vocabulary 50257.
    pub const fn gpt2_medium() -> Self {
        ModelConfig { vocab: 50257, layers: 24, heads: 16, embed: 1024, context: 1024 }
    }

    /// Looks up a preset by name (see [`PRESETS`]).
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "tiny" => Some(Self::tiny()),
            "small" => Some(Self::small()),
            "seed" => Some(Self::seed()),
            "gpt2" => Some(Self::gpt2()),
            "gpt2-medium" => Some(Self::gpt2_medium()),
            _ => None,
        }
    }

    /// The reference batch size of a preset (from `bench/models.json`).
    pub fn preset_batch(name: &str) -> Option<usize> {
        match name {
            "tiny" => Some(4),
            "small" | "seed" | "gpt2" | "gpt2-medium" => Some(8),
            _ => None,
        }
    }

    /// Checks that the shape is usable; the error names the bad field.
    pub fn validate(&self) -> Result<(), String> {
        if self.vocab == 0 || self.layers == 0 || self.heads == 0 || self.embed == 0 || self.context == 0 {
            return Err(format!("model config has a zero dimension: {self:?}"));
        }
        for (field, value, max) in [
            ("layers", self.layers, MAX_LAYERS),
            ("heads", self.heads, MAX_HEADS),
            ("embed", self.embed, MAX_EMBED),
            ("context", self.context, MAX_CONTEXT),
            ("vocab", self.vocab, MAX_VOCAB),
        ] {
            if value > max {
                return Err(format!("model config: {field} {value} exceeds the limit of {max}"));
            }
        }
        if !self.embed.is_multiple_of(self.heads) {
            return Err(format!("model config: heads ({}) must divide embed ({})", self.heads, self.embed));
        }
        match self.checked_num_params() {
            Some(n) if n <= MAX_PARAMS => Ok(()),
            n => Err(format!(
                "model config: {} parameters exceed the limit of {MAX_PARAMS}",
                n.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string())
            )),
        }
    }

    /// The shape for messages: "(layers 2, heads 2, embed 32, context 16, vocab 256)".
    pub fn summary(&self) -> String {
        format!(
            "(layers {}, heads {}, embed {}, context {}, vocab {})",
            self.layers, self.heads, self.embed, self.context, self.vocab
        )
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.embed / self.heads
    }

    /// Total number of parameters (tied output head counted once): the embeddings (V·C + T·C),
    /// per block two LayerNorms (4C), c_attn (3C² + 3C), attn.c_proj (C² + C), c_fc (4C² + 4C)
    /// and mlp.c_proj (4C² + C), and ln_f (2C). The model's parameter layout has exactly these
    /// tensors (a test in `model::params` checks the two agree).
    /// Saturates at `usize::MAX` for a shape too large to count (never for a config that
    /// passes [`ModelConfig::validate`]).
    pub fn num_params(&self) -> usize {
        self.checked_num_params().unwrap_or(usize::MAX)
    }

    /// [`ModelConfig::num_params`], `None` on overflow (configs read from files are not trusted).
    pub fn checked_num_params(&self) -> Option<usize> {
        let (v, t, c) = (self.vocab, self.context, self.embed);
        let per_block = c.checked_mul(c)?.checked_mul(12)?.checked_add(c.checked_mul(13)?)?;
        v.checked_mul(c)?
            .checked_add(t.checked_mul(c)?)?
            .checked_add(self.layers.checked_mul(per_block)?)?
            .checked_add(c.checked_mul(2)?)
    }

    /// Model FLOPs per trained token (forward + backward): 6·params + 12·layers·context·embed.
    pub fn flops_per_token(&self) -> f64 {
        6.0 * self.num_params() as f64 + 12.0 * self.layers as f64 * self.context as f64 * self.embed as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_xl_shape_is_within_the_bounds() {
        let xl = ModelConfig { vocab: 50257, layers: 48, heads: 25, embed: 1600, context: 1024 };
        assert_eq!(xl.validate(), Ok(()));
        assert_eq!(xl.checked_num_params(), Some(1_557_611_200));
    }

    #[test]
    fn absurd_shapes_are_refused_by_name_and_never_overflow() {
        let t = ModelConfig::tiny();
        for (cfg, field) in [
            (ModelConfig { layers: 100_000_000, ..t }, "layers 100000000"),
            (ModelConfig { context: 1_000_000_000, ..t }, "context 1000000000"),
            (ModelConfig { embed: 1 << 31, heads: 1, ..t }, "embed 2147483648"),
            (ModelConfig { vocab: 1_000_000_000_000, ..t }, "vocab 1000000000000"),
            (ModelConfig { heads: 256, embed: 256, ..t }, "heads 256"),
            (ModelConfig { embed: 8192, heads: 1, layers: 128, ..t }, "parameters exceed"),
        ] {
            let e = cfg.validate().unwrap_err();
            assert!(e.contains(field), "{e}");
        }
        let huge = ModelConfig { vocab: usize::MAX, layers: usize::MAX, heads: 1, embed: usize::MAX, context: 1 };
        assert_eq!(huge.checked_num_params(), None);
        assert_eq!(huge.num_params(), usize::MAX);
        assert!(huge.flops_per_token().is_finite());
    }
}
