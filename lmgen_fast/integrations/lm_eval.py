"""An lm-evaluation-harness backend: ``lm_eval --model lmgen-fast``.

Importing this module registers :class:`LmgenFastLM` as ``lmgen-fast`` in the harness's model
registry. The harness (0.4.13) discovers no plugins by entry point, so run it through this
module, which registers the backend and then runs the harness's own command line::

    python -m lmgen_fast.integrations.lm_eval run --model lmgen-fast \\
        --model_args pretrained=default,dtype=float32 --tasks hellaswag --device cpu

or, from Python, ``import lmgen_fast.integrations.lm_eval`` before
``lm_eval.simple_evaluate(model="lmgen-fast", ...)``.

The three calls sit on lmgen-fast's own functions: ``loglikelihood`` on
:func:`~lmgen_fast.score` (float32 log-probabilities of the raw logits, the harness's rule for
splitting context and continuation), ``loglikelihood_rolling`` on
:func:`~lmgen_fast.score_rolling` (windows of the model's positions) and ``generate_until`` on
:func:`~lmgen_fast.generate_batch` (greedy unless the task samples) with the ``until`` strings
as stop strings: a row stops at the first, its text ends before it, as the harness's ``hf``
backend cuts it.
"""

from __future__ import annotations

import json
import sys

import lm_eval.models  # noqa: F401  (the harness's own backends, registered before ours)
import torch
from lm_eval.__main__ import cli_evaluate
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from lmgen_fast.api.generate import generate_batch
from lmgen_fast.api.score import score, score_rolling
from lmgen_fast.api.tokenization import adapt_tokenizer, is_hf_tokenizer
from lmgen_fast.cli.options import load_model_and_tokenizer, resolve_device

NAME = "lmgen-fast"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """The torch dtype of ``dtype=`` (``auto``/None: the checkpoint's own)."""
    if name is None or name == "auto" or isinstance(name, torch.dtype):
        return None if name == "auto" else name
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _batch_size(value) -> int | None:
    """The harness's ``batch_size`` (an int, its string, or ``auto``/``auto:N``: our
    default) as pairs per forward."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return None
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"batch_size={value!r}: use an integer or auto") from None
    if size < 1:
        raise ValueError(f"batch_size={value!r} must be >= 1")
    return size


def generation_settings(gen_kwargs: dict, default_cap: int) -> tuple[int, float, dict, list[str]]:
    """What a ``generate_until`` request's generation arguments ask for.

    Returns
    -------
    (int, float, dict, list of str)
        New tokens (``max_gen_toks``, or its aliases, else ``default_cap``), temperature (0:
        greedy, as without ``do_sample``), the other ``generate_batch`` keywords (``top_k``,
        ``top_p``; top-k off unless given) and the ``until`` strings.
    """
    kwargs = dict(gen_kwargs)
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    cap = default_cap
    for key in ("max_gen_toks", "max_new_tokens", "max_tokens"):
        if kwargs.get(key) is not None:
            cap = int(kwargs[key])
            break
    temperature = float(kwargs.get("temperature", 0.0) or 0.0)
    if not kwargs.get("do_sample", temperature > 0.0):
        temperature = 0.0
    keywords = dict(top_k=int(kwargs.get("top_k", 0) or 0),
                    top_p=float(kwargs.get("top_p", 1.0) or 1.0))
    return cap, temperature, keywords, until


def context_ids(adapter, model, context: str, cap: int) -> list[int]:
    """The prompt ids of ``context``, only its last ``max_length - cap`` kept where the
    model's positions (``max_position_embeddings``) are fewer than it and ``cap`` new
    tokens need (the harness's left truncation)."""
    ids = adapter.encode_prompt(context)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is None or len(ids) + cap <= limit:
        return ids
    if cap >= limit:
        raise ValueError(f"max_gen_toks={cap} leaves no room for a context in the model's "
                         f"max_position_embeddings={limit}")
    return ids[len(ids) - (limit - cap):]


@register_model(NAME)
class LmgenFastLM(LM):
    """lmgen-fast as an lm-evaluation-harness model.

    Parameters
    ----------
    pretrained : str
        ``default`` (the embedded model) or a checkpoint directory: a transformers
        ``save_pretrained`` directory (with its tokenizer) or the article's layout.
    dtype : str
        ``auto`` (the checkpoint's), ``float32``, ``bfloat16`` or ``float16``.
    device : str
        ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (the harness's ``--device``).
    batch_size : int or str
        Pairs per forward when scoring, prompts per batch when generating; ``auto``: 64.
    max_gen_toks : int
        New tokens when a task does not say (the harness's default, 256).
    seed : int
        Seed of sampled generations (a task with ``do_sample``); greedy ones ignore it.
    backend : str
        The sampler backend (``auto``, ``torch``, ``triton``).
    """

    def __init__(self, pretrained: str = "default", dtype: str = "auto", device: str | None = None,
                 batch_size=None, max_batch_size=None, max_gen_toks: int = 256,
                 seed: int | None = None, backend: str = "auto", tokenizer: str | None = None,
                 **_ignored):
        super().__init__()
        self._device = resolve_device(device or "auto")
        self.model, self.tokenizer = load_model_and_tokenizer(
            None if pretrained == "default" else pretrained, tokenizer, self._device,
            _dtype(dtype))
        self.adapter = adapt_tokenizer(self.tokenizer)
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.seed = None if seed is None else int(seed)
        self.backend = backend
        self.pretrained = pretrained

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log-probability, is_greedy)`` of each request's ``(context, continuation)``."""
        args = [req.args for req in requests]
        scores = score(self.model, self.tokenizer, [a[0] for a in args], [a[1] for a in args],
                       batch_size=self.batch_size)
        out = [(s.total, s.is_greedy) for s in scores]
        for a, result in zip(args, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", a, result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-probability of every token of each request's text, after the begin
        token."""
        texts = [req.args[0] for req in requests]
        scores = score_rolling(self.model, self.tokenizer, texts, batch_size=self.batch_size)
        for text, s in zip(texts, scores, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), s.total)
        return [s.total for s in scores]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation of its context, cut before the first ``until``
        string; requests with the same generation arguments run as one batch."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(requests)
        for members in groups.values():
            cap, temperature, keywords, until = generation_settings(
                requests[members[0]].args[1], self.max_gen_toks)
            contexts = [context_ids(self.adapter, self.model, requests[i].args[0], cap)
                        for i in members]
            # The rows stop at their first until string, their text cut before it (the
            # harness's rule).
            texts = generate_batch(self.model, self.tokenizer, prompt_token_ids=contexts,
                                   max_tokens=cap,
                                   temperature=temperature, seed=self.seed,
                                   backend=self.backend, max_batch_size=self.batch_size,
                                   stop=[u for u in until if u] or None, **keywords)
            for i, text in zip(members, texts, strict=True):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer's name (request caches are keyed by it)."""
        name = getattr(self.tokenizer, "name_or_path", None) or str(self.pretrained)
        return name.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """The chat history through a transformers tokenizer's chat template, as text."""
        if not is_hf_tokenizer(self.tokenizer):
            raise ValueError("--apply_chat_template needs a transformers tokenizer with a chat "
                             "template; this model's tokenizer has none")
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt)


def main(argv: list[str] | None = None) -> None:
    """The harness's command line (``lm_eval run ...``) with ``lmgen-fast`` registered."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
