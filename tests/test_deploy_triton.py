"""exportline handoff --triton: config.pbtxt parsed back with Triton's own protobuf schema, every KV
tensor listed, the ONNX (with external data) loadable from its new place, and the bundle left intact:
files are copied, never hard-linked (onnx >= 1.23 refuses external data with several links)."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from exportline.deploy.triton import write_triton_repo
from exportline.exporters.core.errors import ArtifactError
from exportline.exporters.core.shapes import KVLayout

from deploy_bundle import ENGINE, exportline_cmd, record_standins, write_standin_onnx


def parse_config(path):
    """config.pbtxt parsed with Triton's own schema (tritonclient's model_config_pb2, generated from
    common/protobuf/model_config.proto): text_format.Parse rejects any field or enum it does not know."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def dtype(name: str) -> int:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Value(name)


def _layout(bundle) -> KVLayout:
    from types import SimpleNamespace

    return KVLayout.from_config(SimpleNamespace(**json.loads((bundle / "config.json").read_text())))


def _feeds(layout: KVLayout, dtype=np.float32) -> dict[str, np.ndarray]:
    ids = np.array([[5, 6, 7]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(3)[None]}
    for name in layout.past_names():
        feeds[name] = np.zeros((1, layout.num_kv_heads, 0, layout.head_dim), dtype)
    return feeds


def test_onnx_handoff_config_lists_every_kv_tensor(deploy_bundle, tmp_path):
    proc = subprocess.run([*exportline_cmd(), "handoff", str(deploy_bundle), "--triton", str(tmp_path / "repo")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    model_dir = tmp_path / "repo" / "tiny"
    config = parse_config(model_dir / "config.pbtxt")
    layout = _layout(deploy_bundle)
    assert config.name == "tiny" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 0
    inputs = {t.name: t for t in config.input}
    outputs = {t.name: t for t in config.output}
    assert list(inputs) == [s.name for s in layout.inputs()] and list(outputs) == [s.name for s in layout.outputs()]
    assert all(f"past_key_values.{i}.{k}" in inputs for i in range(layout.num_layers) for k in ("key", "value"))
    fp32, int64 = dtype("TYPE_FP32"), dtype("TYPE_INT64")
    assert inputs["input_ids"].data_type == int64 and list(inputs["input_ids"].dims) == [-1, -1]
    assert inputs["attention_mask"].data_type == int64 and list(inputs["attention_mask"].dims) == [-1, -1]
    assert list(inputs["past_key_values.0.key"].dims) == [-1, layout.num_kv_heads, -1, layout.head_dim]
    assert inputs["past_key_values.0.key"].data_type == fp32
    assert list(outputs["logits"].dims) == [-1, -1, layout.vocab_size]
    assert sorted(os.listdir(model_dir / "1")) == ["model.onnx", "model.onnx_data"]


def test_handed_off_onnx_finds_its_external_data_beside_it(deploy_bundle, tmp_path, monkeypatch):
    import onnx
    import onnxruntime as ort

    model = write_triton_repo(deploy_bundle, tmp_path / "repo", precision="fp16", name="tiny-fp16")
    graph = onnx.load(str(model.model_dir / "1" / "model.onnx"), load_external_data=False)
    locations = {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx_data"}  # was model_fp16.onnx_data in the bundle
    config = parse_config(model.model_dir / "config.pbtxt")
    types = {t.name: t.data_type for t in [*config.input, *config.output]}
    assert types["past_key_values.1.value"] == dtype("TYPE_FP16")
    assert types["logits"] == dtype("TYPE_FP32")

    monkeypatch.chdir(tmp_path)  # ONNX Runtime must resolve the weights from the model's folder, not the cwd
    feeds = _feeds(_layout(deploy_bundle), np.float16)
    got = ort.InferenceSession(str(model.model_dir / "1" / "model.onnx")).run(None, feeds)
    want = ort.InferenceSession(str(deploy_bundle / "onnx" / "model_fp16.onnx")).run(None, feeds)
    assert len(got) == len(want) and all(np.array_equal(g, w) for g, w in zip(got, want))


def test_tensorrt_handoff_enables_both_profiles(deploy_bundle, tmp_path):
    model = write_triton_repo(deploy_bundle, tmp_path / "repo", backend="tensorrt")
    config = parse_config(model.model_dir / "config.pbtxt")
    assert config.platform == "tensorrt_plan" and config.default_model_filename == "model.plan"
    assert (model.model_dir / "1" / "model.plan").read_bytes() == (deploy_bundle / ENGINE).read_bytes()
    assert [list(g.profile) for g in config.instance_group] == [["0", "1"]]
    assert {t.name: t.data_type for t in config.input}["past_key_values.0.key"] == dtype("TYPE_FP16")
    assert model.engine_check is not None and not model.engine_check.usable


def test_onnx_missing_a_declared_tensor_is_refused(deploy_bundle, tmp_path):
    config = json.loads((deploy_bundle / "config.json").read_text())
    write_standin_onnx(deploy_bundle / "onnx" / "model.onnx", {**config, "num_hidden_layers": 1})
    record_standins(deploy_bundle)  # as if the onnx stage had written it: the manifest agrees
    with pytest.raises(ArtifactError, match="has no tensor 'past_key_values.1.key'"):
        write_triton_repo(deploy_bundle, tmp_path / "repo")
    assert not (tmp_path / "repo" / "tiny").exists() and not list((tmp_path / "repo").glob(".*"))


def test_existing_model_folder_is_not_overwritten(deploy_bundle, tmp_path):
    write_triton_repo(deploy_bundle, tmp_path / "repo")
    proc = subprocess.run([*exportline_cmd(), "handoff", str(deploy_bundle), "--triton", str(tmp_path / "repo")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "already exists" in proc.stderr


def _check_graphs(folder) -> list[str]:
    """onnx.load + the full checker (which reads the external data) on every graph under folder."""
    import onnx

    graphs = sorted(folder.rglob("*.onnx"))
    for path in graphs:
        onnx.load(str(path))
        onnx.checker.check_model(str(path), full_check=True)
    return [p.relative_to(folder).as_posix() for p in graphs]


def test_handoff_copies_so_onnx_still_opens_bundle_and_repo(deploy_bundle, tmp_path):
    repo = tmp_path / "repo"
    for precision in ("fp32", "fp16", "int8"):
        write_triton_repo(deploy_bundle, repo, precision=precision, name=f"tiny-{precision}")
    write_triton_repo(deploy_bundle, repo, backend="tensorrt", name="tiny-trt")
    files = [p for folder in (deploy_bundle, repo) for p in folder.rglob("*") if p.is_file()]
    assert [p for p in files if p.stat().st_nlink != 1] == []
    assert _check_graphs(deploy_bundle) == ["onnx/model.onnx", "onnx/model_fp16.onnx", "onnx/model_int8.onnx"]
    assert len(_check_graphs(repo)) == 3


@pytest.mark.slow
def test_real_bundle_after_handoff_checks_and_reexports(tmp_path):
    """A real hf+onnx export, handed off; then the checker passes everywhere and a later
    `export --stages fp16 --force` (which reads onnx/model.onnx) still works."""
    out, repo = tmp_path / "tiny", tmp_path / "repo"
    export = [*exportline_cmd(), "export", "tiny", "--out", str(out), "--no-verify"]
    subprocess.run([*export, "--stages", "hf,onnx"], check=True, capture_output=True, text=True)
    proc = subprocess.run([*exportline_cmd(), "handoff", str(out), "--triton", str(repo)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert _check_graphs(out) == ["onnx/model.onnx"] and _check_graphs(repo) == ["tiny/1/model.onnx"]
    proc = subprocess.run([*export, "--stages", "fp16", "--force"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert _check_graphs(out) == ["onnx/model.onnx", "onnx/model_fp16.onnx"]
    assert _check_graphs(repo) == ["tiny/1/model.onnx"]
