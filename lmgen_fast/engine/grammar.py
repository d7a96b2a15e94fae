"""Grammar-constrained rows (``json_schema``, ``regex``, ``grammar``) through xgrammar.

A row with a grammar samples each step under a token bitmask (``[B, ceil(V/32)]`` int32,
bit ``t % 32`` of word ``t // 32`` set = token ``t`` allowed, xgrammar's layout) that its
matcher fills from the tokens the row kept so far. The pieces:

* :func:`compile_rows`: every row's grammar compiled (cached per kind, source and
  tokenizer), a ValueError naming the row, the field and xgrammar's reason otherwise; the
  compiler holds xgrammar's view of the tokenizer (``tokenizers.Tokenizer`` or a
  transformers tokenizer) for a model whose logits are ``vocab_size`` wide, with the run's
  end ids as the stop tokens: the end token is allowed exactly where the grammar may end;
* :class:`GrammarRows`: the matchers of a run's state rows and the host bitmask they fill;
  the decode loop calls :func:`check_rows` at each host check and
  :meth:`GrammarRows.prepare` between the model's forward and the sampler, which copies
  the masks to the state's ``bitmask`` (read by the sampler, SPEC section 7's step 2).

A row ends with finish reason "stop" (stop reason None) when its grammar is complete
and admits nothing but the end: the row is marked done at that host check, without a step
that could only draw the end token. A row that draws the end token where its grammar could
also go on (``[a-z]+``) ends "eot" as any row; one that reaches ``max_tokens`` first ends
"length" with its output incomplete.

Host work per step (a grammar run checks every step and runs eagerly): at the check,
each grammar row's matcher accepts the token the row kept (its last token, one small read)
and completed rows are ended; then the next step's forward is launched and, while the
device computes it, the host fills the masks and copies them (from pinned memory on CUDA)
to the state's bitmask before the sampler's launch. ``benchmarks/bench_grammar.py``
measures both parts.

JSON schemas compile without free whitespace (``any_whitespace=False``): objects are
written on one line with ``", "`` and ``": "`` separators, so a small model cannot spend
its tokens on blank space.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

import torch

from lmgen_fast.core.bitmask import BITS, bitmask_words
from lmgen_fast.core.params import STRUCTURED_FIELDS, SamplingParams
from lmgen_fast.engine.state import DeviceState

# Compiled grammars kept per tokenizer, and tokenizers kept (least recently used dropped
# first; a tokenizer's grammars go with it).
CACHE_SIZE = 256
TOKENIZERS_KEPT = 8


class _Compiler(NamedTuple):
    """A tokenizer (held, so that its id is not reused while cached), its xgrammar
    compiler and the grammars compiled with it ((kind, source) -> CompiledGrammar)."""

    tokenizer: object
    compiler: object
    grammars: OrderedDict


_COMPILERS: OrderedDict = OrderedDict()  # (id(tokenizer), vocab, end ids) -> _Compiler


def _xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise ValueError("json_schema, regex and grammar need xgrammar, the structured "
                         "extra: pip install -e \".[structured]\"") from None
    return xgrammar


def _raw_vocab(tokenizer) -> tuple[list[str], object, bool]:
    """A ``tokenizers.Tokenizer``'s vocabulary by id (added tokens as ``""``, so no grammar
    ever allows them) and xgrammar's vocab type and prefix-space flag for it, read from its
    decoder the way xgrammar reads a transformers tokenizer's."""
    xgr = _xgrammar()
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    encoded = [""] * (max(vocab.values(), default=-1) + 1)
    for text, i in vocab.items():
        encoded[i] = "" if text in added else text
    spec = json.loads(tokenizer.to_str())
    decoders = spec.get("decoder") or {}
    kinds = {d.get("type") for d in decoders.get("decoders", [decoders])}
    if "ByteLevel" in kinds:
        return encoded, xgr.VocabType.BYTE_LEVEL, False
    if "ByteFallback" in kinds:
        # SentencePiece style: "▁" stands for a space, "<0x0A>" for a byte; the leading
        # space the normaliser or pre-tokenizer adds is stripped on decode.
        return encoded, xgr.VocabType.BYTE_FALLBACK, "Strip" in kinds
    return encoded, xgr.VocabType.RAW, False


def _compiler(tokenizer, vocab_size: int, end_ids: Sequence[int]) -> _Compiler:
    key = (id(tokenizer), int(vocab_size), tuple(int(i) for i in end_ids))
    if key in _COMPILERS:
        _COMPILERS.move_to_end(key)
        return _COMPILERS[key]
    xgr = _xgrammar()
    stops = list(key[2])
    if hasattr(tokenizer, "convert_tokens_to_ids"):  # a transformers tokenizer
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=stops)
    elif hasattr(tokenizer, "get_vocab") and hasattr(tokenizer, "to_str"):
        encoded, kind, prefix = _raw_vocab(tokenizer)
        info = xgr.TokenizerInfo(encoded[:vocab_size], kind, vocab_size=vocab_size,
                                 stop_token_ids=stops, add_prefix_space=prefix)
    else:
        raise ValueError("structured output needs a tokenizers.Tokenizer or a transformers "
                         f"tokenizer, got {type(tokenizer).__name__}")
    _COMPILERS[key] = _Compiler(tokenizer, xgr.GrammarCompiler(info, max_threads=1),
                                OrderedDict())
    while len(_COMPILERS) > TOKENIZERS_KEPT:
        _COMPILERS.popitem(last=False)
    return _COMPILERS[key]


def compile_grammar(kind: str, source: str, tokenizer, vocab_size: int,
                    end_ids: Sequence[int]):
    """The ``xgrammar.CompiledGrammar`` of ``source`` (``kind`` one of "json_schema",
    "regex", "grammar" (EBNF)) for ``tokenizer``, cached per
    ``(kind, source, tokenizer, vocab_size, end_ids)``; a ValueError with xgrammar's reason
    where it does not compile."""
    if kind not in STRUCTURED_FIELDS:
        raise ValueError(f"unknown grammar kind {kind!r}; one of {STRUCTURED_FIELDS}")
    entry = _compiler(tokenizer, vocab_size, end_ids)
    cache, compiler = entry.grammars, entry.compiler
    if (kind, source) in cache:
        cache.move_to_end((kind, source))
        return cache[kind, source]
    try:
        if kind == "json_schema":
            compiled = compiler.compile_json_schema(source, any_whitespace=False)
        elif kind == "regex":
            compiled = compiler.compile_regex(source)
        else:
            compiled = compiler.compile_grammar(source)
    except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar's are RuntimeErrors
        # xgrammar prefixes its reason with a timestamp and a source position.
        reason = str(exc).strip().splitlines()[0].split(": ", 1)[-1] if str(exc) else "?"
        shown = source if len(source) <= 200 else source[:200] + "..."
        raise ValueError(f"{kind} {shown!r} does not compile: {reason}") from None
    cache[kind, source] = compiled
    while len(cache) > CACHE_SIZE:
        cache.popitem(last=False)
    return compiled


def compile_rows(rows: Sequence[SamplingParams], tokenizer, vocab_size: int,
                 end_ids: Sequence[int]) -> list | None:
    """Each row's compiled grammar (None for a row without one), or None when no row has a
    grammar (the run then pays nothing for them).

    Raises
    ------
    ValueError
        Naming the row, its field, the source and xgrammar's reason, for a grammar that does
        not compile (or where xgrammar is not installed).
    """
    if all(r.structured is None for r in rows):
        return None
    out = []
    for i, row in enumerate(rows):
        if row.structured is None:
            out.append(None)
            continue
        try:
            out.append(compile_grammar(*row.structured, tokenizer, vocab_size, end_ids))
        except ValueError as exc:
            raise ValueError(f"row {i}: {exc}") from None
    return out


def only_end(matcher, words: list[int]) -> bool:
    """Whether ``words`` (a bitmask row as ints, filled by ``matcher``) allows the matcher's
    stop tokens alone."""
    for t in matcher.stop_token_ids:
        words[t // BITS] &= ~(1 << (t % BITS))
    return not any(words)


class GrammarRows:
    """The grammar matchers of a run's ``batch`` state rows (None: a row without one, or
    whose grammar is over) and the host bitmask they fill (pinned for a CUDA run, so that
    its copy to the device does not wait).

    The decode loop calls :func:`check_rows` at each host check (every step: a grammar run
    checks every step) and :meth:`prepare` between a step's forward and its sampler, so
    that on CUDA the host fills the masks while the device computes the logits. A row
    without a grammar keeps every bit set.
    """

    def __init__(self, batch: int, vocab_size: int, device: torch.device):
        self.vocab, self.pin = vocab_size, torch.device(device).type == "cuda"
        self.matchers: list = [None] * batch
        self.accepted = [0] * batch  # tokens of the row its matcher has accepted
        # Rows whose host mask accept() already filled for their next step (fill skips them).
        self.fresh: set[int] = set()
        self.host = torch.full((batch, bitmask_words(vocab_size)), -1, dtype=torch.int32,
                               pin_memory=self.pin)

    def admit(self, slots: Sequence[int], grammars: Sequence) -> None:
        """Rows ``slots`` start over with ``grammars`` (compiled; None: no grammar)."""
        xgr = _xgrammar()
        for s, g in zip(slots, grammars, strict=True):
            if g is not None and g.tokenizer_info.vocab_size != self.vocab:
                raise ValueError(f"a grammar compiled for {g.tokenizer_info.vocab_size} "
                                 f"tokens, for logits {self.vocab} wide")
            self.matchers[s] = None if g is None else xgr.GrammarMatcher(g)
            self.accepted[s] = 0
            self.host[s].fill_(-1)
            self.fresh.discard(s)

    def park(self, slots: Sequence[int]) -> None:
        """Rows ``slots`` hold no row (free slots, or finished grammars)."""
        for s in slots:
            self.matchers[s] = None
            self.host[s].fill_(-1)
            self.fresh.discard(s)

    def keep(self, keep: Sequence[int]) -> None:
        """Follow a compaction: state row ``j`` is now the former row ``keep[j]``."""
        self.matchers = [self.matchers[s] for s in keep]
        self.accepted = [self.accepted[s] for s in keep]
        self.fresh = {j for j, s in enumerate(keep) if s in self.fresh}
        host = self.host[list(keep)]
        self.host = host.pin_memory() if self.pin else host

    def accept(self, out: torch.Tensor, last: torch.Tensor, count: list[int]) -> list[int]:
        """Feed each grammar row's new tokens (``out`` ``[B, C]`` int64, ``count`` the
        tokens of each row, ``last`` ``[B]`` the token each row drew last) to its matcher;
        returns the rows whose grammar is complete and admits nothing but the end now."""
        rows = [s for s, m in enumerate(self.matchers)
                if m is not None and count[s] > self.accepted[s]]
        if not rows:
            return []
        # One token per row since the last check (every step checks): one small read.
        one = [last.tolist()] if all(count[s] == self.accepted[s] + 1 for s in rows) else None
        ended = []
        for s in rows:
            m = self.matchers[s]
            got = [one[0][s]] if one else out[s, self.accepted[s]: count[s]].tolist()
            for t in got:
                if not m.accept_token(t):
                    raise RuntimeError(f"state row {s} drew token {t}, which its grammar's "
                                       "mask forbade")
            self.accepted[s] = count[s]
            if m.is_completed():
                m.fill_next_token_bitmask(self.host, s)
                self.fresh.add(s)
                if only_end(m, self.host[s].tolist()):
                    ended.append(s)
        return ended

    def fill(self) -> None:
        """Fill the host mask of every grammar row for its next step."""
        for s, m in enumerate(self.matchers):
            if m is not None and s not in self.fresh:
                m.fill_next_token_bitmask(self.host, s)
        self.fresh.clear()

    def prepare(self, st: DeviceState, logits: torch.Tensor) -> torch.Tensor:
        """Fill every grammar row's mask for its next step into ``st.bitmask``, which the
        sampler reads (the plan gives a state one where a row has a grammar); returns
        ``logits`` untouched."""
        self.fill()
        st.bitmask.copy_(self.host, non_blocking=True)
        return logits


def open_rows(grammars: Sequence | None, batch: int, vocab_size: int,
              device: torch.device, admit: bool = False) -> GrammarRows | None:
    """:class:`GrammarRows` for a run whose rows have ``grammars`` (None where no row has
    one: the run gets no bitmask at all), with row ``r`` admitted with ``grammars[r]``
    where ``admit`` (a static batch)."""
    if grammars is None:
        return None
    rows = GrammarRows(batch, vocab_size, device)
    if admit:
        rows.admit(range(batch), grammars)
    return rows


def check_rows(grammar: GrammarRows | None, st: DeviceState, count: list[int],
               stopped: dict[int, str | None],
               occupant: Sequence[int | None]) -> None:
    """At a host check of ``st`` (``count``: its tokens per row, read back): advance the
    matchers, drop those of finished rows, and end the rows whose grammar admits nothing
    but the end: done on the device, and in ``stopped`` by the caller's row
    (``occupant[s]`` for state row ``s``) with stop reason None (finish reason "stop").
    Nothing where ``grammar`` is None."""
    if grammar is None:
        return
    ended = grammar.accept(st.out, st.tokens, count)
    done = st.done.tolist()
    grammar.park([s for s, m in enumerate(grammar.matchers)
                  if m is not None and (done[s] or s in ended)])
    if ended:
        st.done.index_fill_(0, torch.tensor(ended, device=st.done.device), True)
        for s in ended:
            # A stop string completed by the same token keeps its reason.
            stopped.setdefault(occupant[s], None)
