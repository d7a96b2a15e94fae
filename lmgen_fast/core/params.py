"""Sampling parameters: one immutable, validated record per row, and their packed tensor form."""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch

from lmgen_fast.core.bitmask import pack_constraints

PENALTY_SCOPES = ("generated", "all")
PENALTY_MODES = ("per_occurrence", "once")
LOGPROBS_MODES = ("raw", "processed")
# Seeds are stored in int64 tensors so that kernels can read them on the device.
SEED_LIMIT = 2**63
MAX_LOGPROBS = 20
FLOAT32_MAX = 3.4028234663852886e38
# At most one grammar per row: the fields that name one.
STRUCTURED_FIELDS = ("json_schema", "regex", "grammar")


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


def check_int(name: str, value: object, minimum: int | None = None) -> int:
    """``value`` as an int (bools refused), at least ``minimum`` where given; else a
    ValueError naming ``name`` and the value."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if minimum is not None and n < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return n


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
    top_p : float
        Nucleus sampling: keep a token iff the probability of the tokens strictly more
        probable than it is below ``top_p``; ``0 < top_p <= 1``, ``1`` is off.
    min_p : float
        Keep a token iff its probability is at least ``min_p`` times the largest;
        ``0 <= min_p <= 1``, ``0`` is off.
    frequency_penalty, presence_penalty : float
        OpenAI-style: ``z[t] -= frequency_penalty * c_t + presence_penalty * (c_t > 0)``
        for a token seen ``c_t`` times in the window. Finite; ``0`` is off.
    logprobs : int
        How many top alternatives to report, 0 to 20 (ranked by the log-probabilities
        ``logprobs_mode`` selects).
    logprobs_mode : {"raw", "processed"}
        Which distribution reported log-probabilities describe: "raw", the model's
        ``log_softmax`` of the logits; "processed", the distribution the token was drawn
        from (after temperature, penalties, top-k, top-p and min-p; ``-inf`` for removed
        tokens, which are never listed; a greedy row's token has log-probability 0).
    n : int
        Samples per prompt (``>= 1``). Sample ``j`` of a prompt seeded ``s`` is that prompt's
        ``n=1`` result with seed ``s + j``; the prompt is prefilled once.
    stop : str or sequence of str
        The row ends once the decoded text of its generated tokens contains one of them; the
        text returned ends before the earliest match (see ``include_stop_str_in_output``).
        Stored as a tuple; no string may be empty.
    stop_token_ids : sequence of int
        Ids that end the row when drawn, like the end token (neither is returned).
    include_stop_str_in_output : bool
        Keep the matched stop string at the end of the returned text.
    min_tokens : int
        Until the row has this many tokens, its end token and ``stop_token_ids`` are masked
        to ``-inf`` (SPEC section 7) and stop strings are not checked.
    logit_bias : mapping of int to float
        ``{token_id: bias}`` added to the raw logits before every other step. Stored as a
        tuple of ``(token_id, bias)`` pairs sorted by id; biases are finite.
    allowed_token_ids : sequence of int or None
        When given, every other token is masked to ``-inf``; stored as a sorted tuple of
        distinct ids, never empty. ``None`` allows every token.
    json_schema, regex, grammar : str or None
        At most one: the row's output must match a JSON schema (a JSON string, or a mapping
        stored as its canonical JSON string), a regular expression, or an EBNF grammar
        (compiled with xgrammar, the ``structured`` extra).

    Ids are checked against the vocabulary by :meth:`check_vocab` once the model is known.

    Length: one validated field per sampling control, each normalised where it is stored.

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
    top_p: float = 1.0
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: int = 0
    logprobs_mode: str = "raw"
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None
    json_schema: str | None = None
    regex: str | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise the stored values once, here
        temperature = _check_real("temperature", self.temperature)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        set_(self, "temperature", temperature)
        set_(self, "top_k", check_int("top_k", self.top_k))
        penalty = _check_real("repetition_penalty", self.repetition_penalty)
        if penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        set_(self, "repetition_penalty", penalty)
        rng = check_int("repetition_penalty_range", self.repetition_penalty_range)
        if rng < 0:
            raise ValueError(
                f"repetition_penalty_range must be >= 0, got {self.repetition_penalty_range!r}"
            )
        set_(self, "repetition_penalty_range", rng)
        if self.seed is not None:
            seed = check_int("seed", self.seed)
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
        top_p = _check_real("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        set_(self, "top_p", top_p)
        min_p = _check_real("min_p", self.min_p)
        if not 0 <= min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        set_(self, "min_p", min_p)
        for name in ("frequency_penalty", "presence_penalty"):
            value = _check_real(name, getattr(self, name))
            # The math runs in float32: a larger value would become inf there (and NaN next).
            if abs(value) > FLOAT32_MAX:
                raise ValueError(f"{name} must be within float32 range, got {value!r}")
            set_(self, name, value)
        logprobs = check_int("logprobs", self.logprobs)
        if not 0 <= logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        set_(self, "logprobs", logprobs)
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(
                f"logprobs_mode must be one of {LOGPROBS_MODES}, got {self.logprobs_mode!r}"
            )
        self._check_job_fields(set_)

    def _check_job_fields(self, set_) -> None:
        """Normalise and check the research-job fields (SPEC section 7)."""
        set_(self, "n", check_int("n", self.n, 1))
        set_(self, "stop", _check_stop(self.stop))
        set_(self, "stop_token_ids", _check_ids("stop_token_ids", self.stop_token_ids))
        if not isinstance(self.include_stop_str_in_output, bool):
            raise ValueError("include_stop_str_in_output must be a bool, got "
                             f"{self.include_stop_str_in_output!r}")
        set_(self, "min_tokens", check_int("min_tokens", self.min_tokens, 0))
        set_(self, "logit_bias", _check_bias(self.logit_bias))
        if self.allowed_token_ids is not None:
            allowed = tuple(sorted(set(_check_ids("allowed_token_ids", self.allowed_token_ids))))
            if not allowed:
                raise ValueError("allowed_token_ids must not be empty (it would mask every "
                                 "token); pass None to allow them all")
            set_(self, "allowed_token_ids", allowed)
        if isinstance(self.json_schema, Mapping):
            set_(self, "json_schema", json.dumps(self.json_schema, sort_keys=True))
        given = [f for f in STRUCTURED_FIELDS if getattr(self, f) is not None]
        for name in given:
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if len(given) > 1:
            raise ValueError(f"give at most one of {STRUCTURED_FIELDS}, got {given}")

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ValueError naming the first id of ``stop_token_ids``, ``logit_bias`` or
        ``allowed_token_ids`` outside ``[0, vocab_size)``."""
        fields = (("stop_token_ids", self.stop_token_ids),
                  ("logit_bias", [t for t, _ in self.logit_bias]),
                  ("allowed_token_ids", self.allowed_token_ids or ()))
        for name, ids in fields:
            for t in ids:
                if not 0 <= t < vocab_size:
                    raise ValueError(f"{name} has token id {t}, outside the vocabulary "
                                     f"[0, {vocab_size})")

    @property
    def structured(self) -> tuple[str, str] | None:
        """``(kind, source)`` of the row's grammar (kind one of STRUCTURED_FIELDS), or None."""
        for name in STRUCTURED_FIELDS:
            if getattr(self, name) is not None:
                return name, getattr(self, name)
        return None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether any penalty reads the row's history (so a window must be built)."""
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
                or self.presence_penalty != 0.0)


def _check_stop(stop: object) -> tuple[str, ...]:
    strings = (stop,) if isinstance(stop, str) else stop
    try:
        strings = tuple(strings)
    except TypeError:
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}") from None
    for s in strings:
        if not isinstance(s, str):
            raise ValueError(f"stop must be a string or a list of strings, got {s!r} in it")
        if not s:
            raise ValueError("stop strings must not be empty, got ''")
    return strings


def _check_ids(name: str, ids: object) -> tuple[int, ...]:
    if isinstance(ids, (str, bytes)):
        raise ValueError(f"{name} must be a list of token ids, got {ids!r}")
    try:
        values = tuple(ids)
    except TypeError:
        raise ValueError(f"{name} must be a list of token ids, got {ids!r}") from None
    return tuple(check_int(name, t, 0) for t in values)


def _check_bias(bias: object) -> tuple[tuple[int, float], ...]:
    try:
        items = bias.items() if isinstance(bias, Mapping) else tuple(bias)
        # JSON objects (a job line, an OpenAI-style request) key ids as decimal strings.
        pairs = {check_int("logit_bias token id",
                           int(t) if isinstance(t, str) and t.isdecimal() else t, 0): b
                 for t, b in items}
    except (TypeError, ValueError) as e:
        if isinstance(e, ValueError) and "logit_bias" in str(e):
            raise
        raise ValueError(f"logit_bias must map token ids to biases, got {bias!r}") from None
    out = []
    for t in sorted(pairs):
        b = _check_real(f"logit_bias[{t}]", pairs[t])
        if abs(b) > FLOAT32_MAX:
            raise ValueError(f"logit_bias[{t}] must be within float32 range, got {b!r}")
        out.append((t, b))
    return tuple(out)


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
    ``seeded`` bool (``False`` rows have ``seed`` 0 until the sampler draws one),
    ``top_p`` and ``min_p`` float64 (the user's values: float32 would move the filters'
    edges, e.g. ``top_p=0.9999999`` to 0.99999988), ``min_p_log`` float32 (min-p's
    threshold on ``z - z_max``, see :func:`min_p_threshold`), ``frequency_penalty``,
    ``presence_penalty`` float32, ``processed`` bool (``logprobs_mode == "processed"``).
    ``logprobs`` is kept on the host: the largest count of alternatives any row asks for.

    SPEC section 7's per-row ids: ``stop_ids`` int64 ``[B, S]`` (``S >= 1``), the end ids
    given to :meth:`from_rows` then the row's ``stop_token_ids``, padded with ``-1`` (the ids
    that end the row when drawn, and that ``min_tokens`` masks); ``min_tokens`` int64 ``[B]``
    (while a row's step is below it, its ``stop_ids`` are ``-inf``).

    SPEC section 7's bias and allowed set, None where no row has one: ``bias_ids`` int64
    ``[B, K]`` (each row's biased ids ascending, ``-1`` padded at the end) and ``bias_vals``
    float32 ``[B, K]`` (their biases); ``allowed`` int32 ``[B, ceil(V / 32)]``, the allowed
    set as a token bitmask (:mod:`lmgen_fast.core.bitmask`; all bits set for a row without
    one), built by :meth:`from_rows` from its ``vocab_size``, the only place that knows
    ``V``; ``constraints`` int32 ``[B]``, present where some row has a bias, an allowed set,
    ``min_tokens`` or a grammar (the kernels compile their mask code in only then): bit 1
    for a row with a bias, 2 with an allowed set, 4 with ``min_tokens``, 8 with a grammar
    (the kernels read the lists of those rows only).
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    penalty: torch.Tensor
    once: torch.Tensor
    seed: torch.Tensor
    seeded: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    frequency_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    min_p_log: torch.Tensor
    processed: torch.Tensor
    stop_ids: torch.Tensor
    min_tokens: torch.Tensor
    logprobs: int = 0
    bias_ids: torch.Tensor | None = None
    bias_vals: torch.Tensor | None = None
    allowed: torch.Tensor | None = None
    constraints: torch.Tensor | None = None

    def shapes(self) -> tuple:
        """Every tensor field's shape past the batch (None for an absent tensor or a host
        field): two packings with equal shapes can be copied row by row into each other, as
        a reused engine state is."""
        return tuple(tuple(v.shape[1:]) if isinstance(v, torch.Tensor) else None
                     for v in (getattr(self, f.name) for f in fields(self)))

    def to(self, device: torch.device | str) -> PackedParams:
        """The same parameters with every tensor on ``device``."""
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                 for k, v in vars(self).items()}
        return PackedParams(**moved)

    def take(self, index: torch.Tensor) -> PackedParams:
        """The rows ``index`` (int64 ``[n]``, on the parameters' device) of every tensor."""
        return PackedParams(**{k: v[index] if isinstance(v, torch.Tensor) else v
                               for k, v in vars(self).items()})

    @staticmethod
    def from_rows(rows: Sequence[SamplingParams], device: torch.device | str,
                  end_ids: Sequence[int] = (), vocab_size: int | None = None) -> PackedParams:
        """Pack ``rows``; ``end_ids`` are the ids that end every row (the tokenizer's end
        token or tokens), the first columns of ``stop_ids``. ``vocab_size`` (the logits'
        width) checks every row's ids (:meth:`SamplingParams.check_vocab`) and sizes the
        ``allowed`` bitmask; a row with ``allowed_token_ids`` needs it."""
        if vocab_size is not None:
            for p in rows:
                p.check_vocab(vocab_size)

        def t(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        stops = [row_stop_ids(p, end_ids) for p in rows]
        width = max(map(len, stops), default=0) or 1  # stop_width's, from the lists here

        return PackedParams(
            temperature=t([p.temperature for p in rows], torch.float32),
            top_k=t([max(p.top_k, 0) for p in rows], torch.int64),
            penalty=t([p.repetition_penalty for p in rows], torch.float32),
            once=t([p.penalty_mode == "once" for p in rows], torch.bool),
            seed=t([p.seed if p.seed is not None else 0 for p in rows], torch.int64),
            seeded=t([p.seed is not None for p in rows], torch.bool),
            top_p=t([p.top_p for p in rows], torch.float64),
            min_p=t([p.min_p for p in rows], torch.float64),
            frequency_penalty=t([p.frequency_penalty for p in rows], torch.float32),
            presence_penalty=t([p.presence_penalty for p in rows], torch.float32),
            min_p_log=min_p_threshold([p.min_p for p in rows]).to(device),
            processed=t([p.logprobs_mode == "processed" for p in rows], torch.bool),
            stop_ids=t([s + [-1] * (width - len(s)) for s in stops], torch.int64).reshape(
                len(rows), width),
            min_tokens=t([p.min_tokens for p in rows], torch.int64),
            logprobs=max((p.logprobs for p in rows), default=0),
            **pack_constraints(rows, device, vocab_size),
        )


def row_stop_ids(row: SamplingParams, end_ids: Sequence[int]) -> list[int]:
    """The ids that end ``row`` when drawn: ``end_ids``, then its other ``stop_token_ids``."""
    return list(end_ids) + [i for i in row.stop_token_ids if i not in end_ids]


def stop_width(rows: Sequence[SamplingParams], end_ids: Sequence[int]) -> int:
    """``S``, the width of :attr:`PackedParams.stop_ids` for ``rows`` (at least 1)."""
    return max((len(row_stop_ids(p, end_ids)) for p in rows), default=0) or 1


def min_p_threshold(min_p: Sequence[float]) -> torch.Tensor:
    """Min-p's threshold on ``d = z_i - z_max``, float32 ``[N]`` on the CPU.

    ``exp(d) >= min_p`` holds exactly when ``d >= log(min_p)``; for a float32 ``d`` that is
    ``d >= t`` with ``t`` the smallest float32 at or above ``log(min_p)`` (taken in float64
    from the user's value). Every backend compares ``d`` with this ``t``, so none depends on
    how its device rounds ``exp``. ``min_p == 0`` gives ``-inf`` (keeps every token).
    """
    logs = torch.tensor([math.log(m) if m > 0 else -math.inf for m in min_p],
                        dtype=torch.float64)
    t = logs.to(torch.float32)
    # float64 -> float32 rounds to nearest: step up where that went below.
    return torch.where(t.to(torch.float64) < logs, torch.nextafter(t, torch.tensor(math.inf)), t)
