"""Stop strings (SPEC section 7): where a row's decoded text first contains one.

A row stops at the first token ``k`` whose text ``decode(ids[:k])`` contains a stop string
that ends past the text of its first ``min_tokens - 1`` tokens (stop strings are not
checked before ``min_tokens``). The text is decoded from the start each time, so a match
spanning several tokens, or a character whose bytes span several byte-level tokens, is
found where its last piece arrives. The returned text ends just before the match (or just
after it with ``include_stop_str_in_output``); the token ids end with token ``k``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from lmgen_fast.core.params import SamplingParams


class StopMatch(NamedTuple):
    """Where a row stops: it keeps ``kept`` tokens, its text is ``text`` (cut at the match
    as the row asked) and ``stop`` is the string that matched."""

    kept: int
    text: str
    stop: str


def _stable(a: str, b: str) -> int:
    """Length of the common prefix of ``a`` and ``b``."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _earliest(text: str, stops: Sequence[str], floor: int) -> tuple[int, str] | None:
    """The earliest match in ``text`` of any of ``stops`` that ends past ``floor``:
    ``(index, string)``, or None."""
    best: tuple[int, str] | None = None
    for s in stops:
        at = text.find(s, max(0, floor - len(s) + 1))
        if at >= 0 and (best is None or at < best[0]):
            best = (at, s)
    return best


def find_stop(decode: Callable[[list[int]], str], ids: Sequence[int], row: SamplingParams,
              floor: int | None = None) -> StopMatch | None:
    """Where the row with parameters ``row`` and tokens ``ids`` stops on a stop string.

    Parameters
    ----------
    decode : callable
        ``decode(ids) -> str``, the tokenizer's decoding of generated ids.
    ids : sequence of int
        The row's generated ids so far (or all of them).
    row : SamplingParams
        Its ``stop``, ``include_stop_str_in_output`` and ``min_tokens``.
    floor : int, optional
        Text length before which no match counts (computed from ``min_tokens`` when None).

    Returns
    -------
    StopMatch or None
        None where no stop string is completed by a token at or after ``min_tokens``.
    """
    ids = list(ids)
    start = max(row.min_tokens, 1)
    if not row.stop or len(ids) < start:
        return None
    full = decode(ids)
    if floor is None:
        floor = _stable(decode(ids[: start - 1]), full) if start > 1 else 0
    if _earliest(full, row.stop, floor) is None:
        return None
    # The first prefix whose text holds a match: a prefix's text is a prefix of the longer
    # ones' (bar an unfinished character at its end), so a match, once there, stays.
    lo, hi = start, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if _earliest(decode(ids[:mid]), row.stop, floor) is None:
            lo = mid + 1
        else:
            hi = mid
    text = decode(ids[:lo])
    at, stop = _earliest(text, row.stop, floor)
    end = at + len(stop) if row.include_stop_str_in_output else at
    return StopMatch(lo, text[:end], stop)


class StopStrings:
    """The stop strings of a call's rows: the engine's ``stop_check`` at host checks, and
    the cut of a finished row (:meth:`cut`).

    Parameters
    ----------
    decode : callable
        ``decode(ids) -> str``.
    rows : sequence of SamplingParams
        The call's rows, as the engine numbers them.
    """

    def __init__(self, decode: Callable[[list[int]], str], rows: Sequence[SamplingParams]):
        self.decode, self.rows = decode, rows
        self.floors: dict[int, int] = {}

    def __call__(self, row: int, ids: list[int]) -> tuple[int, str] | None:
        """``(kept, string)`` where ``ids`` complete a stop string of row ``row``, else None
        (the engine's :data:`~lmgen_fast.engine.results.StopCheck`)."""
        got = self.cut(row, ids)
        return None if got is None else (got.kept, got.stop)

    def cut(self, row: int, ids: list[int]) -> StopMatch | None:
        """Where row ``row`` with tokens ``ids`` stops on a stop string (see
        :func:`find_stop`), None where it does not."""
        p = self.rows[row]
        start = max(p.min_tokens, 1)
        if not p.stop or len(ids) < start:
            return None
        if row not in self.floors:
            # Fixed once the row has its first min_tokens - 1 tokens: computed once.
            head = self.decode(list(ids[: start - 1])) if start > 1 else ""
            full = self.decode(list(ids))
            self.floors[row] = _stable(head, full)
        return find_stop(self.decode, ids, p, self.floors[row])


def finish_row(stops: StopStrings | None, decode: Callable[[list[int]], str], row: int,
               pair) -> tuple[list[int], str, str, str | int | None]:
    """Engine row ``row``'s result ``pair`` (ids and finish reason, with its
    ``stop_reason`` where it has one) as ``(ids, text, finish_reason, stop_reason)``: cut
    at a stop string where one matched (:meth:`StopStrings.cut`), else decoded whole."""
    ids, reason = pair
    match = stops.cut(row, ids) if stops is not None else None
    if match is None:
        return ids, decode(ids), reason, getattr(pair, "stop_reason", None)
    return ids[: match.kept], match.text, "stop", match.stop
