//! `cllm bench --distributed mpi`: one rank of a benchmark under `mpirun`. Every rank trains
//! the same steps (segmented, each `--threads` count in turn) as one distributed run; rank 0
//! gathers every rank's per-step compute and exchange time and the bytes each rank sent to the
//! others, prints them and writes DIR/distributed.json.

use super::{batches, bench_out, median, plan, trainer_options, BenchArgs, PhaseTimes, LR, SEED};
use crate::dist::Comm;
use crate::model::Model;
use crate::train::{Strategy, Trainer};
use crate::Result;
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

/// One rank's figures of one thread count, per timed step.
#[derive(Clone, Debug, Serialize)]
pub struct RankCell {
    pub rank: usize,
    pub median_step_ms: f64,
    /// Forward + backward, averaged over the rank's workers.
    pub compute_ms: f64,
    /// The exchange with the other ranks (coordinator thread).
    pub exchange_ms: f64,
    /// Bytes this rank sent to the others.
    pub exchange_bytes: u64,
}

/// The figures of one thread count.
#[derive(Clone, Debug, Serialize)]
pub struct DistCell {
    pub threads: usize,
    /// Rank 0's median step time and the throughput of the whole run at it.
    pub median_step_ms: f64,
    pub tokens_per_s: f64,
    pub ranks: Vec<RankCell>,
}

/// `distributed.json`.
#[derive(Clone, Debug, Serialize)]
pub struct DistReport {
    pub config: String,
    pub ranks: usize,
    pub params: usize,
    pub tokens_per_step: usize,
    pub steps: usize,
    pub cells: Vec<DistCell>,
}

/// The bench as one rank of `comm`; rank 0 reports. An error on one rank ends them all
/// ([`Comm::abort`]), so none waits for it in a collective.
pub fn run(args: &BenchArgs, comm: Arc<dyn Comm>) -> Result<()> {
    match measure(args, &comm) {
        Err(e) if comm.size() > 1 => {
            crate::cli::print_error(&format!("rank {}: {}", comm.rank(), e.0));
            comm.abort(1)
        }
        other => other,
    }
}

fn measure(args: &BenchArgs, comm: &Arc<dyn Comm>) -> Result<()> {
    let plan = plan(args)?;
    let model = Model::new(plan.cfg, SEED);
    let data = batches(plan.batch, plan.seq, args.warmup + args.steps)?;
    let tokens = plan.batch * plan.seq;
    let mut cells = Vec::new();
    for &threads in &plan.threads {
        let opts = trainer_options(Strategy::Segmented, threads, args.spheres);
        let mut trainer = Trainer::new_distributed(model.clone(), plan.batch, plan.seq, opts, Arc::clone(comm))?;
        for (x, y) in &data[..args.warmup] {
            trainer.step(x, y, LR)?;
        }
        let (mut step_s, mut compute, mut exchange, mut bytes) = (Vec::new(), 0.0, 0.0, 0u64);
        for (x, y) in &data[args.warmup..] {
            let t0 = Instant::now();
            let r = trainer.step(x, y, LR)?;
            step_s.push(t0.elapsed().as_secs_f64());
            compute += PhaseTimes::of(&r).compute;
            let w0 = r.timings.workers.first().copied().unwrap_or_default();
            exchange += w0.exchange.as_secs_f64();
            bytes += w0.exchange_bytes;
        }
        let n = step_s.len().max(1) as f64;
        let mine = [median(&step_s), compute / n, exchange / n].map(|x| (x * 1e9) as u64);
        let mut all = vec![0u64; 4 * comm.size()];
        comm.all_gather_u64(&[mine[0], mine[1], mine[2], bytes / n as u64], &mut all);
        let ms = |ns: u64| ns as f64 / 1e6;
        let ranks: Vec<RankCell> = all
            .chunks(4)
            .enumerate()
            .map(|(rank, v)| RankCell {
                rank,
                median_step_ms: ms(v[0]),
                compute_ms: ms(v[1]),
                exchange_ms: ms(v[2]),
                exchange_bytes: v[3],
            })
            .collect();
        let med = ranks[0].median_step_ms;
        if comm.rank() == 0 && !args.quiet {
            for r in &ranks {
                eprintln!(
                    "[bench] {} ranks x{threads}: rank {}: {:.2} ms/step, compute {:.2} ms, exchange {:.2} ms, {} bytes \
                     sent/step",
                    comm.size(),
                    r.rank,
                    r.median_step_ms,
                    r.compute_ms,
                    r.exchange_ms,
                    r.exchange_bytes
                );
            }
        }
        cells.push(DistCell { threads, median_step_ms: med, tokens_per_s: tokens as f64 / (med / 1e3), ranks });
    }
    if comm.rank() != 0 {
        return Ok(());
    }
    let report = DistReport {
        config: args.config.clone(),
        ranks: comm.size(),
        params: plan.cfg.num_params(),
        tokens_per_step: tokens,
        steps: args.steps,
        cells,
    };
    let dir = bench_out(args)?;
    std::fs::create_dir_all(&dir).map_err(|e| crate::err!("cannot create {}: {e}", dir.display()))?;
    let text = serde_json::to_string_pretty(&report).map_err(|e| crate::err!("distributed.json: {e}"))? + "\n";
    let path = dir.join("distributed.json");
    std::fs::write(&path, &text).map_err(|e| crate::err!("cannot write {}: {e}", path.display()))?;
    if args.json {
        print!("{text}");
    }
    if !args.quiet {
        eprintln!("[bench] wrote {}", path.display());
    }
    Ok(())
}
