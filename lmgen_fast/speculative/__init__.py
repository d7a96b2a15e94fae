"""Speculative decoding that returns plain decoding's tokens: drafters propose, one target
forward and one sampler call per round verify.

Modules: :mod:`~lmgen_fast.speculative.rounds` (the rounds loop, :func:`generate_ids`),
:mod:`~lmgen_fast.speculative.slots` (the rounds through slots, :func:`generate_slots`, and
:class:`SpeculativeRun` for batch jobs),
:mod:`~lmgen_fast.speculative.drafters`, :mod:`~lmgen_fast.speculative.rows` (a batch's
state and its sampler call), :mod:`~lmgen_fast.speculative.accept` (what a row keeps),
:mod:`~lmgen_fast.speculative.verify` (the verify step as a CUDA graph) and
:mod:`~lmgen_fast.speculative.cache` (forwards at per-row positions).
"""

from lmgen_fast.speculative.drafters import Drafter, ModelDrafter, NgramDrafter, make_drafter
from lmgen_fast.speculative.rounds import RowStats, check_num_speculative_tokens, generate_ids
from lmgen_fast.speculative.slots import SpeculativeRun, generate_slots

__all__ = ["Drafter", "ModelDrafter", "NgramDrafter", "RowStats", "SpeculativeRun",
           "check_num_speculative_tokens", "generate_ids", "generate_slots", "make_drafter"]
