"""Sampling one step: the reference sampler (the semantics in PyTorch), the Triton kernel
sampler, and :func:`sample`, which picks one of them for the logits' device."""

from lmgen_fast.sampling.dispatch import BACKENDS, resolve_backend, sample

__all__ = ["BACKENDS", "resolve_backend", "sample"]
