//! The scaling report: its data (`scaling.json`), a markdown table with a paragraph per
//! strategy generated from the numbers (`scaling.md`), and a speed-up chart (`scaling.svg`).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use super::machine::{Ceiling, Machine};
use crate::error::Result;

/// Everything one `cllm bench` run measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub machine: Machine,
    /// The preset name.
    pub config: String,
    pub model: ModelInfo,
    /// Timed steps per cell (after `warmup` untimed ones).
    pub steps: usize,
    pub warmup: usize,
    /// 1-minute load average before and after the matrix (other work on the machine).
    pub load_average_before: Option<f64>,
    pub load_average_after: Option<f64>,
    /// Threads → speed-up of independent GEMMs, keyed by the thread count as a string.
    pub ceiling: serde_json::Map<String, serde_json::Value>,
    pub ceiling_gemm: Ceiling,
    pub cells: Vec<Cell>,
    pub created_unix: u64,
}

/// The shape that was trained.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelInfo {
    pub vocab: usize,
    pub layers: usize,
    pub heads: usize,
    pub embed: usize,
    pub context: usize,
    pub params: usize,
    pub batch: usize,
    pub seq: usize,
    pub tokens_per_step: usize,
}

/// One (strategy, threads) measurement.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Cell {
    pub strategy: String,
    pub threads: usize,
    pub median_step_ms: f64,
    pub min_step_ms: f64,
    pub max_step_ms: f64,
    pub tokens_per_s: f64,
    /// Over the 1-thread cell of the same strategy.
    pub speedup: f64,
    /// `speedup / min(threads, cores)`.
    pub efficiency: f64,
    /// `(user + sys) / (wall · min(threads, cores))` over the timed steps.
    pub cpu_utilization: f64,
    /// The machine ceiling at this thread count, and the speed-up as a fraction of it.
    pub ceiling_speedup: f64,
    pub speedup_vs_ceiling: f64,
    /// Fractions of the step's wall time, averaged over workers.
    pub compute_frac: f64,
    /// segmented: merging sibling sub-trees of the summation tree during the compute phase.
    pub merge_frac: f64,
    pub barrier_frac: f64,
    pub lock_wait_frac: f64,
    pub reduce_frac: f64,
    pub optimizer_frac: f64,
    /// What the six above leave: coordinator work, wake-up latency, idle workers.
    pub other_frac: f64,
    /// Lock acquisitions of all workers together, per step.
    pub lock_acquisitions_per_step: f64,
    /// Lock wait per step, averaged over workers (comparable to the step time).
    pub lock_wait_ms_per_step: f64,
    /// The process's peak resident set during this cell: the high-water mark is reset before
    /// the cell's trainer is built (`/proc/self/clear_refs`), so it is this cell's trainer plus
    /// what the process holds throughout (model, data); where the reset is not possible, the
    /// peak so far.
    pub peak_rss_mb: f64,
    /// Cores other processes kept busy during the timed steps (from /proc/stat): the noise
    /// floor of this cell. Anything near the core count makes its numbers meaningless.
    pub background_cores: f64,
    pub final_loss: f32,
}

/// The file names of one report in `dir`.
pub fn paths(dir: &Path) -> [PathBuf; 3] {
    [dir.join("scaling.json"), dir.join("scaling.md"), dir.join("scaling.svg")]
}

/// Writes the three files, each atomically.
pub fn write_all(dir: &Path, report: &Report) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| crate::err!("cannot create {}: {e}", dir.display()))?;
    let [json, md, svg] = paths(dir);
    let text = to_json(report)?;
    write_file(&json, text.as_bytes())?;
    write_file(&md, markdown(report).as_bytes())?;
    write_file(&svg, chart(report)?.as_bytes())?;
    Ok(())
}

pub fn to_json(report: &Report) -> Result<String> {
    Ok(serde_json::to_string_pretty(report)? + "\n")
}

pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::data::text::write_atomic(path, |w| {
        w.write_all(bytes).map_err(|e| crate::err!("cannot write {}: {e}", path.display()))
    })
}

/// The strategies in the order they were measured.
fn strategies(report: &Report) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for c in &report.cells {
        if !out.contains(&c.strategy.as_str()) {
            out.push(&c.strategy);
        }
    }
    out
}

fn pct(x: f64) -> String {
    format!("{:.0}%", 100.0 * x)
}

/// The report as markdown: the table, then what each strategy's split says about its number.
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    write_header(r, &mut s);
    write_table(r, &mut s);
    write_notes(r, &mut s);
    s
}

/// The report's opening paragraphs: model, machine, ceiling and background load.
fn write_header(r: &Report, s: &mut String) {
    let m = &r.model;
    let _ = writeln!(s, "# Scaling: `{}`\n", r.config);
    let _ = writeln!(
        s,
        "Model: {} layers, {} heads, width {}, context {} ({:.2} M parameters); batch {} x {} = {} tokens per step. \
         {} timed steps per cell after {} warm-up steps; step time is the median.\n",
        m.layers,
        m.heads,
        m.embed,
        m.context,
        m.params as f64 / 1e6,
        m.batch,
        m.seq,
        m.tokens_per_step,
        r.steps,
        r.warmup
    );
    let mc = &r.machine;
    let _ = writeln!(
        s,
        "Machine: {} logical cores, {}; {}; commit {}; GEMM backend {}.\n",
        mc.logical_cores, mc.cpu_model, mc.rustc, mc.git_commit, mc.gemm_backend
    );
    let cg = &r.ceiling_gemm;
    let ceil: Vec<String> = cg.ratios.iter().map(|(t, x)| format!("{t} → {x:.2}x")).collect();
    let _ = writeln!(
        s,
        "Machine ceiling (N independent single-threaded GEMMs [{} x {}] · [{} x {}] at once, {:.2} ms each alone, \
         aggregate throughput over one alone): {}.\n",
        cg.m,
        cg.k,
        cg.k,
        cg.n,
        cg.single_ms,
        ceil.join(", ")
    );
    let bg = r.cells.iter().map(|c| c.background_cores).fold(0.0, f64::max);
    let la = |x: Option<f64>| x.map(|v| format!("{v:.2}")).unwrap_or_else(|| "n/a".into());
    let _ = writeln!(
        s,
        "Background load: 1-minute load average {} before, {} after; other processes kept up to {bg:.2} cores busy \
         during a cell (column `other procs`).{}\n",
        la(r.load_average_before),
        la(r.load_average_after),
        if bg > 0.25 * mc.logical_cores as f64 {
            " **The machine was shared while measuring: speed-ups and utilisation are understated where that column is high; \
             rerun on a quiet machine before drawing conclusions.**"
        } else {
            ""
        }
    );
}

/// One row per cell.
fn write_table(r: &Report, s: &mut String) {
    s.push_str(
        "| strategy | threads | step ms | tokens/s | speed-up | ceiling | of ceiling | efficiency | CPU util | compute | merge | barrier | lock wait | reduce | optimizer | other | lock acq/step | lock wait ms/step | peak RSS MB | other procs (cores) |\n",
    );
    s.push_str(
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for c in &r.cells {
        let _ = writeln!(
            s,
            "| {} | {} | {:.2} | {:.0} | {:.2}x | {:.2}x | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.3} | {:.0} | {:.2} |",
            c.strategy,
            c.threads,
            c.median_step_ms,
            c.tokens_per_s,
            c.speedup,
            c.ceiling_speedup,
            pct(c.speedup_vs_ceiling),
            pct(c.efficiency),
            pct(c.cpu_utilization),
            pct(c.compute_frac),
            pct(c.merge_frac),
            pct(c.barrier_frac),
            pct(c.lock_wait_frac),
            pct(c.reduce_frac),
            pct(c.optimizer_frac),
            pct(c.other_frac),
            c.lock_acquisitions_per_step,
            c.lock_wait_ms_per_step,
            c.peak_rss_mb,
            c.background_cores
        );
    }
}

/// How to read the table, the bit-identity line per strategy, and one paragraph per strategy.
fn write_notes(r: &Report, s: &mut String) {
    s.push_str(
        "\nTime split: per-worker time in each phase divided by the step's wall time, averaged over workers; \
         `other` is what is left (coordinator work, wake-up latency, workers with nothing to do). \
         Efficiency is speed-up / min(threads, cores); CPU utilisation is (user + sys) / (wall · min(threads, cores)).\n\n",
    );
    for name in strategies(r) {
        let losses: Vec<u32> = r.cells.iter().filter(|c| c.strategy == name).map(|c| c.final_loss.to_bits()).collect();
        if losses.len() > 1 {
            let same = losses.iter().all(|&l| l == losses[0]);
            let _ = writeln!(
                s,
                "- `{name}`: final loss {}.",
                if same { "bit-identical at every thread count" } else { "differs between thread counts" }
            );
        }
    }
    s.push('\n');
    s.push_str("## Reading the numbers\n\n");
    for name in strategies(r) {
        let _ = writeln!(s, "{}\n", explain(r, name));
    }
}

/// A paragraph explaining one strategy's scaling from its own time split.
fn explain(r: &Report, name: &str) -> String {
    let cores = r.machine.logical_cores;
    let cells: Vec<&Cell> = r.cells.iter().filter(|c| c.strategy == name).collect();
    let Some(best) = cells.iter().copied().max_by(|a, b| a.tokens_per_s.total_cmp(&b.tokens_per_s)) else {
        return String::new();
    };
    let mut s = format!(
        "**{name}**: best throughput {:.0} tokens/s at {} thread{} ({:.2}x over one thread; the ceiling there is {:.2}x, so {} of it).",
        best.tokens_per_s,
        best.threads,
        if best.threads == 1 { "" } else { "s" },
        best.speedup,
        best.ceiling_speedup,
        pct(best.speedup_vs_ceiling)
    );
    // The largest multi-threaded cell at or below the core count shows the overheads without
    // time-sharing; explain from it.
    let at_cores =
        cells.iter().copied().filter(|c| c.threads > 1 && c.threads <= cores).max_by_key(|c| c.threads).or(Some(best));
    if let Some(c) = at_cores {
        let sync = c.merge_frac + c.barrier_frac + c.lock_wait_frac + c.reduce_frac;
        let _ = write!(
            s,
            " At {} threads a worker spends {} of the step computing, {} merging sub-trees, {} waiting at barriers, {} waiting for locks \
             ({:.1} acquisitions per step), {} reducing and {} in the optimizer ({} other); CPU utilisation is {}.",
            c.threads,
            pct(c.compute_frac),
            pct(c.merge_frac),
            pct(c.barrier_frac),
            pct(c.lock_wait_frac),
            c.lock_acquisitions_per_step,
            pct(c.reduce_frac),
            pct(c.optimizer_frac),
            pct(c.other_frac),
            pct(c.cpu_utilization)
        );
        let mut causes = Vec::new();
        if c.lock_wait_frac > 0.2 {
            causes.push(format!(
                "the lock serializes the work: each worker waits {} of the step ({:.2} ms) for it, so the threads take turns instead of running together",
                pct(c.lock_wait_frac),
                c.lock_wait_ms_per_step
            ));
        }
        if c.barrier_frac > 0.1 {
            causes.push(format!(
                "workers wait {} of the step at barriers: the work between barriers is unevenly spread or the serial part (coordinator, optimizer) leaves them idle",
                pct(c.barrier_frac)
            ));
        }
        if c.reduce_frac > 0.1 {
            causes.push(format!("reducing the gradients takes {} of the step", pct(c.reduce_frac)));
        }
        if c.other_frac > 0.1 {
            causes.push(format!(
                "{} of the step is outside the measured phases (coordinator work, waking the workers)",
                pct(c.other_frac)
            ));
        }
        if c.background_cores > 0.25 * cores as f64 {
            causes.push(format!(
                "other processes kept {:.2} of the {cores} cores busy during this cell, so the workers did not have the machine to themselves",
                c.background_cores
            ));
        }
        if c.cpu_utilization < 0.85 && c.lock_wait_frac <= 0.2 {
            causes.push(format!(
                "the cores are busy only {} of the time: workers block rather than compute",
                pct(c.cpu_utilization)
            ));
        }
        if causes.is_empty() {
            if c.speedup_vs_ceiling >= 0.95 {
                s.push_str(&format!(
                    " Merging, reducing and waiting cost {} of the step, so it scales as far as the machine does.",
                    pct(sync)
                ));
            } else {
                s.push_str(&format!(
                    " Merging, reducing and waiting cost only {} of the step; the gap to the ceiling is in the compute itself \
                     (memory bandwidth or cache sharing that the GEMM-only ceiling does not exercise, or background load).",
                    pct(sync)
                ));
            }
        } else {
            s.push_str(" The speed-up is limited because ");
            s.push_str(&causes.join("; "));
            s.push('.');
        }
    }
    if let Some(over) = cells.iter().filter(|c| c.threads > cores).max_by_key(|c| c.threads) {
        let _ = write!(
            s,
            " With {} threads on {cores} cores the workers time-share the cores: throughput is {:.0} tokens/s ({} of the best).",
            over.threads,
            over.tokens_per_s,
            pct(over.tokens_per_s / best.tokens_per_s.max(1e-9))
        );
    }
    s
}

/// Speed-up against threads for each strategy, with the ideal line and the machine ceiling.
pub fn chart(r: &Report) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 520)).into_drawing_area();
        draw_chart(&root, r).map_err(|e| crate::err!("cannot draw the scaling chart: {e}"))?;
        root.present().map_err(|e| crate::err!("cannot draw the scaling chart: {e}"))?;
    }
    Ok(svg)
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn lx(threads: f64) -> f64 {
    threads.log2()
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

fn draw_chart<DB: DrawingBackend>(root: &DrawingArea<DB, plotters::coord::Shift>, r: &Report) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let max_t = r.cells.iter().map(|c| c.threads).max().unwrap_or(1).max(2);
    let max_y = r
        .cells
        .iter()
        .map(|c| c.speedup)
        .chain(r.ceiling_gemm.ratios.iter().map(|&(_, x)| x))
        .fold(max_t as f64, f64::max)
        * 1.05;
    let caption = format!("{}: speed-up over 1 thread ({} cores)", r.config, r.machine.logical_cores);
    let mut chart = ChartBuilder::on(root)
        .caption(caption, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..lx(max_t as f64), 0f64..max_y)?;
    // x is log2(threads), so 1, 2, 4, 8 are evenly spaced; labels show the thread count.
    let steps = (lx(max_t as f64).ceil() as usize).max(1);
    chart
        .configure_mesh()
        .x_desc("threads (log scale)")
        .y_desc("speed-up over 1 thread")
        .x_labels(steps + 1)
        .x_label_formatter(&|x| format!("{:.0}", x.exp2()))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;

    let ideal = BLACK.mix(0.5);
    chart
        .draw_series(LineSeries::new(
            (0..=40).map(|i| i as f64 / 40.0 * lx(max_t as f64)).map(|x| (x, x.exp2())),
            ideal.stroke_width(1),
        ))?
        .label("ideal")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], ideal));

    let ceiling: Vec<(f64, f64)> = r.ceiling_gemm.ratios.iter().map(|&(t, x)| (lx(t as f64), x)).collect();
    let grey = RGBColor(120, 120, 120);
    chart
        .draw_series(LineSeries::new(ceiling.clone(), grey.stroke_width(3)))?
        .label("machine ceiling (independent GEMMs)")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], grey.stroke_width(3)));
    chart.draw_series(ceiling.iter().map(|&p| Cross::new(p, 5, grey.stroke_width(2))))?;

    for (i, name) in strategies(r).into_iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let mut pts: Vec<(f64, f64)> =
            r.cells.iter().filter(|c| c.strategy == name).map(|c| (lx(c.threads as f64), c.speedup)).collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(name.to_string())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()?;
    Ok(())
}
