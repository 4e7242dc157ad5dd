"""Backend name → runner over a bundle. A new backend is one entry here plus one runner file.

`make_runner(bundle, "onnx-fp16")` is what `exportline generate --backend`, the stage
checks and the benchmark use, so the names are the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ...exporters.errors import ArtifactError, ConfigError, NotAvailable
from .base import Runner


@dataclass(frozen=True)
class Backend:
    description: str
    make: Callable[..., Runner]  # (bundle_root, **options) → Runner
    stage: str  # the export stage that produces its artifact


def _torch(root: Path, **options: Any) -> Runner:
    from ...exporters.bundle import Bundle
    from .torch_runner import TorchRunner

    Bundle(root).require_intact(hf_files(root), fast=True)
    return TorchRunner(root, **options)


def _onnx(rel: str, stage: str) -> Callable[..., Runner]:
    def make(root: Path, **options: Any) -> Runner:
        from ...exporters.onnx_files import check_onnx_files
        from .onnx_runner import OnnxRuntimeRunner

        # Fail here, before a caller spends minutes on a reference, not at activate().
        _check_against_manifest(root, rel, stage)
        check_onnx_files(root / rel)
        return OnnxRuntimeRunner(root / rel, **options)

    return make


def _trt(precision: str) -> Callable[..., Runner]:
    def make(root: Path, **options: Any) -> Runner:
        from ...exporters.trt_meta import find_engine, local_target
        from .trt_runner import TrtRunner

        if options:
            raise ConfigError(f"backend trt-{precision} takes no runner options (got {', '.join(options)})")
        try:
            target = local_target()
        except NotAvailable as exc:
            raise NotAvailable(f"backend trt-{precision}: not available: {exc}") from None
        plan, _ = find_engine(root, precision, target)  # fail fast: no engine, or one built for another GPU/TensorRT
        from ...exporters.bundle import Bundle

        rel = plan.relative_to(root).as_posix()
        Bundle(root).require_intact([rel, rel[: -len(".plan")] + ".json"], fast=True)
        return TrtRunner(root, precision)

    return make


BACKENDS: dict[str, Backend] = {
    "torch": Backend("HF transformers in torch (the bundle root)", _torch, "hf"),
    "onnx": Backend("ONNX Runtime, fp32 graph", _onnx("onnx/model.onnx", "onnx"), "onnx"),
    "onnx-fp16": Backend("ONNX Runtime, fp16 graph", _onnx("onnx/model_fp16.onnx", "fp16"), "fp16"),
    "onnx-int8": Backend("ONNX Runtime, Q/DQ int8 graph", _onnx("onnx/model_int8.onnx", "int8"), "int8"),
    "trt-fp16": Backend("TensorRT engine built from the fp16 graph", _trt("fp16"), "trt"),
    "trt-int8": Backend("TensorRT engine built from the Q/DQ int8 graph", _trt("int8"), "trt"),
}

# Planned backends whose runner is not built yet (none at present).
PLANNED: dict[str, str] = {}


def hf_files(root: Path) -> list[str]:
    """The HF folder at the bundle root (config, weights, tokenizer): what transformers reads."""
    return sorted(p.name for p in Path(root).iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name not in ("manifest.json", "README.md", "hubconf.py")) if Path(root).is_dir() else []


def backend_names() -> list[str]:
    return [*BACKENDS, *PLANNED]


def make_runner(bundle_root: Path | str, backend: str, **options: Any) -> Runner:
    """A runner (not yet activated) for `backend` over the bundle at `bundle_root`."""
    root = Path(bundle_root)
    if backend in PLANNED:
        raise NotAvailable(f"backend {backend}: not available: {PLANNED[backend]}")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; backends are: {', '.join(backend_names())}")
    return BACKENDS[backend].make(root, **options)


def _check_against_manifest(root: Path, rel: str, stage: str) -> None:
    """The graph and its external data against manifest.json (size + mtime may vouch for a
    recorded checksum: running a backend publishes nothing); a missing file the manifest
    does not list is an absent stage, one it lists is a broken bundle."""
    from ...exporters.bundle import Bundle

    Bundle(root).require_intact([rel, rel + "_data"], fast=True)
    if not (root / rel).is_file():
        raise ArtifactError(f"{root} has no {rel}; export it: exportline export SOURCE --out {root} --stages {stage}")
