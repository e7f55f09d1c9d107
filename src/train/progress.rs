//! What a run shows while it trains: progress on stderr (a bar on a terminal, plain lines in a
//! log, or nothing) and the `--metrics` file, one JSON object per step (plus one
//! `{"step", "sample"}` object after a step's `--sample-every` sample).
//!
//! Every validation figure is shown with the number of windows it covers, and the metrics
//! lines carry `val_windows` and `val_tokens` beside `val_loss`.
//!
//! Neither feeds back into training: they only read the step reports, so the weights are the
//! same whatever is shown.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use super::eval::EvalResult;
use super::{StepReport, WorkerTiming};
use crate::error::Result;

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

/// One finished step, as shown on stderr and written to the metrics file.
pub(crate) struct StepOutcome<'a> {
    pub step: u64,
    pub report: &'a StepReport,
    pub lr: f64,
    /// The periodic validation, on the steps where it was computed.
    pub val: Option<EvalResult>,
    /// Wall time of the step (the trainer's `step` call).
    pub dt: Duration,
    pub tokens_per_s: f64,
}

/// Everything a run shows and records while it trains.
pub(crate) struct Reporter {
    ui: Ui,
    metrics: Option<MetricsWriter>,
}

impl Reporter {
    /// Opens the metrics file and sets up the progress display of a run from `start_step` to
    /// `total`. When `append` (resuming), the file keeps its lines up to `start_step` and loses
    /// those after it (logged by a run killed past its last checkpoint, and about to be logged
    /// again), so every step appears once.
    pub(crate) fn new(
        mode: Progress,
        metrics: Option<&Path>,
        append: bool,
        start_step: u64,
        total: u64,
    ) -> Result<Self> {
        let metrics = match metrics {
            Some(p) => Some(MetricsWriter::open(p, append.then_some(start_step))?),
            None => None,
        };
        Ok(Reporter { ui: Ui::new(mode, start_step, total), metrics })
    }

    /// Records a step in the metrics file, then shows it.
    pub(crate) fn step(&mut self, s: &StepOutcome<'_>) -> Result<()> {
        self.record(&step_metrics(s));
        self.ui.step(s);
        Ok(())
    }

    /// Writes one metrics line. A failed write (a full disk, a file-size limit) is not worth
    /// the run: it warns once and stops the metrics, and training goes on.
    fn record(&mut self, v: &impl Serialize) {
        if let Some(Err(e)) = self.metrics.as_mut().map(|m| m.write(v)) {
            self.ui.warn(&format!("warning: {e}; no more metrics are written, training goes on"));
            self.metrics = None;
        }
    }

    /// Shows that a checkpoint was written.
    pub(crate) fn saved(&self, dir: &Path) {
        self.ui.line(&format!("saved {}", dir.display()));
    }

    /// Shows that `best/` now holds the checkpoint of `step`, chosen on validation `val`.
    pub(crate) fn saved_best(&self, dir: &Path, step: u64, val: &EvalResult) {
        self.ui.line(&format!("saved {} (step {step}, {})", dir.display(), val_text(val)));
    }

    /// Shows the `--sample-every` sample of `step` (escaped onto one line) and records it in
    /// the metrics file (bytes that are not UTF-8 become U+FFFD there).
    pub(crate) fn sample(&mut self, step: u64, bytes: &[u8]) -> Result<()> {
        let text = String::from_utf8_lossy(bytes);
        self.record(&SampleLine { step, sample: &text });
        self.ui.line(&format!("step {step} sample: \"{}\"", bytes.escape_ascii()));
        Ok(())
    }

    /// Ends the progress bar, if any.
    pub(crate) fn finish(&self) {
        self.ui.finish();
    }
}

/// The metrics line of a `--sample-every` sample.
#[derive(Serialize)]
struct SampleLine<'a> {
    step: u64,
    sample: &'a str,
}

/// One line of the `--metrics` file. Field order is the order in the file.
#[derive(Serialize)]
struct StepMetrics<'a> {
    step: u64,
    loss: f32,
    /// Present (not null) on steps where the validation loss was computed, with the windows
    /// and predicted bytes it covers.
    val_loss: Option<f64>,
    val_windows: Option<usize>,
    val_tokens: Option<usize>,
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
    /// segmented: merging sibling sub-trees of the summation tree (not part of `compute_ms`).
    merge_ms: f64,
    reduce_ms: f64,
    optimizer_ms: f64,
    wait_ms: f64,
}

fn step_metrics<'a>(s: &StepOutcome<'a>) -> StepMetrics<'a> {
    let r = s.report;
    let ms = |f: fn(&WorkerTiming) -> Duration| r.timings.total(f).as_secs_f64() * 1e3;
    StepMetrics {
        step: s.step,
        loss: r.loss,
        val_loss: s.val.map(|v| v.loss),
        val_windows: s.val.map(|v| v.windows),
        val_tokens: s.val.map(|v| v.tokens),
        lr: s.lr,
        grad_norm: r.grad_norm,
        max_sphere_norm: r.max_sphere_norm,
        clipped: r.clipped,
        skipped_spheres: &r.skipped_spheres,
        bad_values: &r.bad_values,
        update_skipped: r.update_skipped,
        adam_t: r.adam_t,
        tokens_per_s: s.tokens_per_s,
        step_ms: s.dt.as_secs_f64() * 1e3,
        compute_ms: ms(|w| w.compute),
        merge_ms: ms(|w| w.merge),
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
    /// Opens `path` anew, or, resuming after `resume_step`, keeps only its lines up to that step.
    fn open(path: &Path, resume_step: Option<u64>) -> Result<Self> {
        if path.is_dir() {
            crate::bail!("--metrics {}: is a directory", path.display());
        }
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(resume_step.is_none())
            .open(path)
            .map_err(|e| crate::err!("cannot open {}: {e}", path.display()))?;
        let mut file = file;
        if let Some(step) = resume_step {
            let keep = lines_up_to(&file, step).map_err(|e| crate::err!("cannot read {}: {e}", path.display()))?;
            file.set_len(keep)
                .and_then(|()| file.seek(SeekFrom::End(0)).map(|_| ()))
                .map_err(|e| crate::err!("cannot truncate {}: {e}", path.display()))?;
        }
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

/// The length of the leading lines of a metrics file that belong to steps up to `step`: it
/// ends before the first line of a later step, or one that is not a whole JSON object with a
/// `step` (the torn last line of a killed run). Read line by line, never whole.
fn lines_up_to(file: &File, step: u64) -> std::io::Result<u64> {
    let mut reader = BufReader::new(file);
    reader.seek(SeekFrom::Start(0))?;
    let (mut keep, mut line) = (0u64, Vec::new());
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        let line_step = serde_json::from_slice::<StepOnly>(&line).ok().map(|l| l.step);
        if n == 0 || !line.ends_with(b"\n") || line_step.is_none_or(|s| s > step) {
            return Ok(keep);
        }
        keep += n as u64;
    }
}

/// The `step` of a metrics line (a step line or a sample line).
#[derive(serde::Deserialize)]
struct StepOnly {
    step: u64,
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

    fn step(&mut self, s: &StepOutcome<'_>) {
        let StepOutcome { step, report: r, lr, val, tokens_per_s, .. } = *s;
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
                    if let Some(v) = &val {
                        bar.println(format!("step {step}: {}", val_text(v)));
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
                    let val = val.map(|v| format!(" | {}", val_text(&v))).unwrap_or_default();
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

    /// A line between the progress updates.
    fn line(&self, text: &str) {
        match self.mode {
            Progress::Silent => {}
            Progress::Bar => {
                if let Some(bar) = &self.bar {
                    bar.println(text);
                }
            }
            Progress::Lines => eprintln!("{text}"),
        }
    }

    /// A warning: shown in every mode, `--quiet` included.
    fn warn(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// A validation figure as shown everywhere: `val loss 1.6484 (32 windows)`.
pub fn val_text(v: &EvalResult) -> String {
    format!("val loss {:.4} ({} windows)", v.loss, v.windows)
}

fn format_secs(s: f64) -> String {
    let s = s.round() as u64;
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}
