"""The sampler's set-up launch (``kernels/window.py``): the penalty window grouped by chunk in
one kernel, against the torch set-up it replaces (the engine's ``_window``, ``torch.sort``,
``torch.searchsorted``), and the tokens a launch draws with it against the reference."""

from __future__ import annotations

import pytest
import torch

from lmgen_fast import SamplingParams
from lmgen_fast.core.params import PackedParams
from lmgen_fast.core.rows import history_window as _window
from lmgen_fast.sampling import kernel as kernel_sampler
from lmgen_fast.sampling import reference

from conftest import DEVICE, require_kernel_runtime

require_kernel_runtime()


def run_setup(window, batch: int, vocab: int, chunk: int):
    lp = kernel_sampler.plan_launch(vocab, 0, cuda=DEVICE == "cuda", chunk=chunk)
    status = torch.full((batch,), 7, dtype=torch.int32, device=DEVICE)  # garbage to clear
    call, win, wrange = kernel_sampler.setup_call(window, batch, lp, status)
    kernel_sampler.kernel(call.name)[call.grid](*call.args, **call.constexprs, **call.options)
    return lp, win, wrange, status


def history(gen, batch: int, cols: int, vocab: int):
    # Ids spread over every chunk, repeats, empty (-1) slots, lengths from 0 to full.
    hist = torch.randint(-1, vocab, (batch, cols), generator=gen)
    hist[:, ::5] = torch.randint(0, 3, (batch, 1), generator=gen)  # repeats
    hlen = torch.randint(0, cols, (batch,), generator=gen)
    hlen[0] = 0
    ranges = torch.randint(0, cols + 4, (batch,), generator=gen)
    ranges[1] = 0  # the whole history
    return hist.to(DEVICE), hlen.to(DEVICE), ranges.to(DEVICE)


def check_grouping(window: torch.Tensor, lp, win, wrange, vocab: int) -> None:
    """``wrange`` is searchsorted over the sorted window; each chunk's slice of ``win`` holds
    exactly that chunk's ids, and the whole row the window's ids."""
    srt = torch.sort(window, dim=1).values
    bounds = torch.arange(lp.n_chunks + 1, device=window.device) * lp.chunk
    want = torch.searchsorted(srt.contiguous(), bounds.expand(window.shape[0], -1).contiguous())
    assert torch.equal(wrange, want)
    assert torch.equal(torch.sort(win, dim=1).values, srt)
    for r in range(window.shape[0]):
        for c in range(lp.n_chunks):
            part = win[r, wrange[r, c]:wrange[r, c + 1]]
            assert ((part >= c * lp.chunk) & (part < (c + 1) * lp.chunk)).all()


@pytest.mark.parametrize("width", [1, 7, 40])
@pytest.mark.parametrize("vocab,chunk", [(300, 64), (100, 128), (1000, 16)])
def test_window_from_history_grouped_as_sorting_groups_it(width, vocab, chunk):
    gen = torch.Generator().manual_seed(width * vocab)
    batch, cols = 5, 48
    hist, hlen, ranges = history(gen, batch, cols, vocab)
    window = _window(hist, hlen, ranges, width)
    lp, win, wrange, status = run_setup(
        kernel_sampler.HistoryWindow(hist, hlen, ranges, width), batch, vocab, chunk)
    assert (status == 0).all()
    check_grouping(window, lp, win, wrange, vocab)
    # A window given as a tensor goes through the same grouping.
    lp, win2, wrange2, _ = run_setup(window, batch, vocab, chunk)
    check_grouping(window, lp, win2, wrange2, vocab)


def test_no_window_clears_status_and_ranges():
    lp, _win, wrange, status = run_setup(None, 3, 500, 64)
    assert (status == 0).all() and wrange.shape == (3, lp.n_chunks + 1)
    assert (wrange == 0).all()


ROWS = [
    SamplingParams(temperature=0.9, top_k=20, repetition_penalty=1.3,
                   repetition_penalty_range=6, seed=11),
    SamplingParams(temperature=1.1, top_k=0, top_p=0.8, frequency_penalty=0.5,
                   presence_penalty=0.2, repetition_penalty=0.8, seed=12),
    SamplingParams(temperature=0.0, repetition_penalty=3.0, seed=13),
    SamplingParams(temperature=0.7, top_k=5, min_p=0.05, repetition_penalty=1.5,
                   penalty_mode="once", seed=14),
]


@pytest.mark.parametrize("seed", range(3))
def test_tokens_from_the_history_window_equal_the_reference(seed):
    """The engine's launch (history read by the set-up kernel, powers computed once for the
    widest window) draws the reference's tokens for the narrower eager window."""
    gen = torch.Generator().manual_seed(100 + seed)
    batch, vocab, cols = len(ROWS), 700, 40
    hist, hlen, ranges = history(gen, batch, cols, vocab)
    hist = hist.clamp_min(0)  # real histories hold ids, -1 only past their length
    ranges = torch.tensor([r.repetition_penalty_range for r in ROWS], device=DEVICE)
    logits = torch.randn(batch, vocab, generator=gen).to(DEVICE)
    # The ids in the histories on top, so that the penalties decide tokens.
    logits.scatter_(1, hist, torch.full(hist.shape, 4.0, device=DEVICE))
    packed = PackedParams.from_rows(ROWS, DEVICE)
    steps = torch.randint(0, 1000, (batch,), generator=gen).to(DEVICE)
    eager_width = int(hlen.max())
    want = reference.sample(logits, packed, _window(hist, hlen, ranges, eager_width),
                            step=steps)
    widest = cols
    pow_table = kernel_sampler.penalty_powers(packed.penalty, widest)
    got, status = kernel_sampler.launch(
        logits, packed, kernel_sampler.HistoryWindow(hist, hlen, ranges, widest), steps,
        max_top_k=20, draw_seeds=False, nucleus_candidates=kernel_sampler.NUCLEUS_CANDIDATES,
        pow_table=pow_table)
    assert (status & ~kernel_sampler.STATUS_SLOW == 0).all()
    assert torch.equal(got, want)
    # The penalties mattered: without the window some token differs.
    plain = reference.sample(logits, packed, None, step=steps)
    assert not torch.equal(plain, want)


def test_bad_pow_table_is_refused():
    logits = torch.zeros(2, 64, device=DEVICE)
    packed = PackedParams.from_rows([SamplingParams(seed=1)] * 2, DEVICE)
    window = torch.full((2, 4), -1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="pow_table"):
        kernel_sampler.launch(logits, packed, window, torch.zeros(2, dtype=torch.int64,
                                                                  device=DEVICE),
                              max_top_k=0, draw_seeds=False,
                              pow_table=torch.ones(2, 3, device=DEVICE))
