"""Structured output at the API: each row's grammar compiled for the model and tokenizer
of a call, before anything is generated (see :mod:`lmgen_fast.engine.grammar`)."""

from __future__ import annotations

from collections.abc import Sequence

from lmgen_fast.api.requests import vocab_size
from lmgen_fast.api.tokenization import TokenizerAdapter
from lmgen_fast.core.params import SamplingParams
from lmgen_fast.engine.grammar import compile_rows


def logits_width(decoder, tokenizer: TokenizerAdapter) -> int:
    """The width of the model's logits: its config's ``vocab_size`` where it has one, else
    the tokenizer's vocabulary size (a bare callable model)."""
    width = vocab_size(decoder, None)
    if width is not None:
        return width
    tok = tokenizer.tokenizer
    return int(tok.get_vocab_size() if hasattr(tok, "get_vocab_size") else len(tok))


def row_grammars(decoder, tokenizer: TokenizerAdapter, rows: Sequence[SamplingParams],
                 end_ids: Sequence[int], speculative: bool = False) -> list | None:
    """Every row's compiled grammar for ``decoder``'s model and ``tokenizer``, with
    ``end_ids`` (every id that ends the call's rows) as the grammar's stop tokens, or None
    when no row has one.

    Raises
    ------
    ValueError
        A grammar that does not compile (naming the row, the field and the reason), no
        xgrammar, or grammar rows with speculative decoding (not supported).
    """
    if all(r.structured is None for r in rows):
        return None
    if speculative:
        raise ValueError("json_schema, regex and grammar are not supported with speculative "
                         "decoding; run those rows without speculative=")
    return compile_rows(rows, tokenizer.tokenizer, logits_width(decoder, tokenizer), end_ids)
