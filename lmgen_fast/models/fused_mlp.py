"""Launcher of the fused gate/up product and SwiGLU (:mod:`lmgen_fast.kernels.mlp`).

``gate_up_swiglu(h, w_gu, b_gu)`` gives what ``swiglu(F.linear(h, w_gu, b_gu))`` gives, the
decode step's MLP input, in one Triton launch instead of a cuBLAS matmul plus the SwiGLU
kernel: one launch floor and the ``[M, 2I]`` round trip less per layer.

Like :mod:`lmgen_fast.models.fused_ops`, the ``*_call`` function checks shapes, allocates
the output and plans the launch as a :class:`~lmgen_fast.runtime.launch.KernelCall` from host
integers and fixed-shape torch ops only, so it runs on the ``meta`` device (the ahead-of-time
compile takes :func:`compile_calls`) and inside CUDA-graph capture.

Block shapes (:func:`plan_gate_up`) depend on ``I``, ``K`` and the dtype, never on ``M``:
``M`` only adds row blocks of 16, so a row's bits do not depend on its batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lmgen_fast.core.intmath import cdiv, next_pow2
from lmgen_fast.models.fused_attention import DEFAULT_SMS, FLOAT_DTYPES, check_float
from lmgen_fast.runtime.launch import KernelCall, run_calls

KERNELS = ("gate_up_swiglu_kernel",)
# tl.dot's smallest M: every row gets the same tiles whatever the batch.
BLOCK_M = 16
# Programs to reach at one row: one per SM of an H100/H200. At one row the kernel reads the
# weight once; it is bandwidth-bound only if every SM has loads in flight.
TARGET_PROGRAMS = DEFAULT_SMS
BLOCK_NS = (64, 32, 16)  # widest first: fewer programs re-reading x, longer weight runs
ROW_BYTES = 256  # a K tile row: 16 lanes of 16-byte loads
INTERPRETER_TILE = 1 << 18  # products per step on the interpreter's path
# Rows up to which the fused op is the better choice (see use_fused_mlp).
FUSED_MAX_ROWS = 32


class MlpPlan(NamedTuple):
    """How :func:`gate_up_swiglu` is launched: ``block_m`` rows and ``block_n`` columns of
    gate and of up per program, ``block_k`` of ``K`` per step; ``dot`` selects tl.dot."""

    block_m: int
    block_n: int
    block_k: int
    dot: bool
    num_warps: int
    num_stages: int


def plan_gate_up(inter: int, k: int, dtype: torch.dtype, dot: bool = True,
                 rows: int = BLOCK_M) -> MlpPlan:
    """Tiles for an intermediate size ``inter`` and input width ``k``, host ints only.

    ``block_n`` is the widest of :data:`BLOCK_NS` that still gives :data:`TARGET_PROGRAMS`
    programs at one row (16 below that): the article's ``I = 3072`` gets 16 (192 programs),
    Llama-3.2-1B's ``I = 8192`` gets 32 (256 programs), ``I = 14336`` gets 64. ``block_k``
    makes each weight row of a tile :data:`ROW_BYTES` long (wide, coalesced loads), or
    covers a shorter ``k``. ``dot=False`` is the interpreter's path (elementwise float32
    products, as it cannot tl.dot bfloat16): ``rows`` rounded up to a power of two (at most
    16) by tiles of up to :data:`INTERPRETER_TILE` products, since there every program and
    loop step costs Python time (16 x 16 x 32 tiles took 20 s per layer of the article's
    model). 8 warps: at 4, each of tl.dot's warps held a
    whole K step's operands and the 16- and 64-column tiles spilled 8 to 16 bytes (sm_80,
    sm_90a; Triton 3.9); at 8 no variant spills.
    """
    if inter < 1 or k < 1:
        raise ValueError(f"inter and k must be positive, got {inter} and {k}")
    block_n = next((n for n in BLOCK_NS if cdiv(inter, n) >= TARGET_PROGRAMS), BLOCK_NS[-1])
    if dot:
        block_k = min(ROW_BYTES // dtype.itemsize, max(16, next_pow2(k)))
        return MlpPlan(BLOCK_M, block_n, block_k, dot, num_warps=8, num_stages=3)
    # The interpreter: few programs and steps, each a large NumPy product tile.
    block_m = min(BLOCK_M, next_pow2(max(1, rows)))
    block_n = min(256, max(16, next_pow2(inter)))
    block_k = max(16, min(next_pow2(k), INTERPRETER_TILE // (block_m * block_n)))
    return MlpPlan(block_m, block_n, block_k, dot, num_warps=8, num_stages=3)


def use_fused_mlp(m: int) -> bool:
    """Whether :func:`gate_up_swiglu` beats ``swiglu(F.linear(...))`` for ``m`` rows.

    Up to 16 rows one row block reads the weight once, as the matmul does, and saves a
    launch (about 2 us of a 4.5 us cuBLAS floor plus 2.5 us SwiGLU in a graph) and the
    ``[M, 2I]`` round trip. Each further block of 16 rows reads the weight slice again,
    from L2 (the row blocks of a slice run side by side): two passes (32 rows) of
    Llama-3.2-1B's 64 MiB take about what one HBM pass does at 3.6 TB/s, four do not, and
    cuBLAS's larger row tiles win there. Predicted, not measured: a device benchmark should
    confirm the bound.
    """
    return 1 <= m <= FUSED_MAX_ROWS


def _kernels():
    from lmgen_fast.kernels import mlp

    return mlp


def kernel(name: str):
    """The JIT function ``name`` of :mod:`lmgen_fast.kernels.mlp` (imports triton)."""
    return getattr(_kernels(), name)


def run(calls: list[KernelCall]) -> None:
    """Launch ``calls`` in order (the op launches through here: tests may replace it)."""
    run_calls(_kernels(), calls)


def _check(h: torch.Tensor, w_gu: torch.Tensor, b_gu: torch.Tensor | None,
           out: torch.Tensor | None) -> tuple[int, int, int]:
    """``(M, K, I)`` of valid arguments; a ValueError naming the bad one otherwise."""
    check_float("h", h)
    if h.dim() != 2 or not h.is_contiguous() or h.shape[0] < 1 or h.shape[1] < 1:
        raise ValueError(f"h must be a contiguous non-empty [M, K] tensor, got shape "
                         f"{tuple(h.shape)} with strides {h.stride()}")
    m, k = h.shape
    if w_gu.dtype != h.dtype:
        raise ValueError(f"w_gu must have h's dtype {h.dtype}, got {w_gu.dtype}")
    if w_gu.dim() != 2 or w_gu.shape[1] != k or w_gu.shape[0] < 2 or w_gu.shape[0] % 2 \
            or not w_gu.is_contiguous():
        raise ValueError(f"w_gu must be a contiguous [2I, K={k}] tensor (gate rows then up "
                         f"rows), got shape {tuple(w_gu.shape)} with strides {w_gu.stride()}")
    inter = w_gu.shape[0] // 2
    if b_gu is not None and (b_gu.dtype != h.dtype or b_gu.shape != (2 * inter,)
                             or not b_gu.is_contiguous()):
        raise ValueError(f"b_gu must be a contiguous [2I={2 * inter}] tensor of dtype "
                         f"{h.dtype}, got shape {tuple(b_gu.shape)}, dtype {b_gu.dtype}")
    if out is not None and (out.dtype != h.dtype or out.shape != (m, inter)
                            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous [M={m}, I={inter}] tensor of dtype "
                         f"{h.dtype}, got shape {tuple(out.shape)}, dtype {out.dtype}")
    devices = {t.device for t in (h, w_gu, b_gu, out) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"h, w_gu, b_gu and out must be on one device, got {devices}")
    return m, k, inter


def gate_up_swiglu_call(
    h: torch.Tensor, w_gu: torch.Tensor, b_gu: torch.Tensor | None = None,
    out: torch.Tensor | None = None, plan: MlpPlan | None = None, cuda: bool | None = None,
) -> tuple[KernelCall, torch.Tensor]:
    """The launch of :func:`gate_up_swiglu` and its output buffer.

    ``cuda`` (default: whether ``h`` is on CUDA) selects the device's ``expf`` and, unless
    ``plan`` says otherwise, tensor-core products; without it the products are taken in
    float32, elementwise (same values), which the interpreter needs.
    """
    m, k, inter = _check(h, w_gu, b_gu, out)
    if cuda is None:
        cuda = h.device.type == "cuda"
    if plan is None:
        plan = plan_gate_up(inter, k, h.dtype, dot=cuda, rows=m)
    if plan.dot and plan.block_m != BLOCK_M:  # tl.dot's smallest M
        raise ValueError(f"plan.block_m must be {BLOCK_M} with tl.dot, got {plan.block_m}")
    if out is None:
        out = torch.empty(m, inter, dtype=h.dtype, device=h.device)
    call = KernelCall(
        "gate_up_swiglu_kernel", (cdiv(m, plan.block_m), cdiv(inter, plan.block_n)),
        (h, w_gu, w_gu if b_gu is None else b_gu, out, m, k, inter),
        dict(BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k,
             HAS_BIAS=b_gu is not None, DOT=plan.dot, ACCURATE=cuda),
        # Contraction on: sums of products gain accuracy; the epilogue has no a * b + c.
        dict(num_warps=plan.num_warps, num_stages=plan.num_stages, enable_fp_fusion=True),
    )
    return call, out


def gate_up_swiglu(
    h: torch.Tensor, w_gu: torch.Tensor, b_gu: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``swiglu(F.linear(h, w_gu, b_gu))`` in one launch, rounded as eager rounds.

    Parameters
    ----------
    h : Tensor
        ``[M, K]`` contiguous, float32, bfloat16 or float16: the normed hidden state.
    w_gu : Tensor
        ``[2I, K]`` contiguous, h's dtype: ``cat([gate_proj.weight, up_proj.weight])``.
    b_gu : Tensor, optional
        ``[2I]`` contiguous, h's dtype: the two biases, concatenated likewise.
    out : Tensor, optional
        ``[M, I]`` contiguous, h's dtype: where to write the result.

    Returns
    -------
    Tensor
        ``[M, I]`` h's dtype: ``round(round(silu(gate)) * up)``, gate and up each the
        float32 product plus bias rounded once to the dtype (``down_proj``'s input).
    """
    call, out = gate_up_swiglu_call(h, w_gu, b_gu, out)
    run([call])
    return out


# ------------------------------------------------------------------- ahead-of-time compile

# (I, K): the article (block_n 16), Llama-3.2-1B (32), Llama-3-8B (64).
COMPILE_SHAPES = ((3072, 768), (8192, 2048), (14336, 4096))


def compile_calls() -> list[KernelCall]:
    """One call per specialisation the launcher chooses for :data:`COMPILE_SHAPES`, planned
    on ``meta`` tensors: every dtype at one row (the JIT makes ``M = 1`` a constant) and at
    two; with and without bias (at the first shape). The interpreter's path is not
    compiled."""
    calls: list[KernelCall] = []
    for dtype in FLOAT_DTYPES:
        t = dict(dtype=dtype, device="meta")
        for n, (inter, k) in enumerate(COMPILE_SHAPES):
            w = torch.empty(2 * inter, k, **t)
            for bias in (None, torch.empty(2 * inter, **t)) if n == 0 else (None,):
                for m in (1, 2):  # dot=False is the interpreter's: never compiled
                    plan = plan_gate_up(inter, k, dtype, dot=True)
                    h = torch.empty(m, k, **t)
                    calls.append(gate_up_swiglu_call(h, w, bias, plan=plan, cuda=True)[0])
    return calls
