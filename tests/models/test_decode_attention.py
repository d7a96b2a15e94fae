"""The one-launch decode attention (lmgen_fast.models.fused_ops.decode_attention and
rope_attention) against softmax attention and against the separate rotary launch.

Each test takes ``kernel_device``: ``[gpu]`` on CUDA, its ``[interpreter]`` twin on the CPU.
Tolerances: relative errors ``||a - b|| / ||b||`` of at most 2e-5 in float32 and 2e-2 in
bfloat16. The attention is not bit-exact against eager: its online softmax takes ``exp2``
(``ex2.approx`` on CUDA) and sums in another order. Bit-exact by construction on both
backends, so asserted with ``torch.equal``: the cache writes of the fused rotary (the same
rounded products as ``rope_cache``), the slots it must not touch, and the repeatability of
a launch (the splits are merged in a fixed order whatever order programs finish in).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import require_kernel_runtime

require_kernel_runtime()

from lmgen_fast.models import fused_ops as fo  # noqa: E402
from lmgen_fast.models.llama import rotary_tables  # noqa: E402

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
DTYPES = list(TOL)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def randn(g: torch.Generator, *shape: int, dtype, device) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype).to(device)


def sdpa_reference(q, k_cache, v_cache, positions, kv_len, per_row=1):
    """LlamaAttention's decode path: query groups against their key/value head, under
    forward_cached's mask (slots <= position, below kv_len); flattened row r reads cache
    row r // per_row."""
    r, h, d = q.shape
    n_kv = k_cache.shape[1]
    rows = torch.arange(r, device=q.device) // per_row
    k, v = k_cache[rows, :, :kv_len], v_cache[rows, :, :kv_len]
    mask = torch.arange(kv_len, device=q.device).view(1, 1, 1, -1) \
        <= positions.view(-1, 1, 1, 1)
    qg = q.reshape(r, n_kv, h // n_kv, d)
    return F.scaled_dot_product_attention(qg, k, v, attn_mask=mask).reshape(r, h * d)


def poison_past(cache: torch.Tensor, positions: torch.Tensor, per_row: int = 1) -> None:
    """NaN in every slot past the cache row's last position: a kernel reading one returns
    NaN."""
    last = positions.view(-1, per_row).max(dim=1).values
    past = torch.arange(cache.shape[2], device=cache.device).view(1, -1) > last.view(-1, 1)
    cache[past.unsqueeze(1).expand(-1, cache.shape[1], -1)] = float("nan")


# (batch, group, head_dim, kv_len, positions, split_len): one split (split_len kv_len); many
# splits (split_len one tile) with positions inside a split, at a split's first slot and
# past some splits (empty splits for the shorter rows); 128 at one row, to keep the
# interpreter quick.
ATTENTION_CASES = [
    (1, 1, 16, 48, [5], 48),
    (3, 4, 16, 200, [3, 64, 199], 200),
    (3, 4, 16, 200, [3, 64, 199], 16),
    (3, 1, 32, 160, [0, 70, 159], 32),
    (2, 12, 16, 150, [149, 32], 16),
    (1, 4, 128, 100, [99], 32),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,group,head_dim,kv_len,positions,split_len", ATTENTION_CASES)
def test_one_launch_attention_matches_sdpa_and_repeats_bit_for_bit(
        kernel_device, dtype, batch, group, head_dim, kv_len, positions, split_len):
    dev = kernel_device
    g = torch.Generator().manual_seed(batch * group + head_dim + kv_len)
    n_kv, max_len = 2, kv_len + 8
    q = randn(g, batch, group * n_kv, head_dim, dtype=dtype, device=dev)
    k_cache = randn(g, batch, n_kv, max_len, head_dim, dtype=dtype, device=dev)
    v_cache = randn(g, batch, n_kv, max_len, head_dim, dtype=dtype, device=dev)
    pos = torch.tensor(positions, device=dev)
    want = sdpa_reference(q, k_cache, v_cache, pos, kv_len)
    poison_past(k_cache, pos)
    poison_past(v_cache, pos)
    plan = fo.plan_attention(batch, n_kv, group, head_dim, kv_len, dtype, split_len)
    assert (plan.n_splits > 1) == (split_len < kv_len)
    counters = fo.new_counters(batch, n_kv, dev)
    got = fo.decode_attention(q, k_cache, v_cache, pos, kv_len, plan, counters)
    assert got.dtype == dtype and got.shape == (batch, group * n_kv * head_dim)
    assert rel(got, want) <= TOL[dtype]
    # The counters are left zeroed, so the same buffer serves the next launch, which gives
    # the same bits.
    assert not counters.any()
    calls = []
    real_run = fo.run
    fo.run = lambda c: (calls.extend(c), real_run(c))
    try:
        again = fo.decode_attention(q, k_cache, v_cache, pos, kv_len, plan, counters)
    finally:
        fo.run = real_run
    assert [c.name for c in calls] == ["attn_decode_kernel"]  # one launch at any split
    assert torch.equal(again, got)


def rope_case(dev, dtype, batch, group, head_dim, positions, max_len, seed):
    g = torch.Generator().manual_seed(seed)
    n_kv = 2
    n_heads = group * n_kv
    qkv = randn(g, batch, (n_heads + 2 * n_kv) * head_dim, dtype=dtype, device=dev)
    cos, sin = (t.to(dev) for t in rotary_tables(head_dim, 512, 10000.0))
    k_cache = randn(g, batch, n_kv, max_len, head_dim, dtype=dtype, device=dev)
    v_cache = randn(g, batch, n_kv, max_len, head_dim, dtype=dtype, device=dev)
    return qkv, torch.tensor(positions, device=dev), cos, sin, k_cache, v_cache, n_heads


# (batch, group, head_dim, kv_len, positions, split_len): the new slot in a split's middle,
# at its first slot, at slot 0, in the last split; one split and many.
ROPE_CASES = [
    (3, 4, 16, 100, [0, 16, 99], 16),
    (2, 1, 32, 70, [40, 7], 70),
    (2, 12, 16, 64, [33, 63], 32),
    (1, 4, 64, 130, [129], 64),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,group,head_dim,kv_len,positions,split_len", ROPE_CASES)
def test_fused_rope_equals_rope_cache_then_attention(kernel_device, dtype, batch, group,
                                                     head_dim, kv_len, positions, split_len):
    dev = kernel_device
    qkv, pos, cos, sin, k_cache, v_cache, n_heads = rope_case(
        dev, dtype, batch, group, head_dim, positions, kv_len + 4, seed=head_dim + batch)
    n_kv = k_cache.shape[1]
    plan = fo.plan_attention(batch, n_kv, group, head_dim, kv_len, dtype, split_len)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    q = fo.rope_cache(qkv, pos, cos, sin, want_k, want_v, n_heads)
    want = fo.decode_attention(q, want_k, want_v, pos, kv_len, plan)
    # Slots past each row's position hold NaN in the cache the fused launch reads, and its
    # own slot too: a launch that read its new slot back (not from registers) before the
    # write, or any later slot, would return NaN.
    poison_past(k_cache, pos - 1)
    poison_past(v_cache, pos - 1)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    got = fo.rope_attention(qkv, pos, cos, sin, k_cache, v_cache, n_heads, kv_len, plan)
    assert got.shape == want.shape and got.dtype == dtype
    assert rel(got, want) <= TOL[dtype]
    # The cache: each row's slot holds rope_cache's bits, every other slot is untouched.
    rows = torch.arange(batch, device=dev)
    assert torch.equal(k_cache[rows, :, pos], want_k[rows, :, pos])
    assert torch.equal(v_cache[rows, :, pos], want_v[rows, :, pos])
    before_k[rows, :, pos] = k_cache[rows, :, pos]
    before_v[rows, :, pos] = v_cache[rows, :, pos]
    assert torch.equal(k_cache.nan_to_num(7.0), before_k.nan_to_num(7.0))
    assert torch.equal(v_cache.nan_to_num(7.0), before_v.nan_to_num(7.0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_several_tokens_per_cache_row_attend_causally(kernel_device, dtype):
    """The multi-position forward's attention: flattened row r reads cache row r // T up to
    its own position, after rope_cache wrote every token's k/v."""
    dev, per_row = kernel_device, 3
    positions = [[4, 5, 6], [30, 31, 32]]
    qkv, pos, cos, sin, k_cache, v_cache, n_heads = rope_case(
        dev, dtype, 6, 4, 16, [0] * 6, 48, seed=11)
    pos = torch.tensor(positions, device=dev).view(-1)
    k_cache, v_cache = k_cache[:2].contiguous(), v_cache[:2].contiguous()
    q = fo.rope_cache(qkv, pos, cos, sin, k_cache, v_cache, n_heads, per_row)
    want = sdpa_reference(q, k_cache, v_cache, pos, 40, per_row)
    poison_past(k_cache, pos, per_row)
    poison_past(v_cache, pos, per_row)
    for split_len in (None, 16):
        plan = fo.plan_attention(2, 2, 4, 16, 40, dtype, split_len)
        got = fo.decode_attention(q, k_cache, v_cache, pos, 40, plan, per_row=per_row)
        assert rel(got, want) <= TOL[dtype]


def test_attention_plan_fills_the_sms_at_one_row():
    # The article's configuration (3 kv heads, D=64, bf16) at one row and 512 slots: 32
    # splits of 16 slots, 96 programs for 132 SMs (the old plan: 4 splits, 12 programs).
    plan = fo.plan_attention(1, 3, 4, 64, 512, target_programs=132)
    assert plan.n_splits * 3 >= 96 and plan.split_len * plan.n_splits >= 512
    long = fo.plan_attention(1, 3, 4, 64, 4096, target_programs=132)
    assert 0.9 * 132 <= long.n_splits * 3 <= 3 * fo.MAX_SPLITS
    for p in (plan, long):
        assert p.split_len % p.block_n == 0 and p.block_n in (16, 32, 64)
    assert fo.plan_attention(128, 8, 4, 128, 2048, target_programs=132).n_splits == 1
    assert fo.plan_attention(1, 3, 1, 64, 40).dot is False
    with pytest.raises(ValueError, match="splits exceed"):
        fo.plan_attention(1, 3, 4, 64, 4096, split_len=16)
