"""Speculative rounds on the fast path: the verify step's sampler call through the Triton
kernels (each flattened position with its own step and penalty window), its fallback to
the reference, and the target's multi-position forward through
``CachedLlamaDecoder.forward_positions``.

Tokens are compared with plain decoding on the same rows (mixed parameters, penalties on,
seeded) and with the reference-sampler rounds.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch

from lmgen_fast import SamplingParams
from lmgen_fast.engine import generate_ids as plain_ids
from lmgen_fast.models.decoder import CachedLlamaDecoder, wrap
from lmgen_fast.runtime import graphs, kernel_failure, reset_failure
from lmgen_fast.sampling import kernel as kernel_sampler
from lmgen_fast.speculative import generate_ids as speculative_ids
from lmgen_fast.speculative import rows as speculative_rows

from conftest import ReplayedGraph, random_model, require_kernel_runtime

VOCAB, EOS = 64, 63


def fresh_rows(seed: int) -> tuple[list[list[int]], list[SamplingParams], list[int]]:
    """Prompts (some repeating themselves, for the n-gram drafter), mixed rows with every
    penalty, and caps."""
    gen = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(0, EOS, (n,), generator=gen).tolist()

    loop = ids(3)
    prompts = [loop * 3, ids(2), ids(5) + loop + loop, ids(1)]
    seeds = torch.randint(0, 2**31, (4,), generator=gen).tolist()
    rows = [
        SamplingParams(temperature=0.0, repetition_penalty=1.3, repetition_penalty_range=4,
                       seed=seeds[0]),
        SamplingParams(temperature=0.9, top_k=10, top_p=0.9, frequency_penalty=0.3,
                       repetition_penalty=1.1, repetition_penalty_range=0, seed=seeds[1]),
        SamplingParams(temperature=1.2, min_p=0.05, presence_penalty=0.4, penalty_scope="all",
                       penalty_mode="once", repetition_penalty=1.2, seed=seeds[2]),
        SamplingParams(temperature=0.7, top_k=5, seed=seeds[3]),
    ]
    return prompts, rows, [7, 4, 8, 5]


@pytest.fixture
def counted_launches(monkeypatch):
    """Counts the Triton sampler's launches (the kernels still run)."""
    real, calls = kernel_sampler.launch, []

    def launch(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real(*args, **kwargs)

    reset_failure()
    monkeypatch.setattr(kernel_sampler, "launch", launch)
    yield calls
    reset_failure()


@pytest.mark.parametrize("drafter", ["ngram", "draft_model"])
def test_triton_rounds_give_plain_decodings_tokens(kernel_device, counted_launches,
                                                   monkeypatch, drafter):
    require_kernel_runtime()
    model = random_model(VOCAB, seed=4, scale=3.0).to(kernel_device)
    speculative = "ngram"
    if drafter == "draft_model":  # agrees often, not always: accepted and rejected drafts
        speculative = random_model(VOCAB, seed=4, scale=3.0)
        with torch.no_grad():
            w = speculative.lm_head.weight
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(1)) * w.std())
        speculative = speculative.to(kernel_device)
    prompts, rows, caps = fresh_rows(7 if drafter == "ngram" else 8)
    plain = plain_ids(wrap(model), prompts, rows, caps, EOS, backend="triton")
    before = len(counted_launches)
    assert before > 0
    target = wrap(model)
    if kernel_device == "cpu":
        # The verify step as CUDA runs it: fixed shapes, captured per attention length in
        # blocks, replayed.
        monkeypatch.setattr(speculative_rows, "fixed_shapes", lambda device: True)
        monkeypatch.setattr(graphs, "graph_backend", lambda device: ReplayedGraph)
        target.kv_block = 32
        ReplayedGraph.replays = 0
    got, _, stats = speculative_ids(target, prompts, rows, caps, EOS,
                                    speculative=speculative, num_speculative_tokens=2,
                                    backend="triton")
    assert got == plain
    # Verify launches sample k + 1 positions of every row at once.
    assert any(n > len(prompts) for n in counted_launches[before:])
    accepted = sum(s.accepted_drafts for s in stats)
    proposed = sum(s.proposed_drafts for s in stats)
    assert proposed > 0
    if drafter == "draft_model":  # penalty windows holding accepted drafts
        assert 0 < accepted < proposed
    if kernel_device == "cpu":
        assert ReplayedGraph.replays > 0
    reference, _, _ = speculative_ids(wrap(model), prompts, rows, caps, EOS,
                                      speculative=speculative, num_speculative_tokens=2,
                                      backend="reference")
    assert reference == plain
    assert kernel_failure() is None


def test_triton_rounds_give_plain_decodings_logprobs(kernel_device, counted_launches):
    require_kernel_runtime()
    model = random_model(VOCAB, seed=5, scale=3.0).to(kernel_device)
    prompts, rows, caps = fresh_rows(9)
    rows = [replace(r, logprobs=2, logprobs_mode=("raw", "processed")[i % 2])
            for i, r in enumerate(rows)]
    plain, plain_lp = plain_ids(wrap(model), prompts, rows, caps, EOS, backend="reference",
                                return_logprobs=True)
    got, got_lp, _ = speculative_ids(wrap(model), prompts, rows, caps, EOS, speculative=model,
                                     num_speculative_tokens=2, backend="triton",
                                     return_logprobs=True)
    assert got == plain and counted_launches
    for p, g in zip(plain_lp, got_lp, strict=True):
        assert g.logprobs == pytest.approx(p.logprobs, abs=1e-4)
        assert [[i for i, _ in alts] for alts in g.top_logprobs] == \
            [[i for i, _ in alts] for alts in p.top_logprobs]


def test_a_kernel_failure_falls_back_to_the_reference_with_one_warning(broken_kernels):
    require_kernel_runtime()
    model = random_model(VOCAB, seed=6, scale=3.0)
    prompts, rows, caps = fresh_rows(10)
    want, _, _ = speculative_ids(wrap(model), prompts, rows, caps, EOS, speculative="ngram",
                                 backend="reference")
    with pytest.warns(RuntimeWarning, match="unsupported op.*reference sampler"):
        got, _, _ = speculative_ids(wrap(model), prompts, rows, caps, EOS,
                                    speculative="ngram", backend="triton")
    assert got == want and len(broken_kernels) == 1
    assert "unsupported op" in kernel_failure()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second attempt
        again, _, _ = speculative_ids(wrap(model), prompts, rows, caps, EOS,
                                      speculative=model, backend="triton")
    assert again == want and len(broken_kernels) == 1


def test_verify_runs_the_targets_forward_positions(monkeypatch):
    # The target's forward over k + 1 positions goes through forward_positions (fused where
    # the decoder has it), with the decoder's positions left alone.
    model = random_model(VOCAB, seed=2, scale=3.0)
    prompts, rows, caps = fresh_rows(11)
    plain = plain_ids(wrap(model), prompts, rows, caps, EOS, backend="reference")
    real, seen = CachedLlamaDecoder.forward_positions, []

    def spy(self, ids, positions, kv_len):
        kept = self.positions.clone()
        logits = real(self, ids, positions, kv_len)
        assert torch.equal(self.positions, kept)
        assert logits.shape == (*ids.shape, VOCAB)
        seen.append((self, ids.shape[1]))
        return logits

    monkeypatch.setattr(CachedLlamaDecoder, "forward_positions", spy)
    target = wrap(model)
    got, _, stats = speculative_ids(target, prompts, rows, caps, EOS, speculative="ngram",
                                    num_speculative_tokens=3, backend="reference")
    assert got == plain
    verify = [t for dec, t in seen if dec is target]
    # One target forward per round; the longest row took part in every round and the
    # prefill, which is not one.
    assert len(verify) == max(s.target_forwards for s in stats) - 1
    assert max(verify) == 4


def test_rows_are_handed_to_on_row_as_they_finish():
    # As the engine does: each row once, after its last token and before rows that run on
    # have finished, with what the call returns (what lets a job write rows as they end).
    model = random_model(VOCAB, seed=2, scale=3.0)
    prompts, rows, caps = fresh_rows(12)
    caps = [2, 9, 0, 5]
    events: list[tuple] = []
    got, lps, _ = speculative_ids(
        wrap(model), prompts, rows, caps, EOS, speculative="ngram", num_speculative_tokens=2,
        backend="reference", return_logprobs=True,
        callback=lambda r, t: events.append(("token", r)),
        on_row=lambda r, pair, lp: events.append(("row", r, pair, lp)))
    assert got == plain_ids(wrap(model), prompts, rows, caps, EOS, backend="reference")
    handed = [e for e in events if e[0] == "row"]
    assert sorted(e[1] for e in handed) == [0, 1, 2, 3]
    for _, r, pair, lp in handed:
        assert pair == got[r] and lp.logprobs == lps[r].logprobs
        at = events.index(handed[[e[1] for e in handed].index(r)])
        assert ("token", r) not in events[at:]
    order = [e[1] for e in handed]
    assert order.index(0) < order.index(1) and order[0] == 2  # the empty row at once
    last_long = max(i for i, e in enumerate(events) if e == ("token", 1))
    assert events.index(handed[order.index(0)]) < last_long
