"""int8 calibration runs the fp32 graph one segment of about a decoder layer at a time
(exporters/precision/segmented_stats.py): the statistics equal the whole graph's, and the
weights one session holds do not grow with depth (counted in bytes, not timed)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from exportline.exporters.core.shapes import KVLayout
from exportline.exporters.onnx.external_data import load_graph
from exportline.exporters.precision.activation_stats import channel_absmax
from exportline.exporters.precision.int8_graph import activation_channels, weight_matmuls
from exportline.exporters.precision.segmented_stats import augment, plan_segments, segment_weights, segmented_absmax, tensor_bytes
from exportline.exporters.sources import resolve_source

from quant_models import FolderSource, WholeGraphReader, export_bundle, write_tiny_gpt2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    roots = {}
    for layers in (2, 8):
        root = tmp_path_factory.mktemp(f"llama-{layers}")
        export_bundle(root, resolve_source("tiny", {"model": {"num_hidden_layers": layers}}), ["hf", "onnx"])
        roots[f"llama-{layers}"] = root
    root = tmp_path_factory.mktemp("gpt2")
    write_tiny_gpt2(root)
    export_bundle(root, FolderSource("gpt2-tiny", "seed0"), ["onnx"])
    roots["gpt2"] = root
    return roots


def _reader(root, path=None, **kw) -> WholeGraphReader:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(root)
    rng = np.random.default_rng(0)
    chunks = rng.integers(0, config.vocab_size, size=(12, 20)).tolist()  # 2 batches, prefill 12 + 8 decode steps
    return WholeGraphReader(path or root / "onnx" / "model.onnx", chunks, KVLayout.from_config(config), **kw)


def _statistics(root, tmp_path):
    source = root / "onnx" / "model.onnx"
    graph = load_graph(source, infer=False, weights=False)
    channels = activation_channels(graph, weight_matmuls(graph))
    reader = _reader(root)
    segmented, facts = segmented_absmax(source, graph, channels, feeds=reader.plan.plan(), recurrence=reader.plan.recurrence(),
                                        scratch=tmp_path / "segments")
    whole = {}
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, None):
        whole[level] = channel_absmax(source, graph, channels, scratch=tmp_path / "whole", run=lambda path, observe, level=level:
                                      _reader(root, path, observe=observe, level=level).drain())
    return segmented, facts, whole


@pytest.mark.parametrize("model", ["llama-2", "gpt2"])
def test_segmented_statistics_equal_the_whole_graph(bundles, tmp_path, model):
    """At the level the segments run (ORT_ENABLE_BASIC: no cross-node fusions) the statistics
    are bit-identical to one session of the whole graph over the same feeds; against the
    whole graph at onnxruntime's default level (the former calibration pass: fused norms,
    GELU, attention) they differ by float32 rounding of those fused kernels only."""
    segmented, facts, whole = _statistics(bundles[model], tmp_path)
    assert facts["segments"] >= 3  # the cuts really were crossed
    basic, default = whole[ort.GraphOptimizationLevel.ORT_ENABLE_BASIC], whole[None]
    assert segmented.keys() == basic.keys() and len(segmented) >= 8
    for tensor in segmented:
        assert np.array_equal(segmented[tensor], basic[tensor]), tensor
        assert segmented[tensor].max() > 0
        # a few float32 ulps of max|x| (measured ≤ 3.3e-7 relative on these models)
        np.testing.assert_allclose(segmented[tensor], default[tensor], rtol=1e-5, atol=1e-6, err_msg=tensor)


def _segments(root):
    source = root / "onnx" / "model.onnx"
    graph = load_graph(source, infer=False, weights=False)
    reader = _reader(root)
    aug, observed = augment(graph, activation_channels(graph, weight_matmuls(graph)))
    del aug.graph.output[:]
    aug.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in observed + reader.layout.present_names())
    segments, budget = plan_segments(aug, reader.plan.recurrence())
    held = [sum(tensor_bytes(t) for t in segment_weights(aug.graph, s)) for s in segments]
    return graph, held, budget


def _one_layer(graph) -> int:
    return sum(tensor_bytes(t) for t in graph.graph.initializer if ".layers.0." in t.name)


def test_one_session_holds_about_one_layer_whatever_the_depth(bundles):
    """Each segment model (what one ONNX Runtime session loads) holds at most one decoder
    layer's weights, or the embedding table where that is larger, plus small constants;
    the same bound at 2 and at 8 layers, while the 8-layer graph streams 2.5× the weights or more."""
    (graph2, held2, budget2), (graph8, held8, budget8) = _segments(bundles["llama-2"]), _segments(bundles["llama-8"])
    bound = max(_one_layer(graph8), max(tensor_bytes(t) for t in graph8.graph.initializer if "embed" in t.name))
    small = 4096  # shape constants, rotary frequencies and the observers' Reshape shapes
    assert _one_layer(graph2) == _one_layer(graph8) and budget2 == budget8 <= bound + small
    assert max(held2) <= bound + small and max(held8) <= bound + small, (held2, held8, bound)
    assert sum(held8) > 2.5 * sum(held2) and len(held8) > 2 * len(held2)
    total8 = sum(tensor_bytes(t) for t in graph8.graph.initializer if "lm_head" not in t.name)
    assert max(held8) < total8 / 4


def test_stage_records_its_segments(bundles, tmp_path):
    """The int8 stage calibrates segment by segment and says so in its record."""
    from exportline.exporters.core.bundle import Bundle
    from exportline.exporters.core.pipeline import run_pipeline
    from exportline.exporters.stages import STAGES

    root = bundles["llama-8"]
    source = resolve_source("tiny", {"model": {"num_hidden_layers": 8}})
    run_pipeline(Bundle(root), source, stages=[STAGES["int8"]], force=True)
    record = json.loads((root / "manifest.json").read_text())["stages"]["int8"]
    segments = record["info"]["calibration"]["segments"] if "info" in record else record["calibration"]["segments"]
    assert segments["segments"] >= 8 and segments["largest_segment_weight_bytes"] <= segments["segment_budget_bytes"]


def test_a_past_and_its_present_are_never_cut_apart():
    """The budget would cut between the two weights, but the past is read (Neg) before the
    first and its present made after the second: they stay one segment. A Shape reader of a
    past is free to sit elsewhere (it sees the shape only)."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w1"), numpy_helper.from_array(np.ones((4, 4), np.float32), "w2")
    nodes = [helper.make_node("Shape", ["past"], ["n"]), helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Neg", ["past"], ["p"]), helper.make_node("MatMul", ["h", "w2"], ["h2"]),
             helper.make_node("Concat", ["p", "h2"], ["present"], axis=0),
             helper.make_node("MatMul", ["present", "w1"], ["y"])]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("x", "past")]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("present", "y")]
    model = helper.make_model(helper.make_graph(nodes, "g", io, outs + [helper.make_tensor_value_info("n", TensorProto.INT64, None)], list(w)))
    segments, _ = plan_segments(model, {"past": "present"}, budget=64)
    ops = [[n.op_type for n in s.nodes] for s in segments]
    assert ops == [["Shape", "MatMul", "Neg", "MatMul", "Concat"], ["MatMul"]], ops
    assert segments[1].inputs == ["present"] and "present" in segments[0].outputs
