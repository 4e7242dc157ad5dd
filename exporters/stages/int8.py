"""int8 stage: onnx/model.onnx → onnx/model_int8.onnx (+ model_int8.onnx_data), explicit Q/DQ.

What is quantized: every MatMul/Gemm whose B is a weight (q/k/v/o projections, MLP), int8,
symmetric, zero point 0, per-channel weight scales on the output channel (axis 1 of B
[K, N]) and per-tensor activation scales — the form TensorRT accepts (exporters/qdq_form.py
checks it; a graph that fails is never written). What is not: the lm_head MatMul that
produces `logits`, norms, softmax, the attention MatMuls between activations and the KV
cache (softmax probabilities in symmetric int8 keep 7 bits), and MatMul outputs.

Calibration runs on real text (`--calibration-data`, default configs/corpus.txt) tokenized
with the bundle's tokenizer; held-out chunks (exporters/calibration.py) are never used. Each
batch is fed as a prefill and then as decode steps whose past_key_values are the fp32
model's own present outputs, so activation ranges cover the decode regime too. Before
calibration SmoothQuant (exporters/smoothing.py) is folded into the fp32 weights: without
it the outlier channels of down_proj's input cost the trained test model 6 points of top-1.
Everything not quantized stays float32 (the graph derives from model.onnx, not the fp16 one).

Calibration is one pass of the fp32 graph over those feeds: it measures max |x| per channel,
which gives both SmoothQuant's scales and the symmetric MinMax range of every quantized
activation (after smoothing). For the built-in LMs the pass is layer-bounded
(exporters/precision/segmented_stats.py): the weightless graph, pruned to the observed
tensors and present.* (no lm_head), is cut into consecutive segments of about one decoder
layer's weight bytes, each its own small model over the same external data file, and
segment k runs over every feed before segment k+1 opens — one ONNX Runtime session with
one segment's weights at a time, the boundary activations kept per feed in between, the
decode steps' past taken from each segment's own present outputs. Its statistics equal one
session of the whole graph at the same optimization level (tests/test_segmented_stats.py).
A custom module's graph (declared I/O, no KV recurrence) still runs as one session
(exporters/precision/activation_stats.py). Everything else holds the graph without its
weights: SmoothQuant is folded into a streamed copy of the weights, and the Q/DQ graph is
written with each weight read, quantized and written one at a time
(exporters/precision/qdq_insert.py).

Numbers and names: onnxruntime.quantization's own functions (compute_scale_zp,
compute_data_quant_params per channel, quantize_onnx_initializer), in the QDQ layout
quantize_static writes with a MinMax calibration cache — quantize_static itself loads the
whole model several times (23 GB and an OOM kill for the 1b preset on a 24 GB machine).
NVIDIA ModelOpt's ONNX PTQ targets the same form but pulls CUDA packages and a second
onnxruntime build onto CPU-only machines.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any, Callable

from exportline.exporters.core.errors import NotAvailable, StageError
from exportline.exporters.core.layout import GRAPHS
from exportline.exporters.core.pipeline import ExportOptions, Stage, StageContext
from exportline.exporters.onnx.external_data import check_graph, external_data_files, load_graph, save_streamed
from exportline.exporters.onnx.graph_index import GraphIndex, topological_sort
from exportline.exporters.onnx.metadata import stamp_derived
from exportline.exporters.precision.activation_stats import channel_absmax
from exportline.exporters.precision.calibration import (
    UnencodableText,
    calibration_path,
    file_sha256,
    load_tokenizer,
    split_text,
    spread,
)
from exportline.exporters.precision.qdq_form import qdq_form_problems, qdq_summary
from exportline.exporters.precision.smoothing import Streamed, find_groups, input_axis
from exportline.exporters.precision.smoothing import apply as smooth

SOURCE = GRAPHS["fp32"].path
TARGET = GRAPHS["int8"].path
CALIBRATION_CHUNKS = 32  # sequences, evenly spread over the calibration part of the text
BATCH = 8  # sequences per calibration feed
DECODE_STEPS = 8  # decode feeds after each prefill
# in the fingerprint: a bundle calibrated by the former whole-graph pass (ORT's default
# optimization level, ranges differing in float32 rounding) is re-quantized, not reused
STATISTICS = "LMs: layer-bounded segments at ORT_ENABLE_BASIC"
QUANTIZER = "exportline Q/DQ insertion with onnxruntime.quantization's functions, weights streamed"


class KVCalibrationReader:
    """onnxruntime CalibrationDataReader: per batch, one prefill feed (empty past) and then
    DECODE_STEPS one-token feeds with the past the fp32 model itself produced.

    `observe=(names, callback)`: the model at `model_path` has these extra outputs, and the
    reader hands their values for every feed to `callback` (the SmoothQuant statistics pass
    runs this way, so one session both produces the past and measures the activations)."""

    def __init__(self, model_path: Path, chunks: list[list[int]], layout, *, decode_steps: int = DECODE_STEPS,
                 observe: tuple[list[str], Callable] | None = None, level=None):
        self.model_path, self.chunks, self.layout, self.decode_steps = model_path, chunks, layout, decode_steps
        self.observe, self.level = observe, level  # level: onnxruntime GraphOptimizationLevel (None: its default)
        self.feeds = 0
        self._it = None

    def get_next(self) -> dict | None:
        if self._it is None:
            self._it = self._generate()
        return next(self._it, None)

    def __iter__(self):
        return self._generate()

    def drain(self) -> None:
        for _ in self._generate():
            pass

    def plan(self) -> list[dict]:
        """Every feed in order: a prefill (empty past), then one-token decode steps whose past
        is segmented_stats.Recurrent — the previous feed's presents, of the shape given."""
        import numpy as np

        from exportline.exporters.precision.segmented_stats import Recurrent

        feeds = []
        for start in range(0, len(self.chunks), BATCH):
            ids = np.asarray(self.chunks[start : start + BATCH], dtype=np.int64)
            batch, total = ids.shape
            prefill = total - self.decode_steps
            for begin, end in [(0, prefill)] + [(p, p + 1) for p in range(prefill, total)]:
                cache = (batch, self.layout.num_kv_heads, begin, self.layout.head_dim)
                feeds.append({
                    "input_ids": ids[:, begin:end],
                    "attention_mask": np.ones((batch, end), np.int64),
                    "position_ids": np.tile(np.arange(begin, end, dtype=np.int64), (batch, 1)),
                    **{name: np.zeros(cache, np.float32) if begin == 0 else Recurrent(cache)
                       for name in self.layout.past_names()},
                })
        return feeds

    def recurrence(self) -> dict[str, str]:
        """past input → the present output it is fed from."""
        return dict(zip(self.layout.past_names(), self.layout.present_names()))

    def _generate(self):
        """The whole fp32 graph in one session over plan(): the reference the segmented
        statistics are tested against, and onnxruntime's calibrators' reader."""
        import onnxruntime as ort

        from exportline.exporters.precision.segmented_stats import Recurrent

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.level is not None:
            opts.graph_optimization_level = self.level
        session = ort.InferenceSession(str(self.model_path), opts, providers=["CPUExecutionProvider"])
        presents = self.layout.present_names()
        observed, callback = self.observe or ([], None)
        feeds, past = self.plan(), {}
        for k, planned in enumerate(feeds):
            feed = {n: past[n] if isinstance(v, Recurrent) else v for n, v in planned.items()}
            self.feeds += 1
            yield feed
            following = feeds[k + 1] if k + 1 < len(feeds) else None
            recurs = following is not None and any(isinstance(v, Recurrent) for v in following.values())
            if recurs or callback:  # the next step's past, and what is observed
                values = session.run(presents + observed, feed)
                past = dict(zip(self.layout.past_names(), values))
                if callback:
                    callback(values[len(presents):])


def lm_head_nodes(model) -> list[str]:
    """The MatMul/Gemm computing `logits` (through reshapes/casts): kept in float."""
    index = GraphIndex(model.graph)
    node = index.producer.get("logits")
    while node is not None and node.op_type in ("Reshape", "Cast", "Identity", "Transpose", "Squeeze", "Unsqueeze"):
        node = index.producer.get(node.input[0])
    return [node.name] if node is not None and node.op_type in ("MatMul", "Gemm") else []


def weight_matmuls(model) -> list[str]:
    """MatMul/Gemm nodes whose B is a weight initializer, lm_head excluded. Named explicitly
    because quantize_static's MatMulConstBOnly accepts any B with an initializer *upstream*,
    which in a KV-cache graph includes the attention MatMuls (K via Reshape(shape constant))."""
    index = GraphIndex(model.graph)
    head = set(lm_head_nodes(model))
    return [
        n.name for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm") and n.input[1] in index.initializers and n.name not in head
    ]


def quantize(model_path: Path, out_path: Path, ranges: dict[str, float], *, nodes: list[str]) -> None:
    """The Q/DQ graph of exactly `nodes` with the symmetric activation ranges `ranges`
    (tensor → max |x|), written to `out_path` (+ its data file): the graph is edited without
    its weights and each weight is quantized as it is written (exporters/precision/qdq_insert.py,
    onnxruntime's own quantization functions and names)."""
    from exportline.exporters.precision.qdq_insert import insert_qdq

    graph = load_graph(model_path, infer=False, weights=False)
    converts = insert_qdq(graph, model_path, ranges=ranges, nodes=nodes)
    topological_sort(graph.graph)
    save_streamed(graph, model_path, out_path, convert=converts)


def _layout(ctx: StageContext):
    from exportline.exporters.core.shapes import KVLayout
    from exportline.exporters.sources.hf_writer import load_config

    config = load_config(ctx.bundle.root)
    return KVLayout.from_config(config), config.max_position_embeddings


@contextlib.contextmanager
def _quiet():
    """quantize_static advises "pre-processing" through the root logger and its sessions
    log graph warnings; library code does not print (the facts go to the stage record)."""
    import logging

    import onnxruntime as ort

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    ort.set_default_logger_severity(3)
    try:
        yield
    finally:
        root.setLevel(level)
        ort.set_default_logger_severity(2)  # onnxruntime's default: warnings


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
    reader = KVCalibrationReader(ctx.bundle_file(SOURCE), chunks, layout)
    model, facts, files = _quantized(ctx, _segmented(reader))
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


def _segmented(reader: KVCalibrationReader) -> Callable:
    """The statistics pass of a built-in LM: segmented_stats over the reader's feed plan."""
    from exportline.exporters.precision.segmented_stats import segmented_absmax

    def statistics(source: Path, graph, channels: dict[str, int], *, scratch: Path):
        plan = reader.plan()
        stats, facts = segmented_absmax(source, graph, channels, feeds=plan, recurrence=reader.recurrence(), scratch=scratch)
        return stats, {"calibration_feeds": len(plan), "calibration_segments": facts}

    return statistics


def _whole_graph(make_reader: Callable) -> Callable:
    """The statistics pass of a custom module: one session of the whole fp32 graph."""

    def statistics(source: Path, graph, channels: dict[str, int], *, scratch: Path):
        readers = []

        def run(path, observe):
            readers.append(make_reader(path, observe))
            readers[-1].drain()

        stats = channel_absmax(source, graph, channels, scratch=scratch, run=run)
        return stats, {"calibration_feeds": readers[0].feeds}

    return statistics


def _run_declared(ctx: StageContext) -> dict[str, Any]:
    """A custom module: calibrated on inputs sampled from its declared I/O or on
    --calibration-inputs; everything else as for the built-in LMs."""
    from exportline.exporters.precision.declared_calibration import DeclaredCalibrationReader, declared_feeds
    from exportline.exporters.sources.custom.model import bundle_io

    io, _ = bundle_io(ctx.bundle.root)
    feeds = declared_feeds(io, ctx.options.calibration_inputs)
    ctx.progress(f"int8: calibrating on {len(feeds)} feeds ({'--calibration-inputs' if ctx.options.calibration_inputs else 'sampled from the input spec'})")
    model, facts, files = _quantized(ctx, _whole_graph(lambda path, observe: DeclaredCalibrationReader(path, feeds, observe=observe)))
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
        model, facts, quantized = _smooth_and_quantize(ctx, ctx.bundle_file(SOURCE), statistics=statistics,
                                                       scratch=scratch)
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


def _smooth_and_quantize(ctx: StageContext, source: Path, *, statistics: Callable, scratch: Path):
    """One statistics pass on the fp32 graph → SmoothQuant folded into a streamed copy →
    Q/DQ graph; the graphs are held without their weights, which are read one at a time.
    `statistics(source, graph, channels, scratch=)` → (max |x| per channel, facts): _segmented
    or _whole_graph.
    Returns the Q/DQ graph (weightless), the facts, and the path its weights are under."""
    graph = load_graph(source, infer=False, weights=False)
    nodes, kept = weight_matmuls(graph), lm_head_nodes(graph)
    if not nodes:
        raise StageError(f"int8: {SOURCE} has no MatMul with a weight initializer to quantize (no Linear layers?); "
                         "leave int8 out: --stages hf,onnx,fp16")
    groups = find_groups(graph, set(nodes))
    channels = activation_channels(graph, nodes)
    ctx.progress(f"int8: {len(nodes)} MatMuls to quantize")
    with _quiet():
        stats, calibrated = statistics(source, graph, channels, scratch=scratch / "stats")
    ctx.progress("int8: folding SmoothQuant into a copy of the weights, tensor by tensor")
    weights = Streamed(graph, source)
    smoothing, scales = smooth(graph, groups, stats, weights=weights)
    smoothed = scratch / "smoothed" / "model.onnx"
    save_streamed(graph, source, smoothed, convert=weights.converts)
    del graph, weights
    ranges = {x: float((stats[x] / scales[x]).max() if x in scales else stats[x].max()) for x in channels}
    (scratch / "quantized").mkdir()
    quantized = scratch / "quantized" / "model_int8.onnx"
    ctx.progress("int8: quantizing the weights, tensor by tensor")
    with _quiet():
        quantize(smoothed, quantized, ranges, nodes=nodes)
    model = load_graph(quantized, infer=False, weights=False)
    dedicated = dedicate_activation_qdq(model, nodes)
    facts = {"float_nodes_kept": kept, "dedicated_activation_qdq": dedicated, "smoothing": smoothing,
             **calibrated}
    return model, facts, quantized


def dedicate_activation_qdq(model, nodes: list[str]) -> int:
    """Give every quantized MatMul/Gemm its own activation QuantizeLinear → DequantizeLinear
    pair with its own scale and zero-point initializers (same values); returns how many pairs
    were added. quantize_static puts one pair on a tensor read by several MatMuls (q/k/v,
    gate/up), and ONNX Runtime's QDQ fusion does not fuse a MatMul whose activation Q/DQ is
    shared: its weight is dequantized to float on every call (16 of 56 MatMuls of the 100m
    preset fused). DedicatedQDQPair does not help: its pairs share one scale/zero-point
    tensor, and ORT's common-subexpression elimination merges the duplicates back. Numerics
    are unchanged (same scales); TensorRT takes a pair per consumer as well."""
    from onnx import numpy_helper

    index = GraphIndex(model.graph)
    added = 0
    for node in [n for n in model.graph.node if n.name in nodes]:
        dq = index.producer.get(node.input[0])
        q = index.producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear":
            continue
        if len(index.consumers[dq.output[0]]) == 1 and len(index.consumers[q.output[0]]) == 1:
            continue  # already its own pair
        tag = f"{q.input[0]}_for_{node.name}".replace("/", "_")
        scale, zero = (numpy_helper.to_array(index.initializers[name]) for name in q.input[1:3])
        model.graph.initializer.extend([numpy_helper.from_array(scale.copy(), f"{tag}_scale"),
                                        numpy_helper.from_array(zero.copy(), f"{tag}_zero_point")])
        own_q, own_dq = model.graph.node.add(), model.graph.node.add()
        own_q.CopyFrom(q)
        own_dq.CopyFrom(dq)
        own_q.name, own_dq.name = f"{tag}_QuantizeLinear", f"{tag}_DequantizeLinear"
        own_q.input[1:3] = own_dq.input[1:3] = [f"{tag}_scale", f"{tag}_zero_point"]
        own_q.output[0] = own_dq.input[0] = f"{tag}_quantized"
        own_dq.output[0] = node.input[0] = f"{tag}_dequantized"
        index.consumers[dq.output[0]].remove(node)
        added += 1
    _drop_unread_qdq(model)
    return added


def _drop_unread_qdq(model) -> None:
    """Remove the shared Q/DQ pairs nothing reads any more, and their scale/zero point."""
    freed = set()
    while True:
        index = GraphIndex(model.graph)
        dead = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not index.consumers.get(n.output[0]) and n.output[0] not in index.graph_outputs]
        if not dead:
            break
        for n in dead:
            freed.update(n.input[1:])
            model.graph.node.remove(n)
    read = {name for n in model.graph.node for name in n.input}
    unread = [t for t in model.graph.initializer if t.name in freed and t.name not in read]
    for t in unread:
        model.graph.initializer.remove(t)


def activation_channels(graph, nodes: list[str]) -> dict[str, int]:
    """The activation input of each quantized MatMul/Gemm → its channel count (B's input axis)."""
    index = GraphIndex(graph.graph)
    out = {}
    for node in graph.graph.node:
        if node.name in nodes:
            out[node.input[0]] = index.initializers[node.input[1]].dims[input_axis(node)]
    return out


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
