"""Runner contract (verify/runners/), the backend registry and the ONNX file checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from exportline.exporters.core.errors import ArtifactError, ConfigError, NotAvailable
from exportline.exporters.onnx.files_check import check_onnx_files
from exportline.verify.cases import build_cases
from exportline.verify.metrics import compare
from exportline.verify.runtime import BACKENDS, make_runner
from exportline.verify.runtime.onnx_runner import OnnxRuntimeRunner
from exportline.verify.runtime.torch_runner import TorchRunner

from verify_helpers import copy_bundle, shared_bundle


@pytest.fixture(scope="session")
def bundle(tmp_path_factory):
    return shared_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def layout_and_case(bundle):
    with TorchRunner(bundle) as r:
        layout = r.layout
    decode = [c for c in build_cases(layout, long=16) if c.prefix is not None and c.past == 16][0]
    return layout, decode


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_infer_before_activate_errors_and_context_manager_releases(bundle, backend):
    runner = make_runner(bundle, backend)
    feed = build_cases(_layout(bundle), long=4)[0].feed(_layout(bundle))
    with pytest.raises(RuntimeError, match="activate"):
        runner.infer(feed)
    with runner as active:
        assert active.is_active
        assert active.infer(feed)["logits"].shape == (1, 1, 512)
    assert not runner.is_active
    with pytest.raises(RuntimeError, match="activate"):
        runner.infer(feed)


def test_constructors_are_cheap_and_errors_come_on_activate(tmp_path):
    runner = OnnxRuntimeRunner(tmp_path / "absent.onnx")  # nothing is read yet
    with pytest.raises(ArtifactError, match="does not exist"):
        runner.activate()
    assert not runner.is_active


def test_onnxruntime_matches_torch_float64_on_a_decode_step(bundle, layout_and_case):
    layout, case = layout_and_case
    with TorchRunner(bundle, dtype="float64") as ref:
        pre = ref.infer(case.prefix.feed(layout))
        feed = case.feed(layout, {p: pre[q] for p, q in zip(layout.past_names(), layout.present_names())})
        expected = ref.infer(feed)
    with make_runner(bundle, "onnx") as ort:
        got = ort.infer(feed)  # float64 past in; the runner casts to the graph's float32
    assert set(got) == set(expected)
    for name in expected:
        assert got[name].dtype == np.float32
        c = compare(got[name], expected[name])
        assert c.rel_l2 < 1e-5, (name, c)


@pytest.mark.covers("backend:torch")
def test_torch_runner_dtypes_and_given_model_untouched(bundle, layout_and_case):
    import torch
    from transformers import AutoModelForCausalLM

    layout, case = layout_and_case
    model = AutoModelForCausalLM.from_pretrained(bundle, dtype=torch.float32)
    feed = case.prefix.feed(layout)
    with TorchRunner(model=model, dtype="bfloat16") as r:
        out = r.infer(feed)
    assert out["logits"].dtype == np.float32  # bfloat16 comes back widened, numpy has no bf16
    assert next(model.parameters()).dtype == torch.float32
    with TorchRunner(model=model, dtype="float64") as r64, TorchRunner(model=model) as r32:
        a, b = r64.infer(feed)["logits"], r32.infer(feed)["logits"]
    assert a.dtype == np.float64 and b.dtype == np.float32
    assert 0 < compare(b, a).rel_l2 < 1e-5
    assert compare(out["logits"], a).rel_l2 > compare(b, a).rel_l2  # bf16 is visibly coarser
    with pytest.raises(ConfigError, match="dtype"):
        TorchRunner(bundle, dtype="int8")


def test_float_inputs_are_cast_to_the_declared_graph_type(tmp_path):
    """One feed drives fp32 and fp16 graphs: float64 past into a float16 input."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT16, ["b", 2])
    i = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", 2])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["b", 2])
    j = helper.make_tensor_value_info("ids_out", TensorProto.INT64, ["b", 2])
    graph = helper.make_graph(
        [helper.make_node("Add", ["past_key_values.0.key", "past_key_values.0.key"], ["logits"]),
         helper.make_node("Identity", ["input_ids"], ["ids_out"])],
        "g", [x, i], [y, j],
    )
    path = tmp_path / "fp16.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), path)
    feed = {"past_key_values.0.key": np.array([[1.5, -2.25]]), "input_ids": np.array([[3, 4]]), "extra": np.zeros(1)}
    with OnnxRuntimeRunner(path) as r:
        out = r.infer(feed)
    assert out["logits"].dtype == np.float16 and out["logits"].tolist() == [[3.0, -4.5]]
    with OnnxRuntimeRunner(path) as r, pytest.raises(ConfigError, match="input_ids"):
        r.infer({"past_key_values.0.key": np.zeros((1, 2))})


def test_missing_external_data_is_one_line_artifact_error(bundle, tmp_path):
    root = copy_bundle(bundle, tmp_path / "b")
    (root / "onnx" / "model.onnx_data").unlink()
    with pytest.raises(ArtifactError) as info:
        make_runner(root, "onnx")
    message = str(info.value)
    assert "model.onnx_data is missing" in message and "\n" not in message


def test_truncated_files_are_one_line_artifact_errors(bundle, tmp_path):
    root = copy_bundle(bundle, tmp_path / "b")
    model = root / "onnx" / "model.onnx"
    # Without a manifest the parse check must catch it on its own.
    (root / "manifest.json").unlink()
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 3])
    with pytest.raises(ArtifactError, match="truncated|cannot load") as info:
        OnnxRuntimeRunner(model).activate()
    assert "\n" not in str(info.value)
    copy_bundle(bundle, tmp_path / "c")
    data = tmp_path / "c" / "onnx" / "model.onnx_data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="manifest records"):
        make_runner(tmp_path / "c", "onnx")
    with pytest.raises(ArtifactError, match="model.onnx_data is truncated"):
        check_onnx_files(tmp_path / "c" / "onnx" / "model.onnx")


def test_registry_names_and_errors(bundle):
    assert list(BACKENDS)[:4] == ["torch", "onnx", "onnx-fp16", "onnx-int8"]
    with pytest.raises(ConfigError, match="unknown backend 'onnx-fp8'.*onnx-fp16"):
        make_runner(bundle, "onnx-fp8")
    # without TensorRT or a GPU: not available; with them, this bundle has no engine
    with pytest.raises((NotAvailable, ArtifactError), match="trt-fp16: not available|no fp16 TensorRT engine"):
        make_runner(bundle, "trt-fp16")
    with pytest.raises(ArtifactError, match="no onnx/model_fp16.onnx.*--stages fp16"):
        make_runner(bundle, "onnx-fp16")


def test_manifest_size_mismatch_is_reported(bundle, tmp_path):
    root = copy_bundle(bundle, tmp_path / "b")
    manifest = json.loads((root / "manifest.json").read_text())
    entry = next(f for f in manifest["files"] if f["path"] == "onnx/model.onnx")
    entry["bytes"] += 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="manifest records"):
        make_runner(root, "onnx")


def _layout(bundle):
    from transformers import AutoConfig

    from exportline.exporters.core.shapes import KVLayout

    return KVLayout.from_config(AutoConfig.from_pretrained(bundle))


def test_cuda_requested_without_a_gpu_is_not_available(bundle):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present; see test_cuda_runner_matches_cpu")
    with pytest.raises(NotAvailable, match="no CUDA GPU"):
        TorchRunner(bundle, device="cuda").activate()


@pytest.mark.gpu
def test_cuda_runner_matches_cpu(bundle, layout_and_case):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("not available: no CUDA GPU visible to torch")
    layout, case = layout_and_case
    feed = case.prefix.feed(layout)
    with TorchRunner(bundle, dtype="float64", device="cuda") as gpu, TorchRunner(bundle, dtype="float64") as cpu:
        assert compare(gpu.infer(feed)["logits"], cpu.infer(feed)["logits"]).rel_l2 < 1e-10


def test_float64_reference_has_no_float32_steps(bundle, layout_and_case):
    """transformers' RMSNorm and RoPE compute in float32 inside a float64 model; the exact
    reference rebinds them, which moves logits by about float32 rounding, no more."""
    layout, case = layout_and_case
    feed = case.prefix.feed(layout)
    with TorchRunner(bundle, dtype="float64") as exact, TorchRunner(bundle, dtype="float64", exact=False) as hf:
        assert exact.float64_rebound == ["RMSNorm", "rotary embedding"] and hf.float64_rebound == []
        gap = compare(hf.infer(feed)["logits"], exact.infer(feed)["logits"]).rel_l2
    assert 1e-9 < gap < 1e-6


def test_float64_rebinding_checks_the_formula():
    import torch
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from exportline.verify.reference.float64 import exact_float64

    norm = LlamaRMSNorm(16, eps=1e-5).double()
    norm.weight.data = torch.rand(16, dtype=torch.float64) + 0.5
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    assert exact_float64(norm) == ["RMSNorm"]
    manual = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    assert torch.allclose(norm(x), manual, rtol=1e-14, atol=0)

    class GemmaLikeRMSNorm(LlamaRMSNorm):  # a different formula: must keep its own forward
        def forward(self, h):
            return super().forward(h) * 2

    other = GemmaLikeRMSNorm(16).double()
    assert exact_float64(other) == [] and "forward" not in vars(other)


def test_a_constant_stored_as_external_data_is_checked_too(tmp_path):
    """onnx's own external-data writer moves a Constant node's tensor out like an initializer
    (convert_attribute=True); a data file too short for it is caught before a runtime opens
    the graph."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    value = numpy_helper.from_array(np.arange(64, dtype=np.float32), "c")
    const = helper.make_node("Constant", [], ["c"], value=value)
    add = helper.make_node("Add", ["x", "c"], ["y"])
    graph = helper.make_graph([const, add], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])])
    path = tmp_path / "onnx" / "model.onnx"
    path.parent.mkdir()
    onnx.save_model(helper.make_model(graph), str(path), save_as_external_data=True, location="model.onnx_data",
                    size_threshold=0, convert_attribute=True)
    data = path.parent / "model.onnx_data"
    assert check_onnx_files(path).required_bytes == data.stat().st_size == 64 * 4
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="model.onnx_data is truncated"):
        check_onnx_files(path)
