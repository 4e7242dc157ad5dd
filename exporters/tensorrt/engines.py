"""TensorRT engines as data: names, the JSON beside each plan, compatibility, profiles.

Everything here is pure Python and runs on a CPU machine without TensorRT; the trt stage
(exporters/trt_stage.py) and the TensorRT runner (verify/runners/trt_runner.py) only wire
it to the TensorRT API. An engine is tied to the TensorRT version and the GPU compute
capability it was built with (DESIGN.md §5), so both are in its file name and its JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exportline.exporters.core.errors import ArtifactError, ConfigError, NotAvailable
from exportline.exporters.core.layout import GRAPHS
from exportline.exporters.core.shapes import BATCH, PAST, SEQUENCE, TOTAL, KVLayout, ProfileShapes, optimization_profiles

META_FORMAT = "exportline-trt-engine/1"
# Precision → the ONNX graph its engine is built from. Strongly typed: the graph decides.
ENGINE_SOURCES: dict[str, str] = {p: GRAPHS[p].path for p in ("fp16", "int8")}
MAX_SEQUENCE_CAP = 2048  # default max_sequence = min(max_position_embeddings, this)
REBUILD = "exportline export {bundle} --stages trt --force"


# -- the local target ------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """What an engine is tied to: TensorRT version and GPU compute capability."""

    tensorrt: str  # tensorrt.__version__, e.g. "10.13.3.9"
    compute_capability: str  # "major.minor", e.g. "9.0"
    gpu: str = ""
    cuda: str = ""  # CUDA version torch was built with

    @property
    def sm(self) -> str:
        return "sm" + self.compute_capability.replace(".", "")

    def describe(self) -> str:
        return f"TensorRT {self.tensorrt} on {self.sm}" + (f" ({self.gpu})" if self.gpu else "")


def load_tensorrt():
    """The tensorrt module, or NotAvailable with the reason the pipeline records as skipped."""
    try:
        import tensorrt
    except ImportError:
        raise NotAvailable("TensorRT not installed") from None
    except Exception as exc:  # the PyPI stub raises at import when NVIDIA's libs are missing
        raise NotAvailable(f"TensorRT failed to import ({type(exc).__name__}: {exc})") from None
    return tensorrt


def local_target() -> Target:
    """This machine's target; NotAvailable when TensorRT or a CUDA GPU is missing."""
    trt = load_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise NotAvailable("no CUDA GPU")
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return Target(
        tensorrt=trt.__version__, compute_capability=f"{props.major}.{props.minor}",
        gpu=props.name, cuda=torch.version.cuda or "",
    )


def collecting_logger(trt):
    class CollectingLogger(trt.ILogger):
        """Keeps TensorRT's errors for the one-line message; the library never prints."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(str(msg).strip().splitlines()[0] if str(msg).strip() else "")

    return CollectingLogger()


# -- names --------------------------------------------------------------------------------------
def engine_filename(precision: str, target: Target) -> str:
    """`<precision>.sm<major><minor>.trt<version>.plan` (DESIGN.md §2)."""
    if precision not in ENGINE_SOURCES:
        raise ConfigError(f"unknown engine precision {precision!r}; known: {', '.join(ENGINE_SOURCES)}")
    return f"{precision}.{target.sm}.trt{target.tensorrt}.plan"


def metadata_path(plan: Path) -> Path:
    """The JSON beside a plan: fp16.sm90.trt10.13.3.9.plan → fp16.sm90.trt10.13.3.9.json."""
    return Path(plan).with_suffix(".json")


# -- profiles -----------------------------------------------------------------------------------
SetShape = tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def default_max_sequence(config) -> int:
    return min(int(config.max_position_embeddings), MAX_SEQUENCE_CAP)


def engine_profiles(layout: KVLayout, *, max_batch: int, max_sequence: int) -> list[ProfileShapes]:
    """The prefill and decode profiles of shapes.py, checked for consistency."""
    if max_batch < 1 or max_sequence < 1:
        raise ConfigError(f"max_batch ({max_batch}) and max_sequence ({max_sequence}) must be ≥ 1")
    profiles = optimization_profiles(layout, max_batch=max_batch, max_sequence=max_sequence)
    for profile in profiles:
        validate_profile(profile, layout)
    return profiles


def set_shape_calls(profile: ProfileShapes) -> list[SetShape]:
    """The `IOptimizationProfile.set_shape(name, min, opt, max)` calls for one profile."""
    return [(name, *shapes) for name, shapes in profile.shapes.items()]


def validate_profile(profile: ProfileShapes, layout: KVLayout) -> None:
    """Names are the declared inputs; min ≤ opt ≤ max; within each of min/opt/max the
    dimensions agree: one batch, position_ids = input_ids, attention_mask = past + sequence."""
    declared = [s.name for s in layout.inputs()]
    if list(profile.shapes) != declared:
        raise ConfigError(f"profile {profile.name}: inputs {list(profile.shapes)} differ from shapes.py {declared}")
    for spec in layout.inputs():
        lo, opt, hi = profile.shapes[spec.name]
        if not (len(lo) == len(opt) == len(hi) == len(spec.dims)):
            raise ConfigError(f"profile {profile.name}: {spec.name} has rank {len(lo)}, declared {len(spec.dims)}")
        if any(not 0 <= a <= b <= c for a, b, c in zip(lo, opt, hi)):
            raise ConfigError(f"profile {profile.name}: {spec.name} needs min ≤ opt ≤ max, got {lo} {opt} {hi}")
    for which, point in zip(("min", "opt", "max"), range(3)):
        values = _dim_values(profile, layout, point)
        if values[BATCH] < 1 or values[SEQUENCE] < 1:
            raise ConfigError(f"profile {profile.name} {which}: batch and sequence must be ≥ 1, got {values}")


def _dim_values(profile: ProfileShapes, layout: KVLayout, point: int) -> dict[str, int]:
    """Read batch/sequence/past back from the shapes at min (0), opt (1) or max (2), and
    fail on the first input that disagrees with them."""
    values: dict[str, int] = {}
    for spec in layout.inputs():
        shape = profile.shapes[spec.name][point]
        for axis, (dim, size) in enumerate(zip(spec.dims, shape)):
            if dim == TOTAL:
                continue  # checked below, once past and sequence are known
            expected = dim if isinstance(dim, int) else values.setdefault(dim, size)
            if size != expected:
                why = f"fixed at {dim}" if isinstance(dim, int) else f"{dim} is {expected} in the other inputs"
                raise ConfigError(f"profile {profile.name}: {spec.name} axis {axis} is {size}, but {why}")
    values.setdefault(PAST, 0)  # a layout without KV inputs has no past
    mask = profile.shapes["attention_mask"][point]
    if mask[1] != values[PAST] + values[SEQUENCE]:
        raise ConfigError(
            f"profile {profile.name}: attention_mask length {mask[1]} ≠ past {values[PAST]} + sequence {values[SEQUENCE]}"
        )
    return values


def profiles_to_json(profiles: list[ProfileShapes]) -> list[dict[str, Any]]:
    return [
        {"name": p.name, "shapes": {n: {"min": list(lo), "opt": list(opt), "max": list(hi)}
                                    for n, (lo, opt, hi) in p.shapes.items()}}
        for p in profiles
    ]


def select_profile(profiles: list[dict[str, Any]], shapes: dict[str, tuple[int, ...]], *, bundle: str = "DIR") -> int:
    """Index of the engine profile for a feed: prefill when past is 0 and sequence > 1,
    decode otherwise. A feed outside that profile's min..max is refused, saying how to
    rebuild; `profiles` is the "profiles" list of the engine's JSON."""
    sequence = shapes["input_ids"][1]
    past = shapes["attention_mask"][1] - sequence
    want = "prefill" if past == 0 and sequence > 1 else "decode"
    names = [p["name"] for p in profiles]
    if want not in names:
        raise ArtifactError(f"the engine has profiles {names}, not {want}; rebuild it: {REBUILD.format(bundle=bundle)}")
    index = names.index(want)
    for name, bounds in profiles[index]["shapes"].items():
        if name not in shapes:
            raise ConfigError(f"the feed lacks input {name!r} that the engine needs")
        shape = tuple(shapes[name])
        if len(shape) != len(bounds["min"]) or any(
            not lo <= s <= hi for s, lo, hi in zip(shape, bounds["min"], bounds["max"])
        ):
            raise ConfigError(
                f"{name} shape {list(shape)} is outside the engine's {want} profile "
                f"(min {bounds['min']}, max {bounds['max']}); rebuild with larger limits: "
                f"{REBUILD.format(bundle=bundle)} --trt-max-batch B --trt-max-sequence S"
            )
    return index


# -- metadata -----------------------------------------------------------------------------------
def build_metadata(
    *, precision: str, target: Target, profiles: list[ProfileShapes], source: dict[str, str],
    max_batch: int, max_sequence: int, workspace_bytes: int, io: dict[str, list[str]],
) -> dict[str, Any]:
    """The JSON written beside an engine. `source` maps the ONNX files it was built from
    (bundle-relative) to their sha256; `io` holds the engine's input and output names."""
    return {
        "format": META_FORMAT,
        "precision": precision,
        "engine": engine_filename(precision, target),
        "tensorrt": target.tensorrt,
        "compute_capability": target.compute_capability,
        "gpu": target.gpu,
        "cuda": target.cuda,
        "strongly_typed": True,
        # Built for exactly this TensorRT and GPU (no VERSION_COMPATIBLE flag, no hardware
        # compatibility level): the fastest engine, and the reason for the compatibility check.
        "version_compatible": False,
        "hardware_compatible": False,
        "source": dict(source),
        "max_batch": max_batch,
        "max_sequence": max_sequence,
        "workspace_bytes": workspace_bytes,
        "profiles": profiles_to_json(profiles),
        "inputs": list(io["inputs"]),
        "outputs": list(io["outputs"]),
    }


def write_metadata(path: Path, meta: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(meta, indent=2) + "\n")


def read_metadata(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing; rebuild the engine: {REBUILD.format(bundle='DIR')}") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); rebuild the engine: {REBUILD.format(bundle='DIR')}") from None
    if meta.get("format") != META_FORMAT:
        raise ArtifactError(f"{path} is not an exportline engine description; rebuild: {REBUILD.format(bundle='DIR')}")
    return meta


def check_engine_compatible(meta: dict[str, Any], local: Target, *, bundle: str | Path = "DIR") -> None:
    """Refuse an engine built for another TensorRT version or GPU compute capability:
    TensorRT would fail to deserialize it, or worse, run it with tactics for another GPU."""
    problems = []
    if meta.get("tensorrt") != local.tensorrt:
        problems.append(f"TensorRT {meta.get('tensorrt')} (this machine has {local.tensorrt})")
    if meta.get("compute_capability") != local.compute_capability:
        problems.append(
            f"compute capability {meta.get('compute_capability')} (this GPU is {local.compute_capability})"
        )
    if problems:
        raise ArtifactError(
            f"engine {meta.get('engine', '?')} was built for " + " and ".join(problems)
            + f"; rebuild it from onnx/: {REBUILD.format(bundle=bundle)}"
        )


def find_engine(bundle_root: Path, precision: str, local: Target) -> tuple[Path, dict[str, Any]]:
    """The plan for `precision` built for this machine, with its JSON. When only engines
    for other targets exist, the compatibility check refuses with the rebuild command."""
    root = Path(bundle_root)
    plan = root / "trt" / engine_filename(precision, local)
    if plan.is_file():
        meta = read_metadata(metadata_path(plan))
        check_engine_compatible(meta, local, bundle=root)
        return plan, meta
    others = sorted((root / "trt").glob(f"{precision}.*.plan"))
    if others:
        check_engine_compatible(read_metadata(metadata_path(others[0])), local, bundle=root)
        raise ArtifactError(f"{others[0]} does not match its JSON; rebuild it: {REBUILD.format(bundle=root)}")
    raise ArtifactError(f"{root} has no {precision} TensorRT engine in trt/; build it: {REBUILD.format(bundle=root)}")
