"""The reference sampler: SPEC sections 2 to 4 in plain, vectorized PyTorch.

It is the CPU path of ``lmgen_fast.sample`` and the oracle every kernel is tested against.
One step for row ``r`` (logits ``l``, window ``w``):

1. ``z = l / T`` in float32 (``T == 0``: ``z = l``, the row is greedy); NaN becomes ``-inf``.
2. Every token ``t`` that occurs ``c`` times in ``w`` (``c = 1`` in "once" mode):
   ``z[t] / p**c`` if ``z[t] > 0`` else ``z[t] * p**c``. Then the OpenAI penalties, with
   ``c_t`` the raw count whatever the mode: ``adj = frequency_penalty * c_t +
   presence_penalty * (c_t > 0)`` (float32: two products, then one add) and
   ``z[t] = z[t] - adj / T``. The issue orders every penalty before the temperature;
   subtracting ``adj / T`` after dividing by ``T`` is the same math, and leaves the article's
   bit-exact ``l / T`` untouched when these penalties are 0.
3. Top-k (``0 < k < V``): values below the k-th largest become ``-inf`` (ties survive).
4. Top-p (``top_p < 1``): over the survivors sorted by ``z`` descending, ``e = exp(z - z_max)``,
   ``q = e / sum(e)`` (the sum accumulated in float64, rounded to float32) and ``m_i`` the
   exclusive prefix sum of ``q`` in float64; every member of a group of equal ``z`` takes
   the ``m`` of the group's first member, so ``m_i`` is the mass of the tokens strictly more
   probable than ``i``. Keep ``i`` iff ``m_i < top_p``, compared in float64 with the user's
   ``top_p`` (never rounded to float32): ties are kept or dropped together and the most
   probable tokens always stay.
5. Min-p (``min_p > 0``): keep ``i`` iff ``z_i - z_max >= t`` in float32, ``t`` the smallest
   float32 at or above ``log(min_p)`` (:func:`lmgen_fast.core.params.min_p_threshold`, once per
   row): exactly ``exp(z_i - z_max) >= min_p``, with no ``exp`` whose rounding could differ
   between devices (``z_max`` is the row's largest survivor, which step 4 never removes).
   Steps 4 and 5 skip greedy rows and rows with a ``+inf`` survivor.
6. Draw: greedy rows take the first argmax of step 2. If ``+inf`` values remain, they alone
   share the probability equally. Seeded rows run the exponential race ``argmax(z_i + g_i)``,
   ``g_i`` Gumbel noise from :mod:`lmgen_fast.core.philox` keyed on (seed, step, token); an exact
   key tie goes to the lower token id. Unseeded rows: a batch of one calls
   ``torch.multinomial`` on ``softmax(z)`` as the article does; otherwise each row races with a
   seed drawn from torch's generator.

Log-probabilities (:func:`step_logprobs`) follow each row's ``logprobs_mode``: "raw" those of
the raw logits, before any of the steps (:func:`raw_logprobs`); "processed" those of the final
``z`` of step 5 that the draw uses (:func:`processed_table`: ``log_softmax``, ``-inf`` for
removed tokens, a share ``-log(count)`` for ``+inf`` survivors, 0 for a greedy row's token).

Two paths compute this. The CPU path works on the rows each step applies to, found on the
host (``bool(t.any())``, ``nonzero``, ``k.max()``): cheap on the CPU, a wait for the device
each time elsewhere. The device path (:func:`sample_on_device`, :func:`raw_logprobs_on_device`;
:func:`sample` takes it for tensors off the CPU) uses fixed shapes only: every row goes
through every step on the fully sorted row and masks select, so nothing waits for the device
and a CUDA graph can capture it; ``check=False`` leaves a status per row instead of raising.
Both share the rules (:func:`process_logits`, :func:`kth_value`, :func:`top_p_keep`,
:func:`min_p_removes`, the race's helpers and :mod:`lmgen_fast.core.philox`) and give the same
tokens, except for an unseeded batch of one (see :func:`sample`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple

import torch

from lmgen_fast.core.errors import EmptyRowError
from lmgen_fast.core.params import PackedParams, SamplingParams, as_row_params
from lmgen_fast.core.philox import gumbel_from_uniform, uniform_noise

NEG_INF = float("-inf")
POS_INF = float("inf")
ParamsLike = SamplingParams | Sequence[SamplingParams] | PackedParams


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


def pack(params: ParamsLike, batch: int, device: torch.device) -> PackedParams:
    """Per-row parameters as tensors on ``device`` (a PackedParams is checked and moved)."""
    if isinstance(params, PackedParams):
        if params.temperature.shape != (batch,):
            raise ValueError(
                f"packed params have {params.temperature.shape[0]} rows for a batch of {batch}"
            )
        if params.temperature.device != device:
            params = params.to(device)
        return params
    return PackedParams.from_rows(as_row_params(params, batch), device)


def check_inputs(
    logits: torch.Tensor, window: torch.Tensor | None, step: int | torch.Tensor
) -> torch.Tensor:
    """Validate shapes and dtypes; return the step as an int64 ``[B]`` tensor."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a [B, V] tensor, got {shape}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits must have a float dtype, got {logits.dtype}")
    batch, vocab = logits.shape
    if window is not None:
        if window.dim() != 2 or window.shape[0] != batch or window.dtype != torch.int64:
            raise ValueError(
                f"window must be an int64 [B={batch}, W] tensor, got {window.dtype} "
                f"{tuple(window.shape)}"
            )
    if isinstance(step, torch.Tensor):
        if step.dim() == 0:
            step = step.expand(batch)
        if step.shape != (batch,):
            raise ValueError(
                f"step must be an int or a [B={batch}] tensor, got {tuple(step.shape)}"
            )
        step = step.to(device=logits.device, dtype=torch.int64)
    else:
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2**32:
            raise ValueError(f"step must be an int in [0, 2**32), got {step!r}")
        step = torch.full((batch,), step, dtype=torch.int64, device=logits.device)
    return step


def check_window_values(window: torch.Tensor, vocab: int) -> None:
    """Raise ValueError naming the first window entry that is neither -1 nor a token id."""
    bad = (window < -1) | (window >= vocab)
    if bool(bad.any()):
        r, c = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"window[{r}, {c}] = {int(window[r, c])} is not a token id in [0, {vocab}) or -1"
        )


def apply_penalty(
    z: torch.Tensor,
    window: torch.Tensor,
    penalty: torch.Tensor,
    once: torch.Tensor,
    frequency: torch.Tensor | None = None,
    presence: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
) -> None:
    """Apply the repetition penalty, then the OpenAI penalties, to ``z`` in place.

    Parameters
    ----------
    z : Tensor
        float32 ``[B, V]``, already divided by the temperature.
    window : LongTensor
        int64 ``[B, W]``, ``-1`` for empty slots.
    penalty, once : Tensor
        ``[B]`` float32 repetition penalty and bool "once" mode.
    frequency, presence, temperature : Tensor, optional
        ``[B]`` float32. When given, ``z[t] -= (frequency * c_t + presence * (c_t > 0)) / T``
        for every window token, ``c_t`` its raw count (``T`` already 1 for greedy rows).

    Notes
    -----
    Work is O(B * W**2): the count of each window entry's token is found by comparing the
    window with itself, then every entry writes its token's new value; duplicates write the
    same value, so the scatter's order is moot.
    """
    valid = window >= 0
    # Empty slots point at a token already in the row (or at 0 with count 0 when there is
    # none), so their writes agree with the real entries.
    fallback = window.amax(dim=1, keepdim=True).clamp_min(0)
    idx = torch.where(valid, window, fallback)
    counts = ((idx.unsqueeze(2) == window.unsqueeze(1)) & valid.unsqueeze(1)).sum(2)
    once_counts = torch.where(once.unsqueeze(1), counts.clamp_max(1), counts)
    factor = torch.pow(penalty.unsqueeze(1), once_counts.to(torch.float32))
    vals = z.gather(1, idx)
    vals = torch.where(vals > 0, vals / factor, vals * factor)
    if frequency is not None and presence is not None and temperature is not None:
        c = counts.to(torch.float32)
        adj = frequency.unsqueeze(1) * c + presence.unsqueeze(1) * (c > 0).to(torch.float32)
        vals = vals - adj / temperature.unsqueeze(1)
    z.scatter_(1, idx, vals)


def process_logits(
    logits: torch.Tensor,
    packed: PackedParams,
    window: torch.Tensor | None,
    *,
    openai: bool | None = None,
) -> torch.Tensor:
    """Steps 1 and 2: tempered, penalized float32 logits ``[B, V]`` with NaN as ``-inf``.

    ``openai`` says whether to apply the frequency and presence penalties; None looks at
    the parameters (a host sync). Applying zero penalties subtracts exactly zero, so
    ``True`` gives the same bits for rows without them: the device path passes it.
    """
    temperature = torch.where(packed.temperature == 0, 1.0, packed.temperature)
    z = logits.to(torch.float32) / temperature.unsqueeze(1)  # always a new tensor
    z.nan_to_num_(nan=NEG_INF, posinf=POS_INF, neginf=NEG_INF)
    if window is not None and window.shape[1] > 0:
        if openai is None:
            openai = bool(((packed.frequency_penalty != 0)
                           | (packed.presence_penalty != 0)).any())
        if openai:
            apply_penalty(z, window, packed.penalty, packed.once,
                          packed.frequency_penalty, packed.presence_penalty, temperature)
        else:
            apply_penalty(z, window, packed.penalty, packed.once)
    return z


def _effective_k(top_k: torch.Tensor, vocab: int) -> torch.Tensor:
    """``k`` where top-k filters anything, else 0 (``k <= 0`` or ``k >= V`` keep all)."""
    return torch.where((top_k > 0) & (top_k < vocab), top_k, 0)


def kth_value(vals: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The top-k threshold from rows sorted descending.

    Parameters
    ----------
    vals : Tensor
        float32 ``[B, C]``, each row's largest values in descending order (at least
        ``max(k)`` of them).
    k : LongTensor
        int64 ``[B]`` effective ``k`` (:func:`_effective_k`: 0 where top-k is off).

    Returns
    -------
    Tensor
        float32 ``[B]``: ``vals[r, k[r] - 1]``, ``-inf`` where ``k[r] == 0``.
    """
    picked = vals.gather(1, (k - 1).clamp_min(0).unsqueeze(1)).squeeze(1)
    return torch.where(k > 0, picked, NEG_INF)


def top_k_threshold(z: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """The k-th largest value per row (``-inf`` where top-k is off), float32 ``[B]``."""
    k = _effective_k(top_k, z.shape[1])
    if not bool((k > 0).any()):
        return torch.full((z.shape[0],), NEG_INF, device=z.device)
    return kth_value(torch.topk(z, int(k.max()), dim=1).values, k)


def filtered_logits(
    logits: torch.Tensor,
    params: ParamsLike,
    window: torch.Tensor | None = None,
) -> torch.Tensor:
    """Steps 1 to 5 of one sampling step, float32 ``[B, V]`` (removed tokens are ``-inf``).

    For a sampled (non-greedy) row, ``softmax`` of its output row is the exact distribution
    of the next token, up to the ``+inf`` rule (those tokens share all the mass). Greedy rows
    get top-k but not top-p or min-p (their token is the argmax of step 2 anyway).
    """
    packed = pack(params, logits.shape[0], logits.device)
    return _filter(process_logits(logits, packed, window), packed)


def _filter(z: torch.Tensor, packed: PackedParams) -> torch.Tensor:
    """Steps 3 to 5 in place on the processed logits ``z`` float32 ``[B, V]``; returns ``z``."""
    z.masked_fill_(z < top_k_threshold(z, packed.top_k).unsqueeze(1), NEG_INF)
    greedy = packed.temperature == 0
    top_p = torch.where(greedy, 1.0, packed.top_p)
    min_p_log = torch.where(greedy, NEG_INF, packed.min_p_log)
    return p_filter(z, top_p, min_p_log)


def top_p_keep(vals: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Step 4 on rows sorted by value: the entries top-p keeps.

    Parameters
    ----------
    vals : Tensor
        float32 ``[N, C]``, each row sorted descending with a finite first entry; removed
        tokens are ``-inf`` (at the end).
    top_p : Tensor
        float64 ``[N]``, in ``(0, 1]``: the user's values, unrounded.

    Returns
    -------
    BoolTensor
        ``[N, C]`` in the order of ``vals``: ``True`` where the mass of the strictly larger
        values is below ``top_p``.
    """
    e = torch.exp(vals - vals[:, :1])
    # float64 accumulation makes the sums independent of how a device orders the additions.
    total = e.sum(dim=1, keepdim=True, dtype=torch.float64).to(torch.float32)
    q = e / total
    # The prefix masses stay in float64 and meet top_p in float64: rounded to float32,
    # either side would move the edge (top_p=0.9999999 would act as 0.99999988).
    before = torch.zeros_like(q, dtype=torch.float64)
    before[:, 1:] = torch.cumsum(q[:, :-1], dim=1, dtype=torch.float64)
    # Each member of a run of equal values takes the run's first prefix: the mass of the
    # values strictly larger, so that ties are kept or dropped together.
    cols = torch.arange(vals.shape[1], device=vals.device).expand_as(vals)
    start = torch.ones_like(vals, dtype=torch.bool)
    start[:, 1:] = vals[:, 1:] != vals[:, :-1]
    first = torch.where(start, cols, 0).cummax(dim=1).values
    return before.gather(1, first) < top_p.to(torch.float64).unsqueeze(1)


def min_p_removes(z: torch.Tensor, zmax: torch.Tensor, min_p_log: torch.Tensor) -> torch.Tensor:
    """Step 5's rule: bool ``[N, C]``, True where ``z - zmax < min_p_log`` in float32.

    ``z`` float32 ``[N, C]``; ``zmax`` (the row's largest survivor) float32 ``[N]``;
    ``min_p_log`` float32 ``[N]`` from :func:`lmgen_fast.core.params.min_p_threshold`, so the test
    is ``exp(z - zmax) < min_p`` exactly, without rounding an ``exp`` (the kernels compare
    the same float32 difference with the same threshold: bit for bit on every device).
    """
    return (z - zmax.unsqueeze(1)) < min_p_log.unsqueeze(1)


def p_filter(
    z: torch.Tensor, top_p: torch.Tensor, min_p_log: torch.Tensor, *, presorted: bool = False
) -> torch.Tensor:
    """Steps 4 (top-p) and 5 (min-p) in place on the survivors of top-k; returns ``z``.

    Parameters
    ----------
    z : Tensor
        float32 ``[N, C]``: candidate values, removed tokens ``-inf``.
    top_p, min_p_log : Tensor
        ``[N]``: float64 ``top_p`` and min-p's float32 threshold on ``z - z_max``
        (:func:`lmgen_fast.core.params.min_p_threshold`); ``top_p == 1`` and ``min_p_log == -inf``
        turn a row's filter off (callers pass those for greedy rows).
    presorted : bool
        Rows of ``z`` are sorted descending already (the top-k candidates), so top-p needs
        no sort.

    Notes
    -----
    Only rows that use a filter and have no ``+inf`` survivor do any work. Top-p sorts the
    rows that use it (unless ``presorted``); min-p is elementwise.
    """
    zmax = z.amax(dim=1)
    live = (zmax < POS_INF) & (zmax > NEG_INF)
    use_p = live & (top_p < 1)
    if bool(use_p.any()):
        rows = use_p.nonzero().flatten()
        sub = z[rows]
        if presorted:
            keep = top_p_keep(sub, top_p[rows])
        else:
            vals, order = sub.sort(dim=1, descending=True)
            keep = torch.empty_like(order, dtype=torch.bool)
            keep.scatter_(1, order, top_p_keep(vals, top_p[rows]))
        z[rows] = sub.masked_fill_(~keep, NEG_INF)
    use_m = live & (min_p_log > NEG_INF)
    if bool(use_m.any()):
        rows = use_m.nonzero().flatten()
        sub = z[rows]
        # Top-p never removes the maximum, so z_max of step 3 is still the row's maximum.
        z[rows] = sub.masked_fill_(min_p_removes(sub, zmax[rows], min_p_log[rows]), NEG_INF)
    return z


def _race_keys(z: torch.Tensor) -> torch.Tensor:
    """Values that enter the race: where a row has ``+inf``, those tokens alone, at 0."""
    has_inf = (z == POS_INF).any(dim=1, keepdim=True)
    return torch.where(has_inf, torch.where(z == POS_INF, 0.0, NEG_INF), z)


def _pick(keys: torch.Tensor, tokens: torch.Tensor, fill: int) -> torch.Tensor:
    """Per row, the token with the largest key; an exact tie goes to the lower token id."""
    best = keys.amax(dim=1, keepdim=True)
    return torch.where(keys == best, tokens, fill).amin(dim=1)


def _race_compact(
    vals: torch.Tensor,
    idx: torch.Tensor,
    k: torch.Tensor,
    top_p: torch.Tensor,
    min_p_log: torch.Tensor,
    seed: torch.Tensor,
    step: torch.Tensor,
) -> torch.Tensor:
    """The race over each row's top-k entries (sorted ``vals``/``idx``), no tie past the k-th.

    Top-p and min-p work on these k sorted candidates only.
    """
    in_k = torch.arange(vals.shape[1], device=vals.device).unsqueeze(0) < k.unsqueeze(1)
    v = p_filter(vals.masked_fill(~in_k, NEG_INF), top_p, min_p_log, presorted=True)
    v = _race_keys(v)
    g = gumbel_from_uniform(uniform_noise(seed.unsqueeze(1), step.unsqueeze(1), idx))
    keys = torch.where(v > NEG_INF, v + g, NEG_INF)
    return _pick(keys, idx, fill=torch.iinfo(torch.int64).max)


def _race_rows(
    z: torch.Tensor,
    tau: torch.Tensor,
    top_p: torch.Tensor,
    min_p_log: torch.Tensor,
    seed: torch.Tensor,
    step: torch.Tensor,
) -> torch.Tensor:
    """The race over every surviving token of each row; noise only for the survivors."""
    z = p_filter(z.masked_fill(z < tau.unsqueeze(1), NEG_INF), top_p, min_p_log)
    z = _race_keys(z)
    rows, cols = (z > NEG_INF).nonzero(as_tuple=True)
    keys = z[rows, cols] + gumbel_from_uniform(uniform_noise(seed[rows], step[rows], cols))
    batch = z.shape[0]
    best = torch.full((batch,), NEG_INF, device=z.device).scatter_reduce(
        0, rows, keys, reduce="amax"
    )
    winner = torch.where(keys == best[rows], cols, z.shape[1])
    return torch.full((batch,), z.shape[1], device=z.device).scatter_reduce(
        0, rows, winner, reduce="amin"
    )


TOPK_CHUNK = 64


def row_topk(z: torch.Tensor, kp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(z, kp, dim=1)`` of float32 ``z`` [B, V] (no NaN), found on fewer values.

    A row's ``kp`` largest values lie in the ``kp`` chunks of ``TOPK_CHUNK`` tokens with the
    largest maxima (plus the tail), unless a chunk left out has a maximum at least the
    ``kp``-th value found: such rows take the full ``topk``. ``topk`` is the costliest op of a
    CPU step; this reads its input once for the chunk maxima and sorts ~10x fewer values
    (B=64, V=32000, k=50).
    """
    batch, vocab = z.shape
    n_chunks = vocab // TOPK_CHUNK
    if n_chunks <= 4 * kp:
        return torch.topk(z, kp, dim=1)
    body = z[:, : n_chunks * TOPK_CHUNK].view(batch, n_chunks, TOPK_CHUNK)
    chunk_max, order = torch.topk(body.amax(dim=2), kp + 1, dim=1)
    offsets = torch.arange(TOPK_CHUNK, device=z.device)
    cols = (order[:, :kp].unsqueeze(2) * TOPK_CHUNK + offsets).flatten(1)
    tail = torch.arange(n_chunks * TOPK_CHUNK, vocab, device=z.device).expand(batch, -1)
    cols = torch.cat([cols, tail], dim=1)
    vals, pos = torch.topk(z.gather(1, cols), kp, dim=1)
    idx = cols.gather(1, pos)
    unsafe = chunk_max[:, kp] >= vals[:, kp - 1]
    if bool(unsafe.any()):
        vals[unsafe], idx[unsafe] = torch.topk(z[unsafe], kp, dim=1)
    return vals, idx


def _race(
    z: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p_log: torch.Tensor,
    seed: torch.Tensor,
    step: torch.Tensor,
) -> torch.Tensor:
    """Exponential race for every (sampled) row of ``z``; top-k rows without ties past k go
    compact. The parameter tensors are ``[B]``, for exactly these rows."""
    batch, vocab = z.shape
    k = _effective_k(top_k, vocab)
    out = torch.empty(batch, dtype=torch.int64, device=z.device)
    general = k == 0
    if bool((~general).any()):
        # One extra column tells whether a value equal to the k-th lies beyond the top k.
        kp = min(int(k.max()) + 1, vocab)
        vals, idx = row_topk(z, kp)
        kk = k.clamp_min(1).unsqueeze(1)
        tau = vals.gather(1, kk - 1).squeeze(1)
        tie = (vals.gather(1, kk).squeeze(1) == tau) & (tau > NEG_INF)
        general = general | tie
        compact = ~general
        if bool(compact.any()):
            out[compact] = _race_compact(
                vals[compact], idx[compact], k[compact], top_p[compact], min_p_log[compact],
                seed[compact], step[compact],
            )
    else:
        tau = torch.full((batch,), NEG_INF, device=z.device)
    if bool(general.any()):
        tau = torch.where(k > 0, tau, NEG_INF)
        out[general] = _race_rows(
            z[general], tau[general], top_p[general], min_p_log[general], seed[general],
            step[general],
        )
    return out


def _top_logprobs(lp: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
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
    top_ids, top_logprobs = _top_logprobs(lp, n)
    return SampleLogprobs(token_logprob, top_ids, top_logprobs)


def sample(
    logits: torch.Tensor,
    params: ParamsLike,
    window: torch.Tensor | None = None,
    *,
    step: int | torch.Tensor = 0,
    backend: str = "reference",
    return_logprobs: bool = False,
    check: bool = True,
    on_device: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, SampleLogprobs] | SampleResult:
    """Draw one token per row, exactly as SPEC sections 2 to 4 and issue 8 define it.

    Parameters
    ----------
    logits : Tensor
        ``[B, V]``, any float dtype (computed in float32). Not modified.
    params : SamplingParams, sequence of SamplingParams, or PackedParams
        One for every row, or one per row (own values and seed).
    window : LongTensor, optional
        ``[B, W]`` int64: the tokens the penalties apply to, one entry per occurrence, ``-1``
        for an empty slot. The caller cuts it to the range and scope.
    step : int or LongTensor
        Decode step (``[B]`` or scalar) that keys the noise of seeded rows, in ``[0, 2**32)``.
    backend : str
        Accepted for signature parity with :func:`lmgen_fast.sample`; must be "reference"
        or "auto".
    return_logprobs : bool
        Also return the log-probabilities, each row in its ``logprobs_mode``
        (:func:`step_logprobs`: raw as :func:`raw_logprobs`, or processed), with as many top
        alternatives as the largest ``logprobs`` of the rows.
    check : bool
        Validate the window's ids and raise :class:`EmptyRowError` (both wait for the
        device). ``False`` skips both and returns a :class:`SampleResult`, with a status per
        row instead: on the device path nothing then waits for the device.
    on_device : bool, optional
        Run :func:`sample_on_device`'s fixed-shape path (True) or the CPU path (False).
        Default: the device path for tensors off the CPU. Both give the same tokens and
        log-probabilities, except for unseeded rows in a batch of one: the CPU path draws
        them with ``torch.multinomial`` as the article does, the device path by the race
        with a seed from torch's generator (the same distribution, as on the Triton sampler).

    Returns
    -------
    LongTensor or (LongTensor, SampleLogprobs) or SampleResult
        ``[B]`` token ids on ``logits.device``; with ``return_logprobs``, also their
        :class:`SampleLogprobs`; with ``check=False``, a :class:`SampleResult`.

    Raises
    ------
    ValueError
        Bad shapes, dtypes or (with ``check``) window ids; :class:`EmptyRowError` (a
        ValueError) names the rows with nothing left to sample (with ``check``).

    Examples
    --------
    >>> logits = torch.randn(2, 100)
    >>> sample(logits, SamplingParams(top_k=5, seed=7)).shape
    torch.Size([2])
    >>> tokens, lp = sample(logits, SamplingParams(top_p=0.9, logprobs=3, seed=7),
    ...                     return_logprobs=True)
    >>> lp.top_ids.shape
    torch.Size([2, 3])
    >>> sample(logits, SamplingParams(seed=7), check=False, on_device=True).status
    tensor([0, 0], dtype=torch.int32)
    """
    if backend not in ("reference", "auto"):
        raise ValueError(f"reference.sample runs backend 'reference', got backend={backend!r}")
    steps = check_inputs(logits, window, step)
    batch, vocab = logits.shape
    packed = pack(params, batch, logits.device)
    if check and window is not None:
        check_window_values(window, vocab)
    if on_device is None:
        on_device = logits.device.type != "cpu"
    logprobs = None
    if on_device:
        tokens, status, filtered = _sample_fixed(logits, packed, window, steps,
                                                 _draws_seeds(params, packed))
        if return_logprobs:
            logprobs = step_logprobs(logits, filtered, tokens, packed, packed.logprobs,
                                     on_device=True)
        if check:
            empty = status != 0
            if bool(empty.any()):
                raise EmptyRowError(empty.nonzero().flatten().tolist())
    else:
        z = process_logits(logits, packed, window)
        filtered, draw_params = None, packed
        if return_logprobs and bool(packed.processed.any()):
            # Processed log-probabilities describe the z the draw uses: filter once, then
            # race over the survivors with the filters off (the same tokens: every filter
            # is a threshold on z, and the race's keys and tie rule do not change).
            filtered = _filter(z, packed).clone()
            draw_params = _filters_off(packed)
        if not check:
            # Empty rows get a harmless row to draw from, then token 0 and their status.
            empty = z.amax(dim=1) == NEG_INF
            z.masked_fill_(empty.unsqueeze(1), 0.0)
        tokens = _draw(z, draw_params, steps)
        if not check:
            tokens = tokens.masked_fill(empty, 0)
            status = torch.where(empty, STATUS_EMPTY, 0).to(torch.int32)
        if filtered is not None:
            logprobs = step_logprobs(logits, filtered, tokens, packed, packed.logprobs,
                                     on_device=False)
        elif return_logprobs:
            logprobs = raw_logprobs(logits, tokens, packed.logprobs)
    if not check:
        return SampleResult(tokens, status, logprobs)
    return (tokens, logprobs) if return_logprobs else tokens


def _filters_off(packed: PackedParams) -> PackedParams:
    """``packed`` with top-k, top-p and min-p off: for a ``z`` already filtered."""
    return replace(packed, top_k=torch.zeros_like(packed.top_k),
                   top_p=torch.ones_like(packed.top_p), min_p=torch.zeros_like(packed.min_p),
                   min_p_log=torch.full_like(packed.min_p_log, NEG_INF))


def _draws_seeds(params: ParamsLike, packed: PackedParams) -> bool:
    """Whether some row races with a drawn seed, decided on the host without a sync: always
    for packed parameters (their values live on the device)."""
    if isinstance(params, PackedParams):
        return True
    rows = as_row_params(params, packed.temperature.shape[0])
    return any(p.seed is None and p.temperature != 0 for p in rows)


def _draw(z: torch.Tensor, packed: PackedParams, steps: torch.Tensor) -> torch.Tensor:
    """Steps 3 to 6 on the processed logits ``z`` float32 ``[B, V]`` (consumed)."""
    batch = z.shape[0]
    empty = z.amax(dim=1) == NEG_INF
    if bool(empty.any()):
        raise EmptyRowError(empty.nonzero().flatten().tolist())

    greedy = packed.temperature == 0
    out = torch.empty(batch, dtype=torch.int64, device=z.device)
    if bool(greedy.any()):
        out[greedy] = z[greedy].argmax(dim=1)  # first maximum: the lowest id wins a tie
    sampled = ~greedy
    if not bool(sampled.any()):
        return out

    seeded = packed.seeded
    if batch == 1 and not bool(seeded[0]):
        # The article's draw: softmax then multinomial from the global generator, so that
        # the same torch.manual_seed gives the same tokens.
        zf = _filter(z, packed)
        if bool((zf == POS_INF).any()):
            probs = (zf == POS_INF).to(torch.float32)
        else:
            probs = torch.softmax(zf, dim=-1)
        return torch.multinomial(probs, num_samples=1).view(1)

    seed = packed.seed
    need = sampled & ~seeded
    if bool(need.any()):
        drawn = torch.randint(0, 2**62, (batch,), device=z.device)
        seed = torch.where(need, drawn, seed)
    p = packed
    if bool(sampled.all()):
        return _race(z, p.top_k, p.top_p, p.min_p_log, seed, steps)
    rows = sampled.nonzero().flatten()
    out[rows] = _race(z[rows], p.top_k[rows], p.top_p[rows], p.min_p_log[rows], seed[rows],
                      steps[rows])
    return out


# Status bits of the unchecked paths, the same as the Triton sampler's.
STATUS_EMPTY = 1


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
        ``[B]`` int64 decode steps keying the noise, on ``logits.device``.
    draw_seeds : bool
        Draw seeds for unseeded rows (consumes torch's generator); ``False`` takes
        ``packed.seed`` as it is (the engine draws once per decode).
    return_logprobs : bool
        Also return the log-probability of each sampled token (float32 ``[B]``);
        :func:`sample_on_device_logprobs` gives the top alternatives as well.

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
    tokens, status, filtered = _sample_fixed(logits, packed, window, steps, draw_seeds)
    if not return_logprobs:
        return tokens, status, None
    return tokens, status, step_logprobs(logits, filtered, tokens, packed, 0,
                                         on_device=True).token_logprob


def _sample_fixed(
    logits: torch.Tensor,
    packed: PackedParams,
    window: torch.Tensor | None,
    steps: torch.Tensor,
    draw_seeds: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sample_on_device`'s work: ``(tokens, status, filtered)``, ``filtered`` the
    final float32 ``z`` ``[B, V]`` the race drew from (removed tokens ``-inf``)."""
    batch, vocab = logits.shape
    z = process_logits(logits, packed, window, openai=True)
    zmax = z.amax(dim=1)
    status = torch.where(zmax == NEG_INF, STATUS_EMPTY, 0).to(torch.int32)
    greedy = packed.temperature == 0
    seed = packed.seed
    if draw_seeds:
        drawn = torch.randint(0, 2**62, (batch,), device=z.device)
        seed = torch.where(packed.seeded, packed.seed, drawn)
    # Steps 3 to 5 on the row sorted once (the full row: V is a static bound for k): the
    # k-th value, then top-p over the sorted survivors. The order of equal values does not
    # matter, runs of them are kept or dropped whole.
    vals, order = z.sort(dim=1, descending=True)
    tau = kth_value(vals, _effective_k(packed.top_k, vocab))
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
    kept = _race_keys(filtered)
    cols = torch.arange(vocab, device=z.device)
    g = gumbel_from_uniform(uniform_noise(seed.unsqueeze(1), steps.unsqueeze(1), cols))
    keys = torch.where(kept > NEG_INF, kept + g, NEG_INF)
    raced = _pick(keys, cols.expand(batch, -1), fill=vocab)
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
) -> tuple[torch.Tensor, torch.Tensor, SampleLogprobs]:
    """:func:`sample_on_device` with each row's log-probabilities in its ``logprobs_mode``
    and ``n`` top alternatives (:func:`step_logprobs`), all with fixed-shape ops.

    Returns ``(tokens, status, SampleLogprobs)``; processed rows use the filtered ``z`` the
    race drew from.
    """
    tokens, status, filtered = _sample_fixed(logits, packed, window, steps, draw_seeds)
    return tokens, status, step_logprobs(logits, filtered, tokens, packed, n, on_device=True)


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
    otherwise :func:`_top_logprobs` (cheaper, waits for the device).
    """
    lp = raw_table(logits)
    if filtered is not None:
        proc = processed_table(filtered, tokens, packed.temperature == 0)
        lp = torch.where(packed.processed.unsqueeze(1), proc, lp)
    token_logprob = lp.gather(1, tokens.view(-1, 1).to(torch.int64)).squeeze(1)
    n = max(0, min(n, lp.shape[1]))
    if on_device and n:
        top_logprobs, top_ids = lp.sort(dim=1, descending=True, stable=True)
        top_ids, top_logprobs = top_ids[:, :n], top_logprobs[:, :n]
    else:
        top_ids, top_logprobs = _top_logprobs(lp, n)
    if filtered is not None:
        removed = packed.processed.unsqueeze(1) & (top_logprobs == NEG_INF)
        top_ids = torch.where(removed, -1, top_ids)
    return SampleLogprobs(token_logprob, top_ids, top_logprobs)


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
        top_logprobs, top_ids = lp.sort(dim=1, descending=True, stable=True)
        top_ids, top_logprobs = top_ids[:, :n], top_logprobs[:, :n]
    else:
        top_ids = torch.empty(lp.shape[0], 0, dtype=torch.int64, device=lp.device)
        top_logprobs = torch.empty(lp.shape[0], 0, dtype=lp.dtype, device=lp.device)
    return SampleLogprobs(token_logprob, top_ids, top_logprobs)
