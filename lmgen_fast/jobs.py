"""``lmgen-fast run``: batch generation jobs, JSONL in, JSONL out, resumable.

The whole input is read and validated before anything is generated. Rows are then batched by
prompt length and each result is appended as one complete JSON line (see
:mod:`lmgen_fast.jsonl`), so a rerun of the same command skips what is done and a crash costs
at most the batch in flight. Under ``torchrun`` every rank takes the rows whose id hashes to
it, writes its own part file, and rank 0 merges the parts into the output at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import operator
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from pathlib import Path

from . import cli
from .jsonl import (
    ResultWriter,
    encode_record,
    id_key,
    merge_parts,
    part_files,
    part_path,
    scan_results,
    write_atomic,
)
from .params import SamplingParams

PARAM_FIELDS = tuple(f.name for f in fields(SamplingParams))
KNOWN_FIELDS = ("id", "prompt", "max_tokens", *PARAM_FIELDS)
SEED_MASK = 2**63 - 1
DEFAULT_BATCH_SIZE = 16
# Ranks that finish their shard wait at the final barrier for the slowest one, possibly for
# hours; the default timeouts (10 to 30 minutes) would fail a run that is merely uneven.
BARRIER_TIMEOUT = timedelta(days=7)


class JobError(ValueError):
    """A job that cannot run (bad input, bad output file, failed generation)."""


class LineError(ValueError):
    """Why one input line is invalid; ``row_id`` is its id when it had a usable one."""

    def __init__(self, reason: str, row_id: str | int | None = None):
        super().__init__(reason)
        self.row_id = row_id


# --------------------------------------------------------------------------- input


@dataclass(frozen=True)
class JobRow:
    """One valid input line: its id, 1-based line number, prompt and sampling settings."""

    id: str | int
    line: int
    prompt: str
    params: SamplingParams
    max_tokens: int

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


def parse_line(
    obj: object, defaults: SamplingParams, max_tokens: int, run_seed: int | None
) -> tuple[str | int, str, SamplingParams, int]:
    """Check one decoded input object; return its id, prompt, parameters and max_tokens.

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
    if "prompt" not in obj:
        raise LineError("missing prompt", row_id)
    prompt = obj["prompt"]
    if not isinstance(prompt, str):
        raise LineError(f"prompt must be a string, got {_json_type(prompt)}", row_id)
    overrides = {k: obj[k] for k in PARAM_FIELDS if k in obj}
    if "seed" not in overrides and run_seed is not None:
        overrides["seed"] = derive_seed(run_seed, row_id)
    try:
        params = replace(defaults, **overrides)
        cap = _check_max_tokens(obj["max_tokens"]) if "max_tokens" in obj else max_tokens
    except ValueError as err:
        raise LineError(str(err), row_id) from None
    return row_id, prompt, params, cap


def read_jobs(
    path: str | Path,
    defaults: SamplingParams,
    max_tokens: int,
    run_seed: int | None = None,
) -> tuple[list[JobRow], list[InvalidLine]]:
    """Read and validate every line of a JSONL input file.

    Blank lines are ignored. A line is invalid when it is not UTF-8 or not JSON, is not an
    object, lacks an ``id`` (string or integer) or a string ``prompt``, repeats an earlier id,
    has a field other than ``id``, ``prompt``, ``max_tokens`` and the fields of
    :class:`SamplingParams`, or has a value that those reject.

    Parameters
    ----------
    path : str or Path
        The input file.
    defaults, max_tokens, run_seed
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
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                invalid.append(InvalidLine(number, None, f"not valid UTF-8 ({err.reason})"))
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                invalid.append(
                    InvalidLine(number, None, f"malformed JSON: {err.msg} at column {err.colno}")
                )
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
                row_id, prompt, params, cap = parse_line(obj, defaults, max_tokens, run_seed)
            except LineError as err:
                invalid.append(InvalidLine(number, err.row_id, str(err)))
                continue
            rows.append(JobRow(row_id, number, prompt, params, cap))
    return rows, invalid


def encode_prompts(adapter, rows: Sequence[JobRow]) -> list[list[int]]:
    """Each row's prompt ids (``[BOT]`` + ids of ``" " + prompt``), batched when possible."""
    from .tokenization import TokenizerAdapter

    tokenizer = adapter.tokenizer
    if type(adapter) is TokenizerAdapter and hasattr(tokenizer, "encode_batch"):
        # Same ids as adapter.encode_prompt (tokenizers' encode and encode_batch share their
        # defaults), computed in parallel: it matters for inputs of millions of rows.
        encoded = tokenizer.encode_batch([" " + r.prompt for r in rows])
        return [[adapter.bos_id, *e.ids] for e in encoded]
    return [adapter.encode_prompt(r.prompt) for r in rows]


def positions_needed(prompt_len: int, max_tokens: int) -> int:
    """Positions a row occupies in the KV cache (the last sampled token is never fed back)."""
    return prompt_len + max(max_tokens - 1, 0)


def plan_batches(
    rows: Sequence[JobRow],
    prompt_ids: Sequence[Sequence[int]],
    batch_size: int,
    limit: int | None = None,
) -> list[list[int]]:
    """Group row indices into batches of similar prompt length.

    Rows are sorted by prompt length (then line) so that a batch pads little. A batch's
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
    longest = cap = 0
    for i in order:
        n, m = len(prompt_ids[i]), rows[i].max_tokens
        fits = limit is None or positions_needed(max(longest, n), max(cap, m)) <= limit
        if current and (len(current) >= batch_size or not fits):
            batches.append(current)
            current, longest, cap = [], 0, 0
        current.append(i)
        longest, cap = max(longest, n), max(cap, m)
    if current:
        batches.append(current)
    return batches


# --------------------------------------------------------------------------- progress


class Progress:
    """Rows done and tokens per second on stderr: tqdm when installed, else a plain line."""

    def __init__(self, total: int, initial: int, enabled: bool, label: str = ""):
        self.total, self.done, self.tokens = total, initial, 0
        self.enabled = enabled and total > initial
        self.start = time.perf_counter()
        self._last = 0.0
        self._tty = sys.stderr.isatty()
        self._bar = None
        self._label = label
        if not self.enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(
            total=total, initial=initial, unit="row", desc=label or None, file=sys.stderr,
            dynamic_ncols=True, mininterval=0.5 if self._tty else 30.0,
        )

    def rate(self) -> float:
        """Tokens per second since the start."""
        elapsed = time.perf_counter() - self.start
        return self.tokens / elapsed if elapsed > 0 else 0.0

    def on_token(self, _row: int, _token: int) -> None:
        """Count one generated token (the ``callback`` of ``generate_ids``)."""
        self.tokens += 1
        self._maybe_show()

    def add_rows(self, n: int) -> None:
        """Count ``n`` finished rows."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        self._maybe_show()

    def _maybe_show(self) -> None:
        # Throttled, as it runs for every token; a log file (no TTY) gets a line every 30 s.
        now = time.perf_counter()
        if self.enabled and now - self._last >= (0.5 if self._tty else 30.0):
            self._last = now
            self._show()

    def _show(self) -> None:
        if self._bar is not None:
            # In a log file (no TTY) tqdm's own pace, every 30 s at most, is enough.
            self._bar.set_postfix_str(f"{self.rate():.1f} tok/s", refresh=self._tty)
            return
        line = (f"{self._label}{' ' if self._label else ''}rows {self.done}/{self.total} "
                f"({100 * self.done / max(self.total, 1):.0f}%), {self.tokens} tokens, "
                f"{self.rate():.1f} tok/s")
        sys.stderr.write(("\r" + line) if self._tty else (line + "\n"))
        sys.stderr.flush()

    def close(self) -> None:
        """Finish the bar (the summary line follows it)."""
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self._tty:
            self._show()
            sys.stderr.write("\n")
            sys.stderr.flush()


# --------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in a torchrun job (rank 0 of 1 outside one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def dist_env(environ: dict | None = None) -> DistEnv:
    """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` as torchrun sets them."""
    environ = os.environ if environ is None else environ
    try:
        world = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local = int(environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise JobError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise JobError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return DistEnv(rank, world, local)


def barrier(env: DistEnv) -> None:
    """Wait for every rank to finish its shard.

    Gloo is used on every device: the barrier moves no tensors, and unlike NCCL it needs no
    GPU memory or device binding, and has no watchdog that kills a rank waiting for hours
    on a slower one.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------- running


@dataclass
class RunStats:
    """What one process did: rows and tokens generated, rows found done, time spent."""

    rows: int = 0
    tokens: int = 0
    already_done: int = 0
    seconds: float = 0.0


def _done_keys(output: Path, target: Path, env: DistEnv) -> set[str]:
    """Ids this process must not generate: in its own file (repaired), the output, and
    part files of earlier runs with another number of ranks."""
    done = set(scan_results(target, repair=True).keys)
    if target != output:
        done |= scan_results(output, repair=False).keys
        for path, _rank, world in part_files(output):
            # Current-world parts of other ranks are being written now and hold only their
            # own shards; reading them would race for nothing.
            if world != env.world:
                done |= scan_results(path, repair=False).keys
    return done


def run_rows(
    decoder,
    adapter,
    rows: Sequence[JobRow],
    prompt_ids: Sequence[Sequence[int]],
    writer: ResultWriter,
    *,
    batch_size: int,
    backend: str = "auto",
    limit: int | None = None,
    progress: Progress | None = None,
    generate: Callable | None = None,
    cuda_graph: bool = True,
    sync_every: int | None = None,
) -> RunStats:
    """Generate ``rows`` in batches and append one result line per row to ``writer``.

    Parameters
    ----------
    decoder
        From :func:`lmgen_fast.wrap`; reused for every batch.
    adapter
        The tokenizer adapter (:func:`lmgen_fast.tokenization.adapt_tokenizer`).
    rows, prompt_ids
        The rows to generate and their prompt ids.
    writer : ResultWriter
        Where results go; it is synced after every batch.
    batch_size : int
        Rows per batch at most.
    backend : str
        The sampling backend.
    limit : int, optional
        The model's position limit (see :func:`plan_batches`).
    progress : Progress, optional
        Told of every token and every finished row.
    generate : callable, optional
        Replaces :func:`lmgen_fast.generate.generate_ids` (for tests).
    cuda_graph, sync_every
        Passed to :func:`lmgen_fast.generate.generate_ids`.

    Returns
    -------
    RunStats
    """
    from .generate import GenerationError, generate_ids

    generate = generate or generate_ids
    stats = RunStats()
    start = time.perf_counter()
    callback = progress.on_token if progress is not None else None
    for batch in plan_batches(rows, prompt_ids, batch_size, limit):
        # Log-probabilities cost work on every step: only batches with a row that asks.
        want = [rows[i].params.logprobs > 0 for i in batch]
        extra = {"return_logprobs": True} if any(want) else {}
        try:
            results = generate(
                decoder, [prompt_ids[i] for i in batch], [rows[i].params for i in batch],
                [rows[i].max_tokens for i in batch], adapter.eos_id, backend=backend,
                callback=callback, cuda_graph=cuda_graph, sync_every=sync_every, **extra,
            )
        except GenerationError as err:
            ids = ", ".join(rows[i].key for i in batch[:5])
            more = f" and {len(batch) - 5} more" if len(batch) > 5 else ""
            raise JobError(f"generation failed for ids {ids}{more}: {err}") from None
        results, lps = results if extra else (results, [None] * len(batch))
        for i, (token_ids, reason), lp, asked in zip(batch, results, lps, want, strict=True):
            record = {
                "id": rows[i].id, "text": adapter.decode(token_ids), "token_ids": token_ids,
                "finish_reason": reason, "num_tokens": len(token_ids),
            }
            if asked:
                record["logprobs"] = lp.logprobs
                record["top_logprobs"] = lp.top_logprobs
            writer.write(record)
            stats.tokens += len(token_ids)
        writer.sync()
        stats.rows += len(batch)
        if progress is not None:
            progress.add_rows(len(batch))
    stats.seconds = time.perf_counter() - start
    return stats


# --------------------------------------------------------------------------- command


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Add the arguments of ``lmgen-fast run`` to ``p``."""
    p.add_argument("--input", required=True, metavar="FILE",
                   help="JSONL prompts: one object per line with a unique 'id' (string or "
                        "integer) and a 'prompt', and optionally max_tokens, temperature, "
                        "top_k, repetition_penalty, repetition_penalty_range, seed, "
                        "penalty_scope, penalty_mode, top_p, min_p, frequency_penalty, "
                        "presence_penalty to override the options for that row, and logprobs "
                        "(0 to 20) to get that row's token log-probabilities")
    p.add_argument("--output", required=True, metavar="FILE",
                   help="JSONL results, one line per id: id, text, token_ids, finish_reason "
                        "(eot or length), num_tokens, and for rows with logprobs > 0 logprobs "
                        "and top_logprobs ([id, logprob] pairs); rerunning the command resumes "
                        "it")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N",
                   help=f"rows per batch; rows are batched by prompt length "
                        f"(default: {DEFAULT_BATCH_SIZE})")
    cli.add_sampling_arguments(
        p,
        seed_help="make the run reproducible: a row without its own 'seed' gets one "
                  "derived from S and its id, so its text depends on neither the batch "
                  "size nor the number of ranks, and a resumed run matches an "
                  "uninterrupted one (default: unseeded)",
        device_help="auto, cpu, cuda, cuda:N or mps; under torchrun, auto and cuda mean "
                    "cuda:LOCAL_RANK (default: auto)",
    )
    p.add_argument("--skip-invalid", action="store_true",
                   help="write invalid input lines to the errors file and generate the rest, "
                        "instead of stopping before generating anything")
    p.add_argument("--errors", default=None, metavar="FILE",
                   help="with --skip-invalid: where the {id, line, error} records of invalid "
                        "lines go, replaced on each run (default: OUTPUT.errors.jsonl)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_options(args: argparse.Namespace) -> SamplingParams:
    defaults = cli.sampling_params_from_args(args)
    if args.batch_size < 1:
        raise cli.CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.errors is not None and not args.skip_invalid:
        raise cli.CLIError("--errors needs --skip-invalid")
    paths = {"--input": args.input, "--output": args.output}
    if args.skip_invalid:
        paths["--errors"] = args.errors or args.output + ".errors.jsonl"
    resolved = {}
    for option, path in paths.items():
        real = os.path.realpath(path)
        if real in resolved:
            raise cli.CLIError(f"{option} and {resolved[real]} are the same file: {path}")
        resolved[real] = option
    if not Path(args.input).is_file():
        raise cli.CLIError(f"input file not found: {args.input}")
    # The run seed only derives row seeds; the rows' params carry no seed of their own.
    return replace(defaults, seed=None)


def _first_error(path: str, invalid: Sequence[InvalidLine]) -> str:
    first = invalid[0]
    message = f"{path}:{first.line}: {first.error}"
    if len(invalid) > 1:
        message += (f" (and {len(invalid) - 1} more invalid line{'s' * (len(invalid) > 2)}; "
                    "--skip-invalid writes them to an errors file and goes on)")
    else:
        message += " (--skip-invalid writes it to an errors file and goes on)"
    return message


def _device(name: str, env: DistEnv):
    import torch

    device = cli.resolve_device(name)
    if env.distributed and device.type == "cuda" and device.index is None:
        # One GPU per local rank, as torchrun intends.
        device = cli.resolve_device(f"cuda:{env.local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def cmd_run(args: argparse.Namespace) -> int:
    """Run ``lmgen-fast run``: generate every row of the input into the output."""
    from .decoder import CachedLlamaDecoder, wrap
    from .tokenization import adapt_tokenizer

    wall = time.perf_counter()
    env = dist_env()
    prefix = f"[rank {env.rank}/{env.world}] " if env.distributed else ""
    defaults = _check_options(args)
    errors_path = (args.errors or args.output + ".errors.jsonl") if args.skip_invalid else None

    rows, invalid = read_jobs(args.input, defaults, args.max_tokens, args.seed)
    if invalid and not args.skip_invalid:
        raise JobError(_first_error(args.input, invalid))

    device = _device(args.device, env)
    model, tokenizer = cli.load_model_and_tokenizer(args.model, args.tokenizer, device)
    adapter = adapt_tokenizer(tokenizer)
    decoder = wrap(model, device)
    limit = (decoder.model.config.max_position_embeddings
             if isinstance(decoder, CachedLlamaDecoder) else None)
    prompt_ids = encode_prompts(adapter, rows)
    if limit is not None:
        keep = []
        for i, row in enumerate(rows):
            need = positions_needed(len(prompt_ids[i]), row.max_tokens)
            if need > limit:
                invalid.append(InvalidLine(
                    row.line, row.id,
                    f"prompt of {len(prompt_ids[i])} tokens plus max_tokens={row.max_tokens} "
                    f"needs {need} positions, beyond the model's max_position_embeddings="
                    f"{limit}",
                ))
            else:
                keep.append(i)
        if len(keep) < len(rows):
            invalid.sort(key=lambda bad: bad.line)
            if not args.skip_invalid:
                raise JobError(_first_error(args.input, invalid))
            rows = [rows[i] for i in keep]
            prompt_ids = [prompt_ids[i] for i in keep]
    if errors_path is not None and env.rank == 0:
        write_atomic(errors_path, [encode_record(bad.record()) for bad in invalid])

    output = Path(args.output)
    if not env.distributed:
        # Parts left by an earlier torchrun run are folded in first, so that a job can move
        # between one process and several without losing or repeating rows.
        merge_parts(output)
    target = part_path(output, env.rank, env.world) if env.distributed else output
    mine = [i for i, row in enumerate(rows) if shard_of(row.key, env.world) == env.rank]
    interrupted = False
    with ResultWriter(target) as writer:
        done = _done_keys(output, target, env)
        todo = [i for i in mine if rows[i].key not in done]
        progress = Progress(len(mine), len(mine) - len(todo),
                            enabled=not args.no_progress and env.rank == 0, label=prefix.strip())
        try:
            stats = run_rows(
                decoder, adapter, [rows[i] for i in todo], [prompt_ids[i] for i in todo],
                writer, batch_size=args.batch_size, backend=args.backend, limit=limit,
                cuda_graph=not args.no_cuda_graph, sync_every=args.sync_every,
                progress=progress,
            )
        except KeyboardInterrupt:
            interrupted = True
        finally:
            progress.close()
    if interrupted:
        print(f"{cli.PROG}: interrupted; {prefix}finished rows are in {target}: run the same "
              "command again to resume", file=sys.stderr)
        return 130
    stats.already_done = len(mine) - len(todo)

    rate = stats.tokens / stats.seconds if stats.seconds > 0 else 0.0
    skipped = (f", {len(invalid)} invalid line{'s' * (len(invalid) != 1)} skipped "
               f"(see {errors_path})") if invalid else ""
    print(f"{prefix}{stats.rows} rows, {stats.tokens} tokens in {stats.seconds:.2f} s "
          f"({rate:.1f} tokens/s) on {device}; {stats.already_done} already done{skipped}; "
          f"{time.perf_counter() - wall:.1f} s in all; results in {target}", file=sys.stderr)
    if env.distributed:
        barrier(env)
        if env.rank == 0:
            parts, added = merge_parts(output)
            total = len(scan_results(output, repair=False).keys)
            print(f"merged {parts} part files ({added} rows) into {output}: {total} rows",
                  file=sys.stderr)
    return 0

