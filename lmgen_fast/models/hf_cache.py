"""A transformers causal LM on its own KV cache (:class:`HFCacheDecoder`): the adapter's
path for models our Llama does not reproduce.

The transformers API moves between versions (cache classes, the cache keyword,
``cache_position``, ``logits_to_keep``), so this path reads the forward's signature and
never builds a cache object itself: it passes back whatever cache the model returned. It
does not import transformers.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from lmgen_fast.models.decoder import Decoder, model_device


def forward_keywords(model) -> dict[str, str | None]:
    """Names the forward uses, read from its signature (they vary across versions)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    cache = next((n for n in ("cache", "past_key_values") if n in params), None)
    keep = next((n for n in ("logits_to_keep", "num_logits_to_keep") if n in params), None)
    return {
        "cache": cache,
        "keep": keep,
        "mask": "attention_mask" if "attention_mask" in params else None,
        "positions": "position_ids" if "position_ids" in params else None,
    }


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of token ids left padded to the longest, as transformers' ``generate`` takes
    them: int64 ``input_ids`` and ``attention_mask`` (1 = real token), ``[B, T]``, on the CPU."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.int64)
    mask = torch.zeros(len(prompts), longest, dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.as_tensor(p, dtype=torch.int64)
        mask[i, longest - len(p):] = 1
    return ids, mask


class HFCacheDecoder(Decoder):
    """A transformers causal LM on its own KV cache: prefill once, then one token a step.

    Rows of different lengths are left padded, with the attention mask and the position ids
    (count of real tokens before each one) that transformers' own ``generate`` passes.
    """

    cached = True

    def __init__(self, model, keywords: dict[str, str | None] | None = None):
        self.model = model
        self.kw = keywords or forward_keywords(model)
        if self.kw["cache"] is None:
            raise ValueError(f"{type(model).__name__}.forward takes no cache argument")
        self.device = model_device(model)

    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        kwargs = {"input_ids": ids, "use_cache": True, self.kw["cache"]: self.cache}
        if self.kw["mask"]:
            kwargs[self.kw["mask"]] = self.mask
        if self.kw["positions"]:
            pos = (self.mask.cumsum(-1) - 1).masked_fill(self.mask == 0, 1)
            kwargs[self.kw["positions"]] = pos[:, -ids.shape[1]:]
        if self.kw["keep"]:
            kwargs[self.kw["keep"]] = 1
        out = self.model(**kwargs)
        if isinstance(out, tuple):
            logits, self.cache = out[0], out[1]
        else:
            logits = out.logits
            cache = getattr(out, "cache", None)
            self.cache = cache if cache is not None else getattr(out, "past_key_values", None)
        if self.cache is None:
            raise ValueError(f"{type(self.model).__name__} returned no cache with use_cache=True")
        return logits[:, -1]

    def prefill(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> torch.Tensor:
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise ValueError(f"prompt {lengths.index(0)} has no tokens")
        ids, mask = left_pad(prompts)
        self.mask = mask.to(self.device)
        self.cache = None
        return self._run(ids.to(self.device))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(self.mask.shape[0], 1, dtype=self.mask.dtype, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        return self._run(tokens.view(-1, 1).to(self.device))
