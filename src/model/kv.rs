//! Generation's key/value cache: the forward pass of one new position over the positions
//! already seen.
//!
//! Sampling needs the next-token distribution after the newest token only. Recomputing the
//! whole window for every token costs a forward over all of it (quadratic in its length);
//! with this cache each block keeps the q|k|v rows ([T, 3C], the layout of a block's
//! [`qkv`](super::activations::BlockActs::qkv) activations) of the positions seen so far, and
//! the newest position runs through the blocks as a single row, by the same code as a training
//! pass (`gpt::block_rows`, `gpt::head_logits`): its q|k|v row is appended, and its attention reads
//! the cached keys and values.
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
use super::gemm::gemm;
use super::gpt::{block_rows, head_logits, BlockRows};
use super::kernel::Mat;
use super::layers::{softmax_forward, softmax_scaled};
use super::packed::PackedWeights;
use super::params::ParamLayout;
use crate::config::ModelConfig;

/// Each block's q|k|v rows of the positions seen, and one row's buffers.
pub struct KvCache {
    config: ModelConfig,
    /// Per block, [T, 3C]: rows `0..len` are valid.
    qkv: Vec<Vec<f32>>,
    len: usize,
    /// The residual stream of the new row [C].
    x: Vec<f32>,
    /// A block's buffers for the new row ([`BlockRows`]), and the final LayerNorm's [C].
    row: RowBufs,
    lnf: Vec<f32>,
    /// One head's scores, then probabilities [T].
    scores: Vec<f32>,
    /// The next-token probabilities [V].
    probs: Vec<f32>,
}

/// The buffers of [`BlockRows`] for one row.
struct RowBufs {
    ln1: Vec<f32>,
    ln1_mean: [f32; 1],
    ln1_rstd: [f32; 1],
    atty: Vec<f32>,
    res2: Vec<f32>,
    ln2: Vec<f32>,
    ln2_mean: [f32; 1],
    ln2_rstd: [f32; 1],
    fch: Vec<f32>,
    fch_gelu: Vec<f32>,
    res3: Vec<f32>,
}

impl RowBufs {
    fn new(c: usize) -> Self {
        RowBufs {
            ln1: vec![0.0; c],
            ln1_mean: [0.0],
            ln1_rstd: [0.0],
            atty: vec![0.0; c],
            res2: vec![0.0; c],
            ln2: vec![0.0; c],
            ln2_mean: [0.0],
            ln2_rstd: [0.0],
            fch: vec![0.0; 4 * c],
            fch_gelu: vec![0.0; 4 * c],
            res3: vec![0.0; c],
        }
    }

    fn views(&mut self) -> BlockRows<'_> {
        BlockRows {
            ln1: &mut self.ln1,
            ln1_mean: &mut self.ln1_mean,
            ln1_rstd: &mut self.ln1_rstd,
            atty: &mut self.atty,
            res2: &mut self.res2,
            ln2: &mut self.ln2,
            ln2_mean: &mut self.ln2_mean,
            ln2_rstd: &mut self.ln2_rstd,
            fch: &mut self.fch,
            fch_gelu: &mut self.fch_gelu,
            res3: &mut self.res3,
        }
    }
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
            row: RowBufs::new(c),
            lnf: vec![0.0; c],
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
        let (i, c, nh) = (self.len, cfg.embed, cfg.heads);
        assert!(i < cfg.context, "the cache holds the whole context: the window must slide");
        assert!((token as usize) < cfg.vocab, "token {token} outside the vocabulary of {}", cfg.vocab);
        // The embedding of this row (as `encoder_forward` computes it at position i).
        let (wte, wpe) = (&params[layout.wte.clone()], &params[layout.wpe.clone()]);
        let (te, pe) = (&wte[token as usize * c..][..c], &wpe[i * c..][..c]);
        for ((x, &a), &b) in self.x.iter_mut().zip(te).zip(pe) {
            *x = a + b;
        }
        for (l, cache) in self.qkv.iter_mut().enumerate() {
            let (w, pk) = (layout.blocks[l].of(params), packed.map(|pw| &pw.blocks[l]));
            let scores = &mut self.scores;
            let qkv = &mut cache[..(i + 1) * 3 * c];
            block_rows(&w, pk, self.row.views(), qkv, i, &self.x, 1, c, None, |atty, qkv| {
                attention_row(atty, qkv, i, c, nh, scores)
            });
            std::mem::swap(&mut self.x, &mut self.row.res3);
        }
        self.len = i + 1;
        let (mut mean, mut rstd) = ([0.0], [0.0]);
        head_logits(layout, params, packed, &self.x, &mut self.lnf, &mut mean, &mut rstd, &mut self.probs, 1);
        softmax_forward(&mut self.probs, 1, cfg.vocab);
        &self.probs
    }
}

/// `atty` [C] = causal self-attention of row `i` of `qkv` [i+1, 3C] over its rows `0..=i`,
/// head by head (`scores`: at least i + 1 values of scratch).
fn attention_row(atty: &mut [f32], qkv: &[f32], i: usize, c: usize, nh: usize, scores: &mut [f32]) {
    let (hd, c3, t) = (c / nh, 3 * c, i + 1);
    let scale = 1.0 / (hd as f32).sqrt();
    let scores = &mut scores[..t];
    for h in 0..nh {
        let q = Mat::rows(&qkv[i * c3 + h * hd..][..hd], hd);
        // Kᵀ [hd, t] and V [t, hd], views of the cached rows.
        let kt = Mat::strided(&qkv[c + h * hd..], 1, c3);
        let vm = Mat::strided(&qkv[2 * c + h * hd..], c3, 1);
        gemm(1, t, hd, scores, t, q, kt, false);
        softmax_scaled(scores, scale);
        gemm(1, hd, t, &mut atty[h * hd..], c, Mat::rows(scores, t), vm, false);
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
