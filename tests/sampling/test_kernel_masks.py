"""The Triton sampler under SPEC section 7's bias and masks, against the reference.

Logit bias lists crossing chunk edges, allowed sets, a per-step token bitmask and
``min_tokens``, over every filter path (top-k candidates, the nucleus among the chunk
candidates, the multi-pass path): the same tokens as the reference on the same noise, the
same log-probabilities (raw: the model's; processed: the biased, masked values'), and the
reference's error for a row with every token masked. Each test is a ``[gpu]`` /
``[interpreter]`` pair (small shapes in the interpreter).
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import at_size, capture, require_kernel_runtime

require_kernel_runtime()

from lmgen_fast import SamplingParams  # noqa: E402
from lmgen_fast.core.bitmask import bitmask_words  # noqa: E402
from lmgen_fast.core.errors import STATUS_SLOW, EmptyRowError  # noqa: E402
from lmgen_fast.core.params import PackedParams  # noqa: E402
from lmgen_fast.sampling import kernel as K  # noqa: E402
from lmgen_fast.sampling import reference  # noqa: E402


def rows_across_chunks(gen, batch, vocab, chunk):
    """Rows whose biases sit on and around chunk edges, with allowed sets, stop ids and
    min_tokens, over greedy, top-k, top-p and min-p rows (half with processed logprobs)."""
    edges = [0, chunk - 1, chunk, 2 * chunk - 1, vocab - 1]
    filters = [dict(temperature=0.0), dict(top_k=5), dict(top_k=0, top_p=0.9),
               dict(top_k=12, top_p=0.8, min_p=0.02), dict(top_k=0, min_p=0.1),
               dict(top_k=0), dict(top_k=0, top_p=0.95, temperature=1.4)]
    rows = []
    for r in range(batch):
        ids = torch.randperm(vocab, generator=gen)[:12].tolist()
        bias = {t: float(b) for t, b in zip(edges[r % 3:] + ids[:r % 5],
                                             torch.randn(12, generator=gen) * 5, strict=False)}
        allowed = sorted(set(ids[:10]) | set(edges)) if r % 3 == 1 else None
        if r % 4 == 3:
            allowed = list(range(r, vocab, 2))
        rows.append(SamplingParams(
            **{"temperature": 0.8, **filters[r % len(filters)]}, seed=40 + r, logit_bias=bias,
            allowed_token_ids=allowed, stop_token_ids=edges[1:3], min_tokens=r % 3,
            repetition_penalty=1.2, logprobs=4,
            logprobs_mode="processed" if r % 2 else "raw"))
    return rows


def test_kernel_matches_reference_under_bias_and_masks(kernel_device):
    gen = torch.Generator().manual_seed(11)
    batch, vocab, chunk = at_size(kernel_device, (64, 128256, 2048), (7, 256, 128))
    logits = (torch.randn(batch, vocab, generator=gen) * 3).to(kernel_device)
    rows = rows_across_chunks(gen, batch, vocab, chunk)
    steps = torch.randint(0, 3, (batch,), generator=gen).to(kernel_device)
    bitmask = torch.randint(-2**31, 2**31, (batch, bitmask_words(vocab)), generator=gen,
                            dtype=torch.int64).to(torch.int32)
    bitmask[::3] = -1  # rows the grammar leaves alone
    bitmask = bitmask.to(kernel_device)
    window = torch.randint(-1, vocab, (batch, 5), generator=gen).to(kernel_device)
    packed = PackedParams.from_rows(rows, kernel_device, end_ids=(1,), vocab_size=vocab)
    want, want_lp = reference.sample(logits, packed, window, step=steps, token_bitmask=bitmask,
                                     return_logprobs=True)
    tokens, lp = K.sample(logits, packed, window, step=steps, token_bitmask=bitmask,
                          chunk=chunk, return_logprobs=True)
    assert torch.equal(tokens, want)
    assert torch.allclose(lp.token_logprob, want_lp.token_logprob, atol=2e-5, rtol=0)
    assert torch.equal(lp.top_ids, want_lp.top_ids)
    assert torch.allclose(lp.top_logprobs, want_lp.top_logprobs, atol=2e-5, rtol=0)
    # So few candidates that nucleus rows re-read their logits: the multi-pass path
    # recomputes z, bias and masks included, and draws the same tokens.
    lp_out = torch.empty(batch, K.LOGPROB_COLUMNS, device=kernel_device)
    slow, status = K.launch(logits, packed, window, steps, max_top_k=12, nucleus_candidates=1,
                            chunk=chunk, token_bitmask=bitmask, logprob_out=lp_out)
    assert bool(((status & STATUS_SLOW) != 0).any())
    assert torch.equal(slow, want) and not bool((status & ~STATUS_SLOW).any())
    assert torch.allclose(lp_out[:, 0], want_lp.token_logprob, atol=2e-5, rtol=0)
    # Raw log-probabilities stay the model's: log_softmax of the unbiased logits.
    raw = torch.tensor([p.logprobs_mode == "raw" for p in rows], device=kernel_device)
    exact = torch.log_softmax(logits.double(), dim=1).gather(1, want.view(-1, 1)).squeeze(1)
    assert torch.allclose(lp.token_logprob[raw].double(), exact[raw], atol=2e-5)


def test_kernel_raises_for_a_fully_masked_row_and_replays_masks(kernel_device):
    vocab = 300
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, vocab, generator=gen).to(kernel_device)
    rows = [SamplingParams(seed=1, top_k=0), SamplingParams(seed=2, allowed_token_ids=[5, 6]),
            SamplingParams(seed=3, logit_bias={299: 100.0}, min_tokens=2,
                           stop_token_ids=[299])]
    bitmask = torch.full((3, bitmask_words(vocab)), -1, dtype=torch.int32)
    bitmask[1, 0] = ~((1 << 5) | (1 << 6))
    bitmask = bitmask.to(kernel_device)
    with pytest.raises(EmptyRowError, match=r"row\(s\) \[1\]"):
        K.sample(logits, rows, token_bitmask=bitmask, chunk=128)
    # A captured step reads the step counters, parameters and bitmask from the device:
    # changing them between replays changes what it draws, as it must.
    packed = PackedParams.from_rows(rows, kernel_device, vocab_size=vocab)
    steps = torch.zeros(3, dtype=torch.int64, device=kernel_device)
    bitmask.fill_(-1)
    replay = capture(kernel_device, lambda: K.launch(logits, packed, None, steps, max_top_k=50,
                                                     draw_seeds=False, token_bitmask=bitmask))
    for step in range(3):
        steps.fill_(step)
        tokens, status = replay()
        want = reference.sample(logits, packed, step=steps, token_bitmask=bitmask)
        assert torch.equal(tokens, want) and not bool(status.any())
        assert (tokens[2] == 299) == (step >= 2)
        assert tokens[1] in (5, 6)
    bitmask[0] = 0
    bitmask[0, 3] = 1 << 4  # token 100 alone
    assert replay()[0][0] == 100
    assert not math.isnan(float(logits[0, 100]))
