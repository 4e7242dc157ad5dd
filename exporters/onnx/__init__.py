"""exporters/onnx"""
