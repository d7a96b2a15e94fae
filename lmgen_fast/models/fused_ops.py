"""Launchers of the fused decode-step kernels (:mod:`lmgen_fast.kernels.decode`).

Each op has a ``*_call`` function that checks shapes, allocates its outputs and plans the
launch as :class:`~lmgen_fast.runtime.launch.KernelCall` records, using only fixed-shape
torch ops and host integers, so it runs on the ``meta`` device (the ahead-of-time compile
takes its variants from :func:`compile_calls`) and inside CUDA-graph capture: nothing here
reads a tensor's values. The plain function runs the calls. The attention's planning lives
in :mod:`lmgen_fast.models.fused_attention`.
"""

from __future__ import annotations

import torch

from lmgen_fast.core.intmath import cdiv, next_pow2
from lmgen_fast.models.fused_attention import (  # noqa: F401  (part of this module's API)
    FLOAT_DTYPES,
    MAX_SPLITS,
    AttentionPlan,
    attention_call,
    check_float,
    check_head_dim,
    new_counters,
    plan_attention,
)
from lmgen_fast.runtime.launch import KernelCall, run_calls

SWIGLU_BLOCK = 1024


def _kernels():
    from lmgen_fast.kernels import decode

    return decode


def run(calls: list[KernelCall]) -> None:
    """Launch ``calls`` in order (every op launches through here: tests replace it)."""
    run_calls(_kernels(), calls)


# ------------------------------------------------------------------------------- RMSNorm


def norm_warps(block: int) -> int:
    """Warps for a row of ``block`` elements: 8 to 16 per thread, 1 to 16 warps (one row per
    program: at small batches the row's latency is the kernel's, so many threads)."""
    return max(1, min(16, block // 256))


def add_rmsnorm_call(
    x: torch.Tensor, weight: torch.Tensor, eps: float,
    residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> tuple[KernelCall, torch.Tensor]:
    """The launch of :func:`add_rmsnorm` and its output buffer."""
    check_float("x", x)
    n = x.shape[-1]
    if not x.is_contiguous() or weight.shape != (n,) or not weight.is_contiguous():
        raise ValueError("x must be contiguous and weight a contiguous [N] tensor")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or not residual.is_contiguous()):
        raise ValueError("residual must be a contiguous tensor of x's shape and dtype")
    rows = x.numel() // n
    if positions is not None and (positions.dtype != torch.int64 or positions.numel() != rows
                                  or not positions.is_contiguous()):
        raise ValueError("positions must be contiguous int64 with one entry per row")
    if out is None:
        out = torch.empty_like(x)
    block = next_pow2(n)
    call = KernelCall(
        "add_rmsnorm_kernel", (rows,),
        (x, x if residual is None else residual, weight, out,
         x if positions is None else positions, n, float(eps)),
        dict(BLOCK=block, HAS_RES=residual is not None, HAS_POS=positions is not None),
        # No contraction: eager rounds every float32 op.
        dict(num_warps=norm_warps(block), enable_fp_fusion=False),
    )
    return call, out


def add_rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float,
    residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
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
    positions : LongTensor, optional
        Contiguous int64, one entry per row: each is advanced by one (the decode step's
        last use of them precedes this launch).

    Returns
    -------
    Tensor
        ``weight * rms_norm(h.float()).to(dtype)``, the dtype of ``x``.
    """
    call, out = add_rmsnorm_call(x, weight, eps, residual, out, positions)
    run([call])
    return out


def qk_rmsnorm_call(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                    eps: float, n_heads: int, n_kv_heads: int) -> KernelCall:
    """The launch of :func:`qk_rmsnorm` (it writes into ``qkv``)."""
    check_float("qkv", qkv)
    d = q_weight.shape[0]
    check_head_dim(d)
    if (qkv.dim() != 2 or qkv.shape[1] != (n_heads + 2 * n_kv_heads) * d or qkv.stride(1) != 1
            or k_weight.shape != (d,) or not q_weight.is_contiguous()
            or not k_weight.is_contiguous()):
        raise ValueError(f"qkv must be [R, {(n_heads + 2 * n_kv_heads) * d}] with unit last "
                         f"stride and the weights contiguous [{d}]")
    return KernelCall(
        "qk_rmsnorm_kernel", (qkv.shape[0], n_heads + n_kv_heads),
        (qkv, q_weight, k_weight, qkv.stride(0), n_heads, float(eps)),
        dict(HEAD_DIM=d),
        dict(num_warps=norm_warps(d), enable_fp_fusion=False),
    )


def qk_rmsnorm(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
               eps: float, n_heads: int, n_kv_heads: int) -> None:
    """Qwen3's per-head RMSNorm of the query and key heads, in place, one launch.

    Parameters
    ----------
    qkv : Tensor
        ``[R, (H + 2 KV) * D]`` the fused q/k/v product (unit last stride), float32,
        bfloat16 or float16; its q and k heads become ``weight * rms_norm(head.float())
        .to(dtype)`` (``q_weight`` for the H query heads, ``k_weight`` for the KV key heads).
    q_weight, k_weight : Tensor
        ``[D]``, the model's dtype.
    eps : float
    n_heads, n_kv_heads : int
    """
    run([qk_rmsnorm_call(qkv, q_weight, k_weight, eps, n_heads, n_kv_heads)])


def embed_rmsnorm_call(
    ids: torch.Tensor, embedding: torch.Tensor, weight: torch.Tensor, eps: float,
) -> tuple[KernelCall, torch.Tensor, torch.Tensor]:
    """The launch of :func:`embed_rmsnorm`, its normed output and its residual."""
    check_float("embedding", embedding)
    n = embedding.shape[1]
    if embedding.dim() != 2 or not embedding.is_contiguous() or weight.shape != (n,) \
            or not weight.is_contiguous() or weight.dtype != embedding.dtype:
        raise ValueError("embedding must be a contiguous [V, N] table, weight [N] alike")
    if ids.dtype != torch.int64 or ids.dim() != 1 or not ids.is_contiguous():
        raise ValueError("ids must be a contiguous int64 [R] tensor")
    residual = torch.empty(ids.shape[0], n, dtype=embedding.dtype, device=embedding.device)
    out = torch.empty_like(residual)
    block = next_pow2(n)
    call = KernelCall(
        "embed_rmsnorm_kernel", (ids.shape[0],),
        (ids, embedding, weight, residual, out, n, float(eps)),
        dict(BLOCK=block), dict(num_warps=norm_warps(block), enable_fp_fusion=False),
    )
    return call, out, residual


def embed_rmsnorm(
    ids: torch.Tensor, embedding: torch.Tensor, weight: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embedding rows of ``ids`` and their RMSNorm, in one launch.

    Parameters
    ----------
    ids : LongTensor
        ``[R]`` contiguous int64 token ids, each in ``[0, V)`` (not checked).
    embedding : Tensor
        ``[V, N]`` contiguous table (``embed_tokens.weight``).
    weight : Tensor
        ``[N]`` the first layer's input norm weight, the table's dtype.
    eps : float
        The norm's epsilon.

    Returns
    -------
    tuple of Tensor
        ``(normed, residual)``, both ``[R, N]`` in the table's dtype: ``weight *
        rms_norm(e.float()).to(dtype)`` and ``e = embedding[ids]`` (a fresh tensor: the
        residual stream, which :func:`add_rmsnorm` then updates in place).
    """
    call, out, residual = embed_rmsnorm_call(ids, embedding, weight, eps)
    run([call])
    return out, residual


# ------------------------------------------------------------------ rotary + cache write


def check_tables(cos: torch.Tensor, sin: torch.Tensor, head_dim: int,
                 dtype: torch.dtype) -> None:
    """Raise ValueError unless ``cos``/``sin`` are contiguous ``[P, head_dim]`` rotary
    tables, float32 or ``dtype``."""
    if cos.shape[-1] != head_dim or cos.shape != sin.shape or not cos.is_contiguous() \
            or not sin.is_contiguous() or cos.dtype not in (torch.float32, dtype) \
            or sin.dtype != cos.dtype:
        raise ValueError("cos and sin must be contiguous [max_positions, head_dim], float32 "
                         "or qkv's dtype")


def rope_cache_call(
    qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, per_row: int = 1,
) -> tuple[KernelCall, torch.Tensor]:
    """The launch of :func:`rope_cache` and its query buffer."""
    check_float("qkv", qkv)
    n_cache, n_kv, max_len, head_dim = k_cache.shape
    check_head_dim(head_dim)
    rows = n_cache * per_row
    if qkv.shape != (rows, (n_heads + 2 * n_kv) * head_dim) or qkv.stride(1) != 1:
        raise ValueError(
            f"qkv must be [{rows}, {(n_heads + 2 * n_kv) * head_dim}] with unit last stride, "
            f"got {tuple(qkv.shape)}")
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride() \
            or k_cache.stride(3) != 1 or not k_cache.dtype == qkv.dtype == v_cache.dtype:
        raise ValueError("k_cache and v_cache must be alike, unit last stride, qkv's dtype")
    check_tables(cos, sin, head_dim, qkv.dtype)
    if positions.dtype != torch.int64 or positions.numel() != rows:
        raise ValueError("positions must be int64 with one entry per row")
    q = torch.empty(rows, n_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    call = KernelCall(
        "rope_cache_kernel", (rows, n_heads + n_kv),
        (qkv, q, k_cache, v_cache, positions.reshape(rows), cos, sin,
         qkv.stride(0), n_heads, n_kv, per_row, k_cache.stride(0), k_cache.stride(1),
         k_cache.stride(2)),
        dict(HEAD_DIM=head_dim),
        dict(num_warps=1, enable_fp_fusion=False),
    )
    return call, q


def rope_cache(
    qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, per_row: int = 1,
) -> torch.Tensor:
    """Rotary embedding of q and k at each row's position; k and v written into the cache.

    Parameters
    ----------
    qkv : Tensor
        ``[R, (H + 2 * KV) * D]``, the fused q/k/v product of one token per row (q heads,
        then k heads, then v heads), unit last stride; float32, bfloat16 or float16.
    positions : LongTensor
        ``[R]`` (or ``[B, per_row]``) int64, each row's position, below the tables' length
        and the cache's ``max_len`` (not checked: that would read the device).
    cos, sin : Tensor
        ``[max_positions, D]``, the model's ``rotary_emb.cos`` / ``.sin`` as they are (plain,
        not :func:`~lmgen_fast.models.llama.signed_sin`'s form): float32, or qkv's dtype
        once ``model.to(dtype)`` has cast them. Rounded to qkv's dtype, as eager does.
    k_cache, v_cache : Tensor
        ``[R / per_row, KV, max_len, D]`` this layer's static cache (``KVCache.k[layer]``),
        qkv's dtype; flattened row ``r`` writes slot ``positions[r]`` of cache row
        ``r // per_row``.
    n_heads : int
        ``H``, the number of query heads.
    per_row : int
        Tokens per cache row (the multi-position forward's ``T``; 1 in a decode step).

    Returns
    -------
    Tensor
        ``[R, H, D]`` the rotated queries, qkv's dtype.
    """
    call, q = rope_cache_call(qkv, positions, cos, sin, k_cache, v_cache, n_heads, per_row)
    run([call])
    return q


# ------------------------------------------------------------------------------ attention


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
    kv_len: int, plan: AttentionPlan | None = None, counters: torch.Tensor | None = None,
    per_row: int = 1,
) -> torch.Tensor:
    """One query per row against its valid cache slots, GQA, split over the SMs, one launch.

    Row ``r`` attends to slots ``0 .. min(positions[r], kv_len - 1)`` of cache row
    ``r // per_row`` (the mask of ``forward_cached``), softmax scale ``1 / sqrt(D)``,
    float32 accumulation; the online softmax's ``exp2`` is approximate on CUDA, so results
    match eager within a tolerance, deterministically (same bits every run).

    Parameters
    ----------
    q : Tensor
        ``[R, H, D]`` contiguous rotated queries (from :func:`rope_cache`).
    k_cache, v_cache : Tensor
        ``[R / per_row, KV, max_len, D]`` this layer's cache, ``H`` a multiple of ``KV``.
    positions : LongTensor
        ``[R]`` int64 positions of the rows' tokens (already written).
    kv_len : int
        Static bound on the slots read (a host int: it sizes the grid, so a CUDA graph is
        captured per value). Every ``positions[r] < kv_len``.
    plan : AttentionPlan, optional
        Default :func:`plan_attention` for these shapes and the device's SMs.
    counters : Tensor, optional
        :func:`new_counters` ``(R, KV)``, reused across launches (default: a new one).
    per_row : int
        Rows (tokens) per cache row.

    Returns
    -------
    Tensor
        ``[R, H * D]`` q's dtype, heads in order: ``o_proj``'s input.
    """
    call, out = attention_call(q, k_cache, v_cache, positions, kv_len, counters, plan,
                               per_row)
    run([call])
    return out


def rope_attention(
    qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, kv_len: int,
    plan: AttentionPlan | None = None, counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`rope_cache` then :func:`decode_attention` in one launch, one token per row.

    Arguments as theirs (``qkv`` ``[B, (H + 2 KV) * D]``, the caches ``[B, ...]``). Every
    program ropes its group's query heads; the one whose split holds the row's position
    also ropes k, writes k and v into the cache and adds that slot from registers. The
    cache bits are :func:`rope_cache`'s; the output matches the two launches within the
    attention's tolerance (the new slot's score is summed in another order).
    """
    check_tables(cos, sin, k_cache.shape[3], qkv.dtype)
    call, out = attention_call(qkv, k_cache, v_cache, positions, kv_len, counters, plan,
                               rope=(cos, sin, n_heads))
    run([call])
    return out


# -------------------------------------------------------------------------------- SwiGLU


def swiglu_call(gu: torch.Tensor, out: torch.Tensor | None = None,
                accurate: bool | None = None) -> tuple[KernelCall, torch.Tensor]:
    """The launch of :func:`swiglu` and its output buffer; ``accurate`` (default: whether
    ``gu`` is on CUDA) takes the device library's ``exp``, which the interpreter lacks."""
    check_float("gu", gu)
    if not gu.is_contiguous() or gu.shape[-1] % 2:
        raise ValueError("gu must be contiguous with an even last dimension")
    inter = gu.shape[-1] // 2
    rows = gu.numel() // gu.shape[-1]
    if out is None:
        out = torch.empty(*gu.shape[:-1], inter, dtype=gu.dtype, device=gu.device)
    call = KernelCall(
        "swiglu_kernel", (rows, cdiv(inter, SWIGLU_BLOCK)), (gu, out, inter),
        dict(BLOCK=SWIGLU_BLOCK,
             ACCURATE=gu.device.type == "cuda" if accurate is None else accurate),
        dict(num_warps=4, enable_fp_fusion=False),
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
COMPILE_GROUPS = (1, 4)  # elementwise products, tl.dot (every GQA ratio <= 16 is alike)
# (rows, kv_len) with 2 kv heads: one split (tile 16; the dtype's cap at many rows) and many
# splits (tile 16, the cap) under plan_attention's rules.
COMPILE_ATTENTION = ((1, 16), (128, 4096), (1, 512), (1, 8192))


def compile_calls() -> list[KernelCall]:
    """One call per specialisation the launchers choose for the shapes above, planned on
    ``meta`` tensors (every dtype, head size, GQA ratio, tile and constexpr branch)."""
    meta = dict(device="meta")
    calls: list[KernelCall] = []
    for dtype in FLOAT_DTYPES:
        t = dict(dtype=dtype, **meta)
        for hidden in COMPILE_HIDDEN:
            x = torch.empty(2, hidden, **t)
            w = torch.empty(hidden, **t)
            pos = torch.empty(2, dtype=torch.int64, **meta)
            for res, p in ((None, None), (torch.empty(2, hidden, **t), None),
                           (torch.empty(2, hidden, **t), pos)):
                calls.append(add_rmsnorm_call(x, w, 1e-5, res, positions=p)[0])
            calls.append(embed_rmsnorm_call(pos, torch.empty(16, hidden, **t), w, 1e-5)[0])
            calls.append(swiglu_call(torch.empty(2, 2 * hidden, **t), accurate=True)[0])
        for head_dim in COMPILE_HEAD_DIMS:
            calls += _attention_compile_calls(dtype, head_dim)
            w = torch.empty(head_dim, **t)
            calls.append(qk_rmsnorm_call(torch.empty(2, 8 * head_dim, **t), w, w, 1e-6, 4, 2))
    return calls


def _attention_compile_calls(dtype: torch.dtype, head_dim: int) -> list[KernelCall]:
    """:func:`compile_calls`' rotary and attention launches of one dtype and head size."""
    meta = dict(device="meta")
    t = dict(dtype=dtype, **meta)
    tables = [torch.empty(4096, head_dim, dtype=tdt, **meta)
              for tdt in dict.fromkeys((torch.float32, dtype))]
    calls = []
    for group in COMPILE_GROUPS:
        n_kv = 2
        for rows, kv_len in COMPILE_ATTENTION:
            cache = torch.empty(rows, n_kv, kv_len, head_dim, **t)
            qkv = torch.empty(rows, (group + 2) * n_kv * head_dim, **t)
            pos = torch.empty(rows, dtype=torch.int64, **meta)
            q = None
            for cos in tables:
                call, q = rope_cache_call(qkv, pos, cos, cos, cache, cache, group * n_kv)
                calls.append(call)
                calls.append(attention_call(qkv, cache, cache, pos, kv_len, cuda=True,
                                            rope=(cos, cos, group * n_kv))[0])
            calls.append(attention_call(q, cache, cache, pos, kv_len, cuda=True)[0])
    return calls
