"""bench_sampler.py's modes and device_check.sh, without a GPU.

Not speed tests: they check that the grids the device check runs are the ones it promises,
that the arguments parse, and that the shell script parses and fits its 5 minutes, so that
the one lent GPU run does not fail on a typo.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_sampler  # noqa: E402

from lmgen_fast.sampling import kernel as kernel_sampler  # noqa: E402


def test_quick_grid_is_small_and_representative(capsys):
    assert bench_sampler.main(["--quick", "--list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("quick: 12 configurations")
    configs = bench_sampler.grid("quick")
    assert {c.B for c in configs} == {1, 64}
    assert {c.V for c in configs} == {32000, 128256}
    assert {c.dtype for c in configs} == {"bfloat16"}
    assert {c.filter for c in configs} == {"k=50", "p=.9", "minp=.05"}
    assert len(set(configs)) == len(configs) == 12
    assert configs[0] == bench_sampler.Config(1, 128256, "bfloat16", "k=50")  # most wanted first
    assert all(c.describe() in out for c in configs)


def test_tune_grid_covers_the_launches_and_the_default(capsys):
    assert bench_sampler.main(["--tune", "--list"]) == 0
    assert capsys.readouterr().out.startswith("tune: 10 configurations")
    configs = bench_sampler.grid("tune")
    assert {(c.chunk, c.chunk_warps) for c in configs} == set(bench_sampler.TUNE_LAUNCHES)
    assert {c.B for c in configs} == {1, 64}
    assert {(c.V, c.dtype, c.filter) for c in configs} == {(128256, "bfloat16", "k=50")}
    # Both batch sizes of a launch before the next launch: a cut-short run compares them.
    assert [c.B for c in configs[:2]] == [1, 64]
    plan = kernel_sampler.plan_launch(128256, 50, cuda=True)
    assert (plan.chunk, plan.chunk_warps) in bench_sampler.TUNE_LAUNCHES
    for chunk, warps in bench_sampler.TUNE_LAUNCHES:  # as given, not rounded by the plan
        p = kernel_sampler.plan_launch(128256, 50, cuda=True, chunk=chunk, chunk_warps=warps)
        assert (p.chunk, p.chunk_warps) == (chunk, warps)


def test_full_grid_and_limit(capsys):
    assert len(bench_sampler.grid("full")) == 80
    assert bench_sampler.main(["--list", "--limit", "3"]) == 0
    assert capsys.readouterr().out.startswith("full: 3 configurations")
    with pytest.raises(SystemExit):
        bench_sampler.main(["--quick", "--tune", "--list"])  # one mode at a time


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_without_a_gpu_it_says_so(capsys):
    assert bench_sampler.main(["--quick"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
