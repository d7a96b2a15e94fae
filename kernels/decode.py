"""Triton kernels of the decode step of a Llama-style model.

Matrix products stay on cuBLAS; these kernels take everything between them, so a layer of
the one-token step is four matmuls and four of these launches:

* ``embed_rmsnorm_kernel`` (grid ``[R]``): each row's embedding gathered by token id,
  written as the residual, and its RMSNorm (the first layer's input norm): one launch;
* ``add_rmsnorm_kernel`` (grid ``[R]``): ``h = x + residual`` rounded to the model dtype as
  the eager ``x + f(x)`` is, written back as the new residual, then RMSNorm of ``h`` in
  float32, rounded, times the weight and rounded again: the eager module's order. With a
  positions pointer it also advances ``pos[row]`` by one (the step's last read of them is
  behind it);
* ``qk_rmsnorm_kernel`` (grid ``[R, H + KV]``): the per-head RMSNorm of the query and key
  heads (Qwen3's ``q_norm``/``k_norm``) in place in the fused q/k/v product, before the
  rotary; the eager module's roundings;
* ``rope_cache_kernel`` (grid ``[R, H + KV]``): one head per program, "rotate half" with
  each product and the sum rounded as eager does; query heads go to a ``[R, H, D]`` buffer,
  key heads and their value heads into the static cache at the row's position (several
  tokens per cache row: the multi-position forward);
* ``attn_decode_kernel`` (grid ``[R, KV, splits]``): one key/value head and all the query
  heads of its group per program, over one split of the row's valid slots
  ``[0, min(position + 1, kv_len))``; online softmax in base 2 (scores pre-multiplied by
  ``log2(e) / sqrt(D)``). With ``ROPE`` it also does ``rope_cache_kernel``'s work for one
  token per row. Split programs write partials; the last of a (row, kv head) to finish
  merges them in split order: one launch at any context;
* ``swiglu_kernel`` (grid ``[R, cdiv(I, BLOCK)]``): ``silu(gate)`` rounded, times ``up``,
  rounded, on the fused ``[R, 2I]`` gate/up product.

Numerics: every division whose result is compared with eager torch is correctly rounded
(``div_rn``: a plain ``/`` compiles to an approximate division on CUDA), SwiGLU's ``exp`` is
the device library's on CUDA (``device_exp``, torch's own ``expf``). The online softmax keeps
``exp2`` (``ex2.approx`` on CUDA): its tests compare with a tolerance.

Sizes that change per model are runtime arguments; only head size, block shapes and the
code-path flags are constexprs, so a model needs few compiled variants.
"""

from __future__ import annotations

import triton
import triton.language as tl
from lmgen_fast.kernels.rounding import round_to
from lmgen_fast.kernels.sampling_common import device_exp


@triton.jit
def rms_norm_store(h, w_ptr, out_ptr, n, eps, offs, mask):
    """Store ``weight * rms_norm(h)`` at ``out_ptr + offs``, rounded as eager rounds."""
    dt = h.dtype
    hf = h.to(tl.float32)
    mean_sq = tl.math.div_rn(tl.sum(hf * hf, axis=0), n * 1.0)
    # Correctly rounded sqrt and division rather than rsqrt.approx: closer to the CPU bits.
    normed = round_to(tl.math.div_rn(hf, tl.sqrt_rn(mean_sq + eps)), dt)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + offs, round_to(y, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def embed_rmsnorm_kernel(ids_ptr, emb_ptr, w_ptr, res_ptr, out_ptr, n, eps,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    token = tl.load(ids_ptr + row).to(tl.int64)
    h = tl.load(emb_ptr + token * n + offs, mask=mask, other=0.0)
    tl.store(res_ptr + row * n + offs, h, mask=mask)
    rms_norm_store(h, w_ptr, out_ptr + row * n, n, eps, offs, mask)


@triton.jit
def add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, pos_ptr, n, eps,
                       BLOCK: tl.constexpr, HAS_RES: tl.constexpr, HAS_POS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + row * n + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * n + offs, mask=mask, other=0.0)
        # Rounded before normalising: eager adds in the model dtype, then norms that.
        h = round_to(x.to(tl.float32) + r.to(tl.float32), x.dtype)
        tl.store(res_ptr + row * n + offs, h, mask=mask)
    else:
        h = x
    rms_norm_store(h, w_ptr, out_ptr + row * n, n, eps, offs, mask)
    if HAS_POS:
        # The step's last launch that reads positions ran before this one.
        tl.store(pos_ptr + row, tl.load(pos_ptr + row) + 1)


@triton.jit
def qk_rmsnorm_kernel(qkv_ptr, qw_ptr, kw_ptr, qkv_stride, n_heads, eps,
                      HEAD_DIM: tl.constexpr):
    # One query or key head of one row, normed in place in the fused q/k/v product.
    r = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    d = tl.arange(0, HEAD_DIM)
    src = qkv_ptr + r * qkv_stride + head * HEAD_DIM
    x = tl.load(src + d)
    if head < n_heads:
        rms_norm_store(x, qw_ptr, src, HEAD_DIM, eps, d, d < HEAD_DIM)
    else:
        rms_norm_store(x, kw_ptr, src, HEAD_DIM, eps, d, d < HEAD_DIM)


@triton.jit
def rope(x, partner, cos, sin, d, HALF: tl.constexpr):
    """``x * cos + rotate_half(x) * sin`` with eager's roundings; ``partner`` is ``x`` at
    ``(d + HALF) % D``, ``cos``/``sin`` the tables' row (float32 or x's dtype), ``d`` the
    lane's index broadcastable to ``x``."""
    dt = x.dtype
    # Eager casts the tables (float32, or the model dtype after model.to(dtype)) to the
    # model dtype before multiplying.
    c = round_to(cos.to(tl.float32), dt).to(tl.float32)
    s = round_to(sin.to(tl.float32), dt).to(tl.float32)
    s = tl.where(d < HALF, -s, s)
    # Products of two bf16/fp16 values are exact in float32, so rounding each one to the
    # model dtype reproduces eager's per-op rounding bit for bit.
    return round_to(round_to(x.to(tl.float32) * c, dt).to(tl.float32)
                    + round_to(partner.to(tl.float32) * s, dt).to(tl.float32), dt)


@triton.jit
def rope_cache_kernel(qkv_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, cos_ptr, sin_ptr,
                      qkv_stride, n_heads, n_kv_heads, per_row, cache_b, cache_h, cache_s,
                      HEAD_DIM: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    HALF: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, HEAD_DIM)
    pos = tl.load(pos_ptr + b)
    # q heads then k heads are contiguous in the fused product, so head i starts at i * D.
    src = qkv_ptr + b * qkv_stride + head * HEAD_DIM
    y = rope(tl.load(src + d), tl.load(src + (d + HALF) % HEAD_DIM),
             tl.load(cos_ptr + pos * HEAD_DIM + d), tl.load(sin_ptr + pos * HEAD_DIM + d),
             d, HALF)
    if head < n_heads:
        tl.store(q_out_ptr + (b * n_heads + head) * HEAD_DIM + d, y)
    else:
        # ``per_row`` flattened rows (tokens) share one cache row.
        slot = (b // per_row) * cache_b + (head - n_heads) * cache_h + pos * cache_s
        tl.store(k_cache_ptr + slot + d, y)
        tl.store(v_cache_ptr + slot + d, tl.load(src + n_kv_heads * HEAD_DIM + d))


@triton.jit
def attend(q, k_cache_ptr, v_cache_ptr, base, cache_s, lo, hi, qk_scale,
           HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
           DOT: tl.constexpr, MMA: tl.constexpr):
    """Online softmax of the queries ``q`` ``[BLOCK_G, D]`` over the cache slots
    ``[lo, hi)`` at ``base``: the running max (base 2), sum and unnormalised output."""
    d = tl.arange(0, HEAD_DIM)
    # MMA: products in the cache dtype (tensor cores for bf16/fp16). Without it (the
    # interpreter, whose tl.dot cannot multiply bfloat16) in float32: the same products,
    # as those of two bf16/fp16 values are exact in float32.
    op_dt: tl.constexpr = q.dtype if MMA else tl.float32
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
    return m_i, l_i, acc


@triton.jit
def attend_new(q, k, v, m_i, l_i, acc, qk_scale, DOT: tl.constexpr):
    """:func:`attend`'s state with one more slot, held in registers (``k``, ``v`` ``[D]``);
    its probability rounded to the cache dtype as the tiles' ``tl.dot`` takes it."""
    s = tl.sum(q.to(tl.float32) * k.to(tl.float32)[None, :], axis=1) * qk_scale
    m_new = tl.maximum(m_i, s)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new)
    l_i = l_i * alpha + p
    if DOT:
        p = round_to(p, v.dtype).to(tl.float32)
    acc = acc * alpha[:, None] + p[:, None] * v.to(tl.float32)[None, :]
    return m_new, l_i, acc


@triton.jit
def merge_splits(m_ptr, l_ptr, acc_ptr, part0, gmask, n_splits,
                 HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr):
    """The flash-decoding merge of the split records ``part0 + s``, ``s`` in order (so the
    bits do not depend on which program finished last): the normalised ``[BLOCK_G, D]``.
    Loads bypass L1 (``.cg``): the records were written by other SMs."""
    d = tl.arange(0, HEAD_DIM)
    # Two passes: the global max first, so the weighted sums need no rescaling (split 0 is
    # never empty, so the max is finite; padded rows read max 0, sum 1).
    m_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
    for s in range(n_splits):
        m_max = tl.maximum(m_max, tl.load(m_ptr + part0 + s, mask=gmask, other=0.0,
                                          cache_modifier=".cg"))
    l_sum = tl.zeros([BLOCK_G], tl.float32)
    o = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for s in range(n_splits):
        w = tl.exp2(tl.load(m_ptr + part0 + s, mask=gmask, other=0.0, cache_modifier=".cg")
                    - m_max)
        l_sum += w * tl.load(l_ptr + part0 + s, mask=gmask, other=1.0, cache_modifier=".cg")
        a = tl.load(acc_ptr + (part0 + s)[:, None] * HEAD_DIM + d[None, :],
                    mask=gmask[:, None], other=0.0, cache_modifier=".cg")
        o += w[:, None] * a
    return tl.math.div_rn(o, l_sum[:, None])


@triton.jit
def attn_decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, cos_ptr, sin_ptr, out_ptr,
                       m_ptr, l_ptr, acc_ptr, count_ptr, q_stride, kv_len, group, n_splits,
                       split_len, per_row, cache_b, cache_h, cache_s, qk_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                       DOT: tl.constexpr, MMA: tl.constexpr, ONE_SPLIT: tl.constexpr,
                       ROPE: tl.constexpr):
    """One key/value head of one row over one split of its slots; with ``ROPE`` also the
    rotary of its query group and, in the split holding the row's position, of k (k and v
    then written into the cache and the new slot taken from registers). The online
    softmax's ``exp2`` is ``ex2.approx`` on CUDA: compared with eager within a tolerance
    (tests/models/test_decode_attention.py), never bit for bit. The output division is
    correctly rounded; the splits are merged in split order (deterministic).

    Length: rotary, cache write, attention and the merge of the splits in one launch.
    """
    r = tl.program_id(0).to(tl.int64)
    kh = tl.program_id(1)
    split = tl.program_id(2)
    n_kv = tl.num_programs(1)
    HALF: tl.constexpr = HEAD_DIM // 2
    pos = tl.load(pos_ptr + r)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, tl.minimum(pos + 1, kv_len))
    d = tl.arange(0, HEAD_DIM)
    g = tl.arange(0, BLOCK_G)
    gmask = g < group
    heads = kh * group + g
    src = q_ptr + r * q_stride
    q = tl.load(src + heads[:, None] * HEAD_DIM + d[None, :], mask=gmask[:, None], other=0.0)
    # ``per_row`` flattened rows (tokens) share one cache row.
    base = (r // per_row) * cache_b + kh * cache_h
    if ROPE:
        # q is the raw q/k/v product: every program ropes its group's query heads.
        cos = tl.load(cos_ptr + pos * HEAD_DIM + d)
        sin = tl.load(sin_ptr + pos * HEAD_DIM + d)
        partner = tl.load(src + heads[:, None] * HEAD_DIM + ((d + HALF) % HEAD_DIM)[None, :],
                          mask=gmask[:, None], other=0.0)
        q = rope(q, partner, cos[None, :], sin[None, :], d[None, :], HALF)
        # The row's own slot never comes from the cache: this program stores it below, and
        # loads by other threads of the block are not ordered after that store.
        m_i, l_i, acc = attend(q, k_cache_ptr, v_cache_ptr, base, cache_s, lo,
                               tl.minimum(hi, pos), qk_scale, HEAD_DIM, BLOCK_G, BLOCK_N,
                               DOT, MMA)
        if (lo <= pos) & (pos < lo + split_len):
            ksrc = src + (group * n_kv + kh) * HEAD_DIM
            k = rope(tl.load(ksrc + d), tl.load(ksrc + (d + HALF) % HEAD_DIM), cos, sin, d,
                     HALF)
            v = tl.load(ksrc + n_kv * HEAD_DIM + d)
            tl.store(k_cache_ptr + base + pos * cache_s + d, k)
            tl.store(v_cache_ptr + base + pos * cache_s + d, v)
            m_i, l_i, acc = attend_new(q, k, v, m_i, l_i, acc, qk_scale, DOT)
    else:
        m_i, l_i, acc = attend(q, k_cache_ptr, v_cache_ptr, base, cache_s, lo, hi, qk_scale,
                               HEAD_DIM, BLOCK_G, BLOCK_N, DOT, MMA)
    rows = r * group * n_kv + heads
    if ONE_SPLIT:
        tl.store(out_ptr + rows[:, None] * HEAD_DIM + d[None, :],
                 round_to(tl.math.div_rn(acc, l_i[:, None]), out_ptr.dtype.element_ty),
                 mask=gmask[:, None])
    else:
        # An empty split (past the row's length) leaves max -inf, sum 0, output 0.
        part = rows * n_splits + split
        tl.store(m_ptr + part, m_i, mask=gmask)
        tl.store(l_ptr + part, l_i, mask=gmask)
        tl.store(acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=gmask[:, None])
        # All the block's stores before the release (one thread does the atomic), so the
        # program that acquires the last count sees every split's records.
        tl.debug_barrier()
        count = count_ptr + r * n_kv + kh
        if tl.atomic_add(count, 1, sem="acq_rel") == n_splits - 1:
            o = merge_splits(m_ptr, l_ptr, acc_ptr, rows * n_splits, gmask, n_splits,
                             HEAD_DIM, BLOCK_G)
            tl.store(out_ptr + rows[:, None] * HEAD_DIM + d[None, :],
                     round_to(o, out_ptr.dtype.element_ty), mask=gmask[:, None])
            tl.store(count, 0)  # every split has counted: ready for the next launch


@triton.jit
def swiglu_kernel(gu_ptr, out_ptr, inter, BLOCK: tl.constexpr, ACCURATE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = col < inter
    src = gu_ptr + row * 2 * inter + col
    gate = tl.load(src, mask=mask, other=0.0)
    dt = gate.dtype
    up = tl.load(src + inter, mask=mask, other=0.0).to(tl.float32)
    gf = gate.to(tl.float32)
    # torch's silu: x / (1 + expf(-x)) in float32, rounded to the model dtype before the
    # product; ACCURATE (CUDA) takes the device library's expf, as torch's CUDA kernel does.
    act = round_to(tl.math.div_rn(gf, 1.0 + device_exp(-gf, ACCURATE)), dt).to(tl.float32)
    tl.store(out_ptr + row * inter + col, round_to(act * up, out_ptr.dtype.element_ty), mask=mask)
