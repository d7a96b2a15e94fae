"""The fused gate/up product and SwiGLU (lmgen_fast.models.fused_mlp) against eager torch.

Each kernel test runs twice through ``kernel_device``: compiled on CUDA (``[gpu]``, tensor
cores in the model dtype) and in Triton's interpreter on CPU (``[interpreter]``, float32
elementwise products), on small shapes whose ``I`` and ``K`` are not multiples of the tiles.

Tolerances. float32: both sides sum the same ``K`` float32 products, in different orders;
each sum is off by a few ulps (about ``sqrt(K) * 2**-24`` relative, 1e-7 here), and silu and
the product add a few more: 2e-6 relative is ten times that, and a missing or wrong term
(about ``1 / sqrt(K)``, 0.07) is far outside it. bfloat16/float16: a sum lying near a
rounding boundary of the dtype may round the other way after a differently ordered float32
sum: such elements differ by an ulp or two (2**-8 or 2**-11 relative), the others agree bit
for bit; we ask for 95% equal bits (a wrong rounding order leaves about 72%) and the
relative error of one ulp. On inputs whose sums are exact in float32 every rounding is
eager's, so there the result must be eager's, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import require_kernel_runtime

require_kernel_runtime()

from lmgen_fast.models import fused_mlp as fm  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REL_TOL = {torch.float32: 2e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}
K, INTER = 200, 88  # neither a multiple of its tile (block_k 16 to 128, block_n 16 or 32)
NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def inputs(seed: int, m: int, dtype: torch.dtype, device: str, k: int = K, inter: int = INTER):
    """``h [m, k]``, ``w_gu [2 inter, k]`` (so that the sums are of order 1), ``b [2 inter]``."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(m, k, generator=g)
    w = torch.randn(2 * inter, k, generator=g) / k ** 0.5
    b = torch.randn(2 * inter, generator=g)
    return (t.to(dtype).to(device) for t in (h, w, b))


def eager_swiglu(gu: torch.Tensor) -> torch.Tensor:
    """The decode step's SwiGLU: silu(gate) rounded to the dtype, times up, rounded."""
    gate, up = gu.chunk(2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.parametrize("dtype", DTYPES, ids=NAMES.get)
@pytest.mark.parametrize("m", [1, 3, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_eager_linear_then_swiglu(kernel_device, dtype, m, bias):
    h, w, b = inputs(m + 7 * bias, m, dtype, kernel_device)
    b = b if bias else None
    want = eager_swiglu(F.linear(h, w, b))
    got = fm.gate_up_swiglu(h, w, b)
    assert got.shape == (m, INTER) and got.dtype == dtype and got.device == h.device
    assert rel(got, want) <= REL_TOL[dtype]
    if dtype != torch.float32:
        assert (got == want).double().mean().item() >= 0.95


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=NAMES.get)
@pytest.mark.parametrize("bias", [False, True])
def test_bit_exact_when_the_sums_are_exact(kernel_device, dtype, bias):
    """Multiples of 1/4 times multiples of 1/16 over K = 200 sum exactly in float32 (in any
    order), yet need more bits than the dtype has: each rounding is then eager's own."""
    g = torch.Generator().manual_seed(11)
    m = 5
    h = torch.randint(-4, 5, (m, K), generator=g) / 4
    w = torch.randint(-4, 5, (2 * INTER, K), generator=g) / 16
    b = torch.randint(-64, 65, (2 * INTER,), generator=g) / 16 if bias else None
    h, w = h.to(dtype).to(kernel_device), w.to(dtype).to(kernel_device)
    gu = h.float() @ w.float().T
    if bias:
        b = b.to(dtype).to(kernel_device)
        gu = gu + b.float()
    want = eager_swiglu(gu.to(dtype))
    got = fm.gate_up_swiglu(h, w, b)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=NAMES.get)
def test_a_row_has_the_same_bits_in_any_batch(kernel_device, dtype):
    """Batch invariance: row i of a batch of 17 (two row blocks) is row i computed alone."""
    h, w, b = inputs(5, 17, dtype, kernel_device, k=72, inter=40)
    batch = fm.gate_up_swiglu(h, w, b)
    for i in (0, 9, 16):
        assert torch.equal(fm.gate_up_swiglu(h[i:i + 1].contiguous(), w, b)[0], batch[i]), i


def test_float32_tensor_core_path_and_wider_tiles(kernel_device):
    """The tl.dot path (float32, the one the interpreter can run) with 32-column tiles and
    64-wide K steps, both partial at the edge; the output buffer is written in place."""
    h, w, b = inputs(3, 20, torch.float32, kernel_device)
    plan = fm.MlpPlan(16, 32, 64, dot=True, num_warps=8, num_stages=3)
    out = torch.full((20, INTER), float("nan"), device=kernel_device)
    call, got = fm.gate_up_swiglu_call(h, w, b, out=out, plan=plan)
    assert got is out and call.grid == (2, 3)
    fm.run([call])
    assert rel(out, eager_swiglu(F.linear(h, w, b))) <= REL_TOL[torch.float32]


def test_plan_fills_an_h100_at_one_row():
    """At one row, the article's and Llama-3.2-1B's MLP give at least one program per SM
    (132), with 256-byte weight rows per K step; the plan never depends on the batch."""
    for inter, k, dtype, block_n in ((3072, 768, torch.bfloat16, 16),
                                     (8192, 2048, torch.bfloat16, 32),
                                     (8192, 2048, torch.float32, 32)):
        plan = fm.plan_gate_up(inter, k, dtype)
        assert plan.block_n == block_n and plan.dot
        assert plan.block_k * dtype.itemsize == 256
        h = torch.empty(1, k, dtype=dtype, device="meta")
        call, _ = fm.gate_up_swiglu_call(h, torch.empty(2 * inter, k, dtype=dtype,
                                                        device="meta"), cuda=True)
        assert call.grid[0] == 1 and call.grid[1] >= fm.TARGET_PROGRAMS
        h17 = torch.empty(17, k, dtype=dtype, device="meta")
        call17, _ = fm.gate_up_swiglu_call(h17, torch.empty(2 * inter, k, dtype=dtype,
                                                            device="meta"), cuda=True)
        assert call17.constexprs == call.constexprs and call17.grid == (2, call.grid[1])
    assert fm.use_fused_mlp(1) and fm.use_fused_mlp(16) and not fm.use_fused_mlp(256)


def test_compile_calls_cover_every_dtype_path_and_tile():
    calls = fm.compile_calls()
    seen = {(c.args[0].dtype, c.constexprs["DOT"], c.constexprs["HAS_BIAS"],
             c.constexprs["BLOCK_N"]) for c in calls}
    for dtype in DTYPES:  # the interpreter's path (DOT=False) never runs on a GPU
        assert (dtype, True, True, 16) in seen and (dtype, True, False, 32) in seen
        assert (dtype, True, False, 64) in seen
    assert all(dot for _, dot, _, _ in seen)
    assert all(c.constexprs["ACCURATE"] for c in calls)


def meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


@pytest.mark.parametrize("args,message", [
    ((meta(2, 8, dtype=torch.int32), meta(6, 8)), "h must be float32, bfloat16 or float16"),
    ((meta(2, 3, 8), meta(6, 8)), "[M, K] tensor, got shape (2, 3, 8)"),
    ((meta(8, 2).T, meta(6, 8)), "contiguous non-empty [M, K]"),
    ((meta(2, 8), meta(6, 8, dtype=torch.float16)), "w_gu must have h's dtype"),
    ((meta(2, 8), meta(6, 9)), "[2I, K=8] tensor (gate rows then up rows), got shape (6, 9)"),
    ((meta(2, 8), meta(7, 8)), "got shape (7, 8)"),
    ((meta(2, 8), meta(6, 8), meta(5)), "b_gu must be a contiguous [2I=6]"),
    ((meta(2, 8), meta(6, 8), meta(6, dtype=torch.float32)), "dtype torch.float32"),
    ((meta(2, 8), meta(6, 8), None, meta(2, 6)), "out must be a contiguous [M=2, I=3]"),
    ((meta(2, 8), torch.empty(6, 8, dtype=torch.bfloat16)), "must be on one device"),
])
def test_bad_arguments_are_named(args, message):
    with pytest.raises(ValueError) as err:
        fm.gate_up_swiglu_call(*args)
    assert message in str(err.value)
