#!/usr/bin/env python3
"""Both directions of the Hugging Face interop, with transformers installed (not in CI).

1. transformers -> cllm: a random GPT2LMHeadModel of GPT-2 124M's shape (12 x 12 x 768, context
   1024, vocabulary 50257), `save_pretrained`, then `cllm eval` / `cllm generate` on the export.
2. cllm -> transformers: a cllm checkpoint (default: train `small` for 200 steps) loaded with
   `GPT2LMHeadModel.from_pretrained(step_dir)`.

Each direction compares the mean next-byte loss over the first windows of a text (relative
difference must be <= 1e-5) and 100 bytes of greedy continuation (must be identical). cllm's
models are byte-level: its greedy step picks the most likely of the ids 0..255, so the Python
side takes the argmax over the same 256 logits (for a 256-entry vocabulary, all of them).

    .venv/bin/python scripts/hf_check.py [--cllm target/release/cllm] [--checkpoint DIR]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def hf_loss(model, data: bytes, windows: int) -> float:
    T = model.config.n_positions
    n = min(windows, (len(data) - 1) // T)
    buf = torch.tensor(list(data[: n * T + 1]))
    total = 0.0
    with torch.no_grad():
        for i in range(n):
            x, y = buf[i * T:(i + 1) * T], buf[i * T + 1:(i + 1) * T + 1]
            logits = model(x.unsqueeze(0)).logits[0]
            total += F.cross_entropy(logits.double(), y, reduction="sum").item()
    return total / (n * T)


def hf_greedy(model, prompt: bytes, tokens: int) -> bytes:
    T = model.config.n_positions
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(tokens):
            logits = model(torch.tensor([seq[-T:]])).logits[0, -1, :256]
            seq.append(int(logits.argmax()))
    return bytes(seq[len(prompt):])


def cllm_loss(cllm, ckpt, data_path, windows):
    out = subprocess.run([cllm, "eval", "--checkpoint", ckpt, "--data", data_path, "--max-windows", str(windows),
                          "--json"], check=True, capture_output=True)
    return json.loads(out.stdout)["loss"]


def cllm_greedy(cllm, ckpt, prompt: bytes, tokens: int) -> bytes:
    out = subprocess.run([cllm, "generate", "--checkpoint", ckpt, "--prompt", prompt.decode(), "--tokens", str(tokens),
                          "--temperature", "0", "--no-prompt"], check=True, capture_output=True)
    return out.stdout[:tokens]


def compare(name, model, ckpt, args, data: bytes):
    want_loss = hf_loss(model, data, args.windows)
    got_loss = cllm_loss(args.cllm, ckpt, args.data, args.windows)
    rel = abs(got_loss - want_loss) / abs(want_loss)
    prompt = b"ROMEO:"
    same = hf_greedy(model, prompt, 100) == cllm_greedy(args.cllm, ckpt, prompt, 100)
    ok = rel <= 1e-5 and same
    print(json.dumps({"check": name, "transformers_loss": want_loss, "cllm_loss": got_loss, "relative": rel,
                      "greedy_100_identical": same, "ok": ok}))
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cllm", default=os.path.join(ROOT, "target", "release", "cllm"))
    ap.add_argument("--checkpoint", help="a cllm step directory (default: train small for 200 steps)")
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "tinyshakespeare.txt"))
    ap.add_argument("--windows", type=int, default=4)
    args = ap.parse_args()
    data = open(args.data, "rb").read()
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        cfg = GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # GPT-2 124M's shape
        export = os.path.join(tmp, "gpt2-random")
        GPT2LMHeadModel(cfg).eval().save_pretrained(export, safe_serialization=True)
        ok &= compare("transformers -> cllm (gpt2 shape, random)", GPT2LMHeadModel.from_pretrained(export).eval(),
                      export, args, data)
        ckpt = args.checkpoint
        if ckpt is None:
            run = os.path.join(tmp, "run")
            subprocess.run([args.cllm, "train", "--config", "small", "--steps", "200", "--out", run, "--quiet"],
                           check=True)
            ckpt = os.path.join(run, "step-000200")
        ok &= compare("cllm -> transformers (trained small)", GPT2LMHeadModel.from_pretrained(ckpt).eval(), ckpt,
                      args, data)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
