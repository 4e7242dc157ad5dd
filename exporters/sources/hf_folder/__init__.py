"""exporters/sources/hf_folder"""
