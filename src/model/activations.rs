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
            d_res: z(n * c),
            d_ln: z(n * c),
            d_big: z(n * 4 * c),
            d_qkv: z(n * 3 * c),
            d_att: z(seq * seq),
        }
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
            + self.lnf.len() * 3
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
