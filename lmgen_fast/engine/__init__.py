"""The decode loop: prefill, then one step per token (model, sampler, bookkeeping) on
state resident on the device; static batches or continuous batching through slots.

Modules: :mod:`~lmgen_fast.engine.generate` (the entry point and its recovery policy),
:mod:`~lmgen_fast.engine.plan` and :mod:`~lmgen_fast.engine.prepare` (a run's decisions,
and applying them), :mod:`~lmgen_fast.engine.state` (the device buffers),
:mod:`~lmgen_fast.engine.stepper` (eager or captured steps),
:mod:`~lmgen_fast.engine.static` and :mod:`~lmgen_fast.engine.slots` (the two kinds of
run), :mod:`~lmgen_fast.engine.delivery` (tokens and rows to the caller),
:mod:`~lmgen_fast.engine.memory`, :mod:`~lmgen_fast.engine.results` and
:mod:`~lmgen_fast.engine.bookkeeping`.
"""

from lmgen_fast.core.errors import DecodeOutOfMemory, GenerationError
from lmgen_fast.engine.generate import generate_ids
from lmgen_fast.engine.memory import DEFAULT_SLOTS, default_slots
from lmgen_fast.engine.plan import SYNC_EVERY_CUDA, RunOptions
from lmgen_fast.engine.results import (
    DecodeStats,
    RowCallback,
    RowLogprobs,
    RowPair,
    StopCheck,
    TokenCallback,
    TopLogprobs,
    check_max_batch_size,
    check_sync_every,
)
from lmgen_fast.engine.slots import supports_slots

__all__ = ["DEFAULT_SLOTS", "SYNC_EVERY_CUDA", "DecodeOutOfMemory", "DecodeStats",
           "GenerationError", "RowCallback", "RowLogprobs", "RowPair", "RunOptions", "StopCheck",
           "TokenCallback",
           "TopLogprobs", "check_max_batch_size", "check_sync_every", "default_slots",
           "generate_ids", "supports_slots"]
