"""What a call of :func:`lmgen_fast.engine.generate_ids` hands back, and the checks of its
plain arguments: the result types, the callbacks' signatures and the work counters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

TokenCallback = Callable[[int, int], None]
TopLogprobs = list[list[tuple[int, float]]]
# Stop strings, asked at host checks: ``stop_check(row, token_ids)`` gives ``(kept, string)``
# where the row's tokens so far complete a stop string (it keeps ``token_ids[:kept]``), else
# None.
StopCheck = Callable[[int, list[int]], "tuple[int, str] | None"]


class RowPair(tuple):
    """One row's ``(token_ids, finish_reason)``, a pair (it unpacks and compares as one),
    with the ``stop_reason`` as an attribute: the stop string or stop id that ended the row
    (``finish_reason`` "stop"), else None. ``finish_reason`` is "eot" (an end id), "stop"
    or "length" (``max_tokens``)."""

    stop_reason: str | int | None

    def __new__(cls, token_ids: list[int], finish_reason: str,
                stop_reason: str | int | None = None) -> RowPair:
        pair = super().__new__(cls, (token_ids, finish_reason))
        pair.stop_reason = stop_reason
        return pair

    def __getnewargs__(self) -> tuple:
        return (*self, self.stop_reason)

    @property
    def token_ids(self) -> list[int]:
        return self[0]

    @property
    def finish_reason(self) -> str:
        return self[1]


class RowLogprobs(NamedTuple):
    """One row's log-probabilities from :func:`generate_ids` (see ``Generation``)."""

    logprobs: list[float]
    top_logprobs: TopLogprobs | None


RowCallback = Callable[[int, RowPair, "RowLogprobs | None"], None]


@dataclass
class DecodeStats:
    """Work of :func:`generate_ids` calls, added up: decode ``steps`` and ``slot_steps``
    (rows times steps: what the device computed, kept or not)."""

    steps: int = 0
    slot_steps: int = 0


def empty_logprobs(asked: int) -> RowLogprobs:
    """The log-probabilities of a row with no token; ``asked`` top alternatives per token
    (0: none, so ``top_logprobs`` is None)."""
    return RowLogprobs([], [] if asked > 0 else None)


def check_sync_every(sync_every: int | None) -> None:
    """Raise ValueError unless ``sync_every`` is None or a positive int."""
    if sync_every is None:
        return
    if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
        raise ValueError(f"sync_every must be a positive int, got {sync_every!r}")


def check_max_batch_size(max_batch_size: int | None) -> None:
    """Raise ValueError unless ``max_batch_size`` is None or a positive int."""
    if max_batch_size is None:
        return
    if (isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int)
            or max_batch_size < 1):
        raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
