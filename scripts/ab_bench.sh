#!/usr/bin/env bash
# Side by side: steady-state step time and phase shares of two cllm binaries (before/after a
# change), or of one binary under two environments, A and B alternating in every round.
# Where scripts/ab_train.sh times whole training runs (first step included), this times
# `cllm bench` cells: the median of STEPS steps after WARMUP untimed ones, `segmented` only.
#
#   scripts/ab_bench.sh BIN_A BIN_B [ROUNDS] [STEPS]
#
# CELLS: "config:spheres:batch ...", default "seed:8:8 small:8:8 seed:32:32"; THREADS: "1,2".
# ENV_A / ENV_B: environment for each side (e.g. ENV_B=CLLM_SIMD=avx2). Prints, per cell and
# thread count, each side's median over the rounds of its median step time, B's throughput
# relative to A's (A's step time over B's) with every round's figure, and the median share of
# the step each side spent in merge, reduce and barrier waits (a binary without a merge phase
# reports 0 there).
set -euo pipefail
# shellcheck source=scripts/ab_rounds.sh
source "$(dirname "$0")/ab_rounds.sh"
A=$1
B=$2
ROUNDS=${3:-5}
STEPS=${4:-10}
WARMUP=${WARMUP:-2}
CELLS=${CELLS:-"seed:8:8 small:8:8 seed:32:32"}
THREADS=${THREADS:-1,2}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

run() { # side bin env cell round
  local side=$1 bin=$2 envs=$3 cell=$4 round=$5
  IFS=: read -r config spheres batch <<<"$cell"
  rm -rf "$tmp/bench"
  # shellcheck disable=SC2086
  env $envs "$bin" bench --config "$config" --threads "$THREADS" --strategies segmented --spheres "$spheres" \
    --batch "$batch" --steps "$STEPS" --warmup "$WARMUP" --out "$tmp/bench" >/dev/null 2>"$tmp/err" \
    || { cat "$tmp/err" >&2; exit 1; }
  python3 - "$side" "$cell" "$round" "$tmp/bench/scaling.json" >>"$tmp/raw" <<'PY'
import json, sys
side, cell, rnd, path = sys.argv[1:]
for c in json.load(open(path))["cells"]:
    print(json.dumps({"side": side, "cell": cell, "round": int(rnd), "threads": c["threads"],
                      "ms": c["median_step_ms"], "merge": c.get("merge_frac", 0.0),
                      "reduce": c["reduce_frac"], "barrier": c["barrier_frac"]}))
PY
}

ab_rounds

python3 - "$tmp/raw" "$A ${ENV_A:-}" "$B ${ENV_B:-}" "$(lscpu | sed -n 's/^Model name: *//p' | head -1)" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"A = {sys.argv[2]}\nB = {sys.argv[3]}\nCPU: {sys.argv[4]}\n")
print("| cell (config:spheres:batch) | threads | A step ms | B step ms | B/A throughput | rounds | "
      "A merge+reduce+barrier | B merge+reduce+barrier |")
print("|---|---:|---:|---:|---:|---|---|---|")
med = statistics.median
for cell in dict.fromkeys(r["cell"] for r in rows):
    for th in sorted({r["threads"] for r in rows if r["cell"] == cell}):
        side = lambda s: sorted((r for r in rows if r["cell"] == cell and r["threads"] == th and r["side"] == s),
                                key=lambda r: r["round"])
        a, b = side("A"), side("B")
        per = " ".join(f'{x["ms"] / y["ms"]:.3f}' for x, y in zip(a, b))
        share = lambda rs: "{:.1f}+{:.1f}+{:.1f}%".format(*(100 * med(r[k] for r in rs) for k in ("merge", "reduce", "barrier")))
        ma, mb = med(r["ms"] for r in a), med(r["ms"] for r in b)
        print(f"| {cell} | {th} | {ma:.1f} | {mb:.1f} | {ma / mb:.3f} | {per} | {share(a)} | {share(b)} |")
PY
