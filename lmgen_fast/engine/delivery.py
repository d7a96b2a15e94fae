"""What a run hands to its caller at host checks: new tokens to the callback
(:class:`Streamer`), finished rows to ``on_row`` and the results (:class:`Handover`), and
a :class:`GenerationError` for a row the sampler flagged (:func:`raise_bad_rows`).

State rows are mapped to the caller's rows by a list (``None``: a free slot): the
identity for a static batch, the slots' occupants in continuous batching.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lmgen_fast.core.errors import STATUS_EMPTY, EmptyRowError, GenerationError
from lmgen_fast.core.params import SamplingParams
from lmgen_fast.core.rows import finish_reason, listed_alternatives
from lmgen_fast.engine.results import (
    RowCallback,
    RowLogprobs,
    RowPair,
    StopCheck,
    TokenCallback,
)
from lmgen_fast.engine.state import DeviceState


class Streamer:
    """Hands each row's new tokens to ``callback(row, token)``, in order, once each;
    ``delivered[s]`` counts the tokens of state row ``s`` handed out so far."""

    def __init__(self, callback: TokenCallback | None, batch: int):
        self.callback = callback
        self.delivered = [0] * batch

    def stream(self, st: DeviceState, count: list[int], occupant: Sequence[int | None]) -> None:
        """Hand out what the rows kept since the last check (``count``: ``st.count`` read
        back); state row ``s`` is the caller's row ``occupant[s]``."""
        live = [s for s, i in enumerate(occupant) if i is not None]
        if self.callback is not None and live:
            new = max(count[s] - self.delivered[s] for s in live)
            if new > 0:
                at = torch.tensor(self.delivered, device=st.out.device).unsqueeze(1)
                cols = (at + torch.arange(new, device=at.device)).clamp_max(st.out.shape[1] - 1)
                block = st.out.gather(1, cols).tolist()
                for s in live:
                    for t in block[s][: count[s] - self.delivered[s]]:
                        self.callback(occupant[s], t)
        for s in live:
            self.delivered[s] = count[s]

    def restart(self, slots: Sequence[int]) -> None:
        """Rows ``slots`` start over (a new row entered): nothing of theirs handed out."""
        for s in slots:
            self.delivered[s] = 0

    def keep(self, keep: Sequence[int]) -> None:
        """Follow a compaction: state row ``j`` is now the former row ``keep[j]``."""
        self.delivered = [self.delivered[s] for s in keep]


class Handover:
    """The finished rows of a call: each handed to ``on_row`` as soon as it is finished,
    and all of them returned by :meth:`results` (rows numbered as the caller's).

    ``end_ids`` are the ids that end a row with "eot"; another id that ended one is a
    stop id ("stop"); :attr:`stopped` maps the rows that something besides their tokens
    ended with "stop" to the stop reason: a stop string (found by ``stop_check``, see
    :class:`StopWatch`), or None for a completed grammar (see
    :func:`lmgen_fast.engine.grammar.check_rows`).
    """

    def __init__(self, rows: Sequence[SamplingParams], max_tokens: Sequence[int],
                 on_row: RowCallback | None, return_logprobs: bool,
                 end_ids: Sequence[int] = (), stop_check: StopCheck | None = None):
        self.rows, self.max_tokens = rows, max_tokens
        self.on_row, self.return_logprobs = on_row, return_logprobs
        self.end_ids, self.stop_check = tuple(end_ids), stop_check
        self.finished: dict[int, tuple[RowPair, RowLogprobs | None]] = {}
        self.stopped: dict[int, str | None] = {}

    def finish(self, i: int, ids: list[int], lp: RowLogprobs | None,
               ended_on: int | None = None) -> None:
        """Row ``i`` is finished with tokens ``ids`` (and log-probabilities ``lp``), on the
        id ``ended_on`` where an end or stop id ended it (None: unknown, taken as "eot")."""
        if i in self.stopped:
            pair = RowPair(ids, "stop", self.stopped[i])
        elif finish_reason(len(ids), self.max_tokens[i]) == "length":
            pair = RowPair(ids, "length")
        elif ended_on is None or ended_on in self.end_ids:
            pair = RowPair(ids, "eot")
        else:
            pair = RowPair(ids, "stop", ended_on)
        self.finished[i] = (pair, lp)
        if self.on_row is not None:
            self.on_row(i, pair, lp if self.return_logprobs else None)

    def harvest(self, st: DeviceState, slots: list[int], count: list[int],
                inputs: list[int]) -> None:
        """Finish the state rows ``slots`` (done), which hold the caller's rows ``inputs``;
        ``count`` is ``st.count`` read back."""
        counts = [count[s] for s in slots]
        index = torch.tensor(slots, device=st.out.device)
        # One column more: the id that ended a row that stopped before its cap.
        ids = st.out[index, : min(max(counts) + 1, st.out.shape[1])].tolist()
        lps: list[RowLogprobs | None] = [None] * len(slots)
        if self.return_logprobs:
            lps = row_logprobs(st, slots, counts, [self.rows[i] for i in inputs])
        for j, i in enumerate(inputs):
            c = counts[j]
            self.finish(i, ids[j][:c], lps[j], ids[j][c] if c < len(ids[j]) else None)

    def results(self) -> tuple[list[RowPair], list[RowLogprobs | None]]:
        """Every row's ``(token_ids, finish_reason)`` and log-probabilities (None without
        ``return_logprobs``), in the caller's order."""
        got = [self.finished[i] for i in range(len(self.rows))]
        return [pair for pair, _ in got], [lp for _, lp in got]


class StopWatch:
    """Stop strings at host checks: rows whose tokens complete one end there, their later
    tokens dropped (SPEC section 7). ``stop_check`` decides (see
    :data:`~lmgen_fast.engine.results.StopCheck`); a row is asked again only when it has
    new tokens."""

    def __init__(self, stop_check: StopCheck | None, rows: Sequence[SamplingParams],
                 handover: Handover):
        self.stop_check, self.rows, self.handover = stop_check, rows, handover
        self.seen: dict[int, int] = {}

    def cut(self, st: DeviceState, count: list[int], occupant: Sequence[int | None]) -> None:
        """End the state rows whose tokens complete a stop string: their ``count`` (the list
        read back, and ``st.count``) cut to the completing token, ``done`` set."""
        if self.stop_check is None:
            return
        ask = [s for s, i in enumerate(occupant)
               if i is not None and self.rows[i].stop and i not in self.handover.stopped
               and count[s] > 0 and self.seen.get(i) != count[s]]
        if not ask:
            return
        index = torch.tensor(ask, device=st.out.device)
        ids = st.out[index, : max(count[s] for s in ask)].tolist()
        ended, kept = [], []
        for j, s in enumerate(ask):
            i = occupant[s]
            self.seen[i] = count[s]
            got = self.stop_check(i, ids[j][: count[s]])
            if got is not None:
                ended.append(s)
                kept.append(got[0])
                count[s] = got[0]
                self.handover.stopped[i] = got[1]
        if ended:
            at = torch.tensor(ended, device=st.out.device)
            st.count.index_copy_(0, at, torch.tensor(kept, device=st.out.device))
            st.done.index_fill_(0, at, True)


def raise_bad_rows(st: DeviceState, input_rows: Callable[[list[int]], list[int]],
                   partial: Callable[[], list[list[int]]]) -> None:
    """Raise GenerationError where the step flagged a row: the first step at which one was
    flagged, its rows as the caller's (``input_rows`` maps state rows to them) and what
    every row had so far (``partial()``)."""
    if not st.layout.resident:
        return  # the reference on the CPU raises at the step itself
    bad = st.bad_step.tolist()
    if max(bad) < 0:
        return
    first = min(b for b in bad if b >= 0)
    rows = [r for r, b in enumerate(bad) if b == first]
    bits = st.bad_bits.tolist()
    if any(bits[r] & STATUS_EMPTY for r in rows):
        exc: Exception = EmptyRowError(input_rows(rows))
    else:
        exc = RuntimeError(f"internal error of the Triton sampler on rows "
                           f"{input_rows(rows)}")
    raise GenerationError(f"at step {first}: {exc}", partial()) from exc


def row_logprobs(st: DeviceState, slots: list[int], counts: list[int],
                 rows: Sequence[SamplingParams]) -> list[RowLogprobs]:
    """The log-probabilities of state rows ``slots``: ``counts[i]`` tokens each, the top
    alternatives ``rows[i].logprobs`` deep (waits for the device)."""
    index = torch.tensor(slots, device=st.layout.device)
    width = max(counts, default=0)
    token_lp = st.token_lp[index, :width].tolist()
    top = None
    if st.top_ids is not None:
        top = (st.top_ids[index, :width].tolist(), st.top_lp[index, :width].tolist())
    lps = []
    for j, (n, row) in enumerate(zip(counts, rows, strict=True)):
        alts = None
        if row.logprobs > 0:
            alts = [listed_alternatives(i, v, row.logprobs)
                    for i, v in zip(top[0][j][:n], top[1][j][:n], strict=True)]
        lps.append(RowLogprobs(token_lp[j][:n], alts))
    return lps
