"""``lmgen_fast.sample``: one sampling step, dispatched to a backend."""

from __future__ import annotations

import importlib.util

import torch

from lmgen_fast.sampling import reference
from lmgen_fast.sampling.reference import ParamsLike, SampleLogprobs

BACKENDS = ("auto", "reference", "triton")


def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that ``backend`` means for tensors on ``device``.

    "auto" is the Triton kernel for CUDA tensors (when triton is installed) and the
    reference elsewhere; "triton" on CPU tensors needs ``TRITON_INTERPRET=1``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if torch.device(device).type == "cuda" and _have_triton() else "reference"
    return backend


def sample(
    logits: torch.Tensor,
    params: ParamsLike,
    window: torch.Tensor | None = None,
    *,
    step: int | torch.Tensor = 0,
    backend: str = "auto",
    return_logprobs: bool = False,
    token_bitmask: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, SampleLogprobs]:
    """Draw one token per row of ``logits`` ``[B, V]``; returns int64 ``[B]``.

    Same contract as :func:`lmgen_fast.reference.sample`. ``backend="auto"`` picks the
    fastest exact backend for the tensors' device; "reference" forces the PyTorch path;
    "triton" forces the fused kernel (:mod:`lmgen_fast.sampling.kernel`; on CPU tensors it
    runs in Triton's interpreter and needs ``TRITON_INTERPRET=1`` set before triton is
    imported). Seeded rows pick the same tokens on every backend; an unseeded batch of one
    row draws with ``torch.multinomial`` on the reference and by the seeded race (with a
    seed from torch's generator) on the kernel. ``return_logprobs=True`` returns
    ``(tokens, SampleLogprobs)``, each row's in its ``logprobs_mode``: raw, or processed
    (those of the distribution it was drawn from); see
    :func:`lmgen_fast.reference.step_logprobs`. ``token_bitmask`` (int32
    ``[B, ceil(V / 32)]``, bit set = allowed) masks the tokens a grammar forbids this step,
    on every backend (SPEC section 7).
    """
    if not isinstance(logits, torch.Tensor) or resolve_backend(
        backend, logits.device
    ) != "triton":
        # A non-tensor goes to the reference, which raises its ValueError.
        return reference.sample(logits, params, window, step=step,
                                return_logprobs=return_logprobs, token_bitmask=token_bitmask)
    from lmgen_fast.sampling import kernel as kernel_sampler

    return kernel_sampler.sample(logits, params, window, step=step,
                                 return_logprobs=return_logprobs, token_bitmask=token_bitmask)
