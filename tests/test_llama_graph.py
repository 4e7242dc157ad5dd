"""The Llama-family graph written op by op (exporters/onnx/llama_graph.py): every config it
builds computes transformers' numbers (logits and every present, prefill and decode, left
padding, on the verifier's positions) and the traced graph's; configs it declines go to the
traced path or its refusal, and the record says why; the stage imports no torch; and the
graph has the structure the builder exists for (no per-head K/V copies, RMSNorms that ONNX
Runtime fuses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exportline.exporters.core.errors import UnsupportedArchitecture
from exportline.exporters.core.presets import load_thresholds
from exportline.exporters.core.shapes import KVLayout
from exportline.exporters.onnx import llama_graph
from exportline.exporters.onnx.export import BUILDER_SWITCH, EXPORTER, MODEL_FILE, export_onnx
from exportline.verify.cases import decode, output_mask, positions_first, prefill
from exportline.verify.metrics import compare

LAYERS = 2
_BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
BUILT = {  # name → (model_type, config overrides); each is a case the graph writes differently
    "llama-gqa": ("llama", {}),
    "llama-mha": ("llama", dict(num_key_value_heads=4)),
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama-biases": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "qwen2": ("qwen2", {}),  # q/k/v biases, no o_proj bias
    # keys transformers' Qwen2 and Mistral ignore (no such biases), kept in config.json
    "qwen2-bias-keys": ("qwen2", dict(attention_bias=True, mlp_bias=True)),
    "mistral-bias-keys": ("mistral", dict(attention_bias=True, mlp_bias=True)),
    "mistral-window-null": ("mistral", dict(sliding_window=None)),
    "mistral-window-covers": ("mistral", dict(sliding_window=64)),  # == max_position_embeddings: crops nothing
    "llama-head-dim": ("llama", dict(head_dim=16)),  # ≠ hidden / heads = 8
    "llama-theta-500k": ("llama", dict(rope_theta=500000.0)),
}
TRACED_TOO = ("llama-gqa", "qwen2")  # also exported by tracing, to compare built with traced
DECLINED = {  # name → (model_type, overrides, what not_built_by_hand names)
    "rope-llama3": ("llama", dict(rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                                       original_max_position_embeddings=16)), "llama3"),
    "gelu-tanh": ("llama", dict(hidden_act="gelu_pytorch_tanh"), "gelu_pytorch_tanh"),
}


def _write_folder(root: Path, model_type: str, seed: int = 0, **overrides) -> Path:
    """An HF folder written by transformers' save_pretrained; norm weights and biases moved off
    their init values (1 and 0), which would hide a norm or bias wired to the wrong tensor."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**_BASE, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(root)
    return root


def _cases(vocab: int):
    """Prefill batch 1 and 2 (the latter left-padded), then one decode step after each: past 1
    and 7, batch 1 and 2. Built with the verifier's own case code (verify/cases.py)."""
    rng = np.random.default_rng(0)
    prefills = [prefill("b1 s1", rng, vocab, batch=1, length=1), prefill("b1 s7", rng, vocab, batch=1, length=7),
                prefill("b2 s1", rng, vocab, batch=2, length=1),
                prefill("b2 s7 left-padded", rng, vocab, batch=2, length=7, pads=[0, 3])]
    return prefills + [decode(f"decode after {p.name}", rng, vocab, prefix=p) for p in prefills]


class _Torch:
    """transformers' fp32 model (eager attention, the formula the builder writes) on a feed."""

    def __init__(self, folder: Path, layout: KVLayout):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch, self.layout = torch, layout
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from transformers import DynamicCache

        t = {k: self.torch.from_numpy(v) for k, v in feed.items()}
        past = [(t[f"past_key_values.{i}.key"], t[f"past_key_values.{i}.value"]) for i in range(self.layout.num_layers)]
        with self.torch.no_grad():
            out = self.model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], position_ids=t["position_ids"],
                             cache=DynamicCache(ddp_cache_data=past, config=self.model.config), use_cache=True)
        result = {"logits": out.logits.numpy()}
        for i, layer in enumerate(out.cache.layers):
            result[f"present.{i}.key"], result[f"present.{i}.value"] = layer.keys.numpy(), layer.values.numpy()
        return result


def _session(path: Path, **options):
    import onnxruntime as ort

    so = ort.SessionOptions()
    for key, value in options.items():
        setattr(so, key, value)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(session, feed) -> dict[str, np.ndarray]:
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


def _layout(folder: Path) -> KVLayout:
    return llama_graph.layout_of(json.loads((folder / "config.json").read_text()))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name → (folder, export record, ORT session on the built graph, transformers' model)."""
    models = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(BUILDER_SWITCH, raising=False)
        for name, (model_type, overrides) in BUILT.items():
            folder = _write_folder(tmp_path_factory.mktemp(name), model_type, **overrides)
            record = export_onnx(folder, folder / "onnx")
            models[name] = (folder, record, _session(folder / "onnx" / MODEL_FILE), _Torch(folder, _layout(folder)))
    return models


def _assert_close(outs, refs, case, *, what: str) -> None:
    """The fp32 bounds (configs/, DESIGN.md §6) on the positions the verifier compares: real
    query tokens for logits, real key slots for present.* (padded ones are read by no one)."""
    bounds = load_thresholds()["fp32"]
    assert set(outs) == set(refs)
    for name, ref in refs.items():
        assert outs[name].shape == ref.shape, (what, case.name, name)
        mask = output_mask(case, name)
        c = compare(positions_first(name, outs[name]), positions_first(name, ref), mask=mask, top1=name == "logits")
        assert np.isfinite(outs[name]).all(), (what, case.name, name)
        assert c.rel_l2 <= bounds["rel_l2"] and c.max_abs_over_max_ref <= bounds["max_abs_over_max_ref"], \
            (what, case.name, name, c)


def _feeds(layout: KVLayout, reference):
    """(case, feed) for every case; a decode's past is the reference's own present of its prefix."""
    presents = {}
    for case in _cases(layout.vocab_size):
        past = None
        if case.prefix is not None:
            prior = presents[case.prefix.name]
            past = {p: prior[q] for p, q in zip(layout.past_names(), layout.present_names())}
        feed = case.feed(layout, past)
        presents[case.name] = reference(feed)
        yield case, feed, presents[case.name]


@pytest.mark.covers("stage:onnx", "backend:onnx")
@pytest.mark.parametrize("name", list(BUILT))
def test_built_graph_computes_transformers_numbers(built, name):
    folder, record, session, torch_model = built[name]
    assert record.exporter == llama_graph.BUILDER and record.tracing["layers_written"] == LAYERS
    assert "not_built_by_hand" not in record.tracing
    for case, feed, refs in _feeds(_layout(folder), torch_model.run):
        _assert_close(_run(session, feed), refs, case, what=name)


def test_the_configs_are_what_they_claim(built):
    """The variants differ where their names say (a transformers default change would make two
    of them the same model and the test weaker without failing)."""
    config = {name: json.loads((built[name][0] / "config.json").read_text()) for name in BUILT}
    theta = config["llama-theta-500k"].get("rope_parameters", {}).get("rope_theta", config["llama-theta-500k"].get("rope_theta"))
    assert theta == 500000.0
    assert config["llama-head-dim"]["head_dim"] * 4 != config["llama-head-dim"]["hidden_size"]
    assert config["llama-tied"]["tie_word_embeddings"] is True
    assert config["mistral-window-covers"]["sliding_window"] == config["mistral-window-covers"]["max_position_embeddings"]
    assert config["mistral-window-null"]["sliding_window"] is None
    from safetensors import safe_open

    with safe_open(built["llama-biases"][0] / "model.safetensors", "np") as f:
        keys = set(f.keys())
    assert {"model.layers.0.self_attn.o_proj.bias", "model.layers.0.mlp.down_proj.bias"} <= keys
    with safe_open(built["qwen2"][0] / "model.safetensors", "np") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.k_proj.bias" in keys and "model.layers.0.self_attn.o_proj.bias" not in keys
    for name in ("qwen2-bias-keys", "mistral-bias-keys"):
        assert config[name]["attention_bias"] is True and config[name]["mlp_bias"] is True


@pytest.mark.parametrize("name", TRACED_TOO)
def test_built_and_traced_graphs_agree(built, name, tmp_path, monkeypatch):
    folder, _, session, torch_model = built[name]
    monkeypatch.setenv(BUILDER_SWITCH, "trace")
    record = export_onnx(folder, tmp_path / "traced")
    assert record.exporter == EXPORTER and record.tracing["not_built_by_hand"] == f"{BUILDER_SWITCH}=trace"
    traced = _session(tmp_path / "traced" / MODEL_FILE)
    # what the builder avoids (test_no_key_value_copies_…): HF's repeat_kv traces as Expand
    assert _op_counts(tmp_path / "traced" / MODEL_FILE).get("Expand", 0) > 0
    for case, feed, _ in _feeds(_layout(folder), torch_model.run):
        _assert_close(_run(session, feed), _run(traced, feed), case, what=f"{name} built vs traced")


# -- configs the builder declines ------------------------------------------------------------------
@pytest.mark.parametrize("name", list(DECLINED))
def test_declined_configs_are_traced_and_the_record_says_why(name, tmp_path, monkeypatch):
    monkeypatch.delenv(BUILDER_SWITCH, raising=False)
    model_type, overrides, reason = DECLINED[name]
    folder = _write_folder(tmp_path / "hf", model_type, **overrides)
    record = export_onnx(folder, tmp_path / "onnx")
    assert record.exporter == EXPORTER and record.tracing["layers_traced"] == LAYERS
    assert reason in record.tracing["not_built_by_hand"]
    session, reference = _session(tmp_path / "onnx" / MODEL_FILE), _Torch(folder, _layout(folder))
    case, feed, refs = next(c for c in _feeds(_layout(folder), reference.run) if c[0].name == "b2 s7 left-padded")
    _assert_close(_run(session, feed), refs, case, what=name)


def test_a_cropping_window_gets_the_traced_paths_refusal(tmp_path, monkeypatch):
    folder = _write_folder(tmp_path / "hf", "mistral", sliding_window=16)  # < max_position_embeddings 64
    why = llama_graph.plan_for(json.loads((folder / "config.json").read_text()))
    assert isinstance(why, str) and "sliding_window 16" in why
    messages = []
    for switch in ("auto", "trace"):
        monkeypatch.setenv(BUILDER_SWITCH, switch)
        with pytest.raises(UnsupportedArchitecture, match="sliding_window=16 < max_position_embeddings=64") as info:
            export_onnx(folder, tmp_path / switch)
        messages.append(str(info.value))
        assert not (tmp_path / switch / MODEL_FILE).exists()
    assert messages[0] == messages[1]


# -- no torch ---------------------------------------------------------------------------------------
_PROBE = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from quant_models import FolderSource, export_bundle
export_bundle(Path({root!r}), FolderSource("b", "b"), ["onnx"])
info = json.loads(Path({root!r}, "manifest.json").read_text())["stages"]["onnx"]["info"]
print(json.dumps({{"torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules,
                   "written": info["tracing"].get("layers_written")}}))
"""


def test_the_onnx_stage_imports_neither_torch_nor_transformers(built, tmp_path, monkeypatch):
    monkeypatch.delenv(BUILDER_SWITCH, raising=False)
    root = tmp_path / "b"
    root.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        if (built["llama-gqa"][0] / name).is_file():
            (root / name).write_bytes((built["llama-gqa"][0] / name).read_bytes())
    code = _PROBE.format(tests=str(Path(__file__).parent), root=str(root))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"torch": False, "transformers": False, "written": LAYERS}


# -- structure ---------------------------------------------------------------------------------------
def _op_counts(path: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2"])
def test_no_key_value_copies_and_every_rms_norm_fuses(built, name, tmp_path):
    import onnxruntime as ort

    folder = built[name][0]
    assert _op_counts(folder / "onnx" / MODEL_FILE).get("Expand", 0) == 0  # K/V read once per KV head
    optimized = tmp_path / "optimized.onnx"
    _session(folder / "onnx" / MODEL_FILE, graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
             optimized_model_filepath=str(optimized))
    counts = _op_counts(optimized)
    fused = counts.get("SimplifiedLayerNormalization", 0) + counts.get("SkipSimplifiedLayerNormalization", 0)
    assert fused == 2 * LAYERS + 1, counts


@pytest.mark.parametrize("extra, reason", [
    ({"partial_rotary_factor": "half"}, "cannot read"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_builder_declines_with_a_reason_instead_of_raising(tmp_path, extra, reason):
    """A config the builder cannot read or does not write is a reason (the stage then traces,
    and transformers' own config check speaks), never an exception from the builder."""
    from exportline.exporters.onnx.llama_graph import build

    config = {"model_type": "llama", "num_attention_heads": 4, "hidden_size": 64, "num_hidden_layers": 2,
              "intermediate_size": 128, "vocab_size": 256, "rms_norm_eps": 1e-5, **extra}
    (tmp_path / "config.json").write_text(json.dumps(config))
    got = build(tmp_path, None, opset=18)
    assert isinstance(got, str) and reason in got
