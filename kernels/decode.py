"""Triton kernels of the one-token decode step of a Llama-style model.

Matrix products stay on cuBLAS; these kernels take everything between them, so a layer is
four matmuls and six of these launches (five when the attention needs one split):

* ``add_rmsnorm_kernel`` (grid ``[B]``): ``h = x + residual`` rounded to the model dtype as
  the eager ``x + f(x)`` is, written back as the new residual, then RMSNorm of ``h`` in
  float32, rounded, times the weight and rounded again: the eager module's order;
* ``rope_cache_kernel`` (grid ``[B, H + KV]``): one head per program, "rotate half" with
  each product and the sum rounded as eager does; query heads go to a ``[B, H, D]`` buffer,
  key heads and their value heads into the static cache at the row's position;
* ``attn_partial_kernel`` (grid ``[B, KV, splits]``): one key/value head and all the query
  heads of its group per program, over one split of the row's valid slots
  ``[0, min(position + 1, kv_len))``; online softmax in base 2 (scores pre-multiplied by
  ``log2(e) / sqrt(D)``). With one split it writes the normalised output, else the split's
  running max, sum and unnormalised output for
* ``attn_combine_kernel`` (grid ``[B * H]``): the flash-decoding merge of the splits;
* ``swiglu_kernel`` (grid ``[B, cdiv(I, BLOCK)]``): ``silu(gate)`` rounded, times ``up``,
  rounded, on the fused ``[B, 2I]`` gate/up product.

Sizes that change per model are runtime arguments; only head size, block shapes and the
code-path flags are constexprs, so a model needs few compiled variants.
"""

from __future__ import annotations

import triton
import triton.language as tl
from lmgen_fast.kernels.rounding import round_to


@triton.jit
def add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, n, eps,
                       BLOCK: tl.constexpr, HAS_RES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + row * n + offs, mask=mask, other=0.0)
    dt = x.dtype
    if HAS_RES:
        r = tl.load(res_ptr + row * n + offs, mask=mask, other=0.0)
        # Rounded before normalising: eager adds in the model dtype, then norms that.
        h = round_to(x.to(tl.float32) + r.to(tl.float32), dt)
        tl.store(res_ptr + row * n + offs, h, mask=mask)
    else:
        h = x
    hf = h.to(tl.float32)
    mean_sq = tl.sum(hf * hf, axis=0) / n
    # Correctly rounded sqrt and division rather than rsqrt.approx: closer to the CPU bits.
    normed = round_to(hf / tl.sqrt_rn(mean_sq + eps), dt)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * n + offs, round_to(y, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rope_cache_kernel(qkv_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, cos_ptr, sin_ptr,
                      qkv_stride, n_heads, n_kv_heads, cache_b, cache_h, cache_s,
                      HEAD_DIM: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    HALF: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, HEAD_DIM)
    pos = tl.load(pos_ptr + b)
    # q heads then k heads are contiguous in the fused product, so head i starts at i * D.
    src = qkv_ptr + b * qkv_stride + head * HEAD_DIM
    x = tl.load(src + d)
    dt = x.dtype
    partner = tl.load(src + (d + HALF) % HEAD_DIM).to(tl.float32)
    # Eager casts the tables (float32, or the model dtype after model.to(dtype)) to the
    # model dtype before multiplying.
    cos = round_to(tl.load(cos_ptr + pos * HEAD_DIM + d).to(tl.float32), dt).to(tl.float32)
    sin = round_to(tl.load(sin_ptr + pos * HEAD_DIM + d).to(tl.float32), dt).to(tl.float32)
    sin = tl.where(d < HALF, -sin, sin)
    # Products of two bf16/fp16 values are exact in float32, so rounding each one to the
    # model dtype reproduces eager's per-op rounding bit for bit.
    y = round_to(round_to(x.to(tl.float32) * cos, dt).to(tl.float32)
               + round_to(partner * sin, dt).to(tl.float32), dt)
    if head < n_heads:
        tl.store(q_out_ptr + (b * n_heads + head) * HEAD_DIM + d, y)
    else:
        slot = b * cache_b + (head - n_heads) * cache_h + pos * cache_s
        tl.store(k_cache_ptr + slot + d, y)
        v = tl.load(src + n_kv_heads * HEAD_DIM + d)
        tl.store(v_cache_ptr + slot + d, v)


@triton.jit
def attn_partial_kernel(q_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, out_ptr, m_ptr, l_ptr,
                        acc_ptr, kv_len, group, n_splits, split_len,
                        cache_b, cache_h, cache_s, qk_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                        DOT: tl.constexpr, MMA: tl.constexpr, ONE_SPLIT: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kh = tl.program_id(1)
    split = tl.program_id(2)
    n_heads = group * tl.num_programs(1)
    n = tl.minimum(tl.load(pos_ptr + b) + 1, kv_len)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, n)
    d = tl.arange(0, HEAD_DIM)
    g = tl.arange(0, BLOCK_G)
    gmask = g < group
    rows = b * n_heads + kh * group + g
    q = tl.load(q_ptr + rows[:, None] * HEAD_DIM + d[None, :], mask=gmask[:, None], other=0.0)
    # MMA: products in the cache dtype (tensor cores for bf16/fp16). Without it (the
    # interpreter, whose tl.dot cannot multiply bfloat16) in float32: the same products,
    # as those of two bf16/fp16 values are exact in float32.
    op_dt: tl.constexpr = q.dtype if MMA else tl.float32
    base = b * cache_b + kh * cache_h
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        slots = start + tl.arange(0, BLOCK_N)
        smask = slots < hi
        offs = base + slots[:, None] * cache_s + d[None, :]
        k = tl.load(k_cache_ptr + offs, mask=smask[:, None], other=0.0)
        if DOT:
            # Padded query rows are zeros; ieee keeps float32 products exact (no tf32).
            s = tl.dot(q.to(op_dt), tl.trans(k.to(op_dt)), input_precision="ieee")
        else:
            s = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        s = tl.where(smask[None, :], s * qk_scale, float("-inf"))
        # Every tile holds a valid slot (start < hi), so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + offs, mask=smask[:, None], other=0.0)
        if DOT:
            pv = tl.dot(round_to(p, v.dtype).to(op_dt), v.to(op_dt), input_precision="ieee")
        else:
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    if ONE_SPLIT:
        o = acc / l_i[:, None]
        tl.store(out_ptr + rows[:, None] * HEAD_DIM + d[None, :],
                 round_to(o, out_ptr.dtype.element_ty), mask=gmask[:, None])
    else:
        # An empty split (past the row's length) leaves max -inf, sum 0, output 0.
        part = rows * n_splits + split
        tl.store(m_ptr + part, m_i, mask=gmask)
        tl.store(l_ptr + part, l_i, mask=gmask)
        tl.store(acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=gmask[:, None])


@triton.jit
def attn_combine_kernel(out_ptr, m_ptr, l_ptr, acc_ptr, n_splits,
                        HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    sp = tl.arange(0, BLOCK_S)
    # Two passes over the few split records: the global max first, so the weighted sums
    # need no rescaling (split 0 is never empty, so the max is finite).
    m_all = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        m = tl.load(m_ptr + row * n_splits + s0 + sp, mask=s0 + sp < n_splits,
                    other=float("-inf"))
        m_all = tl.maximum(m_all, m)
    m_max = tl.max(m_all, axis=0)
    l_sum = tl.zeros([BLOCK_S], tl.float32)
    o = tl.zeros([HEAD_DIM], tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        mask = s0 + sp < n_splits
        part = row * n_splits + s0 + sp
        m = tl.load(m_ptr + part, mask=mask, other=float("-inf"))
        w = tl.exp2(m - m_max)
        l_sum += w * tl.load(l_ptr + part, mask=mask, other=0.0)
        a = tl.load(acc_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=mask[:, None],
                    other=0.0)
        o += tl.sum(w[:, None] * a, axis=0)
    o = o / tl.sum(l_sum, axis=0)
    tl.store(out_ptr + row * HEAD_DIM + d, round_to(o, out_ptr.dtype.element_ty))


@triton.jit
def swiglu_kernel(gu_ptr, out_ptr, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = col < inter
    src = gu_ptr + row * 2 * inter + col
    gate = tl.load(src, mask=mask, other=0.0)
    dt = gate.dtype
    up = tl.load(src + inter, mask=mask, other=0.0).to(tl.float32)
    gf = gate.to(tl.float32)
    # Eager rounds silu's result to the model dtype before the product.
    act = round_to(gf / (1.0 + tl.exp(-gf)), dt).to(tl.float32)
    tl.store(out_ptr + row * inter + col, round_to(act * up, out_ptr.dtype.element_ty), mask=mask)
