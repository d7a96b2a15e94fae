"""The plan of one run: which path its steps take and the layout of its state.

:func:`plan_run` is pure: it decides from the call's rows and options (:class:`RunOptions`)
and from what was found out about the machine and the decoder (:class:`Facts`), and
touches nothing. :mod:`lmgen_fast.engine.prepare` finds the facts out and applies a plan
(the decoder's step path, its state, the seeds of unseeded rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmgen_fast.core.intmath import round_up
from lmgen_fast.core.params import SamplingParams, stop_width
from lmgen_fast.core.rows import end_tuple
from lmgen_fast.engine.results import DecodeStats, RowCallback, StopCheck, TokenCallback
from lmgen_fast.engine.state import Layout, resident
from lmgen_fast.sampling import kernel as kernel_sampler

# Host checks per step on CUDA by default: a check waits for the GPU, so rarely; a row that
# stops early costs at most this many wasted steps.
SYNC_EVERY_CUDA = 16
# Buffers are sized in multiples of this many steps, so that calls of similar lengths reuse
# them (and their CUDA graphs).
STEP_ROUND = 64


@dataclass(frozen=True)
class RunOptions:
    """How a call of :func:`lmgen_fast.engine.generate_ids` runs, besides its rows (see
    there): ``eos_id`` (one end id or several), ``backend``, the callbacks,
    ``return_logprobs``, ``cuda_graph``, ``sync_every`` (None: the device's default), the
    ``stats`` to add to and ``stop_check`` (stop strings, at host checks).
    ``grammars``: each row's compiled grammar (None: none) from
    :func:`lmgen_fast.engine.grammar.compile_rows`, or None when no row has one."""

    eos_id: int | tuple[int, ...]
    backend: str = "auto"
    callback: TokenCallback | None = None
    return_logprobs: bool = False
    cuda_graph: bool = True
    sync_every: int | None = None
    on_row: RowCallback | None = None
    stats: DecodeStats | None = None
    stop_check: StopCheck | None = None
    grammars: Sequence | None = None

    @property
    def end_ids(self) -> tuple[int, ...]:
        """The ids that end every row (``eos_id`` as a tuple)."""
        return end_tuple(self.eos_id)


@dataclass(frozen=True)
class Facts:
    """What a plan needs to know about the machine and the decoder.

    ``kernel``: the Triton sampler is asked for (or chosen by "auto"), runs here and has
    not failed in this process. ``graph_cls``: the class that captures steps on the
    device (None: no graphs there). ``graphable``: the decoder offers a capturable step.
    ``fused``: whether the decoder's fused decode step can run (None: it has none; only
    asked with the kernels). ``capture_failed``: a capture already failed on this decoder.
    """

    kernel: bool
    graph_cls: type | None
    graphable: bool
    fused: bool | None
    capture_failed: bool


@dataclass(frozen=True)
class Plan:
    """The decisions of one run: the state's ``layout``, the graph class its steps are
    captured with (None: eager steps), the steps between host checks, whether some row
    uses penalties, the decoder's step path (``fused``, None: leave it) and whether
    unseeded rows must draw their seeds before the run (the sampler is told not to)."""

    layout: Layout
    graph_cls: type | None
    sync_every: int
    penalized: bool
    fused: bool | None
    draw_seeds: bool


def plan_run(rows: Sequence[SamplingParams], max_tokens: Sequence[int], base: Sequence[int],
             options: RunOptions, facts: Facts, device: torch.device, batch: int) -> Plan:
    """The plan for ``rows`` (capped at ``max_tokens``, histories starting with ``base``
    prompt tokens) through ``batch`` rows of state on ``device``.

    Buffers hold the longest row, rounded up to :data:`STEP_ROUND` steps; a step is
    captured only where it samples without host round trips, the decoder is graphable,
    no top alternatives are asked (ranking them waits for the host), no row has a grammar
    (its mask is filled on the host each step) and no capture failed on this decoder
    before.
    """
    kernel = facts.kernel
    sync_every = options.sync_every
    if sync_every is None:
        sync_every = SYNC_EVERY_CUDA if device.type == "cuda" else 1
    # A grammar row's mask depends on the token it drew last: the host looks every step,
    # between the forward and the sampler (so no step is captured whole).
    structured = options.grammars is not None
    if structured:
        sync_every = 1
    penalized = any(r.penalized for r in rows)
    top_n = max(r.logprobs for r in rows) if options.return_logprobs else 0
    # The reference off the CPU is capturable too (reference.sample_on_device).
    sync_free = resident(kernel, device)
    graph_cls = None
    if (options.cuda_graph and sync_free and facts.graphable and not top_n
            and not facts.capture_failed and not structured):
        graph_cls = facts.graph_cls
    total = max(max_tokens)
    cols = round_up(total, STEP_ROUND)
    hist = round_up(max(base) + total, STEP_ROUND)
    width = 0
    if penalized:
        width = min(hist, max(r.repetition_penalty_range or hist for r in rows))
    max_top_k, draw, nucleus = 0, False, 0
    if sync_free:
        # From the rows alone (the packed parameters are not read for a list of rows).
        max_top_k, draw, nucleus_rows = kernel_sampler.host_hints(rows, None, len(rows))
        nucleus = kernel_sampler.NUCLEUS_CANDIDATES if nucleus_rows else 0
    lay = Layout(batch, cols, hist, width, max_top_k, nucleus, top_n, options.return_logprobs,
                 stop_width(rows, options.end_ids), kernel, device,
                 bitmask=any(r.structured is not None for r in rows))
    fused = None if facts.fused is None else kernel and facts.fused
    return Plan(lay, graph_cls, sync_every, penalized, fused, draw)
