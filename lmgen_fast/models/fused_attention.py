"""Planning of the decode attention launch (:func:`~lmgen_fast.kernels.decode.
attn_decode_kernel`): sequence splits, tiles, and the :class:`KernelCall` itself, from host
integers and fixed-shape tensors only (it runs on ``meta`` tensors and inside CUDA-graph
capture). :mod:`lmgen_fast.models.fused_ops` runs the calls.

One launch at any context: the split programs of a (row, kv head) write partial records;
the last one to finish (an int32 counter per (row, kv head), counted with acquire-release
atomics and reset to 0 by that program) merges them in split order, so the result does not
depend on the order programs finish in. The counters live in a persistent zeroed buffer
(:func:`new_counters`, allocated once per step object and shape: a ``torch.zeros`` per call
would be a launch).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from lmgen_fast.core.intmath import cdiv, next_pow2
from lmgen_fast.runtime.launch import KernelCall

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# SMs assumed by default (predictions, the ahead-of-time compile): an H100/H200's.
DEFAULT_SMS = 132
INTERPRETER_PROGRAMS = 8
MAX_SPLITS = 64  # partial records per (row, head): the merge reads them all, in order
MIN_SPLIT = 16  # slots per split at least: one tile of tl.dot's smallest N
LOG2E = 1.4426950408889634


def check_float(name: str, t: torch.Tensor) -> None:
    """Raise ValueError unless ``t`` is float32, bfloat16 or float16."""
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def check_head_dim(head_dim: int) -> None:
    """Raise ValueError unless ``head_dim`` is a power of two ``>= 16`` (the tiles')."""
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device | str) -> int:
    """Streaming multiprocessors of ``device`` when it is a CUDA device (a host query,
    cached: safe inside graph capture), else :data:`INTERPRETER_PROGRAMS`: the interpreter
    runs programs one after another, so a GPU's worth of splits only costs it time (17 s
    per step of the article's model at 512 slots); the tests force many splits through
    ``split_len``."""
    device = torch.device(device)
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return _cuda_sms(torch.cuda.current_device() if device.index is None else device.index)


def new_counters(rows: int, n_kv_heads: int, device: torch.device | str) -> torch.Tensor:
    """A zeroed int32 ``[rows * n_kv_heads]`` counter buffer for :func:`attention_call`
    (the kernel leaves it zeroed: allocate once, reuse for every launch of that shape)."""
    return torch.zeros(rows * n_kv_heads, dtype=torch.int32, device=device)


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
    target_programs: int = DEFAULT_SMS,
) -> AttentionPlan:
    """Tiles and sequence splits for the decode attention, from host integers only.

    Splits grow until ``batch * n_kv_heads * splits`` reaches ``target_programs`` (one per
    SM: :func:`sm_count`), at least :data:`MIN_SPLIT` slots each and at most
    :data:`MAX_SPLITS`; the tile is the largest (up to the dtype's cap) that rounds the split
    up by at most 1/8. ``split_len`` forces the split length (rounded up to whole tiles).
    At the article's configuration (3 kv heads), one row and 512 slots: 32 splits of 16,
    96 programs.
    """
    check_head_dim(head_dim)
    if kv_len < 1 or group < 1:
        raise ValueError("kv_len and group must be positive")
    # 64 slots of rows up to 128 bytes (bf16 D=64), else 32: float32 tiles of 64 x 64 and
    # of 16 x 128 slots each spilled 4 bytes on sm_80 (ptxas). A group of query heads
    # becomes the M side of tl.dot, which needs 16 rows, so a single query head (no GQA)
    # uses elementwise products instead.
    itemsize = dtype.itemsize  # no tensor: this runs inside captured steps
    cap = 64 if head_dim * itemsize <= 128 else 32
    dot = group > 1
    block_g = max(16, next_pow2(group)) if dot else 1
    if split_len is None:
        splits = min(cdiv(target_programs, batch * n_kv_heads), MAX_SPLITS,
                     cdiv(kv_len, MIN_SPLIT))
        split_len = cdiv(kv_len, splits)
    block_n = cap
    while block_n > 16 and cdiv(split_len, block_n) * block_n * 8 > split_len * 9:
        block_n //= 2
    split_len = cdiv(split_len, block_n) * block_n
    n_splits = cdiv(kv_len, split_len)
    if n_splits > MAX_SPLITS:
        raise ValueError(f"{n_splits} splits exceed {MAX_SPLITS}: choose a longer split_len")
    # 8 warps for one query head of 128: with 4, ptxas (sm_90a, Triton 3.6) spilled 12 bytes
    # in the bf16/fp16 rotary split variants; with tl.dot 8 warps spilled instead (float32).
    warps = 8 if head_dim >= 128 and not dot else 4
    return AttentionPlan(block_n, block_g, dot, split_len, n_splits, warps)


def attention_call(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
    kv_len: int, counters: torch.Tensor | None = None, plan: AttentionPlan | None = None,
    per_row: int = 1, cuda: bool | None = None,
    rope: tuple[torch.Tensor, torch.Tensor, int] | None = None,
) -> tuple[KernelCall, torch.Tensor]:
    """The launch of :func:`~lmgen_fast.models.fused_ops.decode_attention` (``rope`` None)
    or of :func:`~lmgen_fast.models.fused_ops.rope_attention` (``rope = (cos, sin,
    n_heads)``, ``q`` then the raw ``[R, (H + 2 KV) * D]`` product), and its output.

    ``counters``: from :func:`new_counters` for ``R`` rows (a fresh one is made when None
    and the plan splits). ``cuda`` (default: whether ``q`` is on CUDA) selects
    tensor-core products in the cache dtype; without it they are taken in float32 (same
    values), which the interpreter needs.
    """
    check_float("q", q)
    n_cache, n_kv, max_len, head_dim = k_cache.shape
    check_head_dim(head_dim)
    rows = q.shape[0]
    n_heads = q.shape[1] if rope is None else rope[2]
    width = n_heads * head_dim if rope is None else (n_heads + 2 * n_kv) * head_dim
    if rope is None and (q.shape != (rows, n_heads, head_dim) or not q.is_contiguous()):
        raise ValueError("q must be contiguous [R, H, D]")
    if rope is not None and (q.shape != (rows, width) or q.stride(1) != 1):
        raise ValueError(f"qkv must be [R, {width}] with unit last stride")
    if rows != n_cache * per_row or n_heads % n_kv or k_cache.stride(3) != 1 \
            or v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride() \
            or not q.dtype == k_cache.dtype == v_cache.dtype:
        raise ValueError("the caches must be alike [R / per_row, KV, S, D] of q's dtype, "
                         "H a multiple of KV")
    if not 1 <= kv_len <= max_len:
        raise ValueError(f"kv_len {kv_len} outside [1, {max_len}]")
    if positions.dtype != torch.int64 or positions.numel() != rows:
        raise ValueError("positions must be int64 with one entry per row")
    group = n_heads // n_kv
    dev = q.device
    if plan is None:
        plan = plan_attention(n_cache, n_kv, group, head_dim, kv_len, q.dtype,
                              target_programs=sm_count(dev))
    one = plan.n_splits == 1
    out = torch.empty(rows, n_heads * head_dim, dtype=q.dtype, device=dev)
    if one:
        m = lsum = acc = counters = out  # never touched with one split
    else:
        f32 = dict(dtype=torch.float32, device=dev)
        m = torch.empty(rows, n_heads, plan.n_splits, **f32)
        lsum = torch.empty(rows, n_heads, plan.n_splits, **f32)
        acc = torch.empty(rows, n_heads, plan.n_splits, head_dim, **f32)
        if counters is None:
            counters = new_counters(rows, n_kv, dev)
        elif counters.dtype != torch.int32 or counters.numel() != rows * n_kv:
            raise ValueError(f"counters must be int32 [{rows * n_kv}] (new_counters)")
    cos, sin = (q, q) if rope is None else rope[:2]
    call = KernelCall(
        "attn_decode_kernel", (rows, n_kv, plan.n_splits),
        (q, k_cache, v_cache, positions.reshape(rows), cos, sin, out, m, lsum, acc,
         counters, q.stride(0), kv_len, group, plan.n_splits, plan.split_len, per_row,
         k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
         LOG2E / math.sqrt(head_dim)),
        dict(HEAD_DIM=head_dim, BLOCK_G=plan.block_g, BLOCK_N=plan.block_n, DOT=plan.dot,
             MMA=dev.type == "cuda" if cuda is None else cuda, ONE_SPLIT=one,
             ROPE=rope is not None),
        # Contraction on: the sums of products gain accuracy (Triton 3.10 turns it off by
        # default); but not in float32 rotary, where x * cos + p * sin would become one
        # fma (in bf16/fp16 each product is rounded to the dtype first, which stops it).
        dict(num_warps=plan.num_warps,
             enable_fp_fusion=rope is None or q.dtype != torch.float32),
    )
    return call, out
