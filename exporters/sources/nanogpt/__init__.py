"""exporters/sources/nanogpt"""
