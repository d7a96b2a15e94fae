"""``wrap``: turn a model into a decoder that prefills prompts, then advances one token a step.

Three kinds of model are understood, tried in this order:

* :class:`~lmgen_fast.models.LlamaForPretraining`: run with a static KV cache;
* any ``nn.Module`` laid out like the article's model (``base_model.layers[i].self_attn...``):
  our cached Llama runs on the module's own parameter tensors (shared, never copied);
* any callable ``model(input_ids) -> logits [B, T, V]``: the whole sequence is recomputed
  every step, as the article does (correct, slow).

Adapters for other families register themselves in ``ADAPTERS`` when their module is
imported. ``wrap`` imports that module by name (:data:`ADAPTER_MODULES`, keyed by the top-level
package of the model's class) the first time it meets such a model: the adapter depends on
this module, never the reverse, and its optional dependency (transformers for
:mod:`lmgen_fast.models.hf`) is imported only when a model of that family is wrapped.
"""

from __future__ import annotations

import copy
import importlib
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import nn

# get_path and set_path are imported from here by the transformers adapter.
from lmgen_fast.models.article import get_path, infer_article_config, set_path, share_weights  # noqa: F401
from lmgen_fast.models.cache import KVCache, RowsView, StaticCache, checked_positions
from lmgen_fast.models.fused_step import FusedLlamaStep
from lmgen_fast.models.fused_step import supported as fused_supported
from lmgen_fast.models.llama import LlamaForPretraining


class Decoder:
    """Generation state for one batch: ``prefill`` once, then ``decode`` each step.

    Both return float logits ``[B, V]`` for the next token of every row. ``graphable``
    decoders also offer ``advance()`` and ``step(tokens, kv_len)``, a decode step that only
    reads and writes device tensors (see :class:`CachedLlamaDecoder`), which the engine
    captures in CUDA graphs. ``engine_state`` holds the engine's buffers between calls;
    ``busy`` is set while a call runs.
    """

    cached: bool = False
    graphable: bool = False
    busy: bool = False
    engine_state = None

    def prefill(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class FusedSteps:
    """Whether decode steps run the fused Triton step, and that step, built from the model's
    weights on first use: the fused part of :class:`CachedLlamaDecoder` (``self.model``)."""

    model: LlamaForPretraining
    cache: KVCache  # the decoder's static cache (StaticCache)

    def __init__(self):
        self._fused = False
        # False: the engine never picks the fused step (eager model steps with the Triton
        # sampler; no concatenated weight copies). A benchmark's "before", or to save memory.
        self.allow_fused = True
        # (fingerprint of the model when built, the FusedLlamaStep), built on first use.
        self._fused_step: tuple[tuple, FusedLlamaStep] | None = None

    @property
    def fused(self) -> bool:
        """Whether :meth:`step` runs the fused Triton decode step
        (:mod:`lmgen_fast.models.fused_step`)
        instead of ``forward_cached``; default False. The engine sets it for the Triton
        backend where :meth:`supports_fused`. Setting it True builds (or refreshes) the
        fused step's weights now, so that graphs replayed later read current weights."""
        return self._fused

    @fused.setter
    def fused(self, value: bool) -> None:
        self._fused = bool(value)
        if self._fused:
            step = self.fused_step()
            if getattr(self, "cache", None) is not None:  # the decode steps' counters now
                step.prepare(self.cache.k[0].shape[0])

    def supports_fused(self) -> bool:
        """Whether the fused step can run this model here (and has not failed), and
        :attr:`allow_fused` lets the engine use it."""
        if not self.allow_fused:
            return False
        kept = self._fused_step
        if kept is not None and kept[1].broken is not None and kept[0] == fingerprint(self.model):
            return False
        return fused_supported(self.model)

    def fused_step(self) -> FusedLlamaStep:
        """The model's :class:`~lmgen_fast.models.fused_step.FusedLlamaStep`, rebuilt when a weight
        tensor was replaced (:func:`fingerprint`) and refreshed in place when one was
        written in place (tensor versions)."""
        prints = fingerprint(self.model)
        kept = self._fused_step
        if kept is None or kept[0] != prints:
            if kept is not None:
                kept[1].release()  # free the old copies before making new ones
            self._fused_step = None
            kept = self._fused_step = (prints, FusedLlamaStep(self.model))
        else:
            kept[1].refresh()
        return kept[1]

    def fused_forward(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int,
                       per_row: int, advance: bool) -> torch.Tensor | None:
        """:meth:`FusedLlamaStep.guarded` on :attr:`cache`, or None when the fused step
        cannot run (it failed: :attr:`fused` is then turned off)."""
        step = self.fused_step()
        if step.broken is None:
            logits = step.guarded(tokens, positions, self.cache, kv_len, per_row, advance)
            if logits is not None:
                return logits
        self._fused = False
        return None

    def release_fused_step(self) -> None:
        """Free the fused step's weight copies (rebuilt when next used)."""
        if self._fused_step is not None:
            self._fused_step[1].release()
            self._fused_step = None


class PositionsForward:
    """The multi-position forward of :class:`CachedLlamaDecoder` (speculative verification),
    fused where :class:`FusedSteps` runs the fused step."""

    model: LlamaForPretraining
    cache: KVCache
    _fused: bool

    def forward_positions(self, ids: torch.Tensor, positions: torch.Tensor,
                          kv_len: int) -> torch.Tensor:
        """Logits of every token of ``ids`` at ``positions``, through the cache (speculative
        verification): the cache is written at those positions, :attr:`positions` is NOT
        advanced.

        With :attr:`fused`, through the fused kernels (``B * T`` flattened rows, each token
        attending to its cache row's slots up to its own position), else (or if they fail)
        ``lm_head(model.forward_cached(ids, positions, cache, kv_len))``.

        Parameters
        ----------
        ids : LongTensor
            ``[B, T]`` int64 token ids, ``B`` the cache's rows.
        positions : LongTensor
            ``[B, T]`` int64, each token's position, ``< kv_len`` (not checked: that would
            synchronise); a row's tokens at distinct positions.
        kv_len : int
            Static bound on the slots read (host int).

        Returns
        -------
        Tensor
            ``[B, T, V]`` logits in the model dtype.
        """
        batch, per_row = ids.shape
        if self._fused:
            logits = self.fused_forward(ids.reshape(-1), positions.reshape(-1).contiguous(),
                                         kv_len, per_row, False)
            if logits is not None:
                return logits.view(batch, per_row, -1)
        return self.model.lm_head(self.model.forward_cached(ids, positions, self.cache,
                                                            kv_len=kv_len))


class CachedLlamaDecoder(StaticCache, FusedSteps, PositionsForward, Decoder):
    """Our Llama with a static KV cache; rows keep their own positions (right padding).

    Decode steps attend over the first ``kv_len`` cache slots, rounded up to a multiple of
    ``kv_block`` (:meth:`round_len`): on the GPU that gives a handful of fixed shapes, one
    CUDA graph each (the extra slots are masked). The cache and the position buffer are kept
    and reused by the next :meth:`prefill` of the same batch size when they are large
    enough, so that graphs captured on them stay valid (``cache_version`` changes whenever
    they are replaced): see :class:`StaticCache`; the fused step: :class:`FusedSteps`.

    Length: prefill, refill, step and the verify forward share the cache's layout rules.
    """

    cached = True
    graphable = True

    def __init__(self, model: LlamaForPretraining):
        StaticCache.__init__(self, model)
        FusedSteps.__init__(self)

    def prefill(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> torch.Tensor:
        """Every prompt into its cache row; the logits ``[B, V]`` of each row's next token.

        Identical prompts (the samples of one prompt) go through the model once: the first
        one's keys and values are copied into the others' rows (:meth:`copy_rows`).
        """
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise ValueError(f"prompt {lengths.index(0)} has no tokens")
        longest = max(lengths)
        need = checked_positions(longest, max_new_tokens,
                                 self.model.config.max_position_embeddings)
        batch = len(prompts)
        first = first_copies(prompts)
        unique = sorted(set(first))
        ids = _right_padded([prompts[u] for u in unique], self.device)
        self.ensure_cache(batch, self.round_len(max(need, longest)))
        positions = torch.arange(longest, device=self.device).expand(len(unique), longest)
        cache = self.cache
        if len(unique) < batch:
            cache = RowsView(self.cache, torch.as_tensor(unique, device=self.device))
        hidden = self.model.forward_cached(ids, positions, cache, kv_len=longest)
        self.copy_rows([first[i] for i in range(batch) if first[i] != i],
                       [i for i in range(batch) if first[i] != i], longest)
        last = torch.as_tensor([lengths[u] for u in unique], device=self.device) - 1
        self.positions.copy_(torch.as_tensor(lengths, device=self.device))  # next positions
        self.kv_len = longest  # host-side bound on the slots in use, to avoid a device sync
        logits = self.model.lm_head(hidden[torch.arange(len(unique), device=self.device), last])
        if len(unique) == batch:
            return logits
        where = {u: j for j, u in enumerate(unique)}
        return logits[torch.as_tensor([where[f] for f in first], device=self.device)]

    def refill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]],
               kv_len: int, copy_from: Sequence[int | None] | None = None) -> None:
        """Put prompt ``i`` into cache row ``slots[i]``; other rows keep their cache.

        All but the last token of each prompt are prefilled in one batch (identical prompts
        once, copied to the others' rows); the row's next position is ``len - 1``, where the
        next :meth:`step`, fed the last token, gives the logits of its first new token.
        ``kv_len``: the caller's new bound on every row's next position. ``copy_from[i]``
        (where not None) is a cache row that holds prompt ``i``'s keys and values before
        this call (it may be among ``slots``): they are copied, not computed.
        """
        dev = self.device
        self.positions.index_copy_(0, torch.as_tensor(list(slots), device=dev),
                                   torch.as_tensor([len(p) - 1 for p in prompts], device=dev))
        self.kv_len = kv_len
        given = list(copy_from) if copy_from is not None else [None] * len(slots)
        first = first_copies(prompts)
        held, twins, heads = ([], []), ([], []), []
        for i, (s, p) in enumerate(zip(slots, prompts, strict=True)):
            src = given[i] if given[i] is not None else given[first[i]]
            if len(p) < 2:
                continue
            if src is not None:
                held[0].append(src)
                held[1].append(s)
            elif first[i] != i:
                twins[0].append(slots[first[i]])
                twins[1].append(s)
            else:
                heads.append((s, p[:-1]))
        longest = max(len(p) for p in prompts)
        # Rows that already hold a prompt are read before this refill writes any row.
        self.copy_rows(*held, longest)
        if heads:
            ids = _right_padded([p for _, p in heads], dev)
            rows = torch.as_tensor([s for s, _ in heads], device=dev)
            # Padding past a short prompt lands in slots its own decode steps overwrite
            # before attending to them (the mask stops at each row's position), as in prefill.
            self.model.forward_cached(ids, torch.arange(ids.shape[1], device=dev).expand_as(ids),
                                      RowsView(self.cache, rows), kv_len=ids.shape[1])
        self.copy_rows(*twins, longest)

    def release(self) -> None:
        """Free the cache and the fused step's weight copies (rebuilt when next used)."""
        self.release_cache()
        self.release_fused_step()

    def step(self, tokens: torch.Tensor, kv_len: int) -> torch.Tensor:
        """One decode step at the rows' current positions, without touching host state.

        Reads int64 ``tokens`` ``[B]``, writes the cache, advances the positions in place,
        returns logits ``[B, V]``: safe to capture in a CUDA graph and replay. With
        :attr:`fused`, through the fused kernels, which advance the positions themselves
        (falling back to the eager step, with a warning, if they fail on their first step).
        """
        if self._fused:
            logits = self.fused_forward(tokens.view(-1), self.positions, kv_len, 1, True)
            if logits is not None:
                return logits
        hidden = self.model.forward_cached(
            tokens.view(-1, 1), self.positions.view(-1, 1), self.cache, kv_len=kv_len
        )
        self.positions.add_(1)
        return self.model.lm_head(hidden[:, 0])

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.step(tokens, self.advance())


def first_copies(prompts: Sequence[Sequence[int]]) -> list[int]:
    """For each prompt, the index of the first prompt equal to it (itself if none before)."""
    seen: dict[tuple[int, ...], int] = {}
    return [seen.setdefault(tuple(p), i) for i, p in enumerate(prompts)]


def _right_padded(prompts: Sequence[Sequence[int]], device) -> torch.Tensor:
    """int64 ``[n, longest]`` on ``device``: each prompt's ids, then zeros."""
    ids = torch.zeros(len(prompts), max(len(p) for p in prompts), dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.as_tensor(p, dtype=torch.int64)
    return ids.to(device)


class RecomputeDecoder(Decoder):
    """Any ``model(input_ids) -> logits``: the article's full recompute at every step."""

    def __init__(self, model: Callable, device: torch.device):
        self.model = model
        self.device = device

    def _last_logits(self, ids: list[int]) -> torch.Tensor:
        out = self.model(torch.tensor([ids], dtype=torch.int64, device=self.device))
        out = getattr(out, "logits", out)
        return out[0, -1]

    def prefill(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> torch.Tensor:
        self.seqs = [list(p) for p in prompts]
        return torch.stack([self._last_logits(s) for s in self.seqs])

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        for s, t in zip(self.seqs, tokens.tolist(), strict=True):
            s.append(t)
        return torch.stack([self._last_logits(s) for s in self.seqs])


def _article_adapter(model) -> Decoder | None:
    if isinstance(model, LlamaForPretraining):
        # A shallow copy shares the submodules and tensors but is another object: the
        # decoder then holds no reference to the model, so decoder_for's weak cache lets
        # both be freed.
        return CachedLlamaDecoder(copy.copy(model))
    config = infer_article_config(model)
    if config is None:
        return None
    return CachedLlamaDecoder(share_weights(model, config))


ADAPTERS: list[Callable[[object], Decoder | None]] = [_article_adapter]
# Top-level package of a model's class -> the module whose import registers its adapter.
ADAPTER_MODULES: dict[str, str] = {"transformers": "lmgen_fast.models.hf"}


def load_adapter_for(model) -> None:
    """Import the adapter module registered for ``model``'s family, if any (once)."""
    family = type(model).__module__.split(".", 1)[0]
    name = ADAPTER_MODULES.get(family)
    if name is not None:
        importlib.import_module(name)


def model_device(model) -> torch.device:
    """Where ``model``'s parameters live (CPU for a plain callable)."""
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def wrap(model, device: torch.device | str | None = None) -> Decoder:
    """A decoder for ``model``: cached where the architecture is known, else recompute.

    Parameters
    ----------
    model : LlamaForPretraining, article-like nn.Module, or callable
        ``model(input_ids [B, T]) -> logits [B, T, V]`` for the fallback.
    device : optional
        Where input ids go for the fallback; defaults to the model's parameters' device.

    Returns
    -------
    Decoder
        ``.prefill(prompts, max_new_tokens)`` then ``.decode(tokens)``, each -> logits ``[B, V]``.

    Examples
    --------
    >>> dec = wrap(model)                       # doctest: +SKIP
    >>> logits = dec.prefill([[1, 5, 9]], 10)   # doctest: +SKIP
    """
    if isinstance(model, nn.Module):
        model.eval()  # as the article's generate() does
    # Loaded only here, so that lmgen_fast never imports transformers (an optional extra)
    # by itself; the import registers the Hugging Face adapter in ADAPTERS.
    load_adapter_for(model)
    for adapter in ADAPTERS:
        decoder = adapter(model)
        if decoder is not None:
            return decoder
    if not callable(model):
        raise ValueError(f"model must be callable as model(input_ids), got {type(model).__name__}")
    return RecomputeDecoder(model, torch.device(device) if device else model_device(model))


# model -> (decoder, fingerprint of the model's parameters when the decoder was built).
_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fingerprint(module: nn.Module) -> tuple:
    """Where ``module``'s parameters and buffers live: changes when any tensor is replaced
    (``.to()``, ``load_state_dict(assign=True)``, a swapped submodule), not when values are
    written in place."""
    tensors = [*module.parameters(), *module.buffers()]
    return tuple((t.data_ptr(), t.dtype, t.device, tuple(t.shape)) for t in tensors)


def decoder_for(model, device: torch.device | str | None = None) -> Decoder:
    """:func:`wrap`, keeping a cached decoder for the next call on the same model.

    The decoder's KV cache and CUDA graphs are then reused instead of rebuilt. It is kept
    while the model lives and its parameter tensors stay where they are (same storage,
    dtype, device); after ``model.to(...)``, ``model.half()`` or similar a new one is built.
    A decoder in use (a callback that generates again) is never handed out twice.
    :func:`release` frees it.
    """
    if not isinstance(model, nn.Module):
        return wrap(model, device)
    kept = _KEPT.get(model)
    prints = fingerprint(model)
    if kept is not None and kept[1] == prints and not kept[0].busy:
        model.eval()
        return kept[0]
    decoder = wrap(model, device)
    if decoder.graphable:
        _KEPT[model] = (decoder, prints)
    return decoder


def release(model) -> None:
    """Drop the decoder :func:`decoder_for` keeps for ``model`` (its cache and graphs)."""
    if isinstance(model, nn.Module):
        _KEPT.pop(model, None)
