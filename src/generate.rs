//! Sampling text from a model, one byte (or token) at a time.
//!
//! The model sees at most its context T, so generation keeps a sliding window of the last T
//! tokens. While the window grows, each new token runs through the model as a single row over
//! a key/value cache ([`KvCache`]: the same bits as recomputing the window up to 256
//! positions; the prompt itself is read by one whole-window forward, which fills the cache).
//! Once the window is full it slides, every position moves (positions are absolute), and each
//! token recomputes the window, with the output head (final LayerNorm, logits, softmax) on the
//! last position alone ([`forward_last_position`], the same bits as that row of a whole
//! forward). Randomness comes from a seeded [`SplitMix64`], so a seed names the same text on
//! every machine.

use crate::bail;
use crate::error::Result;
use crate::model::init::SplitMix64;
use crate::model::kv::KvCache;
use crate::model::{gpt::forward_last_position, Activations, Model, PackedWeights, ParamLayout};
use crate::tokenizer::Tokenizer;

/// How to sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleOptions {
    /// Bytes to generate after the prompt.
    pub tokens: usize,
    /// Softmax temperature; 0 is greedy (always the most likely byte).
    pub temperature: f32,
    /// Sample only among the `k` most likely bytes; 0 means all of them.
    pub top_k: usize,
    /// Seed of the sampling PRNG.
    pub seed: u64,
}

impl Default for SampleOptions {
    fn default() -> Self {
        SampleOptions { tokens: 200, temperature: 1.0, top_k: 0, seed: 1 }
    }
}

impl SampleOptions {
    /// Rejects settings that cannot be sampled with.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            bail!("temperature must be a finite number >= 0, got {}", self.temperature);
        }
        Ok(())
    }
}

/// The token ids that are bytes: byte-level generation draws among these.
const BYTE_IDS: usize = 256;

/// Produces one byte after another from a prompt.
pub struct Generator<'a> {
    model: &'a Model,
    layout: ParamLayout,
    /// `model.params` packed for the GEMM kernel (the weights are fixed while generating).
    packed: PackedWeights,
    acts: Activations,
    /// The q|k|v rows of the window's positions but the newest, while the window has not slid
    /// (`None`: recompute the window for every token).
    cache: Option<KvCache>,
    window: Vec<u32>,
    rng: SplitMix64,
    opts: SampleOptions,
    /// Ids drawn are below this: 256 for byte-level models, the tokenizer's vocabulary else
    /// (a model's vocabulary may be padded past either).
    draw_below: usize,
}

impl<'a> Generator<'a> {
    /// Starts from `prompt`, of which only the last T bytes are seen; the prompt must not be
    /// empty, since the model has no start-of-text token to condition on instead.
    pub fn new(model: &'a Model, prompt: &[u8], opts: SampleOptions) -> Result<Self> {
        if prompt.is_empty() {
            bail!("the prompt must hold at least one byte (the model has no start-of-text token)");
        }
        if let Some(&b) = prompt.iter().find(|&&b| usize::from(b) >= model.config.vocab) {
            bail!("the prompt holds byte {b}, outside the model's vocabulary of {}", model.config.vocab);
        }
        let ids: Vec<u32> = prompt.iter().map(|&b| u32::from(b)).collect();
        Self::from_ids(model, &ids, opts, BYTE_IDS)
    }

    /// Starts from the token ids `prompt` (at least one; only the last T are seen), drawing ids
    /// below `draw_below` (a tokenizer's vocabulary).
    pub fn from_ids(model: &'a Model, prompt: &[u32], opts: SampleOptions, draw_below: usize) -> Result<Self> {
        opts.validate()?;
        if prompt.is_empty() {
            bail!("the prompt must hold at least one token (the model has no start-of-text token)");
        }
        if let Some(&id) = prompt.iter().find(|&&id| id as usize >= model.config.vocab) {
            bail!("the prompt holds token {id}, outside the model's vocabulary of {}", model.config.vocab);
        }
        let t = model.config.context;
        let start = prompt.len().saturating_sub(t);
        let window = prompt[start..].to_vec();
        let layout = ParamLayout::new(&model.config);
        // The weights do not change while generating: pack them once for every forward pass.
        let mut packed = PackedWeights::new(&layout);
        packed.pack(&layout, &model.params);
        Ok(Generator {
            model,
            packed,
            layout,
            acts: Activations::new(&model.config, 1, t),
            cache: Some(KvCache::new(&model.config)),
            window,
            rng: SplitMix64::new(opts.seed),
            opts,
            draw_below: draw_below.max(1),
        })
    }

    /// The next byte of a byte-level model ([`Generator::new`]), which also joins the window.
    pub fn next_byte(&mut self) -> Result<u8> {
        let id = self.next_id()?;
        Ok(u8::try_from(id).unwrap_or(b'?'))
    }

    /// The next token id, which also joins the window. Non-finite output probabilities (finite
    /// but diverged weights can overflow the logits) are an error, not a token drawn from NaN.
    pub fn next_id(&mut self) -> Result<u32> {
        let t = self.window.len();
        let context = self.model.config.context;
        let (params, packed) = (&self.model.params, Some(&self.packed));
        let probs = match self.cache.as_mut() {
            // Every position but the newest is cached: run the newest alone.
            Some(cache) if cache.len() + 1 == t => cache.forward_next(&self.layout, params, packed, self.window[t - 1]),
            cache => {
                forward_last_position(&self.layout, params, packed, &mut self.acts, &self.window, t);
                // The next token joins a window that has not slid yet: start caching from it.
                if let Some(cache) = cache.filter(|_| t < context) {
                    cache.fill_from(&self.acts, t);
                }
                self.acts.probs_at(0, t - 1)
            }
        };
        if let Some(i) = probs.iter().position(|p| !p.is_finite()) {
            bail!("the model's output is not finite (probability {} of token {i} after {t} tokens): its weights have diverged", probs[i]);
        }
        // A model whose vocabulary is larger than its data's (`--vocab-size`, or a padded
        // vocabulary) never saw the other ids: draw among the data's, in proportion.
        let probs = &probs[..probs.len().min(self.draw_below)];
        let u = self.rng.next_f64();
        let next = sample_index(probs, self.opts.temperature, self.opts.top_k, u) as u32;
        if t == context {
            // The window slides: every position moves, so nothing cached stays valid.
            self.window.remove(0);
            if let Some(cache) = self.cache.as_mut() {
                cache.clear();
            }
        }
        self.window.push(next);
        Ok(next)
    }

    /// Recomputes the window for every token instead of caching keys and values (the
    /// reference the cache is tested against).
    pub fn without_cache(mut self) -> Self {
        self.cache = None;
        self
    }
}

/// Generates `opts.tokens` bytes after `prompt`, handing each to `emit` as it is produced
/// (so a caller can stream them), and returns them. The result grows as bytes come (nothing is
/// reserved from `opts.tokens`, which may be any number); [`generate_streaming`] keeps none.
pub fn generate(
    model: &Model,
    prompt: &[u8],
    opts: SampleOptions,
    mut emit: impl FnMut(u8) -> Result<()>,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    generate_streaming(model, prompt, opts, |b| {
        emit(b)?;
        out.push(b);
        Ok(())
    })?;
    Ok(out)
}

/// As [`generate`], keeping nothing: memory does not depend on `opts.tokens`.
pub fn generate_streaming(
    model: &Model,
    prompt: &[u8],
    opts: SampleOptions,
    mut emit: impl FnMut(u8) -> Result<()>,
) -> Result<()> {
    let mut gen = Generator::new(model, prompt, opts)?;
    for _ in 0..opts.tokens {
        emit(gen.next_byte()?)?;
    }
    Ok(())
}

/// Generates `opts.tokens` tokens after `prompt` with `tokenizer` (the prompt encoded, every
/// token handed to `emit` as the bytes it stands for, `table` from
/// [`Tokenizer::token_bytes`]); `None` is a byte-level model, as [`generate_streaming`].
pub fn generate_text(
    model: &Model,
    tokenizer: Option<(&Tokenizer, &[Vec<u8>])>,
    prompt: &[u8],
    opts: SampleOptions,
    mut emit: impl FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let Some((tok, table)) = tokenizer else {
        return generate_streaming(model, prompt, opts, |b| emit(&[b]));
    };
    let text = std::str::from_utf8(prompt).map_err(|_| crate::err!("the prompt is not UTF-8 text"))?;
    let ids = tok.encode(text)?;
    let mut gen = Generator::from_ids(model, &ids, opts, tok.vocab_size().min(table.len()))?;
    for _ in 0..opts.tokens {
        let id = gen.next_id()?;
        emit(table.get(id as usize).map_or(&[][..], Vec::as_slice))?;
    }
    Ok(())
}

/// [`generate_text`], the bytes kept.
pub fn generate_bytes(
    model: &Model,
    tokenizer: Option<(&Tokenizer, &[Vec<u8>])>,
    prompt: &[u8],
    opts: SampleOptions,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    generate_text(model, tokenizer, prompt, opts, |b| {
        out.extend_from_slice(b);
        Ok(())
    })?;
    Ok(out)
}

/// Picks an index from the probabilities `probs` given a uniform `u` in [0, 1).
///
/// Temperature τ rescales as softmax(logits/τ), i.e. weights p^(1/τ), computed in f64 from
/// ln p so that small temperatures do not underflow. τ = 0 is argmax (the lowest index among
/// ties). With `top_k` > 0 only the k largest probabilities take part (ties broken by the lower
/// index, so the choice is deterministic).
pub fn sample_index(probs: &[f32], temperature: f32, top_k: usize, u: f64) -> usize {
    if probs.is_empty() {
        return 0;
    }
    if temperature == 0.0 {
        return argmax(probs);
    }
    let mut candidates: Vec<usize> = (0..probs.len()).collect();
    if top_k > 0 && top_k < probs.len() {
        // Stable sort by descending probability keeps lower indices first among ties.
        candidates.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        candidates.truncate(top_k);
        candidates.sort_unstable();
    }
    let inv_t = 1.0 / f64::from(temperature);
    let logs: Vec<f64> = candidates.iter().map(|&i| f64::from(probs[i].max(0.0)).ln() * inv_t).collect();
    let max = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return argmax(probs);
    }
    let weights: Vec<f64> = logs.iter().map(|&l| (l - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    let target = u * total;
    let mut acc = 0.0;
    for (&i, &w) in candidates.iter().zip(&weights) {
        acc += w;
        if target < acc {
            return i;
        }
    }
    // Rounding can leave `target` a hair above the last partial sum.
    candidates.iter().zip(&weights).rev().find(|(_, &w)| w > 0.0).map(|(&i, _)| i).unwrap_or(candidates[0])
}

fn argmax(probs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > probs[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    #[test]
    fn the_last_position_forward_equals_the_whole_window_forward_at_that_position() {
        use crate::model::gpt::{forward_last_position, forward_with_layout};
        // `small` has a context over 128, so a window can span several K blocks of attention.
        for cfg in [ModelConfig::tiny(), ModelConfig::preset("small").unwrap()] {
            let layout = ParamLayout::new(&cfg);
            let model = Model::new(cfg, 11);
            let mut packed = PackedWeights::new(&layout);
            packed.pack(&layout, &model.params);
            let ids: Vec<u32> = (0..cfg.context).map(|i| ((i * 37 + 5) % cfg.vocab) as u32).collect();
            let mut whole = Activations::new(&cfg, 1, cfg.context);
            let mut last = Activations::new(&cfg, 1, cfg.context);
            for t in [1, 2, 7, cfg.context / 2 + 3, cfg.context] {
                for pw in [None, Some(&packed)] {
                    forward_with_layout(&layout, &model.params, pw, &mut whole, &ids[..t], None, 1, t);
                    forward_last_position(&layout, &model.params, pw, &mut last, &ids[..t], t);
                    let (a, b) = (whole.probs_at(0, t - 1), last.probs_at(0, t - 1));
                    assert!(a.iter().all(|p| p.is_finite() && *p > 0.0));
                    assert!(
                        a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{} layers, window {t}, packed {}: probabilities differ",
                        cfg.layers,
                        pw.is_some()
                    );
                }
            }
        }
    }

    #[test]
    fn zero_temperature_is_argmax() {
        assert_eq!(sample_index(&[0.1, 0.5, 0.4], 0.0, 0, 0.99), 1);
    }

    #[test]
    fn top_k_one_is_argmax_at_any_temperature() {
        for u in [0.0, 0.3, 0.999] {
            assert_eq!(sample_index(&[0.2, 0.3, 0.5], 5.0, 1, u), 2);
        }
    }

    #[test]
    fn uniform_draw_follows_cumulative_probabilities() {
        let p = [0.25, 0.25, 0.5];
        assert_eq!(sample_index(&p, 1.0, 0, 0.1), 0);
        assert_eq!(sample_index(&p, 1.0, 0, 0.3), 1);
        assert_eq!(sample_index(&p, 1.0, 0, 0.9), 2);
    }

    #[test]
    fn zero_probability_bytes_are_never_drawn() {
        for k in 0..100 {
            let u = k as f64 / 100.0;
            assert_ne!(sample_index(&[0.0, 1.0, 0.0], 0.7, 0, u), 0);
        }
    }

    #[test]
    fn same_seed_same_bytes_and_window_slides_past_the_context() {
        let model = Model::new(ModelConfig::tiny(), 3);
        let opts = SampleOptions { tokens: 40, temperature: 1.0, top_k: 0, seed: 9 };
        let a = generate(&model, b"hello", opts, |_| Ok(())).unwrap();
        let b = generate(&model, b"hello", opts, |_| Ok(())).unwrap();
        assert_eq!(a.len(), 40);
        assert_eq!(a, b);
    }

    #[test]
    fn cached_generation_draws_the_tokens_of_recomputing_the_window_before_and_after_it_slides() {
        // tiny's context is 16: 40 tokens from a 5-byte prompt slide the window 29 times; a
        // prompt longer than the context starts full.
        let tiny = Model::new(ModelConfig::tiny(), 3);
        // A context of one position: the window slides at every token.
        let one = Model::new(ModelConfig { vocab: 256, layers: 1, heads: 1, embed: 8, context: 1 }, 3);
        for (model, prompt) in
            [(&tiny, &b"hello"[..]), (&tiny, &[b'a'; 30][..]), (&tiny, &b"x"[..]), (&one, &b"ab"[..])]
        {
            for temperature in [0.0, 1.0] {
                let opts = SampleOptions { tokens: 40, temperature, top_k: 0, seed: 9 };
                let draw = |cached: bool| {
                    let gen = Generator::new(model, prompt, opts).unwrap();
                    let mut gen = if cached { gen } else { gen.without_cache() };
                    (0..opts.tokens).map(|_| gen.next_byte().unwrap()).collect::<Vec<u8>>()
                };
                assert_eq!(draw(true), draw(false), "prompt {prompt:?}, temperature {temperature}");
            }
        }
    }

    #[test]
    fn empty_prompt_is_an_error() {
        let model = Model::new(ModelConfig::tiny(), 3);
        assert!(generate(&model, b"", SampleOptions::default(), |_| Ok(())).is_err());
    }
}
