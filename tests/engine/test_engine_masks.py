"""The engine under SPEC section 7's bias and masks: allowed tokens, ``min_tokens`` with a
bias towards the end token, and the state's per-step token bitmask, on both samplers (the
Triton one through a captured-and-replayed stand-in graph), with the same tokens."""

from __future__ import annotations

import pytest

from lmgen_fast import SamplingParams
from lmgen_fast.engine import generate_ids
from lmgen_fast.models.decoder import wrap
from lmgen_fast.runtime import graphs

from conftest import StandInGraph, random_model, require_kernel_runtime

VOCAB, EOS = 48, 2


class ReplayGraph(StandInGraph):
    """Capture records the step, replay re-runs it: nothing of the host loop in between."""

    replays = 0

    def capture(self, fn):
        self.fn = fn

    def replay(self):
        ReplayGraph.replays += 1
        self.fn()


def run(model, backend: str):
    decoder = wrap(model)
    decoder.kv_block = 16  # one KV bucket: the Triton run captures one step, then replays it
    decoder.supports_fused = lambda: False  # the sampler is under test, not the fused step
    rows = [SamplingParams(seed=1, allowed_token_ids=list(range(3, 20))),
            SamplingParams(seed=2, logit_bias={EOS: 30.0}, min_tokens=3),
            SamplingParams(seed=3, regex="5+"),  # a grammar row: the state has a bitmask
            SamplingParams(seed=4, top_k=0)]

    def grammar(row: int, token: int) -> None:
        # What a grammar runner does at a host check: the row's next mask, written in place.
        mask = decoder.engine_state.bitmask
        if row == 2:
            mask[2] = 0
            mask[2, 0] = 1 << 5
    out = generate_ids(decoder, [[4, 5], [6], [7, 8, 9], [10]], rows, [5, 5, 5, 5], EOS,
                       backend=backend, sync_every=1, callback=grammar)
    return out


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_engine_applies_bias_masks_min_tokens_and_the_bitmask(backend, monkeypatch, one_thread):
    model = random_model(VOCAB, seed=5, scale=1.5)
    want = run(model, "reference")
    if backend == "triton":
        require_kernel_runtime()
        monkeypatch.setattr(graphs, "graph_backend", lambda device: ReplayGraph)
        ReplayGraph.replays = 0
        assert run(model, "triton") == want
        assert ReplayGraph.replays > 0
    (allowed, why0), (ended, why1), (grammar, _), _ = want
    assert all(3 <= t < 20 for t in allowed) and why0 == "length"
    assert len(ended) == 3 and EOS not in ended and why1 == "eot"
    assert grammar[1:] == [5] * 4
