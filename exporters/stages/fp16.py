"""fp16 stage: onnx/model.onnx → onnx/model_fp16.onnx + model_fp16.onnx_data (DESIGN.md §4).

With no fp32 graph in the bundle (`--stages hf,fp16`) the float16 graph is built straight
from the HF weights instead. What stays float32 and why, and how the graph is converted
without its weights: exporters/precision/fp16_graph.py. Here: the graph is loaded without
its weights, converted, stamped, and written with the weights streamed chunk by chunk
(onnx/external_data.save_streamed, the onnx stage's writer), so the stage holds the graph
and a few chunks, not the model.
"""

from __future__ import annotations

from typing import Any

from exportline.exporters.core.layout import GRAPHS
from exportline.exporters.core.pipeline import Stage, StageContext
from exportline.exporters.onnx.external_data import check_graph, external_data_files, external_slices, load_graph, save_streamed
from exportline.exporters.onnx.metadata import stamp_derived
from exportline.exporters.precision.fp16_graph import FLOAT16_MAX, KEEP_FLOAT32_IO, convert, float16_conversions

SOURCE = GRAPHS["fp32"].path
TARGET = GRAPHS["fp16"].path


def _direct(ctx: StageContext) -> bool:
    """No fp32 graph in the bundle (`--stages hf,fp16`): build float16 from the HF weights."""
    return not ctx.bundle_file(SOURCE).is_file()


def _run(ctx: StageContext) -> dict[str, Any]:
    return _run_direct(ctx) if _direct(ctx) else _run_from_onnx(ctx)


def _run_from_onnx(ctx: StageContext) -> dict[str, Any]:
    source = ctx.bundle_file(SOURCE)
    ctx.progress("fp16: loading the graph of onnx/model.onnx (weights stay on disk)")
    model = load_graph(source, weights=False)
    external = {t.name: t.data_type for t in model.graph.initializer if t.name in external_slices(model, source)}
    ctx.progress("fp16: converting (norms, softmax, pow, reducemean, rotary angles, logits stay float32)")
    converted, facts = convert(model, keep_io=_float32_io(ctx, model))
    del model
    import onnxruntime

    stamp_derived(converted, ctx=ctx, precision="fp16", parent=ctx.bundle_file(SOURCE),
                  step=f"onnxruntime {onnxruntime.__version__} float16 converter + exportline float32 islands")
    target = ctx.tmp / TARGET
    ctx.progress("fp16: streaming the weights into model_fp16.onnx_data, tensor by tensor")
    overflow: dict[str, int] = {}
    files = save_streamed(converted, source, target, convert=float16_conversions(converted, external, overflow))
    check_graph(target)
    return {**facts, **_overflow_facts(ctx, overflow), "files": [f"onnx/{f}" for f in files],
            "converter": "onnxruntime.transformers.float16",
            "weights": "streamed from model.onnx_data, converted chunk by chunk"}


def _run_direct(ctx: StageContext) -> dict[str, Any]:
    """HF weights (bf16/fp16/fp32 safetensors) → float16 graph, with no fp32 ONNX written:
    the traced graph is converted without its weights, which are then read from the
    checkpoint, converted and written one at a time."""
    import onnx

    from exportline.exporters.onnx.direct import checkpoint_tensors, weightless_proto
    from exportline.exporters.onnx.export import OPSET, trace_graph

    graph, weights = trace_graph(ctx.bundle.root, opset=ctx.options.opset or OPSET, progress=ctx.progress)
    proto, lazies = weightless_proto(graph.model)
    graph.model = None
    proto = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    stored = {t.name: t.data_type for t in proto.graph.initializer if t.name in lazies}
    ctx.progress("fp16: converting (norms, softmax, pow, reducemean, rotary angles, logits stay float32)")
    converted, facts = convert(proto)
    del proto
    overflow: dict[str, int] = {}
    retyped = float16_conversions(converted, stored, overflow)
    _stamp_direct(ctx, converted, graph)
    target = ctx.tmp / TARGET
    ctx.progress(f"fp16: streaming {weights.nbytes / 2**30:.2f} GiB of checkpoint weights into model_fp16.onnx_data")
    files = save_streamed(converted, None, target, tensors=checkpoint_tensors(lazies, retyped))
    check_graph(target)
    dtypes = sorted({t.dtype for t in weights.tensors.values()})
    return {**facts, **_overflow_facts(ctx, overflow), "files": [f"onnx/{f}" for f in files],
            "converter": "onnxruntime.transformers.float16",
            "weights": f"direct from the HF safetensors ({', '.join(dtypes)}), no fp32 ONNX written",
            "tracing": graph.tracing, "architecture": graph.architecture}


def _stamp_direct(ctx: StageContext, converted, graph) -> None:
    import onnxruntime

    from exportline.exporters.onnx.metadata import graph_metadata, stamp

    stamp(converted, graph_metadata(source=ctx.source.describe(), precision="fp16", layout=graph.layout, made_by=[
        *graph.made_by(),
        f"onnxruntime {onnxruntime.__version__} float16 converter + exportline float32 islands, weights straight from the HF folder",
    ]))


def _overflow_facts(ctx: StageContext, overflow: dict[str, int]) -> dict[str, Any]:
    """bf16/fp32 → fp16 overflow, reported in one line and in the record (verify then says
    whether the clamped model still meets the fp16 bounds)."""
    if overflow:
        first = max(overflow, key=overflow.get)
        ctx.progress(f"fp16: warning: {sum(overflow.values())} weight values in {len(overflow)} tensors exceed "
                     f"float16's range and were clamped to ±{FLOAT16_MAX:g} (most in {first}); "
                     "check `exportline verify` before shipping model_fp16.onnx")
    return {"float16_overflow": {"clamped_values": sum(overflow.values()), "tensors": dict(sorted(overflow.items()))}}


def _float32_io(ctx: StageContext, model) -> tuple[str, ...]:
    """A custom module keeps its declared float inputs and outputs float32 (its callers feed
    and read the dtypes the spec declares; there is no KV cache to halve)."""
    from exportline.exporters.sources.custom.model import is_custom

    if not is_custom(ctx.bundle.root):
        return KEEP_FLOAT32_IO
    return tuple(v.name for v in (*model.graph.input, *model.graph.output))


def _inputs(ctx: StageContext) -> list[str]:
    if _direct(ctx):
        from exportline.exporters.sources.weights_reader import weight_files

        return ["config.json", *weight_files(ctx.bundle.root)]
    return [SOURCE, *external_data_files(ctx.bundle.root, SOURCE)]


STAGE = Stage(name="fp16", run=_run, inputs=_inputs,
              versions=("onnx", "onnxruntime", "torch", "transformers", "onnxscript", "onnx-ir"))
