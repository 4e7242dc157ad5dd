"""The model card: generated from manifest + reports, and refused when it drifts from them."""

from __future__ import annotations

import json
import subprocess

import pytest
from huggingface_hub import ModelCard

from exportline.deploy.card_check import check_card
from exportline.deploy.prepare import prepare_bundle
from exportline.exporters.core.bundle import Bundle

from deploy_bundle import exportline_cmd


@pytest.fixture
def carded(deploy_bundle):
    prepare_bundle(deploy_bundle)
    return deploy_bundle


def _replace(path, old, new):
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def test_generated_card_passes_check_and_repeats_the_reports(carded):
    assert check_card(carded) == []
    card = ModelCard.load(carded / "README.md")
    assert card.data.license == "apache-2.0" and card.data.library_name == "transformers"
    assert {"onnx", "fp16", "int8", "tensorrt", "random-init"} <= set(card.data.tags)
    verify = json.loads((carded / "reports" / "verify.json").read_text())
    onnx_rel_l2 = max(r["metrics"]["rel_l2"] for s in verify["stages"] if s["stage"] == "onnx"
                      for r in s["rows"] if "rel_l2" in r["metrics"])
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results["onnx: max relative L2 vs reference"] == onnx_rel_l2
    assert results["onnxruntime-cpu decode past=64: tokens/s"] == 2000.0
    head, _, rest = card.text.partition("\n## ")
    assert "**Random-init weights.**" in head  # said before any section
    assert "| onnx | passed | 2/2 | 3.750e-07 |" in card.text
    assert "| tensorrt | decode past=64 | not available: TensorRT not installed |" in card.text
    assert "| `model.safetensors` | 634,216 |" in card.text
    manifest = Bundle(carded).read_manifest()
    assert any(f["path"] == "README.md" for f in manifest["files"]) and any(f["path"] == "hubconf.py" for f in manifest["files"])


def test_card_is_stable_when_nothing_changes(carded):
    before = {p: (carded / p).stat().st_mtime_ns for p in ("README.md", "manifest.json", "hubconf.py")}
    prepare_bundle(carded)
    assert {p: (carded / p).stat().st_mtime_ns for p in before} == before


def test_check_refuses_planted_tbd(carded):
    _replace(carded / "README.md", "- Intended use:", "- Intended use: TBD.")
    problems = check_card(carded)
    assert any("placeholder 'TBD'" in p for p in problems), problems
    proc = subprocess.run([*exportline_cmd(), "card", "check", str(carded)], capture_output=True, text=True)
    assert proc.returncode != 0 and "TBD" in proc.stderr and "Traceback" not in proc.stderr


def test_check_refuses_numbers_that_disagree_with_the_reports(carded):
    _replace(carded / "README.md", "| onnx | passed | 2/2 | 3.750e-07 |", "| onnx | passed | 2/2 | 1.000e-09 |")
    _replace(carded / "README.md", "value: 2000.0", "value: 2500.0")
    problems = check_card(carded)
    assert any(p.startswith("Evaluation:") and "reports/verify.json gives: | onnx | passed | 2/2 | 3.750e-07" in p
               for p in problems), problems
    assert any("'onnxruntime-cpu decode past=64: tokens/s' = 2500.0 disagrees with reports/bench.json" in p
               for p in problems), problems


def test_check_notices_reports_that_changed_after_the_card(carded):
    bench = carded / "reports" / "bench.json"
    bench.write_text(bench.read_text().replace("1.25", "1.5"))
    assert any(p.startswith("Performance:") and "torch-cpu" in p for p in check_card(carded))


def test_check_refuses_empty_section_and_missing_random_init_notice(carded):
    text = (carded / "README.md").read_text()
    start = text.index("## Intended use and limitations\n") + len("## Intended use and limitations\n")
    text = text[:start] + "\n" + text[text.index("## How to use"):]
    text = text.replace("> **Random-init weights.**", "> Note:")
    (carded / "README.md").write_text(text)
    problems = check_card(carded)
    assert "section 'Intended use and limitations' is empty" in problems
    assert any("random-init" in p and "at the top" in p for p in problems)


def test_missing_reports_say_not_measured_and_why(deploy_bundle):
    (deploy_bundle / "reports" / "bench.json").unlink()
    (deploy_bundle / "reports" / "verify.json").unlink()
    prepare_bundle(deploy_bundle, license="mit", datasets=["org/corpus"])
    text = (deploy_bundle / "README.md").read_text()
    assert "Not measured: `reports/bench.json` is missing. Run `exportline bench DIR`" in text
    assert "Not verified: `reports/verify.json` is missing" in text
    card = ModelCard(text)
    assert card.data.license == "mit" and card.data.datasets == ["org/corpus"] and not card.data.eval_results
    assert check_card(deploy_bundle) == []


def test_card_write_refuses_a_modified_stage_output(deploy_bundle):
    weights = deploy_bundle / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    proc = subprocess.run([*exportline_cmd(), "card", "write", str(deploy_bundle)], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "error: model.safetensors differs from what the hf stage recorded" in proc.stderr
