"""Options and helpers that every ``lmgen-fast`` subcommand shares.

The command (:mod:`lmgen_fast.cli`) and the batch jobs (:mod:`lmgen_fast.jobs`) both build on
this module and neither imports the other's internals through it, so the import graph stays a
tree: ``cli`` -> ``jobs`` -> ``cli_options``.

Exit statuses, the same for every subcommand: :data:`EXIT_OK` (0), :data:`EXIT_FAILURE` (1, a
runtime failure: generation failed, out of memory, a device or disk error),
:data:`EXIT_USAGE` (2, a user error: a bad option or value, a bad input line, a missing or
foreign file, an output made with other settings) and :data:`EXIT_INTERRUPTED` (130, Ctrl-C).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from lmgen_fast.api.default_model import load_default, load_model
from lmgen_fast.cli.structured import (
    STRUCTURED_OPTION_NAMES,
    add_structured_arguments,
    structured_params,
)
from lmgen_fast.core.errors import CLIError  # noqa: F401  (re-exported)
from lmgen_fast.core.params import LOGPROBS_MODES, SamplingParams
from lmgen_fast.core.version import PROG  # noqa: F401  (re-exported)
from lmgen_fast.sampling.dispatch import BACKENDS
from lmgen_fast.speculative.rounds import make_drafter

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

EXIT_STATUS_HELP = (
    "exit status: 0 done; 1 a runtime failure (generation failed, out of memory, a device "
    "or disk error); 2 a user error (a bad option or value, a bad input line, a missing or "
    "foreign file, an output made with other settings); 130 interrupted (Ctrl-C)"
)


def check_utf8(value: str, what: str) -> str:
    """Return ``value`` if it is valid UTF-8 text, else raise :class:`CLIError` saying so.

    Python decodes command-line bytes that are not UTF-8 into lone surrogates
    (``surrogateescape``); the tokenizer cannot take those, so they are caught here, where
    the message can name the argument and the offending byte.

    Parameters
    ----------
    value : str
        The argument as Python received it.
    what : str
        What the argument is, for the message (e.g. ``"the prompt"``).

    Returns
    -------
    str
        ``value`` unchanged.

    Raises
    ------
    CLIError
        ``value`` holds bytes that are not UTF-8; the message names the first one and its
        byte offset.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raw = os.fsencode(value) if os.name != "nt" else value.encode("utf-8", "replace")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            detail = f"byte 0x{raw[err.start]:02x} at offset {err.start}"
        else:  # a lone surrogate that did not come from the command line's bytes
            detail = "it holds a lone surrogate"
        raise CLIError(
            f"{what} is not valid UTF-8 ({detail}); pass UTF-8 text, e.g. with a UTF-8 "
            "terminal or LANG=C.UTF-8"
        ) from None
    return value


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """Add ``--threads N``, which every subcommand takes (see :func:`torch_threads`)."""
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (torch.set_num_threads); on a small or shared CPU "
                        "machine, 1 can be many times faster than the default, which starts "
                        "one thread per core and lets them wait on each other (default: "
                        "torch's)")


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the body with ``threads`` torch CPU threads (None: unchanged), then restore them.

    The count is restored so that an in-process :func:`lmgen_fast.cli.main.main` call
    leaves its caller's setting alone.

    Raises
    ------
    CLIError
        ``threads`` below 1.
    """
    if threads is None:
        yield
        return
    if threads < 1:
        raise CLIError(f"--threads must be >= 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def threads_note() -> str:
    """``"N CPU thread(s)"``: the torch thread count, for a speed line."""
    n = torch.get_num_threads()
    return f"{n} CPU thread{'s' * (n != 1)}"


def resolve_device(name: str):
    """The torch device that ``name`` means: auto, cpu, cuda, cuda:N or mps.

    ``"auto"`` is CUDA when available, else the CPU.

    Raises
    ------
    CLIError
        An unknown name or a device this machine does not have.
    """
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


def load_model_and_tokenizer(model_dir: str | None, tokenizer_file: str | None, device,
                             dtype: torch.dtype | None = None):
    """The embedded model, or the checkpoint in ``model_dir``, and its tokenizer, on ``device``
    (in ``dtype``, loaded as such; None: float32, or a transformers checkpoint's own)."""
    if model_dir is None:
        model, tokenizer = load_default(device, dtype or torch.float32)
    else:
        try:
            loaded = load_model(model_dir, device=device, dtype=dtype)
        except (FileNotFoundError, ValueError) as err:
            # A missing or unreadable checkpoint is the user's to fix: exit status 2.
            raise CLIError(" ".join(str(err).split())) from None
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


def add_sampling_arguments(
    p: argparse.ArgumentParser, *, seed_help: str, device_help: str
) -> None:
    """The options ``generate`` and ``run`` share: length, sampling, model, device, backend."""
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
    p.add_argument("--logprobs-mode", choices=LOGPROBS_MODES, default="raw",
                   help="what reported log-probabilities describe: 'raw', the model's "
                        "log-softmax; 'processed', the distribution each token was drawn "
                        "from, after temperature, penalties and filters (removed tokens are "
                        "never listed; a greedy token has log-probability 0) (default: raw)")
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
    p.add_argument("--speculative", default=None, metavar="ngram|DIR",
                   help="speculative decoding: drafts checked by one forward of the model "
                        "per round, same tokens for seeded and greedy rows; 'ngram' drafts "
                        "from the row's own prompt and output, DIR is a smaller checkpoint "
                        "with the same tokenizer (default: off)")
    p.add_argument("--num-speculative-tokens", type=int, default=4, metavar="K",
                   help="with --speculative: tokens drafted per row and round (default: 4)")
    add_ending_arguments(p)
    add_structured_arguments(p)


def add_ending_arguments(p: argparse.ArgumentParser) -> None:
    """The research-job options (SPEC section 7): samples per prompt and how rows end."""
    p.add_argument("--n", type=int, default=None, metavar="N",
                   help="samples per prompt, from one prefill; sample j of a prompt seeded S "
                        "is its result with --n 1 and seed S+j (default: 1)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end a row once its text contains TEXT, which is cut off (see "
                        "--include-stop-str); repeat for several (default: none)")
    p.add_argument("--stop-token-id", action="append", type=int, default=None, metavar="ID",
                   help="end a row when it draws token ID, like the end token (not returned); "
                        "repeat for several (default: none)")
    p.add_argument("--min-tokens", type=int, default=0, metavar="N",
                   help="no end token, stop id or stop string before a row has N tokens "
                        "(default: 0)")
    p.add_argument("--include-stop-str", action="store_true",
                   help="keep the matched stop string at the end of the text")


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
    ("stop_token_ids", "--stop-token-id"),
    ("stop", "--stop"),
    ("min_tokens", "--min-tokens"),
    ("include_stop_str_in_output", "--include-stop-str"),
    ("n", "--n"),
    *STRUCTURED_OPTION_NAMES,
)


def sampling_params_from_args(args: argparse.Namespace):
    """The SamplingParams the options of :func:`add_sampling_arguments` describe.

    Raises CLIError naming the option (not the library's keyword) on a bad value, before any
    time is spent loading a model.
    """
    try:
        params = SamplingParams(
            temperature=args.temperature, top_k=args.top_k,
            repetition_penalty=args.repetition_penalty,
            repetition_penalty_range=args.penalty_range, seed=args.seed,
            penalty_scope=args.penalty_scope, penalty_mode=args.penalty_mode,
            top_p=args.top_p, min_p=args.min_p, frequency_penalty=args.frequency_penalty,
            presence_penalty=args.presence_penalty,
            logprobs=getattr(args, "logprobs", None) or 0,  # an option of `generate` only
            logprobs_mode=args.logprobs_mode, n=1 if args.n is None else args.n,
            stop=tuple(args.stop or ()),
            stop_token_ids=tuple(args.stop_token_id or ()), min_tokens=args.min_tokens,
            include_stop_str_in_output=args.include_stop_str, **structured_params(args),
        )
    except ValueError as err:
        # One pass, so that an option's name (--stop-token-id) is not renamed again.
        names = dict(_OPTION_NAMES)
        pattern = "|".join(rf"\b{keyword}\b" for keyword in names)
        message = re.sub(pattern, lambda m: names[m.group(0)], str(err))
        raise CLIError(message) from None
    if args.max_tokens < 0:
        raise CLIError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    if params.min_tokens > args.max_tokens:
        raise CLIError(f"--min-tokens {params.min_tokens} is above --max-tokens "
                       f"{args.max_tokens}")
    if args.sync_every is not None and args.sync_every < 1:
        raise CLIError(f"--sync-every must be >= 1, got {args.sync_every}")
    if args.num_speculative_tokens < 1:
        raise CLIError(f"--num-speculative-tokens must be >= 1, got "
                       f"{args.num_speculative_tokens}")
    return params


def speculative_from_args(args: argparse.Namespace, device, model=None):
    """What ``--speculative`` names: None, "ngram", or a drafter on the checkpoint it names,
    loaded on ``device`` and checked against ``model``'s vocabulary when given.

    Raises
    ------
    CLIError
        A draft checkpoint that cannot be read or cannot draft for ``model``.
    """
    if args.speculative in (None, "ngram"):
        return args.speculative
    try:
        loaded = load_model(args.speculative, device=device)
        drafter = make_drafter(loaded[0] if isinstance(loaded, tuple) else loaded)
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(f"--speculative: {' '.join(str(err).split())}") from None
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and drafter.vocab != vocab:
        raise CLIError(f"--speculative: the draft model has {drafter.vocab} tokens, the model "
                       f"{vocab}; they must share the tokenizer")
    return drafter


def speculative_summary(tokens: int, forwards: int, accepted: int, proposed: int) -> str:
    """One line on what speculative decoding saved: acceptance, tokens per target forward."""
    rate = accepted / proposed if proposed else 0.0
    per = tokens / forwards if forwards else 0.0
    return (f"speculative: {accepted} of {proposed} drafted tokens accepted ({rate:.0%}); "
            f"{forwards} target forwards, {per:.2f} tokens per target forward")
