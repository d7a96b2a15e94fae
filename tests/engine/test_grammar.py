"""Grammar-constrained rows (json_schema, regex, grammar) on the embedded model."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from lmgen_fast import SamplingParams, load_default
from lmgen_fast.api.generate import generate_batch
from lmgen_fast.core.bitmask import unpack_bitmask
from lmgen_fast.engine.grammar import GrammarRows, compile_grammar, compile_rows

pytest.importorskip("xgrammar")

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["color", "ok", "n"],
}
REGEX = r"[a-z]{2,6}( [a-z]{2,6}){1,2}\."


@pytest.fixture(scope="module")
def default():
    return load_default()


def test_grammar_rows_parse_through_slots_and_plain_rows_keep_their_tokens(default):
    """64 seeded JSON-schema rows all validate and end "stop"; regex rows fully match; the
    plain rows run beside them through continuous batching get the tokens they get alone."""
    model, tok = default
    schema = json.dumps(SCHEMA)
    rows = ([SamplingParams(json_schema=schema, seed=s, temperature=1.2) for s in range(64)]
            + [SamplingParams(regex=REGEX, seed=100 + s) for s in range(6)]
            + [SamplingParams(seed=200 + s, top_k=0) for s in range(6)])
    caps = [40] * 70 + [3, 9, 5, 12, 7, 10]
    prompts = ["The list type"] * 64 + ["A dict"] * 6 + ["Python", "The module", "def"] * 2
    got = generate_batch(model, tok, prompts, max_tokens=caps, params=rows,
                         return_details=True, max_batch_size=24)
    for g in got[:64]:
        jsonschema.validate(json.loads(g.text), SCHEMA)
        assert g.finish_reason == "stop"
    for g in got[64:70]:
        assert re.fullmatch(REGEX, g.text), g.text
        assert g.finish_reason in ("stop", "eot")
    alone = generate_batch(model, tok, prompts[70:], max_tokens=caps[70:], params=rows[70:],
                           return_details=True)
    assert [(g.token_ids, g.finish_reason) for g in got[70:]] == \
        [(g.token_ids, g.finish_reason) for g in alone]
    assert all(g.finish_reason != "stop" for g in alone)


def test_bad_grammars_are_refused_naming_them(default):
    """A schema, regex or EBNF grammar that does not compile is a ValueError naming the
    row, the field and the reason, before anything is generated; compiled grammars are
    cached per (kind, source, tokenizer)."""
    model, tok = default
    bad = {"json_schema": '{"type": "nonsense"}', "regex": "a(b", "grammar": "root ::= rule"}
    for field, source in bad.items():
        rows = [SamplingParams(), SamplingParams(**{field: source})]
        with pytest.raises(ValueError, match=rf"row 1: {field} .*does not compile") as info:
            generate_batch(model, tok, ["a", "b"], max_tokens=4, params=rows)
        assert source[:6] in str(info.value)
    with pytest.raises(ValueError, match="speculative"):
        generate_batch(model, tok, ["a"], max_tokens=4, params=[SamplingParams(regex="a+")],
                       speculative="ngram")
    first = compile_grammar("regex", "[0-9]+", tok, 4096, [2])
    assert compile_grammar("regex", "[0-9]+", tok, 4096, [2]) is first
    assert compile_grammar("regex", "[0-9]+", tok, 4096, [3]) is not first
    assert compile_rows([SamplingParams()] * 3, tok, 4096, [2]) is None


def _allowed(rows: GrammarRows, s: int) -> set[int]:
    return set(torch.nonzero(unpack_bitmask(rows.host[s: s + 1], rows.vocab)[0]).flatten()
               .tolist())


def test_end_token_only_where_the_grammar_may_end(default):
    """The end token's bit is set exactly where the grammar may end; a row whose grammar
    admits nothing but the end is reported ended; a transformers tokenizer over padded
    logits gives the same masks, padding masked."""
    transformers = pytest.importorskip("transformers")
    _, tok = default
    eot = tok.token_to_id("[EOT]")
    a, b, c = (tok.token_to_id(ch) for ch in "abc")
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOT]", eos_token="[EOT]", unk_token="[UNK]",
        pad_token="[PAD]")
    for tokenizer, vocab in ((tok, 4096), (hf, 4096 + 40)):
        grammar = compile_grammar("regex", "ab(c)?", tokenizer, vocab, [eot])
        rows = GrammarRows(2, vocab, torch.device("cpu"))
        rows.admit([0, 1], [grammar, None])
        out = torch.tensor([[a, b, c], [7, 7, 7]])
        seen = []
        for n in range(3):
            ended = rows.accept(out, out[:, max(n - 1, 0)], [n, 3])
            rows.fill()
            seen.append((ended, eot in _allowed(rows, 0), _allowed(rows, 1)))
        assert [e for e, _, _ in seen] == [[], [], []]
        assert [may_end for _, may_end, _ in seen] == [False, False, True]
        assert c in _allowed(rows, 0) and max(_allowed(rows, 0)) < 4096
        assert seen[0][2] == set(range(vocab))  # a row without a grammar: every token
        assert rows.accept(out, out[:, 2], [3, 3]) == [0]


def test_grammar_rows_take_samples_and_stop_strings(default):
    """Through the jobs API: n samples of a schema row each validate and end "stop" with no
    stop reason, sample j being the n=1 result seeded s + j; a regex row's stop string
    still cuts it (the string is the stop reason)."""
    model, tok = default
    got = generate_batch(model, tok, ["The list type"], max_tokens=40, n=3, seed=5,
                         json_schema=SCHEMA, temperature=1.2, return_details=True)
    assert [(g.prompt_index, g.sample_index) for g in got] == [(0, 0), (0, 1), (0, 2)]
    for g in got:
        jsonschema.validate(json.loads(g.text), SCHEMA)
        assert (g.finish_reason, g.stop_reason) == ("stop", None)
    [alone] = generate_batch(model, tok, ["The list type"], max_tokens=40, seed=7,
                             json_schema=SCHEMA, temperature=1.2, return_details=True)
    assert alone.token_ids == got[2].token_ids
    [cut] = generate_batch(model, tok, ["A dict"], max_tokens=40, seed=3, regex=REGEX,
                           stop=[" "], return_details=True)
    assert (cut.finish_reason, cut.stop_reason) == ("stop", " ")
    assert re.fullmatch(r"[a-z]{2,6}", cut.text), cut.text
