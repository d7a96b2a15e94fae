"""The plan of a run (engine.plan.plan_run) is a pure function of the rows, the options and
the facts about the machine; the recovery policy's first parts (engine.generate) follow
``max_batch_size`` and the decoder's slots. No model runs here."""

from __future__ import annotations

import random

import pytest
import torch

from lmgen_fast import SamplingParams
from lmgen_fast.core.params import stop_width
from lmgen_fast.engine.generate import Part, first_parts
from lmgen_fast.engine.plan import SYNC_EVERY_CUDA, Facts, RunOptions, plan_run
from lmgen_fast.engine.state import resident

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


class Graph:
    """Stands for a graph class (never instantiated by a plan)."""


def facts(**kw) -> Facts:
    base = dict(kernel=True, graph_cls=Graph, graphable=True, fused=True, capture_failed=False)
    return Facts(**{**base, **kw})


def random_rows(rng: random.Random, n: int) -> list[SamplingParams]:
    return [SamplingParams(
        temperature=rng.choice([0.0, 0.8]), top_k=rng.choice([0, 5, 40]),
        top_p=rng.choice([1.0, 0.9]), repetition_penalty=rng.choice([1.0, 1.3]),
        repetition_penalty_range=rng.choice([0, 3, 200]),
        seed=rng.choice([None, rng.randint(0, 99)]), logprobs=rng.choice([0, 0, 2]))
        for _ in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_sizes_widths_and_hints_follow_the_rows(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 6)
    rows = random_rows(rng, n)
    caps = [rng.randint(1, 150) for _ in range(n)]
    base = [rng.randint(0, 90) for _ in range(n)]
    plan = plan_run(rows, caps, base, RunOptions(2), facts(), CUDA, n + 1)
    lay = plan.layout
    assert (lay.batch, lay.stops, lay.kernel, lay.device) == (n + 1, stop_width(rows, (2,)),
                                                               True, CUDA)
    # Buffers: multiples of 64 steps, just enough for the longest row and history.
    assert lay.cols % 64 == 0 and max(caps) <= lay.cols < max(caps) + 64
    assert lay.hist % 64 == 0 and max(base) + max(caps) <= lay.hist < max(base) + max(caps) + 64
    penalized = [r for r in rows if r.penalized]
    assert plan.penalized == bool(penalized)
    # As wide as the widest row's range (0: the whole history) once any row is penalized.
    want = min(lay.hist, max(r.repetition_penalty_range or lay.hist for r in rows)) \
        if penalized else 0
    assert lay.width == want
    assert lay.max_top_k == max(r.top_k for r in rows)
    assert plan.draw_seeds == any(r.seed is None and r.temperature != 0 for r in rows)
    assert (lay.nucleus > 0) == any(r.top_p < 1 for r in rows)
    assert plan.sync_every == SYNC_EVERY_CUDA and plan.fused is True


def test_graphs_only_where_every_condition_holds():
    rows, caps, base = [SamplingParams(seed=1)], [8], [0]

    def graph(device=CUDA, cuda_graph=True, return_logprobs=False, asked=rows, **kw):
        options = RunOptions(2, cuda_graph=cuda_graph, return_logprobs=return_logprobs)
        return plan_run(asked, caps, base, options, facts(**kw), device, 1).graph_cls

    assert graph() is Graph
    assert graph(cuda_graph=False) is None
    assert graph(graphable=False) is None
    assert graph(capture_failed=True) is None
    assert graph(graph_cls=None) is None
    # Top alternatives wait for the host; plain log-probabilities do not.
    assert graph(return_logprobs=True) is Graph
    assert graph(return_logprobs=True, asked=[SamplingParams(seed=1, logprobs=3)]) is None
    # The reference on the CPU waits for the host; on the GPU it does not.
    assert graph(device=CPU, kernel=False) is None and not resident(False, CPU)
    assert graph(kernel=False) is Graph and resident(False, CUDA)


def test_the_fused_step_and_sync_every():
    rows, caps, base = [SamplingParams(seed=1)], [8], [0]
    plan = plan_run(rows, caps, base, RunOptions(2, sync_every=5), facts(fused=None), CPU, 1)
    assert plan.fused is None and plan.sync_every == 5  # a decoder without a fused step
    plan = plan_run(rows, caps, base, RunOptions(2), facts(kernel=False, fused=False), CPU, 1)
    assert plan.fused is False and plan.sync_every == 1
    assert not plan.layout.kernel and plan.layout.max_top_k == 0  # the CPU reference


class Slotted:
    def refill(self, *args):
        pass


def test_first_parts():
    assert first_parts(object(), 5, None, "auto") == [Part(0, 5, None, "auto")]
    assert first_parts(Slotted(), 5, 5, "auto") == [Part(0, 5, None, "auto")]
    assert first_parts(Slotted(), 5, 2, "triton") == [Part(0, 5, 2, "triton")]
    assert first_parts(object(), 5, 2, "auto") == [Part(0, 2, None, "auto"),
                                                   Part(2, 4, None, "auto"),
                                                   Part(4, 5, None, "auto")]
