"""Sampling parameters: one immutable, validated record per row, and their packed tensor form."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

PENALTY_SCOPES = ("generated", "all")
PENALTY_MODES = ("per_occurrence", "once")
# Seeds are stored in int64 tensors so that kernels can read them on the device.
SEED_LIMIT = 2**63


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # numpy and 0-d torch scalars
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a real number, got {value!r}") from None
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


@dataclass(frozen=True)
class SamplingParams:
    """How one row draws its next token (SPEC sections 2 to 4).

    Parameters
    ----------
    temperature : float
        Logits are divided by it. ``0`` means greedy (argmax). Must be finite and ``>= 0``.
    top_k : int
        Keep the tokens whose value is at least the k-th largest (ties kept). ``<= 0`` disables it.
    repetition_penalty : float
        ``p``: a positive value of a windowed token is divided by it, a non-positive one
        multiplied, once per occurrence. Must be finite and ``> 0``; ``1`` disables it.
    repetition_penalty_range : int
        ``R``: the window is the last ``R`` tokens of the history; ``0`` means all of it.
    seed : int or None
        ``None`` draws from torch's global generator; an int in ``[0, 2**63)`` makes the row
        reproducible and independent of its batch mates, on every backend and device.
    penalty_scope : {"generated", "all"}
        Whether the prompt's tokens are part of the penalty history.
    penalty_mode : {"per_occurrence", "once"}
        Whether a token that occurs c times in the window is penalised c times or once.

    Examples
    --------
    >>> SamplingParams(temperature=0.8, top_k=40, seed=1)
    SamplingParams(temperature=0.8, top_k=40, repetition_penalty=1.0, ...)
    """

    temperature: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    repetition_penalty_range: int = 10
    seed: int | None = None
    penalty_scope: str = "generated"
    penalty_mode: str = "per_occurrence"

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise the stored values once, here
        temperature = _check_real("temperature", self.temperature)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        set_(self, "temperature", temperature)
        set_(self, "top_k", _check_int("top_k", self.top_k))
        penalty = _check_real("repetition_penalty", self.repetition_penalty)
        if penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        set_(self, "repetition_penalty", penalty)
        rng = _check_int("repetition_penalty_range", self.repetition_penalty_range)
        if rng < 0:
            raise ValueError(
                f"repetition_penalty_range must be >= 0, got {self.repetition_penalty_range!r}"
            )
        set_(self, "repetition_penalty_range", rng)
        if self.seed is not None:
            seed = _check_int("seed", self.seed)
            if not 0 <= seed < SEED_LIMIT:
                raise ValueError(f"seed must be in [0, 2**63), got {self.seed!r}")
            set_(self, "seed", seed)
        if self.penalty_scope not in PENALTY_SCOPES:
            raise ValueError(
                f"penalty_scope must be one of {PENALTY_SCOPES}, got {self.penalty_scope!r}"
            )
        if self.penalty_mode not in PENALTY_MODES:
            raise ValueError(
                f"penalty_mode must be one of {PENALTY_MODES}, got {self.penalty_mode!r}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def as_row_params(
    params: SamplingParams | Sequence[SamplingParams], batch: int
) -> list[SamplingParams]:
    """One SamplingParams per row: broadcast a single one, or check a sequence has ``batch``."""
    if isinstance(params, SamplingParams):
        return [params] * batch
    rows = list(params)
    if len(rows) != batch:
        raise ValueError(f"params has {len(rows)} entries for a batch of {batch} rows")
    for i, p in enumerate(rows):
        if not isinstance(p, SamplingParams):
            raise ValueError(f"params[{i}] must be a SamplingParams, got {type(p).__name__}")
    return rows


@dataclass(frozen=True)
class PackedParams:
    """Per-row parameters as tensors on one device, the form a kernel reads.

    All tensors have shape ``[B]``: ``temperature`` float32, ``top_k`` int64 (``0`` = off),
    ``penalty`` float32, ``once`` bool (penalty_mode == "once"), ``seed`` int64 and
    ``seeded`` bool (``False`` rows have ``seed`` 0 until the sampler draws one).
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    penalty: torch.Tensor
    once: torch.Tensor
    seed: torch.Tensor
    seeded: torch.Tensor

    @staticmethod
    def from_rows(rows: Sequence[SamplingParams], device: torch.device | str) -> PackedParams:
        def t(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        return PackedParams(
            temperature=t([p.temperature for p in rows], torch.float32),
            top_k=t([max(p.top_k, 0) for p in rows], torch.int64),
            penalty=t([p.repetition_penalty for p in rows], torch.float32),
            once=t([p.penalty_mode == "once" for p in rows], torch.bool),
            seed=t([p.seed if p.seed is not None else 0 for p in rows], torch.int64),
            seeded=t([p.seed is not None for p in rows], torch.bool),
        )
