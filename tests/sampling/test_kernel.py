"""The fused Triton sampler against the reference (SPEC sections 2 to 4).

Each kernel test runs twice (conftest.py's ``kernel_device``): compiled on CUDA (``[gpu]``)
and in Triton's interpreter on CPU tensors (``[interpreter]``, on small shapes; conftest.py
chooses it before triton is first imported).
The ``*_at_full_size`` and graph tests take V = 128256, B = 256 on a CUDA device, and small
shapes in their interpreter twins.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import at_size, capture, require_kernel_runtime

require_kernel_runtime()

from lmgen_fast import SamplingParams  # noqa: E402
from lmgen_fast.core.errors import STATUS_EMPTY, EmptyRowError  # noqa: E402
from lmgen_fast.sampling import kernel as K  # noqa: E402
from lmgen_fast.sampling import reference  # noqa: E402
from lmgen_fast.sampling.dispatch import resolve_backend  # noqa: E402
from lmgen_fast.sampling.dispatch import sample as public_sample  # noqa: E402

TEMPS = [0.0, 0.5, 1.0, 1.7]
PENALTIES = [1.0, 0.8, 1.3, 2.0]


def random_params(gen: torch.Generator, batch: int, vocab: int, seeded: bool = True):
    """Per-row parameters covering k = 1, k >= V, k <= 0, T = 0, both penalty modes."""
    ks = [0, -3, 1, 2, 7, 50, vocab - 1, vocab, vocab + 5]
    rows = []
    for _ in range(batch):
        pick = torch.randint(0, 1000, (5,), generator=gen).tolist()
        rows.append(
            SamplingParams(
                temperature=TEMPS[pick[0] % len(TEMPS)],
                top_k=ks[pick[1] % len(ks)],
                repetition_penalty=PENALTIES[pick[2] % len(PENALTIES)],
                penalty_mode="once" if pick[3] % 2 else "per_occurrence",
                seed=int(torch.randint(0, 2**62, (1,), generator=gen)) if seeded else None,
            )
        )
    return rows


def random_window(gen: torch.Generator, batch: int, vocab: int, width: int = 12):
    """Windows with duplicates (ids from a small pool) and -1 pads."""
    pool = torch.randint(0, vocab, (batch, 4), generator=gen)
    pick = torch.randint(0, 4, (batch, width), generator=gen)
    win = pool.gather(1, pick)
    pads = torch.rand(batch, width, generator=gen) < 0.25
    return win.masked_fill(pads, -1)


def random_logits(gen: torch.Generator, batch: int, vocab: int, dtype, ties: bool = False):
    x = torch.randn(batch, vocab, generator=gen) * 3
    if ties:
        # Few distinct values: many exact ties, also at the k-th largest value.
        x = torch.randint(-4, 5, (batch, vocab), generator=gen).float()
    return x.to(dtype)


def both(dev, logits, params, window=None, step=0, **kw):
    """Kernel and reference tokens for the same inputs (reference on the same device)."""
    got = K.sample(logits.to(dev), params, None if window is None else window.to(dev),
                   step=step, **kw)
    want = reference.sample(logits.to(dev), params,
                            None if window is None else window.to(dev), step=step)
    return got.cpu(), want.cpu()


# ---------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab,chunk", [(700, 256), (2500, 1024)])
@pytest.mark.parametrize("ties", [False, True])
def test_matches_seeded_reference(kernel_device, dtype, vocab, chunk, ties):
    salt = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[dtype]
    gen = torch.Generator().manual_seed(vocab + 7 * int(ties) + 100 * salt)
    batch = 8
    logits = random_logits(gen, batch, vocab, dtype, ties)
    params = random_params(gen, batch, vocab)
    window = random_window(gen, batch, vocab)
    for step in (0, 5):
        got, want = both(kernel_device, logits, params, window, step=step, chunk=chunk)
        assert torch.equal(got, want), (step, got, want)


@pytest.mark.parametrize("k", [1, 3, 10, 16, 40])
def test_ties_at_kth_value(kernel_device, k):
    # Many tokens share the k-th largest value; all of them must survive top-k. At k = 16
    # a chunk may keep exactly k candidates (the launch plan's cap).
    gen = torch.Generator().manual_seed(k)
    vocab = 600
    logits = torch.full((6, vocab), -2.0)
    top = torch.randperm(vocab, generator=gen)[: k + 20]
    logits[:, top[: k - 1]] = 3.0
    logits[:, top[k - 1:]] = 1.0  # the k-th value, tied 21 times
    params = [SamplingParams(temperature=1.0, top_k=k, seed=s) for s in range(6)]
    picks = set()
    for step in range(4):
        got, want = both(kernel_device, logits, params, step=step, chunk=256)
        assert torch.equal(got, want)
        picks.update(got.tolist())
    assert picks & set(top[k - 1:].tolist()), "tied tokens at the k-th value never drawn"


@pytest.mark.parametrize("chunk", [64, 256])
def test_ties_beyond_candidate_capacity(kernel_device, chunk):
    # Far more equal values than a chunk may keep: the tie-group path.
    vocab = 1000
    logits = torch.zeros(4, vocab)
    logits[0, 17] = 1.0
    logits[1, ::7] = 0.5
    logits[3] = torch.randn(vocab).round()
    params = [SamplingParams(temperature=0.9, top_k=k, seed=3 + k) for k in (2, 3, 5, 9)]
    for step in range(3):
        got, want = both(kernel_device, logits, params, step=step, chunk=chunk)
        assert torch.equal(got, want)


def test_greedy_ties_and_penalty(kernel_device):
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0], [5.0, 1.0, 5.0, 4.9], [2.0, 2.0, 0.5, -1.0]])
    window = torch.tensor([[-1, -1], [0, -1], [0, 0]])
    params = SamplingParams(temperature=0.0, top_k=1, repetition_penalty=1.01, seed=1)
    got, want = both(kernel_device, logits, params, window)
    assert got.tolist() == want.tolist() == [1, 2, 1]


def test_nan_and_inf_rows(kernel_device):
    vocab = 300
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, vocab, generator=gen)
    logits[0, ::2] = float("nan")  # NaN never sampled
    logits[1, [5, 200, 299]] = float("inf")  # +inf tokens share all the mass
    logits[2, 250] = float("inf")
    logits[3, :-1] = float("nan")  # one finite value left
    logits[4, 100:] = float("-inf")
    logits[5, [7, 123]] = float("inf")
    params = [SamplingParams(temperature=t, top_k=k, seed=i)
              for i, (t, k) in enumerate([(1, 0), (1, 50), (0.5, 0), (1, 3), (2, 150), (0, 5)])]
    seen = set()
    for step in range(6):
        got, want = both(kernel_device, logits, params, step=step, chunk=128)
        assert torch.equal(got, want)
        assert torch.isfinite(logits[0, got[0]]) and got[3] == vocab - 1 and got[4] < 100
        assert got[2] == 250 and got[5] == 7
        seen.add(int(got[1]))
    assert seen <= {5, 200, 299} and len(seen) > 1


def test_empty_row_is_reported(kernel_device):
    logits = torch.randn(3, 200)
    logits[1] = float("nan")
    logits[2] = float("-inf")
    params = SamplingParams(top_k=5, seed=0)
    with pytest.raises(EmptyRowError) as err:
        K.sample(logits.to(kernel_device), params)
    assert err.value.rows == [1, 2]
    packed = reference.pack(params, 3, torch.device(kernel_device))
    steps = torch.zeros(3, dtype=torch.int64, device=kernel_device)
    tokens, status = K.launch(logits.to(kernel_device), packed, None, steps, max_top_k=5)
    assert status.cpu().tolist() == [0, STATUS_EMPTY, STATUS_EMPTY]
    assert ((tokens >= 0) & (tokens < 200)).all()


def test_top_k_beyond_max_top_k_is_flagged(kernel_device):
    logits = torch.randn(2, 3000)
    params = SamplingParams(top_k=600, seed=0)
    with pytest.raises(RuntimeError, match="max_top_k"):
        K.sample(logits.to(kernel_device), params, max_top_k=20, chunk=1024)


def test_large_k_and_step_tensor(kernel_device):
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(4, 1500, generator=gen)
    params = [SamplingParams(temperature=1.1, top_k=k, seed=k) for k in (300, 1024, 1499, 777)]
    step = torch.tensor([0, 1, 2, 2**32 - 1])
    got, want = both(kernel_device, logits, params, step=step, chunk=512)
    assert torch.equal(got, want)


def test_unseeded_rows_draw_seeds_like_reference(kernel_device):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 500, generator=gen)
    params = [SamplingParams(top_k=20), SamplingParams(top_k=0, seed=9),
              SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=3)]
    torch.manual_seed(1234)
    got = K.sample(logits.to(kernel_device), params).cpu()
    torch.manual_seed(1234)
    want = reference.sample(logits.to(kernel_device), params).cpu()
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------- randomness


def exact_probs(logits: torch.Tensor, params: SamplingParams, window) -> torch.Tensor:
    z = reference.filtered_logits(logits, params, window).double()
    return torch.softmax(z[0], dim=0)


@pytest.mark.parametrize("top_k", [0, 5])
def test_chi_square_against_exact_distribution(kernel_device, top_k):
    stats = pytest.importorskip("scipy.stats")
    vocab, batch, steps = 12, 64, (6 if top_k == 0 else 4)
    gen = torch.Generator().manual_seed(2)
    row = torch.randn(1, vocab, generator=gen) * 1.5
    top = row[0].topk(2).indices.tolist()
    window = torch.tensor([[top[0], top[0], top[1], -1]])  # penalize the likeliest tokens
    base = SamplingParams(temperature=0.8, top_k=top_k, repetition_penalty=1.5)
    params = [SamplingParams(**{**vars(base), "seed": 1000 + i}) for i in range(batch)]
    counts = torch.zeros(vocab)
    for step in range(steps):
        tok = K.sample(row.expand(batch, vocab).contiguous().to(kernel_device), params,
                       window.expand(batch, -1).contiguous().to(kernel_device), step=step)
        counts += torch.bincount(tok.cpu(), minlength=vocab).float()
    probs = exact_probs(row, base, window)
    n = batch * steps
    assert counts[probs == 0].sum() == 0  # filtered tokens are never drawn
    keep = probs > 0
    expected = (probs[keep] * n).numpy()
    res = stats.chisquare(counts[keep].numpy(), expected * (n / expected.sum()))
    assert res.pvalue > 1e-3, (counts, probs * n)
    # The test has power: the distribution without the penalty is rejected.
    plain = SamplingParams(**{**vars(base), "repetition_penalty": 1.0})
    wrong = exact_probs(row, plain, window)[keep].numpy() * n
    assert stats.chisquare(counts[keep].numpy(), wrong * (n / wrong.sum())).pvalue < 1e-3


def test_same_seed_same_tokens_and_steps_differ(kernel_device):
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(8, 400, generator=gen).to(kernel_device)
    params = [SamplingParams(top_k=0, seed=42 + i) for i in range(8)]
    a = K.sample(logits, params, step=3)
    b = K.sample(logits, params, step=3)
    c = K.sample(logits, params, step=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_batch_invariance(kernel_device):
    gen = torch.Generator().manual_seed(9)
    vocab = 900
    logits = torch.randn(6, vocab, generator=gen)
    params = random_params(gen, 6, vocab)
    window = random_window(gen, 6, vocab)
    dev = kernel_device
    full = K.sample(logits.to(dev), params, window.to(dev), step=2, chunk=256).cpu()
    alone = [
        int(K.sample(logits[i:i + 1].to(dev), params[i], window[i:i + 1].to(dev),
                     step=2, chunk=256))
        for i in (0, 3)
    ]
    assert alone == [int(full[0]), int(full[3])]
    perm = torch.tensor([5, 3, 1, 0])
    mates = torch.randn(4, vocab, generator=gen)
    mates[1], mates[3] = logits[3], logits[0]
    mixed = [params[5], params[3], params[1], params[0]]
    wmix = window[perm]
    again = K.sample(mates.to(dev), mixed, wmix.to(dev), step=2, chunk=256).cpu()
    assert int(again[1]) == int(full[3]) and int(again[3]) == int(full[0])


# ---------------------------------------------------------------------------- dispatch


def test_auto_backend_dispatch(kernel_device):
    assert resolve_backend("auto", torch.device("cpu")) == "reference"
    assert resolve_backend("triton", torch.device("cpu")) == "triton"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", torch.device("cpu"))
    logits = torch.randn(3, 100)
    params = SamplingParams(top_k=5, seed=1)
    got = public_sample(logits.to(kernel_device), params, backend="triton")
    want = reference.sample(logits.to(kernel_device), params)
    assert torch.equal(got, want)


def test_cpu_without_interpreter_says_how_to_enable():
    script = textwrap.dedent(
        """
        import torch
        import lmgen_fast
        try:
            lmgen_fast.sample(torch.randn(2, 10), lmgen_fast.SamplingParams(seed=1),
                              backend="triton")
        except RuntimeError as e:
            print("ERR", e)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert "ERR" in res.stdout and "TRITON_INTERPRET=1" in res.stdout, res.stderr[-2000:]


# ---------------------------------------------------------------------------- GPU, full size

GPU_V, GPU_B = 128256, 256
SMALL_V, SMALL_B = 3000, 8  # the interpreter twins


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_at_full_size(kernel_device, dtype):
    b, v = at_size(kernel_device, (GPU_B, GPU_V), (SMALL_B, SMALL_V))
    gen = torch.Generator().manual_seed(21)
    logits = (torch.randn(b, v, generator=gen) * 4).to(dtype)
    params = random_params(gen, b, v)
    window = random_window(gen, b, v, width=64)
    for step in (0, 1, 2):
        got, want = both(kernel_device, logits, params, window, step=step)
        # Same device, same float ops: only near-ties within rounding may differ.
        assert (got != want).sum() <= 1, (got != want).nonzero()
    # A GPU run replays on the CPU reference.
    cpu = reference.sample(logits, params, window, step=2)
    assert (got.cpu() != cpu).sum() <= 1


def test_chi_square_batch_invariance_and_graph(kernel_device):
    stats = pytest.importorskip("scipy.stats")
    dev = kernel_device
    # The twin: 8 rows of 256 logits, a flatter row and top-5, so that 160 draws fill
    # every bin (the small-shape frequency tests above check the law more closely).
    batch, vocab, scale, k, steps = at_size(dev, (GPU_B, GPU_V, 4, 20, 40),
                                            (SMALL_B, 256, 1, 5, 20))
    gen = torch.Generator().manual_seed(4)
    row = torch.randn(1, vocab, generator=gen) * scale
    base = SamplingParams(temperature=1.0, top_k=k)
    params = [SamplingParams(**{**vars(base), "seed": i}) for i in range(batch)]
    logits = row.expand(batch, vocab).contiguous().to(dev)
    counts = torch.zeros(vocab, device=dev)
    for step in range(steps):
        counts += torch.bincount(K.sample(logits, params, step=step), minlength=vocab)
    probs = exact_probs(row, base, None).to(dev)
    keep = probs > 0
    assert counts[~keep].sum() == 0
    n = batch * steps
    res = stats.chisquare(counts[keep].cpu().numpy(), (probs[keep] * n).cpu().numpy())
    assert res.pvalue > 1e-3
    # Batch invariance: row 7 alone gives the same token.
    full = K.sample(logits, params, step=3)
    assert int(K.sample(logits[7:8], params[7], step=3)) == int(full[7])
    # A CUDA graph of launch(), replayed with a new step read from the device.
    packed = reference.pack(params, batch, torch.device(dev))
    step_t = torch.zeros(batch, dtype=torch.int64, device=dev)
    replay = capture(dev, lambda: K.launch(logits, packed, None, step_t, max_top_k=k))
    step_t.fill_(3)
    tokens, status = replay()
    assert torch.equal(tokens, full) and int(status.sum()) == 0
