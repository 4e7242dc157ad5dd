"""exporters/core"""
