"""One runner contract for every backend (torch, ONNX Runtime, TensorRT)."""

from exportline.verify.runtime.base import Runner
from exportline.verify.runtime.backends import BACKENDS, backend_names, make_runner

__all__ = ["BACKENDS", "Runner", "backend_names", "make_runner"]
