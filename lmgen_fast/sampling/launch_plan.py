"""The static choices of a launch of the Triton sampler: chunk and candidate sizes, warps,
and what the host knows of a batch's parameters (its largest top-k, whether seeds are drawn,
whether some row uses top-p or min-p).

Every choice made here is one the kernels are specialised (compiled) on: the ahead-of-time
compile check (:mod:`lmgen_fast.cli.kernel_compile`) enumerates its variants through
:func:`plan_launch`, so a launch choice cannot escape it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmgen_fast.core.intmath import cdiv, next_pow2
from lmgen_fast.core.params import PackedParams, SamplingParams, as_row_params
from lmgen_fast.sampling.reference import ParamsLike

# Columns of ``logprob_out`` (see :func:`lmgen_fast.sampling.kernel_launch.launch`).
LOGPROB_COLUMNS = 4
# Candidates per chunk kept for top-p/min-p rows without top-k (sample()'s default): 32 of
# each CUDA_CHUNK (2048) logits, as dense as 64 of the 4096 chunks before, and cap 64 keeps
# the 63 chunks' candidates of Llama-3's vocabulary in one merge tile.
NUCLEUS_CANDIDATES = 32
# Bits of the top-p cutoff found per extra pass of the slow path (16 bins per pass).
RADIX_BITS = 4
# Logits per program of the chunk kernel on CUDA (at 8 warps).
CUDA_CHUNK = 2048


@dataclass(frozen=True)
class LaunchPlan:
    """Every static choice of one launch: what the kernels are specialised (compiled) on.

    ``chunk`` logits per program of the chunk kernel (a power of two) and its
    ``chunk_warps``; ``cap`` candidates each chunk may keep (at least ``max_top_k``, so every
    row with ``k <= max_top_k`` is exact, and at least ``2 * nucleus_candidates``: top-p/min-p
    rows without top-k keep ``cap // 2``; a power of two, at least 16, at most ``chunk``);
    the merge kernel reads ``tile`` candidate slots at a time (``one_tile``: all of them at
    once) with ``merge_warps``, ``cp`` chunk aggregates per row and ``sub`` logits per
    block of its multi-pass path.
    """

    chunk: int
    cap: int
    n_chunks: int
    chunk_warps: int
    tile: int
    one_tile: bool
    cp: int
    sub: int
    merge_warps: int


def plan_launch(vocab: int, max_top_k: int, *, cuda: bool, chunk: int | None = None,
                nucleus_candidates: int = 0, chunk_warps: int | None = None) -> LaunchPlan:
    """The launch sizes :func:`~lmgen_fast.sampling.kernel_launch.launch` uses for a
    vocabulary and the batch's largest top-k.

    ``cuda`` selects the GPU defaults (larger chunks); the interpreter uses small ones. The
    ahead-of-time compile test enumerates its variants through this function, so a launch
    choice made here cannot escape it.
    """
    top_k = max(0, min(int(max_top_k), vocab - 1))
    if chunk is None:
        # 2048 at 8 warps: 112 registers, no spills on sm_90a (Triton 3.6 and 3.9), so two
        # blocks of 256 threads share an SM and one's loads hide behind the other's work.
        # 4096 at 8 warps took 188-214 registers: one block per SM.
        chunk = CUDA_CHUNK if cuda else 1024
    chunk = max(16, min(next_pow2(int(chunk)), next_pow2(vocab)))
    # Every row with k <= max_top_k is exact with cap >= k; top-p/min-p rows without
    # top-k keep cap // 2. No more: the merge reads n_chunks * cap slots, in registers
    # while they fit one tile (4096: k = 50 over 63 chunks of Llama-3's vocabulary).
    cap = min(chunk, next_pow2(max(top_k, 2 * int(nucleus_candidates), 16)))
    n_chunks = cdiv(vocab, chunk)
    tile = min(next_pow2(n_chunks * cap), 4096)
    return LaunchPlan(
        chunk=chunk, cap=cap, n_chunks=n_chunks,
        chunk_warps=chunk_warps or (4 if chunk <= 1024 else (8 if chunk <= 4096 else 16)),
        tile=tile, one_tile=tile >= n_chunks * cap, cp=next_pow2(n_chunks),
        sub=min(chunk, 1024),
        # ptxas caps the merge at 128 registers from 8 warps on: with 4 or 8 candidates per
        # thread there it spilled 36-250 bytes (sm_90a, Triton 3.6 and 3.9); at most 8 per
        # thread at 16 warps and at most 4 at 4 warps spill nothing or a few words.
        merge_warps=4 if tile <= 512 else 16,
    )


def plan(vocab: int, max_top_k: int, device: torch.device, chunk: int | None = None,
         nucleus_candidates: int = 0) -> tuple[int, int]:
    """``(chunk, cap)`` of :func:`plan_launch` for tensors on ``device``."""
    p = plan_launch(vocab, max_top_k, cuda=torch.device(device).type == "cuda", chunk=chunk,
                    nucleus_candidates=nucleus_candidates)
    return p.chunk, p.cap


def host_hints(params: ParamsLike, packed: PackedParams, batch: int) -> tuple[int, bool, bool]:
    """``(max_top_k, draw_seeds, nucleus)`` from host-side parameters.

    ``nucleus``: some row uses top-p or min-p (synchronises for packed parameters).
    """
    if isinstance(params, PackedParams):
        sampled_unseeded = (packed.temperature != 0) & ~packed.seeded
        nucleus = (packed.top_p < 1) | (packed.min_p > 0)
        return int(packed.top_k.max()), bool(sampled_unseeded.any()), bool(nucleus.any())
    rows: Sequence[SamplingParams] = as_row_params(params, batch)
    draw = any(p.seed is None and p.temperature != 0 for p in rows)
    nucleus = any(p.top_p < 1 or p.min_p > 0 for p in rows)
    return max(max(p.top_k for p in rows), 0), draw, nucleus
