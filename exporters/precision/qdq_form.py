"""The explicit-quantization form TensorRT accepts (DESIGN.md §4), as a check on a graph.

TensorRT reads QuantizeLinear/DequantizeLinear as the precision contract of a strongly
typed network and accepts only: int8, symmetric (every zero point 0), constant positive
scales, per-tensor scales for activations and per-channel scales for weights, the channel
axis being the output channel (axis 1 of a MatMul's B [K, N]; axis 0 of a Gemm with transB).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from exportline.exporters.onnx.graph_index import GraphIndex

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def _const(index: GraphIndex, name: str, base_dir: str = ""):
    """The numpy value of an initializer or Constant output, or None for a runtime tensor;
    external data is read from `base_dir`, one tensor at a time."""
    from onnx import numpy_helper

    if name in index.initializers:
        return numpy_helper.to_array(index.initializers[name], base_dir=base_dir)
    node = index.producer.get(name)
    if node is not None and node.op_type == "Constant":
        for a in node.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
    return None


def _axis(node) -> int | None:
    return next((a.i for a in node.attribute if a.name == "axis"), None)


def _output_channel_axis(index: GraphIndex, dq) -> int | None:
    """The axis holding output channels for the weight `dq` feeds, from its consumers."""
    axes = set()
    for reader in index.consumers.get(dq.output[0], []):
        slot = list(reader.input).index(dq.output[0])
        if reader.op_type == "MatMul" and slot == 1:
            axes.add(1)
        elif reader.op_type == "Gemm" and slot == 1:
            trans_b = next((a.i for a in reader.attribute if a.name == "transB"), 0)
            axes.add(0 if trans_b else 1)
        else:
            return None
    return axes.pop() if len(axes) == 1 else None


def qdq_form_problems(model, *, base_dir: Path | str = "") -> list[str]:
    """Every way `model` departs from the form above; [] means TensorRT-ready. A graph loaded
    without its weights reads each from `base_dir` when it is checked."""
    index = GraphIndex(model.graph)
    base_dir = str(base_dir)
    problems = []
    for node in model.graph.node:
        if node.op_type not in QDQ_OPS:
            continue
        where = f"{node.op_type} {node.name}"
        scale = _const(index, node.input[1], base_dir) if len(node.input) > 1 else None
        zero = _const(index, node.input[2], base_dir) if len(node.input) > 2 and node.input[2] else None
        if scale is None:
            problems.append(f"{where}: scale is not a constant")
            continue
        if zero is None:
            problems.append(f"{where}: no constant zero point (the default is uint8)")
            continue
        if zero.dtype.name != "int8":
            problems.append(f"{where}: zero point is {zero.dtype.name}, not int8")
        if zero.size and (zero != 0).any():
            problems.append(f"{where}: asymmetric (zero point {zero.reshape(-1)[:3].tolist()}…, must be 0)")
        if not (scale > 0).all() or not (abs(scale) < float("inf")).all():
            problems.append(f"{where}: scale must be finite and positive")
        weight = _const(index, node.input[0], base_dir) if node.op_type == "DequantizeLinear" else None
        if weight is None:  # activation: one scale for the tensor
            if scale.size != 1:
                problems.append(f"{where}: activation scale has {scale.size} values; per-tensor expected")
            continue
        if weight.dtype.name != "int8":
            problems.append(f"{where}: weight is {weight.dtype.name}, not int8")
        axis, expected = _axis(node), _output_channel_axis(index, node)
        if axis is None or scale.ndim != 1 or weight.ndim < 2:
            problems.append(f"{where}: weight is not per-channel (axis attribute and 1-D scale needed)")
        elif expected is not None and axis % weight.ndim != expected:
            problems.append(f"{where}: per-channel axis {axis} is not the output channel axis {expected}")
        elif scale.size != weight.shape[axis]:
            problems.append(f"{where}: {scale.size} scales for {weight.shape[axis]} channels")
    return problems


def qdq_summary(model) -> dict[str, int]:
    """Counts for the stage record: Q/DQ nodes, quantized weights, quantized MatMul/Gemm."""
    index = GraphIndex(model.graph)
    ops = Counter(n.op_type for n in model.graph.node)
    weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in index.initializers]
    quantized = {
        r.name for dq in weights for r in index.consumers.get(dq.output[0], []) if r.op_type in ("MatMul", "Gemm")
    }
    return {
        "quantize_nodes": ops["QuantizeLinear"], "dequantize_nodes": ops["DequantizeLinear"],
        "int8_weights": len(weights), "quantized_matmuls": len(quantized),
        "float_matmuls": ops["MatMul"] + ops["Gemm"] - len(quantized),
    }
