"""The decode engine: graph steps equal eager steps, per-row stop, host checks every N steps,
callbacks, errors found late, and batches split when memory runs out.

CUDA graphs need a GPU (the ``[gpu]`` tests at the end, each with its ``[interpreter]``
twin). On the CPU a stand-in graph that
re-runs the captured step closure checks what matters for replay: a captured step reads
nothing the host loop changes between steps, so replaying it gives the eager tokens.
"""

from __future__ import annotations

import gc
import warnings
import weakref
from dataclasses import replace

import pytest
import torch

from lmgen_fast import SamplingParams, generate_batch
from lmgen_fast.engine import DecodeOutOfMemory, GenerationError, generate_ids
from lmgen_fast.models.decoder import Decoder, decoder_for, release, wrap
from lmgen_fast.runtime import graphs

from conftest import (
    StandInGraph,
    assert_frequencies_match,
    random_model,
    require_kernel_runtime,
)
from test_models import article_model


class ClosureGraph(StandInGraph):
    """CPU stand-in for a CUDA graph: capture records the step without running it, replay
    re-runs it; like a real graph, nothing of the host loop runs in between."""

    captured = 0
    replays = 0

    def capture(self, fn):
        self.fn = fn
        self.replayed = 0
        ClosureGraph.captured += 1

    def replay(self):
        ClosureGraph.replays += 1
        self.replayed += 1
        self.fn()


@pytest.fixture
def closure_graphs(monkeypatch):
    monkeypatch.setattr(graphs, "graph_backend", lambda device: ClosureGraph)
    ClosureGraph.captured = ClosureGraph.replays = 0
    return ClosureGraph


def mixed_rows(seed: int) -> list[SamplingParams]:
    """Rows that exercise every part of the step: penalties over short and whole windows,
    top-k with and without top-p, min-p, greedy, a zero-length row."""
    return [
        SamplingParams(temperature=0.9, top_k=20, repetition_penalty=1.3,
                       repetition_penalty_range=4, seed=seed),
        SamplingParams(temperature=1.1, top_k=0, top_p=0.8, frequency_penalty=0.5,
                       repetition_penalty_range=0, seed=seed + 1),
        SamplingParams(temperature=0.0, repetition_penalty=3.0, repetition_penalty_range=0,
                       penalty_scope="all", seed=seed + 2),
        SamplingParams(temperature=0.7, top_k=5, min_p=0.05, presence_penalty=0.3,
                       penalty_mode="once", seed=seed + 3),
        SamplingParams(seed=seed + 4),
    ]


def random_prompts(seed: int, vocab: int, lengths=(3, 11, 1, 7, 5)) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def blocked_decoder(model, block: int = 16):
    decoder = wrap(model)
    decoder.kv_block = block  # several KV buckets (one graph each) within a short run
    return decoder


VOCAB = 48


@pytest.fixture(scope="module")
def flat_model():
    """Few tokens, soft logits: tokens repeat within a run, so every penalty and filter
    changes which tokens come out."""
    return random_model(VOCAB, seed=5, scale=1.5)


def test_replayed_steps_give_the_eager_tokens(flat_model, closure_graphs, one_thread):
    require_kernel_runtime()
    vocab, eos = VOCAB, 2
    # Blocks of 8 positions: the longest row (11 + 10) still crosses three KV buckets.
    caps = [7, 5, 10, 0, 9]
    graphed = blocked_decoder(flat_model, block=8)
    for call, seed in enumerate((10, 20)):  # the second call replays the first's graphs
        prompts, rows = random_prompts(seed, vocab), mixed_rows(seed)
        want = generate_ids(blocked_decoder(flat_model, block=8), prompts, rows, caps, eos,
                            backend="triton", cuda_graph=False)
        # Seeded rows: the reference sampler picks the very tokens the kernel picks.
        assert want == generate_ids(blocked_decoder(flat_model, block=8), prompts, rows, caps, eos,
                                    backend="reference")
        captured = closure_graphs.captured
        state = getattr(graphed, "engine_state", None)
        got = generate_ids(graphed, prompts, rows, caps, eos, backend="triton",
                           cuda_graph=True, sync_every=4)
        assert got == want
        assert [len(t) for t, _ in got][3] == 0
        if call == 1:
            assert graphed.engine_state is state  # buffers and graphs were reused
            assert closure_graphs.captured == captured
    assert closure_graphs.captured >= 2 and closure_graphs.replays > 10


def test_replayed_steps_give_the_eager_logprobs(flat_model, closure_graphs, one_thread):
    require_kernel_runtime()
    prompts, rows = random_prompts(30, VOCAB), mixed_rows(30)
    caps = [12, 12, 12, 12, 12]
    want = generate_ids(blocked_decoder(flat_model), prompts, rows, caps, 2, backend="triton",
                        cuda_graph=False, return_logprobs=True)
    got = generate_ids(blocked_decoder(flat_model), prompts, rows, caps, 2, backend="triton",
                       return_logprobs=True)
    assert closure_graphs.replays > 0
    assert got[0] == want[0]
    for g, w in zip(got[1], want[1], strict=True):
        assert g.logprobs == w.logprobs and len(g.logprobs) > 0
    # With top alternatives asked for, the loop stays eager (they need a host decision).
    replays = closure_graphs.replays
    asked = [replace(r, logprobs=3) for r in rows]
    generate_ids(blocked_decoder(flat_model), prompts, asked, caps, 2, backend="triton",
                 return_logprobs=True)
    assert closure_graphs.replays == replays


def test_graphs_of_another_cache_are_never_replayed(flat_model, closure_graphs, one_thread):
    require_kernel_runtime()
    eos = 2
    decoder = blocked_decoder(flat_model)
    rows = [SamplingParams(seed=1), SamplingParams(seed=2)]
    prompts = [[5, 6], [7]]
    generate_ids(decoder, prompts, rows, [10, 10], eos, backend="triton")
    old = list(decoder.engine_state.graphs.values())
    replays = [g.replayed for g in old]
    # A longer run needs a larger cache; a CUDA graph captured on the old one would read
    # and write freed memory, so those graphs must go, even for the same KV lengths.
    got = generate_ids(decoder, prompts, rows, [30, 30], eos, backend="triton")
    assert [g.replayed for g in old] == replays
    assert closure_graphs.captured > len(old)
    assert got == generate_ids(blocked_decoder(flat_model), prompts, rows, [30, 30], eos,
                               backend="triton", cuda_graph=False)


def test_graphs_of_replaced_weights_are_never_replayed(closure_graphs, one_thread):
    require_kernel_runtime()
    model = random_model(VOCAB, seed=6, scale=1.5)
    decoder = blocked_decoder(model)
    prompts, rows = [[5, 6], [7]], [SamplingParams(seed=1), SamplingParams(seed=2)]
    first = generate_ids(decoder, prompts, rows, [20, 20], 2, backend="triton")
    old = list(decoder.engine_state.graphs.values())
    replays = [g.replayed for g in old]
    # New tensors with the same values: a graph holding the old addresses must go.
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(fresh, assign=True)
    again = generate_ids(decoder, prompts, rows, [20, 20], 2, backend="triton")
    assert [g.replayed for g in old] == replays
    assert again == first


def test_a_decoder_in_use_refuses_a_nested_run(model):
    decoder = wrap(model)
    rows = [SamplingParams(seed=1)]

    def callback(row, token):
        generate_ids(decoder, [[4, 5]], rows, [3], 2)

    with pytest.raises(RuntimeError, match="already generating"):
        generate_ids(decoder, [[1, 2, 3]], rows, [5], 2, callback=callback)
    assert generate_ids(decoder, [[4, 5]], rows, [3], 2)  # usable again afterwards


class ScriptedDecoder(Decoder):
    """Row r emits 10, 11, ... and EOT from step ``stops[r]`` on; NaN rows on request."""

    def __init__(self, vocab: int, eot: int, stops: list[int], nan_at: dict | None = None):
        self.vocab, self.eot, self.stops, self.nan_at = vocab, eot, stops, nan_at or {}
        self.calls = 0

    def _logits(self) -> torch.Tensor:
        logits = torch.full((len(self.stops), self.vocab), -10.0)
        for r, stop in enumerate(self.stops):
            logits[r, self.eot if self.step >= stop else 10 + self.step] = 10.0
            if self.nan_at.get(r) == self.step:
                logits[r] = float("nan")
        return logits

    def prefill(self, prompts, max_new_tokens):
        self.step = 0
        return self._logits()

    def decode(self, tokens):
        self.step += 1
        self.calls += 1
        return self._logits()


@pytest.mark.parametrize("sync_every", [1, 4])
def test_rows_stop_on_their_own_and_the_host_looks_every_n_steps(sync_every):
    dec = ScriptedDecoder(100, 2, stops=[5, 100, 2])
    rows = [SamplingParams(temperature=0)] * 3
    got = generate_ids(dec, [[1]] * 3, rows, [50, 3, 50], 2, sync_every=sync_every)
    assert got == [([10, 11, 12, 13, 14], "eot"), ([10, 11, 12], "length"), ([10, 11], "eot")]
    # Every row is done after step 5; the host sees it at the next multiple of sync_every.
    assert dec.calls == -(-6 // sync_every) * sync_every - 1


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_bad_row_found_at_a_later_check_keeps_what_came_before(backend):
    if backend == "triton":
        require_kernel_runtime()
    dec = ScriptedDecoder(64, 2, stops=[100, 100], nan_at={1: 3})
    seen = []
    with pytest.raises(GenerationError, match=r"at step 3: logits row\(s\) \[1\]") as info:
        generate_ids(dec, [[1], [1]], [SamplingParams(temperature=0)] * 2, [30, 30], 2,
                     backend=backend, sync_every=8, callback=lambda r, t: seen.append((r, t)))
    partial = info.value.partial
    assert partial[1] == [10, 11, 12]
    assert partial[0][:3] == [10, 11, 12]
    assert [t for r, t in seen if r == 1] == partial[1]


def test_callback_sees_every_token_once_between_checks(model, tokenizer, one_thread):
    prompts = ["The quick brown fox", "A", "Sampling"]
    seen = []
    out = generate_batch(model, tokenizer, prompts, max_tokens=[7, 13, 10], seeds=[1, 2, 3],
                         sync_every=5, callback=lambda r, t: seen.append((r, t)),
                         return_details=True)
    for r, g in enumerate(out):
        assert [t for rr, t in seen if rr == r] == g.token_ids
    assert len(seen) == sum(len(g.token_ids) for g in out)
    same = generate_batch(model, tokenizer, prompts, max_tokens=[7, 13, 10], seeds=[1, 2, 3],
                          return_details=True)
    assert [g.token_ids for g in same] == [g.token_ids for g in out]


class FixedDecoder(Decoder):
    """The same logits row for every row at every step."""

    def __init__(self, row: torch.Tensor, batch: int):
        self.logits = row.expand(batch, -1).contiguous()

    def prefill(self, prompts, max_new_tokens):
        return self.logits.clone()

    def decode(self, tokens):
        return self.logits.clone()


def test_unseeded_rows_draw_from_the_exact_distribution(one_thread):
    require_kernel_runtime()
    gen = torch.Generator().manual_seed(11)
    row = torch.randn(16, generator=gen) * 1.5
    probs = torch.softmax(row.double() / 0.9, dim=0)
    torch.manual_seed(0)  # the unseeded rows' seeds come from torch's generator
    out = generate_ids(FixedDecoder(row, 8), [[1]] * 8, [SamplingParams(temperature=0.9,
                       top_k=0)] * 8, [60] * 8, -1, backend="triton", sync_every=7)
    tokens = torch.tensor([t for ids, _ in out for t in ids])
    assert tokens.numel() == 480
    assert_frequencies_match(tokens, probs)
    assert len({tuple(ids) for ids, _ in out}) == 8  # every row has its own noise


class TightDecoder(Decoder):
    """Wraps a decoder and runs out of memory for batches above ``limit`` rows (at prefill)
    or at decode step ``fail_step``."""

    def __init__(self, inner, limit: int, fail_step: int | None = None):
        self.inner, self.limit, self.fail_step = inner, limit, fail_step
        self.batches: list[int] = []

    def prefill(self, prompts, max_new_tokens):
        self.batches.append(len(prompts))
        if len(prompts) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.step = 0
        return self.inner.prefill(prompts, max_new_tokens)

    def decode(self, tokens):
        self.step += 1
        if self.step == self.fail_step:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return self.inner.decode(tokens)


def test_a_batch_that_does_not_fit_is_split_with_the_same_tokens(model, one_thread):
    prompts = random_prompts(3, 300)
    rows = [SamplingParams(seed=s, top_k=10) for s in range(5)]
    caps = [8, 3, 12, 6, 9]
    want = generate_ids(wrap(model), prompts, rows, caps, 2)
    tight = TightDecoder(wrap(model), limit=2)
    seen = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = generate_ids(tight, prompts, rows, caps, 2, callback=lambda r, t: seen.append((r, t)))
    assert [str(w.message).split(";")[0] for w in caught] == [
        "a batch of 5 rows did not fit in device memory",
        "a batch of 3 rows did not fit in device memory",
    ]
    assert got == want
    assert tight.batches == [5, 3, 2, 1, 2]
    for r, (ids, _) in enumerate(got):
        assert [t for rr, t in seen if rr == r] == ids


def test_out_of_memory_for_one_row_or_after_streaming_is_a_clear_error(model):
    with pytest.raises(DecodeOutOfMemory, match="single row of 3 prompt tokens and "
                                                "max_tokens=40 \\(42 positions\\)"):
        generate_ids(TightDecoder(wrap(model), limit=0), [[4, 5, 6]], [SamplingParams()],
                     [40], 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no split may be tried once tokens were streamed
        with pytest.raises(DecodeOutOfMemory, match="after tokens were streamed"):
            generate_ids(TightDecoder(wrap(model), limit=4, fail_step=3), [[4], [5]],
                         [SamplingParams(seed=1)] * 2, [10, 10], 2, callback=lambda r, t: None)


def test_decoder_is_kept_per_model_until_its_tensors_move(tokenizer):
    model = random_model(tokenizer.get_vocab_size(), seed=4)
    first = decoder_for(model)
    assert decoder_for(model) is first
    model.to(torch.float64)  # new tensors: the kept decoder (cache, graphs) is stale
    second = decoder_for(model)
    assert second is not first
    release(model)
    assert decoder_for(model) is not second
    assert decoder_for(lambda ids: ids) is not None  # plain callables are wrapped each time


@pytest.mark.parametrize("kind", ["ours", "article"])
def test_a_kept_decoder_does_not_keep_its_model_alive(kind, one_thread):
    model = random_model(300, seed=4) if kind == "ours" else article_model(seed=4)
    decoder = decoder_for(model)
    generate_ids(decoder, [[1, 5, 7]], [SamplingParams(seed=1)], [3], 2)
    assert decoder_for(model) is decoder
    del decoder
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_a_callback_may_generate_on_the_same_model(model, tokenizer, one_thread):
    inner = []

    def callback(row, token):
        if not inner:
            inner.append(generate_batch(model, tokenizer, ["A"], max_tokens=5, seed=9)[0])

    outer = generate_batch(model, tokenizer, ["The"], max_tokens=6, seed=8, callback=callback)
    assert inner == generate_batch(model, tokenizer, ["A"], max_tokens=5, seed=9)
    assert outer == generate_batch(model, tokenizer, ["The"], max_tokens=6, seed=8)


def test_bad_sync_every_is_rejected_before_any_work(model, tokenizer):
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=f"sync_every must be a positive int, got {bad!r}"):
            generate_batch(model, tokenizer, ["The"], max_tokens=3, sync_every=bad)


# ------------------------------------------------------------------- GPU, and their twins
# Each test runs as a pair (conftest's kernel_device): [gpu] at full size with real CUDA
# graphs, bfloat16 where the GPU runs it, and its [interpreter] twin on the CPU, the same
# body at small sizes with the closure stand-in for the graphs and the Triton kernels in
# the interpreter (float32: what the interpreter runs).


@pytest.fixture
def step_graphs(kernel_device, monkeypatch) -> str:
    """The device of a GPU/interpreter pair, with real CUDA graphs on the GPU and the
    closure stand-in on the CPU (where there are no graphs)."""
    if kernel_device == "cpu":
        monkeypatch.setattr(graphs, "graph_backend", lambda device: ClosureGraph)
        ClosureGraph.captured = ClosureGraph.replays = 0
    return kernel_device


def gpu_rows(batch: int, seed: int) -> list[SamplingParams]:
    kinds = mixed_rows(seed)
    return [replace(kinds[i % len(kinds)], seed=seed + i) for i in range(batch)]


def step_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


@pytest.mark.parametrize("dtype", ["model", "float32"])
def test_graph_replay_gives_the_eager_tokens_across_kv_buckets(dtype, tokenizer, step_graphs):
    """65 rows of mixed lengths over 150 steps (two KV buckets of 128) on the GPU; 5 rows
    over up to 11 steps in buckets of 8 on the CPU. ``dtype`` "model": bfloat16 on the GPU."""
    device = step_graphs
    cuda = device == "cuda"
    if not cuda and dtype == "float32":
        pytest.skip("on the CPU the model's dtype is float32: the other parameter runs it")
    vocab = tokenizer.get_vocab_size()
    torch_dtype = step_dtype(device) if dtype == "model" else torch.float32
    model = random_model(vocab, seed=1, scale=4.0).to(device, torch_dtype)
    prompts = random_prompts(7, vocab) * (13 if cuda else 1)
    rows = gpu_rows(len(prompts), 100)
    caps = [(17 * i) % (150 if cuda else 12) + 1 for i in range(len(prompts))]

    def decoder():
        return wrap(model) if cuda else blocked_decoder(model, block=8)

    eager = generate_ids(decoder(), prompts, rows, caps, 2, backend="triton", cuda_graph=False)
    graphed = decoder()
    assert generate_ids(graphed, prompts, rows, caps, 2, backend="triton",
                        cuda_graph=True) == eager
    assert len(graphed.engine_state.graphs) >= 2  # the steps span two KV buckets or more
    again = generate_ids(graphed, prompts, rows, caps, 2, backend="triton", cuda_graph=True)
    assert again == eager


def test_graphs_for_article_and_transformers_modules(step_graphs):
    device = step_graphs
    cuda = device == "cuda"
    transformers = pytest.importorskip("transformers")
    dtype = step_dtype(device)
    hf = random_model(300, seed=2, scale=4.0).to_hf().to(device, dtype)
    assert isinstance(hf, transformers.LlamaForCausalLM)
    article = article_model(seed=2).to(device, dtype)
    prompts = random_prompts(8, 300) * 4 if cuda else random_prompts(8, 300)[:3]
    rows = gpu_rows(len(prompts), 5)
    caps = [40 if cuda else 5] * len(prompts)
    for module in (hf, article):
        decoder = wrap(module)
        assert decoder.graphable
        eager = generate_ids(wrap(module), prompts, rows, caps, 2, backend="triton",
                             cuda_graph=False)
        assert generate_ids(decoder, prompts, rows, caps, 2, backend="triton") == eager
        assert decoder.engine_state.graphs


def test_batch_with_streaming(tokenizer, step_graphs):
    """256 rows of 64 tokens on the GPU, 4 rows of 5 on the CPU: the callback sees every
    token of every row, in order, and the text equals the eager loop's."""
    device = step_graphs
    cuda = device == "cuda"
    batch, tokens = (256, 64) if cuda else (4, 5)
    vocab = tokenizer.get_vocab_size()
    model = random_model(vocab, seed=3, scale=4.0).to(device, step_dtype(device))
    prompts = [f"row {i} " + "x" * (i % 37) for i in range(batch)]
    seen = []
    out = generate_batch(model, tokenizer, prompts, max_tokens=tokens, seeds=list(range(batch)),
                         backend="triton", callback=lambda r, t: seen.append((r, t)),
                         return_details=True)
    assert len(seen) == sum(len(g.token_ids) for g in out) > 0
    for r in sorted({0, batch // 2, batch - 1}):
        assert [t for rr, t in seen if rr == r] == out[r].token_ids
    eager = generate_batch(model, tokenizer, prompts, max_tokens=tokens,
                           seeds=list(range(batch)), backend="triton", cuda_graph=False)
    assert eager == [g.text for g in out]
