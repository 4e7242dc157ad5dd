"""onnx stage: every supported architecture, exported through the pipeline, against the HF
model in float64 (DESIGN.md §6 fp32 bounds) for prefill and decode, batch 1 and 3 with left
padding; plus the one-line errors for unsupported models and damaged files."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from exportline.exporters.core.bundle import Bundle
from exportline.exporters.core.errors import ArtifactError, SourceError, UnsupportedArchitecture
from exportline.exporters.core.pipeline import run_pipeline
from exportline.exporters.core.presets import load_preset, load_thresholds
from exportline.exporters.core.shapes import KVLayout
from exportline.exporters.onnx import llama_graph
from exportline.exporters.onnx.export import ARCHITECTURES, DATA_FILE, MODEL_FILE, OPSET
from exportline.exporters.onnx.files_check import check_onnx_files
from exportline.exporters.onnx.replicate import TRACE_LAYERS
from exportline.exporters.sources import PresetSource
from exportline.exporters.stages import parse_stages
from exportline.verify.metrics import compare

# One tiny model per supported architecture (optimum's habit: a registered architecture
# without a test model fails test_every_architecture_has_a_test_model). "preset" = exported
# from a preset by the hf stage; the others are written with save_pretrained.
# llama (the 2-layer preset), mistral and qwen2 take the default path, the graph written by
# hand (onnx/llama_graph.py); gpt2 and phi3 are traced, 6 layers, so 4 are traced and 2
# copied (onnx_replicate.py): every path is checked against the reference.
LAYERS = 6
_SMALL = dict(vocab_size=96, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_DECODER = dict(_SMALL, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS, num_attention_heads=4)
TEST_MODELS: dict[str, dict] = {
    "llama": {"preset": "tiny"},  # 4 heads over 2 KV heads: grouped-query attention
    "gpt2": dict(_SMALL, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=256, max_position_embeddings=None),
    "mistral": dict(_DECODER, num_key_value_heads=2, sliding_window=256),  # a window covering every position
    "qwen2": dict(_DECODER, num_key_value_heads=1),
    "phi3": dict(_DECODER, num_key_value_heads=2),
}
LONG = 67  # ≥ 64, and not a power of two


@dataclass
class FolderSource:
    """A Source for an HF folder written by the test straight into the bundle root."""

    name: str

    def describe(self) -> dict:
        return {"kind": "test-folder", "name": self.name}

    def fingerprint(self) -> str:
        return self.name


def _config(model_type: str, **kw):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{k: v for k, v in kw.items() if v is not None})


def _write_hf_folder(root: Path, model_type: str, seed: int = 0, **overrides) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(model_type, **{**TEST_MODELS[model_type], **overrides}))
    # Non-trivial norms and biases, so a weight wired to the wrong initializer shows.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(root)


def _export(root: Path, model_type: str):
    spec = TEST_MODELS[model_type]
    if "preset" in spec:
        result = run_pipeline(Bundle(root), PresetSource(load_preset(spec["preset"])), stages=parse_stages("hf,onnx"))
    else:
        _write_hf_folder(root, model_type)
        result = run_pipeline(Bundle(root), FolderSource(f"test-{model_type}"), stages=parse_stages("onnx"))
    return result.ran[-1]


@pytest.fixture(scope="module", params=sorted(TEST_MODELS))
def exported(request, tmp_path_factory):
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp(f"onnx-{request.param}")
    with pytest.MonkeyPatch.context() as mp:  # a cold export: no other module's graph served
        mp.setenv("EXPORTLINE_CACHE", str(tmp_path_factory.mktemp("graph-cache")))
        record = _export(root, request.param)
    ref = AutoModelForCausalLM.from_pretrained(root, dtype=torch.float64).eval()
    session = ort.InferenceSession(str(root / "onnx" / MODEL_FILE), providers=["CPUExecutionProvider"])
    return root, record, ref, session


def test_every_architecture_has_a_test_model():
    assert set(ARCHITECTURES) == set(TEST_MODELS)


# -- numerics ----------------------------------------------------------------------------------
def _positions(mask: np.ndarray, length: int) -> np.ndarray:
    """As HF generate computes them: cumsum(mask) - 1, clipped at 0, for the last `length`."""
    return np.clip(np.cumsum(mask, -1) - 1, 0, None)[:, -length:].astype(np.int64)


def _reference(ref, ids, mask, past):
    import torch
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=ref.config)
    for i in range(0, len(past), 2):
        cache.update(torch.from_numpy(past[i]).double(), torch.from_numpy(past[i + 1]).double(), i // 2)
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  position_ids=torch.from_numpy(_positions(mask, ids.shape[1])), cache=cache, use_cache=True)
    refs = {"logits": out.logits.numpy()}
    for i, layer in enumerate(out.cache.layers):
        refs[f"present.{i}.key"], refs[f"present.{i}.value"] = layer.keys.numpy(), layer.values.numpy()
    return refs


def _check_case(session, ref, *, ids, mask, past):
    """Run ONNX Runtime and the float64 reference on one input; every output within bounds."""
    layout = KVLayout.from_config(ref.config)
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": _positions(mask, ids.shape[1])}
    feed.update(zip(layout.past_names(), past))
    outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
    refs = _reference(ref, ids, mask, past)
    bounds = load_thresholds()["fp32"]
    assert set(outs) == set(refs) == {s.name for s in layout.outputs()}
    for name, expected in refs.items():
        if name == "logits":  # padded query positions are read by no one
            c = compare(outs[name], expected, mask=mask[:, -ids.shape[1]:], top1=True)
        else:  # [batch, heads, total, dim] → [batch, total, ...] to mask padded key slots
            c = compare(np.moveaxis(outs[name], 2, 1), np.moveaxis(expected, 2, 1), mask=mask)
        assert outs[name].shape == expected.shape, name
        assert np.isfinite(outs[name]).all(), f"{name}: non-finite values"
        assert c.rel_l2 <= bounds["rel_l2"] and c.max_abs_over_max_ref <= bounds["max_abs_over_max_ref"], (name, c)
    return outs


def _inputs(layout, vocab, *, batch, seq, past, padded, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (batch, seq)).astype(np.int64)
    mask = np.ones((batch, past + seq), np.int64)
    if padded:  # left padding of different lengths; row 0 is unpadded
        for row in range(1, batch):
            mask[row, : min(past + seq - 1, 5 * row + 2)] = 0
    kv = [(rng.standard_normal((batch, layout.num_kv_heads, past, layout.head_dim)) * 0.5).astype(np.float32)
          for _ in layout.past_names()]
    return ids, mask, kv


CASES = {  # name → batch, sequence, past, left padding
    "prefill b1 s1": (1, 1, 0, False),
    f"prefill b1 s{LONG}": (1, LONG, 0, False),
    f"prefill b3 s{LONG} left-padded": (3, LONG, 0, True),
    "decode b1 past0": (1, 1, 0, False),
    "decode b3 past1": (3, 1, 1, False),
    f"decode b3 past{LONG} left-padded": (3, 1, LONG, True),
    "prefill b3 s4 past3 left-padded": (3, 4, 3, True),
}


@pytest.mark.covers("stage:onnx", "backend:onnx")
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(exported, case):
    _, _, ref, session = exported
    batch, seq, past, padded = CASES[case]
    layout = KVLayout.from_config(ref.config)
    ids, mask, kv = _inputs(layout, ref.config.vocab_size, batch=batch, seq=seq, past=past, padded=padded, seed=len(case))
    _check_case(session, ref, ids=ids, mask=mask, past=kv)


def test_left_padded_prefill_then_decode_from_its_own_cache(exported):
    """Generation as it runs: the presents of a padded prefill are the next step's past."""
    _, _, ref, session = exported
    layout = KVLayout.from_config(ref.config)
    ids, mask, kv = _inputs(layout, ref.config.vocab_size, batch=3, seq=LONG, past=0, padded=True, seed=7)
    outs = _check_case(session, ref, ids=ids, mask=mask, past=kv)
    for _ in range(2):
        past = [outs[n] for n in layout.present_names()]
        mask = np.concatenate([mask, np.ones((3, 1), np.int64)], axis=1)
        next_ids = outs["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
        outs = _check_case(session, ref, ids=next_ids, mask=mask, past=past)


def test_greedy_generation_with_kv_cache_is_token_identical_to_hf(exported):
    """32 greedy tokens through the ONNX graph's KV cache (prefill once, then one token a step)
    equal transformers' own generate() on the fp32 HF model, for a batch of two left-padded prompts."""
    import torch

    from exportline.verify.generate import Sampling, generate
    from exportline.verify.runtime.onnx_runner import OnnxRuntimeRunner

    root, _, ref, _ = exported
    layout = KVLayout.from_config(ref.config)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, ref.config.vocab_size, n).tolist() for n in (9, 5)]
    with OnnxRuntimeRunner(root / "onnx" / MODEL_FILE) as runner:
        got = generate(runner, prompts, layout=layout, max_new_tokens=32, sampling=Sampling(greedy=True)).tokens

    hf = ref.float()
    try:
        for prompt, tokens in zip(prompts, got):
            with torch.no_grad():
                out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                  eos_token_id=None, pad_token_id=0, min_new_tokens=32)
            assert tokens == out[0, len(prompt):].tolist()
    finally:
        ref.double()


# -- the artifact --------------------------------------------------------------------------------
def test_graph_declares_shapes_py_io_and_one_data_file(exported):
    import onnx

    root, record, ref, _ = exported
    layout = KVLayout.from_config(ref.config)
    files = sorted(p.name for p in (root / "onnx").iterdir())
    assert files == [MODEL_FILE, DATA_FILE]
    model = onnx.load(str(root / "onnx" / MODEL_FILE), load_external_data=False)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
    for values, specs in ((model.graph.input, layout.inputs()), (model.graph.output, layout.outputs())):
        got = [(v.name, tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)) for v in values]
        assert got == [(s.name, s.dims) for s in specs]
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {DATA_FILE}
    info = record["info"]
    assert info["opset"] == OPSET and info["graph_nodes"] == len(model.graph.node)
    assert info["files"][DATA_FILE] == (root / "onnx" / DATA_FILE).stat().st_size
    assert record["status"] == "done"
    declined = llama_graph.plan_for(json.loads((root / "config.json").read_text()))
    if not isinstance(declined, str):  # Llama family: written by hand, nothing traced or cached
        assert ref.config.model_type in llama_graph.FAMILIES and info["exporter"] == llama_graph.BUILDER
        assert model.producer_name == "exportline"
        assert info["tracing"] == {"builder": llama_graph.BUILDER, "layers_traced": 0, "layers_written": layout.num_layers,
                                   "graph_cache": "not used (nothing traced)"}
    else:
        assert "torch" in info["exporter"] and info["tracing"]["not_built_by_hand"] == declined
        chain = {p.key: p.value for p in model.metadata_props}["exportline.made_by"].split(" -> ")
        # the producer is the tool that emitted the operators (onnx/metadata.py); the chain says the rest
        assert model.producer_name == "pytorch" and chain[0].startswith("torch ") and chain[1].startswith("exportline ")
        copied = 0 if layout.num_layers <= TRACE_LAYERS else layout.num_layers - TRACE_LAYERS
        tracing = {k: v for k, v in info["tracing"].items() if not k.startswith("graph_cache") and k != "not_built_by_hand"}
        assert tracing == {"layers_traced": layout.num_layers - copied, "layers_copied": copied}
        assert info["tracing"]["graph_cache"] == "stored"  # a cold export into its own cache
    assert check_onnx_files(root / "onnx" / MODEL_FILE).data_files == (root / "onnx" / DATA_FILE,)


# -- copied layers -------------------------------------------------------------------------------
def _ops(root: Path) -> list[tuple]:
    import onnx

    graph = onnx.load(str(root / "onnx" / MODEL_FILE), load_external_data=False).graph
    return [(n.op_type, tuple(sorted(a.name for a in n.attribute))) for n in graph.node]


def _initializers(root: Path) -> dict[str, bytes]:
    import onnx
    from onnx.numpy_helper import to_array

    graph = onnx.load(str(root / "onnx" / MODEL_FILE)).graph
    return {t.name: to_array(t).tobytes() for t in graph.initializer}


def test_copied_layers_make_the_graph_a_full_trace_makes(tmp_path, monkeypatch):
    from exportline.exporters.onnx import replicate as onnx_replicate

    monkeypatch.setenv("EXPORTLINE_ONNX_BUILDER", "trace")  # copying is the traced path's (qwen2 is built by default)
    copied, full = tmp_path / "copied", tmp_path / "full"
    for root in (copied, full):
        _write_hf_folder(root, "qwen2")
    run_pipeline(Bundle(copied), FolderSource("copied"), stages=parse_stages("onnx"))
    monkeypatch.setattr(onnx_replicate, "TRACE_LAYERS", 100)  # every layer traced
    monkeypatch.setenv("EXPORTLINE_GRAPH_CACHE", "off")  # the patch is not in the cache key: trace again
    record = run_pipeline(Bundle(full), FolderSource("full"), stages=parse_stages("onnx")).ran[-1]
    tracing = record["info"]["tracing"]
    assert {k: tracing[k] for k in ("layers_traced", "layers_copied")} == {"layers_traced": LAYERS, "layers_copied": 0}
    assert "copy_refused" not in tracing and tracing["graph_cache"].startswith("off")
    assert _ops(copied) == _ops(full)
    a, b = _initializers(copied), _initializers(full)
    assert {k: v for k, v in a.items() if k.startswith("model.")} == {k: v for k, v in b.items() if k.startswith("model.")}
    assert sorted(a.values()) == sorted(b.values())  # the other constants, whatever their names


def test_layer_dependent_graph_is_traced_in_full_and_exact(tmp_path):
    """GPT-2's scale_attn_by_inverse_layer_idx puts 1/(i+1) in each layer: no copying."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM

    _write_hf_folder(tmp_path, "gpt2", scale_attn_by_inverse_layer_idx=True)
    record = run_pipeline(Bundle(tmp_path), FolderSource("gpt2-scaled"), stages=parse_stages("onnx")).ran[-1]
    assert record["info"]["tracing"]["layers_traced"] == LAYERS
    assert "differ" in record["info"]["tracing"]["copy_refused"]
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    session = ort.InferenceSession(str(tmp_path / "onnx" / MODEL_FILE), providers=["CPUExecutionProvider"])
    layout = KVLayout.from_config(ref.config)
    for batch, seq, past, padded in (CASES[f"prefill b3 s{LONG} left-padded"], CASES[f"decode b3 past{LONG} left-padded"]):
        ids, mask, kv = _inputs(layout, ref.config.vocab_size, batch=batch, seq=seq, past=past, padded=padded, seed=3)
        _check_case(session, ref, ids=ids, mask=mask, past=kv)


# -- errors --------------------------------------------------------------------------------------
def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and message
    return message


def test_unsupported_architecture_is_one_line_listing_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    with pytest.raises(UnsupportedArchitecture) as exc:
        run_pipeline(Bundle(tmp_path), FolderSource("bert"), stages=parse_stages("onnx"))
    message = _one_line(exc)
    assert "'bert'" in message and all(name in message for name in ARCHITECTURES)
    assert not (tmp_path / "onnx").exists()


def test_cropping_sliding_window_is_refused(tmp_path):
    _write_hf_folder(tmp_path, "mistral", sliding_window=16)
    with pytest.raises(UnsupportedArchitecture) as exc:
        run_pipeline(Bundle(tmp_path), FolderSource("mistral-window"), stages=parse_stages("onnx"))
    assert "sliding_window=16" in _one_line(exc)


@pytest.mark.parametrize("damage", ["missing", "reshaped"])
def test_weights_not_matching_config_are_one_line(tmp_path, damage):
    from safetensors.numpy import load_file, save_file

    _write_hf_folder(tmp_path, "qwen2")
    state = load_file(tmp_path / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.weight"
    if damage == "missing":
        del state[key]
    else:
        state[key] = state[key][:-1]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(SourceError) as exc:
        run_pipeline(Bundle(tmp_path), FolderSource("qwen2-broken"), stages=parse_stages("onnx"))
    assert key in _one_line(exc) and ("shape" in str(exc.value)) == (damage == "reshaped")
    assert not (tmp_path / "onnx").exists()


@pytest.fixture
def onnx_copy(exported, tmp_path):
    import shutil

    root = exported[0]
    shutil.copytree(root / "onnx", tmp_path / "onnx")
    return tmp_path / "onnx" / MODEL_FILE


def test_missing_external_data_is_one_line(onnx_copy):
    (onnx_copy.parent / DATA_FILE).unlink()
    with pytest.raises(ArtifactError) as exc:
        check_onnx_files(onnx_copy)
    assert DATA_FILE in _one_line(exc) and "missing" in str(exc.value)


def test_truncated_external_data_is_one_line(onnx_copy):
    data = onnx_copy.parent / DATA_FILE
    os.truncate(data, data.stat().st_size // 2)
    with pytest.raises(ArtifactError) as exc:
        check_onnx_files(onnx_copy)
    assert "truncated" in _one_line(exc)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.999])
def test_truncated_model_is_one_line(onnx_copy, keep):
    blob = onnx_copy.read_bytes()
    onnx_copy.write_bytes(blob[: int(len(blob) * keep)])
    with pytest.raises(ArtifactError) as exc:
        check_onnx_files(onnx_copy)
    assert "truncated" in _one_line(exc) and "--stages onnx" in str(exc.value)
