//! The `rayon` strategy: the step a typical Rust developer would write, kept as a comparison
//! point for the sphere engine.
//!
//! Micro-batches are a rayon parallel iterator whose gradients are combined with a parallel
//! `fold`/`reduce`; the norm and AdamW are parallel iterators over the same fixed chunks as the
//! sphere engine. Each micro-batch allocates its gradient, as such code usually does.
//!
//! Not bit-deterministic: rayon's reduction tree follows its work stealing, so the gradient sum
//! (and the f64 norm sum) are associated differently from run to run and across thread counts.
//! Not model-checked either: rayon's threads are outside the sync backend.

use super::engine::validate;
use super::tally::{sphere_factor, StepCounters, StepTally};
use super::timing::WorkerTiming;
use super::workload::{StepBatch, Workload};
use super::{StepReport, TrainerOptions};
use crate::grad::{self, Scan};
use crate::optim::{AdamWConfig, DecayMask};
use crate::{bail, err, Result};
use rayon::prelude::*;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;
use std::time::Instant;

struct MicroInfo {
    mb: usize,
    loss: f32,
    scan: Scan,
    factor: f32,
}

#[derive(Default)]
struct Acc {
    grad: Option<Vec<f32>>,
    infos: Vec<MicroInfo>,
}

impl Acc {
    fn merge(mut self, other: Acc) -> Acc {
        self.grad = match (self.grad, other.grad) {
            (Some(mut a), Some(b)) => {
                grad::add_scaled(&mut a, &b, 1.0);
                Some(a)
            }
            (a, b) => a.or(b),
        };
        self.infos.extend(other.infos);
        self
    }
}

/// The rayon step engine.
pub struct RayonEngine<W: Workload> {
    pool: rayon::ThreadPool,
    workload: W,
    params: Vec<f32>,
    sum: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    batch: StepBatch,
    /// One scratch per pool thread (indexed by rayon's thread index; never contended).
    scratch: Vec<Mutex<Option<W::Scratch>>>,
    spheres: usize,
    chunk: usize,
    clip_norm: f32,
    clip_mode: super::ClipMode,
    adamw: AdamWConfig,
    decay: DecayMask,
    inject_nan: Vec<(u64, usize)>,
    counters: StepCounters,
    /// Steps run by this engine: the weights version the workload sees.
    published: u64,
}

impl<W: Workload> RayonEngine<W> {
    pub fn new(workload: W, params: Vec<f32>, rows: usize, seq: usize, opts: &TrainerOptions) -> Result<Self> {
        let n_params = params.len();
        let p = workload.num_params();
        let spheres = validate(opts, rows, seq, p)?;
        if params.len() != p {
            bail!("expected {p} parameters, got {}", params.len());
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(opts.threads)
            .thread_name(|i| format!("cllm-rayon-{i}"))
            .build()
            .map_err(|e| err!("could not start the rayon pool: {e}"))?;
        Ok(RayonEngine {
            scratch: (0..opts.threads).map(|_| Mutex::new(None)).collect(),
            pool,
            workload,
            params,
            sum: vec![0.0; p],
            m: vec![0.0; p],
            v: vec![0.0; p],
            batch: StepBatch::zeros(rows, seq),
            spheres,
            chunk: opts.chunk_size,
            clip_norm: opts.clip_norm,
            clip_mode: opts.clip_mode,
            adamw: opts.adamw,
            decay: opts.decay_mask.clone().unwrap_or_else(|| DecayMask::all(n_params)),
            inject_nan: opts.inject_nan.clone(),
            counters: StepCounters::new(opts.max_skipped_steps),
            published: 0,
        })
    }

    pub fn workload(&self) -> &W {
        &self.workload
    }
    pub fn spheres(&self) -> usize {
        self.spheres
    }
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }
    pub fn params(&self) -> &[f32] {
        &self.params
    }
    pub fn set_params(&mut self, params: &[f32]) -> Result<()> {
        if params.len() != self.params.len() {
            bail!("expected {} parameters, got {}", self.params.len(), params.len());
        }
        self.params.copy_from_slice(params);
        Ok(())
    }
    pub fn grad_sum(&self) -> &[f32] {
        &self.sum
    }
    pub fn adam_state(&self) -> (&[f32], &[f32], u64) {
        (&self.m, &self.v, self.counters.t)
    }
    pub fn set_adam_state(&mut self, m: &[f32], v: &[f32], t: u64) -> Result<()> {
        let p = self.params.len();
        if m.len() != p || v.len() != p {
            bail!("adam state has {} / {} values, expected {p}", m.len(), v.len());
        }
        self.m.copy_from_slice(m);
        self.v.copy_from_slice(v);
        self.counters.t = t;
        Ok(())
    }
    pub fn step_count(&self) -> u64 {
        self.counters.step
    }
    pub fn set_step(&mut self, n: u64) {
        self.counters.step = n;
    }

    pub fn step(&mut self, inputs: &[u32], targets: &[u32], lr: f32) -> Result<StepReport> {
        let mut report = StepReport::default();
        self.step_into(inputs, targets, lr, &mut report)?;
        Ok(report)
    }

    pub fn step_into(&mut self, inputs: &[u32], targets: &[u32], lr: f32, report: &mut StepReport) -> Result<()> {
        let n = self.batch.rows * self.batch.seq;
        if inputs.len() != n || targets.len() != n {
            bail!("batch must have {n} inputs and targets, got {} and {}", inputs.len(), targets.len());
        }
        if !(lr.is_finite() && lr >= 0.0) {
            bail!("learning rate must be finite and >= 0, got {lr}");
        }
        let wall = Instant::now();
        self.batch.inputs.copy_from_slice(inputs);
        self.batch.targets.copy_from_slice(targets);
        let step = self.counters.step + 1;
        // Names this step's weights for the workload's caches; private, so never repeats.
        self.published += 1;
        let version = self.published;
        let (workload, batch, params, scratch) = (&self.workload, &self.batch, &self.params, &self.scratch);
        let (spheres, clip_norm, clip_mode, inject) = (self.spheres, self.clip_norm, self.clip_mode, &self.inject_nan);
        let (rows, seq) = (batch.rows / spheres, batch.seq);

        let t0 = Instant::now();
        let acc = catch_unwind(AssertUnwindSafe(|| {
            self.pool.install(|| {
                (0..spheres)
                    .into_par_iter()
                    .map(|mb| {
                        let idx = rayon::current_thread_index().unwrap_or(0);
                        let mut slot = scratch[idx].lock().unwrap_or_else(|e| e.into_inner());
                        let s = slot.get_or_insert_with(|| workload.new_scratch(rows, seq));
                        let mut g = vec![0.0f32; params.len()];
                        let loss = workload.compute(s, params, version, batch, mb, spheres, &mut g);
                        if inject.contains(&(step, mb)) {
                            g[0] = f32::NAN;
                        }
                        let scan = grad::scan(&g);
                        let factor = sphere_factor(&scan, clip_norm, clip_mode);
                        grad::scale(&mut g, factor);
                        let info = MicroInfo { mb, loss, scan, factor };
                        Acc { grad: scan.is_valid().then_some(g), infos: vec![info] }
                    })
                    .reduce(Acc::default, Acc::merge)
            })
        }))
        .map_err(|p| {
            let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
            err!("worker panicked: {}", msg.unwrap_or_else(|| "non-string panic payload".into()))
        })?;
        let compute = t0.elapsed();

        let mut infos = acc.infos;
        infos.sort_by_key(|i| i.mb);
        let mut tally = StepTally::begin(report, step);
        for i in &infos {
            if i.scan.is_valid() {
                tally.valid(i.loss, i.scan.norm(), i.factor);
            } else {
                tally.invalid(i.mb, i.scan.bad_entries());
            }
        }
        let mut timing = WorkerTiming { compute, micro_batches: spheres as u32, ..Default::default() };
        let chunk = self.chunk;
        let t1 = Instant::now();
        let total = match acc.grad {
            Some(sum) => {
                self.sum = sum;
                self.pool.install(|| self.sum.par_chunks(chunk).map(grad::sqnorm).sum::<f64>())
            }
            None => f64::NAN,
        };
        timing.reduce = t1.elapsed();
        // A sum of finite gradients can still overflow f32: `finish` skips such an update too.
        if let Some(s) = tally.finish(total, clip_norm, clip_mode) {
            let t2 = Instant::now();
            let (adamw, t, g, decay) = (self.adamw, self.counters.t + 1, &self.sum, &self.decay);
            let (p, m, v) = (&mut self.params, &mut self.m, &mut self.v);
            self.pool.install(|| {
                p.par_chunks_mut(chunk)
                    .zip(g.par_chunks(chunk))
                    .zip(m.par_chunks_mut(chunk))
                    .zip(v.par_chunks_mut(chunk))
                    .enumerate()
                    .for_each(|(i, (((p, g), m), v))| {
                        adamw.update_masked(i * chunk, decay, p, g, m, v, t, lr, s.grad_scale)
                    })
            });
            timing.optimizer = t2.elapsed();
        }
        report.timings.workers.clear();
        report.timings.workers.push(timing);
        report.timings.wall = wall.elapsed();
        self.counters.record(report)
    }
}
