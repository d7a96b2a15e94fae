"""Speculative decoding that returns plain decoding's tokens: drafters propose, one target
forward and one sampler call per round verify."""

from lmgen_fast.speculative.rounds import (
    Drafter,
    ModelDrafter,
    NgramDrafter,
    RowStats,
    SpeculativeRun,
    check_num_speculative_tokens,
    generate_ids,
    make_drafter,
)

__all__ = ["Drafter", "ModelDrafter", "NgramDrafter", "RowStats", "SpeculativeRun",
           "check_num_speculative_tokens", "generate_ids", "make_drafter"]
