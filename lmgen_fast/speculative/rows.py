"""The state of one speculative batch (:class:`Rows`: each row's tokens, step, penalty
history and counts) and the one sampler call that draws every position of every row: by
the Triton kernels where they apply (:class:`KernelPlan`), else by the reference."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields, replace
from typing import NamedTuple

import torch

from lmgen_fast.core.errors import STATUS_SLOW
from lmgen_fast.core.params import PackedParams, SamplingParams, row_stop_ids
from lmgen_fast.core.rows import (
    fill_unseeded,
    history_window,
    prompt_base,
    prompt_history,
    window_width,
)
from lmgen_fast.runtime import KernelUnavailable, kernel_failure, note_failure, on_device
from lmgen_fast.sampling import kernel as kernel_sampler
from lmgen_fast.sampling import reference


def fixed_shapes(device: torch.device) -> bool:
    """Whether rounds on ``device`` sample with the reference's fixed-shape path (no host
    waits inside the sampler), as the engine does off the CPU.

    Callers look it up on this module, so that a test can patch it.
    """
    return device.type != "cpu"


class KernelPlan(NamedTuple):
    """The static bounds of the rounds' Triton launches, from the batch's rows: the largest
    ``top_k`` and the nucleus candidates per chunk (0: no row uses top-p or min-p)."""

    max_top_k: int
    nucleus: int


def kernel_plan(rows: Sequence[SamplingParams]) -> KernelPlan:
    """The :class:`KernelPlan` of ``rows``, as the engine sizes its launches."""
    max_top_k, _, nucleus = kernel_sampler.host_hints(rows, None, len(rows))
    return KernelPlan(max_top_k, kernel_sampler.NUCLEUS_CANDIDATES if nucleus else 0)


def sample_positions(logits: torch.Tensor, flat: PackedParams, hist: torch.Tensor | None,
                     hlen: torch.Tensor, ranges: torch.Tensor, steps: torch.Tensor,
                     drafts: torch.Tensor, offset: int, width: int, fixed: bool,
                     return_logprobs: bool,
                     kernel: KernelPlan | None = None) -> reference.SampleResult:
    """One sampler call for ``T`` positions of every row (see :func:`sample_rows`).

    Reads device tensors only: ``logits`` ``[B, T, V]``, ``flat`` the rows' parameters
    repeated ``T`` times each, ``hist`` ``[B, H]`` int64 (None: no penalties), ``hlen``,
    ``ranges`` and ``steps`` ``[B]`` int64, ``drafts`` ``[B, D]`` int64. Row ``(b, j)`` of
    the flattened batch samples at step ``steps[b] + offset + j`` with the penalty window of
    ``hist[b, :hlen[b]]`` followed by ``drafts[b, :offset + j]``: its last ``ranges[b]``
    entries (0: all), in ``width`` slots. With ``kernel`` (and no recorded kernel failure),
    by the Triton kernels, the windows read straight from the flattened histories; a kernel
    failure is recorded (one warning for the process) and the reference samples instead.
    Otherwise by the reference, with ``fixed`` through its fixed-shape path. Either way
    nothing waits for the host (but the reference's CPU path), so a CUDA graph can capture
    it. Returns ``tokens`` and ``status`` ``[B * T]`` (row-major); the status of a row that
    drew a token is 0.
    """
    batch, t, vocab = logits.shape
    dev = logits.device
    ahead = torch.arange(t, device=dev)
    steps = (steps.unsqueeze(1) + offset + ahead).flatten()
    history = None
    if hist is not None:
        used = offset + t - 1  # drafts that some position's window reads
        if used > 0:
            cols = hlen.unsqueeze(1) + torch.arange(used, device=dev)
            hist = torch.cat([hist, hist.new_full((batch, used), -1)], dim=1)
            hist.scatter_(1, cols, drafts[:, :used])
        hlens = (hlen.unsqueeze(1) + offset + ahead).flatten()
        history = kernel_sampler.HistoryWindow(hist.repeat_interleave(t, dim=0), hlens,
                                               ranges.repeat_interleave(t), width)
    flat_logits = logits.reshape(batch * t, vocab)
    if kernel is not None and kernel_failure() is None:
        try:
            return _kernel_sample(flat_logits, flat, history, steps, kernel, return_logprobs)
        except KernelUnavailable as exc:
            note_failure(exc)  # warns once; the reference draws the same tokens
    window = None if history is None else history_window(*history)
    if not fixed:
        return reference.sample(flat_logits, flat, window, step=steps,
                                return_logprobs=return_logprobs, check=False, on_device=False)
    # Seeds are drawn already (every row races): no input checks, no host waits.
    if return_logprobs:
        # Each row's log-probabilities in its logprobs_mode, alternatives included.
        return reference.SampleResult(*reference.sample_on_device_logprobs(
            flat_logits, flat, window, steps, flat.logprobs, draw_seeds=False))
    tokens, status, _ = reference.sample_on_device(flat_logits, flat, window, steps,
                                                   draw_seeds=False)
    return reference.SampleResult(tokens, status, None)


def _kernel_sample(logits: torch.Tensor, flat: PackedParams,
                   history: kernel_sampler.HistoryWindow | None, steps: torch.Tensor,
                   kernel: KernelPlan, return_logprobs: bool) -> reference.SampleResult:
    """The Triton launches of :func:`sample_positions` on the flattened ``[N, V]`` logits
    (``N = B * T``), with the top alternatives of ``flat.logprobs`` when asked (ranking them
    waits for the host: never inside a graph)."""
    lp = None
    if return_logprobs:
        lp = torch.empty(logits.shape[0], kernel_sampler.LOGPROB_COLUMNS,
                         dtype=torch.float32, device=logits.device)
    with on_device(logits.device):
        tokens, status = kernel_sampler.guarded_launch(
            logits, flat, history, steps, max_top_k=kernel.max_top_k, draw_seeds=False,
            nucleus_candidates=kernel.nucleus, logprob_out=lp)
    # STATUS_SLOW only says that a row took the multi-pass path: its token is exact.
    status = status & ~STATUS_SLOW
    if lp is None:
        return reference.SampleResult(tokens, status, None)
    n = flat.logprobs
    # Processed rows rank their alternatives by z, which needs the window as a tensor.
    window = history_window(*history) if n and history is not None else None
    return reference.SampleResult(tokens, status, kernel_sampler.logprobs_from_launch(
        logits, lp, n, flat, window, tokens))


class Rows:
    """The host and device state of one speculative batch, read by the drafters.

    ``seqs[r]`` is row ``r``'s prompt and kept tokens; ``steps[r]`` the next step (tokens
    sampled, EOT included): it keys the noise of the row's next token, as in the engine.
    ``hist`` (int64 ``[B, H]`` on the device, None without penalties) holds the first
    ``hlen[r]`` tokens of each row's penalty history. ``kernel``: the Triton sampler's
    :class:`KernelPlan` where it samples the batch (None: the reference).

    Length: every per-row field is reset by :meth:`seat`, next to where it is made, so that
    a field added to one is not missed by the other.
    """

    def __init__(self, prompts: Sequence[Sequence[int]], rows: Sequence[SamplingParams],
                 max_tokens: Sequence[int], device: torch.device, hist_len: int, *,
                 penalized: bool | None = None, end_ids: Sequence[int] = (),
                 table: PackedParams | None = None, vocab_size: int | None = None):
        batch = len(prompts)
        # The ids that end every row; each row's own ids that end it (``ends``, with its
        # stop_token_ids) and the one that did (``ended``, None: none or not yet).
        self.end_ids = tuple(end_ids)
        self.ends: list[frozenset[int]] = [frozenset()] * batch
        self.ended: list[int | None] = [None] * batch
        self.device = device
        self.seqs: list[list[int]] = [[] for _ in prompts]
        self.out: list[list[int]] = [[] for _ in prompts]
        self.max_tokens = [0] * batch
        self.done = [True] * batch
        self.steps = [0] * batch
        self.forwards = [0] * batch
        self.accepted = [0] * batch
        self.proposed = [0] * batch
        # Rows whose last round hit a position with nothing to sample: they take a plain
        # one-token round before that counts as an error (see accept.book_round).
        self.retry = [False] * batch
        self.top_n = [0] * batch
        self.token_lp: list[list[float]] = [[] for _ in prompts]
        self.top: list[list[list[tuple[int, float]]]] = [[] for _ in prompts]
        self.range_list = [0] * batch
        self.hlen = [0] * batch
        # The caller's row that each row is (continuous batching seats others in turn).
        self.names = list(range(batch))
        # Every caller's row packed once (``table``, by caller's row; default: ``rows``), as
        # the engine does: seat() copies a row's parameters from it, so every tensor already
        # has the widest row's shape and the in-place copies fit.
        self.table = table if table is not None else PackedParams.from_rows(
            rows, device, self.end_ids, vocab_size)
        packed = self.table.take(torch.tensor(self.names, dtype=torch.int64, device=device))
        self.packed = replace(packed, seeded=torch.ones_like(packed.seeded))
        self.ranges = torch.zeros(batch, dtype=torch.int64, device=device)
        # Set by the caller where the Triton sampler applies (None: the reference samples).
        self.kernel: KernelPlan | None = None
        # Rows seated later are covered by ``penalized`` (default: from ``rows``).
        self.penalized = any(r.penalized for r in rows) if penalized is None else penalized
        self.hist = None
        if self.penalized:
            self.hist = torch.full((batch, hist_len), -1, dtype=torch.int64, device=device)
        self.seat(range(batch), prompts, rows, max_tokens, self.names)

    def seat(self, slots: Sequence[int], prompts: Sequence[Sequence[int]],
             rows: Sequence[SamplingParams], max_tokens: Sequence[int],
             names: Sequence[int]) -> None:
        """Rows ``slots`` start over with new prompts (parameters, penalty histories,
        steps, tokens and counts), the others untouched: a batch's start, and continuous
        batching's admissions. ``names`` are the caller's rows they are (``rows`` theirs,
        packed in :attr:`table`). Device tensors are written in place (graphs read them)."""
        dev = self.device
        index = torch.tensor(list(slots), dtype=torch.int64, device=dev)
        packed = self.table.take(torch.tensor(list(names), dtype=torch.int64, device=dev))
        # Unseeded rows draw their seed once (as the engine does on the GPU): each row then
        # races, so a draft can be checked against the target's own draw.
        if any(r.seed is None for r in rows):
            packed = replace(packed, seed=fill_unseeded(packed.seed, packed.seeded))
        for f in fields(PackedParams):
            value = getattr(packed, f.name)
            if isinstance(value, torch.Tensor) and f.name != "seeded":
                getattr(self.packed, f.name).index_copy_(0, index, value)
        self.packed = replace(self.packed, logprobs=max(self.packed.logprobs, packed.logprobs))
        base = prompt_base(prompts, rows)
        ranges = [r.repetition_penalty_range for r in rows]
        self.ranges.index_copy_(0, index, torch.tensor(ranges, dtype=torch.int64, device=dev))
        if self.hist is not None:
            hist = torch.full((len(prompts), self.hist.shape[1]), -1, dtype=torch.int64)
            start = prompt_history(prompts, base)
            hist[:, : start.shape[1]] = start
            self.hist.index_copy_(0, index, hist.to(dev))
        for s, p, row, m, b, rg, name in zip(slots, prompts, rows, max_tokens, base, ranges,
                                             names, strict=True):
            self.names[s] = name
            self.seqs[s], self.out[s], self.max_tokens[s], self.done[s] = list(p), [], m, m == 0
            self.steps[s] = self.forwards[s] = self.accepted[s] = self.proposed[s] = 0
            self.retry[s], self.top_n[s], self.token_lp[s], self.top[s] = (
                False, row.logprobs, [], [])
            self.range_list[s], self.hlen[s] = rg, b
            self.ends[s], self.ended[s] = frozenset(row_stop_ids(row, self.end_ids)), None

    @property
    def batch(self) -> int:
        return len(self.seqs)

    def active(self) -> list[int]:
        return [r for r, d in enumerate(self.done) if not d]

    def sample(self, logits: torch.Tensor, drafts: torch.Tensor, offset: int = 0,
               return_logprobs: bool = False) -> reference.SampleResult:
        """Sample every position of every row in one sampler call (:func:`sample_rows`)."""
        return sample_rows(self, logits, drafts, offset, return_logprobs)

    def flat_params(self, t: int) -> PackedParams:
        """The rows' parameters repeated for ``t`` positions each (row-major)."""
        # dim=0: the [B, S] per-row lists (stop ids, biases) repeat by row, not flattened.
        return replace(self.packed, **{
            f.name: getattr(self.packed, f.name).repeat_interleave(t, dim=0)
            for f in fields(PackedParams)
            if isinstance(getattr(self.packed, f.name), torch.Tensor)})

    def cut_stops(self, handover, live: Sequence[int]) -> None:
        """End rows ``live`` whose tokens complete a stop string (``handover.stop_check``,
        asked with the caller's row): each keeps its tokens up to the completing one, and
        ``handover.stopped`` records the string (the engine's host-check rule, here after
        every round)."""
        check = handover.stop_check
        if check is None:
            return
        for r in live:
            i = self.names[r]
            if not self.out[r] or i in handover.stopped:
                continue
            got = check(i, self.out[r])
            if got is not None:
                kept, handover.stopped[i] = got
                self.out[r], self.done[r] = self.out[r][:kept], True
                self.token_lp[r], self.top[r] = self.token_lp[r][:kept], self.top[r][:kept]

    def usable(self, drafts: torch.Tensor) -> torch.Tensor:
        """``drafts`` ``[B, k]`` with ``-1`` where a row could not use them: past its
        ``max_tokens``, after a drafted id that ends it, and for finished rows."""
        dev = drafts.device
        left = torch.tensor([0 if d else m - len(o) - 1 for d, m, o in
                             zip(self.done, self.max_tokens, self.out, strict=True)],
                            device=dev)
        stops = self.packed.stop_ids.to(dev).unsqueeze(1)
        eos = ((drafts.unsqueeze(2) == stops) & (stops >= 0)).any(dim=2).to(torch.int64)
        after_eos = (eos.cumsum(dim=1) - eos) > 0
        room = torch.arange(drafts.shape[1], device=dev) < left.unsqueeze(1)
        return torch.where(room & ~after_eos, drafts, -1)

    def partial(self) -> list[list[int]]:
        return [list(o) for o in self.out]


def sample_rows(rows: Rows, logits: torch.Tensor, drafts: torch.Tensor, offset: int = 0,
                return_logprobs: bool = False) -> reference.SampleResult:
    """Sample every position of every row in one sampler call.

    Parameters
    ----------
    rows : Rows
        The batch: each row samples at its own step, with its own penalty history.
    logits : Tensor
        ``[B, T, V]`` float: position ``t`` is the model's prediction after the row's
        kept tokens and ``drafts[:, :offset + t]``.
    drafts : LongTensor
        ``[B, D]`` int64, ``D >= offset + T - 1``, ``-1`` for no draft.
    offset : int
        Drafts already before position 0.
    return_logprobs : bool
        Also the raw log-probabilities (with the rows' top alternatives).

    Returns
    -------
    SampleResult
        ``tokens`` and ``status`` ``[B * T]`` (row-major), never raising for a row with
        nothing to sample: only positions a row keeps are checked, by the caller.
    """
    t = logits.shape[1]
    dev = logits.device
    width = 0
    if rows.penalized:
        # As wide as the widest window any position reads.
        width = window_width(rows.range_list, [h + offset + t - 1 for h in rows.hlen])
    return sample_positions(
        logits, rows.flat_params(t), rows.hist, torch.tensor(rows.hlen, device=dev),
        rows.ranges, torch.tensor(rows.steps, device=dev), drafts, offset, max(width, 1),
        fixed_shapes(dev), return_logprobs, rows.kernel)
