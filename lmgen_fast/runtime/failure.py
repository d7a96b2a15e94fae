"""The Triton kernels' failure record: the first failure in a process is remembered and
warned about once, and from then on every caller samples with the reference instead.

:func:`guarded` turns a failure of Triton itself into :class:`KernelUnavailable`; the
engine's recovery policy (:mod:`lmgen_fast.engine`) catches that and reruns the call with
the reference sampler.
"""

from __future__ import annotations

import warnings

import torch


class KernelUnavailable(RuntimeError):
    """The Triton kernels failed to compile or launch on this machine (the cause is chained)."""


class FailureRecord:
    """Why the kernels are not used in this process (``cause`` None: they are). Set by the
    first failure, so that later calls neither retry a compilation that failed nor warn
    again."""

    def __init__(self) -> None:
        self.cause: str | None = None

    def note(self, exc: BaseException) -> None:
        if self.cause is not None:
            return
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        self.cause = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
        warnings.warn(
            f"the Triton sampler failed on this machine ({self.cause}); sampling continues "
            "with the reference sampler on the same device (same tokens for seeded rows, "
            "slower)", RuntimeWarning, stacklevel=4)


RECORD = FailureRecord()


def kernel_failure() -> str | None:
    """Why this process samples with the reference instead of the kernels, or None."""
    return RECORD.cause


def note_failure(exc: BaseException) -> None:
    """Record that the kernels failed (``exc``) and warn, once per process, that the
    reference sampler takes over on the same device."""
    RECORD.note(exc)


def reset_failure() -> None:
    """Forget a recorded failure: the next call tries the kernels again."""
    RECORD.cause = None


def guarded(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` (a launch of Triton kernels), with a failure of Triton itself
    (compilation, a missing driver feature, a launch error) raised as
    :class:`KernelUnavailable`.

    Bad arguments (``ValueError``) and out-of-memory errors pass through unchanged: the
    reference would meet them too.
    """
    try:
        return fn(*args, **kwargs)
    except (ValueError, torch.OutOfMemoryError):
        raise
    except Exception as exc:
        raise KernelUnavailable(f"the Triton sampler failed: {exc}") from exc
