"""The fused decode-step kernels (lmgen_fast.models.fused_ops) against the model's own eager ops.

Without CUDA the kernels run in Triton's interpreter on small shapes. Errors are relative,
``||a - b|| / ||b||``: at most 2e-5 in float32 and 2e-2 in bfloat16; where the kernel
reproduces eager's rounding bit for bit (residual add, rotary, SwiGLU, cache writes) the
test says so. The last test runs a whole decode step of a small model through the fused
ops, in the order the integration will use, against ``forward_cached``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, random_model, require_kernel_runtime

require_kernel_runtime()

from lmgen_fast.models import fused_ops as fo  # noqa: E402
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


def randn(g: torch.Generator, *shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


# ------------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("hidden", [96, 256])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rmsnorm_matches_model_norm(dtype, batch, hidden, with_residual):
    g = gen(hidden + batch)
    x = randn(g, batch, 1, hidden, dtype=dtype) * 3
    residual = randn(g, batch, 1, hidden, dtype=dtype)
    norm = RMSNorm(hidden, eps=1e-5).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(hidden, generator=g) + 0.5)
        h = x + residual if with_residual else x
        want = norm(h)
    res = residual.clone() if with_residual else None
    got = fo.add_rmsnorm(x, norm.weight.detach(), norm.eps, res)
    assert got.dtype == dtype and got.shape == x.shape
    assert rel(got, want) <= TOL[dtype]
    if with_residual:
        assert torch.equal(res, h)  # the new residual: eager's rounded sum, bit for bit


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
def test_rope_cache_matches_apply_rotary_and_cache_update(dtype, batch, head_dim, group):
    g = gen(head_dim * group + batch)
    n_kv, max_len = 2, 40
    n_heads = group * n_kv
    qkv = randn(g, batch, (n_heads + 2 * n_kv) * head_dim, dtype=dtype)
    cos, sin = (t.to(DEVICE) for t in rotary_tables(head_dim, 64, 10000.0))
    positions = torch.tensor([0, 17, 39][:batch] if batch > 1 else [33], device=DEVICE)
    k_cache = randn(g, batch, n_kv, max_len, head_dim, dtype=dtype)
    v_cache = randn(g, batch, n_kv, max_len, head_dim, dtype=dtype)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_q = eager_rope_cache(qkv, positions, cos, sin, want_k, want_v, n_heads)
    q = fo.rope_cache(qkv, positions, cos, sin, k_cache, v_cache, n_heads)
    assert q.shape == (batch, n_heads, head_dim)
    assert rel(q, want_q) <= TOL[dtype] and rel(k_cache, want_k) <= TOL[dtype]
    # bf16: products of two bf16 values are exact in float32, so each rounding is eager's.
    if dtype == torch.bfloat16:
        assert torch.equal(q, want_q) and torch.equal(k_cache, want_k)
    assert torch.equal(v_cache, want_v)  # other slots untouched, v copied


# ------------------------------------------------------------------------------ attention


def sdpa_reference(q, k_cache, v_cache, positions, kv_len):
    """LlamaAttention's decode path: query groups against their key/value head, under
    forward_cached's mask (slots <= position, below kv_len)."""
    b, h, d = q.shape
    n_kv = k_cache.shape[1]
    k, v = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]
    mask = torch.arange(kv_len, device=q.device).view(1, 1, 1, -1) \
        <= positions.view(-1, 1, 1, 1)
    qg = q.reshape(b, n_kv, h // n_kv, d)
    return F.scaled_dot_product_attention(qg, k, v, attn_mask=mask).reshape(b, h * d)


# (batch, group, head_dim, kv_len, positions, split_len): positions inside the first tile,
# across tiles, and, with split_len one tile, across splits (some splits empty for the
# shorter rows); 64 and 128 at one row only, to keep the interpreter quick.
ATTENTION_CASES = [
    (1, 1, 16, 48, [5], None),
    (3, 1, 32, 160, [0, 70, 159], None),
    (3, 4, 16, 200, [3, 64, 199], 64),
    (3, 12, 16, 150, [149, 1, 90], 64),
    (1, 12, 32, 300, [260], 64),
    (1, 4, 64, 200, [130], None),
    (1, 1, 64, 200, [199], 64),
    (1, 12, 128, 100, [99], 32),
    (1, 4, 128, 40, [17], None),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,group,head_dim,kv_len,positions,split_len", ATTENTION_CASES)
def test_decode_attention_matches_sdpa(dtype, batch, group, head_dim, kv_len, positions,
                                       split_len):
    g = gen(batch * group + head_dim + kv_len)
    n_kv, max_len = 2, kv_len + 8
    q = randn(g, batch, group * n_kv, head_dim, dtype=dtype)
    k_cache = randn(g, batch, n_kv, max_len, head_dim, dtype=dtype)
    v_cache = randn(g, batch, n_kv, max_len, head_dim, dtype=dtype)
    pos = torch.tensor(positions, device=DEVICE)
    want = sdpa_reference(q, k_cache, v_cache, pos, kv_len)
    # Slots past each row's position hold NaN: a kernel reading them would return NaN.
    invalid = torch.arange(max_len, device=DEVICE).view(1, 1, -1) > pos.view(-1, 1, 1)
    k_cache[invalid.expand(-1, n_kv, -1)] = float("nan")
    v_cache[invalid.expand(-1, n_kv, -1)] = float("nan")
    plan = fo.plan_attention(batch, n_kv, group, head_dim, kv_len, dtype, split_len)
    if split_len is not None:
        assert plan.n_splits > 1
    got = fo.decode_attention(q, k_cache, v_cache, pos, kv_len, plan)
    assert got.dtype == dtype and got.shape == (batch, group * n_kv * head_dim)
    assert rel(got, want) <= TOL[dtype]


def test_attention_plan_splits_long_contexts_at_small_batches():
    one_row = fo.plan_attention(1, 3, 4, 64, 2048)
    assert one_row.n_splits > 8 and one_row.split_len * one_row.n_splits >= 2048
    assert one_row.split_len % one_row.block_n == 0
    assert fo.plan_attention(128, 8, 4, 128, 2048).n_splits == 1
    assert fo.plan_attention(1, 3, 4, 64, 40).n_splits == 1
    assert fo.plan_attention(1, 3, 1, 64, 40).dot is False


# -------------------------------------------------------------------------------- SwiGLU


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,inter", [(1, 200), (3, 1500)])
def test_swiglu_matches_model_mlp_activation(dtype, batch, inter):
    g = gen(inter + batch)
    gu = randn(g, batch, 1, 2 * inter, dtype=dtype) * 4
    gate, up = gu.split(inter, dim=-1)
    want = F.silu(gate) * up  # LlamaMLP's expression, in the model dtype
    got = fo.swiglu(gu)
    assert rel(got, want) <= TOL[dtype]
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)


# ------------------------------------------------------------------ compile specialisations


def test_compile_calls_cover_every_branch():
    calls = fo.compile_calls()
    names = {c.name for c in calls}
    assert names == {"add_rmsnorm_kernel", "rope_cache_kernel", "attn_partial_kernel",
                     "attn_combine_kernel", "swiglu_kernel"}
    for flag in ("HAS_RES", "DOT", "ONE_SPLIT"):
        assert {c.constexprs[flag] for c in calls if flag in c.constexprs} == {False, True}
    dtypes = {c.name: set() for c in calls}
    for c in calls:
        dtypes[c.name].add(c.args[0].dtype)
    assert all(d == set(fo.FLOAT_DTYPES) for d in dtypes.values())
    heads = {c.constexprs["HEAD_DIM"] for c in calls if "HEAD_DIM" in c.constexprs}
    assert heads == {64, 128}


# ------------------------------------------------------------------ a whole decode step


def fused_decode_step(model, cache, tokens, positions, kv_len):
    """One decode step through the fused ops, as the integration will run it: per layer
    4 matmuls and 6 fused launches (5 with one attention split)."""
    c = model.config
    base = model.base_model
    cos, sin = base.rotary_emb.cos, base.rotary_emb.sin
    x = base.embed_tokens(tokens)  # [B, hidden]; also the first residual
    residual = x.clone()
    h = fo.add_rmsnorm(x, base.layers[0].input_layernorm.weight, c.rms_norm_eps)
    for i, layer in enumerate(base.layers):
        att, mlp = layer.self_attn, layer.mlp
        w_qkv = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])
        w_gu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        q = fo.rope_cache(h @ w_qkv.T, positions, cos, sin, cache.k[i], cache.v[i],
                          c.num_attention_heads)
        a = fo.decode_attention(q, cache.k[i], cache.v[i], positions, kv_len)
        h = fo.add_rmsnorm(a @ att.o_proj.weight.T, layer.post_attention_layernorm.weight,
                           c.rms_norm_eps, residual)
        act = fo.swiglu(h @ w_gu.T)
        nxt = base.layers[i + 1].input_layernorm if i + 1 < len(base.layers) else base.norm
        h = fo.add_rmsnorm(act @ mlp.down_proj.weight.T, nxt.weight, c.rms_norm_eps,
                           residual)
    return h


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_decode_step_matches_forward_cached(dtype):
    model = random_model(64, seed=3).to(DEVICE, dtype)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    batch, max_len = len(prompts), 16
    cache = model.new_cache(batch, max_len)
    with torch.no_grad():
        for b, p in enumerate(prompts):  # each row's prompt at its natural positions
            row = model.new_cache(1, max_len)
            ids = torch.tensor([p], device=DEVICE)
            model.forward_cached(ids, torch.arange(len(p), device=DEVICE).view(1, -1), row,
                                 kv_len=len(p))
            for layer in range(len(cache.k)):
                cache.k[layer][b] = row.k[layer][0]
                cache.v[layer][b] = row.v[layer][0]
        positions = torch.tensor([len(p) for p in prompts], device=DEVICE)
        tokens = torch.tensor([20, 30, 40], device=DEVICE)
        kv_len = int(positions.max()) + 1
        eager_cache = model.new_cache(batch, max_len)
        for layer in range(len(cache.k)):
            eager_cache.k[layer].copy_(cache.k[layer])
            eager_cache.v[layer].copy_(cache.v[layer])
        want = model.forward_cached(tokens.view(-1, 1), positions.view(-1, 1), eager_cache,
                                    kv_len)[:, 0]
        got = fused_decode_step(model, cache, tokens, positions, kv_len)
    assert rel(got, want) <= TOL[dtype]
    for layer in range(len(cache.k)):
        assert rel(cache.k[layer], eager_cache.k[layer]) <= TOL[dtype]
        assert rel(cache.v[layer], eager_cache.v[layer]) <= TOL[dtype]
