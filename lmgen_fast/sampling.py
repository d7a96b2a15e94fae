"""``lmgen_fast.sample``: one sampling step, dispatched to a backend."""

from __future__ import annotations

import torch

from . import reference
from .reference import ParamsLike

BACKENDS = ("auto", "reference")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that ``backend`` means for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return "reference"


def sample(
    logits: torch.Tensor,
    params: ParamsLike,
    window: torch.Tensor | None = None,
    *,
    step: int | torch.Tensor = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Draw one token per row of ``logits`` ``[B, V]``; returns int64 ``[B]``.

    Same contract as :func:`lmgen_fast.reference.sample`. ``backend="auto"`` picks the
    fastest exact backend for the tensors' device; "reference" forces the PyTorch path.
    """
    resolve_backend(backend, logits.device)
    return reference.sample(logits, params, window, step=step)
