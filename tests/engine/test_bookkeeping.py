"""The engine's per-step bookkeeping: one Triton launch (``bookkeeping.book``) against the
eager torch ops of the reference path (``bookkeeping.book_eager``), on fresh random
ledgers: rows at their own steps, EOT, length caps, bad rows, log-probabilities on and off,
top alternatives. Each test is a pair (conftest's ``kernel_device``): ``[gpu]`` compiled on
CUDA, ``[interpreter]`` on CPU tensors."""

from __future__ import annotations

import pytest
import torch

from lmgen_fast import SamplingParams
from lmgen_fast.core.errors import STATUS_EMPTY, STATUS_INTERNAL, STATUS_SLOW
from lmgen_fast.engine import bookkeeping as bk
from lmgen_fast.engine import generate_ids
from lmgen_fast.models.decoder import wrap
from lmgen_fast.runtime import reset_failure

from conftest import random_model, require_kernel_runtime

require_kernel_runtime()

EOS = 3


def random_ledger(gen: torch.Generator, batch: int, cols: int, hist: int, top_n: int,
                  logprobs: bool, device: str) -> bk.Ledger:
    def ints(lo, hi, *shape):
        return torch.randint(lo, hi, (batch, *shape), generator=gen)

    def floats(*shape):
        return torch.randn(batch, *shape, generator=gen)

    led = bk.Ledger(
        out=ints(0, 50, cols), token_lp=floats(cols) if logprobs else None,
        top_ids=ints(0, 50, cols, top_n) if top_n else None,
        top_lp=floats(cols, top_n) if top_n else None,
        hist=ints(-1, 50, hist), hlen=ints(0, hist - 4), tokens=ints(0, 50),
        step=ints(0, cols - 4), count=ints(0, 6), max_tokens=ints(0, 12),
        done=torch.rand(batch, generator=gen) < 0.2,
        bad_step=torch.where(torch.rand(batch, generator=gen) < 0.2, ints(0, 5), -1),
        bad_bits=torch.where(torch.rand(batch, generator=gen) < 0.2, STATUS_EMPTY,
                             0).to(torch.int32))
    return bk.Ledger(*(None if t is None else t.to(device) for t in led))


def clone(led: bk.Ledger) -> bk.Ledger:
    return bk.Ledger(*(None if t is None else t.clone() for t in led))


def draws(gen: torch.Generator, batch: int, top_n: int, with_status: bool, device: str):
    tokens = torch.randint(0, 8, (batch,), generator=gen)  # EOT (3) one time in eight
    flags = torch.tensor([0] * 8 + [STATUS_SLOW, STATUS_EMPTY, STATUS_INTERNAL,
                                    STATUS_EMPTY | STATUS_SLOW], dtype=torch.int32)
    status = flags[torch.randint(0, len(flags), (batch,), generator=gen)]
    lp = torch.randn(batch, 3, generator=gen)
    top_ids = torch.randint(0, 50, (batch, top_n), generator=gen)
    top_lp = torch.randn(batch, top_n, generator=gen)
    to = [t.to(device) for t in (tokens, status, lp, top_ids, top_lp)]
    return to[0], to[1] if with_status else None, to[2], to[3], to[4]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("with_status", [True, False], ids=["status", "no-status"])
@pytest.mark.parametrize("logprobs,top_n", [(False, 0), (True, 0), (True, 4)],
                         ids=["tokens", "logprobs", "top-4"])
def test_kernel_books_exactly_as_the_eager_ops(seed, with_status, logprobs, top_n,
                                                kernel_device):
    gen = torch.Generator().manual_seed(seed)
    batch = 24
    want = random_ledger(gen, batch, cols=16, hist=24, top_n=top_n, logprobs=logprobs,
                         device=kernel_device)
    got = clone(want)
    for i in range(3):  # consecutive steps: each row's step and history length move on
        tokens, status, lp, top_ids, top_lp = draws(gen, batch, top_n, with_status,
                                                    kernel_device)
        extra = (lp[:, 0],) + ((top_ids, top_lp) if top_n else ()) if logprobs else ()
        bk.book_eager(want, tokens, status, EOS, *extra)
        bk.book(got, tokens, status, EOS, *extra)
        for name, w, g in zip(bk.Ledger._fields, want, got, strict=True):
            if w is not None:
                assert torch.equal(w, g), (i, name)
        if i == 0:  # the first draws hit the rules: some rows stop, not all
            assert want.done.any() and not want.done.all()
            assert not with_status or (want.bad_step >= 0).any()


def test_stop_ids_per_row_end_rows_alike(kernel_device):
    """Per-row stop ids (``PackedParams.stop_ids``: the end id, then each row's own ids, -1
    padded): the kernel and the eager ops end the same rows, on the same ids."""
    gen = torch.Generator().manual_seed(5)
    batch = 24
    want = random_ledger(gen, batch, cols=16, hist=24, top_n=4, logprobs=True,
                         device=kernel_device)
    got = clone(want)
    own = torch.randint(0, 8, (batch, 2), generator=gen)
    own[torch.rand(batch, 2, generator=gen) < 0.4] = -1
    stop_ids = torch.cat([torch.full((batch, 1), EOS), own], dim=1).to(kernel_device)
    for _ in range(3):
        tokens, status, lp, top_ids, top_lp = draws(gen, batch, 4, True, kernel_device)
        bk.book_eager(want, tokens, status, stop_ids, lp[:, 0], top_ids, top_lp)
        bk.book(got, tokens, status, stop_ids, lp[:, 0], top_ids, top_lp)
        for name, w, g in zip(bk.Ledger._fields, want, got, strict=True):
            assert torch.equal(w, g), name
    # Some row ended on an id of its own, which ends no other row.
    ended_own = (tokens.unsqueeze(1).cpu() == own).any(1) & (tokens.cpu() != EOS)
    assert ended_own.any() and not (ended_own & ~want.done.cpu()).any()


def test_stops_at_eot_and_cap_and_marks_bad_rows_once(kernel_device):
    """Hand-made rows, one rule each, with the expected result written out."""
    batch, cols = 4, 8
    z = dict(device=kernel_device, dtype=torch.int64)
    led = bk.Ledger(
        out=torch.zeros(batch, cols, **z), token_lp=None, top_ids=None, top_lp=None,
        hist=torch.full((batch, 8), -1, **z), hlen=torch.tensor([2, 0, 5, 1], **z),
        tokens=torch.zeros(batch, **z), step=torch.tensor([0, 3, 1, 2], **z),
        count=torch.tensor([0, 3, 1, 0], **z), max_tokens=torch.tensor([5, 4, 5, 5], **z),
        done=torch.zeros(batch, dtype=torch.bool, device=kernel_device),
        bad_step=torch.full((batch,), -1, **z),
        bad_bits=torch.zeros(batch, dtype=torch.int32, device=kernel_device))
    tokens = torch.tensor([EOS, 7, 9, 4], **z)
    status = torch.tensor([0, 0, STATUS_EMPTY, STATUS_SLOW], dtype=torch.int32,
                          device=kernel_device)
    bk.book(led, tokens, status, EOS)
    assert led.done.tolist() == [True, True, True, False]  # EOT, cap (3 + 1 >= 4), bad
    assert led.count.tolist() == [0, 4, 1, 1]  # EOT and a bad row add nothing
    assert led.bad_step.tolist() == [-1, -1, 1, -1] and led.bad_bits.tolist() == [0, 0, 1, 0]
    assert led.out[torch.arange(batch), torch.tensor([0, 3, 1, 2])].tolist() == tokens.tolist()
    assert led.hist[torch.arange(batch), torch.tensor([2, 0, 5, 1])].tolist() \
        == tokens.tolist()
    assert led.hlen.tolist() == [3, 1, 6, 2] and led.step.tolist() == [1, 4, 2, 3]
    assert led.tokens.tolist() == tokens.tolist()
    # A done row stays done and a later flag does not move its bad step.
    bk.book(led, tokens, torch.full((batch,), STATUS_INTERNAL, dtype=torch.int32,
                                    device=kernel_device), EOS)
    assert led.bad_step.tolist() == [-1, -1, 1, 3] and led.count.tolist() == [0, 4, 1, 1]


def test_bad_arguments_name_the_parameter(kernel_device):
    led = random_ledger(torch.Generator().manual_seed(0), 2, 8, 8, 0, False, kernel_device)
    with pytest.raises(ValueError, match="tokens"):
        bk.book_call(led, torch.zeros(3, dtype=torch.int64), None, EOS)
    with pytest.raises(ValueError, match="status"):
        bk.book_call(led, torch.zeros(2, dtype=torch.int64), torch.zeros(2), EOS)
    with pytest.raises(ValueError, match="token_lp"):
        bk.book_call(led, torch.zeros(2, dtype=torch.int64), None, EOS, torch.zeros(2))


def test_a_failing_bookkeeping_kernel_falls_back_like_the_sampler(monkeypatch, kernel_device):
    """Degrade, never fail: a bookkeeping kernel that does not build sends the call to the
    reference path (one warning), with the same tokens."""
    class Broken:
        def __getitem__(self, grid):
            def fail(*args, **kwargs):
                raise RuntimeError("at 3:1: no bookkeeping on this target")
            return fail

    model = random_model(64, seed=3, scale=4.0).to(kernel_device)
    rows = [SamplingParams(temperature=0.8, seed=i) for i in range(2)]
    want = generate_ids(wrap(model), [[1, 2], [3]], rows, [5, 5], 2, backend="reference")
    reset_failure()
    monkeypatch.setattr(bk, "_kernels", lambda: type("M", (), {"bookkeeping_kernel": Broken()}))
    try:
        with pytest.warns(RuntimeWarning, match="no bookkeeping on this target"):
            got = generate_ids(wrap(model), [[1, 2], [3]], rows, [5, 5], 2, backend="triton")
    finally:
        reset_failure()
    assert got == want
