"""Engines are judged against this machine's TensorRT and GPU (DESIGN.md §5)."""

from __future__ import annotations

import pytest

from exportline.deploy import engines
from exportline.exporters.core.errors import NotAvailable
from exportline.exporters.tensorrt.engines import META_FORMAT, Target, metadata_path, write_metadata

H100 = Target(tensorrt="10.13.0", compute_capability="9.0", gpu="NVIDIA H100", cuda="12.8")


def _plan(tmp_path, name="fp16.sm90.trt10.13.0.plan", meta=True):
    (tmp_path / "trt").mkdir(exist_ok=True)
    plan = tmp_path / "trt" / name
    plan.write_bytes(b"plan")
    if meta:
        write_metadata(metadata_path(plan), {"format": META_FORMAT, "engine": name, "tensorrt": "10.13.0",
                                             "compute_capability": "9.0"})
    return f"trt/{name}"


def _local(target):
    def local_target():
        if isinstance(target, Exception):
            raise target
        return target
    return local_target


def test_missing_tensorrt_makes_engines_unusable_with_rebuild_command(tmp_path, monkeypatch):
    monkeypatch.setattr(engines, "local_target", _local(NotAvailable("TensorRT not installed")))
    _plan(tmp_path)
    [check] = engines.check_engines(tmp_path, bundle_arg="out/tiny")
    assert not check.usable and check.reason == "TensorRT not installed"
    assert check.rebuild == "exportline export out/tiny --stages trt --force"


@pytest.mark.parametrize("local, usable, reason", [
    (H100, True, "TensorRT 10.13.0 on compute capability 9.0"),
    (Target("10.14.1", "9.0", "H100", "12.8"), False, "TensorRT 10.13.0 (this machine has 10.14.1)"),
    (Target("10.13.0", "8.9", "L4", "12.8"), False, "compute capability 9.0 (this GPU is 8.9)"),
])
def test_version_and_gpu_must_match(tmp_path, monkeypatch, local, usable, reason):
    monkeypatch.setattr(engines, "local_target", _local(local))
    check = engines.check_engine(tmp_path, _plan(tmp_path))
    assert check.usable == usable and reason in check.reason


def test_engine_without_its_json_is_unusable(tmp_path, monkeypatch):
    monkeypatch.setattr(engines, "local_target", _local(H100))
    check = engines.check_engine(tmp_path, _plan(tmp_path, meta=False))
    assert not check.usable and "is missing" in check.reason


def test_this_machine_reports_missing_tensorrt_or_gpu(tmp_path):
    _plan(tmp_path)
    [check] = engines.check_engines(tmp_path)
    try:
        import tensorrt  # noqa: F401
        import torch

        if torch.cuda.is_available():
            pytest.skip("TensorRT and a GPU are here; the cases above cover a present TensorRT")
    except ImportError:
        pass
    assert not check.usable and check.reason in ("TensorRT not installed", "no CUDA GPU")
