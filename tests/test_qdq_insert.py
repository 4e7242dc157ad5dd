"""The streamed Q/DQ insertion writes the graph onnxruntime's quantize_static writes (QDQ,
symmetric int8, per-channel weights, MinMax ranges from a calibration cache): the same
nodes and the same initializers, bit for bit — on Llama (MatMul) and GPT-2 (Gemm)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from exportline.exporters.onnx.external_data import load_graph
from exportline.exporters.precision.int8_graph import activation_channels, quantize, weight_matmuls
from exportline.exporters.sources import resolve_source

from quant_models import FolderSource, export_bundle, write_tiny_gpt2

pytestmark = pytest.mark.slow


def _quantize_static(source, out, ranges, nodes) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data

    cache = out.parent / "ranges.json"
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, {
        k: (np.float32(-m), np.float32(m)) for k, m in ranges.items()}), cache)
    quantize_static(str(source), str(out), None, calibration_cache_path=str(cache), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul", "Gemm"], per_channel=True, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, reduce_range=False, nodes_to_quantize=nodes,
                    use_external_data_format=True, calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                   "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"],
                                   "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}, "QuantizeBias": False})


def _llama(root):
    export_bundle(root, resolve_source("tiny"), ["hf", "onnx"])


def _gpt2(root):
    write_tiny_gpt2(root)
    export_bundle(root, FolderSource("gpt2-tiny", "seed0"), ["onnx"])


@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama-matmul", "gpt2-gemm"])
def test_streamed_qdq_equals_quantize_static(tmp_path, make):
    root = tmp_path / "bundle"
    root.mkdir()
    make(root)
    source = root / "onnx" / "model.onnx"
    graph = load_graph(source, infer=False, weights=False)
    nodes = weight_matmuls(graph)
    ranges = {x: 0.5 + i for i, x in enumerate(activation_channels(graph, nodes))}
    (tmp_path / "ours").mkdir()
    (tmp_path / "theirs").mkdir()
    quantize(source, tmp_path / "ours" / "m.onnx", ranges, nodes=nodes)
    _quantize_static(source, tmp_path / "theirs" / "m.onnx", ranges, nodes)
    ours, theirs = (onnx.load(str(tmp_path / d / "m.onnx")) for d in ("ours", "theirs"))
    a = {t.name: numpy_helper.to_array(t) for t in ours.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in theirs.graph.initializer}
    assert a.keys() == b.keys()
    assert [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or a[k].tobytes() != b[k].tobytes()] == []
    assert sum(v.dtype == np.int8 and v.ndim == 2 for v in a.values()) == len(nodes)

    def node_set(m):
        return sorted((n.op_type, n.name, tuple(n.input), tuple(n.output), str(n.attribute)) for n in m.graph.node)

    assert node_set(ours) == node_set(theirs)
