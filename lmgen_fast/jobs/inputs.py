"""The input of a batch job: read and check every line, derive seeds, plan batches.

Nothing here touches a model: the whole input is validated (and, with ``--skip-invalid``,
its bad lines collected) before any time is spent loading one. :mod:`lmgen_fast.jobs`
re-exports every public name.
"""

from __future__ import annotations

import hashlib
import json
import operator
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

from lmgen_fast.api.tokenization import (
    TokenizerAdapter,
    check_messages,
    encode_messages,
    encode_token_ids,
)
from lmgen_fast.core.errors import CLIError
from lmgen_fast.core.params import STRUCTURED_FIELDS, SamplingParams
from lmgen_fast.core.rows import positions_needed
from lmgen_fast.jobs.jsonl import id_key

PARAM_FIELDS = tuple(f.name for f in fields(SamplingParams))
# A line's prompt: exactly one of these (SPEC section 7's prompt forms).
PROMPT_FIELDS = ("prompt", "prompt_token_ids", "messages")
KNOWN_FIELDS = ("id", *PROMPT_FIELDS, "max_tokens", *PARAM_FIELDS)
SEED_MASK = 2**63 - 1


class JobError(CLIError, ValueError):
    """A job that cannot run because of its input, options or output file (exit status 2).

    A generation that fails at run time raises :class:`JobFailed` instead.
    """


class JobFailed(RuntimeError):
    """A job whose generation failed at run time (exit status 1); rows already written stay."""


class LineError(ValueError):
    """Why one input line is invalid; ``row_id`` is its id when it had a usable one."""

    def __init__(self, reason: str, row_id: str | int | None = None):
        super().__init__(reason)
        self.row_id = row_id


@dataclass(frozen=True)
class JobRow:
    """One valid input line: its id, 1-based line number, prompt and sampling settings.

    ``kind`` names the prompt's form (one of :data:`PROMPT_FIELDS`): ``prompt`` is then a
    str, a list of token ids, or a list of ``{"role", "content"}`` messages. ``samples``:
    the result line holds ``"samples"``, a list of ``params.n`` results (the line, or the
    run's ``--n``, asked for ``n``), instead of one result's fields.
    """

    id: str | int
    line: int
    prompt: str | list[int] | list[dict]
    params: SamplingParams
    max_tokens: int
    kind: str = "prompt"
    samples: bool = False

    @property
    def key(self) -> str:
        return id_key(self.id)


@dataclass(frozen=True)
class InvalidLine:
    """One rejected input line: why, and its id when it had a usable one."""

    line: int
    id: str | int | None
    error: str

    def record(self) -> dict:
        """The errors-file record: ``{"id", "line", "error"}``."""
        return {"id": self.id, "line": self.line, "error": self.error}


def derive_seed(run_seed: int, row_id: str | int) -> int:
    """A row's seed from the run's ``--seed`` and its id.

    Giving every row the run seed itself would give identical prompts identical texts and
    correlate all rows' noise; hashing in the id keeps each row reproducible (it depends on
    nothing but the run seed and the id) and the rows independent of each other.

    Parameters
    ----------
    run_seed : int
        The ``--seed`` of the run.
    row_id : str or int
        The row's id.

    Returns
    -------
    int
        A seed in ``[0, 2**63)``.
    """
    digest = hashlib.blake2b(f"{run_seed}\0{id_key(row_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & SEED_MASK


def shard_of(key: str, world: int) -> int:
    """The rank that owns the id with ``key`` among ``world`` ranks (a stable hash)."""
    if world == 1:
        return 0
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % world


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _json_error(text: str, err: json.JSONDecodeError) -> str:
    # Columns count characters from 1, as editors do; the line holds no newline, so the
    # decoder's position is the column.
    message = f"malformed JSON: {err.msg} at column {err.pos + 1}"
    if err.pos >= len(text.rstrip()):
        message += " (the end of the line: is it cut short?)"
    return message


def _check_max_tokens(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"max_tokens must be an integer, got {json.dumps(value)}")
    try:
        n = operator.index(value)
    except TypeError:
        raise ValueError(f"max_tokens must be an integer, got {json.dumps(value)}") from None
    if n < 0:
        raise ValueError(f"max_tokens must be >= 0, got {n}")
    return n


def structured_overrides(overrides: dict) -> dict:
    """``overrides`` where a line names a grammar (json_schema, regex or grammar): the
    line's replaces the command line's, so the other two are cleared."""
    if any(overrides.get(f) is not None for f in STRUCTURED_FIELDS):
        return {**{f: None for f in STRUCTURED_FIELDS}, **overrides}
    return overrides


def _prompt(obj: dict, row_id: str | int) -> tuple[str, str | list]:
    """The line's prompt field and its value, checked: exactly one of PROMPT_FIELDS."""
    given = [k for k in PROMPT_FIELDS if k in obj]
    if not given:
        raise LineError("missing prompt (give one of prompt, prompt_token_ids, messages)",
                        row_id)
    if len(given) > 1:
        raise LineError(f"give one of prompt, prompt_token_ids and messages, got "
                        f"{' and '.join(given)}", row_id)
    kind, value = given[0], obj[given[0]]
    try:
        if kind == "prompt_token_ids":
            return kind, encode_token_ids(value, 0)
        if kind == "messages":
            return kind, check_messages(value, 0)
    except ValueError as err:
        # The library names the call's n-th prompt; a line has one.
        raise LineError(str(err).replace(f"{kind}[0]", kind), row_id) from None
    if not isinstance(value, str):
        raise LineError(f"prompt must be a string, got {_json_type(value)}", row_id)
    return kind, value


def parse_line(
    obj: object, defaults: SamplingParams, max_tokens: int, run_seed: int | None,
    samples: bool = False,
) -> JobRow:
    """Check one decoded input object; return its row (``line`` 0: the caller's to set).

    Parameters
    ----------
    obj : object
        The decoded JSON value of the line.
    defaults : SamplingParams
        The command line's parameters, overridden field by field by the line.
    max_tokens : int
        The command line's ``--max-tokens``.
    run_seed : int or None
        The command line's ``--seed``: rows without a ``seed`` get :func:`derive_seed`.
    samples : bool
        The run's ``--n`` was given: every line's result holds ``"samples"``.

    Raises
    ------
    LineError
        The reason the line is invalid.
    """
    if not isinstance(obj, dict):
        raise LineError(f"expected a JSON object, got {_json_type(obj)}")
    row_id = obj.get("id")
    if "id" not in obj:
        raise LineError("missing id")
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        raise LineError(f"id must be a string or an integer, got {json.dumps(row_id)}")
    unknown = [k for k in obj if k not in KNOWN_FIELDS]
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        raise LineError(
            f"unknown field{'s' if len(unknown) > 1 else ''} {names} "
            f"(known: {', '.join(KNOWN_FIELDS)})", row_id,
        )
    kind, prompt = _prompt(obj, row_id)
    # logit_bias keyed by JSON strings ("5": token 5) is SamplingParams' to read.
    overrides = structured_overrides({k: obj[k] for k in PARAM_FIELDS if k in obj})
    if "seed" not in overrides and run_seed is not None:
        overrides["seed"] = derive_seed(run_seed, row_id)
    try:
        params = replace(defaults, **overrides)
        cap = _check_max_tokens(obj["max_tokens"]) if "max_tokens" in obj else max_tokens
    except ValueError as err:
        raise LineError(str(err), row_id) from None
    if params.min_tokens > cap:
        raise LineError(f"min_tokens {params.min_tokens} is above max_tokens {cap}", row_id)
    if params.seed is not None and params.seed + params.n > SEED_MASK + 1:
        # Sample j is seeded seed + j, which must stay a seed.
        raise LineError(f"seed {params.seed} leaves no room for n={params.n} samples (seed + "
                        "n - 1 must stay below 2**63)", row_id)
    return JobRow(row_id, 0, prompt, params, cap, kind, samples or "n" in obj)


def read_jobs(
    path: str | Path,
    defaults: SamplingParams,
    max_tokens: int,
    run_seed: int | None = None,
    samples: bool = False,
) -> tuple[list[JobRow], list[InvalidLine]]:
    """Read and validate every line of a JSONL input file.

    Blank lines are ignored. A line is invalid when it is not UTF-8 or not JSON, is not an
    object, lacks an ``id`` (string or integer), has not exactly one of a string ``prompt``,
    a ``prompt_token_ids`` list of ids and a ``messages`` list of ``{"role", "content"}``
    objects, repeats an earlier id, has a field other than those, ``max_tokens`` and the
    fields of :class:`SamplingParams`, has a value that those reject, or a ``min_tokens``
    above its ``max_tokens``.

    Parameters
    ----------
    path : str or Path
        The input file.
    defaults, max_tokens, run_seed, samples
        As for :func:`parse_line`.

    Returns
    -------
    (list of JobRow, list of InvalidLine)
        The valid rows and the invalid lines, both in file order.
    """
    rows: list[JobRow] = []
    invalid: list[InvalidLine] = []
    first_line: dict[str, int] = {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                # Without its line ending, a line cut short fails at its last column, not
                # at column 1 of a line 2 that the newline would open.
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                invalid.append(InvalidLine(number, None, f"not valid UTF-8 ({err.reason})"))
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                invalid.append(InvalidLine(number, None, _json_error(text, err)))
                continue
            # Duplicates are found before other checks so that a repeated id is reported as
            # such even when the repeat is otherwise broken too.
            row_id = obj.get("id") if isinstance(obj, dict) else None
            if isinstance(row_id, (str, int)) and not isinstance(row_id, bool):
                key = id_key(row_id)
                if key in first_line:
                    invalid.append(InvalidLine(
                        number, row_id,
                        f"duplicate id {key} (first on line {first_line[key]})",
                    ))
                    continue
                first_line[key] = number
            try:
                row = parse_line(obj, defaults, max_tokens, run_seed, samples)
            except LineError as err:
                invalid.append(InvalidLine(number, err.row_id, str(err)))
                continue
            rows.append(replace(row, line=number))
    return rows, invalid


def encode_prompts(adapter, rows: Sequence[JobRow], path: str | Path | None = None
                   ) -> list[list[int]]:
    """Each row's prompt ids: the adapter's encoding for text (batched when
    possible), token ids as given, messages through the tokenizer's chat template.

    Raises
    ------
    JobError
        A row with messages and a tokenizer without a chat template: ``PATH:LINE: why``
        (``path``: the input file; without it ``line LINE: why``).
    """
    out: list[list[int]] = [[] for _ in rows]
    text = [i for i, r in enumerate(rows) if r.kind == "prompt"]
    tokenizer = adapter.tokenizer
    if type(adapter) is TokenizerAdapter and hasattr(tokenizer, "encode_batch"):
        # Same ids as adapter.encode_prompt (tokenizers' encode and encode_batch share their
        # defaults), computed in parallel: it matters for inputs of millions of rows.
        encoded = tokenizer.encode_batch([" " + rows[i].prompt for i in text])
        for i, e in zip(text, encoded, strict=True):
            out[i] = [*adapter.prefix(), *e.ids]
    else:
        for i in text:
            out[i] = adapter.encode_prompt(rows[i].prompt)
    for i, row in enumerate(rows):
        if row.kind == "prompt_token_ids":
            out[i] = list(row.prompt)
        elif row.kind == "messages":
            try:
                out[i] = encode_messages(adapter, row.prompt, 0)
            except ValueError as err:
                where = f"{path}:" if path is not None else "line "
                raise JobError(f"{where}{row.line}: {err}") from None
    return out


def plan_batches(
    rows: Sequence[JobRow],
    prompt_ids: Sequence[Sequence[int]],
    batch_size: int,
    limit: int | None = None,
) -> list[list[int]]:
    """Group row indices into batches of similar prompt length.

    Rows are sorted by prompt length (then line) so that a batch pads little. A batch holds
    at most ``batch_size`` samples (a row counts its ``n``; one row of more is a batch). A batch's
    cache is sized by its longest prompt plus its largest ``max_tokens``, so with a position
    ``limit`` a batch is also closed before that sum would exceed it.

    Returns
    -------
    list of list of int
        Indices into ``rows``.
    """
    order = sorted(range(len(rows)), key=lambda i: (len(prompt_ids[i]), rows[i].line))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = cap = size = 0
    for i in order:
        n, m, k = len(prompt_ids[i]), rows[i].max_tokens, rows[i].params.n
        fits = limit is None or positions_needed(max(longest, n), max(cap, m)) <= limit
        if current and (size + k > batch_size or not fits):
            batches.append(current)
            current, longest, cap, size = [], 0, 0, 0
        current.append(i)
        longest, cap, size = max(longest, n), max(cap, m), size + k
    if current:
        batches.append(current)
    return batches
