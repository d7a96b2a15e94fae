"""The reference sampler: SPEC sections 2 to 4 in plain, vectorized PyTorch.

It is the CPU path of ``lmgen_fast.sample`` and the oracle every kernel is tested against.
One step for row ``r`` (logits ``l``, window ``w``):

1. ``z = l / T`` in float32 (``T == 0``: ``z = l``, the row is greedy); NaN becomes ``-inf``.
2. Every token ``t`` that occurs ``c`` times in ``w`` (``c = 1`` in "once" mode):
   ``z[t] / p**c`` if ``z[t] > 0`` else ``z[t] * p**c``.
3. Top-k (``0 < k < V``): values below the k-th largest become ``-inf`` (ties survive).
4. Draw: greedy rows take the first argmax. If ``+inf`` values remain, they alone share the
   probability equally. Seeded rows run the exponential race ``argmax(z_i + g_i)``, ``g_i``
   Gumbel noise from :mod:`lmgen_fast.philox` keyed on (seed, step, token); an exact key tie
   goes to the lower token id. Unseeded rows: a batch of one calls ``torch.multinomial`` on
   ``softmax(z)`` as the article does; otherwise each row races with a seed drawn from torch's
   generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .params import PackedParams, SamplingParams, as_row_params
from .philox import gumbel_from_uniform, uniform_noise

NEG_INF = float("-inf")
POS_INF = float("inf")
ParamsLike = SamplingParams | Sequence[SamplingParams] | PackedParams


class EmptyRowError(ValueError):
    """A logits row has no finite or ``+inf`` value left to sample from."""

    def __init__(self, rows: Sequence[int]):
        self.rows = list(rows)
        super().__init__(
            f"logits row(s) {self.rows} have no finite or +inf value to sample from "
            "(all NaN or -inf)"
        )


def pack(params: ParamsLike, batch: int, device: torch.device) -> PackedParams:
    """Per-row parameters as tensors on ``device`` (a PackedParams is checked and moved)."""
    if isinstance(params, PackedParams):
        if params.temperature.shape != (batch,):
            raise ValueError(
                f"packed params have {params.temperature.shape[0]} rows for a batch of {batch}"
            )
        if params.temperature.device != device:
            params = PackedParams(**{k: v.to(device) for k, v in vars(params).items()})
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
    z: torch.Tensor, window: torch.Tensor, penalty: torch.Tensor, once: torch.Tensor
) -> None:
    """Apply the repetition penalty to ``z`` [B, V] float32 in place.

    ``window`` is int64 [B, W] with -1 for empty slots. Work is O(B * W**2): the count of each
    window entry's token is found by comparing the window with itself, then every entry writes
    its token's new value; duplicates write the same value, so the scatter's order is moot.
    """
    valid = window >= 0
    # Empty slots point at a token already in the row (or at 0 with count 0 when there is
    # none), so their writes agree with the real entries.
    fallback = window.amax(dim=1, keepdim=True).clamp_min(0)
    idx = torch.where(valid, window, fallback)
    counts = ((idx.unsqueeze(2) == window.unsqueeze(1)) & valid.unsqueeze(1)).sum(2)
    counts = torch.where(once.unsqueeze(1), counts.clamp_max(1), counts)
    factor = torch.pow(penalty.unsqueeze(1), counts.to(torch.float32))
    vals = z.gather(1, idx)
    z.scatter_(1, idx, torch.where(vals > 0, vals / factor, vals * factor))


def process_logits(
    logits: torch.Tensor, packed: PackedParams, window: torch.Tensor | None
) -> torch.Tensor:
    """Steps 1 and 2: tempered, penalized float32 logits ``[B, V]`` with NaN as ``-inf``."""
    temperature = torch.where(packed.temperature == 0, 1.0, packed.temperature)
    z = logits.to(torch.float32) / temperature.unsqueeze(1)  # always a new tensor
    z.nan_to_num_(nan=NEG_INF, posinf=POS_INF, neginf=NEG_INF)
    if window is not None and window.shape[1] > 0:
        apply_penalty(z, window, packed.penalty, packed.once)
    return z


def _effective_k(top_k: torch.Tensor, vocab: int) -> torch.Tensor:
    """``k`` where top-k filters anything, else 0 (``k <= 0`` or ``k >= V`` keep all)."""
    return torch.where((top_k > 0) & (top_k < vocab), top_k, 0)


def top_k_threshold(z: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """The k-th largest value per row (``-inf`` where top-k is off), float32 ``[B]``."""
    k = _effective_k(top_k, z.shape[1])
    tau = torch.full((z.shape[0],), NEG_INF, device=z.device)
    on = k > 0
    if bool(on.any()):
        kmax = int(k.max())
        vals = torch.topk(z, kmax, dim=1).values
        tau = torch.where(on, vals.gather(1, (k - 1).clamp_min(0).unsqueeze(1)).squeeze(1), tau)
    return tau


def filtered_logits(
    logits: torch.Tensor,
    params: ParamsLike,
    window: torch.Tensor | None = None,
) -> torch.Tensor:
    """Steps 1 to 3 of one sampling step, float32 ``[B, V]`` (removed tokens are ``-inf``).

    For a sampled (non-greedy) row, ``softmax`` of its output row is the exact distribution
    of the next token, up to the ``+inf`` rule (those tokens share all the mass).
    """
    packed = pack(params, logits.shape[0], logits.device)
    z = process_logits(logits, packed, window)
    tau = top_k_threshold(z, packed.top_k)
    return z.masked_fill_(z < tau.unsqueeze(1), NEG_INF)


def _race_keys(z: torch.Tensor) -> torch.Tensor:
    """Values that enter the race: where a row has ``+inf``, those tokens alone, at 0."""
    has_inf = (z == POS_INF).any(dim=1, keepdim=True)
    return torch.where(has_inf, torch.where(z == POS_INF, 0.0, NEG_INF), z)


def _pick(keys: torch.Tensor, tokens: torch.Tensor, fill: int) -> torch.Tensor:
    """Per row, the token with the largest key; an exact tie goes to the lower token id."""
    best = keys.amax(dim=1, keepdim=True)
    return torch.where(keys == best, tokens, fill).amin(dim=1)


def _race_compact(
    vals: torch.Tensor, idx: torch.Tensor, k: torch.Tensor, seed: torch.Tensor, step: torch.Tensor
) -> torch.Tensor:
    """The race over each row's top-k entries (sorted ``vals``/``idx``), no tie past the k-th."""
    in_k = torch.arange(vals.shape[1], device=vals.device).unsqueeze(0) < k.unsqueeze(1)
    v = _race_keys(vals.masked_fill(~in_k, NEG_INF))
    g = gumbel_from_uniform(uniform_noise(seed.unsqueeze(1), step.unsqueeze(1), idx))
    keys = torch.where(v > NEG_INF, v + g, NEG_INF)
    return _pick(keys, idx, fill=torch.iinfo(torch.int64).max)


def _race_rows(
    z: torch.Tensor, tau: torch.Tensor, seed: torch.Tensor, step: torch.Tensor
) -> torch.Tensor:
    """The race over every surviving token of each row; noise only for the survivors."""
    z = _race_keys(z.masked_fill(z < tau.unsqueeze(1), NEG_INF))
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


def _race(z: torch.Tensor, top_k: torch.Tensor, seed: torch.Tensor, step: torch.Tensor):
    """Exponential race for every row of ``z``; top-k rows without ties past k go compact."""
    batch, vocab = z.shape
    k = _effective_k(top_k, vocab)
    out = torch.empty(batch, dtype=torch.int64, device=z.device)
    general = k == 0
    if bool((~general).any()):
        # One extra column tells whether a value equal to the k-th lies beyond the top k.
        kp = min(int(k.max()) + 1, vocab)
        vals, idx = torch.topk(z, kp, dim=1)
        kk = k.clamp_min(1).unsqueeze(1)
        tau = vals.gather(1, kk - 1).squeeze(1)
        tie = (vals.gather(1, kk).squeeze(1) == tau) & (tau > NEG_INF)
        general = general | tie
        compact = ~general
        if bool(compact.any()):
            out[compact] = _race_compact(
                vals[compact], idx[compact], k[compact], seed[compact], step[compact]
            )
    else:
        tau = torch.full((batch,), NEG_INF, device=z.device)
    if bool(general.any()):
        tau = torch.where(k > 0, tau, NEG_INF)
        out[general] = _race_rows(z[general], tau[general], seed[general], step[general])
    return out


def sample(
    logits: torch.Tensor,
    params: ParamsLike,
    window: torch.Tensor | None = None,
    *,
    step: int | torch.Tensor = 0,
    backend: str = "reference",
) -> torch.Tensor:
    """Draw one token per row, exactly as SPEC sections 2 to 4 define it, in PyTorch.

    Parameters
    ----------
    logits : Tensor
        ``[B, V]``, any float dtype (computed in float32). Not modified.
    params : SamplingParams or sequence of SamplingParams
        One for every row, or one per row (own values and seed).
    window : LongTensor, optional
        ``[B, W]`` int64: the tokens the repetition penalty applies to, one entry per
        occurrence, ``-1`` for an empty slot. The caller cuts it to the range and scope.
    step : int or LongTensor
        Decode step (``[B]`` or scalar) that keys the noise of seeded rows, in ``[0, 2**32)``.
    backend : str
        Accepted for signature parity with :func:`lmgen_fast.sample`; must be "reference"
        or "auto".

    Returns
    -------
    LongTensor
        ``[B]`` token ids on ``logits.device``.

    Raises
    ------
    ValueError
        Bad shapes, dtypes or window ids; :class:`EmptyRowError` (a ValueError) names the rows
        with nothing left to sample.

    Examples
    --------
    >>> logits = torch.randn(2, 100)
    >>> sample(logits, SamplingParams(top_k=5, seed=7)).shape
    torch.Size([2])
    """
    if backend not in ("reference", "auto"):
        raise ValueError(f"reference.sample runs backend 'reference', got backend={backend!r}")
    steps = check_inputs(logits, window, step)
    batch, vocab = logits.shape
    packed = pack(params, batch, logits.device)
    if window is not None:
        check_window_values(window, vocab)
    z = process_logits(logits, packed, window)

    empty = z.amax(dim=1) == NEG_INF
    if bool(empty.any()):
        raise EmptyRowError(empty.nonzero().flatten().tolist())

    greedy = packed.temperature == 0
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if bool(greedy.any()):
        out[greedy] = z[greedy].argmax(dim=1)  # first maximum: the lowest id wins a tie
    sampled = ~greedy
    if not bool(sampled.any()):
        return out

    seeded = packed.seeded
    if batch == 1 and not bool(seeded[0]):
        # The article's draw: softmax then multinomial from the global generator, so that
        # the same torch.manual_seed gives the same tokens.
        zf = z.masked_fill_(z < top_k_threshold(z, packed.top_k).unsqueeze(1), NEG_INF)
        if bool((zf == POS_INF).any()):
            probs = (zf == POS_INF).to(torch.float32)
        else:
            probs = torch.softmax(zf, dim=-1)
        return torch.multinomial(probs, num_samples=1).view(1)

    seed = packed.seed
    need = sampled & ~seeded
    if bool(need.any()):
        drawn = torch.randint(0, 2**62, (batch,), device=logits.device)
        seed = torch.where(need, drawn, seed)
    rows = sampled.nonzero().flatten()
    if rows.numel() == batch:
        return _race(z, packed.top_k, seed, steps)
    out[rows] = _race(z[rows], packed.top_k[rows], seed[rows], steps[rows])
    return out
