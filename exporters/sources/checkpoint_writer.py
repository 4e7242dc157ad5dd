"""Writing a training checkpoint back from an HF folder (`exportline to-checkpoint`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from exportline.exporters.core.bundle import _disk_hint
from exportline.exporters.core.errors import ConfigError, OutputError, SourceError


def _nanogpt(folder: Path) -> tuple[dict[str, Any], str]:
    from exportline.exporters.sources.nanogpt.convert import hf_to_checkpoint

    return hf_to_checkpoint(folder)


# --format value → the function that rebuilds that format's checkpoint dict (and a note).
FORMATS: dict[str, Callable[[Path], tuple[dict[str, Any], str]]] = {"nanogpt": _nanogpt}


@dataclass(frozen=True)
class WrittenCheckpoint:
    path: Path
    note: str  # what the checkpoint carries besides the weights (restored or reset)


def write_checkpoint(folder: Path, out: Path, *, format: str) -> WrittenCheckpoint:
    """Rebuild the checkpoint and write it with torch.save to a temporary file beside
    `out`, renamed into place only when complete."""
    import torch

    if format not in FORMATS:
        raise ConfigError(f"unknown checkpoint format {format!r}; formats: {', '.join(FORMATS)}")
    folder = Path(folder)
    if not folder.is_dir():
        raise SourceError(f"{folder}: no such folder; pass the bundle folder written by `exportline export`")
    _check_against_manifest(folder)
    ckpt, note = FORMATS[format](folder)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt, tmp)
        os.replace(tmp, out)
    except OSError as exc:
        _remove(tmp)
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}; {_disk_hint(exc)}") from None
    except RuntimeError as exc:  # torch's zip writer reports a failed write as RuntimeError
        _remove(tmp)
        raise OutputError(f"cannot write {out}: {str(exc).splitlines()[0]}; check free space and run again") from None
    return WrittenCheckpoint(out, note)


def _check_against_manifest(folder: Path) -> None:
    """A bundle's files are trusted only while they match manifest.json (DESIGN.md §2): the
    ones to-checkpoint reads are checked first; a plain HF folder without one is read as is."""
    from exportline.exporters.core.bundle import Bundle

    bundle = Bundle(folder)
    if not bundle.manifest_path.is_file():
        return
    read = ("config.json", "model.safetensors", "model-", "training/")  # what to-checkpoint reads
    bundle.require_intact([f["path"] for f in bundle.read_manifest().get("files", []) if f["path"].startswith(read)])


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # e.g. its parent is not a folder: there is nothing to remove
        pass
