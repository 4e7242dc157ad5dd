"""An initializer whose bytes are produced chunk by chunk when the graph is written.

Every streamed writer in exportline has the same shape: the onnx stage reads a checkpoint
tensor (transposed) as it is written, the precision stages copy a tensor from the fp32
data file through a conversion, and the direct fp16 path converts a checkpoint tensor.
Each is this one onnx_ir `LazyTensor` with a different `chunks` generator, so the
writer (`weights.save`) never sees a whole model, only the tensor it is writing.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import numpy as np

Chunks = Callable[[], Iterable[Any]]  # yields buffers (ndarray / memoryview) in file order


@functools.cache
def _chunked_class():
    import onnx_ir as ir

    class ChunkedTensor(ir.LazyTensor):
        """`chunks()` is called when the data file is written; `origin` says where the data
        comes from (the direct fp16 path finds the onnx stage's checkpoint tensors by it)."""

        __slots__ = ("chunks", "origin")

        def tofile(self, file) -> None:
            from exportline.exporters.onnx.write_digest import hasher_for

            hasher = hasher_for(file)  # the data file hashed as it is written (write_digest.py)
            for chunk in self.chunks():
                data = memoryview(chunk).cast("B")
                start = file.tell() if hasher else 0
                file.write(data)
                if hasher:
                    file.flush()  # the hasher reads through its own descriptor
                    hasher.written(file, start, len(data))

    return ChunkedTensor


def chunked_tensor(chunks: Chunks, *, dtype, shape, name: str, materialize: Callable | None = None,
                   origin: Any = None):
    """A lazy initializer written from `chunks()`. `materialize` (default: the chunks
    joined) serves callers that ask a small tensor for its whole value, e.g. the writer
    keeping it inline or the optimizer folding it."""
    import onnx_ir as ir

    def joined():
        data = b"".join(bytes(memoryview(c).cast("B")) for c in chunks())
        return ir.Tensor(np.frombuffer(data, dtype=dtype.numpy()).reshape(shape.numpy()), name=name)

    tensor = _chunked_class()(materialize or joined, dtype=dtype, shape=shape, name=name)
    tensor.chunks, tensor.origin = chunks, origin
    return tensor
