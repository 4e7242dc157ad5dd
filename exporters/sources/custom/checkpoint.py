"""A custom module's checkpoint: tensors (never pickled code) and constructor kwargs.

Accepted: a state dict in `.safetensors`, or in `.pt/.pth` read with `weights_only=True`;
or a `.pt/.pth` dict with `model` / `state_dict` (the tensors) and optional `config` /
`model_args` (the constructor kwargs when `--model-args` is not given).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exportline.exporters.core.errors import ConfigError, SourceError

STATE_KEYS = ("model", "state_dict")
ARGS_KEYS = ("model_args", "config")
STRIP_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DataParallel wrappers


@dataclass
class CustomCheckpoint:
    state: dict[str, Any]  # name → torch.Tensor
    kwargs: dict[str, Any]  # from the checkpoint; {} when it has none


def read_checkpoint(path: Path) -> CustomCheckpoint:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return CustomCheckpoint(load_file(str(path)), {})
        except Exception as exc:
            raise SourceError(f"{path.name} is not a safetensors file ({exc}); re-save it with safetensors.torch.save_file") from None
    if path.suffix not in (".pt", ".pth", ".ckpt", ".bin"):
        raise SourceError(f"{path.name}: a custom module's checkpoint is a .safetensors, .pt or .pth state dict")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SourceError(
            f"{path.name} cannot be read with torch.load(weights_only=True) ({str(exc).splitlines()[0][:160]}); "
            "re-save tensors only: torch.save(model.state_dict(), PATH)") from None
    if not isinstance(raw, dict):
        raise SourceError(f"{path.name} holds a {type(raw).__name__}, not a state dict; torch.save(model.state_dict(), PATH)")
    held = next((k for k in STATE_KEYS if isinstance(raw.get(k), dict)), None)
    state = raw[held] if held else raw
    kwargs = next((raw[k] for k in ARGS_KEYS if held and isinstance(raw.get(k), dict)), {})
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise SourceError(f"{path.name} has no tensors (looked at {'`' + held + '`' if held else 'the top level'})")
    return CustomCheckpoint(_strip(tensors), dict(kwargs))


def _strip(state: dict) -> dict:
    for prefix in STRIP_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_args(path: Path | None) -> dict[str, Any] | None:
    """--model-args ARGS.yaml|json → constructor kwargs."""
    if path is None:
        return None
    import yaml

    if not path.is_file():
        raise ConfigError(f"--model-args {path}: no such file")
    try:
        data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"--model-args {path}: not valid {path.suffix.lstrip('.') or 'YAML'} ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--model-args {path}: expected a mapping of constructor keyword arguments")
    return data


def key_problems(model, state: dict) -> str | None:
    """One line naming missing, unexpected and mis-shaped tensors; None when they match."""
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    shaped = [f"{k} {list(state[k].shape)} (module wants {list(want[k].shape)})"
              for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    parts = [f"{label}: {', '.join(_few(items))}" for label, items in
             (("missing", missing), ("unexpected", extra), ("wrong shape", shaped)) if items]
    return "; ".join(parts) or None


def _few(items: list[str], n: int = 4) -> list[str]:
    return items[:n] + ([f"… {len(items) - n} more"] if len(items) > n else [])


def parameter_count(model) -> int:
    """Distinct parameters (a tied weight counts once), as `sum(p.numel())` users quote."""
    return sum(p.numel() for p in model.parameters())
