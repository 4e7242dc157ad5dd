"""Explicit Q/DQ inserted into a graph whose weights stay on disk, weights quantized as written.

onnxruntime's quantize_static loads the whole model (and copies of it) to quantize it; for a
graph with external data that is the model's size several times over. Here the graph is
edited without its weights and each weight is read, quantized and written one at a time
(onnx/external_data.save_streamed). The numbers are onnxruntime's own: the same functions
quantize_static calls in QDQ mode (symmetric int8, per-channel weights, per-tensor
activations, zero point 0) — compute_scale_zp, compute_data_quant_params channel by channel,
quantize_onnx_initializer — and the same node and tensor names, so the graph is the one
quantize_static writes with MinMax ranges from a calibration cache
(tests/test_int8.py holds it to TensorRT's form and to ONNX Runtime's integer fusion).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from exportline.exporters.onnx.graph_index import GraphIndex


def _channel_axis(node) -> int:
    """B's output-channel axis: 1 for MatMul [K, N]; Gemm picks 0 with transB."""
    trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
    return 0 if trans_b else 1


def activation_params(absmax: float) -> tuple[np.ndarray, np.ndarray]:
    """(zero point, scale) of a symmetric int8 activation with range ±absmax, as
    quantize_static computes them from a MinMax calibration cache."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

    qmin, qmax = get_qmin_qmax_for_qType(TensorProto.INT8, reduce_range=False, symmetric=True)
    zero, scale = compute_scale_zp(np.float32(-absmax), np.float32(absmax), qmin, qmax, True, None)
    return zero.squeeze(), scale.squeeze()


def weight_params(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (zero points, scales) of a symmetric int8 weight, channel by channel as
    onnxruntime's QDQ quantizer does."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import compute_data_quant_params

    zeros, scales = [], []
    for i in range(weight.shape[axis]):
        zero, scale = compute_data_quant_params(weight.take(i, axis).ravel(), TensorProto.INT8, True,
                                                reduce_range=False, min_real_range=None)
        zeros.append(zero)
        scales.append(scale)
    return np.asarray(zeros), np.asarray(scales)


def _quantizer(name: str, *, zeros: np.ndarray, scales: np.ndarray, axis: int):
    def quantize(weight: np.ndarray) -> np.ndarray:
        from onnx import TensorProto, numpy_helper
        from onnxruntime.quantization.quant_utils import quantize_onnx_initializer

        proto = quantize_onnx_initializer(numpy_helper.from_array(weight, name), TensorProto.INT8, zeros, scales, axis)
        return numpy_helper.to_array(proto)

    return quantize


def insert_qdq(model, source: Path, *, ranges: dict[str, float], nodes: list[str]) -> dict:
    """Edit the weightless graph `model` (loaded from `source` without weights) in place:
    activation Q/DQ on the A input of each of `nodes` (one pair per tensor, as quantize_static
    writes it), int8 weight → DequantizeLinear on B. Returns the `Convert`s that produce the
    int8 weights from the float ones when the graph is written with save_streamed."""
    from onnx import TensorProto, helper, numpy_helper

    from exportline.exporters.onnx.external_data import Convert, external_stub, read_external, slice_of
    from exportline.exporters.precision.smoothing import InMemory

    index = GraphIndex(model.graph)
    names = set(nodes)
    targets = [n for n in model.graph.node if n.name in names]
    converts, new_nodes, done = {}, [], set()
    for tensor in dict.fromkeys(n.input[0] for n in targets):
        zero, scale = activation_params(ranges[tensor])
        model.graph.initializer.extend([numpy_helper.from_array(np.asarray(scale, np.float32), f"{tensor}_scale"),
                                        numpy_helper.from_array(np.asarray(zero, np.int8), f"{tensor}_zero_point")])
        new_nodes += _pair(helper, tensor, [f"{tensor}_scale", f"{tensor}_zero_point"])
        for reader in (r for r in targets if r.input[0] == tensor):
            reader.input[0] = f"{tensor}_DequantizeLinear_Output"
    for node in targets:
        name, axis = node.input[1], _channel_axis(node)
        if name not in done:
            w = index.initializers[name]
            where = slice_of(w, source)
            value = read_external(where, "float32", tuple(w.dims)) if where else InMemory(model).read(name)
            zeros, scales = weight_params(value, axis)
            del value
            model.graph.initializer.extend([
                numpy_helper.from_array(scales.astype(np.float32), f"{name}_scale"),
                numpy_helper.from_array(zeros.astype(np.int8), f"{name}_zero_point"),
            ])
            quantized = f"{name}_quantized"
            if where is None:
                model.graph.initializer.append(numpy_helper.from_array(
                    _quantizer(name, zeros=zeros, scales=scales, axis=axis)(numpy_helper.to_array(w)), quantized))
            else:
                model.graph.initializer.append(external_stub(w, quantized, data_type=TensorProto.INT8, dims=w.dims))
                converts[quantized] = Convert("float32", _quantizer(name, zeros=zeros, scales=scales, axis=axis), shape=tuple(w.dims))
            new_nodes.append(helper.make_node("DequantizeLinear", [quantized, f"{name}_scale", f"{name}_zero_point"],
                                              [f"{name}_DequantizeLinear_Output"], name=f"{name}_DequantizeLinear", axis=axis))
            if all(r.name in names for r in index.consumers.get(name, [])):  # else others read the float W
                model.graph.initializer.remove(w)
            done.add(name)
        node.input[1] = f"{name}_DequantizeLinear_Output"
    model.graph.node.extend(new_nodes)
    return converts


def _pair(helper, tensor: str, params: list[str]) -> list:
    return [
        helper.make_node("QuantizeLinear", [tensor, *params], [f"{tensor}_QuantizeLinear_Output"],
                         name=f"{tensor}_QuantizeLinear"),
        helper.make_node("DequantizeLinear", [f"{tensor}_QuantizeLinear_Output", *params],
                         [f"{tensor}_DequantizeLinear_Output"], name=f"{tensor}_DequantizeLinear"),
    ]
