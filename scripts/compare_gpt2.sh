#!/usr/bin/env bash
# GPT-2 124M's shape: cllm against PyTorch eager, side by side in one run (issue 14's protocol).
#
#   scripts/compare_gpt2.sh [ROUNDS] [STEPS]     (defaults: 3 rounds, 5 timed steps)
#
# Cells: context 256 and 1024 (CONTEXTS), 1 and 2 threads (THREADS), batch 8 of byte tokens
# from the built-in tinyshakespeare, AdamW, clipping at 10. In every round each cell runs cllm
# and PyTorch back to back, the side that goes first alternating by round. Each run does one
# untimed step (cllm's first step also packs the weights and faults the memory in) and STEPS
# timed ones, and reports the median of its timed steps; peak RSS comes from GNU time. cllm:
# `train --config gpt2 --context T --batch 8 --threads N`, no validation, no checkpoint but the
# last (deleted), step times from `--metrics`. PyTorch: scripts/pytorch_train.py (SDPA
# attention), which also measures the torch.mm 2048^3 rate at the same thread count.
# scripts/gpt2_report.py writes results/gpt2_vs_pytorch.md (and .json) and prints the table.
# Installs PyTorch into .venv if it is absent. A full run (3 x 5 steps) takes about 80 minutes
# on a 2-core machine; run nothing else beside it.
#
# To finish an interrupted run, append to its raw file: RAW=FILE FIRST_ROUND=R (and CONTEXTS,
# THREADS for the cells R still lacks); the report reads every line of FILE.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
STEPS=${2:-5}
CONTEXTS=${CONTEXTS:-"256 1024"}
THREADS=${THREADS:-"1 2"}
FIRST_ROUND=${FIRST_ROUND:-1}

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import torch, numpy, safetensors" 2>/dev/null; then
  echo "installing PyTorch into .venv (one time)..." >&2
  python3 -m venv .venv
  .venv/bin/pip install --quiet torch numpy safetensors
fi
cargo build --release --quiet
cllm=./target/release/cllm

raw=${RAW:-$(mktemp)}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cpu="$(lscpu | sed -n 's/^Model name: *//p' | head -1), family $(lscpu | sed -n 's/^CPU family: *//p' | head -1) model $(lscpu | sed -n 's/^Model: *//p' | head -1)"
simd=$($cllm --version | sed -n 's/.*simd \([a-z0-9]*\).*/\1/p')

run_cllm() { # round context threads
  rm -rf "$tmp/run" "$tmp/metrics.jsonl"
  /usr/bin/time -f "RSS_KB %M" -o "$tmp/time" $cllm train --config gpt2 --context "$2" --batch 8 --threads "$3" \
    --steps $((STEPS + 1)) --val-fraction 0 --eval-every 0 --save-every 0 --out "$tmp/run" \
    --metrics "$tmp/metrics.jsonl" --quiet >/dev/null
  python3 - "$1" "$2" "$3" "$tmp/metrics.jsonl" "$tmp/time" "$simd" >>"$raw" <<'PY'
import json, re, statistics, sys
rnd, ctx, th, metrics, tfile, simd = sys.argv[1:]
steps = [json.loads(l) for l in open(metrics) if '"loss"' in l]
ms = [s["step_ms"] for s in steps[1:]]
rss = int(re.search(r"RSS_KB (\d+)", open(tfile).read()).group(1))
print(json.dumps({"impl": "cllm", "round": int(rnd), "context": int(ctx), "threads": int(th), "simd": simd,
                  "timed_steps": len(ms), "median_step_ms": statistics.median(ms), "step_ms": ms,
                  "peak_rss_mb": rss / 1024}))
PY
  rm -rf "$tmp/run"
}

run_torch() { # round context threads
  /usr/bin/time -f "RSS_KB %M" -o "$tmp/time" .venv/bin/python scripts/pytorch_train.py --config gpt2 \
    --context "$2" --threads "$3" --batch 8 --warmup 1 --steps "$STEPS" >"$tmp/torch.json"
  python3 - "$1" "$2" "$3" "$tmp/torch.json" "$tmp/time" >>"$raw" <<'PY'
import json, re, sys
rnd, ctx, th, out, tfile = sys.argv[1:]
d = json.load(open(out))
d.update({"round": int(rnd), "context": int(ctx), "threads": int(th),
          "peak_rss_mb": int(re.search(r"RSS_KB (\d+)", open(tfile).read()).group(1)) / 1024})
print(json.dumps(d))
PY
}

for round in $(seq "$FIRST_ROUND" "$ROUNDS"); do
  for context in $CONTEXTS; do
    for threads in $THREADS; do
      echo "round $round: context $context, $threads thread(s) ($(date +%H:%M:%S))" >&2
      if [ $((round % 2)) -eq 1 ]; then
        run_cllm "$round" "$context" "$threads"; run_torch "$round" "$context" "$threads"
      else
        run_torch "$round" "$context" "$threads"; run_cllm "$round" "$context" "$threads"
      fi
    done
  done
done

python3 scripts/gpt2_report.py "$raw" "$cpu"
