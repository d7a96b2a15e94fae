"""Smoke run of benchmarks/bench_score.py on a tiny model.

Not a speed test: it checks that the script runs both backends end to end and that the check
it prints beside the speeds holds: log-likelihoods equal to the harness's hf backend's.
"""

from __future__ import annotations

import json

from conftest import run_benchmark


def test_bench_score_agrees_with_the_hf_backend(tmp_path):
    out = tmp_path / "score.json"
    proc = run_benchmark("bench_score.py", "--tiny", "--docs", "3", "--choices", "2",
                         "--repeats", "1", "--batch-size", "4", "--threads", "1", "--json",
                         str(out))
    data = json.loads(out.read_text())
    assert data["requests"] == 6 and data["tokens"] > 6
    assert data["max_abs_diff"] < 1e-4
    assert data["speedup"] > 0 and "largest log-likelihood difference" in proc.stdout
