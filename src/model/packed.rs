//! Every GEMM weight of the model, packed once for the native kernel in both orientations the
//! passes read it: `W` for the forward product and `Wᵀ` for the backward `dX = dY·Wᵀ`.
//!
//! Without this each micro-batch packs every weight twice (once per pass), and the packing of
//! the transposed view is a scattered copy: on `seed` it was about 15% of a forward+backward.
//! A worker packs once per step (the weights change only in the update) and reuses the panels
//! for all its micro-batches. The packed panels hold the same values in the same order as the
//! per-call packing, so results are bit-identical with or without them.

use super::gemm::Mat;
use super::kernel::PackedB;
use super::params::ParamLayout;

/// One weight packed as the B operand of both passes.
pub struct PackedPair {
    /// `B = W` (`k x n` = in x out) for `out = x·W` (or `wteᵀ` for the tied head).
    pub fwd: PackedB,
    /// `B = Wᵀ` (`k x n` = out x in) for `dx = dout·Wᵀ` (or `wte` for the tied head).
    pub bwd: PackedB,
}

impl PackedPair {
    /// A weight stored row-major `[rows, cols]`, used as `x·W` forward and `dout·Wᵀ` backward.
    fn zeros(rows: usize, cols: usize) -> Self {
        PackedPair { fwd: PackedB::zeros(rows, cols), bwd: PackedB::zeros(cols, rows) }
    }

    fn repack(&mut self, w: &[f32]) {
        let cols = self.fwd.n();
        self.fwd.repack(Mat::rows(w, cols));
        self.bwd.repack(Mat::transposed(w, cols));
    }
}

/// The packed linear weights of one transformer block.
pub struct PackedBlock {
    pub qkv: PackedPair,
    pub proj: PackedPair,
    pub fc: PackedPair,
    pub fcproj: PackedPair,
}

/// All packed weights of a model (about twice the size of its parameters).
pub struct PackedWeights {
    pub blocks: Vec<PackedBlock>,
    /// The tied output head: `fwd` is `wteᵀ` (`logits = lnf·wteᵀ`), `bwd` is `wte`
    /// (`dlnf = dlogits·wte`).
    pub head: PackedPair,
}

impl PackedWeights {
    /// Buffers for `layout`'s weights (zeros until [`PackedWeights::pack`]).
    pub fn new(layout: &ParamLayout) -> Self {
        let cfg = layout.config;
        let (c, v) = (cfg.embed, cfg.vocab);
        let blocks = (0..cfg.layers)
            .map(|_| PackedBlock {
                qkv: PackedPair::zeros(c, 3 * c),
                proj: PackedPair::zeros(c, c),
                fc: PackedPair::zeros(c, 4 * c),
                fcproj: PackedPair::zeros(4 * c, c),
            })
            .collect();
        // wte is stored [V, C]; the head reads it as wteᵀ forward, so swap the roles.
        let head = PackedPair { fwd: PackedB::zeros(c, v), bwd: PackedB::zeros(v, c) };
        PackedWeights { blocks, head }
    }

    /// Packs the current values of `params` (laid out by `layout`) into the existing buffers;
    /// allocates nothing.
    pub fn pack(&mut self, layout: &ParamLayout, params: &[f32]) {
        assert_eq!(params.len(), layout.num_params(), "parameter buffer has the wrong length");
        assert_eq!(self.blocks.len(), layout.blocks.len(), "packed weights were sized for another config");
        let c = layout.config.embed;
        let v = layout.config.vocab;
        for (pb, o) in self.blocks.iter_mut().zip(&layout.blocks) {
            pb.qkv.repack(&params[o.qkv_w..o.qkv_w + c * 3 * c]);
            pb.proj.repack(&params[o.proj_w..o.proj_w + c * c]);
            pb.fc.repack(&params[o.fc_w..o.fc_w + c * 4 * c]);
            pb.fcproj.repack(&params[o.fcproj_w..o.fcproj_w + 4 * c * c]);
        }
        let wte = &params[layout.wte..layout.wte + v * c];
        self.head.fwd.repack(Mat::transposed(wte, c));
        self.head.bwd.repack(Mat::rows(wte, c));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::model::gpt::{backward_with_layout, forward_with_layout};
    use crate::model::{Activations, Model};

    fn loss_and_grads(layout: &ParamLayout, params: &[f32], packed: Option<&PackedWeights>) -> (f32, Vec<f32>) {
        let cfg = layout.config;
        let (b, t) = (2, cfg.context);
        let inputs: Vec<u32> = (0..b * t).map(|i| (i * 31 % cfg.vocab) as u32).collect();
        let targets: Vec<u32> = (0..b * t).map(|i| (i * 17 % cfg.vocab) as u32).collect();
        let mut acts = Activations::new(&cfg, b, t);
        let mut grads = vec![0.0; params.len()];
        let loss = forward_with_layout(layout, params, packed, &mut acts, &inputs, Some(&targets), b, t);
        backward_with_layout(layout, params, packed, &mut acts, &mut grads);
        (loss, grads)
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn prepacked_passes_give_the_same_bits_as_packing_per_call() {
        let cfg = ModelConfig::tiny();
        let layout = ParamLayout::new(&cfg);
        let mut params = Model::new(cfg, 3).params;
        let mut packed = PackedWeights::new(&layout);
        packed.pack(&layout, &params);
        let (l0, g0) = loss_and_grads(&layout, &params, None);
        let (l1, g1) = loss_and_grads(&layout, &params, Some(&packed));
        assert_eq!(l0.to_bits(), l1.to_bits());
        assert!(bits(&g0) == bits(&g1), "prepacked gradients differ");

        // New weights: a repack must pick them up (stale panels would give the old loss).
        for (i, p) in params.iter_mut().enumerate() {
            *p += 0.01 * ((i % 7) as f32 - 3.0);
        }
        packed.pack(&layout, &params);
        let (l2, g2) = loss_and_grads(&layout, &params, None);
        let (l3, g3) = loss_and_grads(&layout, &params, Some(&packed));
        assert_ne!(l0.to_bits(), l2.to_bits());
        assert_eq!(l2.to_bits(), l3.to_bits());
        assert!(bits(&g2) == bits(&g3), "gradients after a repack differ");
    }
}
