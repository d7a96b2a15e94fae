"""Triton kernels, installed as ``lmgen_fast.kernels`` (never as a bare ``kernels`` package)."""
