"""``lmgen-fast generate``: one prompt (text, chat messages or token ids), one or n samples.

The text goes to stdout, the speed line to stderr. With ``--n`` above 1 each sample is
printed under a header line naming it and why it ended.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from lmgen_fast.api.generate import (
    RESEARCH_FIELDS,
    GenerationError,
    generate,
    generate_batch,
)
from lmgen_fast.api.requests import outside_vocab
from lmgen_fast.cli.options import (
    CLIError,
    add_sampling_arguments,
    check_utf8,
    load_model_and_tokenizer,
    resolve_device,
    sampling_params_from_args,
    speculative_from_args,
    speculative_summary,
    threads_note,
)
from lmgen_fast.core.params import SamplingParams


class StreamPrinter:
    """Prints the text of a growing list of token ids as it grows.

    Byte-level tokens can split a character; a suffix that decodes to the replacement
    character is held back until the next token completes it. With ``stop`` strings, a
    suffix that could begin one is held back too, and nothing from a match on is printed,
    so that the printed text is always a prefix of the text the call returns.
    """

    def __init__(self, tokenizer, out=None, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.out = out if out is not None else sys.stdout
        self.stop = stop
        self.ids: list[int] = []
        self.printed = ""

    def _safe(self, text: str) -> str:
        """The part of ``text`` that no stop string can still cut."""
        ends = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if ends:
            return text[: min(ends)]
        held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])),
                   default=0)
        return text[: len(text) - held]

    def __call__(self, token_id: int) -> None:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        text = self._safe(text)
        if text.startswith(self.printed) and len(text) > len(self.printed):
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


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    """Add the arguments of ``lmgen-fast generate`` to ``p``."""
    p.add_argument("prompt", nargs="?", default=None,
                   help="the text to continue (encoded as [BOT] + ' ' + PROMPT); or give "
                        "--chat or --prompt-token-ids instead")
    p.add_argument("--chat", default=None, metavar="TEXT",
                   help="a user message, through the tokenizer's chat template with the "
                        "generation prompt (a transformers tokenizer that has one), instead "
                        "of PROMPT")
    p.add_argument("--system", default=None, metavar="TEXT",
                   help="with --chat: a system message before the user's")
    p.add_argument("--prompt-token-ids", default=None, metavar="IDS",
                   help="the prompt as token ids, used as given (no [BOT] added): "
                        "comma-separated (1,2,3) or a JSON list ([1, 2, 3])")
    add_sampling_arguments(
        p,
        seed_help="seed for reproducible output: the same seed, settings, device and "
                  "backend give the same text (default: random)",
        device_help="auto, cpu, cuda, cuda:N or mps; auto picks CUDA when available "
                    "(default: auto)",
    )
    p.add_argument("--stream", action="store_true",
                   help="print tokens to stdout as they are generated (not with --n > 1)")
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="also print, as one JSON line per sample on stderr, each generated "
                        "token's log-probability (see --logprobs-mode) and, for N > 0, its N "
                        "most likely alternatives (N from 0 to 20; default: print none)")


def parse_token_ids(text: str) -> list[int]:
    """``"1,2,3"`` or ``"[1, 2, 3]"`` as a non-empty list of ids (each ``>= 0``).

    Raises
    ------
    CLIError
        Anything else, naming the value.
    """
    try:
        ids = json.loads(text) if text.lstrip().startswith("[") else [
            int(part) for part in text.split(",")]
    except ValueError:
        ids = None
    if (not isinstance(ids, list) or not ids
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)):
        raise CLIError(f"--prompt-token-ids must be token ids >= 0, comma-separated or a JSON "
                       f"list, got {text!r}")
    return ids


def prompt_keywords(args: argparse.Namespace) -> dict:
    """The one prompt the options give, as ``generate_batch``'s ``prompts``,
    ``messages`` or ``prompt_token_ids`` keyword.

    Raises
    ------
    CLIError
        None or several of PROMPT, ``--chat`` and ``--prompt-token-ids``; ``--system``
        without ``--chat``; text that is not UTF-8; ids that are not ids.
    """
    given = [name for name, value in (("PROMPT", args.prompt), ("--chat", args.chat),
                                      ("--prompt-token-ids", args.prompt_token_ids))
             if value is not None]
    if len(given) != 1:
        raise CLIError("give exactly one of PROMPT, --chat and --prompt-token-ids"
                       + (f", got {' and '.join(given)}" if given else ""))
    if args.system is not None and args.chat is None:
        raise CLIError("--system needs --chat")
    if args.prompt is not None:
        return {"prompts": [check_utf8(args.prompt, "the prompt")]}
    if args.chat is not None:
        messages = [] if args.system is None else [
            {"role": "system", "content": check_utf8(args.system, "--system")}]
        messages.append({"role": "user", "content": check_utf8(args.chat, "--chat")})
        return {"messages": [messages]}
    return {"prompt_token_ids": [parse_token_ids(args.prompt_token_ids)]}


def _ending(g) -> str:
    """Why a sample ended: ``length``, ``eot``, or ``stop`` and what stopped it."""
    if g.stop_reason is None:
        return g.finish_reason
    return f"{g.finish_reason} {json.dumps(g.stop_reason, ensure_ascii=False)}"


def _header(g, n: int) -> str:
    return f"--- sample {g.sample_index + 1} of {n}: {len(g.token_ids)} tokens, {_ending(g)} ---"


def _print_results(args: argparse.Namespace, results: list, n: int,
                   printer: StreamPrinter | None) -> None:
    """Each sample's text (under a header when there are several; the streamed rest with
    ``printer``), and its log-probabilities as one JSON line on stderr when asked."""
    for g in results:
        if printer is not None:
            printer.finish(g.text)
        else:
            if n > 1:
                sys.stdout.write(_header(g, n) + "\n")
            sys.stdout.write(g.text + "\n")
        if args.logprobs is not None:
            print(json.dumps({"sample_index": g.sample_index, "token_ids": g.token_ids,
                              "logprobs": g.logprobs, "top_logprobs": g.top_logprobs,
                              "logprobs_mode": args.logprobs_mode}), file=sys.stderr)
    sys.stdout.flush()


# The research-job settings at which `generate` needs nothing but the article's call.
_PLAIN = SamplingParams()


def cmd_generate(args: argparse.Namespace) -> int:
    """Run ``lmgen-fast generate``: print the continuation(s) of the prompt."""
    source = prompt_keywords(args)
    params = sampling_params_from_args(args)
    if args.stream and params.n > 1:
        raise CLIError("--stream prints one sample; drop it or --n")
    device = resolve_device(args.device)
    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, device)
    if "prompt_token_ids" in source:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if outside_vocab(source["prompt_token_ids"][0], vocab):
            raise CLIError(outside_vocab(source["prompt_token_ids"][0], vocab))
    printer = StreamPrinter(tokenizer, stop=params.stop) if args.stream else None
    count = 0

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
    speculative = speculative_from_args(args, device, model)
    research = {k: getattr(params, k) for k in RESEARCH_FIELDS}
    plain = ("prompts" in source and args.logprobs is None and speculative is None
             and params.n == 1 and all(v == getattr(_PLAIN, k) for k, v in research.items()))
    start = time.perf_counter()
    if plain:
        text = generate(model, tokenizer, source["prompts"][0], **settings, callback=on_token)
        elapsed = time.perf_counter() - start
        if printer is not None:
            printer.finish(text)
        else:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
        ending = ""
    else:
        try:
            results = generate_batch(
                model, tokenizer, **source, **settings, logprobs=args.logprobs or 0,
                logprobs_mode=args.logprobs_mode, n=params.n, **research,
                callback=lambda _row, t: on_token(t), return_details=True,
                speculative=speculative, num_speculative_tokens=args.num_speculative_tokens,
            )
        except GenerationError:
            raise
        except ValueError as err:  # the input, checked against the model and tokenizer
            raise CLIError(str(err)) from None
        elapsed = time.perf_counter() - start
        # Tokens past a stop string are computed, never returned: count what is returned.
        count = sum(len(g.token_ids) for g in results)
        _print_results(args, results, params.n, printer)
        ending = "" if params.n > 1 else f"; finish: {_ending(results[0])}"
    rate = count / elapsed if elapsed > 0 else float("inf")
    print(f"{count} tokens in {elapsed:.2f} s: {rate:.1f} tokens/s on {device} "
          f"({threads_note()}){ending}", file=sys.stderr)
    if speculative is not None:
        totals = [sum(getattr(g, name) for g in results)
                  for name in ("target_forwards", "accepted_drafts", "proposed_drafts")]
        print(speculative_summary(count, *totals), file=sys.stderr)
    return 0
