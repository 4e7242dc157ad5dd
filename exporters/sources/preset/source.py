"""A preset (configs/<name>.yaml) without `checkpoint:`: a seeded random init, labelled so.

The HF folder is written tensor by tensor from a meta-device skeleton; the float64
reference is the HF model itself (there is no second implementation of a random init).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from exportline.exporters.core.presets import Preset
from exportline.exporters.sources.base import Progress


@dataclass
class PresetSource:
    preset: Preset
    kind: str = "preset"

    @property
    def name(self) -> str:
        return self.preset.name

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "preset": self.preset.name, "architecture": self.preset.architecture,
            "checkpoint": self.preset.checkpoint, "random_init": self.preset.random_init,
            "labels": ["random-init"] if self.preset.random_init else [],
            "seed": self.preset.seed, "model": self.preset.model, "tokenizer": {"kind": self.preset.tokenizer.kind},
            "thresholds": self.preset.thresholds, "dtype": self.preset.dtype,
        }

    def fingerprint(self) -> str:
        blob = json.dumps(
            {"model": self.preset.model, "seed": self.preset.seed, "tokenizer": vars(self.preset.tokenizer),
             "architecture": self.preset.architecture, **_dtype_key(self.preset.dtype)}, sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def write_hf(self, dest: Path, progress: Progress) -> dict[str, Any]:
        from transformers import AutoTokenizer

        from exportline.exporters.sources.hf_writer import write_config_files, write_hf_stream
        from exportline.exporters.sources.tokenizer import BOS, EOS, PAD, train_bpe

        preset = self.preset
        dtype = weight_dtype(preset.dtype)  # refused before any work
        config = preset.hf_config()
        progress(f"hf: random init of {preset.name} (seed {preset.seed})")
        if preset.tokenizer.kind == "none":
            tok_info = {"kind": "none", "reason": f"preset {preset.name} sets tokenizer.kind: none"}
        else:
            tok_info = train_bpe(preset.tokenizer.vocab_size, dest, model_max_length=config.max_position_embeddings)
            tok = AutoTokenizer.from_pretrained(dest)
            config.bos_token_id = tok.convert_tokens_to_ids(BOS)
            config.eos_token_id = tok.convert_tokens_to_ids(EOS)
            config.pad_token_id = tok.convert_tokens_to_ids(PAD)
        files = write_hf_stream(random_init_plan(config, dtype), random_init_tensors(config, preset.seed, dtype=dtype), dest)
        write_config_files(config, dest, dtype=preset.dtype)
        return {"weights": files, "tokenizer": tok_info, "random_init": True}


def weight_dtype(name: str):
    """A preset's `dtype:` as a torch dtype; anything else is refused in one line."""
    import torch

    from exportline.exporters.core.errors import ConfigError

    if name not in ("float32", "bfloat16"):
        raise ConfigError(f"preset dtype {name!r} is not supported; use float32 or bfloat16")
    return getattr(torch, name)


def _dtype_key(name: str) -> dict[str, str]:
    """float32 presets keep the fingerprint they had before `dtype:` existed."""
    return {} if name == "float32" else {"dtype": name}


def _skeleton(config):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def random_init_plan(config, dtype) -> list[tuple[str, tuple[int, ...], Any]]:
    """(name, shape, dtype) of every tensor random_init_tensors yields, in its order: what a
    streaming writer needs to lay out the safetensors headers before any tensor exists."""
    tied = getattr(config, "tie_word_embeddings", False)
    return [(name, tuple(p.shape), dtype) for name, p in _skeleton(config).state_dict(keep_vars=True).items()
            if not (name == "lm_head.weight" and tied)]


def random_init_tensors(config, seed: int, *, dtype=None) -> Iterator[tuple[str, Any]]:
    """Seeded init in HF's scheme (normal(0, initializer_range) matrices, ones for norms),
    tensor by tensor from a meta-device skeleton, so a checker can regenerate and compare
    one tensor at a time. Tied lm_head is left out (HF ties it on load). Drawn in float32
    (the same numbers whatever is stored), then rounded to `dtype` when given."""
    import torch

    skeleton = _skeleton(config)
    gen = torch.Generator().manual_seed(seed)
    std = getattr(config, "initializer_range", 0.02)
    tied = getattr(config, "tie_word_embeddings", False)
    for name, p in skeleton.state_dict(keep_vars=True).items():
        if name == "lm_head.weight" and tied:
            continue
        if name.endswith("norm.weight") or p.dim() == 1 and "norm" in name:
            t = torch.ones(p.shape, dtype=torch.float32)
        elif p.dim() == 1:
            t = torch.zeros(p.shape, dtype=torch.float32)
        else:
            t = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
        yield name, t if dtype is None or dtype == torch.float32 else t.to(dtype)


# File suffix → source kind; a folder is an HF folder.
