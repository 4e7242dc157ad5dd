"""Model sources (DESIGN.md §3): a preset, a nanoGPT .pt, a llama2.c .bin or an HF folder.

`resolve_source(spec)` decides which one a command-line SOURCE is; each Source knows how
to describe and fingerprint itself and how to write the HF folder (the hf stage).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SourceError
from .presets import Preset, load_preset, preset_names


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
            "seed": self.preset.seed,
        }

    def fingerprint(self) -> str:
        blob = json.dumps(
            {"model": self.preset.model, "seed": self.preset.seed, "tokenizer": vars(self.preset.tokenizer),
             "architecture": self.preset.architecture}, sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()


def resolve_source(spec: str, overrides: dict[str, Any] | None = None):
    """A preset name, or a path to a checkpoint file or HF folder."""
    path = Path(spec)
    if path.suffix or "/" in spec or path.exists():
        if not path.exists():
            raise SourceError(f"{spec}: no such file or folder; give a preset ({', '.join(preset_names())}) or a checkpoint path")
        raise SourceError(f"{spec}: checkpoint files are not supported yet; use a preset ({', '.join(preset_names())})")
    preset = load_preset(spec, overrides)
    if preset.checkpoint:
        raise SourceError(f"preset {spec}: checkpoint sources are not supported yet")
    return PresetSource(preset)
