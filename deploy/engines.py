"""Can this machine run a bundle's TensorRT engines? (DESIGN.md §5: an engine is tied to the
TensorRT version and GPU compute capability it was built with.) The judgement itself is the
trt stage's (exporters/trt_meta.py); this module only turns it into a per-file verdict."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from exportline.exporters.core.errors import ArtifactError, NotAvailable
from exportline.exporters.tensorrt.engines import REBUILD, check_engine_compatible, local_target, metadata_path, read_metadata


@dataclass(frozen=True)
class EngineCheck:
    path: str  # bundle-relative
    usable: bool
    reason: str
    rebuild: str  # the command that makes a usable engine here

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_engine(root: Path, rel: str, *, bundle_arg: str | None = None) -> EngineCheck:
    bundle = bundle_arg or str(root)
    rebuild = REBUILD.format(bundle=bundle)
    try:
        local = local_target()
        meta = read_metadata(metadata_path(Path(root) / rel))
        check_engine_compatible(meta, local, bundle=bundle)
    except (NotAvailable, ArtifactError) as exc:
        return EngineCheck(rel, False, str(exc), rebuild)
    return EngineCheck(rel, True, f"TensorRT {local.tensorrt} on compute capability {local.compute_capability}", rebuild)


def check_engines(root: Path, *, bundle_arg: str | None = None) -> list[EngineCheck]:
    root = Path(root)
    plans = sorted(p.relative_to(root).as_posix() for p in (root / "trt").glob("*.plan")) if (root / "trt").is_dir() else []
    return [check_engine(root, rel, bundle_arg=bundle_arg) for rel in plans]
