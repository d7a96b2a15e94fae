"""Log-likelihoods of given text: :func:`score` (a continuation after a context) and
:func:`score_rolling` (every token of a text, windowed to the model's positions).

A continuation token's log-probability is the float32 ``log_softmax`` of the model's raw
logits at the position before it; ``is_greedy`` holds when every continuation token is that
position's argmax (the lowest id on a tie). Nothing of sampling (temperature, penalties,
filters) applies.

Strings follow lm-evaluation-harness's rule for causal models: whitespace at the end of the
context moves to the front of the continuation; ``context + continuation`` is encoded whole
and the continuation's tokens are those past the encoded context's length. Text is encoded as
a prompt is (:meth:`~lmgen_fast.api.tokenization.TokenizerAdapter.encode_prompt`: the article's
``[BOT]`` and leading space for an article-style tokenizer, the tokenizer's own encoding for a
transformers one). An empty context is the begin token alone.

Our cached Llama (every model :func:`~lmgen_fast.models.decoder.wrap` runs on it) scores through
its KV cache: the distinct contexts of a batch are prefilled once each, their cache rows copied
to the rows of the pairs that share them, and the continuations run in one forward. Other
models run ``model(ids)`` over each padded ``context + continuation``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmgen_fast.api.requests import vocab_size
from lmgen_fast.api.tokenization import adapt_tokenizer
from lmgen_fast.models.decoder import CachedLlamaDecoder, decoder_for, model_device

DEFAULT_BATCH_SIZE = 64
# Rows of logits turned into log-probabilities at once: bounds the float32 [rows, V] buffer.
_LOGIT_ROWS = 1024


@dataclass(frozen=True)
class Score:
    """The log-likelihood of one continuation (or, from :func:`score_rolling`, one text).

    ``token_ids``: the continuation's ids; ``logprobs``: each one's raw log-probability
    (float32 ``log_softmax`` of the logits at the position before it); ``total``: their sum;
    ``is_greedy``: every token is its position's argmax (lowest id on a tie; True when empty).
    """

    token_ids: list[int]
    logprobs: list[float]
    total: float
    is_greedy: bool


Ids = list[int]


def _ids(value, what: str, vocab: int | None) -> Ids:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"{what} must be a str or a list of token ids, got "
                         f"{type(value).__name__}")
    ids = []
    for t in value:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (vocab and t >= vocab):
            raise ValueError(f"{what} has token id {t!r}, outside the vocabulary of "
                             f"{vocab if vocab else 'the model'}")
        ids.append(int(t))
    return ids


def encode_pair(tok, context: str, continuation: str) -> tuple[Ids, Ids]:
    """The ids of ``context`` and of ``continuation`` after it (lm-evaluation-harness's rule).

    Parameters
    ----------
    tok : TokenizerAdapter
        From :func:`~lmgen_fast.api.tokenization.adapt_tokenizer`.
    context, continuation : str

    Returns
    -------
    (list of int, list of int)
        ``encode(context)`` (whitespace at its end moved to the continuation) and the ids of
        ``encode(context + continuation)`` past its length. An empty context is
        ``[bos]`` (the begin token the whole encoding starts with, else added).
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok.encode_prompt(context + continuation)
    if not context:
        return ([whole[0]], whole[1:]) if whole and whole[0] == tok.bos_id else ([tok.bos_id],
                                                                                 whole)
    head = tok.encode_prompt(context)
    return head, whole[len(head):]


def _limit(model, decoder) -> int | None:
    if isinstance(decoder, CachedLlamaDecoder):
        return decoder.model.config.max_position_embeddings
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _pairs(model, decoder, tokenizer, contexts, continuations) -> list[tuple[Ids, Ids]]:
    """Each pair as (context ids, continuation ids), checked."""
    if isinstance(contexts, str) or isinstance(continuations, str):
        raise ValueError("contexts and continuations must be sequences (one entry per pair), "
                         "not a str")
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts for {len(continuations)} continuations")
    vocab, tok, pairs = vocab_size(decoder, model), None, []
    for i, (ctx, cont) in enumerate(zip(contexts, continuations, strict=True)):
        if isinstance(ctx, str) != isinstance(cont, str):
            raise ValueError(f"pair {i}: the context and the continuation must both be str or "
                             "both token ids")
        if isinstance(ctx, str):
            tok = tok or adapt_tokenizer(tokenizer)
            pairs.append(encode_pair(tok, ctx, cont))
        else:
            pairs.append((_ids(ctx, f"context {i}", vocab), _ids(cont, f"continuation {i}",
                                                                  vocab)))
        if not pairs[-1][0]:
            raise ValueError(f"pair {i}: the context has no tokens (the first scored token "
                             "needs one before it)")
    return pairs


def _check_lengths(pairs: Sequence[tuple[Ids, Ids]], limit: int | None) -> None:
    if limit is None:
        return
    for i, (ctx, cont) in enumerate(pairs):
        need = len(ctx) + len(cont) - 1
        if need > limit:
            raise ValueError(
                f"pair {i}: context of {len(ctx)} tokens + continuation of {len(cont)} tokens "
                f"needs {need} positions, beyond the model's max_position_embeddings={limit} "
                "(score_rolling windows long texts)")


def token_scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[list[float], list[bool]]:
    """Each row's raw log-probability of its target, and whether the target is the argmax.

    Parameters
    ----------
    logits : Tensor
        ``[N, V]`` raw logits, any float dtype.
    targets : LongTensor
        ``[N]`` int64 token ids.

    Returns
    -------
    (list of float, list of bool)
        float32 ``log_softmax(logits)[i, targets[i]]``, and ``argmax == targets[i]`` (the
        first maximal id).
    """
    lps, greedy = [], []
    for start in range(0, logits.shape[0], _LOGIT_ROWS):
        rows = logits[start:start + _LOGIT_ROWS].float()
        want = targets[start:start + _LOGIT_ROWS].view(-1, 1)
        lps += torch.log_softmax(rows, dim=-1).gather(1, want).view(-1).tolist()
        greedy += (rows.argmax(dim=-1) == want.view(-1)).tolist()
    return lps, greedy


def _cached_batch(decoder: CachedLlamaDecoder, pairs: Sequence[tuple[Ids, Ids]]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of every continuation token of ``pairs`` through the decoder's KV cache.

    Each distinct context but its last token is prefilled once (``refill``) and copied to
    the rows of the other pairs that share it; then one forward runs, per row, the context's
    last token and the continuation but its last token at their positions.

    Returns
    -------
    (Tensor, Tensor)
        Hidden states ``[N, hidden]`` of the N scored positions (pair-major) and their
        target ids ``[N]`` int64.
    """
    dev = decoder.device
    feed = [[*ctx[-1:], *cont[:-1]] for ctx, cont in pairs]
    width = max(len(f) for f in feed)
    starts = [len(ctx) - 1 for ctx, _ in pairs]
    kv_len = max(s + len(f) for s, f in zip(starts, feed, strict=True))
    decoder.ensure_cache(len(pairs), decoder.round_len(kv_len))
    # refill prefills each distinct context once and copies its rows to its twins.
    decoder.refill(range(len(pairs)), [list(ctx) for ctx, _ in pairs], kv_len)
    # A row shorter than the widest repeats its last (token, position): the padding writes
    # the same key and value into that slot and its logits are dropped.
    ids = torch.tensor([f + f[-1:] * (width - len(f)) for f in feed], dtype=torch.int64)
    pos = torch.tensor([[s + min(j, len(f) - 1) for j in range(width)]
                        for s, f in zip(starts, feed, strict=True)], dtype=torch.int64)
    hidden = decoder.model.forward_cached(ids.to(dev), pos.to(dev), decoder.cache, kv_len)
    keep = torch.tensor([[j < len(cont) for j in range(width)] for _, cont in pairs])
    targets = torch.tensor([t for _, cont in pairs for t in cont], dtype=torch.int64)
    return decoder.model.lm_head(hidden[keep.to(dev)]), targets.to(dev)


def _full_batch(model, device, pairs: Sequence[tuple[Ids, Ids]]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of every continuation token of ``pairs`` from ``model(ids)`` over each padded
    ``context + continuation`` (right padding: a causal model's real tokens never see it)."""
    seqs = [[*ctx, *cont][:-1] for ctx, cont in pairs]
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], dtype=torch.int64)
    out = model(ids.to(device))
    logits = getattr(out, "logits", out)
    keep = torch.tensor([[len(ctx) - 1 <= j < len(s) for j in range(width)]
                         for (ctx, _), s in zip(pairs, seqs, strict=True)])
    targets = torch.tensor([t for _, cont in pairs for t in cont], dtype=torch.int64)
    return logits[keep.to(logits.device)], targets.to(logits.device)


def _batches(pairs: Sequence[tuple[Ids, Ids]], size: int) -> list[list[int]]:
    """Pair indices in batches of at most ``size``: pairs of one context together, longest
    first (less padding; a context shared inside a batch is prefilled once)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(pairs):
        groups.setdefault(tuple(ctx), []).append(i)
    order = sorted(groups.values(),
                   key=lambda g: -max(len(pairs[i][0]) + len(pairs[i][1]) for i in g))
    flat = [i for g in order for i in g]
    return [flat[s:s + size] for s in range(0, len(flat), size)]


def score_pairs(model, pairs: Sequence[tuple[Ids, Ids]], *, batch_size: int | None = None,
                device=None) -> list[Score]:
    """:func:`score` on pairs already encoded and checked: ``(context ids, continuation ids)``,
    each context at least one token."""
    size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    results: list[Score | None] = [None] * len(pairs)
    todo = [i for i, (_, cont) in enumerate(pairs) if cont]
    for i in set(range(len(pairs))) - set(todo):
        results[i] = Score([], [], 0.0, True)
    if not todo:
        return results
    decoder = decoder_for(model, device)
    cached = isinstance(decoder, CachedLlamaDecoder)
    where = torch.device(device) if device is not None else model_device(model)
    decoder.busy = True
    try:
        with torch.inference_mode():
            for batch in _batches([pairs[i] for i in todo], size):
                chosen = [pairs[todo[b]] for b in batch]
                logits, targets = (_cached_batch(decoder, chosen) if cached
                                   else _full_batch(model, where, chosen))
                lps, greedy = token_scores(logits, targets)
                at = 0
                for b, (_, cont) in zip(batch, chosen, strict=True):
                    lp, gr = lps[at:at + len(cont)], greedy[at:at + len(cont)]
                    results[todo[b]] = Score(list(cont), lp, float(sum(lp)), all(gr))
                    at += len(cont)
    finally:
        decoder.busy = False
    return results


def score(model, tokenizer, contexts: Sequence[str | Sequence[int]],
          continuations: Sequence[str | Sequence[int]], *, batch_size: int | None = None,
          device=None) -> list[Score]:
    """The log-likelihood of each continuation after its context.

    Parameters
    ----------
    model
        Anything :func:`~lmgen_fast.wrap` runs: our cached Llama (``LlamaForPretraining``,
        an article-like module, a transformers Llama) through its KV cache, any other
        callable ``model(ids [B, T]) -> logits [B, T, V]`` in full.
    tokenizer
        As for :func:`~lmgen_fast.generate` (only read for string pairs; may be None for ids).
    contexts, continuations : sequences of str or of token-id lists
        One pair per index; a pair is both strings (encoded by lm-evaluation-harness's rule,
        see the module) or both id lists (used as given).
    batch_size : int, optional
        Pairs per forward (default 64). Pairs sharing a context are batched together.
    device
        Where ids go for a model run in full (default: its parameters' device).

    Returns
    -------
    list of Score
        One per pair, in order: continuation ids, float32 log-probabilities, their sum and
        whether greedy decoding would produce them.

    Raises
    ------
    ValueError
        Mismatched lengths, a pair mixing kinds, an id outside the vocabulary, an empty
        context, or a pair needing more positions than the model has (its lengths named).

    Examples
    --------
    >>> s = score(model, tokenizer, ["The capital of France is"], [" Paris"])  # doctest: +SKIP
    >>> s[0].total, s[0].is_greedy                                            # doctest: +SKIP
    """
    pairs = encode_pairs(model, tokenizer, contexts, continuations, device=device)
    return score_pairs(model, pairs, batch_size=batch_size, device=device)


def encode_pairs(model, tokenizer, contexts: Sequence[str | Sequence[int]],
                 continuations: Sequence[str | Sequence[int]], *, device=None
                 ) -> list[tuple[Ids, Ids]]:
    """The ``(context ids, continuation ids)`` :func:`score` scores, checked (same arguments
    and errors); :func:`score_pairs` scores them."""
    decoder = decoder_for(model, device)
    pairs = _pairs(model, decoder, tokenizer, contexts, continuations)
    _check_lengths(pairs, _limit(model, decoder))
    return pairs


def rolling_windows(seq: Sequence[int], limit: int | None) -> list[tuple[Ids, Ids]]:
    """``(context, continuation)`` pairs that score every token of ``seq`` after the first
    once, each needing at most ``limit`` positions, each with as much context as fits
    (lm-evaluation-harness's rolling windows with a context of one token)."""
    seq, out, s = list(seq), [], 1
    step = len(seq) if limit is None else limit
    while s < len(seq):
        e = min(s + step, len(seq))
        j = max(0, e - 1 - step)
        out.append((seq[j:s], seq[s:e]))
        s = e
    return out


def score_rolling(model, tokenizer, texts: Sequence[str | Sequence[int]], *,
                  batch_size: int | None = None, device=None,
                  max_length: int | None = None) -> list[Score]:
    """The log-likelihood of every token of each text (perplexity; the harness's
    ``loglikelihood_rolling``), through windows of the model's positions.

    Parameters
    ----------
    model, tokenizer, batch_size, device
        As for :func:`score`.
    texts : sequence of str or of token-id lists
        A string is encoded as a prompt, with the begin token in front if the encoding has
        none; every token after the first is scored. An id list is used as given (its first
        token is the context of the rest).
    max_length : int, optional
        Positions per window (default: the model's ``max_position_embeddings``; a model
        without one runs each text whole).

    Returns
    -------
    list of Score
        One per text: the scored ids (the text's, begin token excluded), their
        log-probabilities, sum and greedy flag, windows joined.
    """
    windows = encode_texts(model, tokenizer, texts, device=device, max_length=max_length)
    flat = [w for ws in windows for w in ws]
    scores = iter(score_pairs(model, flat, batch_size=batch_size, device=device))
    return [join_scores([next(scores) for _ in ws]) for ws in windows]


def encode_texts(model, tokenizer, texts: Sequence[str | Sequence[int]], *, device=None,
                 max_length: int | None = None) -> list[list[tuple[Ids, Ids]]]:
    """Each text's :func:`rolling_windows` (arguments as for :func:`score_rolling`)."""
    if isinstance(texts, str):
        raise ValueError("texts must be a sequence of texts, not a str")
    decoder = decoder_for(model, device)
    limit = _limit(model, decoder) if max_length is None else max_length
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")
    vocab, tok, out = vocab_size(decoder, model), None, []
    for i, text in enumerate(texts):
        if isinstance(text, str):
            tok = tok or adapt_tokenizer(tokenizer)
            seq = tok.encode_prompt(text)
            seq = seq if seq and seq[0] == tok.bos_id else [tok.bos_id, *seq]
        else:
            seq = _ids(text, f"text {i}", vocab)
        out.append(rolling_windows(seq, limit))
    return out


def join_scores(parts: Sequence[Score]) -> Score:
    """One :class:`Score` of consecutive parts (a text's windows)."""
    lps = [x for p in parts for x in p.logprobs]
    return Score([t for p in parts for t in p.token_ids], lps, float(sum(lps)),
                 all(p.is_greedy for p in parts))
