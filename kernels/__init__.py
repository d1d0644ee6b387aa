"""Triton kernels of grun_fast, installed as ``grun_fast.kernels``."""
