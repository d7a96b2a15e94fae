"""benchmarks/bench_grammar.py's measuring loop on a few steps: every row keeps drawing
allowed tokens (a finished row starts over) and each part gets a time."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import make_tokenizer

pytest.importorskip("xgrammar")
sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import bench_grammar  # noqa: E402


def test_run_times_fill_and_accept_on_the_tokenizer_and_a_wider_vocabulary():
    tok = make_tokenizer()
    end = tok.token_to_id("[EOT]")
    got = bench_grammar.run(tok, tok.get_vocab_size(), end, batch=2, steps=40)
    assert got["batch"] == 2 and got["fill_us_median"] > 0 and got["accept_us_median"] > 0
    wide = bench_grammar.WideTokenizer(tok, 1000)
    assert len(wide.get_vocab()) == 1000 and wide.to_str() == tok.to_str()
    assert bench_grammar.run(wide, 1000, end, batch=1, steps=5)["vocab"] == 1000
