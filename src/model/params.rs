//! One flat f32 buffer holds every parameter; [`ParamLayout`] names its slices.
//!
//! Tensors are stored in Hugging Face GPT-2 order and layout (Conv1D weights are `[in, out]`,
//! so `y = x·W + b`), which makes safetensors export a straight copy. Gradients and the AdamW
//! moments use the same layout.
//!
//! Invariant: the tensors tile `0..num_params()` in order, without gaps or overlaps, so every
//! range stored here ([`TensorSpec::range`], the fields of [`ParamLayout`] and [`BlockParams`])
//! is in bounds of a buffer of `num_params()` values and disjoint from every other one. It
//! holds because [`ParamLayout::new`] hands out each range from one running offset.

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
    /// Whether the backward pass writes this tensor's whole gradient with a GEMM (overwriting,
    /// not accumulating): the linear weights, and the tied `wte`, which the output head's
    /// product writes before the embedding's backward adds to it. Every other gradient is
    /// accumulated, so the backward pass zeroes it first.
    pub written_by_gemm: bool,
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

/// One block's twelve tensors, in buffer order, as anything: their ranges in the flat buffer
/// ([`BlockParams`]), or views of a buffer laid out by them ([`BlockParams::of`],
/// [`BlockParams::of_mut`]). C = embed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockTensors<T> {
    /// ln_1 weight and bias [C].
    pub ln1_w: T,
    pub ln1_b: T,
    /// attn.c_attn weight [C, 3C] and bias [3C].
    pub qkv_w: T,
    pub qkv_b: T,
    /// attn.c_proj weight [C, C] and bias [C].
    pub proj_w: T,
    pub proj_b: T,
    /// ln_2 weight and bias [C].
    pub ln2_w: T,
    pub ln2_b: T,
    /// mlp.c_fc weight [C, 4C] and bias [4C].
    pub fc_w: T,
    pub fc_b: T,
    /// mlp.c_proj weight [4C, C] and bias [C].
    pub fcproj_w: T,
    pub fcproj_b: T,
}

impl<T> BlockTensors<T> {
    /// The tensors from an array in buffer order.
    pub fn from_array(a: [T; 12]) -> Self {
        let [ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, fcproj_w, fcproj_b] = a;
        BlockTensors { ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, fcproj_w, fcproj_b }
    }

    /// The tensors in buffer order.
    pub fn each_ref(&self) -> [&T; 12] {
        let b = self;
        [
            &b.ln1_w,
            &b.ln1_b,
            &b.qkv_w,
            &b.qkv_b,
            &b.proj_w,
            &b.proj_b,
            &b.ln2_w,
            &b.ln2_b,
            &b.fc_w,
            &b.fc_b,
            &b.fcproj_w,
            &b.fcproj_b,
        ]
    }
}

/// Where one block's tensors lie in the flat buffer: `&params[p.qkv_w.clone()]` is the
/// attention's fused q|k|v weight.
pub type BlockParams = BlockTensors<Range<usize>>;

impl BlockParams {
    /// This block's tensors in `buf` (weights, gradients or moments: any buffer in this layout).
    pub fn of<'a>(&self, buf: &'a [f32]) -> BlockTensors<&'a [f32]> {
        BlockTensors::from_array(self.each_ref().map(|r| &buf[r.clone()]))
    }

    /// This block's tensors in `buf`, mutable (disjoint by the layout's invariant).
    pub fn of_mut<'a>(&self, buf: &'a mut [f32]) -> BlockTensors<&'a mut [f32]> {
        BlockTensors::from_array(split_mut(buf, self.each_ref()))
    }
}

/// Disjoint mutable views of `buf` at `ranges`, which must be in increasing order and must not
/// overlap (as any tensors of one layout listed in buffer order).
pub fn split_mut<'a, const N: usize>(buf: &'a mut [f32], ranges: [&Range<usize>; N]) -> [&'a mut [f32]; N] {
    let (mut rest, mut base) = (buf, 0);
    ranges.map(|r| {
        assert!(base <= r.start && r.start <= r.end, "split_mut: ranges must be ordered and disjoint");
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(r.start - base);
        let (view, tail) = tail.split_at_mut(r.len());
        (rest, base) = (tail, r.end);
        view
    })
}

/// Where every tensor lives in the flat parameter buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamLayout {
    pub config: ModelConfig,
    pub tensors: Vec<TensorSpec>,
    /// Token embedding [V, C] (also the tied output head).
    pub wte: Range<usize>,
    /// Position embedding [T, C] (T = context).
    pub wpe: Range<usize>,
    pub blocks: Vec<BlockParams>,
    /// ln_f weight and bias [C].
    pub lnf_w: Range<usize>,
    pub lnf_b: Range<usize>,
    total: usize,
}

impl ParamLayout {
    /// Lays out the parameters of `config` in GPT-2 order.
    pub fn new(config: &ModelConfig) -> Self {
        let (v, t, c) = (config.vocab, config.context, config.embed);
        let mut tensors = Vec::new();
        let mut total = 0usize;
        let mut push = |name: String, shape: Vec<usize>, written_by_gemm: bool| -> Range<usize> {
            let offset = total;
            total += shape.iter().product::<usize>();
            tensors.push(TensorSpec { name, shape, offset, written_by_gemm });
            offset..total
        };
        // How backward produces each gradient (see `TensorSpec::written_by_gemm`).
        let (gemm, acc) = (true, false);
        let wte = push("wte.weight".into(), vec![v, c], gemm);
        let wpe = push("wpe.weight".into(), vec![t, c], acc);
        let mut blocks = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let p = |s: &str| format!("h.{i}.{s}");
            blocks.push(BlockParams {
                ln1_w: push(p("ln_1.weight"), vec![c], acc),
                ln1_b: push(p("ln_1.bias"), vec![c], acc),
                qkv_w: push(p("attn.c_attn.weight"), vec![c, 3 * c], gemm),
                qkv_b: push(p("attn.c_attn.bias"), vec![3 * c], acc),
                proj_w: push(p("attn.c_proj.weight"), vec![c, c], gemm),
                proj_b: push(p("attn.c_proj.bias"), vec![c], acc),
                ln2_w: push(p("ln_2.weight"), vec![c], acc),
                ln2_b: push(p("ln_2.bias"), vec![c], acc),
                fc_w: push(p("mlp.c_fc.weight"), vec![c, 4 * c], gemm),
                fc_b: push(p("mlp.c_fc.bias"), vec![4 * c], acc),
                fcproj_w: push(p("mlp.c_proj.weight"), vec![4 * c, c], gemm),
                fcproj_b: push(p("mlp.c_proj.bias"), vec![c], acc),
            });
        }
        let lnf_w = push("ln_f.weight".into(), vec![c], acc);
        let lnf_b = push("ln_f.bias".into(), vec![c], acc);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn configs() -> Vec<ModelConfig> {
        let odd = ModelConfig { vocab: 50, layers: 3, heads: 3, embed: 12, context: 7 };
        let mut all: Vec<ModelConfig> = crate::config::PRESETS.iter().filter_map(|n| ModelConfig::preset(n)).collect();
        all.push(odd);
        all
    }

    #[test]
    fn tensors_tile_the_buffer_in_order_and_the_named_ranges_are_theirs() {
        for cfg in configs() {
            let l = ParamLayout::new(&cfg);
            let mut next = 0;
            for spec in &l.tensors {
                assert_eq!(spec.offset, next, "{}: a gap or an overlap", spec.name);
                next = spec.range().end;
            }
            assert_eq!(next, l.num_params());
            let named = |name: &str| l.get(name).map(TensorSpec::range);
            assert_eq!(named("wte.weight"), Some(l.wte.clone()));
            assert_eq!(named("wpe.weight"), Some(l.wpe.clone()));
            assert_eq!(named("ln_f.weight"), Some(l.lnf_w.clone()));
            assert_eq!(named("ln_f.bias"), Some(l.lnf_b.clone()));
            for (i, p) in l.blocks.iter().enumerate() {
                let fields = [
                    ("ln_1.weight", &p.ln1_w),
                    ("ln_1.bias", &p.ln1_b),
                    ("attn.c_attn.weight", &p.qkv_w),
                    ("attn.c_attn.bias", &p.qkv_b),
                    ("attn.c_proj.weight", &p.proj_w),
                    ("attn.c_proj.bias", &p.proj_b),
                    ("ln_2.weight", &p.ln2_w),
                    ("ln_2.bias", &p.ln2_b),
                    ("mlp.c_fc.weight", &p.fc_w),
                    ("mlp.c_fc.bias", &p.fc_b),
                    ("mlp.c_proj.weight", &p.fcproj_w),
                    ("mlp.c_proj.bias", &p.fcproj_b),
                ];
                for (name, range) in fields {
                    assert_eq!(named(&format!("h.{i}.{name}")), Some(range.clone()), "h.{i}.{name}");
                }
            }
        }
    }

    #[test]
    fn exactly_the_linear_weights_and_wte_are_written_by_a_gemm() {
        // The rule the flag replaces: `wte` and every block weight that is not a LayerNorm's.
        let by_name =
            |n: &str| n == "wte.weight" || (n.starts_with("h.") && n.ends_with(".weight") && !n.contains(".ln_"));
        for cfg in configs() {
            for spec in &ParamLayout::new(&cfg).tensors {
                assert_eq!(spec.written_by_gemm, by_name(&spec.name), "{}", spec.name);
            }
        }
    }

    #[test]
    fn a_blocks_views_are_its_ranges_of_the_buffer() {
        let l = ParamLayout::new(&ModelConfig::tiny());
        let mut buf: Vec<f32> = (0..l.num_params()).map(|i| i as f32).collect();
        let p = &l.blocks[1];
        let want: Vec<Vec<f32>> = p.each_ref().iter().map(|r| buf[(*r).clone()].to_vec()).collect();
        let got: Vec<Vec<f32>> = p.of(&buf).each_ref().iter().map(|s| s.to_vec()).collect();
        assert_eq!(got, want);
        let got_mut: Vec<Vec<f32>> = p.of_mut(&mut buf).each_ref().iter().map(|s| s.to_vec()).collect();
        assert_eq!(got_mut, want);
    }

    #[test]
    #[should_panic(expected = "ordered and disjoint")]
    fn split_mut_rejects_ranges_out_of_order() {
        let mut buf = [0.0f32; 8];
        let _ = split_mut(&mut buf, [&(4..6), &(0..2)]);
    }

    #[test]
    fn the_configs_parameter_formula_counts_the_layout() {
        for cfg in configs() {
            assert_eq!(cfg.num_params(), ParamLayout::new(&cfg).num_params(), "{cfg:?}");
        }
    }
}
