"""The MLP input of the one-token decode step in one launch: the gate/up product and SwiGLU.

``gate_up_swiglu_kernel`` (grid ``[cdiv(M, BLOCK_M), cdiv(I, BLOCK_N)]``) computes, for
``BLOCK_M`` rows and a ``BLOCK_N`` slice of the intermediate size, the matching slices of
the gate product (weight rows ``0 .. I-1``) and of the up product (rows ``I .. 2I-1``),
looping over ``K`` in float32, then, in the order eager rounds::

    gate = round(x @ Wg^T + bg)          # F.linear: float32 sum and bias, rounded once
    up = round(x @ Wu^T + bu)
    out = round(round(silu(gate)) * up)  # silu in float32, rounded, then the product

Row results do not depend on the other rows: every program multiplies ``BLOCK_M`` (always
16) padded rows by the same weight tiles in the same order, so a row of a batch of 1 and of
17 gets the same bits.
"""

from __future__ import annotations

import triton
import triton.language as tl
from lmgen_fast.kernels.rounding import round_to
from lmgen_fast.kernels.sampling_common import device_exp


@triton.jit
def gate_up_swiglu_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, K, inter,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          HAS_BIAS: tl.constexpr, DOT: tl.constexpr, ACCURATE: tl.constexpr):
    # Row blocks vary fastest, so the programs sharing a weight slice run side by side and
    # all but the first read it from L2.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    rmask = rows < M
    cmask = cols < inter
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * K
    g_rows = w_ptr + cols.to(tl.int64)[:, None] * K
    u_rows = w_ptr + (cols.to(tl.int64) + inter)[:, None] * K
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        kmask = k < K
        # Padded rows and columns load zeros: they add nothing to the valid sums.
        x = tl.load(x_rows + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wmask = cmask[:, None] & kmask[None, :]
        wg = tl.load(g_rows + k[None, :], mask=wmask, other=0.0)
        wu = tl.load(u_rows + k[None, :], mask=wmask, other=0.0)
        if DOT:
            # Tensor cores in the model dtype on CUDA; ieee keeps float32 exact (no tf32).
            acc_g += tl.dot(x, tl.trans(wg), input_precision="ieee")
            acc_u += tl.dot(x, tl.trans(wu), input_precision="ieee")
        else:
            # The interpreter cannot tl.dot bfloat16: the same products in float32 (those of
            # two bf16/fp16 values are exact there), each row summed on its own (a matmul's
            # order would depend on the row's place in the tile, and so on the batch).
            xf = x.to(tl.float32)[:, None, :]
            acc_g += tl.sum(xf * wg.to(tl.float32)[None, :, :], axis=2)
            acc_u += tl.sum(xf * wu.to(tl.float32)[None, :, :], axis=2)
    dt = out_ptr.dtype.element_ty
    if HAS_BIAS:
        # F.linear adds the bias to the float32 sum and rounds once.
        acc_g += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(b_ptr + inter + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    gate = round_to(acc_g, dt).to(tl.float32)
    up = round_to(acc_u, dt).to(tl.float32)
    # torch's silu, x / (1 + exp(-x)) in float32, with its expf and an exact division.
    act = round_to(tl.math.div_rn(gate, 1.0 + device_exp(-gate, ACCURATE)), dt).to(tl.float32)
    out = out_ptr + rows.to(tl.int64)[:, None] * inter + cols[None, :]
    tl.store(out, round_to(act * up, dt), mask=rmask[:, None] & cmask[None, :])
