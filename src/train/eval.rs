//! The validation loss: what `cllm train` reports every `--eval-every` steps and what
//! `cllm eval` prints, computed by the one function [`evaluate`].
//!
//! The result is the same bits at any thread count: windows are grouped into fixed batches of
//! [`EVAL_BATCH`], each batch's loss sum is kept in its own slot, and the slots are added in
//! window order after all threads are done.

use crate::config::ModelConfig;
use crate::data::tokens::Token;
use crate::error::Result;
use crate::model::{gpt::forward_with_layout, Activations, PackedWeights, ParamLayout};

/// Windows evaluated per forward pass.
pub const EVAL_BATCH: usize = 8;

/// A loss measured over fixed windows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalResult {
    /// Mean next-token cross-entropy in nats (next-byte for byte-level models).
    pub loss: f64,
    pub windows: usize,
    /// Predicted tokens (`windows · T`).
    pub tokens: usize,
    /// Bytes of text the predicted tokens stand for (`tokens` for byte-level models).
    pub bytes: u64,
}

impl EvalResult {
    /// The loss in bits per byte of text: total nats / ln 2 / the bytes the predicted tokens
    /// cover (for byte-level models, `loss / ln 2`), comparable across tokenizers.
    pub fn bits_per_byte(&self) -> f64 {
        if self.bytes == self.tokens as u64 {
            return self.loss / std::f64::consts::LN_2;
        }
        self.loss * self.tokens as f64 / std::f64::consts::LN_2 / self.bytes.max(1) as f64
    }
}

/// Mean next-token cross-entropy of the model over consecutive non-overlapping windows of `t`
/// tokens of `data` (window i: inputs `[i·t, i·t+t)`, targets shifted by one), at most
/// `max_windows` of them. `byte_lens` (indexed by id) gives the bytes of text each token stands
/// for, for bits per byte; `None` is byte-level data (one byte a token).
///
/// Windows go through the model [`EVAL_BATCH`] at a time, the batches spread over `threads`
/// threads. Each batch's loss sum is kept apart and they are added in window order, so the
/// result is the same bits at any thread count.
pub fn evaluate<T: Token>(
    config: &ModelConfig,
    params: &[f32],
    data: &[T],
    byte_lens: Option<&[u32]>,
    t: usize,
    max_windows: usize,
    threads: usize,
) -> Result<EvalResult> {
    if t == 0 || t > config.context {
        crate::bail!("evaluation window {t} must be between 1 and the model context {}", config.context);
    }
    let windows: Vec<(&[T], &[T])> = crate::data::sampler::token_windows(data, t, max_windows).collect();
    let unit = if byte_lens.is_some() { "tokens" } else { "bytes" };
    if windows.is_empty() {
        crate::bail!(
            "{} {unit} of data are shorter than one evaluation window ({} {unit}: context {t} plus the next one)",
            data.len(),
            t + 1
        );
    }
    // Bytes are below 256: only a smaller vocabulary, or a tokenizer's ids, need the scan.
    let scan = byte_lens.is_some() || config.vocab < 256;
    if let Some(bad) = data.iter().map(|&b| b.id()).find(|&id| scan && id as usize >= config.vocab) {
        crate::bail!("the data holds token {bad}, outside the model's vocabulary of {}", config.vocab);
    }
    let bytes = match byte_lens {
        None => (windows.len() * t) as u64,
        Some(lens) => windows
            .iter()
            .flat_map(|(_, y)| y.iter())
            .map(|&id| lens.get(id.id() as usize).map_or(0, |&n| u64::from(n)))
            .sum(),
    };
    let batches: Vec<&[(&[T], &[T])]> = windows.chunks(EVAL_BATCH).collect();
    let threads = threads.clamp(1, batches.len());
    let layout = ParamLayout::new(config);
    let mut sums = vec![0.0f64; batches.len()];
    // One packing of the weights for every thread: they only read it.
    let mut packed = PackedWeights::new(&layout);
    packed.pack(&layout, params);
    std::thread::scope(|s| {
        // Batch k goes to thread k % threads, each thread owning its activations and the
        // slots of its batches.
        let mut slots: Vec<Vec<(usize, &mut f64)>> = (0..threads).map(|_| Vec::new()).collect();
        for (k, slot) in sums.iter_mut().enumerate() {
            slots[k % threads].push((k, slot));
        }
        for mine in slots {
            let (layout, batches, packed) = (&layout, &batches, &packed);
            s.spawn(move || {
                // One window at a time: activations for one sequence, not EVAL_BATCH (8x less
                // memory: 250 MiB instead of 2 GiB per thread at GPT-2 124M, context 256).
                let mut acts = Activations::new(config, 1, t);
                let mut inputs = Vec::with_capacity(t);
                let mut targets = Vec::with_capacity(t);
                for (k, slot) in mine {
                    let batch = batches[k];
                    // The batch's mean loss as one forward over the whole batch computes it
                    // (`softmax_crossentropy_forward`: the positions' f32 losses added in order
                    // in f64, divided by their count, rounded to f32). A row's loss does not
                    // depend on the other rows of its forward call, so this is the same bits.
                    let mut total = 0.0f64;
                    for (x, y) in batch.iter() {
                        inputs.clear();
                        targets.clear();
                        inputs.extend(x.iter().map(|&b| b.id()));
                        targets.extend(y.iter().map(|&b| b.id()));
                        forward_with_layout(layout, params, Some(packed), &mut acts, &inputs, Some(&targets), 1, t);
                        for &l in &acts.losses[..t] {
                            total += f64::from(l);
                        }
                    }
                    let n = batch.len() * t;
                    let mean = (total / n as f64) as f32;
                    *slot = f64::from(mean) * n as f64;
                }
            });
        }
    });
    let tokens = windows.len() * t;
    let total: f64 = sums.iter().sum();
    Ok(EvalResult { loss: total / tokens as f64, windows: windows.len(), tokens, bytes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;

    #[test]
    fn evaluation_does_not_depend_on_the_thread_count() {
        let cfg = ModelConfig::tiny();
        let model = Model::new(cfg, 5);
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let one = evaluate(&cfg, &model.params, &data, None, 16, usize::MAX, 1).unwrap();
        let three = evaluate(&cfg, &model.params, &data, None, 16, usize::MAX, 3).unwrap();
        assert_eq!(one, three);
        assert_eq!(one.windows, 999 / 16);
        assert_eq!((one.bytes, one.bits_per_byte()), (one.tokens as u64, one.loss / std::f64::consts::LN_2));
    }

    /// One window per forward gives the bits of one forward over the whole batch of
    /// [`EVAL_BATCH`] windows (what evaluation computed before it went one window at a time).
    #[test]
    fn one_window_at_a_time_gives_the_bits_of_a_whole_batch_forward() {
        let cfg = ModelConfig::small();
        let model = Model::new(cfg, 11);
        let t = 64;
        let data: Vec<u8> = (0..(EVAL_BATCH * t + 1) as u32).map(|i| (i * 31 % 253) as u8).collect();
        let got = evaluate(&cfg, &model.params, &data, None, t, usize::MAX, 1).unwrap();
        assert_eq!(got.windows, EVAL_BATCH);
        let inputs: Vec<u32> = data[..EVAL_BATCH * t].iter().map(|&b| u32::from(b)).collect();
        let targets: Vec<u32> = data[1..].iter().map(|&b| u32::from(b)).collect();
        let layout = ParamLayout::new(&cfg);
        let mut acts = Activations::new(&cfg, EVAL_BATCH, t);
        let mean = forward_with_layout(&layout, &model.params, None, &mut acts, &inputs, Some(&targets), EVAL_BATCH, t);
        let want = f64::from(mean) * (EVAL_BATCH * t) as f64 / (EVAL_BATCH * t) as f64;
        assert_eq!(got.loss.to_bits(), want.to_bits(), "{} vs {}", got.loss, want);
    }

    /// A model whose token embedding is zero gives every token of a vocabulary of 512 the
    /// probability 1/512: the loss is ln 512 nats a token, 9 bits. Ids 0..4 stand for 1, 2, 3
    /// and 4 bytes; two windows of 4 predict ids 1 2 3 0 and 1 2 3 0, 2·(2+3+4+1) = 20 bytes,
    /// so bits per byte = 8 tokens · 9 bits / 20 bytes = 3.6.
    #[test]
    fn bits_per_byte_divide_the_total_by_the_bytes_the_predicted_tokens_cover() {
        let cfg = ModelConfig { vocab: 512, ..ModelConfig::tiny() };
        let mut model = Model::new(cfg, 5);
        let wte = model.layout.wte.clone();
        model.params[wte].fill(0.0);
        let data: Vec<u16> = vec![0, 1, 2, 3, 0, 1, 2, 3, 0, 7];
        let lens = [1u32, 2, 3, 4, 0, 0, 0, 0];
        let r = evaluate(&cfg, &model.params, &data, Some(&lens), 4, usize::MAX, 2).unwrap();
        assert_eq!((r.windows, r.tokens, r.bytes), (2, 8, 20));
        assert!((r.loss - 512f64.ln()).abs() < 1e-6, "{}", r.loss);
        assert!((r.bits_per_byte() - 3.6).abs() < 1e-6, "{}", r.bits_per_byte());
    }
}
