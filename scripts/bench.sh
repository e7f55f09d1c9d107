#!/usr/bin/env bash
# Regenerates results/: the scaling report of the `small` and `seed` presets (every strategy at
# 1, 2, 4 and 8 threads: results/<config>/scaling.{json,md,svg}) and a flamegraph of `seed`
# training with the segmented strategy (results/flamegraph_seed.svg). `cllm bench` and
# `cllm profile` alone write to a new runs/bench-NNN and runs/profile-NNN.svg; this script is
# what writes results/, passing --out.
#
# The bench runs the release build (what `cargo install` gives); the flamegraph comes from the
# `profiling` profile (the same optimized code with symbols and line tables, in
# target/profiling/), so inlined frames keep their names.
#
# About 6 minutes on 2 idle cores. Measure on a quiet machine: each report records how many
# cores other processes kept busy during every cell, and says so when that spoils the numbers.
#
# Environment: STEPS (timed steps per cell, default 8), WARMUP (default 2), THREADS (default
# 1,2,4,8), STRATEGIES (default all), CONFIGS (default "small seed"), PROFILE_THREADS
# (default: the number of cores).
set -euo pipefail
cd "$(dirname "$0")/.."

steps=${STEPS:-8}
warmup=${WARMUP:-2}
threads=${THREADS:-1,2,4,8}
strategies=${STRATEGIES:-model-lock,gradient-lock,segmented,rayon}
configs=${CONFIGS:-small seed}
profile_threads=${PROFILE_THREADS:-$(nproc)}

cargo build --release --quiet
cargo build --profile profiling --quiet
for config in $configs; do
    cargo run --release --quiet -- bench --config "$config" --threads "$threads" --strategies "$strategies" \
        --steps "$steps" --warmup "$warmup" --out "results/$config"
done
cargo run --profile profiling --quiet -- profile --config seed --threads "$profile_threads" --strategy segmented \
    --steps 12 --out results/flamegraph_seed.svg
echo "results/: $(ls results | tr '\n' ' ')"
