"""Progress of a long loop on stderr, for batch jobs and training alike.

On a terminal it is a tqdm bar (tqdm is a dependency of lmgen-fast). Anywhere else (a log
file, a pipe, a CI job) it is a plain line every ``log_every`` seconds and one at the end:
a bar redrawn with carriage returns is unreadable in a log, and its rate would be whatever
was last drawn. Both forms show the same rate, computed when it is shown.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm

TTY_REFRESH = 0.5
LOG_EVERY = 30.0


class Tally:
    """The numbers a :class:`Progress` shows: items done out of a total, what is counted
    for the rate (tokens by default), a note, and the rate since the start.

    Parameters
    ----------
    total, initial, label, unit, rate_unit, clock
        As for :class:`Progress`.
    """

    def __init__(self, total: int, initial: int, label: str, unit: str, rate_unit: str,
                 clock: Callable[[], float]):
        self.total, self.done, self.tokens = total, initial, 0
        self.note = ""
        self._unit, self._rate_unit, self._label = unit, rate_unit, label
        self._clock = clock
        self.start = clock()

    def rate(self) -> float:
        """What :meth:`Progress.count` counted, per second since the start.

        Returns
        -------
        float
            0 before any time has passed.
        """
        elapsed = self._clock() - self.start
        return self.tokens / elapsed if elapsed > 0 else 0.0

    def postfix(self) -> str:
        """What the terminal bar shows after its counts: the note, then the rate."""
        rate = f"{self.rate():.1f} {self._rate_unit}/s"
        return f"{self.note}, {rate}" if self.note else rate

    def line(self) -> str:
        """The plain progress line: label, items done, tokens counted, the rate, the note."""
        percent = 100 * self.done / max(self.total, 1)
        text = (f"{self._label}{' ' if self._label else ''}{self._unit}s {self.done}/"
                f"{self.total} ({percent:.0f}%), {self.tokens} {self._rate_unit}, "
                f"{self.rate():.1f} {self._rate_unit}/s")
        return f"{text}, {self.note}" if self.note else text


class Progress(Tally):
    """Items done out of a total, and a rate (tokens per second by default).

    Parameters
    ----------
    total : int
        Items (rows, steps) the loop will have done at the end.
    initial : int
        Items already done before this process started (a resumed job).
    enabled : bool
        ``False`` shows nothing; so does a loop with nothing left to do.
    label : str
        Printed before the counts (e.g. ``"[rank 1/4]"`` or ``"train"``).
    unit : str
        Name of an item, e.g. ``"row"`` or ``"step"``.
    rate_unit : str
        Name of what :meth:`count` counts, shown as ``"<rate> <rate_unit>/s"``.
    stream : file, optional
        Where to write (default: ``sys.stderr`` at construction).
    log_every : float
        Seconds between lines when ``stream`` is not a terminal.
    clock : callable
        Returns seconds; tests pass a fake one.
    """

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, label: str = "", *,
                 unit: str = "row", rate_unit: str = "tok", stream: TextIO | None = None,
                 log_every: float = LOG_EVERY, clock: Callable[[], float] = time.perf_counter):
        super().__init__(total, initial, label, unit, rate_unit, clock)
        self.enabled = enabled and total > initial
        self._stream = stream if stream is not None else sys.stderr
        self._last = self.start
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)())
        self._every = TTY_REFRESH if self._tty else log_every
        self._bar = None
        self._closed = False
        if self.enabled and self._tty:
            self._bar = tqdm(total=total, initial=initial, unit=unit, desc=label or None,
                             file=self._stream, dynamic_ncols=True, mininterval=TTY_REFRESH)

    def count(self, n: int = 1) -> None:
        """Count ``n`` tokens (the rate's numerator)."""
        self.tokens += n
        self._maybe_show()

    def on_token(self, _row: int, _token: int) -> None:
        """Count one generated token (the ``callback`` of ``generate_ids``)."""
        self.count(1)

    def advance(self, n: int = 1, note: str | None = None, tokens: int = 0) -> None:
        """Count ``n`` finished items and ``tokens`` tokens at once.

        ``note`` (e.g. ``"loss 3.21"``) replaces the last one. Counting the tokens here,
        rather than with :meth:`count` first, keeps a line from showing them before the
        item that made them.
        """
        self.done += n
        self.tokens += tokens
        if note is not None:
            self.note = note
        if self._bar is not None:
            self._bar.set_postfix_str(self.postfix(), refresh=False)
            self._bar.update(n)
        self._maybe_show()

    def add_rows(self, n: int) -> None:
        """Count ``n`` finished rows (:meth:`advance` without a note)."""
        self.advance(n)

    def _maybe_show(self) -> None:
        # Called for every token: the clock is read, nothing more, until a line is due.
        if not self.enabled:
            return
        now = self._clock()
        if now - self._last >= self._every:
            self._last = now
            self._show()

    def _show(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(self.postfix(), refresh=True)
            return
        self._stream.write(self.line() + "\n")
        self._stream.flush()

    def close(self) -> None:
        """Show the final state once, with the rate at this moment, and end the bar."""
        if self._closed or not self.enabled:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.set_postfix_str(self.postfix(), refresh=False)
            self._bar.close()
        else:
            self._show()
