"""Batch jobs: a job's input (checked whole before any work), its manifest, resumable JSONL
results, torchrun ranks, and the runner that takes rows through the engine. The ``run``
command around them is :mod:`lmgen_fast.cli.run`."""

from lmgen_fast.jobs.inputs import JobRow, derive_seed, encode_prompts, shard_of
from lmgen_fast.jobs.runner import RunStats, run_rows

__all__ = ["JobRow", "RunStats", "derive_seed", "encode_prompts", "run_rows", "shard_of"]
