"""Host cost per decode step of grammar rows: filling the token bitmasks and accepting the
drawn tokens (CPU; what a grammar run adds to each step on the host).

    python benchmarks/bench_grammar.py [--batch 1 8] [--steps 200] [--json NAME]

The rows of :class:`lmgen_fast.engine.grammar.GrammarRows` run a JSON schema (an object with
an enum, a boolean, a bounded integer and a string of up to 24 characters) for the embedded
tokenizer (4096 tokens) and for a 128k-token byte-level vocabulary (the embedded one's
tokens, then made-up words up to 128256, a Llama-3-sized mask), with the end token as the
stop token. Each step draws, for every row, a uniformly random token its mask allows
(untimed), then times :meth:`GrammarRows.accept` and :meth:`GrammarRows.fill` as the engine
calls them; a finished row starts over. Medians per step, in microseconds.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from lmgen_fast import load_default  # noqa: E402
from lmgen_fast.core.bitmask import unpack_bitmask  # noqa: E402
from lmgen_fast.engine.grammar import GrammarRows, compile_grammar  # noqa: E402

from _common import device_name, run_info, write_json  # noqa: E402

SCHEMA = json.dumps({
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 999},
        "note": {"type": "string", "maxLength": 24},
    },
    "required": ["color", "ok", "n", "note"],
})
LARGE_VOCAB = 128256


class WideTokenizer:
    """A transformers-like stand-in over a byte-level vocabulary of ``size`` tokens."""

    def __init__(self, base, size: int):
        vocab = dict(base.get_vocab(with_added_tokens=True))
        rng = random.Random(0)
        letters = "abcdefghijklmnopqrstuvwxyz"
        while len(vocab) < size:
            word = ("Ġ" if rng.random() < 0.5 else "") + "".join(
                rng.choice(letters) for _ in range(rng.randint(2, 9)))
            vocab.setdefault(word, len(vocab))
        self.vocab, self.base = vocab, base

    def get_vocab(self, with_added_tokens: bool = True) -> dict[str, int]:
        return self.vocab

    def get_added_tokens_decoder(self) -> dict:
        return self.base.get_added_tokens_decoder()

    def to_str(self) -> str:
        return self.base.to_str()


def run(tokenizer, vocab: int, end: int, batch: int, steps: int) -> dict:
    """Median and mean microseconds per step of accept and fill over ``batch`` rows."""
    grammar = compile_grammar("json_schema", SCHEMA, tokenizer, vocab, [end])
    rows = GrammarRows(batch, vocab, torch.device("cpu"))
    rows.admit(range(batch), [grammar] * batch)
    out = torch.zeros(batch, steps + 1, dtype=torch.int64)
    count = [0] * batch
    rng = random.Random(1)
    accept_t, fill_t = [], []
    rows.fill()
    for _ in range(steps):
        allowed = unpack_bitmask(rows.host, vocab)
        for s in range(batch):
            ids = torch.nonzero(allowed[s]).flatten().tolist()
            choice = rng.choice([i for i in ids if i != end] or ids)
            out[s, count[s]] = choice
            count[s] += 1
        last = out[torch.arange(batch), torch.tensor(count) - 1]
        t0 = time.perf_counter()
        ended = rows.accept(out, last, count)
        t1 = time.perf_counter()
        done = [s for s in range(batch) if rows.matchers[s] is None or s in ended
                or count[s] == steps]
        rows.admit(done, [grammar] * len(done))  # untimed: a finished row starts over
        for s in done:
            count[s] = 0
        t2 = time.perf_counter()
        rows.fill()
        t3 = time.perf_counter()
        accept_t.append(t1 - t0)
        fill_t.append(t3 - t2)
    us = 1e6
    return {"batch": batch, "vocab": vocab,
            "fill_us_median": statistics.median(fill_t) * us,
            "fill_us_mean": statistics.fmean(fill_t) * us,
            "accept_us_median": statistics.median(accept_t) * us,
            "accept_us_mean": statistics.fmean(accept_t) * us}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--json", default=None, metavar="NAME",
                    help="also write the results to benchmarks/results/NAME.json")
    args = ap.parse_args()
    _, tok = load_default()
    end = tok.token_to_id("[EOT]")
    vocabs = [("embedded", tok, tok.get_vocab_size()),
              (f"byte-level {LARGE_VOCAB}", WideTokenizer(tok, LARGE_VOCAB), LARGE_VOCAB)]
    print(f"device: {device_name()}  torch {torch.__version__}  steps={args.steps}")
    print(f"{'vocabulary':<22}{'B':>4}{'fill us/step':>15}{'accept us/step':>16}"
          f"{'fill mean':>11}{'accept mean':>13}")
    results = []
    for name, tokenizer, vocab in vocabs:
        for b in args.batch:
            r = run(tokenizer, vocab, end, b, args.steps)
            results.append({"vocabulary": name, **r})
            print(f"{name:<22}{b:>4}{r['fill_us_median']:>15.1f}"
                  f"{r['accept_us_median']:>16.1f}{r['fill_us_mean']:>11.1f}"
                  f"{r['accept_us_mean']:>13.1f}")
    if args.json:
        write_json(args.json, {**run_info("cpu"), "rows": results})


if __name__ == "__main__":
    main()
