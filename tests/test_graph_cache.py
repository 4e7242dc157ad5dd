"""The traced-graph cache (exporters/onnx/graph_cache.py): a warm export writes the very bytes
a cold one writes, for any checkpoint of the config; anything the graph depends on misses;
a damaged entry re-traces; a warm export neither traces nor imports torch."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """A llama checkpoint exported cold once: (its folder, the cache holding its graph). Tests
    copy the cache into their own $EXPORTLINE_CACHE instead of tracing it again."""
    root = tmp_path_factory.mktemp("traced")
    cache = tmp_path_factory.mktemp("traced-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EXPORTLINE_CACHE", str(cache))
        mp.setenv("EXPORTLINE_ONNX_BUILDER", "trace")
        record = _export(_write_folder(root / "a", "llama", seed=0))
    assert record["info"]["tracing"]["graph_cache"] == "stored"
    return root / "a", cache


@pytest.fixture(autouse=True)
def _traced_path(monkeypatch):
    """The cache serves traced graphs: a Llama is written by hand unless tracing is forced
    (child processes inherit the switch)."""
    monkeypatch.setenv("EXPORTLINE_ONNX_BUILDER", "trace")


def _warm_cache(traced) -> Path:
    """This test's $EXPORTLINE_CACHE, holding the traced checkpoint's graph."""
    here = Path(os.environ["EXPORTLINE_CACHE"])
    shutil.copytree(traced[1], here, dirs_exist_ok=True)
    return here


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_warm_export_writes_the_bytes_of_a_cold_one(arch, traced, tmp_path, monkeypatch):
    """Checkpoint A cold (traced, stored), then B (same config, other weights) warm, then B
    cold with the cache off: B's warm and cold files are identical, and differ from A's."""
    if arch == "llama":
        a = traced[0]
        _warm_cache(traced)
    else:
        a = _write_folder(tmp_path / "a", arch, seed=0)
        assert _export(a)["info"]["tracing"]["graph_cache"] == "stored"
    b = _write_folder(tmp_path / "b", arch, seed=1)
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


def test_fp16_direct_path_uses_the_cache(traced, tmp_path, monkeypatch):
    """`--stages fp16` from HF weights traces too: warm after the onnx stage stored the graph."""
    _warm_cache(traced)
    b = _export(_copy_folder(traced[0], tmp_path / "b"), stages=("fp16",))
    assert b["info"]["tracing"]["graph_cache"] == "hit"
    monkeypatch.setenv("EXPORTLINE_GRAPH_CACHE", "off")
    c = _export(_copy_folder(traced[0], tmp_path / "c"), stages=("fp16",))
    assert c["info"]["tracing"]["graph_cache"].startswith("off")
    fp16 = ("onnx/model_fp16.onnx", "onnx/model_fp16.onnx_data")
    assert _digests(tmp_path / "b", fp16) == _digests(tmp_path / "c", fp16)


def test_a_config_change_misses_and_traces(traced, tmp_path):
    _warm_cache(traced)
    b = _write_folder(tmp_path / "b", "llama", seed=0, rope_theta=500000.0)
    record = _export(b)
    assert record["info"]["tracing"]["graph_cache"] == "stored" and "trace" in record["info"]["phase_seconds"]
    assert _digests(b)["onnx/model.onnx"] != _digests(traced[0])["onnx/model.onnx"]  # other rotary constants


def _key(folder: Path, *, opset: int = 18) -> str:
    from exportline.exporters.onnx import graph_cache
    from exportline.exporters.sources.weights_reader import CheckpointWeights

    return graph_cache.cache_key(graph_cache.key_material(folder, CheckpointWeights(folder), opset=opset))


def test_the_key_covers_header_opset_versions_and_code_but_not_the_consumer_block(traced, tmp_path, monkeypatch):
    from exportline.exporters.onnx import graph_cache

    a = traced[0]
    key = _key(a)
    assert "transformers.js_config" in json.loads((a / "config.json").read_text())  # added by the export
    b = _copy_folder(a, tmp_path / "b")
    config = json.loads((b / "config.json").read_text())
    config.pop("transformers.js_config")
    (b / "config.json").write_text(json.dumps(config, indent=4))  # other layout, same content
    assert _key(b) == key
    bf16 = _write_folder(tmp_path / "bf16", "llama", seed=0, dtype="bfloat16")  # same config, other header
    (bf16 / "config.json").write_bytes((b / "config.json").read_bytes())
    assert _key(bf16) != key
    assert _key(a, opset=19) != key
    monkeypatch.setattr(graph_cache, "tool_version", lambda dist: "9.9" if dist == "onnxscript" else "1")
    other_tools = _key(a)
    monkeypatch.undo()
    assert other_tools != key
    monkeypatch.setattr(graph_cache, "_GRAPH_CODE", graph_cache._GRAPH_CODE[:-1])  # one source file less
    assert _key(a) != key


@pytest.mark.parametrize("damage", ["graph", "entry", "weights-map"])
def test_a_damaged_entry_is_traced_again_and_replaced(damage, traced, tmp_path):
    from exportline.exporters.onnx.graph_cache import cache_root

    cache = _warm_cache(traced)
    assert cache_root() == cache
    (folder,) = (cache / "graphs").iterdir()
    if damage == "graph":  # flipped bytes in the middle of graph.onnx
        data = bytearray((folder / "graph.onnx").read_bytes())
        data[len(data) // 2: len(data) // 2 + 8] = b"\xff" * 8
        (folder / "graph.onnx").write_bytes(bytes(data))
    elif damage == "entry":
        (folder / "entry.json").write_text("{not json")
    else:  # valid JSON and checksum, but a weight the graph lacks: fails when attached
        entry = json.loads((folder / "entry.json").read_text())
        entry["weights"]["no.such.initializer"] = {"key": "lm_head.weight", "perm": None}
        (folder / "entry.json").write_text(json.dumps(entry))
    b = _copy_folder(traced[0], tmp_path / "b")
    record = _export(b)
    status = record["info"]["tracing"]["graph_cache"]
    assert status.startswith("stored") and ("damaged" in status) == (damage == "weights-map"), status
    assert "trace" in record["info"]["phase_seconds"]
    assert _digests(b) == _digests(traced[0])
    assert _export(_copy_folder(traced[0], tmp_path / "c"))["info"]["tracing"]["graph_cache"] == "hit"  # replaced


def test_an_unwritable_cache_is_reported_not_fatal(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("EXPORTLINE_CACHE", str(blocker))
    record = _export(_write_folder(tmp_path / "a", "gpt2", seed=0))
    assert record["status"] == "done" and record["info"]["tracing"]["graph_cache"].startswith("not stored:")


_PROBE = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from quant_models import FolderSource, export_bundle
export_bundle(Path({root!r}), FolderSource("b", "b"), ["onnx"])
print(json.dumps({{"torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules,
                   "cache": json.loads(Path({root!r}, "manifest.json").read_text())["stages"]["onnx"]["info"]["tracing"]["graph_cache"]}}))
"""


def test_a_warm_onnx_stage_imports_neither_torch_nor_transformers(traced, tmp_path):
    _warm_cache(traced)
    b = _copy_folder(traced[0], tmp_path / "b")
    code = _PROBE.format(tests=str(Path(__file__).parent), root=str(b))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts == {"torch": False, "transformers": False, "cache": "hit"}
    assert _digests(b) == _digests(traced[0])
