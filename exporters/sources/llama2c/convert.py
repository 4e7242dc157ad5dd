"""llama2.c legacy (v0) `.bin` checkpoints → HF LlamaForCausalLM.

The format is what karpathy/llama2.c `export.py` legacy_export writes and `run.c`
memory_map_weights reads: a header of 7 little-endian int32 (dim, hidden_dim, n_layers,
n_heads, n_kv_heads, vocab_size, max_seq_len; a negative vocab_size means the classifier
is NOT shared with the embedding), then fp32 tensors, each kind for all layers in turn:
token_embedding, attention_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3, final norm, the
RoPE tables freqs_cos and freqs_sin ([max_seq_len, head_dim/2] each, skipped: HF
recomputes them), and the classifier when not shared. Read with numpy; no pickle.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exportline.exporters.core.errors import SourceError
from exportline.exporters.sources.base import CheckpointSource, Progress

HEADER = struct.Struct("<7i")
V1_MAGIC = 0x616B3432  # "ak42": export.py --version 1/2 files, which have a 256-byte header
RMS_NORM_EPS = 1e-5  # llama2.c ModelArgs.norm_eps; run.c hard-codes 1e-5
ROPE_THETA = 10000.0  # model.py precompute_freqs_cis and run.c
REEXPORT = "re-export it with llama2.c: python export.py out.bin --version 0 --checkpoint ckpt.pt"

# llama2.c tensor → HF name inside `model.layers.{i}.`; None = not per layer.
LAYER_MAP = {
    "attention_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "ffn_norm": "post_attention_layernorm.weight",
    "w1": "mlp.gate_proj.weight",
    "w2": "mlp.down_proj.weight",
    "w3": "mlp.up_proj.weight",
}
# Rotary pairs are interleaved (2i, 2i+1) in llama2.c and split in halves (i, i + d/2) in
# HF; q and k rows are permuted per head (transformers' convert_llama_weights_to_hf).
PERMUTED = {"wq": "n_heads", "wk": "n_kv_heads"}


@dataclass(frozen=True)
class Llama2cHeader:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    max_seq_len: int
    shared_classifier: bool

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """File order and shapes (leading n_layers for per-layer tensors)."""
        L, d, hd, h = self.n_layers, self.dim, self.head_dim, self.hidden_dim
        shapes = [
            ("token_embedding", (self.vocab_size, d)), ("attention_norm", (L, d)),
            ("wq", (L, self.n_heads * hd, d)), ("wk", (L, self.n_kv_heads * hd, d)),
            ("wv", (L, self.n_kv_heads * hd, d)), ("wo", (L, d, self.n_heads * hd)),
            ("ffn_norm", (L, d)), ("w1", (L, h, d)), ("w2", (L, d, h)), ("w3", (L, h, d)),
            ("norm", (d,)), ("freqs_cos", (self.max_seq_len, hd // 2)), ("freqs_sin", (self.max_seq_len, hd // 2)),
        ]
        if not self.shared_classifier:
            shapes.append(("wcls", (self.vocab_size, d)))
        return shapes

    def file_bytes(self) -> int:
        return HEADER.size + 4 * sum(int(np.prod(s)) for _, s in self.tensor_shapes())


def read_header(path: Path) -> Llama2cHeader:
    with open(path, "rb") as f:
        raw = f.read(HEADER.size)
    if raw[:4] == b"PK\x03\x04":
        raise SourceError(f"{path}: this is a PyTorch zip file, not a llama2.c .bin; pass a nanoGPT .pt "
                          "(rename it to .pt) or the HF folder it belongs to")
    if len(raw) < HEADER.size:
        raise SourceError(f"{path}: {len(raw)} bytes is shorter than the 28-byte llama2.c header; {REEXPORT}")
    if struct.unpack("<I", raw[:4])[0] == V1_MAGIC:
        raise SourceError(f"{path}: a llama2.c version 1/2 file (magic 'ak42'); only the legacy v0 layout is read; {REEXPORT}")
    dim, hidden, layers, heads, kv_heads, vocab, seq = HEADER.unpack(raw)
    values = {"dim": dim, "hidden_dim": hidden, "n_layers": layers, "n_heads": heads,
              "n_kv_heads": kv_heads, "vocab_size": abs(vocab), "max_seq_len": seq}
    bad = [k for k, v in values.items() if v <= 0]
    if bad or dim % heads or heads % kv_heads or (dim // heads) % 2:
        raise SourceError(f"{path}: not a llama2.c v0 header ({values}: needs positive sizes, dim divisible by "
                          f"n_heads, n_heads by n_kv_heads, even head_dim); {REEXPORT}")
    header = Llama2cHeader(**values, shared_classifier=vocab > 0)
    size = path.stat().st_size
    if size != header.file_bytes():
        raise SourceError(f"{path}: header {values} (classifier {'shared' if vocab > 0 else 'separate'}) means "
                          f"{header.file_bytes()} bytes but the file has {size}; it is truncated or not a "
                          f"llama2.c v0 file; {REEXPORT}")
    return header


def read_tensors(path: Path) -> tuple[Llama2cHeader, dict[str, np.ndarray]]:
    """Header and read-only fp32 views into the file (np.memmap), by llama2.c name."""
    header = read_header(path)
    data = np.memmap(path, dtype="<f4", mode="r", offset=HEADER.size)
    tensors, at = {}, 0
    for name, shape in header.tensor_shapes():
        n = int(np.prod(shape))
        tensors[name] = data[at:at + n].reshape(shape)
        at += n
    return header, tensors


def permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """[n_heads*head_dim, dim] rows from interleaved pairs to HF's rotate_half halves."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def to_hf_state(header: Llama2cHeader, tensors: dict[str, np.ndarray]) -> dict:
    import torch

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).copy())

    state = {"model.embed_tokens.weight": tensor(tensors["token_embedding"])}
    for i in range(header.n_layers):
        for src, dst in LAYER_MAP.items():
            w = tensors[src][i]
            if src in PERMUTED:
                w = permute_rotary(w, getattr(header, PERMUTED[src]))
            state[f"model.layers.{i}.{dst}"] = tensor(w)
    state["model.norm.weight"] = tensor(tensors["norm"])
    if not header.shared_classifier:
        state["lm_head.weight"] = tensor(tensors["wcls"])
    return state


def hf_config(header: Llama2cHeader):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=header.vocab_size, hidden_size=header.dim, intermediate_size=header.hidden_dim,
        num_hidden_layers=header.n_layers, num_attention_heads=header.n_heads,
        num_key_value_heads=header.n_kv_heads, max_position_embeddings=header.max_seq_len,
        rms_norm_eps=RMS_NORM_EPS, rope_theta=ROPE_THETA, hidden_act="silu",
        tie_word_embeddings=header.shared_classifier, architectures=["LlamaForCausalLM"],
        # llama2.c's sentencepiece vocabulary: <unk>=0, <s>=1, </s>=2 (run.c uses BOS 1)
        bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )


@dataclass
class Llama2cSource(CheckpointSource):
    kind = "llama2c"
    architecture = "llama"

    def own_tokenizer_plan(self) -> dict[str, Any]:
        return {"kind": "none", "reason": "a llama2.c .bin carries no tokenizer (its tokenizer.bin is a separate "
                                          "file in llama2.c's own format); pass --tokenizer tokenizer.json"}

    def write_hf(self, dest: Path, progress: Progress) -> dict[str, Any]:
        from exportline.exporters.sources.hf_writer import write_config_files, write_hf_weights

        progress(f"hf: reading llama2.c checkpoint {self.path.name}")
        header, tensors = read_tensors(self.path)
        config = hf_config(header)
        tok_info = self.write_checked_tokenizer(dest, model_max_length=header.max_seq_len, vocab_size=header.vocab_size)
        state = to_hf_state(header, tensors)
        del tensors
        files = write_hf_weights(state, dest)
        write_config_files(config, dest)
        return {"weights": files, "tokenizer": tok_info, "random_init": False,
                "shared_classifier": header.shared_classifier, "header": asdict(header)}
