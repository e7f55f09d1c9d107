#!/usr/bin/env bash
# cllm vs PyTorch eager, side by side in one run, on the same configs, batch and step counts.
#
#   scripts/compare_pytorch.sh [ROUNDS] [STEPS]     (defaults: 3 rounds, 10 timed steps)
#
# Installs PyTorch into .venv (a local virtual environment) if it is absent, builds cllm, then
# for each round alternates cllm and PyTorch for every (config, threads) cell: small and seed,
# 1 and 2 threads. Each run reports its median step time; scripts/compare_report.py takes the
# median over the rounds, lists the per-round ratios, and expresses model FLOP/s as a fraction
# of the best torch.mm GEMM rate of the same run. Writes results/vs_pytorch.md (and .json) and
# prints the table.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
STEPS=${2:-10}
CONFIGS=${CONFIGS:-"small seed"}
THREADS=${THREADS:-"1 2"}

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import torch, numpy, safetensors" 2>/dev/null; then
  echo "installing PyTorch into .venv (one time)..." >&2
  python3 -m venv .venv
  .venv/bin/pip install --quiet torch numpy safetensors
fi
cargo build --release --quiet

raw=$(mktemp)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp" "$raw"' EXIT
for round in $(seq 1 "$ROUNDS"); do
  for config in $CONFIGS; do
    for threads in $THREADS; do
      echo "round $round: $config, $threads thread(s)" >&2
      ./target/release/cllm bench --config "$config" --threads "$threads" --strategies segmented \
        --steps "$STEPS" --warmup 2 --out "$tmp/cllm" >/dev/null
      python3 - "$tmp/cllm/scaling.json" "$round" >>"$raw" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
cell = next(c for c in r["cells"] if c["strategy"] == "segmented" and c["threads"] == max(x["threads"] for x in r["cells"]))
print(json.dumps({"impl": "cllm", "round": int(sys.argv[2]), "config": r["config"], "threads": cell["threads"],
                  "median_step_ms": cell["median_step_ms"], "tokens_per_s": cell["tokens_per_s"]}))
PY
      .venv/bin/python scripts/pytorch_train.py --config "$config" --threads "$threads" --steps "$STEPS" \
        | python3 -c "import json,sys; d=json.load(sys.stdin); d['round']=$round; print(json.dumps(d))" >>"$raw"
    done
  done
done

python3 scripts/compare_report.py "$raw"
