"""Launcher of the fused Triton sampler (``backend="triton"`` of :func:`lmgen_fast.sample`).

The kernels (:mod:`lmgen_fast.kernels.sampling`) compute exactly
:func:`lmgen_fast.reference.sample` for seeded rows: same ``z`` (IEEE float32 division by
the temperature, the penalty factors ``p**c`` from the same ``torch.pow``), same top-k
threshold with ties kept, same Philox/Gumbel race with ties to the lower token id.

Unseeded rows get a seed from ``torch.randint(0, 2**62)`` on the logits' device, as the
reference does for batches of more than one row; the reference's batch-of-one path
(``torch.multinomial``) is not reproduced token for token, only in distribution.

:func:`launch` is free of host synchronisation and can be captured in a CUDA graph: the
seeds, steps and parameters are read from device tensors and every problem (an empty row,
a top-k beyond the capacity the launch was sized for) is left in a status tensor.
:func:`sample` is the checked entry point: it validates its inputs and raises on a bad status.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from . import reference
from .params import PackedParams, SamplingParams, as_row_params
from .reference import EmptyRowError, ParamsLike

STATUS_EMPTY = 1
STATUS_OVERFLOW = 2
STATUS_INTERNAL = 4

_INTERPRET_HINT = (
    "backend='triton' on CPU tensors runs the Triton kernels in the interpreter: set the "
    "environment variable TRITON_INTERPRET=1 before triton is first imported (e.g. "
    "`TRITON_INTERPRET=1 python ...`), or pass CUDA tensors, or use backend='reference'."
)


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _kernels():
    """The kernel module, checked to run where the tensors are."""
    from .kernels import sampling as ks

    return ks


def _check_device(logits: torch.Tensor) -> None:
    if logits.device.type == "cuda":
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise RuntimeError(
                "TRITON_INTERPRET=1 is set, so the Triton kernels were built for the "
                "interpreter and cannot run on CUDA tensors; unset it to use the GPU"
            )
        return
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(_INTERPRET_HINT)
    if type(_kernels().chunk_kernel).__name__ != "InterpretedFunction":
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after triton compiled the kernels for the GPU. "
            + _INTERPRET_HINT
        )


def plan(vocab: int, max_top_k: int, device: torch.device, chunk: int | None = None):
    """Static launch sizes for a vocabulary and the largest top-k of the batch.

    Returns ``(chunk, cap)``: logits per program (a power of two) and candidates each chunk
    may keep (at least ``max_top_k``, so every row with ``k <= max_top_k`` is exact).
    """
    kcap = max(0, min(int(max_top_k), vocab - 1))
    if chunk is None:
        chunk = 1024 if device.type != "cuda" else (4096 if kcap <= 256 else 8192)
    chunk = max(16, min(_next_pow2(chunk), _next_pow2(vocab)))
    cap = min(chunk, _next_pow2(max(2 * kcap, 16)))
    return chunk, cap


def launch(
    logits: torch.Tensor,
    packed: PackedParams,
    window: torch.Tensor | None,
    steps: torch.Tensor,
    *,
    max_top_k: int,
    draw_seeds: bool = True,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernels without any host synchronisation (CUDA-graph capturable).

    Parameters
    ----------
    logits : Tensor
        ``[B, V]`` float32, bfloat16 or float16 (any float dtype Triton loads), last dim
        contiguous (else copied).
    packed : PackedParams
        Per-row parameters, ``[B]`` tensors on ``logits.device``.
    window : LongTensor or None
        ``[B, W]`` int64 penalty window, ``-1`` for empty slots; ids outside ``[0, V)`` are
        ignored (validate them beforehand, as :func:`sample` does).
    steps : LongTensor
        ``[B]`` int64 decode steps in ``[0, 2**32)`` on ``logits.device``.
    max_top_k : int
        Static bound on the rows' ``top_k``; sizes the candidate buffers. A row with a
        larger ``k`` (``< V``) gets ``STATUS_OVERFLOW``; its token is not meaningful.
    draw_seeds : bool
        Draw seeds for unseeded rows with ``torch.randint`` on the device (consumes the
        generator even when every row is seeded). ``False`` uses ``packed.seed`` as is.
    chunk : int, optional
        Logits per program (power of two); default by device and ``max_top_k``.

    Returns
    -------
    tokens : LongTensor
        ``[B]`` int64 ids, always in ``[0, V)``.
    status : IntTensor
        ``[B]`` int32 bit set per row: ``STATUS_EMPTY`` (nothing to sample),
        ``STATUS_OVERFLOW``, ``STATUS_INTERNAL``; 0 when the token is exact.
    """
    ks = _kernels()
    batch, vocab = logits.shape
    dev = logits.device
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    chunk, cap = plan(vocab, max_top_k, dev, chunk)
    n_chunks = _cdiv(vocab, chunk)

    seed = packed.seed
    if draw_seeds:
        drawn = torch.randint(0, 2**62, (batch,), device=dev)
        seed = torch.where(packed.seeded, packed.seed, drawn)

    if window is None or window.shape[1] == 0:
        width = 0
        win = torch.zeros(1, dtype=torch.int64, device=dev)
        wrange = torch.zeros(batch, n_chunks + 1, dtype=torch.int64, device=dev)
        pow_table = torch.ones(1, dtype=torch.float32, device=dev)
    else:
        width = window.shape[1]
        win = torch.sort(window, dim=1).values.contiguous()
        bounds = torch.arange(n_chunks + 1, device=dev, dtype=torch.int64) * chunk
        wrange = torch.searchsorted(win, bounds.expand(batch, -1).contiguous())
        # Factors p**c from the very op the reference uses (torch.pow in float32), so the
        # kernel divides by bit-identical values.
        exps = torch.arange(width + 1, dtype=torch.float32, device=dev)
        pow_table = torch.pow(packed.penalty.unsqueeze(1), exps).contiguous()

    f32 = dict(dtype=torch.float32, device=dev)
    i32 = dict(dtype=torch.int32, device=dev)
    shape = (batch, n_chunks)
    cmax, rkey, gbest = (torch.empty(shape, **f32) for _ in range(3))
    cidx, ridx, ncand, gkey, gcnt, gidx = (torch.empty(shape, **i32) for _ in range(6))
    ckey = torch.empty(batch * n_chunks * cap, **i32)
    cidx_buf = torch.empty(batch * n_chunks * cap, **i32)
    status = torch.zeros(batch, **i32)
    tokens = torch.empty(batch, dtype=torch.int64, device=dev)
    temp = packed.temperature.contiguous()
    top_k = packed.top_k.contiguous()
    once = packed.once.to(torch.int8)
    steps = steps.contiguous()

    warps = 4 if chunk <= 2048 else (8 if chunk <= 4096 else 16)
    ks.chunk_kernel[(batch, n_chunks)](
        logits, logits.stride(0), vocab,
        temp, top_k, once, seed, steps,
        win, width, wrange, pow_table,
        cmax, cidx, rkey, ridx,
        ncand, ckey, cidx_buf,
        gkey, gcnt, gbest, gidx,
        status,
        CHUNK=chunk, CAP=cap, num_warps=warps,
        # No multiply-add contraction: the reference rounds every float32 op.
        enable_fp_fusion=False,
    )
    tile = min(_next_pow2(n_chunks * cap), 4096)
    ks.merge_kernel[(batch,)](
        vocab, n_chunks,
        temp, top_k, seed, steps,
        cmax, cidx, rkey, ridx,
        ncand, ckey, cidx_buf,
        gkey, gcnt, gbest, gidx,
        tokens, status,
        CAP=cap, CP=_next_pow2(n_chunks), TILE=tile, ONE_TILE=tile >= n_chunks * cap,
        num_warps=4 if tile <= 1024 else 8, enable_fp_fusion=False,
    )
    return tokens, status


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def raise_for_status(status: torch.Tensor) -> None:
    """Raise for the rows :func:`launch` flagged (synchronises with the device).

    Raises
    ------
    EmptyRowError
        Rows with no finite or ``+inf`` value (same error as the reference).
    RuntimeError
        A row whose ``top_k`` exceeded ``max_top_k``, or an internal error.
    """
    st = status.cpu()
    if not bool(st.any()):
        return
    empty = ((st & STATUS_EMPTY) != 0).nonzero().flatten().tolist()
    if empty:
        raise EmptyRowError(empty)
    over = ((st & STATUS_OVERFLOW) != 0).nonzero().flatten().tolist()
    if over:
        raise RuntimeError(f"rows {over} have top_k larger than the max_top_k of the launch")
    bad = ((st & STATUS_INTERNAL) != 0).nonzero().flatten().tolist()
    raise RuntimeError(f"internal error of the Triton sampler on rows {bad}")


def _host_hints(params: ParamsLike, packed: PackedParams, batch: int) -> tuple[int, bool]:
    """``(max_top_k, draw_seeds)`` from host-side parameters (synchronises for packed ones)."""
    if isinstance(params, PackedParams):
        sampled_unseeded = (packed.temperature != 0) & ~packed.seeded
        return int(packed.top_k.max()), bool(sampled_unseeded.any())
    rows: Sequence[SamplingParams] = as_row_params(params, batch)
    draw = any(p.seed is None and p.temperature != 0 for p in rows)
    return max(max(p.top_k for p in rows), 0), draw


def sample(
    logits: torch.Tensor,
    params: ParamsLike,
    window: torch.Tensor | None = None,
    *,
    step: int | torch.Tensor = 0,
    max_top_k: int | None = None,
    check: bool = True,
    chunk: int | None = None,
) -> torch.Tensor:
    """One sampling step by the Triton kernels: same contract as the reference.

    Parameters
    ----------
    logits : Tensor
        ``[B, V]`` float32, bfloat16 or float16, on CUDA, or on the CPU under
        ``TRITON_INTERPRET=1``. Not modified.
    params : SamplingParams, sequence of SamplingParams, or PackedParams
        One for all rows or one per row.
    window : LongTensor, optional
        ``[B, W]`` int64, ``-1`` for empty slots.
    step : int or LongTensor
        Decode step keying the noise (scalar or ``[B]``), in ``[0, 2**32)``.
    max_top_k : int, optional
        Bound on the rows' ``top_k``; taken from ``params`` when omitted (a device sync
        for PackedParams).
    check : bool
        Validate the window ids and raise on a flagged row (both synchronise). With
        ``False`` an empty row silently yields token 0.
    chunk : int, optional
        Logits per program; see :func:`plan`.

    Returns
    -------
    LongTensor
        ``[B]`` int64 token ids on ``logits.device``.

    Raises
    ------
    ValueError
        Bad shapes, dtypes or window ids; :class:`~lmgen_fast.reference.EmptyRowError`
        for rows with nothing to sample (when ``check``).
    RuntimeError
        CPU tensors without ``TRITON_INTERPRET=1``.
    """
    steps = reference.check_inputs(logits, window, step)
    _check_device(logits)
    batch, vocab = logits.shape
    packed = reference.pack(params, batch, logits.device)
    hint_k, draw = _host_hints(params, packed, batch)
    if max_top_k is None:
        max_top_k = hint_k
    if check and window is not None:
        reference.check_window_values(window, vocab)
    tokens, status = launch(
        logits, packed, window, steps, max_top_k=max_top_k, draw_seeds=draw, chunk=chunk
    )
    if check:
        raise_for_status(status)
    return tokens
