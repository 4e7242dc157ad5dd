"""Reading and writing ONNX graphs whose weights live in ONE external data file (DESIGN.md §2).

Graphs above 2 GiB cannot be serialized as one protobuf, so shape inference runs on the
graph *before* the weights are attached, and saving always moves every tensor above a
kilobyte into `<model file stem>.onnx_data` beside the model.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from exportline.exporters.core.errors import ArtifactError, StageError
from exportline.exporters.onnx.chunked import chunked_tensor


def data_file_name(model_path: Path) -> str:
    """onnx/model_fp16.onnx → model_fp16.onnx_data (the onnx-community naming)."""
    return Path(model_path).name + "_data"


def external_data_files(root: Path, rel: str) -> list[str]:
    """Bundle-relative names of the external data beside `rel` (model.onnx_data, or the
    model.onnx.data torch writes), so a stage's fingerprint covers the weights too."""
    model = Path(root) / rel
    return sorted(p.relative_to(root).as_posix() for p in model.parent.glob(model.name + "?data"))


def load_graph(path: Path, *, infer: bool = True, weights: bool = True):
    """The model with its weights in memory (`weights=False`: the graph only); `infer` adds
    value_info types first (needed by the fp16 converter), on the weightless graph so the
    2 GiB protobuf limit never applies."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"missing {path}; run the stage that makes it first (see --stages)")
    try:
        model = onnx.load(str(path), load_external_data=False)
        if infer:
            model = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
        if weights:
            load_external_data_for_model(model, str(path.parent))
    except (OSError, onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}; re-run the onnx stage with --force") from None
    return model


def save_graph(model, path: Path) -> list[str]:
    """Write `path` plus one `<name>_data` file beside it; returns the file names written."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.parent / data_file_name(path)
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    try:
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
            location=data.name, size_threshold=1024, convert_attribute=False,
        )
    except OSError as exc:
        raise StageError(f"cannot write {path}: {exc.strerror}; free disk space and run again") from None
    if data.is_file():  # onnx creates it 0600; the bundle is meant to be shared
        data.chmod(path.stat().st_mode & 0o777)
    return [path.name] + ([data.name] if data.is_file() else [])


def weightless_copy(model):
    """The graph with its large tensors pointing at external data that is never read:
    enough for type and shape inference, and small whatever the model size (the weights
    are not copied)."""
    import onnx

    copy = onnx.ModelProto(ir_version=model.ir_version)
    copy.opset_import.extend(model.opset_import)
    copy.functions.extend(model.functions)
    src, graph = model.graph, copy.graph
    graph.name = src.name
    for field in ("node", "input", "output", "value_info"):
        getattr(graph, field).extend(getattr(src, field))
    for t in src.initializer:
        if t.HasField("raw_data") and len(t.raw_data) > 1024:
            stub = graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)
            stub.data_location = onnx.TensorProto.EXTERNAL
            stub.external_data.add(key="location", value="not-loaded")
        else:
            graph.initializer.add().CopyFrom(t)
    return copy


def check_graph(path: Path) -> None:
    """Full ONNX checker with strict type inference, on the path so external data is allowed
    and the 2 GiB limit does not apply; a graph that fails here would fail in TensorRT too."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StageError(f"{Path(path).name} is not a valid ONNX graph ({first}); this is a bug, please report it") from None


# Bytes read from the source data file per step of a streamed copy: what the copy holds in
# memory (per writer thread), whatever the size of the tensor or the model.
CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class Convert:
    """How a streamed initializer's stored bytes become the ones written. Without `shape`,
    `function` maps a chunk of `stored` values (1-D) to the target values elementwise, so
    converting chunk by chunk equals converting the whole tensor; with it, `function` gets
    the whole stored tensor in that shape (per-channel work: smoothing, int8 scales) — one
    tensor held, still not the model."""

    stored: str  # numpy dtype name of the bytes in the source data file, e.g. "float32"
    function: Callable[[np.ndarray], np.ndarray]
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class _Slice:
    path: Path
    offset: int
    length: int


class HeldBytes:
    """Bytes of tensor data the streamed copy holds at once, and the most it ever held: the
    streaming property is asserted on these counts (tests/test_streaming.py), not on timing."""

    def __init__(self):
        self._lock = threading.Lock()
        self.now = self.peak = self.total = 0

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.now += nbytes
            self.total += max(nbytes, 0)
            self.peak = max(self.peak, self.now)

    def reset(self) -> None:
        with self._lock:
            self.now = self.peak = self.total = 0


HELD = HeldBytes()


def slice_of(tensor, source: Path) -> _Slice | None:
    """Where an initializer's bytes lie in the external data beside `source` (None: inline)."""
    from onnx import TensorProto

    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    info = {e.key: e.value for e in tensor.external_data}
    if Path(info["location"]).name != info["location"]:
        raise ArtifactError(f"{source}: tensor {tensor.name} points outside its folder; re-run the onnx stage with --force")
    return _Slice(Path(source).parent / info["location"], int(info.get("offset", 0)), int(info["length"]))


def external_slices(model, source: Path) -> dict[str, _Slice]:
    """Initializer name → where its bytes lie in the external data beside `source`."""
    return {t.name: where for t in model.graph.initializer if (where := slice_of(t, source)) is not None}


def read_external(where: _Slice, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """One external tensor as stored, read whole (for the few values a graph edit needs)."""
    return np.frombuffer(b"".join(bytes(c) for c in _read_chunks(where, None)), dtype=dtype).reshape(shape)


def external_stub(source, name: str, *, data_type: int, dims) -> object:
    """A new initializer `name` whose bytes are `source`'s in the external data, to be
    written through a `Convert` (e.g. W_quantized from W): declared, never loaded."""
    from onnx import TensorProto

    stub = TensorProto(name=name, data_type=data_type, dims=list(dims), data_location=TensorProto.EXTERNAL)
    stub.external_data.extend(source.external_data)
    return stub


def _read_chunks(where: _Slice, convert: Convert | None):
    """The tensor's target bytes, CHUNK_BYTES of source at a time, counted in HELD."""
    itemsize = np.dtype(convert.stored).itemsize if convert else 1
    step = max(CHUNK_BYTES - CHUNK_BYTES % itemsize, itemsize)
    if convert is not None and convert.shape is not None:
        step = max(where.length, 1)
    fd = os.open(where.path, os.O_RDONLY)
    try:
        for begin in range(0, where.length, step):
            size = min(step, where.length - begin)
            buf = np.empty(size, np.uint8)
            if os.preadv(fd, [buf], where.offset + begin) != size:
                raise ArtifactError(f"{where.path} ended early; re-run the onnx stage with --force")
            stored = buf.view(convert.stored) if convert else buf
            if convert is not None and convert.shape is not None:
                stored = stored.reshape(convert.shape)
            out = convert.function(stored) if convert else buf
            held = buf.nbytes + (out.nbytes if out is not buf else 0)
            HELD.add(held)
            try:
                yield memoryview(np.ascontiguousarray(out)).cast("B")
            finally:
                HELD.add(-held)
    finally:
        os.close(fd)


def _streamed(where: _Slice, convert: Convert | None, *, dtype, shape, name: str):
    return chunked_tensor(lambda: _read_chunks(where, convert), dtype=dtype, shape=shape, name=name)


def save_streamed(model, source: Path | None, target: Path, *, convert: dict[str, Convert] | None = None,
                  tensors: dict | None = None) -> list[str]:
    """Write the weightless graph `model` (loaded with `load_graph(source, weights=False)`,
    then edited) as `target` + ONE data file beside it. Each initializer still in `source`'s
    external data is copied chunk by chunk, through `convert[name]` when given (the proto's
    data_type already says the target type); tensors added in memory are written as they
    are; `tensors` gives onnx_ir tensors for initializers whose data is elsewhere (the direct
    fp16 path's checkpoint tensors). The writer is the onnx stage's (onnx_ir, one tensor at a
    time): resident memory is a few chunks, whatever the model's size. Returns the file names."""
    import onnx_ir as ir

    from exportline.exporters.onnx.weights import save

    convert, tensors = convert or {}, tensors or {}
    slices = external_slices(model, source) if source is not None else {}
    ir_model = ir.serde.deserialize_model(model)
    for graph in ir_model.graphs():
        for value in graph.initializers.values():
            if value.name in tensors:  # an onnx_ir tensor that writes itself (direct fp16 path)
                value.const_value = tensors[value.name]
            elif value.name in slices:
                tensor = value.const_value
                value.const_value = _streamed(slices[value.name], convert.get(value.name), dtype=tensor.dtype,
                                              shape=tensor.shape, name=value.name)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = target.parent / data_file_name(target)
    save(ir_model, target, data.name)
    return [target.name] + ([data.name] if data.is_file() else [])
