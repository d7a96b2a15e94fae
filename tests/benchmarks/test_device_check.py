"""benchmarks/device_check.sh: its phase budgets fit the deadline of a cold GPU machine, a
benchmark that runs out of time leaves the exit status 0, and a failing GPU test makes it 1
(run with a stub python that answers every command at once)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "device_check.sh"
# The device tool's limit per command is 600 s; its start and the transfers come on top.
TOOL_DEADLINE_S = 530

STUB = """#!/usr/bin/env bash
echo "stub python $*"
case "$*" in
    "-m pytest"*) exit "${STUB_PYTEST_RC:-0}" ;;
    *bench_decode.py*) [ -n "${STUB_SLOW_DECODE:-}" ] && sleep 20 ;;
    *cuda.is_available*) [ -n "${STUB_NO_CUDA:-}" ] && exit 1 ;;
esac
exit 0
"""


def budgets() -> tuple[dict[str, int], int, int]:
    out = subprocess.run(["bash", str(SCRIPT), "--budgets"], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    pairs = dict(line.split() for line in out if line.strip())
    grace, deadline = int(pairs.pop("grace")), int(pairs.pop("deadline"))
    return {k: int(v) for k, v in pairs.items()}, grace, deadline


def test_phase_budgets_and_their_kill_grace_fit_the_deadline():
    phases, grace, deadline = budgets()
    assert {"env", "install", "warm", "launches", "decode", "render"} <= set(phases)
    assert sum(phases.values()) + grace * len(phases) <= deadline <= TOOL_DEADLINE_S
    # The cold compile of ~100 variants (0.3-4.7 s each) and the GPU tests share "warm".
    assert phases["warm"] >= 180


def run_stubbed(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    full = {k: v for k, v in os.environ.items() if k != "OUT"}
    full.update(TMPDIR=str(tmp_path), LMGEN_CHECK_RESULTS=str(tmp_path / "results"), **env)
    return subprocess.run(["bash", str(SCRIPT), str(stub)], capture_output=True, text=True,
                          env=full, timeout=120)


def test_a_benchmark_out_of_time_keeps_exit_0_and_a_failed_gpu_test_gives_1(tmp_path):
    slow = run_stubbed(tmp_path, STUB_SLOW_DECODE="1", LMGEN_CHECK_LIMITS="warm=4 decode=3")
    assert "decode: rc=124 (time limit 3 s)" in slow.stdout, slow.stdout
    assert "warm-decode: rc=124" in slow.stdout
    assert slow.returncode == 0, slow.stdout + slow.stderr
    assert "== results" in slow.stdout  # the tables are still rendered
    failed = run_stubbed(tmp_path, STUB_PYTEST_RC="1")
    assert failed.returncode == 1 and "GPU tests failed" in failed.stdout, failed.stdout
    # pytest's 5 in every file: no GPU test ran at all, which is a failure too.
    none = run_stubbed(tmp_path, STUB_PYTEST_RC="5")
    assert none.returncode == 1, none.stdout
    # Without a CUDA device every gpu test skips and pytest passes: still a failure here.
    no_device = run_stubbed(tmp_path, STUB_NO_CUDA="1")
    assert no_device.returncode == 1 and "no CUDA device" in no_device.stdout, no_device.stdout
