"""The shared row rules (core.rows) and integer helpers (core.intmath), each against an
independent computation (a plain Python slice, a simulation, a loop) on fresh random
inputs, plus their edge cases."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lmgen_fast import SamplingParams
from lmgen_fast.core.intmath import cdiv, next_pow2, round_up
from lmgen_fast.core.rows import (
    DRAWN_SEED_LIMIT,
    fill_unseeded,
    finish_reason,
    history_window,
    listed_alternatives,
    positions_needed,
    prompt_base,
    prompt_history,
    window_width,
)


def sliced_window(history: list[int], span: int, width: int) -> list[int]:
    """A row's penalty window by plain slicing: its last ``span`` tokens (0: all of them),
    the last ``width`` of those, right-aligned and padded with -1."""
    window = history[-span:] if span > 0 else history
    window = window[len(window) - width:] if width < len(window) else window
    return [-1] * (width - len(window)) + window


@pytest.mark.parametrize("seed", range(6))
def test_history_window_is_a_slice_of_each_rows_history(seed):
    rng = random.Random(seed)
    batch, slots = rng.randint(1, 7), rng.randint(1, 24)
    hlen = [rng.randint(0, slots) for _ in range(batch)]
    ranges = [rng.choice([0, rng.randint(1, slots + 3)]) for _ in range(batch)]
    # Past hlen the history holds junk the window must never read.
    hist = [[rng.randint(0, 99) for _ in range(slots)] for _ in range(batch)]
    for width in sorted({0, 1, rng.randint(1, slots), slots, slots + 2}):
        got = history_window(torch.tensor(hist), torch.tensor(hlen), torch.tensor(ranges),
                             width)
        assert got.shape == (batch, width) and got.dtype == torch.int64
        want = [sliced_window(hist[r][: hlen[r]], ranges[r], width) for r in range(batch)]
        assert got.tolist() == want


@pytest.mark.parametrize("seed", range(4))
def test_window_width_is_the_widest_sliced_window(seed):
    rng = random.Random(100 + seed)
    n = rng.randint(1, 9)
    ranges = [rng.choice([0, rng.randint(1, 40)]) for _ in range(n)]
    seen = [rng.randint(0, 40) for _ in range(n)]
    # Each row's window, sliced from a history of distinct tokens, without its padding.
    want = max(sum(t >= 0 for t in sliced_window(list(range(s)), r, s))
               for r, s in zip(ranges, seen, strict=True))
    assert window_width(ranges, seen) == want
    assert window_width([], []) == 0


def fed_positions(prompt_len: int, max_tokens: int) -> int:
    """Positions a row writes, by simulating it: the prompt, then each sampled token that
    is fed back (every one but the last)."""
    written = prompt_len
    for t in range(max_tokens):
        if t < max_tokens - 1:
            written += 1
    return written


def test_positions_needed_counts_what_a_row_feeds_back():
    rng = random.Random(7)
    for _ in range(200):
        p, m = rng.randint(0, 300), rng.randint(0, 300)
        assert positions_needed(p, m) == fed_positions(p, m)
    assert positions_needed(5, 0) == 5  # nothing sampled, nothing fed
    assert positions_needed(5, 1) == 5  # one token, never fed back
    assert positions_needed(0, 0) == 0


def test_finish_reason_edge_cases():
    assert finish_reason(0, 0) == "length"  # a cap of 0 is reached at once
    assert finish_reason(3, 3) == "length"
    assert finish_reason(2, 3) == "eot"
    assert finish_reason(0, 5) == "eot"
    rng = random.Random(8)
    for _ in range(100):
        m = rng.randint(0, 50)
        kept = rng.randint(0, m)
        assert finish_reason(kept, m) == ("length" if kept == m else "eot")


def test_fill_unseeded_keeps_given_seeds_and_draws_the_rest():
    gen = torch.Generator().manual_seed(9)
    seed = torch.randint(0, 2**40, (64,), generator=gen)
    seeded = torch.rand(64, generator=gen) < 0.5
    torch.manual_seed(1)
    got = fill_unseeded(seed, seeded)
    assert got.dtype == torch.int64 and got.shape == seed.shape
    assert torch.equal(got[seeded], seed[seeded])
    drawn = got[~seeded]
    assert bool(((drawn >= 0) & (drawn < DRAWN_SEED_LIMIT)).all())
    assert len(set(drawn.tolist())) == drawn.numel()  # 62-bit draws do not collide
    torch.manual_seed(1)
    assert torch.equal(fill_unseeded(seed, seeded), got)  # torch's generator drives it
    assert torch.equal(fill_unseeded(seed, torch.ones(64, dtype=torch.bool)), seed)


def test_prompt_base_and_history_match_plain_lists():
    rng = random.Random(10)
    prompts = [[rng.randint(0, 99) for _ in range(rng.randint(0, 9))] for _ in range(8)]
    rows = [SamplingParams(penalty_scope=rng.choice(["all", "generated"])) for _ in prompts]
    base = prompt_base(prompts, rows)
    assert base == [len(p) if r.penalty_scope == "all" else 0
                    for p, r in zip(prompts, rows, strict=True)]
    hist = prompt_history(prompts, base)
    width = max(base)
    assert hist.shape == (8, width) and hist.dtype == torch.int64
    assert hist.tolist() == [p[:b] + [-1] * (width - b) for p, b in zip(prompts, base,
                                                                         strict=True)]
    assert prompt_history([], []).shape == (0, 0)


def test_listed_alternatives_drop_padding_and_keep_order():
    rng = random.Random(11)
    for _ in range(50):
        n = rng.randint(0, 8)
        live = rng.randint(0, n)
        ids = [rng.randint(0, 99) for _ in range(live)] + [-1] * (n - live)
        values = [rng.uniform(-9, 0) for _ in range(live)] + [-math.inf] * (n - live)
        k = rng.randint(0, n)
        got = listed_alternatives(ids, values, k)
        assert got == [(ids[j], values[j]) for j in range(min(k, live))]


def test_integer_helpers_against_loops():
    rng = random.Random(12)
    for _ in range(300):
        a, b = rng.randint(0, 10**6), rng.randint(1, 5000)
        assert cdiv(a, b) == math.ceil(a / b) == -(-a // b)
        up = round_up(a, b)
        assert up % b == 0 and up >= a and up - b < a
    for n in range(0, 300):
        p = 1
        while p < n:
            p *= 2
        assert next_pow2(n) == p
    assert next_pow2(-5) == 1 and round_up(0, 64) == 0 and round_up(65, 64) == 128
