"""The fp16 and int8 stages stream their weights: the bytes of tensor data the writer holds at
once (counted by onnx/external_data.HELD, not timed) do not grow with the model's depth.

The same tiny Llama at 2 and at 8 layers: the 8-layer one streams more than twice the
bytes through the writer, and the most it holds at once is the same bound for both — a few
chunks for the elementwise fp16 conversion, one weight for int8's per-channel work.
(The int8 calibration pass runs ONNX Runtime one segment at a time, outside this count:
tests/test_segmented_stats.py counts the weights each of its sessions loads.)
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from exportline.exporters.onnx import external_data
from exportline.exporters.onnx.weights import _WRITERS
from exportline.exporters.sources import resolve_source

from quant_models import export_bundle

pytestmark = pytest.mark.slow

CHUNK = 4096  # far below the smallest weight, so every tensor is copied in several chunks


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    roots = {}
    for layers in (2, 8):
        root = tmp_path_factory.mktemp(f"tiny-{layers}-layers")
        export_bundle(root, resolve_source("tiny", {"model": {"num_hidden_layers": layers}}), ["hf", "onnx"])
        roots[layers] = root
    return roots


def _held(root, stage: str, monkeypatch) -> tuple[int, int]:
    monkeypatch.setattr(external_data, "CHUNK_BYTES", CHUNK)
    external_data.HELD.reset()
    _run(root, stage)
    assert external_data.HELD.now == 0  # every chunk was released
    return external_data.HELD.peak, external_data.HELD.total


def _run(root, stage: str) -> None:
    import json

    from exportline.exporters.core.bundle import Bundle
    from exportline.exporters.core.pipeline import run_pipeline
    from exportline.exporters.stages import STAGES

    layers = json.loads((root / "config.json").read_text())["num_hidden_layers"]
    source = resolve_source("tiny", {"model": {"num_hidden_layers": layers}})
    run_pipeline(Bundle(root), source, stages=[STAGES[stage]], force=True)


def _largest_weight(root) -> int:
    model = onnx.load(str(root / "onnx" / "model.onnx"), load_external_data=False)
    return max(int(np.prod(t.dims)) * 4 for t in model.graph.initializer)


@pytest.mark.covers("stage:fp16")
def test_fp16_holds_a_few_chunks_whatever_the_depth(bundles, monkeypatch):
    peak2, total2 = _held(bundles[2], "fp16", monkeypatch)
    peak8, total8 = _held(bundles[8], "fp16", monkeypatch)
    weights8 = (bundles[8] / "onnx" / "model.onnx_data").stat().st_size
    assert total8 > 2 * total2 and total8 > 50 * CHUNK  # the deep model really went through the writer
    bound = _WRITERS * (CHUNK + CHUNK // 2)  # per writer: a float32 chunk and its float16 copy
    assert peak2 <= bound and peak8 <= bound, (peak2, peak8, bound)
    assert peak8 < weights8 / 50


@pytest.mark.covers("stage:int8")
def test_int8_holds_one_weight_whatever_the_depth(bundles, monkeypatch):
    peak2, total2 = _held(bundles[2], "int8", monkeypatch)
    peak8, total8 = _held(bundles[8], "int8", monkeypatch)
    assert total8 > 2 * total2
    # per writer: the largest float32 tensor and what it becomes (int8, or its smoothed float32 copy)
    bound = _WRITERS * 2 * _largest_weight(bundles[8])
    assert peak2 <= bound and peak8 <= bound, (peak2, peak8, bound)
    # the bound itself does not grow with depth (how many of the writers hold a tensor at the
    # same moment depends on thread timing, so the peaks are held to the bound, not to each other)
    assert _largest_weight(bundles[8]) == _largest_weight(bundles[2])
