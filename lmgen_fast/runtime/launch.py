"""Kernel launch records and the current CUDA device."""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch


class KernelCall(NamedTuple):
    """One kernel launch: the JIT function's name, grid, positional arguments, constexprs
    and compile options (the ahead-of-time compile test builds its signatures from these)."""

    name: str
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict
    options: dict


def run_calls(module, calls: list[KernelCall]) -> None:
    """Launch ``calls`` in order, each the JIT function of that name in ``module``."""
    for call in calls:
        getattr(module, call.name)[call.grid](*call.args, **call.constexprs, **call.options)


def on_device(device: torch.device | str | None):
    """A context making ``device`` the current CUDA device (a no-op for other devices):
    Triton kernels, CUDA graphs and streams all act on the current device."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
