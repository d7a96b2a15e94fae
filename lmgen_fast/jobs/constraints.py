"""A job row's ``json_schema``, ``regex`` or ``grammar`` checked against the model before
generating: it must compile for the model's tokenizer and logits (ids inside the
vocabulary are checked with the other per-model problems, by ``lmgen-fast run``)."""

from __future__ import annotations

from collections.abc import Sequence

from lmgen_fast.api.structured import logits_width
from lmgen_fast.api.tokenization import TokenizerAdapter
from lmgen_fast.engine.grammar import compile_grammar
from lmgen_fast.jobs.inputs import JobRow


def grammar_problem(row: JobRow, decoder, adapter: TokenizerAdapter,
                    end_ids: Sequence[int]) -> str | None:
    """Why ``row``'s grammar does not compile for ``decoder``'s model and ``adapter``'s
    tokenizer with ``end_ids`` as its stop tokens (the source and xgrammar's reason), or
    None (no grammar, or one that compiles: it stays cached for the run)."""
    if row.params.structured is None:
        return None
    try:
        compile_grammar(*row.params.structured, adapter.tokenizer,
                        logits_width(decoder, adapter), end_ids)
    except ValueError as err:
        return str(err)
    return None
