"""The fused decode-step kernels (lmgen_fast.models.fused_ops) against the model's own eager ops.

Each test takes ``kernel_device``: ``[gpu]`` on CUDA, its ``[interpreter]`` twin on the CPU
(small shapes). Errors are relative, ``||a - b|| / ||b||``: at most 2e-5 in float32 and 2e-2
in bfloat16. ``torch.equal`` only where the kernel reproduces eager's rounding bit for bit
by construction on both backends (the residual add, the embedding gather, rotary in
bfloat16, cache writes, the positions). SwiGLU's ``exp`` is the device library's on CUDA
but NumPy's in the interpreter (torch's CPU silu differs in the last float32 bits), so it
is held to a bound in units of the dtype's eps instead. The attention has its own file
(test_decode_attention.py). The last test runs a whole decode step of a small model through
the fused ops, in the order FusedLlamaStep runs them, against ``forward_cached``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import random_model, require_kernel_runtime

require_kernel_runtime()

from lmgen_fast.models import fused_ops as fo  # noqa: E402
from lmgen_fast.models.fused_step import FusedLlamaStep  # noqa: E402
from lmgen_fast.models.llama import (  # noqa: E402
    RMSNorm,
    apply_rotary,
    rotary_tables,
    signed_sin,
)

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
DTYPES = list(TOL)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g: torch.Generator, *shape: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype).to(device)


# ------------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("hidden", [96, 256])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rmsnorm_matches_model_norm(kernel_device, dtype, batch, hidden, with_residual):
    dev = kernel_device
    g = gen(hidden + batch)
    x = randn(g, batch, 1, hidden, dtype=dtype, device=dev) * 3
    residual = randn(g, batch, 1, hidden, dtype=dtype, device=dev)
    norm = RMSNorm(hidden, eps=1e-5).to(dev, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(hidden, generator=g) + 0.5)
        h = x + residual if with_residual else x
        want = norm(h)
    res = residual.clone() if with_residual else None
    positions = torch.tensor([7, 0, 300][:batch], device=dev)
    got = fo.add_rmsnorm(x, norm.weight.detach(), norm.eps, res,
                         positions=positions if with_residual else None)
    assert got.dtype == dtype and got.shape == x.shape
    assert rel(got, want) <= TOL[dtype]
    if with_residual:
        assert torch.equal(res, h)  # the new residual: eager's rounded sum, bit for bit
        assert positions.tolist() == [8, 1, 301][:batch]  # each advanced once


@pytest.mark.parametrize("dtype", DTYPES)
def test_embed_rmsnorm_matches_embedding_then_model_norm(kernel_device, dtype):
    dev = kernel_device
    g = gen(5)
    table = randn(g, 50, 96, dtype=dtype, device=dev) * 2
    norm = RMSNorm(96, eps=1e-6).to(dev, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(96, generator=g) + 0.5)
    ids = torch.tensor([3, 49, 0, 3], device=dev)
    want_res = F.embedding(ids, table)
    with torch.no_grad():
        want = norm(want_res)
    got, res = fo.embed_rmsnorm(ids, table, norm.weight.detach(), norm.eps)
    assert got.shape == res.shape == (4, 96) and got.dtype == res.dtype == dtype
    assert torch.equal(res, want_res)  # a gather: the table's bits
    assert rel(got, want) <= TOL[dtype]
    # Rows of equal ids are equal (one code path per row, no cross-row state).
    assert torch.equal(got[0], got[3])


# ------------------------------------------------------------------ rotary + cache write


def eager_rope_cache(qkv, positions, cos, sin, k_cache, v_cache, n_heads):
    """The model's path: LlamaAttention's views, apply_rotary, KVCache.update's write."""
    b = qkv.shape[0]
    n_kv, d = k_cache.shape[1], k_cache.shape[3]
    q, k, v = qkv.view(b, 1, -1, d).transpose(1, 2).split([n_heads, n_kv, n_kv], dim=1)
    c = cos[positions].unsqueeze(1).unsqueeze(1).to(qkv.dtype)
    s = signed_sin(sin[positions].unsqueeze(1).unsqueeze(1).to(qkv.dtype))
    q, k = apply_rotary(q, c, s), apply_rotary(k, c, s)
    rows = torch.arange(b, device=qkv.device)
    k_cache[rows, :, positions] = k[:, :, 0]
    v_cache[rows, :, positions] = v[:, :, 0]
    return q[:, :, 0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,head_dim,group", [
    (1, 16, 1), (3, 16, 4), (3, 32, 12), (1, 64, 4), (1, 128, 12),
])
def test_rope_cache_matches_apply_rotary_and_cache_update(kernel_device, dtype, batch, head_dim,
                                                          group):
    dev = kernel_device
    g = gen(head_dim * group + batch)
    n_kv, max_len = 2, 40
    n_heads = group * n_kv
    qkv = randn(g, batch, (n_heads + 2 * n_kv) * head_dim, dtype=dtype, device=dev)
    cos, sin = (t.to(dev) for t in rotary_tables(head_dim, 64, 10000.0))
    positions = torch.tensor([0, 17, 39][:batch] if batch > 1 else [33], device=dev)
    k_cache = randn(g, batch, n_kv, max_len, head_dim, dtype=dtype, device=dev)
    v_cache = randn(g, batch, n_kv, max_len, head_dim, dtype=dtype, device=dev)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_q = eager_rope_cache(qkv, positions, cos, sin, want_k, want_v, n_heads)
    q = fo.rope_cache(qkv, positions, cos, sin, k_cache, v_cache, n_heads)
    assert q.shape == (batch, n_heads, head_dim)
    assert rel(q, want_q) <= TOL[dtype] and rel(k_cache, want_k) <= TOL[dtype]
    # bf16: products of two bf16 values are exact in float32, so each rounding is eager's.
    if dtype == torch.bfloat16:
        assert torch.equal(q, want_q) and torch.equal(k_cache, want_k)
    assert torch.equal(v_cache, want_v)  # other slots untouched, v copied


# -------------------------------------------------------------------------------- SwiGLU


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,inter", [(1, 200), (3, 1500)])
def test_swiglu_matches_model_mlp_activation(kernel_device, dtype, batch, inter):
    g = gen(inter + batch)
    gu = randn(g, batch, 1, 2 * inter, dtype=dtype, device=kernel_device) * 4
    gate, up = gu.split(inter, dim=-1)
    want = F.silu(gate) * up  # LlamaMLP's expression, in the model dtype
    got = fo.swiglu(gu)
    assert rel(got, want) <= TOL[dtype]
    # Elementwise, relative to |want| (zeros exact): bfloat16 within one unit in the last
    # place (eps * |want| bounds it): silu's float32 value differs from torch's in its last
    # bits only, then both round it and the product once; float32 within 4 eps (torch's
    # vectorised CPU silu differs from x / (1 + exp(-x)) in the last 1-2 bits of about
    # half the values, seen up to 2.3 eps).
    bound = (1 if dtype == torch.bfloat16 else 4) * torch.finfo(dtype).eps
    assert ((got.float() - want.float()).abs() <= bound * want.abs().float()).all()


# ------------------------------------------------------------------ compile specialisations


def test_compile_calls_cover_every_branch():
    calls = fo.compile_calls()
    names = {c.name for c in calls}
    assert names == {"add_rmsnorm_kernel", "embed_rmsnorm_kernel", "rope_cache_kernel",
                     "attn_decode_kernel", "swiglu_kernel", "qk_rmsnorm_kernel"}
    for flag in ("HAS_RES", "HAS_POS", "DOT", "ONE_SPLIT", "ROPE", "ACCURATE"):
        want = {True} if flag == "ACCURATE" else {False, True}  # compiled means CUDA
        assert {c.constexprs[flag] for c in calls if flag in c.constexprs} == want, flag
    dtypes = {c.name: set() for c in calls}
    for c in calls:  # the embedding's first argument is the ids: its table is second
        dtypes[c.name].add(c.args[c.name == "embed_rmsnorm_kernel"].dtype)
    assert all(d == set(fo.FLOAT_DTYPES) for d in dtypes.values())
    heads = {c.constexprs["HEAD_DIM"] for c in calls if "HEAD_DIM" in c.constexprs}
    assert heads == {64, 128}
    tiles = {c.constexprs["BLOCK_N"] for c in calls if "BLOCK_N" in c.constexprs}
    assert tiles == {16, 32, 64}


# ------------------------------------------------------------------ a whole decode step


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_decode_step_matches_forward_cached(kernel_device, dtype):
    """FusedLlamaStep on a cache filled by eager prefills: logits, cache and positions (one
    more, advanced by the step's last norm launch) against ``forward_cached``; 40 slots
    split over many programs."""
    dev = kernel_device
    model = random_model(64, seed=3).to(dev, dtype)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11] * 30]
    batch, max_len = len(prompts), 40
    cache = model.new_cache(batch, max_len)
    with torch.no_grad():
        for b, p in enumerate(prompts):  # each row's prompt at its natural positions
            row = model.new_cache(1, max_len)
            ids = torch.tensor([p], device=dev)
            model.forward_cached(ids, torch.arange(len(p), device=dev).view(1, -1), row,
                                 kv_len=len(p))
            for layer in range(len(cache.k)):
                cache.k[layer][b] = row.k[layer][0]
                cache.v[layer][b] = row.v[layer][0]
        positions = torch.tensor([len(p) for p in prompts], device=dev)
        tokens = torch.tensor([20, 30, 40], device=dev)
        kv_len = int(positions.max()) + 1
        eager_cache = model.new_cache(batch, max_len)
        for layer in range(len(cache.k)):
            eager_cache.k[layer].copy_(cache.k[layer])
            eager_cache.v[layer].copy_(cache.v[layer])
        want = model.lm_head(model.forward_cached(tokens.view(-1, 1), positions.view(-1, 1),
                                                  eager_cache, kv_len)[:, 0])
        step = FusedLlamaStep(model)
        pos = positions.clone()
        got = step(tokens, pos, cache, kv_len)
    assert torch.equal(pos, positions + 1)
    assert rel(got, want) <= TOL[dtype]
    for layer in range(len(cache.k)):
        assert rel(cache.k[layer], eager_cache.k[layer]) <= TOL[dtype]
        assert rel(cache.v[layer], eager_cache.v[layer]) <= TOL[dtype]
