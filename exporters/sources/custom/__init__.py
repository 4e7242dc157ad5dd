"""Source kind `custom`: the user's own nn.Module (`--model-class FILE.py:Class`) with a
state-dict checkpoint, exported as a remote-code HF folder and then like any other bundle.

`custom_source(...)` turns the command-line options into a CustomSource; the variants
table and `--expect-params` share exporters/core/presets.ParamExpectation with presets.
"""

from __future__ import annotations

from pathlib import Path

from exportline.exporters.core.errors import ConfigError
from exportline.exporters.core.presets import ParamExpectation, load_variants
from exportline.exporters.sources.custom.checkpoint import read_args
from exportline.exporters.sources.custom.source import CustomSource


def read_spec(path: Path | None) -> dict | None:
    """--inputs SPEC.yaml|json → the parsed mapping (shapes.declared_io checks it)."""
    if path is None:
        return None
    import yaml

    if not path.is_file():
        raise ConfigError(f"--inputs {path}: no such file")
    try:
        return yaml.safe_load(path.read_text())  # JSON is YAML
    except yaml.YAMLError as exc:
        raise ConfigError(f"--inputs {path}: not valid YAML ({str(exc).splitlines()[0]})") from None


def custom_source(
    checkpoint: Path, *, model_class: str, model_args: Path | None = None, inputs: Path | None = None,
    task: str = "causal-lm", expect_params: str | None = None, variants: Path | None = None,
    variant: str | None = None, adapter: Path | None = None, lora_alpha: float | None = None,
    lora_rank: int | None = None, merge_adapter: bool = False,
) -> CustomSource:
    args = read_args(model_args)
    expect = ParamExpectation.parse(expect_params) if expect_params else None
    if (variants is None) != (variant is None):
        raise ConfigError("--variants FILE.yaml and --variant NAME go together")
    if variants is not None:
        table = load_variants(variants)
        if variant not in table:
            raise ConfigError(f"--variant {variant!r}: {variants} has {', '.join(table)}")
        row = table[variant]
        args = {**row.model_args, **(args or {})}
        expect = expect or row.expect_params
    return CustomSource(checkpoint, model_class=model_class, model_args=args, inputs=read_spec(inputs),
                        task=task, expect_params=expect, variant=variant, adapter=adapter, lora_alpha=lora_alpha,
                        lora_rank=lora_rank, merge_adapter=merge_adapter)


__all__ = ["CustomSource", "custom_source", "read_spec"]
