"""Triton kernels for fullrange, installed as fullrange.kernels (importable without a GPU)."""
