"""fp16 graph conversion: a float32 graph → mixed float16/float32, with its weights left on disk.

Weights and most activations become float16; what overflows or loses too much in float16
stays float32 (DESIGN.md §4: "TensorRT and ORT both overflow otherwise"):
- normalization: fused LayerNormalization / SimplifiedLayerNormalization / RMSNormalization
  nodes, and the decomposed RMSNorm/LayerNorm the dynamo exporter writes (Pow → ReduceMean →
  Add(eps) → Sqrt → Reciprocal → Mul(x) → Mul(weight)), found as a pattern, not by name;
- Softmax, every Pow and ReduceMean;
- rotary angles: position_ids → Cast → Mul(inv_freq) → Cos/Sin. float16 integers are exact
  only up to 2048, so positions beyond that would get wrong angles;
- the `logits` output stays float32 (`keep_io_types`), so a consumer's log-softmax never
  sees float16.
I/O: past_key_values.* and present.* are float16 — half the KV-cache memory, and the layout
TensorRT-LLM and optimum use; callers feed float16 past (the ONNX Runtime runner casts float
feeds to each input's declared type).

The conversion is onnxruntime.transformers.float16.convert_float_to_float16 (op_block_list +
node_block_list + keep_io_types), which ships with the onnxruntime we already depend on; its
output has Cast(fp16)→Cast(fp32) round trips between adjacent float32 nodes and appends
nodes out of order, so the graph is cleaned (round trips folded, dead nodes dropped) and
topologically sorted before it is written; the ONNX checker with strict types then runs on it.

Memory: the converter runs on the graph alone (it only retypes a tensor whose data is not
loaded), and float16_conversions gives the writer (onnx/external_data.save_streamed) the
converter's own function for each retyped weight, so the weights are converted chunk by
chunk as they are streamed into the new data file (exporters/stages/fp16.py).
"""

from __future__ import annotations

import contextlib
from typing import Any

from exportline.exporters.core.errors import StageError
from exportline.exporters.onnx.external_data import Convert, weightless_copy
from exportline.exporters.onnx.graph_index import GraphIndex, remove_dead_nodes, topological_sort

KEEP_FLOAT32_IO = ("logits",)

# Op types that always compute in float32 (DESIGN.md §4), besides the library's defaults
# (ops with no float16 kernels anywhere, e.g. TopK, Range, CumSum).
NORM_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization",
            "SkipLayerNormalization", "SkipSimplifiedLayerNormalization")
FLOAT32_OPS = ("Pow", "ReduceMean", "Softmax", *NORM_OPS)
# What a decomposed norm is built from: ops whose result depends only on the norm's input,
# the statistics computed from it, and constants (eps, weight, bias).
_NORM_BODY = {"Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal", "Pow", "ReduceMean", "Cast", "Neg"}
_ANGLE_OPS = ("Cos", "Sin")


def norm_nodes(index: GraphIndex) -> set[str]:
    """Names of the nodes of every decomposed normalization: from each ReduceMean, the
    region that computes from the norm input x and constants only, up to the weight Mul."""
    region_nodes: set[str] = set()
    for node in index.graph.node:
        if node.op_type != "ReduceMean" or node.name in region_nodes:
            continue
        x = node.input[0]
        square = index.producer.get(x)
        if square is not None and _is_square(square, index):
            x = square.input[0]
            region_nodes.add(square.name)
        region_nodes |= _grow_norm(index, node, x)
    return region_nodes


def _is_square(node, index: GraphIndex) -> bool:
    if node.op_type == "Mul":
        return node.input[0] == node.input[1]
    if node.op_type == "Pow":
        init = index.initializers.get(node.input[1])
        if init is not None:
            from onnx import numpy_helper

            value = numpy_helper.to_array(init)
            return value.size == 1 and float(value.reshape(-1)[0]) == 2.0
        return True  # a Constant exponent: Pow is float32 anyway
    return False


def _grow_norm(index: GraphIndex, start, x: str) -> set[str]:
    members = {start.name}
    allowed = {x, *start.output}
    frontier = list(start.output)
    while frontier:
        for reader in index.consumers.get(frontier.pop(), []):
            if reader.name in members or reader.op_type not in _NORM_BODY:
                continue
            if all(i in allowed or index.is_constant(i) for i in reader.input if i):
                members.add(reader.name)
                allowed.update(reader.output)
                frontier.extend(reader.output)
    return members


def angle_nodes(index: GraphIndex) -> set[str]:
    """Cos/Sin and everything they are computed from (position_ids → Cast → Mul(inv_freq))."""
    outputs = [o for n in index.graph.node if n.op_type in _ANGLE_OPS for o in n.output]
    return index.ancestors(outputs)


def _drop_initializer_value_info(graph) -> None:
    """The converter retypes every float value_info to float16, including the entries the
    torch exporter writes for initializers it then keeps float32 (weights read only by
    float32 nodes): the graph would declare two types for one tensor."""
    names = {t.name for t in graph.initializer}
    keep = [v for v in graph.value_info if v.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(keep)


def dedupe_nodes(graph) -> int:
    """The converter inserts one Cast per float32 reader of a float16 tensor, all with the
    same output name; a tensor must have one producer, so keep the first of each."""
    seen_nodes, seen_info, nodes, infos = set(), set(), [], []
    for node in graph.node:
        key = tuple(o for o in node.output if o)
        if key and key in seen_nodes:
            continue
        seen_nodes.add(key)
        nodes.append(node)
    for vi in graph.value_info:
        if vi.name not in seen_info:
            seen_info.add(vi.name)
            infos.append(vi)
    removed = len(graph.node) - len(nodes)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    graph.value_info.extend(infos)
    return removed


def fold_cast_round_trips(graph) -> int:
    """Cast(to fp16) → Cast(to fp32) of a float32 tensor becomes the tensor itself: the
    converter puts one between every two adjacent float32 nodes; it only loses precision."""
    from onnx import TensorProto, helper

    index = GraphIndex(graph)
    types = _elem_types(graph)
    folded = 0
    for node in list(graph.node):
        first = index.producer.get(node.input[0]) if node.op_type == "Cast" else None
        if first is None or first.op_type != "Cast":
            continue
        source = first.input[0]
        if not (_cast_to(first) == TensorProto.FLOAT16 and _cast_to(node) == TensorProto.FLOAT
                and types.get(source) == TensorProto.FLOAT):
            continue
        if node.output[0] in index.graph_outputs:  # keep the output's name: Identity of the source
            node.CopyFrom(helper.make_node("Identity", [source], [node.output[0]], name=node.name))
        else:
            for reader in index.consumers.get(node.output[0], []):
                for k, name in enumerate(reader.input):
                    if name == node.output[0]:
                        reader.input[k] = source
        folded += 1
    remove_dead_nodes(graph)
    return folded


def _cast_to(node) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def _elem_types(graph) -> dict[str, int]:
    types = {t.name: t.data_type for t in graph.initializer}
    for vi in (*graph.input, *graph.output, *graph.value_info):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def float32_violations(model, nodes: set[str], op_types: tuple[str, ...] = FLOAT32_OPS) -> list[str]:
    """Blocked nodes with a float16 input or output (after type inference); [] when placed right."""
    import onnx
    from onnx import TensorProto

    inferred = onnx.shape_inference.infer_shapes(weightless_copy(model), strict_mode=True)
    types = _elem_types(inferred.graph)
    bad = []
    for node in inferred.graph.node:
        if node.name in nodes or node.op_type in op_types:
            if any(types.get(t) == TensorProto.FLOAT16 for t in (*node.input, *node.output) if t):
                bad.append(f"{node.op_type} {node.name}")
    return bad


@contextlib.contextmanager
def _shapes_from_dims():
    """The converter declares each retyped initializer's value_info with the shape of
    `numpy_helper.to_array(tensor)`: it reads the whole tensor (from the working directory,
    for external data) to learn what `tensor.dims` says. Its shape comes from dims here, so
    the graph converts with its weights on disk; the value_info written is the same."""
    from onnx import helper
    from onnxruntime.transformers import float16

    original = float16.make_value_info_from_tensor
    float16.make_value_info_from_tensor = lambda t: helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
    try:
        yield
    finally:
        float16.make_value_info_from_tensor = original


def convert(model, *, keep_io: tuple[str, ...] = KEEP_FLOAT32_IO) -> tuple[Any, dict[str, Any]]:
    """float32 ModelProto (with value_info) → mixed-precision ModelProto and the facts of it.
    `keep_io`: graph inputs/outputs that stay float32. The converter edits `model` in place:
    do not use it afterwards."""
    from collections import Counter

    from onnx import TensorProto
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    index = GraphIndex(model.graph)
    norms, angles = norm_nodes(index), angle_nodes(index)
    casts_before = sum(n.op_type == "Cast" for n in model.graph.node)
    keep_io = [v.name for v in (*model.graph.input, *model.graph.output) if v.name in keep_io]
    _drop_initializer_value_info(model.graph)
    with _shapes_from_dims():
        converted = convert_float_to_float16(
            model, keep_io_types=keep_io, disable_shape_infer=True,
            op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FLOAT32_OPS)),
            node_block_list=sorted(norms | angles),
        )
    dedupe_nodes(converted.graph)
    folded = fold_cast_round_trips(converted.graph)
    topological_sort(converted.graph)
    bad = float32_violations(converted, norms | angles)
    if bad:
        raise StageError(f"fp16: {len(bad)} nodes meant to stay float32 are float16 (e.g. {bad[0]}); this is a bug, please report it")
    blocked_ops = Counter(n.op_type for n in converted.graph.node if n.op_type in FLOAT32_OPS)
    casts = sum(n.op_type == "Cast" for n in converted.graph.node) - casts_before
    return converted, {
        "float32_op_types": list(FLOAT32_OPS),
        "float32_op_counts": dict(sorted(blocked_ops.items())),
        "float32_norm_nodes": len(norms),
        "float32_angle_nodes": len(angles),
        "float32_io": keep_io,
        "float16_io": [v.name for v in (*converted.graph.input, *converted.graph.output)
                       if v.type.tensor_type.elem_type == TensorProto.FLOAT16],
        "casts_added": casts,
        "cast_round_trips_folded": folded,
    }



def float16_conversions(converted, stored: dict[str, int], overflow: dict[str, int]) -> dict[str, Convert]:
    """The external initializers the converter retyped float32 → float16 (it only changes
    data_type of a tensor whose data is not loaded), converted when written with the
    converter's own rounding (convert_np_to_float16: clamps to the float16 range, keeps
    signs and tiny values non-zero), so the values equal an in-memory conversion's.
    Finite values beyond float16's range (±65504; bf16 reaches 3.4e38) are counted per
    tensor into `overflow` as they are clamped."""
    from onnx import TensorProto

    return {
        t.name: Convert("float32", _to_float16(t.name, overflow)) for t in converted.graph.initializer
        if stored.get(t.name) == TensorProto.FLOAT and t.data_type == TensorProto.FLOAT16
    }


FLOAT16_MAX = 65504.0


def _to_float16(name: str, overflow: dict[str, int]):
    import numpy as np
    from onnxruntime.transformers.float16 import convert_np_to_float16

    def convert_chunk(chunk):
        beyond = int(np.count_nonzero(np.abs(chunk) > FLOAT16_MAX) - np.count_nonzero(np.isinf(chunk)))
        if beyond:
            overflow[name] = overflow.get(name, 0) + beyond
        return convert_np_to_float16(chunk)

    return convert_chunk

