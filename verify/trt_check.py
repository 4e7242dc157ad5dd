"""Check of the trt stage: each TensorRT engine against the float64 reference.

Without TensorRT or a CUDA GPU the report says "not available" with the reason: no
number is made up for an engine that cannot run here (DESIGN.md §5).
"""

from __future__ import annotations

from ..exporters.errors import NotAvailable
from ..exporters.trt_meta import local_target
from .bundle import CheckContext
from .report import StageReport

STAGE = "trt"


def check(ctx: CheckContext) -> StageReport:
    try:
        target = local_target()
    except NotAvailable as exc:
        return StageReport(STAGE, "not available", reason=str(exc))
    raise NotAvailable(f"the TensorRT check is not part of this build yet ({target.describe()} found)")
