"""A cached decoder run at per-row positions, as the rounds and the draft model run it:
forwards over chosen positions, the room its cache leaves, and a row's slots cleared."""

from __future__ import annotations

import torch

from lmgen_fast.models.decoder import CachedLlamaDecoder


def attention_len(decoder: CachedLlamaDecoder, top: int) -> int:
    """The attention length of a forward whose highest position is ``top``: whole blocks,
    as the decoder's own steps use, within its cache."""
    return min(decoder.round_len(top + 1), decoder.cache.max_len)


def forward(decoder: CachedLlamaDecoder, ids: torch.Tensor, positions: torch.Tensor,
            top: int) -> torch.Tensor:
    """Logits of ``ids`` at ``positions``, writing the decoder's cache there: the
    decoder's :meth:`~lmgen_fast.models.decoder.CachedLlamaDecoder.forward_positions`
    (fused where it has the kernels) at the attention length of ``top``.

    Parameters
    ----------
    decoder : CachedLlamaDecoder
        A decoder after its prefill.
    ids, positions : LongTensor
        ``[B, T]`` int64: each row's tokens and the cache positions they take.
    top : int
        The highest of ``positions``.

    Returns
    -------
    Tensor
        ``[B, T, V]`` logits in the model's dtype.
    """
    return decoder.forward_positions(ids, positions, attention_len(decoder, top))


def clear_slots(decoder: CachedLlamaDecoder, row: int, start: int) -> None:
    """Zero ``row``'s cache slots from ``start`` on (keys and values of every layer)."""
    for keys, values in zip(decoder.cache.k, decoder.cache.v, strict=True):
        keys[row, :, start:] = 0
        values[row, :, start:] = 0


def capacity(decoder: CachedLlamaDecoder) -> int:
    """Positions a row may use in the decoder's cache."""
    return min(decoder.cache.max_len, decoder.model.config.max_position_embeddings)
