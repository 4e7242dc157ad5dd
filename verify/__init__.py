"""Numerical verification of every stage against a float64 reference (DESIGN.md §6)."""
