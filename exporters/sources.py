"""Model sources (DESIGN.md §3): a preset, a nanoGPT .pt, a llama2.c .bin or an HF folder.

`resolve_source(spec)` decides which one a command-line SOURCE is; each source knows how
to describe and fingerprint itself and how to write the HF folder (`write_hf(dest,
progress)`, which the hf stage calls without knowing the kind).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .checkpoint_source import CheckpointSource, Progress
from .errors import ConfigError, SourceError
from .presets import Preset, config_dir, load_preset, preset_names


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
            "thresholds": self.preset.thresholds,
        }

    def fingerprint(self) -> str:
        blob = json.dumps(
            {"model": self.preset.model, "seed": self.preset.seed, "tokenizer": vars(self.preset.tokenizer),
             "architecture": self.preset.architecture}, sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def write_hf(self, dest: Path, progress: Progress) -> dict[str, Any]:
        from transformers import AutoTokenizer

        from .hf_files import write_config_files, write_hf_weights
        from .tokenizer import BOS, EOS, PAD, train_bpe

        preset = self.preset
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
        state = dict(random_init_tensors(config, preset.seed))
        files = write_hf_weights(state, dest)
        del state
        write_config_files(config, dest)
        return {"weights": files, "tokenizer": tok_info, "random_init": True}


def random_init_tensors(config, seed: int) -> Iterator[tuple[str, Any]]:
    """Seeded init in HF's scheme (normal(0, initializer_range) matrices, ones for norms),
    tensor by tensor from a meta-device skeleton, so a checker can regenerate and compare
    one tensor at a time. Tied lm_head is left out (HF ties it on load)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    std = getattr(config, "initializer_range", 0.02)
    tied = getattr(config, "tie_word_embeddings", False)
    for name, p in skeleton.state_dict(keep_vars=True).items():
        if name == "lm_head.weight" and tied:
            continue
        if name.endswith("norm.weight") or p.dim() == 1 and "norm" in name:
            yield name, torch.ones(p.shape, dtype=torch.float32)
        elif p.dim() == 1:
            yield name, torch.zeros(p.shape, dtype=torch.float32)
        else:
            yield name, torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)


# File suffix → source kind; a folder is an HF folder.
SUFFIX_KINDS = {".pt": "nanogpt", ".pth": "nanogpt", ".ckpt": "nanogpt", ".bin": "llama2c"}


def source_classes() -> dict[str, type[CheckpointSource]]:
    from .hf_folder import HFFolderSource
    from .llama2c import Llama2cSource
    from .nanogpt import NanoGPTSource

    return {"nanogpt": NanoGPTSource, "llama2c": Llama2cSource, "hf": HFFolderSource}


def checkpoint_source(path: Path, **options: Any) -> CheckpointSource:
    """The source for a checkpoint file or folder, chosen by suffix (folder → HF)."""
    if not path.exists():
        raise SourceError(
            f"{path}: no such file or folder; give a preset ({', '.join(preset_names())}), "
            "a nanoGPT .pt, a llama2.c .bin or an HF folder (hub ids: download with `hf download ID --local-dir DIR`)"
        )
    kind = "hf" if path.is_dir() else SUFFIX_KINDS.get(path.suffix.lower())
    if kind is None:
        raise SourceError(f"{path}: unknown checkpoint type {path.suffix or '(no suffix)'!r}; expected a nanoGPT "
                          f".pt/.pth, a llama2.c v0 .bin or an HF folder")
    return source_classes()[kind](path, **options)


def resolve_source(
    spec: str, overrides: dict[str, Any] | None = None, *,
    tokenizer: Path | None = None, trust_remote_code: bool = False,
):
    """A preset name, or a path to a checkpoint file or HF folder."""
    options = {"tokenizer_file": tokenizer, "trust_remote_code": trust_remote_code}
    path = Path(spec)
    if path.suffix or "/" in spec or path.exists():
        if overrides:
            raise ConfigError(f"--set changes presets; {spec} is a checkpoint, whose config is its own: drop --set "
                              "(or export a preset, e.g. exportline export tiny --set model.num_hidden_layers=4)")
        return checkpoint_source(path, **options)
    preset = load_preset(spec, overrides)
    if preset.checkpoint:
        src = checkpoint_source(_preset_checkpoint(preset), **options)
        src.name, src.preset, src.thresholds = preset.name, preset.name, dict(preset.thresholds)
        return src
    if tokenizer or trust_remote_code:
        raise ConfigError(f"preset {spec} is a random init with its own BPE tokenizer; --tokenizer and "
                          "--trust-remote-code apply to checkpoint sources")
    return PresetSource(preset)


def _preset_checkpoint(preset: Preset) -> Path:
    """`checkpoint:` is absolute, or relative to the repository (the folder above configs/);
    a relative path that only exists from the current folder is accepted too."""
    path = Path(preset.checkpoint).expanduser()
    if path.is_absolute():
        return path
    in_repo = config_dir().parent / path
    if in_repo.exists() or not path.exists():
        return in_repo
    return path
