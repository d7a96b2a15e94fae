"""The decode loop: prefill, then one step per token (model, sampler, bookkeeping) on
state resident on the device; static batches or continuous batching through slots."""

from lmgen_fast.engine.loop import (
    DecodeOutOfMemory,
    DecodeStats,
    GenerationError,
    RowLogprobs,
    TokenCallback,
    default_slots,
    generate_ids,
    supports_slots,
)

__all__ = ["DecodeOutOfMemory", "DecodeStats", "GenerationError", "RowLogprobs",
           "TokenCallback", "default_slots", "generate_ids", "supports_slots"]
