"""Degrade, never fail: a Triton kernel that fails, or a step that cannot be captured, costs
speed (with one warning naming the cause), never the user's tokens.

Faults are injected on the CPU: a launch that raises as a failing Triton compilation
would, and a stand-in CUDA graph whose capture raises as an illegal op inside a capture
would.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch

from lmgen_fast import SamplingParams
from lmgen_fast.engine import generate_ids
from lmgen_fast.engine.memory import kv_bytes_per_position, one_row_message
from lmgen_fast.models.decoder import wrap
from lmgen_fast.runtime import graphs, kernel_failure, reset_failure
from lmgen_fast.sampling import kernel as kernel_sampler
from lmgen_fast.sampling import reference

from conftest import StandInGraph, random_model, require_kernel_runtime


def fresh_logits(seed: int, batch: int = 6, vocab: int = 300) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=gen) * 3


def rows(seed: int, batch: int = 6) -> list[SamplingParams]:
    return [SamplingParams(temperature=0.8, top_k=[0, 20][i % 2], top_p=[1.0, 0.9][i % 3 == 0],
                           repetition_penalty=1.3, seed=seed + i) for i in range(batch)]


def test_sample_falls_back_to_the_reference_with_one_warning(broken_kernels):
    require_kernel_runtime()
    logits = fresh_logits(1)
    window = torch.randint(0, 300, (6, 5), generator=torch.Generator().manual_seed(2))
    params = rows(10)
    want = reference.sample(logits, params, window, step=3)
    with pytest.warns(RuntimeWarning, match="FakeCompilationError.*reference sampler"):
        got = kernel_sampler.sample(logits, params, window, step=3)
    assert torch.equal(got, want)
    assert "unsupported op" in kernel_failure()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second compilation attempt
        got = kernel_sampler.sample(logits, params, window, step=3, return_logprobs=True)
    assert torch.equal(got[0], want)
    assert len(broken_kernels) == 1


def test_bad_arguments_are_not_mistaken_for_a_kernel_failure(monkeypatch):
    require_kernel_runtime()
    reset_failure()

    def bad(*args, **kwargs):
        raise ValueError("logprob_out must be a contiguous float32 [B, 3] tensor")

    monkeypatch.setattr(kernel_sampler, "launch", bad)
    with pytest.raises(ValueError, match="logprob_out"):
        kernel_sampler.sample(fresh_logits(3), SamplingParams(seed=1))
    assert kernel_failure() is None


@pytest.fixture(scope="module")
def small_model():
    return random_model(64, seed=3, scale=1.5)


def prompts_for(seed: int, vocab: int = 64) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (4, 9, 2)]


ENGINE_ROWS = [
    SamplingParams(temperature=0.9, top_k=10, repetition_penalty=1.2, seed=5),
    SamplingParams(temperature=1.0, top_p=0.8, seed=6),
    SamplingParams(temperature=0.0, seed=7),
]


def test_engine_runs_the_reference_when_the_kernels_fail(small_model, broken_kernels):
    require_kernel_runtime()
    prompts, caps = prompts_for(4), [12, 7, 10]
    want = generate_ids(wrap(small_model), prompts, ENGINE_ROWS, caps, 2, backend="reference")
    streamed = []
    with pytest.warns(RuntimeWarning, match="reference sampler"):
        got = generate_ids(wrap(small_model), prompts, ENGINE_ROWS, caps, 2, backend="triton",
                           callback=lambda r, t: streamed.append((r, t)))
    assert got == want
    # Every token reached the callback exactly once (the failed first try streamed nothing).
    for r, (ids, _) in enumerate(want):
        assert [t for rr, t in streamed if rr == r] == ids
    # Later calls go straight to the reference, without another warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert generate_ids(wrap(small_model), prompts, ENGINE_ROWS, caps, 2,
                            backend="triton") == want
    assert len(broken_kernels) == 1


class FailingCapture(StandInGraph):
    """A stand-in CUDA graph whose capture fails, as one that meets a sync would."""

    captures = 0

    def capture(self, fn):
        FailingCapture.captures += 1
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    def replay(self):  # pragma: no cover - never captured
        raise AssertionError("replayed a graph whose capture failed")


def test_a_failed_capture_runs_the_decoder_eagerly(small_model, monkeypatch):
    require_kernel_runtime()
    reset_failure()
    monkeypatch.setattr(graphs, "graph_backend", lambda device: FailingCapture)
    FailingCapture.captures = 0
    prompts, caps = prompts_for(8), [15, 6, 11]
    want = generate_ids(wrap(small_model), prompts, ENGINE_ROWS, caps, 2, backend="triton",
                        cuda_graph=False)
    decoder = wrap(small_model)
    decoder.kv_block = 8  # several KV buckets: without the fallback each would try a capture
    with pytest.warns(RuntimeWarning, match="not permitted when stream is capturing"):
        got = generate_ids(decoder, prompts, ENGINE_ROWS, caps, 2, backend="triton",
                           cuda_graph=True, sync_every=4)
    assert got == want
    assert FailingCapture.captures == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert generate_ids(decoder, prompts, ENGINE_ROWS, caps, 2, backend="triton",
                            cuda_graph=True, sync_every=4) == want
    assert FailingCapture.captures == 1


def test_one_row_oom_message_for_a_transformers_model(monkeypatch):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=3, n_head=4, n_embd=64, vocab_size=100, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg)
    # 2 (K and V) x 3 layers x 4 heads x 16 dims x 4 bytes
    assert kv_bytes_per_position(model) == 2 * 3 * 4 * 16 * 4
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * 2**20, 2**31))
    decoder = types.SimpleNamespace(model=model, device=torch.device("cuda:0"))
    msg = one_row_message(decoder, [1, 2, 3], 10, RuntimeError("CUDA out of memory"))
    assert "3 MiB are free" in msg and "1.5 KiB per position" in msg
    assert f"{3 * 2**20 // 1536} positions fit" in msg
