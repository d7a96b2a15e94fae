"""The Triton sampler's launch plan (``lmgen_fast.sampling.launch_plan``): the sizes every
launch is compiled for. What the kernels' exactness needs of them (enough candidates per
chunk, chunks that cover the vocabulary), and the choices the speed rests on: on CUDA the
chunk kernel fits two blocks per SM (tests/sampling/test_chunk_occupancy.py compiles it),
and the merge keeps a top-k of 50 over Llama-3's vocabulary in one tile of registers."""

from __future__ import annotations

import itertools

import pytest

from lmgen_fast.sampling.launch_plan import CUDA_CHUNK, NUCLEUS_CANDIDATES, plan_launch

VOCABS = [16, 100, 4096, 32000, 50257, 128256]
TOP_KS = [0, 1, 15, 16, 17, 50, 64, 65, 300, 1024, 5000, 200000]


@pytest.mark.parametrize("cuda", [True, False])
def test_every_plan_covers_the_vocabulary_and_holds_every_top_k(cuda):
    for vocab, top_k, nucleus in itertools.product(VOCABS, TOP_KS, [0, 2, NUCLEUS_CANDIDATES]):
        p = plan_launch(vocab, top_k, cuda=cuda, nucleus_candidates=nucleus)
        where = (vocab, top_k, nucleus, p)
        assert (p.n_chunks - 1) * p.chunk < vocab <= p.n_chunks * p.chunk, where
        # A chunk keeps every one of a row's k largest it holds (at most chunk of them),
        # and a top-p/min-p row without top-k keeps cap // 2 >= nucleus_candidates.
        assert p.cap >= min(top_k, vocab - 1, p.chunk), where
        assert p.cap // 2 >= min(nucleus, p.chunk // 2), where
        assert p.cap <= p.chunk and p.cap & (p.cap - 1) == 0, where
        assert p.cap >= min(16, p.chunk), where
        assert p.one_tile == (p.tile >= p.n_chunks * p.cap) and p.tile <= 4096, where
        assert p.cp >= p.n_chunks and p.sub <= p.chunk, where


def test_cuda_default_is_the_two_blocks_per_sm_chunk():
    """Llama-3 at top-k 50: chunks of CUDA_CHUNK logits at 8 warps (8 per thread: the chunk
    kernel's registers allow two blocks per SM), and the merge's 63 chunks of candidates
    fit one tile."""
    p = plan_launch(128256, 50, cuda=True)
    assert (p.chunk, p.chunk_warps) == (CUDA_CHUNK, 8) == (2048, 8)
    assert p.n_chunks == 63 and p.cap == 64 and p.one_tile
    # Top-p rows keep NUCLEUS_CANDIDATES per chunk, with or without top-k, in the same tile.
    for top_k in (0, 50):
        q = plan_launch(128256, top_k, cuda=True, nucleus_candidates=NUCLEUS_CANDIDATES)
        assert q.cap == 2 * NUCLEUS_CANDIDATES == 64 and q.one_tile
    # Chunks given by the caller keep their size and get warps for it.
    for chunk, warps in ((1024, 4), (2048, 8), (4096, 8), (8192, 16)):
        p = plan_launch(128256, 50, cuda=True, chunk=chunk)
        assert (p.chunk, p.chunk_warps) == (chunk, warps)
