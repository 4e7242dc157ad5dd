"""TensorRT: profiles, names, engine JSON and compatibility on CPU; the skip path through the
pipeline and the CLI; real build-and-run only where `import tensorrt` and a CUDA GPU work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exportline.exporters.core.bundle import Bundle
from exportline.exporters.core.errors import ArtifactError, ConfigError, NotAvailable
from exportline.exporters.core.pipeline import ExportOptions, run_pipeline
from exportline.exporters.core.shapes import KVLayout, ProfileShapes
from exportline.exporters.sources import resolve_source
from exportline.exporters.stages import parse_stages
from exportline.exporters.tensorrt.engines import (
    Target,
    build_metadata,
    check_engine_compatible,
    engine_filename,
    engine_profiles,
    find_engine,
    local_target,
    metadata_path,
    read_metadata,
    select_profile,
    set_shape_calls,
    validate_profile,
    write_metadata,
)

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, vocab_size=512)
H100 = Target(tensorrt="10.13.3.9", compute_capability="9.0", gpu="NVIDIA H100", cuda="12.8")


def _trt_unavailable_reason() -> str | None:
    try:
        local_target()
    except NotAvailable as exc:
        return str(exc)
    return None


UNAVAILABLE = _trt_unavailable_reason()


# -- profiles -------------------------------------------------------------------------------------
def test_profiles_are_prefill_then_decode_over_the_declared_inputs():
    profiles = engine_profiles(LAYOUT, max_batch=4, max_sequence=128)
    assert [p.name for p in profiles] == ["prefill", "decode"]
    declared = [s.name for s in LAYOUT.inputs()]
    for p in profiles:
        assert [call[0] for call in set_shape_calls(p)] == declared
    prefill, decode = (dict((c[0], c[1:]) for c in set_shape_calls(p)) for p in profiles)
    # prefill: sequence 1..max, past 0 at min, opt and max
    assert [s[1] for s in prefill["input_ids"]] == [1, 64, 128]
    assert all(s[2] == 0 for s in prefill["past_key_values.1.value"])
    # decode: sequence 1, past 0..max-1, so past + sequence never exceeds max_sequence
    assert [s[1] for s in decode["input_ids"]] == [1, 1, 1]
    assert [s[2] for s in decode["past_key_values.0.key"]] == [0, 64, 127]
    assert [s[1] for s in decode["attention_mask"]] == [1, 65, 128]
    assert [s[0] for s in decode["position_ids"]] == [1, 1, 4]
    assert decode["past_key_values.0.key"][2] == (4, 2, 127, 16)


@pytest.mark.parametrize("max_sequence", [1, 2, 3, 2048])
def test_profiles_stay_consistent_at_the_edges(max_sequence):
    for p in engine_profiles(LAYOUT, max_batch=1, max_sequence=max_sequence):
        validate_profile(p, LAYOUT)  # raises on opt outside min..max or a mask ≠ past + sequence
        lo, opt, hi = p.shapes["attention_mask"]
        assert hi[1] == max_sequence


def _tampered(name: str, point: int, shape: tuple[int, ...]) -> ProfileShapes:
    good = engine_profiles(LAYOUT, max_batch=2, max_sequence=16)[1]
    shapes = dict(good.shapes)
    triple = list(shapes[name])
    triple[point] = shape
    shapes[name] = tuple(triple)
    return ProfileShapes(good.name, shapes)


@pytest.mark.parametrize(
    "name,point,shape,message",
    [
        ("attention_mask", 2, (2, 17), "attention_mask length 17"),  # past 15 + sequence 1 = 16
        ("position_ids", 1, (2, 1), "position_ids axis 0 is 2, but batch is 1"),  # opt batch is 1 elsewhere
        ("past_key_values.1.key", 2, (2, 2, 14, 16), "axis 2 is 14, but past_sequence is 15"),  # layer 0 says past 15
        ("past_key_values.0.value", 2, (2, 3, 15, 16), "axis 1 is 3, but fixed at 2"),  # kv heads are fixed at 2
        ("input_ids", 0, (1, 2), "min ≤ opt ≤ max"),  # min sequence above opt
    ],
)
def test_inconsistent_profiles_are_refused(name, point, shape, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate_profile(_tampered(name, point, shape), LAYOUT)


def test_a_profile_missing_an_input_is_refused():
    good = engine_profiles(LAYOUT, max_batch=1, max_sequence=8)[0]
    shapes = {k: v for k, v in good.shapes.items() if k != "past_key_values.1.value"}
    with pytest.raises(ConfigError, match="differ from shapes.py"):
        validate_profile(ProfileShapes("prefill", shapes), LAYOUT)


@pytest.mark.parametrize("max_batch,max_sequence", [(0, 16), (1, 0)])
def test_nonpositive_limits_are_refused(max_batch, max_sequence):
    with pytest.raises(ConfigError, match="must be ≥ 1"):
        engine_profiles(LAYOUT, max_batch=max_batch, max_sequence=max_sequence)


# -- profile selection at run time --------------------------------------------------------------
def _feed_shapes(batch: int, sequence: int, past: int) -> dict[str, tuple[int, ...]]:
    dims = {"batch": batch, "sequence": sequence, "past_sequence": past}
    out = {}
    for spec in LAYOUT.inputs():
        out[spec.name] = tuple(
            d if isinstance(d, int) else (past + sequence if d == "past_sequence + sequence" else dims[d])
            for d in spec.dims
        )
    return out


def test_select_profile_by_feed():
    from exportline.exporters.tensorrt.engines import profiles_to_json

    profiles = profiles_to_json(engine_profiles(LAYOUT, max_batch=4, max_sequence=64))
    assert select_profile(profiles, _feed_shapes(3, 64, 0)) == 0  # prefill at max
    assert select_profile(profiles, _feed_shapes(1, 1, 0)) == 1  # one token, empty past: decode
    assert select_profile(profiles, _feed_shapes(4, 1, 63)) == 1  # decode at max
    with pytest.raises(ConfigError, match="outside the engine's decode profile"):
        select_profile(profiles, _feed_shapes(1, 1, 64))  # past + sequence > max_sequence
    with pytest.raises(ConfigError, match="outside the engine's prefill profile"):
        select_profile(profiles, _feed_shapes(5, 8, 0), bundle="out/tiny")  # batch > max
    with pytest.raises(ConfigError, match="--stages trt --force"):
        select_profile(profiles, _feed_shapes(2, 4, 3))  # chunked prefill: no profile has it


# -- names, JSON, compatibility -----------------------------------------------------------------
def test_engine_filename_and_json_beside_it():
    name = engine_filename("fp16", H100)
    assert name == "fp16.sm90.trt10.13.3.9.plan"
    assert engine_filename("int8", Target("11.1.0.5", "12.0")) == "int8.sm120.trt11.1.0.5.plan"
    assert metadata_path(Path("trt") / name) == Path("trt/fp16.sm90.trt10.13.3.9.json")
    with pytest.raises(ConfigError, match="unknown engine precision"):
        engine_filename("fp32", H100)


def _meta(target: Target = H100, precision: str = "fp16") -> dict:
    profiles = engine_profiles(LAYOUT, max_batch=2, max_sequence=32)
    return build_metadata(
        precision=precision, target=target, profiles=profiles,
        source={"onnx/model_fp16.onnx": "ab" * 32, "onnx/model_fp16.onnx_data": "cd" * 32},
        max_batch=2, max_sequence=32, workspace_bytes=2**30,
        io={"inputs": [s.name for s in LAYOUT.inputs()], "outputs": [s.name for s in LAYOUT.outputs()]},
    )


def test_metadata_json_round_trip(tmp_path):
    meta = _meta()
    path = tmp_path / "fp16.sm90.trt10.13.3.9.json"
    write_metadata(path, meta)
    back = read_metadata(path)
    assert back == meta
    assert back["engine"] == "fp16.sm90.trt10.13.3.9.plan"
    assert (back["tensorrt"], back["compute_capability"], back["gpu"], back["cuda"]) == ("10.13.3.9", "9.0", "NVIDIA H100", "12.8")
    assert back["strongly_typed"] is True and back["max_sequence"] == 32 and back["max_batch"] == 2
    assert back["version_compatible"] is False and back["hardware_compatible"] is False
    assert [p["name"] for p in back["profiles"]] == ["prefill", "decode"]
    assert back["profiles"][1]["shapes"]["attention_mask"] == {"min": [1, 1], "opt": [1, 17], "max": [2, 32]}
    path.write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_metadata(path)
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ArtifactError, match="not an exportline engine"):
        read_metadata(path)


def test_compatible_engine_is_accepted():
    check_engine_compatible(_meta(), H100)  # no exception


@pytest.mark.parametrize(
    "local,what",
    [
        (Target("10.13.3.9", "8.9", "NVIDIA L4"), "compute capability 9.0 (this GPU is 8.9)"),
        (Target("11.1.0.5", "9.0"), "TensorRT 10.13.3.9 (this machine has 11.1.0.5)"),
        (Target("10.13.0.35", "8.0"), "TensorRT 10.13.3.9 (this machine has 10.13.0.35) and compute capability"),
    ],
)
def test_mismatched_engine_is_refused_with_the_rebuild_command(local, what):
    with pytest.raises(ArtifactError) as info:
        check_engine_compatible(_meta(), local, bundle="out/tiny")
    message = str(info.value)
    assert what in message
    assert "exportline export out/tiny --stages trt --force" in message
    assert "\n" not in message


def test_find_engine_picks_this_targets_plan_and_refuses_others(tmp_path):
    (tmp_path / "trt").mkdir()
    with pytest.raises(ArtifactError, match="no fp16 TensorRT engine"):
        find_engine(tmp_path, "fp16", H100)
    plan = tmp_path / "trt" / engine_filename("fp16", H100)
    plan.write_bytes(b"plan bytes are opaque here")
    write_metadata(metadata_path(plan), _meta())
    assert find_engine(tmp_path, "fp16", H100) == (plan, _meta())
    l4 = Target("10.13.3.9", "8.9")
    with pytest.raises(ArtifactError, match=r"compute capability 9\.0 \(this GPU is 8\.9\).*--stages trt --force"):
        find_engine(tmp_path, "fp16", l4)
    with pytest.raises(ArtifactError, match="no int8 TensorRT engine"):
        find_engine(tmp_path, "int8", H100)


@pytest.mark.covers("backend:trt-fp16", "backend:trt-int8")
def test_registry_has_the_trt_backends(tmp_path):
    from exportline.verify.runtime import BACKENDS, make_runner
    from exportline.verify.runtime.trt_runner import TrtRunner

    assert BACKENDS["trt-fp16"].stage == BACKENDS["trt-int8"].stage == "trt"
    runner = TrtRunner(tmp_path, "int8")  # cheap constructor: nothing imported or loaded
    assert runner.name == "trt-int8" and not runner.is_active
    with pytest.raises(ConfigError, match="unknown TensorRT precision"):
        TrtRunner(tmp_path, "fp32")
    with pytest.raises(ConfigError, match="takes no runner options"):
        make_runner(tmp_path, "trt-fp16", threads=2)
    if UNAVAILABLE:
        with pytest.raises(NotAvailable, match=f"backend trt-fp16: not available: {UNAVAILABLE}"):
            make_runner(tmp_path, "trt-fp16")
    else:
        with pytest.raises(ArtifactError, match="no fp16 TensorRT engine.*--stages trt"):
            make_runner(tmp_path, "trt-fp16")


# -- the skip path ----------------------------------------------------------------------------------
needs_no_trt = pytest.mark.skipif(UNAVAILABLE is None, reason="TensorRT and a CUDA GPU are present: the stage builds")


@pytest.mark.covers("stage:trt")
@needs_no_trt
def test_stage_is_skipped_with_the_reason(tmp_path):
    bundle = Bundle(tmp_path / "b")
    result = run_pipeline(bundle, resolve_source("tiny"), stages=parse_stages("trt"))
    record = result.ran[0]
    assert record["status"] == "skipped"
    assert record["reason"] == UNAVAILABLE
    assert UNAVAILABLE.startswith(("TensorRT not installed", "TensorRT failed to import", "no CUDA GPU"))
    assert bundle.read_manifest()["stages"]["trt"]["reason"] == UNAVAILABLE
    assert record["options"]["target"] == f"not available: {UNAVAILABLE}"
    assert not (bundle.root / "trt").exists()
    with pytest.raises(NotAvailable, match=f"stage trt is required .* but {UNAVAILABLE}"):
        run_pipeline(bundle, resolve_source("tiny"), stages=parse_stages("trt"), require=("trt",))


def _exportline(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("exportline")
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=120)


@needs_no_trt
def test_cli_skip_exits_zero_and_require_fails(tmp_path):
    out = tmp_path / "bundle"
    done = _exportline("export", "tiny", "--stages", "trt", "--out", str(out), "--no-verify", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"trt: skipped: {UNAVAILABLE}" in done.stderr
    failed = _exportline("export", "tiny", "--stages", "trt", "--require", "trt", "--out", str(out), "--no-verify", cwd=tmp_path)
    assert failed.returncode == NotAvailable.exit_code
    assert f"error: stage trt is required (--require) but {UNAVAILABLE}" in failed.stderr
    assert "Traceback" not in failed.stderr
    bad = _exportline("export", "tiny", "--stages", "trt", "--trt-max-batch", "-1", "--out", str(out), cwd=tmp_path)
    assert bad.returncode == ConfigError.exit_code and "TensorRT limits must be positive" in bad.stderr


@needs_no_trt
def test_trt_check_reports_not_available(tmp_path):
    from exportline.verify.checks.context import CheckContext
    from exportline.verify.checks.trt import check

    report = check(CheckContext(tmp_path, {"stages": {}}, {}, lambda m: None))
    assert report.stage == "trt" and report.status == "not available"
    assert report.reason == UNAVAILABLE and not report.rows


def test_trt_check_judges_the_recorded_engines_of_this_target(tmp_path):
    from exportline.exporters.core.presets import load_thresholds
    from exportline.verify.checks.context import CheckContext
    from exportline.verify.checks.trt import _recorded_engines, logits_bounds

    thresholds = load_thresholds()
    assert logits_bounds(thresholds, "fp16") == {"rel_l2": thresholds["fp16"]["rel_l2"], "top1": thresholds["fp16"]["top1"]}
    assert logits_bounds(thresholds, "int8") == {"top1": thresholds["int8"]["top1"]}
    name = engine_filename("fp16", H100)
    (tmp_path / "trt").mkdir()
    write_metadata(metadata_path(tmp_path / "trt" / name), _meta())
    manifest = {"stages": {"trt": {"status": "done", "info": {"engines": {"fp16": name}}}}}
    ctx = CheckContext(tmp_path, manifest, thresholds, lambda m: None)
    assert _recorded_engines(ctx, H100) == {"fp16": name}
    with pytest.raises(NotAvailable, match=r"this GPU is 8\.9.*--stages trt --force"):  # cannot run here: not a failure
        _recorded_engines(ctx, Target("10.13.3.9", "8.9"))
    manifest["stages"]["trt"]["info"]["engines"]["int8"] = engine_filename("int8", H100)  # recorded, JSON gone
    with pytest.raises(ArtifactError, match="is missing"):
        _recorded_engines(ctx, H100)
    with pytest.raises(ArtifactError, match="no engine recorded"):
        _recorded_engines(CheckContext(tmp_path, {"stages": {}}, thresholds, lambda m: None), H100)


# -- real TensorRT (skips with the reason without it) -------------------------------------------
def _require_trt_gpu():
    pytest.importorskip("tensorrt", reason="TensorRT not installed")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_build_run_and_verify_fp16_engine(tmp_path):
    _require_trt_gpu()
    import numpy as np

    from exportline.verify.runtime import make_runner
    from exportline.verify.suite import verify_bundle

    bundle = Bundle(tmp_path / "b")
    cache = tmp_path / "timing.cache"
    options = ExportOptions(trt_max_batch=4, trt_max_sequence=128, trt_timing_cache=cache)
    result = run_pipeline(bundle, resolve_source("tiny"), stages=parse_stages("hf,onnx,fp16,trt"), options=options)
    assert result.ran[-1]["status"] == "done", result.ran[-1]
    target = local_target()
    plan = bundle.root / "trt" / engine_filename("fp16", target)
    meta = read_metadata(metadata_path(plan))
    assert plan.stat().st_size > 0 and meta["tensorrt"] == target.tensorrt and meta["max_sequence"] == 128
    assert cache.stat().st_size > 0
    with make_runner(bundle.root, "trt-fp16") as runner:
        layout = KVLayout.from_config(_config(bundle.root))
        ids = np.random.default_rng(0).integers(0, layout.vocab_size, size=(2, 8), dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones((2, 8), np.int64),
                "position_ids": np.tile(np.arange(8, dtype=np.int64), (2, 1))}
        for name in layout.past_names():
            feed[name] = np.zeros((2, layout.num_kv_heads, 0, layout.head_dim), np.float32)
        out = runner.infer(feed)
        assert out["logits"].shape == (2, 8, layout.vocab_size) and np.isfinite(out["logits"]).all()
        assert out["present.0.key"].shape == (2, layout.num_kv_heads, 8, layout.head_dim)
    report = verify_bundle(bundle.root, stages=["trt"])
    assert report.stages[0].status == "passed", report.first_failure()


def _config(root: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(root)
