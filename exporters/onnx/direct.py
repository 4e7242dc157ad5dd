"""The traced graph as a protobuf without its weights, and its weights streamed from the
checkpoint: what the fp16 stage needs to go from the HF folder straight to float16, without
writing the fp32 ONNX (a 10 B model's is 40 GB; its bf16 checkpoint is 20).

After tracing (onnx/export.trace_graph) every weight is a lazy tensor reading a checkpoint
entry (onnx/weights.py). Here each is swapped for an external reference that is never read,
so the graph serializes at its structure's size; when the converted graph is written, each
weight is read from the checkpoint (bf16/fp16 widen exactly to float32), transposed if the
graph stores it so, converted chunk by chunk, and written — one tensor at a time.
"""

from __future__ import annotations

import numpy as np

from exportline.exporters.onnx import external_data
from exportline.exporters.onnx.chunked import chunked_tensor
from exportline.exporters.onnx.external_data import HELD, Convert

_NOT_LOADED = "weights-not-loaded"  # a location nothing reads: the data comes from the checkpoint


def weightless_proto(ir_model) -> tuple[object, dict[str, object]]:
    """(ModelProto of the graph with every checkpoint weight an unread external reference,
    name → the checkpoint tensor behind it). The onnx_ir model is edited in place."""
    import onnx_ir as ir

    lazies = {}
    for graph in ir_model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if getattr(tensor, "origin", None) is not None:  # (CheckpointWeights, WeightSource): onnx/weights.py
                lazies[value.name] = tensor
                value.const_value = ir.ExternalTensor(_NOT_LOADED, 0, tensor.nbytes, tensor.dtype,
                                                      shape=tensor.shape, name=value.name)
    return ir.serde.serialize_model(ir_model), lazies


def checkpoint_tensors(lazies: dict[str, object], retyped: dict[str, Convert]) -> dict[str, object]:
    """onnx_ir tensors that write each checkpoint weight, through `retyped[name]` (float32
    chunks → the target type) where the graph changed its type."""
    import onnx_ir as ir

    out = {}
    for name, lazy in lazies.items():
        convert = retyped.get(name)
        dtype = ir.DataType.FLOAT16 if convert else lazy.dtype
        out[name] = chunked_tensor(lambda origin=lazy.origin, convert=convert: _chunks(origin, convert), dtype=dtype,
                                   shape=lazy.shape, name=name)
    return out


def _float32(origin) -> np.ndarray:
    """The checkpoint tensor as the fp32 graph holds it (transposed where it stores W^T)."""
    from exportline.exporters.onnx.weights import transpose_into

    weights, source = origin
    array = weights.read(source.key, np.float32)
    if source.perm is not None:
        view = array.transpose(source.perm)
        array = transpose_into(np.empty(view.shape, np.float32), view)
    return array


def _chunks(origin, convert):
    array = _float32(origin).reshape(-1)
    HELD.add(array.nbytes)
    try:
        step = max(external_data.CHUNK_BYTES // 4, 1)  # read at call time: tests shrink it
        for begin in range(0, max(array.size, 1), step):
            chunk = array[begin:begin + step]
            out = convert.function(chunk) if convert else chunk
            HELD.add(out.nbytes)
            try:
                yield np.ascontiguousarray(out)
            finally:
                HELD.add(-out.nbytes)
    finally:
        HELD.add(-array.nbytes)
