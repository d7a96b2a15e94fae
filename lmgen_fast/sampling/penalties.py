"""Steps 0 to 2 of a sampling step (:mod:`lmgen_fast.sampling.reference` states the rules):
SPEC section 7's logit bias and masks, the temperature, then the repetition, frequency and
presence penalties over each row's window. Shared by the CPU path, the fixed-shape device
path and the Triton launcher (which takes the processed ``z`` of log-probability tables
from here)."""

from __future__ import annotations

import torch

from lmgen_fast.core.bitmask import bitmask_words, unpack_bitmask
from lmgen_fast.core.params import PackedParams

NEG_INF = float("-inf")
POS_INF = float("inf")


def check_window_values(window: torch.Tensor, vocab: int) -> None:
    """Raise ValueError naming the first window entry that is neither -1 nor a token id."""
    bad = (window < -1) | (window >= vocab)
    if bool(bad.any()):
        r, c = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"window[{r}, {c}] = {int(window[r, c])} is not a token id in [0, {vocab}) or -1"
        )


def apply_penalty(
    z: torch.Tensor,
    window: torch.Tensor,
    penalty: torch.Tensor,
    once: torch.Tensor,
    frequency: torch.Tensor | None = None,
    presence: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
) -> None:
    """Apply the repetition penalty, then the OpenAI penalties, to ``z`` in place.

    Parameters
    ----------
    z : Tensor
        float32 ``[B, V]``, already divided by the temperature.
    window : LongTensor
        int64 ``[B, W]``, ``-1`` for empty slots.
    penalty, once : Tensor
        ``[B]`` float32 repetition penalty and bool "once" mode.
    frequency, presence, temperature : Tensor, optional
        ``[B]`` float32. When given, ``z[t] -= (frequency * c_t + presence * (c_t > 0)) / T``
        for every window token, ``c_t`` its raw count (``T`` already 1 for greedy rows).

    Notes
    -----
    Work is O(B * W**2): the count of each window entry's token is found by comparing the
    window with itself, then every entry writes its token's new value; duplicates write the
    same value, so the scatter's order is moot.
    """
    valid = window >= 0
    # Empty slots point at a token already in the row (or at 0 with count 0 when there is
    # none), so their writes agree with the real entries.
    fallback = window.amax(dim=1, keepdim=True).clamp_min(0)
    idx = torch.where(valid, window, fallback)
    counts = ((idx.unsqueeze(2) == window.unsqueeze(1)) & valid.unsqueeze(1)).sum(2)
    once_counts = torch.where(once.unsqueeze(1), counts.clamp_max(1), counts)
    factor = torch.pow(penalty.unsqueeze(1), once_counts.to(torch.float32))
    vals = z.gather(1, idx)
    vals = torch.where(vals > 0, vals / factor, vals * factor)
    if frequency is not None and presence is not None and temperature is not None:
        c = counts.to(torch.float32)
        adj = frequency.unsqueeze(1) * c + presence.unsqueeze(1) * (c > 0).to(torch.float32)
        vals = vals - adj / temperature.unsqueeze(1)
    z.scatter_(1, idx, vals)


def apply_bias(z: torch.Tensor, x: torch.Tensor, temperature: torch.Tensor,
               packed: PackedParams) -> None:
    """SPEC section 7's step 1 in place on ``z = x / T``: ``z[t] = (x[t] + b) / T`` (one
    float32 add, one division) for each ``(t, b)`` of a row's ``logit_bias``.

    ``x`` float32 ``[B, V]`` the raw logits, ``temperature`` float32 ``[B]`` (1 for greedy
    rows). Fixed-shape ops; a row's padding writes the value its first entry writes (or
    token 0's own ``z``), so no two writes to one token differ.
    """
    ids = packed.bias_ids
    if ids is None or not ids.shape[1]:
        return
    valid = ids >= 0
    first, first_b = ids[:, :1], torch.where(ids[:, :1] >= 0, packed.bias_vals[:, :1], 0.0)
    idx = torch.where(valid, ids, first.clamp_min(0))
    b = torch.where(valid, packed.bias_vals, first_b)
    z.scatter_(1, idx, (x.gather(1, idx) + b) / temperature.unsqueeze(1))


def apply_masks(z: torch.Tensor, packed: PackedParams, steps: torch.Tensor | None,
                token_bitmask: torch.Tensor | None) -> None:
    """SPEC section 7's step 2 in place on float32 ``z`` ``[B, V]``: ``-inf`` for tokens
    outside a row's ``allowed_token_ids``, tokens ``token_bitmask`` (int32
    ``[B, ceil(V / 32)]``, bit set = allowed) forbids, and, while ``steps[r] <
    min_tokens[r]`` (``steps`` int64 ``[B]``; None skips this mask), the row's ``stop_ids``.
    Fixed-shape ops only (no host wait)."""
    vocab = z.shape[1]
    words = packed.allowed
    if token_bitmask is not None:
        # Both masks in one: their words ANDed, then unpacked once.
        width = bitmask_words(vocab)
        words = token_bitmask if words is None else words[:, :width] & token_bitmask[:, :width]
    if words is not None:
        z.masked_fill_(~unpack_bitmask(words, vocab), NEG_INF)
    # No constraints tensor: no row has min_tokens, and the mask would change nothing (the
    # eager decode step stays at its launch count).
    if steps is not None and packed.constraints is not None:
        ids = packed.stop_ids
        on = (ids >= 0) & (steps < packed.min_tokens).unsqueeze(1)
        # amin with +inf leaves a value as it is (NaN too, -inf later): every write agrees.
        z.scatter_reduce_(1, ids.clamp_min(0), torch.where(on, NEG_INF, POS_INF),
                          reduce="amin")


def process_logits(
    logits: torch.Tensor,
    packed: PackedParams,
    window: torch.Tensor | None,
    *,
    openai: bool | None = None,
    steps: torch.Tensor | None = None,
    token_bitmask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Steps 0 to 2: biased, masked (:func:`apply_bias`, :func:`apply_masks`), tempered,
    penalized float32 logits ``[B, V]`` with NaN as ``-inf``.

    ``openai`` says whether to apply the frequency and presence penalties; None looks at
    the parameters (a host sync). Applying zero penalties subtracts exactly zero, so
    ``True`` gives the same bits for rows without them: the device path passes it.
    ``steps`` (int64 ``[B]``) turns the ``min_tokens`` mask on; ``token_bitmask`` is a
    per-step grammar mask (see :func:`apply_masks`).
    """
    temperature = torch.where(packed.temperature == 0, 1.0, packed.temperature)
    x = logits.to(torch.float32)
    z = x / temperature.unsqueeze(1)  # always a new tensor
    apply_bias(z, x, temperature, packed)
    apply_masks(z, packed, steps, token_bitmask)
    z.nan_to_num_(nan=NEG_INF, posinf=POS_INF, neginf=NEG_INF)
    if window is not None and window.shape[1] > 0:
        if openai is None:
            openai = bool(((packed.frequency_penalty != 0)
                           | (packed.presence_penalty != 0)).any())
        if openai:
            apply_penalty(z, window, packed.penalty, packed.once,
                          packed.frequency_penalty, packed.presence_penalty, temperature)
        else:
            apply_penalty(z, window, packed.penalty, packed.once)
    return z
