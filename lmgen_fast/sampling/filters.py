"""Steps 3 to 5 of a sampling step (:mod:`lmgen_fast.sampling.reference` states the rules):
top-k, top-p and min-p on the processed logits ``z``, removed tokens set to ``-inf``.

The rules are written once (:func:`kth_value`, :func:`top_p_keep`, :func:`min_p_removes`)
and applied both on the rows that need them (:func:`p_filter`, the CPU path) and as masks on
every row (the fixed-shape path of :mod:`lmgen_fast.sampling.fixed`).
"""

from __future__ import annotations

import torch

from lmgen_fast.core.params import PackedParams
from lmgen_fast.sampling.penalties import NEG_INF, POS_INF


def effective_k(top_k: torch.Tensor, vocab: int) -> torch.Tensor:
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
        int64 ``[B]`` effective ``k`` (:func:`effective_k`: 0 where top-k is off).

    Returns
    -------
    Tensor
        float32 ``[B]``: ``vals[r, k[r] - 1]``, ``-inf`` where ``k[r] == 0``.
    """
    picked = vals.gather(1, (k - 1).clamp_min(0).unsqueeze(1)).squeeze(1)
    return torch.where(k > 0, picked, NEG_INF)


def top_k_threshold(z: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """The k-th largest value per row (``-inf`` where top-k is off), float32 ``[B]``."""
    k = effective_k(top_k, z.shape[1])
    if not bool((k > 0).any()):
        return torch.full((z.shape[0],), NEG_INF, device=z.device)
    return kth_value(torch.topk(z, int(k.max()), dim=1).values, k)


def apply_filters(z: torch.Tensor, packed: PackedParams) -> torch.Tensor:
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
