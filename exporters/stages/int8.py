"""int8 stage: onnx/model.onnx → onnx/model_int8.onnx (+ model_int8.onnx_data), explicit Q/DQ.

What is quantized and how, calibration included: exporters/precision/int8_graph.py. Here:
the calibration feeds (text tokenized with the bundle's tokenizer, or a custom module's
declared inputs), the scratch folder, the TensorRT form check, and the write into the bundle.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

from exportline.exporters.core.errors import NotAvailable, StageError
from exportline.exporters.core.layout import GRAPHS
from exportline.exporters.core.pipeline import ExportOptions, Stage, StageContext
from exportline.exporters.onnx.external_data import check_graph, external_data_files, save_streamed
from exportline.exporters.onnx.graph_index import topological_sort
from exportline.exporters.onnx.metadata import stamp_derived
from exportline.exporters.precision.calibration import (
    UnencodableText,
    calibration_path,
    file_sha256,
    load_tokenizer,
    split_text,
    spread,
)
from exportline.exporters.precision.int8_graph import segmented_statistics, smooth_and_quantize, whole_graph_statistics
from exportline.exporters.precision.kv_calibration import DECODE_STEPS, KVCalibrationFeeds
from exportline.exporters.precision.qdq_form import qdq_form_problems, qdq_summary

SOURCE = GRAPHS["fp32"].path
TARGET = GRAPHS["int8"].path
CALIBRATION_CHUNKS = 32  # sequences, evenly spread over the calibration part of the text
# in the fingerprint: a bundle calibrated by the former whole-graph pass (ORT's default
# optimization level, ranges differing in float32 rounding) is re-quantized, not reused
STATISTICS = "LMs: layer-bounded segments at ORT_ENABLE_BASIC"
QUANTIZER = "exportline Q/DQ insertion with onnxruntime.quantization's functions, weights streamed"


def _layout(ctx: StageContext):
    from exportline.exporters.core.shapes import KVLayout
    from exportline.exporters.sources.hf_writer import load_config

    config = load_config(ctx.bundle.root)
    return KVLayout.from_config(config), config.max_position_embeddings


def _run(ctx: StageContext) -> dict[str, Any]:
    from exportline.exporters.sources.custom.model import is_custom

    if is_custom(ctx.bundle.root):
        return _run_declared(ctx)
    layout, max_positions = _layout(ctx)
    text = calibration_path(ctx.options.calibration_data)
    try:
        split = split_text(text, load_tokenizer(ctx.bundle.root), max_positions=max_positions)
    except UnencodableText as exc:
        if ctx.options.calibration_data:
            raise
        # The shipped English corpus does not fit every vocabulary (nanoGPT's 65 characters):
        # the stage is skipped with the reason, not failed, unless --require int8.
        raise NotAvailable(f"not available: {exc}") from None
    chunks = spread(split.calibration, CALIBRATION_CHUNKS)
    ctx.progress(f"int8: calibrating on {len(chunks)} sequences (prefill + {DECODE_STEPS} decode steps)")
    model, facts, files = _quantized(ctx, segmented_statistics(KVCalibrationFeeds(chunks, layout)))
    feeds = facts.pop("calibration_feeds")
    return {
        **qdq_summary(model), **facts,
        "scheme": "int8 symmetric (zero point 0), per-channel weights (MatMul B axis 1), per-tensor activations",
        "calibration": {**split.describe(), "sequences": len(chunks), "feeds": feeds,
                        "decode_steps_per_batch": DECODE_STEPS,
                        "method": "symmetric MinMax (max |x| per tensor), from the one fp32 statistics pass, "
                                  "run one segment of about a decoder layer at a time",
                        "segments": facts.pop("calibration_segments")},
        "files": [f"onnx/{f}" for f in files], "quantizer": QUANTIZER,
    }


def _run_declared(ctx: StageContext) -> dict[str, Any]:
    """A custom module: calibrated on inputs sampled from its declared I/O or on
    --calibration-inputs; everything else as for the built-in LMs."""
    from exportline.exporters.precision.declared_calibration import DeclaredCalibrationReader, declared_feeds
    from exportline.exporters.sources.custom.model import bundle_io

    io, _ = bundle_io(ctx.bundle.root)
    feeds = declared_feeds(io, ctx.options.calibration_inputs)
    ctx.progress(f"int8: calibrating on {len(feeds)} feeds ({'--calibration-inputs' if ctx.options.calibration_inputs else 'sampled from the input spec'})")
    model, facts, files = _quantized(ctx, whole_graph_statistics(lambda path, observe: DeclaredCalibrationReader(path, feeds, observe=observe)))
    fed = facts.pop("calibration_feeds")
    return {
        **qdq_summary(model), **facts,
        "scheme": "int8 symmetric (zero point 0), per-channel weights (MatMul B axis 1), per-tensor activations",
        "calibration": {"feeds": fed, "inputs": str(ctx.options.calibration_inputs or "sampled from the input spec"),
                        "method": "symmetric MinMax (max |x| per tensor), from the one fp32 statistics pass"},
        "files": [f"onnx/{f}" for f in files], "quantizer": QUANTIZER,
    }


def _quantized(ctx: StageContext, statistics: Callable):
    """(Q/DQ graph without its weights, facts, files written): the weights live in the
    scratch folder until the int8 graph is written, so it is written before scratch goes."""
    scratch = ctx.tmp / ".scratch"  # same filesystem as the bundle (hard links); never committed
    try:
        model, facts, quantized = smooth_and_quantize(ctx.bundle_file(SOURCE), statistics=statistics,
                                                      scratch=scratch, progress=ctx.progress)
        return model, facts, _write(ctx, model, quantized)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _write(ctx: StageContext, model, quantized: Path) -> list[str]:
    """The form check (weights read from `quantized`'s folder one at a time), then the int8
    graph streamed from there into the bundle's model_int8.onnx_data."""
    import onnxruntime

    problems = qdq_form_problems(model, base_dir=quantized.parent)
    if problems:
        raise StageError(f"int8: the Q/DQ graph is not in TensorRT's form ({problems[0]}; {len(problems)} problems); this is a bug, please report it")
    topological_sort(model.graph)
    stamp_derived(model, ctx=ctx, precision="int8", parent=ctx.bundle_file(SOURCE),
                  step=f"exportline SmoothQuant + Q/DQ insertion with onnxruntime {onnxruntime.__version__} quantization functions")
    target = ctx.tmp / TARGET
    files = save_streamed(model, quantized, target)
    check_graph(target)
    return files


def _options(opts: ExportOptions) -> dict[str, Any]:
    """What enters the fingerprint: the calibration text by content (None = the shipped corpus)."""
    given = opts.calibration_data
    path = calibration_path(given)
    # absolute, so `exportline verify` finds the held-out text from any working directory
    npz = opts.calibration_inputs  # custom modules: arrays instead of text
    return {"calibration_data": str(path.resolve()) if given else None, "calibration_sha256": file_sha256(path),
            "sequences": CALIBRATION_CHUNKS, "decode_steps": DECODE_STEPS, "statistics": STATISTICS,
            **({"calibration_inputs": str(Path(npz).resolve()), "calibration_inputs_sha256": file_sha256(Path(npz))} if npz else {})}


def _inputs(ctx: StageContext) -> list[str]:
    # tokenizer.json only when present: without one the stage is skipped as not available
    from exportline.exporters.sources.custom.model import is_custom

    if is_custom(ctx.bundle.root):
        return [SOURCE, *external_data_files(ctx.bundle.root, SOURCE), "config.json"]
    tokenizer = ["tokenizer.json"] if (ctx.bundle.root / "tokenizer.json").is_file() else []
    return [SOURCE, *external_data_files(ctx.bundle.root, SOURCE), "config.json", *tokenizer]


STAGE = Stage(name="int8", run=_run, inputs=_inputs, versions=("onnx", "onnxruntime", "tokenizers"), options=_options)
