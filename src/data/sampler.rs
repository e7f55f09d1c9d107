//! Seeded batch sampling for training and fixed windows for evaluation.
//!
//! The PRNG is xoshiro256** seeded through SplitMix64 (Blackman & Vigna), written out here
//! rather than taken from `rand`: `rand` does not promise a stable stream across versions or
//! platforms, and a seed has to name the same batches forever for runs to be reproducible and
//! for a checkpoint to resume exactly.

use serde::{Deserialize, Serialize};

use super::tokens::Token;
use crate::error::Result;

/// SplitMix64: expands a 64-bit seed into well-mixed words (and never four zeros).
fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xoshiro256** 1.0.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Xoshiro256 {
    s: [u64; 4],
}

impl Xoshiro256 {
    fn seed_from(seed: u64) -> Self {
        let mut x = seed;
        let s = [splitmix64(&mut x), splitmix64(&mut x), splitmix64(&mut x), splitmix64(&mut x)];
        Xoshiro256 { s }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, n)` without modulo bias (Lemire's multiply-and-reject), so every offset
    /// is equally likely however long the corpus.
    fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(n);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}

/// Everything needed to continue a [`BatchSampler`] exactly where it stopped (stored in
/// checkpoints). `data_len` and `seq_len` record what the stream was drawn over, so resuming
/// against different data is an error instead of a silently different run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    /// The four xoshiro256** state words.
    pub words: [u64; 4],
    pub data_len: u64,
    pub seq_len: u64,
}

/// Draws random training windows: same seed, same data length, same batches, everywhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchSampler {
    rng: Xoshiro256,
    data_len: usize,
    seq_len: usize,
}

impl BatchSampler {
    /// A sampler for windows of `seq_len` tokens over training data of `data_len` bytes.
    pub fn new(seed: u64, data_len: usize, seq_len: usize) -> BatchSampler {
        BatchSampler { rng: Xoshiro256::seed_from(seed), data_len, seq_len }
    }

    /// The state to checkpoint.
    pub fn state(&self) -> SamplerState {
        SamplerState { words: self.rng.s, data_len: self.data_len as u64, seq_len: self.seq_len as u64 }
    }

    /// Restores a checkpointed sampler for a run over `data_len` bytes with windows of
    /// `seq_len`; refuses a state drawn over anything else, and the all-zero state (which
    /// xoshiro can never reach and would only ever produce zeros).
    pub fn from_state(state: &SamplerState, data_len: usize, seq_len: usize) -> Result<Self> {
        if state.words == [0; 4] {
            crate::bail!("invalid sampler state: all words are zero");
        }
        if state.data_len != data_len as u64 || state.seq_len != seq_len as u64 {
            crate::bail!(
                "cannot resume the batch sampler: it was drawing windows of {} from {} bytes of \
                 training data, this run has windows of {seq_len} from {data_len} bytes \
                 (different data, validation fraction or context)",
                state.seq_len,
                state.data_len
            );
        }
        Ok(BatchSampler { rng: Xoshiro256 { s: state.words }, data_len, seq_len })
    }

    pub fn data_len(&self) -> usize {
        self.data_len
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Draws one offset, uniform in `[0, data_len - seq - 1]`.
    ///
    /// # Panics
    /// If `data_len < seq + 1` (no window fits); [`super::split_bytes`] rules that out.
    pub fn next_offset(&mut self, data_len: usize, seq: usize) -> usize {
        assert!(
            seq > 0 && data_len > seq,
            "BatchSampler: {data_len} bytes cannot hold a window of {seq} plus its target"
        );
        self.rng.below((data_len - seq) as u64) as usize
    }

    /// Fills `inputs` and `targets` (cleared first) with `batch` windows of `seq` tokens,
    /// row-major `[batch][seq]`: inputs are bytes `[o, o+seq)` and targets `[o+1, o+seq+1)` of
    /// `data`, for `batch` offsets `o` drawn in order.
    ///
    /// # Panics
    /// If `data.len() < seq + 1` or `seq == 0`; [`super::split_bytes`] rules that out.
    pub fn next_batch<T: Token>(
        &mut self,
        data: &[T],
        batch: usize,
        seq: usize,
        inputs: &mut Vec<u32>,
        targets: &mut Vec<u32>,
    ) {
        inputs.clear();
        targets.clear();
        inputs.reserve(batch * seq);
        targets.reserve(batch * seq);
        for _ in 0..batch {
            let o = self.next_offset(data.len(), seq);
            inputs.extend(data[o..o + seq].iter().map(|&b| b.id()));
            targets.extend(data[o + 1..o + seq + 1].iter().map(|&b| b.id()));
        }
    }
}

/// Consecutive non-overlapping evaluation windows over `data`: window `i` has inputs
/// `[i*t, i*t + t)` and targets `[i*t + 1, i*t + t + 1)`; only windows whose targets fit are
/// produced, at most `max` of them. `t == 0` produces none.
pub fn windows(data: &[u8], t: usize, max: usize) -> Windows<'_> {
    token_windows(data, t, max)
}

/// [`windows`] over tokens of any type (a tokenizer's ids).
pub fn token_windows<T>(data: &[T], t: usize, max: usize) -> Windows<'_, T> {
    let fit = data.len().saturating_sub(1).checked_div(t).unwrap_or(0);
    Windows { data, t, next: 0, count: fit.min(max) }
}

/// Iterator returned by [`windows`]: yields `(inputs, targets)` token slices.
#[derive(Clone, Debug)]
pub struct Windows<'a, T = u8> {
    data: &'a [T],
    t: usize,
    next: usize,
    count: usize,
}

impl<'a, T> Iterator for Windows<'a, T> {
    type Item = (&'a [T], &'a [T]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.count {
            return None;
        }
        let start = self.next * self.t;
        self.next += 1;
        Some((&self.data[start..start + self.t], &self.data[start + 1..start + self.t + 1]))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.count - self.next;
        (n, Some(n))
    }
}

impl<T> ExactSizeIterator for Windows<'_, T> {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference values from the authors' C code (xoshiro256starstar.c seeded with splitmix64
    /// from 0), so the stream is pinned independently of this implementation.
    #[test]
    fn splitmix64_matches_reference() {
        let mut x = 0u64;
        assert_eq!(splitmix64(&mut x), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(&mut x), 0x6E78_9E6A_A1B9_65F4);
    }

    /// The reference outputs of xoshiro256** from the state {1, 2, 3, 4}.
    #[test]
    fn xoshiro256starstar_matches_reference() {
        let mut r = Xoshiro256 { s: [1, 2, 3, 4] };
        let got: Vec<u64> = (0..4).map(|_| r.next_u64()).collect();
        assert_eq!(got, [11520, 0, 1509978240, 1215971899390074240]);
    }

    #[test]
    fn below_stays_below_bound() {
        let mut r = Xoshiro256::seed_from(1);
        for n in [1u64, 2, 3, 7, 1000, u64::MAX] {
            for _ in 0..100 {
                assert!(r.below(n) < n);
            }
        }
    }
}
