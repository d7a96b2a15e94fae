"""Rounding a float32 value to the model dtype as eager PyTorch does, shared by the decode
kernels (every op of the eager model rounds its float32 result once)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to(x, dt: tl.constexpr):
    """Float32 ``x`` rounded to ``dt``, to nearest even.

    For bfloat16 the rounding is done on the bits: Triton's interpreter truncates a float32
    to bfloat16 (the GPU rounds to nearest), and the tests compare against eager bits.
    A few integer ops per element in bandwidth-bound kernels; a NaN whose payload lies only
    in the 16 dropped bits would become an infinity.
    """
    if dt == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        y = bits.to(tl.float32, bitcast=True).to(dt)
    else:
        y = x.to(dt)
    return y
