"""The ``lmgen-fast`` command: ``generate`` text and ``bench`` the decode loop.

Each subcommand is a :class:`Command` (a function that adds its arguments and a function
that runs it) in :data:`COMMANDS`; :func:`register` adds one. Every error prints one line,
``lmgen-fast: error: ...``, to stderr and exits non-zero (set ``LMGEN_FAST_DEBUG=1`` for the
traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

PROG = "lmgen-fast"


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


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


# --------------------------------------------------------------------------- shared helpers


def resolve_device(name: str):
    """The torch device that ``name`` means: auto, cpu, cuda, cuda:N or mps.

    ``"auto"`` is CUDA when available, else the CPU.

    Raises
    ------
    CLIError
        An unknown name or a device this machine does not have.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"device {name!r} requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(
                f"device {name!r} requested but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise CLIError(f"device {name!r} requested but MPS is not available on this machine")
    elif device.type != "cpu":
        raise CLIError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def device_name(device) -> str:
    """A human name for ``device``: the GPU's name, or the CPU model."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine() or "CPU"
    return str(device)


def _load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    if not path.is_file():
        raise CLIError(f"tokenizer file not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for a bad file
        raise CLIError(f"cannot read tokenizer {path}: {err}") from None


def load_model_and_tokenizer(model_dir: str | None, tokenizer_file: str | None, device):
    """The embedded model, or the checkpoint in ``model_dir``, and its tokenizer, on ``device``."""
    from .default_model import load_default, load_model

    if model_dir is None:
        model, tokenizer = load_default(device)
    else:
        loaded = load_model(model_dir, device=device)
        model, tokenizer = loaded if isinstance(loaded, tuple) else (loaded, None)
        if tokenizer_file is None and tokenizer is None:
            candidate = Path(model_dir) / "tokenizer.json"
            if not candidate.is_file():
                raise CLIError(f"no tokenizer.json in {model_dir}; pass --tokenizer FILE")
            tokenizer = _load_tokenizer(candidate)
    if tokenizer_file is not None:
        tokenizer = _load_tokenizer(Path(tokenizer_file))
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and hasattr(tokenizer, "get_vocab_size"):
        if tokenizer.get_vocab_size() > vocab:
            raise CLIError(
                f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model's "
                f"vocabulary has {vocab}"
            )
    return model, tokenizer


class StreamPrinter:
    """Prints the text of a growing list of token ids as it grows.

    Byte-level tokens can split a character; a suffix that decodes to the replacement
    character is held back until the next token completes it.
    """

    def __init__(self, tokenizer, out=None):
        self.tokenizer = tokenizer
        self.out = out if out is not None else sys.stdout
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, token_id: int) -> None:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd") and text.startswith(self.printed):
            self.out.write(text[len(self.printed) :])
            self.out.flush()
            self.printed = text

    def finish(self, final: str) -> None:
        """Print what is left of ``final`` (the text the call returned) and a newline."""
        if final.startswith(self.printed):
            self.out.write(final[len(self.printed) :])
        else:  # a decode that rewrote earlier text: rare; print the whole result once more
            self.out.write("\n" + final)
        self.out.write("\n")
        self.out.flush()


# --------------------------------------------------------------------------- generate


def add_sampling_arguments(
    p: argparse.ArgumentParser, *, seed_help: str, device_help: str
) -> None:
    """The options ``generate`` and ``run`` share: length, sampling, model, device, backend."""
    from .sampling import BACKENDS

    p.add_argument("--max-tokens", type=int, default=100, metavar="N",
                   help="generate at most N new tokens; [EOT] stops earlier (default: 100)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T",
                   help="divide the logits by T; 0 means greedy, i.e. always the most likely "
                        "token (default: 1.0)")
    p.add_argument("--top-k", type=int, default=50, metavar="K",
                   help="sample only among the K most likely tokens (ties kept); 0 or less "
                        "turns it off (default: 50)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="P",
                   help="make recently generated tokens less likely: a positive logit is "
                        "divided by P, a negative one multiplied, once per occurrence; 1 is off "
                        "(default: 1.0)")
    p.add_argument("--penalty-range", type=int, default=10, metavar="R",
                   help="the penalty looks at the last R generated tokens; 0 means all of "
                        "them (default: 10)")
    p.add_argument("--penalty-scope", choices=("generated", "all"), default="generated",
                   help="'generated': only new tokens are penalised (the article); 'all': the "
                        "prompt's tokens too, as in transformers (default: generated)")
    p.add_argument("--penalty-mode", choices=("per_occurrence", "once"),
                   default="per_occurrence",
                   help="penalise a token once per occurrence (the article) or once "
                        "(transformers, vLLM) (default: per_occurrence)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling: keep a token only if the tokens more probable than "
                        "it hold less than P of the probability (ties kept together); 1 is off "
                        "(default: 1.0)")
    p.add_argument("--min-p", type=float, default=0.0, metavar="P",
                   help="keep a token only if its probability is at least P times the "
                        "largest; 0 is off (default: 0.0)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, metavar="F",
                   help="OpenAI-style: lower a token's logit by F for each time it occurs in "
                        "the penalty window; 0 is off (default: 0.0)")
    p.add_argument("--presence-penalty", type=float, default=0.0, metavar="F",
                   help="OpenAI-style: lower a token's logit by F if it occurs in the "
                        "penalty window at all; 0 is off (default: 0.0)")
    p.add_argument("--seed", type=int, default=None, metavar="S", help=seed_help)
    p.add_argument("--model", default=None, metavar="DIR",
                   help="checkpoint directory with config.json and model.safetensors or a "
                        "PyTorch state dict (.pt/.pth/.bin), article-style or transformers; "
                        "its tokenizer.json is used unless --tokenizer is given (default: the "
                        "embedded model trained on Python's documentation)")
    p.add_argument("--tokenizer", default=None, metavar="FILE",
                   help="a tokenizers JSON file with [BOT] and [EOT] (default: the model's)")
    p.add_argument("--device", default="auto", help=device_help)
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="sampling backend; auto picks the fastest exact one for the device "
                        "(default: auto)")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="on CUDA, run each decode step eagerly instead of replaying it as a "
                        "CUDA graph (same tokens, slower)")
    p.add_argument("--sync-every", type=int, default=None, metavar="N",
                   help="steps between the host's looks at the GPU (stop when every row is "
                        "done, stream tokens) (default: 16 on CUDA, 1 on the CPU)")


def _add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the text to continue (encoded as [BOT] + ' ' + PROMPT)")
    add_sampling_arguments(
        p,
        seed_help="seed for reproducible output: the same seed, settings, device and "
                  "backend give the same text (default: random)",
        device_help="auto, cpu, cuda, cuda:N or mps; auto picks CUDA when available "
                    "(default: auto)",
    )
    p.add_argument("--stream", action="store_true",
                   help="print tokens to stdout as they are generated")
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="also print, as one JSON line on stderr, each generated token's "
                        "log-probability under the model and, for N > 0, its N most likely "
                        "alternatives (N from 0 to 20; default: print none)")


_OPTION_NAMES = (
    ("repetition_penalty_range", "--penalty-range"),
    ("repetition_penalty", "--repetition-penalty"),
    ("temperature", "--temperature"),
    ("top_k", "--top-k"),
    ("top_p", "--top-p"),
    ("min_p", "--min-p"),
    ("frequency_penalty", "--frequency-penalty"),
    ("presence_penalty", "--presence-penalty"),
    ("logprobs", "--logprobs"),
    ("seed", "--seed"),
)


def sampling_params_from_args(args: argparse.Namespace):
    """The SamplingParams the options of :func:`add_sampling_arguments` describe.

    Raises CLIError naming the option (not the library's keyword) on a bad value, before any
    time is spent loading a model.
    """
    from .params import SamplingParams

    try:
        params = SamplingParams(
            temperature=args.temperature, top_k=args.top_k,
            repetition_penalty=args.repetition_penalty,
            repetition_penalty_range=args.penalty_range, seed=args.seed,
            penalty_scope=args.penalty_scope, penalty_mode=args.penalty_mode,
            top_p=args.top_p, min_p=args.min_p, frequency_penalty=args.frequency_penalty,
            presence_penalty=args.presence_penalty,
            logprobs=getattr(args, "logprobs", None) or 0,  # an option of `generate` only
        )
    except ValueError as err:
        message = str(err)
        for keyword, option in _OPTION_NAMES:
            message = re.sub(rf"\b{keyword}\b", option, message)
        raise CLIError(message) from None
    if args.max_tokens < 0:
        raise CLIError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    if args.sync_every is not None and args.sync_every < 1:
        raise CLIError(f"--sync-every must be >= 1, got {args.sync_every}")
    return params


def cmd_generate(args: argparse.Namespace) -> int:
    """Run ``lmgen-fast generate``: print the continuation of the prompt."""
    from .generate import generate, generate_batch

    sampling_params_from_args(args)
    device = resolve_device(args.device)
    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, device)
    count = 0
    printer = StreamPrinter(tokenizer) if args.stream else None

    def on_token(token_id: int) -> None:
        nonlocal count
        count += 1
        if printer is not None:
            printer(token_id)

    settings = dict(
        max_tokens=args.max_tokens, temperature=args.temperature,
        repetition_penalty=args.repetition_penalty, repetition_penalty_range=args.penalty_range,
        top_k=args.top_k, device=device, seed=args.seed, backend=args.backend,
        penalty_scope=args.penalty_scope, penalty_mode=args.penalty_mode, top_p=args.top_p,
        min_p=args.min_p, frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty, cuda_graph=not args.no_cuda_graph,
        sync_every=args.sync_every,
    )
    start = time.perf_counter()
    details = None
    if args.logprobs is not None:
        [details] = generate_batch(
            model, tokenizer, [args.prompt], **settings, logprobs=args.logprobs,
            callback=lambda _row, t: on_token(t), return_details=True,
        )
        text = details.text
    else:
        text = generate(model, tokenizer, args.prompt, **settings, callback=on_token)
    elapsed = time.perf_counter() - start
    if printer is not None:
        printer.finish(text)
    else:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    if details is not None:
        print(json.dumps({"token_ids": details.token_ids, "logprobs": details.logprobs,
                          "top_logprobs": details.top_logprobs}), file=sys.stderr)
    rate = count / elapsed if elapsed > 0 else float("inf")
    print(f"{count} tokens in {elapsed:.2f} s: {rate:.1f} tokens/s on {device}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- bench


def _sync(device) -> None:
    import torch

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


def cmd_bench(args: argparse.Namespace) -> int:
    """Run ``lmgen-fast bench``: article loop vs lmgen-fast, and the sampler alone."""
    import torch

    from .baseline import article_generate_ids as article_generate
    from .default_model import load_default
    from .generate import generate
    from .params import SamplingParams
    from .reference import sample as reference_sample
    from .sampling import BACKENDS, resolve_backend
    from .sampling import sample as fast_sample

    if args.max_tokens <= 0:
        raise CLIError(f"--max-tokens must be > 0, got {args.max_tokens}")
    if args.calls <= 0:
        raise CLIError(f"--calls must be > 0, got {args.calls}")
    device = resolve_device(args.device)
    model, tokenizer = load_default(device)
    params = sum(p.numel() for p in model.parameters())
    print(f"device: {device_name(device)} ({device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads)")
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
    print(f"{'speed-up':<42}{'':>8}{(count / t_fast) / (n_article / t_article):>11.2f}x")
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
    return 0


register(Command("generate", "continue a prompt with the embedded model or a checkpoint",
                 _add_generate_arguments, cmd_generate,
                 "Generate text. Prints the continuation (prompt excluded) to stdout and the "
                 "speed to stderr."))
register(Command("bench", "time the article's loop against lmgen-fast on this device",
                 _add_bench_arguments, cmd_bench,
                 "A short benchmark on the embedded model: the article's decode loop against "
                 "lmgen-fast's, and the sampler alone."))


# --------------------------------------------------------------------------- run (lmgen_fast.jobs)


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    from .jobs import add_run_arguments

    add_run_arguments(p)


def _cmd_run(args: argparse.Namespace) -> int:
    from .jobs import cmd_run

    return cmd_run(args)


register(Command("run", "batch generation: JSONL prompts in, JSONL results out, resumable",
                 _add_run_arguments, _cmd_run,
                 "Generate a continuation for every prompt of a JSONL file into a JSONL file. "
                 "Rerunning the same command resumes an interrupted run; under `torchrun "
                 "--nproc-per-node N` the rows are shared between the ranks."))


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    """The ``lmgen-fast`` parser with one subparser per registered :class:`Command`."""
    parser = _Parser(
        prog=PROG,
        description="Fast, exact sampling for Llama-style models (the article's generate loop).",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS.values():
        p = sub.add_parser(command.name, help=command.help,
                           description=command.description or command.help)
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if isinstance(err, (CLIError, ValueError, FileNotFoundError)) or not text:
        return text or type(err).__name__
    return f"{type(err).__name__}: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lmgen-fast`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as done:  # --help and --version
            return int(done.code or 0)
        if getattr(args, "_run", None) is None:
            parser.print_help(sys.stderr)
            return 2
        return int(args._run(args))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except CLIError as err:
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        if os.environ.get("LMGEN_FAST_DEBUG"):
            raise
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # Run the importable module's main(), not this __main__ copy: modules that import
    # lmgen_fast.cli (the run command) must see the same CLIError class as main() catches.
    from lmgen_fast.cli import main as _main

    sys.exit(_main())
