"""Speculative rounds through slots (lmgen_fast.speculative.slots): rows entering free slots
between rounds get plain decoding's tokens and the static rounds', whatever the number of
slots, with the verify step's graphs replayed across admissions."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lmgen_fast import SamplingParams
from lmgen_fast.core.errors import GenerationError
from lmgen_fast.engine import generate_ids as plain_ids
from lmgen_fast.models.decoder import wrap
from lmgen_fast.runtime import graphs, kernel_failure, reset_failure
from lmgen_fast.sampling import kernel as kernel_sampler
from lmgen_fast.speculative import generate_ids as speculative_ids
from lmgen_fast.speculative import generate_slots
from lmgen_fast.speculative import rows as speculative_rows

from conftest import ReplayedGraph, random_model, require_kernel_runtime

VOCAB, EOS = 64, 63


def fresh_batch(seed: int, n: int) -> tuple[list[list[int]], list[SamplingParams], list[int]]:
    """``n`` prompts of mixed lengths, mixed rows with penalties, mixed caps (one 0)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (n,), generator=gen).tolist()
    prompts = [torch.randint(0, EOS, (m,), generator=gen).tolist() for m in lengths]
    rows = [SamplingParams(temperature=(0.0, 0.9, 1.3)[i % 3], top_k=(0, 12)[i % 2],
                           top_p=(1.0, 0.85)[i % 2], repetition_penalty=1.2,
                           repetition_penalty_range=(0, 3, 6)[i % 3],
                           presence_penalty=0.2 * (i % 2),
                           penalty_scope=("generated", "all")[i % 2],
                           seed=int(s))
            for i, s in enumerate(torch.randint(0, 2**31, (n,), generator=gen))]
    caps = torch.randint(1, 14, (n,), generator=gen).tolist()
    caps[n // 2] = 0
    return prompts, rows, caps


def perturbed_draft(seed: int) -> torch.nn.Module:
    """The target's architecture and seed, its head perturbed: drafts agree sometimes."""
    draft = random_model(VOCAB, seed=seed, scale=3.0)
    with torch.no_grad():
        w = draft.lm_head.weight
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(seed)) * w.std())
    return draft


@pytest.mark.parametrize("drafter", ["ngram", "draft_model"])
@pytest.mark.parametrize("graph", [None, ReplayedGraph])
def test_slots_give_plain_and_static_tokens(monkeypatch, drafter, graph):
    model = random_model(VOCAB, seed=2, scale=3.0)
    speculative = "ngram" if drafter == "ngram" else perturbed_draft(2)
    prompts, rows, caps = fresh_batch(3 if graph is None else 4, 9)
    plain = plain_ids(wrap(model), prompts, rows, caps, EOS, backend="reference")
    static, _, _ = speculative_ids(wrap(model), prompts, rows, caps, EOS,
                                   speculative=speculative, backend="reference")
    assert static == plain
    if graph is not None:
        # Verify steps as on CUDA: captured per attention length in blocks, replayed while
        # rows come and go.
        monkeypatch.setattr(speculative_rows, "fixed_shapes", lambda device: True)
        monkeypatch.setattr(graphs, "graph_backend", lambda device: graph)
        ReplayedGraph.replays = 0
    for slots in (1, 3, 8):
        target = wrap(model)
        target.kv_block = 32
        handed: list = []
        tokens: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
        got, lps, stats = generate_slots(
            target, prompts, rows, caps, EOS, speculative=speculative, slots=slots,
            num_speculative_tokens=3, backend="reference",
            callback=lambda i, t, tokens=tokens: tokens[i].append(t),
            on_row=lambda i, pair, lp, handed=handed: handed.append((i, pair)))
        assert got == plain, slots
        assert sorted(handed) == sorted(enumerate(plain))  # each row once, as it ended
        assert [tokens[i] for i in range(len(prompts))] == [ids for ids, _ in plain]
        assert len(lps) == len(prompts)
        for (ids, _), s, m in zip(got, stats, caps, strict=True):
            # The slot's prefill and every round; each round keeps one token beyond its
            # accepted drafts.
            assert (s.target_forwards == 0) == (m == 0)
            assert 0 <= s.accepted_drafts <= s.proposed_drafts
            assert len(ids) <= s.target_forwards - 1 + s.accepted_drafts + (m == 0)
    if graph is not None:
        assert ReplayedGraph.replays > 0


def test_constrained_rows_give_plain_tokens_static_and_through_slots():
    """Rows with SPEC section 7's per-row fields (an allowed set, a logit bias, min_tokens,
    stop ids), mixed with plain rows, seated into slots that earlier rows sized: every
    caller's row is packed once, so each seat copies its parameters in place."""
    model = random_model(VOCAB, seed=5, scale=3.0)
    prompts, rows, caps = fresh_batch(6, 8)
    extra = [dict(allowed_token_ids=list(range(5, 40))), dict(logit_bias={3: 2.5, 9: -1.0}),
             dict(min_tokens=3), dict(stop_token_ids=[4, 11, 17]), {}]
    rows = [replace(r, **extra[i % len(extra)]) for i, r in enumerate(rows)]
    plain = plain_ids(wrap(model), prompts, rows, caps, EOS, backend="reference")
    static, _, _ = speculative_ids(wrap(model), prompts, rows, caps, EOS, speculative="ngram",
                                   backend="reference")
    assert static == plain
    for slots in (1, 3):
        got, _, _ = generate_slots(wrap(model), prompts, rows, caps, EOS, speculative="ngram",
                                   slots=slots, backend="reference")
        assert got == plain, slots


def test_a_row_with_nothing_to_sample_raises_with_every_rows_tokens():
    model = random_model(VOCAB, seed=5, scale=4.0)
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    rows = [SamplingParams(temperature=0.0)] * 4
    caps = [3, 10, 10, 4]
    good = [ids for ids, _ in plain_ids(wrap(model), prompts, rows, caps, EOS,
                                        backend="reference")]
    # A token of row 1 that no other row reads: after it, row 1's logits are NaN.
    others = {t for r in (0, 2, 3) for t in prompts[r] + good[r]}
    poison = next(t for t in good[1] if t not in others and t not in prompts[1])
    with torch.no_grad():
        model.base_model.embed_tokens.weight[poison] = float("nan")
    with pytest.raises(GenerationError, match=r"row\(s\) \[1\]") as info:
        generate_slots(wrap(model), prompts, rows, caps, EOS, speculative="ngram", slots=2,
                       backend="reference")
    partial = info.value.partial
    assert partial[1] == good[1][: good[1].index(poison) + 1]  # as plain decoding stops
    for r in (0, 2, 3):  # by the caller's row: finished, running or not started yet
        assert partial[r] == good[r][: len(partial[r])]


def test_slots_with_the_triton_sampler(kernel_device):
    require_kernel_runtime()
    reset_failure()
    model = random_model(VOCAB, seed=6, scale=3.0).to(kernel_device)
    prompts, rows, caps = fresh_batch(6, 5)
    caps = [min(c, 6) for c in caps]
    real, launches = kernel_sampler.launch, []

    def launch(*args, **kwargs):
        launches.append(1)
        return real(*args, **kwargs)

    plain = plain_ids(wrap(model), prompts, rows, caps, EOS, backend="reference")
    kernel_sampler.launch = launch
    try:
        got, _, _ = generate_slots(wrap(model), prompts, rows, caps, EOS,
                                   speculative=model, slots=2, num_speculative_tokens=2,
                                   backend="triton")
    finally:
        kernel_sampler.launch = real
    assert got == plain and launches and kernel_failure() is None
