"""A static key/value cache: preallocated per layer, written in place at per-row positions."""

from __future__ import annotations

import torch


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
