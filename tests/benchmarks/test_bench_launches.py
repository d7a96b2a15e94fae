"""benchmarks/bench_launches.py on a tiny model: its table and JSON rows, and the fused
path's kernels per layer (at most 10), and the article configuration's exact counts
as README.md states them."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from conftest import require_kernel_runtime

require_kernel_runtime()

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import bench_launches  # noqa: E402


def test_counts_per_component_and_fused_layer_budget(tmp_path, capsys):
    out = tmp_path / "launches.json"
    payload = bench_launches.main(["--tiny", "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "per layer" in printed and "triton" in printed and "reference" in printed
    saved = json.loads(out.read_text())
    assert saved["kind"] == "bench_launches" and saved["results"] == payload["results"]
    rows = {r["backend"]: r for r in saved["results"]}
    fused, eager = rows["triton"], rows["reference"]
    assert fused["fused"] and not eager["fused"] and fused["steps"] == 2
    for r in (fused, eager):
        assert r["total"] == r["model"] + r["sampler"] + r["bookkeeping"]
        assert r["per_layer"] > 0 and r["sampler"] > 0 and r["bookkeeping"] > 0
    # Fused: 4 matmuls + 5 launches per layer at one attention split, all layers alike.
    assert fused["per_layer"] <= 10 and fused["triton"]["model.layers"] == 5 * 2
    assert fused["per_layer"] < eager["per_layer"]
    assert eager["triton"]["model.layers"] == 0 and fused["triton"]["sampler"] > 0


def readme_counts() -> dict[str, int]:
    """The kernels per step that README.md states for the article's configuration at B=1
    (section "The decode engine", the fused decode step's item): "**116 kernels per step**
    (9 per layer, 4 more in the model, 3 for the sampler, 1 for the bookkeeping) against 624
    on the eager path". Parsed, so that the README and the count cannot drift apart."""
    text = " ".join((Path(__file__).parents[2] / "README.md").read_text().split())
    found = re.search(
        r"\*\*(\d+) kernels per step\*\* \((\d+) per layer, (\d+) more in the model, "
        r"(\d+) for the sampler, (\d+) for the bookkeeping\) against (\d+) on the eager path",
        text)
    assert found, "README.md no longer states the kernels per step of the article's config"
    names = ("total", "per_layer", "model_other", "sampler", "bookkeeping", "eager_total")
    return dict(zip(names, map(int, found.groups()), strict=True))


def test_article_config_fits_the_budget_of_130_kernels(tmp_path):
    """The issue's budget, on the article's configuration (hidden 768, 12 layers, 12 heads,
    3 key/value heads) at B=1 with the Triton backend: at most 10 kernels per layer and 130
    per step, model, sampler and bookkeeping together; and exactly the counts README.md
    states, for the Triton path and the eager one. The count is device-independent, so the
    CPU (the interpreter runs the very launches a GPU would) checks it."""
    payload = bench_launches.main(["--device", "cpu", "--backends", "triton", "reference",
                                   "--out", str(tmp_path / "article.json")])
    assert payload["config"]["hidden_size"] == 768
    assert payload["config"]["num_hidden_layers"] == 12
    assert payload["config"]["num_attention_heads"] == 12
    assert payload["config"]["num_key_value_heads"] == 3
    r, eager = payload["results"]
    assert r["backend"] == "triton" and r["batch"] == 1 and r["fused"] and r["steps"] == 2
    assert r["per_layer"] <= 10 and r["total"] <= 130, r
    # What runs: the set-up, chunk and merge kernels and one bookkeeping launch, all Triton
    # (no torch op left around them), and the fused layers' five launches each.
    assert r["sampler"] == r["triton"]["sampler"] == 3
    assert r["bookkeeping"] == r["triton"]["bookkeeping"] == 1
    assert r["triton"]["model.layers"] == 5 * 12
    # The README's numbers, exactly: the fused path component by component (the total is
    # their sum by construction, so each part is checked), and the eager path's total.
    stated = readme_counts()
    layers = payload["config"]["num_hidden_layers"]
    assert (r["total"], r["per_layer"], r["model_other"], r["sampler"], r["bookkeeping"]) == (
        stated["total"], stated["per_layer"], stated["model_other"], stated["sampler"],
        stated["bookkeeping"]), (r, stated)
    assert r["model"] == stated["per_layer"] * layers + stated["model_other"]
    assert eager["backend"] == "reference" and eager["batch"] == 1 and not eager["fused"]
    assert eager["total"] == stated["eager_total"], (eager, stated)
