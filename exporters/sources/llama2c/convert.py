"""llama2.c `.bin` checkpoints (export.py file versions 0, 1 and 2) → HF LlamaForCausalLM.

The formats are what karpathy/llama2.c `export.py` writes (run.c reads v0, runq.c v2):
- v0 (legacy_export): a header of 7 little-endian int32 (dim, hidden_dim, n_layers,
  n_heads, n_kv_heads, vocab_size, max_seq_len; a negative vocab_size means the classifier
  is NOT shared with the embedding), then fp32 tensors, each kind for all layers in turn:
  token_embedding, attention_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3, final norm, the
  RoPE tables freqs_cos and freqs_sin ([max_seq_len, head_dim/2] each, skipped: HF
  recomputes them), and the classifier when not shared.
- v1 (version1_export): a 256-byte header (uint32 magic "ak42", int32 version, the 7
  params, uint8 shared_classifier, zero padding), then fp32 tensors in the order norms,
  token_embedding, wq … w3, classifier when not shared; no RoPE tables.
- v2 (version2_export): the v1 header plus int32 group_size right after the flag byte;
  the norms in fp32, then every matrix (one per layer) as Q8_0: int8 values followed by
  one fp32 scale per group. Read dequantised exactly as runq.c does (q * scale in fp32),
  so the HF model and the verify reference both hold the dequantised weights.
Read with numpy; no pickle. The hf stage reads one HF tensor at a time (`hf_tensors`: a
pread of one layer's slice, nothing left mapped), so it holds a tensor, not the model;
`read_tensors` maps the whole file for the float64 reference and the tests.
"""

from __future__ import annotations

import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from exportline.exporters.core.errors import SourceError
from exportline.exporters.sources.base import CheckpointSource, Progress

HEADER = struct.Struct("<7i")
MAGIC = 0x616B3432  # "ak42": export.py version 1/2 files, which have a 256-byte header
VERSIONED = struct.Struct("<Ii7iB")  # magic, version, the 7 params, shared_classifier
GROUP_SIZE = struct.Struct("<i")  # v2 only, right after the flag byte (export.py packs it unaligned)
VERSIONED_HEADER_BYTES = 256
VERSIONS = (0, 1, 2)
RMS_NORM_EPS = 1e-5  # llama2.c ModelArgs.norm_eps; run.c hard-codes 1e-5
ROPE_THETA = 10000.0  # model.py precompute_freqs_cis and run.c
REEXPORT = "re-export it with llama2.c: python export.py out.bin --version 0 --checkpoint ckpt.pt"
PARAMS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len")
NORMS = ("attention_norm", "ffn_norm", "norm")
MATRICES = ("token_embedding", "wq", "wk", "wv", "wo", "w1", "w2", "w3")
# Tensor order in each file version (wcls is appended when the classifier is not shared).
FILE_ORDER = {
    0: ("token_embedding", "attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3", "norm",
        "freqs_cos", "freqs_sin"),
    1: NORMS + MATRICES,
    2: NORMS + MATRICES,
}

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
    version: int = 0
    group_size: int = 0  # v2: Q8_0 group size; 0 = fp32 weights

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def header_bytes(self) -> int:
        return HEADER.size if self.version == 0 else VERSIONED_HEADER_BYTES

    @property
    def weights_precision(self) -> str:
        if self.version == 2:
            return f"int8 (Q8_0, group size {self.group_size}; dequantised to fp32 as runq.c does)"
        return "fp32"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes by llama2.c name (leading n_layers for per-layer tensors)."""
        L, d, hd, h = self.n_layers, self.dim, self.head_dim, self.hidden_dim
        return {
            "token_embedding": (self.vocab_size, d), "attention_norm": (L, d),
            "wq": (L, self.n_heads * hd, d), "wk": (L, self.n_kv_heads * hd, d),
            "wv": (L, self.n_kv_heads * hd, d), "wo": (L, d, self.n_heads * hd),
            "ffn_norm": (L, d), "w1": (L, h, d), "w2": (L, d, h), "w3": (L, h, d),
            "norm": (d,), "freqs_cos": (self.max_seq_len, hd // 2), "freqs_sin": (self.max_seq_len, hd // 2),
            "wcls": (self.vocab_size, d),
        }

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """File order and shapes."""
        shapes = self.shapes()
        names = FILE_ORDER[self.version] + (() if self.shared_classifier else ("wcls",))
        return [(name, shapes[name]) for name in names]

    def quantized(self, name: str) -> bool:
        return self.version == 2 and (name in MATRICES or name == "wcls")

    def tensor_bytes(self, name: str, shape: tuple[int, ...]) -> int:
        n = int(np.prod(shape))
        return n + 4 * (n // self.group_size) if self.quantized(name) else 4 * n

    def file_bytes(self) -> int:
        return self.header_bytes + sum(self.tensor_bytes(name, shape) for name, shape in self.tensor_shapes())


def read_header(path: Path) -> Llama2cHeader:
    with open(path, "rb") as f:
        raw = f.read(VERSIONED_HEADER_BYTES)
    if raw[:4] == b"PK\x03\x04":
        raise SourceError(f"{path}: this is a PyTorch zip file, not a llama2.c .bin; pass a nanoGPT .pt "
                          "(rename it to .pt) or the HF folder it belongs to")
    if len(raw) < HEADER.size:
        raise SourceError(f"{path}: {len(raw)} bytes is shorter than the 28-byte llama2.c header; {REEXPORT}")
    if struct.unpack_from("<I", raw)[0] == MAGIC:
        values, version, shared, group_size = _versioned_header(path, raw)
    else:
        dim, hidden, layers, heads, kv_heads, vocab, seq = HEADER.unpack_from(raw)
        values = dict(zip(PARAMS, (dim, hidden, layers, heads, kv_heads, abs(vocab), seq)))
        version, shared, group_size = 0, vocab > 0, 0
    bad = [k for k, v in values.items() if v <= 0]
    dim, heads, kv_heads = values["dim"], values["n_heads"], values["n_kv_heads"]
    if bad or dim % heads or heads % kv_heads or (dim // heads) % 2:
        raise SourceError(f"{path}: not a llama2.c v{version} header ({values}: needs positive sizes, dim divisible by "
                          f"n_heads, n_heads by n_kv_heads, even head_dim); {REEXPORT}")
    header = Llama2cHeader(**values, shared_classifier=shared, version=version, group_size=group_size)
    _check_groups(path, header)
    size = path.stat().st_size
    if size != header.file_bytes():
        raise SourceError(f"{path}: v{version} header {values} (classifier {'shared' if shared else 'separate'}) means "
                          f"{header.file_bytes()} bytes but the file has {size}; it is truncated or not a "
                          f"llama2.c v{version} file; {REEXPORT}")
    return header


def _versioned_header(path: Path, raw: bytes) -> tuple[dict[str, int], int, bool, int]:
    if len(raw) < VERSIONED_HEADER_BYTES:
        raise SourceError(f"{path}: {len(raw)} bytes is shorter than the 256-byte llama2.c v1/v2 header; {REEXPORT}")
    _, version, *params, shared = VERSIONED.unpack_from(raw)
    if version not in VERSIONS[1:]:
        raise SourceError(f"{path}: llama2.c file version {version} (magic 'ak42') is unknown; versions 0, 1 and 2 "
                          f"are read; {REEXPORT}")
    group_size = GROUP_SIZE.unpack_from(raw, VERSIONED.size)[0] if version == 2 else 0
    return dict(zip(PARAMS, params)), version, bool(shared), group_size


def _check_groups(path: Path, header: Llama2cHeader) -> None:
    """export.py asserts every quantized matrix splits into whole groups; runq.c relies on it."""
    if header.version != 2:
        return
    sizes = {name: _block_shape(shape)[1] for name, shape in header.tensor_shapes() if header.quantized(name)}
    if header.group_size <= 0 or any(n % header.group_size for n in sizes.values()):
        raise SourceError(f"{path}: llama2.c v2 group size {header.group_size} does not divide the matrices "
                          f"({sizes}); the file is damaged; {REEXPORT}")


def read_tensors(path: Path) -> tuple[Llama2cHeader, dict[str, np.ndarray]]:
    """Header and fp32 tensors by llama2.c name: read-only views into the file (np.memmap)
    for fp32 files, dequantised copies for v2's Q8_0 matrices."""
    header = read_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=header.header_bytes)
    tensors, at = {}, 0
    for name, shape in header.tensor_shapes():
        size = header.tensor_bytes(name, shape)
        raw = data[at:at + size]
        tensors[name] = _dequantize(raw, shape, header) if header.quantized(name) else raw.view("<f4").reshape(shape)
        at += size
    return header, tensors


def _block_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(quantized blocks, values per block): a per-layer stack [L, rows, cols] is L blocks."""
    return (shape[0], int(np.prod(shape[1:]))) if len(shape) == 3 else (1, int(np.prod(shape)))


def _dequantize(raw: np.ndarray, shape: tuple[int, ...], header: Llama2cHeader) -> np.ndarray:
    """Q8_0 blocks, one per layer for per-layer matrices (export.py quantizes each layer's
    weight on its own): int8 values then fp32 scales; value * scale in fp32 as runq.c."""
    blocks, n = _block_shape(shape)
    gs = header.group_size
    out = np.empty(shape, dtype=np.float32)
    flat = out.reshape(blocks, n // gs, gs)
    step = n + 4 * (n // gs)
    for b in range(blocks):
        block = raw[b * step:(b + 1) * step]
        q = block[:n].view(np.int8).reshape(n // gs, gs)
        scale = block[n:].view("<f4")
        np.multiply(q.astype(np.float32), scale[:, None], out=flat[b])
    return out


def permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """[n_heads*head_dim, dim] rows from interleaved pairs to HF's rotate_half halves."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def hf_plan(header: Llama2cHeader) -> list[tuple[str, tuple[int, ...], Any]]:
    """The HF LlamaForCausalLM tensors (name, shape, float32) in state-dict order."""
    import torch

    return [(name, _source_shape(header, src), torch.float32) for name, (src, _) in _hf_sources(header).items()]


def hf_tensors(path: Path, header: Llama2cHeader, names: list[str]) -> Iterator[tuple[str, Any]]:
    """The HF tensors `names` (from hf_plan), one at a time: each is one pread of its bytes
    into a fresh array (a layer's slice of the per-kind stack; v2's Q8_0 dequantised as
    runq.c does), q/k rows permuted for HF's rotary layout. No map of the file is kept,
    so what is resident is the tensor being written, not the pages read before it."""
    import torch

    sources, offsets = _hf_sources(header), _offsets(header)
    fd = os.open(path, os.O_RDONLY)
    try:
        for name in names:
            src, layer = sources[name]
            w = _read_one(fd, header, src, offset=offsets[src], layer=layer, path=path)
            if src in PERMUTED:
                w = np.ascontiguousarray(permute_rotary(w, getattr(header, PERMUTED[src])))
            yield name, torch.from_numpy(w)
            del w
    finally:
        os.close(fd)


def _hf_sources(header: Llama2cHeader) -> dict[str, tuple[str, int | None]]:
    """HF name → (llama2.c tensor, layer index or None), in HF state-dict order."""
    out = {"model.embed_tokens.weight": ("token_embedding", None)}
    for i in range(header.n_layers):
        out.update({f"model.layers.{i}.{dst}": (src, i) for src, dst in LAYER_MAP.items()})
    out["model.norm.weight"] = ("norm", None)
    if not header.shared_classifier:
        out["lm_head.weight"] = ("wcls", None)
    return out


def _source_shape(header: Llama2cHeader, src: str) -> tuple[int, ...]:
    """One HF tensor's shape: a per-layer kind's shape without its leading n_layers."""
    shape = header.shapes()[src]
    return shape[1:] if src in LAYER_MAP else shape


def _offsets(header: Llama2cHeader) -> dict[str, int]:
    """Byte offset of every llama2.c tensor in the file."""
    out, at = {}, header.header_bytes
    for name, shape in header.tensor_shapes():
        out[name] = at
        at += header.tensor_bytes(name, shape)
    return out


def _read_one(fd: int, header: Llama2cHeader, src: str, *, offset: int, layer: int | None, path: Path) -> np.ndarray:
    """One layer's `src` (or the whole tensor) as a fresh float32 array. A per-layer stack is
    layer after layer, each its own Q8_0 block in v2, so layer i starts i blocks in."""
    shape = _source_shape(header, src)
    nbytes = header.tensor_bytes(src, shape)
    buf = np.empty(nbytes, dtype=np.uint8)
    if os.preadv(fd, [buf], offset + (layer or 0) * nbytes) != nbytes:
        raise SourceError(f"{path} ended early reading {src}; the file changed while it was read; {REEXPORT}")
    if header.quantized(src):
        return _dequantize(buf, shape, header)
    return buf.view("<f4").reshape(shape)


def _stop_at_bos_too(dest: Path) -> None:
    """run.c's generate() stops when the model emits BOS (llama2.c trains on stories that
    each start with BOS and end without EOS), so greedy generation stops at EOS or BOS."""
    from transformers import GenerationConfig

    generation = GenerationConfig.from_pretrained(dest, local_files_only=True)
    generation.eos_token_id = [2, 1]
    generation.save_pretrained(dest)


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
        return {"kind": "none", "reason": "a llama2.c .bin carries no tokenizer; pass the vocabulary it was trained "
                                          "with: --tokenizer tokenizer.model (or llama2.c's tokenizer.bin)"}

    def describe(self) -> dict[str, Any]:
        """Adds the file version and the weights' stored precision: a v2 file's int8 weights
        are dequantised, so every bound downstream is against the dequantised model."""
        header = read_header(self.path)
        return {**super().describe(), "file_version": header.version, "weights_precision": header.weights_precision}

    def write_hf(self, dest: Path, progress: Progress) -> dict[str, Any]:
        from exportline.exporters.sources.hf_writer import write_config_files, write_hf_converted

        header = read_header(self.path)
        progress(f"hf: read llama2.c v{header.version} checkpoint {self.path.name}, {header.weights_precision} weights")
        config = hf_config(header)
        tok_info = self.write_checked_tokenizer(dest, model_max_length=header.max_seq_len, vocab_size=header.vocab_size)
        files = write_hf_converted(hf_plan(header), lambda names: hf_tensors(self.path, header, names), dest)
        write_config_files(config, dest)
        _stop_at_bos_too(dest)
        return {"weights": files, "tokenizer": tok_info, "random_init": False,
                "shared_classifier": header.shared_classifier, "header": asdict(header),
                "file_version": header.version, "weights_precision": header.weights_precision}
