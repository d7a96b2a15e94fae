"""Issue 8 on the reference: top-p, min-p, frequency and presence penalties, log-probabilities.

A plain per-row transcription of the definitions (Python loops over float32 values) must pick
the same tokens as ``reference.sample``; frequencies must match the exact float64 distribution.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmgen_fast import SamplingParams, generate_batch, load_default, sample
from lmgen_fast.cli.main import main
from lmgen_fast.core.philox import gumbel_from_uniform, uniform_noise
from lmgen_fast.sampling import reference

from conftest import assert_frequencies_match, exact_processed

INF = math.inf
F32 = torch.float32


def f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=F32)


# ---- an independent, deliberately naive implementation (one row, Python loops) -------------


def plain_penalized(row: torch.Tensor, p: SamplingParams, window: list[int]) -> torch.Tensor:
    """Steps 1 and 2 for one row."""
    temp = f32(p.temperature if p.temperature > 0 else 1.0)
    z = row.to(F32) / temp
    z[torch.isnan(z)] = -INF
    counts: dict[int, int] = {}
    for t in window:
        counts[t] = counts.get(t, 0) + 1
    for t, c in counts.items():
        times = 1 if p.penalty_mode == "once" else c
        factor = f32(p.repetition_penalty) ** times
        z[t] = z[t] / factor if z[t] > 0 else z[t] * factor
        adj = f32(p.frequency_penalty) * c + f32(p.presence_penalty) * 1.0
        z[t] = z[t] - adj / temp
    return z


def plain_filtered(row: torch.Tensor, p: SamplingParams, window: list[int]) -> torch.Tensor:
    """Steps 1 to 5 for one row."""
    z = plain_penalized(row, p, window)
    if 0 < p.top_k < z.numel():
        tau = sorted(z.tolist(), reverse=True)[p.top_k - 1]
        z[z < tau] = -INF
    if p.temperature == 0 or bool((z == INF).any()):
        return z
    if p.top_p < 1:
        order = sorted((i for i in range(z.numel()) if z[i] > -INF), key=lambda i: -z[i])
        vals = torch.tensor([float(z[i]) for i in order], dtype=F32)
        e = torch.exp(vals - vals[0])
        total = f32(sum(float(v) for v in e))  # summed in float64, rounded once
        q = e / total
        acc, before, first = 0.0, [], None
        for j in range(len(order)):
            if j == 0 or vals[j] != vals[j - 1]:
                first = float(f32(acc))  # the mass of the strictly larger values
            before.append(first)
            acc += float(q[j])
        for j, i in enumerate(order):
            if not before[j] < float(f32(p.top_p)):
                z[i] = -INF
    if p.min_p > 0:
        zmax = z.max()
        for i in range(z.numel()):
            if z[i] > -INF and not torch.exp(z[i] - zmax) >= f32(p.min_p):
                z[i] = -INF
    return z


def plain_sample(row: torch.Tensor, p: SamplingParams, window: list[int], step: int) -> int:
    if p.temperature == 0:
        values = plain_penalized(row, p, window).tolist()
        return values.index(max(values))
    z = plain_filtered(row, p, window)
    if (z == INF).any():
        z = torch.where(z == INF, 0.0, -INF)
    tokens = torch.arange(z.numel())
    g = gumbel_from_uniform(uniform_noise(torch.tensor(p.seed), torch.tensor(step), tokens))
    keys = [zi + gi if zi > -INF else -INF for zi, gi in zip(z.tolist(), g.tolist(), strict=True)]
    return keys.index(max(keys))


def exact_probs(row: torch.Tensor, p: SamplingParams, window: list[int]) -> torch.Tensor:
    """The distribution of one step, in float64, penalties before temperature (issue 8)."""
    z = row.to(torch.float64).clone()
    counts: dict[int, int] = {}
    for t in window:
        counts[t] = counts.get(t, 0) + 1
    for t, c in counts.items():
        times = 1 if p.penalty_mode == "once" else c
        factor = p.repetition_penalty**times
        z[t] = z[t] / factor if z[t] > 0 else z[t] * factor
        z[t] -= p.frequency_penalty * c + p.presence_penalty
    z = z / p.temperature
    if 0 < p.top_k < z.numel():
        z[z < torch.sort(z, descending=True).values[p.top_k - 1]] = -INF
    q = torch.softmax(z, dim=0)
    if p.top_p < 1:
        above = torch.tensor([q[z > z[i]].sum() for i in range(z.numel())])
        z[above >= p.top_p] = -INF
        q = torch.softmax(z, dim=0)
    if p.min_p > 0:
        z[q < p.min_p * q.max()] = -INF
    return torch.softmax(z, dim=0)


# ---- random cases --------------------------------------------------------------------------


def random_params(gen: torch.Generator, r: int, vocab: int) -> SamplingParams:
    def u(lo: float, hi: float) -> float:
        return float(torch.rand(1, generator=gen)) * (hi - lo) + lo

    kind = r % 8
    new = {
        0: dict(top_p=u(0.05, 0.99)),
        1: dict(min_p=u(0.01, 0.6)),
        2: dict(frequency_penalty=u(-1, 2), presence_penalty=u(-1, 2)),
        3: dict(top_p=u(0.2, 0.95), min_p=u(0.01, 0.3)),
        4: dict(top_p=u(0.2, 0.95), min_p=u(0.01, 0.3), frequency_penalty=u(0, 1),
                presence_penalty=u(0, 1)),
        5: dict(top_p=u(0.3, 0.9), temperature=0.0, frequency_penalty=u(0, 1)),
        6: dict(),
        7: dict(min_p=u(0.01, 0.2), presence_penalty=u(0, 3)),
    }[kind]
    base = dict(
        temperature=u(0.3, 1.6),
        top_k=int(torch.randint(-2, vocab + 3, (1,), generator=gen)) if r % 3 else 5,
        repetition_penalty=u(0.5, 1.8) if r % 2 else 1.0,
        seed=int(torch.randint(0, 2**62, (1,), generator=gen)),
        penalty_mode=("once", "per_occurrence")[r % 2],
    )
    return SamplingParams(**{**base, **new})


def random_case(gen: torch.Generator, batch: int, vocab: int, width: int):
    logits = torch.randn(batch, vocab, generator=gen) * 2.5
    for r in range(batch):  # ties, so that equal values meet the top-p and top-k boundaries
        src = torch.randint(0, vocab, (2,), generator=gen)
        for s in src:
            logits[r, torch.randint(0, vocab, (3,), generator=gen)] = float(logits[r, s])
    small = torch.randint(0, 12, (batch, width), generator=gen)
    window = torch.where(torch.rand(batch, width, generator=gen) < 0.2, -1, small)
    return logits, window, [random_params(gen, r, vocab) for r in range(batch)]


def window_list(window: torch.Tensor, r: int) -> list[int]:
    return [t for t in window[r].tolist() if t >= 0]


@pytest.mark.parametrize("trial", range(8))
def test_matches_plain_implementation(trial):
    gen = torch.Generator().manual_seed(800 + trial)
    batch, vocab = 24, 48
    logits, window, rows = random_case(gen, batch, vocab, width=9)
    got = sample(logits, rows, window, step=trial, backend="reference")
    want = [plain_sample(logits[r], rows[r], window_list(window, r), trial) for r in range(batch)]
    assert got.tolist() == want
    # Each row alone picks the same token (batch invariance with the new filters).
    for r in range(0, batch, 5):
        alone = sample(logits[r : r + 1], rows[r], window[r : r + 1], step=trial)
        assert int(alone) == want[r]


@pytest.mark.parametrize("trial", range(4))
def test_filtered_logits_match_plain(trial):
    gen = torch.Generator().manual_seed(900 + trial)
    logits, window, rows = random_case(gen, batch=16, vocab=40, width=7)
    rows = [r for r in rows if r.temperature > 0]
    logits, window = logits[: len(rows)], window[: len(rows)]
    got = reference.filtered_logits(logits, rows, window)
    for r, p in enumerate(rows):
        assert torch.equal(got[r], plain_filtered(logits[r], p, window_list(window, r)))


def test_new_parameters_at_defaults_change_nothing():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 30, generator=gen)
    window = torch.randint(0, 30, (6, 5), generator=gen)
    rows = [SamplingParams(seed=s, repetition_penalty=1.4, top_k=s * 4) for s in range(6)]
    z = reference.filtered_logits(logits, rows, window)
    # The article's arithmetic, bit for bit: l / T, then the penalty, then top-k.
    packed = reference.pack(rows, 6, logits.device)
    base = logits / packed.temperature.unsqueeze(1)
    reference.apply_penalty(base, window, packed.penalty, packed.once)
    base.masked_fill_(base < reference.top_k_threshold(base, packed.top_k).unsqueeze(1), -INF)
    assert torch.equal(z, base)


# ---- boundaries ----------------------------------------------------------------------------


def test_frequency_and_presence_penalties_count_raw_occurrences():
    logits = torch.tensor([[1.0, 0.5, -1.0, 2.0]])
    window = torch.tensor([[0, 0, 2, -1, 0]])
    for mode in ("per_occurrence", "once"):
        p = SamplingParams(temperature=2.0, top_k=0, frequency_penalty=0.5,
                           presence_penalty=0.25, penalty_mode=mode)
        z = reference.filtered_logits(logits, p, window)
        # token 0: 0.5 - (0.5 * 3 + 0.25) / 2; token 2: -0.5 - (0.5 + 0.25) / 2
        assert z.tolist() == [[0.5 - 0.875, 0.25, -0.5 - 0.375, 1.0]]


def _mass_before(vals: list[float], group_value: float) -> float:
    """The float32 mass of the values strictly above ``group_value`` (plain arithmetic)."""
    v = torch.tensor(sorted(vals, reverse=True), dtype=F32)
    e = torch.exp(v - v[0])
    q = e / f32(sum(float(x) for x in e))
    acc = 0.0
    for x, qx in zip(v.tolist(), q.tolist(), strict=True):
        if x <= group_value:
            break
        acc += qx
    return float(f32(acc))


def _support(logits: torch.Tensor, p: SamplingParams) -> set[int]:
    z = reference.filtered_logits(logits, p)
    return set(torch.isfinite(z[0]).nonzero().flatten().tolist())


def test_top_p_ties_at_the_boundary_are_kept_or_dropped_together():
    logits = torch.tensor([[2.0, 1.0, 2.0, 1.0, 0.0, 1.0]])
    m = _mass_before(logits[0].tolist(), 1.0)
    just_above = float(torch.nextafter(f32(m), f32(2.0)))
    assert _support(logits, SamplingParams(top_k=0, top_p=m)) == {0, 2}  # strict <
    assert _support(logits, SamplingParams(top_k=0, top_p=just_above)) == {0, 1, 2, 3, 5}
    # With top-k 5 (the compact path: no tie past the 5th value), q renormalises over the
    # five survivors.
    m5 = _mass_before([2.0, 1.0, 2.0, 1.0, 1.0], 1.0)
    above5 = float(torch.nextafter(f32(m5), f32(2.0)))
    assert _support(logits, SamplingParams(top_k=5, top_p=m5)) == {0, 2}
    assert _support(logits, SamplingParams(top_k=5, top_p=above5)) == {0, 1, 2, 3, 5}
    # Top-k 4 ties at the 4th value (the general path): the same five survive.
    assert _support(logits, SamplingParams(top_k=4, top_p=above5)) == {0, 1, 2, 3, 5}
    seen = {int(sample(logits, SamplingParams(top_k=0, top_p=just_above, seed=s,
                                              temperature=3.0))) for s in range(400)}
    assert seen == {0, 1, 2, 3, 5}


@pytest.mark.parametrize("top_k", [0, 3])
def test_tiny_top_p_keeps_only_the_top_group(top_k):
    logits = torch.tensor([[0.5, 4.0, 4.0, 3.9, -1.0]])
    assert _support(logits, SamplingParams(top_k=top_k, top_p=1e-9)) == {1, 2}
    single = torch.tensor([[0.0, 9.0, -3.0]])  # q of the top is almost 1 > top_p
    assert _support(single, SamplingParams(top_k=top_k, top_p=1e-3)) == {1}
    got = sample(logits.expand(50, -1), [SamplingParams(top_k=top_k, top_p=1e-9, seed=s)
                                         for s in range(50)])
    assert set(got.tolist()) == {1, 2}


def test_min_p_boundary_is_inclusive():
    logits = torch.tensor([[0.0, -0.7, -2.0, -0.7, 0.0]])
    ratio = float(torch.exp(logits[0] - logits[0].max())[1])
    above = float(torch.nextafter(f32(ratio), f32(2.0)))
    assert _support(logits, SamplingParams(top_k=0, min_p=ratio)) == {0, 1, 3, 4}
    assert _support(logits, SamplingParams(top_k=0, min_p=above)) == {0, 4}
    assert _support(logits, SamplingParams(top_k=0, min_p=1.0)) == {0, 4}
    assert _support(logits, SamplingParams(top_k=3, min_p=1.0)) == {0, 4}


def test_filters_skip_greedy_and_pos_inf_rows():
    logits = torch.tensor([[1.0, 3.0, 2.0, INF], [1.0, 3.0, 2.0, 0.0]])
    p = SamplingParams(top_k=0, top_p=0.01, min_p=0.9)
    assert torch.isfinite(reference.filtered_logits(logits[:1], p)[0, :3]).all()
    greedy = SamplingParams(temperature=0, top_p=0.01, min_p=0.9, frequency_penalty=5.0)
    # Greedy: the argmax after the penalties (token 1 drops to 3 - 5 = -2).
    assert sample(logits[1:], greedy, torch.tensor([[1]])).tolist() == [2]


# ---- chi-square against the exact float64 distribution -----------------------------------


CHI_CASES = [
    SamplingParams(temperature=0.8, top_k=0, top_p=0.7),
    SamplingParams(temperature=1.2, top_k=9, top_p=0.85),
    SamplingParams(temperature=0.9, top_k=0, min_p=0.15),
    SamplingParams(temperature=1.1, top_k=0, frequency_penalty=0.6, presence_penalty=0.4),
    SamplingParams(temperature=1.3, top_k=10, repetition_penalty=1.4, frequency_penalty=0.3,
                   presence_penalty=-0.2, top_p=0.9, min_p=0.05),
]


@pytest.mark.parametrize("params", CHI_CASES)
def test_seeded_frequencies_chi_square(params):
    n, vocab = 20000, 12
    gen = torch.Generator().manual_seed(5)
    row = torch.randn(vocab, generator=gen) * 0.8
    window = [0, 0, 3, 5, 5, 5, 7]
    probs = exact_probs(row, params, window)
    # The float32 filters keep exactly the float64 support (no case sits on a boundary).
    z32 = reference.filtered_logits(row.view(1, -1), params, torch.tensor([window]))[0]
    assert torch.equal(torch.isfinite(z32), probs > 0)
    assert 1 < int((probs > 0).sum()) < vocab or params.top_p == 1 and params.min_p == 0
    rows = [SamplingParams(**{**vars(params), "seed": s}) for s in range(n)]
    got = sample(row.expand(n, vocab), rows, torch.tensor([window]).expand(n, -1), step=1)
    assert_frequencies_match(got, probs)


def test_unseeded_batch_of_one_uses_the_filtered_distribution():
    row = torch.tensor([[1.0, 0.5, -0.2, 2.0, 0.0, -1.0, 1.5, 0.7]])
    p = SamplingParams(temperature=0.9, top_k=0, top_p=0.8, min_p=0.2)
    zf = reference.filtered_logits(row, p)
    torch.manual_seed(2)
    want = [int(torch.multinomial(torch.softmax(zf[0], dim=-1), 1)) for _ in range(40)]
    torch.manual_seed(2)
    assert [int(sample(row, p)) for _ in range(40)] == want


# ---- log-probabilities ---------------------------------------------------------------------


def test_logprobs_match_float64_log_softmax():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(10, 300, generator=gen) * 4
    logits[2, 5] = math.nan
    logits[3, :50] = logits[3].max() + 1  # a long run of equal values at the top
    rows = [SamplingParams(seed=s, top_p=0.9, logprobs=s % 4 + 2) for s in range(10)]
    tokens, lp = sample(logits, rows, return_logprobs=True)
    assert torch.equal(tokens, sample(logits, rows))
    assert lp.top_ids.shape == (10, 5) and lp.top_logprobs.dtype == F32
    ref = torch.log_softmax(torch.nan_to_num(logits.double(), nan=-INF), dim=1)
    torch.testing.assert_close(lp.token_logprob.double(), ref.gather(1, tokens[:, None])[:, 0],
                               atol=1e-5, rtol=0)
    want = torch.topk(ref, 5, dim=1).values
    torch.testing.assert_close(lp.top_logprobs.double(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(ref.gather(1, lp.top_ids), want, atol=1e-5, rtol=0)
    assert lp.top_ids[3].tolist() == list(range(5))  # equal values: lower ids first


def test_zero_logprobs_gives_empty_tensors_and_pos_inf_rows_share():
    logits = torch.tensor([[0.0, INF, 1.0, INF], [0.0, 1.0, 2.0, 3.0]])
    tokens, lp = sample(logits, SamplingParams(seed=1), return_logprobs=True)
    assert lp.top_ids.shape == (2, 0) and lp.top_logprobs.shape == (2, 0)
    assert tokens[0] in (1, 3) and lp.token_logprob[0] == f32(-math.log(2.0))
    _, lp = sample(logits, SamplingParams(seed=1, logprobs=3), return_logprobs=True)
    assert lp.top_ids[0].tolist() == [1, 3, 0] and lp.top_logprobs[0, 2] == -INF


def test_generate_batch_details_carry_logprobs(model, tokenizer):
    prompts = ["The quick brown", "Once upon"]
    rows = [SamplingParams(seed=1, top_p=0.9, logprobs=3, frequency_penalty=0.5),
            SamplingParams(seed=2, min_p=0.1, presence_penalty=0.3)]
    kwargs = dict(max_tokens=12, params=rows, backend="reference")
    details = generate_batch(model, tokenizer, prompts, return_details=True, **kwargs)
    assert [d.text for d in details] == generate_batch(model, tokenizer, prompts, **kwargs)
    first, second = details
    assert second.top_logprobs is None and len(second.logprobs) == len(second.token_ids)
    assert len(first.top_logprobs) == len(first.token_ids) == len(first.logprobs) > 0
    # The raw log-probabilities of what was generated, by one uncached forward pass.
    bos = tokenizer.token_to_id("[BOT]")
    for d, prompt in zip(details, prompts, strict=True):
        ids = [bos, *tokenizer.encode(" " + prompt).ids]
        with torch.no_grad():
            out = model(torch.tensor([ids + d.token_ids]))
        lsm = torch.log_softmax(out[0].double(), dim=-1)[len(ids) - 1 : -1]
        want = lsm.gather(1, torch.tensor(d.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(d.logprobs).double(), want, atol=1e-4, rtol=0)
    for t, pairs in zip(first.token_ids, first.top_logprobs, strict=True):
        assert len(pairs) == 3 and pairs == sorted(pairs, key=lambda x: -x[1])
        assert pairs[0][1] >= first.logprobs[first.token_ids.index(t)] - 1e-6


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_generate_batch_processed_logprobs(model, tokenizer, backend):
    # Each token's processed log-probability against float64 from one uncached forward pass:
    # temperature, the penalties over the generated window, the filters.
    if backend == "triton":
        from conftest import require_kernel_runtime

        require_kernel_runtime()
    prompts = ["The quick brown", "Once upon", "A model"]
    mode = dict(logprobs_mode="processed")
    rows = [SamplingParams(seed=1, temperature=0.8, top_p=0.9, logprobs=3,
                           repetition_penalty=1.3, repetition_penalty_range=4, **mode),
            SamplingParams(seed=2, top_k=5, min_p=0.1, presence_penalty=0.3, logprobs=20,
                           **mode),
            SamplingParams(temperature=0, logprobs=2, **mode)]
    details = generate_batch(model, tokenizer, prompts, max_tokens=6, params=rows,
                             backend=backend, return_details=True)
    raw = generate_batch(model, tokenizer, prompts, max_tokens=6, backend=backend,
                         params=[SamplingParams(**{**vars(r), "logprobs_mode": "raw"})
                                 for r in rows], return_details=True)
    bos = tokenizer.token_to_id("[BOT]")
    for d, r, p, prompt in zip(details, raw, rows, prompts, strict=True):
        assert d.token_ids == r.token_ids and len(d.token_ids) > 0  # same draws
        ids = [bos, *tokenizer.encode(" " + prompt).ids]
        with torch.no_grad():
            out = model(torch.tensor([ids + d.token_ids]))[0, len(ids) - 1: -1]
        for i, tok in enumerate(d.token_ids):
            window = d.token_ids[max(0, i - p.repetition_penalty_range):i]
            want = exact_processed(out[i], p, window, tok)
            assert abs(d.logprobs[i] - float(want[tok])) <= 1e-4, (i, d.logprobs[i], want[tok])
            listed = [t for t, _ in d.top_logprobs[i]]
            assert all(want[t] > -INF for t in listed)
            assert len(listed) == min(p.logprobs, int((want > -INF).sum()))
            assert tok in listed or d.top_logprobs[i][-1][1] >= d.logprobs[i] - 1e-6
    assert details[2].logprobs == [0.0] * len(details[2].token_ids)
    assert all(len(t) == 1 for t in details[2].top_logprobs)


# ---- command line, jobs and validation -----------------------------------------------------


def test_command_line_options_reach_the_sampler(capsys):
    model, tokenizer = load_default()
    want = generate_batch(model, tokenizer, ["A list is"], max_tokens=16, temperature=0.9,
                          top_k=0, seed=5, top_p=0.8, min_p=0.05, frequency_penalty=0.4,
                          presence_penalty=0.2, return_details=True, logprobs=2)[0]
    args = ["generate", "A list is", "--max-tokens", "16", "--temperature", "0.9", "--top-k",
            "0", "--seed", "5", "--top-p", "0.8", "--min-p", "0.05", "--frequency-penalty",
            "0.4", "--presence-penalty", "0.2", "--device", "cpu"]
    assert main(args) == 0
    assert capsys.readouterr().out == want.text + "\n"
    assert main([*args, "--logprobs", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out == want.text + "\n"
    printed = json.loads(captured.err.splitlines()[0])
    assert printed["token_ids"] == want.token_ids
    assert printed["top_logprobs"] == [[list(p) for p in t] for t in want.top_logprobs]
    assert printed["logprobs_mode"] == "raw"
    processed = generate_batch(model, tokenizer, ["A list is"], max_tokens=16, temperature=0.9,
                               top_k=0, seed=5, top_p=0.8, min_p=0.05, frequency_penalty=0.4,
                               presence_penalty=0.2, return_details=True, logprobs=2,
                               logprobs_mode="processed")[0]
    assert processed.logprobs != want.logprobs
    assert main([*args, "--logprobs", "2", "--logprobs-mode", "processed"]) == 0
    printed = json.loads(capsys.readouterr().err.splitlines()[0])
    assert printed["logprobs_mode"] == "processed"
    assert printed["logprobs"] == processed.logprobs
    assert printed["top_logprobs"] == [[list(p) for p in t] for t in processed.top_logprobs]


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--top-p", "0", "--top-p must be in (0, 1]"),
    ("--min-p", "1.5", "--min-p must be in [0, 1]"),
    ("--frequency-penalty", "nan", "--frequency-penalty must be finite"),
    ("--presence-penalty", "inf", "--presence-penalty must be finite"),
    ("--logprobs", "21", "--logprobs must be in [0, 20]"),
    ("--logprobs-mode", "filtered", "invalid choice: 'filtered'"),
])
def test_command_line_names_the_option(capsys, option, value, message):
    assert main(["generate", "x", option, value]) != 0
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("field", "value"), [
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", math.nan), ("min_p", -0.1), ("min_p", 2.0),
    ("frequency_penalty", INF), ("presence_penalty", math.nan), ("presence_penalty", "x"),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", 2.5), ("logprobs", True),
    ("logprobs_mode", "filtered"), ("logprobs_mode", None),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_jobs_accept_the_new_fields_and_write_logprobs(tmp_path, capsys):
    from conftest import make_tokenizer, random_model

    tokenizer = make_tokenizer()
    model = random_model(tokenizer.get_vocab_size(), seed=0, scale=8.0)
    directory = tmp_path / "ckpt"
    directory.mkdir()
    from safetensors.torch import save_file

    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "config.json").write_text(json.dumps(model.config.to_dict()))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(directory / "model.safetensors"))
    lines = [
        {"id": 1, "prompt": "the quick", "top_p": 0.8, "min_p": 0.05, "logprobs": 2,
         "frequency_penalty": 0.5, "seed": 3, "logprobs_mode": "processed"},
        {"id": 2, "prompt": "a lazy dog", "presence_penalty": 0.4, "seed": 4},
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out.jsonl"
    assert main(["run", "--input", str(inp), "--output", str(out), "--model", str(directory),
                 "--device", "cpu", "--no-progress", "--max-tokens", "8"]) == 0
    got = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    rows = [SamplingParams(**{k: v for k, v in x.items() if k not in ("id", "prompt")})
            for x in lines]
    # A job runs the rows that ask for log-probabilities in a pass of their own, and a
    # batch's composition moves float rounding: compare each row with its own pass.
    want = [generate_batch(model, tokenizer, [x["prompt"]], max_tokens=8, params=[r],
                           return_details=True)[0] for x, r in zip(lines, rows, strict=True)]
    assert [got[1]["token_ids"], got[2]["token_ids"]] == [w.token_ids for w in want]
    assert got[1]["logprobs"] == pytest.approx(want[0].logprobs, abs=1e-6)
    assert len(got[1]["top_logprobs"]) == len(got[1]["token_ids"])
    assert all(1 <= len(t) <= 2 for t in got[1]["top_logprobs"])
    assert "logprobs" not in got[2] and "top_logprobs" not in got[2]
    assert got[1]["logprobs_mode"] == "processed" and "logprobs_mode" not in got[2]
    assert got[1]["top_logprobs"] == [[list(p) for p in t] for t in want[0].top_logprobs]
