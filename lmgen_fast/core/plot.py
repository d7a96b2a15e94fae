"""The figures of lmgen-fast: decode throughput against batch size with the device's memory
roofline, and the training loss curve. One home for both, so that ``lmgen-fast bench
--plot``, ``benchmarks/render_results.py --plot`` and the training script draw alike.

matplotlib is the optional ``plot`` extra (``pip install 'lmgen-fast[plot]'``): it is
imported when a figure is first made, never by importing this module, and always with the
Agg backend (files only, no display). Each ``*_figure`` function returns the matplotlib
``Figure`` before anything is written, so that what it plots can be read back;
:func:`save_png` writes it.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PLOT_EXTRA = "pip install 'lmgen-fast[plot]'"

# Peak memory bandwidth in bytes/s from NVIDIA's datasheets, by a part of the device name
# (the first match wins: the PCIe and NVL cards of a family come before the SXM part).
DATASHEET_BANDWIDTH: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100", 3.35e12),
    ("H200", 4.8e12),
)


class PlotExtraMissing(ImportError):
    """matplotlib, the ``plot`` extra, is not installed; the message says how to install it."""


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend.

    Returns
    -------
    module
        ``matplotlib.pyplot``.

    Raises
    ------
    PlotExtraMissing
        When matplotlib cannot be imported.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise PlotExtraMissing(
            f"plots need matplotlib, the plot extra: {PLOT_EXTRA} ({err})") from err
    return plt


def datasheet_bandwidth(device: str) -> float | None:
    """The datasheet memory bandwidth (bytes/s) of the GPU named ``device``, if it is in
    :data:`DATASHEET_BANDWIDTH`; None for any other device (the CPU included)."""
    for part, bandwidth in DATASHEET_BANDWIDTH:
        if part.lower() in device.lower():
            return bandwidth
    return None


@dataclass(frozen=True)
class Roofline:
    """The memory roofline of decoding: each step reads every weight once and every row's
    KV cache, so ``tokens/s <= B * bandwidth / (weight_bytes + B * context * kv_bytes)``.

    Attributes
    ----------
    bandwidth : float
        Memory bandwidth in bytes/s.
    weight_bytes : int
        Bytes of the weights one decode step reads (all but the embedding table, of which
        a step reads one row per sequence).
    kv_bytes_per_position : int
        KV-cache bytes per row and position (keys and values, every layer).
    context : float
        Positions per row the step reads, averaged over the steps measured.
    source : str
        Where ``bandwidth`` comes from (``"datasheet"``, ``"--bandwidth"``), for the label.
    """

    bandwidth: float
    weight_bytes: int
    kv_bytes_per_position: int
    context: float
    source: str = "datasheet"

    def step_bytes(self, batch: float) -> float:
        """Bytes one decode step of ``batch`` rows reads."""
        return self.weight_bytes + batch * self.context * self.kv_bytes_per_position

    def tokens_per_s(self, batch: float) -> float:
        """The most tokens per second ``batch`` rows can make at this bandwidth."""
        return batch * self.bandwidth / self.step_bytes(batch)

    def label(self) -> str:
        """The legend entry: the bandwidth and where it comes from."""
        return f"memory roofline, {self.bandwidth / 1e12:.2f} TB/s ({self.source})"

    def describe(self) -> str:
        """The caption's line: the formula with this roofline's numbers."""
        return (f"roofline: tokens/s <= B x {self.bandwidth / 1e12:.2f} TB/s / (weights "
                f"{self.weight_bytes / 1e6:.1f} MB + B x {self.context:.0f} positions x KV "
                f"{self.kv_bytes_per_position / 1e3:.2f} kB/position)")


def _log_spaced(lo: float, hi: float, count: int = 64) -> list[float]:
    if hi <= lo:
        return [lo]
    step = (math.log(hi) - math.log(lo)) / (count - 1)
    return [math.exp(math.log(lo) + k * step) for k in range(count)]


def throughput_figure(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    caption: str = "",
    roofline: Roofline | None = None,
    no_roofline: str = "",
    ax: Any = None,
) -> Any:
    """Tokens per second against batch size, one line per series, and the memory roofline.

    Parameters
    ----------
    series : mapping
        Legend name -> ``(batch sizes, tokens/s)``, equal-length sequences of numbers. A
        series with one point is drawn as a marker alone.
    title : str
        The device (and model) the numbers come from.
    caption : str
        Printed under the plot: the command that measured them.
    roofline : Roofline, optional
        Drawn dashed from the smallest to the largest batch size plotted.
    no_roofline : str
        Said in the caption where there is no roofline (why it is not drawn); with a
        roofline, the caption gives its formula and numbers.
    ax : matplotlib Axes, optional
        Draw into these axes (a panel of a larger figure) instead of a new figure.

    Returns
    -------
    matplotlib.figure.Figure
        The figure, not yet saved. Both axes are logarithmic where the values span more
        than a factor of 4 (batch sizes) or 10 (rates).
    """
    if ax is None:
        fig, ax = pyplot().subplots(figsize=(8, 5))
    else:
        fig = ax.figure
    batches = [float(b) for xs, _ in series.values() for b in xs]
    rates = [float(r) for _, ys in series.values() for r in ys if r > 0]
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), "o-" if len(xs) > 1 else "o", label=name)
    if roofline is not None and batches:
        grid = _log_spaced(min(batches), max(batches))
        bound = [roofline.tokens_per_s(b) for b in grid]
        ax.plot(grid, bound, "k--", label=roofline.label())
        rates += bound
    if batches and max(batches) >= 4 * min(batches):
        ax.set_xscale("log", base=2)
    if batches:  # the batch sizes measured, written out (not as powers of two)
        ticks = sorted(set(batches))
        ax.set_xticks(ticks, [f"{b:g}" for b in ticks])
        ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
    if rates and max(rates) > 10 * min(rates):
        ax.set_yscale("log")
    ax.set_xlabel("batch size B (sequences decoded together)")
    ax.set_ylabel("tokens/s (all rows)")
    ax.set_title(textwrap.fill(title, 80), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    why = roofline.describe() if roofline is not None else no_roofline
    note = "\n".join(textwrap.fill(t, 110) for t in (caption, why) if t)
    if note:
        ax.annotate(note, (0, 0), xycoords="axes fraction", xytext=(0, -38),
                    textcoords="offset points", va="top", fontsize=7, family="monospace")
    return fig


def loss_figure(
    steps: Sequence[int],
    train_loss: Sequence[float],
    eval_steps: Sequence[int] = (),
    eval_loss: Sequence[float] = (),
    unigram: float | None = None,
) -> Any:
    """The training loss curve: training loss, held-out loss as dots, the unigram loss.

    Parameters
    ----------
    steps, train_loss : sequence
        The (smoothed) training loss (nats/token) at these optimiser steps.
    eval_steps, eval_loss : sequence
        Held-out losses.
    unigram : float, optional
        The held-out loss of unigram frequencies, drawn as a dashed horizontal line.

    Returns
    -------
    matplotlib.figure.Figure
        The figure, not yet saved.
    """
    fig, ax = pyplot().subplots(figsize=(7, 4))
    ax.plot(list(steps), list(train_loss), label="train (smoothed)")
    if eval_steps:
        ax.plot(list(eval_steps), list(eval_loss), "o-", label="held-out")
    if unigram is not None:
        ax.axhline(unigram, color="grey", linestyle="--", label="unigram")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig


def save_png(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG at ``path`` (its folder is created) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=dpi, bbox_inches="tight", format="png")
    finally:
        pyplot().close(fig)
    return path
