"""The onnx stage check, the verification cases and `exportline verify` exit codes."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from exportline.exporters.core.bundle import Bundle, sha256_file
from exportline.exporters.core.shapes import KVLayout
from exportline.verify.cases import build_cases, positions
from exportline.verify.suite import verify_bundle

from bundle_helpers import mismatched, rerecord
from verify_helpers import copy_bundle, exportline_cmd, scale_initializer, shared_bundle

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, vocab_size=512)


@pytest.fixture(scope="session")
def bundle(tmp_path_factory):
    return shared_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def good_report(bundle, tmp_path_factory):
    root = copy_bundle(bundle, tmp_path_factory.mktemp("verify") / "b")
    return root, verify_bundle(root, stages=["onnx"])


def test_cases_cover_the_design_shapes():
    cases = build_cases(LAYOUT, long=64)
    prefill = {(c.batch, c.sequence) for c in cases if c.prefix is None and c.past == 0}
    assert {(1, 1), (1, 64), (3, 64)} <= prefill
    assert {c.past for c in cases if c.sequence == 1} >= {0, 1, 64}
    assert all(c.prefix is not None for c in cases if c.past > 0)  # the past always comes from a run
    padded = [c for c in cases if (c.attention_mask == 0).any()]
    assert padded and all(c.batch > 1 for c in padded)
    for c in cases:
        assert c.input_ids.min() >= 0 and c.input_ids.max() < LAYOUT.vocab_size
        feed = c.feed(LAYOUT, _fake_past(c) if c.prefix else None)
        assert [s.name for s in LAYOUT.inputs()] == list(feed)
    assert build_cases(LAYOUT)[2].input_ids.tolist() == build_cases(LAYOUT)[2].input_ids.tolist()  # seeded


def test_left_padding_positions_and_decode_continuation():
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert positions(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    case = [c for c in build_cases(LAYOUT, long=16) if c.prefix is not None and c.past == 16][0]
    last = case.prefix.position_ids[:, -1]
    assert (case.position_ids[:, 0] == last + 1).all()
    assert case.attention_mask.shape == (3, 17) and (case.attention_mask[:, -1] == 1).all()


def test_onnx_check_passes_and_covers_every_output_and_case(good_report):
    root, report = good_report
    assert report.passed, report.first_failure()
    (stage,) = report.stages
    assert stage.stage == "onnx" and stage.status == "passed"
    outputs = {s.name for s in LAYOUT.outputs()}
    for case in stage.extra["cases"]:
        assert {r.output for r in stage.rows if r.case == case} == outputs, case
    logits = [r for r in stage.rows if r.output == "logits"]
    assert all(r.metrics["rel_l2"] <= 1e-5 and r.metrics["top1"] == 1.0 for r in logits)
    present = next(r for r in stage.rows if r.output == "present.1.value" and "past 64" in r.case)
    assert present.shape == [3, 2, 65, 8]  # reported as the graph writes it: [batch, heads, pos, dim]
    greedy = next(r for r in stage.rows if r.output == "greedy tokens")
    tokens = stage.extra["greedy"]
    assert len(tokens["torch float32"]) >= 32 and tokens["torch float32"] == tokens["onnx"]
    assert greedy.passed and greedy.metrics["identical_fraction"] == 1.0


def test_reports_are_written_and_checksummed_in_the_manifest(good_report):
    root, _ = good_report
    data = json.loads((root / "reports" / "verify.json").read_text())
    assert data["passed"] and data["stages"][0]["stage"] == "onnx"
    md = (root / "reports" / "verify.md").read_text()
    assert "| batch3 decode past 64 left-padded | present.0.key | 3×2×65×8 |" in md
    files = {f["path"]: f for f in Bundle(root).read_manifest()["files"]}
    for rel in ("reports/verify.json", "reports/verify.md"):
        assert files[rel]["sha256"] == sha256_file(root / rel)
    assert mismatched(root) == []


def test_numeric_corruption_fails_naming_the_output_and_is_not_blessed(bundle, tmp_path):
    root = copy_bundle(bundle, tmp_path / "b")
    scale_initializer(root / "onnx" / "model.onnx", 1.5)
    # As if a faulty onnx stage had written these numbers: the manifest agrees with the bytes,
    # so only the numerical check can catch it (a changed byte alone is test_integrity's).
    rerecord(root)
    before = Bundle(root).read_manifest()["files"]
    run = _cli("verify", str(root), "--stage", "onnx")
    assert run.returncode == 2, run.stderr
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith("error: verification failed: onnx: ") and "rel_l2=" in error
    assert any(name in error for name in ("logits", "present."))
    assert "Traceback" not in run.stderr
    assert "FAIL" in (root / "reports" / "verify.md").read_text()
    # verify refreshed only reports/: it does not bless (re-record) any other file
    after = Bundle(root).read_manifest()["files"]
    assert [f for f in after if not f["path"].startswith("reports/")] == [f for f in before if not f["path"].startswith("reports/")]


def test_cli_verify_good_bundle_exits_zero(bundle, tmp_path):
    root = copy_bundle(bundle, tmp_path / "b")
    run = _cli("verify", str(root), "--long", "8")  # every stage the manifest records
    assert run.returncode == 0, run.stderr
    assert "hf passed" in run.stdout and "onnx passed" in run.stdout
    assert (root / "reports" / "verify.md").is_file()


@pytest.mark.parametrize("damage", ["missing data", "truncated onnx"])
def test_cli_verify_broken_files_one_line_error(bundle, tmp_path, damage):
    root = copy_bundle(bundle, tmp_path / "b")
    model = root / "onnx" / "model.onnx"
    if damage == "missing data":
        (root / "onnx" / "model.onnx_data").unlink()
        expected = "model.onnx_data is missing"
    else:
        model.write_bytes(model.read_bytes()[:1000])
        expected = "truncated"
    run = _cli("verify", str(root), "--stage", "onnx")
    assert run.returncode == 1
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], run.stderr
    assert run.stderr.strip().splitlines()[-1] == errors[0] and "Traceback" not in run.stderr


def test_verify_refuses_a_stage_the_bundle_does_not_have(bundle, tmp_path):
    from exportline.exporters.core.errors import ArtifactError, ConfigError

    root = copy_bundle(bundle, tmp_path / "b")
    with pytest.raises(ArtifactError, match="no finished fp16 stage"):
        verify_bundle(root, stages=["fp16"])
    with pytest.raises(ConfigError, match="unknown stage"):
        verify_bundle(root, stages=["onnx2"])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*exportline_cmd(), *args], capture_output=True, text=True, timeout=300)


def _fake_past(case) -> dict[str, np.ndarray]:
    shape = (case.batch, LAYOUT.num_kv_heads, case.past, LAYOUT.head_dim)
    return {n: np.zeros(shape, dtype=np.float32) for n in LAYOUT.past_names()}
