"""The launches of one step of the Triton sampler: the set-up kernel
(:mod:`lmgen_fast.kernels.window`), the chunk kernel (:mod:`lmgen_fast.kernels.chunk`) and
the merge (:mod:`lmgen_fast.kernels.merge`), built as :class:`~lmgen_fast.runtime.launch.
KernelCall` records with their buffers, and run without any host synchronisation.

:func:`launch` is free of host synchronisation and can be captured in a CUDA graph: the
seeds, steps and parameters are read from device tensors and every problem (an empty row,
a top-k beyond the capacity the launch was sized for) is left in a status tensor, which
:func:`raise_for_status` turns into the reference's errors.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from lmgen_fast.core.errors import (
    STATUS_EMPTY,
    STATUS_INTERNAL,
    STATUS_OVERFLOW,
    STATUS_SLOW,
    EmptyRowError,
)
from lmgen_fast.core.intmath import next_pow2
from lmgen_fast.core.params import PackedParams
from lmgen_fast.core.rows import fill_unseeded
from lmgen_fast.runtime.launch import KernelCall
from lmgen_fast.sampling.launch_plan import LOGPROB_COLUMNS, RADIX_BITS, LaunchPlan, plan_launch

# Threads per warp of the GPUs the kernels are built for (NVIDIA).
WARP_SIZE = 32
# The merge's multi-pass path reads SUB / 4 logits per block where the launch has masks:
# their code in its loops spilled 236 bytes at SUB = 1024 (sm_90a, 16 warps, Triton 3.9),
# 60 at 512, none at 256. That path is the rare one (STATUS_SLOW), so fewer lanes do it.
MASKED_SUB_SHRINK = 4

INTERPRET_HINT = (
    "backend='triton' on CPU tensors runs the Triton kernels in the interpreter: set the "
    "environment variable TRITON_INTERPRET=1 before triton is first imported (e.g. "
    "`TRITON_INTERPRET=1 python ...`), or pass CUDA tensors, or use backend='reference'."
)


def kernel(name: str):
    """The sampler's JIT function ``name``: the set-up, chunk or merge kernel.

    Looked up in its module at every call (tests replace the kernels there), and imported
    only then: importing triton is slow, and it is absent off Linux.
    """
    from lmgen_fast.kernels import chunk, merge, window

    for module in (chunk, merge, window):
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"the sampler has no kernel {name!r}")


def check_device(logits: torch.Tensor) -> None:
    """Raise RuntimeError unless the kernels can run where ``logits`` (``[B, V]``) lives:
    CUDA without ``TRITON_INTERPRET=1``, or the CPU with the interpreter chosen before
    triton compiled the kernels."""
    if logits.device.type == "cuda":
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise RuntimeError(
                "TRITON_INTERPRET=1 is set, so the Triton kernels were built for the "
                "interpreter and cannot run on CUDA tensors; unset it to use the GPU"
            )
        return
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(INTERPRET_HINT)
    if type(kernel("chunk_kernel")).__name__ != "InterpretedFunction":
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after triton compiled the kernels for the GPU. "
            + INTERPRET_HINT
        )


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


def window_width(window: torch.Tensor | HistoryWindow | None) -> int:
    """Slots of a penalty window: ``W`` of a ``[B, W]`` tensor, a history window's
    ``width``, 0 without one."""
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
    width = window_width(window)
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
    cpb = next_pow2(n_chunks + 2)
    # At most 4K one-hot cells per tile of the window, whatever the chunk count: 8K spilled
    # 52-60 bytes on sm_80 at 4 buckets (Triton 3.9).
    tb = max(16, min(next_pow2(max(width, 1)), 4096 // cpb))
    call = KernelCall(
        "setup_kernel", (batch,),
        (src, stride, cols, hlen, ranges, width, win, wrange, status, n_chunks),
        dict(CHUNK=lp.chunk, TB=tb, CPB=cpb, FROM_HIST=isinstance(window, HistoryWindow)),
        dict(num_warps=4),
    )
    return call, win, wrange


def _pow_table(packed: PackedParams, width: int, pow_table: torch.Tensor | None,
               dev: torch.device) -> torch.Tensor:
    """The penalty powers the chunk kernel reads: ``pow_table`` checked, or computed."""
    batch = packed.penalty.shape[0]
    if width == 0:
        return torch.empty(1, dtype=torch.float32, device=dev)  # not read
    if pow_table is None:
        return penalty_powers(packed.penalty, width)
    if pow_table.shape != (batch, width + 1) or pow_table.dtype != torch.float32 \
            or not pow_table.is_contiguous():
        raise ValueError(f"pow_table must be a contiguous float32 [{batch}, {width + 1}] "
                         f"tensor, got {tuple(pow_table.shape)} {pow_table.dtype}")
    return pow_table


def _scratch(batch: int, lp: LaunchPlan, dev: torch.device,
             logprob_out: torch.Tensor | None) -> tuple[tuple, torch.Tensor]:
    """The per-chunk buffers the chunk kernel fills and the merge reads, in the kernels'
    argument order (``cmax`` .. ``rsum``), and the ``logprob_out`` to pass (a dummy when
    log-probabilities are off)."""
    f32 = dict(dtype=torch.float32, device=dev)
    i32 = dict(dtype=torch.int32, device=dev)
    shape = (batch, lp.n_chunks)
    cmax, rkey, gbest, csum = (torch.empty(shape, **f32) for _ in range(4))
    cidx, ridx, ncand, gkey, gcnt, gidx, ctau = (torch.empty(shape, **i32) for _ in range(7))
    ckey = torch.empty(batch * lp.n_chunks * lp.cap, **i32)
    cidx_buf = torch.empty(batch * lp.n_chunks * lp.cap, **i32)
    if logprob_out is not None:
        if logprob_out.shape != (batch, LOGPROB_COLUMNS) or logprob_out.dtype != torch.float32 \
                or not logprob_out.is_contiguous():
            raise ValueError(f"logprob_out must be a contiguous float32 [B, {LOGPROB_COLUMNS}] "
                             f"tensor, got {logprob_out.dtype} {tuple(logprob_out.shape)}")
        rmax, rsum = (torch.empty(shape, **f32) for _ in range(2))
    else:
        rmax = rsum = logprob_out = cmax  # never touched: LOGPROBS is off
    return ((cmax, cidx, rkey, ridx, ncand, ckey, cidx_buf, gkey, gcnt, gbest, gidx,
             ctau, csum, rmax, rsum), logprob_out)


# What the sampler kernels read of PackedParams, in their argument order, and the dtypes they
# take: those PackedParams.from_rows packs (bool flags are read as bytes and tested against
# 0; top_p stays float64, the kernels compare their float32 masses with the user's value).
KERNEL_PARAMS = (
    ("temperature", torch.float32), ("top_k", torch.int64), ("once", torch.bool),
    ("top_p", torch.float64), ("min_p_log", torch.float32),
    ("frequency_penalty", torch.float32), ("presence_penalty", torch.float32),
    ("processed", torch.bool),
)


def kernel_params(packed: PackedParams, dev: torch.device) -> tuple[torch.Tensor, ...]:
    """The ``[B]`` tensors of :data:`KERNEL_PARAMS`, contiguous, on ``dev``, in its dtypes.

    Parameters packed by :meth:`PackedParams.from_rows` (and their ``take``/``to``) are
    already so and come back as they are, with no torch op: a launch runs no copy kernel
    per step. Only parameters packed otherwise are converted (one copy each).
    """
    out = []
    for name, dtype in KERNEL_PARAMS:
        t = getattr(packed, name)
        if t.dtype != dtype or t.device != dev or not t.is_contiguous():
            t = t.to(device=dev, dtype=dtype).contiguous()
        out.append(t)
    return tuple(out)


def constraint_args(packed: PackedParams,
                    token_bitmask: torch.Tensor | None) -> tuple[tuple, bool]:
    """The chunk and merge kernels' SPEC section 7 arguments (``flags_ptr`` .. ``S``) and
    their ``MASKS`` switch: on where ``packed`` has ``constraints`` (some row has a bias,
    an allowed set or ``min_tokens``) or a ``token_bitmask`` is given: host facts, no sync.
    Absent tensors are passed as a placeholder the kernels never read."""
    none = packed.min_tokens  # a placeholder, never read where its size is 0 or MASKS off
    k = packed.bias_ids.shape[1] if packed.bias_ids is not None else 0
    words = packed.allowed.shape[1] if packed.allowed is not None else 0
    bm_words = token_bitmask.shape[1] if token_bitmask is not None else 0
    masks = packed.constraints is not None or bm_words > 0
    stop = packed.stop_ids.contiguous()
    # A bitmask with rows packed without constraints (a caller's own mask): flags 0, one
    # allocation (the engine packs grammar rows with constraints: none there).
    flags = packed.constraints
    if flags is None:
        flags = none if not masks else torch.zeros(packed.min_tokens.shape, dtype=torch.int32,
                                                   device=none.device)
    args = (flags,
            packed.min_tokens.contiguous(),
            packed.bias_ids.contiguous() if k else none,
            packed.bias_vals.contiguous() if k else none, k,
            packed.allowed.contiguous() if words else none, words,
            token_bitmask if bm_words else none, bm_words, stop, stop.shape[1])
    return args, masks


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
    token_bitmask: torch.Tensor | None = None,
) -> tuple[list[KernelCall], torch.Tensor, torch.Tensor]:
    """The launches of one sampling step, with their buffers allocated on ``logits.device``.

    Returns ``(calls, tokens, status)``; running ``calls`` in order fills the last two
    (``[B]`` int64 and int32). Only fixed-shape torch ops run here, so it works on the
    ``meta`` device too. The first call is the set-up (:func:`setup_call`); ``pow_table`` is
    :func:`penalty_powers` of the window's width, computed here when not given;
    ``token_bitmask`` the step's int32 ``[B, ceil(V / 32)]`` mask (:func:`constraint_args`).
    """
    batch, vocab = logits.shape
    dev = logits.device
    status = torch.empty(batch, dtype=torch.int32, device=dev)  # zeroed by the set-up
    setup, win, wrange = setup_call(window, batch, lp, status)
    width = window_width(window)
    pow_table = _pow_table(packed, width, pow_table, dev)
    want_lp = logprob_out is not None
    scratch, logprob_out = _scratch(batch, lp, dev, logprob_out)
    tokens = torch.empty(batch, dtype=torch.int64, device=dev)
    temp, top_k, once, top_p, mlog, fpen, ppen, proc = kernel_params(packed, dev)
    cons, masks = constraint_args(packed, token_bitmask)
    steps = steps.contiguous()
    # No multiply-add contraction: the reference rounds every float32 op. WT: window
    # entries counted per histogram, one per thread (kernels/sampling_common.py).
    chunk_call = KernelCall(
        "chunk_kernel", (batch, lp.n_chunks),
        (logits, logits.stride(0), vocab, temp, top_k, once, seed, steps,
         top_p, mlog, fpen, ppen, proc, win, width, wrange, pow_table, *cons, *scratch,
         status),
        dict(CHUNK=lp.chunk, CAP=lp.cap, LOGPROBS=want_lp, ACC=cuda,
             WT=WARP_SIZE * lp.chunk_warps, MASKS=masks),
        dict(num_warps=lp.chunk_warps, enable_fp_fusion=False),
    )
    merge_call = KernelCall(
        "merge_kernel", (batch,),
        (logits, logits.stride(0), vocab, lp.n_chunks, temp, top_k, seed, steps,
         top_p, mlog, once, fpen, ppen, proc, win, width, wrange, pow_table, *cons,
         *scratch, tokens, status, logprob_out),
        dict(CAP=lp.cap, CP=lp.cp, TILE=lp.tile, ONE_TILE=lp.one_tile, CHUNK=lp.chunk,
             SUB=max(16, lp.sub // MASKED_SUB_SHRINK) if masks else lp.sub, RB=RADIX_BITS,
             NBINS=1 << RADIX_BITS, LOGPROBS=want_lp, ACC=cuda,
             WT=WARP_SIZE * lp.merge_warps, MASKS=masks),
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
    token_bitmask: torch.Tensor | None = None,
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
    token_bitmask : IntTensor, optional
        int32 ``[B, ceil(V / 32)]`` contiguous, bit set = allowed: the step's grammar mask,
        applied by the chunk kernel as it reads the logits (not checked here). The rows'
        bias, allowed set and ``min_tokens`` come with ``packed``; ``steps`` counts the
        tokens a row has for ``min_tokens``.

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
        seed = fill_unseeded(packed.seed, packed.seeded)
    calls, tokens, status = kernel_calls(logits, packed, window, steps, seed, lp,
                                         logprob_out, cuda, pow_table, token_bitmask)
    for call in calls:
        kernel(call.name)[call.grid](*call.args, **call.constexprs, **call.options)
    return tokens, status


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
