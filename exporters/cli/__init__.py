"""exporters/cli"""
