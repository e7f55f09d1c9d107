#!/usr/bin/env python3
"""Time PyTorch eager training of the cllm model, for scripts/compare_pytorch.sh.

Same model (scripts/reference.py's GPT, float32), same batch and context, AdamW (lr 1e-3,
betas 0.9/0.999, eps 1e-8, no weight decay) with global-norm clipping at 10.0, one process,
`torch.set_num_threads(threads)`. The attention uses `F.scaled_dot_product_attention` by
default (the fastest eager path; `--plain-attention` times reference.py's explicit one).
Prints one JSON object: median step ms over the timed steps, tokens/s, model GFLOP/s, and the
torch.mm GEMM peak (2048x2048, same thread count) measured in the same process.
"""

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from reference import GPT, Config  # noqa: E402

CONFIGS = {
    "tiny": Config.tiny(),
    "small": Config.small(),
    "seed": Config.seed(),
    "gpt2": Config(vocab=50257, layers=12, heads=12, embed=768, context=1024),
}


def sdpa_attention(self, x, i):
    B, T, C = x.shape
    nh, hd = self.cfg.heads, self.cfg.head_dim
    p = f"h.{i}.attn."
    qkv = x @ self.p(p + "c_attn.weight") + self.p(p + "c_attn.bias")
    q, k, v = qkv.split(C, dim=2)
    q = q.view(B, T, nh, hd).transpose(1, 2)
    k = k.view(B, T, nh, hd).transpose(1, 2)
    v = v.view(B, T, nh, hd).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    y = y.transpose(1, 2).contiguous().view(B, T, C)
    return y @ self.p(p + "c_proj.weight") + self.p(p + "c_proj.bias")


def num_params(cfg):
    C, L = cfg.embed, cfg.layers
    return cfg.vocab * C + cfg.context * C + L * (12 * C * C + 13 * C) + 2 * C


def gemm_peak_gflops(n=2048, reps=5):
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="seed", choices=sorted(CONFIGS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--plain-attention", action="store_true")
    ap.add_argument("--context", type=int, default=0, help="training length (default: the config's)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = CONFIGS[args.config]
    if args.context:
        cfg = dataclasses.replace(cfg, context=args.context)
    if not args.plain_attention:
        GPT.attention = sdpa_attention
    model = GPT(cfg)
    model.init_gpt2(torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "..", "data", "tinyshakespeare.txt"), "rb") as f:
        data = torch.tensor(list(f.read()), dtype=torch.long)
    B, T = args.batch, cfg.context
    gen = torch.Generator().manual_seed(2)
    times = []
    for step in range(args.warmup + args.steps):
        offs = torch.randint(0, len(data) - T - 1, (B,), generator=gen)
        x = torch.stack([data[o:o + T] for o in offs])
        y = torch.stack([data[o + 1:o + T + 1] for o in offs])
        t0 = time.perf_counter()
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        dt = time.perf_counter() - t0
        if step >= args.warmup:
            times.append(dt)
        if not math.isfinite(loss.item()):
            raise SystemExit("pytorch loss is not finite")
    med = statistics.median(times)
    flops_per_token = 6 * num_params(cfg) + 12 * cfg.layers * cfg.context * cfg.embed
    tokens = B * T
    print(json.dumps({
        "impl": "pytorch",
        "torch": torch.__version__,
        "config": args.config,
        "threads": args.threads,
        "median_step_ms": med * 1e3,
        "tokens_per_s": tokens / med,
        "model_gflops": flops_per_token * tokens / med / 1e9,
        "gemm_peak_gflops": gemm_peak_gflops(),
        "final_loss": loss.item(),
    }))


if __name__ == "__main__":
    main()
