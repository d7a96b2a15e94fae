"""Launcher of the decode loop's bookkeeping kernel (:mod:`lmgen_fast.kernels.bookkeeping`).

The engine keeps, per row, the tokens it sampled, their log-probabilities, a history for
the penalties, a count of kept tokens, stop flags and its own step counter. With the Triton
sampler, one launch updates all of them after each draw, where the eager engine (the
reference path) runs about thirty torch ops; both are :meth:`Ledger.book` and
:func:`book_eager`, tested against each other. Nothing here reads a tensor's values, so the
launch is captured in the step's CUDA graph.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lmgen_fast.core.errors import STATUS_SLOW
from lmgen_fast.core.intmath import next_pow2
from lmgen_fast.runtime.launch import KernelCall


def _kernels():
    from lmgen_fast.kernels import bookkeeping

    return bookkeeping


class Ledger(NamedTuple):
    """The per-row buffers of one decode, all on one device (``B`` rows).

    ``out`` ``[B, C]`` int64 (row ``r``'s token of its step ``s`` at ``out[r, s]``),
    ``token_lp`` ``[B, C]`` float32 or None, ``top_ids`` ``[B, C, N]`` int64 and ``top_lp``
    ``[B, C, N]`` float32 or both None, ``hist`` ``[B, H]`` int64 (the penalty history),
    ``hlen``, ``tokens``, ``step``, ``count``, ``max_tokens``, ``bad_step`` ``[B]`` int64,
    ``done`` ``[B]`` bool, ``bad_bits`` ``[B]`` int32.
    """

    out: torch.Tensor
    token_lp: torch.Tensor | None
    top_ids: torch.Tensor | None
    top_lp: torch.Tensor | None
    hist: torch.Tensor
    hlen: torch.Tensor
    tokens: torch.Tensor
    step: torch.Tensor
    count: torch.Tensor
    max_tokens: torch.Tensor
    done: torch.Tensor
    bad_step: torch.Tensor
    bad_bits: torch.Tensor


def book_call(led: Ledger, tokens: torch.Tensor, status: torch.Tensor | None,
              eos: int | torch.Tensor, token_lp: torch.Tensor | None = None,
              top_ids: torch.Tensor | None = None,
              top_lp: torch.Tensor | None = None) -> KernelCall:
    """The launch of :func:`book`, checked; no torch op runs (it works on ``meta``)."""
    batch, cols = led.out.shape
    if tokens.shape != (batch,) or tokens.dtype != torch.int64:
        raise ValueError(f"tokens must be an int64 [{batch}] tensor, got "
                         f"{tuple(tokens.shape)} {tokens.dtype}")
    if status is None:
        status = led.bad_bits  # a sampler without status: no flag, no host wait
        ignore = -1
    else:
        if status.shape != (batch,) or status.dtype != torch.int32:
            raise ValueError(f"status must be an int32 [{batch}] tensor, got "
                             f"{tuple(status.shape)} {status.dtype}")
        ignore = STATUS_SLOW
    logprobs = led.token_lp is not None
    if logprobs != (token_lp is not None):
        raise ValueError("token_lp must be given exactly when the ledger keeps log-probs")
    if token_lp is not None and (token_lp.shape[0] != batch or token_lp.dtype != torch.float32
                                 or token_lp.dim() != 1):
        raise ValueError(f"token_lp must be a float32 [{batch}] tensor, got "
                         f"{tuple(token_lp.shape)} {token_lp.dtype}")
    n = 0 if led.top_ids is None else led.top_ids.shape[2]
    if n:
        if top_ids is None or top_lp is None or top_ids.shape != (batch, n) \
                or top_lp.shape != (batch, n):
            raise ValueError(f"top_ids and top_lp must be [{batch}, {n}] tensors")
        top_ids, top_lp = top_ids.contiguous(), top_lp.float().contiguous()
    dummy = led.out
    stops, end = 0, eos
    if isinstance(eos, torch.Tensor):
        if eos.dim() != 2 or eos.shape[0] != batch or eos.dtype != torch.int64 \
                or not eos.is_contiguous():
            raise ValueError(f"stop ids must be a contiguous int64 [{batch}, S] tensor, got "
                             f"{tuple(eos.shape)} {eos.dtype}")
        stops, end = eos.shape[1], -1
    return KernelCall(
        "bookkeeping_kernel", (batch,),
        (tokens.contiguous(), status,
         dummy if token_lp is None else token_lp,
         1 if token_lp is None else token_lp.stride(0),
         top_ids if n else dummy, top_lp if n else dummy,
         led.out, led.token_lp if logprobs else dummy, led.top_ids if n else dummy,
         led.top_lp if n else dummy, cols,
         led.hist, led.hist.shape[1], led.hlen, led.tokens, led.step,
         led.count, led.max_tokens, led.done, led.bad_step, led.bad_bits,
         int(end), ignore, eos if stops else dummy, max(stops, 1)),
        dict(LOGPROBS=logprobs, TOP_N=n, NB=next_pow2(n), STOPS=stops, SB=next_pow2(stops)),
        dict(num_warps=1),
    )


def book(led: Ledger, tokens: torch.Tensor, status: torch.Tensor | None,
         eos: int | torch.Tensor, token_lp: torch.Tensor | None = None,
         top_ids: torch.Tensor | None = None, top_lp: torch.Tensor | None = None) -> None:
    """Book one step's draws into ``led``, in place, in one Triton launch.

    Parameters
    ----------
    led : Ledger
        The decode's buffers (see :class:`Ledger`); every row is at its own ``led.step``.
    tokens : LongTensor
        ``[B]`` int64, the sampled ids.
    status : IntTensor or None
        ``[B]`` int32 sampler status (:mod:`lmgen_fast.sampling.kernel`); a running row with
        a flag other than ``STATUS_SLOW`` is marked bad and stops. None: no flags.
    eos : int or LongTensor
        The id that ends every row (any int; one no token has never matches), or int64
        ``[B, S]`` ids per row (``PackedParams.stop_ids``: the end ids, then the row's
        ``stop_token_ids``, ``-1`` padded), any of which ends row ``r``.
    token_lp : Tensor, optional
        ``[B]`` float32 (a strided view is fine), when the ledger keeps log-probs.
    top_ids, top_lp : Tensor, optional
        ``[B, N]`` int64 and float32, when the ledger keeps ``N`` top alternatives.
    """
    call = book_call(led, tokens, status, eos, token_lp, top_ids, top_lp)
    getattr(_kernels(), call.name)[call.grid](*call.args, **call.constexprs, **call.options)


def book_eager(led: Ledger, tokens: torch.Tensor, status: torch.Tensor | None,
               eos: int | torch.Tensor, token_lp: torch.Tensor | None = None,
               top_ids: torch.Tensor | None = None, top_lp: torch.Tensor | None = None,
               rows: torch.Tensor | None = None) -> None:
    """:func:`book` in torch ops: the reference path's bookkeeping, bit for bit today's.

    ``rows`` is ``arange(B)`` on the ledger's device (made here when not given).
    """
    if rows is None:
        rows = torch.arange(led.out.shape[0], device=led.out.device)
    active = ~led.done
    if status is not None:
        bits = status & ~STATUS_SLOW
        newly = active & (bits != 0)
        led.bad_step.copy_(torch.where(newly & (led.bad_step < 0), led.step, led.bad_step))
        led.bad_bits.bitwise_or_(torch.where(newly, bits, 0))
        active = active & (bits == 0)
    eot = ending(tokens, eos)
    at = (rows, led.step)
    led.out.index_put_(at, tokens)
    if token_lp is not None:
        led.token_lp.index_put_(at, token_lp.float())
        if led.top_ids is not None:
            led.top_ids.index_put_(at, top_ids)
            led.top_lp.index_put_(at, top_lp.float())
    led.count.add_(active & ~eot)
    led.done.logical_or_(~active | eot | (led.count >= led.max_tokens))
    led.hist.index_put_((rows, led.hlen), tokens)
    led.hlen.add_(1)
    led.tokens.copy_(tokens)
    led.step.add_(1)


def ending(tokens: torch.Tensor, eos: int | torch.Tensor) -> torch.Tensor:
    """bool ``[B]``: whether each row's token ``tokens`` (int64 ``[B]``) ends it; ``eos``
    as for :func:`book`."""
    if isinstance(eos, torch.Tensor):
        if eos.shape[1] == 1:  # one id per row (no stop ids): one op, as for an int
            return tokens == eos[:, 0]
        return (tokens.unsqueeze(1) == eos).any(dim=1)
    return tokens == eos
