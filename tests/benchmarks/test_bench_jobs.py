"""Smoke run of benchmarks/bench_jobs.py on a short job.

Not a speed test: it checks that the script runs both modes end to end, that they agree on
every row, and that its counts add up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_jobs.py"


def test_bench_jobs_runs_both_modes_and_their_counts_add_up(tmp_path):
    out = tmp_path / "jobs.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--prompts", "7", "--batch-size", "3", "--threads", "1",
         "--max-tokens", "2", "5", "9", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    static, continuous = data["runs"]
    assert (static["mode"], continuous["mode"]) == ("static", "continuous")
    assert data["identical"] is True
    assert static["tokens"] == continuous["tokens"] > 0
    # 3 slots while prompts wait; the tail compacts to fewer.
    assert continuous["steps"] <= continuous["slot_steps"] < 3 * continuous["steps"]
    for run in data["runs"]:
        assert run["rows"] == 7
        assert run["slot_utilization"] == round(100 * run["tokens"] / run["slot_steps"], 1)
    assert "| continuous |" in proc.stdout and "python benchmarks/bench_jobs.py" in proc.stdout


def test_bench_jobs_rollout_prefills_once_and_matches_the_seeded_calls(tmp_path):
    out = tmp_path / "rollout.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--job", "rollout", "--prompts", "3", "--n", "3",
         "--repeats", "1", "--threads", "1", "--max-tokens", "2", "4", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    one, seeded = data["runs"]
    assert data["identical"] is True and (one["calls"], seeded["calls"]) == (1, 3)
    assert one["tokens"] == seeded["tokens"] > 0
    # One padded batch either way: the one call prefills each prompt once, the calls 3 times.
    assert 3 * one["prefill_positions"] == seeded["prefill_positions"] > 0
    assert "| n=3 in one call |" in proc.stdout
