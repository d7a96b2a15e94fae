"""The sampler's set-up launch (``kernels/window.py``): the penalty window grouped by chunk in
one kernel, against the torch set-up it replaces (``lmgen_fast.core.rows.history_window``,
``torch.sort``, ``torch.searchsorted``), and the tokens a launch draws with it against the
reference."""

from __future__ import annotations

import pytest
import torch

from lmgen_fast import SamplingParams
from lmgen_fast.core.errors import STATUS_SLOW
from lmgen_fast.core.params import PackedParams
from lmgen_fast.core.rows import history_window
from lmgen_fast.sampling import kernel_launch, launch_plan, reference

from conftest import require_kernel_runtime

require_kernel_runtime()


def run_setup(dev, window, batch: int, vocab: int, chunk: int):
    lp = launch_plan.plan_launch(vocab, 0, cuda=dev == "cuda", chunk=chunk)
    status = torch.full((batch,), 7, dtype=torch.int32, device=dev)  # garbage to clear
    call, win, wrange = kernel_launch.setup_call(window, batch, lp, status)
    kernel_launch.kernel(call.name)[call.grid](*call.args, **call.constexprs, **call.options)
    return lp, win, wrange, status


def history(dev, gen, batch: int, cols: int, vocab: int):
    # Ids spread over every chunk, repeats, empty (-1) slots, lengths from 0 to full.
    hist = torch.randint(-1, vocab, (batch, cols), generator=gen)
    hist[:, ::5] = torch.randint(0, 3, (batch, 1), generator=gen)  # repeats
    hlen = torch.randint(0, cols, (batch,), generator=gen)
    hlen[0] = 0
    ranges = torch.randint(0, cols + 4, (batch,), generator=gen)
    ranges[1] = 0  # the whole history
    return hist.to(dev), hlen.to(dev), ranges.to(dev)


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
def test_window_from_history_grouped_as_sorting_groups_it(kernel_device, width, vocab, chunk):
    gen = torch.Generator().manual_seed(width * vocab)
    batch, cols = 5, 48
    hist, hlen, ranges = history(kernel_device, gen, batch, cols, vocab)
    window = history_window(hist, hlen, ranges, width)
    lp, win, wrange, status = run_setup(kernel_device,
        kernel_launch.HistoryWindow(hist, hlen, ranges, width), batch, vocab, chunk)
    assert (status == 0).all()
    check_grouping(window, lp, win, wrange, vocab)
    # A window given as a tensor goes through the same grouping.
    lp, win2, wrange2, _ = run_setup(kernel_device, window, batch, vocab, chunk)
    check_grouping(window, lp, win2, wrange2, vocab)


def test_no_window_clears_status_and_ranges(kernel_device):
    lp, _win, wrange, status = run_setup(kernel_device, None, 3, 500, 64)
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
def test_tokens_from_the_history_window_equal_the_reference(kernel_device, seed):
    """The engine's launch (history read by the set-up kernel, powers computed once for the
    widest window) draws the reference's tokens for the narrower eager window."""
    gen = torch.Generator().manual_seed(100 + seed)
    batch, vocab, cols = len(ROWS), 700, 40
    hist, hlen, ranges = history(kernel_device, gen, batch, cols, vocab)
    hist = hist.clamp_min(0)  # real histories hold ids, -1 only past their length
    ranges = torch.tensor([r.repetition_penalty_range for r in ROWS], device=kernel_device)
    logits = torch.randn(batch, vocab, generator=gen).to(kernel_device)
    # The ids in the histories on top, so that the penalties decide tokens.
    logits.scatter_(1, hist, torch.full(hist.shape, 4.0, device=kernel_device))
    packed = PackedParams.from_rows(ROWS, kernel_device)
    steps = torch.randint(0, 1000, (batch,), generator=gen).to(kernel_device)
    eager_width = int(hlen.max())
    want = reference.sample(logits, packed, history_window(hist, hlen, ranges, eager_width),
                            step=steps)
    widest = cols
    pow_table = kernel_launch.penalty_powers(packed.penalty, widest)
    got, status = kernel_launch.launch(
        logits, packed, kernel_launch.HistoryWindow(hist, hlen, ranges, widest), steps,
        max_top_k=20, draw_seeds=False, nucleus_candidates=launch_plan.NUCLEUS_CANDIDATES,
        pow_table=pow_table)
    assert (status & ~STATUS_SLOW == 0).all()
    assert torch.equal(got, want)
    # The penalties mattered: without the window some token differs.
    plain = reference.sample(logits, packed, None, step=steps)
    assert not torch.equal(plain, want)


def test_bad_pow_table_is_refused(kernel_device):
    logits = torch.zeros(2, 64, device=kernel_device)
    packed = PackedParams.from_rows([SamplingParams(seed=1)] * 2, kernel_device)
    window = torch.full((2, 4), -1, dtype=torch.int64, device=kernel_device)
    with pytest.raises(ValueError, match="pow_table"):
        kernel_launch.launch(logits, packed, window, torch.zeros(2, dtype=torch.int64,
                                                                  device=kernel_device),
                              max_top_k=0, draw_seeds=False,
                              pow_table=torch.ones(2, 3, device=kernel_device))


def crowded_window(gen, batch: int, width: int, vocab: int, chunk: int) -> torch.Tensor:
    """Long windows whose ids crowd few chunks and sit at their borders: many more entries
    per chunk than one histogram tile (32 * warps), each id repeated, -1 slots between."""
    borders = [0, chunk - 1, chunk, 2 * chunk - 1, 2 * chunk, vocab - 1]
    pool = torch.tensor(borders + [chunk + 5, chunk + 6, vocab - 2])
    win = pool[torch.randint(0, pool.numel(), (batch, width), generator=gen)]
    win = win.masked_fill(torch.rand(batch, width, generator=gen) < 0.2, -1)
    win[1, :width // 2] = chunk  # one id, repeated half the window
    win[5] = -1  # a row with nothing but empty slots
    return win


PENALTY_ROWS = [
    SamplingParams(temperature=0.0, repetition_penalty=1.02, seed=21),
    SamplingParams(temperature=0.0, repetition_penalty=1.01, frequency_penalty=0.002,
                   seed=22),
    SamplingParams(temperature=0.0, repetition_penalty=1.5, penalty_mode="once",
                   presence_penalty=0.5, seed=23),
    SamplingParams(temperature=0.8, top_k=5, repetition_penalty=1.01, seed=24),
    SamplingParams(temperature=1.0, top_k=0, top_p=0.9, frequency_penalty=0.01,
                   logprobs_mode="processed", seed=25),
    SamplingParams(temperature=0.0, frequency_penalty=-0.004, presence_penalty=0.1, seed=26),
]


@pytest.mark.parametrize("chunk", [256, 128])
def test_long_crowded_windows_count_every_entry(kernel_device, chunk):
    """Counts from tiles of window entries (several tiles per chunk) against the reference:
    greedy rows whose winner turns on the exact count of each id, ids at chunk borders,
    empty slots. The flat top-p row re-reads its logits on the merge's slow path, which
    counts the window again, and its token's processed log-probability is formed from one
    logit and the window (a block that starts at the token)."""
    dev = kernel_device
    gen = torch.Generator().manual_seed(chunk)
    batch, vocab, width = len(PENALTY_ROWS), 700, 600
    window = crowded_window(gen, batch, width, vocab, chunk)
    # The window's ids on top: the penalties decide the winner among them.
    logits = torch.randn(batch, vocab, generator=gen)
    ids = window.clamp_min(0)
    logits.scatter_(1, ids, 6.0 + 0.01 * torch.rand(ids.shape, generator=gen))
    # Greedy rows 0 and 1: the logits undo each id's penalty up to a margin that favours
    # the least repeated ids, so that one entry counted wrong (2 % of z) moves the winner.
    count = torch.stack([torch.bincount(r[r >= 0], minlength=vocab) for r in window[:2]])
    margin = 1e-3 / (1 + count)
    undone = torch.stack([6.0 * 1.02 ** count[0] * (1 + margin[0]),
                          (6.0 * (1 + margin[1]) + 0.002 * count[1]) * 1.01 ** count[1]])
    logits[:2] = torch.where(count > 0, undone.float(), logits[:2])
    logits[4] = torch.randn(vocab, generator=gen) * 0.1  # flat: a nucleus of most tokens
    packed = PackedParams.from_rows(PENALTY_ROWS, dev)
    logits, window = logits.to(dev), window.to(dev)
    out = torch.empty(batch, launch_plan.LOGPROB_COLUMNS, device=dev)
    for step in (0, 1):
        steps = torch.full((batch,), step, dtype=torch.int64, device=dev)
        got, status = kernel_launch.launch(logits, packed, window, steps, max_top_k=5,
                                           draw_seeds=False, chunk=chunk,
                                           nucleus_candidates=2, logprob_out=out)
        want, want_lp = reference.sample(logits, packed, window, step=steps,
                                         return_logprobs=True)
        assert torch.equal(got, want), (got, want)
        assert torch.allclose(out[:, 0], want_lp.token_logprob, atol=1e-5, rtol=0)
        assert (status == torch.tensor([0, 0, 0, 0, STATUS_SLOW, 0], device=dev)).all()
    # The counts mattered: without the window rows 0 and 1 draw their most repeated id.
    plain = reference.sample(logits, packed, None, step=steps)
    assert (plain[:2] != want[:2]).all()
