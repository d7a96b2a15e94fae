"""The fused Triton sampler's checked entry point (``backend="triton"`` of
:func:`lmgen_fast.sample`) and the log-probabilities a launch leaves.

The kernels (:mod:`lmgen_fast.kernels.chunk` and :mod:`lmgen_fast.kernels.merge`) compute
exactly :func:`lmgen_fast.reference.sample` for seeded rows: same ``z`` (IEEE float32
division by the temperature, the penalty factors ``p**c`` from the same ``torch.pow``, the
frequency and presence penalties rounded as the reference rounds them), same top-k threshold
with ties kept, same top-p and min-p rules (min-p on the same float32 threshold, bit for
bit), same Philox/Gumbel race with ties to the lower token id. Top-p sums the softmax in
another order than the reference (float32, against float64 prefix sums), so a token whose
top-p fate turns on the last bits of those sums may differ; nothing else may.
Log-probabilities, raw or processed (``logprobs_mode``), come out of the same launches
(``logprob_out``).

Cost: with top-k on (``k <= max_top_k``) the logits are read once, top-p and min-p then run
over the top-k candidates. Without top-k, each chunk keeps ``nucleus_candidates`` of its
largest values; when the nucleus (or the min-p survivors) lies among them the logits are
still read once, otherwise the merge re-reads that row ``32 / RB + 1`` times (a radix
search for the top-p cutoff, then the race): exact either way, never a sort.

SPEC section 7's bias and masks cost no launch and no pass: the chunk kernel reads, beside
its logits, one int32 word per 32 logits of each bitmask in use (the row's allowed set, the
step's token bitmask) and the row's bias entries that fall in its chunk (a binary search
of the row's sorted list, then 12 bytes per entry); rows without them read one int32 of
flags (launches without any compile that code out: ``MASKS``), and every row one int64
``min_tokens``, its stop ids only while under it.

Launches: three per step (:mod:`lmgen_fast.sampling.kernel_launch`), and no torch op
besides allocations when the caller keeps the penalty powers (``penalty_powers``): the
set-up kernel (:mod:`lmgen_fast.kernels.window`: the penalty window grouped by vocabulary
chunk, read from a ``[B, W]`` window or straight from each row's history, and the status
words zeroed), the chunk kernel and the merge. Their sizes are planned by
:mod:`lmgen_fast.sampling.launch_plan`.

Unseeded rows get a seed from :func:`lmgen_fast.core.rows.fill_unseeded` on the logits'
device, as the reference does for batches of more than one row; the reference's
batch-of-one path (``torch.multinomial``) is not reproduced token for token, only in
distribution.

``launch`` is free of host synchronisation and can be captured in a CUDA graph; every
problem is left in a status tensor. :func:`sample` is the checked entry point: it validates
its inputs and raises on a bad status. Should Triton fail here, the failure is recorded
once (:mod:`lmgen_fast.runtime.failure`) and the reference samples instead.
"""

from __future__ import annotations

import torch

from lmgen_fast.core.bitmask import check_bitmask
from lmgen_fast.core.params import PackedParams
from lmgen_fast.runtime.failure import (
    KernelUnavailable,
    guarded,
    kernel_failure,
    note_failure,
)
from lmgen_fast.runtime.launch import on_device
from lmgen_fast.sampling import reference
from lmgen_fast.sampling.kernel_launch import (
    HistoryWindow,
    check_device,
    kernel,
    kernel_calls,
    launch,
    penalty_powers,
    raise_for_status,
    setup_call,
)
from lmgen_fast.sampling.launch_plan import (
    LOGPROB_COLUMNS,
    NUCLEUS_CANDIDATES,
    RADIX_BITS,
    LaunchPlan,
    host_hints,
    plan,
    plan_launch,
)
from lmgen_fast.sampling.logprobs import SampleLogprobs, top_logprobs
from lmgen_fast.sampling.penalties import check_window_values, process_logits
from lmgen_fast.sampling.reference import ParamsLike

# The Triton sampler's public names (callers use ``kernel_sampler.X``), wherever they live.
__all__ = [
    "LOGPROB_COLUMNS", "NUCLEUS_CANDIDATES", "RADIX_BITS", "HistoryWindow", "LaunchPlan",
    "check_device", "guarded_launch", "host_hints", "kernel", "kernel_calls", "launch",
    "logprob_table", "logprobs_from_launch", "penalty_powers", "plan", "plan_launch",
    "raise_for_status", "sample", "setup_call",
]


def guarded_launch(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~lmgen_fast.sampling.kernel_launch.launch` (this module's ``launch``, which
    tests replace) under :func:`~lmgen_fast.runtime.failure.guarded`."""
    return guarded(launch, *args, **kwargs)


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
    token_bitmask: torch.Tensor | None = None,
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
    token_bitmask : IntTensor, optional
        int32 ``[B, ceil(V / 32)]``, bit set = allowed: this step's grammar mask, applied
        by the chunk kernel as it reads the logits (as the reference applies it).

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
                                return_logprobs=return_logprobs, token_bitmask=token_bitmask)
    batch, vocab = logits.shape
    packed = reference.pack(params, batch, logits.device, vocab)
    if token_bitmask is not None:
        check_bitmask(token_bitmask, batch, vocab, logits.device)
    hint_k, draw, nucleus = host_hints(params, packed, batch)
    if max_top_k is None:
        max_top_k = hint_k
    if nucleus_candidates is None:
        nucleus_candidates = NUCLEUS_CANDIDATES if nucleus else 0
    if check and window is not None:
        check_window_values(window, vocab)
    lp = torch.empty(batch, LOGPROB_COLUMNS, dtype=torch.float32, device=logits.device) \
        if return_logprobs else None
    try:
        with on_device(logits.device):
            tokens, status = guarded_launch(
                logits, packed, window, steps, max_top_k=max_top_k, draw_seeds=draw,
                chunk=chunk, nucleus_candidates=nucleus_candidates, logprob_out=lp,
                token_bitmask=token_bitmask,
            )
    except KernelUnavailable as exc:
        note_failure(exc)
        return reference.sample(logits, params, window, step=step,
                                return_logprobs=return_logprobs, token_bitmask=token_bitmask)
    if check:
        raise_for_status(status)
    if not return_logprobs:
        return tokens
    return tokens, logprobs_from_launch(logits, lp, packed.logprobs, packed, window, tokens,
                                        steps=steps, token_bitmask=token_bitmask)


def logprob_table(
    logits: torch.Tensor,
    lp: torch.Tensor,
    packed: PackedParams,
    window: torch.Tensor | None,
    tokens: torch.Tensor,
    steps: torch.Tensor | None = None,
    token_bitmask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Every token's log-probability, float32 ``[B, V]``, from a launch's ``logprob_out``.

    Raw rows from the logits, processed rows from their ``z`` (:func:`lmgen_fast.reference.
    process_logits`: the kernels' ``z`` bit for bit) masked by the launch's cut, with the
    launch's normaliser: the token's own value is the one the launch wrote. A greedy
    processed row is a point mass on its token. One extra pass over the logits, for the
    top alternatives only. ``steps`` and ``token_bitmask`` are the launch's (``steps``
    None: no ``min_tokens`` mask).
    """
    shift, norm, cut = lp[:, 1:2], lp[:, 2:3], lp[:, 3:4]
    x = logits.to(torch.float32)
    if bool(packed.processed.any()):
        z = process_logits(logits, packed, window, openai=True, steps=steps,
                           token_bitmask=token_bitmask)
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
    *,
    steps: torch.Tensor | None = None,
    token_bitmask: torch.Tensor | None = None,
) -> SampleLogprobs:
    """The kernels' token log-probabilities plus the top ``n`` alternatives of each row.

    ``packed``, ``window``, ``tokens``, ``steps`` and ``token_bitmask`` (the launch's) are
    needed for ``n > 0``. The
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
    table = logprob_table(logits, lp, packed, window, tokens, steps, token_bitmask)
    top_ids, top_lp = top_logprobs(table, n)
    top_ids = torch.where(packed.processed.unsqueeze(1) & (top_lp == float("-inf")), -1,
                          top_ids)
    return SampleLogprobs(lp[:, 0], top_ids, top_lp)
