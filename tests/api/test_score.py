"""score() and score_rolling(): log-likelihoods of given text against an independent float64
log_softmax of transformers' forward (and of our Llama's full forward)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmgen_fast import Score, score  # noqa: E402
from lmgen_fast.api.score import encode_pair, rolling_windows, score_rolling  # noqa: E402
from lmgen_fast.api.tokenization import adapt_tokenizer  # noqa: E402
from lmgen_fast.models.decoder import CachedLlamaDecoder, decoder_for  # noqa: E402


def tiny_llama(vocab: int, positions: int = 64):
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions,
        initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def expected(hf, ctx: list[int], cont: list[int]) -> tuple[list[float], bool]:
    """float64 log_softmax of transformers' logits over the unpadded pair, and greediness."""
    with torch.no_grad():
        logits = hf(torch.tensor([ctx + cont])).logits[0].double()
    rows = logits[len(ctx) - 1:len(ctx) + len(cont) - 1]
    lp = torch.log_softmax(rows, -1)[torch.arange(len(cont)), torch.tensor(cont)]
    return lp.tolist(), bool((rows.argmax(-1) == torch.tensor(cont)).all())


def test_scores_match_transformers_and_share_contexts(tokenizer):
    """Mixed lengths, shared contexts, an empty continuation, a greedy continuation, and a
    batch size that splits a context group: each value within 1e-4 of transformers in
    float64; the cached path prefills each distinct context's positions once per batch."""
    vocab = tokenizer.get_vocab_size()
    hf = tiny_llama(vocab)
    gen = torch.Generator().manual_seed(3)

    def rand(n):
        return torch.randint(4, vocab, (n,), generator=gen).tolist()

    shared = [1, *rand(9)]
    ctxs = [shared, shared, [1, *rand(3)], shared, [5], [1, *rand(20)]]
    conts = [rand(3), rand(1), rand(6), [], rand(2), rand(4)]
    # The greedy continuation of `shared`, four tokens long.
    seq = list(shared)
    with torch.no_grad():
        for _ in range(4):
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
    ctxs.append(shared)
    conts.append(seq[len(shared):])

    decoder = decoder_for(hf)
    assert isinstance(decoder, CachedLlamaDecoder)
    fed = []
    inner = decoder.model.forward_cached
    decoder.model.forward_cached = lambda ids, *a, **k: (fed.append(ids.numel()),
                                                         inner(ids, *a, **k))[1]
    try:
        got = score(hf, None, ctxs, conts, batch_size=8)
    finally:
        del decoder.model.forward_cached
    for s, ctx, cont in zip(got, ctxs, conts, strict=True):
        assert isinstance(s, Score) and s.token_ids == cont
        want, greedy = expected(hf, ctx, cont) if cont else ([], True)
        assert s.logprobs == pytest.approx(want, abs=1e-4)
        assert s.total == pytest.approx(sum(want), abs=1e-4)
        assert s.is_greedy == greedy
    assert got[-1].is_greedy and not got[0].is_greedy
    # The heads (all but the last token) of the distinct contexts longer than one token,
    # padded to the longest: 3 rows of 20; then one row per scored pair (the empty
    # continuation runs nothing).
    assert fed == [3 * 20, 6 * max(len(k) for k in conts)]

    # Batches of 2 split the shared context's pairs, and a plain callable runs each padded
    # pair in full: the same values.
    again = score(hf, None, ctxs, conts, batch_size=2)
    full = score(lambda ids: hf(ids).logits, None, ctxs, conts, batch_size=3)
    for a, b, c in zip(got, again, full, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
        assert a.logprobs == pytest.approx(c.logprobs, abs=1e-5)
        assert a.is_greedy == c.is_greedy


def test_strings_follow_the_harness_rule_and_long_pairs_are_refused(tokenizer, model):
    """Trailing context whitespace moves to the continuation; strings score as their ids;
    an empty context is the begin token; a pair beyond the positions names its lengths;
    the rolling score equals one pair scoring every token after the first."""
    tok = adapt_tokenizer(tokenizer)
    ctx, cont = encode_pair(tok, "The cat sat ", "on the mat")
    assert ctx == tok.encode_prompt("The cat sat")
    assert ctx + cont == tok.encode_prompt("The cat sat on the mat")
    assert encode_pair(tok, "", "hello there") == ([tok.bos_id],
                                                   tok.encode_prompt("hello there")[1:])
    by_text = score(model, tokenizer, ["The cat sat ", ""], ["on the mat", "hello there"])
    by_ids = score(model, tokenizer, [ctx, [tok.bos_id]],
                   [cont, tok.encode_prompt("hello there")[1:]])
    assert [s.total for s in by_text] == pytest.approx([s.total for s in by_ids], abs=1e-6)

    limit = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=rf"pair 1: context of 200 tokens \+ continuation of "
                                         rf"{limit - 198} tokens needs {limit + 1} positions"):
        score(model, None, [[5], [5] * 200], [[6], [6] * (limit - 198)])
    with pytest.raises(ValueError, match="contexts for"):
        score(model, None, [[5]], [])

    text = "the list type holds items in order and the dict maps keys to values"
    ids = tok.encode_prompt(text)
    whole = score(model, None, [ids[:1]], [ids[1:]])[0]
    rolled = score_rolling(model, tokenizer, [text])[0]
    assert rolled.token_ids == ids[1:]
    assert rolled.logprobs == pytest.approx(whole.logprobs, abs=1e-5)
    # Windows of 5 positions: every token once, each window within 5 positions, the
    # first with the begin token alone as context.
    windows = rolling_windows(ids, 5)
    assert [t for _, c in windows for t in c] == ids[1:]
    assert windows[0][0] == ids[:1]
    assert all(len(a) + len(b) - 1 <= 5 for a, b in windows)
    windowed = score_rolling(model, tokenizer, [text], max_length=5)[0]
    parts = score(model, None, [a for a, _ in windows], [b for _, b in windows])
    assert windowed.logprobs == pytest.approx([x for p in parts for x in p.logprobs], abs=1e-5)
