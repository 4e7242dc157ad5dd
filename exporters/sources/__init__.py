"""Model sources (DESIGN.md §3): a preset, a nanoGPT .pt, a llama2.c .bin, an HF folder, or
the user's own nn.Module (`custom`, chosen by --model-class rather than by suffix).

Each source kind is one folder here plus one `SourceKind` record in SOURCE_KINDS: how a
command-line SOURCE is recognised, the class that reads it (describe, fingerprint,
`write_hf(dest, progress)`, which the hf stage calls without knowing the kind) and its
independent float64 reference, if it has one. `resolve_source(spec)` picks the kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from exportline.exporters.core.errors import ConfigError, SourceError
from exportline.exporters.core.presets import ParamExpectation, Preset, config_dir, load_preset, preset_names
from exportline.exporters.sources.base import CheckpointSource
from exportline.exporters.sources.custom import CustomSource, custom_source
from exportline.exporters.sources.hf_folder.source import HFFolderSource
from exportline.exporters.sources.llama2c.convert import Llama2cSource
from exportline.exporters.sources.llama2c.reference import Llama2cReference
from exportline.exporters.sources.nanogpt.convert import NanoGPTSource
from exportline.exporters.sources.nanogpt.reference import NanoGPTReference
from exportline.exporters.sources.preset.source import PresetSource
from exportline.exporters.sources.reference import Reference


@dataclass(frozen=True)
class SourceKind:
    """One kind of model source. `reference` builds an independent float64 forward from
    the checkpoint file; None means the reference is the HF model itself in float64."""

    name: str
    description: str
    source: type
    suffixes: tuple[str, ...] = ()  # checkpoint files recognised by suffix; () for folders/presets
    reference: Callable[[Path], Reference] | None = None


SOURCE_KINDS: dict[str, SourceKind] = {k.name: k for k in (
    SourceKind("preset", "a preset in configs/ (seeded random init)", PresetSource),
    SourceKind("nanogpt", "nanoGPT train.py ckpt.pt", NanoGPTSource, (".pt", ".pth", ".ckpt"),
               NanoGPTReference.from_checkpoint),
    SourceKind("llama2c", "llama2.c export.py .bin", Llama2cSource, (".bin",), Llama2cReference.from_checkpoint),
    SourceKind("hf", "a Hugging Face model folder", HFFolderSource),
    SourceKind("custom", "your own nn.Module: --model-class FILE.py:Class + a state dict", CustomSource),
)}
SUFFIX_KINDS = {suffix: kind.name for kind in SOURCE_KINDS.values() for suffix in kind.suffixes}  # a folder is "hf"


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
                          f".pt/.pth, a llama2.c .bin or an HF folder")
    if "meta_file" in options and kind != "nanogpt":
        raise ConfigError(f"--meta is nanoGPT's meta.pkl; {path} is not a nanoGPT checkpoint, drop the option")
    return SOURCE_KINDS[kind].source(path, **options)


def resolve_source(
    spec: str, overrides: dict[str, Any] | None = None, *,
    tokenizer: Path | None = None, trust_remote_code: bool = False, custom: dict[str, Any] | None = None,
    meta: Path | None = None,
):
    """A preset name, or a path to a checkpoint file or HF folder; with `custom` (the
    --model-class options, see sources/custom) a state dict for the user's own module."""
    if custom is not None:
        if tokenizer or trust_remote_code or overrides or meta:
            raise ConfigError("--tokenizer, --meta, --trust-remote-code and --set do not apply with --model-class")
        return custom_source(Path(spec), **custom)
    options: dict[str, Any] = {"tokenizer_file": tokenizer, "trust_remote_code": trust_remote_code}
    if meta is not None:
        if tokenizer is not None:
            raise ConfigError("--meta and --tokenizer both name the tokenizer; pass one of them")
        options["meta_file"] = meta
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
    if tokenizer or trust_remote_code or meta:
        raise ConfigError(f"preset {spec} is a random init with its own BPE tokenizer; --tokenizer, --meta and "
                          "--trust-remote-code apply to checkpoint sources")
    if preset.expect_params:
        ParamExpectation.parse(preset.expect_params, where=f"preset {preset.name} expect_params").check(
            preset.parameter_count(), what=f"preset {preset.name}")
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
