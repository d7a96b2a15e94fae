"""A mixed-length batch job, static batches against continuous batching, in one run.

    python benchmarks/bench_jobs.py [--prompts 128] [--batch-size 32] [--device cpu]
                                    [--threads N] [--max-tokens 16 64 256]

The embedded model (``lmgen_fast.api.default_model.load_default``) and the job of ``lmgen-fast
run``: ``--prompts`` prompts, each with ``max_tokens`` drawn from ``--max-tokens`` and its own
seed, the CLI's default sampling (rows stop at EOT or at their cap). Both modes go through
:func:`lmgen_fast.jobs.run_rows` with ``--batch-size`` rows at once: static batches of
similar prompt length, each run until its longest row is done, against slots that take the
next prompt as soon as a row finishes. Reported per mode: decode steps, slot-steps (rows
times steps), slot utilization (kept tokens over slot-steps), tokens per second (wall time
of the whole job, prefills included), and whether every row's tokens agree between modes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from lmgen_fast.api.default_model import load_default  # noqa: E402
from lmgen_fast.api.tokenization import adapt_tokenizer  # noqa: E402
from lmgen_fast.cli.run import JobRow, encode_prompts, run_rows  # noqa: E402
from lmgen_fast.core.params import SamplingParams  # noqa: E402
from lmgen_fast.jobs.jsonl import ResultWriter  # noqa: E402
from lmgen_fast.models.decoder import wrap  # noqa: E402

from _common import run_info, write_json  # noqa: E402

SUBJECTS = ["A list", "The function", "A dictionary", "The module", "An exception",
            "The class", "A generator", "The method", "A tuple", "The iterator", "A string",
            "The decorator", "A set", "The context manager", "A file object", "The thread"]
VERBS = ["returns", "holds", "raises", "is", "can be used to", "keeps", "creates", "calls"]


def job(n: int, seed: int, choices: list[int]) -> list[JobRow]:
    gen = torch.Generator().manual_seed(seed)
    caps = torch.tensor(choices)[torch.randint(0, len(choices), (n,), generator=gen)].tolist()
    rows = []
    for i in range(n):
        prompt = f"{SUBJECTS[i % len(SUBJECTS)]} {VERBS[(i * 5) % len(VERBS)]}"
        rows.append(JobRow(i, i + 1, prompt, SamplingParams(seed=seed * 1000 + i), caps[i]))
    return rows


def run_mode(decoder, adapter, rows, prompt_ids, batch_size: int, static: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "out.jsonl"
        t0 = time.perf_counter()
        with ResultWriter(path) as writer:
            stats = run_rows(decoder, adapter, rows, prompt_ids, writer,
                             batch_size=batch_size, static=static)
        seconds = time.perf_counter() - t0
        records = [json.loads(line) for line in path.read_bytes().split(b"\n") if line]
        ids = {rec["id"]: rec["token_ids"] for rec in records}
    return {"mode": "static" if static else "continuous", "rows": stats.rows,
            "tokens": stats.tokens, "steps": stats.steps, "slot_steps": stats.slot_steps,
            "slot_utilization": round(stats.slot_utilization, 1),
            "seconds": round(seconds, 2), "tokens_per_s": round(stats.tokens / seconds, 1),
            "_ids": ids}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, nargs="+", default=[16, 64, 256],
                    help="the caps each prompt's max_tokens is drawn from")
    ap.add_argument("--out", default="bench_jobs")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); on a shared, loaded CPU one "
                         "thread avoids threads spinning on each other")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_default(args.device)
    adapter = adapt_tokenizer(tokenizer)
    rows = job(args.prompts, args.seed, args.max_tokens)
    prompt_ids = encode_prompts(adapter, rows)
    decoder = wrap(model)
    # A short warm-up of each path (allocation, first-call costs) outside the timings.
    for static in (True, False):
        run_mode(decoder, adapter, rows[:4], prompt_ids[:4], 2, static)
    runs = [run_mode(decoder, adapter, rows, prompt_ids, args.batch_size, static)
            for static in (True, False)]
    same = runs[0]["_ids"] == runs[1]["_ids"]
    for r in runs:
        del r["_ids"]
    info = run_info(args.device)
    print(f"# {info['command']}")
    caps = ", ".join(map(str, args.max_tokens))
    print(f"# {info['device']}, torch {info['torch']}; {args.prompts} prompts, max_tokens "
          f"from {{{caps}}}, batch size {args.batch_size}, embedded model")
    print("| batching | steps | slot-steps | tokens | slot utilization | seconds | tokens/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r['mode']} | {r['steps']} | {r['slot_steps']} | {r['tokens']} | "
              f"{r['slot_utilization']}% | {r['seconds']} | {r['tokens_per_s']} |")
    ratio = runs[1]["tokens_per_s"] / runs[0]["tokens_per_s"]
    print(f"continuous / static tokens/s: {ratio:.2f}x; every row's tokens identical: {same}")
    write_json(args.out, {"kind": "bench_jobs", **info, "prompts": args.prompts,
                          "max_tokens": args.max_tokens,
                          "batch_size": args.batch_size, "runs": runs,
                          "speedup": round(ratio, 2), "identical": same})


if __name__ == "__main__":
    main()
