"""Counter-based noise: Triton's Philox 4x32-10 and its uint-to-float map, in plain torch.

The noise of token ``i`` at decode step ``s`` of a row with seed ``seed`` is

    u = uint_to_uniform_float(philox(key=(seed_lo, seed_hi), counter=(i, s, 0, 0))[0])

exactly as ``triton.language.random.philox`` and ``uint_to_uniform_float`` compute it
(10 rounds). Because it is a pure function of (seed, step, token), a row's draw does not
depend on its batch mates, a CUDA graph can replay it, and the CPU reproduces the GPU's pick.

The arithmetic is done on int64 tensors holding uint32 values. The product of two 32-bit
numbers needs 64 unsigned bits: int64 multiplication wraps modulo 2**64 (two's complement,
on every backend torch has), so its low word is exact and an arithmetic shift plus a mask
recovers the high word. tests/test_philox.py checks the result against Triton bit for bit.
"""

from __future__ import annotations

import torch

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
N_ROUNDS = 10
MASK32 = 0xFFFFFFFF
# tl.random.uint_to_uniform_float's scale for 32-bit inputs: the largest value with
# (2**31 - 1) * scale < 1 in float32.
UNIFORM_SCALE = 4.6566127342e-10
# The uniform is 0 with probability about 2**-31; clamping it keeps -log(-log(u)) finite,
# so that every candidate has a finite key. Kernels apply the same clamp.
UNIFORM_FLOOR = 2.0**-32


def _mul_const(const: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of ``const * x`` for uint32 ``x`` held in int64.

    Both words carry garbage above bit 31 (the caller masks once after its XORs): every op
    saved counts, since a decode step runs this on a few dozen values at a time.
    """
    product = x * const  # modulo 2**64
    return product >> 32, product


def philox_uint32(
    seed: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor, n_rounds: int = N_ROUNDS
) -> torch.Tensor:
    """First output word of Philox 4x32 for key ``seed`` and counter ``(c0, c1, 0, 0)``.

    Parameters
    ----------
    seed : LongTensor
        Non-negative 64-bit seeds; the key is (low word, high word) as in Triton.
    c0, c1 : LongTensor
        Counter words in ``[0, 2**32)``, broadcastable against ``seed``.

    Returns
    -------
    LongTensor
        Values in ``[0, 2**32)``, of the broadcast shape.
    """
    k0 = seed & MASK32
    k1 = (seed >> 32) & MASK32
    c0, c1, k0, k1 = torch.broadcast_tensors(c0 & MASK32, c1 & MASK32, k0, k1)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for r in range(n_rounds):
        hi_b, lo_b = _mul_const(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_const(PHILOX_ROUND_A, c0)
        # Only the low 32 bits of c1, c3 and the keys matter: the mask after the XOR
        # clears the rest before c0 and c2 are multiplied again.
        c0 = (hi_b ^ c1 ^ (k0 + r * PHILOX_KEY_A)) & MASK32
        c2 = (hi_a ^ c3 ^ (k1 + r * PHILOX_KEY_B)) & MASK32
        c1, c3 = lo_b, lo_a
    return c0


def uint_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """Triton's map of a uint32 (held in int64) to float32 in ``[0, 1)``."""
    signed = torch.where(x >= 2**31, x - 2**32, x)  # bitcast to int32
    signed = torch.where(signed < 0, -signed - 1, signed)
    # A Python float scalar is applied in float32, as the 0-dim tensor was, and makes no
    # host tensor (none may be made inside a CUDA-graph capture).
    return signed.to(torch.float32) * UNIFORM_SCALE


def uniform_noise(seed: torch.Tensor, step: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """``tl.rand``-style uniforms for (seed, step, token); int64 inputs broadcast together."""
    return uint_to_uniform(philox_uint32(seed, token, step))


def gumbel_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """``-log(-log(u))`` with ``u`` clamped away from 0, in float32.

    ``argmax(z + g)`` is the exponential race ``argmax(p_i / E_i)`` with ``E_i = -log(u_i)``.
    """
    return -torch.log(-torch.log(u.clamp_min(UNIFORM_FLOOR)))
