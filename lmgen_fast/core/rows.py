"""One home for each rule about a row that several layers apply: the positions it needs,
its penalty history and window, the seed of an unseeded row, why it finished, and which of
its top alternatives are listed, and the ids that end it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmgen_fast.core.params import SamplingParams

# Seeds drawn for unseeded rows are below this bound (a seed is a non-negative int64; the
# margin keeps ``seed + j`` for several samples of a prompt in range).
DRAWN_SEED_LIMIT = 2**62


def positions_needed(prompt_len: int, max_tokens: int) -> int:
    """KV-cache positions a row uses: its prompt, then every sampled token but the last,
    which is never fed back."""
    return prompt_len + max(max_tokens - 1, 0)


def end_tuple(eos_id: int | Sequence[int]) -> tuple[int, ...]:
    """A call's end id (or ids), which end every row, as a tuple."""
    return (eos_id,) if isinstance(eos_id, int) else tuple(int(e) for e in eos_id)


def finish_reason(kept: int, max_tokens: int) -> str:
    """``"length"`` for a row that kept ``max_tokens`` tokens, else ``"eot"`` (it stopped
    on its end token, which is not kept)."""
    return "eot" if kept < max_tokens else "length"


def fill_unseeded(seed: torch.Tensor, seeded: torch.Tensor) -> torch.Tensor:
    """``seed`` (int64 ``[B]``) with each unseeded row's (``seeded`` bool ``[B]`` False)
    replaced by a draw from torch's generator on ``seed``'s device.

    A row draws its seed once per call; the step number keys fresh noise at every step, so
    its draws are as independent as with a new seed each step.
    """
    drawn = torch.randint(0, DRAWN_SEED_LIMIT, seed.shape, device=seed.device)
    return torch.where(seeded, seed, drawn)


def prompt_base(prompts: Sequence[Sequence[int]], rows: Sequence[SamplingParams]) -> list[int]:
    """How many prompt tokens start each row's penalty history: all of them with
    ``penalty_scope="all"``, none otherwise."""
    return [len(p) if r.penalty_scope == "all" else 0 for p, r in zip(prompts, rows, strict=True)]


def prompt_history(prompts: Sequence[Sequence[int]], base: list[int]) -> torch.Tensor:
    """int64 ``[n, max(base)]`` on the CPU: the first ``base[i]`` ids of prompt ``i`` (the
    history a penalty over the prompt starts from), -1 after."""
    hist = torch.full((len(prompts), max(base, default=0)), -1, dtype=torch.int64)
    for i, (p, b) in enumerate(zip(prompts, base, strict=True)):
        if b:
            hist[i, :b] = torch.as_tensor(p[:b], dtype=torch.int64)
    return hist


def window_width(ranges: Sequence[int], seen: Sequence[int]) -> int:
    """The penalty window a step needs: as wide as the widest row's, no wider.

    ``ranges[i]`` is row ``i``'s ``repetition_penalty_range`` (0: its whole history) and
    ``seen[i]`` the length of its history now.
    """
    return max((min(r or s, s) for r, s in zip(ranges, seen, strict=True)), default=0)


def history_window(hist: torch.Tensor, hlen: torch.Tensor, ranges: torch.Tensor,
                   width: int) -> torch.Tensor:
    """The penalty window of every row, read from its history: int64 ``[B, width]``.

    ``hist`` ``[B, H]`` int64 holds row ``r``'s tokens in ``hist[r, :hlen[r]]``; the window
    is its last ``ranges[r]`` (0: all) entries, right-aligned and ``-1`` padded.
    """
    start = torch.where(ranges > 0, (hlen - ranges).clamp_min(0), 0)
    first = (hlen - width).unsqueeze(1)
    idx = first + torch.arange(width, device=hist.device)
    valid = idx >= start.unsqueeze(1)
    taken = hist.gather(1, idx.clamp(0, hist.shape[1] - 1))
    return torch.where(valid, taken, -1)


def listed_alternatives(ids: Sequence[int], values: Sequence[float],
                        k: int) -> list[tuple[int, float]]:
    """A token's top ``k`` alternatives as ``(id, logprob)`` pairs: a processed row lists
    its surviving tokens only, and the sampler pads the rest with id ``-1``."""
    return [(t, x) for t, x in zip(ids[:k], values[:k], strict=True) if t >= 0]


def book_stop(done: bool | torch.Tensor, bad: bool | torch.Tensor, eot: bool | torch.Tensor,
              count: int | torch.Tensor, max_tokens: int | torch.Tensor
              ) -> tuple[bool | torch.Tensor, int | torch.Tensor, bool | torch.Tensor]:
    """Whether a row keeps the token it just drew, its count of kept tokens after it, and
    whether it stops: the rule of the engine's bookkeeping (``book`` and ``book_eager``).

    A running row (not ``done``) whose draw is not ``bad`` keeps it unless it is its end
    token (``eot``); it stops on a bad draw, on its end token, or once it kept
    ``max_tokens``. Elementwise: the arguments are bool or int64 tensors ``[B]``, or
    Python bools and ints for one row (written with ``== 0`` rather than ``~``, which
    would be the bitwise not of an int).

    Returns
    -------
    (kept, count, done)
        bool, int64 and bool ``[B]`` tensors, or a bool, an int and a bool.
    """
    running = (done == 0) & (bad == 0)
    kept = running & (eot == 0)
    count = count + kept
    return kept, count, (running == 0) | eot | (count >= max_tokens)
