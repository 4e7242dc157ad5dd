"""Your own nn.Module (issue 13): three modules written here in tests/custom_modules (never
from transformers) go through every stage; each is checked against the test's own copy of
the module in float64 on shapes the export did not trace, and loaded back with
transformers' remote code. Refusals: wrong parameter count, keys that do not fit, a
forward that cannot be exported, a relative import that cannot be carried."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sources_fixtures import cli, error_line

MODULES = Path(__file__).resolve().parent / "custom_modules"


def user_module(stem: str):
    """Import tests/custom_modules/<stem>.py as the test's own copy (relative imports work)."""
    if "custom_modules_pkg" not in sys.modules:
        spec = importlib.util.spec_from_loader("custom_modules_pkg", loader=None, is_package=True)
        pkg = importlib.util.module_from_spec(spec)
        pkg.__path__ = [str(MODULES)]
        sys.modules["custom_modules_pkg"] = pkg
    return importlib.import_module(f"custom_modules_pkg.{stem}")


GPT_ARGS = {"vocab_size": 96, "block_size": 32, "dim": 32, "heads": 4, "layers": 2}


def _gpt(tmp: Path):
    torch.manual_seed(0)
    model = user_module("tiny_gpt").TinyGPT(**GPT_ARGS)
    # nanoGPT's layout: the tensors under `model`, the constructor kwargs under `model_args`
    torch.save({"model": model.state_dict(), "model_args": GPT_ARGS, "iter_num": 10}, tmp / "gpt.pt")
    return model, tmp / "gpt.pt", ["--model-class", f"{MODULES}/tiny_gpt.py:TinyGPT"]


def _moe(tmp: Path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = user_module("tiny_moe").TinyMoELM()
    save_file(model.state_dict(), tmp / "moe.safetensors")
    return model, tmp / "moe.safetensors", ["--model-class", f"{MODULES}/tiny_moe.py:TinyMoELM"]


def _motion(tmp: Path):
    torch.manual_seed(2)
    model = user_module("motion").StickFigureTransformer()
    torch.save(model.state_dict(), tmp / "motion.pth")
    return model, tmp / "motion.pth", ["--model-class", f"{MODULES}/motion.py:StickFigureTransformer",
                                       "--task", "forward", "--inputs", str(MODULES / "motion_inputs.yaml")]


MAKERS = {"gpt": _gpt, "moe": _moe, "motion": _motion}


@pytest.fixture(scope="module", params=list(MAKERS))
def exported(request, tmp_path_factory):
    """Every stage of one module, verified (the CLI default), once per module."""
    tmp = tmp_path_factory.mktemp(request.param)
    model, ckpt, flags = MAKERS[request.param](tmp)
    code, err = cli("export", ckpt, *flags, "--out", tmp / "bundle")
    return request.param, model.eval(), tmp / "bundle", code, err


def _ort(path: Path, feed: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})


def _reference(model, feed: dict) -> np.ndarray:
    """The test's own module in float64 (its first output), on a copy."""
    import copy

    double = copy.deepcopy(model).double()
    args = [torch.from_numpy(v).double() if v.dtype.kind == "f" else torch.from_numpy(v) for v in feed.values()]
    with torch.no_grad():
        out = double(*args)
    return (out[0] if isinstance(out, tuple) else out).numpy()


def _unseen_feed(name: str, rng) -> dict:
    """Shapes the export did not trace (it traces opt sizes: batch 2, sequence/frames 8 or 16)."""
    if name == "motion":
        return {"poses": rng.standard_normal((3, 37, 20)).astype(np.float32),
                "text": rng.standard_normal((3, 1024)).astype(np.float32),
                "actions": rng.integers(0, 12, (3, 37)).astype(np.int64)}
    vocab, longest = (96, 32) if name == "gpt" else (80, 48)
    return {"input_ids": rng.integers(0, vocab, (3, longest - 1)).astype(np.int64)}


def _rel_l2(got, want) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.slow
@pytest.mark.covers("source:custom")
def test_every_stage_exports_and_verifies(exported):
    name, _, bundle, code, err = exported
    assert code == 0, err
    manifest = json.loads((bundle / "manifest.json").read_text())
    stages = manifest["stages"]
    assert [s for s in ("hf", "onnx", "fp16", "int8") if stages[s]["status"] == "done"] == ["hf", "onnx", "fp16", "int8"]
    assert manifest["source"]["kind"] == "custom" and "--model-class" in manifest["source"]["user_code"]
    report = {s["stage"]: s for s in json.loads((bundle / "reports" / "verify.json").read_text())["stages"]}
    assert all(report[s]["status"] == "passed" for s in ("hf", "onnx", "fp16", "int8")), err
    code, err = cli("verify", bundle, "--stage", "onnx")  # the bundle alone suffices
    assert code == 0, err
    traced = report["onnx"]["extra"]["traced"]
    for dim, size in traced.items():  # every dynamic dim was checked at sizes other than the traced one
        assert any(f"{dim}={size}" not in case for case in report["onnx"]["extra"]["cases"])
    assert all(r["metrics"]["rel_l2"] <= 1e-5 for r in report["onnx"]["rows"])
    import onnx

    graph = onnx.load(bundle / "onnx" / "model.onnx", load_external_data=False).graph
    config = json.loads((bundle / "config.json").read_text())
    # transformers.js / onnxruntime-genai run KV-cache LM graphs: a custom module gets neither config
    assert "transformers.js_config" not in config and not (bundle / "genai_config.json").exists()
    for value, declared in zip(graph.input, config["exportline_io"]["inputs"]):  # axes named as declared
        assert value.name == declared["name"]
        assert [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim] == declared["shape"]


@pytest.mark.slow
@pytest.mark.covers("source:custom")
def test_onnx_and_fp16_match_the_module_in_float64_on_unseen_shapes(exported):
    name, model, bundle, code, err = exported
    assert code == 0, err
    feed = _unseen_feed(name, np.random.default_rng(5))
    want = _reference(model, feed)
    fp32 = _ort(bundle / "onnx" / "model.onnx", feed)[0]
    fp16 = _ort(bundle / "onnx" / "model_fp16.onnx", feed)[0]
    assert fp32.shape == want.shape and fp16.dtype == np.float32  # declared float I/O stays float32
    assert _rel_l2(fp32, want) <= 1e-5
    assert np.abs(fp32 - want).max() / np.abs(want).max() <= 1e-5
    assert _rel_l2(fp16, want) <= 1e-3
    if name != "motion":
        assert (fp16.argmax(-1) == want.argmax(-1)).mean() >= 0.99


@pytest.mark.slow
@pytest.mark.covers("source:custom")
def test_transformers_loads_the_folder_with_remote_code(exported):
    from transformers import AutoModel, AutoModelForCausalLM

    name, model, bundle, code, err = exported
    assert code == 0, err
    feed = _unseen_feed(name, np.random.default_rng(6))
    args = [torch.from_numpy(v) for v in feed.values()]
    with torch.no_grad():
        want = model(*args)
    want = want[0] if isinstance(want, tuple) else want
    if name == "motion":
        loaded = AutoModel.from_pretrained(bundle, trust_remote_code=True)
        with torch.no_grad():
            got = loaded(**{k: torch.from_numpy(v) for k, v in feed.items()})
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        return
    loaded = AutoModelForCausalLM.from_pretrained(bundle, trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=args[0]).logits, want, rtol=0, atol=0)
        prompt = args[0][:1, :5]
        tokens = loaded.generate(prompt, max_new_tokens=6, do_sample=False)
    seq = prompt
    for _ in range(6):  # greedy by hand with the test's own module
        with torch.no_grad():
            logits = model(seq)
        logits = logits[0] if isinstance(logits, tuple) else logits
        seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=1)
    assert tokens.tolist() == seq.tolist()
    card = (bundle / "README.md").read_text()
    assert "trust_remote_code=True" in card and "no KV cache" in card


@pytest.mark.covers("source:custom")
def test_a_wrong_parameter_count_is_refused_before_anything_is_written(tmp_path):
    model, ckpt, flags = _gpt(tmp_path)
    actual = sum(p.numel() for p in model.parameters())
    code, err = cli("export", ckpt, *flags, "--expect-params", "15.8M[±5%]", "--out", tmp_path / "b")
    line = error_line(err)
    assert code != 0 and f"{actual:,} parameters" in line and "15.8M" in line
    assert not (tmp_path / "b").exists()
    table = tmp_path / "variants.yaml"
    table.write_text(f"variants:\n  small:\n    model_args: {json.dumps(GPT_ARGS)}\n    params: {actual * 1.2:.0f}±5%\n"
                     f"  right:\n    model_args: {json.dumps(GPT_ARGS)}\n    params: {actual / 1e3:.1f}k±1%\n")
    code, err = cli("export", ckpt, *flags, "--variants", table, "--variant", "small", "--out", tmp_path / "b")
    assert code != 0 and "variant small" in error_line(err) and not (tmp_path / "b").exists()
    code, err = cli("export", ckpt, *flags, "--variants", table, "--variant", "right", "--stages", "hf",
                    "--no-verify", "--out", tmp_path / "b")
    assert code == 0, err
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["source"]["variant"] == "right"
    # torch.hub: one entry per variant, loading this bundle's weights (nothing downloaded)
    hub = torch.hub.load(str(tmp_path / "b"), "tinygpt_right", source="local").eval()
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hub(input_ids=ids).logits, model(ids)[0], rtol=0, atol=0)


@pytest.mark.covers("source:custom")
def test_keys_that_do_not_fit_are_named_in_one_line(tmp_path):
    model, ckpt, flags = _gpt(tmp_path)
    state = model.state_dict()
    state["head.weight"] = state["head.weight"][:, :16]
    state["extra.bias"] = torch.zeros(3)
    del state["ln_f.bias"]
    torch.save({"model": state, "model_args": GPT_ARGS}, tmp_path / "bad.pt")
    code, err = cli("export", tmp_path / "bad.pt", *flags, "--out", tmp_path / "b")
    line = error_line(err)
    assert "missing: ln_f.bias" in line and "unexpected: extra.bias" in line and "head.weight [96, 16]" in line
    assert not (tmp_path / "b").exists()


UNTRACEABLE = '''
import torch
from torch import nn


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return x


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()

    def forward(self, x):
        return self.gate(x)
'''


@pytest.mark.covers("source:custom")
def test_a_forward_that_cannot_be_exported_is_refused_naming_the_module(tmp_path):
    (tmp_path / "branchy.py").write_text(UNTRACEABLE)
    (tmp_path / "spec.yaml").write_text("dims: {batch: {min: 1, max: 4}}\ninputs: {x: {shape: [batch, 8]}}\n"
                                        "outputs: {y: {shape: [batch, 8]}}\n")
    spec = importlib.util.spec_from_file_location("branchy_test", tmp_path / "branchy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.save(mod.Branchy().state_dict(), tmp_path / "b.pt")
    code, err = cli("export", tmp_path / "b.pt", "--model-class", f"{tmp_path}/branchy.py:Branchy", "--task", "forward",
                    "--inputs", tmp_path / "spec.yaml", "--stages", "hf,onnx", "--no-verify", "--out", tmp_path / "out")
    line = error_line(err)
    assert code != 0 and "cannot export Branchy.forward" in line and "Gate.forward" in line and "data-dependent" in line
    assert not (tmp_path / "out" / "onnx").exists()


@pytest.mark.covers("source:custom")
def test_a_relative_import_that_cannot_be_carried_is_refused(tmp_path):
    (tmp_path / "m.py").write_text("from ..elsewhere import Thing\n\nclass M:\n    pass\n")
    torch.save({"w": torch.zeros(1)}, tmp_path / "m.pt")
    code, err = cli("export", tmp_path / "m.pt", "--model-class", f"{tmp_path}/m.py:M", "--out", tmp_path / "out")
    assert code != 0 and "m.py:1: relative import `from ..elsewhere`" in error_line(err)
    assert not (tmp_path / "out").exists()


def _peft_adapter(model, folder: Path):
    """A LoRA adapter the way PEFT users make one: get_peft_model on their module, train
    (here: lora_B set to non-zero values, so the adapter changes outputs), save_pretrained."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    peft_model.save_pretrained(folder)
    return peft_model.eval()


@pytest.mark.slow
@pytest.mark.covers("source:custom")
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft 0.21 on transformers 5
def test_lora_adapter_round_trip(tmp_path):
    """A PEFT adapter → BUNDLE/adapter that PeftModel.from_pretrained loads over the bundle's
    model; --merge-adapter of the same adapter as a .pth → an ONNX graph of the merged model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, ckpt, flags = _gpt(tmp_path)
    trained = _peft_adapter(model, tmp_path / "adapter")
    ids = torch.from_numpy(_unseen_feed("gpt", np.random.default_rng(8))["input_ids"])
    with torch.no_grad():
        want, base = trained(ids)[0], model(ids)[0]
    assert (want - base).abs().max() > 1e-2  # the adapter does something

    code, err = cli("export", ckpt, *flags, "--adapter", tmp_path / "adapter", "--stages", "hf", "--out", tmp_path / "lora")
    assert code == 0, err
    manifest = json.loads((tmp_path / "lora" / "manifest.json").read_text())
    assert manifest["name"] == "gpt-lora" and manifest["source"]["adapter"]["rank"] == 4
    report = json.loads((tmp_path / "lora" / "reports" / "verify.json").read_text())["stages"][0]
    assert report["status"] == "passed" and any("PeftModel" in r["case"] for r in report["rows"])
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "lora", trust_remote_code=True),
                                       tmp_path / "lora" / "adapter").eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    assert _rel_l2(got.numpy(), want.numpy()) <= 1e-5

    # the same adapter as plain tensors: {module}.lora_A / .lora_B, alpha given on the command line
    from safetensors.torch import load_file

    state = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    torch.save({k.removeprefix("base_model.model."): v for k, v in state.items()}, tmp_path / "lora.pth")
    code, err = cli("export", ckpt, *flags, "--adapter", tmp_path / "lora.pth", "--merge-adapter", "--lora-alpha", "8",
                    "--stages", "hf,onnx", "--out", tmp_path / "merged")
    assert code == 0, err
    graph = _ort(tmp_path / "merged" / "onnx" / "model.onnx", {"input_ids": ids.numpy()})[0]
    assert _rel_l2(graph, want.numpy()) <= 1e-5
    code, err = cli("export", ckpt, *flags, "--adapter", tmp_path / "lora.pth", "--out", tmp_path / "x")
    assert "--lora-alpha" in error_line(err) and not (tmp_path / "x").exists()


@pytest.mark.covers("source:custom")
def test_the_input_spec_extends_the_one_shape_declaration():
    """One DeclaredIO drives the ONNX dynamic axes, the verification sizes (min, max and a
    size other than the traced one, per dim) and the TensorRT profile (min/opt/max)."""
    import yaml

    from exportline.exporters.core.errors import ConfigError
    from exportline.exporters.core.shapes import declared_io, optimization_profiles

    io = declared_io(yaml.safe_load((MODULES / "motion_inputs.yaml").read_text()))
    assert io.dynamic_axes()["poses"] == {0: "batch", 1: "frames"} and io.dynamic_axes()["text"] == {0: "batch"}
    traced = io.trace_sizes()
    sizes = io.case_sizes()
    for dim in io.dims:
        seen = {s[dim.name] for s in sizes}
        assert {dim.min, dim.max} <= seen and seen - {traced[dim.name], dim.min, dim.max}
    (profile,) = optimization_profiles(io)
    assert profile.shapes["poses"] == ((1, 2, 20), (2, 8, 20), (4, 40, 20)) and profile.shapes["text"][2] == (4, 1024)
    feed = io.sample({"batch": 3, "frames": 5}, seed=1)
    assert feed["actions"].dtype == np.int64 and feed["actions"].max() < 12 and feed["poses"].shape == (3, 5, 20)
    assert declared_io(io.to_dict()) == io  # what config.json records reads back the same, in order
    bad = {"dims": {"batch": {"min": 1, "max": 4}}, "inputs": {"ids": {"dtype": "int64", "shape": ["batch", "seq"],
                                                                       "values": [0, 9]}}, "outputs": {"y": {"shape": ["batch"]}}}
    with pytest.raises(ConfigError, match="uses dim 'seq'"):
        declared_io(bad)


@pytest.mark.covers("source:custom")
def test_parameter_expectations_parse_and_judge():
    from exportline.exporters.core.errors import ConfigError
    from exportline.exporters.core.presets import ParamExpectation

    for text in ("15.8M[±5%]", "15.8M±5%", "15.8m +-5%", "15800000"):
        e = ParamExpectation.parse(text)
        assert e.count == 15.8e6 and e.tolerance == 0.05
    assert ParamExpectation.parse("28M").problem(27_000_000) is None
    assert "+10.0%" in ParamExpectation.parse("5.6M±5%").problem(6_160_000)
    with pytest.raises(ConfigError):
        ParamExpectation.parse("lots")


@pytest.mark.covers("source:custom")
def test_calibration_inputs_come_from_the_spec_or_the_users_npz(tmp_path):
    import yaml

    from exportline.exporters.core.errors import ConfigError
    from exportline.exporters.core.shapes import declared_io
    from exportline.exporters.precision.declared_calibration import CALIBRATION_BATCH, SAMPLED_FEEDS, declared_feeds

    io = declared_io(yaml.safe_load((MODULES / "motion_inputs.yaml").read_text()))
    sampled = declared_feeds(io, None)
    assert len(sampled) == SAMPLED_FEEDS and len({f["poses"].shape for f in sampled}) > 1  # several shapes
    rng = np.random.default_rng(0)
    arrays = {"poses": rng.standard_normal((10, 6, 20)), "text": rng.standard_normal((10, 1024)),
              "actions": rng.integers(0, 12, (10, 6))}
    np.savez(tmp_path / "calib.npz", **arrays)
    feeds = declared_feeds(io, tmp_path / "calib.npz")
    assert [len(f["poses"]) for f in feeds] == [CALIBRATION_BATCH, CALIBRATION_BATCH, 10 - 2 * CALIBRATION_BATCH]
    np.testing.assert_array_equal(np.concatenate([f["actions"] for f in feeds]), arrays["actions"])
    np.savez(tmp_path / "short.npz", poses=arrays["poses"], text=arrays["text"])
    with pytest.raises(ConfigError, match="no array for input actions"):
        declared_feeds(io, tmp_path / "short.npz")


@pytest.mark.covers("source:custom")
def test_presets_and_variants_share_the_parameter_check():
    """A preset's `expect_params:` goes through the same ParamExpectation as --expect-params."""
    from exportline.exporters.core.errors import ConfigError
    from exportline.exporters.core.presets import load_preset
    from exportline.exporters.sources import resolve_source

    count = load_preset("tiny").parameter_count()
    assert resolve_source("tiny", {"expect_params": f"{count}±0%"}).name == "tiny"
    with pytest.raises(ConfigError, match=r"preset tiny: .* off the expected 15\.8M"):
        resolve_source("tiny", {"expect_params": "15.8M±5%"})


def test_bench_times_a_custom_module_on_its_declared_io(tmp_path):
    """`exportline bench` on the motion module: the forward workload at the declared dims'
    opt and max sizes; every backend asked for is a measured row or says why not (int8 and
    TensorRT were not exported here)."""
    _, ckpt, flags = _motion(tmp_path)
    code, err = cli("export", ckpt, *flags, "--stages", "hf,onnx,fp16", "--no-verify", "--out", tmp_path / "b")
    assert code == 0, err
    backends = ["torch", "onnx", "onnx-fp16", "onnx-int8", "trt-fp16"]
    code, err = cli("bench", tmp_path / "b", "--backends", ",".join(backends), "--warmup", "1", "--repeat", "3",
                    "--threads", "1")
    assert code == 0, err
    report = json.loads((tmp_path / "b" / "reports" / "bench.json").read_text())
    status = {b["backend"]: b for b in report["backends"]}
    assert [status[b]["status"] for b in backends] == ["ok", "ok", "ok", "not available", "not available"]
    assert "int8" in status["onnx-int8"]["reason"]
    assert status["trt-fp16"]["reason"]
    # the declared dims (motion_inputs.yaml): batch 1..2..4, frames 2..8..40 → opt and max
    want = [{"poses": [2, 8, 20], "text": [2, 1024], "actions": [2, 8]},
            {"poses": [4, 40, 20], "text": [4, 1024], "actions": [4, 40]}]
    for backend in ("torch", "onnx", "onnx-fp16"):
        rows = [r for r in report["results"] if r["backend"] == backend]
        assert [r["shapes"] for r in rows] == want and {r["workload"] for r in rows} == {"forward"}
        assert all(r["stats"]["median_s"] > 0 and r["stats"]["p90_s"] >= r["stats"]["median_s"] for r in rows)
        assert all(len(r["samples_s"]) == 3 for r in rows)
    speedups = [r["speedup_vs_torch"] for r in report["results"] if r["backend"] == "onnx"]
    assert all(isinstance(s, float) and s > 0 for s in speedups)
    md = (tmp_path / "b" / "reports" / "bench.md").read_text()
    assert "## forward" in md and "onnx-int8 | not available:" in md
