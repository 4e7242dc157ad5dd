"""One runner contract for every backend (torch, ONNX Runtime, TensorRT)."""

from .base import Runner

__all__ = ["Runner"]
