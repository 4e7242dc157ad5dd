"""One check per export stage (DESIGN.md §6): `check(ctx: CheckContext) -> StageReport`.

Keyed by the stage's name; tests/test_registries.py fails when a stage in
exporters/stages has no check here, or a check names no stage. A custom module's bundle
(source kind `custom`) is checked by verify/checks/declared.py on its declared I/O.
"""

from __future__ import annotations

from typing import Callable

from exportline.verify.checks import declared, hf, onnx, quant, trt
from exportline.verify.checks.context import CheckContext, torch_side
from exportline.verify.report import StageReport


def in_child(check: Callable[[CheckContext], StageReport]) -> Callable[[CheckContext], StageReport]:
    """A check that is torch work from end to end (no ONNX Runtime): whole in a torch child
    when `ctx.isolate`."""
    def run(ctx: CheckContext) -> StageReport:
        return torch_side(ctx, f"the {check.__module__.rpartition('.')[2]} check", check)

    run.__doc__ = check.__doc__
    return run


CHECKS: dict[str, Callable[..., StageReport]] = {
    "hf": declared.either(in_child(hf.check), in_child(declared.check_hf)),
    "onnx": declared.either(onnx.check, declared.check_onnx),
    "fp16": declared.either(quant.check_fp16, declared.check_fp16),
    "int8": declared.either(quant.check_int8, declared.check_int8),
    "trt": trt.check,
}
