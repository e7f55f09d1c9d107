//! `cllm plot`: a training run's `--metrics` file drawn as one SVG.
//!
//! The file is JSON lines, one object per step (see `train::progress`). Four panels share the
//! step axis: train and validation loss, tokens/s, the gradient norm, and the micro-batches
//! skipped for non-finite gradients. Invariants, and why they hold:
//! - Each series has one point per step that carries its field as a finite number: lines
//!   without a numeric `step` (other kinds of line) and keys this reader does not know are
//!   ignored, so the format can grow; `val_loss` is `null` on steps without validation.
//! - A step that appears twice (a run resumed from a checkpoint older than the crash appends
//!   the replayed steps again) keeps its last line: that is the history the run continued, so
//!   x is strictly increasing along every series.
//! - A line that is not JSON, or a file with no step carrying a loss, is an error naming the
//!   file (and line): an empty picture would look like a result.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Args;
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;

use super::{usage, CliResult, Failure};
use crate::error::Result;

/// Draw a training run's --metrics file as an SVG: train and validation loss against steps,
/// with tokens/s, gradient norm and skipped micro-batches as further panels.
#[derive(Debug, Clone, Args)]
pub struct PlotArgs {
    /// The JSON-lines file written by `cllm train --metrics FILE`.
    #[arg(long, value_name = "FILE")]
    pub metrics: PathBuf,
    /// The SVG to write (replaced atomically).
    #[arg(long, value_name = "FILE.svg", default_value = "loss.svg")]
    pub out: PathBuf,
}

/// Points of one quantity against the step, in step order.
pub type Series = Vec<(f64, f64)>;

/// What a metrics file holds, per step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    pub loss: Series,
    pub val_loss: Series,
    pub tokens_per_s: Series,
    pub grad_norm: Series,
    /// Number of micro-batches (spheres) skipped at each step.
    pub skipped: Series,
}

/// The fields of one step line that this reader draws.
#[derive(Debug, Clone, Copy, Default)]
struct StepLine {
    loss: Option<f64>,
    val_loss: Option<f64>,
    tokens_per_s: Option<f64>,
    grad_norm: Option<f64>,
    skipped: Option<f64>,
}

fn finite(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64).filter(|x| x.is_finite())
}

/// Parses the text of a metrics file (`name` is used in errors).
pub fn parse_metrics(name: &str, text: &str) -> Result<Metrics> {
    let mut steps: BTreeMap<u64, StepLine> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(line).map_err(|e| crate::err!("{name} line {}: not a JSON object ({e})", i + 1))?;
        let Some(step) = v.get("step").and_then(Value::as_u64) else { continue };
        let line = StepLine {
            loss: finite(&v, "loss"),
            val_loss: finite(&v, "val_loss"),
            tokens_per_s: finite(&v, "tokens_per_s"),
            grad_norm: finite(&v, "grad_norm"),
            skipped: v.get("skipped_spheres").and_then(Value::as_array).map(|a| a.len() as f64),
        };
        steps.insert(step, line);
    }
    let mut m = Metrics::default();
    for (&step, l) in &steps {
        let x = step as f64;
        for (series, y) in [
            (&mut m.loss, l.loss),
            (&mut m.val_loss, l.val_loss),
            (&mut m.tokens_per_s, l.tokens_per_s),
            (&mut m.grad_norm, l.grad_norm),
            (&mut m.skipped, l.skipped),
        ] {
            if let Some(y) = y {
                series.push((x, y));
            }
        }
    }
    if m.loss.is_empty() {
        crate::bail!(
            "{name}: no training steps (no line with a step and a loss); is it a `cllm train --metrics` file?"
        );
    }
    Ok(m)
}

/// Reads and parses a metrics file.
pub fn read_metrics(path: &Path) -> Result<Metrics> {
    let text =
        std::fs::read_to_string(path).map_err(|e| crate::err!("--metrics {}: cannot read: {e}", path.display()))?;
    parse_metrics(&format!("--metrics {}", path.display()), &text)
}

/// `cllm plot`.
pub fn run(args: PlotArgs) -> CliResult {
    if args.out.is_dir() {
        usage!("--out {}: is a directory", args.out.display());
    }
    if args.out.extension().and_then(|e| e.to_str()) != Some("svg") {
        usage!("--out {}: the picture is an SVG; name it FILE.svg", args.out.display());
    }
    let metrics = read_metrics(&args.metrics)?;
    let title = args.metrics.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let svg = svg(&metrics, &title).map_err(Failure::from)?;
    if let Some(dir) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Failure::from(crate::err!("cannot create {}: {e}", dir.display())))?;
    }
    crate::bench::report::write_file(&args.out, svg.as_bytes())?;
    eprintln!("wrote {} ({} steps, {} validations)", args.out.display(), metrics.loss.len(), metrics.val_loss.len());
    Ok(())
}

/// The picture, as SVG text.
pub fn svg(m: &Metrics, title: &str) -> Result<String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (960, 900)).into_drawing_area();
        draw(&root, m, title).map_err(|e| crate::err!("cannot draw the plot: {e}"))?;
        root.present().map_err(|e| crate::err!("cannot draw the plot: {e}"))?;
    }
    Ok(out)
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

const TRAIN: RGBColor = RGBColor(31, 119, 180);
const VAL: RGBColor = RGBColor(214, 39, 40);
const OTHER: RGBColor = RGBColor(44, 160, 44);

/// One line of a panel: its legend label, points and colour.
struct Line<'a> {
    label: &'a str,
    points: &'a Series,
    color: RGBColor,
}

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, m: &Metrics, title: &str) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let root = root.titled(&format!("cllm training: {title}"), ("sans-serif", 22))?;
    let (top, bottom) = root.split_vertically(480);
    let x_range = x_range(&m.loss);
    let loss = [
        Line { label: "train loss", points: &m.loss, color: TRAIN },
        Line { label: "validation loss", points: &m.val_loss, color: VAL },
    ];
    panel(&top, "loss", "loss (nats/byte)", x_range.clone(), &loss)?;
    let lower = bottom.split_evenly((1, 3));
    let panels: [(&str, &str, &Series); 3] = [
        ("throughput", "tokens/s", &m.tokens_per_s),
        ("gradient norm", "grad norm", &m.grad_norm),
        ("skipped micro-batches", "micro-batches", &m.skipped),
    ];
    for (area, (caption, y_desc, points)) in lower.iter().zip(panels) {
        let line = [Line { label: y_desc, points, color: OTHER }];
        panel(area, caption, y_desc, x_range.clone(), &line)?;
    }
    Ok(())
}

/// The steps covered, widened to a non-empty interval.
fn x_range(s: &Series) -> std::ops::Range<f64> {
    let lo = s.first().map_or(0.0, |p| p.0);
    let hi = s.last().map_or(1.0, |p| p.0);
    lo..if hi > lo { hi } else { lo + 1.0 }
}

/// The values of the lines, padded by 5% (by 1 when they are all equal, e.g. no skipped
/// micro-batches), never below 0 for quantities that cannot be negative.
fn y_range(lines: &[Line]) -> std::ops::Range<f64> {
    let ys = lines.iter().flat_map(|l| l.points.iter().map(|p| p.1));
    let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| (lo.min(y), hi.max(y)));
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let pad = if hi > lo { 0.05 * (hi - lo) } else { 1.0 };
    let bottom = if lo >= 0.0 { (lo - pad).max(0.0) } else { lo - pad };
    bottom..hi + pad
}

/// One chart: a caption, the step axis, the lines, and a legend when there is more than one.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    caption: &str,
    y_desc: &str,
    x: std::ops::Range<f64>,
    lines: &[Line],
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let big = lines.len() > 1;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", if big { 18 } else { 15 }))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(if big { 56 } else { 64 })
        .build_cartesian_2d(x, y_range(lines))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(y_desc)
        .x_labels(if big { 10 } else { 4 })
        .y_labels(if big { 10 } else { 6 })
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| short(*v))
        .label_style(("sans-serif", 12))
        .axis_desc_style(("sans-serif", 14))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    for l in lines.iter().filter(|l| !l.points.is_empty()) {
        let color = l.color;
        let series = chart.draw_series(LineSeries::new(l.points.iter().copied(), color.stroke_width(2)))?;
        series.label(l.label).legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        if l.points.len() == 1 {
            // A single point draws no line: mark it.
            chart.draw_series(l.points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
    }
    if big {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .draw()?;
    }
    Ok(())
}

/// An axis label: 12500 as 12.5k, small values with a few digits.
fn short(v: f64) -> String {
    match v.abs() {
        a if a >= 1e6 => format!("{:.1}M", v / 1e6),
        a if a >= 1e4 => format!("{:.1}k", v / 1e3),
        a if a >= 100.0 => format!("{v:.0}"),
        a if a >= 1.0 || a == 0.0 => format!("{v:.2}"),
        _ => format!("{v:.3}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_steps_keep_the_last_line_and_other_lines_are_ignored() {
        let text = concat!(
            r#"{"step":1,"loss":3.0,"val_loss":null,"grad_norm":1.0,"skipped_spheres":[],"tokens_per_s":10}"#,
            "\n",
            r#"{"kind":"sample","text":"hi"}"#,
            "\n",
            r#"{"step":2,"loss":2.5,"val_loss":2.7,"grad_norm":0.5,"skipped_spheres":[1,3],"new_key":1}"#,
            "\n",
            r#"{"step":2,"loss":2.4,"val_loss":2.6,"grad_norm":0.5,"skipped_spheres":[1]}"#,
            "\n\n",
        );
        let m = parse_metrics("m", text).expect("parses");
        assert_eq!(m.loss, vec![(1.0, 3.0), (2.0, 2.4)]);
        assert_eq!(m.val_loss, vec![(2.0, 2.6)]);
        assert_eq!(m.skipped, vec![(1.0, 0.0), (2.0, 1.0)]);
        assert_eq!(m.tokens_per_s, vec![(1.0, 10.0)]);
    }

    #[test]
    fn files_without_steps_or_with_broken_lines_are_errors() {
        let e = parse_metrics("m", "").expect_err("empty");
        assert!(e.0.contains("no training steps"), "{}", e.0);
        let e = parse_metrics("m", "{\"step\":1,\"loss\":1}\n{\"step\":2,").expect_err("cut line");
        assert!(e.0.starts_with("m line 2: not a JSON object"), "{}", e.0);
    }

    #[test]
    fn axis_labels_are_short() {
        assert_eq!(short(17295.0), "17.3k");
        assert_eq!(short(1.5), "1.50");
        assert_eq!(short(0.0), "0.00");
        assert_eq!(short(250.0), "250");
    }
}
