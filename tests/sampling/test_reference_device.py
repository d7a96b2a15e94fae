"""The reference sampler's device path (``reference.sample_on_device``): fixed shapes, no host
round trip, and the very tokens of :func:`reference.sample` for seeded and greedy rows.

It runs on CPU tensors as well, which is how it is checked here against the CPU path on
fresh random inputs; ``test_capture_safety.py`` checks that it never waits for the device.
"""

from __future__ import annotations

import pytest
import torch

from lmgen_fast import SamplingParams
from lmgen_fast.core.params import PackedParams
from lmgen_fast.sampling import reference

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


def special_rows(vocab: int) -> tuple[torch.Tensor, list[SamplingParams]]:
    """Rows where the two paths take different branches: +inf values with and without ties
    past the k-th place, greedy ties, a single finite value, k at and beyond V - 1, a nucleus
    of one token, min-p 1."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(12, vocab, generator=gen)
    logits[0] = float("inf")  # every token +inf
    logits[1, [3, 9, 20]] = float("inf")  # three +inf, top-k 2: a tie past k
    logits[2, 7] = float("inf")  # one +inf, greedy
    logits[3, [4, 8]] = 9.0  # greedy tie: the lower id
    logits[4] = float("-inf")
    logits[4, 11] = 0.5  # one finite value
    logits[5, :] = 1.0  # every value tied: top-k keeps all of them
    logits[6, [2, 5, 6]] = 4.0  # a tie at the k-th value (k = 2)
    logits[10, :vocab // 2] = float("nan")
    rows = [
        SamplingParams(seed=1, top_k=5),
        SamplingParams(seed=2, top_k=2),
        SamplingParams(temperature=0.0, top_k=3),
        SamplingParams(temperature=0.0),
        SamplingParams(seed=5, top_k=4, top_p=0.5, min_p=0.5),
        SamplingParams(seed=6, top_k=3, top_p=0.9),
        SamplingParams(seed=7, top_k=2, temperature=2.0),
        SamplingParams(seed=8, top_k=vocab - 1, top_p=0.95),
        SamplingParams(seed=9, top_k=vocab + 5, min_p=0.2),
        SamplingParams(seed=10, top_k=0, top_p=1e-6),  # only the most probable token
        SamplingParams(seed=11, top_k=0, min_p=1.0),  # only the maximum
        SamplingParams(seed=12, top_k=0, top_p=0.3, repetition_penalty=0.5),
    ]
    return logits, rows


@pytest.mark.parametrize("step", [0, 5, 2**32 - 1])
def test_same_tokens_and_logprobs_on_branch_edges(step):
    vocab = 33
    logits, rows = special_rows(vocab)
    rows = [SamplingParams(**{**vars(p), "logprobs": 4}) for p in rows]
    window = torch.tensor([[3, 3, 9, -1]] * 12)
    want = reference.sample(logits, rows, window, step=step, return_logprobs=True,
                            on_device=False)
    got = reference.sample(logits, rows, window, step=step, return_logprobs=True,
                           on_device=True)
    assert torch.equal(got[0], want[0])
    for g, w in zip(got[1], want[1], strict=True):
        assert torch.equal(g, w)
    # The edges are really exercised: the +inf rows drew a +inf token, the greedy tie the
    # lower id, and the nucleus of one its argmax.
    assert torch.isinf(logits[[0, 1, 2], got[0][:3]]).all()
    assert int(got[0][3]) == 4 and int(got[0][9]) == int(logits[9].argmax())


@pytest.mark.parametrize("case", range(4))
def test_top_alternatives_equal_raw_logprobs(case):
    gen = torch.Generator().manual_seed(50 + case)
    logits = torch.randn(9, 70, generator=gen)
    if case % 2:
        logits = logits.round()  # runs of equal values straddling the n-th place
    logits[2, 4] = float("inf")
    logits[3, [1, 2]] = float("inf")
    logits[4, ::3] = float("nan")
    tokens = torch.randint(0, 70, (9,), generator=gen)
    for n in (0, 1, 5, 20, 70, 80):
        want = reference.raw_logprobs(logits, tokens, n)
        got = reference.raw_logprobs_on_device(logits, tokens, n)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and torch.equal(g, w), n


@pytest.mark.parametrize("on_device", [False, True])
def test_unchecked_sample_reports_empty_rows(on_device):
    logits = torch.randn(4, 30)
    logits[1] = float("-inf")
    logits[3] = float("nan")
    rows = [SamplingParams(seed=1), SamplingParams(seed=2), SamplingParams(temperature=0.0),
            SamplingParams(temperature=0.0)]
    res = reference.sample(logits, rows, step=2, check=False, return_logprobs=True,
                           on_device=on_device)
    assert isinstance(res, reference.SampleResult)
    empty = reference.STATUS_EMPTY
    assert res.status.tolist() == [0, empty, 0, empty]
    assert res.tokens.tolist()[1::2] == [0, 0]
    keep = [0, 2]
    checked = reference.sample(logits[keep], [rows[i] for i in keep], step=2,
                               on_device=on_device)
    assert torch.equal(res.tokens[keep], checked)
    with pytest.raises(reference.EmptyRowError) as info:
        reference.sample(logits, rows, step=2, on_device=on_device)
    assert info.value.rows == [1, 3]


def test_unchecked_sample_does_not_validate_the_window():
    """check=False trusts the window (validating it reads it on the host)."""
    logits = torch.randn(2, 30)
    window = torch.tensor([[-5, 2], [1, -1]])
    with pytest.raises(ValueError, match="window"):
        reference.sample(logits, SamplingParams(seed=1), window)
    res = reference.sample(logits, SamplingParams(seed=1), window.clamp_min(-1), check=False,
                           on_device=True)
    assert not res.status.any()


def test_unseeded_batch_of_one_on_the_device_path_races():
    """The documented difference: the device path does not call torch.multinomial."""
    logits = torch.randn(1, 300) * 2
    p = SamplingParams(temperature=0.8, top_k=20)
    torch.manual_seed(11)
    cpu = [int(reference.sample(logits, p, on_device=False)) for _ in range(30)]
    torch.manual_seed(11)
    dev = [int(reference.sample(logits, p, on_device=True)) for _ in range(30)]
    assert cpu != dev
    torch.manual_seed(11)
    again = [int(reference.sample(logits, p, on_device=True)) for _ in range(30)]
    assert dev == again  # still reproducible under torch.manual_seed


def exact_distribution(row: torch.Tensor, p: SamplingParams, window: list[int]) -> torch.Tensor:
    """SPEC step 4's distribution in float64 (temperature, repetition penalty, top-k)."""
    z = row.to(torch.float64) / p.temperature
    for t in set(window):
        c = window.count(t)
        z[t] = z[t] / p.repetition_penalty**c if z[t] > 0 else z[t] * p.repetition_penalty**c
    if 0 < p.top_k < z.numel():
        z[z < torch.sort(z, descending=True).values[p.top_k - 1]] = float("-inf")
    return torch.softmax(z, dim=0)


def test_unseeded_batch_of_one_frequencies_chi_square():
    row = torch.tensor([1.0, 0.5, -0.2, 2.0, 0.0, -1.0, 1.5, 0.7, -3.0, 0.1])
    p = SamplingParams(temperature=0.9, top_k=6, repetition_penalty=1.5)
    window = [3, 3, 6]
    probs = exact_distribution(row, p, window)
    w = torch.tensor([window])
    torch.manual_seed(0)
    got = [int(reference.sample(row.view(1, -1), p, w, on_device=True)) for _ in range(3000)]
    assert_frequencies_match(torch.tensor(got), probs)


def test_seeded_frequencies_chi_square():
    n, vocab = 20000, 12
    row = torch.randn(vocab, generator=torch.Generator().manual_seed(5)) * 1.5
    p = SamplingParams(temperature=0.7, top_k=5, repetition_penalty=1.3)
    window = [0, 0, 3, 5, 5, 5, 7]
    rows = [SamplingParams(**{**vars(p), "seed": s}) for s in range(n)]
    got = reference.sample(row.expand(n, vocab), rows, torch.tensor([window]).expand(n, -1),
                           step=1, on_device=True)
    assert_frequencies_match(got, exact_distribution(row, p, window))


def test_unseeded_rows_of_a_batch_draw_the_same_seeds_on_both_paths():
    """Both paths draw one torch.randint per step for a batch with unseeded rows, so under
    the same torch.manual_seed they even pick the same tokens."""
    logits = torch.randn(6, 80)
    rows = [SamplingParams(top_k=0), SamplingParams(seed=3, top_p=0.8),
            SamplingParams(top_k=9, min_p=0.05), SamplingParams(temperature=0.0),
            SamplingParams(top_p=0.6), SamplingParams(temperature=1.7)]
    torch.manual_seed(4)
    want = [reference.sample(logits, rows, step=s, on_device=False) for s in range(5)]
    torch.manual_seed(4)
    got = [reference.sample(logits, rows, step=s, on_device=True) for s in range(5)]
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert len({tuple(t.tolist()) for t in got}) > 1
