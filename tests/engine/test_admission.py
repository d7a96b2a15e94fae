"""Continuous batching admits prompts longest ``max_tokens`` first (README, "Continuous
batching": "Prompts enter longest `max_tokens` first, so that the job ends on short rows").

Observed through the public API only: the decode steps a call takes (``DecodeStats``) and
the order in which ``on_row`` hands rows out, against a schedule computed from the
documented rule. With EOT impossible (``eos_id=-1``: no sampled token is -1) every row runs
exactly its ``max_tokens``, so the schedule is a pure function of the caps:

* every slot is filled at step 0, in admission order;
* a row admitted at step ``s`` has its ``m`` tokens after the steps ``s .. s + m - 1`` and is
  harvested by the host check at step ``s + m`` (on the CPU there is a check every step, and
  a check is forced where a row reaches its ``max_tokens`` anyway);
* that same check hands the freed slot to the next waiting row, which is thus admitted at
  ``s + m``;
* the call ends at the check that finds every row done, after as many steps as the latest
  finish.

The caps are chosen so that no two rows finish at the same step (the order of rows harvested
together is not part of the contract) and all caps differ (so is the order of equal caps).
The same caps admitted in input order (or shortest first) take more steps and hand the rows
out in another order, so either observable tells the orders apart.
"""

from __future__ import annotations

import pytest

from lmgen_fast import SamplingParams, wrap
from lmgen_fast.engine import DecodeStats, generate_ids

from conftest import random_model

VOCAB = 40
NO_EOT = -1
# Short rows first and the long ones last in input order: input order would end on them.
CAPS = [2, 3, 4, 5, 6, 7, 20, 30]

pytestmark = pytest.mark.usefixtures("one_thread")


def schedule(caps: list[int], slots: int, order: list[int]) -> tuple[int, list[int]]:
    """The documented schedule: rows admitted in ``order``, each into the slot that frees
    first; returns (decode steps of the call, rows in the order they finish).

    Raises AssertionError where two rows finish at the same step (their relative order in
    ``on_row`` would then be unspecified).
    """
    free = [0] * slots  # the step at which each slot takes its next row
    ends = []
    for i in order:
        s = min(range(slots), key=free.__getitem__)
        free[s] += caps[i]
        ends.append((free[s], i))
    assert len({end for end, _ in ends}) == len(ends), f"rows finish together: {sorted(ends)}"
    return max(free), [i for _, i in sorted(ends)]


def longest_first(caps: list[int]) -> list[int]:
    return sorted(range(len(caps)), key=lambda i: -caps[i])


@pytest.fixture(scope="module")
def model():
    return random_model(VOCAB, seed=3, scale=1.0)


def run(model, caps: list[int], slots: int) -> tuple[int, list[int], list]:
    """Decode steps, ``on_row`` order and results of one call through ``slots`` slots."""
    prompts = [[1 + (i * 7 + j) % (VOCAB - 1) for j in range(1 + i % 3)]
               for i in range(len(caps))]
    rows = [SamplingParams(seed=10 + i) for i in range(len(caps))]
    stats, handed = DecodeStats(), []
    got = generate_ids(wrap(model), prompts, rows, caps, NO_EOT, max_batch_size=slots,
                       stats=stats, on_row=lambda i, pair, lp: handed.append(i))
    return stats.steps, handed, got


@pytest.mark.parametrize("slots", [2, 3])
def test_slots_admit_the_longest_max_tokens_first(model, slots):
    steps, handed, got = run(model, CAPS, slots)
    # EOT is impossible: every row ran exactly its max_tokens.
    assert [len(ids) for ids, _ in got] == CAPS
    assert {reason for _, reason in got} == {"length"}
    want_steps, want_order = schedule(CAPS, slots, longest_first(CAPS))
    assert (steps, handed) == (want_steps, want_order)
    # The check discriminates: other admission orders give other observables here.
    n = len(CAPS)
    for other in (list(range(n)), sorted(range(n), key=lambda i: CAPS[i])):
        other_steps, other_order = schedule(CAPS, slots, other)
        assert other_steps > want_steps and other_order != want_order


def test_the_schedule_rule_on_known_cases():
    """The rule itself, worked by hand for two slots and the caps above.

    Longest first, queue 7(30), 6(20), 5(7), 4(6), 3(5), 2(4), 1(3), 0(2): slot A runs 7 over
    steps 0-30; slot B runs 6 over 0-20, 5 over 20-27, 4 over 27-33; A takes 3 at 30 (to 35),
    B 2 at 33 (to 37), A 1 at 35 (to 38), B 0 at 37 (to 39): 39 steps, rows out in the order
    6, 5, 7, 4, 3, 2, 1, 0. Input order: 0 and 1 at step 0, ..., 6 at 12 (to 32) and 7 at 15
    (to 45): 45 steps, rows out in input order.
    """
    assert schedule(CAPS, 2, longest_first(CAPS)) == (39, [6, 5, 7, 4, 3, 2, 1, 0])
    assert schedule(CAPS, 2, list(range(8))) == (45, list(range(8)))
    assert schedule(CAPS, 3, longest_first(CAPS)) == (30, [5, 4, 3, 6, 2, 1, 0, 7])
