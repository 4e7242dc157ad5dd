"""One runner contract for every backend (torch, ONNX Runtime, TensorRT)."""

from .base import Runner
from .registry import BACKENDS, backend_names, make_runner

__all__ = ["BACKENDS", "Runner", "backend_names", "make_runner"]
