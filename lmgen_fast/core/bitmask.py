"""Token bitmasks: one int32 row of ``ceil(V / 32)`` words per sequence, bit ``t % 32`` of
word ``t // 32`` set where token ``t`` is allowed (the layout xgrammar, llguidance and
outlines-core fill). The sampler reads ``allowed_token_ids`` packed this way and the
per-step grammar masks given to it; bits of tokens at or past ``V`` in the last word are
ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmgen_fast.core.intmath import cdiv

BITS = 32


def bitmask_words(vocab: int) -> int:
    """Words of one row of a bitmask over ``vocab`` tokens: ``ceil(vocab / 32)``."""
    return cdiv(vocab, BITS)


def pack_bitmask(rows: Sequence[Sequence[int] | None], vocab: int,
                 device: torch.device | str) -> torch.Tensor:
    """int32 ``[len(rows), ceil(vocab / 32)]`` with the bits of each row's ids set; a row
    given as None allows every token (all bits set). Ids must lie in ``[0, vocab)``."""
    words = bitmask_words(vocab)
    out = torch.zeros(len(rows), words, dtype=torch.int64)
    for r, ids in enumerate(rows):
        if ids is None:
            out[r] = -1
            continue
        t = torch.as_tensor(list(ids), dtype=torch.int64)
        # Distinct ids set distinct bits, so summing their powers of two ORs them.
        out[r].index_add_(0, t // BITS, torch.ones_like(t) << (t % BITS))
    # Words hold 32 bits: wrap the unsigned values into int32's range.
    out = torch.where(out >= 2**31, out - 2**32, out)
    return out.to(torch.int32).to(device)


def unpack_bitmask(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """bool ``[B, vocab]``: True where the int32 bitmask ``words`` ``[B, >= ceil(vocab/32)]``
    allows the token. Fixed-shape ops only (no host wait)."""
    cols = torch.arange(vocab, device=words.device)
    w = words.index_select(1, cols // BITS)
    return ((w >> (cols % BITS).to(w.dtype)) & 1) != 0


def check_bitmask(bitmask: torch.Tensor, batch: int, vocab: int,
                  device: torch.device) -> None:
    """Raise ValueError unless ``bitmask`` is an int32 ``[batch, ceil(vocab / 32)]`` tensor
    on ``device`` with contiguous rows (the form the sampler reads)."""
    want = (batch, bitmask_words(vocab))
    if (not isinstance(bitmask, torch.Tensor) or bitmask.dtype != torch.int32
            or tuple(bitmask.shape) != want):
        got = (f"{bitmask.dtype} {tuple(bitmask.shape)}" if isinstance(bitmask, torch.Tensor)
               else type(bitmask).__name__)
        raise ValueError(f"token_bitmask must be an int32 [B={want[0]}, ceil(V/32)={want[1]}] "
                         f"tensor, got {got}")
    if bitmask.device != device:
        raise ValueError(f"token_bitmask is on {bitmask.device}, the logits on {device}")
    if bitmask.stride(1) != 1 or bitmask.stride(0) != want[1]:
        raise ValueError("token_bitmask must be contiguous")


def pack_constraints(rows: Sequence, device: torch.device | str,
                     vocab_size: int | None) -> dict[str, torch.Tensor]:
    """PackedParams' ``bias_ids``, ``bias_vals``, ``allowed`` and ``constraints`` for
    ``rows`` (SamplingParams), as :class:`lmgen_fast.core.params.PackedParams` documents
    them: none where no row has a bias, an allowed set, ``min_tokens`` or a grammar."""
    width = max((len(p.logit_bias) for p in rows), default=0)
    allowing = any(p.allowed_token_ids is not None for p in rows)
    if not (width or allowing or any(p.min_tokens or p.structured for p in rows)):
        return {}
    if allowing and vocab_size is None:
        raise ValueError("allowed_token_ids needs the vocabulary size: pass vocab_size to "
                         "PackedParams.from_rows")
    pad = [(-1, 0.0)] * width
    pairs = [list(p.logit_bias) + pad[len(p.logit_bias):] for p in rows]
    out = dict(
        bias_ids=torch.tensor([[i for i, _ in r] for r in pairs], dtype=torch.int64,
                              device=device).reshape(len(rows), width) if width else None,
        bias_vals=torch.tensor([[b for _, b in r] for r in pairs], dtype=torch.float32,
                               device=device).reshape(len(rows), width) if width else None,
        allowed=pack_bitmask([p.allowed_token_ids for p in rows], vocab_size, device)
        if allowing else None,
    )
    flags = [(1 if p.logit_bias else 0) | (2 if p.allowed_token_ids is not None else 0)
             | (4 if p.min_tokens else 0) | (8 if p.structured else 0) for p in rows]
    out["constraints"] = torch.tensor(flags, dtype=torch.int32, device=device)
    return out
