#!/usr/bin/env python3
"""Makes tests/fixtures/hf/tiny-gpt2/: a Hugging Face GPT2LMHeadModel export, as
`save_pretrained(safe_serialization=True)` writes it (model.safetensors without cllm's metadata,
config.json), plus what transformers computes with it, for tests/hf_interop.rs:

    expected.json   {"loss": mean next-byte cross-entropy over the consecutive 16-byte windows
                     of sample.txt (as `cllm eval` takes them), "windows", "tokens",
                     "prompt", "greedy": the 40 bytes greedy decoding appends to the prompt (byte values),
                     the model seeing the last 16 bytes at each step, as `cllm generate` does}
    sample.txt      the evaluated text (the first 2 KB of data/tinyshakespeare.txt)

Run once with transformers installed (not in CI); the outputs are committed:

    .venv/bin/python scripts/make_hf_fixture.py
"""

import json
import os

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "hf", "tiny-gpt2")
T = 16


def main():
    torch.manual_seed(20261202)
    # cllm's `tiny` shape; a wide init so that the logits are far from ties and greedy
    # decoding is a meaningful comparison.
    cfg = GPT2Config(vocab_size=256, n_positions=T, n_embd=32, n_layer=2, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.3,
                     bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(cfg).eval()
    os.makedirs(OUT, exist_ok=True)
    model.save_pretrained(OUT, safe_serialization=True)
    gen = os.path.join(OUT, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)
    with open(os.path.join(ROOT, "data", "tinyshakespeare.txt"), "rb") as f:
        text = f.read(2048)
    with open(os.path.join(OUT, "sample.txt"), "wb") as f:
        f.write(text)
    n = (len(text) - 1) // T
    buf = torch.tensor(list(text[: n * T + 1]), dtype=torch.long)
    idx = (torch.arange(n) * T).unsqueeze(1) + torch.arange(T)
    with torch.no_grad():
        logits = model(buf[idx]).logits
        nll = F.cross_entropy(logits.reshape(-1, 256).double(), buf[idx + 1].reshape(-1), reduction="sum")
        prompt = "ROMEO:"
        seq = list(prompt.encode())
        for _ in range(40):
            x = torch.tensor([seq[-T:]])
            seq.append(int(model(x).logits[0, -1].argmax()))
    out = {"loss": nll.item() / (n * T), "windows": n, "tokens": n * T, "prompt": prompt,
           "greedy": seq[len(prompt):]}
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
