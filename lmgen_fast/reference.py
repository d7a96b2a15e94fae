"""``lmgen_fast.reference``: the public path of the reference sampler, whose code lives in
:mod:`lmgen_fast.sampling.reference` (users and outside checks import it from here)."""

from lmgen_fast.sampling.reference import (
    EmptyRowError,
    ParamsLike,
    SampleLogprobs,
    apply_penalty,
    filtered_logits,
    pack,
    process_logits,
    raw_logprobs,
    sample,
)

__all__ = ["EmptyRowError", "ParamsLike", "SampleLogprobs", "apply_penalty",
           "filtered_logits", "pack", "process_logits", "raw_logprobs", "sample"]
