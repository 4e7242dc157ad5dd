"""Check an exported ONNX model's files before a runtime opens them.

ONNX Runtime reports a missing or short external data file as a long C++ message, or not
at all until a tensor is read; this says in one line which file is wrong and what to run.
Reads only model.onnx (graph and tensor locations), never the weight bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from exportline.exporters.core.errors import ArtifactError


@dataclass(frozen=True)
class OnnxFiles:
    model: Path
    data_files: tuple[Path, ...]  # external data files the graph points to
    required_bytes: int  # bytes the graph expects the data files to hold, in all


def _fix(path: Path) -> str:
    bundle = path.parent.parent if path.parent.name == "onnx" else path.parent
    return f"re-export it: exportline export SOURCE --out {bundle} --stages onnx --force"


def check_onnx_files(path: str | Path) -> OnnxFiles:
    """Raise ArtifactError (one line) if model.onnx is missing or unreadable, or any external
    data file it references is missing, outside its folder, or shorter than the graph needs."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist; {_fix(path)}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{path} is truncated or not an ONNX model ({type(exc).__name__}); {_fix(path)}") from None
    # A cut that falls on a field boundary still parses; a whole model has all three.
    if not (model.graph.node and model.graph.output and model.opset_import):
        raise ArtifactError(f"{path} is truncated (no graph, outputs or opset); {_fix(path)}")
    needed: dict[str, int] = {}  # location → bytes it must hold
    for tensor in all_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        rel = PurePosixPath(location)
        if not location or rel.is_absolute() or ".." in rel.parts:
            raise ArtifactError(f"{path}: tensor {tensor.name} points outside the model folder ({location!r}); {_fix(path)}")
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        needed[location] = max(needed.get(location, 0), end)
    files = []
    for location, end in sorted(needed.items()):
        data = path.parent / location
        if not data.is_file():
            raise ArtifactError(f"{path}: external data file {data.name} is missing; {_fix(path)}")
        size = data.stat().st_size
        if size < end:
            raise ArtifactError(f"{data} is truncated ({size} of {end} bytes); {_fix(path)}")
        files.append(data)
    return OnnxFiles(path, tuple(files), sum(needed.values()))


def all_tensors(graph):
    """Every tensor that may hold its bytes in external data: initializers and node
    attributes (a Constant's value), in `graph` and in its subgraphs, recursively."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from all_tensors(sub)
