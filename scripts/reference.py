#!/usr/bin/env python3
"""PyTorch reference implementation of the cllm model (GPT-2, byte level).

This is the oracle the Rust model is tested against (tests/oracle.rs). It is written to be
read: every operation of the model is spelled out here, in the same order and with the same
parameter names and layouts as cllm (Hugging Face GPT-2 Conv1D convention: a weight is
[in, out] and a linear layer is y = x @ W + b).

Use it as a module:

    from reference import Config, GPT, param_names, load_cllm_safetensors
    model = GPT(Config.tiny())
    loss = model(inputs, targets)          # inputs/targets: int64 [B, T]

or run it to write the test fixture:

    python scripts/reference.py --out tests/fixtures/tiny_reference.safetensors [--seed 1234]

The fixture is two files. `--out` is a cllm model file: the parameters under their HF names,
F32, config JSON in the metadata key `cllm.config` (cllm's loader rejects tensors it does not
know, so nothing else goes in it). Next to it, `<stem>_oracle.safetensors` holds the gradient of
the mean loss at those parameters (`grad.<name>`), the batch (`batch.inputs`, `batch.targets`,
int32 [B, T]), the initial loss (`loss`, [1]) and the losses of ten AdamW steps on that batch
(`adam.losses`, [10]; losses[i] is computed before update i+1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F

LN_EPS = 1e-5
CONFIG_KEY = "cllm.config"


@dataclasses.dataclass(frozen=True)
class Config:
    """Model shape; mirrors `cllm::config::ModelConfig` (same JSON field names)."""

    vocab: int = 256
    layers: int = 2
    heads: int = 2
    embed: int = 32
    context: int = 16

    @staticmethod
    def tiny() -> "Config":
        return Config(vocab=256, layers=2, heads=2, embed=32, context=16)

    @staticmethod
    def small() -> "Config":
        return Config(vocab=256, layers=4, heads=4, embed=128, context=128)

    @staticmethod
    def seed() -> "Config":
        return Config(vocab=256, layers=6, heads=8, embed=256, context=128)

    @property
    def head_dim(self) -> int:
        return self.embed // self.heads

    def to_json(self) -> str:
        # Same key order and compact form that cllm writes.
        return json.dumps(
            {"vocab": self.vocab, "layers": self.layers, "heads": self.heads,
             "embed": self.embed, "context": self.context},
            separators=(",", ":"),
        )

    @staticmethod
    def from_json(text: str) -> "Config":
        d = json.loads(text)
        return Config(**{f.name: int(d[f.name]) for f in dataclasses.fields(Config)})


def param_shapes(cfg: Config) -> "OrderedDict[str, tuple]":
    """Every parameter's HF GPT-2 name and shape, in cllm's flat-buffer order."""
    V, T, C = cfg.vocab, cfg.context, cfg.embed
    shapes = OrderedDict()
    shapes["wte.weight"] = (V, C)
    shapes["wpe.weight"] = (T, C)
    for i in range(cfg.layers):
        p = f"h.{i}."
        shapes[p + "ln_1.weight"] = (C,)
        shapes[p + "ln_1.bias"] = (C,)
        shapes[p + "attn.c_attn.weight"] = (C, 3 * C)
        shapes[p + "attn.c_attn.bias"] = (3 * C,)
        shapes[p + "attn.c_proj.weight"] = (C, C)
        shapes[p + "attn.c_proj.bias"] = (C,)
        shapes[p + "ln_2.weight"] = (C,)
        shapes[p + "ln_2.bias"] = (C,)
        shapes[p + "mlp.c_fc.weight"] = (C, 4 * C)
        shapes[p + "mlp.c_fc.bias"] = (4 * C,)
        shapes[p + "mlp.c_proj.weight"] = (4 * C, C)
        shapes[p + "mlp.c_proj.bias"] = (C,)
    shapes["ln_f.weight"] = (C,)
    shapes["ln_f.bias"] = (C,)
    return shapes


def param_names(cfg: Config) -> list:
    return list(param_shapes(cfg).keys())


class GPT(torch.nn.Module):
    """GPT-2 with tied output head. Parameters live in `self.params` under their HF names."""

    def __init__(self, cfg: Config, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        # ParameterDict keys may not contain '.', so store with '/' and expose HF names.
        self._p = torch.nn.ParameterDict(
            {n.replace(".", "/"): torch.nn.Parameter(torch.zeros(s, dtype=dtype))
             for n, s in param_shapes(cfg).items()}
        )

    # ---- parameter access by HF name -------------------------------------------------------
    def p(self, name: str) -> torch.nn.Parameter:
        return self._p[name.replace(".", "/")]

    def named_hf_parameters(self):
        """(HF name, parameter) in cllm's order."""
        return [(n, self.p(n)) for n in param_names(self.cfg)]

    def state_hf(self) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict((n, t.detach().clone()) for n, t in self.named_hf_parameters())

    @torch.no_grad()
    def load_hf(self, tensors: dict) -> None:
        for n, t in self.named_hf_parameters():
            src = tensors[n]
            if tuple(src.shape) != tuple(t.shape):
                raise ValueError(f"{n}: shape {tuple(src.shape)} != expected {tuple(t.shape)}")
            t.copy_(src.to(t.dtype))

    # ---- initialisation --------------------------------------------------------------------
    @torch.no_grad()
    def init_gpt2(self, gen: torch.Generator) -> None:
        """GPT-2 init: N(0, 0.02) for embeddings and linear weights, N(0, 0.02/sqrt(2L)) for
        the residual output projections, LayerNorm weight 1, every bias 0."""
        std = 0.02
        proj_std = 0.02 / math.sqrt(2 * self.cfg.layers)
        for n, t in self.named_hf_parameters():
            if n.endswith(".bias"):
                t.zero_()
            elif ".ln_" in n or n.startswith("ln_f"):
                t.fill_(1.0)
            elif n.endswith("attn.c_proj.weight") or n.endswith("mlp.c_proj.weight"):
                t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32) * proj_std)
            else:
                t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32) * std)

    @torch.no_grad()
    def perturb_trivial_params(self, gen: torch.Generator, std: float = 0.02) -> None:
        """Adds N(0, std) to every bias and LayerNorm weight so tests exercise their gradients
        (at plain GPT-2 init they are exactly 0 / 1)."""
        for n, t in self.named_hf_parameters():
            if n.endswith(".bias") or ".ln_" in n or n.startswith("ln_f"):
                t.add_(torch.randn(t.shape, generator=gen, dtype=torch.float32) * std)

    # ---- the model -------------------------------------------------------------------------
    def attention(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Causal multi-head self-attention of block i. x: [B, T, C] (already layer-normed)."""
        B, T, C = x.shape
        nh, hd = self.cfg.heads, self.cfg.head_dim
        p = f"h.{i}.attn."
        qkv = x @ self.p(p + "c_attn.weight") + self.p(p + "c_attn.bias")  # [B, T, 3C]
        q, k, v = qkv.split(C, dim=2)  # q, k, v in that order
        # head h is the contiguous chunk [h*hd, (h+1)*hd) of each of q, k, v
        q = q.view(B, T, nh, hd).transpose(1, 2)  # [B, nh, T, hd]
        k = k.view(B, T, nh, hd).transpose(1, 2)
        v = v.view(B, T, nh, hd).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))  # [B, nh, T, T]
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~causal, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v  # [B, nh, T, hd]
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads concatenated back
        return y @ self.p(p + "c_proj.weight") + self.p(p + "c_proj.bias")

    def mlp(self, x: torch.Tensor, i: int) -> torch.Tensor:
        p = f"h.{i}.mlp."
        h = x @ self.p(p + "c_fc.weight") + self.p(p + "c_fc.bias")
        h = F.gelu(h, approximate="tanh")
        return h @ self.p(p + "c_proj.weight") + self.p(p + "c_proj.bias")

    def layer_norm(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        C = self.cfg.embed
        return F.layer_norm(x, (C,), self.p(prefix + ".weight"), self.p(prefix + ".bias"), LN_EPS)

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs: int64 [B, T] (T <= context) -> logits [B, T, V]."""
        B, T = inputs.shape
        if T > self.cfg.context:
            raise ValueError(f"sequence length {T} > context {self.cfg.context}")
        wte = self.p("wte.weight")
        pos = torch.arange(T, device=inputs.device)
        h = wte[inputs] + self.p("wpe.weight")[pos]  # [B, T, C]
        for i in range(self.cfg.layers):
            h = h + self.attention(self.layer_norm(h, f"h.{i}.ln_1"), i)
            h = h + self.mlp(self.layer_norm(h, f"h.{i}.ln_2"), i)
        h = self.layer_norm(h, "ln_f")
        return h @ wte.t()  # tied output head

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-byte cross-entropy over all B*T positions."""
        logits = self.logits(inputs)
        V = self.cfg.vocab
        return F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), reduction="mean")


# ---- safetensors I/O ------------------------------------------------------------------------

def load_cllm_safetensors(path: str, dtype: torch.dtype = torch.float32) -> GPT:
    """Loads a cllm model file (HF names, F32, config JSON in metadata `cllm.config`)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if CONFIG_KEY not in meta:
            raise ValueError(f"{path}: no `{CONFIG_KEY}` metadata")
        cfg = Config.from_json(meta[CONFIG_KEY])
        tensors = {n: f.get_tensor(n) for n in param_names(cfg)}
    model = GPT(cfg, dtype=dtype)
    model.load_hf(tensors)
    return model


# ---- the fixture ----------------------------------------------------------------------------

def default_data_path() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in ("/work/shared/data/tinyshakespeare.txt",
                 os.path.join(here, "..", "shared", "data", "tinyshakespeare.txt")):
        if os.path.exists(cand):
            return cand
    return "/work/shared/data/tinyshakespeare.txt"


def make_batch(data: bytes, B: int, T: int, gen: torch.Generator):
    """B rows of T+1 consecutive bytes from seeded random offsets; targets = inputs shifted."""
    offsets = torch.randint(0, len(data) - T - 1, (B,), generator=gen).tolist()
    rows = [list(data[o:o + T + 1]) for o in offsets]
    chunk = torch.tensor(rows, dtype=torch.int64)
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous(), offsets


def loss_and_grads(model: GPT, inputs, targets):
    model.zero_grad(set_to_none=True)
    loss = model(inputs, targets)
    loss.backward()
    grads = OrderedDict((n, t.grad.detach().clone()) for n, t in model.named_hf_parameters())
    return loss.detach(), grads


def adam_losses(model: GPT, inputs, targets, steps: int = 10) -> torch.Tensor:
    """Loss before each of `steps` AdamW updates on the same batch (losses[0] = initial loss).
    Trains `model` in place."""
    params = [t for _, t in model.named_hf_parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                            foreach=False, fused=False)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(inputs, targets)
        loss.backward()
        losses.append(loss.item())
        opt.step()
    return torch.tensor(losses, dtype=torch.float64)


def finite_difference_check(model: GPT, inputs, targets, gen: torch.Generator,
                            per_tensor: int = 3, h: float = 1e-6):
    """Central differences in float64 on a few random entries of every tensor; returns the worst
    relative error |fd - autograd| / max(|fd|, |autograd|, 1e-10). `model` must be float64."""
    _, grads = loss_and_grads(model, inputs, targets)
    worst = 0.0
    with torch.no_grad():
        for n, t in model.named_hf_parameters():
            flat = t.view(-1)
            idx = torch.randint(0, flat.numel(), (per_tensor,), generator=gen).tolist()
            # also the entry with the largest gradient
            idx.append(int(grads[n].abs().view(-1).argmax()))
            for j in idx:
                old = flat[j].item()
                flat[j] = old + h
                lp = model(inputs, targets).item()
                flat[j] = old - h
                lm = model(inputs, targets).item()
                flat[j] = old
                fd = (lp - lm) / (2 * h)
                ag = grads[n].view(-1)[j].item()
                rel = abs(fd - ag) / max(abs(fd), abs(ag), 1e-10)
                if abs(fd - ag) > 1e-9:  # ignore differences below float64 FD noise
                    worst = max(worst, rel)
    return worst


def build_fixture(seed: int, data_path: str, batch: int = 4, steps: int = 10, verbose=True):
    torch.manual_seed(seed)
    cfg = Config.tiny()
    gen = torch.Generator().manual_seed(seed)

    model = GPT(cfg, dtype=torch.float32)
    model.init_gpt2(gen)
    model.perturb_trivial_params(gen, std=0.02)
    init = model.state_hf()

    with open(data_path, "rb") as f:
        data = f.read()
    inputs, targets, offsets = make_batch(data, batch, cfg.context, gen)

    # float32: the values stored in the fixture
    loss32, grads32 = loss_and_grads(model, inputs, targets)
    losses32 = adam_losses(model, inputs, targets, steps)

    # float64: the same computation from the same (float32) initial weights, to check that the
    # float32 numbers are accurate.
    model64 = GPT(cfg, dtype=torch.float64)
    model64.load_hf(init)
    loss64, grads64 = loss_and_grads(model64, inputs, targets)
    fd_worst = finite_difference_check(model64, inputs, targets,
                                       torch.Generator().manual_seed(seed + 1))
    model64.load_hf(init)
    losses64 = adam_losses(model64, inputs, targets, steps)

    report = {
        "offsets": offsets,
        "loss32": loss32.item(),
        "loss64": loss64.item(),
        "loss_rel_err": abs(loss32.item() - loss64.item()) / abs(loss64.item()),
        "grad_worst_ratio_vs_f64": {},  # max|g32 - g64| / max|g64| per tensor
        "adam_losses32": losses32.tolist(),
        "adam_max_rel_err_vs_f64": float(((losses32 - losses64).abs() / losses64.abs()).max()),
        "fd_check_worst_rel_err_f64": fd_worst,
    }
    for n in grads32:
        g64 = grads64[n]
        d = (grads32[n].double() - g64).abs().max().item()
        report["grad_worst_ratio_vs_f64"][n] = d / g64.abs().max().item()

    # The model file holds the parameters only (cllm's loader rejects unknown tensors); the
    # oracle file holds everything else.
    params = OrderedDict((n, t.contiguous()) for n, t in init.items())
    tensors = OrderedDict()
    for n, g in grads32.items():
        tensors["grad." + n] = g.contiguous()
    tensors["batch.inputs"] = inputs.to(torch.int32).contiguous()
    tensors["batch.targets"] = targets.to(torch.int32).contiguous()
    tensors["loss"] = loss32.reshape(1).to(torch.float32).contiguous()
    tensors["adam.losses"] = losses32.to(torch.float32).contiguous()
    metadata = {CONFIG_KEY: cfg.to_json()}
    return params, tensors, metadata, report


def oracle_path(model_path: str) -> str:
    """`x/tiny_reference.safetensors` -> `x/tiny_reference_oracle.safetensors`."""
    root, ext = os.path.splitext(model_path)
    return root + "_oracle" + (ext or ".safetensors")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures/tiny_reference.safetensors",
                    help="model file (parameters + cllm.config metadata); the oracle data goes "
                         "next to it as <stem>_oracle.safetensors unless --oracle-out is given")
    ap.add_argument("--oracle-out", default=None)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--data", default=default_data_path(), help="text to draw the batch from")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    from safetensors.torch import save_file

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    params, tensors, metadata, report = build_fixture(args.seed, args.data)
    oracle_out = args.oracle_out or oracle_path(args.out)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(oracle_out)), exist_ok=True)
    save_file(params, args.out, metadata=metadata)
    save_file(tensors, oracle_out, metadata=metadata)
    if not args.quiet:
        worst = max(report["grad_worst_ratio_vs_f64"].values())
        print(json.dumps(report, indent=1))
        print(f"wrote {args.out} ({len(params)} parameters) and {oracle_out} "
              f"({len(tensors)} tensors); loss {report['loss32']:.7f}; "
              f"f32 vs f64: loss rel {report['loss_rel_err']:.2e}, worst grad ratio {worst:.2e}, "
              f"adam losses rel {report['adam_max_rel_err_vs_f64']:.2e}; "
              f"FD check (f64) worst rel {report['fd_check_worst_rel_err_f64']:.2e}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
