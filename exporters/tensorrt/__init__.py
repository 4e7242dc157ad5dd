"""exporters/tensorrt"""
