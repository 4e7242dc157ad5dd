"""Backend name → runner over a bundle. A new backend is one entry here plus one runner file.

`make_runner(bundle, "onnx-fp16")` is what `exportline generate --backend`, the stage
checks and the benchmark use, so the names are the same everywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from exportline.exporters.core.errors import ArtifactError, ConfigError, NotAvailable
from exportline.verify.runtime.base import Runner


@dataclass(frozen=True)
class Backend:
    description: str
    make: Callable[..., Runner]  # (bundle_root, **options) → Runner
    stage: str  # the export stage that produces its artifact


def _torch(root: Path, **options: Any) -> Runner:
    from exportline.verify.runtime.torch_runner import TorchRunner

    return TorchRunner(root, **options)


def _onnx(rel: str, stage: str) -> Callable[..., Runner]:
    def make(root: Path, **options: Any) -> Runner:
        from exportline.exporters.onnx.files_check import check_onnx_files
        from exportline.verify.runtime.onnx_runner import OnnxRuntimeRunner

        # Fail here, before a caller spends minutes on a reference, not at activate().
        _check_against_manifest(root, rel, stage)
        check_onnx_files(root / rel)
        return OnnxRuntimeRunner(root / rel, **options)

    return make


def _trt(precision: str) -> Callable[..., Runner]:
    def make(root: Path, **options: Any) -> Runner:
        from exportline.exporters.tensorrt.engines import find_engine, local_target
        from exportline.verify.runtime.trt_runner import TrtRunner

        if options:
            raise ConfigError(f"backend trt-{precision} takes no runner options (got {', '.join(options)})")
        try:
            target = local_target()
        except NotAvailable as exc:
            raise NotAvailable(f"backend trt-{precision}: not available: {exc}") from None
        find_engine(root, precision, target)  # fail fast: no engine, or one built for another GPU/TensorRT
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
    """Presence and size against the manifest: a cheap truncation check (hashing gigabytes
    is the deploy checks' job); the runner parses the file itself when it activates."""
    if not (root / rel).is_file():
        raise ArtifactError(f"{root} has no {rel}; export it: exportline export SOURCE --out {root} --stages {stage}")
    try:
        files = json.loads((root / "manifest.json").read_text()).get("files", [])
    except (OSError, ValueError):
        return  # a folder without a manifest (made by hand) is still checked on activate
    for f in files:
        path = root / f.get("path", "")
        if f.get("path") in (rel, rel + "_data") and path.is_file() and path.stat().st_size != f.get("bytes"):
            raise ArtifactError(
                f"{path} has {path.stat().st_size} bytes but the manifest records {f.get('bytes')}: truncated or "
                f"changed since export; re-export: exportline export SOURCE --out {root} --stages {stage} --force"
            )
