"""`exportline handoff --triton OUT`: a Triton Inference Server model repository from a bundle.

    OUT/<name>/config.pbtxt
    OUT/<name>/1/model.onnx + model.onnx_data     (--backend onnx, platform onnxruntime_onnx)
    OUT/<name>/1/model.plan                       (--backend tensorrt, platform tensorrt_plan)

Names and dims come from exporters/shapes.py (KVLayout from the bundle's config.json); the
element types from the ONNX graph itself, which must declare exactly those names. Triton's
onnxruntime backend opens model.onnx by path (CreateSession), so ONNX Runtime resolves the
external data relative to the model file: the weights file sits beside it and the graph's
external-data location is rewritten to its new name. Files are copied, never hard-linked
(see copy_file), so the bundle and the repository stay independent.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from exportline.deploy.engines import EngineCheck, check_engine
from exportline.exporters.core.errors import ArtifactError, ConfigError, NotAvailable, OutputError
from exportline.exporters.core.layout import GRAPHS
from exportline.exporters.core.shapes import KVLayout, TensorSpec, optimization_profiles
from exportline.exporters.onnx.files_check import all_tensors

PLATFORMS = {"onnx": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
FILENAMES = {"onnx": "model.onnx", "tensorrt": "model.plan"}
ONNX_BY_PRECISION = {p: g.path for p, g in GRAPHS.items()}
EXTERNAL_DATA = "model.onnx_data"
# onnx.TensorProto element type → Triton DataType (model_config.proto)
_TRITON_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16", 6: "TYPE_INT32",
                 7: "TYPE_INT64", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 12: "TYPE_UINT32",
                 13: "TYPE_UINT64", 16: "TYPE_BF16"}
_DECLARED = {"int64": "TYPE_INT64", "int32": "TYPE_INT32"}  # shapes.py dtypes other than "float"


@dataclass(frozen=True)
class TritonTensor:
    name: str
    data_type: str
    dims: tuple[int, ...]  # -1 for every dynamic dimension


@dataclass
class TritonModel:
    name: str
    backend: str
    inputs: list[TritonTensor]
    outputs: list[TritonTensor]
    source: str  # the bundle file the model was made from
    profiles: list[str] = field(default_factory=list)  # TensorRT optimization profiles to enable
    model_dir: Path | None = None
    files: list[str] = field(default_factory=list)
    engine_check: EngineCheck | None = None

    @property
    def platform(self) -> str:
        return PLATFORMS[self.backend]


def layout_of(root: Path) -> KVLayout:
    from exportline.exporters.sources.custom.model import is_custom
    from exportline.exporters.sources.hf_writer import load_config

    if not (Path(root) / "config.json").is_file():
        raise ArtifactError(f"{root} has no config.json; export the hf stage first: exportline export SOURCE --out {root}")
    if is_custom(root):  # the Triton configs written here are the KV-cache LM ones
        raise NotAvailable(f"{root} holds a custom module: the Triton handoff is not available for it yet")
    return KVLayout.from_config(load_config(root))


def onnx_io_types(path: Path) -> dict[str, str]:
    """Triton type of every graph input and output (the graph only; weights are not read)."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # protobuf's DecodeError, or an OSError: the file is not a readable graph
        raise ArtifactError(f"{path} is not a readable ONNX graph ({type(exc).__name__}); re-export it: "
                            f"exportline export SOURCE --out {path.parent.parent} --stages onnx --force") from None
    return {v.name: _TRITON_TYPES.get(v.type.tensor_type.elem_type, "TYPE_INVALID") for v in [*graph.input, *graph.output]}


def _tensors(specs: list[TensorSpec], types: dict[str, str], source: str) -> list[TritonTensor]:
    out = []
    for spec in specs:
        if spec.name not in types:
            raise ArtifactError(f"{source} has no tensor {spec.name!r}, which exporters/shapes.py declares; re-export it")
        want = _DECLARED.get(spec.dtype)
        if want and types[spec.name] != want:
            raise ArtifactError(f"{source}: {spec.name} is {types[spec.name]}, shapes.py declares {spec.dtype}; re-export it")
        out.append(TritonTensor(spec.name, types[spec.name], tuple(d if isinstance(d, int) else -1 for d in spec.dims)))
    return out


def describe_model(root: Path, *, backend: str, name: str, onnx_rel: str) -> TritonModel:
    """Inputs/outputs from shapes.py, types from the ONNX graph; undeclared graph I/O is an error."""
    layout = layout_of(root)
    onnx_path = Path(root) / onnx_rel
    if not onnx_path.is_file():
        raise ArtifactError(f"{onnx_path} is missing; export it first: exportline export SOURCE --out {root} --stages onnx,fp16,int8")
    types = onnx_io_types(onnx_path)
    inputs, outputs = _tensors(layout.inputs(), types, onnx_rel), _tensors(layout.outputs(), types, onnx_rel)
    extra = sorted(set(types) - {t.name for t in inputs + outputs})
    if extra:
        raise ArtifactError(f"{onnx_rel} has tensors shapes.py does not declare ({', '.join(extra[:3])}); re-export it")
    profiles = []
    if backend == "tensorrt":  # the trt stage builds one profile per entry of optimization_profiles, in order
        profiles = [str(i) for i, _ in enumerate(optimization_profiles(layout, max_batch=1, max_sequence=2))]
    return TritonModel(name, backend, inputs, outputs, onnx_rel, profiles)


def render_config(model: TritonModel) -> str:
    lines = [
        f"# Triton model configuration written by `exportline handoff` from {model.source}",
        f'name: "{model.name}"',
        f'platform: "{model.platform}"',
        "max_batch_size: 0  # the batch is an explicit dynamic dimension (-1) of every tensor",
        f'default_model_filename: "{FILENAMES[model.backend]}"',
    ]
    for key, tensors in (("input", model.inputs), ("output", model.outputs)):
        lines.append(f"{key} [")
        for i, t in enumerate(tensors):
            lines += ["  {", f'    name: "{t.name}"', f"    data_type: {t.data_type}",
                      f"    dims: [ {', '.join(str(d) for d in t.dims)} ]", "  }" + ("," if i < len(tensors) - 1 else "")]
        lines.append("]")
    if model.profiles:  # without a profile list Triton uses only the first (prefill) profile
        profiles = ", ".join(f'"{p}"' for p in model.profiles)
        lines += ["instance_group [", "  {", "    kind: KIND_GPU", "    count: 1", f"    profile: [ {profiles} ]", "  }", "]"]
    return "\n".join(lines) + "\n"


def write_triton_repo(
    root: Path, out: Path, *, backend: str = "onnx", precision: str | None = None, name: str | None = None,
    engine: str | None = None,
) -> TritonModel:
    """precision None: fp32 ONNX, or the bundle's only engine."""
    root, out = Path(root), Path(out)
    if backend not in PLATFORMS:
        raise ConfigError(f"--backend {backend!r}: choose one of {', '.join(PLATFORMS)}")
    if precision is not None and precision not in ONNX_BY_PRECISION:
        raise ConfigError(f"--precision {precision!r}: choose one of {', '.join(ONNX_BY_PRECISION)}")
    name = _model_name(name or _bundle_name(root))
    plan = _pick_engine(root, engine, precision) if backend == "tensorrt" else None
    if plan is not None:  # the engine's I/O types are those of the ONNX it was built from
        prefix = Path(plan).name.split(".")[0]
        precision = prefix if prefix in ONNX_BY_PRECISION else precision
    precision = precision or "fp32"
    _require_intact(root, plan or ONNX_BY_PRECISION[precision])
    model = describe_model(root, backend=backend, name=name, onnx_rel=ONNX_BY_PRECISION[precision])
    final = out / name
    if final.exists():
        raise OutputError(f"{final} already exists; remove it or pick another --name")
    tmp = out / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "1").mkdir(parents=True)
        if plan is None:
            files = copy_onnx(root / model.source, tmp / "1")
        else:
            copy_file(root / plan, tmp / "1" / FILENAMES["tensorrt"])
            files, model.source = [FILENAMES["tensorrt"]], plan
            model.engine_check = check_engine(root, plan)
        (tmp / "config.pbtxt").write_text(render_config(model))
        os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"cannot write {final}: {exc.strerror}; pick a writable --triton folder") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    model.model_dir, model.files = final, ["config.pbtxt", *(f"1/{f}" for f in files)]
    return model


def copy_onnx(src: Path, dest_dir: Path) -> list[str]:
    """model.onnx (+ model.onnx_data) in dest_dir; the graph's external-data location is
    rewritten to the new file name, the weights are copied byte for byte."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    external = [t for t in all_tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    locations = {e.value for t in external for e in t.external_data if e.key == "location"}
    if len(locations) > 1:
        raise ArtifactError(f"{src} keeps its weights in {len(locations)} files; DESIGN.md §4 wants one; re-export it")
    files = [FILENAMES["onnx"]]
    if locations:
        (location,) = locations
        for t in external:
            for e in t.external_data:
                if e.key == "location":
                    e.value = EXTERNAL_DATA
        copy_file(src.parent / location, dest_dir / EXTERNAL_DATA)
        files.append(EXTERNAL_DATA)
    (dest_dir / FILENAMES["onnx"]).write_bytes(model.SerializeToString())
    return files


def _pick_engine(root: Path, engine: str | None, precision: str | None) -> str:
    plans = sorted(p.relative_to(root).as_posix() for p in (root / "trt").glob("*.plan")) if (root / "trt").is_dir() else []
    if engine:
        rel = Path(engine).as_posix()
        rel = rel if (root / rel).is_file() else f"trt/{Path(engine).name}"
        if not (root / rel).is_file():
            raise ArtifactError(f"no engine {engine} in {root}/trt; engines there: {', '.join(plans) or 'none'}")
        return rel
    if not plans:
        raise ArtifactError(f"{root} has no TensorRT engine; build one on a GPU machine with TensorRT: "
                            f"exportline export {root} --stages trt (or hand off ONNX: --backend onnx)")
    matching = [p for p in plans if precision is None or Path(p).name.startswith(f"{precision}.")]
    if len(matching) != 1:
        raise ConfigError(f"{len(matching)} {precision or ''} engines in {root}/trt ({', '.join(plans)}); "
                          "pick one with --engine")
    return matching[0]


def copy_file(src: Path, dest: Path) -> None:
    """A copy of its own, never a hard link: onnx >= 1.23 refuses external data that has more
    than one link ("potential hardlink attack"), which would break both the Triton copy and the
    bundle's own graph. copy_file_range lets the kernel share extents where the filesystem can
    (reflink on btrfs/XFS) and copy in-kernel elsewhere; plain reads where it is unsupported.
    The new file gets the user's umask, like every file exportline writes."""
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        remaining = os.fstat(fin.fileno()).st_size
        try:
            while remaining > 0:
                sent = os.copy_file_range(fin.fileno(), fout.fileno(), remaining)
                if sent == 0:
                    break
                remaining -= sent
        except (AttributeError, OSError) as exc:  # no such call, or not between these filesystems
            if isinstance(exc, OSError) and exc.errno not in _NO_COPY_RANGE:
                raise
        if remaining > 0:
            fin.seek(0)
            fout.seek(0)
            fout.truncate()
            shutil.copyfileobj(fin, fout, 1 << 20)


_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}


def _require_intact(root: Path, artifact: str) -> None:
    """What the handoff copies (and config.json, which shapes it) against manifest.json,
    hashed: a Triton repository is a publication, so no size+mtime shortcut."""
    from exportline.exporters.core.bundle import Bundle

    bundle = Bundle(root)
    if not bundle.manifest_path.is_file():
        raise ArtifactError(f"{root} is not an exportline bundle (no manifest.json); export it first: "
                            f"exportline export SOURCE --out {root}")
    companion = artifact[: -len(".plan")] + ".json" if artifact.endswith(".plan") else artifact + "_data"
    bundle.require_intact(["config.json", artifact, companion], fast=False)


def _bundle_name(root: Path) -> str:
    from exportline.exporters.core.bundle import Bundle

    bundle = Bundle(root)
    return (bundle.read_manifest().get("name") if bundle.manifest_path.is_file() else None) or root.resolve().name


def _model_name(name: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    if not clean or clean.startswith("."):
        raise ConfigError(f"--name {name!r} is not usable as a Triton model name; use letters, digits, '_', '-', '.'")
    return clean
