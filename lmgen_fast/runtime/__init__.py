"""What running on a device takes besides the math: kernel launch records and the current
device, the record of a Triton failure with its fallback, and CUDA-graph capture with its
fallback (each in one place, used by the sampler, the engine and speculative decoding)."""

from lmgen_fast.runtime.failure import (
    KernelUnavailable,
    guarded,
    kernel_failure,
    note_failure,
    reset_failure,
)
from lmgen_fast.runtime.launch import KernelCall, on_device

__all__ = ["KernelCall", "KernelUnavailable", "guarded", "kernel_failure", "note_failure",
           "on_device", "reset_failure"]
