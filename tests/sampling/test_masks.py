"""SPEC section 7's steps before the temperature in the reference sampler: logit bias,
allowed tokens, a per-step token bitmask and the ``min_tokens`` mask, and their packed form.

The reference is checked against the same logits biased and masked by hand in eager torch
and sampled with none of these fields: the same filtered values, tokens and log-probabilities.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmgen_fast import SamplingParams
from lmgen_fast.core.bitmask import bitmask_words, pack_bitmask, unpack_bitmask
from lmgen_fast.core.errors import EmptyRowError
from lmgen_fast.core.params import PackedParams
from lmgen_fast.sampling import reference

from conftest import assert_frequencies_match

CONSTRAINTS = dict(logit_bias=(), allowed_token_ids=None, min_tokens=0, stop_token_ids=())


def constrained_rows(gen: torch.Generator, batch: int, vocab: int) -> list[SamplingParams]:
    """Seeded rows with random biases, allowed sets, stop ids and min_tokens, over greedy,
    top-k, top-p, min-p and penalties."""
    rows = []
    for r in range(batch):
        pick = torch.randint(0, 1000, (6,), generator=gen).tolist()
        ids = torch.randperm(vocab, generator=gen)
        bias = {int(t): float(b) for t, b in zip(ids[:pick[0] % 9],
                                                 torch.randn(9, generator=gen) * 4, strict=False)}
        allowed = ids[: 20 + pick[1] % 60].tolist() if pick[1] % 3 else None
        rows.append(SamplingParams(
            temperature=[0.0, 0.7, 1.0, 1.6][pick[2] % 4], top_k=[0, 5, 40][pick[3] % 3],
            top_p=[1.0, 0.9, 0.6][pick[4] % 3], min_p=[0.0, 0.05][pick[5] % 2],
            repetition_penalty=1.3, frequency_penalty=0.4, seed=100 + r, logit_bias=bias,
            allowed_token_ids=allowed, stop_token_ids=ids[-3:].tolist(),
            min_tokens=pick[5] % 4, logprobs=5,
            logprobs_mode="processed" if r % 2 else "raw"))
    return rows


def by_hand(logits, rows, steps, bitmask):
    """The logits with SPEC section 7's steps 1 and 2 applied in eager float32 torch, and
    the rows without those fields: sampling these must equal sampling the originals."""
    x = logits.clone()
    vocab = x.shape[1]
    for r, p in enumerate(rows):
        for t, b in p.logit_bias:
            x[r, t] = x[r, t] + torch.tensor(b, dtype=torch.float32)
        keep = torch.tensor([bool((int(bitmask[r, t // 32]) >> (t % 32)) & 1)
                             for t in range(vocab)])
        if p.allowed_token_ids is not None:
            keep &= torch.isin(torch.arange(vocab), torch.tensor(p.allowed_token_ids))
        if steps[r] < p.min_tokens:
            keep[list(p.stop_token_ids)] = False
        x[r, ~keep] = -math.inf
    plain = [SamplingParams(**{**vars(p), **CONSTRAINTS}) for p in rows]
    return x, plain


def random_bitmask(gen, batch, vocab):
    words = torch.randint(-2**31, 2**31, (batch, bitmask_words(vocab)), generator=gen,
                          dtype=torch.int64)
    return words.to(torch.int32)


def test_reference_biases_and_masks_before_every_other_step():
    gen = torch.Generator().manual_seed(7)
    batch, vocab = 8, 200
    logits = torch.randn(batch, vocab, generator=gen) * 3
    rows = constrained_rows(gen, batch, vocab)
    steps = torch.randint(0, 5, (batch,), generator=gen)
    bitmask = random_bitmask(gen, batch, vocab)
    window = torch.randint(-1, vocab, (batch, 6), generator=gen)
    x, plain = by_hand(logits, rows, steps, bitmask)
    got = reference.filtered_logits(logits, rows, window, step=steps, token_bitmask=bitmask)
    assert torch.equal(got, reference.filtered_logits(x, plain, window))
    want, want_lp = reference.sample(x, plain, window, step=steps, return_logprobs=True)
    for on_device in (False, True):
        tokens, lp = reference.sample(logits, rows, window, step=steps, token_bitmask=bitmask,
                                      return_logprobs=True, on_device=on_device)
        assert torch.equal(tokens, want)
        raw = torch.tensor([p.logprobs_mode == "raw" for p in rows])
        # Raw log-probabilities are the model's, before any bias or mask.
        raw_lp = torch.log_softmax(logits, dim=1).gather(1, tokens.view(-1, 1)).squeeze(1)
        assert torch.allclose(lp.token_logprob[raw], raw_lp[raw], atol=1e-6)
        # Processed ones are those of the biased, masked (then filtered) values.
        proc = ~raw
        assert torch.equal(lp.token_logprob[proc], want_lp.token_logprob[proc])
        assert torch.equal(lp.top_ids[proc], want_lp.top_ids[proc])
        table = torch.log_softmax(got[proc], dim=1)
        sampled = ~torch.tensor([p.greedy for p in rows])[proc]
        assert torch.allclose(lp.token_logprob[proc][sampled], table.gather(
            1, tokens[proc].view(-1, 1)).squeeze(1)[sampled], atol=1e-6)
        assert (x.gather(1, tokens.view(-1, 1)) > -math.inf).all()


def test_min_tokens_masks_the_end_ids_until_the_step_reaches_it():
    logits = torch.zeros(2, 10)
    logits[:, 3] = 50.0  # the end id, all but certain when allowed
    packed = PackedParams.from_rows([SamplingParams(temperature=0, min_tokens=2,
                                                    stop_token_ids=[4])] * 2, "cpu",
                                    end_ids=(3,))
    logits[:, 4] = 40.0
    for on_device in (False, True):
        got = [reference.sample(logits, packed, step=s, on_device=on_device).tolist()
               for s in (0, 1, 2)]
        assert got[0] == got[1] != [3, 3] and 4 not in got[0] and got[2] == [3, 3]
        mixed = reference.sample(logits, packed, step=torch.tensor([1, 2]), on_device=on_device)
        assert mixed[1] == 3 and mixed[0] not in (3, 4)


@pytest.mark.parametrize("on_device", [False, True])
def test_a_fully_masked_row_raises_naming_it(on_device):
    logits = torch.randn(3, 40)
    rows = [SamplingParams(seed=1), SamplingParams(seed=2, allowed_token_ids=[5, 6]),
            SamplingParams(seed=3)]
    bitmask = torch.full((3, 2), -1, dtype=torch.int32)
    bitmask[1, 0] = ~((1 << 5) | (1 << 6))  # forbids exactly the allowed two
    with pytest.raises(EmptyRowError, match=r"row\(s\) \[1\]"):
        reference.sample(logits, rows, token_bitmask=bitmask, on_device=on_device)
    min_rows = [SamplingParams(seed=1, allowed_token_ids=[7], stop_token_ids=[7], min_tokens=1)]
    with pytest.raises(EmptyRowError, match=r"row\(s\) \[0\]"):
        reference.sample(logits[:1], min_rows, step=0, on_device=on_device)
    assert reference.sample(logits[:1], min_rows, step=1, on_device=on_device).item() == 7


def test_packed_constraints_and_their_checks():
    rows = [SamplingParams(logit_bias={9: 1.5, 2: -3.0}), SamplingParams(),
            SamplingParams(allowed_token_ids=[0, 31, 32, 69])]
    p = PackedParams.from_rows(rows, "cpu", vocab_size=70)
    assert p.bias_ids.tolist() == [[2, 9], [-1, -1], [-1, -1]]
    assert p.bias_vals.tolist() == [[-3.0, 1.5], [0.0, 0.0], [0.0, 0.0]]
    assert p.constraints.tolist() == [1, 0, 2]
    allowed = unpack_bitmask(p.allowed, 70)
    assert allowed[:2].all() and allowed[2].nonzero().flatten().tolist() == [0, 31, 32, 69]
    assert torch.equal(pack_bitmask([[0, 31, 32, 69]], 70, "cpu"), p.allowed[2:])
    plain = PackedParams.from_rows([SamplingParams()] * 3, "cpu", vocab_size=70)
    assert plain.bias_ids is None and plain.allowed is None and plain.constraints is None
    assert plain.shapes() != p.shapes() and p.take(torch.tensor([2, 0])).shapes() == p.shapes()
    with pytest.raises(ValueError, match="logit_bias has token id 9"):
        PackedParams.from_rows(rows, "cpu", vocab_size=9)
    with pytest.raises(ValueError, match="vocab_size"):
        PackedParams.from_rows(rows, "cpu")
    with pytest.raises(ValueError, match="allowed_token_ids has token id 69"):
        reference.sample(torch.randn(3, 60), rows)
    with pytest.raises(ValueError, match=r"token_bitmask must be an int32 \[B=3, ceil"):
        reference.sample(torch.randn(3, 70), SamplingParams(),
                         token_bitmask=torch.zeros(3, 2, dtype=torch.int32))


def test_chi_square_biased_masked_rows_draw_the_exact_distribution():
    gen = torch.Generator().manual_seed(3)
    vocab, n = 64, 3000
    row = torch.randn(1, vocab, generator=gen) * 2
    bias = {2: 2.0, 7: -1.0, 10: 1.5, 20: 3.0, 40: 1.0}
    allowed = sorted(set(range(0, vocab, 2)) | {7})
    base = SamplingParams(temperature=0.8, top_k=0, logit_bias=bias, allowed_token_ids=allowed,
                          stop_token_ids=[20], min_tokens=1)
    rows = [SamplingParams(**{**vars(base), "seed": i}) for i in range(n)]
    bitmask = torch.full((1, 2), -1, dtype=torch.int32)
    bitmask[0, 1] = ~(1 << 8)  # forbids token 40
    # The contract in float64: bias, masks, then the temperature.
    z = row[0].double().clone()
    for t, b in bias.items():
        z[t] += b
    z[[t for t in range(vocab) if t not in allowed] + [20, 40]] = -math.inf
    probs = torch.softmax(z / 0.8, dim=0)
    tokens = reference.sample(row.expand(n, vocab), rows, step=0,
                              token_bitmask=bitmask.expand(n, 2).contiguous())
    assert_frequencies_match(tokens, probs)
    # Power: the same draws are rejected against the distribution without the bias.
    z_plain = row[0].double().clone()
    z_plain[torch.isinf(z)] = -math.inf
    plain = torch.softmax(z_plain / 0.8, dim=0)
    with pytest.raises(AssertionError):
        assert_frequencies_match(tokens, plain)
