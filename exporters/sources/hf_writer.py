"""The HF folder at the bundle root: writing (safetensors weights, config, generation
config) and reading back its config and tensors without building a model.

Every source's `write_hf` ends here, so the folder layout (DESIGN.md §2) and the handling
of a full disk are decided once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Iterator

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


def write_config_files(config, dest: Path) -> None:
    """config.json (fp32) and a greedy generation_config.json from the model config; then
    config.json and tokenizer_config.json made readable by transformers 4.x too (hf_compat)."""
    from transformers import GenerationConfig

    from exportline.exporters.sources.hf_compat import make_portable

    config.dtype = "float32"
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
