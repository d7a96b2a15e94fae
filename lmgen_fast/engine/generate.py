""":func:`generate_ids`, and its one recovery policy (:func:`run_parts`).

A call is decoded as parts (rows ``lo:hi``, through slots or as one static batch). Where
a part fails, the policy decides in one place what happens next, from what went wrong
and whether anything of the part reached the caller yet:

* the Triton kernels failed (:class:`KernelUnavailable`): the failure is recorded for the
  process, and the part runs again with the reference sampler on the same device, unless
  tokens or rows were handed out (a rerun would hand them out twice): then it re-raises;
* out of device memory: the decoder's buffers are freed, then slots are halved, or the
  batch split in halves (with a warning each; seeded rows keep their tokens), or, for a
  single row or after tokens were handed out, :class:`DecodeOutOfMemory` is raised.

A step that fails to capture as a CUDA graph is not a failure of the part (the step ran
eagerly): the policy records the decoder in :data:`CAPTURE_FAILURES` and its later runs
are planned eager.
"""

from __future__ import annotations

import warnings
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from lmgen_fast.core.errors import DecodeOutOfMemory
from lmgen_fast.core.params import SamplingParams
from lmgen_fast.core.rows import end_tuple
from lmgen_fast.engine.delivery import Handover
from lmgen_fast.engine.memory import free, one_row_message
from lmgen_fast.engine.plan import RunOptions
from lmgen_fast.engine.results import (
    DecodeStats,
    RowCallback,
    RowLogprobs,
    RowPair,
    StopCheck,
    TokenCallback,
    check_max_batch_size,
    check_sync_every,
    empty_logprobs,
)
from lmgen_fast.engine.slots import open_slots, supports_slots
from lmgen_fast.engine.static import StaticRun
from lmgen_fast.runtime import KernelUnavailable, note_failure, on_device

Results = tuple[list[RowPair], list[RowLogprobs | None]]


class CaptureRecord:
    """Decoders whose step failed to capture, with the cause: they run eagerly from then
    on (held weakly: a decoder that goes away leaves the record)."""

    def __init__(self) -> None:
        self.causes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def failed(self, decoder) -> bool:
        """Whether a capture failed on ``decoder`` before."""
        return decoder in self.causes

    def note(self, decoder, cause: str | None) -> None:
        """Remember that a capture failed on ``decoder`` (``cause`` None: it did not)."""
        if cause is not None:
            self.causes[decoder] = cause


CAPTURE_FAILURES = CaptureRecord()


def decode(decoder, prompts: Sequence[Sequence[int]], rows: Sequence[SamplingParams],
           max_tokens: Sequence[int], options: RunOptions, slots: int | None,
           captures: CaptureRecord = CAPTURE_FAILURES) -> Results:
    """One attempt at ``prompts`` on ``decoder``: through ``slots`` slots, or as one static
    batch (None). Adds its steps to ``options.stats`` and a failed capture to
    ``captures``; any failure propagates."""
    if max(max_tokens, default=0) == 0:
        done = Handover(rows, max_tokens, options.on_row, options.return_logprobs,
                        options.end_ids)
        for i, row in enumerate(rows):
            done.finish(i, [], empty_logprobs(row.logprobs))  # each row empty, at once
        return done.results()
    if decoder.busy:
        # Its cache and buffers belong to the run in progress (a callback called back in).
        raise RuntimeError("this decoder is already generating; use another one (wrap(model)) "
                           "for a nested call")
    decoder.busy = True
    try:
        failed = captures.failed(decoder)
        if slots is not None:
            run = open_slots(decoder, prompts, rows, max_tokens, options, slots, failed)
        else:
            run = StaticRun(decoder, prompts, rows, max_tokens, options, failed)
        try:
            run.loop()
        finally:
            captures.note(decoder, run.stepper.capture_failure)
            if options.stats is not None:
                options.stats.steps += run.steps
                options.stats.slot_steps += run.slot_steps
        return run.results()
    finally:
        decoder.busy = False


@dataclass(frozen=True)
class Part:
    """Rows ``lo:hi`` of a call, decoded through ``slots`` slots (None: one static batch)
    and sampled by ``backend``."""

    lo: int
    hi: int
    slots: int | None
    backend: str


class Handout:
    """The caller's callbacks for a part: row numbers shifted by ``lo``, and :attr:`any`
    set once something (a token, a finished row) reached the caller."""

    def __init__(self, options: RunOptions, lo: int):
        self.options, self.lo, self.any = options, lo, False

    def callback(self, row: int, token: int) -> None:
        self.any = True
        self.options.callback(row + self.lo, token)

    def on_row(self, row: int, pair: RowPair, lp: RowLogprobs | None) -> None:
        self.any = True
        self.options.on_row(row + self.lo, pair, lp)

    def options_for(self, backend: str, hi: int) -> RunOptions:
        """The options of the part that ends at row ``hi``: these callbacks (where the
        caller gave one), ``backend`` and the part's rows of the grammars."""
        o = self.options
        grammars = None if o.grammars is None else list(o.grammars[self.lo:hi])
        if grammars is not None and all(g is None for g in grammars):
            grammars = None  # this part's rows pay nothing for the others' grammars
        return replace(o, backend=backend, grammars=grammars,
                       callback=None if o.callback is None else self.callback,
                       on_row=None if o.on_row is None else self.on_row,
                       stop_check=None if o.stop_check is None else self.stop_check)

    def stop_check(self, row: int, ids: list[int]) -> tuple[int, str] | None:
        return self.options.stop_check(row + self.lo, ids)


def first_parts(decoder, n: int, max_batch_size: int | None, backend: str) -> list[Part]:
    """How ``n`` rows are decoded at first: one batch, through ``max_batch_size`` slots
    where there are more rows and the decoder :func:`supports_slots`, else static batches
    of that size in turn."""
    if max_batch_size is None or n <= max_batch_size:
        return [Part(0, n, None, backend)]
    if supports_slots(decoder):
        return [Part(0, n, max_batch_size, backend)]
    return [Part(lo, min(lo + max_batch_size, n), None, backend)
            for lo in range(0, n, max_batch_size)]


def after_out_of_memory(decoder, prompts: Sequence[Sequence[int]], max_tokens: Sequence[int],
                        part: Part, handed_out: bool, exc: BaseException) -> list[Part]:
    """The parts that replace ``part``, which ran out of memory (its decoder freed): half
    the slots, or the batch in halves, each with a warning. Raises DecodeOutOfMemory once
    something was handed out, or for a single row."""
    size = part.hi - part.lo
    if handed_out:
        raise DecodeOutOfMemory(
            f"out of device memory after tokens were streamed (or rows handed to on_row); "
            f"run fewer than {part.slots or size} rows at a time "
            f"({str(exc).splitlines()[0]})") from exc
    if part.slots == 1 or size == 1:
        longest = max(range(part.lo, part.hi), key=lambda i: len(prompts[i]) + max_tokens[i])
        raise DecodeOutOfMemory(one_row_message(
            decoder, prompts[longest], max_tokens[longest], exc)) from exc
    # Warnings point at the caller of generate_ids: this, run_parts, generate_ids and
    # its inference_mode wrapper are in between.
    if part.slots is not None:
        half = (part.slots + 1) // 2
        warnings.warn(f"{part.slots} slots did not fit in device memory; generating through "
                      f"{half} slots", RuntimeWarning, stacklevel=5)
        return [replace(part, slots=half if size > half else None)]
    half = (size + 1) // 2
    warnings.warn(f"a batch of {size} rows did not fit in device memory; generating it as "
                  f"batches of at most {half}", RuntimeWarning, stacklevel=5)
    return [Part(lo, min(lo + half, part.hi), None, part.backend)
            for lo in range(part.lo, part.hi, half)]


def run_parts(decoder, prompts: Sequence[Sequence[int]], rows: Sequence[SamplingParams],
              max_tokens: Sequence[int], options: RunOptions,
              max_batch_size: int | None) -> Results:
    """Decode every row, part after part, with the recovery policy of this module: a part
    that fails is replaced by what :func:`after_out_of_memory` gives, or run again with
    the reference sampler after a kernel failure, before the parts after it."""
    pairs: list[RowPair | None] = [None] * len(prompts)
    lps: list[RowLogprobs | None] = [None] * len(prompts)
    pending = deque(first_parts(decoder, len(prompts), max_batch_size, options.backend))
    while pending:
        part = pending.popleft()
        lo, hi = part.lo, part.hi
        handout = Handout(options, lo)
        try:
            # Triton, graphs and streams act on the current CUDA device: make it the model's.
            with on_device(getattr(decoder, "device", None)):
                got = decode(decoder, prompts[lo:hi], rows[lo:hi], max_tokens[lo:hi],
                             handout.options_for(part.backend, hi), part.slots)
        except KernelUnavailable as exc:
            note_failure(exc)
            if handout.any:
                raise  # tokens were streamed: a rerun would hand them out twice
            # Nothing was handed out yet: the part again, sampled by the reference.
            pending.appendleft(replace(part, backend="reference"))
            continue
        except torch.OutOfMemoryError as exc:
            free(decoder)
            pending.extendleft(reversed(after_out_of_memory(
                decoder, prompts, max_tokens, part, handout.any, exc)))
            continue
        pairs[lo:hi], lps[lo:hi] = got
    return pairs, lps


@torch.inference_mode()
def generate_ids(
    decoder,
    prompts: Sequence[Sequence[int]],
    rows: Sequence[SamplingParams],
    max_tokens: Sequence[int],
    eos_id: int | Sequence[int],
    *,
    backend: str = "auto",
    callback: TokenCallback | None = None,
    return_logprobs: bool = False,
    cuda_graph: bool = True,
    sync_every: int | None = None,
    max_batch_size: int | None = None,
    on_row: RowCallback | None = None,
    stats: DecodeStats | None = None,
    stop_check: StopCheck | None = None,
    grammars: Sequence | None = None,
) -> list[RowPair] | tuple[list[RowPair], list[RowLogprobs]]:
    """Sample up to ``max_tokens[r]`` tokens for each prompt (lists of ids) on ``decoder``.

    Parameters
    ----------
    decoder
        From :func:`lmgen_fast.wrap` (or :func:`lmgen_fast.models.decoder.decoder_for`).
    prompts : sequence of sequences of int
        Token ids, any lengths.
    rows : sequence of SamplingParams
        One per prompt.
    max_tokens : sequence of int
        Per-row caps (already validated, ``>= 0``).
    eos_id : int or sequence of int
        The token (or tokens) that end a row, "eot" (not returned). A row's own
        ``stop_token_ids`` end it too, "stop" (decided on the device, not returned).
    backend : str
        "auto", "reference" or "triton" (see :func:`lmgen_fast.sample`).
    callback : callable, optional
        ``callback(row, token_id)`` once for every token, in each row's order, at the host
        checks (every step on the CPU, every ``sync_every`` steps on CUDA).
    return_logprobs : bool
        Also return a :class:`RowLogprobs` per row (the extra work is done only then).
    cuda_graph : bool
        Replay each decode step as a CUDA graph where possible (CUDA tensors, the Triton
        sampler, a graph-capable decoder, no top alternatives asked).
    sync_every : int, optional
        Steps between host checks; default 16 on CUDA and 1 elsewhere.
    max_batch_size : int, optional
        Rows decoded at once. With more prompts than that, a decoder that
        :func:`supports_slots` runs continuous batching through ``max_batch_size`` slots (a
        finished row's slot takes the next prompt at the next host check); other decoders
        run static batches of that size in turn. None: every prompt in one batch.
    on_row : callable, optional
        ``on_row(row, (token_ids, finish_reason), row_logprobs)`` once per row as soon as it
        is finished (``row_logprobs`` None without ``return_logprobs``).
    stats : DecodeStats, optional
        Steps and slot-steps of the call are added to it.
    stop_check : callable, optional
        Stop strings: ``stop_check(row, token_ids)`` at each host check for every row with
        ``stop`` and new tokens; ``(kept, string)`` ends the row there with its first
        ``kept`` tokens (the later ones, computed before the check, are dropped, never
        streamed), "stop" (see :class:`lmgen_fast.api.stops.StopStrings`).
    grammars : sequence, optional
        Each row's compiled grammar (None: the row has none), from
        :func:`lmgen_fast.engine.grammar.compile_rows`; None when no row has one (a row
        whose grammar is not given here samples under whatever the state's bitmask holds:
        every token, unless the caller writes it, as ``generate_batch`` and ``lmgen-fast
        run`` always give the grammars). A run with grammars checks on the host every step
        and runs its steps eagerly: the host fills each grammar row's token bitmask while
        the model's forward runs, and a row its grammar completes ends with finish reason
        "stop" (stop reason None).

    Returns
    -------
    list of RowPair
        Per row, in the order of ``prompts``, ``(token_ids, finish_reason)`` with
        ``finish_reason`` "eot", "stop" or "length" and ``stop_reason`` the stop id or
        string (None where a grammar ended the row); with ``return_logprobs`` also the
        list of :class:`RowLogprobs`.

    Raises
    ------
    GenerationError
        A row had nothing to sample; ``partial`` holds what every row had so far.
    DecodeOutOfMemory
        A single row does not fit. A larger batch that does not fit is split in halves
        (continuous batching: run with half the slots), with a warning, which for seeded
        rows gives the same tokens.

    Notes
    -----
    Degrade, never fail: where capturing a step as a CUDA graph raises, a ``RuntimeWarning``
    names the cause and the decoder runs its steps eagerly from then on; where the Triton
    kernels fail to compile or launch, a ``RuntimeWarning`` names the cause and the call
    (and the rest of the process) samples with the reference on the same device. Seeded
    rows get the same tokens either way.
    """
    check_sync_every(sync_every)
    check_max_batch_size(max_batch_size)
    if grammars is not None and len(grammars) != len(prompts):
        raise ValueError(f"grammars has {len(grammars)} entries for {len(prompts)} prompts")
    options = RunOptions(end_tuple(eos_id), backend, callback, return_logprobs, cuda_graph,
                         sync_every, on_row, stats, stop_check, grammars)
    pairs, lps = run_parts(decoder, prompts, rows, max_tokens, options, max_batch_size)
    return (pairs, lps) if return_logprobs else pairs
