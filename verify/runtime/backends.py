"""Backend name → runner over a bundle. A new backend is one runner file plus one record here.

`make_runner(bundle, "onnx-fp16")` is what `exportline generate --backend`, the stage
checks and the benchmark use, so the names are the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from exportline.exporters.core.bundle import Bundle
from exportline.exporters.core.errors import ArtifactError, ConfigError, NotAvailable
from exportline.exporters.core.layout import GRAPHS, Graph
from exportline.exporters.onnx.files_check import check_onnx_files
from exportline.exporters.tensorrt.engines import find_engine, local_target
from exportline.verify.runtime.base import Runner
from exportline.verify.runtime.onnx_runner import OnnxRuntimeRunner, ort_bench_options
from exportline.verify.runtime.torch_runner import TorchRunner, torch_bench_options
from exportline.verify.runtime.trt_runner import TrtRunner, trt_bench_options


@dataclass(frozen=True)
class Backend:
    """One backend: its runner over a bundle, and what the reports need to know of it."""

    name: str
    description: str
    precision: str  # of the weights it runs: the roofline's bytes per weight
    stage: str  # the export stage that produces its artifact
    make: Callable[..., Runner]  # (bundle_root, **runner options) → Runner, not yet activated
    bench_options: Callable[[str, int], dict[str, Any]]  # (device, threads) → runner options for a benchmark


def _torch(root: Path, *, isolated: bool = False, **options: Any) -> Runner:
    """`isolated`: the runner lives in a child process (verify/runtime/isolated.py), so this
    process never imports torch."""
    Bundle(root).require_intact(hf_files(root), fast=True)
    if isolated:
        from exportline.verify.runtime.isolated import IsolatedRunner

        return IsolatedRunner(root, "torch", **options)
    return TorchRunner(root, **options)


def _onnx(graph: Graph) -> Callable[..., Runner]:
    rel, stage = graph.path, graph.stage

    def make(root: Path, **options: Any) -> Runner:
        # Fail here, before a caller spends minutes on a reference, not at activate().
        _check_against_manifest(root, rel, stage)
        check_onnx_files(root / rel)
        return OnnxRuntimeRunner(root / rel, **options)

    return make


def _trt(precision: str) -> Callable[..., Runner]:
    def make(root: Path, **options: Any) -> Runner:
        if options:
            raise ConfigError(f"backend trt-{precision} takes no runner options (got {', '.join(options)})")
        try:
            target = local_target()
        except NotAvailable as exc:
            raise NotAvailable(f"backend trt-{precision}: not available: {exc}") from None
        plan, _ = find_engine(root, precision, target)  # fail fast: no engine, or one built for another GPU/TensorRT
        rel = plan.relative_to(root).as_posix()
        Bundle(root).require_intact([rel, rel[: -len(".plan")] + ".json"], fast=True)
        return TrtRunner(root, precision)

    return make


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("torch", "HF transformers in torch (the bundle root)", "fp32", "hf", _torch, torch_bench_options),
    Backend("onnx", "ONNX Runtime, fp32 graph", "fp32", "onnx", _onnx(GRAPHS["fp32"]), ort_bench_options),
    Backend("onnx-fp16", "ONNX Runtime, fp16 graph", "fp16", "fp16", _onnx(GRAPHS["fp16"]),
            ort_bench_options),
    Backend("onnx-int8", "ONNX Runtime, Q/DQ int8 graph", "int8", "int8", _onnx(GRAPHS["int8"]),
            ort_bench_options),
    Backend("trt-fp16", "TensorRT engine built from the fp16 graph", "fp16", "trt", _trt("fp16"), trt_bench_options),
    Backend("trt-int8", "TensorRT engine built from the Q/DQ int8 graph", "int8", "trt", _trt("int8"), trt_bench_options),
)}


def hf_files(root: Path) -> list[str]:
    """The HF folder at the bundle root (config, weights, tokenizer): what transformers reads."""
    return sorted(p.name for p in Path(root).iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name not in ("manifest.json", "README.md", "hubconf.py")) if Path(root).is_dir() else []


def backend_help() -> str:
    return " | ".join(BACKENDS)


def parse_backends(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise ConfigError(f"--backends {text!r}: unknown {', '.join(unknown) or '(none given)'}; "
                          f"known backends: {','.join(BACKENDS)}")
    return list(dict.fromkeys(names))  # user order, duplicates dropped


def make_runner(bundle_root: Path | str, backend: str, **options: Any) -> Runner:
    """A runner (not yet activated) for `backend` over the bundle at `bundle_root`."""
    root = Path(bundle_root)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; backends are: {', '.join(BACKENDS)}")
    return BACKENDS[backend].make(root, **options)


def _check_against_manifest(root: Path, rel: str, stage: str) -> None:
    """The graph and its external data against manifest.json (size + mtime may vouch for a
    recorded checksum: running a backend publishes nothing); a missing file the manifest
    does not list is an absent stage, one it lists is a broken bundle."""
    Bundle(root).require_intact([rel, rel + "_data"], fast=True)
    if not (root / rel).is_file():
        raise ArtifactError(f"{root} has no {rel}; export it: exportline export SOURCE --out {root} --stages {stage}")
