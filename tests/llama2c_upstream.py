"""llama2.c's own files, written the way karpathy/llama2.c writes them, for the tests:

- `TinyLlama2c`: the parameter layout of llama2.c model.py's Transformer (tok_embeddings,
  layers[i].attention.wq…, feed_forward.w1…, norms, output, freqs_cos/sin), random weights;
- `legacy_export`, `version1_export`, `version2_export`, `quantize_q80`: ports of export.py's
  writers (file versions 0, 1, 2), byte for byte the same layout;
- `train_vocab`: sentencepiece trained with tinystories.py train_vocab's settings;
  `export_tokenizer_bin`: tokenizer.py's Tokenizer.export (tokenizer.bin);
- `run_c()`: tests/llama2c_run.c (a port of run.c) compiled with gcc, cached.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

CACHE = Path(os.environ.get("EXPORTLINE_TEST_CACHE", Path.home() / ".cache" / "exportline-tests"))


@dataclass
class ModelArgs:  # model.py ModelArgs, the fields export.py reads
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = 2
    vocab_size: int = 512
    hidden_dim: int = 192
    max_seq_len: int = 96


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        kv, hd = a.n_kv_heads or a.n_heads, a.dim // a.n_heads
        self.wq = nn.Linear(a.dim, a.n_heads * hd, bias=False)
        self.wk = nn.Linear(a.dim, kv * hd, bias=False)
        self.wv = nn.Linear(a.dim, kv * hd, bias=False)
        self.wo = nn.Linear(a.n_heads * hd, a.dim, bias=False)


class FeedForward(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(a.dim, a.hidden_dim, bias=False)
        self.w2 = nn.Linear(a.hidden_dim, a.dim, bias=False)
        self.w3 = nn.Linear(a.dim, a.hidden_dim, bias=False)


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.attention, self.feed_forward = Attention(a), FeedForward(a)
        self.attention_norm, self.ffn_norm = RMSNorm(a.dim), RMSNorm(a.dim)


class TinyLlama2c(nn.Module):
    """model.py's Transformer parameters. `quiet_ids` get small embedding rows so a shared
    classifier rarely picks them: greedy text then stays printable (no stray bytes, BOS or
    EOS), and the text comparison is about the model, not how two decoders show bad UTF-8."""

    def __init__(self, a: ModelArgs, *, shared: bool = True, seed: int = 0, quiet_ids=range(0, 259)):
        super().__init__()
        self.params = a
        self.tok_embeddings = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList([Block(a) for _ in range(a.n_layers)])
        self.norm = RMSNorm(a.dim)
        self.output = nn.Linear(a.dim, a.vocab_size, bias=False)
        if shared:
            self.tok_embeddings.weight = self.output.weight  # model.py ties them this way
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_((0.5 if p.shape[0] == a.vocab_size else 0.2) * torch.randn(p.shape, generator=g))
            for w in {id(self.output.weight): self.output.weight, id(self.tok_embeddings.weight):
                      self.tok_embeddings.weight}.values():
                w[list(quiet_ids)] *= 0.05
        hd = a.dim // a.n_heads  # model.py precompute_freqs_cis(head_dim, max_seq_len)
        freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
        angles = torch.outer(torch.arange(a.max_seq_len), freqs).float()
        self.register_buffer("freqs_cos", torch.cos(angles), persistent=False)
        self.register_buffer("freqs_sin", torch.sin(angles), persistent=False)


# -- export.py ------------------------------------------------------------------------------------
def serialize_fp32(file, tensor):
    d = tensor.detach().cpu().view(-1).to(torch.float32).numpy()
    file.write(struct.pack(f"{len(d)}f", *d))


def serialize_int8(file, tensor):
    d = tensor.detach().cpu().view(-1).numpy().astype(np.int8)
    file.write(struct.pack(f"{len(d)}b", *d))


def quantize_q80(w, group_size):
    """export.py quantize_q80: symmetric int8 per group; also the fp32 values it dequantises to."""
    assert w.numel() % group_size == 0
    w = w.float().reshape(-1, group_size)
    wmax = torch.abs(w).max(dim=1).values
    scale = wmax / 127.0
    quant = w / scale[:, None]
    int8val = torch.round(quant).to(torch.int8)
    fp32val = (int8val.float() * scale[:, None]).view(-1)
    return int8val, scale, fp32val


def _header_params(model):
    p = model.params
    hidden_dim = model.layers[0].feed_forward.w1.weight.shape[0]
    n_kv_heads = p.n_heads if p.n_kv_heads is None else p.n_kv_heads
    return p, hidden_dim, n_kv_heads, torch.equal(model.tok_embeddings.weight, model.output.weight)


def legacy_export(model, filepath):
    """Version 0. (export.py negates model.params.vocab_size in place; we negate a copy.)"""
    p, hidden_dim, n_kv_heads, shared = _header_params(model)
    with open(filepath, "wb") as out:
        out.write(struct.pack("iiiiiii", p.dim, hidden_dim, p.n_layers, p.n_heads, n_kv_heads,
                              p.vocab_size if shared else -p.vocab_size, p.max_seq_len))
        serialize_fp32(out, model.tok_embeddings.weight)
        for get in (lambda b: b.attention_norm, lambda b: b.attention.wq, lambda b: b.attention.wk,
                    lambda b: b.attention.wv, lambda b: b.attention.wo, lambda b: b.ffn_norm,
                    lambda b: b.feed_forward.w1, lambda b: b.feed_forward.w2, lambda b: b.feed_forward.w3):
            for layer in model.layers:
                serialize_fp32(out, get(layer).weight)
        serialize_fp32(out, model.norm.weight)
        serialize_fp32(out, model.freqs_cos[:p.max_seq_len])
        serialize_fp32(out, model.freqs_sin[:p.max_seq_len])
        if not shared:
            serialize_fp32(out, model.output.weight)


def _versioned_header(out, model, version, shared):
    p, hidden_dim, n_kv_heads, _ = _header_params(model)
    out.write(struct.pack("I", 0x616B3432))
    out.write(struct.pack("i", version))
    out.write(struct.pack("iiiiiii", p.dim, hidden_dim, p.n_layers, p.n_heads, n_kv_heads, p.vocab_size,
                          p.max_seq_len))
    out.write(struct.pack("B", int(shared)))


def _matrices(model):
    layers = model.layers
    return [model.tok_embeddings.weight, *[b.attention.wq.weight for b in layers],
            *[b.attention.wk.weight for b in layers], *[b.attention.wv.weight for b in layers],
            *[b.attention.wo.weight for b in layers], *[b.feed_forward.w1.weight for b in layers],
            *[b.feed_forward.w2.weight for b in layers], *[b.feed_forward.w3.weight for b in layers]]


def _norms(model):
    return [*[b.attention_norm.weight for b in model.layers], *[b.ffn_norm.weight for b in model.layers],
            model.norm.weight]


def version1_export(model, filepath):
    shared = _header_params(model)[3]
    with open(filepath, "wb") as out:
        _versioned_header(out, model, 1, shared)
        out.write(b"\0" * (256 - out.tell()))
        weights = _norms(model) + _matrices(model) + ([] if shared else [model.output.weight])
        for w in weights:
            serialize_fp32(out, w)


def version2_export(model, filepath, group_size=64):
    """Version 2; returns the group size after export.py's back-off."""
    while model.params.dim % group_size != 0:
        group_size //= 2
    shared = _header_params(model)[3]
    weights = _matrices(model) + ([] if shared else [model.output.weight])
    for w in weights:
        assert w.numel() % group_size == 0
    with open(filepath, "wb") as out:
        _versioned_header(out, model, 2, shared)
        out.write(struct.pack("i", group_size))
        out.write(b"\0" * (256 - out.tell()))
        for w in _norms(model):
            serialize_fp32(out, w)
        for w in weights:
            q, s, _ = quantize_q80(w, group_size)
            serialize_int8(out, q)
            serialize_fp32(out, s)
    return group_size


def dequantised_copy(model, group_size) -> TinyLlama2c:
    """The model with every matrix replaced by what quantize_q80 dequantises it to (the
    weights runq.c computes with), for a fp32 reference of a v2 file."""
    import copy

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for w in {id(w): w for w in _matrices(twin) + [twin.output.weight]}.values():  # a tied one once
            w.copy_(quantize_q80(w, group_size)[2].view(w.shape))
    return twin


# -- sentencepiece: tinystories.py train_vocab, tokenizer.py export ------------------------------
def train_vocab(text: str, prefix: Path, vocab_size: int = 512, **overrides) -> Path:
    import sentencepiece as spm

    (corpus := prefix.with_suffix(".txt")).write_text(text, encoding="utf-8")
    settings = dict(model_type="bpe", vocab_size=vocab_size, self_test_sample_size=0, input_format="text",
                    character_coverage=1.0, num_threads=1, split_digits=True, allow_whitespace_only_pieces=True,
                    byte_fallback=True, unk_surface=r" \342\201\207 ", normalization_rule_name="identity")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(prefix), minloglevel=2,
                                   **{**settings, **overrides})
    return prefix.with_suffix(".model")


def export_tokenizer_bin(model_path: Path) -> Path:
    """tokenizer.py Tokenizer.export: the .bin beside the .model."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(model_path))
    tokens, scores = [], []
    for i in range(sp.vocab_size()):
        t, s = sp.id_to_piece(i), sp.get_score(i)
        if i == sp.bos_id():
            t = "\n<s>\n"
        elif i == sp.eos_id():
            t = "\n</s>\n"
        tokens.append(t.replace("▁", " ").encode("utf-8"))
        scores.append(s)
    out = Path(str(model_path).replace(".model", ".bin"))
    with open(out, "wb") as f:
        f.write(struct.pack("I", max(len(t) for t in tokens)))
        for b, score in zip(tokens, scores):
            f.write(struct.pack("fI", score, len(b)))
            f.write(b)
    return out


# -- run.c ---------------------------------------------------------------------------------------
SOURCE = Path(__file__).with_name("llama2c_run.c")


def run_c() -> Path:
    """tests/llama2c_run.c compiled once per source version into the test cache."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("not available: a C compiler (gcc) to build the run.c port")
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    exe = CACHE / f"llama2c_run-{digest}"
    if not exe.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = exe.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([gcc, "-O2", "-o", str(tmp), str(SOURCE), "-lm"], check=True)
        tmp.rename(exe)
    return exe


def run_c_generate(model_bin: Path, tokenizer_bin: Path, prompt: str, max_new_tokens: int):
    """(prompt ids, greedy ids, printed text) from the run.c port."""
    out = subprocess.run([str(run_c()), "generate", str(model_bin), str(tokenizer_bin), str(max_new_tokens), prompt],
                         check=True, capture_output=True).stdout
    prompt_ids, new_ids, text = out.split(b"\n", 2)
    return [int(t) for t in prompt_ids.split()], [int(t) for t in new_ids.split()], text.decode("utf-8")


def run_c_encode(tokenizer_bin: Path, vocab_size: int, texts: list[str], tmp: Path) -> list[list[int]]:
    (path := tmp / "texts.bin").write_bytes(b"".join(t.encode("utf-8") + b"\0" for t in texts))
    out = subprocess.run([str(run_c()), "encode", str(tokenizer_bin), str(vocab_size), str(path)],
                         check=True, capture_output=True, text=True).stdout
    return [[int(t) for t in line.split()] for line in out.splitlines()]
