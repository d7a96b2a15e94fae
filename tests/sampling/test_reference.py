"""reference.sample against a plain per-row transcription of SPEC section 2, and chi-square."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from lmgen_fast import EmptyRowError, SamplingParams, sample
from lmgen_fast.core.philox import gumbel_from_uniform, uniform_noise
from lmgen_fast.sampling import reference

from conftest import assert_frequencies_match, assert_processed_close

INF = math.inf


# ---- an independent, deliberately naive implementation (one row, Python loops) -------------


def plain_filtered(row: torch.Tensor, p: SamplingParams, window: list[int]) -> torch.Tensor:
    """SPEC steps 1-3 for one row, the article's way: loop over the window's entries."""
    z = row.to(torch.float32).clone()
    if p.temperature > 0:
        z = z / p.temperature
    z[torch.isnan(z)] = -INF
    if p.repetition_penalty != 1.0 and window:
        tokens = window if p.penalty_mode == "per_occurrence" else sorted(set(window))
        for t in tokens:
            if z[t] > 0:
                z[t] = z[t] / p.repetition_penalty
            else:
                z[t] = z[t] * p.repetition_penalty
    if 0 < p.top_k < z.numel():
        tau = sorted(z.tolist(), reverse=True)[p.top_k - 1]
        z[z < tau] = -INF
    return z


def plain_sample(row: torch.Tensor, p: SamplingParams, window: list[int], step: int) -> int:
    z = plain_filtered(row, p, window)
    if p.temperature == 0:
        best = max(v for v in z.tolist())
        return z.tolist().index(best)
    if (z == INF).any():
        z = torch.where(z == INF, 0.0, -INF)
    tokens = torch.arange(z.numel())
    g = gumbel_from_uniform(uniform_noise(torch.tensor(p.seed), torch.tensor(step), tokens))
    keys = [(zi + gi) if zi > -INF else -INF for zi, gi in zip(z.tolist(), g.tolist(), strict=True)]
    best = max(keys)
    return keys.index(best)


def exact_probs(row: torch.Tensor, p: SamplingParams, window: list[int]) -> torch.Tensor:
    """The distribution of SPEC step 4, computed in float64."""
    z = row.to(torch.float64) / p.temperature
    counts = {}
    for t in window:
        counts[t] = counts.get(t, 0) + 1
    for t, c in counts.items():
        c = 1 if p.penalty_mode == "once" else c
        z[t] = z[t] / p.repetition_penalty**c if z[t] > 0 else z[t] * p.repetition_penalty**c
    if 0 < p.top_k < z.numel():
        tau = torch.sort(z, descending=True).values[p.top_k - 1]
        z[z < tau] = -INF
    return torch.softmax(z, dim=0)


# ---- random cases ------------------------------------------------------------------------


def random_case(gen: torch.Generator, batch: int, vocab: int, width: int):
    logits = torch.randn(batch, vocab, generator=gen) * 3
    # Ties at the k-th value: copy a few values across each row.
    for r in range(batch):
        src = torch.randint(0, vocab, (1,), generator=gen)
        dst = torch.randint(0, vocab, (3,), generator=gen)
        logits[r, dst] = logits[r, src]
    small = torch.randint(0, 12, (batch, width), generator=gen)  # duplicates guaranteed
    window = torch.where(torch.rand(batch, width, generator=gen) < 0.2, -1, small)
    rows = []
    for r in range(batch):
        rows.append(
            SamplingParams(
                temperature=float(torch.rand(1, generator=gen) * 1.5 + 0.2),
                top_k=int(torch.randint(-2, vocab + 3, (1,), generator=gen)),
                repetition_penalty=float(torch.rand(1, generator=gen) * 1.6 + 0.4),
                seed=int(torch.randint(0, 2**62, (1,), generator=gen)),
                penalty_mode=("once", "per_occurrence")[r % 2],
            )
        )
    return logits, window, rows


def window_list(window: torch.Tensor, r: int) -> list[int]:
    return [t for t in window[r].tolist() if t >= 0]


@pytest.mark.parametrize("trial", range(6))
def test_matches_plain_implementation(trial):
    gen = torch.Generator().manual_seed(100 + trial)
    logits, window, rows = random_case(gen, batch=16, vocab=64, width=9)
    step = trial * 3
    got = sample(logits, rows, window, step=step, backend="reference")
    want = [plain_sample(logits[r], rows[r], window_list(window, r), step) for r in range(16)]
    assert got.tolist() == want


@pytest.mark.parametrize("trial", range(4))
def test_filtered_logits_match_plain(trial):
    gen = torch.Generator().manual_seed(200 + trial)
    logits, window, rows = random_case(gen, batch=8, vocab=50, width=7)
    got = reference.filtered_logits(logits, rows, window)
    for r in range(8):
        want = plain_filtered(logits[r], rows[r], window_list(window, r))
        # p**c versus c divisions by p differ in the last bit at most.
        torch.testing.assert_close(got[r], want, rtol=1e-6, atol=0)


def test_top_k_ties_at_kth_value_survive():
    logits = torch.tensor([[5.0, 3.0, 3.0, 3.0, 1.0, 0.0]])
    z = reference.filtered_logits(logits, SamplingParams(top_k=2))
    assert torch.isfinite(z[0, :4]).all() and torch.isinf(z[0, 4:]).all()
    seen = {
        int(sample(logits, SamplingParams(top_k=2, seed=s, temperature=5.0)))
        for s in range(300)
    }
    assert seen == {0, 1, 2, 3}


@pytest.mark.parametrize("k", [0, -3, 6, 7, 1000])
def test_top_k_off_or_at_least_vocab_keeps_all(k):
    logits = torch.tensor([[5.0, 3.0, 1.0, 0.0, -2.0, -9.0]])
    assert torch.isfinite(reference.filtered_logits(logits, SamplingParams(top_k=k))).all()


@pytest.mark.parametrize("vocab, kp", [(32000, 51), (5000, 11), (4099, 3), (300, 51)])
def test_row_topk_equals_torch_topk(vocab, kp):
    gen = torch.Generator().manual_seed(vocab)
    z = torch.randn(16, vocab, generator=gen) * 3
    z[1] = torch.randint(0, 5, (vocab,), generator=gen).float()  # ties everywhere
    z[2] = -INF
    z[2, :2] = 1.0  # fewer finite values than kp
    z[3, -2:] = 100.0  # the maxima sit in the tail
    z[4, ::97] = 50.0  # equal maxima in many chunks
    vals, idx = reference.row_topk(z, kp)
    assert torch.equal(vals, torch.topk(z, kp, dim=1).values)
    assert torch.equal(z.gather(1, idx), vals)
    assert all(len(set(row)) == kp for row in idx.tolist())


def test_top_k_one_is_argmax():
    logits = torch.randn(32, 100)
    got = sample(logits, SamplingParams(top_k=1, seed=1))
    assert torch.equal(got, logits.argmax(1))


def test_greedy_lowest_index_wins_and_penalty_applies():
    logits = torch.tensor([[1.0, 4.0, 4.0, 2.0], [3.0, -1.0, 2.9, 0.0]])
    p = SamplingParams(temperature=0, repetition_penalty=2.0)
    window = torch.tensor([[-1, -1], [0, -1]])
    # row 1: 3.0 / 2 = 1.5 < 2.9
    assert sample(logits, p, window).tolist() == [1, 2]


def test_greedy_ignores_rng_state():
    logits = torch.randn(3, 50)
    a = sample(logits, SamplingParams(temperature=0))
    b = sample(logits, SamplingParams(temperature=0))
    assert torch.equal(a, b) and torch.equal(a, logits.argmax(1))


@pytest.mark.parametrize("mixed", [False, True])
def test_greedy_rows_take_argmax_on_ties_and_infinities(mixed):
    """Greedy tokens are ``torch.argmax``'s (the first maximum) where values tie, are
    ``+inf`` or ``-inf``, in an all-greedy batch (one ``torch.max``) and beside sampled
    rows, on the CPU path and the fixed-shape path."""
    gen = torch.Generator().manual_seed(11)
    z = torch.randint(-3, 3, (12, 257), generator=gen).float()
    z[torch.rand(z.shape, generator=gen) < 0.2] = -INF
    z[torch.rand(z.shape, generator=gen) < 0.02] = INF
    z[3] = -INF
    z[3, 200] = -1.0  # one finite value, late
    rows = [SamplingParams(temperature=0)] * 12
    if mixed:
        rows[5] = SamplingParams(seed=1)
    want = z.argmax(1)
    for on_device in (False, True):
        got = reference.sample(z, rows, on_device=on_device)
        keep = [r for r in range(12) if not (mixed and r == 5)]
        assert got[keep].tolist() == want[keep].tolist(), on_device


def test_penalty_sign_rules_per_occurrence_and_once():
    logits = torch.tensor([[2.0, -2.0, 0.0, 1.0]])
    window = torch.tensor([[0, 0, 1, 1, 2]])
    per = reference.filtered_logits(logits, SamplingParams(repetition_penalty=2.0, top_k=0), window)
    once = reference.filtered_logits(
        logits, SamplingParams(repetition_penalty=2.0, top_k=0, penalty_mode="once"), window
    )
    assert per.tolist() == [[0.5, -8.0, 0.0, 1.0]]
    assert once.tolist() == [[1.0, -4.0, 0.0, 1.0]]


def test_nan_never_sampled():
    logits = torch.randn(64, 20)
    logits[:, ::2] = math.nan
    got = sample(logits, [SamplingParams(top_k=0, seed=s) for s in range(64)])
    assert (got % 2 == 1).all()
    greedy = sample(logits, SamplingParams(temperature=0))
    assert (greedy % 2 == 1).all()


def test_pos_inf_share_probability_equally():
    logits = torch.zeros(4000, 10)
    logits[:, 3] = INF
    logits[:, 7] = INF
    logits[:, 5] = 1e30
    got = sample(logits, [SamplingParams(seed=s) for s in range(4000)])
    counts = torch.bincount(got, minlength=10)
    assert counts[3] + counts[7] == 4000
    assert stats.binomtest(int(counts[3]), 4000).pvalue > 1e-4


def test_empty_row_is_named():
    logits = torch.randn(3, 10)
    logits[1] = -INF
    logits[2] = math.nan
    for p in (SamplingParams(seed=0), SamplingParams(temperature=0)):
        with pytest.raises(EmptyRowError) as info:
            sample(logits, p)
        assert info.value.rows == [1, 2] and "[1, 2]" in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_any_float_dtype_is_processed_in_float32(dtype):
    logits = torch.randn(8, 40).to(dtype)
    rows = [SamplingParams(seed=s, top_k=10) for s in range(8)]
    assert torch.equal(sample(logits, rows), sample(logits.float(), rows))


def test_same_seed_same_tokens_and_step_changes_noise():
    logits = torch.randn(1, 500)
    p = SamplingParams(seed=42, top_k=0)
    a = [int(sample(logits, p, step=s)) for s in range(20)]
    b = [int(sample(logits, p, step=s)) for s in range(20)]
    assert a == b and len(set(a)) > 5


def test_batch_invariance_of_seeded_rows():
    gen = torch.Generator().manual_seed(7)
    logits, window, rows = random_case(gen, batch=12, vocab=80, width=6)
    full = sample(logits, rows, window, step=3)
    for r in range(12):
        alone = sample(logits[r : r + 1], rows[r], window[r : r + 1], step=3)
        assert int(alone) == int(full[r])
    perm = torch.randperm(12, generator=gen)
    shuffled = sample(logits[perm], [rows[i] for i in perm], window[perm], step=3)
    assert torch.equal(shuffled, full[perm])


def test_unseeded_batch_of_one_draws_like_the_article():
    logits = torch.randn(1, 300) * 2
    z = logits[0] / 0.8
    tau = torch.topk(z, 20)[0][-1]
    z[z < tau] = -INF
    torch.manual_seed(11)
    want = [int(torch.multinomial(torch.softmax(z, dim=-1), 1)) for _ in range(30)]
    torch.manual_seed(11)
    got = [int(sample(logits, SamplingParams(temperature=0.8, top_k=20))) for _ in range(30)]
    assert got == want


def test_unseeded_batch_rows_are_random_but_reproducible_under_manual_seed():
    logits = torch.zeros(4, 1000)
    torch.manual_seed(3)
    a = sample(logits, SamplingParams(top_k=0))
    torch.manual_seed(3)
    b = sample(logits, SamplingParams(top_k=0))
    assert torch.equal(a, b) and len(set(a.tolist())) > 1


# ---- chi-square against the exact float64 distribution -----------------------------------


CHI_CASES = [
    SamplingParams(temperature=0.7, top_k=5, repetition_penalty=1.3),
    SamplingParams(temperature=1.5, top_k=0, repetition_penalty=0.7, penalty_mode="once"),
    SamplingParams(temperature=1.0, top_k=9, repetition_penalty=2.0),
]


@pytest.mark.parametrize("params", CHI_CASES)
def test_seeded_frequencies_chi_square(params):
    n, vocab = 20000, 12
    gen = torch.Generator().manual_seed(5)
    row = torch.randn(vocab, generator=gen) * 1.5
    window = [0, 0, 3, 5, 5, 5, 7]
    probs = exact_probs(row, params, window)
    rows = [SamplingParams(**{**vars(params), "seed": s}) for s in range(n)]
    got = sample(row.expand(n, vocab), rows, torch.tensor([window]).expand(n, -1), step=1)
    assert_frequencies_match(got, probs)


def test_unseeded_frequencies_chi_square():
    n = 3000
    params = SamplingParams(temperature=0.9, top_k=6, repetition_penalty=1.5)
    row = torch.tensor([1.0, 0.5, -0.2, 2.0, 0.0, -1.0, 1.5, 0.7])
    window = [3, 3, 6]
    probs = exact_probs(row, params, window)
    torch.manual_seed(0)
    w = torch.tensor([window])
    got = [int(sample(row.view(1, -1), params, w)) for _ in range(n)]
    assert_frequencies_match(torch.tensor(got), probs)


# ---- input errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(logits=torch.randn(5)), "logits must be a \\[B, V\\] tensor"),
        (dict(logits=torch.ones(2, 5, dtype=torch.int64)), "float dtype"),
        (dict(window=torch.zeros(2, 3, dtype=torch.int32)), "window must be an int64"),
        (dict(window=torch.full((2, 3), 5)), "window\\[0, 0\\] = 5"),
        (dict(window=torch.full((2, 3), -2)), "window\\[0, 0\\] = -2"),
        (dict(step=-1), "step must be an int"),
        (dict(backend="cuda-magic"), "backend must be one of"),
        (dict(params=[SamplingParams()] * 3), "3 entries for a batch of 2"),
    ],
)
def test_bad_inputs_raise_value_error(kwargs, match):
    args = dict(logits=torch.randn(2, 5), params=SamplingParams(), window=None, step=0)
    args.update(kwargs)
    backend = args.pop("backend", "auto")
    with pytest.raises(ValueError, match=match):
        sample(args["logits"], args["params"], args["window"], step=args["step"], backend=backend)


def test_logits_are_not_modified():
    logits = torch.randn(4, 30)
    before = logits.clone()
    sample(logits, SamplingParams(temperature=0.5, repetition_penalty=1.5, seed=1),
           torch.tensor([[1, 2, 2]] * 4))
    assert torch.equal(logits, before)


# ---- logprobs_mode="processed" and the filters' edges ------------------------------------

PROCESSED_CASES = [
    dict(temperature=0.7, top_k=0),
    dict(temperature=1.3, top_k=0, repetition_penalty=1.4, frequency_penalty=0.5,
         presence_penalty=-0.3),
    dict(temperature=1.0, top_k=7),
    dict(temperature=1.0, top_k=0, top_p=0.8),
    dict(temperature=1.0, top_k=0, min_p=0.1),
    dict(temperature=0.9, top_k=12, top_p=0.7, min_p=0.05, repetition_penalty=1.2,
         penalty_mode="once"),
    dict(temperature=0.0, top_k=5),
]


def processed_batch(seed: int, vocab: int, coarse: bool):
    gen = torch.Generator().manual_seed(seed)
    batch = 2 * len(PROCESSED_CASES) + 2
    logits = torch.randn(batch, vocab, generator=gen) * 2
    if coarse:
        # Values on a grid of 0.5: ties at the k-th place and inside the nucleus, exact in
        # float32 and float64 alike (temperatures divide them exactly only at 1, so the
        # tie rows use T = 1).
        logits = (logits * 2).round() / 2
    logits[-2, [3, 11]] = INF  # +inf row: the two share the mass
    logits[-1, ::3] = float("nan")  # NaN never survives
    window = torch.randint(-1, vocab, (batch, 6), generator=gen)
    cases = PROCESSED_CASES * 2 + [dict(top_k=0, top_p=0.5), dict(top_k=4, min_p=0.2)]
    rows = [SamplingParams(**c, seed=seed * 100 + i, logprobs=20, logprobs_mode="processed")
            for i, c in enumerate(cases)]
    return logits, window, rows


@pytest.mark.parametrize("on_device", [False, True])
@pytest.mark.parametrize("vocab, coarse", [(20, False), (20, True), (300, False), (300, True)])
def test_processed_logprobs_against_float64(on_device, vocab, coarse):
    logits, window, rows = processed_batch(vocab + coarse, vocab, coarse)
    for step in range(3):
        tokens, lp = reference.sample(logits, rows, window, step=step, return_logprobs=True,
                                      on_device=on_device)
        assert lp.top_ids.shape == (len(rows), 20)
        assert_processed_close(lp.token_logprob, lp.top_ids, lp.top_logprobs, logits, rows,
                               window, tokens)
        # The draw is the raw mode's draw: the mode changes what is reported, not tokens.
        raw = [SamplingParams(**{**vars(p), "logprobs_mode": "raw"}) for p in rows]
        assert torch.equal(reference.sample(logits, raw, window, step=step,
                                            on_device=on_device), tokens)


def test_processed_and_raw_rows_mix_in_one_batch():
    logits, window, rows = processed_batch(5, 50, False)
    mixed = [SamplingParams(**{**vars(p), "logprobs_mode": "raw"}) if i % 2 else p
             for i, p in enumerate(rows)]
    tokens, lp = reference.sample(logits, mixed, window, step=1, return_logprobs=True)
    raw = reference.raw_logprobs(logits, tokens, 20)
    proc_rows = [i for i in range(len(rows)) if i % 2 == 0]
    raw_rows = [i for i in range(len(rows)) if i % 2]
    assert torch.equal(lp.token_logprob[raw_rows], raw.token_logprob[raw_rows])
    assert torch.equal(lp.top_ids[raw_rows], raw.top_ids[raw_rows])
    sub = [mixed[i] for i in proc_rows]
    assert_processed_close(lp.token_logprob[proc_rows], lp.top_ids[proc_rows],
                           lp.top_logprobs[proc_rows], logits[proc_rows], sub,
                           window[proc_rows], tokens[proc_rows])


def test_processed_greedy_row_is_a_point_mass():
    logits = torch.tensor([[1.0, 3.0, 3.0, -2.0]])
    p = SamplingParams(temperature=0, logprobs=3, logprobs_mode="processed")
    for on_device in (False, True):
        tokens, lp = reference.sample(logits, p, return_logprobs=True, on_device=on_device)
        assert tokens.tolist() == [1]
        assert lp.token_logprob.tolist() == [0.0]
        assert lp.top_ids.tolist() == [[1, -1, -1]]
        assert lp.top_logprobs[0, 1:].tolist() == [-INF, -INF]


def test_logprobs_mode_is_validated():
    with pytest.raises(ValueError, match="logprobs_mode.*'filtered'"):
        SamplingParams(logprobs_mode="filtered")


def top_p_edge_row() -> torch.Tensor:
    """Token 0 holds 0.99999989 of the mass (float64), token 1 the rest, others -inf."""
    logits = torch.full((1, 8), -INF)
    logits[0, 0] = 0.0
    logits[0, 1] = math.log(1.1e-7)
    return logits


@pytest.mark.parametrize("on_device", [False, True])
@pytest.mark.parametrize("top_k", [0, 4])
def test_top_p_compares_the_users_value_unrounded(on_device, top_k):
    logits = top_p_edge_row()
    z1 = float(logits[0, 1])
    above = 1.0 / (1.0 + math.exp(z1))  # float64 mass strictly above token 1
    top_p = 0.9999999
    assert above < top_p  # the exact rule keeps token 1 ...
    # ... float32 would not: top_p becomes 0.99999988, which the float32 mass above token 1
    # equals.
    q0 = float(torch.softmax(logits.float(), dim=1)[0, 0])
    assert q0 == float(torch.tensor(top_p, dtype=torch.float32)) and not q0 < q0
    p = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, logprobs=3,
                       logprobs_mode="processed", seed=0)
    kept = reference.filtered_logits(logits, p)
    assert (kept[0] > -INF).nonzero().flatten().tolist() == [0, 1]
    _, lp = reference.sample(logits, p, return_logprobs=True, on_device=on_device)
    assert lp.top_ids[0].tolist() == [0, 1, -1]
    # A mass clearly above top_p still removes the token.
    logits[0, 1] = math.log(1e-8)
    _, lp = reference.sample(logits, p, return_logprobs=True, on_device=on_device)
    assert lp.top_ids[0].tolist() == [0, -1, -1]


def min_p_edges(count: int = 40):
    """Rows whose min-p fate is decided by the last bits: token 1 sits at a float32
    difference d below token 0, and min_p is just below or just above exp(d) (float64).
    Yields (logits [1, 4], min_p, whether the exact rule keeps token 1)."""
    gen = torch.Generator().manual_seed(17)
    for d in (-torch.rand(count, generator=gen) * 6).tolist():
        logits = torch.tensor([[2.0, 2.0 + d, -30.0, 1.0 + d]])
        e = math.exp(float(logits[0, 1] - logits[0, 0]))
        yield logits, e * (1 - 1e-12), True
        yield logits, e * (1 + 1e-12), False


def test_min_p_edges_defeat_a_float32_exp():
    # The old rule (float32 exp(d) >= float32 min_p) keeps every "False" case where float32
    # exp(d) rounds to float32(min_p): the edges below are real edges.
    wrong = 0
    for logits, min_p, keep in min_p_edges():
        d = logits[0, 1] - logits[0, 0]
        wrong += bool(torch.exp(d) >= torch.tensor(min_p, dtype=torch.float32)) != keep
    assert wrong > 0


@pytest.mark.parametrize("on_device", [False, True])
def test_min_p_is_exact_at_its_edge(on_device):
    for top_k in (0, 3):
        for logits, min_p, keep in min_p_edges():
            p = SamplingParams(temperature=1.0, top_k=top_k, min_p=min_p, logprobs=4,
                               logprobs_mode="processed", seed=1)
            _, lp = reference.sample(logits, p, return_logprobs=True, on_device=on_device)
            assert (1 in lp.top_ids[0].tolist()) == keep, (logits, min_p)
            kept = reference.filtered_logits(logits, p)[0] > -INF
            assert bool(kept[1]) == keep
