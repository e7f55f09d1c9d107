#!/usr/bin/env python3
"""PyTorch's side of scripts/gemm_vs_torch.sh: times torch.mm on the products listed in
scripts/gemm_shapes.txt with the protocol of benches/gemm_shapes.rs (each product repeated
until a batch lasts about 0.15 s, the median of 5 batches), one thread unless --threads, and
prints one JSON line per product: {"name", "m", "n", "k", "gflops", "impl"}.

"t" operands are transposed views (a.t() of a row-major buffer), as on cllm's side."""
import argparse
import json
import pathlib
import time

import torch

BATCH_SECS = 0.15
BATCHES = 5


def shapes():
    path = pathlib.Path(__file__).with_name("gemm_shapes.txt")
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, m, n, k, at, bt = line.split()
        yield name, int(m), int(n), int(k), at == "t", bt == "t"


def time_product(f):
    t = time.perf_counter()
    f()
    once = max(time.perf_counter() - t, 1e-7)
    reps = max(int(BATCH_SECS / once), 1)
    per = []
    for _ in range(BATCHES):
        t = time.perf_counter()
        for _ in range(reps):
            f()
        per.append((time.perf_counter() - t) / reps)
    per.sort()
    return per[BATCHES // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name, m, n, k, at, bt in shapes():
        a = torch.rand(k, m).t() if at else torch.rand(m, k)
        b = torch.rand(n, k).t() if bt else torch.rand(k, n)
        out = torch.empty(m, n)
        secs = time_product(lambda: torch.mm(a, b, out=out))
        gflops = 2 * m * n * k / secs / 1e9
        print(json.dumps({"name": name, "m": m, "n": n, "k": k, "gflops": round(gflops, 2),
                          "impl": f"torch {torch.__version__}"}))


if __name__ == "__main__":
    main()
