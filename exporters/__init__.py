"""Stages that turn a checkpoint into deployment artifacts (hf, onnx, fp16, int8, trt)."""
