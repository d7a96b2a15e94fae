"""benchmarks/bench_launches.py on a tiny model: its table and JSON rows, and the fused
path's kernels per layer (at most 10)."""

from __future__ import annotations

import json
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


def test_article_config_fits_the_budget_of_130_kernels(tmp_path):
    """The issue's budget, on the article's configuration (hidden 768, 12 layers, 12 heads,
    3 key/value heads) at B=1 with the Triton backend: at most 10 kernels per layer and 130
    per step, model, sampler and bookkeeping together. The count is device-independent, so
    the CPU (the interpreter runs the very launches a GPU would) checks it."""
    payload = bench_launches.main(["--device", "cpu", "--backends", "triton",
                                   "--out", str(tmp_path / "article.json")])
    assert payload["config"]["hidden_size"] == 768
    assert payload["config"]["num_hidden_layers"] == 12
    assert payload["config"]["num_attention_heads"] == 12
    assert payload["config"]["num_key_value_heads"] == 3
    (r,) = payload["results"]
    assert r["backend"] == "triton" and r["batch"] == 1 and r["fused"] and r["steps"] == 2
    assert r["per_layer"] <= 10 and r["total"] <= 130, r
    # What runs: the set-up, chunk and merge kernels and one bookkeeping launch, all Triton
    # (no torch op left around them), and the fused layers' five launches each.
    assert r["sampler"] == r["triton"]["sampler"] == 3
    assert r["bookkeeping"] == r["triton"]["bookkeeping"] == 1
    assert r["triton"]["model.layers"] == 5 * 12
