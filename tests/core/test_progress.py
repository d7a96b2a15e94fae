"""lmgen_fast.core.progress: the rate shown is the rate at the moment it is shown, in a log too."""

from __future__ import annotations

import io

from lmgen_fast.core.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_show_the_current_rate():
    clock, log = Clock(), io.StringIO()
    bar = Progress(10, label="job", stream=log, log_every=30.0, clock=clock)
    # A slow first token (prefill, warm-up), then a steady 100 tokens/s.
    clock.now += 1.25
    bar.on_token(0, 1)
    for _ in range(10):
        clock.now += 1.0
        bar.count(100)
        bar.add_rows(1)
    bar.close()
    lines = log.getvalue().splitlines()
    # No line is due before 30 s; the closing line carries the rate at the end.
    assert lines == [f"job rows 10/10 (100%), 1001 tok, {1001 / 11.25:.1f} tok/s"]


def test_lines_are_spaced_by_log_every_and_carry_the_note():
    clock, log = Clock(), io.StringIO()
    bar = Progress(100, unit="step", stream=log, log_every=30.0, clock=clock)
    for step in range(100):
        clock.now += 1.0
        bar.advance(1, note=f"loss {5 - step / 50:.3f}", tokens=64)
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 + 100 // 30
    assert lines[0] == "steps 30/100 (30%), 1920 tok, 64.0 tok/s, loss 4.420"
    assert lines[-1] == "steps 100/100 (100%), 6400 tok, 64.0 tok/s, loss 3.020"


def test_terminal_bar_ends_with_the_final_rate():
    clock, term = Clock(), Terminal()
    bar = Progress(4, initial=1, stream=term, clock=clock)
    clock.now += 0.1
    bar.count(1)  # an early, misleading rate: 10 tok/s
    for _ in range(3):
        clock.now += 1.0
        bar.count(50)
        bar.add_rows(1)
    bar.close()
    final = term.getvalue().replace("\r", "\n").splitlines()[-1]
    assert "4/4" in final and f"{151 / 3.1:.1f} tok/s" in final, final


def test_nothing_is_shown_when_disabled_or_already_done():
    for kwargs in ({"enabled": False}, {"initial": 5}):
        log = io.StringIO()
        bar = Progress(5, stream=log, **kwargs)
        bar.count(10)
        bar.add_rows(1)
        bar.close()
        assert log.getvalue() == ""
