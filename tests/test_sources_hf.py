"""Presets and HF folders as sources: weights checked tensor by tensor against the source."""

from __future__ import annotations

import json

import pytest
import torch

from exportline.exporters.sources import PresetSource, resolve_source
from exportline.verify.suite import verify_bundle

from bundle_helpers import rerecord
from sources_fixtures import cli, error_line


def _export(src, out, *extra):
    code, err = cli("export", src, "--stages", "hf", "--out", out, *extra)
    assert code == 0, err
    return json.loads((out / "manifest.json").read_text())


def _stage(out):
    return json.loads((out / "reports" / "verify.json").read_text())["stages"][0]


@pytest.mark.covers("source:preset", "stage:hf")
def test_preset_weights_are_the_seeded_init_and_a_changed_tensor_fails(tmp_path):
    from safetensors.torch import load_file, save_file

    manifest = _export("tiny", tmp_path / "out")
    assert manifest["source"]["labels"] == ["random-init"] and manifest["source"]["tokenizer"]["kind"] == "bpe"
    stage = _stage(tmp_path / "out")
    assert stage["status"] == "passed" and "HF model itself in float64" in stage["reference"]
    (weights,) = [r for r in stage["rows"] if r["output"] == "weights"]
    assert weights["metrics"]["mismatched"] == 0 and weights["metrics"]["tensors"] > 10

    path = tmp_path / "out" / "model.safetensors"
    state = load_file(path)
    state["model.norm.weight"] = state["model.norm.weight"].clone()
    state["model.norm.weight"][3] = torch.nextafter(state["model.norm.weight"][3], torch.tensor(2.0))  # one ulp
    save_file(state, path, metadata={"format": "pt"})
    # As if a faulty hf stage had written it: the manifest agrees, only the weights check can tell.
    rerecord(tmp_path / "out")
    report = verify_bundle(tmp_path / "out", stages=["hf"])
    assert not report.passed and "weights" in report.first_failure()


@pytest.mark.covers("source:hf")
def test_hf_folder_is_resaved_and_verified(tmp_path):
    _export("tiny", tmp_path / "src", "--no-verify")
    manifest = _export(tmp_path / "src", tmp_path / "out")
    src = manifest["source"]
    assert (src["kind"], src["architecture"], src["tokenizer"]["kind"]) == ("hf", "llama", "copied")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tmp_path / "src" / "tokenizer.json").read_bytes()
    stage = _stage(tmp_path / "out")
    assert stage["status"] == "passed"
    assert any(r["output"] == "weights" and r["passed"] for r in stage["rows"])


def test_custom_code_is_not_run_without_trust_remote_code(tmp_path):
    _export("tiny", tmp_path / "src", "--no-verify")
    marker = tmp_path / "RAN"
    (tmp_path / "src" / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config["model_type"] = "my-custom-llama"  # a type transformers does not ship: only the folder's code knows it
    config["auto_map"] = {"AutoConfig": "modeling_custom.Config", "AutoModelForCausalLM": "modeling_custom.Model"}
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    code, err = cli("export", tmp_path / "src", "--stages", "hf", "--out", tmp_path / "out")
    assert code != 0 and "--trust-remote-code" in error_line(err)
    assert not marker.exists()


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "weights").mkdir()
    code, err = cli("export", tmp_path / "weights", "--stages", "hf", "--out", tmp_path / "out")
    assert code != 0 and "without config.json" in error_line(err)


def test_resolve_source_kinds(tmp_path):
    assert isinstance(resolve_source("tiny"), PresetSource)
    (tmp_path / "x.bin").write_bytes(b"")
    (tmp_path / "x.pt").write_bytes(b"")
    assert resolve_source(str(tmp_path / "x.bin")).kind == "llama2c"
    assert resolve_source(str(tmp_path / "x.pt")).kind == "nanogpt"
    described = resolve_source(str(tmp_path / "x.pt")).describe()
    assert {"kind", "labels", "tokenizer", "sha256"} <= set(described)


def test_greedy_row_allows_only_a_flip_at_a_near_tie():
    import numpy as np

    from exportline.verify.checks.hf import GREEDY_STEPS, _greedy_row

    thresholds = {"fp32": {"max_abs_over_max_ref": 1e-5, "greedy_identical": True}}
    want = [1] * GREEDY_STEPS
    tie, clear = np.array([0.0, 10.0, 10.0 - 1e-6]), np.array([0.0, 10.0, 9.0])
    # the reference's teacher-forced logits at each step: argmax 1 throughout
    same = _greedy_row(list(want), [clear] * GREEDY_STEPS, "c", thresholds=thresholds)
    flip_at_tie = _greedy_row([1, 2] + want[2:], [clear, tie] + [clear] * 30, "c", thresholds=thresholds)
    flip_clear = _greedy_row([1, 2] + want[2:], [clear] * GREEDY_STEPS, "c", thresholds=thresholds)
    assert same.passed and flip_at_tie.passed and not flip_clear.passed
    assert flip_clear.metrics["identical_fraction"] == 1 / GREEDY_STEPS


def test_hf_folder_rerun_is_cached_even_when_the_folder_is_a_bundle(tmp_path):
    _export("tiny", tmp_path / "src", "--no-verify")
    _export(tmp_path / "src", tmp_path / "out", "--no-verify")
    _export("tiny", tmp_path / "src", "--no-verify", "--force")  # rewrites manifest.json and the lock
    code, err = cli("export", tmp_path / "src", "--stages", "hf", "--out", tmp_path / "out", "--no-verify")
    assert code == 0 and "unchanged, skipped" in err
