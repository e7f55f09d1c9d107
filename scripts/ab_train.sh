#!/usr/bin/env bash
# Side by side: training throughput and peak RSS of two cllm binaries (before/after a change),
# or of one binary under two environments (ENV_A=CLLM_SIMD=avx2 ENV_B=CLLM_SIMD=avx512), A and B
# alternating in every round, so machine noise hits both sides alike. Prints, per cell, the
# median tokens/s of each side over the rounds, the ratio B/A, every round's ratio, and the
# largest peak RSS of each side.
#
#   scripts/ab_train.sh BIN_A BIN_B [ROUNDS] [STEPS]
#
# CELLS: "config:threads:spheres[:batch] ...", default "seed:1:8 seed:2:8 small:1:8 small:2:8".
# Each run trains STEPS steps (default 20) with no validation and no checkpoint but the last;
# tokens/s is cllm's own figure over step time. TRAIN_ARGS adds flags to every run of both sides
# (e.g. TRAIN_ARGS="--strategy model-lock"). Needs GNU time (/usr/bin/time).
set -euo pipefail
# shellcheck source=scripts/ab_rounds.sh
source "$(dirname "$0")/ab_rounds.sh"
A=$1
B=$2
ROUNDS=${3:-3}
STEPS=${4:-20}
CELLS=${CELLS:-"seed:1:8 seed:2:8 small:1:8 small:2:8"}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

run() { # side bin env cell round
  local side=$1 bin=$2 envs=$3 cell=$4 round=$5
  IFS=: read -r config threads spheres batch <<<"$cell"
  batch=${batch:-$spheres}
  [ "$batch" -ge 8 ] || batch=8
  local out="$tmp/run-$side-$round"
  rm -rf "$out"
  # shellcheck disable=SC2086
  env $envs /usr/bin/time -f "RSS_KB %M" "$bin" train --config "$config" --threads "$threads" --spheres "$spheres" \
    --batch "$batch" --steps "$STEPS" --val-fraction 0 --save-every 0 --eval-every 0 --out "$out" --quiet --json ${TRAIN_ARGS:-} \
    >"$tmp/out" 2>"$tmp/err" || { cat "$tmp/err" >&2; exit 1; }
  python3 - "$side" "$cell" "$round" "$tmp/out" "$tmp/err" >>"$tmp/raw" <<'PY'
import json, re, sys
side, cell, rnd, out, err = sys.argv[1:]
tps = json.load(open(out))["tokens_per_s"]
rss = int(re.search(r"RSS_KB (\d+)", open(err).read()).group(1))
print(json.dumps({"side": side, "cell": cell, "round": int(rnd), "tps": tps, "rss_mb": rss / 1024}))
PY
}

ab_rounds

python3 - "$tmp/raw" "$A ${ENV_A:-}" "$B ${ENV_B:-}" "$(lscpu | sed -n 's/^Model name: *//p' | head -1)" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"A = {sys.argv[2]}\nB = {sys.argv[3]}\nCPU: {sys.argv[4]}\n")
print("| cell (config:threads:spheres) | A tokens/s | B tokens/s | B/A | rounds B/A | A peak RSS MB | B peak RSS MB |")
print("|---|---|---|---|---|---|---|")
for cell in dict.fromkeys(r["cell"] for r in rows):
    side = lambda s: [r for r in rows if r["cell"] == cell and r["side"] == s]
    a, b = side("A"), side("B")
    ma, mb = statistics.median(r["tps"] for r in a), statistics.median(r["tps"] for r in b)
    per = [f'{y["tps"] / x["tps"]:.3f}' for x, y in zip(sorted(a, key=lambda r: r["round"]), sorted(b, key=lambda r: r["round"]))]
    print(f'| {cell} | {ma:.0f} | {mb:.0f} | {mb / ma:.3f} | {" ".join(per)} | {max(r["rss_mb"] for r in a):.0f} | {max(r["rss_mb"] for r in b):.0f} |')
PY
