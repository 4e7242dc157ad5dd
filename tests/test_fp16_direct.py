"""`--stages hf,fp16`: the float16 graph straight from bf16 HF weights, no fp32 ONNX written;
the same graph as hf → onnx → fp16, and bf16 values beyond float16's range reported."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from quant_models import FolderSource, export_bundle, stage_info

pytestmark = pytest.mark.slow

BIG = {"model.layers.1.mlp.down_proj.weight": (3, 5, 1.0e6), "model.embed_tokens.weight": (7, 2, -7.0e4)}


def _write_bf16_folder(root) -> None:
    """A tiny Llama saved by transformers itself in bfloat16, two weights past ±65504."""
    from transformers import AutoModelForCausalLM

    from exportline.exporters.core.presets import load_preset

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(load_preset("tiny").hf_config()).to(torch.bfloat16)
    with torch.no_grad():
        for name, (i, j, value) in BIG.items():
            model.get_parameter(name)[i, j] = value
    model.save_pretrained(root)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    direct = tmp_path_factory.mktemp("direct")
    _write_bf16_folder(direct)
    via_onnx = tmp_path_factory.mktemp("via-onnx")
    for f in direct.iterdir():
        shutil.copy(f, via_onnx / f.name)
    export_bundle(direct, FolderSource("bf16-tiny", "x"), ["fp16"])
    export_bundle(via_onnx, FolderSource("bf16-tiny", "x"), ["onnx", "fp16"])
    return direct, via_onnx


def _initializers(root) -> dict[str, np.ndarray]:
    model = onnx.load(str(root / "onnx" / "model_fp16.onnx"))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.covers("stage:fp16")
def test_direct_path_writes_no_fp32_graph_and_equals_the_onnx_path(bundles):
    direct, via_onnx = bundles
    assert sorted(p.name for p in (direct / "onnx").iterdir()) == ["model_fp16.onnx", "model_fp16.onnx_data"]
    assert "BF16" in stage_info(direct, "fp16")["info"]["weights"]
    ours, theirs = _initializers(direct), _initializers(via_onnx)
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and np.array_equal(ours[k], theirs[k]) for k in ours)
    nodes = [onnx.load(str(r / "onnx" / "model_fp16.onnx")).graph.node for r in bundles]
    assert [(n.op_type, list(n.input)) for n in nodes[0]] == [(n.op_type, list(n.input)) for n in nodes[1]]


def test_bf16_values_beyond_float16_are_clamped_and_reported(bundles):
    direct, _ = bundles
    report = stage_info(direct, "fp16")["info"]["float16_overflow"]
    assert report["clamped_values"] == len(BIG)
    assert len(report["tensors"]) == len(BIG)
    weights = _initializers(direct)
    values = [float(w.max()) if w.max() >= 65504 else float(w.min()) for n, w in weights.items()
              if any(n.startswith(k) for k in BIG)]
    assert sorted(values) == [-65504.0, 65504.0]
