"""The errors every layer raises or reports, and the status bits a sampling step leaves
per row (the Triton kernels write the same values: ``kernels/sampling_common.py`` repeats
them as JIT constants, and ``tests/core/test_errors.py`` holds the two equal)."""

from __future__ import annotations

from collections.abc import Sequence

# Status bits of one row after a sampling step (int32 per row).
STATUS_EMPTY = 1  # nothing to sample: every value NaN or -inf
STATUS_OVERFLOW = 2  # top-k larger than the candidate capacity the launch was sized for
STATUS_INTERNAL = 4  # an id outside [0, V) was about to be returned (a bug)
STATUS_SLOW = 8  # informational: a top-p/min-p row took the kernels' multi-pass path


class EmptyRowError(ValueError):
    """A logits row has no finite or ``+inf`` value left to sample from."""

    def __init__(self, rows: Sequence[int]):
        self.rows = list(rows)
        super().__init__(
            f"logits row(s) {self.rows} have no finite or +inf value to sample from "
            "(all NaN or -inf, or masked by logit_bias, allowed_token_ids, a token bitmask "
            "or min_tokens)"
        )


class GenerationError(ValueError):
    """Generation stopped on bad model output; ``partial`` holds each row's ids so far."""

    def __init__(self, message: str, partial: list[list[int]]):
        super().__init__(message)
        self.partial = partial


class DecodeOutOfMemory(RuntimeError):
    """Even one row does not fit in the device's memory; the message says what would."""


class CLIError(Exception):
    """A user error: printed as one line, exit status 2 (``EXIT_USAGE`` of the command)."""
