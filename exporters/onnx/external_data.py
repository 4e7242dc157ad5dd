"""Reading and writing ONNX graphs whose weights live in ONE external data file (DESIGN.md §2).

Graphs above 2 GiB cannot be serialized as one protobuf, so shape inference runs on the
graph *before* the weights are attached, and saving always moves every tensor above a
kilobyte into `<model file stem>.onnx_data` beside the model.
"""

from __future__ import annotations

from pathlib import Path

from exportline.exporters.core.errors import ArtifactError, StageError


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
