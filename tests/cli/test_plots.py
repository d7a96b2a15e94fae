"""The figures: tokens/s against batch size under the memory roofline (lmgen_fast.core.plot),
what ``lmgen-fast bench --plot`` measures and draws, and the error of a missing plot extra."""

from __future__ import annotations

import builtins
import random

import pytest
import torch

from lmgen_fast.cli import bench_plot
from lmgen_fast.cli.main import main
from lmgen_fast.core import plot
from lmgen_fast.models import LlamaConfig, LlamaForPretraining

# The plot extra (.ci/run makes sure it is installed); pyplot now, so that its first import
# (the font cache) is not timed as a test.
pytest.importorskip("matplotlib.pyplot")


def lines_by_label(fig) -> dict[str, tuple[list[float], list[float]]]:
    """Every labelled line of ``fig``'s first axes: label -> (x data, y data)."""
    return {line.get_label(): (list(map(float, line.get_xdata())),
                               list(map(float, line.get_ydata())))
            for line in fig.axes[0].get_lines()}


def caption_of(fig) -> str:
    return "\n".join(t.get_text() for t in fig.axes[0].texts)


@pytest.fixture
def no_matplotlib(monkeypatch):
    """Imports of matplotlib fail, as where the plot extra is not installed."""
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)


def random_roofline(rng: random.Random) -> plot.Roofline:
    return plot.Roofline(bandwidth=rng.uniform(1e11, 5e12),
                         weight_bytes=rng.randrange(10**6, 10**10),
                         kv_bytes_per_position=rng.randrange(10**3, 10**6),
                         context=rng.uniform(1, 4096))


def test_roofline_is_the_formula():
    rng = random.Random(1)
    for _ in range(20):
        r = random_roofline(rng)
        batch = rng.randrange(1, 1025)
        bound = batch * r.bandwidth / (r.weight_bytes
                                       + batch * r.context * r.kv_bytes_per_position)
        assert r.tokens_per_s(batch) == pytest.approx(bound, rel=1e-12)


def test_figure_plots_the_series_given_and_the_roofline_over_their_batch_sizes():
    rng = random.Random(2)
    batches = sorted(rng.sample(range(1, 300), 5))
    series = {"lmgen-fast": (batches, [rng.uniform(10, 1e5) for _ in batches]),
              "transformers generate": (batches[:3], [rng.uniform(10, 1e5) for _ in range(3)]),
              "article loop": ([1], [rng.uniform(1, 100)])}
    roofline = random_roofline(rng)
    fig = plot.throughput_figure(series, "NVIDIA H200: a model", caption="the command",
                                 roofline=roofline)
    lines = lines_by_label(fig)
    for name, (xs, ys) in series.items():
        assert lines[name] == (list(map(float, xs)), list(map(float, ys)))
    xs, ys = lines[roofline.label()]
    # From the smallest batch size plotted (the article loop's 1) to the largest.
    assert xs[0] == pytest.approx(1) and xs[-1] == pytest.approx(batches[-1])
    assert ys == pytest.approx([roofline.tokens_per_s(b) for b in xs], rel=1e-12)
    ax = fig.axes[0]
    assert "NVIDIA H200" in ax.get_title() and "the command" in caption_of(fig)
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    plot.pyplot().close(fig)


def test_without_a_roofline_the_caption_says_why():
    fig = plot.throughput_figure({"a": ([1, 2], [3.0, 4.0])}, "AMD EPYC", "cmd",
                                 no_roofline="not drawn: no bandwidth")
    assert set(lines_by_label(fig)) == {"a"}
    assert "not drawn: no bandwidth" in caption_of(fig)
    assert fig.axes[0].get_xscale() == "linear"  # 1 to 2: not worth a log axis
    plot.pyplot().close(fig)


def test_written_file_is_a_png_matplotlib_reads_back(tmp_path):
    import matplotlib.image

    fig = plot.throughput_figure({"a": ([1, 4, 16], [5.0, 18.0, 60.0])}, "device", "cmd")
    width, height = (fig.get_size_inches() * 50).astype(int)
    path = plot.save_png(fig, tmp_path / "sub" / "t.png", dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    # bbox_inches="tight" trims or extends the canvas by the labels' margins.
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert 0.5 * height < image.shape[0] < 2 * height and 0.5 * width < image.shape[1] < 2 * width


def test_datasheet_bandwidth_by_device_name():
    assert plot.datasheet_bandwidth("NVIDIA H200") == 4.8e12
    assert plot.datasheet_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert plot.datasheet_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert plot.datasheet_bandwidth("AMD EPYC 7B13") is None


@pytest.mark.parametrize("tied", [False, True])
def test_decode_roofline_reads_the_weights_but_the_embedding_and_the_kv_cache(tied):
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=tied)
    model = LlamaForPretraining(config).to(torch.bfloat16)
    unique = sum(p.numel() * 2 for p in model.parameters())
    embedding = config.vocab_size * config.hidden_size * 2
    roofline, why = bench_plot.decode_roofline(model, "NVIDIA H200", 40.5)
    assert why == "" and roofline.source == "datasheet" and roofline.bandwidth == 4.8e12
    # Tied, the embedding table is the lm_head, read whole every step.
    assert roofline.weight_bytes == (unique if tied else unique - embedding)
    assert roofline.kv_bytes_per_position == 2 * 2 * 2 * (32 // 4) * 2
    assert roofline.context == 40.5
    roofline, why = bench_plot.decode_roofline(model, "AMD EPYC", 40.5)
    assert roofline is None and "--bandwidth" in why
    roofline, _ = bench_plot.decode_roofline(model, "AMD EPYC", 40.5, bandwidth=1e11)
    assert (roofline.bandwidth, roofline.source) == (1e11, "--bandwidth")


def test_missing_matplotlib_names_the_extra(no_matplotlib):
    with pytest.raises(plot.PlotExtraMissing, match=r"pip install 'lmgen-fast\[plot\]'"):
        plot.pyplot()


def test_bench_plot_without_matplotlib_fails_before_timing(no_matplotlib, tmp_path, capsys):
    assert main(["bench", "--device", "cpu", "--plot", str(tmp_path / "b.png")]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # nothing was timed
    assert err.strip() == ("lmgen-fast: error: --plot: plots need matplotlib, the plot extra: "
                           "pip install 'lmgen-fast[plot]' (No module named 'matplotlib')")


def test_bench_plot_end_to_end(tmp_path, capsys, monkeypatch):
    """``lmgen-fast bench --plot`` on the embedded model: every series at every batch size
    asked for, the roofline of --bandwidth, a PNG on disk."""
    drawn = []
    save = bench_plot.save_png

    def keep(fig, path):
        drawn.append(lines_by_label(fig) | {"caption": caption_of(fig)})
        return save(fig, path)

    monkeypatch.setattr(bench_plot, "save_png", keep)
    path = tmp_path / "bench.png"
    assert main(["bench", "--device", "cpu", "--max-tokens", "3", "--calls", "1",
                 "--batches", "1", "2", "--bandwidth", "2e11", "--plot", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {path}" in out and path.read_bytes()[:4] == b"\x89PNG"
    [lines] = drawn
    assert "--batches 1 2 --plot" in lines["caption"] and "2e+11" in lines["caption"]
    assert lines[bench_plot.LMGEN][0] == [1.0, 2.0]
    assert lines[bench_plot.HF][0] == [1.0, 2.0]
    assert lines["article loop (recompute, host sampling)"][0] == [1.0]
    assert all(rate > 0 for name in (bench_plot.LMGEN, bench_plot.HF)
               for rate in lines[name][1])
    [(xs, ys)] = [v for k, v in lines.items() if k.startswith("memory roofline")]
    from lmgen_fast import load_default

    model, tokenizer = load_default()
    prompt = len(tokenizer.encode(" The list type").ids) + 1  # [BOT] + the default prompt
    roofline, _ = bench_plot.decode_roofline(model, "any", prompt + (3 - 1) / 2, 2e11)
    assert ys == pytest.approx([roofline.tokens_per_s(b) for b in xs], rel=1e-12)
