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

import functools

import numpy as np

from exportline.exporters.onnx import external_data
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
            if hasattr(tensor, "weights") and hasattr(tensor, "source"):
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
        tensor = _tensor_class()(lambda lazy=lazy, convert=convert: _materialize(lazy, convert), dtype=dtype,
                                 shape=lazy.shape, name=name)
        tensor.lazy, tensor.convert = lazy, convert
        out[name] = tensor
    return out


def _float32(lazy) -> np.ndarray:
    """The checkpoint tensor as the fp32 graph holds it (transposed where it stores W^T)."""
    import torch

    array = lazy.weights.read(lazy.source.key, np.float32)
    if lazy.source.perm is not None:
        array = torch.from_numpy(array).permute(lazy.source.perm).contiguous().numpy()
    return array


def _chunks(lazy, convert):
    array = _float32(lazy).reshape(-1)
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


def _materialize(lazy, convert):
    import onnx_ir as ir

    data = np.concatenate(list(_chunks(lazy, convert))) if lazy.nbytes else np.zeros(0, np.float32)
    return ir.Tensor(data.reshape(lazy.shape.numpy()), name=lazy.name)


@functools.cache
def _tensor_class():
    import onnx_ir as ir

    class CheckpointStream(ir.LazyTensor):
        """A checkpoint weight written as the converted graph declares it, chunk by chunk."""

        __slots__ = ("lazy", "convert")

        def tofile(self, file) -> None:
            for chunk in _chunks(self.lazy, self.convert):
                file.write(memoryview(chunk).cast("B"))

    return CheckpointStream
