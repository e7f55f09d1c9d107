//! One flat f32 buffer holds every parameter; [`ParamLayout`] names its slices.
//!
//! Tensors are stored in Hugging Face GPT-2 order and layout (Conv1D weights are `[in, out]`,
//! so `y = x·W + b`), which makes safetensors export a straight copy. Gradients and the AdamW
//! moments use the same layout.

use crate::config::ModelConfig;
use std::ops::Range;

/// One named tensor inside the flat buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// Hugging Face GPT-2 name, e.g. `h.0.attn.c_attn.weight`.
    pub name: String,
    /// Shape, row-major.
    pub shape: Vec<usize>,
    /// First element in the flat buffer.
    pub offset: usize,
}

impl TensorSpec {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// True for a zero-sized tensor (never produced by a valid config).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The tensor's range in the flat buffer.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// Offsets of one block's tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockOffsets {
    pub ln1_w: usize,
    pub ln1_b: usize,
    pub qkv_w: usize,
    pub qkv_b: usize,
    pub proj_w: usize,
    pub proj_b: usize,
    pub ln2_w: usize,
    pub ln2_b: usize,
    pub fc_w: usize,
    pub fc_b: usize,
    pub fcproj_w: usize,
    pub fcproj_b: usize,
}

/// Where every tensor lives in the flat parameter buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamLayout {
    pub config: ModelConfig,
    pub tensors: Vec<TensorSpec>,
    pub wte: usize,
    pub wpe: usize,
    pub blocks: Vec<BlockOffsets>,
    pub lnf_w: usize,
    pub lnf_b: usize,
    total: usize,
}

impl ParamLayout {
    /// Lays out the parameters of `config` in GPT-2 order.
    pub fn new(config: &ModelConfig) -> Self {
        let (v, t, c) = (config.vocab, config.context, config.embed);
        let mut tensors = Vec::new();
        let mut total = 0usize;
        let mut push = |name: String, shape: Vec<usize>| -> usize {
            let offset = total;
            total += shape.iter().product::<usize>();
            tensors.push(TensorSpec { name, shape, offset });
            offset
        };
        let wte = push("wte.weight".into(), vec![v, c]);
        let wpe = push("wpe.weight".into(), vec![t, c]);
        let mut blocks = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let p = |s: &str| format!("h.{i}.{s}");
            blocks.push(BlockOffsets {
                ln1_w: push(p("ln_1.weight"), vec![c]),
                ln1_b: push(p("ln_1.bias"), vec![c]),
                qkv_w: push(p("attn.c_attn.weight"), vec![c, 3 * c]),
                qkv_b: push(p("attn.c_attn.bias"), vec![3 * c]),
                proj_w: push(p("attn.c_proj.weight"), vec![c, c]),
                proj_b: push(p("attn.c_proj.bias"), vec![c]),
                ln2_w: push(p("ln_2.weight"), vec![c]),
                ln2_b: push(p("ln_2.bias"), vec![c]),
                fc_w: push(p("mlp.c_fc.weight"), vec![c, 4 * c]),
                fc_b: push(p("mlp.c_fc.bias"), vec![4 * c]),
                fcproj_w: push(p("mlp.c_proj.weight"), vec![4 * c, c]),
                fcproj_b: push(p("mlp.c_proj.bias"), vec![c]),
            });
        }
        let lnf_w = push("ln_f.weight".into(), vec![c]);
        let lnf_b = push("ln_f.bias".into(), vec![c]);
        ParamLayout { config: *config, tensors, wte, wpe, blocks, lnf_w, lnf_b, total }
    }

    /// Total number of f32 parameters.
    pub fn num_params(&self) -> usize {
        self.total
    }

    /// Finds a tensor by its Hugging Face name.
    pub fn get(&self, name: &str) -> Option<&TensorSpec> {
        self.tensors.iter().find(|t| t.name == name)
    }
}
