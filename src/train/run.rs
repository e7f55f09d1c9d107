//! The training loop as driven by `cllm train`: each step draws a batch, takes the scheduled
//! learning rate ([`super::schedule`]), trains, and on its interval evaluates ([`super::eval`]),
//! reports ([`super::progress`]) and checkpoints.
//!
//! A resumed run continues bit for bit: the weights, AdamW moments and step counter, and the
//! sampler state come from the checkpoint, the learning rate depends only on the step number,
//! and evaluation, progress, the `--sample-every` samples (their own seeded RNG, see
//! [`crate::generate`]) and the `best/` checkpoint only read the weights.
//!
//! Validation is measured twice over: periodically on the first `--eval-windows` windows of the
//! validation split (the same windows every time, so the values compare along the run; the
//! lowest one picks `best/`), and once more at the end on the whole split, the figure the
//! summary reports. Every figure carries its window count ([`EvalResult`]).
//!
//! A stop request ([`StopRequest`], set by SIGINT/SIGTERM/SIGHUP) is looked at between steps
//! only: the step in flight completes, then the loop writes a final checkpoint of that step
//! (unless the run was told not to, or the step's checkpoint was just written) and returns a
//! summary marked interrupted. The trainer drops on return, which joins every worker.
//!
//! Distributed ([`crate::dist`], `RunSpec::dist`): every rank runs this loop over the same
//! batches; rank 0 alone evaluates, writes checkpoints, metrics, samples and progress. After
//! each step the ranks combine their stop requests (an integer max), so all of them stop after
//! the same step; every `check_every` steps (and at the start and the end) they compare a hash
//! of their weights, and all of them fail alike if one differs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::eval::{evaluate, EvalResult};
use super::options::RunOptions;
use super::progress::{Progress, Reporter, StepOutcome};
use super::schedule::lr_at;
use super::Trainer;
use crate::checkpoint::{self, Checkpoint, DataRecord, TokensRecord, TrainState};
use crate::config::ModelConfig;
use crate::data::tokens::{Token, TokenSlice, Tokenized};
use crate::data::{split_tokens, BatchSampler, Corpus};
use crate::dist::{check_weights, Comm};
use crate::error::Result;
use crate::generate::{generate_bytes, SampleOptions};
use crate::model::Model;
use crate::signals::StopRequest;
use std::sync::Arc;

/// Everything one run needs, resolved and validated by the caller.
pub struct RunSpec {
    pub model_config: ModelConfig,
    pub options: RunOptions,
    pub corpus: Corpus,
    /// With `--tokenizer`: the corpus's ids and the tokenizer (saved in every checkpoint);
    /// `None`: byte-level, the corpus's bytes are the tokens.
    pub tokens: Option<Tokenized>,
    /// Absolute path of the data file (`None`: the built-in corpus), recorded for resuming.
    pub data_path: Option<PathBuf>,
    /// The run directory receiving `step-NNNNNN` checkpoints (created if missing).
    pub out: PathBuf,
    /// The checkpoint to continue from.
    pub resume: Option<Checkpoint>,
    /// `--init-from`: the weights a new run starts from (fresh optimizer, step 0) instead of
    /// the seeded initialisation.
    pub init: Option<Model>,
    /// JSON-lines metrics file (appended to when resuming).
    pub metrics: Option<PathBuf>,
    /// `(step, microbatch)` gradients to poison with NaN.
    pub inject_nan: Vec<(u64, usize)>,
    pub progress: Progress,
    /// Recorded in every checkpoint.
    pub command_line: Vec<String>,
    /// `--sample-every`: a sample from a fixed prompt every so many steps (not recorded in
    /// checkpoints: it does not change what is trained).
    pub samples: Option<SampleSpec>,
    /// Whether a stop request writes a final checkpoint (`--no-save-on-interrupt` clears it).
    pub save_on_interrupt: bool,
    /// `--distributed`: this process is one rank of a run over `dist`.
    pub dist: Option<Arc<dyn Comm>>,
    /// `--check-every`: distributed ranks compare their weights every so many steps (0: only at
    /// the start and the end).
    pub check_every: u64,
}

impl RunSpec {
    /// True on the process that writes (rank 0, or the only one).
    pub fn writes(&self) -> bool {
        self.dist.as_ref().is_none_or(|d| d.rank() == 0)
    }
}

/// What `--sample-every` samples: `opts.tokens` bytes after `prompt`, every `every` steps, with
/// `opts.seed` every time (the sampler's own RNG, so training draws nothing from it and the
/// samples of one step are the same in every run of the same flags).
#[derive(Clone, Debug)]
pub struct SampleSpec {
    pub every: u64,
    pub prompt: Vec<u8>,
    pub opts: SampleOptions,
}

/// What a finished run reports.
pub struct RunSummary {
    /// The signal whose stop request ended the run early (`None`: it ran to the total).
    pub interrupted: Option<i32>,
    /// The step the run ended at (the total, unless interrupted).
    pub last_step: u64,
    /// Steps taken by this process (fewer than `last_step` when resumed).
    pub steps_run: u64,
    pub final_loss: Option<f32>,
    /// The loss over the whole validation split at the end (`None`: no validation split).
    pub val: Option<EvalResult>,
    /// `best/` and the periodic validation that chose it, if one was written by this run or an
    /// earlier part of it.
    pub best: Option<(PathBuf, EvalResult)>,
    /// Training tokens per second of step time.
    pub tokens_per_s: f64,
    /// Wall time of the whole run, evaluation and checkpoints included.
    pub elapsed_s: f64,
    /// Steps whose update was skipped for non-finite gradients.
    pub skipped_updates: u64,
    /// The last checkpoint written (`None` only when interrupted before any was).
    pub checkpoint: Option<PathBuf>,
    /// The final weights.
    pub model: Model,
}

/// The sampler's seed: derived from the run seed, but not equal to it, so the batch stream is
/// not the model initialisation's stream (both are seeded through SplitMix64).
pub fn sampler_seed(seed: u64) -> u64 {
    seed ^ 0xDA7A_5A3B_1E55_EED5
}

/// True on the steps where something done every `every` steps (0: never) is due; the last step
/// of the run always is.
fn due(step: u64, every: u64, total: u64) -> bool {
    step == total || (every > 0 && step.is_multiple_of(every))
}

/// What the loop keeps across steps for the summary.
#[derive(Default)]
struct Tally {
    last_loss: Option<f32>,
    last_val: Option<f64>,
    /// `best/` and the lowest periodic validation so far (from `best/` when resuming into its
    /// run with the same `--eval-windows`).
    best: Option<(PathBuf, EvalResult)>,
    skipped_updates: u64,
    step_time: Duration,
    last_checkpoint: Option<PathBuf>,
}

impl RunSpec {
    /// The tokens of the run: the corpus's bytes, or its ids with a tokenizer.
    pub fn token_slice(&self) -> TokenSlice<'_> {
        match &self.tokens {
            None => TokenSlice::Bytes(&self.corpus.bytes),
            Some(t) => t.ids.slice(),
        }
    }

    /// (train, validation) token counts of the run's split.
    pub fn split_lens(&self) -> Result<(usize, usize)> {
        split_lens(&self.corpus, self.tokens.as_ref(), &self.options)
    }

    /// The bytes each id stands for (`None`: byte-level).
    fn byte_lens(&self) -> Option<&[u32]> {
        self.tokens.as_ref().map(|t| t.byte_lens.as_slice())
    }

    /// `opts.tokens` tokens of text after `prompt`, decoded to bytes with the run's tokenizer.
    pub fn sample(&self, model: &Model, prompt: &[u8], opts: SampleOptions) -> Result<Vec<u8>> {
        let table = self.tokens.as_ref().map(|t| t.tokenizer.token_bytes());
        let tok = self.tokens.as_ref().map(|t| &t.tokenizer).zip(table.as_deref());
        generate_bytes(model, tok, prompt, opts)
    }
}

/// (train, validation) token counts of the split of `corpus`'s tokens (its bytes, or `tokens`)
/// at the run's validation fraction and context; an error when a part cannot hold a window.
pub fn split_lens(corpus: &Corpus, tokens: Option<&Tokenized>, o: &RunOptions) -> Result<(usize, usize)> {
    let (slice, unit) = match tokens {
        None => (TokenSlice::Bytes(&corpus.bytes), "bytes"),
        Some(t) => (t.ids.slice(), "tokens"),
    };
    crate::with_tokens!(slice, d => split_tokens(d, o.val_fraction, o.context, unit)
        .map(|(t, v)| (t.len(), v.len()))
        .map_err(|e| e.context(&corpus.name)))
}

/// Trains according to `spec`, writing checkpoints, metrics and progress, until the total or
/// until `stop` is requested (checked between steps).
pub fn train(spec: &RunSpec, stop: &StopRequest) -> Result<RunSummary> {
    crate::with_tokens!(spec.token_slice(), data => train_on(spec, stop, data))
}

/// [`train`] over the run's tokens `data` (bytes, or a tokenizer's ids).
fn train_on<T: Token>(spec: &RunSpec, stop: &StopRequest, data: &[T]) -> Result<RunSummary> {
    let started = Instant::now();
    let o = &spec.options;
    let unit = if spec.tokens.is_some() { "tokens" } else { "bytes" };
    let (train_data, val_data) =
        split_tokens(data, o.val_fraction, o.context, unit).map_err(|e| e.context(&spec.corpus.name))?;
    let saver = Saver { spec, data: data_record(spec, train_data.len(), val_data.len()) };
    let (mut trainer, mut sampler, start_step) = start(spec, train_data.len())?;
    let writes = spec.writes();
    if let Some(d) = &spec.dist {
        check_weights(&**d, start_step, trainer.params())?;
    }
    let (progress, metrics) = if writes { (spec.progress, spec.metrics.as_deref()) } else { (Progress::Silent, None) };
    if writes {
        checkpoint::remove_stale_temps(&spec.out);
    }
    let mut reporter = Reporter::new(progress, metrics, spec.resume.is_some(), start_step, o.steps)?;
    let tokens_per_step = (o.batch * o.context) as u64;
    let mut inputs = Vec::with_capacity(o.batch * o.context);
    let mut targets = Vec::with_capacity(o.batch * o.context);
    let mut tally = Tally {
        last_val: spec.resume.as_ref().and_then(|c| c.state.val_loss.map(f64::from)),
        best: spec.resume.as_ref().and_then(|_| earlier_best(spec, val_data)),
        ..Tally::default()
    };
    // Test-only (tests/crash_safety.rs), read once: unset in normal use.
    let step_delay = checkpoint::test_delay_of(checkpoint::STEP_DELAY_VAR);
    let mut last_step = start_step;
    let mut interrupted = None;
    for step in start_step + 1..=o.steps {
        sampler.next_batch(train_data, o.batch, o.context, &mut inputs, &mut targets);
        let lr = lr_at(o.lr_schedule, o.lr, o.min_lr_ratio, o.warmup_steps, step, o.steps);
        let t0 = Instant::now();
        let report = trainer.step(&inputs, &targets, lr as f32).map_err(|e| e.context(format!("step {step}")))?;
        let dt = t0.elapsed();
        tally.step_time += dt;
        tally.last_loss = Some(report.loss);
        tally.skipped_updates += u64::from(report.update_skipped);
        let val = if writes && !val_data.is_empty() && due(step, o.eval_every, o.steps) {
            let r = evaluate(
                &spec.model_config,
                trainer.params(),
                val_data,
                spec.byte_lens(),
                o.context,
                o.eval_windows,
                o.threads,
            )?;
            tally.last_val = Some(r.loss);
            Some(r)
        } else {
            None
        };
        let tokens_per_s = tokens_per_step as f64 / dt.as_secs_f64().max(1e-9);
        reporter.step(&StepOutcome { step, report: &report, lr, val, dt, tokens_per_s })?;
        let mut best_now = None;
        if let Some(v) = val.filter(|v| v.loss.is_finite() && tally.best.as_ref().is_none_or(|(_, b)| v.loss < b.loss))
        {
            let dir = saver.save(&trainer, &sampler, step, report.loss, Some(v.loss), true)?;
            reporter.saved_best(&dir, step, &v);
            best_now = Some(dir.clone());
            tally.best = Some((dir, v));
        }
        if writes && due(step, o.save_every, o.steps) {
            // `best/` of this very step holds the same files (its validation is this step's):
            // link them rather than write them twice (a GPT-2-sized checkpoint is 1.5 GB).
            let linked = match &best_now {
                Some(best) => saver.link(best, step)?,
                None => None,
            };
            let dir = match linked {
                Some(dir) => dir,
                None => saver.save(&trainer, &sampler, step, report.loss, tally.last_val, false)?,
            };
            reporter.saved(&dir);
            tally.last_checkpoint = Some(dir);
        }
        if let Some(s) = spec.samples.as_ref().filter(|s| writes && s.every > 0 && step.is_multiple_of(s.every)) {
            let model = Model::from_params(spec.model_config, trainer.params().to_vec())?;
            reporter.sample(step, &spec.sample(&model, &s.prompt, s.opts)?)?;
        }
        last_step = step;
        if let Some(d) = step_delay {
            std::thread::sleep(d);
        }
        let requested = agree_on_stop(spec, stop, step, trainer.params())?;
        if let Some(sig) = requested {
            if writes && spec.save_on_interrupt && !due(step, o.save_every, o.steps) {
                let dir = saver.save(&trainer, &sampler, step, report.loss, tally.last_val, false)?;
                reporter.saved(&dir);
                tally.last_checkpoint = Some(dir);
            }
            interrupted = Some(sig);
            break;
        }
    }
    reporter.finish();
    let steps_run = last_step - start_step;
    if interrupted.is_none() && last_step == start_step {
        crate::bail!("no step was run: already at step {start_step}");
    }
    // The summary's validation covers the whole split, not the periodic windows (skipped when
    // interrupted: the user asked to stop).
    let val = if !writes || val_data.is_empty() || interrupted.is_some() {
        None
    } else {
        Some(evaluate(
            &spec.model_config,
            trainer.params(),
            val_data,
            spec.byte_lens(),
            o.context,
            usize::MAX,
            o.threads,
        )?)
    };
    Ok(RunSummary {
        interrupted,
        last_step,
        steps_run,
        final_loss: tally.last_loss,
        val,
        best: tally.best,
        tokens_per_s: (steps_run * tokens_per_step) as f64 / tally.step_time.as_secs_f64().max(1e-9),
        elapsed_s: started.elapsed().as_secs_f64(),
        skipped_updates: tally.skipped_updates,
        checkpoint: tally.last_checkpoint,
        model: Model::from_params(spec.model_config, trainer.params().to_vec())?,
    })
}

/// The stop request after `step`: this process's, or, distributed, the largest signal number
/// any rank received (every rank gets the same answer); the ranks' weights are compared when
/// they stop and every `check_every` steps.
fn agree_on_stop(spec: &RunSpec, stop: &StopRequest, step: u64, params: &[f32]) -> Result<Option<i32>> {
    let mine = stop.requested();
    let Some(d) = &spec.dist else { return Ok(mine) };
    let sig = d.max_u64(mine.map_or(0, |s| s as u64));
    let requested = (sig > 0).then_some(sig as i32);
    if requested.is_some() || due(step, spec.check_every, spec.options.steps) {
        check_weights(&**d, step, params)?;
    }
    Ok(requested)
}

/// The `best/` an earlier part of a resumed run left in its directory, with the periodic
/// validation that chose it; `None` when there is none or it was measured on another number of
/// windows (then this run's first validation starts a new `best/`).
fn earlier_best<T: Token>(spec: &RunSpec, val_data: &[T]) -> Option<(PathBuf, EvalResult)> {
    let o = &spec.options;
    let (loss, eval_windows) = checkpoint::best_val_loss(&spec.out)?;
    if eval_windows != o.eval_windows {
        return None;
    }
    let windows: Vec<_> = crate::data::sampler::token_windows(val_data, o.context, o.eval_windows).collect();
    let bytes = match spec.byte_lens() {
        None => (windows.len() * o.context) as u64,
        Some(lens) => windows.iter().flat_map(|(_, y)| y.iter()).map(|&t| u64::from(lens[t.id() as usize])).sum(),
    };
    let n = windows.len();
    let val = EvalResult { loss: f64::from(loss), windows: n, tokens: n * o.context, bytes };
    Some((spec.out.join(checkpoint::BEST_DIR), val))
}

/// The trainer and sampler the run starts from, and the step it starts after: the resumed
/// checkpoint's weights, optimizer state and sampler, or a fresh model and sampler from the seed.
fn start(spec: &RunSpec, train_len: usize) -> Result<(Trainer, BatchSampler, u64)> {
    let o = &spec.options;
    let (model, sampler, start_step) = match &spec.resume {
        Some(c) => {
            let sampler = BatchSampler::from_state(&c.state.sampler, train_len, o.context)
                .map_err(|e| e.context(c.dir.join(checkpoint::STATE_FILE).display()))?;
            (c.model.clone(), sampler, c.state.step)
        }
        None => {
            let model = spec.init.clone().unwrap_or_else(|| Model::new(spec.model_config, o.seed));
            (model, BatchSampler::new(sampler_seed(o.seed), train_len, o.context), 0)
        }
    };
    let opts = o.trainer_options(spec.inject_nan.clone(), &model.layout);
    let mut trainer = match &spec.dist {
        Some(d) => Trainer::new_distributed(model, o.batch, o.context, opts, Arc::clone(d))?,
        None => Trainer::new(model, o.batch, o.context, opts)?,
    };
    if let Some(c) = &spec.resume {
        trainer.set_adam_state(&c.adam_m, &c.adam_v, c.state.adam_t)?;
        trainer.set_step(start_step);
    }
    Ok((trainer, sampler, start_step))
}

/// What `state.json` records about the data of the run.
fn data_record(spec: &RunSpec, train_len: usize, val_len: usize) -> DataRecord {
    let bytes = spec.corpus.len() as u64;
    let (train_bytes, val_bytes, tokens) = match &spec.tokens {
        None => (train_len as u64, val_len as u64, None),
        Some(t) => {
            let train_bytes = t.bytes_of(t.ids.slice().prefix(train_len)).min(bytes);
            let rec = TokensRecord {
                tokenizer_sha256: t.tokenizer.sha256().to_string(),
                tokens: t.ids.len() as u64,
                train_tokens: train_len as u64,
                val_tokens: val_len as u64,
            };
            (train_bytes, bytes - train_bytes, Some(rec))
        }
    };
    DataRecord {
        name: spec.corpus.name.clone(),
        path: spec.data_path.as_ref().map(|p| p.display().to_string()),
        format: spec.corpus.format,
        sha256: spec.corpus.hash.clone(),
        bytes,
        train_bytes,
        val_bytes,
        tokens,
    }
}

/// Writes the run's checkpoints: what stays the same through the run, plus the step's state.
struct Saver<'a> {
    spec: &'a RunSpec,
    data: DataRecord,
}

impl Saver<'_> {
    /// Saves the checkpoint of `step` (see [`checkpoint::save`]) and prunes old ones down to
    /// `--keep`, or, with `best`, replaces `best/` ([`checkpoint::save_best`]); returns its
    /// directory.
    fn save(
        &self,
        trainer: &Trainer,
        sampler: &BatchSampler,
        step: u64,
        loss: f32,
        val_loss: Option<f64>,
        best: bool,
    ) -> Result<PathBuf> {
        let spec = self.spec;
        let (m, v, adam_t) = trainer.adam_state();
        let model = Model::from_params(spec.model_config, trainer.params().to_vec())?;
        let state = self.state(step, adam_t, sampler, loss, val_loss);
        let tokenizer = spec.tokens.as_ref().map(|t| &t.tokenizer);
        let files = checkpoint::Files { model: &model, adam_m: m, adam_v: v, tokenizer };
        if best {
            return checkpoint::save_best(&spec.out, state, files);
        }
        let dir = checkpoint::save(&spec.out, state, files)?;
        checkpoint::prune(&spec.out, spec.options.keep)?;
        Ok(dir)
    }

    /// Publishes `best`, just saved at `step`, also as that step's checkpoint (hard links,
    /// [`checkpoint::save_linked`]) and prunes as [`Saver::save`] does; `None` where the
    /// filesystem has no hard links.
    fn link(&self, best: &Path, step: u64) -> Result<Option<PathBuf>> {
        let dir = checkpoint::save_linked(&self.spec.out, best, step)?;
        if dir.is_some() {
            checkpoint::prune(&self.spec.out, self.spec.options.keep)?;
        }
        Ok(dir)
    }

    /// The `state.json` of the checkpoint of `step` (its checksums are filled in by the save).
    fn state(&self, step: u64, adam_t: u64, sampler: &BatchSampler, loss: f32, val_loss: Option<f64>) -> TrainState {
        let spec = self.spec;
        TrainState {
            format_version: checkpoint::FORMAT_VERSION,
            step,
            adam_t,
            sampler: sampler.state(),
            model_config: spec.model_config,
            options: spec.options.clone(),
            data: self.data.clone(),
            loss: Some(loss),
            val_loss: val_loss.map(|v| v as f32),
            cllm_version: checkpoint::VERSION.to_string(),
            git_commit: checkpoint::GIT_COMMIT.to_string(),
            command_line: spec.command_line.clone(),
            created_unix: checkpoint::unix_now(),
            files: Default::default(),
            self_sha256: String::new(),
        }
    }
}
