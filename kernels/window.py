"""Triton set-up kernel of the sampler: the penalty window, grouped by chunk, in one launch.

The sampler's chunk programs each count the window entries that fall in their chunk of the
vocabulary, so they need each row's window grouped by chunk and, per chunk, where its group
starts (``wrange``). ``setup_kernel`` (grid ``[B]``) builds both for one row per program,
and zeroes the row's status word that the sampler's kernels then OR their flags into:

* the window is either given (``[B, W]``) or taken from each row's token history as the
  engine keeps it: the last ``range`` entries before ``hlen`` (``range`` 0: all of them),
  right-aligned in ``W`` slots, ``-1`` elsewhere;
* entries go to buckets: 0 for negative ids (empty slots), ``1 + id // CHUNK`` for the
  chunk of an id, ``n_chunks + 1`` for ids beyond the last chunk; a first pass counts each
  bucket, a second writes every entry at its bucket's start plus its rank there;
* ``wrange[c]`` is the number of entries with ids below ``c * CHUNK``, as
  ``searchsorted`` over the sorted window gives it.

Within a bucket the order is the window's own, not sorted: the chunk programs only count
how often each id occurs, so the sampled tokens are the ones a sorted window gives.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _entries(src_ptr, row, src_stride, src_cols, first, start, j, W, n_chunks,
             CHUNK: tl.constexpr, FROM_HIST: tl.constexpr):
    """Window slots ``j`` of one row: their ids (``-1`` when empty), bucket, liveness."""
    live = j < W
    if FROM_HIST:
        idx = first + j
        ok = live & (idx >= start)
        idx = tl.minimum(tl.maximum(idx, 0), src_cols - 1)
    else:
        idx = j
        ok = live
    v = tl.load(src_ptr + row * src_stride + idx, mask=ok, other=-1)
    v = tl.where(ok, v, -1)
    bucket = tl.where(v < 0, 0, tl.minimum(v // CHUNK + 1, n_chunks + 1))
    return v, bucket.to(tl.int32), live


@triton.jit
def setup_kernel(src_ptr, src_stride, src_cols, hlen_ptr, range_ptr, W,
                 win_ptr, wrange_ptr, status_ptr, n_chunks,
                 CHUNK: tl.constexpr, TB: tl.constexpr, CPB: tl.constexpr,
                 FROM_HIST: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    tl.store(status_ptr + row, 0)
    first = tl.zeros([], dtype=tl.int64)
    start = tl.zeros([], dtype=tl.int64)
    if FROM_HIST:
        hlen = tl.load(hlen_ptr + row)
        rng = tl.load(range_ptr + row)
        start = tl.where(rng > 0, tl.maximum(hlen - rng, 0), 0)
        first = hlen - W
    ids = tl.arange(0, CPB)
    counts = tl.zeros([CPB], dtype=tl.int32)
    for t in range(0, W, TB):
        j = t + tl.arange(0, TB)
        _v, bucket, live = _entries(src_ptr, row, src_stride, src_cols, first, start, j, W,
                                    n_chunks, CHUNK, FROM_HIST)
        onehot = (bucket[:, None] == ids[None, :]) & live[:, None]
        counts += tl.sum(onehot.to(tl.int32), axis=0)
    ends = tl.cumsum(counts, axis=0)
    tl.store(wrange_ptr + row * (n_chunks + 1) + ids, ends.to(tl.int64), mask=ids <= n_chunks)
    starts = ends - counts
    for t in range(0, W, TB):
        j = t + tl.arange(0, TB)
        v, bucket, live = _entries(src_ptr, row, src_stride, src_cols, first, start, j, W,
                                   n_chunks, CHUNK, FROM_HIST)
        onehot = ((bucket[:, None] == ids[None, :]) & live[:, None]).to(tl.int32)
        rank = tl.cumsum(onehot, axis=0)  # inclusive: 1 for the tile's first of a bucket
        pos = tl.sum(onehot * (starts[None, :] + rank - 1), axis=1)
        tl.store(win_ptr + row * W + pos, v, mask=live)
        starts += tl.sum(onehot, axis=0)
