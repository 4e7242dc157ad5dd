"""exporters/precision"""
