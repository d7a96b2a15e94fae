"""The fused decode step (lmgen_fast.models.fused_step) against the eager ``forward_cached`` step.

Tests that run the kernels on a model of their own take ``kernel_device`` (``[gpu]`` on
CUDA, ``[interpreter]`` on the CPU, tiny models). Logit errors are relative,
``||fused - eager|| / ||eager||``: at most 2e-5 in float32, 2e-2 in bfloat16 (the attention's
online softmax is not eager's, so no bit-exact logits).
End to end, greedy tokens must be identical on both paths, and seeded sampling of the
embedded model must give the same text on (almost) every row.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import DEVICE, random_model, require_kernel_runtime

require_kernel_runtime()

from lmgen_fast import SamplingParams, load_default  # noqa: E402
from lmgen_fast.engine import generate_ids  # noqa: E402
from lmgen_fast.models import fused_mlp as fm  # noqa: E402
from lmgen_fast.models import fused_ops as fo  # noqa: E402
from lmgen_fast.models.decoder import CachedLlamaDecoder, decoder_for, wrap  # noqa: E402
from lmgen_fast.models.fused_step import FusedLlamaStep, supported  # noqa: E402

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
F32, BF16 = torch.float32, torch.bfloat16


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def prompts_of(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def compare_steps(model, prompts: list[list[int]], steps: int = 2) -> list[float]:
    """Prefill two decoders alike, then ``steps`` decode steps eager on one and fused on the
    other with the same tokens; the logits' relative errors (caches checked too)."""
    eager, fused = wrap(model), wrap(model)
    assert isinstance(fused, CachedLlamaDecoder) and fused.supports_fused()
    vocab = model.config.vocab_size
    with torch.no_grad():
        eager.prefill(prompts, steps + 1)
        fused.prefill(prompts, steps + 1)
    fused.fused = True
    errors = []
    g = torch.Generator().manual_seed(len(prompts))
    dtype, dev = model.lm_head.weight.dtype, model.lm_head.weight.device
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (len(prompts),), generator=g).to(dev)
        with torch.no_grad():
            want = eager.decode(tokens)
            got = fused.decode(tokens)
        assert got.shape == want.shape == (len(prompts), vocab) and got.dtype == want.dtype
        errors.append(rel(got, want))
        assert torch.equal(fused.positions, eager.positions)
    for layer in range(model.config.num_hidden_layers):
        assert rel(fused.cache.k[layer], eager.cache.k[layer]) <= TOL[dtype]
        assert rel(fused.cache.v[layer], eager.cache.v[layer]) <= TOL[dtype]
    return errors


# (dtype, prompt lengths, heads, kv heads, head_dim): B = 1, 3 and 17; GQA 1, 4 and 12; head
# sizes 16, 64, 128; positions inside the first attention tile (64 slots; 32 for float32 at
# D=128), across tiles, and at D=128 across two sequence splits (kv_len >= 128 at one row);
# each in float32 and bfloat16.
CASES = [
    (F32, [3], 4, 4, 16),
    (BF16, [3], 4, 4, 16),
    (F32, [5, 70, 1], 8, 2, 16),
    (BF16, [5, 70, 1], 8, 2, 16),
    (F32, [130, 2, 40], 12, 1, 16),
    (F32, [100], 4, 1, 64),
    (BF16, [100], 4, 1, 64),
    (F32, [140], 2, 2, 128),
    (BF16, [130, 2, 40], 12, 1, 16),
    (BF16, [140], 2, 2, 128),
    (F32, [1, 9, 33, 4, 17, 2, 40, 8, 3, 25, 6, 12, 1, 30, 5, 19, 7], 4, 2, 16),
    (BF16, [1, 9, 33, 4, 17, 2, 40, 8, 3, 25, 6, 12, 1, 30, 5, 19, 7], 4, 2, 16),
]


@pytest.mark.parametrize("dtype,lengths,heads,kv_heads,head_dim", CASES)
def test_fused_logits_match_eager(kernel_device, dtype, lengths, heads, kv_heads, head_dim):
    model = random_model(96, seed=len(lengths) + head_dim, hidden_size=heads * head_dim,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         intermediate_size=96).to(kernel_device, dtype)
    errors = compare_steps(model, prompts_of(lengths, 96, seed=head_dim))
    assert max(errors) <= TOL[dtype], errors


def test_a_step_is_four_launches_per_layer_and_advances_the_positions_once(kernel_device,
                                                                          monkeypatch):
    """Per layer: attention (rotary and cache write inside), norm, SwiGLU, norm (plus the
    matmuls); before the layers one embedding + norm launch; the last norm advances the
    positions, and nothing else does (the decoder launches no add_ of its own)."""
    model = random_model(48, seed=4).to(kernel_device)
    dec = wrap(model)
    dec.prefill([[1, 2, 3], [4]], 4)
    dec.fused = True
    launched = []

    def spy(real):
        def run(calls):
            launched.extend((c.name, c.constexprs.get("HAS_POS")) for c in calls)
            real(calls)
        return run

    monkeypatch.setattr("lmgen_fast.models.fused_ops.run", spy(fo.run))
    monkeypatch.setattr("lmgen_fast.models.fused_mlp.run", spy(fm.run))
    before = dec.positions.clone()
    for step in (1, 2):
        launched.clear()
        dec.decode(torch.tensor([5, 6], device=kernel_device))
        # Two rows: the gate/up product and SwiGLU are one launch (fused_mlp).
        layer = [("attn_decode_kernel", None), ("add_rmsnorm_kernel", False),
                 ("gate_up_swiglu_kernel", None), ("add_rmsnorm_kernel", False)]
        layers = model.config.num_hidden_layers
        want = [("embed_rmsnorm_kernel", None)] + layer * layers
        want[-1] = ("add_rmsnorm_kernel", True)
        assert launched == want
        assert torch.equal(dec.positions, before + step)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("per_row", [1, 2, 5])
def test_forward_positions_matches_forward_cached(kernel_device, dtype, per_row):
    """Every token's logits at rows of different positions, T = 1, 2, 5: fused against the
    eager ``lm_head(forward_cached)`` on a twin decoder; the caches alike; no position
    advanced."""
    model = random_model(96, seed=per_row, hidden_size=64, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=96).to(kernel_device, dtype)
    eager, fused = wrap(model), wrap(model)
    prompts = prompts_of([6, 17, 2], 96, seed=per_row)
    with torch.no_grad():
        eager.prefill(prompts, per_row + 1)
        fused.prefill(prompts, per_row + 1)
    fused.fused = True
    start = fused.positions.clone()
    positions = start.view(-1, 1) + torch.arange(per_row, device=kernel_device)
    g = torch.Generator().manual_seed(per_row)
    ids = torch.randint(0, 96, (3, per_row), generator=g).to(kernel_device)
    kv_len = int(positions.max()) + 1
    with torch.no_grad():
        want = model.lm_head(model.forward_cached(ids, positions, eager.cache, kv_len))
        got = fused.forward_positions(ids, positions, kv_len)
    assert fused.fused and fused.fused_step().ok  # the fused path ran, no fallback
    assert got.shape == want.shape == (3, per_row, 96) and got.dtype == dtype
    assert rel(got, want) <= TOL[dtype]
    assert torch.equal(fused.positions, start)
    for layer in range(model.config.num_hidden_layers):
        assert rel(fused.cache.k[layer], eager.cache.k[layer]) <= TOL[dtype]
        assert rel(fused.cache.v[layer], eager.cache.v[layer]) <= TOL[dtype]


def test_supported_rejects_what_the_kernels_cannot_run():
    assert supported(random_model(32))
    assert not supported(random_model(32, hidden_size=96, num_attention_heads=4))  # D = 24
    assert not supported(random_model(32, hidden_size=32, num_attention_heads=4))  # D = 8
    assert not supported(random_model(32).double())
    assert not supported(lambda ids: ids)
    model = random_model(32)
    model.base_model.layers[0].self_attn.q_proj.weight.data = torch.zeros(
        64, 64, dtype=torch.float16)  # mixed dtypes
    assert not supported(model)


def test_weights_written_in_place_refresh_and_replaced_weights_rebuild():
    model = random_model(48, seed=1)
    dec = wrap(model)
    dec.prefill([[1, 2, 3]], 4)
    dec.fused = True
    step = dec.fused_step()
    assert step.extra_bytes() == sum(
        4 * (m.weight.numel()) for layer in model.base_model.layers
        for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                  layer.mlp.gate_proj, layer.mlp.up_proj))
    ptr = step.w_qkv[0].data_ptr()
    with torch.no_grad():  # in place (as load_state_dict does): the same buffers, new values
        model.base_model.layers[0].self_attn.k_proj.weight.mul_(2)
    assert dec.fused_step() is step and step.w_qkv[0].data_ptr() == ptr
    k = model.base_model.layers[0].self_attn.k_proj.weight
    assert torch.equal(step.w_qkv[0][64:64 + k.shape[0]], k)
    model.base_model.layers[1].mlp.up_proj.weight = torch.nn.Parameter(
        torch.randn(160, 64))  # replaced: rebuilt
    rebuilt = dec.fused_step()
    assert rebuilt is not step and step.w_qkv == []  # the old copies were released
    assert torch.equal(rebuilt.w_gu[1][160:], model.base_model.layers[1].mlp.up_proj.weight)


def test_a_failing_kernel_falls_back_to_the_eager_step(monkeypatch):
    model = random_model(48, seed=2)
    eager, fused = wrap(model), wrap(model)
    for d in (eager, fused):
        d.prefill([[1, 2, 3], [4]], 4)
    fused.fused = True

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel today")

    monkeypatch.setattr("lmgen_fast.models.fused_ops.run", broken)
    tokens = torch.tensor([5, 6])
    with pytest.warns(RuntimeWarning, match="no kernel today"):
        got = fused.decode(tokens)
    assert torch.equal(got, eager.decode(tokens))
    assert not fused.fused and not fused.supports_fused()


def test_engine_selects_the_fused_path_for_triton_only(model):
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    rows = [SamplingParams(temperature=0.0)] * 3
    out = {}
    for backend in ("reference", "triton"):
        dec = decoder_for(model)
        out[backend] = generate_ids(dec, prompts, rows, [12, 7, 12], -1, backend=backend)
        assert dec.fused == (backend == "triton")
    assert out["triton"] == out["reference"]
    assert all(len(o) == m for (o, _), m in zip(out["triton"], [12, 7, 12], strict=True))
    # allow_fused = False: the Triton sampler over eager model steps, no weight copies.
    dec = wrap(model)  # a fresh decoder: nothing built yet
    dec.allow_fused = False
    got = generate_ids(dec, prompts, rows, [12, 7, 12], -1, backend="triton")
    assert not dec.fused and dec._fused_step is None and got == out["reference"]


def test_transformers_llama_takes_the_fused_path():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=80, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
        initializer_range=0.1)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    dec = wrap(hf)
    assert isinstance(dec, CachedLlamaDecoder) and dec.supports_fused()
    assert isinstance(FusedLlamaStep(dec.model), FusedLlamaStep)
    errors = compare_steps(dec.model, prompts_of([4, 11], 80, seed=5))
    assert max(errors) <= TOL[F32], errors


# 64 rows took 210 s in the interpreter (the sampler kernels dominate); 24 rows of 10
# tokens fit in about a minute. On CUDA all 64 run.
SAMPLED_ROWS = 64 if DEVICE == "cuda" else 24


def test_seeded_sampling_of_the_embedded_model_matches_on_both_paths():
    model, tokenizer = load_default(DEVICE)
    prompts = [tokenizer.encode(t).ids for t in
               ("The list type", "def main():", "Once upon", "A model")]
    prompts = [prompts[i % len(prompts)] for i in range(SAMPLED_ROWS)]
    rows = [SamplingParams(temperature=0.9, top_k=40, seed=i)
            for i in range(SAMPLED_ROWS)]
    texts = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback allowed
        for backend in ("reference", "triton"):
            dec = wrap(model)
            got = generate_ids(dec, prompts, rows, [10] * SAMPLED_ROWS, -1, backend=backend)
            assert dec.fused == (backend == "triton")
            texts[backend] = [tokenizer.decode(ids) for ids, _ in got]
    same = sum(a == b for a, b in zip(texts["triton"], texts["reference"], strict=True))
    assert same >= 0.95 * SAMPLED_ROWS, same
    assert len(set(texts["triton"])) > SAMPLED_ROWS // 4  # seeds differ: so do the texts
