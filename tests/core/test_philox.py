"""The torch Philox must be Triton's, bit for bit: checked against tl.philox itself."""

import os
import subprocess
import sys
import textwrap

import torch

from lmgen_fast.core.philox import philox_uint32, uniform_noise

# Known answers of Philox4x32-10 (Salmon et al., Random123 test vectors), counter
# (0, 0, 0, 0) with key (0, 0): first output word.
KAT_ZERO = 0x6627E8D5


def test_known_answer_vector():
    out = philox_uint32(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]))
    assert int(out[0]) == KAT_ZERO


def test_uniform_range_and_mean():
    u = uniform_noise(torch.tensor(5), torch.tensor(0), torch.arange(200_000))
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005


def test_matches_triton_philox_under_interpreter():
    script = textwrap.dedent(
        """
        import torch, triton, triton.language as tl
        from lmgen_fast.core.philox import uniform_noise

        @triton.jit
        def k(seed_ptr, u_ptr, step, N: tl.constexpr):
            seed = tl.load(seed_ptr)
            offs = tl.arange(0, N)
            zero = (offs * 0).to(tl.uint32)
            c0, _, _, _ = tl.philox(seed, offs.to(tl.uint32), (zero + step).to(tl.uint32),
                                    zero, zero)
            tl.store(u_ptr + offs, tl.random.uint_to_uniform_float(c0))

        for seed in [0, 12345, 2**40 + 7, 2**63 - 1]:
            for step in [0, 7, 70000]:
                s = torch.tensor([seed], dtype=torch.int64)
                u = torch.empty(256)
                k[(1,)](s, u, step, N=256)
                ref = uniform_noise(s, torch.tensor(step), torch.arange(256))
                assert torch.equal(u, ref), (seed, step)
        print("ok")
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
