"""What every file of a real bundle carries for the tools that open it: the user's umask (a
serving container's non-root user must read it) and, for each ONNX graph, metadata_props that
name the source, the exportline version, the precision and the I/O convention."""

from __future__ import annotations

import json
import os
import subprocess
from types import SimpleNamespace

import pytest

from exportline.exporters.core.shapes import KVLayout
from exportline.exporters.onnx.llama_graph import BUILDER

from deploy_bundle import exportline_cmd

pytestmark = pytest.mark.slow  # one real export of tiny through four stages (~15 s of CPU)

UMASK = 0o027  # not the common 022, so a hard-coded 0644 would show


def _with_umask():
    os.umask(UMASK)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """tiny through hf, onnx, fp16, int8 (verified: reports too), then a Triton handoff, all under UMASK."""
    root = tmp_path_factory.mktemp("umask")
    out, repo = root / "tiny", root / "repo"
    for args in (["export", "tiny", "--out", str(out), "--stages", "hf,onnx,fp16,int8"],
                 ["handoff", str(out), "--triton", str(repo)]):
        proc = subprocess.run([*exportline_cmd(), *args], capture_output=True, text=True, preexec_fn=_with_umask)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return out, repo


def test_every_file_gets_the_users_umask(exported):
    want = 0o666 & ~UMASK
    for folder in exported:
        files = {p.relative_to(folder).as_posix(): p.stat().st_mode & 0o777 for p in folder.rglob("*") if p.is_file()}
        assert "model.safetensors" in files or "tiny/1/model.onnx_data" in files
        assert {rel: oct(m) for rel, m in files.items() if m != want} == {}, f"expected {oct(want)}"


@pytest.mark.parametrize("rel,precision", [("onnx/model.onnx", "fp32"), ("onnx/model_fp16.onnx", "fp16"),
                                           ("onnx/model_int8.onnx", "int8")])
def test_graph_metadata_names_source_version_precision_and_io(exported, rel, precision):
    from importlib import metadata

    import onnx
    import onnxruntime as ort

    out, _ = exported
    model = onnx.load(str(out / rel), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    assert props["exportline.version"] == metadata.version("exportline")
    assert props["exportline.precision"] == precision
    assert props["exportline.source"] == "preset tiny (llama; random-init)"
    config = json.loads((out / "config.json").read_text())
    layout = KVLayout.from_config(SimpleNamespace(**config))
    io = props["exportline.io_convention"]
    for name in ("input_ids[batch, sequence]", f"past_key_values.{{i}}.key[batch, {layout.num_kv_heads}, past_sequence, "
                 f"{layout.head_dim}]", "logits[batch, sequence,", f"i = 0..{layout.num_layers - 1}"):
        assert name in io, io
    chain = props["exportline.made_by"].split(" -> ")
    # tiny is a Llama: its graph is written by exportline's builder, no torch in the chain
    # (a traced graph's chain and producer: tests/test_onnx_export.py)
    assert chain[0].startswith("exportline ") and chain[0].endswith(BUILDER) and not any("torch" in c for c in chain)
    # the producer is the tool that emitted the operators (onnx/metadata.py), here exportline's
    # builder; fp16 and int8 edit the graph in place (Casts, Q/DQ pairs) and keep its producer
    assert model.producer_name == "exportline"
    if precision != "fp32":
        assert len(chain) == 2 and ("float16" in chain[1] if precision == "fp16" else "Q/DQ" in chain[1])
    # what a user sees in ONNX Runtime
    session = ort.InferenceSession(str(out / rel), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map["exportline.precision"] == precision


def test_handed_off_graph_keeps_its_metadata(exported):
    import onnx

    out, repo = exported
    props = {p.key: p.value for p in onnx.load(str(repo / "tiny" / "1" / "model.onnx"), load_external_data=False).metadata_props}
    assert props["exportline.precision"] == "fp32" and props["exportline.source"].startswith("preset tiny")
