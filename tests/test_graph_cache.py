"""The traced-graph cache (exporters/onnx/graph_cache.py): a warm export writes the very bytes
a cold one writes, for any checkpoint of the config; anything the graph depends on misses;
a damaged entry re-traces; a warm export neither traces nor imports torch."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quant_models import FolderSource, export_bundle

ARCHS = {  # tiny configs, 6 layers so 2 are copies of the traced ones
    "llama": dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128),
    "gpt2": dict(vocab_size=96, n_embd=32, n_layer=6, n_head=4, n_positions=128),
}
FILES = ("onnx/model.onnx", "onnx/model.onnx_data")


def _write_folder(root: Path, arch: str, *, seed: int, dtype: str = "float32", **overrides) -> Path:
    """An HF folder saved by transformers itself; biases and norms non-trivial, so a weight
    wired to the wrong initializer, or a value baked into the graph, shows in the bytes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **{**ARCHS[arch], **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.to(getattr(torch, dtype)).save_pretrained(root)
    return root


def _export(root: Path, stages=("onnx",)) -> dict:
    export_bundle(root, FolderSource(root.name, root.name), list(stages))
    return json.loads((root / "manifest.json").read_text())["stages"][stages[-1]]


def _digests(root: Path, files=FILES) -> dict[str, str]:
    return {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in files}


def _copy_folder(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        if (src / name).is_file():
            (dest / name).write_bytes((src / name).read_bytes())
    return dest


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_warm_export_writes_the_bytes_of_a_cold_one(arch, tmp_path, monkeypatch):
    """Checkpoint A cold (traced, stored), then B (same config, other weights) warm, then B
    cold with the cache off: B's warm and cold files are identical, and differ from A's."""
    a = _write_folder(tmp_path / "a", arch, seed=0)
    b = _write_folder(tmp_path / "b", arch, seed=1)
    assert _export(a)["info"]["tracing"]["graph_cache"] == "stored"
    warm = _export(b)
    assert warm["info"]["tracing"]["graph_cache"] == "hit"
    assert set(warm["info"]["phase_seconds"]) == {"cache", "write"}  # no skeleton, no trace
    monkeypatch.setenv("EXPORTLINE_GRAPH_CACHE", "off")
    cold = _export(_copy_folder(b, tmp_path / "b-cold"))
    assert cold["info"]["tracing"]["graph_cache"].startswith("off")
    assert "trace" in cold["info"]["phase_seconds"]
    assert _digests(b) == _digests(tmp_path / "b-cold")
    assert _digests(a)["onnx/model.onnx_data"] != _digests(b)["onnx/model.onnx_data"]
    assert warm["info"]["tracing"]["layers_copied"] == cold["info"]["tracing"]["layers_copied"] == 2


def test_fp16_direct_path_uses_the_cache(tmp_path):
    """`--stages fp16` from HF weights traces too: warm after the onnx stage stored the graph."""
    a = _write_folder(tmp_path / "a", "llama", seed=0)
    _export(a)
    b = _export(_copy_folder(a, tmp_path / "b"), stages=("fp16",))
    assert b["info"]["tracing"]["graph_cache"] == "hit"
    os.environ["EXPORTLINE_GRAPH_CACHE"] = "off"
    try:
        c = _export(_copy_folder(a, tmp_path / "c"), stages=("fp16",))
    finally:
        del os.environ["EXPORTLINE_GRAPH_CACHE"]
    assert c["info"]["tracing"]["graph_cache"].startswith("off")
    fp16 = ("onnx/model_fp16.onnx", "onnx/model_fp16.onnx_data")
    assert _digests(tmp_path / "b", fp16) == _digests(tmp_path / "c", fp16)


@pytest.mark.parametrize("change", ["rope_theta", "header", "opset"])
def test_what_the_graph_depends_on_misses(change, tmp_path):
    a = _write_folder(tmp_path / "a", "llama", seed=0)
    first = _export(a)
    if change == "rope_theta":  # config.json content
        b = _write_folder(tmp_path / "b", "llama", seed=0, rope_theta=500000.0)
    elif change == "header":  # same config.json, weights stored bfloat16
        b = _write_folder(tmp_path / "b", "llama", seed=0, dtype="bfloat16")
        b.joinpath("config.json").write_bytes(a.joinpath("config.json").read_bytes())
    else:
        b = _copy_folder(a, tmp_path / "b")
    options = {"opset": 19} if change == "opset" else {}
    export_bundle(b, FolderSource("b", "b"), ["onnx"], **options)
    second = json.loads((b / "manifest.json").read_text())["stages"]["onnx"]
    assert second["info"]["tracing"]["graph_cache"] == "stored"
    assert second["info"]["tracing"]["graph_cache_key"] != first["info"]["tracing"]["graph_cache_key"]


def test_the_consumer_block_of_config_json_is_not_in_the_key(tmp_path):
    """config.json gains transformers.js_config when graphs are added; the graph is the same."""
    from exportline.exporters.onnx import graph_cache
    from exportline.exporters.sources.weights_reader import CheckpointWeights

    a = _write_folder(tmp_path / "a", "llama", seed=0)
    before = graph_cache.cache_key(graph_cache.key_material(a, CheckpointWeights(a), opset=18))
    _export(a)
    assert "transformers.js_config" in json.loads((a / "config.json").read_text())
    assert graph_cache.cache_key(graph_cache.key_material(a, CheckpointWeights(a), opset=18)) == before


@pytest.mark.parametrize("damage", ["graph", "entry", "weights-map"])
def test_a_damaged_entry_is_traced_again_and_replaced(damage, tmp_path):
    from exportline.exporters.onnx.graph_cache import cache_root

    a = _write_folder(tmp_path / "a", "gpt2", seed=0)
    key = _export(a)["info"]["tracing"]["graph_cache_key"]
    folder = cache_root() / "graphs" / key
    reference = _digests(a)
    if damage == "graph":  # flipped bytes in the middle of graph.onnx
        data = bytearray((folder / "graph.onnx").read_bytes())
        data[len(data) // 2: len(data) // 2 + 8] = b"\xff" * 8
        (folder / "graph.onnx").write_bytes(bytes(data))
    elif damage == "entry":
        (folder / "entry.json").write_text("{not json")
    else:  # valid JSON and checksum, but a weight the graph lacks: fails when attached
        entry = json.loads((folder / "entry.json").read_text())
        entry["weights"]["no.such.initializer"] = {"key": "transformer.wte.weight", "perm": None}
        (folder / "entry.json").write_text(json.dumps(entry))
    b = _copy_folder(a, tmp_path / "b")
    record = _export(b)
    status = record["info"]["tracing"]["graph_cache"]
    assert status.startswith("stored") and ("damaged" in status) == (damage == "weights-map"), status
    assert "trace" in record["info"]["phase_seconds"]
    assert _digests(b) == reference
    assert _export(_copy_folder(a, tmp_path / "c"))["info"]["tracing"]["graph_cache"] == "hit"  # replaced


def test_an_unwritable_cache_is_reported_not_fatal(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("EXPORTLINE_CACHE", str(blocker))
    record = _export(_write_folder(tmp_path / "a", "llama", seed=0))
    assert record["status"] == "done" and record["info"]["tracing"]["graph_cache"].startswith("not stored:")


_PROBE = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from quant_models import FolderSource, export_bundle
export_bundle(Path({root!r}), FolderSource("b", "b"), ["onnx"])
print(json.dumps({{"torch": "torch" in sys.modules, "onnxscript": "onnxscript" in sys.modules,
                   "cache": json.loads(Path({root!r}, "manifest.json").read_text())["stages"]["onnx"]["info"]["tracing"]["graph_cache"]}}))
"""


def test_a_warm_onnx_stage_does_not_import_torch(tmp_path):
    a = _write_folder(tmp_path / "a", "llama", seed=0)
    _export(a)
    b = _copy_folder(a, tmp_path / "b")
    code = _PROBE.format(tests=str(Path(__file__).parent), root=str(b))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts == {"torch": False, "onnxscript": False, "cache": "hit"}
    assert _digests(b) == _digests(a)
