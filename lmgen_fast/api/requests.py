"""What a call of :func:`~lmgen_fast.api.generate.generate_batch` asks for, as the engine
takes it: its prompts' ids (from text, ids or chat messages), the ids that end its rows,
its rows with ``n`` samples per prompt spelled out, and the checks that need the model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from lmgen_fast.api.tokenization import TokenizerAdapter, encode_messages, encode_token_ids
from lmgen_fast.core.params import SEED_LIMIT, SamplingParams


def prompt_ids(tok: TokenizerAdapter, prompts, prompt_token_ids, messages) -> list[list[int]]:
    """The token ids of each prompt, from exactly one of its three forms: text (the
    adapter's encoding), token ids (as given) or chat messages (the chat template with the
    generation prompt). Raises ValueError naming the problem."""
    given = [name for name, v in (("prompts", prompts), ("prompt_token_ids", prompt_token_ids),
                                  ("messages", messages)) if v is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of prompts, prompt_token_ids and messages, got "
                         f"{given or 'none'}")
    if prompts is not None:
        if isinstance(prompts, str):
            raise ValueError("prompts must be a sequence of strings; use generate() for one "
                             "prompt")
        return [tok.encode_prompt(p) for p in prompts]
    if prompt_token_ids is not None:
        if isinstance(prompt_token_ids, (str, bytes)):
            raise ValueError(f"prompt_token_ids must be a list of lists of ids, got "
                             f"{prompt_token_ids!r}")
        return [encode_token_ids(p, i) for i, p in enumerate(prompt_token_ids)]
    if isinstance(messages, (str, bytes, dict)):
        raise ValueError(f"messages must be a list of conversations, got {messages!r}")
    return [encode_messages(tok, m, i) for i, m in enumerate(messages)]


def end_ids(model, tok: TokenizerAdapter, eos_token) -> tuple[int, ...]:
    """The ids that end every row: the tokenizer's end token, and for a transformers model
    without ``eos_token=``, every id of its ``generation_config.eos_token_id``."""
    ends = [tok.eos_id]
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None) if eos_token is None else None
    if extra is not None:
        for t in [extra] if isinstance(extra, int) else list(extra):
            if int(t) not in ends:
                ends.append(int(t))
    return tuple(ends)


def vocab_size(decoder, model) -> int | None:
    """The model's vocabulary size where its config says it, else None."""
    for m in (getattr(decoder, "model", None), model):
        size = getattr(getattr(m, "config", None), "vocab_size", None)
        if isinstance(size, int):
            return size
    return None


def outside_vocab(ids: Sequence[int], vocab: int | None) -> str | None:
    """Why prompt token ids cannot run on a model of ``vocab`` tokens (the first id outside
    ``[0, vocab)``), or None (also when ``vocab`` is unknown)."""
    bad = next((t for t in ids if vocab is not None and not 0 <= t < vocab), None)
    if bad is None:
        return None
    return f"prompt_token_ids has token id {bad}, outside the vocabulary [0, {vocab})"


class Samples:
    """The rows of a call with ``n`` samples per prompt, prompt-major: prompt ``i``'s
    samples at ``i*n .. i*n+n-1``, sample ``j`` seeded ``s + j`` where the prompt's seed is
    ``s``; their prompt ids, caps, and prompt and sample indices."""

    def __init__(self, ids: list[list[int]], rows: list[SamplingParams], caps: list[int]):
        self.ids, self.rows, self.caps = [], [], []
        self.prompt_index, self.sample_index = [], []
        for i, (p, row, cap) in enumerate(zip(ids, rows, caps, strict=True)):
            for j in range(row.n):
                seed = None if row.seed is None else row.seed + j
                if seed is not None and seed >= SEED_LIMIT:
                    raise ValueError(f"seed {row.seed} of prompt {i} leaves no room for its "
                                     f"n={row.n} samples (seed + j must stay below 2**63)")
                self.rows.append(replace(row, n=1, seed=seed))
                self.ids.append(p)
                self.caps.append(cap)
                self.prompt_index.append(i)
                self.sample_index.append(j)


def check_rows(rows: Sequence[SamplingParams], caps: Sequence[int], vocab: int | None,
               ids: Sequence[Sequence[int]] = ()) -> None:
    """Refuse a row whose ``min_tokens`` is above its ``max_tokens`` or whose ids (its
    parameters' and its prompt's, ``ids[i]``) are outside the vocabulary (ValueError naming
    the value)."""
    for i, prompt in enumerate(ids):
        why = outside_vocab(prompt, vocab)
        if why is not None:
            raise ValueError(f"prompt {i}: {why}")
    for i, (row, cap) in enumerate(zip(rows, caps, strict=True)):
        if row.min_tokens > cap:
            raise ValueError(f"min_tokens={row.min_tokens} is above max_tokens={cap} "
                             f"(prompt {i})")
        if vocab is not None:
            row.check_vocab(vocab)
