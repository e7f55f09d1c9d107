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
