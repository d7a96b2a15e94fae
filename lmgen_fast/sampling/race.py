"""Step 6 of a sampling step (:mod:`lmgen_fast.sampling.reference` states the rules): the
draw. Greedy rows take the first argmax; sampled rows run the exponential race
``argmax(z_i + g_i)`` with Gumbel noise ``g_i`` from :mod:`lmgen_fast.core.philox` keyed on
(seed, step, token), an exact key tie going to the lower token id.

The CPU path races over the fewest values it can: a row's top-k candidates when no value
equal to the k-th lies beyond them (:func:`row_topk` finds them cheaply), else its
survivors only.
"""

from __future__ import annotations

import torch

from lmgen_fast.core.errors import EmptyRowError
from lmgen_fast.core.params import PackedParams
from lmgen_fast.core.philox import gumbel_from_uniform, uniform_noise
from lmgen_fast.core.rows import fill_unseeded
from lmgen_fast.sampling.filters import apply_filters, effective_k, p_filter
from lmgen_fast.sampling.penalties import NEG_INF, POS_INF


def first_max(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's maximum of ``z`` ``[N, C]`` and the first index holding it (the lowest id
    wins a tie), int64 ``[N]``: ``argmax``'s token, from ``torch.max``, which finds it about
    3 times faster on the CPU (8 x 8000 float32: 33 against 97 us on one thread)."""
    return torch.max(z, dim=1)


def race_keys(z: torch.Tensor) -> torch.Tensor:
    """Values that enter the race, float32 ``[N, C]`` like ``z``: where a row has ``+inf``,
    those tokens alone, at 0 (the rest ``-inf``)."""
    has_inf = (z == POS_INF).any(dim=1, keepdim=True)
    return torch.where(has_inf, torch.where(z == POS_INF, 0.0, NEG_INF), z)


def pick(keys: torch.Tensor, tokens: torch.Tensor, fill: int) -> torch.Tensor:
    """Per row of ``keys`` float32 ``[N, C]``, the id of ``tokens`` (int64 ``[N, C]``) with
    the largest key, int64 ``[N]``; an exact tie goes to the lower token id (``fill``, above
    every id, stands for the entries that do not hold the maximum)."""
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
    v = race_keys(v)
    g = gumbel_from_uniform(uniform_noise(seed.unsqueeze(1), step.unsqueeze(1), idx))
    keys = torch.where(v > NEG_INF, v + g, NEG_INF)
    return pick(keys, idx, fill=torch.iinfo(torch.int64).max)


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
    z = race_keys(z)
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


def race(
    z: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p_log: torch.Tensor,
    seed: torch.Tensor,
    step: torch.Tensor,
) -> torch.Tensor:
    """Exponential race for every (sampled) row of ``z`` float32 ``[B, V]``: int64 ``[B]``
    tokens. Top-k rows without ties past k go compact. The parameter tensors are ``[B]``
    (``top_p`` float64, ``min_p_log`` float32, ``seed`` and ``step`` int64), for exactly
    these rows."""
    batch, vocab = z.shape
    k = effective_k(top_k, vocab)
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


def draw(z: torch.Tensor, packed: PackedParams, steps: torch.Tensor) -> torch.Tensor:
    """Steps 3 to 6 on the processed logits ``z`` float32 ``[B, V]`` (consumed): int64
    ``[B]`` tokens, with ``packed`` on ``z``'s device and ``steps`` int64 ``[B]``.

    Raises :class:`~lmgen_fast.core.errors.EmptyRowError` for rows with nothing to sample.
    Unseeded rows race with seeds from :func:`~lmgen_fast.core.rows.fill_unseeded`, but in
    a batch of one, which draws with ``torch.multinomial`` as the article does.
    """
    batch = z.shape[0]
    greedy = packed.temperature == 0
    some_greedy = bool(greedy.any())
    if some_greedy and bool(greedy.all()):  # (a sampled batch pays no extra check)
        top, first = first_max(z)
        if bool((top == NEG_INF).any()):
            raise EmptyRowError((top == NEG_INF).nonzero().flatten().tolist())
        return first
    empty = z.amax(dim=1) == NEG_INF
    if bool(empty.any()):
        raise EmptyRowError(empty.nonzero().flatten().tolist())

    out = torch.empty(batch, dtype=torch.int64, device=z.device)
    if some_greedy:
        out[greedy] = first_max(z[greedy])[1]
    if batch == 0:  # (else some row is sampled: an all-greedy batch returned above)
        return out
    sampled = ~greedy

    seeded = packed.seeded
    if batch == 1 and not bool(seeded[0]):
        # The article's draw: softmax then multinomial from the global generator, so that
        # the same torch.manual_seed gives the same tokens.
        zf = apply_filters(z, packed)
        if bool((zf == POS_INF).any()):
            probs = (zf == POS_INF).to(torch.float32)
        else:
            probs = torch.softmax(zf, dim=-1)
        return torch.multinomial(probs, num_samples=1).view(1)

    seed = packed.seed
    if bool((sampled & ~seeded).any()):
        seed = fill_unseeded(seed, seeded)  # greedy rows do not race: their seed is moot
    p = packed
    if bool(sampled.all()):
        return race(z, p.top_k, p.top_p, p.min_p_log, seed, steps)
    rows = sampled.nonzero().flatten()
    out[rows] = race(z[rows], p.top_k[rows], p.top_p[rows], p.min_p_log[rows], seed[rows],
                     steps[rows])
    return out
