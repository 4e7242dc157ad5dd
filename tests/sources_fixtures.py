"""Real checkpoints in the formats exportline reads, built on the fly with random weights.

`NanoGPT` is nanoGPT's GPT (karpathy/nanoGPT model.py) re-typed from the published
architecture, so its state_dict keys, layouts and forward are nanoGPT's; `save_nanogpt`
saves the way nanoGPT's train.py does. `write_llama2c` writes llama2.c's legacy v0 .bin
exactly as export.py legacy_export lays it out.
"""

from __future__ import annotations

import math
import pickle
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class LayerNorm(nn.Module):
    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, a: dict):
        super().__init__()
        self.c_attn = nn.Linear(a["n_embd"], 3 * a["n_embd"], bias=a["bias"])
        self.c_proj = nn.Linear(a["n_embd"], a["n_embd"], bias=a["bias"])
        self.n_head, self.n_embd = a["n_head"], a["n_embd"]

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, a: dict):
        super().__init__()
        self.c_fc = nn.Linear(a["n_embd"], 4 * a["n_embd"], bias=a["bias"])
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * a["n_embd"], a["n_embd"], bias=a["bias"])

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, a: dict):
        super().__init__()
        self.ln_1, self.attn = LayerNorm(a["n_embd"], a["bias"]), CausalSelfAttention(a)
        self.ln_2, self.mlp = LayerNorm(a["n_embd"], a["bias"]), MLP(a)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, a: dict):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(a["vocab_size"], a["n_embd"]),
            wpe=nn.Embedding(a["block_size"], a["n_embd"]),
            drop=nn.Dropout(a["dropout"]),
            h=nn.ModuleList([Block(a) for _ in range(a["n_layer"])]),
            ln_f=LayerNorm(a["n_embd"], a["bias"]),
        ))
        self.lm_head = nn.Linear(a["n_embd"], a["vocab_size"], bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # nanoGPT ties them
        for name, p in self.named_parameters():  # nanoGPT's init, plus non-trivial norms/biases
            std = 0.02 / math.sqrt(2 * a["n_layer"]) if name.endswith("c_proj.weight") else 0.02
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, std)
            else:
                nn.init.normal_(p, 1.0 if "ln_" in name and name.endswith("weight") else 0.0, 0.1)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1])
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def nanogpt_args(**over) -> dict:
    args = dict(n_layer=2, n_head=4, n_embd=32, block_size=96, bias=True, vocab_size=97, dropout=0.0)
    return {**args, **over}


def save_nanogpt(path: Path, args: dict, *, seed: int = 0, compiled: bool = False, iter_num: int = 250) -> NanoGPT:
    """A checkpoint as nanoGPT's train.py writes it (model, optimizer, model_args, iter_num,
    best_val_loss, config); `compiled` adds torch.compile's `_orig_mod.` key prefix."""
    torch.manual_seed(seed)
    model = NanoGPT(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(torch.randint(0, args["vocab_size"], (2, 8))).logsumexp(-1).mean()
    loss.backward()
    optimizer.step()  # a real optimizer state, as in a checkpoint taken mid-training
    optimizer.zero_grad()
    state = model.state_dict()
    if compiled:
        state = {f"_orig_mod.{k}": v for k, v in state.items()}
    config = {"out_dir": "out-test", "batch_size": 12, "learning_rate": 6e-4, "compile": compiled,
              "dataset": "shakespeare_char", "bias": args["bias"], "dtype": "float32", "decay_lr": True}
    torch.save({"model": state, "optimizer": optimizer.state_dict(), "model_args": dict(args),
                "iter_num": iter_num, "best_val_loss": torch.tensor(1.4693), "config": config}, path)
    return model


def write_meta(path: Path, text: str) -> dict:
    """nanoGPT data/shakespeare_char/prepare.py's meta.pkl for the characters of `text`."""
    chars = sorted(set(text))
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    with open(path, "wb") as f:
        pickle.dump(meta, f)
    return meta


def write_llama2c(path: Path, *, dim=32, hidden_dim=88, n_layers=2, n_heads=4, n_kv_heads=2,
                  vocab_size=101, max_seq_len=96, shared=True, seed=0) -> dict[str, np.ndarray]:
    """llama2.c export.py legacy_export: 7-int header (negative vocab = separate classifier),
    then fp32 tensors kind by kind over all layers, freqs_cos/sin, and wcls if not shared."""
    rng = np.random.default_rng(seed)
    hd = dim // n_heads

    def w(*shape, scale=0.05, mean=0.0):
        return (mean + scale * rng.standard_normal(shape)).astype(np.float32)

    t = {
        "token_embedding": w(vocab_size, dim, scale=0.5),
        "attention_norm": w(n_layers, dim, mean=1.0, scale=0.1),
        "wq": w(n_layers, n_heads * hd, dim, scale=0.2), "wk": w(n_layers, n_kv_heads * hd, dim, scale=0.2),
        "wv": w(n_layers, n_kv_heads * hd, dim, scale=0.2), "wo": w(n_layers, dim, n_heads * hd, scale=0.2),
        "ffn_norm": w(n_layers, dim, mean=1.0, scale=0.1),
        "w1": w(n_layers, hidden_dim, dim, scale=0.2), "w2": w(n_layers, dim, hidden_dim, scale=0.2),
        "w3": w(n_layers, hidden_dim, dim, scale=0.2), "norm": w(dim, mean=1.0, scale=0.1),
    }
    freqs = 1.0 / (10000.0 ** (np.arange(0, hd, 2)[: hd // 2].astype(np.float32) / hd))
    angles = np.outer(np.arange(max_seq_len), freqs).astype(np.float32)
    t["freqs_cos"], t["freqs_sin"] = np.cos(angles), np.sin(angles)
    if not shared:
        t["wcls"] = w(vocab_size, dim, scale=0.5)
    with open(path, "wb") as f:
        f.write(struct.pack("iiiiiii", dim, hidden_dim, n_layers, n_heads, n_kv_heads,
                            vocab_size if shared else -vocab_size, max_seq_len))
        for name in ("token_embedding", "attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3",
                     "norm", "freqs_cos", "freqs_sin", "wcls"):
            if name in t:
                f.write(t[name].astype("<f4").tobytes())
    return t


def cli(*args: str) -> tuple[int, str]:
    """`exportline ARGS` in this process through the real entry point (exportline.exporters.cli.app:main):
    exit code and everything written to stderr."""
    import contextlib
    import io
    import sys

    from exportline.exporters.cli.app import main

    err, argv = io.StringIO(), sys.argv
    sys.argv = ["exportline", *map(str, args)]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    return code, err.getvalue()


def error_line(stderr: str) -> str:
    """The single `error: ...` line of a failed command (and proof there is no traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor, so -0.0/0.0 and NaN payloads count as different."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
