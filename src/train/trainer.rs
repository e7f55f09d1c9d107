//! [`Trainer`]: a GPT model, its optimizer state and the threaded step engine.

use super::engine::Engine;
use super::rayon_engine::RayonEngine;
use super::workload::GptWorkload;
use super::{StepReport, Strategy, TrainerOptions};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::model::Model;
use crate::sync::Std;
use crate::{bail, Result};

enum Inner {
    // Boxed: both engines are hundreds of bytes, and a Trainer is moved around.
    Spheres(Box<Engine<Std, GptWorkload>>),
    Rayon(Box<RayonEngine<GptWorkload>>),
}

macro_rules! dispatch {
    ($self:expr, $e:ident => $body:expr) => {
        match $self {
            Inner::Spheres($e) => $body,
            Inner::Rayon($e) => $body,
        }
    };
}

/// Trains a [`Model`] with `threads` workers. Workers are spawned once in [`Trainer::new`],
/// reused by every [`Trainer::step`], and joined by [`Trainer::shutdown`] or on drop.
pub struct Trainer {
    /// The model's config and layout; its `params` are brought up to date by [`Trainer::model`]
    /// (the live weights belong to the engine).
    model: Model,
    model_stale: bool,
    batch: usize,
    seq: usize,
    opts: TrainerOptions,
    inner: Inner,
    /// The workload's step counter for dropout masks (see [`GptWorkload::with_dropout`]).
    step: Arc<AtomicU64>,
}

impl Trainer {
    /// Checks the options (threads in 1..=256, spheres dividing `batch`, `seq` within the
    /// model's context, ...) and starts the workers.
    pub fn new(mut model: Model, batch: usize, seq: usize, opts: TrainerOptions) -> Result<Trainer> {
        let (workload, params, step) = Self::workload(&mut model, seq, &opts)?;
        let inner = match opts.strategy {
            Strategy::Rayon => Inner::Rayon(Box::new(RayonEngine::new(workload, params, batch, seq, &opts)?)),
            _ => Inner::Spheres(Box::new(Engine::new(workload, params, batch, seq, &opts)?)),
        };
        Ok(Trainer { model, model_stale: true, batch, seq, opts, inner, step })
    }

    /// Checks `seq` and the dropout, and takes the model's weights for the engine, with the
    /// workload that computes on them and its dropout step counter.
    fn workload(
        model: &mut Model,
        seq: usize,
        opts: &TrainerOptions,
    ) -> Result<(GptWorkload, Vec<f32>, Arc<AtomicU64>)> {
        if seq == 0 || seq > model.config.context {
            bail!("sequence length must be between 1 and the model context {}, got {seq}", model.config.context);
        }
        if !(0.0..1.0).contains(&opts.dropout) {
            bail!("dropout must be in [0, 1), got {}", opts.dropout);
        }
        let step = Arc::new(AtomicU64::new(0));
        let workload = GptWorkload::new(model.config).with_dropout(opts.dropout, opts.dropout_seed, Arc::clone(&step));
        Ok((workload, std::mem::take(&mut model.params), step))
    }

    /// As [`Trainer::new`], as one rank of a distributed run over `comm` ([`crate::dist`]):
    /// `opts.threads` workers on this rank, the segmented strategy only. Every rank must be
    /// built with the same model, shape and options.
    pub fn new_distributed(
        mut model: Model,
        batch: usize,
        seq: usize,
        opts: TrainerOptions,
        comm: std::sync::Arc<dyn crate::dist::Comm>,
    ) -> Result<Trainer> {
        let (workload, params, step) = Self::workload(&mut model, seq, &opts)?;
        let engine = Engine::distributed(workload, params, (batch, seq), &opts, comm)?;
        Ok(Trainer { model, model_stale: true, batch, seq, opts, inner: Inner::Spheres(Box::new(engine)), step })
    }

    /// One step over `batch x seq` inputs/targets at learning rate `lr` (the caller owns the
    /// schedule). Returns `Err` on a bad batch, a worker panic, or after
    /// `max_skipped_steps` consecutive steps without a valid micro-batch.
    pub fn step(&mut self, inputs: &[u32], targets: &[u32], lr: f32) -> Result<StepReport> {
        let mut report = StepReport::default();
        self.step_into(inputs, targets, lr, &mut report)?;
        Ok(report)
    }

    /// As [`Trainer::step`], reusing `report`'s buffers: allocation-free after the first step.
    pub fn step_into(&mut self, inputs: &[u32], targets: &[u32], lr: f32, report: &mut StepReport) -> Result<()> {
        let vocab = self.model.config.vocab as u32;
        if let Some(&tok) = inputs.iter().chain(targets).find(|&&x| x >= vocab) {
            bail!("token {tok} is outside the vocabulary (size {vocab})");
        }
        self.model_stale = true;
        // Before the engine publishes the step, which orders this store before the workers' reads.
        self.step.store(self.step_count() + 1, Ordering::Relaxed);
        dispatch!(&mut self.inner, e => e.step_into(inputs, targets, lr, report))
    }

    /// The model with the current weights (copies them out of the engine if they changed).
    pub fn model(&mut self) -> &Model {
        if self.model_stale {
            let mut params = std::mem::take(&mut self.model.params);
            params.clear();
            params.extend_from_slice(dispatch!(&self.inner, e => e.params()));
            self.model.params = params;
            self.model_stale = false;
        }
        &self.model
    }

    /// The current weights (between steps).
    pub fn params(&self) -> &[f32] {
        dispatch!(&self.inner, e => e.params())
    }

    /// Replaces the weights (e.g. when resuming).
    pub fn set_params(&mut self, params: &[f32]) -> Result<()> {
        self.model_stale = true;
        dispatch!(&mut self.inner, e => e.set_params(params))
    }

    /// AdamW state (m, v, t); t counts applied updates.
    pub fn adam_state(&self) -> (&[f32], &[f32], u64) {
        dispatch!(&self.inner, e => e.adam_state())
    }

    /// Restores the AdamW state for an exact resume.
    pub fn set_adam_state(&mut self, m: &[f32], v: &[f32], t: u64) -> Result<()> {
        dispatch!(&mut self.inner, e => e.set_adam_state(m, v, t))
    }

    /// Steps taken so far (the next report's `step` is this + 1).
    pub fn step_count(&self) -> u64 {
        dispatch!(&self.inner, e => e.step_count())
    }

    /// Sets the step counter for an exact resume (also what `inject_nan` steps refer to).
    pub fn set_step(&mut self, n: u64) {
        dispatch!(&mut self.inner, e => e.set_step(n))
    }

    /// The sum of valid micro-batch gradients of the last applied step (before 1/n and clip).
    pub fn grad_sum(&self) -> &[f32] {
        dispatch!(&self.inner, e => e.grad_sum())
    }

    pub fn options(&self) -> &TrainerOptions {
        &self.opts
    }
    /// The resolved number of micro-batches per step.
    pub fn spheres(&self) -> usize {
        dispatch!(&self.inner, e => e.spheres())
    }
    pub fn threads(&self) -> usize {
        dispatch!(&self.inner, e => e.threads())
    }
    pub fn batch_shape(&self) -> (usize, usize) {
        (self.batch, self.seq)
    }

    /// Stops and joins the workers (also done on drop). Further steps fail.
    pub fn shutdown(&mut self) -> Result<()> {
        match &mut self.inner {
            Inner::Spheres(e) => e.shutdown(),
            Inner::Rayon(_) => Ok(()),
        }
    }
}
