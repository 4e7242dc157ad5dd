"""A bundle remembers how it is judged: the bounds and the random-init label are recorded in
manifest.json when it is made, and exporting or verifying from the folder reads them back,
so the preset name and the folder path get the same verdict (issue 15)."""

from __future__ import annotations

import json
import shutil

import pytest

from exportline.exporters.core.presets import load_thresholds
from exportline.exporters.sources import resolve_source
from exportline.verify.suite import verify_bundle

from quant_models import export_bundle
from verify_helpers import TINY

# A bound no fp32 ONNX graph meets (it differs from float64 by ~1e-7): if the folder path
# loses the preset's override, the onnx verdict flips from failed to passed.
pytestmark = pytest.mark.slow  # four small exports (hf/onnx) and onnx checks: ~40 s on 2 cores

IMPOSSIBLE = {"thresholds": {"fp32": {"rel_l2": 1e-30}}}
HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json")


def _manifest(root):
    return json.loads((root / "manifest.json").read_text())


def _export(root, spec, stages, overrides=None):
    return export_bundle(root, resolve_source(str(spec), overrides), stages)


@pytest.fixture(scope="module")
def preset_bundle(tmp_path_factory):
    """The shrunk tiny preset with an override, hf + onnx from the preset name."""
    root = tmp_path_factory.mktemp("bounds") / "from-preset"
    _export(root, "tiny", ["hf", "onnx"], {**TINY, **IMPOSSIBLE})
    return root


def _hf_copy(src, dest, *, with_manifest: bool):
    dest.mkdir(parents=True)
    for name in HF_FILES + (("manifest.json",) if with_manifest else ()):
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)
    return dest


def test_manifest_records_bounds_and_label_when_made(preset_bundle):
    recorded = _manifest(preset_bundle)["verification"]
    assert recorded["random_init"] is True and recorded["labels"] == ["random-init"]
    assert recorded["thresholds"]["fp32"]["rel_l2"] == 1e-30
    # the rest of configs/thresholds.yaml is recorded as it was, not just the override
    assert recorded["thresholds"]["fp16"] == load_thresholds()["fp16"]
    assert "random-init" in recorded["int8_rule"] and recorded["origin"] == "preset tiny"


def test_folder_path_gives_the_preset_verdict(preset_bundle, tmp_path):
    by_preset = verify_bundle(preset_bundle, stages=["onnx"])
    assert not by_preset.passed and "rel_l2" in by_preset.first_failure()
    # `exportline export DIR --out NEW --stages hf,onnx`: the folder the preset wrote as the source
    second = tmp_path / "second"
    _export(second, preset_bundle, ["hf", "onnx"])
    manifest = _manifest(second)
    assert manifest["source"]["kind"] == "hf" and "manifest.json" in manifest["source"]["inherited_from"]
    assert manifest["verification"]["thresholds"]["fp32"]["rel_l2"] == 1e-30
    assert manifest["verification"]["random_init"] is True and manifest["source"]["preset"] == "tiny"
    by_folder = verify_bundle(second, stages=["onnx"])
    assert not by_folder.passed
    assert by_folder.first_failure().split(" shape ")[0] == by_preset.first_failure().split(" shape ")[0]
    # and a bundle made from that bundle carries them on
    third = tmp_path / "third"
    _export(third, second, ["hf"])
    assert _manifest(third)["verification"] == {**manifest["verification"], "origin": _manifest(third)["verification"]["origin"]}


def test_folder_without_manifest_is_judged_on_the_defaults(preset_bundle, tmp_path):
    plain = _hf_copy(preset_bundle, tmp_path / "plain", with_manifest=False)
    _export(plain, plain, ["onnx"])
    recorded = _manifest(plain)["verification"]
    assert recorded["random_init"] is False and recorded["thresholds"]["fp32"] == load_thresholds()["fp32"]
    report = verify_bundle(plain, stages=["onnx"])
    assert report.passed, report.first_failure()


def test_changed_weights_do_not_inherit_the_label(preset_bundle, tmp_path):
    """Weights edited after export (e.g. fine-tuned) no longer match the manifest's sha256:
    the random-init label and the relaxed bounds must not follow them."""
    from safetensors.torch import load_file, save_file

    edited = _hf_copy(preset_bundle, tmp_path / "edited", with_manifest=True)
    state = load_file(edited / "model.safetensors")
    name = next(iter(state))
    state[name] = state[name] + 1.0
    save_file(state, edited / "model.safetensors", metadata={"format": "pt"})
    described = resolve_source(str(edited)).describe()
    assert described["random_init"] is False and described["labels"] == []
    assert "model.safetensors" in described["bounds_note"] and "not inherited" in described["bounds_note"]
    assert described["thresholds"] == {}
