//! What `cllm train` prints: the `--dry-run` plan (text, or JSON with `--json`), the final
//! summary and sample, and the one line of an interrupted run.

use std::path::Path;

use serde::Serialize;

use super::super::generate::{DEFAULT_TEMPERATURE, DEFAULT_TOP_K};
use super::super::{write_stdout, CliResult, Failure};
use super::{Plan, TrainArgs, DEFAULT_SAMPLE_EVERY, SAMPLE_BYTES};
use crate::checkpoint;
use crate::generate::SampleOptions;
use crate::signals;
use crate::train::progress::val_text;
use crate::train::run::{RunSpec, RunSummary};

/// The one line an interrupted run prints: where it stopped, the checkpoint it leaves, the
/// command that resumes it; then the exit status of the signal (130, 143, 129).
pub(super) fn report_interrupt(plan: &Plan, sum: &RunSummary, sig: i32, args: &TrainArgs) -> CliResult {
    let name = signals::signal_name(sig);
    let (step, total) = (sum.last_step, plan.spec.options.steps);
    // The newest checkpoint of the run: this process's last one, else the one it resumed.
    let newest = sum.checkpoint.clone().or_else(|| plan.spec.resume.as_ref().map(|c| c.dir.clone()));
    let saved_here = newest.as_deref().and_then(|d| d.file_name()?.to_str().and_then(checkpoint::parse_step_dir_name));
    let line = match &newest {
        Some(dir) if saved_here == Some(step) => format!(
            "interrupted by {name} at step {step} of {total}: checkpoint {}; resume with: {}",
            dir.display(),
            resume_command(dir, args)
        ),
        Some(dir) => format!(
            "interrupted by {name} at step {step} of {total}: step {step} not saved (--no-save-on-interrupt); newest \
             checkpoint {}; resume with: {}",
            dir.display(),
            resume_command(dir, args)
        ),
        None => {
            format!("interrupted by {name} at step {step} of {total}: no checkpoint written (--no-save-on-interrupt)")
        }
    };
    eprintln!("{line}");
    Err(Failure::silent(signals::exit_code(sig) as u8))
}

/// `PROGRAM train --resume DIR`, plus the flags a checkpoint does not record but the run used
/// (`--metrics`), each a shell word.
fn resume_command(dir: &Path, args: &TrainArgs) -> String {
    let mut words = vec![program_name(), "train".into(), "--resume".into(), dir.display().to_string()];
    if let Some(m) = &args.metrics {
        words.extend(["--metrics".into(), m.display().to_string()]);
    }
    words.iter().map(|w| shell_word(w)).collect::<Vec<_>>().join(" ")
}

pub(super) fn print_plan(plan: &Plan, json: bool) -> CliResult {
    let text = if json {
        let mut obj = plan_json(&plan.spec)?;
        obj["memory"] = serde_json::to_value(plan.memory).map_err(crate::Error::from)?;
        format!("{obj}\n")
    } else {
        plan_text(&plan.spec)? + &plan.memory.text()
    };
    write_stdout(text.as_bytes())
}

/// `--dry-run --json`: one object with every setting the run would use.
fn plan_json(s: &RunSpec) -> CliResult<serde_json::Value> {
    let o = &s.options;
    let (train, val) = s.split_lens()?;
    Ok(serde_json::json!({
        "config": o.config_name,
        "model": s.model_config,
        "params": s.model_config.num_params(),
        "context": o.context,
        "batch": o.batch,
        "spheres": o.spheres,
        "threads": o.threads,
        "strategy": o.strategy,
        "tokens_per_step": o.batch * o.context,
        "start_step": s.resume.as_ref().map(|c| c.state.step).unwrap_or(0),
        "steps": o.steps,
        "lr": o.lr,
        "lr_schedule": o.lr_schedule,
        "min_lr_ratio": o.min_lr_ratio,
        "warmup_steps": o.warmup_steps,
        "clip_norm": o.clip_norm,
        "clip_mode": o.clip_mode,
        "weight_decay": o.weight_decay,
        "decay_embeddings": o.decay_embeddings,
        "dropout": o.dropout,
        "seed": o.seed,
        "data": s.corpus.name,
        "data_format": s.corpus.format,
        "data_bytes": s.corpus.len(),
        "train_bytes": if s.tokens.is_none() { Some(train) } else { None },
        "val_bytes": if s.tokens.is_none() { Some(val) } else { None },
        "tokenizer": s.tokens.as_ref().map(|t| t.tokenizer.sha256()),
        "tokens": s.tokens.as_ref().map(|t| t.ids.len()),
        "train_tokens": train,
        "val_tokens": val,
        "val_fraction": o.val_fraction,
        "eval_every": o.eval_every,
        "eval_windows": o.eval_windows,
        "sample_every": s.samples.as_ref().map_or(DEFAULT_SAMPLE_EVERY, |x| x.every),
        "save_every": o.save_every,
        "keep": o.keep,
        "out": s.out.display().to_string(),
        "resume": s.resume.as_ref().map(|c| c.dir.display().to_string()),
    }))
}

/// `--dry-run`: the plan for a person.
fn plan_text(s: &RunSpec) -> CliResult<String> {
    let o = &s.options;
    let (train, val) = s.split_lens()?;
    let c = &s.model_config;
    let start = s.resume.as_ref().map(|c| c.state.step).unwrap_or(0);
    let mut text = String::new();
    text.push_str("dry run: nothing trained, nothing written\n");
    text.push_str(&format!(
        "model     {} (layers {}, heads {}, embed {}, context {}), {} parameters\n",
        o.config_name,
        c.layers,
        c.heads,
        c.embed,
        c.context,
        c.num_params()
    ));
    match &s.tokens {
        None => text.push_str(&format!(
            "data      {} ({}), {} bytes: {train} train, {val} validation\n",
            s.corpus.name,
            s.corpus.format,
            s.corpus.len(),
        )),
        Some(t) => text.push_str(&format!(
            "data      {} ({}), {} bytes, {} tokens (tokenizer sha256 {}, vocabulary {}): {train} train, {val} \
             validation\n",
            s.corpus.name,
            s.corpus.format,
            s.corpus.len(),
            t.ids.len(),
            t.tokenizer.sha256(),
            t.tokenizer.vocab_size()
        )),
    }
    text.push_str(&format!(
        "batch     {} x {} = {} tokens/step, {} spheres, {} threads, strategy {}\n",
        o.batch,
        o.context,
        o.batch * o.context,
        o.spheres,
        o.threads,
        o.strategy
    ));
    text.push_str(&format!(
        "schedule  steps {}..={} of {}, lr {} {} with {} warmup steps, clip {} ({}), seed {}\n",
        start + 1,
        o.steps,
        o.steps,
        o.lr,
        o.lr_schedule,
        o.warmup_steps,
        o.clip_norm,
        o.clip_mode,
        o.seed
    ));
    text.push_str(&format!(
        "output    {} (save every {}, keep {}), validation every {} steps on {} windows\n",
        s.out.display(),
        o.save_every,
        o.keep,
        o.eval_every,
        o.eval_windows
    ));
    if let Some(r) = &s.resume {
        text.push_str(&format!("resume    from {} (step {})\n", r.dir.display(), r.state.step));
    }
    Ok(text)
}

/// `train --json` output, keys in this order.
#[derive(Serialize)]
struct SummaryJson {
    steps: u64,
    steps_run: u64,
    final_loss: Option<f32>,
    /// Over the whole validation split.
    val_loss: Option<f64>,
    val_windows: Option<usize>,
    val_tokens: Option<usize>,
    val_bits_per_byte: Option<f64>,
    tokens_per_s: f64,
    elapsed_s: f64,
    skipped_updates: u64,
    checkpoint: String,
    /// `best/`, chosen on the periodic validation (`best_val_windows` windows).
    best_checkpoint: Option<String>,
    best_val_loss: Option<f64>,
    best_val_windows: Option<usize>,
}

pub(super) fn print_summary(plan: &Plan, sum: &RunSummary, args: &TrainArgs) -> CliResult {
    let o = &plan.spec.options;
    if args.json {
        let obj = SummaryJson {
            steps: sum.last_step,
            steps_run: sum.steps_run,
            final_loss: sum.final_loss,
            val_loss: sum.val.map(|v| v.loss),
            val_windows: sum.val.map(|v| v.windows),
            val_tokens: sum.val.map(|v| v.tokens),
            val_bits_per_byte: sum.val.map(|v| v.bits_per_byte()),
            tokens_per_s: sum.tokens_per_s,
            elapsed_s: sum.elapsed_s,
            skipped_updates: sum.skipped_updates,
            checkpoint: checkpoint_dir(sum).display().to_string(),
            best_checkpoint: sum.best.as_ref().map(|(d, _)| d.display().to_string()),
            best_val_loss: sum.best.as_ref().map(|(_, v)| v.loss),
            best_val_windows: sum.best.as_ref().map(|(_, v)| v.windows),
        };
        let obj = serde_json::to_string(&obj).map_err(crate::Error::from)?;
        return write_stdout(format!("{obj}\n").as_bytes());
    }
    let val = match &sum.val {
        Some(v) => format!(", {}, {:.3} bits/byte", val_text(v), v.bits_per_byte()),
        None => String::new(),
    };
    let loss = sum.final_loss.map(|l| format!("{l:.4}")).unwrap_or_else(|| "n/a".into());
    let mut text = format!(
        "trained to step {} ({} steps in {:.1}s): loss {loss}{val}, {:.0} tokens/s\ncheckpoint: {}\n",
        sum.last_step,
        sum.steps_run,
        sum.elapsed_s,
        sum.tokens_per_s,
        checkpoint_dir(sum).display()
    );
    if let Some((dir, v)) = &sum.best {
        text.push_str(&format!("best: {} (lowest periodic {})\n", dir.display(), val_text(v)));
    }
    if sum.skipped_updates > 0 {
        text.push_str(&format!("note: {} updates were skipped for non-finite gradients\n", sum.skipped_updates));
    }
    if args.quiet {
        return write_stdout(text.as_bytes());
    }
    let opts =
        SampleOptions { tokens: SAMPLE_BYTES, temperature: DEFAULT_TEMPERATURE, top_k: DEFAULT_TOP_K, seed: o.seed };
    let unit = if plan.spec.tokens.is_some() { "tokens" } else { "bytes" };
    text.push_str(&format!(
        "sample ({SAMPLE_BYTES} {unit}, temperature {}, seed {}; more with: {} generate --checkpoint {} --prompt TEXT):\n",
        opts.temperature,
        opts.seed,
        shell_word(&program_name()),
        shell_word(&checkpoint_dir(sum).display().to_string())
    ));
    write_stdout(text.as_bytes())?;
    let prompt = b"\n";
    let sample = plan.spec.sample(&sum.model, prompt, opts)?;
    let mut bytes = sample;
    bytes.push(b'\n');
    write_stdout(&bytes)
}

/// The last checkpoint of a finished run (a run that reaches its total always saves at the end).
fn checkpoint_dir(sum: &RunSummary) -> &Path {
    sum.checkpoint.as_deref().unwrap_or(Path::new(""))
}

/// How this program was invoked (`argv[0]`): `cllm` when found on the PATH (after `cargo
/// install --path .`), `target/release/cllm` under `cargo run --release`. Either way, pasted
/// into the same shell in the same directory, it runs this binary again, which a bare `cllm`
/// would not without an install.
fn program_name() -> String {
    std::env::args_os().next().map(|a| a.to_string_lossy().into_owned()).unwrap_or_else(|| "cllm".into())
}

/// `s` as one POSIX shell word: as is when it holds only safe characters, else single-quoted.
fn shell_word(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./+=:@%,".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}
