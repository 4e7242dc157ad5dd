"""Test helpers for the verify tests: a tiny bundle (hf + onnx stages of a shrunk `tiny`
preset) built once per session, copies to damage, and the `exportline` command."""

from __future__ import annotations

import shutil
from pathlib import Path

from exportline.exporters.stages import parse_stages

TINY = {"model": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "num_hidden_layers": 2}}


def build_tiny_bundle(root: Path) -> Path:
    """The real hf and onnx stages: config, safetensors, tokenizer, onnx/model.onnx(+_data)."""
    from exportline.exporters.core.bundle import Bundle
    from exportline.exporters.core.pipeline import run_pipeline
    from exportline.exporters.sources import resolve_source

    run_pipeline(Bundle(root), resolve_source("tiny", TINY), stages=parse_stages("hf,onnx"))
    return root


def scale_initializer(onnx_path: Path, factor: float) -> str:
    """Multiply the largest initializer in place (same file sizes): a numerically wrong graph."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(onnx_path))
    target = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * factor, target.name))
    data = onnx_path.with_name(onnx_path.name + "_data")
    data.unlink()
    onnx.save_model(proto, str(onnx_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name)
    return target.name


def shared_bundle(tmp_path_factory) -> Path:
    """The tiny bundle, built once per test session (tests that damage it work on a copy)."""
    root = tmp_path_factory.getbasetemp() / "verify-tiny-bundle"
    if not (root / "onnx" / "model.onnx").is_file():
        shutil.rmtree(root, ignore_errors=True)
        build_tiny_bundle(root)
    return root


def copy_bundle(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".exportline.lock", "reports"))
    return dest


def exportline_cmd() -> list[str]:
    """The `exportline` script of the interpreter running the tests (the worktree's venv)."""
    import sys

    script = Path(sys.executable).parent / "exportline"
    return [str(script)] if script.is_file() else [shutil.which("exportline") or "exportline"]
