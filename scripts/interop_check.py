#!/usr/bin/env python3
"""Evaluates a cllm-written model.safetensors in PyTorch, the same way `cllm eval` does.

Loads the file with the `safetensors` package (HF GPT-2 names, F32, model config JSON in the
metadata key `cllm.config`) into the reference model (scripts/reference.py) and computes the mean
next-byte cross-entropy over consecutive non-overlapping windows of the context T:
window i takes input bytes [i*T, i*T+T) and targets [i*T+1, i*T+T+1); the first N windows that
fit in the file are used (all of them by default). Prints one JSON object:
{"loss", "bits_per_byte", "windows", "tokens"}; compare it with `cllm eval` on the same file.

    python scripts/interop_check.py --model runs/x/model.safetensors \
        --data /work/shared/data/tinyshakespeare.txt --windows 256

Not run in CI (needs torch + safetensors + numpy).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference import load_cllm_safetensors  # noqa: E402


def eval_windows(model, data: bytes, windows: int | None, batch: int = 64, seq: int | None = None):
    """Mean cross-entropy (nats) over the first `windows` windows of length `seq` (default: the
    model's context). Every window has the same length, so the mean over windows of per-window
    means equals the mean over all tokens; we sum per-token losses in float64 to be exact."""
    T = seq or model.cfg.context
    fit = (len(data) - 1) // T  # window i fits iff i*T + T + 1 <= len(data)
    n = fit if windows is None else min(windows, fit)
    if n <= 0:
        raise SystemExit(f"data has {len(data)} bytes: not even one window of {T}+1 fits")
    buf = torch.frombuffer(bytearray(data[: n * T + 1]), dtype=torch.uint8).long()
    total = 0.0
    with torch.no_grad():
        for start in range(0, n, batch):
            k = min(batch, n - start)
            idx = (torch.arange(start, start + k) * T).unsqueeze(1) + torch.arange(T)  # [k, T]
            x, y = buf[idx], buf[idx + 1]
            logits = model.logits(x)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                  reduction="sum")
            total += nll.double().item()
    tokens = n * T
    loss = total / tokens
    return {"loss": loss, "bits_per_byte": loss / math.log(2), "windows": n, "tokens": tokens}


def main(argv=None):
    ap = argparse.ArgumentParser(description="PyTorch eval of a cllm model.safetensors")
    ap.add_argument("--model", required=True, help="cllm-written model.safetensors")
    ap.add_argument("--data", default="/work/shared/data/tinyshakespeare.txt",
                    help="text file (raw bytes) to evaluate on")
    ap.add_argument("--windows", type=int, default=None,
                    help="use the first N windows that fit (default: all)")
    ap.add_argument("--batch", type=int, default=64, help="windows per forward pass")
    ap.add_argument("--float64", action="store_true", help="evaluate in float64")
    args = ap.parse_args(argv)

    dtype = torch.float64 if args.float64 else torch.float32
    model = load_cllm_safetensors(args.model, dtype=dtype)
    with open(args.data, "rb") as f:
        data = f.read()
    out = eval_windows(model, data, args.windows, args.batch)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
