"""benchmarks/bench_launches.py on a tiny model: its table and JSON rows, and the fused
path's kernels per layer (at most 8), and the article configuration's exact counts
as README.md states them."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import require_kernel_runtime

require_kernel_runtime()

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import bench_launches  # noqa: E402
import launch_model  # noqa: E402


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
    # Fused, one row: 3 matmuls and 4 Triton launches per layer (attention with its rotary
    # and cache write, norm, gate/up + SwiGLU, norm), all layers alike.
    assert fused["per_layer"] == 7 and fused["triton"]["model.layers"] == 4 * 2
    assert fused["per_layer"] < eager["per_layer"]
    assert eager["triton"]["model.layers"] == 0 and fused["triton"]["sampler"] > 0


def readme_counts() -> dict[str, int]:
    """The kernels per step that README.md states for the article's configuration at B=1
    (section "The decode engine", the fused decode step's item): "**90 kernels per step**
    (7 per layer, 2 more in the model, 3 for the sampler, 1 for the bookkeeping) against ...
    on the eager path". Parsed, so that the README and the count cannot drift apart."""
    text = " ".join((Path(__file__).parents[2] / "README.md").read_text().split())
    found = re.search(
        r"\*\*(\d+) kernels per step\*\* \((\d+) per layer, (\d+) more in the model, "
        r"(\d+) for the sampler, (\d+) for the bookkeeping\) against (\d+) on the eager path",
        text)
    assert found, "README.md no longer states the kernels per step of the article's config"
    names = ("total", "per_layer", "model_other", "sampler", "bookkeeping", "eager_total")
    return dict(zip(names, map(int, found.groups()), strict=True))


def test_article_config_fits_the_budget_of_100_kernels(tmp_path):
    """The issue's budget, on the article's configuration (hidden 768, 12 layers, 12 heads,
    3 key/value heads) at B=1 with the Triton backend, at a context of one attention split
    and of many: at most 8 kernels per layer and 100 per step, model, sampler and
    bookkeeping together; and exactly the counts README.md states, for the Triton path and
    the eager one. The count is device-independent, so the
    CPU (the interpreter runs the very launches a GPU would) checks it."""
    payload = bench_launches.main(["--device", "cpu", "--backends", "triton", "reference",
                                   "--contexts", "16", "512", "--tokens", "2",
                                   "--out", str(tmp_path / "article.json")])
    assert payload["config"]["hidden_size"] == 768
    assert payload["config"]["num_hidden_layers"] == 12
    assert payload["config"]["num_attention_heads"] == 12
    assert payload["config"]["num_key_value_heads"] == 3
    rows = {(r["backend"], r["context"]): r for r in payload["results"]}
    assert set(rows) == {(b, c) for b in ("triton", "reference") for c in (16, 512)}
    stated = readme_counts()
    layers = payload["config"]["num_hidden_layers"]
    for context in (16, 512):
        r, eager = rows[("triton", context)], rows[("reference", context)]
        assert r["batch"] == 1 and r["fused"] and r["steps"] == 1
        assert r["per_layer"] <= 8 and r["total"] <= 100, r
        # What runs: the set-up, chunk and merge kernels and one bookkeeping launch, all
        # Triton; per layer 3 matmuls and 4 Triton launches; no dtype copy anywhere (the
        # sampler's flags are read as packed: no ``.to(torch.int8)`` per step).
        assert not any(k in r["kernels"] for k in ("aten::to", "aten::_to_copy"))
        assert r["sampler"] == r["triton"]["sampler"] == 3
        assert r["bookkeeping"] == r["triton"]["bookkeeping"] == 1
        assert r["triton"]["model.layers"] == 4 * layers
        # The README's numbers, exactly, at either context (one attention launch at any
        # split count): the fused path component by component (the total is their sum by
        # construction, so each part is checked), and the eager path's total.
        assert (r["total"], r["per_layer"], r["model_other"], r["sampler"],
                r["bookkeeping"]) == (stated["total"], stated["per_layer"],
                                      stated["model_other"], stated["sampler"],
                                      stated["bookkeeping"]), (r, stated)
        assert r["model"] == stated["per_layer"] * layers + stated["model_other"]
        assert eager["batch"] == 1 and not eager["fused"]
        assert eager["total"] == stated["eager_total"], (eager, stated)


def test_a_dtype_copy_in_a_step_is_counted(tmp_path, monkeypatch):
    """A ``.to(dtype)`` is a kernel on CUDA (aten::_to_copy): one added to each decode step
    adds exactly one launch per step, an aten one, under the bookkeeping."""
    args = ["--tiny", "--device", "cpu", "--backends", "reference", "--out",
            str(tmp_path / "plain.json")]
    plain = bench_launches.main(args)["results"][0]
    source = torch.randn(5)
    advance = bench_launches.Stepper.advance

    def advance_with_a_copy(self, *a, **k):
        source.to(torch.int8)
        return advance(self, *a, **k)

    monkeypatch.setattr(bench_launches.Stepper, "advance", advance_with_a_copy)
    copied = bench_launches.main(args[:-1] + [str(tmp_path / "copy.json")])["results"][0]
    assert copied["total"] == plain["total"] + 1 and copied["bookkeeping"] == \
        plain["bookkeeping"] + 1
    assert copied["by_kind"]["aten"] == plain["by_kind"]["aten"] + 1
    copies = ("aten::to", "aten::_to_copy", "aten::copy_")
    assert sum(copied["kernels"].get(c, 0) - plain["kernels"].get(c, 0) for c in copies) == 1
    assert copied["by_kind"]["cublas"] == plain["by_kind"]["cublas"] > 0  # the matmuls


def test_contexts_count_the_attention_splits(tmp_path):
    """One split at a short context, several at a long one: the attention stays one launch
    per layer either way (its splits merge inside it); every launch is recorded by kind,
    Triton ones by kernel name."""
    payload = bench_launches.main(["--tiny", "--device", "cpu", "--backends", "triton",
                                   "--contexts", "16", "300", "--tokens", "2",
                                   "--out", str(tmp_path / "ctx.json")])
    short, long = payload["results"]
    assert (short["context"], long["context"]) == (16, 300)
    layers = payload["config"]["num_hidden_layers"]
    assert long["total"] == short["total"]
    for r in (short, long):
        assert sum(r["by_kind"].values()) == r["total"]
        assert r["by_kind"]["triton"] == sum(r["triton"].values())
        assert r["kernels"]["attn_decode_kernel"] == layers
        assert not any(k in r["kernels"] for k in ("attn_partial_kernel",
                                                   "attn_combine_kernel",
                                                   "rope_cache_kernel"))
        # One row: q/k/v, o_proj and down_proj per layer and lm_head reach cuBLAS; the
        # gate/up product is the fused MLP's Triton launch.
        assert r["by_kind"]["cublas"] == 3 * layers + 1
        assert r["kernels"]["gate_up_swiglu_kernel"] == layers


def test_predict_h200_per_kernel_from_the_real_shapes(tmp_path):
    """--predict h200: each kernel's time is max(bytes / 3.6 TB/s, floor), the step the sum,
    for both models at B = 1 and 64, context 512, from the real shapes' bytes."""
    payload = bench_launches.main(["--predict", "h200", "--device", "cpu",
                                   "--out", str(tmp_path / "predict.json")])
    assert payload["results"] == []  # nothing counted on the configured model
    got = {(p["model"], p["batch"]): p for p in payload["predicted"]}
    assert set(got) == {(m, b) for m in ("article", "llama-3.2-1b") for b in (1, 64)}
    for (model, batch), p in got.items():
        shapes = launch_model.MODELS[model]
        for k in p["kernels"]:
            floor = launch_model.FLOOR_US[k["kind"]] * k["launches"]
            assert k["predicted_us"] >= floor - 1e-9
            assert k["predicted_us"] >= k["bytes"] / 3.6e12 * 1e6 - 1e-9
        assert p["predicted_us"] == pytest.approx(sum(k["predicted_us"] for k in p["kernels"]))
        assert p["roofline_share"] == pytest.approx(p["bytes"] / 3.6e12 * 1e6 / p["predicted_us"])
        lm_head = next(k for k in p["kernels"] if k["name"] == "matmul hidden->vocab")
        h, v = shapes.hidden, shapes.vocab
        assert lm_head["bytes"] == 2 * (h * v + batch * (h + v)) and lm_head["launches"] == 1
        names = {k["name"]: k for k in p["kernels"]}
        layers = shapes.layers
        assert names["attn_decode_kernel"]["launches"] == layers
        assert "attn_combine_kernel" not in names  # the splits merge inside the launch
        # The attention reads the context's K and V slots, not the whole cache, and with
        # several splits writes and reads back their float32 records.
        kv = 2 * batch * 512 * shapes.kv_heads * shapes.head_dim * 2 * layers
        records = 0 if p["splits"] == 1 else \
            2 * batch * shapes.heads * p["splits"] * (shapes.head_dim + 2) * 4 * layers
        assert kv + records < names["attn_decode_kernel"]["bytes"] < 1.1 * (kv + records)
    # The article's step at B=1: README's count, and the targets (at most 100
    # launches, at most 350 us predicted) at 32 splits of 16 slots.
    article = got[("article", 1)]
    assert article["splits"] == 32
    assert article["launches"] == readme_counts()["total"] <= 100
    assert article["predicted_us"] <= 350
    assert got[("llama-3.2-1b", 64)]["splits"] == 1
