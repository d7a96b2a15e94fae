"""A static key/value cache: preallocated per layer, written in place at per-row positions;
and a decoder's cache of one batch (:class:`StaticCache`), kept between runs."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmgen_fast.core.intmath import round_up
from lmgen_fast.core.rows import positions_needed


class KVCache:
    """Keys and values of every layer, ``[B, n_kv_heads, max_len, head_dim]`` each.

    Row ``b``'s token at position ``p`` lives in slot ``p``; rows advance independently, so
    prompts of different lengths need no left padding and keep their natural positions.
    """

    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 *, dtype: torch.dtype, device: torch.device | str):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` ``[B, H, T, D]`` at ``positions`` ``[B, T]``; return the cache's
        first ``kv_len`` slots of this layer (views, no copy)."""
        ck, cv = self.k[layer], self.v[layer]
        if k.shape[2] == 1:  # decode: one slot per row
            rows = torch.arange(k.shape[0], device=k.device)
            ck[rows, :, positions[:, 0]] = k[:, :, 0]
            cv[rows, :, positions[:, 0]] = v[:, :, 0]
        else:  # prefill (or a chunk of it) at any positions
            index = positions.view(k.shape[0], 1, -1, 1).expand_as(k)
            ck.scatter_(2, index, k)
            cv.scatter_(2, index, v)
        return ck[:, :, :kv_len], cv[:, :, :kv_len]


class RowsView:
    """Some rows of a :class:`KVCache`, for a prefill that must not touch the other rows.

    ``update`` writes row ``i`` of its input into cache row ``rows[i]`` and returns those rows'
    first ``kv_len`` slots (a gathered copy: the prefill of newcomers into free slots while
    other rows keep their keys and values).
    """

    def __init__(self, cache: KVCache, rows: torch.Tensor):
        self.cache, self.rows = cache, rows
        self.max_len = cache.max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` ``[n, H, T, D]`` at ``positions`` ``[n, T]`` of the view's rows."""
        ck, cv = self.cache.k[layer], self.cache.v[layer]
        # Advanced indices apart from the head slice put [n, T] first: [n, T, H, D].
        at = (self.rows.view(-1, 1), slice(None), positions)
        ck[at] = k.transpose(1, 2)
        cv[at] = v.transpose(1, 2)
        return ck[self.rows, :, :kv_len], cv[self.rows, :, :kv_len]


def checked_positions(prompt_len: int, max_new_tokens: int, limit: int) -> int:
    """Positions a row takes (:func:`~lmgen_fast.core.rows.positions_needed`).

    Raises
    ------
    ValueError
        Beyond ``limit``, the model's ``max_position_embeddings``.
    """
    need = positions_needed(prompt_len, max_new_tokens)
    if need > limit:
        raise ValueError(
            f"prompt of {prompt_len} tokens plus max_tokens={max_new_tokens} needs {need} "
            f"positions, beyond max_position_embeddings={limit}"
        )
    return need


class StaticCache:
    """The static KV cache of one batch and each row's next position (``positions``, int64
    ``[B]``): the cache part of :class:`~lmgen_fast.models.decoder.CachedLlamaDecoder`.
    ``model``: a :class:`~lmgen_fast.models.LlamaForPretraining` (``new_cache``).

    The cache and the position buffer are kept and reused by the next run of the same batch
    size when they are large enough, so that graphs captured on them stay valid
    (``cache_version`` changes whenever they are replaced). Cache lengths are multiples of
    ``kv_block`` (:meth:`round_len`).

    Length: every operation on the kept cache (reserve, park, compact, copy, release).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.device = model.lm_head.weight.device
        self.kv_block = 128 if self.device.type == "cuda" else 1
        self.cache = None
        self.cache_version = 0
        # (cache, positions, version) that compact() shrank from: restored by the next run
        # of its batch size, so that the graphs captured on it replay again.
        self._spare: tuple | None = None

    def round_len(self, n: int) -> int:
        """``n`` slots rounded up to a multiple of ``kv_block``: the ``kv_len`` a step over
        ``n`` slots uses (a handful of fixed shapes, one CUDA graph each)."""
        return round_up(n, self.kv_block)

    def ensure_cache(self, batch: int, max_len: int) -> None:
        """A cache of ``batch`` rows of at least ``max_len`` slots, in the model's dtype and
        device: the one set aside by :meth:`compact`, the current one, or a new one."""
        if self._spare is not None:
            spare, self._spare = self._spare, None
            if self._fits(spare[0], batch, max_len):
                self.cache, self.positions, self.cache_version = spare
                return
        if self._fits(self.cache, batch, max_len):
            return
        self.cache = self.positions = None  # free the old one before allocating
        self.cache = self.model.new_cache(batch, max_len)
        self.positions = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self.cache_version += 1

    def _fits(self, c, batch: int, max_len: int) -> bool:
        weight = self.model.lm_head.weight
        return (c is not None and c.k[0].shape[0] == batch and c.max_len >= max_len
                and c.k[0].dtype == weight.dtype and c.k[0].device == weight.device)

    def reserve(self, batch: int, prompt_len: int, max_new_tokens: int) -> None:
        """A cache of ``batch`` rows, each as long as the row of ``prompt_len`` tokens and
        ``max_new_tokens`` needs (the longest of a run); every row at position 0."""
        self.ensure_cache(batch, self.round_len(checked_positions(
            prompt_len, max_new_tokens, self.model.config.max_position_embeddings)))
        self.positions.zero_()
        self.kv_len = 0

    def park(self, slots: Sequence[int]) -> None:
        """Send rows without work back to position 0, so that they stay inside the cache."""
        where = torch.as_tensor(list(slots), dtype=torch.int64, device=self.device)
        self.positions.index_fill_(0, where, 0)

    def compact(self, keep: Sequence[int]) -> None:
        """Keep only cache rows ``keep`` (row ``j`` of the new, smaller cache is row
        ``keep[j]``), with their positions: a batch whose other rows have nothing to do. The
        cache of the run's full batch is kept aside for the next run (not the ones between)."""
        index = torch.as_tensor(list(keep), dtype=torch.int64, device=self.device)
        old, positions = self.cache, self.positions.index_select(0, index)
        if self._spare is None:
            self._spare = (old, self.positions, self.cache_version)
        self.cache = self.positions = None
        self.cache = self.model.new_cache(len(keep), old.max_len)
        for new, kept in zip(self.cache.k + self.cache.v, old.k + old.v, strict=True):
            new.copy_(kept.index_select(0, index))
        self.positions = positions
        self.cache_version += 1

    def copy_rows(self, src: Sequence[int], dst: Sequence[int], length: int) -> None:
        """Copy the first ``length`` slots of cache rows ``src`` into rows ``dst`` (every
        layer's keys and values; all sources read before any row is written): the samples
        of one prompt share its prefill."""
        if not dst:
            return
        at = torch.as_tensor(list(src), dtype=torch.int64, device=self.device)
        to = torch.as_tensor(list(dst), dtype=torch.int64, device=self.device)
        for t in self.cache.k + self.cache.v:
            t[to, :, :length] = t[at, :, :length]

    def release_cache(self) -> None:
        """Drop the cache, its positions and the one set aside (the next run allocates)."""
        self.cache = self.positions = self._spare = None
        self.cache_version += 1

    def advance(self) -> int:
        """Account for one more decode step on the host; return the ``kv_len`` it uses."""
        self.kv_len += 1
        return self.round_len(self.kv_len)
