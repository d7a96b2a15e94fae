"""``python benchmarks/render_results.py --plot``: the bench_decode results as tokens/s
against batch size, one panel per file, under the memory roofline of the file's device.

The JSON is built with bench_decode.py's own writer (made-up numbers on a tiny model: only
the plot is under test)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

from lmgen_fast.cli.bench_plot import weight_bytes_per_step
from lmgen_fast.core import plot

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_decode  # noqa: E402
import render_results  # noqa: E402

from _common import write_json  # noqa: E402

# The plot extra (.ci/run makes sure it is installed); pyplot now, so that its first import
# (the font cache) is not timed as a test.
pytest.importorskip("matplotlib.pyplot")

BATCHES = [1, 8, 64]


def decode_file(tmp_path: Path, device: str, seed: int) -> tuple[Path, dict]:
    rng = random.Random(seed)
    model = bench_decode.build("cpu", tiny=True).to(torch.bfloat16)
    results = [{"batch": b, "tok_s": {"lmgen-fast": rng.uniform(100, 1e5),
                                      "transformers": rng.uniform(10, 1e4)}} for b in BATCHES]
    results[0]["tok_s"]["naive article loop"] = rng.uniform(1, 50)
    info = {"device": device, "torch": "2.11.0", "triton": "3.6.0", "date": "2026-12-03",
            "command": f"python benchmarks/bench_decode.py --tiny --seed-{seed}"}
    payload = bench_decode.make_payload(info, model, tokens=64, naive_tokens=16, repeats=3,
                                        bandwidth=None, batches=BATCHES, complete=True,
                                        results=results, notes=[], profiles={})
    path = write_json(str(tmp_path / f"bench_decode_{seed}.json"), payload)
    return path, json.loads(path.read_text())


def test_plot_draws_each_file_with_its_roofline(tmp_path, monkeypatch):
    import matplotlib.image

    gpu, gpu_payload = decode_file(tmp_path, "NVIDIA H100 80GB HBM3", 1)
    cpu, cpu_payload = decode_file(tmp_path, "AMD EPYC 7B13 (2 threads)", 2)
    drawn = []
    save = plot.save_png
    monkeypatch.setattr(plot, "save_png", lambda fig, path: drawn.append(fig) or save(fig, path))
    out = tmp_path / "decode.png"
    assert render_results.main([str(gpu), str(cpu), "--plot", str(out)]) == 0
    assert matplotlib.image.imread(out).ndim == 3
    [fig] = drawn
    assert len(fig.axes) == 2
    for ax, payload in zip(fig.axes, (gpu_payload, cpu_payload), strict=True):
        lines = {line.get_label(): (list(map(float, line.get_xdata())),
                                    list(map(float, line.get_ydata())))
                 for line in ax.get_lines()}
        for name in ("lmgen-fast", "transformers", "naive article loop"):
            rows = [r for r in payload["results"] if name in r["tok_s"]]
            assert lines.pop(name) == ([r["batch"] for r in rows],
                                       [r["tok_s"][name] for r in rows])
        caption = "\n".join(t.get_text() for t in ax.texts)
        assert payload["device"] in ax.get_title() and payload["command"] in caption
        if payload is cpu_payload:
            assert lines == {} and "roofline not drawn" in caption
            continue
        [(label, (xs, ys))] = lines.items()
        assert "3.35 TB/s (datasheet)" in label
        # The roofline of the file: the bytes of the model it names, in its dtype.
        model = bench_decode.build("cpu", tiny=True).to(torch.bfloat16)
        context = render_results.DECODE_PROMPT_MEAN + (payload["tokens"] - 1) / 2
        weights, per_position = weight_bytes_per_step(model), model.kv_bytes_per_position()
        assert ys == pytest.approx([b * 3.35e12 / (weights + b * context * per_position)
                                    for b in xs], rel=1e-12)


def test_bandwidth_option_draws_the_cpu_roofline(tmp_path):
    cpu, payload = decode_file(tmp_path, "AMD EPYC 7B13 (2 threads)", 3)
    roofline, why = render_results.decode_roofline_of(payload, bandwidth=1e11)
    assert why == "" and roofline.source == "--bandwidth" and roofline.bandwidth == 1e11


def test_plot_without_decode_results_says_so(tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"kind": "bench_launches", "results": []}))
    with pytest.raises(ValueError, match="no bench_decode result"):
        render_results.plot_decode([other], tmp_path / "x.png")
    assert render_results.main([str(other), "--plot", str(tmp_path / "x.png")]) == 1
    assert "error: --plot: no bench_decode result" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
