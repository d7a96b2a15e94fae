"""Speculative decoding that returns exactly the tokens of plain decoding.

A seeded row's token at step ``s`` is the winner of the race ``argmax_i(z_i + g(seed, s, i))``
(docs/semantics.md section 4): the noise is a pure function of (seed, step, token). So a
proposed token is checked by running the target's own race at that step, with the same
noise: it is accepted iff it is the target's winner. At the first mismatch the row takes the
target's winner and the round ends. Each round is one target forward over ``k + 1``
positions of every row (the row's last token, then its ``k`` drafts, at the row's own
positions) and ONE sampler call on the flattened ``[B * (k + 1), V]`` logits: position ``j``
of a row samples with its step ``s + j`` and the penalty window of its history plus its
first ``j`` drafts. A row keeps its accepted drafts and one token of the target's, so a
round gives each row 1 to ``k + 1`` tokens (:mod:`~lmgen_fast.speculative.accept`); only
the number of target forwards changes.

Drafters (:mod:`~lmgen_fast.speculative.drafters`) propose ``[B, k]`` tokens, ``-1``
where they have nothing (such a position is never accepted). Cache slots past a row's
accepted prefix hold rejected drafts; they are overwritten by the next round, which starts
at the row's last kept token.

The sampler is the engine's: the Triton kernels where the backend picks them (CUDA, or
the interpreter on the CPU), on the flattened positions with each its own step and penalty
window (:func:`~lmgen_fast.speculative.rows.sample_positions`), else the reference; a kernel
failure falls back to the reference with one warning, as in plain decoding. On CUDA the
verify step of a round (the forward and the sampler) replays as a CUDA graph
(:mod:`~lmgen_fast.speculative.verify`); drafting and bookkeeping stay on the host, one wait
per round.

The one caveat: the verify forward over ``k + 1`` positions and a one-token decode step
compute the same logits with a different summation order (a few ulps apart), so at a
near-tie between the two best race keys a token can differ from plain decoding's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from lmgen_fast.core.params import SamplingParams, check_int
from lmgen_fast.core.rows import end_tuple, finish_reason
from lmgen_fast.engine import RowCallback, RowLogprobs, StopCheck, TokenCallback
from lmgen_fast.engine.delivery import Handover
from lmgen_fast.engine.prepare import read_facts
from lmgen_fast.engine.results import empty_logprobs
from lmgen_fast.models.decoder import CachedLlamaDecoder, Decoder
from lmgen_fast.runtime import graphs
from lmgen_fast.speculative import cache
from lmgen_fast.speculative import rows as spec_rows
from lmgen_fast.speculative.accept import book_round
from lmgen_fast.speculative.drafters import Drafter, make_drafter
from lmgen_fast.speculative.rows import Rows, kernel_plan
from lmgen_fast.speculative.verify import VerifyGraphs


class RowStats(NamedTuple):
    """One row's cost: target forwards it took part in (the prefill included), drafted
    tokens the target confirmed and the row used, and drafted tokens the row could have
    used (within its ``max_tokens``, none after a drafted EOT) that the target checked."""

    target_forwards: int
    accepted_drafts: int
    proposed_drafts: int


def check_num_speculative_tokens(k: object) -> int:
    """Raise ValueError unless ``k`` is an int >= 1; return it."""
    return check_int("num_speculative_tokens", k, 1)


class Rounds:
    """One call's rounds after the target's prefill: each drafts, verifies (one target
    forward and one sampler call, or one graph replay) and books what every row keeps."""

    def __init__(self, decoder: CachedLlamaDecoder, drafter: Drafter, state: Rows, k: int,
                 callback: TokenCallback | None, return_logprobs: bool,
                 verify: VerifyGraphs | None):
        self.decoder, self.drafter, self.state, self.k = decoder, drafter, state, k
        self.callback, self.return_logprobs = callback, return_logprobs
        self.verify = verify
        self.none = torch.empty(state.batch, 0, dtype=torch.int64, device=state.device)
        self.cap = cache.capacity(decoder)
        if hasattr(drafter, "capacity"):
            self.cap = min(self.cap, drafter.capacity() + 1)

    def drafts(self) -> torch.Tensor:
        """This round's usable drafts, ``[B, kr]`` int64, ``kr`` up to the last any active
        row can use."""
        st = self.state
        active = st.active()
        room = min(self.cap - len(st.seqs[r]) for r in active)
        left = max(st.max_tokens[r] - len(st.out[r]) for r in active)
        kr = max(0, min(self.k, room, left - 1))
        for r in active:
            if st.retry[r]:
                kr = 0
                cache.clear_slots(self.decoder, r, len(st.seqs[r]))
        drafts = self.drafter.propose(st, kr) if kr else self.none
        drafts = st.usable(drafts)
        # Positions past every active row's last proposal cannot be accepted: a round
        # without any proposal is a plain one-token step.
        proposed = (drafts >= 0).cumprod(dim=1).sum(dim=1).tolist()
        return drafts[:, :max(proposed[r] for r in active)]

    def round(self) -> None:
        st, dev = self.state, self.state.device
        drafts = self.drafts()
        t = drafts.shape[1] + 1
        last = torch.tensor([s[-1] for s in st.seqs], device=dev)
        ids = torch.cat([last.unsqueeze(1), drafts.clamp_min(0)], dim=1)
        end = torch.tensor([len(s) - 1 for s in st.seqs], device=dev)
        positions = (end.unsqueeze(1) + torch.arange(t, device=dev)).clamp_max(self.cap - 1)
        top = int(positions.max())
        if self.verify is not None and not self.verify.broken:
            got = self.verify.run(ids, positions, drafts, top)
        else:
            logits = cache.forward(self.decoder, ids, positions, top)
            got = st.sample(logits, drafts, return_logprobs=self.return_logprobs)
        book_round(st, got, drafts.tolist(), t, self.callback)


def fast_path(decoder: CachedLlamaDecoder, state: Rows, rows: Sequence[SamplingParams],
              backend: str, cuda_graph: bool, return_logprobs: bool) -> VerifyGraphs | None:
    """Set ``state`` and ``decoder`` up as the engine would for ``rows`` (every row the call
    will run): the Triton sampler where the backend picks it (``state.kernel``), with it the
    decoder's fused path; returns the verify graphs where rounds replay them (None: eager
    verify steps)."""
    dev = state.device
    facts = read_facts(decoder, backend, dev, capture_failed=False)
    if facts.fused is not None:
        decoder.fused = facts.fused
    if facts.kernel:
        state.kernel = kernel_plan(rows)
    graph_cls = (graphs.graph_backend(dev) if cuda_graph and spec_rows.fixed_shapes(dev)
                 else None)
    if graph_cls is None or any(r.logprobs for r in rows):
        return None
    return VerifyGraphs(graph_cls, decoder, state, return_logprobs)


def check_target(decoder: Decoder, drafter: Drafter) -> CachedLlamaDecoder:
    """``decoder``, checked: a cached Llama that is not generating, with the drafter's
    vocabulary (ValueError, RuntimeError otherwise)."""
    if not isinstance(decoder, CachedLlamaDecoder):
        raise ValueError(
            f"speculative= needs a model lmgen-fast runs with its own KV cache (our Llama, a "
            f"module laid out like the article's, a transformers Llama); this model runs on "
            f"{type(decoder).__name__}")
    if decoder.busy:
        raise RuntimeError("this decoder is already generating; use another one (wrap(model)) "
                           "for a nested call")
    vocab = decoder.model.config.vocab_size
    if getattr(drafter, "vocab", vocab) != vocab:
        raise ValueError(f"speculative= draft model has {drafter.vocab} tokens, the model "
                         f"{vocab}: they must share the tokenizer")
    return decoder


def row_logprobs(state: Rows, r: int) -> RowLogprobs:
    """Row ``r``'s log-probabilities so far (its top alternatives where it asked for them)."""
    return RowLogprobs(state.token_lp[r], state.top[r] if state.top_n[r] > 0 else None)


def _hand_over(state: Rows, handover: Handover, told: set[int]) -> None:
    """Hand every row that finished since the last call to ``handover`` (its ``on_row``),
    after ending those whose tokens complete a stop string."""
    state.cut_stops(handover, [r for r in range(state.batch) if r not in told])
    for r in range(state.batch):
        if state.done[r] and r not in told:
            told.add(r)
            handover.finish(r, list(state.out[r]), row_logprobs(state, r), state.ended[r])


def _decode(decoder: CachedLlamaDecoder, drafter: Drafter, prompts: Sequence[Sequence[int]],
            rows: Sequence[SamplingParams], max_tokens: Sequence[int], ends: tuple[int, ...],
            k: int,
            callback: TokenCallback | None, return_logprobs: bool, cuda_graph: bool,
            backend: str, handover: Handover) -> Rows:
    """Prefill, book the prefill's tokens, then run rounds until every row is done, each
    row handed over as it finishes."""
    total = max(max_tokens)
    limit = decoder.model.config.max_position_embeddings
    longest = max(len(p) for p in prompts)
    # Room for the drafts of the last round where the positions allow it; rounds are
    # shortened where they do not.
    max_new = max(total, min(total + k, limit - longest + 1))
    logits = decoder.prefill(prompts, max_new)
    dev = logits.device
    state = Rows(prompts, rows, max_tokens, dev, longest + total + k + 1, end_ids=ends,
                 vocab_size=logits.shape[-1])
    verify = fast_path(decoder, state, rows, backend, cuda_graph, return_logprobs)
    drafter.start(state, prompts, max_new)
    none = torch.empty(state.batch, 0, dtype=torch.int64, device=dev)
    book_round(state, state.sample(logits.unsqueeze(1), none, return_logprobs=return_logprobs),
               [[]] * state.batch, 1, callback)
    rounds = Rounds(decoder, drafter, state, k, callback, return_logprobs, verify)
    told: set[int] = set()
    _hand_over(state, handover, told)
    while not all(state.done):
        rounds.round()
        _hand_over(state, handover, told)
    return state


@torch.inference_mode()
def generate_ids(
    decoder: Decoder,
    prompts: Sequence[Sequence[int]],
    rows: Sequence[SamplingParams],
    max_tokens: Sequence[int],
    eos_id: int | Sequence[int],
    *,
    speculative,
    num_speculative_tokens: int = 4,
    callback: TokenCallback | None = None,
    return_logprobs: bool = False,
    cuda_graph: bool = True,
    backend: str = "auto",
    on_row: RowCallback | None = None,
    stop_check: StopCheck | None = None,
) -> tuple[list[tuple[list[int], str]], list[RowLogprobs], list[RowStats]]:
    """:func:`lmgen_fast.engine.generate_ids` by speculative rounds: the same tokens.

    Parameters
    ----------
    decoder
        The target's decoder; it must be a :class:`~lmgen_fast.models.decoder.CachedLlamaDecoder`
        (models run by full recompute or by transformers' own cache are refused).
    prompts, rows, max_tokens, eos_id, callback
        As for :func:`lmgen_fast.engine.generate_ids` (``callback`` once a round).
    speculative
        "ngram", a draft model (see :class:`~lmgen_fast.speculative.drafters.ModelDrafter`)
        or a :class:`~lmgen_fast.speculative.drafters.Drafter`.
    num_speculative_tokens : int
        Drafts per row and round, ``k >= 1``: each round's target forward covers ``k + 1``
        positions of every row.
    return_logprobs : bool
        Fill the :class:`RowLogprobs` (empty lists otherwise).
    cuda_graph : bool
        On CUDA, replay each round's verify step (the target's forward over ``k + 1``
        positions and the sampler) as a CUDA graph, captured per number of positions and
        attention length and kept for the call. Not with top alternatives
        (``logprobs > 0``), which need the host. Same tokens either way.
    backend : str
        The sampler of every round, as for :func:`lmgen_fast.engine.generate_ids`: "auto"
        (the Triton kernels on CUDA), "reference" or "triton". Same tokens on each.
    on_row : callable, optional
        ``on_row(row, (token_ids, finish_reason), row_logprobs)`` once per row, after the
        round it finished in (``row_logprobs`` None without ``return_logprobs``).
    stop_check : callable, optional
        Stop strings, as for :func:`lmgen_fast.engine.generate_ids`, asked after every round.

    Returns
    -------
    (pairs, logprobs, stats)
        Per row ``(token_ids, finish_reason)``, its :class:`RowLogprobs` and its
        :class:`RowStats`.

    Raises
    ------
    ValueError
        Bad ``speculative``, ``num_speculative_tokens`` or ``backend``, a decoder without
        a usable cache, a draft model with another vocabulary.
    GenerationError
        A row had nothing to sample at a token it would keep.
    """
    k = check_num_speculative_tokens(num_speculative_tokens)
    drafter = make_drafter(speculative)
    decoder = check_target(decoder, drafter)
    batch = len(prompts)
    total = max(max_tokens, default=0)
    ends = end_tuple(eos_id)
    handover = Handover(rows, max_tokens, on_row, return_logprobs, ends, stop_check)
    if total == 0:
        for r, row in enumerate(rows):
            handover.finish(r, [], empty_logprobs(row.logprobs))
        return ([([], finish_reason(0, m)) for m in max_tokens],
                [empty_logprobs(r.logprobs) for r in rows], [RowStats(0, 0, 0)] * batch)
    decoder.busy = True
    try:
        state = _decode(decoder, drafter, prompts, rows, max_tokens, ends, k, callback,
                        return_logprobs, cuda_graph, backend, handover)
    finally:
        decoder.busy = False
    pairs = handover.results()[0]
    lps = [row_logprobs(state, r) for r in range(batch)]
    stats = [RowStats(*s) for s in zip(state.forwards, state.accepted, state.proposed,
                                       strict=True)]
    return pairs, lps, stats
