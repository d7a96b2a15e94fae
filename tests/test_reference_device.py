"""The reference sampler's device path (``reference.sample_on_device``): fixed shapes, no host
round trip, and the very tokens of :func:`reference.sample` for seeded and greedy rows.

It runs on CPU tensors as well, which is how it is checked here against the CPU path on
fresh random inputs; ``test_capture_safety.py`` checks that it never waits for the device.
"""

from __future__ import annotations

import pytest
import torch

from lmgen_fast import SamplingParams, reference
from lmgen_fast.params import PackedParams

from conftest import assert_frequencies_match

FILTERS = [
    dict(),
    dict(top_k=7),
    dict(top_k=1),
    dict(top_p=0.8),
    dict(min_p=0.1),
    dict(top_k=20, top_p=0.7),
    dict(top_k=30, top_p=0.9, min_p=0.02),
    dict(top_p=0.5, min_p=0.05),
]
PENALTIES = [
    dict(),
    dict(repetition_penalty=1.5),
    dict(repetition_penalty=1.3, penalty_mode="once", frequency_penalty=0.4,
         presence_penalty=0.2),
]


def rows_for(seed: int, batch: int) -> list[SamplingParams]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for r in range(batch):
        f = FILTERS[int(torch.randint(len(FILTERS), (1,), generator=gen))]
        p = PENALTIES[int(torch.randint(len(PENALTIES), (1,), generator=gen))]
        temp = [0.0, 0.7, 1.0, 1.6][int(torch.randint(4, (1,), generator=gen))]
        rows.append(SamplingParams(temperature=temp, seed=seed * 100 + r, **f, **p))
    return rows


@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_tokens_as_the_cpu_path(case, dtype):
    gen = torch.Generator().manual_seed(1000 + case)
    batch, vocab = 12, 257
    logits = (torch.randn(batch, vocab, generator=gen) * 3).to(dtype)
    if case % 2:
        # Coarse values: ties at the k-th place and inside the nucleus.
        logits = (logits * 2).round() / 2
    logits[0, 5] = float("inf")
    logits[1, :10] = float("nan")
    logits[2, 3] = float("-inf")
    window = torch.randint(-1, vocab, (batch, 9), generator=gen)
    rows = rows_for(case, batch)
    packed = PackedParams.from_rows(rows, "cpu")
    steps = torch.randint(0, 2**32, (batch,), generator=gen)
    want = reference.sample(logits, rows, window, step=steps, return_logprobs=True)
    got, status, lp = reference.sample_on_device(logits, packed, window, steps,
                                                 return_logprobs=True)
    assert torch.equal(got, want[0])
    assert not status.any()
    assert torch.equal(lp, want[1].token_logprob)


def test_empty_rows_leave_a_status_instead_of_raising():
    logits = torch.randn(3, 50)
    logits[1] = float("-inf")
    logits[2] = float("nan")
    packed = PackedParams.from_rows([SamplingParams(seed=1)] * 3, "cpu")
    tokens, status, _ = reference.sample_on_device(logits, packed, None, torch.zeros(3).long())
    assert status.tolist() == [0, reference.STATUS_EMPTY, reference.STATUS_EMPTY]
    assert tokens[1:].tolist() == [0, 0]
    with pytest.raises(reference.EmptyRowError):
        reference.sample(logits, SamplingParams(seed=1))


@pytest.mark.parametrize("params", [dict(temperature=0.9, top_k=6, top_p=0.9),
                                    dict(temperature=1.3, min_p=0.05)])
def test_unseeded_rows_draw_from_the_exact_distribution(params):
    gen = torch.Generator().manual_seed(7)
    vocab, draws = 40, 6000
    row = torch.randn(vocab, generator=gen) * 2
    rp = SamplingParams(**params)
    exact = torch.softmax(reference.filtered_logits(row.unsqueeze(0), rp)[0].double(), dim=0)
    logits = row.expand(draws, vocab).contiguous()
    packed = PackedParams.from_rows([rp] * draws, "cpu")
    torch.manual_seed(11)
    tokens, status, _ = reference.sample_on_device(logits, packed, None,
                                                   torch.zeros(draws, dtype=torch.int64))
    assert not status.any()
    assert_frequencies_match(tokens, exact)
