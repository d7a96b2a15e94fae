"""On an H100/H200 (sm_90a) the chunk kernel of the default launch plan fits two blocks per
SM without spilling: registers x threads per block x 2 <= 65536, so one block's loads of
the logits hide behind the other's work.

Compiled ahead of time without a GPU (``lmgen_fast.cli.kernel_compile``, in a subprocess
without ``TRITON_INTERPRET``; ``LMGEN_TRITON_PATH`` puts another Triton first, as in
tests/cli/test_kernel_compile.py), every code path (logits dtype, log-probabilities) of
the chunk kernel at the default chunk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
REGISTERS_PER_SM = 65536

SCRIPT = """
import json
from lmgen_fast.cli import kernel_compile as kc
from lmgen_fast.sampling.launch_plan import CUDA_CHUNK
out = []
for v in kc.covering(kc.sampler_variants()):
    if v.kernel == "chunk_kernel" and dict(v.constexprs)["CHUNK"] == CUDA_CHUNK:
        r = kc.compile_variant(kc._kernel_fn(v.kernel), v, 90)
        out.append(dict(variant=r.variant, registers=r.registers, spills=r.spill_stores
                        + r.spill_loads, warps=dict(v.options)["num_warps"]))
print(json.dumps(out))
"""


def test_default_chunk_kernel_fits_two_blocks_per_sm():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    side = os.environ.get("LMGEN_TRITON_PATH")
    if side:
        env["PYTHONPATH"] = os.pathsep.join([side, str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(reports) >= 6  # three logits dtypes, log-probabilities on and off
    for r in reports:
        assert r["spills"] == 0, r
        assert r["registers"] * 32 * r["warps"] * 2 <= REGISTERS_PER_SM, r
