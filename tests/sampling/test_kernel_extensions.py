"""The fused Triton sampler's extensions (issue 8) against the reference.

Top-p, min-p, frequency and presence penalties and raw log-probabilities. As in
``test_kernel.py``, each kernel test runs compiled on CUDA (``[gpu]``) and in Triton's
interpreter on small shapes (``[interpreter]``); the ``*_full_size`` and graph tests take
V = 128256, B = 256 on CUDA (small shapes in their twins).

Paths exercised: top-p/min-p over the top-k candidates (one read, candidates in registers
or in tiles), without top-k with the nucleus among the chunk candidates (one read), and the
multi-pass path (``nucleus_candidates`` small, flat logits; ``STATUS_SLOW`` says it ran).
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_processed_close, at_size, capture, require_kernel_runtime

require_kernel_runtime()

from lmgen_fast import SamplingParams  # noqa: E402
from lmgen_fast.core.errors import STATUS_SLOW  # noqa: E402
from lmgen_fast.sampling import kernel as K  # noqa: E402
from lmgen_fast.sampling import reference  # noqa: E402
from lmgen_fast.sampling.launch_plan import LOGPROB_COLUMNS, NUCLEUS_CANDIDATES  # noqa: E402

TEMPS = [0.0, 0.6, 1.0, 1.5]
TOP_PS = [1.0, 0.95, 0.8, 0.5, 0.2]
MIN_PS = [0.0, 0.0, 0.02, 0.1, 0.4]
FREQS = [0.0, 0.0, 0.4, -0.3, 1.5]
PRESENCES = [0.0, 0.0, 0.6, -0.8, 2.0]


def random_params(gen: torch.Generator, batch: int, vocab: int, top_k: list[int] | None = None,
                  **fixed) -> list[SamplingParams]:
    """Seeded rows over every parameter; ``fixed`` pins some of them for all rows."""
    ks = top_k if top_k is not None else [0, 0, 1, 5, 40, vocab, -1]
    rows = []
    for _ in range(batch):
        pick = torch.randint(0, 1000, (9,), generator=gen).tolist()
        kw = dict(
            temperature=TEMPS[pick[0] % len(TEMPS)],
            top_k=ks[pick[1] % len(ks)],
            repetition_penalty=[1.0, 1.3, 0.8][pick[2] % 3],
            penalty_mode="once" if pick[3] % 2 else "per_occurrence",
            top_p=TOP_PS[pick[4] % len(TOP_PS)],
            min_p=MIN_PS[pick[5] % len(MIN_PS)],
            frequency_penalty=FREQS[pick[6] % len(FREQS)],
            presence_penalty=PRESENCES[pick[7] % len(PRESENCES)],
            seed=int(torch.randint(0, 2**62, (1,), generator=gen)),
        )
        kw.update(fixed)
        rows.append(SamplingParams(**kw))
    return rows


def random_window(gen: torch.Generator, batch: int, vocab: int, width: int = 10):
    """Windows with duplicates (ids from a small pool, biased to the likeliest) and pads."""
    pool = torch.randint(0, vocab, (batch, 4), generator=gen)
    win = pool.gather(1, torch.randint(0, 4, (batch, width), generator=gen))
    return win.masked_fill(torch.rand(batch, width, generator=gen) < 0.25, -1)


def kernel(dev, logits, params, window=None, step=0, **kw):
    win = None if window is None else window.to(dev)
    return K.sample(logits.to(dev), params, win, step=step, **kw)


def reference_tokens(dev, logits, params, window=None, step=0):
    win = None if window is None else window.to(dev)
    return reference.sample(logits.to(dev), params, win, step=step).cpu()


def assert_same(dev, logits, params, window=None, steps=(0, 1), **kw):
    for step in steps:
        got = kernel(dev, logits, params, window, step, **kw).cpu()
        want = reference_tokens(dev, logits, params, window, step)
        assert torch.equal(got, want), (step, (got != want).nonzero().flatten().tolist())


def slow_rows(dev, logits, params, window=None, **kw) -> list[int]:
    """Rows that took the multi-pass path (from the launch's status)."""
    batch = logits.shape[0]
    packed = reference.pack(params, batch, torch.device(dev))
    steps = torch.zeros(batch, dtype=torch.int64, device=dev)
    max_k = max(max(p.top_k for p in params), 0)
    _tok, status = K.launch(logits.to(dev), packed,
                            None if window is None else window.to(dev), steps,
                            max_top_k=max_k, **kw)
    return ((status.cpu() & STATUS_SLOW) != 0).nonzero().flatten().tolist()


# ---------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab,chunk,nucleus", [(700, 256, None), (1500, 512, 2)])
def test_matches_reference_random_params(kernel_device, dtype, vocab, chunk, nucleus):
    gen = torch.Generator().manual_seed(vocab + (dtype == torch.bfloat16))
    batch = 12
    scale = torch.tensor([0.3, 1.0, 3.0]).repeat(batch // 3).unsqueeze(1)
    logits = (torch.randn(batch, vocab, generator=gen) * scale).to(dtype)
    params = random_params(gen, batch, vocab)
    window = random_window(gen, batch, vocab)
    assert_same(kernel_device, logits, params, window, chunk=chunk, nucleus_candidates=nucleus)


ALONE = [
    dict(top_p=0.8), dict(top_p=0.3), dict(min_p=0.05), dict(min_p=0.5),
    dict(frequency_penalty=0.9), dict(presence_penalty=-1.2),
    dict(top_p=0.7, min_p=0.1, frequency_penalty=0.5, presence_penalty=0.5),
]


@pytest.mark.parametrize("top_k", [0, 30])
@pytest.mark.parametrize("extra", ALONE, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_each_parameter_alone_and_combined(kernel_device, extra, top_k):
    gen = torch.Generator().manual_seed(len(str(extra)) + top_k)
    vocab, batch = 600, 8
    logits = torch.randn(batch, vocab, generator=gen) * 1.5
    window = random_window(gen, batch, vocab)
    # The window's tokens are made likely, so that the penalties change the draw.
    logits.scatter_(1, window.clamp_min(0), 4.0)
    params = [SamplingParams(temperature=t, top_k=top_k, seed=31 * i, **extra)
              for i, t in enumerate([1.0, 0.7, 1.3, 0.0] * 2)]
    assert_same(kernel_device, logits, params, window, steps=(0, 1, 2), chunk=256)


def test_penalties_with_duplicates_and_greedy(kernel_device):
    # Greedy rows see the OpenAI penalties too (T_eff = 1); counts are raw in "once" mode.
    logits = torch.tensor([[3.0, 2.9, 1.0, 0.0], [3.0, 2.5, 2.6, 0.0], [1.0, 1.2, 0.0, 0.0]])
    window = torch.tensor([[0, 0, -1], [0, 2, 2], [1, 1, 1]])
    params = [SamplingParams(temperature=0.0, frequency_penalty=0.1, seed=1),
              SamplingParams(temperature=0.0, presence_penalty=0.6, penalty_mode="once", seed=2),
              SamplingParams(temperature=0.0, frequency_penalty=0.05, presence_penalty=0.02,
                             repetition_penalty=1.1, seed=3)]
    got = kernel(kernel_device, logits, params, window).cpu()
    want = reference_tokens(kernel_device, logits, params, window)
    assert got.tolist() == want.tolist() == [1, 1, 0]


@pytest.mark.parametrize("top_p", [0.25, 0.5, 0.6, 0.75, 0.9])
@pytest.mark.parametrize("top_k", [0, 7])
def test_ties_at_the_top_p_boundary(kernel_device, top_p, top_k):
    # Integer logits: groups of equal values, top-p cuts at group boundaries; a group is
    # kept or dropped whole.
    vocab = 400
    logits = torch.full((4, vocab), -3.0)
    logits[:, :3] = 2.0
    logits[:, 3:9] = 1.0
    logits[:, 9:30] = 0.0
    logits = logits[:, torch.randperm(vocab, generator=torch.Generator().manual_seed(5))]
    params = [SamplingParams(temperature=1.0, top_p=top_p, top_k=top_k, seed=s) for s in range(4)]
    drawn = set()
    for step in range(5):
        got = kernel(kernel_device, logits, params, step=step, chunk=128,
                     nucleus_candidates=4).cpu()
        assert torch.equal(got, reference_tokens(kernel_device, logits, params, step=step))
        drawn.update(got.tolist())
    z = reference.filtered_logits(logits[:1], params[0])[0]
    kept = set((z > float("-inf")).nonzero().flatten().tolist())
    assert drawn <= kept
    values = {float(logits[0, i]) for i in kept}
    for v in values:  # whole groups only
        assert set((logits[0] == v).nonzero().flatten().tolist()) <= kept


@pytest.mark.parametrize("top_k", [0, 20])
def test_min_p_boundary(kernel_device, top_k):
    # exp(d) vs min_p just below and just above exp(d) (float64): kept, then dropped. Both
    # backends compare d with the same float32 threshold, so no exp rounding (NumPy's under
    # the interpreter, torch's, CUDA's) can move the edge.
    vocab = 300
    for d in (-1.0, -0.5, -2.0, -3.0, -1.5, -0.25, -0.75):
        e = math.exp(d)
        logits = torch.full((2, vocab), -9.0)
        logits[:, 10] = 1.0
        logits[:, 200] = 1.0 + d
        logits[:, 250] = 1.0 + d
        assert float(logits[0, 200] - logits[0, 10]) == d
        for min_p, members in ((e * (1 - 1e-12), {10, 200, 250}), (e * (1 + 1e-12), {10})):
            params = [SamplingParams(temperature=1.0, top_k=top_k, min_p=min_p, seed=s)
                      for s in range(2)]
            drawn = set()
            for step in range(4 if d == -1.0 else 1):
                got = kernel(kernel_device, logits, params, step=step, chunk=128).cpu()
                assert torch.equal(got, reference_tokens(kernel_device, logits, params, step=step))
                drawn.update(got.tolist())
            assert drawn <= members


def test_multi_pass_path_is_exact(kernel_device):
    # Flat rows whose nucleus is far larger than the chunks' candidates.
    gen = torch.Generator().manual_seed(3)
    vocab, batch = 2000, 6
    logits = torch.randn(batch, vocab, generator=gen) * 0.5
    window = random_window(gen, batch, vocab)
    params = [SamplingParams(temperature=1.0, top_k=0, top_p=p, min_p=m, frequency_penalty=0.3,
                             presence_penalty=0.2, seed=i)
              for i, (p, m) in enumerate([(0.9, 0.0), (0.5, 0.0), (1.0, 0.3), (0.8, 0.2),
                                          (0.99, 0.0), (0.6, 0.9)])]
    kw = dict(chunk=512, nucleus_candidates=2)
    assert slow_rows(kernel_device, logits, params, window, **kw) == [0, 1, 2, 3, 4]
    assert_same(kernel_device, logits, params, window, steps=(0, 1), **kw)
    # With enough candidates, min-p rules out the tail and top-p finds the nucleus.
    peaked = logits * 12
    assert slow_rows(kernel_device, peaked, params, window, chunk=512, nucleus_candidates=64) == []
    assert_same(kernel_device, peaked, params, window, steps=(0,), chunk=512, nucleus_candidates=64)


def test_large_k_with_top_p_in_tiles(kernel_device):
    # n_chunks * cap above one merge tile: the candidates are streamed in tiles.
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(3, 5000, generator=gen)
    params = [SamplingParams(temperature=1.0, top_k=k, top_p=p, min_p=m, seed=k)
              for k, p, m in ((1024, 0.9, 0.0), (700, 0.5, 0.05), (1000, 1.0, 0.2))]
    assert_same(kernel_device, logits, params, steps=(0,), chunk=1024)


def test_inf_and_nan_rows_skip_the_filters(kernel_device):
    vocab = 300
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(2))
    logits[0, [4, 77]] = float("inf")  # +inf survivors: top-p and min-p are skipped
    logits[1, ::3] = float("nan")
    logits[2, 50:] = float("-inf")
    for top_k in (0, 40):
        params = SamplingParams(temperature=1.0, top_k=top_k, top_p=0.3, min_p=0.2, seed=9)
        assert_same(kernel_device, logits, params, steps=(0, 1, 2), chunk=128)


# ---------------------------------------------------------------------------- randomness


def exact_probs(logits: torch.Tensor, params: SamplingParams, window) -> torch.Tensor:
    z = reference.filtered_logits(logits, params, window).double()
    return torch.softmax(z[0], dim=0)


CHI = [
    ("top_p", dict(top_p=0.7), dict(top_p=1.0)),
    ("min_p", dict(min_p=0.15), dict(min_p=0.0)),
    ("both+penalties", dict(top_p=0.85, min_p=0.05, frequency_penalty=0.5, presence_penalty=0.3),
     dict(top_p=1.0, min_p=0.0)),
]


@pytest.mark.parametrize("name,extra,wrong", CHI, ids=[c[0] for c in CHI])
def test_chi_square_against_exact_distribution(kernel_device, name, extra, wrong):
    stats = pytest.importorskip("scipy.stats")
    from chi_square_power import noncentral_power

    # 1024 tokens in one chunk cost the interpreter what 16 did, and their dense logits put
    # tokens near every filter's edge, where a wrong temperature moves them in or out.
    vocab, batch, steps = 1024, 48, 4
    gen = torch.Generator().manual_seed(16)
    row = torch.randn(1, vocab, generator=gen) * 3.0
    top = row[0].topk(2).indices.tolist()
    window = torch.tensor([[top[0], top[0], top[1], -1]])
    base = SamplingParams(temperature=0.9, top_k=0, repetition_penalty=1.2, **extra)
    params = [SamplingParams(**{**vars(base), "seed": 500 + i}) for i in range(batch)]
    counts = torch.zeros(vocab)
    for step in range(steps):
        tok = kernel(kernel_device, row.expand(batch, vocab).contiguous(), params,
                     window.expand(batch, -1).contiguous(), step=step, chunk=vocab)
        counts += torch.bincount(tok.cpu(), minlength=vocab).float()
    probs = exact_probs(row, base, window)
    n = batch * steps
    assert counts[probs == 0].sum() == 0  # filtered tokens are never drawn
    keep = probs > 0
    assert keep.sum() > 2, "the filter leaves too little to test"
    # Tokens expected fewer than 10 times share one cell (the chi-square's validity).
    exp_n, obs = (probs[keep] * n), counts[keep].double()
    small = exp_n < 10
    exp_b = torch.cat([exp_n[~small], exp_n[small].sum().view(1)[:int(small.any())]])
    obs_b = torch.cat([obs[~small], obs[small].sum().view(1)[:int(small.any())]])
    res = stats.chisquare(obs_b.numpy(), (exp_b * n / exp_b.sum()).numpy())
    # At a nominal 1e-3 the chi-square's true level is 1.1e-3 to 1.3e-3 here (simulated);
    # 7e-4 keeps false rejection under 1e-3.
    assert res.pvalue > 7e-4, (counts, probs * n)
    # The test has power: the distribution without the filter is rejected.
    other = exact_probs(row, SamplingParams(**{**vars(base), **wrong}), window)
    # (Under it, n draws that all miss the filtered tokens would be this unlikely.)
    miss = float((1 - other[probs == 0].sum()) ** n)
    assert miss < 1e-3, miss
    # And a temperature 20% off is rejected (support check and chi-square together) with
    # probability 0.99 or more (simulated by tests/chi_square_power.py).
    for factor in (0.8, 1.2):
        off = exact_probs(row, SamplingParams(**{**vars(base), "temperature": 0.9 * factor}),
                          window)
        power = noncentral_power(probs.numpy(), off.numpy(), n, 7e-4, minimum=10.0)
        assert power >= 0.99, (factor, power)


# ---------------------------------------------------------------------------- logprobs


def log_softmax64(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.double(), dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_against_float64(kernel_device, dtype):
    gen = torch.Generator().manual_seed(17)
    vocab, batch = 900, 6
    logits = (torch.randn(batch, vocab, generator=gen) * 4).to(dtype)
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, logprobs=n, seed=i)
              for i, (t, k, p, n) in enumerate([(1.0, 0, 1.0, 5), (0.0, 0, 1.0, 0),
                                                (0.7, 20, 0.9, 20), (1.3, 0, 0.5, 3),
                                                (1.0, 3, 1.0, 1), (2.0, 0, 0.95, 7)])]
    tokens, lp = kernel(kernel_device, logits, params, step=4, chunk=256, return_logprobs=True)
    want_tokens, want = reference.sample(logits.to(kernel_device), params, step=4,
                                         return_logprobs=True)
    assert torch.equal(tokens.cpu(), want_tokens.cpu())
    exact = log_softmax64(logits.float())
    got_tok = exact.gather(1, tokens.cpu().view(-1, 1)).squeeze(1)
    assert lp.token_logprob.dtype == torch.float32
    assert torch.allclose(lp.token_logprob.cpu().double(), got_tok, atol=2e-5, rtol=0)
    assert lp.top_ids.shape == (batch, 20) and lp.top_logprobs.shape == (batch, 20)
    top = exact.topk(20, dim=1)
    assert torch.equal(lp.top_ids.cpu(), want.top_ids.cpu())
    assert torch.allclose(lp.top_logprobs.cpu().double(), top.values, atol=2e-5, rtol=0)
    assert torch.allclose(lp.token_logprob.cpu(), want.token_logprob.cpu(), atol=2e-5, rtol=0)


def test_logprobs_special_rows_match_reference(kernel_device):
    vocab = 300
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(1))
    logits[0, [3, 150, 299]] = float("inf")  # they share the mass: log(1/3)
    logits[1, ::2] = float("nan")  # NaN counts as -inf
    logits[2, :] = 1.0  # all equal: ties in the top alternatives, lower ids first
    params = SamplingParams(temperature=1.0, top_k=0, logprobs=4, seed=3)
    tokens, lp = kernel(kernel_device, logits, params, chunk=128, return_logprobs=True)
    want_tokens, want = reference.sample(logits.to(kernel_device), params, return_logprobs=True)
    assert torch.equal(tokens.cpu(), want_tokens.cpu())
    assert torch.equal(lp.top_ids.cpu(), want.top_ids.cpu())
    assert torch.allclose(lp.token_logprob.cpu(), want.token_logprob.cpu(), atol=1e-5)
    assert torch.allclose(lp.top_logprobs.cpu(), want.top_logprobs.cpu(), atol=1e-5)
    assert abs(float(lp.token_logprob[0]) + math.log(3)) < 1e-6
    assert lp.top_ids[2].tolist() == [0, 1, 2, 3]


def test_no_logprobs_requested_gives_empty_alternatives(kernel_device):
    logits = torch.randn(2, 100)
    tokens, lp = kernel(kernel_device, logits, SamplingParams(seed=1), return_logprobs=True)
    assert lp.top_ids.shape == (2, 0) and lp.top_logprobs.shape == (2, 0)
    assert torch.equal(tokens, kernel(kernel_device, logits, SamplingParams(seed=1)))


# ---------------------------------------------------------------------------- processed


def processed_rows(gen, batch, vocab, top_k):
    return random_params(gen, batch, vocab, top_k=top_k, logprobs=20,
                         logprobs_mode="processed")


def assert_processed_kernel(dev, logits, rows, window, steps, **kw):
    """The kernel's processed log-probabilities against float64 and against the reference
    (same tokens, same survivors listed, values within 1e-5)."""
    for step in steps:
        tokens, lp = kernel(dev, logits, rows, window, step, return_logprobs=True, **kw)
        win = None if window is None else window.to(dev)
        want_tokens, want = reference.sample(logits.to(dev), rows, win, step=step,
                                             return_logprobs=True)
        assert torch.equal(tokens.cpu(), want_tokens.cpu())
        assert_processed_close(lp.token_logprob.cpu(), lp.top_ids.cpu(), lp.top_logprobs.cpu(),
                               logits.float(), rows, window, tokens.cpu())
        assert torch.allclose(lp.token_logprob.cpu(), want.token_logprob.cpu(), atol=1e-5,
                              rtol=0)
        assert torch.equal(lp.top_ids.cpu(), want.top_ids.cpu())
        assert torch.allclose(lp.top_logprobs.cpu(), want.top_logprobs.cpu(), atol=1e-5,
                              rtol=0)


@pytest.mark.parametrize("coarse", [False, True])
def test_processed_logprobs_against_float64(kernel_device, coarse):
    # Temperatures, penalties, every filter alone and combined (random_params), ties at the
    # k-th place and in the nucleus (coarse), +inf and NaN rows, greedy rows.
    gen = torch.Generator().manual_seed(40 + coarse)
    batch, vocab = 12, 300
    logits = torch.randn(batch, vocab, generator=gen) * 2
    if coarse:
        logits = (logits * 2).round() / 2
    logits[0, [4, 77]] = float("inf")
    logits[1, ::3] = float("nan")
    window = random_window(gen, batch, vocab)
    rows = processed_rows(gen, batch, vocab, [0, 0, 3, 40])
    assert_processed_kernel(kernel_device, logits, rows, window, steps=(0, 1), chunk=128)


def test_processed_logprobs_sum_to_one_over_the_survivors(kernel_device):
    # V = 20: the 20 alternatives list every survivor.
    gen = torch.Generator().manual_seed(44)
    batch, vocab = 8, 20
    logits = torch.randn(batch, vocab, generator=gen) * 3
    window = random_window(gen, batch, vocab, width=5)
    rows = processed_rows(gen, batch, vocab, [0, 6])
    assert_processed_kernel(kernel_device, logits, rows, window, steps=(0,), chunk=16)


def test_processed_logprobs_on_the_multi_pass_path_and_in_tiles(kernel_device):
    gen = torch.Generator().manual_seed(45)
    vocab = 2000
    flat = torch.randn(4, vocab, generator=gen) * 0.5
    rows = [SamplingParams(temperature=1.0, top_k=0, top_p=p, min_p=m, seed=i, logprobs=20,
                           logprobs_mode="processed")
            for i, (p, m) in enumerate([(0.9, 0.0), (1.0, 0.3), (0.8, 0.2), (0.6, 0.9)])]
    kw = dict(chunk=512, nucleus_candidates=2)
    assert slow_rows(kernel_device, flat, rows, **kw) == [0, 1, 2]
    assert_processed_kernel(kernel_device, flat, rows, None, steps=(0,), **kw)
    big = torch.randn(2, 5000, generator=gen)
    rows = [SamplingParams(temperature=1.0, top_k=k, top_p=p, seed=k, logprobs=20,
                           logprobs_mode="processed") for k, p in ((1024, 0.9), (700, 1.0))]
    assert_processed_kernel(kernel_device, big, rows, None, steps=(0,), chunk=1024)


def test_processed_and_raw_rows_in_one_launch(kernel_device):
    gen = torch.Generator().manual_seed(46)
    logits = torch.randn(6, 300, generator=gen) * 2
    rows = random_params(gen, 6, 300, top_k=[0, 10], logprobs=5)
    rows = [SamplingParams(**{**vars(p), "logprobs_mode": "processed" if i % 2 else "raw"})
            for i, p in enumerate(rows)]
    tokens, lp = kernel(kernel_device, logits, rows, step=2, chunk=128, return_logprobs=True)
    want_tokens, want = reference.sample(logits.to(kernel_device), rows, step=2,
                                         return_logprobs=True)
    assert torch.equal(tokens.cpu(), want_tokens.cpu())
    assert torch.allclose(lp.token_logprob.cpu(), want.token_logprob.cpu(), atol=1e-5, rtol=0)
    assert torch.equal(lp.top_ids.cpu(), want.top_ids.cpu())


@pytest.mark.parametrize("top_k", [0, 4])
def test_top_p_edge_same_survivors_as_the_exact_rule(kernel_device, top_k):
    # Token 0 holds 0.99999989 of the mass: top_p = 0.9999999 keeps token 1 (the exact
    # rule, and transformers); top_p rounded to float32 (0.99999988) would drop it.
    logits = torch.full((2, 40), float("-inf"))
    logits[:, 0] = 0.0
    logits[0, 1] = math.log(1.1e-7)
    logits[1, 1] = math.log(1e-8)  # mass above: 0.99999999, dropped
    rows = [SamplingParams(temperature=1.0, top_k=top_k, top_p=0.9999999, logprobs=3,
                           logprobs_mode="processed", seed=i) for i in range(2)]
    _, lp = kernel(kernel_device, logits, rows, chunk=16, return_logprobs=True)
    assert lp.top_ids.cpu().tolist() == [[0, 1, -1], [0, -1, -1]]


def test_min_p_edges_same_survivors_as_the_exact_rule(kernel_device):
    gen = torch.Generator().manual_seed(17)
    ds = (-torch.rand(12, generator=gen) * 6).tolist()
    logits, rows, keep = [], [], []
    for i, d in enumerate(ds):
        row = torch.tensor([2.0, 2.0 + d, -30.0, 1.0 + d] + [float("-inf")] * 12)
        e = math.exp(float(row[1] - row[0]))
        for factor, kept in ((1 - 1e-12, True), (1 + 1e-12, False)):
            logits.append(row)
            rows.append(SamplingParams(temperature=1.0, top_k=3 * (i % 2), min_p=e * factor,
                                       logprobs=4, logprobs_mode="processed", seed=i))
            keep.append(kept)
    logits = torch.stack(logits)
    _, lp = kernel(kernel_device, logits, rows, chunk=16, return_logprobs=True)
    got = [1 in ids for ids in lp.top_ids.cpu().tolist()]
    assert got == keep
    _, want = reference.sample(logits, rows, return_logprobs=True)
    assert torch.equal(lp.top_ids.cpu(), want.top_ids)


# ---------------------------------------------------------------------------- GPU, full size

GPU_V, GPU_B = 128256, 256
SMALL_V, SMALL_B = 3000, 8  # the interpreter twins


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_full_size(kernel_device, dtype):
    b, v = at_size(kernel_device, (GPU_B, GPU_V), (SMALL_B, SMALL_V))
    gen = torch.Generator().manual_seed(22)
    scale = torch.tensor([1.0, 2.0, 4.0, 8.0]).repeat(b // 4).unsqueeze(1)
    logits = (torch.randn(b, v, generator=gen) * scale).to(dtype).to(kernel_device)
    params = random_params(gen, b, v, top_k=[0, 0, 50, 1024, 1])
    window = random_window(gen, b, v, width=64).to(kernel_device)
    for step in (0, 1):
        got = K.sample(logits, params, window, step=step)
        want = reference.sample(logits, params, window, step=step)
        # Near-ties within rounding (race keys, the top-p boundary) may differ.
        assert (got != want).sum() <= 2, (got != want).nonzero()
    cpu = reference.sample(logits.cpu(), params, window.cpu(), step=1)
    assert (got.cpu() != cpu).sum() <= 2


def test_chi_square_logprobs_and_graph(kernel_device):
    stats = pytest.importorskip("scipy.stats")
    dev = kernel_device
    # The twin: 8 rows of 256 logits, 15 steps (the small-shape frequency tests above check
    # the law more closely).
    batch, vocab, scale, steps = at_size(dev, (GPU_B, GPU_V, 6, 30), (SMALL_B, 256, 3, 15))
    gen = torch.Generator().manual_seed(5)
    row = torch.randn(1, vocab, generator=gen) * scale
    base = SamplingParams(temperature=1.0, top_k=0, top_p=0.9, min_p=0.001, logprobs=5)
    params = [SamplingParams(**{**vars(base), "seed": i}) for i in range(batch)]
    logits = row.expand(batch, vocab).contiguous().to(dev)
    counts = torch.zeros(vocab, device=dev)
    for step in range(steps):
        counts += torch.bincount(K.sample(logits, params, step=step), minlength=vocab)
    probs = exact_probs(row, base, None).to(dev)
    keep = probs > 0
    assert counts[~keep].sum() == 0
    n = batch * steps
    # Tokens expected fewer than 5 times are pooled into one bin (chi-square's validity);
    # an empty bin would make the p-value NaN.
    exp_n, obs = (probs[keep] * n).cpu(), counts[keep].cpu()
    small = exp_n < 5
    exp_b = torch.cat([exp_n[~small], exp_n[small].sum().view(1)[:int(small.any())]])
    obs_b = torch.cat([obs[~small], obs[small].sum().view(1)[:int(small.any())]])
    res = stats.chisquare(obs_b.numpy(), (exp_b * obs_b.sum() / exp_b.sum()).numpy())
    # True level at a nominal 1e-3: 1.16e-3 (simulated); 7e-4 keeps it under 1e-3.
    assert res.pvalue > 7e-4
    tokens, lp = K.sample(logits, params, step=3, return_logprobs=True)
    exact = log_softmax64(logits[:1].float().cpu())[0]
    assert torch.allclose(lp.token_logprob.cpu().double(), exact[tokens.cpu()], atol=1e-4)
    # A CUDA graph of launch() with top-p, min-p and log-probabilities.
    packed = reference.pack(params, batch, torch.device(dev))
    step_t = torch.zeros(batch, dtype=torch.int64, device=dev)
    out = torch.empty(batch, LOGPROB_COLUMNS, device=dev)
    kw = dict(max_top_k=0, nucleus_candidates=NUCLEUS_CANDIDATES, logprob_out=out)
    replay = capture(dev, lambda: K.launch(logits, packed, None, step_t, **kw))
    step_t.fill_(3)
    tok_g, status = replay()
    assert torch.equal(tok_g, tokens) and int((status & ~STATUS_SLOW).sum()) == 0


def test_processed_logprobs_full_size(kernel_device):
    dev = kernel_device
    b, v = at_size(dev, (GPU_B, GPU_V), (SMALL_B, SMALL_V))
    gen = torch.Generator().manual_seed(23)
    scale = torch.tensor([1.0, 2.0, 4.0, 8.0]).repeat(b // 4).unsqueeze(1)
    logits = (torch.randn(b, v, generator=gen) * scale).to(dev)
    params = random_params(gen, b, v, top_k=[0, 0, 50, 1024], logprobs=5,
                           logprobs_mode="processed")
    window = random_window(gen, b, v, width=64).to(dev)
    tokens, lp = K.sample(logits, params, window, step=1, return_logprobs=True)
    want_tokens, want = reference.sample(logits, params, window, step=1, return_logprobs=True)
    same = tokens == want_tokens
    # Near-ties within rounding (race keys, the top-p boundary) may differ.
    assert (~same).sum() <= 2
    assert torch.allclose(lp.token_logprob[same], want.token_logprob[same], atol=1e-5, rtol=0)
    assert torch.allclose(lp.top_logprobs[same], want.top_logprobs[same], atol=1e-5, rtol=0)
    # The launch with processed rows is capturable, and replays the same values.
    packed = reference.pack(params, b, torch.device(dev))
    step_t = torch.ones(b, dtype=torch.int64, device=dev)
    out = torch.empty(b, LOGPROB_COLUMNS, device=dev)
    kw = dict(max_top_k=1024, nucleus_candidates=NUCLEUS_CANDIDATES, logprob_out=out,
              draw_seeds=False)
    replay = capture(dev, lambda: K.launch(logits, packed, window, step_t, **kw))
    tok_g, _status = replay()
    assert torch.equal(tok_g, tokens) and torch.equal(out[:, 0], lp.token_logprob)
