"""One check per export stage (DESIGN.md §6): `check(ctx: CheckContext) -> StageReport`.

Keyed by the stage's name; tests/test_registries.py fails when a stage in
exporters/stages has no check here, or a check names no stage.
"""

from __future__ import annotations

from typing import Callable

from exportline.verify.checks import hf, onnx, quant, trt
from exportline.verify.report import StageReport

CHECKS: dict[str, Callable[..., StageReport]] = {
    "hf": hf.check,
    "onnx": onnx.check,
    "fp16": quant.check_fp16,
    "int8": quant.check_int8,
    "trt": trt.check,
}
