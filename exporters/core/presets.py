"""Model presets (configs/<name>.yaml): typed, frozen, loaded from YAML with overrides."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
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
    """The preset, checked (with `--set` overrides) against its fields and the model config's
    fields and invariants before anything is written; errors blame the flag or the file."""
    path = config_dir() / f"{name}.yaml"
    if name == "thresholds" or not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}")
    overrides = overrides or {}
    base = yaml.safe_load(path.read_text()) or {}
    for where, tree in (("--set", overrides), (f"{path}", base)):
        _check_keys(tree, where)
    raw = _merge(base, overrides)
    try:
        tokenizer = TokenizerSpec(**(raw.pop("tokenizer", None) or {}))
        preset = Preset(tokenizer=tokenizer, **raw)
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}; fix the preset file") from None
    _check_values(preset, blame=lambda key: _blame(key, overrides, path))
    return preset


_TOP = {f.name for f in fields(Preset)}
_TOKENIZER = {f.name for f in fields(TokenizerSpec)}
# Model fields that count things: a zero or negative value makes no model.
_POSITIVE = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
             "vocab_size", "max_position_embeddings", "head_dim", "n_layer", "n_head", "n_embd", "n_positions")


def _check_keys(tree: dict[str, Any], where: str) -> None:
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: expected a mapping of preset keys; see configs/tiny.yaml")
    for key, value in tree.items():
        if where == "--set":
            where = f"--set {key}={value!r}" if not isinstance(value, dict) else f"--set {key}.…"
        if key not in _TOP:
            raise ConfigError(f"{where}: unknown key {key!r}{_suggest(key, _TOP)}; preset keys are {', '.join(sorted(_TOP))}")
        if key in ("model", "tokenizer", "thresholds") and value is not None and not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping (e.g. --set {key}.<field>=VALUE), not {value!r}")
        if key == "tokenizer" and isinstance(value, dict):
            for k in value:
                if k not in _TOKENIZER:
                    raise ConfigError(f"{where}: unknown key tokenizer.{k}{_suggest(k, _TOKENIZER)}; "
                                      f"tokenizer keys are {', '.join(sorted(_TOKENIZER))}")


def _blame(key: str, overrides: dict[str, Any], path: Path) -> str:
    head, _, leaf = key.partition(".")
    given = overrides.get(head, {}) if leaf else overrides
    if isinstance(given, dict) and (leaf or head) in given:
        return f"--set {key}={given[leaf or head]!r}"
    return f"{path} ({key})"


def _check_values(preset: Preset, *, blame) -> None:
    if not isinstance(preset.seed, int) or isinstance(preset.seed, bool):
        raise ConfigError(f"{blame('seed')}: the seed must be an integer")
    if preset.tokenizer.kind not in ("bpe", "none"):
        raise ConfigError(f"{blame('tokenizer.kind')}: tokenizer.kind is bpe or none")
    _check_int(preset.tokenizer.vocab_size, "tokenizer.vocab_size", blame)
    defaults, aliases = _config_defaults(preset.architecture, blame)
    for key, value in preset.model.items():
        want = defaults.get(aliases.get(key, key))
        if key in _POSITIVE or (isinstance(want, int) and not isinstance(want, bool) and value is not None):
            _check_int(value, "model." + key, blame, positive=key in _POSITIVE)
        elif isinstance(want, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{blame('model.' + key)}: expected a number, got {value!r}")
    model = dict(preset.model)
    hidden, heads = model.get("hidden_size", model.get("n_embd")), model.get("num_attention_heads", model.get("n_head"))
    if isinstance(hidden, int) and isinstance(heads, int) and hidden % heads:
        raise ConfigError(f"{blame('model.hidden_size')}: hidden_size {hidden} is not divisible by "
                          f"num_attention_heads {heads}; pick a multiple of {heads}")
    kv = model.get("num_key_value_heads")
    if isinstance(kv, int) and isinstance(heads, int) and heads % kv:
        raise ConfigError(f"{blame('model.num_key_value_heads')}: num_attention_heads {heads} is not divisible "
                          f"by num_key_value_heads {kv}; pick a divisor of {heads}")
    try:
        built = preset.hf_config().to_dict()
    except (ValueError, TypeError) as exc:  # transformers' own validation (huggingface_hub strict dataclasses)
        raise ConfigError(f"{blame('model')}: transformers refuses this config "
                          f"({str(exc).strip().splitlines()[-1][:200]})") from None
    # A key the config neither declares nor consumes (legacy names like rope_theta are folded
    # into their new field) is kept as a stray attribute: a typo, which would reach config.json.
    for key in preset.model:
        if key in built and key not in defaults and key not in aliases:
            raise ConfigError(f"{blame('model.' + key)}: {preset.architecture} configs have no field {key!r}"
                              f"{_suggest(key, list(defaults) + list(aliases))}")


def _check_int(value: Any, key: str, blame, *, positive: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{blame(key)}: expected an integer, got {value!r}")
    if positive and value < 1:
        raise ConfigError(f"{blame(key)}: must be at least 1, got {value}")


def _config_defaults(architecture: str, blame) -> tuple[dict[str, Any], dict[str, str]]:
    from transformers import AutoConfig

    try:
        config = AutoConfig.for_model(architecture)
        return config.to_dict(), dict(getattr(config, "attribute_map", {}) or {})
    except ValueError:
        raise ConfigError(f"{blame('architecture')}: unknown architecture {architecture!r}; use e.g. llama") from None


def _suggest(key: str, known) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_thresholds(preset: Preset | None = None) -> dict[str, dict[str, Any]]:
    base = yaml.safe_load((config_dir() / "thresholds.yaml").read_text())
    return _merge(base, preset.thresholds) if preset else base


def verification_record(described: dict[str, Any]) -> dict[str, Any]:
    """How this bundle is judged, written into manifest.json when the bundle is made: the
    effective bounds (configs/thresholds.yaml under the source's overrides) and whether the
    weights are a random init. Verifying the bundle, or exporting from it, reads these back,
    so the preset name and the folder it wrote get the same verdict."""
    random_init = bool(described.get("random_init")) or "random-init" in (described.get("labels") or [])
    record = {
        "thresholds": _merge(load_thresholds(), described.get("thresholds") or {}),
        "random_init": random_init,
        "labels": list(described.get("labels") or []),
        "origin": described.get("inherited_from") or f"{described.get('kind', 'source')} "
                  f"{described.get('preset') or described.get('path') or ''}".strip(),
    }
    if random_init:
        # DESIGN.md §8: perplexity says nothing on random weights; quant_check gates logits instead.
        record["int8_rule"] = "random-init: int8 vs fp32 logits (rel_l2, cosine, decided top-1); perplexity reported, not gated"
    else:
        record["int8_rule"] = "trained: perplexity ratio and top-1 vs fp32 on held-out text"
    return record


def effective_thresholds(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The bounds a bundle was made with (manifest `verification`), over today's
    configs/thresholds.yaml so that checks added since find their keys; a bundle made before
    bounds were recorded falls back to its source's overrides."""
    recorded = (manifest.get("verification") or {}).get("thresholds")
    if recorded is None:
        recorded = (manifest.get("source") or {}).get("thresholds") or {}
    return _merge(load_thresholds(), recorded)


def is_random_init(manifest: dict[str, Any]) -> bool:
    verification, source = manifest.get("verification") or {}, manifest.get("source") or {}
    if "random_init" in verification:
        return bool(verification["random_init"])
    return bool(source.get("random_init")) or "random-init" in (source.get("labels") or [])
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
