//! GPT-2 initialisation from a seeded PRNG whose stream is fixed by this file alone, so the
//! same seed gives the same weights on every machine and every version of every dependency.

use super::params::ParamLayout;

/// SplitMix64: tiny, well-studied, and fully specified here.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal by the Marsaglia polar method (f64, rounded to f32 by the caller, so a
    /// last-bit difference in a platform's `ln` cannot reach the f32 weights in practice).
    pub fn next_normal(&mut self) -> f64 {
        loop {
            let u = 2.0 * self.next_f64() - 1.0;
            let v = 2.0 * self.next_f64() - 1.0;
            let s = u * u + v * v;
            if s > 0.0 && s < 1.0 {
                return u * (-2.0 * s.ln() / s).sqrt();
            }
        }
    }
}

/// Fills `params` as GPT-2 does: N(0, 0.02) for embeddings and linear weights, residual output
/// projections (attn.c_proj, mlp.c_proj) scaled by 1/√(2·layers), LayerNorm weights 1, biases 0.
/// Tensors are filled in layout order from one stream.
pub fn init_gpt2(layout: &ParamLayout, params: &mut [f32], seed: u64) {
    let mut rng = SplitMix64::new(seed);
    let residual_std = 0.02 / (2.0 * layout.config.layers as f64).sqrt();
    for spec in &layout.tensors {
        let dst = &mut params[spec.range()];
        let name = spec.name.as_str();
        if name.ends_with(".bias") {
            dst.fill(0.0);
        } else if name.contains("ln_") {
            dst.fill(1.0);
        } else {
            let std = if name.ends_with("c_proj.weight") { residual_std } else { 0.02 };
            for x in dst.iter_mut() {
                *x = (rng.next_normal() * std) as f32;
            }
        }
    }
}
