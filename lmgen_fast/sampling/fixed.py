"""The reference sampler's device path: one sampling step with fixed-shape ops only.

Every row goes through every step on its fully sorted row and masks select, so nothing
waits for the device and a CUDA graph can capture it; problems are left in a status per
row (:class:`SampleResult`) instead of raised. Same tokens as the CPU path for seeded and
greedy rows: both use the rules of :mod:`lmgen_fast.sampling.filters` and the race's
helpers of :mod:`lmgen_fast.sampling.race`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lmgen_fast.core.errors import STATUS_EMPTY
from lmgen_fast.core.params import PackedParams
from lmgen_fast.core.philox import gumbel_from_uniform, uniform_noise
from lmgen_fast.core.rows import fill_unseeded
from lmgen_fast.sampling.filters import (
    effective_k,
    kth_value,
    min_p_removes,
    top_p_keep,
)
from lmgen_fast.sampling.logprobs import SampleLogprobs, step_logprobs
from lmgen_fast.sampling.penalties import NEG_INF, POS_INF, process_logits
from lmgen_fast.sampling.race import pick, race_keys


class SampleResult(NamedTuple):
    """What ``sample(..., check=False)`` returns: nothing was raised, problems are in ``status``.

    Attributes
    ----------
    tokens : LongTensor
        int64 ``[B]``, always in ``[0, V)``; 0 for a row with a non-zero status.
    status : IntTensor
        int32 ``[B]``: :data:`STATUS_EMPTY` for a row with nothing to sample, else 0.
    logprobs : SampleLogprobs or None
        With ``return_logprobs``, as :func:`step_logprobs` (not meaningful for flagged rows).
    """

    tokens: torch.Tensor
    status: torch.Tensor
    logprobs: SampleLogprobs | None


def sample_on_device(
    logits: torch.Tensor,
    packed: PackedParams,
    window: torch.Tensor | None,
    steps: torch.Tensor,
    *,
    draw_seeds: bool = True,
    return_logprobs: bool = False,
    token_bitmask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One sampling step with fixed-shape ops only: no host round trip, no data-dependent
    shape, so it runs on a GPU without waiting for it and can be captured in a CUDA graph.

    It is :func:`sample`'s path for tensors off the CPU, without the input checks. Same
    tokens as the CPU path for seeded and greedy rows (the same ``z``, top-k, top-p and
    min-p rules, Philox race with ties to the lower id): it does the work of every branch
    for every row and selects, where the CPU path works on the rows that need it. Unseeded
    rows race with a seed from ``torch.randint`` (drawn for every row when ``draw_seeds``),
    also in a batch of one: the CPU path's ``torch.multinomial`` draw (the article's) is
    reproduced in distribution only, as by the Triton sampler.

    Parameters
    ----------
    logits : Tensor
        ``[B, V]`` any float dtype. Not modified.
    packed : PackedParams
        ``[B]`` tensors on ``logits.device``.
    window : LongTensor or None
        ``[B, W]`` int64, ``-1`` for empty slots; ids must be in ``[-1, V)`` (not checked
        here: :func:`check_window_values` would wait for the device).
    steps : LongTensor
        ``[B]`` int64 decode steps keying the noise (and compared with ``min_tokens``), on
        ``logits.device``.
    draw_seeds : bool
        Draw seeds for unseeded rows (consumes torch's generator); ``False`` takes
        ``packed.seed`` as it is (the engine draws once per decode).
    return_logprobs : bool
        Also return the log-probability of each sampled token (float32 ``[B]``);
        :func:`sample_on_device_logprobs` gives the top alternatives as well.
    token_bitmask : IntTensor, optional
        int32 ``[B, ceil(V / 32)]`` per-step mask, bit set = allowed (not checked here).

    Returns
    -------
    tokens : LongTensor
        ``[B]`` int64; 0 for a row with nothing to sample.
    status : IntTensor
        ``[B]`` int32, :data:`STATUS_EMPTY` for a row with nothing to sample.
    logprob : Tensor or None
        ``[B]`` float32 log-probabilities of ``tokens`` (with ``return_logprobs``), raw or
        processed as each row's ``logprobs_mode`` says.
    """
    tokens, status, filtered = sample_fixed(logits, packed, window, steps, draw_seeds,
                                            token_bitmask)
    if not return_logprobs:
        return tokens, status, None
    return tokens, status, step_logprobs(logits, filtered, tokens, packed, 0,
                                         on_device=True).token_logprob


def sample_fixed(
    logits: torch.Tensor,
    packed: PackedParams,
    window: torch.Tensor | None,
    steps: torch.Tensor,
    draw_seeds: bool,
    token_bitmask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sample_on_device`'s work: ``(tokens, status, filtered)``, ``filtered`` the
    final float32 ``z`` ``[B, V]`` the race drew from (removed tokens ``-inf``)."""
    batch, vocab = logits.shape
    z = process_logits(logits, packed, window, openai=True, steps=steps,
                       token_bitmask=token_bitmask)
    zmax = z.amax(dim=1)
    status = torch.where(zmax == NEG_INF, STATUS_EMPTY, 0).to(torch.int32)
    greedy = packed.temperature == 0
    seed = packed.seed
    if draw_seeds:
        seed = fill_unseeded(packed.seed, packed.seeded)
    # Steps 3 to 5 on the row sorted once (the full row: V is a static bound for k): the
    # k-th value, then top-p over the sorted survivors. The order of equal values does not
    # matter, runs of them are kept or dropped whole.
    vals, order = z.sort(dim=1, descending=True)
    tau = kth_value(vals, effective_k(packed.top_k, vocab))
    vals = vals.masked_fill(vals < tau.unsqueeze(1), NEG_INF)
    top_p = torch.where(greedy, 1.0, packed.top_p)
    min_p_log = torch.where(greedy, NEG_INF, packed.min_p_log)
    # Rows that skip top-p or min-p compute them anyway and keep everything: the CPU path's
    # row selection (``p_filter``) as masks.
    live = (zmax < POS_INF) & (zmax > NEG_INF)
    keep_sorted = top_p_keep(vals, top_p) | ~(live & (top_p < 1)).unsqueeze(1)
    keep = torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted)
    kept = torch.where(keep & (z >= tau.unsqueeze(1)), z, NEG_INF)
    drop_m = (live & (min_p_log > NEG_INF)).unsqueeze(1) & min_p_removes(kept, zmax, min_p_log)
    filtered = kept.masked_fill(drop_m, NEG_INF)
    kept = race_keys(filtered)
    cols = torch.arange(vocab, device=z.device)
    g = gumbel_from_uniform(uniform_noise(seed.unsqueeze(1), steps.unsqueeze(1), cols))
    keys = torch.where(kept > NEG_INF, kept + g, NEG_INF)
    raced = pick(keys, cols.expand(batch, -1), fill=vocab)
    # The greedy token is the first maximum of step 2, on every device (torch.argmax).
    tokens = torch.where(greedy, z.argmax(dim=1), raced)
    tokens = torch.where(status != 0, 0, tokens)
    return tokens, status, filtered


def sample_on_device_logprobs(
    logits: torch.Tensor,
    packed: PackedParams,
    window: torch.Tensor | None,
    steps: torch.Tensor,
    n: int,
    *,
    draw_seeds: bool = True,
    token_bitmask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, SampleLogprobs]:
    """:func:`sample_on_device` with each row's log-probabilities in its ``logprobs_mode``
    and ``n`` top alternatives (:func:`step_logprobs`), all with fixed-shape ops.

    Returns ``(tokens, status, SampleLogprobs)``; processed rows use the filtered ``z`` the
    race drew from.
    """
    tokens, status, filtered = sample_fixed(logits, packed, window, steps, draw_seeds,
                                            token_bitmask)
    return tokens, status, step_logprobs(logits, filtered, tokens, packed, n, on_device=True)
