//! AdamW (PyTorch semantics, bias-corrected), applied chunk by chunk so the trainer's workers can
//! update disjoint parameter ranges in parallel.
//!
//! Per element, with `g = grad * grad_scale` (the scale folds the 1/n_valid average and the clip
//! factor into this loop, so they cost no extra pass over the gradient):
//! ```text
//! p -= lr*wd*p;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g²
//! p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)
//! ```
//! Each element's update depends only on its own inputs, so the result is the same whichever
//! chunks and threads it runs on.
//!
//! Weight decay applies where a [`DecayMask`] says: every parameter (`AdamWConfig` alone, as
//! PyTorch's `AdamW` over one parameter group), or GPT-2 practice ([`DecayMask::gpt2`]): the
//! matrices of the linear layers, not biases or LayerNorm parameters, and the embeddings only
//! when asked. Outside the mask the factor is exactly 1, so a zero weight decay gives the same
//! bits with any mask.

use serde::{Deserialize, Serialize};
use std::ops::Range;

use crate::simd::multiversion;

/// AdamW hyper-parameters. `lr` is the default rate; the trainer passes the scheduled rate of
/// each step explicitly.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

impl AdamWConfig {
    /// Checks the hyper-parameters; the error names the bad one.
    pub fn validate(&self) -> crate::Result<()> {
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            crate::bail!("adamw: lr must be finite and >= 0, got {}", self.lr);
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            crate::bail!("adamw: betas must be in [0, 1), got {} and {}", self.beta1, self.beta2);
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            crate::bail!("adamw: eps must be finite and > 0, got {}", self.eps);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            crate::bail!("adamw: weight_decay must be finite and >= 0, got {}", self.weight_decay);
        }
        Ok(())
    }

    /// Updates `params[range]` from `grads[range]`, `m[range]`, `v[range]` at step `t` (from 1).
    #[allow(clippy::too_many_arguments)]
    pub fn update_range(
        &self,
        range: Range<usize>,
        params: &mut [f32],
        grads: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        t: u64,
        lr: f32,
        grad_scale: f32,
    ) {
        self.update_chunk(
            &mut params[range.clone()],
            &grads[range.clone()],
            &mut m[range.clone()],
            &mut v[range],
            t,
            lr,
            grad_scale,
        );
    }

    /// Updates one chunk; all slices have the same length.
    #[allow(clippy::too_many_arguments)]
    pub fn update_chunk(
        &self,
        params: &mut [f32],
        grads: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        t: u64,
        lr: f32,
        grad_scale: f32,
    ) {
        assert!(t >= 1, "AdamW step counts from 1");
        let n = params.len();
        assert!(grads.len() == n && m.len() == n && v.len() == n, "AdamW slices differ in length");
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        let t_exp = t.min(i32::MAX as u64) as i32;
        // Bias corrections in f64 so a large t does not lose them to rounding; the per-element
        // loop then multiplies by the reciprocals.
        let inv_bc1 = (1.0 / (1.0 - (b1 as f64).powi(t_exp))) as f32;
        let inv_bc2 = (1.0 / (1.0 - (b2 as f64).powi(t_exp))) as f32;
        let decay = 1.0 - lr * self.weight_decay;
        let k = Coefficients { b1, b2, eps, inv_bc1, inv_bc2, decay, lr, grad_scale };
        update_elements(params, grads, m, v, &k);
    }
}

/// Which parameters of the flat buffer weight decay applies to: sorted, disjoint ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecayMask {
    ranges: Vec<Range<usize>>,
}

impl DecayMask {
    /// Every one of `n` parameters.
    pub fn all(n: usize) -> Self {
        DecayMask { ranges: std::iter::once(0..n).collect() }
    }

    /// GPT-2 practice: the 2-D weights of the linear layers (`c_attn`, `c_proj`, `c_fc`), and
    /// the token and position embeddings only if `embeddings`; never biases or LayerNorm
    /// parameters. (The output head is the token embedding, tied.)
    pub fn gpt2(layout: &crate::model::ParamLayout, embeddings: bool) -> Self {
        let is_embedding = |name: &str| name == "wte.weight" || name == "wpe.weight";
        let mut ranges: Vec<Range<usize>> = layout
            .tensors
            .iter()
            .filter(|t| t.shape.len() == 2 && (embeddings || !is_embedding(&t.name)))
            .map(|t| t.offset..t.offset + t.len())
            .collect();
        ranges.sort_by_key(|r| r.start);
        DecayMask { ranges }
    }

    /// The parameters decayed, in all.
    pub fn len(&self) -> usize {
        self.ranges.iter().map(|r| r.len()).sum()
    }

    /// True if nothing is decayed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `range` cut at the mask's boundaries, in order, each piece with whether it decays.
    pub fn pieces(&self, range: Range<usize>) -> Vec<(Range<usize>, bool)> {
        let mut out = Vec::new();
        self.for_each_piece(range, |r, decayed| out.push((r, decayed)));
        out
    }

    /// [`DecayMask::pieces`] without allocating (the update phase calls it for every chunk of
    /// every step, and steps after the first allocate nothing).
    pub fn for_each_piece(&self, range: Range<usize>, mut f: impl FnMut(Range<usize>, bool)) {
        let mut at = range.start;
        for r in &self.ranges {
            if at >= range.end {
                break;
            }
            if r.end <= at {
                continue;
            }
            let start = r.start.clamp(at, range.end);
            if start > at {
                f(at..start, false);
            }
            let end = r.end.min(range.end);
            if end > start {
                f(start..end, true);
            }
            at = end.max(start);
        }
        if at < range.end {
            f(at..range.end, false);
        }
    }
}

impl AdamWConfig {
    /// [`AdamWConfig::update_chunk`] for the chunk that starts at parameter `start`, decaying
    /// only the parameters `mask` covers.
    #[allow(clippy::too_many_arguments)]
    pub fn update_masked(
        &self,
        start: usize,
        mask: &DecayMask,
        params: &mut [f32],
        grads: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        t: u64,
        lr: f32,
        grad_scale: f32,
    ) {
        mask.for_each_piece(start..start + params.len(), |r, decayed| {
            let local = r.start - start..r.end - start;
            let cfg = if decayed { *self } else { AdamWConfig { weight_decay: 0.0, ..*self } };
            cfg.update_range(local, params, grads, m, v, t, lr, grad_scale);
        });
    }
}

/// The per-element constants of one AdamW update.
struct Coefficients {
    b1: f32,
    b2: f32,
    eps: f32,
    inv_bc1: f32,
    inv_bc2: f32,
    decay: f32,
    lr: f32,
    grad_scale: f32,
}

multiversion! {
    /// The element-wise AdamW update (dispatched to AVX2 at run time: eight lanes, and the
    /// divide and square root on 256-bit vectors).
    fn update_elements(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], k: &Coefficients) {
        let Coefficients { b1, b2, eps, inv_bc1, inv_bc2, decay, lr, grad_scale } = *k;
        for (((p, &g), m), v) in params.iter_mut().zip(grads).zip(m.iter_mut()).zip(v.iter_mut()) {
            let g = g * grad_scale;
            let mm = b1 * *m + (1.0 - b1) * g;
            let vv = b2 * *v + (1.0 - b2) * g * g;
            *m = mm;
            *v = vv;
            let mhat = mm * inv_bc1;
            let vhat = vv * inv_bc2;
            *p = *p * decay - lr * mhat / (vhat.sqrt() + eps);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_moves_each_weight_by_about_lr_against_the_gradient_sign() {
        let cfg = AdamWConfig::default();
        let mut p = vec![1.0f32, 1.0, 1.0];
        let g = vec![0.5f32, -2.0, 0.0];
        let (mut m, mut v) = (vec![0.0; 3], vec![0.0; 3]);
        cfg.update_chunk(&mut p, &g, &mut m, &mut v, 1, 1e-2, 1.0);
        assert!((p[0] - 0.99).abs() < 1e-5);
        assert!((p[1] - 1.01).abs() < 1e-5);
        assert_eq!(p[2], 1.0);
    }

    #[test]
    fn mask_pieces_cover_the_range_in_order_and_split_at_its_boundaries() {
        let mask = DecayMask { ranges: vec![2..5, 7..8, 10..20] };
        let got = mask.pieces(0..12);
        let want = vec![(0..2, false), (2..5, true), (5..7, false), (7..8, true), (8..10, false), (10..12, true)];
        assert_eq!(got, want);
        assert_eq!(mask.pieces(3..4), vec![(3..4, true)]);
        assert_eq!(mask.pieces(5..7), vec![(5..7, false)]);
        assert_eq!(mask.pieces(19..25), vec![(19..20, true), (20..25, false)]);
        assert_eq!(DecayMask::all(9).pieces(4..9), vec![(4..9, true)]);
    }

    #[test]
    fn masked_update_decays_exactly_the_masked_parameters() {
        let cfg = AdamWConfig { weight_decay: 0.5, ..Default::default() };
        let p0: Vec<f32> = (0..40).map(|i| 1.0 + i as f32 * 0.01).collect();
        let g = [0.25f32; 40];
        let mask = DecayMask { ranges: vec![5..12, 30..33] };
        // Chunk by chunk at odd boundaries, against a reference element by element.
        let (mut p, mut m, mut v) = (p0.clone(), vec![0.0; 40], vec![0.0; 40]);
        for r in [0..7, 7..31, 31..40] {
            let (ps, gs) = (&mut p[r.clone()], &g[r.clone()]);
            let (ms, vs) = (&mut m[r.clone()], &mut v[r.clone()]);
            cfg.update_masked(r.start, &mask, ps, gs, ms, vs, 1, 0.1, 1.0);
        }
        for i in 0..40 {
            let decayed = (5..12).contains(&i) || (30..33).contains(&i);
            let one = AdamWConfig { weight_decay: if decayed { 0.5 } else { 0.0 }, ..cfg };
            let (mut q, mut mm, mut vv) = ([p0[i]], [0.0], [0.0]);
            one.update_chunk(&mut q, &g[i..=i], &mut mm, &mut vv, 1, 0.1, 1.0);
            assert_eq!(p[i].to_bits(), q[0].to_bits(), "parameter {i} (decayed: {decayed})");
        }
    }

    #[test]
    fn zero_weight_decay_gives_the_same_bits_under_any_mask() {
        let cfg = AdamWConfig::default();
        let p0: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let g: Vec<f32> = (0..37).map(|i| (i as f32 * 0.91).cos()).collect();
        let (mut pa, mut ma, mut va) = (p0.clone(), vec![0.1; 37], vec![0.2; 37]);
        let (mut pb, mut mb, mut vb) = (p0, vec![0.1; 37], vec![0.2; 37]);
        cfg.update_chunk(&mut pa, &g, &mut ma, &mut va, 3, 1e-3, 0.5);
        let mask = DecayMask { ranges: vec![3..9, 20..21] };
        cfg.update_masked(0, &mask, &mut pb, &g, &mut mb, &mut vb, 3, 1e-3, 0.5);
        assert_eq!((pa, ma, va), (pb, mb, vb));
    }

    #[test]
    fn gpt2_mask_holds_the_linear_weights_and_embeddings_only_when_asked() {
        let layout = crate::model::ParamLayout::new(&crate::config::ModelConfig::tiny());
        let (c, l) = (32usize, 2usize);
        let linear = l * (3 * c * c + c * c + 4 * c * c + 4 * c * c);
        assert_eq!(DecayMask::gpt2(&layout, false).len(), linear);
        assert_eq!(DecayMask::gpt2(&layout, true).len(), linear + 256 * c + 16 * c);
    }

    #[test]
    fn update_range_equals_update_of_the_whole_buffer() {
        let cfg = AdamWConfig { weight_decay: 0.1, ..Default::default() };
        let p0: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let g: Vec<f32> = (0..37).map(|i| (i as f32 * 0.91).cos()).collect();
        let (mut pa, mut ma, mut va) = (p0.clone(), vec![0.1; 37], vec![0.2; 37]);
        let (mut pb, mut mb, mut vb) = (p0, vec![0.1; 37], vec![0.2; 37]);
        cfg.update_chunk(&mut pa, &g, &mut ma, &mut va, 3, 1e-3, 0.5);
        for r in [0..10, 10..11, 11..37] {
            cfg.update_range(r, &mut pb, &g, &mut mb, &mut vb, 3, 1e-3, 0.5);
        }
        assert_eq!(pa, pb);
        assert_eq!(ma, mb);
        assert_eq!(va, vb);
    }
}
