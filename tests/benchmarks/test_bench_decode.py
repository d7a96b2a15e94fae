"""Smoke run of benchmarks/bench_decode.py on a tiny model (its GPU parts run on a GPU only).

Not a speed test: it checks that the script runs end to end and reports every row it
promises, so that the benchmark does not rot between GPU sessions.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_decode.py"


def test_bench_decode_runs_and_reports_each_batch(tmp_path):
    out = tmp_path / "decode.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--tokens", "6",
         "--batches", "1", "3", "--naive-tokens", "3", "--repeats", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [r["batch"] for r in data["results"]] == [1, 3]
    first = data["results"][0]["tok_s"]
    assert first["lmgen-fast"] > 0 and first["naive article loop"] > 0
    assert "transformers" in first  # the hf extra is installed where the tests run
    assert "B |" in proc.stdout
