#!/usr/bin/env bash
# cllm's GEMM against torch.mm on the same products (scripts/gemm_shapes.txt), one thread,
# alternating the sides round by round: cllm on every SIMD path this CPU has, then PyTorch.
# Prints each product's median GFLOP/s per side over the rounds and cllm/torch ratios, and
# writes results/gemm_vs_torch.md (and .json). Needs .venv with torch (scripts/compare_pytorch.sh
# makes it). Usage: scripts/gemm_vs_torch.sh [ROUNDS=5]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-5}
raw=$(mktemp -d)
trap 'rm -rf "$raw"' EXIT
cargo bench --bench gemm_shapes --no-run >/dev/null 2>&1
bin=$(cargo bench --bench gemm_shapes --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("executable") and m["target"]["name"]=="gemm_shapes": print(m["executable"])')
paths=$(./target/release/cllm --version >/dev/null && python3 - <<'PY'
import subprocess
out = []
for p in ["avx512", "avx2", "portable"]:
    r = subprocess.run(["./target/release/cllm", "--version"], env={"CLLM_SIMD": p}, capture_output=True)
    if r.returncode == 0 and p != "portable":
        out.append(p)
print(" ".join(out))
PY
)
for r in $(seq "$ROUNDS"); do
  for p in $paths; do
    CLLM_SIMD=$p "$bin" | sed "s/^/$p /" >> "$raw/lines"
  done
  .venv/bin/python scripts/torch_gemm.py | sed "s/^/torch /" >> "$raw/lines"
  echo "round $r of $ROUNDS done" >&2
done
python3 - "$raw/lines" "$ROUNDS" <<'PY'
import json, statistics, sys, pathlib, platform, subprocess
rows = {}
for line in open(sys.argv[1]):
    side, js = line.split(" ", 1)
    d = json.loads(js)
    rows.setdefault(d["name"], {"shape": f'{d["m"]}x{d["n"]}x{d["k"]}'}).setdefault(side, []).append(d["gflops"])
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
sides = [s for s in ["avx512", "avx2", "torch"] if any(s in r for r in rows.values())]
out = {"cpu": cpu, "rounds": int(sys.argv[2]), "threads": 1, "products": []}
md = [f"# cllm GEMM vs torch.mm, 1 thread", "",
      f"CPU: {cpu}. {sys.argv[2]} alternating rounds, median GFLOP/s per side (scripts/gemm_vs_torch.sh).", "",
      "| product | m x n x k | " + " | ".join(f"cllm {s}" if s != "torch" else "torch.mm" for s in sides) + " | " +
      " | ".join(f"{s}/torch" for s in sides if s != "torch") + " |",
      "|---|---|" + "---|" * (2 * len(sides) - 1)]
for name, r in rows.items():
    med = {s: statistics.median(r[s]) for s in sides if s in r}
    ratios = {s: med[s] / med["torch"] for s in med if s != "torch" and "torch" in med}
    out["products"].append({"name": name, "shape": r["shape"], "median_gflops": med, "ratio_vs_torch": ratios})
    md.append(f"| {name} | {r['shape']} | " + " | ".join(f"{med.get(s, 0):.1f}" for s in sides) + " | " +
              " | ".join(f"{ratios.get(s, 0):.2f}x" for s in sides if s != "torch") + " |")
pathlib.Path("results/gemm_vs_torch.json").write_text(json.dumps(out, indent=1) + "\n")
pathlib.Path("results/gemm_vs_torch.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
PY
