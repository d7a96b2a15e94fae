"""Smoke run of benchmarks/bench_hf.py on a tiny run.

Not a speed test: it checks that the script runs both sides end to end and that the check
it prints beside the speeds holds: tokens equal to transformers' greedy ones, with none of
transformers' modules running during lmgen-fast's call.
"""

from __future__ import annotations

import json

from conftest import run_benchmark


def test_bench_hf_matches_transformers_without_running_its_modules(tmp_path):
    out = tmp_path / "hf.json"
    run_benchmark("bench_hf.py", "--families", "qwen2", "qwen3", "--tokens", "4",
                  "--repeats", "1", "--batches", "1", "3", "--json", str(out))
    rows = json.loads(out.read_text())["results"]
    assert [(r["family"], r["batch"]) for r in rows] == \
        [("qwen2", 1), ("qwen2", 3), ("qwen3", 1), ("qwen3", 3)]
    for r in rows:
        assert r["tokens_equal"] is True and r["hf_module_calls"] == 0, r
        assert r["tok_s"]["transformers"] > 0 and r["tok_s"]["lmgen-fast"] > 0
