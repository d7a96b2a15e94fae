"""The loss-curve PNG of :mod:`lmgen_fast.train`: matplotlib when installed, else built in.

The built-in rasteriser (a PNG encoder, a 3x5 digit font, lines and dots) keeps the training
script free of dependencies beyond torch and tokenizers.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path


def _png_bytes(pixels: list[bytearray], width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    raw = b"".join(b"\x00" + bytes(row) for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b""))


# A 3x5 bitmap font, enough for axis numbers.
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001001001001", "8": "111101111101111",
    "9": "111101111001111", ".": "000000000000010", "k": "100101110101101",
}


def write_loss_png(
    path: str | Path,
    steps: Sequence[int],
    train_loss: Sequence[float],
    eval_steps: Sequence[int] = (),
    eval_loss: Sequence[float] = (),
    unigram: float | None = None,
) -> None:
    """Write a loss curve PNG: training loss (blue), held-out loss (red dots), unigram (grey).

    Parameters
    ----------
    path : str or Path
        The PNG to write (its folder is created).
    steps, train_loss : sequence
        The (smoothed) training loss at these steps.
    eval_steps, eval_loss : sequence
        Held-out losses.
    unigram : float, optional
        Drawn as a dashed horizontal line.

    Notes
    -----
    Uses matplotlib when it is installed, otherwise a small built-in rasteriser, so that
    the training script needs nothing beyond torch and tokenizers.

    Length: one piece with the hand-written rasteriser it falls back on (axes, ticks,
    curves, dots), which a later change replaces with matplotlib alone.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, train_loss, label="train (smoothed)")
        if eval_steps:
            ax.plot(eval_steps, eval_loss, "o-", label="held-out")
        if unigram is not None:
            ax.axhline(unigram, color="grey", linestyle="--", label="unigram")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return

    width, height, left, bottom, top, right = 640, 360, 40, 24, 10, 20
    pixels = [bytearray(b"\xff" * (3 * width)) for _ in range(height)]

    def put(x: int, y: int, rgb: tuple[int, int, int]) -> None:
        if 0 <= x < width and 0 <= y < height:
            pixels[y][3 * x : 3 * x + 3] = bytes(rgb)

    def text(x: int, y: int, s: str) -> None:
        for ch in s:
            glyph = _GLYPHS.get(ch)
            if glyph:
                for k, bit in enumerate(glyph):
                    if bit == "1":
                        put(x + k % 3, y + k // 3, (0, 0, 0))
            x += 4

    values = list(train_loss) + list(eval_loss) + ([unigram] if unigram is not None else [])
    y_lo, y_hi = math.floor(min(values)), math.ceil(max(values))
    x_hi = max(list(steps) + list(eval_steps) + [1])

    def to_px(step: float, loss: float) -> tuple[int, int]:
        px = left + round((width - left - right - 1) * step / x_hi)
        py = height - bottom - round((height - top - bottom - 1) * (loss - y_lo) / (y_hi - y_lo))
        return px, py

    def line(a: tuple[int, int], b: tuple[int, int], rgb: tuple[int, int, int]) -> None:
        n = max(abs(b[0] - a[0]), abs(b[1] - a[1]), 1)
        for t in range(n + 1):
            put(round(a[0] + (b[0] - a[0]) * t / n), round(a[1] + (b[1] - a[1]) * t / n), rgb)

    line(to_px(0, y_lo), to_px(x_hi, y_lo), (0, 0, 0))
    line(to_px(0, y_lo), to_px(0, y_hi), (0, 0, 0))
    for v in range(y_lo, y_hi + 1):
        x, y = to_px(0, v)
        line((x - 3, y), (x, y), (0, 0, 0))
        text(x - 6 - 4 * len(str(v)), y - 2, str(v))
    for k in range(5):
        s = round(x_hi * k / 4)
        x, y = to_px(s, y_lo)
        line((x, y), (x, y + 3), (0, 0, 0))
        label = f"{s / 1000:.1f}k" if s >= 1000 else str(s)
        text(x - 2 * len(label), y + 6, label)
    if unigram is not None:
        for x in range(left, width - right, 6):
            line((x, to_px(0, unigram)[1]), (x + 2, to_px(0, unigram)[1]), (128, 128, 128))
    pts = [to_px(s, v) for s, v in zip(steps, train_loss, strict=True)]
    for a, b in zip(pts, pts[1:], strict=False):
        line(a, b, (31, 119, 180))
    ept = [to_px(s, v) for s, v in zip(eval_steps, eval_loss, strict=True)]
    for a, b in zip(ept, ept[1:], strict=False):
        line(a, b, (214, 39, 40))
    for x, y in ept:
        for dx in range(-2, 3):
            for dy in range(-2, 3):
                put(x + dx, y + dy, (214, 39, 40))
    path.write_bytes(_png_bytes(pixels, width, height))
