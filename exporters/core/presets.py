"""Model presets (configs/<name>.yaml): typed, frozen, loaded from YAML with overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from exportline.exporters.core.errors import ConfigError

_CONFIG_PACKAGE = "exportline.configs"


@dataclass(frozen=True)
class TokenizerSpec:
    kind: str = "bpe"  # "bpe" (trained on the shipped corpus) or "none"
    vocab_size: int = 512


@dataclass(frozen=True)
class Preset:
    name: str
    architecture: str
    description: str
    model: dict[str, Any]
    seed: int = 0
    checkpoint: str | None = None
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    thresholds: dict[str, Any] = field(default_factory=dict)
    # How the hf stage stores the weights: "float32", or "bfloat16" (what large checkpoints
    # ship as: half the disk, and the direct hf → fp16 path reads it as is)
    dtype: str = "float32"

    @property
    def random_init(self) -> bool:
        return not self.checkpoint

    def hf_config(self):
        """The transformers config this preset describes."""
        from transformers import AutoConfig

        return AutoConfig.for_model(self.architecture, **self.model)

    def parameter_count(self) -> int:
        """Counted on the meta device: no memory is allocated, so even `10b` is instant."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.hf_config())
        return sum(p.numel() for p in model.parameters())


def config_dir() -> Path:
    return Path(str(resources.files(_CONFIG_PACKAGE)))


def preset_names() -> list[str]:
    names = [p.stem for p in config_dir().glob("*.yaml") if p.stem != "thresholds"]
    return sorted(names, key=_size_order)


def _size_order(name: str) -> tuple[int, float]:
    units = {"k": 1e3, "m": 1e6, "b": 1e9}
    if name[:-1].isdigit() and name[-1] in units:
        return (1, float(name[:-1]) * units[name[-1]])
    return (0, 0.0)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set model.hidden_size=128` → {"model": {"hidden_size": 128}} (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected key=value, e.g. --set model.num_hidden_layers=4")
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_preset(name: str, overrides: dict[str, Any] | None = None) -> Preset:
    path = config_dir() / f"{name}.yaml"
    if name == "thresholds" or not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}")
    raw = _merge(yaml.safe_load(path.read_text()) or {}, overrides or {})
    try:
        tokenizer = TokenizerSpec(**(raw.pop("tokenizer", None) or {}))
        return Preset(tokenizer=tokenizer, **raw)
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}; fix the preset file") from None


def load_thresholds(preset: Preset | None = None) -> dict[str, dict[str, Any]]:
    base = yaml.safe_load((config_dir() / "thresholds.yaml").read_text())
    return _merge(base, preset.thresholds) if preset else base
