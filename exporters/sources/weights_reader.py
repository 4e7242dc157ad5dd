"""Tensor-by-tensor reads from an HF folder's safetensors, without mapping the files.

The onnx stage streams gigabytes of weights into model.onnx_data. `safe_open` memory-maps
each file, and every page it touches stays in the process's resident set while the map
lives: reading a 4.4 GB checkpoint that way shows a 4.4 GB RSS. Here each tensor is one
`pread` into a fresh array that is freed after it is written, so resident memory holds
one tensor at a time. The safetensors layout is a little-endian u64 header length, a JSON
header {name: {dtype, shape, data_offsets}}, then the raw bytes; nothing is executed.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exportline.exporters.core.errors import SourceError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_MAX_HEADER = 100 << 20  # the format's own limit on the JSON header
_PREAD_MAX = 1 << 30
_DTYPES = {  # safetensors dtype → numpy dtype of the stored bytes
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    dtype: str  # safetensors name, e.g. "F32"
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in `file`
    nbytes: int


def weight_files(folder: Path) -> list[str]:
    """The safetensors files of an HF folder (+ the index when sharded), folder-relative."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        index = _read_index(folder / INDEX)
        return [INDEX, *sorted(set(index.values()))]
    if (folder / SINGLE).is_file():
        return [SINGLE]
    raise SourceError(f"{folder} has no {SINGLE} or {INDEX}; run the hf stage first (--stages hf,onnx)")


def shard_paths(folder: Path) -> list[Path]:
    """The safetensors files themselves (model.safetensors, or the shards the index lists)."""
    return [Path(folder) / name for name in weight_files(folder) if name != INDEX]


def _read_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SourceError(f"{path} is not a safetensors index ({exc}); re-run the hf stage with --force") from None
    for name in weight_map.values():
        if Path(name).name != name:
            raise SourceError(f"{path} points outside its folder ({name!r}); re-save the checkpoint")
    return weight_map


def _read_header(path: Path) -> dict[str, StoredTensor]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        (length,) = struct.unpack("<Q", raw) if len(raw) == 8 else (size + 1,)
        if length > min(_MAX_HEADER, size - 8):
            raise SourceError(f"{path} is not a safetensors file (bad header length); re-run the hf stage with --force")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise SourceError(f"{path} has a corrupt safetensors header; re-run the hf stage with --force") from None
    base = 8 + length
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        shape = tuple(int(d) for d in entry["shape"])
        dtype = entry["dtype"]
        if dtype not in _DTYPES:
            raise SourceError(f"{path}: tensor {name} has dtype {dtype}, which exportline cannot convert to ONNX")
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
        if end - begin != expected or base + end > size:
            raise SourceError(f"{path} is truncated or corrupt at tensor {name}; re-run the hf stage with --force")
        out[name] = StoredTensor(path, dtype, shape, base + begin, end - begin)
    return out


class CheckpointWeights:
    """Every tensor of an HF folder's weights, by checkpoint key; data is read on demand."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        files = [p.name for p in shard_paths(self.folder)]
        self.tensors: dict[str, StoredTensor] = {}
        # Keys whose values were read: the graph cache stores no graph that read any while
        # it was built (its structure would hold one checkpoint's numbers).
        self.keys_read: set[str] = set()
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise SourceError(f"{path} is listed in {INDEX} but missing; re-run the hf stage with --force")
            self.tensors.update(_read_header(path))

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def key_for(self, names: list[str], base_prefix: str) -> str | None:
        """The stored key of a parameter known by `names` (tied parameters have several):
        as named, or without / with the base model prefix (`model.`, `transformer.`), since
        checkpoints saved from the base model lack it. None when none is stored."""
        for name in names:
            stripped = name[len(base_prefix) + 1:] if base_prefix and name.startswith(base_prefix + ".") else None
            for candidate in (name, stripped, f"{base_prefix}.{name}" if base_prefix else None):
                if candidate and candidate in self.tensors:
                    return candidate
        return None

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def read_stored(self, key: str, into: np.ndarray | None = None) -> np.ndarray:
        """One tensor as stored (bf16 as uint16), read into the uint8 buffer `into` when given
        (reused by the writer threads, sparing a page fault per 4 KiB of every tensor)."""
        stored = self.tensors[key]
        self.keys_read.add(key)
        buf = np.empty(stored.nbytes, dtype=np.uint8) if into is None else into[: stored.nbytes]
        view, done = memoryview(buf), 0
        fd = os.open(stored.file, os.O_RDONLY)
        try:
            while done < stored.nbytes:  # Linux reads at most ~2 GiB per call
                got = os.preadv(fd, [view[done:done + _PREAD_MAX]], stored.offset + done)
                if got <= 0:
                    raise SourceError(f"{stored.file} ended early reading {key}; re-run the hf stage with --force")
                done += got
        finally:
            os.close(fd)
        return buf.view(_DTYPES[stored.dtype]).reshape(stored.shape)

    def read(self, key: str, dtype: np.dtype, into: np.ndarray | None = None) -> np.ndarray:
        """One tensor as `dtype`; bf16/fp16 widen exactly to float32 (in a new array)."""
        array = self.read_stored(key, into)
        if self.tensors[key].dtype == "BF16":  # bfloat16 is the upper half of a float32
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array if array.dtype == dtype else array.astype(dtype)
