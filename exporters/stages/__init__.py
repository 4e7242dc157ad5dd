"""exporters/stages"""
