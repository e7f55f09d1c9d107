//! Per-worker activation and scratch buffers. Each worker owns one, sized once for its
//! largest (batch, seq), so many workers can run forward/backward at the same time against
//! the same read-only weights, and a step allocates nothing.

use crate::config::ModelConfig;

/// Saved forward values of one transformer block (N = B·T rows).
#[derive(Clone, Debug)]
pub struct BlockActs {
    /// ln_1 output [N,C], its mean and rstd [N].
    pub ln1: Vec<f32>,
    pub ln1_mean: Vec<f32>,
    pub ln1_rstd: Vec<f32>,
    /// Fused q|k|v [N,3C].
    pub qkv: Vec<f32>,
    /// Attention probabilities [B,NH,T,T] (zero above the diagonal).
    pub att: Vec<f32>,
    /// Attention output before c_proj [N,C].
    pub atty: Vec<f32>,
    /// Residual stream after the attention half [N,C].
    pub res2: Vec<f32>,
    /// ln_2 output [N,C], mean and rstd [N].
    pub ln2: Vec<f32>,
    pub ln2_mean: Vec<f32>,
    pub ln2_rstd: Vec<f32>,
    /// GELU' of the c_fc output [N,4C] (the c_fc output itself until the GELU replaces it:
    /// the backward pass needs only the derivative), and the GELU output [N,4C].
    pub fch: Vec<f32>,
    pub fch_gelu: Vec<f32>,
    /// Residual stream after the block [N,C].
    pub res3: Vec<f32>,
}

/// Everything one forward+backward needs besides the weights and gradients.
#[derive(Clone, Debug)]
pub struct Activations {
    pub config: ModelConfig,
    /// Capacity in sequences and positions.
    pub cap_b: usize,
    pub cap_t: usize,
    /// Shape of the last forward call.
    pub b: usize,
    pub t: usize,
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub has_targets: bool,
    pub encoded: Vec<f32>,
    pub blocks: Vec<BlockActs>,
    pub lnf: Vec<f32>,
    pub lnf_mean: Vec<f32>,
    pub lnf_rstd: Vec<f32>,
    /// Logits, turned into probabilities in place by the loss [N,V]; gradient of the logits
    /// after backward.
    pub probs: Vec<f32>,
    /// Per-position loss [N].
    pub losses: Vec<f32>,
    /// The dropout of the last forward call (training only), which backward follows.
    pub dropout: Option<super::dropout::Dropout>,
    // Backward scratch.
    pub(crate) d_res: Vec<f32>,
    pub(crate) d_ln: Vec<f32>,
    pub(crate) d_big: Vec<f32>,
    pub(crate) d_qkv: Vec<f32>,
    pub(crate) d_att: Vec<f32>,
}

impl Activations {
    /// Buffers for up to `batch` sequences of up to `seq` positions (`seq` ≤ context).
    pub fn new(config: &ModelConfig, batch: usize, seq: usize) -> Self {
        assert!(seq <= config.context, "sequence length {seq} exceeds the model context {}", config.context);
        let (c, v, nh) = (config.embed, config.vocab, config.heads);
        let n = batch * seq;
        let z = |len: usize| vec![0.0f32; len];
        let blocks = (0..config.layers)
            .map(|_| BlockActs {
                ln1: z(n * c),
                ln1_mean: z(n),
                ln1_rstd: z(n),
                qkv: z(n * 3 * c),
                att: z(batch * nh * seq * seq),
                atty: z(n * c),
                res2: z(n * c),
                ln2: z(n * c),
                ln2_mean: z(n),
                ln2_rstd: z(n),
                fch: z(n * 4 * c),
                fch_gelu: z(n * 4 * c),
                res3: z(n * c),
            })
            .collect();
        Activations {
            config: *config,
            cap_b: batch,
            cap_t: seq,
            b: 0,
            t: 0,
            inputs: vec![0; n],
            targets: vec![0; n],
            has_targets: false,
            encoded: z(n * c),
            blocks,
            lnf: z(n * c),
            lnf_mean: z(n),
            lnf_rstd: z(n),
            probs: z(n * v),
            losses: z(n),
            dropout: None,
            d_res: z(n * c),
            d_ln: z(n * c),
            d_big: z(n * 4 * c),
            d_qkv: z(n * 3 * c),
            d_att: z(seq * seq),
        }
    }

    /// Bytes [`Activations::new`] allocates for `batch` sequences of `seq` positions (the
    /// inputs and targets included), computed with overflow-checked arithmetic before anything
    /// is allocated (`None` on overflow). Mirrors `new` line by line; a unit test holds them
    /// equal.
    pub fn planned_bytes(config: &ModelConfig, batch: usize, seq: usize) -> Option<u64> {
        let (c, v, nh) = (config.embed as u64, config.vocab as u64, config.heads as u64);
        let (b, t) = (batch as u64, seq as u64);
        let n = b.checked_mul(t)?;
        let nc = n.checked_mul(c)?;
        let tt = t.checked_mul(t)?;
        // ln1, atty, res2, ln2, res3 (C each), qkv (3C), fch and fch_gelu (4C each); four [N]
        // statistics; the attention probabilities [B, NH, T, T].
        let per_block =
            nc.checked_mul(16)?.checked_add(n.checked_mul(4)?)?.checked_add(b.checked_mul(nh)?.checked_mul(tt)?)?;
        // encoded, lnf, d_res, d_ln (C each), d_big (4C), d_qkv (3C); lnf_mean, lnf_rstd,
        // losses [N]; probs [N, V]; d_att [T, T]; inputs and targets (u32) [N] each.
        let rest =
            nc.checked_mul(11)?.checked_add(n.checked_mul(5)?)?.checked_add(n.checked_mul(v)?)?.checked_add(tt)?;
        per_block.checked_mul(config.layers as u64)?.checked_add(rest)?.checked_mul(4)
    }

    /// Probabilities over the vocabulary at (sequence `bi`, position `ti`) of the last forward.
    pub fn probs_at(&self, bi: usize, ti: usize) -> &[f32] {
        let v = self.config.vocab;
        &self.probs[(bi * self.t + ti) * v..][..v]
    }

    /// Bytes of memory held.
    pub fn bytes(&self) -> usize {
        let per_block: usize = self
            .blocks
            .first()
            .map(|b| {
                [
                    &b.ln1,
                    &b.ln1_mean,
                    &b.ln1_rstd,
                    &b.qkv,
                    &b.att,
                    &b.atty,
                    &b.res2,
                    &b.ln2,
                    &b.ln2_mean,
                    &b.ln2_rstd,
                    &b.fch,
                    &b.fch_gelu,
                    &b.res3,
                ]
                .iter()
                .map(|v| v.len())
                .sum()
            })
            .unwrap_or(0);
        let rest = self.encoded.len()
            + self.lnf.len()
            + self.lnf_mean.len()
            + self.lnf_rstd.len()
            + self.probs.len()
            + self.losses.len()
            + self.d_res.len()
            + self.d_ln.len()
            + self.d_big.len()
            + self.d_qkv.len()
            + self.d_att.len();
        4 * (per_block * self.blocks.len() + rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planned_bytes_equal_what_new_allocates() {
        for name in crate::config::PRESETS {
            let cfg = ModelConfig::preset(name).unwrap();
            for (b, t) in [(1, 1), (2, cfg.context), (3, cfg.context / 2 + 1)] {
                let acts = Activations::new(&cfg, b, t);
                let io = 4 * (acts.inputs.len() + acts.targets.len());
                assert_eq!(Activations::planned_bytes(&cfg, b, t), Some((acts.bytes() + io) as u64), "{name} {b}x{t}");
            }
        }
    }

    #[test]
    fn planned_bytes_overflow_is_none() {
        let cfg = ModelConfig::preset("tiny").unwrap();
        assert_eq!(Activations::planned_bytes(&cfg, usize::MAX, 2), None);
    }
}
