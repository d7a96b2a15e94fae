"""The decode loop: the article's ``generate()`` and its batched form, on a cached decoder.

One step: sample every row from its logits (with its window of recent tokens), stop rows
that drew EOT or reached their length, feed the new tokens back through the KV cache.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

from .decoder import wrap
from .params import PackedParams, SamplingParams
from .reference import EmptyRowError
from .sampling import resolve_backend, sample
from .tokenization import adapt_tokenizer

TokenCallback = Callable[[int, int], None]


TopLogprobs = list[list[tuple[int, float]]]


@dataclass(frozen=True)
class Generation:
    """One row's result: its text, its token ids (EOT excluded) and why it stopped.

    ``logprobs`` holds the raw log-probability of each token of ``token_ids``;
    ``top_logprobs`` the row's ``logprobs`` best ``(token_id, logprob)`` pairs per token, most
    probable first (``None`` when the row's ``logprobs`` is 0).
    """

    text: str
    token_ids: list[int]
    finish_reason: str  # "eot" or "length"
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: TopLogprobs | None = None


class RowLogprobs(NamedTuple):
    """One row's log-probabilities from :func:`generate_ids` (see :class:`Generation`)."""

    logprobs: list[float]
    top_logprobs: TopLogprobs | None


class GenerationError(ValueError):
    """Generation stopped on bad model output; ``partial`` holds each row's ids so far."""

    def __init__(self, message: str, partial: list[list[int]]):
        super().__init__(message)
        self.partial = partial


def _check_max_tokens(max_tokens, batch: int) -> list[int]:
    values = [max_tokens] * batch if not isinstance(max_tokens, Sequence) else list(max_tokens)
    if len(values) != batch:
        raise ValueError(f"max_tokens has {len(values)} entries for {batch} prompts")
    out = []
    for v in values:
        try:
            if isinstance(v, bool):
                raise TypeError
            n = operator.index(v)
        except TypeError:
            raise ValueError(f"max_tokens must be an integer, got {v!r}") from None
        if n < 0:
            raise ValueError(f"max_tokens must be >= 0, got {v!r}")
        out.append(n)
    return out


def _window(hist: torch.Tensor, hlen: torch.Tensor, ranges: torch.Tensor, width: int):
    """The last ``range`` (0: all) entries of each row's history, right-aligned, -1 padded."""
    start = torch.where(ranges > 0, (hlen - ranges).clamp_min(0), 0)
    first = (hlen - width).unsqueeze(1)
    idx = first + torch.arange(width, device=hist.device)
    valid = idx >= start.unsqueeze(1)
    taken = hist.gather(1, idx.clamp(0, hist.shape[1] - 1))
    return torch.where(valid, taken, -1)


@torch.inference_mode()
def generate_ids(
    decoder,
    prompts: Sequence[Sequence[int]],
    rows: Sequence[SamplingParams],
    max_tokens: Sequence[int],
    eos_id: int,
    *,
    backend: str = "auto",
    callback: TokenCallback | None = None,
    return_logprobs: bool = False,
) -> list[tuple[list[int], str]] | tuple[list[tuple[list[int], str]], list[RowLogprobs]]:
    """Sample up to ``max_tokens[r]`` tokens for each prompt (lists of ids) on ``decoder``.

    Returns ``(token_ids, finish_reason)`` per row; with ``return_logprobs``, also a
    :class:`RowLogprobs` per row (the extra work is done only then). ``callback(row,
    token_id)`` is called for every token as it is produced (not for EOT).
    """
    batch = len(prompts)
    total = max(max_tokens, default=0)
    out: list[list[int]] = [[] for _ in range(batch)]
    reason = ["length"] * batch
    done = [n == 0 for n in max_tokens]
    lps = [RowLogprobs([], [] if r.logprobs > 0 else None) for r in rows]

    def result():
        pairs = [(o, r) for o, r in zip(out, reason, strict=True)]
        return (pairs, lps) if return_logprobs else pairs

    if all(done):
        return result()

    logits = decoder.prefill(prompts, total)
    device = logits.device
    resolve_backend(backend, device)
    packed = PackedParams.from_rows(rows, device)
    base = [len(p) if r.penalty_scope == "all" else 0 for p, r in zip(prompts, rows, strict=True)]
    hist = torch.full((batch, max(base) + total), -1, dtype=torch.int64)
    for i, p in enumerate(prompts):
        if base[i]:
            hist[i, : base[i]] = torch.as_tensor(p, dtype=torch.int64)
    hist = hist.to(device)
    hlen = torch.tensor(base, dtype=torch.int64, device=device)
    ranges = torch.tensor([r.repetition_penalty_range for r in rows], device=device)
    penalized = any(
        r.repetition_penalty != 1.0 or r.frequency_penalty != 0.0 or r.presence_penalty != 0.0
        for r in rows
    )
    arange = torch.arange(batch, device=device)

    for step in range(total):
        # The window width is known on the host: no device sync to size it.
        width = max(
            min(r.repetition_penalty_range or b + step, b + step)
            for r, b in zip(rows, base, strict=True)
        )
        window = _window(hist, hlen, ranges, width) if penalized and width > 0 else None
        try:
            if return_logprobs:
                tokens, step_lp = sample(logits, packed, window, step=step, backend=backend,
                                         return_logprobs=True)
                token_lp = step_lp.token_logprob.tolist()
                top = list(zip(step_lp.top_ids.tolist(), step_lp.top_logprobs.tolist(),
                               strict=True))
            else:
                tokens = sample(logits, packed, window, step=step, backend=backend)
        except EmptyRowError as exc:
            raise GenerationError(f"at step {step}: {exc}", out) from exc
        for r, t in enumerate(tokens.tolist()):
            if done[r]:
                continue
            if t == eos_id:
                done[r], reason[r] = True, "eot"
                continue
            out[r].append(t)
            if return_logprobs:
                lps[r].logprobs.append(token_lp[r])
                if lps[r].top_logprobs is not None:
                    n = rows[r].logprobs
                    lps[r].top_logprobs.append(list(zip(top[r][0][:n], top[r][1][:n],
                                                        strict=True)))
            if callback is not None:
                callback(r, t)
            if len(out[r]) >= max_tokens[r]:
                done[r] = True
        if all(done):
            break
        hist[arange, hlen] = tokens
        hlen = hlen + 1
        logits = decoder.decode(tokens)
    return result()


def _row_params(
    batch: int, keywords: SamplingParams, params, seeds
) -> list[SamplingParams]:
    rows = [keywords] * batch
    if params is not None:
        params = list(params)
        if len(params) != batch:
            raise ValueError(f"params has {len(params)} entries for {batch} prompts")
        for i, p in enumerate(params):
            if not isinstance(p, SamplingParams):
                raise ValueError(f"params[{i}] must be a SamplingParams, got {type(p).__name__}")
        rows = params
    if seeds is not None:
        seeds = list(seeds)
        if len(seeds) != batch:
            raise ValueError(f"seeds has {len(seeds)} entries for {batch} prompts")
        rows = [p if s is None else replace(p, seed=s) for p, s in zip(rows, seeds, strict=True)]
    return rows


def generate_batch(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_tokens: int | Sequence[int] = 100,
    temperature: float = 1.0,
    repetition_penalty: float = 1.0,
    repetition_penalty_range: int = 10,
    top_k: int = 50,
    device=None,
    *,
    seed: int | None = None,
    backend: str = "auto",
    penalty_scope: str = "generated",
    penalty_mode: str = "per_occurrence",
    params: Sequence[SamplingParams] | None = None,
    seeds: Sequence[int | None] | None = None,
    bos_token: str | int | None = None,
    eos_token: str | int | None = None,
    callback: TokenCallback | None = None,
    return_details: bool = False,
    top_p: float = 1.0,
    min_p: float = 0.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    logprobs: int = 0,
) -> list[str] | list[Generation]:
    """Generate a continuation for every prompt, in one batch.

    Parameters
    ----------
    model, tokenizer
        As for :func:`generate`.
    prompts : sequence of str
        Prompts of any lengths.
    max_tokens : int or sequence of int
        Per-row cap on new tokens (one value for all, or one per prompt).
    temperature, repetition_penalty, repetition_penalty_range, top_k, seed, penalty_scope,
    penalty_mode, top_p, min_p, frequency_penalty, presence_penalty, logprobs
        The sampling parameters of every row (see :class:`SamplingParams`).
    params : sequence of SamplingParams, optional
        One per prompt; replaces the keywords row by row.
    seeds : sequence of int or None, optional
        One per prompt; a non-None entry replaces that row's seed.
    bos_token, eos_token : str or int, optional
        The tokens that play ``[BOT]`` and ``[EOT]`` when the tokenizer has other names.
    callback : callable, optional
        ``callback(row, token_id)`` for each new token, for streaming.
    return_details : bool
        Return :class:`Generation` records instead of strings, with each token's raw
        log-probability (and, for rows with ``logprobs > 0``, the top alternatives).

    Returns
    -------
    list of str (or of Generation)
        The decoded new tokens of each row, prompt excluded, in the order of ``prompts``.
        A seeded row's result does not depend on its batch mates or the batch size.
    """
    if isinstance(prompts, str):
        raise ValueError("prompts must be a sequence of strings; use generate() for one prompt")
    batch = len(prompts)
    keywords = SamplingParams(
        temperature=temperature, top_k=top_k, repetition_penalty=repetition_penalty,
        repetition_penalty_range=repetition_penalty_range, seed=seed,
        penalty_scope=penalty_scope, penalty_mode=penalty_mode, top_p=top_p, min_p=min_p,
        frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
        logprobs=logprobs,
    )
    rows = _row_params(batch, keywords, params, seeds)
    caps = _check_max_tokens(max_tokens, batch)
    tok = adapt_tokenizer(tokenizer, bos_token, eos_token)
    ids = [tok.encode_prompt(p) for p in prompts]
    if batch == 0:
        return []
    decoder = wrap(model, device)
    if return_details:
        results, lps = generate_ids(decoder, ids, rows, caps, tok.eos_id, backend=backend,
                                    callback=callback, return_logprobs=True)
        return [Generation(tok.decode(o), o, r, lp.logprobs, lp.top_logprobs)
                for (o, r), lp in zip(results, lps, strict=True)]
    results = generate_ids(decoder, ids, rows, caps, tok.eos_id, backend=backend, callback=callback)
    return [tok.decode(o) for o, _ in results]


def generate(
    model,
    tokenizer,
    prompt: str,
    max_tokens: int = 100,
    temperature: float = 1.0,
    repetition_penalty: float = 1.0,
    repetition_penalty_range: int = 10,
    top_k: int = 50,
    device=None,
    *,
    seed: int | None = None,
    backend: str = "auto",
    penalty_scope: str = "generated",
    penalty_mode: str = "per_occurrence",
    bos_token: str | int | None = None,
    eos_token: str | int | None = None,
    callback: Callable[[int], None] | None = None,
    top_p: float = 1.0,
    min_p: float = 0.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
) -> str:
    """Drop-in for the article's ``generate()``: same arguments, same distribution, cached.

    Parameters
    ----------
    model
        ``LlamaForPretraining``, a module laid out like the article's, or any callable
        ``model(input_ids [B, T]) -> logits [B, T, V]`` (recomputed each step).
    tokenizer
        A ``tokenizers.Tokenizer`` with ``[BOT]`` and ``[EOT]`` (or pass ``bos_token`` and
        ``eos_token``).
    prompt : str
        Encoded as ``[BOT]`` + ``tokenizer.encode(" " + prompt).ids``.
    max_tokens, temperature, repetition_penalty, repetition_penalty_range, top_k
        The article's parameters (``temperature=0``: greedy; ``top_k <= 0``: off).
    device
        Where input ids go for a recomputed model; a cached model uses its weights' device.
    seed : int, optional
        Reproducible draws independent of torch's global generator. Without it, a run after
        ``torch.manual_seed(s)`` draws like the article's loop after the same call.
    callback : callable, optional
        ``callback(token_id)`` for each new token as it is produced.
    top_p, min_p, frequency_penalty, presence_penalty
        Beyond the article (see :class:`SamplingParams`); the defaults turn them off.

    Returns
    -------
    str
        ``tokenizer.decode`` of the generated ids (prompt and ``[EOT]`` excluded).

    Examples
    --------
    >>> text = generate(model, tokenizer, "Once upon a time", max_tokens=50)  # doctest: +SKIP
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    return generate_batch(
        model, tokenizer, [prompt], max_tokens, temperature, repetition_penalty,
        repetition_penalty_range, top_k, device, seed=seed, backend=backend,
        penalty_scope=penalty_scope, penalty_mode=penalty_mode, bos_token=bos_token,
        eos_token=eos_token,
        callback=None if callback is None else (lambda _row, t: callback(t)),
        top_p=top_p, min_p=min_p, frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
    )[0]
