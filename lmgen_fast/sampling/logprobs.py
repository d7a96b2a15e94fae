"""Log-probabilities of a sampling step, each row in its ``logprobs_mode``: "raw" those of
the raw logits (:func:`raw_logprobs`, :func:`raw_table`), "processed" those of the final
``z`` the draw uses (:func:`processed_table`), with the top alternatives ranked by value,
equal values lower id first (:func:`top_logprobs`)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from lmgen_fast.core.params import PackedParams
from lmgen_fast.sampling.penalties import NEG_INF, POS_INF


class SampleLogprobs(NamedTuple):
    """Log-probabilities of one sampling step (float32), each row in its ``logprobs_mode``:
    under the raw logits, or under the distribution it was drawn from (processed).

    Attributes
    ----------
    token_logprob : Tensor
        float32 ``[B]``: the log-probability of each row's sampled token.
    top_ids : Tensor
        int64 ``[B, n]``: the ``n`` most probable tokens per row, most probable first; equal
        values in lower-id-first order. A processed row lists its surviving tokens only:
        its slots past them hold ``-1`` (and ``-inf`` in ``top_logprobs``).
    top_logprobs : Tensor
        float32 ``[B, n]``: their log-probabilities.
    """

    token_logprob: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor


def top_logprobs(lp: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` largest entries of each row of ``lp`` [B, V]: ids int64 and values, ``[B, n]``.

    Order: value descending, lower id first among equal values (``n`` is capped at ``V``).
    """
    batch, vocab = lp.shape
    n = min(n, vocab)
    if n <= 0:
        return (torch.empty(batch, 0, dtype=torch.int64, device=lp.device),
                torch.empty(batch, 0, dtype=lp.dtype, device=lp.device))
    vals, ids = torch.topk(lp, n, dim=1)
    ids, order = ids.sort(dim=1)
    vals, order = vals.gather(1, order).sort(dim=1, descending=True, stable=True)
    ids = ids.gather(1, order)
    # Which members of a run of equal values straddling the n-th place topk returns is
    # arbitrary: such rows take the lowest ids, from a stable sort of the whole row.
    over = (lp >= vals[:, -1:]).sum(dim=1) > n
    if bool(over.any()):
        rows = over.nonzero().flatten()
        v, i = lp[rows].sort(dim=1, descending=True, stable=True)
        vals[rows], ids[rows] = v[:, :n], i[:, :n]
    return ids, vals


def _inf_share(is_inf: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of rows with ``+inf`` logits (bool ``[N, V]`` marks them): the
    ``+inf`` tokens share all the mass, float32 ``[N, V]``."""
    share = -torch.log(is_inf.sum(dim=1, keepdim=True).to(torch.float32))
    return torch.where(is_inf, share, NEG_INF)


def raw_logprobs(logits: torch.Tensor, tokens: torch.Tensor, n: int) -> SampleLogprobs:
    """Log-probabilities of ``tokens`` and the top ``n`` under the raw logits.

    Parameters
    ----------
    logits : Tensor
        ``[B, V]`` any float dtype, before temperature, penalties or filters; computed as
        ``log_softmax`` in float32, NaN counting as ``-inf``. A row with ``+inf`` values gives
        those ``log(1 / count)`` and the rest ``-inf`` (they share all the probability).
    tokens : LongTensor
        ``[B]`` the sampled ids.
    n : int
        How many top alternatives per row (0 to 20; capped at ``V``).

    Returns
    -------
    SampleLogprobs
        ``token_logprob`` float32 ``[B]``, ``top_ids`` int64 ``[B, n]``, ``top_logprobs``
        float32 ``[B, n]``.
    """
    x = logits.to(torch.float32)
    x = torch.where(torch.isnan(x), NEG_INF, x)
    lp = torch.log_softmax(x, dim=1)
    inf_rows = (x == POS_INF).any(dim=1)
    if bool(inf_rows.any()):
        # log_softmax gives NaN there; SPEC section 3: the +inf tokens share the mass.
        lp[inf_rows] = _inf_share(x[inf_rows] == POS_INF)
    token_logprob = lp.gather(1, tokens.view(-1, 1).to(torch.int64)).squeeze(1)
    top_ids, top_lp = top_logprobs(lp, n)
    return SampleLogprobs(token_logprob, top_ids, top_lp)


def raw_table(logits: torch.Tensor) -> torch.Tensor:
    """Raw log-probabilities, float32 ``[B, V]``, with fixed-shape ops: ``log_softmax`` of
    the logits in float32, NaN counting as ``-inf``; in a row with ``+inf`` values those
    share all the mass (:func:`raw_logprobs`' rule, as a mask)."""
    x = logits.to(torch.float32)
    x = torch.where(torch.isnan(x), NEG_INF, x)
    is_inf = x == POS_INF
    return torch.where(is_inf.any(dim=1, keepdim=True), _inf_share(is_inf),
                       torch.log_softmax(x, dim=1))


def processed_table(filtered: torch.Tensor, tokens: torch.Tensor,
                    greedy: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the distribution each row was drawn from, float32 ``[B, V]``.

    Parameters
    ----------
    filtered : Tensor
        float32 ``[B, V]``: the final ``z`` of the step (after temperature, penalties,
        top-k, top-p and min-p), removed tokens ``-inf``.
    tokens : LongTensor
        int64 ``[B]``: the drawn tokens.
    greedy : BoolTensor
        ``[B]``: greedy rows, a point mass on their token (log-probability 0, the rest
        ``-inf``).

    Returns
    -------
    Tensor
        ``log_softmax(filtered)`` in float32; a row with ``+inf`` survivors gives each of
        them ``-log(count)`` (the draw shares the mass equally) and the rest ``-inf``; a row
        with nothing left gives ``-inf`` everywhere.
    """
    is_inf = filtered == POS_INF
    lp = torch.where(is_inf.any(dim=1, keepdim=True), _inf_share(is_inf),
                     torch.log_softmax(filtered, dim=1))
    lp = torch.where(torch.isnan(lp), NEG_INF, lp)
    cols = torch.arange(filtered.shape[1], device=filtered.device)
    point = torch.where(cols == tokens.unsqueeze(1), 0.0, NEG_INF)
    return torch.where(greedy.unsqueeze(1), point, lp)


def step_logprobs(
    logits: torch.Tensor,
    filtered: torch.Tensor | None,
    tokens: torch.Tensor,
    packed: PackedParams,
    n: int,
    *,
    on_device: bool,
) -> SampleLogprobs:
    """Each row's log-probabilities in its ``logprobs_mode``: raw (:func:`raw_table`) or
    processed (:func:`processed_table` of ``filtered``, which may be None when no row is).

    The top ``n`` are ranked by the row's own values, equal values lower id first. A
    processed row lists its survivors only: its slots past them hold id ``-1`` and
    ``-inf``. ``on_device`` ranks by a stable sort of whole rows (no host decision);
    otherwise :func:`top_logprobs` (cheaper, waits for the device).
    """
    lp = raw_table(logits)
    if filtered is not None:
        proc = processed_table(filtered, tokens, packed.temperature == 0)
        lp = torch.where(packed.processed.unsqueeze(1), proc, lp)
    token_logprob = lp.gather(1, tokens.view(-1, 1).to(torch.int64)).squeeze(1)
    n = max(0, min(n, lp.shape[1]))
    if on_device and n:
        top_lp, top_ids = lp.sort(dim=1, descending=True, stable=True)
        top_ids, top_lp = top_ids[:, :n], top_lp[:, :n]
    else:
        top_ids, top_lp = top_logprobs(lp, n)
    if filtered is not None:
        removed = packed.processed.unsqueeze(1) & (top_lp == NEG_INF)
        top_ids = torch.where(removed, -1, top_ids)
    return SampleLogprobs(token_logprob, top_ids, top_lp)


def raw_logprobs_on_device(logits: torch.Tensor, tokens: torch.Tensor, n: int) -> SampleLogprobs:
    """:func:`raw_logprobs` with fixed-shape ops only (no host round trip): the same values.

    Every row takes the ``+inf`` rule through a mask instead of a row selection, and the top
    ``n`` come from a stable sort of the whole row (value descending, lower id first: the
    order :func:`raw_logprobs` gives, which needs a host decision to avoid that sort).

    Parameters
    ----------
    logits : Tensor
        ``[B, V]`` any float dtype (float32 math, NaN counting as ``-inf``).
    tokens : LongTensor
        ``[B]`` the sampled ids.
    n : int
        Top alternatives per row (capped at ``V``).

    Returns
    -------
    SampleLogprobs
        ``token_logprob`` float32 ``[B]``, ``top_ids`` int64 ``[B, n]``, ``top_logprobs``
        float32 ``[B, n]``.
    """
    lp = raw_table(logits)
    token_logprob = lp.gather(1, tokens.view(-1, 1).to(torch.int64)).squeeze(1)
    n = max(0, min(n, lp.shape[1]))
    if n:
        top_lp, top_ids = lp.sort(dim=1, descending=True, stable=True)
        top_ids, top_lp = top_ids[:, :n], top_lp[:, :n]
    else:
        top_ids = torch.empty(lp.shape[0], 0, dtype=torch.int64, device=lp.device)
        top_lp = torch.empty(lp.shape[0], 0, dtype=lp.dtype, device=lp.device)
    return SampleLogprobs(token_logprob, top_ids, top_lp)
