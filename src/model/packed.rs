//! Every GEMM weight of the model, packed once for the kernel in both orientations the
//! passes read it: `W` for the forward product and `Wᵀ` for the backward `dX = dY·Wᵀ`.
//!
//! Without this each micro-batch packs every weight twice (once per pass), and the packing of
//! the transposed view is a scattered copy: on `seed` it was about 15% of a forward+backward.
//! A worker packs once per step (the weights change only in the update) and reuses the panels
//! for all its micro-batches. The packed panels hold the same values in the same order as the
//! per-call packing, so results are bit-identical with or without them.

use super::kernel::{Mat, PackedB, NR};
use super::params::ParamLayout;
use std::cell::UnsafeCell;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

/// One weight packed as the B operand of both passes.
pub struct PackedPair {
    /// `B = W` (`k x n` = in x out) for `out = x·W` (or `wteᵀ` for the tied head).
    pub fwd: PackedB,
    /// `B = Wᵀ` (`k x n` = out x in) for `dx = dout·Wᵀ` (or `wte` for the tied head).
    pub bwd: PackedB,
}

impl PackedPair {
    /// A weight stored row-major `[rows, cols]`, used as `x·W` forward and `dout·Wᵀ` backward.
    fn zeros(rows: usize, cols: usize) -> Self {
        PackedPair { fwd: PackedB::zeros(rows, cols), bwd: PackedB::zeros(cols, rows) }
    }

    fn repack(&mut self, w: &[f32]) {
        let cols = self.fwd.n();
        self.fwd.repack(Mat::rows(w, cols));
        self.bwd.repack(Mat::transposed(w, cols));
    }
}

/// The packed linear weights of one transformer block.
pub struct PackedBlock {
    pub qkv: PackedPair,
    pub proj: PackedPair,
    pub fc: PackedPair,
    pub fcproj: PackedPair,
}

/// All packed weights of a model (about twice the size of its parameters).
pub struct PackedWeights {
    pub blocks: Vec<PackedBlock>,
    /// The tied output head: `fwd` is `wteᵀ` (`logits = lnf·wteᵀ`), `bwd` is `wte`
    /// (`dlnf = dlogits·wte`).
    pub head: PackedPair,
}

impl PackedWeights {
    /// Buffers for `layout`'s weights (zeros until [`PackedWeights::pack`]).
    pub fn new(layout: &ParamLayout) -> Self {
        let cfg = layout.config;
        let (c, v) = (cfg.embed, cfg.vocab);
        let blocks = (0..cfg.layers)
            .map(|_| PackedBlock {
                qkv: PackedPair::zeros(c, 3 * c),
                proj: PackedPair::zeros(c, c),
                fc: PackedPair::zeros(c, 4 * c),
                fcproj: PackedPair::zeros(4 * c, c),
            })
            .collect();
        // wte is stored [V, C]; the head reads it as wteᵀ forward, so swap the roles.
        let head = PackedPair { fwd: PackedB::zeros(c, v), bwd: PackedB::zeros(v, c) };
        PackedWeights { blocks, head }
    }

    /// Bytes [`PackedWeights::new`] allocates for `config`, overflow-checked (`None` on
    /// overflow), without allocating: each [`PackedB`] of `k x n` holds `ceil(n / NR) · k · NR`
    /// floats plus 16 of alignment slack, and every weight is packed in both orientations.
    pub fn planned_bytes(config: &crate::config::ModelConfig) -> Option<u64> {
        let (c, v) = (config.embed as u64, config.vocab as u64);
        let one = |k: u64, n: u64| n.div_ceil(NR as u64).checked_mul(k)?.checked_mul(NR as u64)?.checked_add(16);
        let pair = |rows: u64, cols: u64| one(rows, cols)?.checked_add(one(cols, rows)?);
        let block = pair(c, c.checked_mul(3)?)?
            .checked_add(pair(c, c)?)?
            .checked_add(pair(c, c.checked_mul(4)?)?)?
            .checked_add(pair(c.checked_mul(4)?, c)?)?;
        block.checked_mul(config.layers as u64)?.checked_add(pair(v, c)?)?.checked_mul(4)
    }

    /// Packs the current values of `params` (laid out by `layout`) into the existing buffers;
    /// allocates nothing.
    pub fn pack(&mut self, layout: &ParamLayout, params: &[f32]) {
        assert_eq!(params.len(), layout.num_params(), "parameter buffer has the wrong length");
        assert_eq!(self.blocks.len(), layout.blocks.len(), "packed weights were sized for another config");
        let c = layout.config.embed;
        for (pb, o) in self.blocks.iter_mut().zip(&layout.blocks) {
            pb.qkv.repack(&params[o.qkv_w.clone()]);
            pb.proj.repack(&params[o.proj_w.clone()]);
            pb.fc.repack(&params[o.fc_w.clone()]);
            pb.fcproj.repack(&params[o.fcproj_w.clone()]);
        }
        let wte = &params[layout.wte.clone()];
        self.head.fwd.repack(Mat::transposed(wte, c));
        self.head.bwd.repack(Mat::rows(wte, c));
    }
}

/// One packing a weight feeds: `B[p, q]` of a [`PackedB`] with `k` rows, taken from the
/// row-major weight as `W[p, q]` or, when `transposed`, as `W[q, p]`.
#[derive(Clone, Copy)]
struct Dest {
    base: *mut f32,
    len: usize,
    k: usize,
    transposed: bool,
}

/// A row-major weight `[rows, cols]` at `offset` in the flat parameters and its two packings.
struct Target {
    offset: usize,
    rows: usize,
    cols: usize,
    dests: [Dest; 2],
}

/// One packing of the weights for all the workers of an engine, written by the update phase
/// itself: each worker, right after AdamW wrote a chunk of the weights, stores the new values
/// of that chunk into both packings ([`SharedPacking::write_range`]). The weights are not read
/// back and packed again at the start of the next step, and no worker packs for itself.
///
/// Which elements a chunk owner writes is fixed by the chunk, so concurrent writers never touch
/// the same element; readers ([`SharedPacking::packed_for`]) run only in the compute phase,
/// when no update runs. Both are ordered by the engine's barriers, exactly like the weights
/// this is derived from. The values are the same as [`PackedWeights::pack`] gives (tested).
pub struct SharedPacking {
    packed: UnsafeCell<PackedWeights>,
    targets: Vec<Target>,
    /// The weights version the packing matches, or `u64::MAX` for none.
    valid_for: AtomicU64,
}

// SAFETY: the raw pointers in `targets` point into the heap buffers owned by `packed`, which are
// sized once in `new` and never reallocated (nothing gets `&mut` access to `packed` after
// `new`). Writes go only through `write_range`, whose contract makes concurrent writers
// disjoint and keeps readers out; reads only through `packed_for`, under the same contract.
unsafe impl Send for SharedPacking {}
// SAFETY: as for `Send`.
unsafe impl Sync for SharedPacking {}

impl std::fmt::Debug for SharedPacking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedPacking").field("valid_for", &self.valid_for.load(Ordering::Relaxed)).finish()
    }
}

impl SharedPacking {
    /// Buffers for `layout`'s weights, valid for no version until written and declared valid.
    pub fn new(layout: &ParamLayout) -> Self {
        let mut packed = PackedWeights::new(layout);
        let (c, v) = (layout.config.embed, layout.config.vocab);
        let mut targets = Vec::new();
        let dest = |b: &mut PackedB, transposed: bool| {
            let (base, len) = b.raw_parts();
            Dest { base, len, k: b.k(), transposed }
        };
        let mut pair = |w: &Range<usize>, rows: usize, cols: usize, p: &mut PackedPair| {
            // fwd is B = W (k = rows), bwd is B = Wᵀ (k = cols).
            assert!(p.fwd.k() == rows && p.fwd.n() == cols && p.bwd.k() == cols && p.bwd.n() == rows);
            assert_eq!(w.len(), rows * cols, "weight range and packing disagree");
            let dests = [dest(&mut p.fwd, false), dest(&mut p.bwd, true)];
            targets.push(Target { offset: w.start, rows, cols, dests });
        };
        for (pb, o) in packed.blocks.iter_mut().zip(&layout.blocks) {
            pair(&o.qkv_w, c, 3 * c, &mut pb.qkv);
            pair(&o.proj_w, c, c, &mut pb.proj);
            pair(&o.fc_w, c, 4 * c, &mut pb.fc);
            pair(&o.fcproj_w, 4 * c, c, &mut pb.fcproj);
        }
        // wte is [V, C]: the head's fwd is B = wteᵀ (k = C), its bwd B = wte (k = V).
        let head = &mut packed.head;
        assert!(head.fwd.k() == c && head.fwd.n() == v && head.bwd.k() == v && head.bwd.n() == c);
        targets.push(Target {
            offset: layout.wte.start,
            rows: v,
            cols: c,
            dests: [dest(&mut head.fwd, true), dest(&mut head.bwd, false)],
        });
        SharedPacking { packed: UnsafeCell::new(packed), targets, valid_for: AtomicU64::new(u64::MAX) }
    }

    /// Stores `values`, the new `params[start..start + values.len()]`, into every packing the
    /// weights among them feed.
    ///
    /// # Safety
    /// Concurrent calls have disjoint ranges, and no reference from [`Self::packed_for`] is in
    /// use while any call runs.
    pub unsafe fn write_range(&self, start: usize, values: &[f32]) {
        let end = start + values.len();
        for t in &self.targets {
            let (lo, hi) = (start.max(t.offset), end.min(t.offset + t.rows * t.cols));
            if lo >= hi {
                continue;
            }
            let (first, last) = ((lo - t.offset) / t.cols, (hi - 1 - t.offset) / t.cols);
            // Rows wholly inside the range, and the partial rows at its two ends.
            let full_lo = if lo == t.offset + first * t.cols { first } else { first + 1 };
            let full_hi = if hi == t.offset + (last + 1) * t.cols { last + 1 } else { last };
            for d in &t.dests {
                let mut r = first;
                while r <= last {
                    if d.transposed && r >= full_lo && r < full_hi {
                        // Whole rows r..r_end of one 16-row panel: each packed row (16 values
                        // of one column j) is gathered from the rows and written at once.
                        let r_end = ((r / NR + 1) * NR).min(full_hi);
                        // SAFETY: rows r..r_end are wholly inside `values` and the range.
                        unsafe { self.write_rows_transposed(t, d, r, r_end, start, values) };
                        r = r_end;
                        continue;
                    }
                    // This row's part of the range: columns j0..j1.
                    let row_start = t.offset + r * t.cols;
                    let (j0, j1) = (lo.max(row_start) - row_start, hi.min(row_start + t.cols) - row_start);
                    let src = &values[row_start + j0 - start..row_start + j1 - start];
                    // Indices stay below `d.len` because (rows, cols) match the packing's shape
                    // (checked in `new`): see `PackedB::panel_index`.
                    if d.transposed {
                        // B[j, r]: one element every NR floats.
                        let base = PackedB::panel_index(d.k, 0, r);
                        for (j, &x) in (j0..j1).zip(src) {
                            let i = base + j * NR;
                            assert!(i < d.len);
                            // SAFETY: `i < d.len`, inside the buffer `base` points to; this
                            // element belongs to weight (r, j), which only this call writes.
                            unsafe { d.base.add(i).write(x) };
                        }
                    } else {
                        // B[r, j]: runs of up to NR contiguous floats within a panel.
                        let mut j = j0;
                        while j < j1 {
                            let run = (NR - j % NR).min(j1 - j);
                            let i = PackedB::panel_index(d.k, r, j);
                            assert!(i + run <= d.len);
                            let part = &src[j - j0..j - j0 + run];
                            // SAFETY: `i + run <= d.len`, inside the buffer; these elements
                            // belong to weights (r, j..j + run), which only this call writes,
                            // and `src` (the caller's slice) cannot overlap the packing.
                            unsafe {
                                let dst = d.base.add(i);
                                if let Ok(whole) = <&[f32; NR]>::try_from(part) {
                                    // A whole panel row: two vector moves, not a memcpy call.
                                    dst.cast::<[f32; NR]>().write_unaligned(*whole);
                                } else {
                                    for (o, &x) in part.iter().enumerate() {
                                        dst.add(o).write(x);
                                    }
                                }
                            }
                            j += run;
                        }
                    }
                    r += 1;
                }
            }
        }
    }

    /// The transposed packing of whole rows `r0..r1` of `t` (within one panel of NR rows):
    /// `B[j, r] = W[r, j]` for every column j, one packed row of up to NR values at a time.
    ///
    /// # Safety
    /// As [`Self::write_range`]; rows `r0..r1` lie wholly inside `values` (which starts at
    /// parameter `start`).
    unsafe fn write_rows_transposed(&self, t: &Target, d: &Dest, r0: usize, r1: usize, start: usize, values: &[f32]) {
        let rows = &values[t.offset + r0 * t.cols - start..t.offset + r1 * t.cols - start];
        let base = PackedB::panel_index(d.k, 0, r0);
        assert!(r1 - r0 <= NR - r0 % NR && base + (t.cols - 1) * NR + (r1 - r0) <= d.len);
        let n = r1 - r0;
        if n == NR {
            // A whole panel: every packed row is one full line.
            let cols = t.cols;
            let w: [&[f32]; NR] = std::array::from_fn(|q| &rows[q * cols..(q + 1) * cols]);
            // `j` indexes all NR rows (a column), not one slice: no iterator says that better.
            #[allow(clippy::needless_range_loop)]
            for j in 0..cols {
                let line: [f32; NR] = std::array::from_fn(|q| w[q][j]);
                // SAFETY: as below, with n = NR.
                unsafe { d.base.add(base + j * NR).cast::<[f32; NR]>().write_unaligned(line) };
            }
            return;
        }
        for j in 0..t.cols {
            for q in 0..n {
                // SAFETY: `base + j*NR + n <= d.len` (asserted for the last j), inside the
                // buffer; these elements belong to weights (r0..r1, j), which only this call
                // writes.
                unsafe { d.base.add(base + j * NR + q).write(rows[q * t.cols + j]) };
            }
        }
    }

    /// Declares the packing to match the weights of `version` (`None`: of no version yet).
    pub fn set_valid_for(&self, version: Option<u64>) {
        self.valid_for.store(version.unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The packing, if it matches the weights of `version`.
    ///
    /// # Safety
    /// No [`Self::write_range`] runs while the returned reference is in use.
    pub unsafe fn packed_for(&self, version: u64) -> Option<&PackedWeights> {
        // SAFETY: the caller keeps writers out while the reference lives.
        (version != u64::MAX && self.valid_for.load(Ordering::Relaxed) == version)
            .then(|| unsafe { &*self.packed.get() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::model::gpt::{backward_with_layout, forward_with_layout};
    use crate::model::{Activations, Model};

    fn loss_and_grads(layout: &ParamLayout, params: &[f32], packed: Option<&PackedWeights>) -> (f32, Vec<f32>) {
        let cfg = layout.config;
        let (b, t) = (2, cfg.context);
        let inputs: Vec<u32> = (0..b * t).map(|i| (i * 31 % cfg.vocab) as u32).collect();
        let targets: Vec<u32> = (0..b * t).map(|i| (i * 17 % cfg.vocab) as u32).collect();
        let mut acts = Activations::new(&cfg, b, t);
        let mut grads = vec![0.0; params.len()];
        let loss = forward_with_layout(layout, params, packed, &mut acts, &inputs, Some(&targets), b, t);
        backward_with_layout(layout, params, packed, &mut acts, &mut grads);
        (loss, grads)
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn planned_bytes_equal_what_new_allocates() {
        for name in crate::config::PRESETS {
            let cfg = ModelConfig::preset(name).unwrap();
            let p = PackedWeights::new(&ParamLayout::new(&cfg));
            let pair = |x: &PackedPair| x.fwd.panels().len() + x.bwd.panels().len() + 32;
            let floats: usize =
                p.blocks.iter().map(|b| pair(&b.qkv) + pair(&b.proj) + pair(&b.fc) + pair(&b.fcproj)).sum::<usize>()
                    + pair(&p.head);
            assert_eq!(PackedWeights::planned_bytes(&cfg), Some(4 * floats as u64), "{name}");
        }
    }

    #[test]
    fn prepacked_passes_give_the_same_bits_as_packing_per_call() {
        let cfg = ModelConfig::tiny();
        let layout = ParamLayout::new(&cfg);
        let mut params = Model::new(cfg, 3).params;
        let mut packed = PackedWeights::new(&layout);
        packed.pack(&layout, &params);
        let (l0, g0) = loss_and_grads(&layout, &params, None);
        let (l1, g1) = loss_and_grads(&layout, &params, Some(&packed));
        assert_eq!(l0.to_bits(), l1.to_bits());
        assert!(bits(&g0) == bits(&g1), "prepacked gradients differ");

        // New weights: a repack must pick them up (stale panels would give the old loss).
        for (i, p) in params.iter_mut().enumerate() {
            *p += 0.01 * ((i % 7) as f32 - 3.0);
        }
        packed.pack(&layout, &params);
        let (l2, g2) = loss_and_grads(&layout, &params, None);
        let (l3, g3) = loss_and_grads(&layout, &params, Some(&packed));
        assert_ne!(l0.to_bits(), l2.to_bits());
        assert_eq!(l2.to_bits(), l3.to_bits());
        assert!(bits(&g2) == bits(&g3), "gradients after a repack differ");
    }

    fn all_panels(p: &PackedWeights) -> Vec<u32> {
        let mut out = Vec::new();
        for b in &p.blocks {
            for pair in [&b.qkv, &b.proj, &b.fc, &b.fcproj] {
                out.extend(bits(pair.fwd.panels()));
                out.extend(bits(pair.bwd.panels()));
            }
        }
        out.extend(bits(p.head.fwd.panels()));
        out.extend(bits(p.head.bwd.panels()));
        out
    }

    #[test]
    fn shared_packing_written_chunk_by_chunk_equals_packing_the_whole_weights() {
        for cfg in [ModelConfig::tiny(), ModelConfig::preset("small").unwrap()] {
            let layout = ParamLayout::new(&cfg);
            let params = Model::new(cfg, 5).params;
            let mut want = PackedWeights::new(&layout);
            want.pack(&layout, &params);
            let shared = SharedPacking::new(&layout);
            // SAFETY: single-threaded: no reader, no concurrent writer.
            assert!(unsafe { shared.packed_for(7) }.is_none(), "valid for no version before it is declared");
            // Odd-sized chunks, last first, so chunk edges fall inside rows and panels.
            let chunks: Vec<_> = (0..params.len()).step_by(997).collect();
            for &start in chunks.iter().rev() {
                let end = (start + 997).min(params.len());
                // SAFETY: as above.
                unsafe { shared.write_range(start, &params[start..end]) };
            }
            shared.set_valid_for(Some(7));
            // SAFETY: as above.
            let got = unsafe { shared.packed_for(7) }.expect("declared valid for version 7");
            assert!(all_panels(got) == all_panels(&want), "{} layers: shared packing differs", cfg.layers);
            assert!(unsafe { shared.packed_for(8) }.is_none(), "only for the version declared");
            let (l0, g0) = loss_and_grads(&layout, &params, None);
            let (l1, g1) = loss_and_grads(&layout, &params, Some(got));
            assert_eq!(l0.to_bits(), l1.to_bits());
            assert!(bits(&g0) == bits(&g1), "gradients through the shared packing differ");
            shared.set_valid_for(None);
            assert!(unsafe { shared.packed_for(7) }.is_none(), "invalidated");
        }
    }
}
