"""exportline handoff --triton: config.pbtxt parsed back with protobuf against Triton's own field
numbers, every KV tensor listed, and the ONNX (with external data) loadable from its new place."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from exportline.deploy.triton import write_triton_repo
from exportline.exporters.core.errors import ArtifactError
from exportline.exporters.core.shapes import KVLayout

from deploy_bundle import ENGINE, exportline_cmd, write_standin_onnx

_DATA_TYPES = ["TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64", "TYPE_INT8",
               "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32", "TYPE_FP64", "TYPE_STRING", "TYPE_BF16"]


def model_config_class():
    """The part of Triton's ModelConfig (common/protobuf/model_config.proto) that handoff writes,
    with the same names and field numbers; text_format.Parse rejects any other field or enum."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    f = descriptor_pb2.FileDescriptorProto(name="triton_model_config_subset.proto", package="inference", syntax="proto3")
    dtype = f.enum_type.add(name="DataType")
    for i, n in enumerate(_DATA_TYPES):
        dtype.value.add(name=n, number=i)

    def message(name, fields, enums=()):
        m = f.message_type.add(name=name)
        for ename, values in enums:
            e = m.enum_type.add(name=ename)
            for i, v in enumerate(values):
                e.value.add(name=v, number=i)
        for fname, number, ftype, repeated, type_name in fields:
            m.field.add(name=fname, number=number, type=ftype, type_name=type_name,
                        label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL)

    tensor = [("name", 1, F.TYPE_STRING, False, None), ("data_type", 2, F.TYPE_ENUM, False, ".inference.DataType")]
    message("ModelInput", tensor + [("dims", 4, F.TYPE_INT64, True, None)])
    message("ModelOutput", tensor + [("dims", 3, F.TYPE_INT64, True, None)])
    message("ModelInstanceGroup", [
        ("name", 1, F.TYPE_STRING, False, None), ("count", 2, F.TYPE_INT32, False, None),
        ("gpus", 3, F.TYPE_INT32, True, None), ("kind", 4, F.TYPE_ENUM, False, ".inference.ModelInstanceGroup.Kind"),
        ("profile", 5, F.TYPE_STRING, True, None),
    ], enums=[("Kind", ["KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"])])
    message("ModelConfig", [
        ("name", 1, F.TYPE_STRING, False, None), ("platform", 2, F.TYPE_STRING, False, None),
        ("max_batch_size", 4, F.TYPE_INT32, False, None),
        ("input", 5, F.TYPE_MESSAGE, True, ".inference.ModelInput"),
        ("output", 6, F.TYPE_MESSAGE, True, ".inference.ModelOutput"),
        ("instance_group", 7, F.TYPE_MESSAGE, True, ".inference.ModelInstanceGroup"),
        ("default_model_filename", 8, F.TYPE_STRING, False, None), ("backend", 17, F.TYPE_STRING, False, None),
    ])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


def parse_config(path):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), model_config_class()())


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
    fp32, int64 = _DATA_TYPES.index("TYPE_FP32"), _DATA_TYPES.index("TYPE_INT64")
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
    assert types["past_key_values.1.value"] == _DATA_TYPES.index("TYPE_FP16")
    assert types["logits"] == _DATA_TYPES.index("TYPE_FP32")

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
    assert {t.name: t.data_type for t in config.input}["past_key_values.0.key"] == _DATA_TYPES.index("TYPE_FP16")
    assert model.engine_check is not None and not model.engine_check.usable


def test_onnx_missing_a_declared_tensor_is_refused(deploy_bundle, tmp_path):
    config = json.loads((deploy_bundle / "config.json").read_text())
    write_standin_onnx(deploy_bundle / "onnx" / "model.onnx", {**config, "num_hidden_layers": 1})
    with pytest.raises(ArtifactError, match="has no tensor 'past_key_values.1.key'"):
        write_triton_repo(deploy_bundle, tmp_path / "repo")
    assert not (tmp_path / "repo" / "tiny").exists() and not list((tmp_path / "repo").glob(".*"))


def test_existing_model_folder_is_not_overwritten(deploy_bundle, tmp_path):
    write_triton_repo(deploy_bundle, tmp_path / "repo")
    proc = subprocess.run([*exportline_cmd(), "handoff", str(deploy_bundle), "--triton", str(tmp_path / "repo")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "already exists" in proc.stderr
