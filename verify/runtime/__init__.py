"""One runner contract for every backend (torch, ONNX Runtime, TensorRT)."""

from exportline.verify.runtime.backends import BACKENDS, Backend, make_runner
from exportline.verify.runtime.base import Runner

__all__ = ["BACKENDS", "Backend", "Runner", "make_runner"]
