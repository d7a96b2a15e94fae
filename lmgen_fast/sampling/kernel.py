"""Launcher of the fused Triton sampler (``backend="triton"`` of :func:`lmgen_fast.sample`).

The kernels (:mod:`lmgen_fast.kernels.sampling`) compute exactly
:func:`lmgen_fast.reference.sample` for seeded rows: same ``z`` (IEEE float32 division by
the temperature, the penalty factors ``p**c`` from the same ``torch.pow``, the frequency and
presence penalties rounded as the reference rounds them), same top-k threshold with ties
kept, same top-p and min-p rules (min-p on the same float32 threshold, bit for bit), same
Philox/Gumbel race with ties to the lower token id. Top-p sums the softmax in another order
than the reference (float32, against float64 prefix sums), so a token whose top-p fate turns
on the last bits of those sums may differ; nothing else may. Log-probabilities, raw or
processed (``logprobs_mode``), come out of the same launches (``logprob_out``).

Cost: with top-k on (``k <= max_top_k``) the logits are read once, top-p and min-p then run
over the top-k candidates. Without top-k, each chunk keeps ``nucleus_candidates`` of its
largest values; when the nucleus (or the min-p survivors) lies among them the logits are
still read once, otherwise the merge re-reads that row ``32 / RB + 1`` times (a radix
search for the top-p cutoff, then the race): exact either way, never a sort.

Launches: three per step, and no torch op besides allocations when the caller keeps the
penalty powers (:func:`penalty_powers`): the set-up kernel (:mod:`lmgen_fast.kernels.window`:
the penalty window grouped by vocabulary chunk, read from a ``[B, W]`` window or straight
from each row's history, and the status words zeroed), the chunk kernel and the merge.

Unseeded rows get a seed from ``torch.randint(0, 2**62)`` on the logits' device, as the
reference does for batches of more than one row; the reference's batch-of-one path
(``torch.multinomial``) is not reproduced token for token, only in distribution.

:func:`launch` is free of host synchronisation and can be captured in a CUDA graph: the
seeds, steps and parameters are read from device tensors and every problem (an empty row,
a top-k beyond the capacity the launch was sized for) is left in a status tensor.
:func:`sample` is the checked entry point: it validates its inputs and raises on a bad status.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from lmgen_fast.core.params import PackedParams, SamplingParams, as_row_params
from lmgen_fast.runtime.failure import (  # noqa: F401  (one record in runtime; re-exported)
    KernelUnavailable,
    guarded,
    kernel_failure,
    note_failure,
    reset_failure,
)
from lmgen_fast.sampling import reference
from lmgen_fast.sampling.reference import EmptyRowError, ParamsLike, SampleLogprobs

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
    from lmgen_fast.kernels import sampling as ks

    return ks


def kernel(name: str):
    """The sampler's JIT function ``name``: a sampling kernel or the set-up kernel."""
    from lmgen_fast.kernels import window as kw

    return getattr(_kernels(), name, None) or getattr(kw, name)


def check_device(logits: torch.Tensor) -> None:
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


STATUS_SLOW = 8  # informational: a top-p/min-p row re-read its logits
# Columns of ``logprob_out`` (see :func:`launch`).
LOGPROB_COLUMNS = 4
# Candidates per chunk kept for top-p/min-p rows without top-k (sample()'s default).
NUCLEUS_CANDIDATES = 64
# Bits of the top-p cutoff found per extra pass of the slow path (16 bins per pass).
RADIX_BITS = 4


@dataclass(frozen=True)
class LaunchPlan:
    """Every static choice of one launch: what the kernels are specialised (compiled) on.

    ``chunk`` logits per program of the chunk kernel (a power of two) and its
    ``chunk_warps``; ``cap`` candidates each chunk may keep (at least ``max_top_k``, so every
    row with ``k <= max_top_k`` is exact, and at least ``2 * nucleus_candidates``: top-p/min-p
    rows without top-k keep ``cap // 2``); the merge kernel reads ``tile`` candidate slots
    at a time (``one_tile``: all of them at once) with ``merge_warps``, ``cp`` chunk
    aggregates per row and ``sub`` logits per block of its multi-pass path.
    """

    chunk: int
    cap: int
    n_chunks: int
    chunk_warps: int
    tile: int
    one_tile: bool
    cp: int
    sub: int
    merge_warps: int


def plan_launch(vocab: int, max_top_k: int, *, cuda: bool, chunk: int | None = None,
                nucleus_candidates: int = 0, chunk_warps: int | None = None) -> LaunchPlan:
    """The launch sizes :func:`launch` uses for a vocabulary and the batch's largest top-k.

    ``cuda`` selects the GPU defaults (larger chunks); the interpreter uses small ones. The
    ahead-of-time compile test enumerates its variants through this function, so a launch
    choice made here cannot escape it.
    """
    kcap = max(0, min(max(int(max_top_k), int(nucleus_candidates)), vocab - 1))
    if chunk is None:
        # 4096 at 8 warps compiles without spills on Triton 3.6 and 3.9 (sm_90a, sm_80);
        # 8192 at 16 warps is capped at 128 registers and spilled 20-24 bytes on 3.6.
        chunk = 4096 if cuda else 1024
    chunk = max(16, min(_next_pow2(chunk), _next_pow2(vocab)))
    cap = min(chunk, _next_pow2(max(2 * kcap, 16)))
    n_chunks = _cdiv(vocab, chunk)
    tile = min(_next_pow2(n_chunks * cap), 4096)
    return LaunchPlan(
        chunk=chunk, cap=cap, n_chunks=n_chunks,
        chunk_warps=chunk_warps or (4 if chunk <= 2048 else (8 if chunk <= 4096 else 16)),
        tile=tile, one_tile=tile >= n_chunks * cap, cp=_next_pow2(n_chunks),
        sub=min(chunk, 1024),
        # ptxas caps the merge at 128 registers from 8 warps on: with 4 or 8 candidates per
        # thread there it spilled 36-250 bytes (sm_90a, Triton 3.6 and 3.9); at most 8 per
        # thread at 16 warps and at most 4 at 4 warps spill nothing or a few words.
        merge_warps=4 if tile <= 512 else 16,
    )


def plan(vocab: int, max_top_k: int, device: torch.device, chunk: int | None = None,
         nucleus_candidates: int = 0) -> tuple[int, int]:
    """``(chunk, cap)`` of :func:`plan_launch` for tensors on ``device``."""
    p = plan_launch(vocab, max_top_k, cuda=torch.device(device).type == "cuda", chunk=chunk,
                    nucleus_candidates=nucleus_candidates)
    return p.chunk, p.cap


class KernelCall(NamedTuple):
    """One kernel launch: the JIT function's name, grid, positional arguments, constexprs
    and compile options (the ahead-of-time compile test builds its signatures from these)."""

    name: str
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict
    options: dict


class HistoryWindow(NamedTuple):
    """A penalty window given as each row's token history, as the engine keeps it.

    Row ``r``'s window is ``hist[r, max(hlen[r] - ranges[r], 0) : hlen[r]]`` (the whole
    ``hist[r, :hlen[r]]`` where ``ranges[r]`` is 0), right-aligned in ``width`` slots and
    ``-1`` padded: the window the reference is given. The set-up kernel reads it from the
    history directly, so no window tensor is built.

    ``hist`` ``[B, H]`` int64, ``hlen`` and ``ranges`` ``[B]`` int64, ``width`` a host int.
    """

    hist: torch.Tensor
    hlen: torch.Tensor
    ranges: torch.Tensor
    width: int


def _window_width(window: torch.Tensor | HistoryWindow | None) -> int:
    if window is None:
        return 0
    return window.width if isinstance(window, HistoryWindow) else window.shape[1]


def penalty_powers(penalty: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, width + 1]`` float32 table of ``penalty ** c`` for ``c = 0 .. width``.

    From the very op the reference uses (``torch.pow`` in float32), so the kernels divide
    by bit-identical factors. It depends on the parameters and the width only: a caller
    that samples many steps with both fixed computes it once and passes it to
    :func:`launch` (``pow_table``).
    """
    exps = torch.arange(width + 1, dtype=torch.float32, device=penalty.device)
    return torch.pow(penalty.unsqueeze(1), exps).contiguous()


def setup_call(window: torch.Tensor | HistoryWindow | None, batch: int, lp: LaunchPlan,
               status: torch.Tensor) -> tuple[KernelCall, torch.Tensor, torch.Tensor]:
    """The set-up launch (:mod:`lmgen_fast.kernels.window`) and the ``(win, wrange)`` it
    fills: the window grouped by chunk and each chunk's slice of it, ``[B, W]`` and
    ``[B, n_chunks + 1]`` int64. It also zeroes ``status``."""
    dev = status.device
    width = _window_width(window)
    n_chunks = lp.n_chunks
    wrange = torch.empty(batch, n_chunks + 1, dtype=torch.int64, device=dev)
    win = torch.empty(batch, max(width, 1), dtype=torch.int64, device=dev)
    if isinstance(window, HistoryWindow):
        src, hlen, ranges = window.hist, window.hlen, window.ranges
        if src.dtype != torch.int64 or src.dim() != 2 or src.stride(1) != 1:
            raise ValueError("HistoryWindow.hist must be a [B, H] int64 tensor with "
                             "contiguous rows")
        stride, cols = src.stride(0), src.shape[1]
    else:
        src = win if window is None or width == 0 else window.contiguous()
        hlen = ranges = wrange  # not read: the window is given
        stride, cols = max(width, 1), max(width, 1)
    cpb = _next_pow2(n_chunks + 2)
    # At most 4K one-hot cells per tile of the window, whatever the chunk count: 8K spilled
    # 52-60 bytes on sm_80 at 4 buckets (Triton 3.9).
    tb = max(16, min(_next_pow2(max(width, 1)), 4096 // cpb))
    call = KernelCall(
        "setup_kernel", (batch,),
        (src, stride, cols, hlen, ranges, width, win, wrange, status, n_chunks),
        dict(CHUNK=lp.chunk, TB=tb, CPB=cpb, FROM_HIST=isinstance(window, HistoryWindow)),
        dict(num_warps=4),
    )
    return call, win, wrange


def kernel_calls(
    logits: torch.Tensor,
    packed: PackedParams,
    window: torch.Tensor | HistoryWindow | None,
    steps: torch.Tensor,
    seed: torch.Tensor,
    lp: LaunchPlan,
    logprob_out: torch.Tensor | None,
    cuda: bool,
    pow_table: torch.Tensor | None = None,
) -> tuple[list[KernelCall], torch.Tensor, torch.Tensor]:
    """The launches of one sampling step, with their buffers allocated on ``logits.device``.

    Returns ``(calls, tokens, status)``; running ``calls`` in order fills the last two.
    Only fixed-shape torch ops run here, so it works on the ``meta`` device too. The first
    call is the set-up (:func:`setup_call`); ``pow_table`` is :func:`penalty_powers` of
    the window's width, computed here when not given.
    """
    batch, vocab = logits.shape
    dev = logits.device
    n_chunks = lp.n_chunks
    status = torch.empty(batch, dtype=torch.int32, device=dev)  # zeroed by the set-up
    setup, win, wrange = setup_call(window, batch, lp, status)
    width = _window_width(window)
    if width == 0:
        pow_table = torch.empty(1, dtype=torch.float32, device=dev)  # not read
    elif pow_table is None:
        pow_table = penalty_powers(packed.penalty, width)
    elif pow_table.shape != (batch, width + 1) or pow_table.dtype != torch.float32 \
            or not pow_table.is_contiguous():
        raise ValueError(f"pow_table must be a contiguous float32 [{batch}, {width + 1}] "
                         f"tensor, got {tuple(pow_table.shape)} {pow_table.dtype}")

    f32 = dict(dtype=torch.float32, device=dev)
    i32 = dict(dtype=torch.int32, device=dev)
    shape = (batch, n_chunks)
    cmax, rkey, gbest, csum = (torch.empty(shape, **f32) for _ in range(4))
    cidx, ridx, ncand, gkey, gcnt, gidx, ctau = (torch.empty(shape, **i32) for _ in range(7))
    ckey = torch.empty(batch * n_chunks * lp.cap, **i32)
    cidx_buf = torch.empty(batch * n_chunks * lp.cap, **i32)
    tokens = torch.empty(batch, dtype=torch.int64, device=dev)
    want_lp = logprob_out is not None
    if want_lp:
        if logprob_out.shape != (batch, LOGPROB_COLUMNS) or logprob_out.dtype != torch.float32 \
                or not logprob_out.is_contiguous():
            raise ValueError(f"logprob_out must be a contiguous float32 [B, {LOGPROB_COLUMNS}] "
                             f"tensor, got {logprob_out.dtype} {tuple(logprob_out.shape)}")
        rmax, rsum = (torch.empty(shape, **f32) for _ in range(2))
    else:
        rmax = rsum = logprob_out = cmax  # never touched: LOGPROBS is off
    temp = packed.temperature.contiguous()
    top_k = packed.top_k.contiguous()
    once = packed.once  # bool: the kernels test it against 0
    # top_p stays float64: the kernels compare their float32 masses with the user's value.
    top_p = packed.top_p.to(dtype=torch.float64, device=dev).contiguous()
    mlog = packed.min_p_log.to(**f32).contiguous()
    fpen = packed.frequency_penalty.to(**f32).contiguous()
    ppen = packed.presence_penalty.to(**f32).contiguous()
    proc = packed.processed.to(torch.int8)
    steps = steps.contiguous()
    # No multiply-add contraction: the reference rounds every float32 op.
    chunk_call = KernelCall(
        "chunk_kernel", (batch, n_chunks),
        (logits, logits.stride(0), vocab,
         temp, top_k, once, seed, steps,
         top_p, mlog, fpen, ppen, proc,
         win, width, wrange, pow_table,
         cmax, cidx, rkey, ridx,
         ncand, ckey, cidx_buf,
         gkey, gcnt, gbest, gidx,
         ctau, csum, rmax, rsum,
         status),
        dict(CHUNK=lp.chunk, CAP=lp.cap, LOGPROBS=want_lp, ACC=cuda),
        dict(num_warps=lp.chunk_warps, enable_fp_fusion=False),
    )
    merge_call = KernelCall(
        "merge_kernel", (batch,),
        (logits, logits.stride(0), vocab, n_chunks,
         temp, top_k, seed, steps,
         top_p, mlog, once, fpen, ppen, proc,
         win, width, wrange, pow_table,
         cmax, cidx, rkey, ridx,
         ncand, ckey, cidx_buf,
         gkey, gcnt, gbest, gidx,
         ctau, csum, rmax, rsum,
         tokens, status, logprob_out),
        dict(CAP=lp.cap, CP=lp.cp, TILE=lp.tile, ONE_TILE=lp.one_tile, CHUNK=lp.chunk,
             SUB=lp.sub, RB=RADIX_BITS, NBINS=1 << RADIX_BITS, LOGPROBS=want_lp, ACC=cuda),
        dict(num_warps=lp.merge_warps, enable_fp_fusion=False),
    )
    return [setup, chunk_call, merge_call], tokens, status


def launch(
    logits: torch.Tensor,
    packed: PackedParams,
    window: torch.Tensor | HistoryWindow | None,
    steps: torch.Tensor,
    *,
    max_top_k: int,
    draw_seeds: bool = True,
    chunk: int | None = None,
    nucleus_candidates: int = 0,
    logprob_out: torch.Tensor | None = None,
    chunk_warps: int | None = None,
    pow_table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernels without any host synchronisation (CUDA-graph capturable).

    Parameters
    ----------
    logits : Tensor
        ``[B, V]`` float32, bfloat16 or float16 (any float dtype Triton loads), last dim
        contiguous (else copied).
    packed : PackedParams
        Per-row parameters, ``[B]`` tensors on ``logits.device``.
    window : LongTensor, HistoryWindow or None
        ``[B, W]`` int64 penalty window, ``-1`` for empty slots; ids outside ``[0, V)`` are
        ignored (validate them beforehand, as :func:`sample` does). Or the same window
        read from each row's history (:class:`HistoryWindow`), with no torch op.
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
    nucleus_candidates : int
        Candidates per chunk to size for top-p/min-p rows without top-k (a speed knob:
        any value is exact; too few send more rows to the multi-pass path).
    logprob_out : Tensor, optional
        float32 ``[B, 4]``; receives per row, in the row's ``logprobs_mode``, the
        log-probability of the sampled token, a shift ``m`` and a log-normaliser ``s``
        (a token's log-probability is ``(v - m) - s``, ``v`` its raw logit or processed
        ``z``; ``m = +inf`` in rows with ``+inf`` values, where ``s`` is each one's share
        ``-log(count)``), and for processed rows the smallest surviving ``z`` (``-inf`` for
        raw rows). Computed in the reads the draw does (:func:`logprob_table` turns it
        into every token's value).
    chunk_warps : int, optional
        Warps per program of the chunk kernel (a speed knob for tuning; default by chunk).
    pow_table : Tensor, optional
        :func:`penalty_powers` of ``packed.penalty`` and the window's width, when the
        caller keeps it across steps (else two torch ops compute it here).

    Returns
    -------
    tokens : LongTensor
        ``[B]`` int64 ids, always in ``[0, V)``.
    status : IntTensor
        ``[B]`` int32 bit set per row: ``STATUS_EMPTY`` (nothing to sample),
        ``STATUS_OVERFLOW``, ``STATUS_INTERNAL``; ``STATUS_SLOW`` is informational (the row
        re-read its logits). The token is exact when no other bit is set.
    """
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    cuda = logits.device.type == "cuda"
    lp = plan_launch(logits.shape[1], max_top_k, cuda=cuda, chunk=chunk,
                     nucleus_candidates=nucleus_candidates, chunk_warps=chunk_warps)
    seed = packed.seed
    if draw_seeds:
        drawn = torch.randint(0, 2**62, (logits.shape[0],), device=logits.device)
        seed = torch.where(packed.seeded, packed.seed, drawn)
    calls, tokens, status = kernel_calls(logits, packed, window, steps, seed, lp,
                                         logprob_out, cuda, pow_table)
    for call in calls:
        kernel(call.name)[call.grid](*call.args, **call.constexprs, **call.options)
    return tokens, status


def on_device(device: torch.device | str | None):
    """A context making ``device`` the current CUDA device (a no-op for other devices):
    Triton kernels, CUDA graphs and streams all act on the current device."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


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
    st = status.cpu() & ~STATUS_SLOW
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


def guarded_launch(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`launch` under :func:`guarded`."""
    return guarded(launch, *args, **kwargs)


def host_hints(params: ParamsLike, packed: PackedParams, batch: int) -> tuple[int, bool, bool]:
    """``(max_top_k, draw_seeds, nucleus)`` from host-side parameters.

    ``nucleus``: some row uses top-p or min-p (synchronises for packed parameters).
    """
    if isinstance(params, PackedParams):
        sampled_unseeded = (packed.temperature != 0) & ~packed.seeded
        nucleus = (packed.top_p < 1) | (packed.min_p > 0)
        return int(packed.top_k.max()), bool(sampled_unseeded.any()), bool(nucleus.any())
    rows: Sequence[SamplingParams] = as_row_params(params, batch)
    draw = any(p.seed is None and p.temperature != 0 for p in rows)
    nucleus = any(p.top_p < 1 or p.min_p > 0 for p in rows)
    return max(max(p.top_k for p in rows), 0), draw, nucleus


def sample(
    logits: torch.Tensor,
    params: ParamsLike,
    window: torch.Tensor | None = None,
    *,
    step: int | torch.Tensor = 0,
    max_top_k: int | None = None,
    check: bool = True,
    chunk: int | None = None,
    nucleus_candidates: int | None = None,
    return_logprobs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, SampleLogprobs]:
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
    nucleus_candidates : int, optional
        See :func:`launch`; default ``NUCLEUS_CANDIDATES`` when a row uses top-p or min-p.
    return_logprobs : bool
        Also return :class:`~lmgen_fast.reference.SampleLogprobs`: the sampled tokens'
        raw log-probabilities (from the kernels' single read) and the top
        ``params.logprobs`` alternatives. The alternatives come from ``torch.topk`` on the
        raw logits (one extra op, only when some row asks for them), ordered as
        :func:`lmgen_fast.reference.raw_logprobs` orders them.

    Returns
    -------
    LongTensor or (LongTensor, SampleLogprobs)
        ``[B]`` int64 token ids on ``logits.device`` (and their log-probabilities).

    Raises
    ------
    ValueError
        Bad shapes, dtypes or window ids; :class:`~lmgen_fast.reference.EmptyRowError`
        for rows with nothing to sample (when ``check``).
    RuntimeError
        CPU tensors without ``TRITON_INTERPRET=1``.

    Notes
    -----
    Should Triton fail to compile or launch the kernels here, this warns once
    (``RuntimeWarning``) and the reference sampler draws instead, on the same device, for
    the rest of the process: the same tokens for seeded rows.
    """
    steps = reference.check_inputs(logits, window, step)
    check_device(logits)
    if kernel_failure() is not None:
        return reference.sample(logits, params, window, step=step,
                                return_logprobs=return_logprobs)
    batch, vocab = logits.shape
    packed = reference.pack(params, batch, logits.device)
    hint_k, draw, nucleus = host_hints(params, packed, batch)
    if max_top_k is None:
        max_top_k = hint_k
    if nucleus_candidates is None:
        nucleus_candidates = NUCLEUS_CANDIDATES if nucleus else 0
    if check and window is not None:
        reference.check_window_values(window, vocab)
    lp = torch.empty(batch, LOGPROB_COLUMNS, dtype=torch.float32, device=logits.device) \
        if return_logprobs else None
    try:
        with on_device(logits.device):
            tokens, status = guarded_launch(
                logits, packed, window, steps, max_top_k=max_top_k, draw_seeds=draw,
                chunk=chunk, nucleus_candidates=nucleus_candidates, logprob_out=lp,
            )
    except KernelUnavailable as exc:
        note_failure(exc)
        return reference.sample(logits, params, window, step=step,
                                return_logprobs=return_logprobs)
    if check:
        raise_for_status(status)
    if not return_logprobs:
        return tokens
    return tokens, logprobs_from_launch(logits, lp, packed.logprobs, packed, window, tokens)


def logprob_table(
    logits: torch.Tensor,
    lp: torch.Tensor,
    packed: PackedParams,
    window: torch.Tensor | None,
    tokens: torch.Tensor,
) -> torch.Tensor:
    """Every token's log-probability, float32 ``[B, V]``, from a launch's ``logprob_out``.

    Raw rows from the logits, processed rows from their ``z`` (:func:`lmgen_fast.reference.
    process_logits`: the kernels' ``z`` bit for bit) masked by the launch's cut, with the
    launch's normaliser: the token's own value is the one the launch wrote. A greedy
    processed row is a point mass on its token. One extra pass over the logits, for the
    top alternatives only.
    """
    shift, norm, cut = lp[:, 1:2], lp[:, 2:3], lp[:, 3:4]
    x = logits.to(torch.float32)
    if bool(packed.processed.any()):
        z = reference.process_logits(logits, packed, window, openai=True)
        z = torch.where(z >= cut, z, float("-inf"))
        x = torch.where(packed.processed.unsqueeze(1), z, x)
    x = torch.where(torch.isnan(x), float("-inf"), x)
    # In rows with +inf values only those have mass, each its share.
    table = torch.where(shift == float("inf"),
                        torch.where(x == float("inf"), norm, float("-inf")),
                        (x - shift) - norm)
    cols = torch.arange(x.shape[1], device=x.device)
    point = torch.where(cols == tokens.unsqueeze(1), 0.0, float("-inf"))
    greedy = packed.processed & (packed.temperature == 0)
    return torch.where(greedy.unsqueeze(1), point, table)


def logprobs_from_launch(
    logits: torch.Tensor,
    lp: torch.Tensor,
    n: int,
    packed: PackedParams | None = None,
    window: torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
) -> SampleLogprobs:
    """The kernels' token log-probabilities plus the top ``n`` alternatives of each row.

    ``packed``, ``window`` and ``tokens`` (the launch's) are needed for ``n > 0``. The
    alternatives are ranked as :func:`lmgen_fast.reference.step_logprobs` ranks them
    (processed rows list their survivors only, id ``-1`` and ``-inf`` past them).
    """
    batch, vocab = logits.shape
    n = min(n, vocab)
    if n <= 0:
        top_ids = torch.empty(batch, 0, dtype=torch.int64, device=logits.device)
        top_lp = torch.empty(batch, 0, dtype=torch.float32, device=logits.device)
        return SampleLogprobs(lp[:, 0], top_ids, top_lp)
    if packed is None or tokens is None:
        raise ValueError("logprobs_from_launch needs the launch's packed params and tokens "
                         f"for n={n} alternatives")
    table = logprob_table(logits, lp, packed, window, tokens)
    top_ids, top_lp = reference._top_logprobs(table, n)
    top_ids = torch.where(packed.processed.unsqueeze(1) & (top_lp == float("-inf")), -1,
                          top_ids)
    return SampleLogprobs(lp[:, 0], top_ids, top_lp)
