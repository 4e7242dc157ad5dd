"""Engines are judged against this machine's TensorRT and GPU (DESIGN.md §5)."""

from __future__ import annotations

import json

import pytest

from exportline.deploy import engines


def _plan(tmp_path, name="fp16.sm90.trt10.13.0.plan", sidecar=None):
    (tmp_path / "trt").mkdir(exist_ok=True)
    (tmp_path / "trt" / name).write_bytes(b"plan")
    if sidecar is not None:
        (tmp_path / "trt" / name).with_suffix(".json").write_text(json.dumps(sidecar))
    return f"trt/{name}"


def test_build_env_from_sidecar_overrides_name(tmp_path):
    rel = _plan(tmp_path, sidecar={"build": {"tensorrt_version": "10.14.1", "compute_capability": [8, 9]}})
    env = engines.build_env(tmp_path / rel)
    assert env["tensorrt"] == "10.14.1" and env["sm"] == "89"
    assert engines.build_env(tmp_path / _plan(tmp_path, "int8.sm80.trt10.2.0.plan"))["sm"] == "80"


def test_missing_tensorrt_makes_engines_unusable_with_rebuild_command(tmp_path, monkeypatch):
    monkeypatch.setattr(engines, "local_env", lambda: (None, None, "TensorRT not installed"))
    _plan(tmp_path)
    [check] = engines.check_engines(tmp_path, bundle_arg="out/tiny")
    assert not check.usable and check.reason == "TensorRT not installed"
    assert check.rebuild == "exportline export out/tiny --stages trt"


@pytest.mark.parametrize("local, usable, reason", [
    (("10.13.0", "90", ""), True, "TensorRT 10.13.0 on sm90"),
    (("10.14.1", "90", ""), False, "built with TensorRT 10.13.0, this machine has 10.14.1"),
    (("10.13.0", "89", ""), False, "built for sm90, this GPU is sm89"),
])
def test_version_and_gpu_must_match(tmp_path, monkeypatch, local, usable, reason):
    monkeypatch.setattr(engines, "local_env", lambda: local)
    check = engines.check_engine(tmp_path, _plan(tmp_path))
    assert (check.usable, check.reason) == (usable, reason)


def test_this_machine_reports_missing_tensorrt():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert engines.local_env() == (None, None, "TensorRT not installed")
        return
    pytest.skip("TensorRT is installed here; the cases above cover a present TensorRT")
