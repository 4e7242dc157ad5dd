"""exporters/sources/llama2c"""
