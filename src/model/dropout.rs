//! Dropout as GPT-2 trains with it: on the attention probabilities, on the attention's output
//! projection and on the MLP's output, each before it joins the residual stream, kept values
//! scaled by 1/(1-p).
//!
//! The mask is counter-based: whether element `i` of a site is kept is a pure function of
//! (seed, step, micro-batch, layer, site, i), a SplitMix64-style hash, never a stream drawn in
//! some order. So a micro-batch's masks are the same whichever thread computes it and in
//! whatever order, results stay bit-identical at any thread count, and the backward pass
//! recomputes the mask instead of storing it. Evaluation and generation never pass one.

/// Where a mask applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    /// The attention probabilities [B,NH,T,T], before they weight V.
    AttnProbs = 0,
    /// The attention's output projection [N,C], before the residual add.
    AttnProj = 1,
    /// The MLP's output projection [N,C], before the residual add.
    MlpOut = 2,
}

/// SplitMix64's output function: a bijection of u64 that mixes every input bit into every
/// output bit.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The dropout of one micro-batch of one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    /// Drop probability, in (0, 1).
    p: f32,
    /// Hash of (seed, step, micro-batch).
    key: u64,
    /// An element is dropped when the top 32 bits of its hash are below this.
    threshold: u32,
    scale: f32,
}

/// One (layer, site)'s mask.
#[derive(Clone, Copy, Debug)]
pub struct Mask {
    key: u64,
    threshold: u32,
    scale: f32,
}

impl Dropout {
    /// The dropout of micro-batch `micro` at step `step` (counted from 1) of a run seeded
    /// `seed`; `None` when `p` is 0 (no dropout: the code path of a run without it).
    pub fn new(p: f32, seed: u64, step: u64, micro: usize) -> Option<Dropout> {
        if p <= 0.0 || !p.is_finite() || p >= 1.0 {
            return None;
        }
        let key = mix(mix(mix(seed ^ 0xD409_0D40_90D4_090D).wrapping_add(step.wrapping_mul(GOLDEN))) ^ micro as u64);
        let threshold = (f64::from(p) * 4_294_967_296.0).min(4_294_967_295.0) as u32;
        Some(Dropout { p, key, threshold, scale: 1.0 / (1.0 - p) })
    }

    pub fn p(&self) -> f32 {
        self.p
    }

    /// The mask of `site` in block `layer`.
    pub fn mask(&self, layer: usize, site: Site) -> Mask {
        let k = mix(self.key ^ mix(((layer as u64) << 2 | site as u64).wrapping_add(1).wrapping_mul(GOLDEN)));
        Mask { key: k, threshold: self.threshold, scale: self.scale }
    }
}

impl Mask {
    /// The factor element `i` is multiplied by: 0 (dropped) or 1/(1-p).
    #[inline(always)]
    pub fn factor(&self, i: u64) -> f32 {
        let h = mix(self.key.wrapping_add(i.wrapping_mul(GOLDEN)));
        if ((h >> 32) as u32) < self.threshold {
            0.0
        } else {
            self.scale
        }
    }

    /// `x[j] *= factor(first + j)`.
    pub fn apply(&self, x: &mut [f32], first: u64) {
        for (j, v) in x.iter_mut().enumerate() {
            *v *= self.factor(first + j as u64);
        }
    }

    /// `out[j] = x[j] * factor(first + j)`.
    pub fn apply_into(&self, out: &mut [f32], x: &[f32], first: u64) {
        for (j, (o, &v)) in out.iter_mut().zip(x).enumerate() {
            *o = v * self.factor(first + j as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_drop_about_p_and_depend_on_every_key_part() {
        let d = Dropout::new(0.1, 7, 3, 1).unwrap();
        let m = d.mask(2, Site::MlpOut);
        let dropped = (0..100_000u64).filter(|&i| m.factor(i) == 0.0).count();
        assert!((9_000..11_000).contains(&dropped), "{dropped}");
        assert!((0..1000u64).all(|i| m.factor(i) == 0.0 || m.factor(i) == 1.0 / 0.9));
        let bits = |m: Mask| (0..256u64).map(|i| m.factor(i) == 0.0).collect::<Vec<_>>();
        let base = bits(m);
        for other in [
            Dropout::new(0.1, 8, 3, 1).unwrap().mask(2, Site::MlpOut),
            Dropout::new(0.1, 7, 4, 1).unwrap().mask(2, Site::MlpOut),
            Dropout::new(0.1, 7, 3, 2).unwrap().mask(2, Site::MlpOut),
            d.mask(1, Site::MlpOut),
            d.mask(2, Site::AttnProj),
        ] {
            assert_ne!(bits(other), base);
        }
        assert_eq!(bits(Dropout::new(0.1, 7, 3, 1).unwrap().mask(2, Site::MlpOut)), base, "a pure function");
        assert!(Dropout::new(0.0, 7, 3, 1).is_none());
    }
}
