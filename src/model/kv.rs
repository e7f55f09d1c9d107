//! Generation's key/value cache: the forward pass of one new position over the positions
//! already seen.
//!
//! Sampling needs the next-token distribution after the newest token only. Recomputing the
//! whole window for every token costs a forward over all of it (quadratic in its length);
//! with this cache each block keeps the q|k|v rows ([T, 3C], the layout of a block's
//! [`qkv`](super::activations::BlockActs::qkv) activations) of the positions seen so far, and
//! the newest position runs through the blocks as a single row: its q|k|v row is appended, and
//! its attention reads the cached keys and values.
//!
//! **The same bits as recomputing the window**, up to a window of 256 positions (tested).
//! Every layer but attention is row by row (LayerNorm, the linear layers, whose per-element
//! operations depend on K only, never on the number of rows, GELU, the residual adds).
//! Attention's row i takes the scores q_i·k_j (K = head size) and the output P_i·V with
//! K = i + 1, here as in the whole-window forward's last row. The cached rows come from
//! earlier single-row steps, or from the whole-window forward that read the prompt, whose
//! rows take P·V over their causal row block (up to 32 rows) with zero probabilities past the
//! diagonal: a zero product adds nothing while that K fits one of the kernel's K blocks (256),
//! so up to 256 positions a cached row is what recomputing gives. Past 256 those earlier rows'
//! K blocking differs from the single-row steps' and the two agree to rounding (the cached
//! generation is still a pure function of the model, the prompt and the seed).
//!
//! Positions are absolute (learned position embeddings): once the window is full and slides,
//! every position moves, so the caller drops the cache and recomputes the window per token.

use super::activations::Activations;
use super::gemm::{gemm, gemm_prepacked};
use super::kernel::Mat;
use super::layers::{
    add_inplace, gelu_forward_saving_grad, layernorm_forward, linear_forward, softmax_forward, softmax_scaled,
};
use super::packed::PackedWeights;
use super::params::ParamLayout;
use crate::config::ModelConfig;

/// Each block's q|k|v rows of the positions seen, and one row's scratch.
pub struct KvCache {
    config: ModelConfig,
    /// Per block, [T, 3C]: rows `0..len` are valid.
    qkv: Vec<Vec<f32>>,
    len: usize,
    /// The residual stream of the new row [C].
    x: Vec<f32>,
    /// A LayerNorm output, then the attention output [C].
    ln: Vec<f32>,
    atty: Vec<f32>,
    /// A linear layer's output before it joins the residual [C].
    out: Vec<f32>,
    /// c_fc's output (then GELU') and GELU's [4C].
    fch: Vec<f32>,
    fch_gelu: Vec<f32>,
    /// One head's scores, then probabilities [T].
    scores: Vec<f32>,
    /// The next-token probabilities [V].
    probs: Vec<f32>,
}

impl KvCache {
    /// An empty cache for `config`'s context.
    pub fn new(config: &ModelConfig) -> Self {
        let (t, c) = (config.context, config.embed);
        KvCache {
            config: *config,
            qkv: (0..config.layers).map(|_| vec![0.0; t * 3 * c]).collect(),
            len: 0,
            x: vec![0.0; c],
            ln: vec![0.0; c],
            atty: vec![0.0; c],
            out: vec![0.0; c],
            fch: vec![0.0; 4 * c],
            fch_gelu: vec![0.0; 4 * c],
            scores: vec![0.0; t],
            probs: vec![0.0; config.vocab],
        }
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position (the window slid: every position moved).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Caches the q|k|v rows of positions `0..t` of sequence 0 of the last forward in `acts`.
    pub fn fill_from(&mut self, acts: &Activations, t: usize) {
        assert_eq!(acts.config, self.config, "activations of another config");
        assert!(acts.b >= 1 && t <= acts.t && t <= self.config.context, "{t} positions of a window of {}", acts.t);
        let rows = t * 3 * self.config.embed;
        for (cache, blk) in self.qkv.iter_mut().zip(&acts.blocks) {
            cache[..rows].copy_from_slice(&blk.qkv[..rows]);
        }
        self.len = t;
    }

    /// Runs token `token` at position `self.len()` through the model, caches its q|k|v rows,
    /// and returns the next-token probabilities after it.
    pub fn forward_next(
        &mut self,
        layout: &ParamLayout,
        params: &[f32],
        packed: Option<&PackedWeights>,
        token: u32,
    ) -> &[f32] {
        let cfg = self.config;
        assert_eq!(layout.config, cfg, "a layout of another config");
        assert_eq!(params.len(), layout.num_params(), "parameter buffer has the wrong length");
        let (i, c, v) = (self.len, cfg.embed, cfg.vocab);
        assert!(i < cfg.context, "the cache holds the whole context: the window must slide");
        assert!((token as usize) < v, "token {token} outside the vocabulary of {v}");
        let (wte, wpe) = (&params[layout.wte.clone()], &params[layout.wpe.clone()]);
        let (te, pe) = (&wte[token as usize * c..][..c], &wpe[i * c..][..c]);
        for ((x, &a), &b) in self.x.iter_mut().zip(te).zip(pe) {
            *x = a + b;
        }
        for l in 0..cfg.layers {
            self.block_row(layout, params, packed, l);
        }
        self.len = i + 1;
        // The output head on this row: final LayerNorm, logits = lnf · wteᵀ, softmax.
        let (lnf_w, lnf_b) = (&params[layout.lnf_w.clone()], &params[layout.lnf_b.clone()]);
        let (mut mean, mut rstd) = ([0.0], [0.0]);
        layernorm_forward(&mut self.ln, &mut mean, &mut rstd, &self.x, lnf_w, lnf_b, 1, c);
        let head = packed.map(|pw| &pw.head.fwd);
        gemm_prepacked(1, v, c, &mut self.probs, v, Mat::rows(&self.ln, c), Mat::transposed(wte, c), head, false);
        softmax_forward(&mut self.probs, 1, v);
        &self.probs
    }

    /// Block `l` on the new row `self.x` at position `self.len` (in place): the steps of
    /// [`super::gpt`]'s block forward, one row, attention over the cached rows.
    fn block_row(&mut self, layout: &ParamLayout, params: &[f32], packed: Option<&PackedWeights>, l: usize) {
        let c = self.config.embed;
        let w = layout.blocks[l].of(params);
        let pk = packed.map(|pw| &pw.blocks[l]);
        let (mut mean, mut rstd) = ([0.0], [0.0]);
        let qkv_row = &mut self.qkv[l][self.len * 3 * c..][..3 * c];
        layernorm_forward(&mut self.ln, &mut mean, &mut rstd, &self.x, w.ln1_w, w.ln1_b, 1, c);
        linear_forward(qkv_row, &self.ln, w.qkv_w, pk.map(|k| &k.qkv.fwd), w.qkv_b, 1, c, 3 * c);
        self.attention_row(l);
        linear_forward(&mut self.out, &self.atty, w.proj_w, pk.map(|k| &k.proj.fwd), w.proj_b, 1, c, c);
        add_inplace(&mut self.out, &self.x);
        std::mem::swap(&mut self.x, &mut self.out);
        layernorm_forward(&mut self.ln, &mut mean, &mut rstd, &self.x, w.ln2_w, w.ln2_b, 1, c);
        linear_forward(&mut self.fch, &self.ln, w.fc_w, pk.map(|k| &k.fc.fwd), w.fc_b, 1, c, 4 * c);
        gelu_forward_saving_grad(&mut self.fch_gelu, &mut self.fch);
        linear_forward(&mut self.out, &self.fch_gelu, w.fcproj_w, pk.map(|k| &k.fcproj.fwd), w.fcproj_b, 1, 4 * c, c);
        add_inplace(&mut self.out, &self.x);
        std::mem::swap(&mut self.x, &mut self.out);
    }

    /// `self.atty` = causal self-attention of row `self.len` of block `l`'s cached q|k|v over
    /// rows `0..=self.len`, head by head.
    fn attention_row(&mut self, l: usize) {
        let (c, nh) = (self.config.embed, self.config.heads);
        let (hd, c3, t) = (c / nh, 3 * c, self.len + 1);
        let scale = 1.0 / (hd as f32).sqrt();
        let qkv = &self.qkv[l][..t * c3];
        let scores = &mut self.scores[..t];
        for h in 0..nh {
            let q = Mat::rows(&qkv[self.len * c3 + h * hd..][..hd], hd);
            // Kᵀ [hd, t] and V [t, hd], views of the cached rows.
            let kt = Mat::strided(&qkv[c + h * hd..], 1, c3);
            let vm = Mat::strided(&qkv[2 * c + h * hd..], c3, 1);
            gemm(1, t, hd, scores, t, q, kt, false);
            softmax_scaled(scores, scale);
            gemm(1, hd, t, &mut self.atty[h * hd..], c, Mat::rows(scores, t), vm, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gpt::forward_last_position;
    use crate::model::Model;

    fn cfg(layers: usize, heads: usize, embed: usize, context: usize) -> ModelConfig {
        ModelConfig { vocab: 256, layers, heads, embed, context }
    }

    /// For every window length t: the probabilities after position t-1 from the cache (rows
    /// 0..t-1 cached by single-row steps, or by a whole-window forward of the first `prefill`
    /// positions) and from recomputing the window; returns the largest difference and whether
    /// every one had the same bits.
    fn compare(cfg: ModelConfig, prefill: usize, packed: bool) -> (f32, bool) {
        let layout = ParamLayout::new(&cfg);
        let model = Model::new(cfg, 5);
        let mut pw = PackedWeights::new(&layout);
        pw.pack(&layout, &model.params);
        let pw = packed.then_some(&pw);
        let ids: Vec<u32> = (0..cfg.context).map(|i| ((i * 131 + 7) % cfg.vocab) as u32).collect();
        let mut acts = Activations::new(&cfg, 1, cfg.context);
        let mut cache = KvCache::new(&cfg);
        if prefill > 0 {
            forward_last_position(&layout, &model.params, pw, &mut acts, &ids[..prefill], prefill);
            cache.fill_from(&acts, prefill);
        }
        let (mut worst, mut same) = (0.0f32, true);
        for t in prefill + 1..=cfg.context {
            let cached = cache.forward_next(&layout, &model.params, pw, ids[t - 1]).to_vec();
            assert_eq!(cache.len(), t);
            forward_last_position(&layout, &model.params, pw, &mut acts, &ids[..t], t);
            let whole = acts.probs_at(0, t - 1);
            assert!(whole.iter().all(|p| p.is_finite() && *p > 0.0));
            for (x, y) in cached.iter().zip(whole) {
                worst = worst.max((x - y).abs() / y.abs());
                same &= x.to_bits() == y.to_bits();
            }
        }
        (worst, same)
    }

    #[test]
    fn the_cached_next_position_has_the_bits_of_recomputing_the_window_up_to_256_positions() {
        // tiny; small (context 128: four causal row blocks); an odd width (36, 3 heads of 12:
        // LayerNorm and head-size tails); a context of one position; one of exactly one K block.
        let configs =
            [ModelConfig::tiny(), ModelConfig::small(), cfg(2, 3, 36, 40), cfg(1, 1, 8, 1), cfg(1, 2, 32, 256)];
        for c in configs {
            for prefill in [0, 1, c.context / 2 + 3].into_iter().filter(|&p| p < c.context) {
                for packed in [false, true] {
                    let (worst, same) = compare(c, prefill, packed);
                    assert!(same, "{c:?}, prefill {prefill}, packed {packed}: bits differ (worst {worst:e})");
                }
            }
        }
    }

    #[test]
    fn past_256_positions_the_cached_next_position_agrees_with_recomputing_to_rounding() {
        // Rows cached from a whole-window forward past 256 positions took their attention
        // output over two K blocks, split where a single-row step would not split them.
        let c = cfg(2, 2, 32, 300);
        for prefill in [0, 280] {
            let (worst, _) = compare(c, prefill, true);
            assert!(worst < 1e-5, "prefill {prefill}: relative difference {worst:e}");
        }
    }

    #[test]
    fn a_cleared_cache_starts_again_at_position_zero() {
        let c = ModelConfig::tiny();
        let layout = ParamLayout::new(&c);
        let model = Model::new(c, 2);
        let mut cache = KvCache::new(&c);
        let first = cache.forward_next(&layout, &model.params, None, 42).to_vec();
        cache.forward_next(&layout, &model.params, None, 7);
        cache.clear();
        assert!(cache.is_empty());
        let again = cache.forward_next(&layout, &model.params, None, 42);
        assert!(first.iter().zip(again).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    #[test]
    #[should_panic(expected = "the window must slide")]
    fn a_full_cache_refuses_another_position() {
        let c = ModelConfig::tiny();
        let layout = ParamLayout::new(&c);
        let model = Model::new(c, 2);
        let mut cache = KvCache::new(&c);
        for i in 0..=c.context {
            cache.forward_next(&layout, &model.params, None, i as u32);
        }
    }
}
