"""Stop strings and stop ids (SPEC section 7): a stopped row is the plain run's row cut at
the first match, computed here from the plain run's tokens by a linear scan over their
prefixes (the library bisects); stop ids end rows on the device, the end ids stay "eot"."""

from __future__ import annotations

import random

import pytest

from lmgen_fast import SamplingParams, generate_batch
from lmgen_fast.api.stops import StopStrings, find_stop
from lmgen_fast.api.tokenization import adapt_tokenizer
from lmgen_fast.engine import generate_ids
from lmgen_fast.models.decoder import wrap
from lmgen_fast.speculative.rounds import generate_ids as speculative_ids

PROMPTS = ["Once upon a time", "The cat sat"]


def first_match(decode, ids: list[int], stops: list[str], min_tokens: int = 0):
    """(kept, index, stop) of the first prefix whose text holds a stop string ending past
    the text of the first ``min_tokens - 1`` tokens (an unfinished character at its end
    not counted), by trying every prefix in turn."""
    floor = len(decode(ids[: max(min_tokens, 1) - 1]).rstrip("\ufffd"))
    for k in range(max(min_tokens, 1), len(ids) + 1):
        text = decode(ids[:k])
        hits = [(text.find(s, max(0, floor - len(s) + 1)), s) for s in stops]
        hits = [h for h in hits if h[0] >= 0]
        if hits:
            return (k, *min(hits))
    return None


def test_stop_strings_split_across_byte_tokens():
    """Random texts with multi-byte characters cut into 1-3 byte tokens (so characters and
    stop strings span tokens); several stop strings; min_tokens; both output modes."""
    rng = random.Random(0)
    alphabet = "ab \n\u00e9\u20ac\U0001f600"
    pieces = ["\u00e9", "b\u20ac", "\n\n", "a a", "\U0001f600"]
    for trial in range(60):
        raw = "".join(rng.choice(alphabet) for _ in range(30)).encode()
        cuts = sorted(rng.sample(range(1, len(raw)), len(raw) // 2))
        tokens = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
        vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
        inverse = {i: t for t, i in vocab.items()}
        ids = [vocab[t] for t in tokens]

        def decode(xs, inverse=inverse):
            return b"".join(inverse[x] for x in xs).decode("utf-8", errors="replace")

        stops = rng.sample(pieces, rng.randint(1, 3))
        min_tokens = rng.choice([0, 0, 5])
        include = trial % 2 == 1
        row = SamplingParams(stop=stops, min_tokens=min_tokens,
                             include_stop_str_in_output=include)
        want = first_match(decode, ids, stops, min_tokens)
        got = find_stop(decode, ids, row)
        if want is None:
            assert got is None, (trial, got)
            continue
        kept, at, stop = want
        assert got is not None and got.kept == kept and got.stop == stop, (trial, got, want)
        full = decode(ids)
        assert got.text == full[: at + (len(stop) if include else 0)], trial


def test_stop_strings_cut_the_plain_run(model, tokenizer):
    """A stop string taken from the middle of a seeded row's text: the stopped row's text is
    the plain text cut before it (or after it, included), its tokens the plain tokens up
    to the one completing it, "stop"; through slots too; no token past the stop streams;
    speculative decoding stops alike."""
    kw = dict(max_tokens=24, seed=11, temperature=1.0, return_details=True)
    plain = generate_batch(model, tokenizer, PROMPTS, **kw)
    decode = tokenizer.decode
    stops = []
    for g in plain:
        assert len(g.text) > 12, g  # the model runs long enough to cut in the middle
        stops.append(g.text[6:9])
    for slots, include in ((None, False), (1, True)):
        streamed: dict[int, list[int]] = {0: [], 1: []}
        rows = [SamplingParams(seed=11, stop=[s], include_stop_str_in_output=include)
                for s in stops]
        got = generate_batch(model, tokenizer, PROMPTS, max_tokens=24, params=rows,
                             return_details=True, max_batch_size=slots,
                             callback=lambda r, t, s=streamed: s[r].append(t))
        for r, (g, p, s) in enumerate(zip(got, plain, stops, strict=True)):
            kept, at, _ = first_match(decode, p.token_ids, [s])
            assert g.token_ids == p.token_ids[:kept]
            assert g.text == p.text[: at + (len(s) if include else 0)]
            assert p.text.index(s) == at
            assert (g.finish_reason, g.stop_reason) == ("stop", s)
            assert streamed[r] == g.token_ids
    # Speculative rounds stop rows alike (checked after every round).
    spec = generate_batch(model, tokenizer, PROMPTS, max_tokens=24, params=rows,
                          return_details=True, speculative="ngram")
    assert [(g.token_ids, g.text, g.stop_reason) for g in spec] == \
        [(g.token_ids, g.text, g.stop_reason) for g in got]
    # Below the API: the engine and the rounds end rows on stop_check themselves.
    tok = adapt_tokenizer(tokenizer)
    ids = [tok.encode_prompt(p) for p in PROMPTS]
    pairs = [generate_ids(wrap(model), ids, rows, [24, 24], tok.eos_id,
                          stop_check=StopStrings(tok.decode, rows)),
             speculative_ids(wrap(model), ids, rows, [24, 24], tok.eos_id, speculative="ngram",
                             stop_check=StopStrings(tok.decode, rows))[0]]
    for got_pairs in pairs:
        assert [(p, p.stop_reason) for p in got_pairs] == \
            [((g.token_ids, "stop"), s) for g, s in zip(got, stops, strict=True)]


def test_stop_ids_end_rows_on_the_device(model, tokenizer):
    """A stop id from each row's plain run ends the row just before its first occurrence,
    "stop" with the id; a second end id (a transformers model's eos list) ends it "eot";
    the end id of the call is unchanged ("eot")."""
    plain = generate_batch(model, tokenizer, PROMPTS, max_tokens=16, seed=3,
                           return_details=True)
    stop_ids = [g.token_ids[4] for g in plain]
    rows = [SamplingParams(seed=3, stop_token_ids=[s]) for s in stop_ids]
    got = generate_batch(model, tokenizer, PROMPTS, max_tokens=16, params=rows,
                         return_details=True)
    for g, p, s in zip(got, plain, stop_ids, strict=True):
        assert g.token_ids == p.token_ids[: p.token_ids.index(s)]
        assert (g.finish_reason, g.stop_reason) == ("stop", s)
    tok = adapt_tokenizer(tokenizer)
    ends = (tok.eos_id, stop_ids[0])
    pairs = generate_ids(wrap(model), [tok.encode_prompt(p) for p in PROMPTS],
                         [SamplingParams(seed=3)] * 2, [16, 16], ends)
    for pair, p in zip(pairs, plain, strict=True):
        t = p.token_ids
        if stop_ids[0] in t:
            assert pair == (t[: t.index(stop_ids[0])], "eot")
        else:
            assert pair == (t, p.finish_reason)
        assert pair.stop_reason is None


def test_bad_stop_input_is_refused(model, tokenizer):
    with pytest.raises(ValueError, match="stop strings must not be empty"):
        generate_batch(model, tokenizer, PROMPTS, stop=["x", ""])
    with pytest.raises(ValueError, match="stop_token_ids has token id 99999"):
        generate_batch(model, tokenizer, PROMPTS, stop_token_ids=[99999])
    with pytest.raises(ValueError, match="min_tokens=9 is above max_tokens=4"):
        generate_batch(model, tokenizer, PROMPTS, max_tokens=4, min_tokens=9)


def test_min_tokens_masks_the_end_ids_and_defers_stop_strings(model, tokenizer):
    """top_k=0, top_p=1: min_tokens leaves every token before the plain run's end token as
    it was (masking one token does not move the others' race keys) and the end token
    cannot come before min_tokens; a stop string counts only where a token at or after
    min_tokens completes it (the linear scan's answer on the same run's tokens)."""
    kw = dict(max_tokens=16, seed=9, top_k=0, top_p=1.0, return_details=True)
    free = generate_batch(model, tokenizer, PROMPTS[:1], **kw)[0]
    end = free.token_ids[3]
    first = free.token_ids.index(end)
    plain = generate_batch(model, tokenizer, PROMPTS[:1], eos_token=end, **kw)[0]
    assert (plain.token_ids, plain.finish_reason) == (free.token_ids[:first], "eot")
    late = generate_batch(model, tokenizer, PROMPTS[:1], eos_token=end, min_tokens=first + 4,
                          **kw)[0]
    assert late.token_ids[:first] == plain.token_ids
    assert len(late.token_ids) >= first + 4 and end not in late.token_ids[: first + 4]
    stop = free.text[:3]
    cut = generate_batch(model, tokenizer, PROMPTS[:1], eos_token=end, min_tokens=first + 4,
                         stop=stop, **kw)[0]
    want = first_match(tokenizer.decode, late.token_ids, [stop], first + 4)
    if want is None:
        assert cut.token_ids == late.token_ids and cut.finish_reason != "stop"
    else:
        assert (cut.token_ids, cut.stop_reason) == (late.token_ids[: want[0]], stop)


def test_the_kernels_end_rows_on_stop_ids_as_the_reference_does(model, tokenizer):
    """The Triton path (its bookkeeping reads the per-row stop ids) gives the reference
    path's rows: n samples, a stop id, a stop string, through slots."""
    rows = [SamplingParams(seed=21, n=2, stop_token_ids=[207, 30]),
            SamplingParams(seed=4, n=2, stop=["e", "mo"], min_tokens=2)]
    kw = dict(max_tokens=6, params=rows, return_details=True, max_batch_size=3)
    want = generate_batch(model, tokenizer, PROMPTS, backend="reference", **kw)
    got = generate_batch(model, tokenizer, PROMPTS, backend="triton", **kw)
    assert [(g.token_ids, g.finish_reason, g.stop_reason) for g in got] == \
        [(g.token_ids, g.finish_reason, g.stop_reason) for g in want]
    assert [g.finish_reason for g in want] == ["stop"] * 4  # each row stops early
