"""A tiny bundle for the deploy tests: the real hf stage output plus stand-ins for the parts
other stages make (ONNX graphs with the KV-cache names, an engine file, reports).

The stand-in ONNX graphs are small but real: they declare exactly the inputs and outputs of
exporters/shapes.py, keep their weights in one external data file, and run in ONNX Runtime.
The reports are written with verify/report.py's own dataclasses. Their numbers are fixture
data for checking that the card repeats them faithfully, not measurements.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ENGINE = "trt/fp16.sm90.trt10.13.0.plan"


def exportline_cmd() -> list[str]:
    script = Path(sys.executable).with_name("exportline")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from exportline.exporters.cli.app import main; main()"]


def build_bundle(dest: Path) -> Path:
    subprocess.run([*exportline_cmd(), "export", "tiny", "--stages", "hf", "--no-verify", "--out", str(dest)],
                   check=True, capture_output=True, text=True)
    config = json.loads((dest / "config.json").read_text())
    for name, kv_type in (("model", "float32"), ("model_fp16", "float16"), ("model_int8", "float32")):
        write_standin_onnx(dest / "onnx" / f"{name}.onnx", config, kv_type=kv_type)
    (dest / "trt").mkdir()
    (dest / ENGINE).write_bytes(b"stand-in engine bytes, not a TensorRT plan\n" * 64)
    (dest / ENGINE).with_suffix(".json").write_text(json.dumps(
        {"stand_in": True, "tensorrt_version": "10.13.0", "compute_capability": "9.0", "profiles": ["prefill", "decode"]}))
    write_reports(dest / "reports")
    record_standins(dest)
    return dest


def rewrite_report(dest: Path, rel: str, text: str) -> None:
    """A report rewritten the way verify/bench write one: the file, then its manifest entry."""
    from exportline.exporters.core.bundle import Bundle

    bundle = Bundle(dest)
    with bundle.lock():
        (dest / rel).write_text(text)
        bundle.write_manifest(bundle.read_manifest(), only_under="reports/")


def record_standins(dest: Path) -> None:
    """Record the stand-ins as the outputs of the stages that would make them: a manifest
    lists only stage outputs and exportline's own files."""
    from exportline.exporters.core.bundle import Bundle

    bundle = Bundle(dest)
    with bundle.lock():
        manifest = bundle.read_manifest()
        outputs = {"onnx": ["onnx/model.onnx", "onnx/model.onnx_data"],
                   "fp16": ["onnx/model_fp16.onnx", "onnx/model_fp16.onnx_data"],
                   "int8": ["onnx/model_int8.onnx", "onnx/model_int8.onnx_data"],
                   "trt": [ENGINE, ENGINE.replace(".plan", ".json")]}
        for stage, files in outputs.items():
            present = [rel for rel in files if (dest / rel).is_file()]
            manifest["stages"][stage] = {"name": stage, "status": "done", "stand_in": True, "outputs": present}
        bundle.write_manifest(manifest)


def write_standin_onnx(path: Path, config: dict, *, kv_type: str = "float32") -> None:
    """logits = embedding rows of input_ids; present.i.* = past concatenated with a broadcast of the ids."""
    from types import SimpleNamespace

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from exportline.exporters.core.shapes import KVLayout

    layout = KVLayout.from_config(SimpleNamespace(**config))
    kv = TensorProto.FLOAT16 if kv_type == "float16" else TensorProto.FLOAT
    types = {"int64": TensorProto.INT64}

    def value(spec, is_kv):
        return helper.make_tensor_value_info(spec.name, kv if is_kv else types.get(spec.dtype, TensorProto.FLOAT), list(spec.dims))

    inputs = [value(s, s.name.startswith("past_")) for s in layout.inputs()]
    outputs = [value(s, s.name.startswith("present.")) for s in layout.outputs()]
    rng = np.random.default_rng(0)
    emb = numpy_helper.from_array(rng.standard_normal((layout.vocab_size, layout.vocab_size)).astype(np.float32), "emb")
    shape = numpy_helper.from_array(np.array([1, layout.num_kv_heads, 1, layout.head_dim], np.int64), "kv_shape")
    axes = numpy_helper.from_array(np.array([1, 3], np.int64), "axes")
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["logits"]),
        helper.make_node("Cast", ["input_ids"], ["ids_f"], to=kv),
        helper.make_node("Unsqueeze", ["ids_f", "axes"], ["ids_4d"]),
        helper.make_node("Expand", ["ids_4d", "kv_shape"], ["new_kv"]),
    ]
    for past, present in zip(layout.past_names(), layout.present_names()):
        nodes.append(helper.make_node("Concat", [past, "new_kv"], [present], axis=2))
    graph = helper.make_graph(nodes, "standin", inputs, outputs, initializer=[emb, shape, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{path.name}_data", size_threshold=1024)


def write_reports(reports: Path) -> None:
    from exportline.verify.report import StageReport, VerifyReport, judge

    fp32 = {"rel_l2": 1e-5, "max_abs_over_max_ref": 1e-5}
    hf = [judge("hf", "batch1 prefill 8", "logits", shape=[1, 8, 512],
                metrics={"max_abs": 2.1e-7, "max_abs_over_max_ref": 3.2e-8, "rel_l2": 4.5e-8, "cosine": 1.0, "top1": 1.0}, bounds=fp32),
          judge("hf", "batch3 left-padded prefill 16", "logits", shape=[3, 16, 512],
                metrics={"max_abs": 3.3e-7, "max_abs_over_max_ref": 5.1e-8, "rel_l2": 6.25e-8, "cosine": 1.0, "top1": 1.0}, bounds=fp32)]
    onnx = [judge("onnx", "batch1 decode past 31", "logits", shape=[1, 1, 512],
                  metrics={"max_abs": 1.2e-6, "max_abs_over_max_ref": 2.4e-7, "rel_l2": 3.75e-7, "cosine": 0.99999994, "top1": 1.0}, bounds=fp32),
            judge("onnx", "greedy 32 steps", "greedy tokens", shape=[1, 32], metrics={"identical_fraction": 1.0}, bounds={"identical_fraction": 1.0})]
    fp16 = [judge("fp16", "batch1 prefill 8", "logits", shape=[1, 8, 512],
                  metrics={"max_abs": 1.9e-3, "max_abs_over_max_ref": 4.4e-4, "rel_l2": 5.5e-4, "cosine": 0.9999998, "top1": 0.995},
                  bounds={"rel_l2": 1e-3, "top1": 0.99})]
    report = VerifyReport([
        StageReport.from_rows("hf", hf, "float64 reference"),
        StageReport.from_rows("onnx", onnx, "float64 reference"),
        StageReport.from_rows("fp16", fp16, "float64 reference", perplexity_fp32=512.4, perplexity_fp16=512.9),
        StageReport("trt", "not available", reason="TensorRT not installed"),
    ], {"python": sys.version.split()[0]})
    report.write(reports)
    (reports / "bench.json").write_text(json.dumps({
        "environment": {"device": "cpu (fixture)"},
        "points": [
            {"backend": "torch-cpu", "workload": "decode past=64", "median_ms": 1.25, "tokens_per_s": 800.0, "speedup": 1.0},
            {"backend": "onnxruntime-cpu", "workload": "decode past=64", "median_ms": 0.5, "tokens_per_s": 2000.0, "speedup": 2.5},
            {"backend": "tensorrt", "workload": "decode past=64", "status": "not available", "reason": "TensorRT not installed"},
        ],
    }, indent=2) + "\n")
