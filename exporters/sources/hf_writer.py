"""The HF folder at the bundle root: writing (safetensors weights, config, generation
config) and reading back its config and tensors without building a model.

Every source's `write_hf` ends here, so the folder layout (DESIGN.md §2) and the handling
of a full disk are decided once. Weights are written as they are made, one tensor held at
a time: a preset's random init (write_hf_stream) and the nanoGPT / llama2.c conversions
(write_hf_converted, byte for byte save_file's layout) and nanoGPT's optimizer state
(write_safetensors_streamed). write_hf_weights takes a whole state dict, for sources that
have one anyway (an nn.Module of the user's).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

from exportline.exporters.core.errors import ArtifactError, StageError

SHARD_BYTES = 5 * 10**9  # above this, model.safetensors is sharded with an index


def write_hf_weights(state: dict, dest: Path, *, max_shard_bytes: int = SHARD_BYTES) -> list[str]:
    """model.safetensors, or shards + model.safetensors.index.json above `max_shard_bytes`."""
    total = sum(t.numel() * t.element_size() for t in state.values())
    if total <= max_shard_bytes:
        save_safetensors(state, dest / "model.safetensors")
        return ["model.safetensors"]
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    weight_map, files = {}, []
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, dest / fname)
        weight_map.update({k: fname for k in shard})
        files.append(fname)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return files + ["model.safetensors.index.json"]


# torch dtype name → safetensors dtype, as safetensors.torch names them.
_SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "complex64": "C64",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint64": "U64", "uint32": "U32",
    "uint16": "U16", "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2fnuz": "F8_E5M2FNUZ",
}


def safetensors_dtype(dtype) -> str | None:
    """The safetensors name of a torch dtype, None when safetensors cannot store it."""
    return _SAFETENSORS_DTYPES.get(str(dtype).removeprefix("torch."))


@functools.cache
def _save_file_rank() -> dict[str, int]:
    """Where each dtype goes in save_file's layout: its Rust writer sorts by dtype (widest
    first, in the order of its own enum, e.g. BF16 before F16 and I64 before F64) and then
    by name. The order is read off the library itself, so a new safetensors cannot make the
    streamed files differ from its own."""
    import torch
    from safetensors.torch import save

    probe = {name: torch.zeros(1, dtype=getattr(torch, dtype)) for dtype, name in _SAFETENSORS_DTYPES.items()
             if hasattr(torch, dtype)}
    data = save(probe)
    (n,) = struct.unpack("<Q", data[:8])
    order = [k for k in json.loads(data[8:8 + n]) if k != "__metadata__"]
    return {name: i for i, name in enumerate(order)}


def save_file_order(entry: tuple) -> tuple[int, str]:
    """The sort key of a (name, shape, torch dtype) entry in save_file's layout."""
    name, _, dtype = entry
    return _save_file_rank()[safetensors_dtype(dtype)], name


def plan_shards(plan: list[tuple[str, tuple[int, ...], Any]], max_shard_bytes: int) -> list[list[tuple]]:
    """The tensors of `plan` ((name, shape, torch dtype) in write order) grouped into shards
    of at most `max_shard_bytes` (one tensor larger than that gets its own)."""
    shards, current, size = [], [], 0
    for entry in plan:
        nbytes = _nbytes(entry)
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    return shards + [current]


def _nbytes(entry) -> int:
    _, shape, dtype = entry
    return math.prod(shape) * dtype.itemsize


def _header(entries: list[tuple]) -> bytes:
    """The safetensors header: u64 length, then JSON {name: dtype, shape, data_offsets},
    padded with spaces to 8 bytes as the reference writer does."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for entry in entries:
        name, shape, dtype = entry
        header[name] = {"dtype": safetensors_dtype(dtype), "shape": list(shape),
                        "data_offsets": [offset, offset + _nbytes(entry)]}
        offset += _nbytes(entry)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()  # serde_json keeps UTF-8
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_hf_stream(plan: list[tuple], tensors: Iterator[tuple[str, Any]], dest: Path, *,
                    max_shard_bytes: int = SHARD_BYTES) -> list[str]:
    """model.safetensors (or shards + index) written as `tensors` arrive, in `plan` order:
    the headers come from the plan, so each tensor is written and dropped at once and the
    writer holds one tensor, not the model (a 10 B random init is 20-40 GB)."""
    return _write_shards(plan_shards(plan, max_shard_bytes), tensors, dest, plan=plan)


def write_hf_converted(plan: list[tuple], tensors: Callable[[list[str]], Iterator[tuple[str, Any]]], dest: Path, *,
                       max_shard_bytes: int = SHARD_BYTES) -> list[str]:
    """A conversion's HF weights, streamed: `tensors(names)` yields (name, tensor) in the order
    asked. That order is save_file's (save_file_layout), so the files are byte for byte what
    write_hf_weights writes from the whole state dict `plan` describes, while one tensor
    exists at a time. The generator is run to its end, so code after its last yield (a
    converter dropping the source pages it read) runs too."""
    shards = save_file_layout(plan, max_shard_bytes)
    return _write_shards(shards, tensors([e[0] for shard in shards for e in shard]), dest, plan=plan)


def save_file_layout(plan: list[tuple], max_shard_bytes: int = SHARD_BYTES) -> list[list[tuple]]:
    """The shards write_hf_weights makes of a state dict in `plan` order (grouped in that
    order), each in the order safetensors' save_file lays tensors out: larger dtypes first,
    then by name (its Rust `prepare` sorts so; tests/test_convert_stream.py checks the bytes)."""
    return [sorted(shard, key=save_file_order) for shard in plan_shards(plan, max_shard_bytes)]


def write_safetensors_streamed(plan: list[tuple], tensors: Callable[[list[str]], Iterator[tuple[str, Any]]],
                               path: Path) -> None:
    """One safetensors file, byte for byte what save_file writes from the whole dict `plan`
    describes (one file at any size, metadata format=pt), with `tensors(names)` yielding the
    tensors in the order asked, so one exists at a time (a training state is 2x the weights)."""
    entries = sorted(plan, key=save_file_order)
    stream = tensors([e[0] for e in entries])
    _write_file(path, entries, stream)
    if next(stream, None) is not None:
        raise StageError("hf: more tensors than the plan lists; this is a bug")


def _write_shards(shards: list[list[tuple]], tensors: Iterator[tuple[str, Any]], dest: Path, *,
                  plan: list[tuple]) -> list[str]:
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for fname, entries in zip(names, shards):
        _write_file(dest / fname, entries, tensors)
    if next(tensors, None) is not None:
        raise StageError("hf: more tensors than the plan lists; this is a bug")
    if len(shards) == 1:
        return names
    shard_of = {e[0]: fname for fname, entries in zip(names, shards) for e in entries}
    index = {"metadata": {"total_size": sum(_nbytes(e) for e in plan)},
             "weight_map": {e[0]: shard_of[e[0]] for e in plan}}  # plan order, as write_hf_weights writes it
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names + ["model.safetensors.index.json"]


def _write_file(path: Path, entries: list[tuple], tensors: Iterator[tuple[str, Any]]) -> None:
    """The header of `entries`, then each tensor's bytes as `tensors` yields it, in that order."""
    import torch

    with open(path, "wb") as f:
        f.write(_header(entries))
        for name, shape, dtype in entries:
            got, tensor = next(tensors)
            if got != name or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise StageError(f"hf: tensor {got} {list(tensor.shape)} does not follow the plan ({name}); this is a bug")
            if tensor.numel():  # numpy cannot view an empty tensor's bytes; there are none to write
                f.write(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()))
            del tensor


def save_safetensors(state: dict, path: Path) -> None:
    """safetensors' save_file, with its I/O failures turned back into OSError.

    The Rust writer reports a full disk as SafetensorError("... (os error 28)"), not as
    OSError; the pipeline turns OSError into a one-line "disk is full" message.
    """
    from safetensors.torch import save_file

    try:
        save_file(state, path, metadata={"format": "pt"})
    except OSError:
        raise
    except Exception as exc:
        raise translate_write_error(exc, path) from None


def translate_write_error(exc: Exception, path: Path) -> Exception:
    """OSError(errno) for a Rust-side "(os error N)", else a StageError naming the file."""
    code = re.search(r"os error (\d+)", str(exc))
    if code:
        errno_ = int(code.group(1))
        return OSError(errno_, os.strerror(errno_), str(path))
    return StageError(f"writing {Path(path).name} failed: {exc}; re-run the export with --force")


def write_config_files(config, dest: Path, *, dtype: str = "float32") -> None:
    """config.json (dtype: how the weights are stored) and a greedy generation_config.json;
    then config.json and tokenizer_config.json made readable by transformers 4.x too (hf_compat)."""
    from transformers import GenerationConfig

    from exportline.exporters.sources.hf_compat import make_portable

    config.dtype = dtype
    config.save_pretrained(dest)
    max_length = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        do_sample=False, max_length=max_length,
    ).save_pretrained(dest)
    make_portable(dest)


def load_config(folder: Path):
    """The folder's config.json as a transformers config (no weights, no custom code, no
    network); a missing or broken file is one line that names it."""
    from transformers import AutoConfig

    read_hf_config(folder)  # the one-line errors for a missing or invalid file
    with quiet_transformers():
        return AutoConfig.from_pretrained(str(folder), local_files_only=True)


def read_hf_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing; export the hf stage first: exportline export SOURCE --stages hf") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); re-run the export with --force") from None


def read_hf_weights(folder: Path) -> dict:
    """Every tensor of the folder's safetensors, by name (torch, as stored)."""
    from safetensors import safe_open

    from exportline.exporters.sources.weights_reader import shard_paths

    state = {}
    for path in shard_paths(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    state[key] = f.get_tensor(key)
        except Exception as exc:  # SafetensorError for a truncated or foreign file
            raise ArtifactError(f"{path} cannot be read ({exc}); re-run the export with --force") from None
    return state


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No tqdm bars from transformers' loading/saving: progress goes through `progress`."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
