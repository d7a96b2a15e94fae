"""Drafters: what a speculative round proposes for every row. A drafter's tokens are
only guesses; the target's own race decides each of them (see
:mod:`lmgen_fast.speculative.rounds`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from lmgen_fast.models.decoder import CachedLlamaDecoder, Decoder, wrap
from lmgen_fast.speculative import cache
from lmgen_fast.speculative.rows import Rows

NGRAM_MAX = 3  # the ngram drafter matches the row's last 3, then 2, then 1 tokens


class Drafter(Protocol):
    """Proposes tokens for every row of a speculative batch. A drafter that also has
    ``open(slots, prompt_len, max_new)`` and ``seat(slots, prompts)`` (as both drafters
    here) runs through slots too (:mod:`lmgen_fast.speculative.slots`)."""

    def start(self, rows: Rows, prompts: Sequence[Sequence[int]], max_new: int) -> None:
        """Called once after the target's prefill, before the first round."""

    def propose(self, rows: Rows, k: int) -> torch.Tensor:
        """``[B, k]`` int64 on the rows' device: each row's guesses for its next ``k``
        tokens, ``-1`` where it has none."""


class NgramDrafter:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the row's
    last ``n`` tokens (``n`` from 3 down to 1) in its prompt and output.

    Each row keeps, for every n-gram that has a successor, where its latest occurrence
    ends; indexing a new token costs O(1). A match near the end copies on into the tokens
    it proposes itself (as an overlapping copy would), so a repeating cycle is proposed in
    full.
    """

    def __init__(self, max_n: int = NGRAM_MAX):
        self.max_n = max_n

    def start(self, rows: Rows, prompts: Sequence[Sequence[int]], max_new: int) -> None:
        self.open(len(prompts), max(len(p) for p in prompts), max_new)

    def open(self, slots: int, prompt_len: int, max_new: int) -> None:
        """Room for ``slots`` rows, seated later (continuous batching)."""
        self.index: list[dict[tuple[int, ...], int]] = [{} for _ in range(slots)]
        self.seen = [0] * slots

    def seat(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> None:
        """Rows ``slots`` take new prompts: what they indexed is forgotten."""
        for s in slots:
            self.index[s], self.seen[s] = {}, 0

    def _catch_up(self, r: int, seq: list[int]) -> None:
        index = self.index[r]
        for m in range(max(self.seen[r], 1), len(seq)):
            # Token m follows the n-grams that end at m - 1: latest occurrence wins.
            for n in range(1, min(self.max_n, m) + 1):
                index[tuple(seq[m - n: m])] = m
        self.seen[r] = len(seq)

    def propose(self, rows: Rows, k: int) -> torch.Tensor:
        out = []
        for r, seq in enumerate(rows.seqs):
            guess: list[int] = []
            if not rows.done[r]:
                self._catch_up(r, seq)
                for n in range(min(self.max_n, len(seq)), 0, -1):
                    follow = self.index[r].get(tuple(seq[-n:]))
                    if follow is not None:
                        ext = seq + guess
                        for j in range(k):
                            ext.append(ext[follow + j])
                        guess = ext[len(seq):]
                        break
            out.append(guess + [-1] * (k - len(guess)))
        return torch.tensor(out, dtype=torch.int64, device=rows.device).view(len(out), k)


class ModelDrafter:
    """A smaller model proposes by sampling its own tokens with the target's noise keys.

    Its draft ``j`` of a row is drawn like the target's token at step ``s + j``: the row's
    parameters and seed, its penalty window with the drafts before it. Where the two
    models' distributions are close, their races then often have the same winner. The
    draft model keeps its own KV cache; each round it re-reads the row's last two kept
    tokens (the last one is new to it, and after a fully accepted round so is the one
    before), then runs ``k - 1`` one-token steps.

    Parameters
    ----------
    model
        Anything :func:`lmgen_fast.wrap` runs with a cache at per-row positions (our Llama,
        a module laid out like the article's, a transformers Llama), with the target's
        vocabulary; or such a decoder.
    """

    def __init__(self, model):
        decoder = model if isinstance(model, Decoder) else wrap(model)
        if not isinstance(decoder, CachedLlamaDecoder):
            raise ValueError(
                f"speculative= draft model must be one lmgen-fast runs with its own KV cache "
                f"(a Llama); {type(model).__name__} runs on {type(decoder).__name__}")
        self.decoder = decoder
        self.vocab = decoder.model.config.vocab_size

    def start(self, rows: Rows, prompts: Sequence[Sequence[int]], max_new: int) -> None:
        self.decoder.prefill(prompts, self._room(max(len(p) for p in prompts), max_new))

    def _room(self, prompt_len: int, max_new: int) -> int:
        """New positions the draft model's cache gives a row of ``prompt_len`` tokens."""
        limit = self.decoder.model.config.max_position_embeddings
        return max(1, min(max_new, limit - prompt_len + 1))

    def open(self, slots: int, prompt_len: int, max_new: int) -> None:
        """A cache of ``slots`` rows as long as the longest row needs, rows seated later
        (continuous batching)."""
        self.decoder.reserve(slots, prompt_len, self._room(prompt_len, max_new))

    def seat(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> None:
        """Prefill rows ``slots`` of the draft model's cache with ``prompts`` (all but the
        last token, which the next round's re-read writes)."""
        self.decoder.refill(slots, prompts, max(len(p) for p in prompts))

    def capacity(self) -> int:
        return cache.capacity(self.decoder)

    def propose(self, rows: Rows, k: int) -> torch.Tensor:
        dev = rows.device
        batch = rows.batch
        drafts = torch.full((batch, k), -1, dtype=torch.int64, device=dev)
        cap = self.capacity() - 1
        last = torch.tensor([s[-1] for s in rows.seqs], device=dev)
        prev = torch.tensor([s[-2] if len(s) > 1 else s[-1] for s in rows.seqs], device=dev)
        end = torch.tensor([len(s) - 1 for s in rows.seqs], device=dev)
        pos = torch.stack([(end - 1).clamp_min(0), end], dim=1).clamp_max(cap)
        ids = torch.stack([prev, last], dim=1)
        logits = cache.forward(self.decoder, ids, pos, int(pos.max()))[:, -1:]
        for j in range(k):
            drafts[:, j] = rows.sample(logits, drafts, offset=j).tokens
            if j + 1 < k:
                pos = (end + j + 1).clamp_max(cap).view(-1, 1)
                logits = cache.forward(self.decoder, drafts[:, j: j + 1], pos, int(pos.max()))
        return drafts


def make_drafter(speculative: object) -> Drafter:
    """The drafter ``speculative=`` names: "ngram", a model (or decoder) to draft with, or
    a drafter object (with ``start`` and ``propose``)."""
    if isinstance(speculative, str):
        if speculative == "ngram":
            return NgramDrafter()
        raise ValueError(f"speculative must be 'ngram', a draft model or a drafter, got "
                         f"{speculative!r}")
    if hasattr(speculative, "propose") and hasattr(speculative, "start"):
        return speculative
    return ModelDrafter(speculative)
