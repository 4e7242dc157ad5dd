"""One check per export stage (DESIGN.md §6): `check(ctx: CheckContext) -> StageReport`.

Keyed by the stage's name; tests/test_registries.py fails when a stage in
exporters/stages has no check here, or a check names no stage. A custom module's bundle
(source kind `custom`) is checked by verify/checks/declared.py on its declared I/O.
"""

from __future__ import annotations

from typing import Callable

from exportline.verify.checks import declared, hf, onnx, quant, trt
from exportline.verify.report import StageReport

CHECKS: dict[str, Callable[..., StageReport]] = {
    "hf": declared.either(hf.check, declared.check_hf),
    "onnx": declared.either(onnx.check, declared.check_onnx),
    "fp16": declared.either(quant.check_fp16, declared.check_fp16),
    "int8": declared.either(quant.check_int8, declared.check_int8),
    "trt": trt.check,
}
