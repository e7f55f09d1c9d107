//! The memory plan of a training run: what it will allocate, computed from the model config and
//! the run options before anything is allocated, and the check that it fits.
//!
//! Linux overcommits: a huge `Vec` reservation succeeds and the process is killed later, when
//! it touches the pages, so `try_reserve` cannot catch a run that does not fit. Instead every
//! size that depends on user input (`--batch`, `--threads`, `--spheres`, the config) goes
//! through [`MemoryPlan::for_run`], with overflow-checked arithmetic (an overflow is an error,
//! never a wrap), and [`MemoryPlan::check_fits`] compares the total with `MemAvailable` and the
//! room left under the address-space limit (`RLIMIT_AS`, soft) before the trainer is built.
//!
//! The parts mirror what the engines allocate ([`crate::train::engine`],
//! [`crate::train::rayon_engine`], [`crate::train::lock_strategies`]): the sizes of one set of
//! activations and one packing come from [`Activations::planned_bytes`] and
//! [`PackedWeights::planned_bytes`], each unit-tested equal to what its constructor allocates;
//! how many gradient-sized buffers a strategy keeps comes from [`gradient_buffers`] alone. The
//! plan is an estimate of the heap, not of the RSS (the binary, thread stacks and allocator
//! slack come on top; see docs/reliability.md for the measured baseline).

use crate::config::ModelConfig;
use crate::model::{Activations, PackedWeights};
use crate::train::Strategy;
use crate::{err, Result};
use serde::Serialize;

/// How many gradient-sized buffers (`params` floats each) the engine of `strategy` keeps with
/// `spheres` micro-batches and `threads` workers, including the shared sum every strategy
/// reduces into. The single source of that count: the memory plan and its tests use only this.
pub fn gradient_buffers(strategy: Strategy, spheres: usize, threads: usize) -> usize {
    let per_strategy = match strategy {
        // The summation tree's buffers: O(N log(S/N)), exactly what the engine allocates.
        Strategy::Segmented => crate::train::tree::max_live_buffers(spheres, threads),
        // Each worker computes into its own buffer before adding it under the mutex.
        Strategy::GradientLock => threads,
        // One shared buffer behind the model mutex.
        Strategy::ModelLock => 1,
        // Each micro-batch allocates its gradient; the reduction may hold all of them.
        Strategy::Rayon => spheres,
    };
    per_strategy.saturating_add(1)
}

/// Workers that own a set of activations: segmented and rayon use at most one per micro-batch, gradient-lock gives every
/// worker one, model-lock shares one behind its mutex.
pub fn activation_sets(strategy: Strategy, spheres: usize, threads: usize) -> usize {
    match strategy {
        Strategy::Segmented | Strategy::Rayon => spheres.min(threads),
        Strategy::GradientLock => threads,
        Strategy::ModelLock => 1,
    }
}

/// The shape of a run, as far as memory goes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RunShape {
    pub batch: usize,
    /// Training sequence length.
    pub context: usize,
    pub spheres: usize,
    pub threads: usize,
    pub strategy: Strategy,
    /// Bytes of training data held in memory (0 for none).
    pub data_bytes: usize,
    /// What the run loaded from disk that stays in memory beside the training state.
    pub loaded: Loaded,
    /// Whether the run evaluates and checkpoints (`cllm train`; not `bench`/`profile`).
    pub saves: bool,
}

/// What a run loaded from disk and keeps beside its own state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loaded {
    /// A fresh run: nothing loaded.
    Nothing,
    /// `--init-from`: the starting weights (fresh AdamW moments).
    Weights,
    /// `--resume`: the checkpoint's weights and both AdamW moments.
    WeightsAndMoments,
}

/// What a run will allocate, in bytes (counts where named so).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MemoryPlan {
    pub params: u64,
    /// The trainer's weights (and, when resuming, the checkpoint's copy).
    pub weights: u64,
    /// AdamW `m` and `v` (and, when resuming, the checkpoint's copies).
    pub adam_moments: u64,
    /// Gradient-sized buffers, from [`gradient_buffers`].
    pub gradient_buffers: u64,
    pub gradient_buffer_bytes: u64,
    pub gradients: u64,
    pub activations_per_worker: u64,
    pub activation_workers: u64,
    pub activations: u64,
    /// The packing shared by the workers, and each worker's own (none: kept, as 0, for the
    /// JSON's readers).
    pub packing_shared: u64,
    pub packing_per_worker: u64,
    pub packings: u64,
    /// Evaluation threads' activations and packings, during a validation.
    pub evaluation: u64,
    /// The copies a checkpoint write makes (weights, serialized model and moments).
    pub checkpoint: u64,
    /// The larger of `evaluation` and `checkpoint`: the training loop validates, drops what the
    /// validation allocated, then writes checkpoints, so the two never coexist.
    pub eval_or_checkpoint: u64,
    /// Training data and the token batches.
    pub data: u64,
    pub total: u64,
}

/// `a · b`, or an error naming `what`.
fn mul(a: u64, b: u64, what: &str) -> Result<u64> {
    a.checked_mul(b).ok_or_else(|| err!("memory plan: the size of {what} overflows"))
}

impl MemoryPlan {
    /// The plan of a run of `config` shaped as `shape`; an error when a size overflows.
    pub fn for_run(config: &ModelConfig, shape: &RunShape) -> Result<MemoryPlan> {
        let params =
            config.checked_num_params().ok_or_else(|| err!("memory plan: the parameter count overflows"))? as u64;
        let floats = mul(params, 4, "the weights")?;
        let (weight_copies, moment_copies) = match shape.loaded {
            Loaded::Nothing => (1, 1),
            Loaded::Weights => (2, 1),
            Loaded::WeightsAndMoments => (2, 2),
        };
        let weights = mul(floats, weight_copies, "the weights")?;
        let adam_moments = mul(floats, 2 * moment_copies, "the AdamW moments")?;
        let buffers = gradient_buffers(shape.strategy, shape.spheres, shape.threads) as u64;
        let gradients = mul(floats, buffers, "the gradient buffers")?;
        let rows = shape.batch / shape.spheres.max(1);
        let per_worker = Activations::planned_bytes(config, rows, shape.context)
            .ok_or_else(|| err!("memory plan: the size of the activations overflows"))?;
        let workers = activation_sets(shape.strategy, shape.spheres, shape.threads) as u64;
        let activations = mul(per_worker, workers, "the activations")?;
        let packing = PackedWeights::planned_bytes(config)
            .ok_or_else(|| err!("memory plan: the size of the packed weights overflows"))?;
        // One packing, shared: the engine packs it before the first step, so no worker packs
        // the weights for itself (`Engine::derive_from_weights`).
        let packings = packing;
        let (evaluation, checkpoint) = if shape.saves {
            let eval_acts = Activations::planned_bytes(config, 1, shape.context)
                .ok_or_else(|| err!("memory plan: the size of the evaluation activations overflows"))?;
            let eval_threads = shape.threads as u64;
            // Model copy, its bytes, the serialized model; both moments as bytes, serialized.
            // Per thread its activations; one packing shared by the threads.
            let acts = mul(eval_acts, eval_threads, "the evaluation")?;
            (acts.saturating_add(packing), mul(floats, 7, "a checkpoint")?)
        } else {
            (0, 0)
        };
        // The run's inputs and targets, and the engine's copy of them (u32 each).
        let tokens = mul(shape.batch as u64, shape.context as u64, "a batch")?;
        let data = mul(tokens, 16, "a batch")?
            .checked_add(shape.data_bytes as u64)
            .ok_or_else(|| err!("memory plan: the size of the data overflows"))?;
        let eval_or_checkpoint = evaluation.max(checkpoint);
        let parts = [weights, adam_moments, gradients, activations, packings, eval_or_checkpoint, data];
        let total = parts
            .iter()
            .try_fold(0u64, |acc, &x| acc.checked_add(x))
            .ok_or_else(|| err!("memory plan: the total overflows"))?;
        Ok(MemoryPlan {
            params,
            weights,
            adam_moments,
            gradient_buffers: buffers,
            gradient_buffer_bytes: floats,
            gradients,
            activations_per_worker: per_worker,
            activation_workers: workers,
            activations,
            packing_shared: packing,
            packing_per_worker: 0,
            packings,
            evaluation,
            checkpoint,
            eval_or_checkpoint,
            data,
            total,
        })
    }

    /// The `memory` block of `cllm train --dry-run`.
    pub fn text(&self) -> String {
        let b = format_bytes;
        format!(
            "memory    {} in all (estimate): weights {}, AdamW moments {}, gradients {} x {} = {}, activations {} \
             x {} = {}, packed weights {} (one, shared), evaluation {} or checkpoint writes {} (one at a time), \
             data {}\n",
            b(self.total),
            b(self.weights),
            b(self.adam_moments),
            self.gradient_buffers,
            b(self.gradient_buffer_bytes),
            b(self.gradients),
            self.activation_workers,
            b(self.activations_per_worker),
            b(self.activations),
            b(self.packings),
            b(self.evaluation),
            b(self.checkpoint),
            b(self.data),
        )
    }

    /// Refuses a plan larger than the memory available to this process ([`Available`]), with
    /// the numbers; `what` names the run ("the run", "the benchmark").
    pub fn check_fits(&self, what: &str, available: &Available) -> Result<()> {
        match available.limit() {
            Some((limit, source)) if self.total > limit => Err(err!(
                "{what} needs about {} (weights {}, AdamW moments {}, {} gradient buffers {}, {} activation sets {}, \
                 packed weights {}, evaluation or checkpoint writes {}, data {}) but only {} is available ({source}); \
                 lower --batch or --threads, or use a smaller --config",
                format_bytes(self.total),
                format_bytes(self.weights),
                format_bytes(self.adam_moments),
                self.gradient_buffers,
                format_bytes(self.gradients),
                self.activation_workers,
                format_bytes(self.activations),
                format_bytes(self.packings),
                format_bytes(self.eval_or_checkpoint),
                format_bytes(self.data),
                format_bytes(limit)
            )),
            _ => Ok(()),
        }
    }
}

/// The memory this process may still allocate, as far as the system says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Available {
    /// `MemAvailable` of `/proc/meminfo`.
    pub mem_available: Option<u64>,
    /// The soft `RLIMIT_AS` less the address space already in use (`VmSize`), if a limit is set.
    pub address_space: Option<u64>,
}

impl Available {
    /// Reads both from the system now.
    pub fn now() -> Available {
        Available { mem_available: crate::data::text::mem_available(), address_space: address_space_left() }
    }

    /// The tighter of the two, and both as known (`MemAvailable 3.1 GiB; 1.9 GiB left under the
    /// address-space limit`); `None` when neither is known.
    pub fn limit(&self) -> Option<(u64, String)> {
        let mut known = Vec::new();
        if let Some(m) = self.mem_available {
            known.push((m, format!("MemAvailable {}", format_bytes(m))));
        }
        if let Some(a) = self.address_space {
            known.push((a, format!("{} left under the address-space limit", format_bytes(a))));
        }
        let min = known.iter().map(|(n, _)| *n).min()?;
        Some((min, known.into_iter().map(|(_, text)| text).collect::<Vec<_>>().join("; ")))
    }
}

/// The soft `RLIMIT_AS` less `VmSize`, `None` when unlimited or unknown.
fn address_space_left() -> Option<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `getrlimit` writes one `rlimit` through a valid pointer to a local and keeps no
    // reference to it.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut lim) } != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status.lines().find(|l| l.starts_with("VmSize:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(lim.rlim_cur.saturating_sub(kb.saturating_mul(1024)))
}

/// `1.5 GiB`, `12.0 MiB`, `3.2 KiB`, `512 B` (binary units, as `free -h` shows memory).
pub fn format_bytes(b: u64) -> String {
    const UNITS: [(&str, u64); 4] = [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    match UNITS.iter().find(|(_, size)| b >= *size) {
        Some((unit, size)) => format!("{:.1} {unit}", b as f64 / *size as f64),
        None => format!("{b} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(strategy: Strategy, batch: usize, spheres: usize, threads: usize) -> RunShape {
        RunShape {
            batch,
            context: 64,
            spheres,
            threads,
            strategy,
            data_bytes: 1000,
            loaded: Loaded::Nothing,
            saves: true,
        }
    }

    #[test]
    fn gradient_buffers_are_what_each_strategy_allocates() {
        // The tree's bound plus the summed gradient: S = 8, N = 2 gives 6 + 1; S = 32, N = 2
        // gives 10 + 1 (was one slot per micro-batch: 9 and 33).
        assert_eq!(gradient_buffers(Strategy::Segmented, 8, 2), 7);
        assert_eq!(gradient_buffers(Strategy::Segmented, 32, 2), 11);
        assert_eq!(gradient_buffers(Strategy::GradientLock, 8, 2), 3);
        assert_eq!(gradient_buffers(Strategy::ModelLock, 8, 256), 2);
        assert_eq!(gradient_buffers(Strategy::Rayon, 4, 16), 5);
    }

    #[test]
    fn the_total_is_the_training_state_plus_the_larger_of_evaluation_and_checkpoint() {
        let cfg = ModelConfig::tiny();
        for s in Strategy::ALL {
            let p = MemoryPlan::for_run(&cfg, &shape(s, 8, 4, 3)).unwrap();
            let parts = p.weights
                + p.adam_moments
                + p.gradients
                + p.activations
                + p.packings
                + p.evaluation.max(p.checkpoint)
                + p.data;
            assert_eq!(p.total, parts, "{s}");
            assert!(p.evaluation > 0 && p.checkpoint > 0 && p.eval_or_checkpoint == p.evaluation.max(p.checkpoint));
            assert_eq!(p.gradients, p.gradient_buffers * p.params * 4);
            assert_eq!(p.activations, p.activation_workers * p.activations_per_worker);
        }
    }

    #[test]
    fn init_from_holds_a_second_copy_of_the_weights_and_resume_also_of_the_moments() {
        let cfg = ModelConfig::tiny();
        let floats = cfg.num_params() as u64 * 4;
        let fresh = MemoryPlan::for_run(&cfg, &shape(Strategy::Segmented, 8, 4, 2)).unwrap();
        let with = |loaded| MemoryPlan::for_run(&cfg, &RunShape { loaded, ..shape(Strategy::Segmented, 8, 4, 2) });
        let init = with(Loaded::Weights).unwrap();
        let resumed = with(Loaded::WeightsAndMoments).unwrap();
        assert_eq!((init.weights, init.adam_moments), (2 * floats, 2 * floats));
        assert_eq!((resumed.weights, resumed.adam_moments), (2 * floats, 4 * floats));
        assert_eq!(init.total, fresh.total + floats);
        assert_eq!(resumed.total, fresh.total + 3 * floats);
    }

    #[test]
    fn huge_counts_overflow_into_an_error_not_a_wrap() {
        let cfg = ModelConfig::tiny();
        let e = MemoryPlan::for_run(&cfg, &shape(Strategy::Segmented, usize::MAX, 1, 1)).unwrap_err();
        assert!(e.0.contains("overflows"), "{e}");
    }

    #[test]
    fn a_plan_over_the_limit_is_refused_with_the_numbers() {
        let cfg = ModelConfig::tiny();
        let p = MemoryPlan::for_run(&cfg, &shape(Strategy::Segmented, 8, 4, 2)).unwrap();
        let tight = Available { mem_available: Some(p.total - 1), address_space: None };
        let e = p.check_fits("the run", &tight).unwrap_err();
        assert!(e.0.contains("MemAvailable") && e.0.contains("needs about"), "{e}");
        let aspace = Available { mem_available: Some(u64::MAX), address_space: Some(p.total / 2) };
        assert!(p.check_fits("the run", &aspace).unwrap_err().0.contains("address-space limit"));
        assert!(p.check_fits("the run", &Available { mem_available: Some(p.total), address_space: None }).is_ok());
        assert!(p.check_fits("the run", &Available::default()).is_ok());
    }
}
