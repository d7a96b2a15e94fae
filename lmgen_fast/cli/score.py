"""``lmgen-fast score``: log-likelihoods of given text, JSONL in, JSONL out, resumable.

Each input line is an object with a unique ``id`` and either ``context`` and ``continuation``
(the continuation's log-likelihood after the context, :func:`lmgen_fast.score`) or ``text``
(every token of the text, :func:`lmgen_fast.score_rolling`); each value a string or a list of
token ids. The whole input is read, encoded and checked before the model runs. The output
resumes with ``run``'s rule (:mod:`lmgen_fast.jobs.manifest`): a rerun of the same command
with the same input, model and ``--max-length`` skips the ids already written, any other
refuses. Results are appended as complete lines as each batch finishes, and the file is put in
input order once the job completes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lmgen_fast.api.score import (
    DEFAULT_BATCH_SIZE,
    encode_pairs,
    encode_texts,
    join_scores,
    score_pairs,
)
from lmgen_fast.cli.options import (
    EXIT_INTERRUPTED,
    PROG,
    CLIError,
    load_model_and_tokenizer,
    resolve_device,
)
from lmgen_fast.core.progress import Progress
from lmgen_fast.jobs.inputs import JobError
from lmgen_fast.jobs.jsonl import ResultWriter, id_key, reorder, scan_results, write_atomic
from lmgen_fast.jobs.manifest import build_manifest, model_identity, prepare_output, print_note

# The options whose values change a score (argparse dests): compared on resume.
SCORE_OPTIONS = ("max_length",)


@dataclass(frozen=True)
class ScoreRow:
    """One input line: its id, line number, and its pairs (one for a continuation, the
    windows of a text)."""

    id: str | int
    line: int
    pairs: list[tuple[list[int], list[int]]]

    @property
    def key(self) -> str:
        return id_key(self.id)


def add_score_arguments(p: argparse.ArgumentParser) -> None:
    """Add the arguments of ``lmgen-fast score`` to ``p``."""
    p.add_argument("--input", required=True, metavar="FILE",
                   help="JSONL: one object per line with a unique 'id' (string or integer) "
                        "and 'context' and 'continuation', or 'text' for the log-likelihood "
                        "of every token of a text; strings or lists of token ids")
    p.add_argument("--output", required=True, metavar="FILE",
                   help="JSONL results, one line per id: id, token_ids (the scored tokens), "
                        "logprobs (float32 log-softmax of the raw logits), total, is_greedy, "
                        "num_tokens; rerunning the command resumes it")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="checkpoint directory, article-style or transformers (default: the "
                        "embedded model)")
    p.add_argument("--tokenizer", default=None, metavar="FILE",
                   help="a tokenizers JSON file (default: the model's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps "
                                                     "(default: auto)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N",
                   help=f"pairs per forward (default: {DEFAULT_BATCH_SIZE})")
    p.add_argument("--max-length", type=int, default=None, metavar="N",
                   help="positions per window of a 'text' line (default: the model's "
                        "max_position_embeddings)")
    p.add_argument("--summary", default=None, metavar="FILE",
                   help="also write the run's summary as a JSON object to FILE")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh even if OUTPUT holds results made otherwise; the old "
                        "output is kept as OUTPUT.bak (or .bak2, ...)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or lines")


def _check(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_length is not None and args.max_length < 1:
        raise CLIError(f"--max-length must be >= 1, got {args.max_length}")
    if not Path(args.input).is_file():
        raise CLIError(f"input file not found: {args.input}")
    paths = [args.input, args.output] + ([args.summary] if args.summary else [])
    if len({os.path.realpath(p) for p in paths}) < len(paths):
        raise CLIError("--input, --output and --summary must be different files")


def _encode(obj: object, model, tokenizer, max_length: int | None) -> tuple[object, list]:
    """An input object's id and pairs; ValueError naming what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    row_id = obj.get("id")
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        raise ValueError(f"id must be a string or an integer, got {json.dumps(row_id)}")
    fields = set(obj) - {"id"}
    if fields == {"text"}:
        return row_id, encode_texts(model, tokenizer, [obj["text"]],
                                    max_length=max_length)[0]
    if fields == {"context", "continuation"}:
        return row_id, encode_pairs(model, tokenizer, [obj["context"]], [obj["continuation"]])
    raise ValueError(f"expected fields id and context and continuation, or id and text; got "
                     f"{', '.join(sorted(obj))}")


def read_rows(path: str, model, tokenizer, max_length: int | None) -> list[ScoreRow]:
    """Every line of ``path`` encoded and checked (blank lines skipped).

    Raises
    ------
    JobError
        ``FILE:LINE: reason`` for the first bad line (not JSON, a wrong field, a repeated
        id, an id outside the vocabulary, a pair longer than the model's positions).
    """
    rows, seen = [], {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row_id, pairs = _encode(json.loads(raw.decode("utf-8")), model, tokenizer,
                                        max_length)
            except (UnicodeDecodeError, ValueError) as err:
                message = str(err).replace("pair 0: ", "").replace("text 0", "text")
                raise JobError(f"{path}:{number}: {message}") from None
            key = id_key(row_id)
            if key in seen:
                raise JobError(f"{path}:{number}: duplicate id {key} (first on line "
                               f"{seen[key]})")
            seen[key] = number
            rows.append(ScoreRow(row_id, number, pairs))
    return rows


def _record(row: ScoreRow, scores) -> dict:
    s = join_scores(scores)
    return {"id": row.id, "token_ids": s.token_ids, "logprobs": s.logprobs, "total": s.total,
            "is_greedy": s.is_greedy, "num_tokens": len(s.token_ids)}


def _chunks(rows: list[ScoreRow], size: int) -> list[list[ScoreRow]]:
    """Rows in groups of about ``size`` pairs, rows of one context next to each other (their
    context is then prefilled once)."""
    ordered = sorted(rows, key=lambda r: (r.pairs[0][0] if r.pairs else [], r.line))
    out, current, n = [], [], 0
    for row in ordered:
        current.append(row)
        n += len(row.pairs)
        if n >= size:
            out.append(current)
            current, n = [], 0
    return out + ([current] if current else [])


def _report(args, rows: int, tokens: int, seconds: float, done: int, device, wall: float) -> None:
    rate = tokens / seconds if seconds > 0 else 0.0
    print(f"{rows} rows, {tokens} tokens scored in {seconds:.2f} s ({rate:.1f} tokens/s) on "
          f"{device}; {done} already done; {time.perf_counter() - wall:.1f} s in all; results "
          f"in {args.output}", file=sys.stderr)
    if args.summary is not None:
        summary = {"rows": rows, "tokens": tokens, "seconds": seconds, "tokens_per_s": rate,
                   "already_done": done, "batch_size": args.batch_size, "device": str(device)}
        write_atomic(args.summary, [(json.dumps(summary) + "\n").encode()])


def cmd_score(args: argparse.Namespace) -> int:
    """Run ``lmgen-fast score``: score every line of the input into the output."""
    wall = time.perf_counter()
    _check(args)
    output = Path(args.output)
    manifest = build_manifest(args, model_identity(args.model, args.tokenizer),
                              options=SCORE_OPTIONS, command="score")
    print_note(prepare_output(output, manifest, overwrite=args.overwrite))
    device = resolve_device(args.device)
    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, device)
    rows = read_rows(args.input, model, tokenizer, args.max_length)
    tokens, seconds, interrupted = 0, 0.0, False
    with ResultWriter(output) as writer:
        done = scan_results(output, repair=True).keys
        todo = [r for r in rows if r.key not in done]
        progress = Progress(len(rows), len(rows) - len(todo), enabled=not args.no_progress)
        try:
            for chunk in _chunks(todo, args.batch_size):
                start = time.perf_counter()
                flat = [p for r in chunk for p in r.pairs]
                scores = iter(score_pairs(model, flat, batch_size=args.batch_size,
                                          device=device))
                seconds += time.perf_counter() - start
                for row in chunk:
                    writer.write(_record(row, [next(scores) for _ in row.pairs]))
                n = sum(len(c) for _, c in flat)
                tokens += n
                progress.advance(len(chunk), tokens=n)
            writer.sync()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            progress.close()
    if interrupted:
        print(f"{PROG}: interrupted; finished rows are in {output}: run the same command "
              "again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    reorder(output, [r.key for r in rows])
    _report(args, len(todo), tokens, seconds, len(rows) - len(todo), device, wall)
    return 0
