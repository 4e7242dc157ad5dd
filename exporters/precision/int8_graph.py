"""int8 graph: an fp32 graph → explicit Q/DQ, its weights read, smoothed and quantized one at a time.

What is quantized: every MatMul/Gemm whose B is a weight (q/k/v/o projections, MLP), int8,
symmetric, zero point 0, per-channel weight scales on the output channel (axis 1 of B
[K, N]) and per-tensor activation scales — the form TensorRT accepts (precision/qdq_form.py
checks it; a graph that fails is never written). What is not: the lm_head MatMul that
produces `logits`, norms, softmax, the attention MatMuls between activations and the KV
cache (softmax probabilities in symmetric int8 keep 7 bits), and MatMul outputs.

Calibration runs on real text (`--calibration-data`, default configs/corpus.txt) tokenized
with the bundle's tokenizer; held-out chunks (precision/calibration.py) are never used. Each
batch is fed as a prefill and then as decode steps whose past_key_values are the fp32
model's own present outputs (precision/kv_calibration.py), so activation ranges cover the
decode regime too. Before calibration SmoothQuant (precision/smoothing.py) is folded into
the fp32 weights: without it the outlier channels of down_proj's input cost the trained
test model 6 points of top-1. Everything not quantized stays float32 (the graph derives
from model.onnx, not the fp16 one).

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
from pathlib import Path
from typing import Callable

from exportline.exporters.core.errors import StageError
from exportline.exporters.core.layout import GRAPHS
from exportline.exporters.onnx.external_data import load_graph, save_streamed
from exportline.exporters.onnx.graph_index import GraphIndex, topological_sort
from exportline.exporters.precision.activation_stats import channel_absmax
from exportline.exporters.precision.kv_calibration import KVCalibrationFeeds
from exportline.exporters.precision.smoothing import Streamed, find_groups, input_axis
from exportline.exporters.precision.smoothing import apply as smooth

SOURCE = GRAPHS["fp32"].path


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


def segmented_statistics(feeds: KVCalibrationFeeds) -> Callable:
    """The statistics pass of a built-in LM: segmented_stats over the feed plan."""
    from exportline.exporters.precision.segmented_stats import segmented_absmax

    def statistics(source: Path, graph, channels: dict[str, int], *, scratch: Path):
        plan = feeds.plan()
        stats, facts = segmented_absmax(source, graph, channels, feeds=plan, recurrence=feeds.recurrence(), scratch=scratch)
        return stats, {"calibration_feeds": len(plan), "calibration_segments": facts}

    return statistics


def whole_graph_statistics(make_reader: Callable) -> Callable:
    """The statistics pass of a custom module: one session of the whole fp32 graph."""

    def statistics(source: Path, graph, channels: dict[str, int], *, scratch: Path):
        readers = []

        def run(path, observe):
            readers.append(make_reader(path, observe))
            readers[-1].drain()

        stats = channel_absmax(source, graph, channels, scratch=scratch, run=run)
        return stats, {"calibration_feeds": readers[0].feeds}

    return statistics


def smooth_and_quantize(source: Path, *, statistics: Callable, scratch: Path, progress: Callable[[str], None]):
    """One statistics pass on the fp32 graph → SmoothQuant folded into a streamed copy →
    Q/DQ graph; the graphs are held without their weights, which are read one at a time.
    `statistics(source, graph, channels, scratch=)` → (max |x| per channel, facts): segmented_statistics
    or whole_graph_statistics; `progress(line)` hears each step.
    Returns the Q/DQ graph (weightless), the facts, and the path its weights are under."""
    graph = load_graph(source, infer=False, weights=False)
    nodes, kept = weight_matmuls(graph), lm_head_nodes(graph)
    if not nodes:
        raise StageError(f"int8: {SOURCE} has no MatMul with a weight initializer to quantize (no Linear layers?); "
                         "leave int8 out: --stages hf,onnx,fp16")
    groups = find_groups(graph, set(nodes))
    channels = activation_channels(graph, nodes)
    progress(f"int8: {len(nodes)} MatMuls to quantize")
    with _quiet():
        stats, calibrated = statistics(source, graph, channels, scratch=scratch / "stats")
    progress("int8: folding SmoothQuant into a copy of the weights, tensor by tensor")
    weights = Streamed(graph, source)
    smoothing, scales = smooth(graph, groups, stats, weights=weights)
    smoothed = scratch / "smoothed" / "model.onnx"
    save_streamed(graph, source, smoothed, convert=weights.converts)
    del graph, weights
    ranges = {x: float((stats[x] / scales[x]).max() if x in scales else stats[x].max()) for x in channels}
    (scratch / "quantized").mkdir()
    quantized = scratch / "quantized" / "model_int8.onnx"
    progress("int8: quantizing the weights, tensor by tensor")
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

