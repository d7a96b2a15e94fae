"""A mixed-length batch job, static batches against continuous batching, in one run; or a
rollout job, n samples per prompt in one call against n seeded calls.

    python benchmarks/bench_jobs.py [--prompts 128] [--batch-size 32] [--device cpu]
                                    [--threads N] [--max-tokens 16 64 256]
    python benchmarks/bench_jobs.py --job rollout [--prompts 64] [--n 8] [--repeats 3]
                                    [--threads N] [--max-tokens 16 32]

The embedded model (``lmgen_fast.api.default_model.load_default``) and the job of ``lmgen-fast
run``: ``--prompts`` prompts, each with ``max_tokens`` drawn from ``--max-tokens`` and its own
seed, the CLI's default sampling (rows stop at EOT or at their cap). Both modes go through
:func:`lmgen_fast.jobs.run_rows` with ``--batch-size`` rows at once: static batches of
similar prompt length, each run until its longest row is done, against slots that take the
next prompt as soon as a row finishes. Reported per mode: decode steps, slot-steps (rows
times steps), slot utilization (kept tokens over slot-steps), tokens per second (wall time
of the whole job, prefills included), and whether every row's tokens agree between modes.

The rollout job (``--job rollout``, as a GRPO trainer asks for): ``--prompts`` prompts of
mixed lengths (3 to 60 words), each with ``max_tokens`` drawn from ``--max-tokens`` and its
own seed ``s``, ``--n`` samples each. One call of ``generate_batch(..., n=N, seeds=...)``
(each prompt prefilled once, its cache rows copied to its samples) against N calls
``generate_batch(..., seeds=[s + j])``, j = 0 .. N-1 (each prompt prefilled N times): the
same rows, sample j of a prompt being call j's row (checked token for token). Reported per
mode: calls, prefill positions (positions the model ran outside decode steps), returned
tokens, and the median over ``--repeats`` runs (the modes alternate) of the wall time and
tokens per second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from lmgen_fast.api.default_model import load_default  # noqa: E402
from lmgen_fast.api.generate import generate_batch  # noqa: E402
from lmgen_fast.api.tokenization import adapt_tokenizer  # noqa: E402
from lmgen_fast.cli.run import JobRow, encode_prompts, run_rows  # noqa: E402
from lmgen_fast.core.params import SamplingParams  # noqa: E402
from lmgen_fast.jobs.jsonl import ResultWriter  # noqa: E402
from lmgen_fast.models.decoder import decoder_for, wrap  # noqa: E402

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


class PrefillCounter:
    """Counts the positions the model runs outside decode steps (prefills, refills).

    ``patch(obj, name, value)`` installs the counting wrappers: ``setattr`` here, a test's
    ``monkeypatch.setattr`` where the decoder outlives the test (tests/api/test_requests.py).
    """

    def __init__(self, decoder, patch=setattr):
        self.positions, self.stepping = 0, False
        forward, step = decoder.model.forward_cached, decoder.step

        def counted(ids, *args, **kwargs):
            if not self.stepping:
                self.positions += ids.numel()
            return forward(ids, *args, **kwargs)

        def stepped(*args, **kwargs):
            self.stepping = True
            try:
                return step(*args, **kwargs)
            finally:
                self.stepping = False

        patch(decoder.model, "forward_cached", counted)
        patch(decoder, "step", stepped)


def rollout_prompts(n: int, seed: int) -> list[str]:
    """``n`` prompts of 3 to 60 words, lengths mixed."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 61, (n,), generator=gen).tolist()
    words = [w for s in SUBJECTS for w in s.split()] + [w for v in VERBS for w in v.split()]
    return [" ".join(words[(i * 7 + k * 3) % len(words)] for k in range(length))
            for i, length in enumerate(lengths)]


def rollout(args, model, tokenizer) -> None:
    """n samples per prompt in one call against n seeded calls (see the module docstring)."""
    prompts = rollout_prompts(args.prompts, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    caps = torch.tensor(args.max_tokens)[
        torch.randint(0, len(args.max_tokens), (args.prompts,), generator=gen)].tolist()
    seeds = [args.seed * 1000 + 16 * i for i in range(args.prompts)]
    counter = PrefillCounter(decoder_for(model))
    kw = dict(max_tokens=caps, return_details=True, device=args.device)

    def one_call():
        got = generate_batch(model, tokenizer, prompts, n=args.n, seeds=seeds, **kw)
        return 1, [g.token_ids for g in got]

    def seeded_calls():
        calls = [generate_batch(model, tokenizer, prompts, seeds=[s + j for s in seeds], **kw)
                 for j in range(args.n)]
        # Prompt-major, as one call returns them: prompt i's sample j is call j's row i.
        return args.n, [calls[j][i].token_ids for i in range(args.prompts)
                        for j in range(args.n)]

    generate_batch(model, tokenizer, prompts[:4], n=2, seeds=seeds[:4], max_tokens=4)  # warm-up
    modes = {f"n={args.n} in one call": one_call,
             f"{args.n} seeded calls (n=1)": seeded_calls}
    times: dict[str, list[float]] = {name: [] for name in modes}
    facts: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name, fn in modes.items():
            counter.positions = 0
            t0 = time.perf_counter()
            calls, ids = fn()
            times[name].append(time.perf_counter() - t0)
            facts[name] = {"calls": calls, "prefill_positions": counter.positions,
                           "tokens": sum(map(len, ids)), "_ids": ids}
    names = list(modes)
    same = facts[names[0]]["_ids"] == facts[names[1]]["_ids"]
    runs = []
    for name in names:
        f = facts[name]
        seconds = statistics.median(times[name])
        runs.append({"mode": name, "calls": f["calls"],
                     "prefill_positions": f["prefill_positions"], "tokens": f["tokens"],
                     "seconds": round(seconds, 2),
                     "tokens_per_s": round(f["tokens"] / seconds, 1),
                     "all_seconds": [round(t, 2) for t in times[name]]})
    info = run_info(args.device)
    print(f"# {info['command']}")
    caps_text = ", ".join(map(str, args.max_tokens))
    print(f"# {info['device']}, torch {info['torch']}; {args.prompts} prompts of 3 to 60 "
          f"words, n={args.n}, max_tokens from {{{caps_text}}}, embedded model, medians of "
          f"{args.repeats} alternating runs")
    print("| mode | calls | prefill positions | tokens | seconds | tokens/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r['mode']} | {r['calls']} | {r['prefill_positions']} | {r['tokens']} | "
              f"{r['seconds']} | {r['tokens_per_s']} |")
    ratio = runs[0]["tokens_per_s"] / runs[1]["tokens_per_s"]
    share = runs[0]["prefill_positions"] / runs[1]["prefill_positions"]
    print(f"one call / seeded calls: {ratio:.2f}x the tokens/s, {share:.3f} of the prefill "
          f"positions; every sample's tokens identical: {same}")
    write_json(args.out, {"kind": "bench_jobs_rollout", **info, "prompts": args.prompts,
                          "n": args.n, "max_tokens": args.max_tokens, "repeats": args.repeats,
                          "runs": runs, "speedup": round(ratio, 2), "identical": same})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", choices=("mixed", "rollout"), default="mixed",
                    help="mixed: static against continuous batching; rollout: n samples "
                         "per prompt in one call against n seeded calls")
    ap.add_argument("--prompts", type=int, default=None,
                    help="prompts (default: 128 mixed, 64 rollout)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--n", type=int, default=8, help="rollout: samples per prompt")
    ap.add_argument("--repeats", type=int, default=3, help="rollout: runs of each mode")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, nargs="+", default=None,
                    help="the caps each prompt's max_tokens is drawn from (default: 16 64 "
                         "256 mixed, 16 32 rollout)")
    ap.add_argument("--out", default=None,
                    help="results/NAME.json (default: bench_jobs, bench_jobs_rollout)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); on a shared, loaded CPU one "
                         "thread avoids threads spinning on each other")
    args = ap.parse_args()
    mixed = args.job == "mixed"
    args.prompts = args.prompts or (128 if mixed else 64)
    args.max_tokens = args.max_tokens or ([16, 64, 256] if mixed else [16, 32])
    args.out = args.out or ("bench_jobs" if mixed else "bench_jobs_rollout")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_default(args.device)
    if not mixed:
        rollout(args, model, tokenizer)
        return
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
