"""onnx stage: HF folder at the bundle root → onnx/model.onnx + onnx/model.onnx_data.

Built-in architectures: the KV-cache graph of exporters/onnx/export.py. A custom module's
remote-code folder: its declared forward (exporters/onnx/declared.py)."""

from __future__ import annotations

from typing import Any

from exportline.exporters.core.pipeline import Stage, StageContext


def _inputs(ctx: StageContext) -> list[str]:
    from exportline.exporters.onnx.export import check_architecture
    from exportline.exporters.sources.custom.model import is_custom
    from exportline.exporters.sources.weights_reader import weight_files

    if is_custom(ctx.bundle.root):  # the module's code is an input too
        code = sorted(p.name for p in ctx.bundle.root.glob("*.py") if p.name != "hubconf.py")
        return ["config.json", *code, *weight_files(ctx.bundle.root)]
    check_architecture(ctx.bundle.root)
    return ["config.json", *weight_files(ctx.bundle.root)]


def _run(ctx: StageContext) -> dict[str, Any]:
    from exportline.exporters.onnx.export import export_onnx
    from exportline.exporters.sources.custom.model import is_custom

    if is_custom(ctx.bundle.root):  # a custom module: its declared I/O, no KV cache
        from exportline.exporters.onnx.declared import export_declared

        return export_declared(ctx.bundle.root, ctx.tmp / "onnx", opset=ctx.options.opset or _opset(),
                               source=ctx.source.describe(), progress=ctx.progress)

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
