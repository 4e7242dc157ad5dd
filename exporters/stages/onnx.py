"""onnx stage: HF folder at the bundle root → onnx/model.onnx + onnx/model.onnx_data."""

from __future__ import annotations

from typing import Any

from exportline.exporters.core.pipeline import Stage, StageContext


def _inputs(ctx: StageContext) -> list[str]:
    from exportline.exporters.onnx.export import check_architecture
    from exportline.exporters.sources.weights_reader import weight_files

    check_architecture(ctx.bundle.root)
    return ["config.json", *weight_files(ctx.bundle.root)]


def _run(ctx: StageContext) -> dict[str, Any]:
    from exportline.exporters.onnx.export import export_onnx

    result = export_onnx(ctx.bundle.root, ctx.tmp / "onnx", opset=ctx.options.opset or _opset(),
                         source=ctx.source.describe(), progress=ctx.progress)
    return result.record()


def _opset() -> int:
    from exportline.exporters.onnx.export import OPSET

    return OPSET


STAGE = Stage(
    name="onnx",
    run=_run,
    inputs=_inputs,
    versions=("torch", "transformers", "onnx", "onnxscript", "onnx-ir"),
    options=lambda opts: {"opset": opts.opset or _opset()},
)
