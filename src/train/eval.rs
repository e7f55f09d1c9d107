//! The validation loss: what `cllm train` reports every `--eval-every` steps and what
//! `cllm eval` prints, computed by the one function [`evaluate`].
//!
//! The result is the same bits at any thread count: windows are grouped into fixed batches of
//! [`EVAL_BATCH`], each batch's loss sum is kept in its own slot, and the slots are added in
//! window order after all threads are done.

use crate::config::ModelConfig;
use crate::error::Result;
use crate::model::{gpt::forward_with_layout, Activations, PackedWeights, ParamLayout};

/// Windows evaluated per forward pass.
pub const EVAL_BATCH: usize = 8;

/// A loss measured over fixed windows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalResult {
    /// Mean next-byte cross-entropy in nats.
    pub loss: f64,
    pub windows: usize,
    /// Predicted bytes (`windows · T`).
    pub tokens: usize,
}

impl EvalResult {
    /// The loss in bits per byte.
    pub fn bits_per_byte(&self) -> f64 {
        self.loss / std::f64::consts::LN_2
    }
}

/// Mean next-byte cross-entropy of the model over consecutive non-overlapping windows of `t`
/// bytes of `data` (window i: inputs `[i·t, i·t+t)`, targets shifted by one), at most
/// `max_windows` of them.
///
/// Windows go through the model [`EVAL_BATCH`] at a time, the batches spread over `threads`
/// threads. Each batch's loss sum is kept apart and they are added in window order, so the
/// result is the same bits at any thread count.
pub fn evaluate(
    config: &ModelConfig,
    params: &[f32],
    data: &[u8],
    t: usize,
    max_windows: usize,
    threads: usize,
) -> Result<EvalResult> {
    if t == 0 || t > config.context {
        crate::bail!("evaluation window {t} must be between 1 and the model context {}", config.context);
    }
    let windows: Vec<(&[u8], &[u8])> = crate::data::windows(data, t, max_windows).collect();
    if windows.is_empty() {
        crate::bail!(
            "{} bytes of data are shorter than one evaluation window ({} bytes: context {t} plus the next byte)",
            data.len(),
            t + 1
        );
    }
    if config.vocab < 256 && data.iter().any(|&b| usize::from(b) >= config.vocab) {
        crate::bail!("the data holds bytes outside the model's vocabulary of {}", config.vocab);
    }
    let batches: Vec<&[(&[u8], &[u8])]> = windows.chunks(EVAL_BATCH).collect();
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
                let mut acts = Activations::new(config, EVAL_BATCH, t);
                let mut inputs = Vec::with_capacity(EVAL_BATCH * t);
                let mut targets = Vec::with_capacity(EVAL_BATCH * t);
                for (k, slot) in mine {
                    let batch = batches[k];
                    inputs.clear();
                    targets.clear();
                    for (x, y) in batch {
                        inputs.extend(x.iter().map(|&b| u32::from(b)));
                        targets.extend(y.iter().map(|&b| u32::from(b)));
                    }
                    let b = batch.len();
                    let mean =
                        forward_with_layout(layout, params, Some(packed), &mut acts, &inputs, Some(&targets), b, t);
                    *slot = f64::from(mean) * (b * t) as f64;
                }
            });
        }
    });
    let tokens = windows.len() * t;
    let total: f64 = sums.iter().sum();
    Ok(EvalResult { loss: total / tokens as f64, windows: windows.len(), tokens })
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
        let one = evaluate(&cfg, &model.params, &data, 16, usize::MAX, 1).unwrap();
        let three = evaluate(&cfg, &model.params, &data, 16, usize::MAX, 3).unwrap();
        assert_eq!(one, three);
        assert_eq!(one.windows, 999 / 16);
    }
}
