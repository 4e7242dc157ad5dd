"""Stage pipeline: caching, atomic output, records, lock, manifest checksums."""

from __future__ import annotations

import hashlib
import json
import types

import pytest

from exportline.exporters.core.bundle import Bundle, sha256_file
from exportline.exporters.core.errors import ConfigError, NotAvailable, OutputError, StageError
from exportline.exporters.core.pipeline import Stage, run_pipeline
from exportline.exporters.stages import parse_stages

from bundle_helpers import mismatched

CALLS: list[str] = []


class FakeSource:
    name = "fake"

    def __init__(self, tag: str = "a"):
        self.tag = tag

    def describe(self):
        return {"kind": "fake", "labels": []}

    def fingerprint(self):
        return self.tag


def _write(ctx):
    CALLS.append("write")
    (ctx.tmp / "data").mkdir()
    (ctx.tmp / "data" / "a.bin").write_bytes(b"x" * 100 + ctx.source.tag.encode())
    return {"n": 1}


def _derive(ctx):
    CALLS.append("derive")
    src = ctx.bundle_file("data/a.bin").read_bytes()
    (ctx.tmp / "b.txt").write_text(hashlib.sha256(src).hexdigest())


def _half_then_fail(ctx):
    (ctx.tmp / "partial.bin").write_bytes(b"half")
    raise StageError("boom: disk went away")


def _unavailable(ctx):
    raise NotAvailable("TensorRT not installed")


@pytest.fixture
def fake_stages(monkeypatch):
    mod = types.SimpleNamespace()
    mod.WRITE = Stage(name="write", run=_write, inputs=lambda ctx: [])
    mod.DERIVE = Stage(name="derive", run=_derive, inputs=lambda ctx: ["data/a.bin"])
    mod.FAIL = Stage(name="fail", run=_half_then_fail, inputs=lambda ctx: [])
    mod.NA = Stage(name="na", run=_unavailable, inputs=lambda ctx: [])
    CALLS.clear()
    return mod


def test_records_and_manifest_checksums(tmp_path, fake_stages):
    bundle = Bundle(tmp_path / "b")
    result = run_pipeline(bundle, FakeSource(), stages=[fake_stages.WRITE, fake_stages.DERIVE])
    assert [r["status"] for r in result.ran] == ["done", "done"]
    rec = result.manifest["stages"]["derive"]
    assert rec["inputs"] == {"data/a.bin": sha256_file(bundle.root / "data/a.bin")}
    assert rec["outputs"] == ["b.txt"] and rec["wall_s"] >= 0 and rec["peak_rss_bytes"] > 0
    assert "exportline" in rec["versions"]
    manifest = json.loads((bundle.root / "manifest.json").read_text())
    listed = {f["path"]: f for f in manifest["files"]}
    assert set(listed) == {"data/a.bin", "b.txt"}
    for path, f in listed.items():
        assert f["sha256"] == sha256_file(bundle.root / path)
        assert f["bytes"] == (bundle.root / path).stat().st_size
    assert mismatched(bundle) == []
    assert not (bundle.root / ".exportline-tmp").exists()


def test_unchanged_stage_is_skipped_and_force_reruns(tmp_path, fake_stages):
    bundle = Bundle(tmp_path / "b")
    run_pipeline(bundle, FakeSource(), stages=[fake_stages.WRITE, fake_stages.DERIVE])
    assert CALLS == ["write", "derive"]
    result = run_pipeline(bundle, FakeSource(), stages=[fake_stages.WRITE, fake_stages.DERIVE])
    assert CALLS == ["write", "derive"] and all(r["cached"] for r in result.ran)
    run_pipeline(bundle, FakeSource(), stages=[fake_stages.WRITE, fake_stages.DERIVE], force=True)
    assert CALLS == ["write", "derive"] * 2


def test_changed_input_reruns_downstream(tmp_path, fake_stages):
    bundle = Bundle(tmp_path / "b")
    run_pipeline(bundle, FakeSource("a"), stages=[fake_stages.WRITE, fake_stages.DERIVE])
    CALLS.clear()
    run_pipeline(bundle, FakeSource("b"), stages=[fake_stages.WRITE, fake_stages.DERIVE])
    assert CALLS == ["write", "derive"]  # source fingerprint changed → write; its output changed → derive


def test_tampered_output_is_not_trusted(tmp_path, fake_stages):
    bundle = Bundle(tmp_path / "b")
    run_pipeline(bundle, FakeSource(), stages=[fake_stages.WRITE])
    (bundle.root / "data/a.bin").write_bytes(b"tampered")
    CALLS.clear()
    run_pipeline(bundle, FakeSource(), stages=[fake_stages.WRITE])
    assert CALLS == ["write"]
    assert (bundle.root / "data/a.bin").read_bytes().startswith(b"x" * 100)


def test_failed_stage_leaves_nothing(tmp_path, fake_stages):
    bundle = Bundle(tmp_path / "b")
    with pytest.raises(StageError, match="boom"):
        run_pipeline(bundle, FakeSource(), stages=[fake_stages.WRITE, fake_stages.FAIL])
    assert not (bundle.root / "partial.bin").exists()
    assert not (bundle.root / ".exportline-tmp").exists()
    manifest = bundle.read_manifest()
    assert "fail" not in manifest["stages"] and manifest["stages"]["write"]["status"] == "done"


def test_not_available_is_recorded_as_skipped_unless_required(tmp_path, fake_stages):
    bundle = Bundle(tmp_path / "b")
    result = run_pipeline(bundle, FakeSource(), stages=[fake_stages.WRITE, fake_stages.NA])
    rec = result.manifest["stages"]["na"]
    assert rec["status"] == "skipped" and rec["reason"] == "TensorRT not installed"
    with pytest.raises(NotAvailable, match="required.*TensorRT not installed"):
        run_pipeline(bundle, FakeSource(), stages=[fake_stages.WRITE, fake_stages.NA], require=("na",))


def test_second_run_on_same_folder_is_refused(tmp_path, fake_stages):
    bundle = Bundle(tmp_path / "b")
    with bundle.lock():
        with pytest.raises(OutputError, match="another exportline run"):
            run_pipeline(bundle, FakeSource(), stages=[fake_stages.WRITE])
    assert run_pipeline(bundle, FakeSource(), stages=[fake_stages.WRITE]).ran[0]["status"] == "done"


def test_unknown_stage_lists_known():
    with pytest.raises(ConfigError, match="unknown stage nope; stages are: hf,onnx,fp16,int8,trt"):
        parse_stages("onnx,nope")
    with pytest.raises(ConfigError, match="none given"):
        parse_stages("")
    assert [s.name for s in parse_stages("fp16, hf")] == ["hf", "fp16"]  # pipeline order


def test_upstream_rewrite_drops_the_stale_downstream_stage(tmp_path, fake_stages):
    bundle = Bundle(tmp_path / "b")
    run_pipeline(bundle, FakeSource(), stages=[fake_stages.WRITE, fake_stages.DERIVE])

    def _write_other(ctx):
        (ctx.tmp / "data").mkdir()
        (ctx.tmp / "data" / "a.bin").write_bytes(b"y" * 100)

    run_pipeline(bundle, FakeSource(), stages=[Stage(name="write", run=_write_other, inputs=lambda ctx: [])], force=True)
    manifest = bundle.read_manifest()
    assert "derive" not in manifest["stages"] and not (bundle.root / "b.txt").exists()
    assert {f["path"] for f in manifest["files"]} == {"data/a.bin"}


def test_other_source_leaving_stages_behind_is_refused_unless_forced(tmp_path, fake_stages):
    bundle = Bundle(tmp_path / "b")
    run_pipeline(bundle, FakeSource("a"), stages=[fake_stages.WRITE, fake_stages.DERIVE])
    with pytest.raises(OutputError, match="another source.*derive.*--force"):
        run_pipeline(bundle, FakeSource("b"), stages=[fake_stages.WRITE])
    assert bundle.read_manifest()["stages"]["derive"]["status"] == "done"  # refused before touching anything
    run_pipeline(bundle, FakeSource("b"), stages=[fake_stages.WRITE], force=True)
    manifest = bundle.read_manifest()
    assert set(manifest["stages"]) == {"write"} and not (bundle.root / "b.txt").exists()
    assert mismatched(bundle) == []


def test_empty_stage_list_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--stages is empty"):
        run_pipeline(Bundle(tmp_path / "b"), FakeSource(), stages=[])
    assert not (tmp_path / "b").exists()
