"""What a row keeps of a round: its drafts up to the first the target's race rejects, and
the target's token there, booked into :class:`~lmgen_fast.speculative.rows.Rows`. Whether a
kept token stops the row is the engine's rule (:func:`lmgen_fast.core.rows.book_stop`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmgen_fast.core.errors import EmptyRowError, GenerationError
from lmgen_fast.core.rows import book_stop, listed_alternatives
from lmgen_fast.engine import TokenCallback
from lmgen_fast.sampling import reference
from lmgen_fast.speculative.rows import Rows

# Per row and position: the token's log-probability, its top alternatives' ids and values.
HostLogprobs = tuple[list[list[float]], list[list[list[int]]], list[list[list[float]]]]


def book_round(rows: Rows, got: reference.SampleResult, drafts: Sequence[Sequence[int]],
               t: int, callback: TokenCallback | None) -> None:
    """Keep each active row's accepted drafts and the target's token after them.

    Parameters
    ----------
    rows : Rows
        The batch, updated in place (tokens, steps, histories, counts, stop flags).
    got : SampleResult
        The round's draws: ``tokens`` and ``status`` ``[B * t]`` (row-major), optionally
        log-probabilities with ``[B * t, N]`` top alternatives.
    drafts : sequence of sequences of int
        ``B`` rows of ``t - 1`` drafts, ``-1`` for none.
    t : int
        Positions per row this round.
    callback : callable, optional
        Called ``(row, token)`` for every kept token, in order.

    Raises
    ------
    GenerationError
        A row had nothing to sample in a one-position round (see :attr:`Rows.retry`).
    """
    tokens = got.tokens.view(rows.batch, t).tolist()
    status = got.status.view(rows.batch, t).tolist()
    lps = _host_logprobs(got, rows.batch, t)
    written: list[tuple[int, int, int]] = []  # (row, column, token) of the penalty histories
    for r in rows.active():
        rows.forwards[r] += 1
        rows.proposed[r] += sum(d >= 0 for d in drafts[r])
        rows.retry[r] = False
        kept = len(rows.out[r])
        _accept_row(rows, r, tokens[r], status[r], drafts[r], lps, written)
        if callback is not None:
            for tok in rows.out[r][kept:]:
                callback(r, tok)
    if rows.hist is not None and written:
        at_rows, at_cols, values = (torch.tensor(v, device=rows.device)
                                    for v in zip(*written, strict=True))
        rows.hist.index_put_((at_rows, at_cols), values)


def _host_logprobs(got: reference.SampleResult, batch: int, t: int) -> HostLogprobs | None:
    lp = got.logprobs
    if lp is None:
        return None
    n = lp.top_ids.shape[1]
    return (lp.token_logprob.view(batch, t).tolist(), lp.top_ids.view(batch, t, n).tolist(),
            lp.top_logprobs.view(batch, t, n).tolist())


def _accept_row(rows: Rows, r: int, tokens: list[int], status: list[int],
                drafts: Sequence[int], lps: HostLogprobs | None,
                written: list[tuple[int, int, int]]) -> None:
    """Book row ``r``'s positions in order until one ends its round: a rejected draft, a
    stop, or a position with nothing to sample. An id of ``rows.ends[r]`` (the end ids and
    the row's stop ids) ends it, not kept, recorded in ``rows.ended[r]``."""
    for j, tok in enumerate(tokens):
        bad = status[j] != 0
        ending = tok in rows.ends[r]
        kept, _, stop = book_stop(False, bad, ending, len(rows.out[r]), rows.max_tokens[r])
        if bad:
            if len(tokens) > 1:
                # A draft whose keys or values are not finite (a model that gives NaN for
                # some token) spoils even the positions before it: attention weighs masked
                # slots by 0, and 0 * NaN is NaN. A one-token round decides, as plain
                # decoding would.
                rows.retry[r] = True
                return
            exc = EmptyRowError([rows.names[r]])
            raise GenerationError(f"at step {rows.steps[r]}: {exc}", rows.partial())
        rows.steps[r] += 1
        written.append((r, rows.hlen[r], tok))
        rows.hlen[r] += 1
        hit = j < len(drafts) and drafts[j] == tok
        rows.accepted[r] += hit
        if kept:
            rows.out[r].append(tok)
            rows.seqs[r].append(tok)
            if lps is not None:
                rows.token_lp[r].append(lps[0][r][j])
                rows.top[r].append(listed_alternatives(lps[1][r][j], lps[2][r][j],
                                                       rows.top_n[r]))
        if stop:
            rows.done[r] = True
            rows.ended[r] = tok if ending else None
            return
        if not hit:
            return
