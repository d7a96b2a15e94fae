"""generate() and generate_batch() against the article's loop, written here naively."""

from __future__ import annotations

import pytest
import torch

from lmgen_fast import SamplingParams, generate_batch
from lmgen_fast.api.generate import GenerationError, generate

from conftest import make_tokenizer, random_model

PROMPTS = ["The quick brown fox", "A", "Sampling with temperature, top-k and a penalty"]


@torch.no_grad()
def article_loop(model, tokenizer, prompt, max_tokens=100, temperature=1.0,
                 repetition_penalty=1.0, repetition_penalty_range=10, top_k=50,
                 penalty_scope="generated"):
    """The article's generate(): full recompute, host-side steps, multinomial."""
    bot, eot = tokenizer.token_to_id("[BOT]"), tokenizer.token_to_id("[EOT]")
    prompt_ids = [bot] + tokenizer.encode(" " + prompt).ids
    input_ids = torch.tensor([prompt_ids])
    generated = []
    for _ in range(max_tokens):
        logits = model(input_ids)[0, -1, :] / temperature
        history = generated if penalty_scope == "generated" else prompt_ids + generated
        if repetition_penalty != 1.0 and history:
            for tok in history[-repetition_penalty_range:]:
                if logits[tok] > 0:
                    logits[tok] /= repetition_penalty
                else:
                    logits[tok] *= repetition_penalty
        if top_k > 0:
            kth = torch.topk(logits, top_k)[0][-1]
            logits[logits < kth] = float("-inf")
        nxt = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)
        if nxt.item() == eot:
            break
        input_ids = torch.cat([input_ids, nxt.view(1, 1)], dim=1)
        generated.append(nxt.item())
    return tokenizer.decode(generated)


@pytest.mark.parametrize("scope, rng", [("generated", 10), ("all", 10), ("generated", 0)])
def test_top_k_one_with_penalty_equals_article_loop(model, tokenizer, scope, rng):
    for prompt in PROMPTS:
        want = article_loop(model, tokenizer, prompt, 40, top_k=1, repetition_penalty=1.3,
                            repetition_penalty_range=rng, penalty_scope=scope)
        got = generate(model, tokenizer, prompt, 40, top_k=1, repetition_penalty=1.3,
                       repetition_penalty_range=rng, penalty_scope=scope)
        assert got == want and len(got) > 0


def test_same_global_seed_same_tokens_as_article_loop(model, tokenizer):
    kwargs = dict(max_tokens=40, temperature=0.9, repetition_penalty=1.2, top_k=20)
    for s, prompt in enumerate(PROMPTS):
        torch.manual_seed(1000 + s)
        want = article_loop(model, tokenizer, prompt, **kwargs)
        torch.manual_seed(1000 + s)
        got = generate(model, tokenizer, prompt, **kwargs)
        assert got == want


def test_positional_signature_is_the_articles(model, tokenizer):
    torch.manual_seed(0)
    a = generate(model, tokenizer, "The", 12, 0.7, 1.1, 5, 30, None)
    torch.manual_seed(0)
    b = article_loop(model, tokenizer, "The", 12, 0.7, 1.1, 5, 30)
    assert a == b


def test_seeded_generate_is_reproducible_and_ignores_global_rng(model, tokenizer):
    torch.manual_seed(1)
    a = generate(model, tokenizer, "The quick", 30, seed=9)
    torch.manual_seed(2)
    b = generate(model, tokenizer, "The quick", 30, seed=9)
    c = generate(model, tokenizer, "The quick", 30, seed=10)
    assert a == b and a != c


def test_batch_invariance(model, tokenizer):
    seeds = [5, 6, 7]
    kw = dict(max_tokens=25, temperature=1.1, repetition_penalty=1.3, top_k=40)
    alone = [generate(model, tokenizer, p, seed=s, **kw) for p, s in zip(PROMPTS, seeds,
                                                                        strict=True)]
    together = generate_batch(model, tokenizer, PROMPTS, seeds=seeds, **kw)
    reversed_ = generate_batch(model, tokenizer, PROMPTS[::-1], seeds=seeds[::-1], **kw)
    bigger = generate_batch(model, tokenizer, PROMPTS + ["Once upon a time"] * 3,
                            seeds=seeds + [1, 2, 3], **kw)
    assert together == alone
    assert reversed_ == alone[::-1]
    assert bigger[:3] == alone


def test_per_row_params_and_seed_keyword(model, tokenizer):
    rows = [SamplingParams(temperature=0), SamplingParams(top_k=5, seed=3),
            SamplingParams(temperature=2.0, repetition_penalty=1.5, seed=4)]
    got = generate_batch(model, tokenizer, PROMPTS, max_tokens=15, params=rows)
    for prompt, p, text in zip(PROMPTS, rows, got, strict=True):
        assert text == generate(model, tokenizer, prompt, 15, p.temperature,
                                p.repetition_penalty, p.repetition_penalty_range, p.top_k,
                                seed=p.seed)
    same = generate_batch(model, tokenizer, ["The", "The"], max_tokens=15, seed=8)
    assert same[0] == same[1] == generate(model, tokenizer, "The", 15, seed=8)


class CountdownModel:
    """A callable model that emits token 10, 11, ... and [EOT] once a row holds ``stop_at``."""

    def __init__(self, vocab, eot, stop_at):
        self.vocab, self.eot, self.stop_at = vocab, eot, stop_at

    def __call__(self, ids):
        b, t = ids.shape
        logits = torch.full((b, t, self.vocab), -10.0)
        nxt = self.eot if t >= self.stop_at else 10 + t
        logits[:, :, nxt] = 10.0
        return logits


def test_eot_stops_each_row_and_is_not_returned(tokenizer):
    eot = tokenizer.token_to_id("[EOT]")
    fake = CountdownModel(tokenizer.get_vocab_size(), eot, stop_at=8)
    details = generate_batch(fake, tokenizer, ["A", "The"], max_tokens=[20, 3],
                             top_k=1, return_details=True)
    first, second = details
    n_prompt = len(tokenizer.encode(" A").ids) + 1
    assert first.finish_reason == "eot" and len(first.token_ids) == 8 - n_prompt
    assert eot not in first.token_ids
    assert second.finish_reason == "length" and len(second.token_ids) == 3


def test_callback_sees_every_token_once(model, tokenizer):
    seen = []
    text = generate(model, tokenizer, "The", 20, seed=3, callback=seen.append)
    assert tokenizer.decode(seen) == text and len(seen) == 20
    rows = []
    out = generate_batch(model, tokenizer, PROMPTS, max_tokens=10, seeds=[1, 2, 3],
                         callback=lambda r, t: rows.append((r, t)), return_details=True)
    for r, g in enumerate(out):
        assert [t for rr, t in rows if rr == r] == g.token_ids


def test_zero_max_tokens_returns_empty(model, tokenizer):
    assert generate(model, tokenizer, "The", 0) == ""


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_tokens=-1), "max_tokens must be >= 0, got -1"),
        (dict(temperature=-0.5), "temperature must be >= 0, got -0.5"),
        (dict(temperature=float("nan")), "temperature must be finite"),
        (dict(repetition_penalty=0), "repetition_penalty must be > 0, got 0"),
        (dict(repetition_penalty_range=-2), "repetition_penalty_range must be >= 0, got -2"),
        (dict(backend="fast-please"), "backend must be one of"),
        (dict(penalty_mode="sometimes"), "penalty_mode"),
    ],
)
def test_invalid_arguments(model, tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(model, tokenizer, "The", **kwargs)


@pytest.mark.parametrize("missing, keyword", [("[BOT]", "bos_token"), ("[EOT]", "eos_token")])
def test_tokenizer_without_special_token(missing, keyword):
    specials = [s for s in ("[UNK]", "[BOT]", "[EOT]", "[PAD]") if s != missing]
    tok = make_tokenizer(specials)
    model = random_model(tok.get_vocab_size(), seed=0)
    with pytest.raises(ValueError) as info:
        generate(model, tok, "The", 5)
    assert missing in str(info.value) and keyword in str(info.value)
    # the keyword supplies another token and generation proceeds
    generate(model, tok, "The", 5, seed=1, **{keyword: "[PAD]"})


def test_batch_argument_errors(model, tokenizer):
    with pytest.raises(ValueError, match="sequence of strings"):
        generate_batch(model, tokenizer, "one prompt")
    with pytest.raises(ValueError, match="seeds has 1 entries for 2 prompts"):
        generate_batch(model, tokenizer, ["a", "b"], seeds=[1])
    with pytest.raises(ValueError, match="max_tokens has 3 entries for 2 prompts"):
        generate_batch(model, tokenizer, ["a", "b"], max_tokens=[1, 2, 3])


def test_nan_model_output_keeps_what_was_generated(tokenizer):
    eot = tokenizer.token_to_id("[EOT]")
    inner = CountdownModel(tokenizer.get_vocab_size(), eot, stop_at=100)

    def broken(ids):
        logits = inner(ids)
        if ids.shape[1] >= 6:
            logits[:] = float("nan")
        return logits

    with pytest.raises(GenerationError, match="row\\(s\\) \\[0\\]") as info:
        generate(broken, tokenizer, "A", 20, top_k=1)
    assert len(info.value.partial[0]) > 0
