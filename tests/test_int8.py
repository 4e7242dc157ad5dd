"""int8 stage: the Q/DQ form TensorRT accepts, calibration text handling, SmoothQuant
equivalence, and THE accuracy test on a tiny Llama trained for seconds on the corpus."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from exportline.exporters.core.errors import ConfigError
from exportline.exporters.core.pipeline import ExportOptions
from exportline.exporters.onnx.graph_index import GraphIndex
from exportline.exporters.precision.calibration import HELDOUT_EVERY, calibration_path, split_text
from exportline.exporters.precision.int8_graph import lm_head_nodes, weight_matmuls
from exportline.exporters.precision.qdq_form import qdq_form_problems
from exportline.exporters.sources.tokenizer import default_corpus
from exportline.exporters.stages import parse_stages
from exportline.exporters.stages.int8 import STAGE as INT8
from exportline.verify.suite import verify_bundle

from quant_models import FolderSource, export_bundle, stage_info, train_tiny_llama, write_tiny_gpt2, write_tokenizer


# -- the Q/DQ form -------------------------------------------------------------------------------
def _qdq_graph(*, zero=0, zero_type=TensorProto.INT8, w_axis=1, w_scales=3, w_zero_type=TensorProto.INT8, drop_zero=False):
    """x [2, 4] → Q/DQ (per tensor) → MatMul with DQ(int8 W [4, 3], per-channel on axis 1)."""
    w = numpy_helper.from_array(np.arange(-6, 6, dtype=np.int8).reshape(4, 3), "w_q")
    inits = [
        w,
        numpy_helper.from_array(np.full(w_scales, 0.1, np.float32).reshape(-1) if w_scales > 1 else np.array(0.1, np.float32), "w_scale"),
        helper.make_tensor("w_zero", w_zero_type, [w_scales] if w_scales > 1 else [], [0] * w_scales),
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        helper.make_tensor("x_zero", zero_type, [], [zero]),
    ]
    x_zero = [] if drop_zero else ["x_zero"]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", *x_zero], ["x_q"], name="q_x"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", *x_zero], ["x_dq"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"], name="dq_w", axis=w_axis),
        helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_qdq_form_accepts_symmetric_per_channel_int8():
    model = _qdq_graph()
    onnx.checker.check_model(model, full_check=True)
    assert qdq_form_problems(model) == []


@pytest.mark.parametrize("bad, expected", [
    (dict(zero=3), "asymmetric"),
    (dict(zero_type=TensorProto.UINT8), "not int8"),
    (dict(drop_zero=True), "no constant zero point"),
    (dict(w_scales=1), "not per-channel"),
    (dict(w_axis=0, w_scales=4), "not the output channel axis 1"),
])
def test_qdq_form_rejects(bad, expected):
    problems = qdq_form_problems(_qdq_graph(**bad))
    assert problems and any(expected in p for p in problems), problems


def test_qdq_form_rejects_wrong_scale_count():
    model = _qdq_graph()
    scale = next(t for t in model.graph.initializer if t.name == "w_scale")
    scale.CopyFrom(numpy_helper.from_array(np.full(2, 0.1, np.float32), "w_scale"))
    assert any("2 scales for 3 channels" in p for p in qdq_form_problems(model))


# -- calibration text ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


def test_heldout_chunks_never_calibrate(tokenizer):
    split = split_text(default_corpus(), tokenizer, max_positions=256)
    assert len(split.heldout) * (HELDOUT_EVERY - 1) <= len(split.calibration) <= (len(split.heldout) + 1) * (HELDOUT_EVERY - 1)
    calib = {tuple(c) for c in split.calibration}
    assert not calib & {tuple(c) for c in split.heldout}
    assert all(len(c) == split.chunk_tokens == 128 for c in split.calibration + split.heldout)


def test_calibration_data_errors_are_one_line(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="no such file"):
        calibration_path(str(tmp_path / "missing.txt"))
    short = tmp_path / "short.txt"
    short.write_text("too short to hold anything out\n")
    with pytest.raises(ConfigError, match="need at least") as err:
        split_text(short, tokenizer, max_positions=256)
    assert "\n" not in str(err.value)


def test_calibration_text_enters_the_fingerprint(tmp_path):
    text = tmp_path / "domain.txt"
    text.write_text("one\n")
    first = INT8.options(ExportOptions(calibration_data=text))
    text.write_text("two\n")
    assert INT8.options(ExportOptions(calibration_data=text))["calibration_sha256"] != first["calibration_sha256"]
    assert INT8.options(ExportOptions())["calibration_data"] is None  # the shipped corpus


# -- the accuracy test ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama trained on the corpus' calibration chunks, saved as an HF folder and
    exported from it like a user's model: hf → onnx → fp16 → int8."""
    from exportline.exporters.sources import resolve_source

    folder = tmp_path_factory.mktemp("trained-hf")
    facts = train_tiny_llama(folder)
    root = tmp_path_factory.mktemp("trained-bundle")
    export_bundle(root, resolve_source(str(folder)), ["hf", "onnx", "fp16", "int8"])
    return root, facts


@pytest.mark.slow
def test_int8_perplexity_within_5_percent_of_fp32(trained):
    root, facts = trained
    vocab = 512
    assert facts["heldout_ppl_torch"] < vocab / 8, f"the tiny model did not learn: {facts}"
    report = verify_bundle(root, stages=["fp16", "int8"])
    int8 = next(s for s in report.stages if s.stage == "int8")
    ppl = int8.extra["perplexity"]
    agreement = next(r for r in int8.rows if r.case == "held-out text, int8 vs fp32").metrics["top1"]
    print(f"\nheld-out perplexity: fp32 {ppl['fp32']:.3f}, fp16 {ppl['fp16']:.3f}, int8 {ppl['int8']:.3f}; "
          f"int8 top-1 agreement with fp32 {agreement:.4f} "
          f"(trained {facts['steps']} steps in {facts['train_seconds']} s; uniform would be {vocab})")
    assert int8.status == "passed", report.first_failure()
    assert ppl["int8"] <= 1.05 * ppl["fp32"] and ppl["fp32"] < vocab / 8
    assert agreement >= 0.95
    assert abs(ppl["fp16"] / ppl["fp32"] - 1) < 0.01
    fp16 = next(s for s in report.stages if s.stage == "fp16")
    assert fp16.status == "passed", report.first_failure()
    # trained weights: top-1 is gated once, pooled over every case (per-case rows gate rel_l2)
    (pooled,) = [r for r in fp16.rows if r.case == "every case, pooled"]
    assert pooled.bounds == {"top1": 0.99} and pooled.metrics["top1"] >= 0.99 and pooled.shape[0] >= 200
    assert all(set(r.bounds) == {"rel_l2"} for r in fp16.rows if r.output == "logits" and r is not pooled)
    assert "never calibrated on" in int8.extra["heldout"]


@pytest.mark.slow
def test_int8_graph_is_tensorrt_qdq(trained):
    root, _ = trained
    model = onnx.load(str(root / "onnx" / "model_int8.onnx"))
    assert qdq_form_problems(model) == []
    index = GraphIndex(model.graph)
    weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in index.initializers]
    assert len(weights) == 2 * 7  # q, k, v, o, gate, up, down of each layer
    for dq in weights:
        w = index.initializers[dq.input[0]]
        assert w.data_type == TensorProto.INT8
        assert next(a.i for a in dq.attribute if a.name == "axis") == 1
        assert len(numpy_helper.to_array(index.initializers[dq.input[1]])) == w.dims[1]
        assert not numpy_helper.to_array(index.initializers[dq.input[2]]).any()
    head = index.producer["logits"]
    assert head.op_type == "MatMul" and index.producer.get(head.input[1]) is None  # lm_head stays float
    for node in model.graph.node:  # the attention MatMuls (activation × KV cache) stay float
        if node.op_type == "MatMul" and node.input[1] not in index.initializers:
            producer = index.producer.get(node.input[1])
            assert producer is None or producer.op_type != "DequantizeLinear" or producer.input[0] in index.initializers
    info = stage_info(root, "int8")["info"]
    assert info["calibration"]["feeds"] == 4 * (1 + 8)  # 32 sequences in batches of 8: prefill + 8 decode steps
    assert info["smoothing"]["groups"] == 6 and info["float_nodes_kept"] == [head.name]


def _activation_pairs(model):
    """Each quantized (weight) MatMul → its activation (QuantizeLinear, DequantizeLinear)."""
    index = GraphIndex(model.graph)
    pairs = {}
    for node in model.graph.node:
        weight = index.producer.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or weight.op_type != "DequantizeLinear" or weight.input[0] not in index.initializers:
            continue
        dq = index.producer[node.input[0]]
        assert dq.op_type == "DequantizeLinear", node.name
        q = index.producer[dq.input[0]]
        assert q.op_type == "QuantizeLinear", node.name
        assert [r.name for r in index.consumers[dq.output[0]]] == [node.name], f"{dq.name} feeds several nodes"
        assert [r.name for r in index.consumers[q.output[0]]] == [dq.name], f"{q.name} feeds several nodes"
        pairs[node.name] = (q, dq)
    return pairs


@pytest.mark.slow
def test_every_quantized_matmul_has_its_own_activation_qdq(trained):
    """Shared activation Q/DQ (q/k/v, gate/up) keeps ONNX Runtime from fusing those MatMuls
    into integer kernels; shared scale/zero-point tensors let its CSE merge the pairs back."""
    root, _ = trained
    model = onnx.load(str(root / "onnx" / "model_int8.onnx"))
    pairs = _activation_pairs(model)
    assert len(pairs) == 2 * 7
    for names in ([q.input[1] for q, _ in pairs.values()], [q.input[2] for q, _ in pairs.values()]):
        assert len(set(names)) == len(names), "activation scale/zero-point initializers are shared"
    for q, dq in pairs.values():  # a pair reads one scale and zero point (the same numbers as before)
        assert list(q.input[1:3]) == list(dq.input[1:3])
    index = GraphIndex(model.graph)
    by_input = {}
    for q, _ in pairs.values():
        by_input.setdefault(q.input[0], []).append(numpy_helper.to_array(index.initializers[q.input[1]]))
    assert any(len(s) == 3 for s in by_input.values())  # q/k/v read one tensor with one range
    assert all(np.array_equal(s[0], t) for s in by_input.values() for t in s)
    # per layer: q/k/v's pair stays with one of them, two get new ones; gate/up: one new one
    assert stage_info(root, "int8")["info"]["dedicated_activation_qdq"] == 2 * (2 + 1)


@pytest.mark.slow
def test_onnxruntime_fuses_every_weight_matmul_into_integer_ops(trained, tmp_path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(trained[0] / "onnx" / "model_int8.onnx"), opts, providers=["CPUExecutionProvider"])
    model = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)  # weights point at the source
    index = GraphIndex(model.graph)
    float_weight_matmuls = [
        n.name for n in model.graph.node
        if n.op_type in ("MatMul", "FusedMatMul", "Gemm") and n.input[1] in index.producer
        and index.producer[n.input[1]].op_type == "DequantizeLinear"
        and index.producer[n.input[1]].input[0] in index.initializers
    ]
    assert float_weight_matmuls == []
    integer = [n for n in model.graph.node if n.op_type in ("MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul",
                                                              "MatMulIntegerToFloat", "QGemm")]
    assert len(integer) == 2 * 7, sorted({n.op_type for n in model.graph.node})


def _smoothed_logits_change(root, tmp_path, expect_groups: int) -> float:
    """Fold SmoothQuant scales from random channel statistics into the fp32 graph of the
    bundle at `root`; the relative change of the logits (0 up to rounding when folded right)."""
    import onnxruntime as ort
    from transformers import AutoConfig

    from exportline.exporters.core.shapes import KVLayout
    from exportline.exporters.onnx.external_data import load_graph, save_graph
    from exportline.exporters.precision.smoothing import apply, find_groups

    model = load_graph(root / "onnx" / "model.onnx", infer=False)
    groups = find_groups(model, set(weight_matmuls(model)))
    rng = np.random.default_rng(0)
    dims = {t.name: t.dims for t in model.graph.initializer}
    stats = {g.activation: rng.uniform(0.1, 30.0, size=dims[g.weights[0][0]][g.weights[0][1]]).astype(np.float32)
             for g in groups}
    facts, _ = apply(model, groups, stats)
    assert facts["groups"] == expect_groups and facts["max_scale_spread"] > 2
    save_graph(model, tmp_path / "smoothed.onnx")
    layout = KVLayout.from_config(AutoConfig.from_pretrained(root))
    ids = rng.integers(0, layout.vocab_size, size=(2, 16))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.tile(np.arange(16), (2, 1))}
    for name in layout.past_names():
        feed[name] = np.zeros((2, layout.num_kv_heads, 0, layout.head_dim), np.float32)
    before = ort.InferenceSession(str(root / "onnx" / "model.onnx")).run(["logits"], feed)[0]
    after = ort.InferenceSession(str(tmp_path / "smoothed.onnx")).run(["logits"], feed)[0]
    assert lm_head_nodes(model) and math.isfinite(float(after.sum()))
    return float(np.linalg.norm(after - before) / np.linalg.norm(before))


@pytest.mark.slow
def test_smoothing_keeps_the_fp32_function(trained, tmp_path):
    """SmoothQuant moves scale between a norm (or up_proj) and the next MatMul: the fp32
    graph must compute the same logits before quantization (4 norm folds + 2 MLP folds)."""
    assert _smoothed_logits_change(trained[0], tmp_path, expect_groups=6) < 1e-5


@pytest.mark.slow
def test_smoothing_folds_into_fused_layernorm(tmp_path):
    """GPT-2: LayerNormalization scale and bias → Gemm (through the 2-D Reshape)."""
    root = tmp_path / "gpt2"
    root.mkdir()
    write_tiny_gpt2(root)
    export_bundle(root, FolderSource("gpt2-tiny", "seed0"), ["onnx"])
    assert _smoothed_logits_change(root, tmp_path, expect_groups=4) < 1e-5


@pytest.mark.slow
def test_stage_refuses_a_graph_tensorrt_would_not_take(trained, monkeypatch):
    """Asymmetric uint8 activations (ORT's CPU default) fail the form check: the stage
    raises and the bundle keeps its previous int8 graph, byte for byte."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data

    from exportline.exporters.core.bundle import sha256_file
    from exportline.exporters.core.errors import StageError
    from exportline.exporters.precision import int8_graph

    def asymmetric(model_path, out_path, ranges, nodes):
        cache = out_path.parent / "ranges.json"
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, {
            k: (np.float32(-m / 2), np.float32(m)) for k, m in ranges.items()}), cache)
        quantize_static(str(model_path), str(out_path), None, calibration_cache_path=str(cache),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_quantize=nodes, use_external_data_format=True,
                        extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]})

    root, _ = trained
    before = sha256_file(root / "onnx" / "model_int8.onnx")
    monkeypatch.setattr(int8_graph, "quantize", asymmetric)
    with pytest.raises(StageError, match="not in TensorRT's form") as err:
        from exportline.exporters.core.bundle import Bundle
        from exportline.exporters.core.pipeline import run_pipeline

        run_pipeline(Bundle(root), _bundle_source(root), stages=parse_stages("int8"), force=True)
    assert "uint8" in str(err.value) and "\n" not in str(err.value)
    assert sha256_file(root / "onnx" / "model_int8.onnx") == before
    assert not (root / ".exportline-tmp").exists()


def test_cli_missing_calibration_file_is_one_line(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", "from exportline.exporters.cli.app import main; main()", "export", "tiny",
         "--out", str(tmp_path / "b"), "--stages", "int8", "--calibration-data", str(tmp_path / "nope.txt")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and "nope.txt: no such file" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "b" / "onnx").exists()


def _bundle_source(root):
    """The source the bundle was exported from (its manifest records the folder)."""
    import json

    from exportline.exporters.sources import resolve_source

    return resolve_source(json.loads((root / "manifest.json").read_text())["source"]["path"])


@pytest.mark.slow
def test_one_pass_ranges_equal_onnxruntime_minmax(trained, tmp_path):
    """The stage's activation ranges come from its one statistics pass; on the same feeds
    they must equal what onnxruntime's own symmetric MinMax calibrator measures."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator
    from transformers import AutoConfig

    from exportline.exporters.core.shapes import KVLayout
    from exportline.exporters.onnx.external_data import load_graph
    from exportline.exporters.precision.activation_stats import channel_absmax
    from exportline.exporters.precision.calibration import load_tokenizer, spread
    from exportline.exporters.precision.int8_graph import activation_channels

    from quant_models import WholeGraphReader

    root, _ = trained
    source = root / "onnx" / "model.onnx"
    layout = KVLayout.from_config(AutoConfig.from_pretrained(root))
    chunks = spread(split_text(default_corpus(), load_tokenizer(root), max_positions=256).calibration, 8)
    graph = load_graph(source, infer=False, weights=False)
    channels = activation_channels(graph, weight_matmuls(graph))
    ours = channel_absmax(source, graph, channels, scratch=tmp_path / "stats",
                          run=lambda path, observe: WholeGraphReader(path, chunks, layout, observe=observe).drain())
    calibrator = create_calibrator(source, ["MatMul"], augmented_model_path=str(tmp_path / "aug.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax, extra_options={"symmetric": True})
    calibrator.collect_data(WholeGraphReader(source, chunks, layout))
    theirs = calibrator.compute_data()
    assert len(channels) == 2 * 4  # per layer: q/k/v input, o input, gate/up input, down input
    for tensor, stats in ours.items():
        low, high = theirs[tensor].range_value
        expected = max(abs(float(np.min(low))), float(np.max(high)))
        assert float(stats.max()) == pytest.approx(expected, rel=1e-6), tensor


def test_no_tokenizer_means_int8_not_available(tmp_path, monkeypatch):
    """A model shipped without a tokenizer cannot be calibrated on text: the stage is
    recorded as skipped with the reason, not failed with a missing-file message."""
    from exportline.exporters.core.bundle import Bundle
    from exportline.exporters.core.pipeline import run_pipeline
    from exportline.exporters.stages import int8 as int8_stage

    root = tmp_path / "b"
    (root / "onnx").mkdir(parents=True)
    (root / "onnx" / "model.onnx").write_bytes(b"graph")
    (root / "config.json").write_text("{}")
    monkeypatch.setattr(int8_stage, "_layout", lambda ctx: (None, 128))
    result = run_pipeline(Bundle(root), FolderSource("no-tok", "x"), stages=parse_stages("int8"))
    record = result.ran[0]
    assert record["status"] == "skipped" and "tokenizer.json" in record["reason"]
    assert not (root / "onnx" / "model_int8.onnx").exists()
