"""Grammar-constrained rows (``json_schema``, ``regex``, ``grammar``) through xgrammar.

A row with a grammar samples each step under a token bitmask (``[B, ceil(V/32)]`` int32,
bit ``t % 32`` of word ``t // 32`` set = token ``t`` allowed, xgrammar's layout) that its
matcher fills from the tokens the row kept so far. The pieces:

* :func:`tokenizer_info`: xgrammar's view of a tokenizer (``tokenizers.Tokenizer`` or a
  transformers tokenizer) for a model whose logits are ``vocab_size`` wide, with the run's
  end ids as the stop tokens: the end token is allowed exactly where the grammar may end;
* :func:`compile_rows`: every row's grammar compiled (cached per kind, source and
  tokenizer), a ValueError naming the row, the field and xgrammar's reason otherwise;
* :class:`GrammarRows`: the matchers of a run's state rows, the host bitmask they fill and
  its device copy; the decode loop calls it at each host check (:meth:`GrammarRows.accept`)
  and between the model's forward and the sampler (:meth:`GrammarRows.prepare`).

A row ends with finish reason "stop" (:data:`GRAMMAR_STOP`) when its grammar is complete
and admits nothing but the end: the row is marked done at that host check, without a step
that could only draw the end token. A row that draws the end token where its grammar could
also go on (``[a-z]+``) ends "eot" as any row; one that reaches ``max_tokens`` first ends
"length" with its output incomplete.

JSON schemas compile without free whitespace (``any_whitespace=False``): objects are
written on one line with ``", "`` and ``": "`` separators, so a small model cannot spend
its tokens on blank space.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence

import torch

from lmgen_fast.core.params import SamplingParams
from lmgen_fast.engine.state import DeviceState

# The finish reason of a row whose grammar ended it (SPEC section 7's "stop").
GRAMMAR_STOP = "stop"
# Compiled grammars kept (least recently used dropped first).
CACHE_SIZE = 256
# Bits per bitmask word.
WORD = 32

_INFOS: OrderedDict = OrderedDict()  # (id(tokenizer), vocab, end ids) -> (tokenizer, compiler)
_GRAMMARS: OrderedDict = OrderedDict()  # (kind, source, info key) -> CompiledGrammar


def _xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise ValueError("json_schema, regex and grammar need xgrammar, the structured "
                         "extra: pip install -e \".[structured]\"") from None
    return xgrammar


def bitmask_words(vocab_size: int) -> int:
    """Words of a bitmask row for a ``vocab_size``-wide vocabulary: ``ceil(V / 32)``."""
    return (vocab_size + WORD - 1) // WORD


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


def tokenizer_info(tokenizer, vocab_size: int, end_ids: Sequence[int]):
    """``xgrammar.TokenizerInfo`` of ``tokenizer`` for logits ``vocab_size`` wide, with
    ``end_ids`` as its stop tokens (cached, with its compiler; see :func:`compile_rows`).

    ``tokenizer`` is a ``tokenizers.Tokenizer`` (the embedded model's) or a transformers
    tokenizer; anything else is a ValueError.
    """
    return _compiler(tokenizer, vocab_size, end_ids)[1].tokenizer_info


def _compiler(tokenizer, vocab_size: int, end_ids: Sequence[int]) -> tuple[tuple, object]:
    key = (id(tokenizer), int(vocab_size), tuple(int(i) for i in end_ids))
    if key in _INFOS:
        _INFOS.move_to_end(key)
        return key, _INFOS[key][1]
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
    # The tokenizer is kept with its compiler, so that its id is not reused while cached.
    _INFOS[key] = (tokenizer, xgr.GrammarCompiler(info, max_threads=1))
    while len(_INFOS) > 8:
        _INFOS.popitem(last=False)
    return key, _INFOS[key][1]


def compile_grammar(kind: str, source: str, tokenizer, vocab_size: int,
                    end_ids: Sequence[int]):
    """The ``xgrammar.CompiledGrammar`` of ``source`` (``kind`` one of "json_schema",
    "regex", "grammar" (EBNF)) for ``tokenizer`` (see :func:`tokenizer_info`), cached per
    ``(kind, source, tokenizer, vocab_size, end_ids)``; a ValueError with xgrammar's reason
    where it does not compile."""
    info_key, compiler = _compiler(tokenizer, vocab_size, end_ids)
    key = (kind, source, info_key)
    if key in _GRAMMARS:
        _GRAMMARS.move_to_end(key)
        return _GRAMMARS[key]
    try:
        if kind == "json_schema":
            compiled = compiler.compile_json_schema(source, any_whitespace=False)
        elif kind == "regex":
            compiled = compiler.compile_regex(source)
        elif kind == "grammar":
            compiled = compiler.compile_grammar(source)
        else:
            raise ValueError(f"unknown grammar kind {kind!r}")
    except RuntimeError as exc:
        # xgrammar prefixes its reason with a timestamp and a source position.
        reason = str(exc).strip().splitlines()[0].split(": ", 1)[-1] if str(exc) else "?"
        shown = source if len(source) <= 200 else source[:200] + "..."
        raise ValueError(f"{kind} {shown!r} does not compile: {reason}") from None
    _GRAMMARS[key] = compiled
    while len(_GRAMMARS) > CACHE_SIZE:
        _GRAMMARS.popitem(last=False)
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


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``logits`` ``[B, V]`` with every token whose bit is clear in ``bitmask`` ``[B, W]``
    int32 set to ``-inf``, in place (the reference's masking step, on any device)."""
    shifts = torch.arange(WORD, device=bitmask.device, dtype=torch.int32)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [B, W, 32]
    allowed = bits.reshape(bitmask.shape[0], -1)[:, : logits.shape[1]].bool()
    return logits.masked_fill_(~allowed, float("-inf"))


class GrammarRows:
    """The grammar matchers of a run's ``batch`` state rows (None: a row without one) and
    the bitmask they fill: on the host (pinned for a CUDA run, so its copy does not wait)
    and on ``device``.

    The decode loop calls :meth:`accept` at each host check (after the device's tokens are
    read back: every step, since grammar runs check every step) and :meth:`prepare` between
    a step's model forward and its sampler, so that on CUDA the host fills the masks while
    the forward runs. Rows without a grammar keep an all-ones row.
    """

    def __init__(self, batch: int, vocab_size: int, device: torch.device):
        self.vocab, self.device = vocab_size, torch.device(device)
        self.matchers: list = [None] * batch
        self.accepted = [0] * batch  # tokens of the row its matcher has accepted
        self.ended: list[int] = []  # state rows ended by their grammar at the last check
        self._buffers(batch)

    def _buffers(self, batch: int) -> None:
        pin = self.device.type == "cuda"
        shape = (batch, bitmask_words(self.vocab))
        self.host = torch.full(shape, -1, dtype=torch.int32, pin_memory=pin)
        self.mask = torch.full(shape, -1, dtype=torch.int32, device=self.device)

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

    def park(self, slots: Sequence[int]) -> None:
        """Rows ``slots`` hold no row (free slots)."""
        for s in slots:
            self.matchers[s] = None
            self.host[s].fill_(-1)

    def keep(self, keep: Sequence[int]) -> None:
        """Follow a compaction: state row ``j`` is now the former row ``keep[j]``."""
        self.matchers = [self.matchers[s] for s in keep]
        self.accepted = [self.accepted[s] for s in keep]
        old = self.host
        self._buffers(len(keep))
        self.host.copy_(old[list(keep)])

    def accept(self, out: torch.Tensor, count: list[int], done: list[bool]) -> list[int]:
        """Feed each grammar row's new tokens (``out`` ``[B, C]``, the row's tokens so far
        ``count`` read back) to its matcher; return the state rows whose grammar admits
        nothing but the end now, after marking them finished in :attr:`ended` (the caller
        sets them done on the device). Rows ``done`` otherwise are dropped."""
        rows = [s for s, m in enumerate(self.matchers)
                if m is not None and count[s] > self.accepted[s]]
        ended = []
        if rows:
            first = min(self.accepted[s] for s in rows)
            block = out[rows, first: max(count[s] for s in rows)].tolist()
            for s, got in zip(rows, block, strict=True):
                m = self.matchers[s]
                for t in got[self.accepted[s] - first: count[s] - first]:
                    if not m.accept_token(t):
                        raise RuntimeError(f"grammar row {s}: token {t} was drawn against "
                                           "its mask")
                self.accepted[s] = count[s]
                if m.is_completed() and self._only_end(s):
                    ended.append(s)
        for s, m in enumerate(self.matchers):
            if m is not None and (done[s] or s in ended):
                self.matchers[s] = None
                self.host[s].fill_(-1)
        self.ended = ended
        return ended

    def _only_end(self, s: int) -> bool:
        """Whether row ``s``'s grammar admits its stop tokens alone next."""
        m = self.matchers[s]
        m.fill_next_token_bitmask(self.host, s)
        words = self.host[s].tolist()
        for t in m.stop_token_ids:
            words[t // WORD] &= ~(1 << (t % WORD))
        return not any(words)

    @property
    def active(self) -> bool:
        """Whether some row has a grammar still running."""
        return any(m is not None for m in self.matchers)

    def fill(self) -> None:
        """Fill the host bitmask of every grammar row for its next step."""
        rows = [s for s, m in enumerate(self.matchers) if m is not None]
        for s in rows:
            self.matchers[s].fill_next_token_bitmask(self.host, s)

    def prepare(self, logits: torch.Tensor) -> torch.Tensor:
        """Fill the masks, copy them to the device and mask ``logits`` ``[B, V]`` with them
        (in place; returned). Called after the forward was launched: on CUDA the fill runs
        on the host while the device computes the logits."""
        if not self.active:
            return logits
        self.fill()
        self.mask.copy_(self.host, non_blocking=True)
        return apply_bitmask(logits, self.mask)


def open_rows(grammars: Sequence | None, batch: int, vocab_size: int,
              device: torch.device) -> GrammarRows | None:
    """:class:`GrammarRows` for a run whose rows have ``grammars`` (None: no row has one,
    and the run gets no bitmask at all)."""
    return None if grammars is None else GrammarRows(batch, vocab_size, device)


def check_rows(grammar: GrammarRows, st: DeviceState, count: list[int]) -> list[int]:
    """At a host check of ``st`` (``count``: its tokens per row, read back): advance the
    matchers (:meth:`GrammarRows.accept`) and mark done, on the device, the state rows
    their grammar ended; returns those rows."""
    ended = grammar.accept(st.out, count, st.done.tolist())
    if ended:
        st.done.index_fill_(0, torch.tensor(ended, device=st.done.device), True)
    return ended
