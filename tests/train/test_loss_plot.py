"""The training script's loss curve: drawn by lmgen_fast.core.plot (matplotlib), and a
missing plot extra stops the script before any training, naming the extra."""

from __future__ import annotations

import builtins
import random

import pytest

from lmgen_fast.core import plot
from lmgen_fast.train import loop

# The plot extra (.ci/run makes sure it is installed); pyplot now, so that its first import
# (the font cache) is not timed as a test.
pytest.importorskip("matplotlib.pyplot")


def test_loss_figure_plots_the_curves_given(tmp_path):
    import matplotlib.image

    rng = random.Random(3)
    steps = list(range(10, 710, 10))
    loss = [8 - 4 * s / 700 + rng.uniform(-0.1, 0.1) for s in steps]
    eval_steps, eval_loss = [175, 350, 525, 700], [rng.uniform(4, 6) for _ in range(4)]
    unigram = rng.uniform(6, 7)
    fig = plot.loss_figure(steps, loss, eval_steps, eval_loss, unigram)
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
             for line in fig.axes[0].get_lines()}
    assert lines["train (smoothed)"] == (steps, loss)
    assert lines["held-out"] == (eval_steps, eval_loss)
    assert lines["unigram"][1] == [unigram, unigram]
    path = plot.save_png(fig, tmp_path / "loss.png")
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 100


def test_training_without_matplotlib_stops_before_it_starts(monkeypatch, tmp_path, capsys):
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    def no_work(settings):
        raise AssertionError("the corpus was built before the plot extra was checked")

    monkeypatch.setattr(builtins, "__import__", fake)
    monkeypatch.setattr(loop, "build_corpus", no_work)
    with pytest.raises(SystemExit) as done:
        loop.main(["--out", str(tmp_path / "assets"), "--plot", str(tmp_path / "loss.png")])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "pip install 'lmgen-fast[plot]'" in err and "--no-plot" in err
    # With --no-plot the script goes on to train (here: to the stand-in that stops it).
    with pytest.raises(AssertionError, match="corpus was built"):
        loop.main(["--out", str(tmp_path / "assets"), "--no-plot"])
