"""Test helpers for the verify tests: a tiny bundle (hf stage of the `tiny` preset, shrunk)
plus an fp32 ONNX with the KV-cache I/O of exporters/shapes.py.

TEMPORARY: the ONNX comes from a throwaway torch.onnx.export here until
exporters/onnx_stage.py lands on main; then `tiny_bundle` runs the real onnx stage.
"""

from __future__ import annotations

import shutil
from pathlib import Path

TINY = {"model": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "num_hidden_layers": 2}}


def build_tiny_bundle(root: Path) -> Path:
    """hf stage of a shrunk `tiny` preset, then onnx/model.onnx + model.onnx_data."""
    from exportline.exporters.bundle import Bundle
    from exportline.exporters.pipeline import run_pipeline
    from exportline.exporters.sources import resolve_source

    bundle = Bundle(root)
    run_pipeline(bundle, resolve_source("tiny", TINY), stages=["hf"])
    tmp = bundle.tmp_dir("onnx")
    export_kv_onnx(root, tmp / "onnx" / "model.onnx")
    with bundle.lock():
        manifest = bundle.read_manifest()
        outputs = bundle.commit(tmp)
        bundle.clean_tmp()
        manifest["stages"]["onnx"] = {"name": "onnx", "status": "done", "outputs": outputs,
                                      "info": {"exported_by": "tests/verify_helpers.py"}}
        bundle.write_manifest(manifest)
    return root


def export_kv_onnx(model_dir: Path, dest: Path) -> None:
    """torch.onnx.export(dynamo=True) of a wrapper whose inputs are the flat KV names."""
    import onnx
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from exportline.exporters.shapes import KVLayout

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    layout = KVLayout.from_config(model.config)

    class Flat(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, position_ids, past):
            cache = DynamicCache(config=self.m.config)
            for i in range(layout.num_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
            flat = [out.logits]
            for layer in out.past_key_values.layers:
                flat += [layer.keys, layer.values]
            return tuple(flat)

    b, s, p = 2, 3, 4
    past = tuple(torch.randn(b, layout.num_kv_heads, p, layout.head_dim) for _ in layout.past_names())
    args = (torch.ones(b, s, dtype=torch.long), torch.ones(b, p + s, dtype=torch.long),
            torch.arange(p, p + s).expand(b, s).contiguous(), past)
    auto = torch.export.Dim.AUTO
    dyn = ({0: auto, 1: auto}, {0: auto, 1: auto}, {0: auto, 1: auto}, tuple({0: auto, 2: auto} for _ in past))
    scratch = dest.parent / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        Flat(model).eval(), args, str(scratch / "m.onnx"), dynamo=True, opset_version=18, dynamic_shapes=dyn,
        input_names=[s.name for s in layout.inputs()], output_names=[s.name for s in layout.outputs()],
        external_data=True, verbose=False,
    )
    proto = onnx.load(str(scratch / "m.onnx"))
    onnx.save_model(proto, str(dest), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dest.name + "_data")
    shutil.rmtree(scratch)


def scale_initializer(onnx_path: Path, factor: float) -> str:
    """Multiply the largest initializer in place (same file sizes): a numerically wrong graph."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(onnx_path))
    target = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * factor, target.name))
    data = onnx_path.with_name(onnx_path.name + "_data")
    data.unlink()
    onnx.save_model(proto, str(onnx_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name)
    return target.name


def shared_bundle(tmp_path_factory) -> Path:
    """The tiny bundle, built once per test session (tests that damage it work on a copy)."""
    root = tmp_path_factory.getbasetemp() / "verify-tiny-bundle"
    if not (root / "onnx" / "model.onnx").is_file():
        shutil.rmtree(root, ignore_errors=True)
        build_tiny_bundle(root)
    return root


def copy_bundle(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".exportline.lock", "reports"))
    return dest


def exportline_cmd() -> list[str]:
    """The `exportline` script of the interpreter running the tests (the worktree's venv)."""
    import sys

    script = Path(sys.executable).parent / "exportline"
    return [str(script)] if script.is_file() else [shutil.which("exportline") or "exportline"]
