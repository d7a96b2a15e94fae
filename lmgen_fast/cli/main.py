"""The ``lmgen-fast`` command: ``generate`` text, ``bench`` the decode loop, ``run`` a job.

Each subcommand is a :class:`Command` (a function that adds its arguments and a function
that runs it) in :data:`COMMANDS`; :func:`register` adds one. Every error prints one line,
``lmgen-fast: error: ...``, to stderr (set ``LMGEN_FAST_DEBUG=1`` for the traceback) and
exits with the status :mod:`lmgen_fast.cli.options` defines: 2 for a user error, 1 for a
runtime failure, 130 for an interrupt. The options shared with ``run`` live in
:mod:`lmgen_fast.cli.options`; their names are re-exported here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lmgen_fast.api.baseline import article_generate_ids as article_generate
from lmgen_fast.api.default_model import load_default
from lmgen_fast.api.generate import generate
from lmgen_fast.cli import run as jobs
from lmgen_fast.cli import score as scoring
from lmgen_fast.cli.bench_plot import bench_plot, check_plot_arguments
from lmgen_fast.cli.generate import (  # noqa: F401  (StreamPrinter re-exported)
    StreamPrinter,
    add_generate_arguments,
    cmd_generate,
)
from lmgen_fast.cli.options import (  # noqa: F401  (re-exported: benchmarks and users import them from here)
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_STATUS_HELP,
    EXIT_USAGE,
    PROG,
    CLIError,
    add_sampling_arguments,
    add_threads_argument,
    check_utf8,
    device_name,
    load_model_and_tokenizer,
    resolve_device,
    sampling_params_from_args,
    speculative_from_args,
    speculative_summary,
    threads_note,
    torch_threads,
)
from lmgen_fast.core.params import SamplingParams
from lmgen_fast.core.plot import PLOT_EXTRA
from lmgen_fast.core.version import __version__
from lmgen_fast.jobs.jsonl import ResultFileError
from lmgen_fast.sampling.dispatch import BACKENDS, resolve_backend
from lmgen_fast.sampling.dispatch import sample as fast_sample
from lmgen_fast.sampling.reference import sample as reference_sample


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage and exits; we want one line and the same exit path for
    # every error, so raise and let main() print it.
    def error(self, message: str):
        raise CLIError(f"{message} (see `{self.prog} --help`)")


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, one-line help, argument setup and the function that runs it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""


COMMANDS: dict[str, Command] = {}


def register(command: Command) -> Command:
    """Add ``command`` to the ``lmgen-fast`` subcommands (later registrations replace earlier)."""
    COMMANDS[command.name] = command
    return command


# --------------------------------------------------------------------------- generate



# --------------------------------------------------------------------------- bench


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_sampler(fn, device, calls: int) -> float:
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / calls


def _add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--max-tokens", type=int, default=100, metavar="N",
                   help="tokens per generation; both loops run exactly N steps (default: 100)")
    p.add_argument("--prompt", default="The list type", help="prompt for both loops")
    p.add_argument("--calls", type=int, default=50, metavar="N",
                   help="timed calls per sampler measurement (default: 50)")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                   help="also time lmgen-fast and transformers' generate at each --batches "
                        "size and draw tokens/s against batch size, under the device's "
                        "memory roofline, to FILE.png (needs the plot extra: "
                        f"{PLOT_EXTRA})")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64], metavar="B",
                   help="batch sizes of --plot (default: 1 4 16 64)")
    p.add_argument("--bandwidth", type=float, default=None, metavar="BYTES_PER_S",
                   help="memory bandwidth for --plot's roofline (default: the datasheet "
                        "figure of an H100 or H200; none, so no roofline, elsewhere)")


def _bench_command(args: argparse.Namespace) -> str:
    """The command line of a bench run, from its arguments (heads its table and figure)."""
    command = (f"{PROG} bench --device {args.device} --max-tokens {args.max_tokens} "
               f"--calls {args.calls}")
    if args.prompt != "The list type":
        command += f" --prompt {json.dumps(args.prompt)}"
    if args.plot is not None:
        command += f" --batches {' '.join(map(str, args.batches))} --plot {args.plot}"
    if args.bandwidth is not None:
        command += f" --bandwidth {args.bandwidth:g}"
    return command


def cmd_bench(args: argparse.Namespace) -> int:
    """Run ``lmgen-fast bench``: article loop vs lmgen-fast, and the sampler alone."""
    if args.max_tokens <= 0:
        raise CLIError(f"--max-tokens must be > 0, got {args.max_tokens}")
    if args.calls <= 0:
        raise CLIError(f"--calls must be > 0, got {args.calls}")
    device = resolve_device(args.device)
    model, tokenizer = load_default(device)
    params = sum(p.numel() for p in model.parameters())
    # The command line, device and model head the table, so that a figure copied from it
    # says where it comes from.
    if args.plot is not None:
        check_plot_arguments(args)  # before the timings: a missing extra costs no benchmark
    command = _bench_command(args)
    print(f"command: {command}")
    print(f"device: {device_name(device)} ({device}, torch {torch.__version__}, "
          f"{threads_note()})")
    print(f"model: embedded default, {params / 1e6:.1f}M parameters, float32; "
          f"{args.max_tokens} new tokens, top_k=50, temperature=1")
    print()
    # [PAD] is never sampled in practice, so as the stop token it makes both loops run the
    # full N steps and their rates comparable.
    stop = "[PAD]"
    kwargs = dict(max_tokens=args.max_tokens, top_k=50, device=device)
    article_generate(model, tokenizer, args.prompt, max_tokens=4, device=device)
    _sync(device)
    start = time.perf_counter()
    n_article = len(article_generate(model, tokenizer, args.prompt, eos_token=stop, **kwargs))
    _sync(device)
    t_article = time.perf_counter() - start

    count = 0

    def on_token(_token: int) -> None:
        nonlocal count
        count += 1

    generate(model, tokenizer, args.prompt, max_tokens=4, device=device, seed=0)
    _sync(device)
    start = time.perf_counter()
    generate(model, tokenizer, args.prompt, seed=0, eos_token=stop, callback=on_token, **kwargs)
    _sync(device)
    t_fast = time.perf_counter() - start

    rows = [("article loop (recompute, host sampling)", n_article, t_article),
            (f"lmgen-fast generate (backend {resolve_backend('auto', device)})", count, t_fast)]
    print(f"{'decode loop':<42}{'tokens':>8}{'tokens/s':>12}{'ms/token':>11}")
    for name, n, t in rows:
        print(f"{name:<42}{n:>8}{n / t:>12.1f}{1000 * t / max(n, 1):>11.2f}")
    speedup = (count / t_fast) / (n_article / t_article)
    print(f"{'speed-up (embedded model, this device)':<42}{'':>8}{speedup:>11.2f}x")
    print()

    print(f"{'sampler alone (top_k=50, penalty 1.1 over 10)':<42}{'shape':>14}{'ms/call':>11}")
    gen = torch.Generator(device="cpu").manual_seed(0)
    sp = SamplingParams(top_k=50, repetition_penalty=1.1, seed=0)
    backends = [b for b in BACKENDS if b not in ("auto", "reference")]
    for batch, vocab in ((1, model.config.vocab_size), (16, 50000)):
        logits = torch.randn(batch, vocab, generator=gen).to(device)
        window = torch.randint(0, vocab, (batch, 10), generator=gen).to(device)
        per_call = _time_sampler(lambda lg=logits, w=window: reference_sample(lg, sp, w),
                                 device, args.calls)
        shape = f"[{batch}, {vocab}]"
        print(f"{'reference.sample':<42}{shape:>14}{1000 * per_call:>11.3f}")
        for backend in backends:
            if device.type != "cuda":
                # The kernel backends run in Triton's interpreter off the GPU: not a timing.
                print(f"{'sample, backend ' + backend:<42}{shape:>14}  n/a on {device.type}")
                continue
            try:
                per_call = _time_sampler(
                    lambda lg=logits, w=window, b=backend: fast_sample(lg, sp, w, backend=b),
                    device, args.calls)
                cell = f"{1000 * per_call:>11.3f}"
            except Exception as err:  # a backend that does not run on this device
                cell = f"  n/a ({type(err).__name__})"
            print(f"{'sample, backend ' + backend:<42}{shape:>14}{cell}")
    if args.plot is not None:
        print()
        bench_plot(args, model, tokenizer, device, n_article / t_article, command)
    return 0


register(Command("generate", "continue a prompt with the embedded model or a checkpoint",
                 add_generate_arguments, cmd_generate,
                 "Generate text. Prints the continuation (prompt excluded) to stdout and the "
                 "speed to stderr."))
register(Command("bench", "time the article's loop against lmgen-fast on this device",
                 _add_bench_arguments, cmd_bench,
                 "A short benchmark on the embedded model: the article's decode loop against "
                 "lmgen-fast's, and the sampler alone."))


# --------------------------------------------------------------------------- run (lmgen_fast.jobs)


register(Command("run", "batch generation: JSONL prompts in, JSONL results out, resumable",
                 jobs.add_run_arguments, jobs.cmd_run,
                 "Generate a continuation for every prompt of a JSONL file into a JSONL file. "
                 "Rerunning the same command resumes an interrupted run; under `torchrun "
                 "--nproc-per-node N` the rows are shared between the ranks."))


register(Command("score", "log-likelihoods of given text: JSONL pairs in, JSONL scores out, "
                          "resumable", scoring.add_score_arguments, scoring.cmd_score,
                 "Score each line's continuation after its context (or every token of its "
                 "text) into a JSONL file. Rerunning the same command resumes it."))


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    """The ``lmgen-fast`` parser with one subparser per registered :class:`Command`."""
    parser = _Parser(
        prog=PROG,
        description="Fast, exact sampling for Llama-style models (the article's generate loop).",
        epilog=EXIT_STATUS_HELP,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS.values():
        p = sub.add_parser(command.name, help=command.help,
                           description=command.description or command.help,
                           epilog=EXIT_STATUS_HELP)
        command.add_arguments(p)
        add_threads_argument(p)
        # The subparser rides along so that an unknown option is reported with its usage.
        p.set_defaults(_run=command.run, _parser=p)
    return parser


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if isinstance(err, (CLIError, ResultFileError, ValueError, FileNotFoundError)) or not text:
        return text or type(err).__name__
    return f"{type(err).__name__}: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lmgen-fast`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    try:
        parser = build_parser()
        try:
            args, extras = parser.parse_known_args(argv)
        except SystemExit as done:  # --help and --version
            return int(done.code or 0)
        if extras:
            # argparse would report these against the top-level parser; the options belong
            # to the subcommand, whose --help lists the valid ones.
            owner = getattr(args, "_parser", None) or parser
            owner.error(f"unrecognized arguments: {' '.join(extras)}")
        if getattr(args, "_run", None) is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        with torch_threads(args.threads):
            return int(args._run(args))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CLIError, ResultFileError) as err:
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:
        if os.environ.get("LMGEN_FAST_DEBUG"):
            raise
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_FAILURE

