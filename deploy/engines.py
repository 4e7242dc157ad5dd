"""Can this machine run a bundle's TensorRT engines? (DESIGN.md §5: an engine is tied to the
TensorRT version and GPU compute capability it was built with.)"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# trt/<precision>.sm<cc>.trt<version>.plan, DESIGN.md §2
_NAME = re.compile(r"^(?P<precision>[A-Za-z0-9_]+)\.sm(?P<sm>\d+)\.trt(?P<trt>\d+(?:\.\d+)*)\.plan$")


@dataclass(frozen=True)
class EngineCheck:
    path: str  # bundle-relative
    usable: bool
    reason: str
    rebuild: str  # the command that makes a usable engine here

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_env(plan: Path) -> dict[str, str | bool | None]:
    """TensorRT version and sm the engine was built for: its .json beside it, else its file name."""
    env: dict[str, Any] = {"tensorrt": None, "sm": None, "version_compatible": False, "hardware_compatible": False}
    if m := _NAME.match(plan.name):
        env.update(tensorrt=m["trt"], sm=m["sm"])
    sidecar = plan.with_suffix(".json")
    if sidecar.is_file():
        try:
            data = json.loads(sidecar.read_text())
        except json.JSONDecodeError:
            data = {}
        build = data.get("build") if isinstance(data.get("build"), dict) else data
        trt = build.get("tensorrt_version") or build.get("trt_version") or build.get("tensorrt")
        sm = build.get("compute_capability") or build.get("sm")
        if trt:
            env["tensorrt"] = str(trt)
        if sm:
            env["sm"] = _sm_digits(sm)
        env["version_compatible"] = bool(build.get("version_compatible"))
        env["hardware_compatible"] = bool(build.get("hardware_compatible"))
    return env


def _sm_digits(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "".join(str(v) for v in value)
    return re.sub(r"\D", "", str(value))


def local_env() -> tuple[str | None, str | None, str]:
    """(TensorRT version, GPU sm, why not usable) of this machine; imports only what exists."""
    try:
        import tensorrt
    except ImportError:
        return None, None, "TensorRT not installed"
    try:
        import torch

        if not torch.cuda.is_available():
            return tensorrt.__version__, None, "no CUDA GPU"
        major, minor = torch.cuda.get_device_capability()
    except ImportError:
        return tensorrt.__version__, None, "torch is needed to query the GPU"
    return tensorrt.__version__, f"{major}{minor}", ""


def check_engine(root: Path, rel: str, *, bundle_arg: str | None = None) -> EngineCheck:
    rebuild = f"exportline export {bundle_arg or root} --stages trt"
    env = build_env(Path(root) / rel)
    trt, sm, missing = local_env()
    if missing:
        return EngineCheck(rel, False, missing, rebuild)
    if env["tensorrt"] is None or env["sm"] is None:
        return EngineCheck(rel, False, "build environment unknown (no .json beside the engine, unrecognised name)", rebuild)
    same = 1 if env["version_compatible"] else 3  # a version-compatible engine only needs the same major
    if trt.split(".")[:same] != str(env["tensorrt"]).split(".")[:same]:
        return EngineCheck(rel, False, f"built with TensorRT {env['tensorrt']}, this machine has {trt}", rebuild)
    if not env["hardware_compatible"] and sm != env["sm"]:
        return EngineCheck(rel, False, f"built for sm{env['sm']}, this GPU is sm{sm}", rebuild)
    return EngineCheck(rel, True, f"TensorRT {trt} on sm{sm}", rebuild)


def check_engines(root: Path, *, bundle_arg: str | None = None) -> list[EngineCheck]:
    root = Path(root)
    plans = sorted(p.relative_to(root).as_posix() for p in (root / "trt").glob("*.plan")) if (root / "trt").is_dir() else []
    return [check_engine(root, rel, bundle_arg=bundle_arg) for rel in plans]
