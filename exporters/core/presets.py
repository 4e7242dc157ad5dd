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
    expect_params: str | None = None  # e.g. "15.8M±5%": checked by resolve_source before anything is written

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


_UNITS = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}


@dataclass(frozen=True)
class ParamExpectation:
    """An expected parameter count with a tolerance: `15.8M`, `15.8M±5%`, `15.8M[±5%]`,
    `5600000+-2%` (default tolerance 5 %). Presets (`expect_params:`), variants tables and
    `--expect-params` all go through `check`."""

    count: float
    tolerance: float  # fraction: 0.05 = ±5 %
    text: str

    @classmethod
    def parse(cls, text: str | int | float, *, where: str = "--expect-params") -> "ParamExpectation":
        import re

        raw = str(text).strip()
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([kKmMbBgG]?)\s*\[?\s*(?:(?:±|\+-|\+/-)\s*([0-9]*\.?[0-9]+)\s*%)?\s*\]?", raw)
        if not m:
            raise ConfigError(f"{where} {raw!r}: expected a count like 15.8M or 15.8M±5% (units k, M, B)")
        count = float(m.group(1)) * _UNITS[m.group(2).lower()]
        return cls(count, float(m.group(3)) / 100 if m.group(3) else 0.05, raw)

    def problem(self, actual: int) -> str | None:
        off = actual / self.count - 1
        if abs(off) <= self.tolerance + 1e-12:
            return None
        return (f"{actual:,} parameters ({_human(actual)}) is {off:+.1%} off the expected {self.text} "
                f"(±{self.tolerance:.0%} allowed)")

    def check(self, actual: int, *, what: str) -> None:
        problem = self.problem(actual)
        if problem:
            raise ConfigError(f"{what}: {problem}; wrong checkpoint or model args? Nothing was written")


def _human(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


@dataclass(frozen=True)
class Variant:
    """One row of a user's variants table: constructor kwargs and the size it must have."""

    name: str
    model_args: dict[str, Any]
    expect_params: ParamExpectation | None


def load_variants(path: Path) -> dict[str, Variant]:
    """`variants:` {name: {model_args: {...}, params: "5.6M±5%"}} from a YAML the user keeps."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--variants {path}: cannot read ({str(exc).splitlines()[0]})") from None
    table = raw.get("variants") if isinstance(raw, dict) else None
    if not isinstance(table, dict) or not table:
        raise ConfigError(f"--variants {path}: needs a `variants:` mapping of name → {{model_args, params}}")
    out = {}
    for name, row in table.items():
        row = row or {}
        if not isinstance(row.get("model_args", {}), dict):
            raise ConfigError(f"--variants {path}: variant {name!r} model_args must be a mapping")
        params = row.get("params")
        out[str(name)] = Variant(str(name), dict(row.get("model_args") or {}),
                                 ParamExpectation.parse(params, where=f"variant {name} params") if params else None)
    return out
