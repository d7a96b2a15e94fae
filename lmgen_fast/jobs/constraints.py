"""A job's rows checked against the model before generating: token ids inside its
vocabulary (``stop_token_ids``, ``logit_bias``, ``allowed_token_ids``) and a
``json_schema``, ``regex`` or ``grammar`` that compiles for its tokenizer."""

from __future__ import annotations

from collections.abc import Sequence

from lmgen_fast.api.structured import logits_width
from lmgen_fast.api.tokenization import TokenizerAdapter
from lmgen_fast.engine.grammar import compile_grammar
from lmgen_fast.jobs.inputs import JobRow


def constraint_errors(rows: Sequence[JobRow], decoder,
                      adapter: TokenizerAdapter) -> dict[int, str]:
    """The rows (by index) that cannot run on ``decoder``'s model with ``adapter``'s
    tokenizer, each with the reason: an id outside the vocabulary, or a grammar that does
    not compile (the source and xgrammar's reason). Compiled grammars stay cached for the
    run."""
    width = logits_width(decoder, adapter)
    bad = {}
    for i, row in enumerate(rows):
        try:
            row.params.check_vocab(width)
            if row.params.structured is not None:
                compile_grammar(*row.params.structured, adapter.tokenizer, width,
                                [adapter.eos_id])
        except ValueError as err:
            bad[i] = str(err)
    return bad
