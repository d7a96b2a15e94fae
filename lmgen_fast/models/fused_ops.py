"""Launchers of the fused decode-step kernels (:mod:`lmgen_fast.kernels.decode`).

Each op has a ``*_call`` function that checks shapes, allocates its outputs and plans the
launch as :class:`~lmgen_fast.runtime.launch.KernelCall` records, using only fixed-shape
torch ops and host integers, so it runs on the ``meta`` device (the ahead-of-time compile
takes its variants from :func:`compile_calls`) and inside CUDA-graph capture: nothing here
reads a tensor's values. The plain function runs the calls.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from lmgen_fast.core.intmath import cdiv, next_pow2
from lmgen_fast.runtime.launch import KernelCall, run_calls

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Programs to aim for when splitting the sequence: two per SM of an H100/H200 (132 SMs).
TARGET_PROGRAMS = 264
MAX_SPLITS = 64
COMBINE_BLOCK = 16  # split records per iteration of the combine kernel
SWIGLU_BLOCK = 1024
LOG2E = 1.4426950408889634


def _kernels():
    from lmgen_fast.kernels import decode

    return decode


def run(calls: list[KernelCall]) -> None:
    """Launch ``calls`` in order (every op launches through here: tests replace it)."""
    run_calls(_kernels(), calls)


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def _check_head_dim(head_dim: int) -> None:
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")


# ------------------------------------------------------------------------------- RMSNorm


def norm_warps(block: int) -> int:
    """Warps for a row of ``block`` elements: 8 to 16 per thread, 1 to 16 warps (one row per
    program: at small batches the row's latency is the kernel's, so many threads)."""
    return max(1, min(16, block // 256))


def add_rmsnorm_call(
    x: torch.Tensor, weight: torch.Tensor, eps: float,
    residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
) -> tuple[KernelCall, torch.Tensor]:
    """The launch of :func:`add_rmsnorm` and its output buffer."""
    _check_float("x", x)
    n = x.shape[-1]
    if not x.is_contiguous() or weight.shape != (n,) or not weight.is_contiguous():
        raise ValueError("x must be contiguous and weight a contiguous [N] tensor")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or not residual.is_contiguous()):
        raise ValueError("residual must be a contiguous tensor of x's shape and dtype")
    if out is None:
        out = torch.empty_like(x)
    rows = x.numel() // n
    block = next_pow2(n)
    call = KernelCall(
        "add_rmsnorm_kernel", (rows,),
        (x, x if residual is None else residual, weight, out, n, float(eps)),
        dict(BLOCK=block, HAS_RES=residual is not None),
        # No contraction: eager rounds every float32 op.
        dict(num_warps=norm_warps(block), enable_fp_fusion=False),
    )
    return call, out


def add_rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float,
    residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """RMSNorm of ``x + residual`` (or of ``x``), the residual updated in place.

    Parameters
    ----------
    x : Tensor
        ``[..., N]`` contiguous, float32, bfloat16 or float16 (e.g. ``o_proj``'s output).
    weight : Tensor
        ``[N]`` the norm's weight (the model's dtype).
    eps : float
        The norm's epsilon (``config.rms_norm_eps``).
    residual : Tensor, optional
        Same shape and dtype as ``x``. When given, ``h = x + residual`` (rounded to the
        dtype, as eager's ``x + f(x)``) is written into ``residual`` and normalised.
    out : Tensor, optional
        Where to write the result (same shape and dtype as ``x``).

    Returns
    -------
    Tensor
        ``weight * rms_norm(h.float()).to(dtype)``, the dtype of ``x``.
    """
    call, out = add_rmsnorm_call(x, weight, eps, residual, out)
    run([call])
    return out


# ------------------------------------------------------------------ rotary + cache write


def rope_cache_call(
    qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int,
) -> tuple[KernelCall, torch.Tensor]:
    """The launch of :func:`rope_cache` and its query buffer."""
    _check_float("qkv", qkv)
    batch, n_kv, max_len, head_dim = k_cache.shape
    _check_head_dim(head_dim)
    if qkv.shape != (batch, (n_heads + 2 * n_kv) * head_dim) or qkv.stride(1) != 1:
        raise ValueError(
            f"qkv must be [{batch}, {(n_heads + 2 * n_kv) * head_dim}] with unit last stride, "
            f"got {tuple(qkv.shape)}")
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride() \
            or k_cache.stride(3) != 1 or not k_cache.dtype == qkv.dtype == v_cache.dtype:
        raise ValueError("k_cache and v_cache must be alike, unit last stride, qkv's dtype")
    if cos.shape[-1] != head_dim or cos.shape != sin.shape or not cos.is_contiguous() \
            or not sin.is_contiguous() or cos.dtype not in (torch.float32, qkv.dtype) \
            or sin.dtype != cos.dtype:
        raise ValueError("cos and sin must be contiguous [max_positions, head_dim], float32 "
                         "or qkv's dtype")
    if positions.dtype != torch.int64 or positions.numel() != batch:
        raise ValueError("positions must be int64 with one entry per row")
    q = torch.empty(batch, n_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    call = KernelCall(
        "rope_cache_kernel", (batch, n_heads + n_kv),
        (qkv, q, k_cache, v_cache, positions.reshape(batch), cos, sin,
         qkv.stride(0), n_heads, n_kv, k_cache.stride(0), k_cache.stride(1),
         k_cache.stride(2)),
        dict(HEAD_DIM=head_dim),
        dict(num_warps=1, enable_fp_fusion=False),
    )
    return call, q


def rope_cache(
    qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int,
) -> torch.Tensor:
    """Rotary embedding of q and k at each row's position; k and v written into the cache.

    Parameters
    ----------
    qkv : Tensor
        ``[B, (H + 2 * KV) * D]``, the fused q/k/v product of one token per row (q heads,
        then k heads, then v heads), unit last stride; float32, bfloat16 or float16.
    positions : LongTensor
        ``[B]`` (or ``[B, 1]``) int64, each row's position, below the tables' length and
        the cache's ``max_len`` (not checked: that would read the device).
    cos, sin : Tensor
        ``[max_positions, D]``, the model's ``rotary_emb.cos`` / ``.sin`` as they are (plain,
        not :func:`~lmgen_fast.models.llama.signed_sin`'s form): float32, or qkv's dtype
        once ``model.to(dtype)`` has cast them. Rounded to qkv's dtype, as eager does.
    k_cache, v_cache : Tensor
        ``[B, KV, max_len, D]`` this layer's static cache (``KVCache.k[layer]``), qkv's
        dtype; slot ``positions[b]`` of row ``b`` is overwritten.
    n_heads : int
        ``H``, the number of query heads.

    Returns
    -------
    Tensor
        ``[B, H, D]`` the rotated queries, qkv's dtype.
    """
    call, q = rope_cache_call(qkv, positions, cos, sin, k_cache, v_cache, n_heads)
    run([call])
    return q


# ------------------------------------------------------------------------------ attention


class AttentionPlan(NamedTuple):
    """How the decode attention is launched: ``n_splits`` programs per (row, kv head), each
    over ``split_len`` slots in tiles of ``block_n``; ``block_g`` query rows per program."""

    block_n: int
    block_g: int
    dot: bool
    split_len: int
    n_splits: int
    num_warps: int


def plan_attention(
    batch: int, n_kv_heads: int, group: int, head_dim: int, kv_len: int,
    dtype: torch.dtype = torch.bfloat16, split_len: int | None = None,
    target_programs: int = TARGET_PROGRAMS,
) -> AttentionPlan:
    """Tiles and sequence splits for :func:`decode_attention`, from host integers only.

    Splits grow until ``batch * n_kv_heads * splits`` reaches ``target_programs`` (keeping
    the SMs busy at small batches), at least two tiles each and at most :data:`MAX_SPLITS`.
    ``split_len`` forces the split length (rounded up to whole tiles).
    """
    _check_head_dim(head_dim)
    if kv_len < 1 or group < 1:
        raise ValueError("kv_len and group must be positive")
    # 64 slots of rows up to 128 bytes (bf16 D=64), else 32: float32 tiles of 64 x 64 and
    # of 16 x 128 slots each spilled 4 bytes on sm_80 (ptxas). A group of query heads
    # becomes the M side of tl.dot, which needs 16 rows, so a single query head (no GQA)
    # uses elementwise products instead.
    itemsize = dtype.itemsize  # no tensor: this runs inside captured steps
    block_n = 64 if head_dim * itemsize <= 128 else 32
    dot = group > 1
    block_g = max(16, next_pow2(group)) if dot else 1
    if split_len is None:
        splits = min(cdiv(target_programs, batch * n_kv_heads), MAX_SPLITS,
                     max(1, kv_len // (2 * block_n)))
        split_len = cdiv(kv_len, max(1, splits))
    split_len = cdiv(split_len, block_n) * block_n
    n_splits = cdiv(kv_len, split_len)
    if n_splits > MAX_SPLITS:
        raise ValueError(f"{n_splits} splits exceed {MAX_SPLITS}: choose a longer split_len")
    return AttentionPlan(block_n, block_g, dot, split_len, n_splits, 4)


def attention_calls(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
    kv_len: int, plan: AttentionPlan | None = None, cuda: bool | None = None,
) -> tuple[list[KernelCall], torch.Tensor]:
    """The launches of :func:`decode_attention` and its output buffer.

    ``cuda`` (default: whether ``q`` is on CUDA) selects tensor-core products in the cache
    dtype; without it they are taken in float32 (same values), which the interpreter needs.
    """
    _check_float("q", q)
    batch, n_heads, head_dim = q.shape
    n_kv = k_cache.shape[1]
    if k_cache.shape[0] != batch or k_cache.shape[3] != head_dim or n_heads % n_kv \
            or k_cache.stride(3) != 1 or v_cache.shape != k_cache.shape \
            or v_cache.stride() != k_cache.stride() or not q.is_contiguous():
        raise ValueError("q must be contiguous [B, H, D], the caches alike [B, KV, S, D]")
    if not 1 <= kv_len <= k_cache.shape[2]:
        raise ValueError(f"kv_len {kv_len} outside [1, {k_cache.shape[2]}]")
    if positions.dtype != torch.int64 or positions.numel() != batch:
        raise ValueError("positions must be int64 with one entry per row")
    group = n_heads // n_kv
    if plan is None:
        plan = plan_attention(batch, n_kv, group, head_dim, kv_len, q.dtype)
    one = plan.n_splits == 1
    dev = q.device
    out = torch.empty(batch, n_heads * head_dim, dtype=q.dtype, device=dev)
    if one:
        m = lsum = acc = out  # never touched with one split
    else:
        f32 = dict(dtype=torch.float32, device=dev)
        m = torch.empty(batch, n_heads, plan.n_splits, **f32)
        lsum = torch.empty(batch, n_heads, plan.n_splits, **f32)
        acc = torch.empty(batch, n_heads, plan.n_splits, head_dim, **f32)
    partial = KernelCall(
        "attn_partial_kernel", (batch, n_kv, plan.n_splits),
        (q, k_cache, v_cache, positions.reshape(batch), out, m, lsum, acc,
         kv_len, group, plan.n_splits, plan.split_len,
         k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
         LOG2E / math.sqrt(head_dim)),
        dict(HEAD_DIM=head_dim, BLOCK_G=plan.block_g, BLOCK_N=plan.block_n, DOT=plan.dot,
             MMA=q.device.type == "cuda" if cuda is None else cuda, ONE_SPLIT=one),
        # Contraction on: the sums of products gain accuracy (Triton 3.10 turns it off by
        # default).
        dict(num_warps=plan.num_warps, enable_fp_fusion=True),
    )
    if one:
        return [partial], out
    combine = KernelCall(
        "attn_combine_kernel", (batch * n_heads,),
        (out, m, lsum, acc, plan.n_splits),
        dict(HEAD_DIM=head_dim, BLOCK_S=COMBINE_BLOCK),
        dict(num_warps=4, enable_fp_fusion=True),
    )
    return [partial, combine], out


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
    kv_len: int, plan: AttentionPlan | None = None,
) -> torch.Tensor:
    """One query per row against each row's valid cache slots, GQA, flash-decoding splits.

    Row ``b`` attends to slots ``0 .. min(positions[b], kv_len - 1)`` (the mask of
    ``forward_cached``), softmax scale ``1 / sqrt(D)``, float32 accumulation.

    Parameters
    ----------
    q : Tensor
        ``[B, H, D]`` contiguous rotated queries (from :func:`rope_cache`).
    k_cache, v_cache : Tensor
        ``[B, KV, max_len, D]`` this layer's cache, ``H`` a multiple of ``KV``.
    positions : LongTensor
        ``[B]`` int64 positions of the rows' current tokens (already written).
    kv_len : int
        Static bound on the slots read (a host int: it sizes the grid, so a CUDA graph is
        captured per value). Every ``positions[b] < kv_len``.
    plan : AttentionPlan, optional
        Default :func:`plan_attention` for these shapes.

    Returns
    -------
    Tensor
        ``[B, H * D]`` q's dtype, heads in order: ``o_proj``'s input.
    """
    calls, out = attention_calls(q, k_cache, v_cache, positions, kv_len, plan)
    run(calls)
    return out


# -------------------------------------------------------------------------------- SwiGLU


def swiglu_call(gu: torch.Tensor, out: torch.Tensor | None = None
                ) -> tuple[KernelCall, torch.Tensor]:
    """The launch of :func:`swiglu` and its output buffer."""
    _check_float("gu", gu)
    if not gu.is_contiguous() or gu.shape[-1] % 2:
        raise ValueError("gu must be contiguous with an even last dimension")
    inter = gu.shape[-1] // 2
    rows = gu.numel() // gu.shape[-1]
    if out is None:
        out = torch.empty(*gu.shape[:-1], inter, dtype=gu.dtype, device=gu.device)
    call = KernelCall(
        "swiglu_kernel", (rows, cdiv(inter, SWIGLU_BLOCK)), (gu, out, inter),
        dict(BLOCK=SWIGLU_BLOCK), dict(num_warps=4, enable_fp_fusion=False),
    )
    return call, out


def swiglu(gu: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up`` on the fused gate/up product, rounded as eager rounds.

    Parameters
    ----------
    gu : Tensor
        ``[..., 2 * I]`` contiguous: ``gate_proj``'s output then ``up_proj``'s (the product
        with ``cat([gate_proj.weight, up_proj.weight])``).
    out : Tensor, optional
        ``[..., I]`` gu's dtype.

    Returns
    -------
    Tensor
        ``[..., I]`` gu's dtype: ``down_proj``'s input.
    """
    call, out = swiglu_call(gu, out)
    run([call])
    return out


# ------------------------------------------------------------------- ahead-of-time compile

COMPILE_HIDDEN = (768, 2048, 4096, 8192)  # article, Llama-3.2-1B, 7/8B, 70B
COMPILE_HEAD_DIMS = (64, 128)
COMPILE_GROUPS = (1, 4, 12)
# One split (short context or many rows) and many splits (long context at one row).
COMPILE_KV_LENS = (48, 4096)


def compile_calls() -> list[KernelCall]:
    """One call per specialisation the launchers choose for the shapes above, planned on
    ``meta`` tensors (every dtype, head size, GQA ratio and constexpr branch)."""
    meta = dict(device="meta")
    calls: list[KernelCall] = []
    for dtype in FLOAT_DTYPES:
        t = dict(dtype=dtype, **meta)
        for hidden in COMPILE_HIDDEN:
            x = torch.empty(2, hidden, **t)
            w = torch.empty(hidden, **t)
            for res in (None, torch.empty(2, hidden, **t)):
                calls.append(add_rmsnorm_call(x, w, 1e-5, res)[0])
            calls.append(swiglu_call(torch.empty(2, 2 * hidden, **t))[0])
        for head_dim in COMPILE_HEAD_DIMS:
            tables = [torch.empty(4096, head_dim, dtype=tdt, **meta)
                      for tdt in dict.fromkeys((torch.float32, dtype))]
            for group in COMPILE_GROUPS:
                n_kv = 2
                cache = torch.empty(1, n_kv, 4096, head_dim, **t)
                qkv = torch.empty(1, (group + 2) * n_kv * head_dim, **t)
                pos = torch.empty(1, dtype=torch.int64, **meta)
                for cos in tables:
                    call, q = rope_cache_call(qkv, pos, cos, cos, cache, cache, group * n_kv)
                    calls.append(call)
                for kv_len in COMPILE_KV_LENS:
                    calls += attention_calls(q, cache, cache, pos, kv_len, cuda=True)[0]
    return calls
