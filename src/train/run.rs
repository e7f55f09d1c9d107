//! The training loop: data, trainer, learning-rate schedule, evaluation, checkpoints, metrics
//! and progress, as driven by `cllm train`.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use super::{ClipMode, StepReport, Strategy, Trainer, TrainerOptions, WorkerTiming};
use crate::checkpoint::{self, Checkpoint, DataRecord, RunOptions, TrainState};
use crate::config::ModelConfig;
use crate::data::{BatchSampler, Corpus};
use crate::error::Result;
use crate::model::{gpt::forward_with_layout, Activations, Model, PackedWeights, ParamLayout};

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
    std::thread::scope(|s| {
        // Batch k goes to thread k % threads, each thread owning its activations and the
        // slots of its batches.
        let mut slots: Vec<Vec<(usize, &mut f64)>> = (0..threads).map(|_| Vec::new()).collect();
        for (k, slot) in sums.iter_mut().enumerate() {
            slots[k % threads].push((k, slot));
        }
        for mine in slots {
            let (layout, batches) = (&layout, &batches);
            s.spawn(move || {
                let mut acts = Activations::new(config, EVAL_BATCH, t);
                let mut packed = PackedWeights::new(layout);
                packed.pack(layout, params);
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
                        forward_with_layout(layout, params, Some(&packed), &mut acts, &inputs, Some(&targets), b, t);
                    *slot = f64::from(mean) * (b * t) as f64;
                }
            });
        }
    });
    let tokens = windows.len() * t;
    let total: f64 = sums.iter().sum();
    Ok(EvalResult { loss: total / tokens as f64, windows: windows.len(), tokens })
}

// ---------------------------------------------------------------------------------------------
// The training loop

/// The smallest learning rate of the cosine schedule, as a fraction of the peak.
pub const MIN_LR_RATIO: f64 = 0.1;
/// How the learning rate evolves after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LrSchedule {
    /// The peak rate until the end
    Constant,
    /// Half a cosine from the peak down to a tenth of it at the last step
    Cosine,
}

impl LrSchedule {
    pub fn as_str(self) -> &'static str {
        match self {
            LrSchedule::Constant => "constant",
            LrSchedule::Cosine => "cosine",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(LrSchedule::Constant),
            "cosine" => Ok(LrSchedule::Cosine),
            _ => crate::bail!("unknown learning-rate schedule {s:?} (expected constant or cosine)"),
        }
    }
}

/// The learning rate of `step` (counted from 1) in a run of `total` steps: a function of
/// nothing else, so a resumed run follows the same schedule as an uninterrupted one.
pub fn lr_at(schedule: LrSchedule, peak: f64, min_ratio: f64, warmup: u64, step: u64, total: u64) -> f64 {
    if warmup > 0 && step <= warmup {
        return peak * step as f64 / warmup as f64;
    }
    match schedule {
        LrSchedule::Constant => peak,
        LrSchedule::Cosine => {
            let span = total.saturating_sub(warmup).max(1) as f64;
            let progress = ((step - warmup.min(step)) as f64 / span).clamp(0.0, 1.0);
            let min = peak * min_ratio;
            min + (peak - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

/// How progress is shown while training.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// A progress bar on stderr (stderr is a terminal).
    Bar,
    /// Plain lines on stderr every tenth of the run, for logs.
    Lines,
    /// Nothing (`--quiet`, and the library default).
    Silent,
}

/// Everything one run needs, resolved and validated by the caller.
pub struct RunSpec {
    pub model_config: ModelConfig,
    pub options: RunOptions,
    pub corpus: Corpus,
    /// Absolute path of the data file (`None`: the built-in corpus), recorded for resuming.
    pub data_path: Option<PathBuf>,
    /// The run directory receiving `step-NNNNNN` checkpoints (created if missing).
    pub out: PathBuf,
    /// The checkpoint to continue from.
    pub resume: Option<Checkpoint>,
    /// JSON-lines metrics file (appended to when resuming).
    pub metrics: Option<PathBuf>,
    /// `(step, microbatch)` gradients to poison with NaN.
    pub inject_nan: Vec<(u64, usize)>,
    pub progress: Progress,
    /// Recorded in every checkpoint.
    pub command_line: Vec<String>,
}

/// What a finished run reports.
pub struct RunSummary {
    /// The step the run ended at (= the total).
    pub last_step: u64,
    /// Steps taken by this process (fewer than `last_step` when resumed).
    pub steps_run: u64,
    pub final_loss: Option<f32>,
    pub val_loss: Option<f64>,
    /// Training tokens per second of step time.
    pub tokens_per_s: f64,
    /// Wall time of the whole run, evaluation and checkpoints included.
    pub elapsed_s: f64,
    /// Steps whose update was skipped for non-finite gradients.
    pub skipped_updates: u64,
    /// The last checkpoint written.
    pub checkpoint: PathBuf,
    /// The final weights.
    pub model: Model,
}

/// The sampler's seed: derived from the run seed, but not equal to it, so the batch stream is
/// not the model initialisation's stream (both are seeded through SplitMix64).
pub fn sampler_seed(seed: u64) -> u64 {
    seed ^ 0xDA7A_5A3B_1E55_EED5
}

/// Trains according to `spec`, writing checkpoints, metrics and progress.
pub fn train(spec: &RunSpec) -> Result<RunSummary> {
    let started = Instant::now();
    let o = &spec.options;
    let schedule = LrSchedule::parse(&o.lr_schedule)?;
    let (train_data, val_data) = spec.corpus.split(o.val_fraction, o.context)?;
    let data_record = DataRecord {
        name: spec.corpus.name.clone(),
        path: spec.data_path.as_ref().map(|p| p.display().to_string()),
        format: spec.corpus.format.as_str().to_string(),
        sha256: spec.corpus.hash.clone(),
        bytes: spec.corpus.len() as u64,
        train_bytes: train_data.len() as u64,
        val_bytes: val_data.len() as u64,
    };

    let (model, mut sampler, start_step, adam) = match &spec.resume {
        Some(c) => {
            let sampler = BatchSampler::from_state(&c.state.sampler, train_data.len(), o.context)
                .map_err(|e| e.context(c.dir.join(checkpoint::STATE_FILE).display()))?;
            (c.model.clone(), sampler, c.state.step, Some((c.adam_m.clone(), c.adam_v.clone(), c.state.adam_t)))
        }
        None => (
            Model::new(spec.model_config, o.seed),
            BatchSampler::new(sampler_seed(o.seed), train_data.len(), o.context),
            0,
            None,
        ),
    };
    let trainer_opts = trainer_options(o, &spec.inject_nan)?;
    let mut trainer = Trainer::new(model, o.batch, o.context, trainer_opts)?;
    if let Some((m, v, t)) = adam {
        trainer.set_adam_state(&m, &v, t)?;
        trainer.set_step(start_step);
    }

    checkpoint::remove_stale_temps(&spec.out);
    let mut metrics = match &spec.metrics {
        Some(p) => Some(MetricsWriter::open(p, spec.resume.is_some())?),
        None => None,
    };
    let mut ui = Ui::new(spec.progress, start_step, o.steps);
    let tokens_per_step = (o.batch * o.context) as u64;
    let mut inputs = Vec::with_capacity(o.batch * o.context);
    let mut targets = Vec::with_capacity(o.batch * o.context);
    let mut last_loss = None;
    let mut last_val = spec.resume.as_ref().and_then(|c| c.state.val_loss.map(f64::from));
    let mut skipped_updates = 0u64;
    let mut step_time = Duration::ZERO;
    let mut last_checkpoint = None;
    for step in start_step + 1..=o.steps {
        sampler.next_batch(train_data, o.batch, o.context, &mut inputs, &mut targets);
        let lr = lr_at(schedule, o.lr, o.min_lr_ratio, o.warmup_steps, step, o.steps);
        let t0 = Instant::now();
        let report = trainer.step(&inputs, &targets, lr as f32).map_err(|e| e.context(format!("step {step}")))?;
        let dt = t0.elapsed();
        step_time += dt;
        last_loss = Some(report.loss);
        if report.update_skipped {
            skipped_updates += 1;
        }
        let is_last = step == o.steps;
        let val_loss = if !val_data.is_empty() && (is_last || (o.eval_every > 0 && step.is_multiple_of(o.eval_every))) {
            let r = evaluate(&spec.model_config, trainer.params(), val_data, o.context, o.eval_windows, o.threads)?;
            last_val = Some(r.loss);
            Some(r.loss)
        } else {
            None
        };
        let tokens_per_s = tokens_per_step as f64 / dt.as_secs_f64().max(1e-9);
        if let Some(m) = metrics.as_mut() {
            m.write(&step_metrics(&report, step, lr, val_loss, tokens_per_s, dt))?;
        }
        ui.step(step, &report, lr, val_loss, tokens_per_s);
        if is_last || (o.save_every > 0 && step.is_multiple_of(o.save_every)) {
            let (m, v, t) = trainer.adam_state();
            let model = Model::from_params(spec.model_config, trainer.params().to_vec())?;
            let state = TrainState {
                format_version: checkpoint::FORMAT_VERSION,
                step,
                adam_t: t,
                sampler: sampler.state(),
                model_config: spec.model_config,
                options: o.clone(),
                data: data_record.clone(),
                loss: Some(report.loss),
                val_loss: last_val.map(|v| v as f32),
                cllm_version: checkpoint::VERSION.to_string(),
                git_commit: checkpoint::GIT_COMMIT.to_string(),
                command_line: spec.command_line.clone(),
                created_unix: checkpoint::unix_now(),
                files: Default::default(),
                self_sha256: String::new(),
            };
            let dir = checkpoint::save(&spec.out, state, &model, m, v)?;
            checkpoint::prune(&spec.out, o.keep)?;
            ui.saved(&dir);
            last_checkpoint = Some(dir);
        }
    }
    ui.finish();
    let steps_run = o.steps - start_step;
    let checkpoint = last_checkpoint.ok_or_else(|| crate::err!("no step was run: already at step {start_step}"))?;
    Ok(RunSummary {
        last_step: o.steps,
        steps_run,
        final_loss: last_loss,
        val_loss: last_val,
        tokens_per_s: (steps_run * tokens_per_step) as f64 / step_time.as_secs_f64().max(1e-9),
        elapsed_s: started.elapsed().as_secs_f64(),
        skipped_updates,
        checkpoint,
        model: Model::from_params(spec.model_config, trainer.params().to_vec())?,
    })
}

/// One line of the `--metrics` file. Field order is the order in the file.
#[derive(Serialize)]
struct StepMetrics<'a> {
    step: u64,
    loss: f32,
    /// Present (not null) on steps where the validation loss was computed.
    val_loss: Option<f64>,
    lr: f64,
    grad_norm: f32,
    max_sphere_norm: f32,
    clipped: bool,
    skipped_spheres: &'a [usize],
    bad_values: &'a [(usize, usize, f32)],
    update_skipped: bool,
    adam_t: u64,
    tokens_per_s: f64,
    step_ms: f64,
    /// Worker time in each phase, summed over the workers.
    compute_ms: f64,
    reduce_ms: f64,
    optimizer_ms: f64,
    wait_ms: f64,
}

fn step_metrics(
    r: &StepReport,
    step: u64,
    lr: f64,
    val_loss: Option<f64>,
    tokens_per_s: f64,
    dt: Duration,
) -> StepMetrics<'_> {
    let ms = |f: fn(&WorkerTiming) -> Duration| r.timings.total(f).as_secs_f64() * 1e3;
    StepMetrics {
        step,
        loss: r.loss,
        val_loss,
        lr,
        grad_norm: r.grad_norm,
        max_sphere_norm: r.max_sphere_norm,
        clipped: r.clipped,
        skipped_spheres: &r.skipped_spheres,
        bad_values: &r.bad_values,
        update_skipped: r.update_skipped,
        adam_t: r.adam_t,
        tokens_per_s,
        step_ms: dt.as_secs_f64() * 1e3,
        compute_ms: ms(|w| w.compute),
        reduce_ms: ms(|w| w.reduce),
        optimizer_ms: ms(|w| w.optimizer),
        wait_ms: ms(|w| w.barrier_wait + w.lock_wait),
    }
}

/// One JSON object per line; flushed every line so a killed run leaves whole lines.
struct MetricsWriter {
    path: PathBuf,
    file: BufWriter<File>,
}

impl MetricsWriter {
    fn open(path: &Path, append: bool) -> Result<Self> {
        if path.is_dir() {
            crate::bail!("--metrics {}: is a directory", path.display());
        }
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(path)
            .map_err(|e| crate::err!("cannot open {}: {e}", path.display()))?;
        Ok(MetricsWriter { path: path.to_path_buf(), file: BufWriter::new(file) })
    }

    fn write(&mut self, v: &impl Serialize) -> Result<()> {
        let mut line = serde_json::to_string(v)?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|e| crate::err!("cannot write {}: {e}", self.path.display()))
    }
}

/// Progress output on stderr.
struct Ui {
    mode: Progress,
    bar: Option<ProgressBar>,
    total: u64,
    every: u64,
    started: Instant,
    start_step: u64,
}

impl Ui {
    fn new(mode: Progress, start_step: u64, total: u64) -> Self {
        let bar = (mode == Progress::Bar).then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style =
                ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_position(start_step);
            bar.reset_eta();
            bar
        });
        Ui { mode, bar, total, every: (total / 10).max(1), started: Instant::now(), start_step }
    }

    fn step(&mut self, step: u64, r: &StepReport, lr: f64, val: Option<f64>, tokens_per_s: f64) {
        let warn = if r.update_skipped {
            Some(format!("step {step}: update skipped (non-finite gradients in spheres {:?})", r.skipped_spheres))
        } else if !r.skipped_spheres.is_empty() {
            Some(format!("step {step}: spheres {:?} skipped (non-finite gradients)", r.skipped_spheres))
        } else {
            None
        };
        match self.mode {
            Progress::Silent => {}
            Progress::Bar => {
                if let Some(bar) = &self.bar {
                    if let Some(w) = warn {
                        bar.println(w);
                    }
                    if let Some(v) = val {
                        bar.println(format!("step {step}: val loss {v:.4}"));
                    }
                    bar.set_message(format!("loss {:.4} | lr {lr:.2e} | {:.0} tok/s", r.loss, tokens_per_s));
                    bar.set_position(step);
                }
            }
            Progress::Lines => {
                if let Some(w) = warn {
                    eprintln!("{w}");
                }
                if step.is_multiple_of(self.every) || step == self.total || val.is_some() {
                    let done = (step - self.start_step) as f64;
                    let left = (self.total - step) as f64;
                    let eta = self.started.elapsed().as_secs_f64() / done.max(1.0) * left;
                    let val = val.map(|v| format!(" | val loss {v:.4}")).unwrap_or_default();
                    eprintln!(
                        "step {step}/{} | loss {:.4}{val} | lr {lr:.2e} | {:.0} tok/s | eta {}",
                        self.total,
                        r.loss,
                        tokens_per_s,
                        format_secs(eta)
                    );
                }
            }
        }
    }

    fn saved(&self, dir: &Path) {
        match self.mode {
            Progress::Silent => {}
            Progress::Bar => {
                if let Some(bar) = &self.bar {
                    bar.println(format!("saved {}", dir.display()));
                }
            }
            Progress::Lines => eprintln!("saved {}", dir.display()),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

fn format_secs(s: f64) -> String {
    let s = s.round() as u64;
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

// ---------------------------------------------------------------------------------------------
// The trainer's settings, by their command-line names

/// Parses a `--strategy` name.
pub fn parse_strategy(s: &str) -> Result<Strategy> {
    s.parse()
}

/// Parses a `--clip-mode` name.
pub fn parse_clip_mode(s: &str) -> Result<ClipMode> {
    s.parse()
}

/// The trainer's default strategy, by name.
pub fn default_strategy() -> String {
    Strategy::default().to_string()
}

/// The trainer's default clip mode, by name.
pub fn default_clip_mode() -> String {
    ClipMode::default().to_string()
}

/// Checks that a checkpoint's optimizer state fits its model before any work starts.
pub fn check_adam_state(c: &Checkpoint) -> Result<()> {
    let n = c.model.params.len();
    if c.adam_m.len() != n || c.adam_v.len() != n {
        crate::bail!(
            "{}: optimizer state has {} values, the model {n}",
            c.dir.join(checkpoint::OPTIM_FILE).display(),
            c.adam_m.len()
        );
    }
    Ok(())
}

fn trainer_options(o: &RunOptions, inject_nan: &[(u64, usize)]) -> Result<TrainerOptions> {
    Ok(TrainerOptions {
        threads: o.threads,
        spheres: o.spheres,
        strategy: parse_strategy(&o.strategy)?,
        clip_norm: o.clip_norm,
        clip_mode: parse_clip_mode(&o.clip_mode)?,
        inject_nan: inject_nan.to_vec(),
        ..TrainerOptions::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_rises_linearly_to_the_peak() {
        let lr = |s| lr_at(LrSchedule::Cosine, 1.0, 0.1, 4, s, 10);
        assert_eq!([lr(1), lr(2), lr(4)], [0.25, 0.5, 1.0]);
    }

    #[test]
    fn cosine_ends_at_the_minimum_on_the_last_step() {
        assert!((lr_at(LrSchedule::Cosine, 2.0, 0.1, 2, 10, 10) - 0.2).abs() < 1e-12);
    }

    #[test]
    fn cosine_is_halfway_at_the_middle_of_the_decay() {
        assert!((lr_at(LrSchedule::Cosine, 1.0, 0.0, 0, 5, 10) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn constant_stays_at_the_peak_after_warmup() {
        assert_eq!(lr_at(LrSchedule::Constant, 0.3, 0.1, 2, 9, 10), 0.3);
    }

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
