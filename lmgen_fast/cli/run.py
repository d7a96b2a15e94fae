"""``lmgen-fast run``: batch generation jobs, JSONL in, JSONL out, resumable.

The whole input is read and validated before anything is generated
(:mod:`lmgen_fast.jobs.inputs`), and the output's manifest is checked
(:mod:`lmgen_fast.jobs.manifest`): a rerun resumes only with the settings, input and model that
made the output. Rows are then batched by prompt length and each result is appended as one
complete JSON line (see :mod:`lmgen_fast.jobs.jsonl`), so a rerun of the same command skips what
is done and a crash costs at most the batch in flight. A job that completes is rewritten
once, atomically, in input order. Under ``torchrun`` every rank takes the rows whose id
hashes to it, writes its own part file, and rank 0 merges the parts into the output at the
end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from lmgen_fast.api.requests import end_ids, outside_vocab, vocab_size
from lmgen_fast.api.tokenization import adapt_tokenizer
from lmgen_fast.cli.options import (
    EXIT_INTERRUPTED,
    PROG,
    CLIError,
    add_sampling_arguments,
    load_model_and_tokenizer,
    resolve_device,
    sampling_params_from_args,
    speculative_from_args,
    speculative_summary,
    threads_note,
)
from lmgen_fast.core.params import SamplingParams
from lmgen_fast.core.progress import Progress
from lmgen_fast.core.rows import positions_needed
from lmgen_fast.engine import supports_slots
from lmgen_fast.jobs.constraints import grammar_problem
from lmgen_fast.jobs.inputs import (  # noqa: F401  (re-exported: the names users import from here)
    KNOWN_FIELDS,
    PARAM_FIELDS,
    SEED_MASK,
    InvalidLine,
    JobError,
    JobFailed,
    JobRow,
    LineError,
    derive_seed,
    encode_prompts,
    parse_line,
    plan_batches,
    read_jobs,
    shard_of,
)
from lmgen_fast.jobs.jsonl import (
    ResultWriter,
    encode_record,
    merge_parts,
    part_files,
    part_path,
    reorder,
    scan_results,
    write_atomic,
)
from lmgen_fast.jobs.manifest import (
    build_manifest,
    model_identity,
    prepare_output,
    print_note,
)
from lmgen_fast.jobs.ranks import DistEnv, barrier, dist_env
from lmgen_fast.jobs.runner import RunStats, run_rows  # noqa: F401  (re-exported)
from lmgen_fast.models.decoder import CachedLlamaDecoder, wrap
from lmgen_fast.speculative.slots import SpeculativeRun

DEFAULT_BATCH_SIZE = 16

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


# --------------------------------------------------------------------------- command


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Add the arguments of ``lmgen-fast run`` to ``p``."""
    p.add_argument("--input", required=True, metavar="FILE",
                   help="JSONL prompts: one object per line with a unique 'id' (string or "
                        "integer) and one of 'prompt' (text), 'prompt_token_ids' (a list of "
                        "ids, used as given) and 'messages' (a list of {role, content} "
                        "objects, through the tokenizer's chat template), and optionally "
                        "max_tokens, temperature, top_k, repetition_penalty, "
                        "repetition_penalty_range, seed, penalty_scope, penalty_mode, top_p, "
                        "min_p, frequency_penalty, presence_penalty, logprobs_mode, n, stop, "
                        "stop_token_ids, min_tokens, include_stop_str_in_output to override "
                        "the options for that row, and logprobs (0 to 20) to get that row's "
                        "token log-probabilities; json_schema (an object), regex, grammar "
                        "(EBNF text), logit_bias ({\"ID\": BIAS}) and allowed_token_ids "
                        "([IDs]) constrain the row")
    p.add_argument("--output", required=True, metavar="FILE",
                   help="JSONL results, one line per id: id, text, token_ids, finish_reason "
                        "(eot, stop or length), stop_reason (the stop string or id, where one "
                        "fired), num_tokens, and for rows with logprobs > 0 logprobs, "
                        "top_logprobs ([id, logprob] pairs) and logprobs_mode; a row with 'n' "
                        "(or every row, with --n) has id and 'samples' instead, a list of n "
                        "such results in sample order; rerunning the command resumes it")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N",
                   help=f"rows decoded at once: N slots, where a finished row's slot takes "
                        f"the next prompt (continuous batching; default: {DEFAULT_BATCH_SIZE})")
    p.add_argument("--static-batches", action="store_true",
                   help="batches of N rows of similar prompt length instead, each run until "
                        "its longest row is done (the same tokens for seeded rows, more "
                        "steps)")
    p.add_argument("--summary", default=None, metavar="FILE",
                   help="also write the run's summary as a JSON object to FILE: rows, "
                        "tokens, seconds, tokens_per_s, steps, slot_steps, slot_utilization "
                        "(percent), batching, batch_size")
    add_sampling_arguments(
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
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh even if OUTPUT holds results made with other settings, "
                        "input or model, or has no manifest; the old output (and its "
                        "manifest) is kept as OUTPUT.bak (or .bak2, ...)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (on a terminal) or progress lines (in a log)")


def _check_options(args: argparse.Namespace) -> SamplingParams:
    defaults = sampling_params_from_args(args)
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.errors is not None and not args.skip_invalid:
        raise CLIError("--errors needs --skip-invalid")
    paths = {"--input": args.input, "--output": args.output}
    if args.summary is not None:
        paths["--summary"] = args.summary
    if args.skip_invalid:
        paths["--errors"] = args.errors or args.output + ".errors.jsonl"
    resolved = {}
    for option, path in paths.items():
        real = os.path.realpath(path)
        if real in resolved:
            raise CLIError(f"{option} and {resolved[real]} are the same file: {path}")
        resolved[real] = option
    if not Path(args.input).is_file():
        raise CLIError(f"input file not found: {args.input}")
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
    device = resolve_device(name)
    if env.distributed and device.type == "cuda" and device.index is None:
        # One GPU per local rank, as torchrun intends.
        device = resolve_device(f"cuda:{env.local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _prepare_output(args: argparse.Namespace, env: DistEnv, output: Path) -> None:
    """Check (or, with --overwrite, back up) the output against this run's manifest.

    Before the model is loaded: a run that may not resume fails in seconds, and nothing is
    written to the output until its manifest matches this run.
    """
    manifest = build_manifest(args, model_identity(args.model, args.tokenizer))
    if env.rank == 0:
        print_note(prepare_output(output, manifest, overwrite=args.overwrite))
    if env.distributed:
        # Rank 0 has backed up (--overwrite) and written the manifest; the others check it.
        barrier(env, last=False)
        if env.rank != 0:
            prepare_output(output, manifest, overwrite=False)


def _problem(row: JobRow, ids: list[int], limit: int | None, vocab: int | None) -> str | None:
    """Why a row cannot run on this model (an id outside its vocabulary, more positions
    than it has), or None."""
    if vocab is not None:
        try:
            row.params.check_vocab(vocab)
        except ValueError as err:
            return str(err)
        if row.kind == "prompt_token_ids" and outside_vocab(ids, vocab):
            return outside_vocab(ids, vocab)
    need = positions_needed(len(ids), row.max_tokens)
    if limit is not None and need > limit:
        return (f"prompt of {len(ids)} tokens plus max_tokens={row.max_tokens} needs {need} "
                f"positions, beyond the model's max_position_embeddings={limit}")
    return None


def _drop_unfit(args: argparse.Namespace, rows: list[JobRow], prompt_ids: list[list[int]],
                invalid: list[InvalidLine], limit: int | None, vocab: int | None,
                grammar: Callable[[JobRow], str | None]
                ) -> tuple[list[JobRow], list[list[int]]]:
    """The rows (and their prompt ids) this model can run (see :func:`_problem`) and whose
    grammar compiles (``grammar(row)``: why not, or None); the others go to ``invalid``
    (sorted by line), or stop the job without --skip-invalid."""
    keep = []
    for i, row in enumerate(rows):
        problem = _problem(row, prompt_ids[i], limit, vocab) or grammar(row)
        if problem is None:
            keep.append(i)
        else:
            invalid.append(InvalidLine(row.line, row.id, problem))
    if len(keep) < len(rows):
        invalid.sort(key=lambda bad: bad.line)
        if not args.skip_invalid:
            raise JobError(_first_error(args.input, invalid))
        rows = [rows[i] for i in keep]
        prompt_ids = [prompt_ids[i] for i in keep]
    return rows, prompt_ids


def _report(args: argparse.Namespace, env: DistEnv, stats: RunStats, *, prefix: str,
            device: torch.device, target: Path, invalid: Sequence[InvalidLine],
            errors_path: str | None, static: bool, spec: SpeculativeRun | None,
            wall: float) -> None:
    """Print what the run did on stderr, and write it to --summary as JSON."""
    rate = stats.tokens / stats.seconds if stats.seconds > 0 else 0.0
    skipped = (f", {len(invalid)} invalid line{'s' * (len(invalid) != 1)} skipped "
               f"(see {errors_path})") if invalid else ""
    batching = "static" if static else "continuous"
    # Speculative rounds count no decode steps: no utilization to report for them.
    slot_note = (f"{batching} batching, {stats.steps} steps, slot utilization "
                 f"{stats.slot_utilization:.1f}%; ") if stats.slot_steps else ""
    print(f"{prefix}{stats.rows} rows, {stats.tokens} tokens in {stats.seconds:.2f} s "
          f"({rate:.1f} tokens/s) on {device} ({threads_note()}); {stats.already_done} "
          f"already done{skipped}; "
          f"{slot_note}{time.perf_counter() - wall:.1f} s in all; results in {target}",
          file=sys.stderr)
    if spec is not None:
        print(prefix + speculative_summary(stats.tokens, *spec.totals), file=sys.stderr)
    if args.summary is not None:
        summary = {"rows": stats.rows, "tokens": stats.tokens, "seconds": stats.seconds,
                   "tokens_per_s": rate, "already_done": stats.already_done,
                   "steps": stats.steps, "slot_steps": stats.slot_steps,
                   "slot_utilization": stats.slot_utilization, "batching": batching,
                   "batch_size": args.batch_size, "device": str(device), "rank": env.rank,
                   "threads": torch.get_num_threads()}
        # Under torchrun each rank writes its own summary beside the others.
        path = f"{args.summary}.rank{env.rank}" if env.distributed else args.summary
        write_atomic(path, [(json.dumps(summary) + "\n").encode()])


def _merge_ranks(env: DistEnv, output: Path, rows: Sequence[JobRow]) -> None:
    """Under torchrun, once every rank is done: rank 0 merges the part files into the
    output, in input order."""
    barrier(env)
    if env.rank == 0:
        parts, added = merge_parts(output)
        reorder(output, [row.key for row in rows])
        total = len(scan_results(output, repair=False).keys)
        print(f"merged {parts} part files ({added} rows) into {output}: {total} rows",
              file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    """Run ``lmgen-fast run``: generate every row of the input into the output."""
    wall = time.perf_counter()
    env = dist_env()
    prefix = f"[rank {env.rank}/{env.world}] " if env.distributed else ""
    defaults = _check_options(args)
    errors_path = (args.errors or args.output + ".errors.jsonl") if args.skip_invalid else None

    rows, invalid = read_jobs(args.input, defaults, args.max_tokens, args.seed,
                              samples=args.n is not None)
    if invalid and not args.skip_invalid:
        raise JobError(_first_error(args.input, invalid))

    output = Path(args.output)
    _prepare_output(args, env, output)

    device = _device(args.device, env)
    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, device)
    adapter = adapt_tokenizer(tokenizer)
    decoder = wrap(model, device)
    limit = (decoder.model.config.max_position_embeddings
             if isinstance(decoder, CachedLlamaDecoder) else None)
    prompt_ids = encode_prompts(adapter, rows, args.input)
    ends = end_ids(model, adapter, None)
    rows, prompt_ids = _drop_unfit(
        args, rows, prompt_ids, invalid, limit, vocab_size(decoder, model),
        lambda row: grammar_problem(row, decoder, adapter, ends))
    if errors_path is not None and env.rank == 0:
        write_atomic(errors_path, [encode_record(bad.record()) for bad in invalid])

    if not env.distributed:
        # Parts left by an earlier torchrun run are folded in first, so that a job can move
        # between one process and several without losing or repeating rows.
        merge_parts(output)
    target = part_path(output, env.rank, env.world) if env.distributed else output
    draft = speculative_from_args(args, device, model)
    spec = None if draft is None else SpeculativeRun(draft, args.num_speculative_tokens)
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
                progress=progress, generate=spec, static=args.static_batches,
                end_ids=ends,
            )
        except KeyboardInterrupt:
            interrupted = True
        finally:
            progress.close()
        if not interrupted and not env.distributed:
            # Complete: from batch order to input order, in one atomic rewrite.
            reorder(output, [row.key for row in rows])
    if interrupted:
        print(f"{PROG}: interrupted; {prefix}finished rows are in {target}: run the same "
              "command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    stats.already_done = len(mine) - len(todo)
    _report(args, env, stats, prefix=prefix, device=device, target=target, invalid=invalid,
            errors_path=errors_path, spec=spec, wall=wall,
            static=args.static_batches or not supports_slots(decoder))
    if env.distributed:
        _merge_ranks(env, output, rows)
    return 0
