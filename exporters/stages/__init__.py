"""The export stages in pipeline order, one `Stage` record each (DESIGN.md §1).

A new stage is one file here defining `STAGE = Stage(...)` and one entry in STAGES; its
check is one entry in verify/checks (tests/test_registries.py holds the two together).
Stage modules import heavy libraries inside `run`, so listing the stages stays cheap.
"""

from __future__ import annotations

from exportline.exporters.core.errors import ConfigError
from exportline.exporters.core.pipeline import Stage
from exportline.exporters.stages import fp16, hf, int8, onnx, trt

STAGES: dict[str, Stage] = {s.name: s for s in (hf.STAGE, onnx.STAGE, fp16.STAGE, int8.STAGE, trt.STAGE)}


def parse_stages(text: str, *, flag: str = "--stages") -> list[Stage]:
    """Comma-separated stage names → records in pipeline order, whatever order was typed."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in STAGES]
    if unknown or not names:
        raise ConfigError(f"{flag} {text!r}: unknown stage {', '.join(unknown) or '(none given)'}; "
                          f"stages are: {','.join(STAGES)}")
    return [stage for name, stage in STAGES.items() if name in names]
