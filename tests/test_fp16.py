"""fp16 stage: the mixed-precision graph of the tiny preset, its bounds and its op placement."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from exportline.exporters.onnx.graph_index import GraphIndex
from exportline.exporters.precision.fp16_graph import FLOAT32_OPS, angle_nodes, norm_nodes
from exportline.exporters.sources import resolve_source
from exportline.verify.suite import verify_bundle

from quant_models import export_bundle, stage_info

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """`exportline export tiny --stages hf,onnx,fp16,int8`, through the library."""
    root = tmp_path_factory.mktemp("tiny-fp16")
    export_bundle(root, resolve_source("tiny"), ["hf", "onnx", "fp16", "int8"])
    return root


def _types(model) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    types = {t.name: t.data_type for t in g.initializer}
    types.update({v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)})
    return types


@pytest.mark.covers("stage:fp16", "stage:int8", "backend:onnx-fp16", "backend:onnx-int8")
def test_fp16_and_int8_of_tiny_pass_their_checks(tiny):
    report = verify_bundle(tiny, stages=["fp16", "int8"])
    by_stage = {s.stage: s for s in report.stages}
    assert by_stage["fp16"].status == "passed", report.first_failure()
    assert by_stage["int8"].status == "passed", report.first_failure()
    logits = [r for r in by_stage["fp16"].rows if r.output == "logits"]
    assert len(logits) >= 6 and all(r.metrics["rel_l2"] <= 1e-3 and r.metrics["top1"] >= 0.99 for r in logits)
    # present.* are reported, greedy tokens are reported: neither is a pass criterion
    assert any(r.output.startswith("present.") and not r.bounds for r in by_stage["fp16"].rows)
    greedy = by_stage["fp16"].extra["greedy"]
    assert len(greedy["onnx-fp16"]) == len(greedy["torch float64"]) == 32
    md = (tiny / "reports" / "verify.md").read_text()
    assert "## Stage `fp16`: passed" in md and "## Stage `int8`: passed" in md


def test_float32_ops_stay_float32(tiny):
    fp32 = onnx.load(str(tiny / "onnx" / "model.onnx"), load_external_data=False)
    kept = norm_nodes(GraphIndex(fp32.graph)) | angle_nodes(GraphIndex(fp32.graph))
    model = onnx.load(str(tiny / "onnx" / "model_fp16.onnx"))
    types = _types(model)
    checked = 0
    for node in model.graph.node:
        if node.op_type in FLOAT32_OPS or node.name in kept or node.op_type in ("Cos", "Sin", "Sqrt", "Reciprocal"):
            floats = [types[t] for t in (*node.input, *node.output) if t and types.get(t) in (TensorProto.FLOAT, TensorProto.FLOAT16)]
            assert TensorProto.FLOAT16 not in floats, f"{node.op_type} {node.name} computes in float16"
            checked += 1
    ops = {n.op_type for n in model.graph.node}
    assert {"Pow", "ReduceMean", "Softmax"} <= ops
    # 2 layers × 2 norms + final norm, each Pow → ReduceMean → Add → Sqrt → Div → Mul (the
    # graph written by hand; a traced one has Reciprocal → Mul → Mul for Div → Mul)
    assert sum(n.op_type == "ReduceMean" for n in model.graph.node) == 5 and checked >= 5 * 6
    io = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
    assert io["logits"] == TensorProto.FLOAT
    assert io["past_key_values.0.key"] == io["present.1.value"] == TensorProto.FLOAT16
    weights = [t for t in model.graph.initializer if len(t.dims) == 2]
    assert weights and all(t.data_type == TensorProto.FLOAT16 for t in weights)


def test_fp16_graph_is_clean_for_tensorrt(tiny):
    model = onnx.load(str(tiny / "onnx" / "model_fp16.onnx"), load_external_data=False)
    index = GraphIndex(model.graph)
    seen = {i.name for i in model.graph.input} | set(index.initializers) | {""}
    for node in model.graph.node:  # TensorRT's parser reads nodes in file order
        assert all(i in seen for i in node.input), f"{node.name} comes before its inputs"
        seen.update(node.output)
    for node in model.graph.node:  # no float32 → float16 → float32 round trips left
        parent = index.producer.get(node.input[0]) if node.op_type == "Cast" else None
        assert parent is None or parent.op_type != "Cast", f"Cast chain {parent.name} → {node.name}"
    assert len(set(index.producer)) == sum(len([o for o in n.output if o]) for n in model.graph.node)
    onnx.checker.check_model(str(tiny / "onnx" / "model_fp16.onnx"), full_check=True)
    assert sorted(p.name for p in (tiny / "onnx").glob("model_fp16*")) == ["model_fp16.onnx", "model_fp16.onnx_data"]


def test_fp16_record_lists_what_stayed_float32(tiny):
    info = stage_info(tiny, "fp16")["info"]
    assert info["float32_op_counts"] == {"Pow": 5, "ReduceMean": 5, "Softmax": 2}
    assert stage_info(tiny, "onnx")["info"]["tracing"]["layers_written"] == 2  # norms of 6 nodes (above)
    assert info["float32_norm_nodes"] == 5 * 6 and info["float32_angle_nodes"] > 0
    assert info["float32_io"] == ["logits"] and "present.0.key" in info["float16_io"]
    assert info["files"] == ["onnx/model_fp16.onnx", "onnx/model_fp16.onnx_data"]


def test_fp16_runs_decode_with_float16_past(tiny):
    import onnxruntime as ort

    session = ort.InferenceSession(str(tiny / "onnx" / "model_fp16.onnx"), providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in session.get_inputs()}
    feed = {"input_ids": np.array([[5]]), "attention_mask": np.ones((1, 4), np.int64), "position_ids": np.array([[3]])}
    for name, t in types.items():
        if name.startswith("past_key_values."):
            assert t == "tensor(float16)"
            feed[name] = np.zeros((1, 2, 3, 16), np.float16)
    out = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
    assert out["logits"].dtype == np.float32 and out["present.0.key"].dtype == np.float16
    assert out["present.0.key"].shape == (1, 2, 4, 16) and np.isfinite(out["logits"]).all()


def test_fp16_pooled_top1_gate_counts_flips_over_every_case():
    """Trained weights: 99 % top-1 over all cases' positions together; 3 flips in 256 fail it."""
    import numpy as np

    from exportline.verify.checks.quant import agreement_row
    from exportline.verify.metrics import LogitAgreement

    ref = np.random.default_rng(0).normal(size=(256, 32))
    bounds = {"rel_l2": 1e-3, "top1": 0.99, "margin_z": 3.0}
    for flips, passed in ((2, True), (3, False)):
        out = ref.copy()
        for i in range(flips):  # the runner-up becomes the argmax
            second = np.argsort(out[i])[-2]
            out[i, second] = out[i].max() + 1.0
        agreement = LogitAgreement()
        for half in (slice(0, 128), slice(128, 256)):  # two cases, pooled
            agreement.add(out[half], ref[half])
        row = agreement_row("fp16", "every case, pooled", agreement, bounds=bounds, gated=("top1",))
        assert row.passed is passed and row.metrics["top1"] == 1 - flips / 256
