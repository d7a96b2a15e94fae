"""Speculative decoding through slots (continuous batching), and :class:`SpeculativeRun`,
the stand-in for the engine's ``generate_ids`` that batch jobs call.

A fixed set of slots is one speculative batch (:class:`~lmgen_fast.speculative.rows.Rows`).
Between rounds the rows that finished are handed over and their slots take the next
waiting prompts: one batched prefill of the newcomers into their own rows of the target's
cache (``decoder.refill``: all but the last prompt token) and of the draft model's
(:meth:`~lmgen_fast.speculative.drafters.ModelDrafter.seat`), their state rows reset
(:meth:`~lmgen_fast.speculative.rows.Rows.seat`). A newcomer's first token comes from the
next round, which starts at its last prompt token, as every round starts at a row's last
kept token. A row's noise follows its own steps and its window its own history, so a
seeded row's tokens do not depend on its slot, on when it entered, or on its batch mates:
they are plain decoding's. Prompts are admitted longest ``max_tokens`` first, as the
engine's slots do. The verify step keeps its shape (``slots`` rows), so its CUDA graphs
are replayed across admissions: they read the rows' parameters from the state's tensors,
which admissions write in place.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch

from lmgen_fast.core.errors import GenerationError
from lmgen_fast.core.params import PackedParams, SamplingParams
from lmgen_fast.core.rows import end_tuple
from lmgen_fast.engine import RowCallback, RowLogprobs, StopCheck, TokenCallback
from lmgen_fast.engine.delivery import Handover
from lmgen_fast.engine.results import empty_logprobs
from lmgen_fast.models.decoder import CachedLlamaDecoder, Decoder
from lmgen_fast.speculative.drafters import Drafter, make_drafter
from lmgen_fast.speculative.rounds import (
    Rounds,
    RowStats,
    check_num_speculative_tokens,
    check_target,
    fast_path,
    generate_ids,
    row_logprobs,
)
from lmgen_fast.speculative.rows import Rows


def takes_slots(drafter: object) -> bool:
    """Whether ``drafter`` can run through slots: it has room made for them (``open``) and
    takes new rows into them (``seat``), as the n-gram and draft-model drafters do."""
    return callable(getattr(drafter, "open", None)) and callable(getattr(drafter, "seat", None))


class SlotRounds:
    """Rounds over ``slots`` rows of state, refilled from a queue of the caller's rows.

    ``occupant[s]`` is the caller's row in slot ``s`` (None: free); finished rows go to
    ``handover`` with their :class:`RowStats` in :attr:`stats`.
    """

    def __init__(self, decoder: CachedLlamaDecoder, drafter: Drafter,
                 prompts: Sequence[Sequence[int]], rows: Sequence[SamplingParams],
                 max_tokens: Sequence[int], ends: tuple[int, ...], k: int, slots: int,
                 handover: Handover, callback: TokenCallback | None, options: dict):
        self.decoder, self.drafter, self.handover = decoder, drafter, handover
        self.prompts, self.rows, self.max_tokens = prompts, rows, max_tokens
        self.queue = deque(sorted((i for i, m in enumerate(max_tokens) if m > 0),
                                  key=lambda i: -max_tokens[i]))
        slots = min(slots, len(self.queue))
        self.occupant: list[int | None] = [None] * slots
        self.stats = [RowStats(0, 0, 0)] * len(prompts)
        # Room for the drafts of a row's last round where the positions allow it (rounds
        # are shortened where they do not), for the row that needs the most.
        limit = decoder.model.config.max_position_embeddings
        room = [max(m, min(m + k, limit - len(p) + 1))
                for p, m in zip(prompts, max_tokens, strict=True)]
        longest = max(self.queue, key=lambda i: len(prompts[i]) + room[i])
        decoder.reserve(slots, len(prompts[longest]), room[longest])
        drafter.open(slots, len(prompts[longest]), room[longest])
        hist_len = max(len(prompts[i]) + max_tokens[i] for i in self.queue) + k + 1
        dev = torch.device(decoder.device)
        table = PackedParams.from_rows(rows, dev, ends, decoder.model.config.vocab_size)
        # Slots start empty (caller's rows 0.., with nothing to do) until seated from table.
        self.state = st = Rows([[0]] * slots, rows[:slots], [0] * slots, dev, hist_len, table=table,
                               penalized=any(r.penalized for r in rows), end_ids=ends)
        verify = fast_path(decoder, st, rows, options["backend"], options["cuda_graph"],
                           options["return_logprobs"])
        told = None if callback is None else (lambda r, tok: callback(st.names[r], tok))
        self.rounds = Rounds(decoder, drafter, st, k, told,
                             options["return_logprobs"], verify)

    def harvest(self) -> None:
        """Hand over the rows that finished (or complete a stop string), freeing their
        slots."""
        st = self.state
        st.cut_stops(self.handover, [s for s, i in enumerate(self.occupant) if i is not None])
        for s, i in enumerate(self.occupant):
            if i is not None and st.done[s]:
                self.stats[i] = RowStats(st.forwards[s], st.accepted[s], st.proposed[s])
                self.handover.finish(i, list(st.out[s]), row_logprobs(st, s), st.ended[s])
                self.occupant[s] = None

    def refill(self) -> None:
        """Seat the next waiting rows in the free slots: one prefill of their prompts into
        the target's cache rows, and the drafter's."""
        free = [s for s, i in enumerate(self.occupant) if i is None]
        take = [self.queue.popleft() for _ in range(min(len(free), len(self.queue)))]
        if not take:
            return
        seated, prompts = free[: len(take)], [self.prompts[i] for i in take]
        st = self.state
        st.seat(seated, prompts, [self.rows[i] for i in take],
                [self.max_tokens[i] for i in take], take)
        self.decoder.refill(seated, prompts, max(len(p) for p in prompts))
        self.drafter.seat(seated, prompts)
        for s, i in zip(seated, take, strict=True):
            self.occupant[s] = i
            st.forwards[s] = 1  # the refill: the prefill of a static batch

    def partial(self) -> list[list[int]]:
        """Every caller's row's tokens so far (finished rows' and running rows')."""
        ids = {i: pair[0] for i, (pair, _) in self.handover.finished.items()}
        for s, i in enumerate(self.occupant):
            if i is not None:
                ids[i] = list(self.state.out[s])
        return [ids.get(i, []) for i in range(len(self.prompts))]

    def loop(self) -> None:
        """Round after round until every row is done, seating rows between rounds."""
        while True:
            self.harvest()
            self.refill()
            if all(i is None for i in self.occupant):
                return
            try:
                self.rounds.round()
            except GenerationError as exc:  # its partial is by slot: the caller's rows
                raise GenerationError(str(exc), self.partial()) from exc


@torch.inference_mode()
def generate_slots(
    decoder: Decoder,
    prompts: Sequence[Sequence[int]],
    rows: Sequence[SamplingParams],
    max_tokens: Sequence[int],
    eos_id: int | Sequence[int],
    *,
    speculative,
    slots: int,
    num_speculative_tokens: int = 4,
    callback: TokenCallback | None = None,
    return_logprobs: bool = False,
    cuda_graph: bool = True,
    backend: str = "auto",
    on_row: RowCallback | None = None,
    stop_check: StopCheck | None = None,
) -> tuple[list[tuple[list[int], str]], list[RowLogprobs], list[RowStats]]:
    """:func:`~lmgen_fast.speculative.rounds.generate_ids` through ``slots`` slots: the
    same tokens, rows entering free slots between rounds and handed to ``on_row`` as they
    finish.

    Parameters and results are those of
    :func:`~lmgen_fast.speculative.rounds.generate_ids`, plus ``slots`` (``>= 1``), the rows
    decoded at once. ``speculative`` must be a drafter that :func:`takes_slots` ("ngram" or
    a draft model). A row's :class:`RowStats` counts its prefill into its slot as one
    target forward.

    Raises
    ------
    ValueError
        As ``generate_ids``, and for a drafter that cannot run through slots.
    GenerationError
        A row had nothing to sample at a token it would keep (``partial`` by caller's row).
    """
    k = check_num_speculative_tokens(num_speculative_tokens)
    drafter = make_drafter(speculative)
    if not takes_slots(drafter):
        raise ValueError(f"this drafter ({type(drafter).__name__}) cannot run through slots: "
                         "it needs open() and seat()")
    ends = end_tuple(eos_id)
    handover = Handover(rows, max_tokens, on_row, return_logprobs, ends, stop_check)
    for i, (row, m) in enumerate(zip(rows, max_tokens, strict=True)):
        if m == 0:
            handover.finish(i, [], empty_logprobs(row.logprobs))
    stats = [RowStats(0, 0, 0)] * len(prompts)
    if max(max_tokens, default=0) > 0:
        decoder = check_target(decoder, drafter)
        decoder.busy = True
        try:
            run = SlotRounds(decoder, drafter, prompts, rows, max_tokens, ends, k, slots,
                             handover, callback, dict(backend=backend, cuda_graph=cuda_graph,
                                                      return_logprobs=return_logprobs))
            run.loop()
            stats = run.stats
        finally:
            decoder.busy = False
    done = [handover.finished[i] for i in range(len(prompts))]
    return [pair for pair, _ in done], [lp for _, lp in done], stats


class SpeculativeRun:
    """Stands in for :func:`lmgen_fast.engine.generate_ids` (same call, same results) in
    batch jobs, decoding speculatively and adding up every row's :class:`RowStats`: through
    ``max_batch_size`` slots where the call has more rows than that (and the drafter
    :func:`takes_slots`), else as one batch.

    Parameters
    ----------
    speculative, num_speculative_tokens
        As for :func:`~lmgen_fast.speculative.rounds.generate_ids`.
    """

    def __init__(self, speculative, num_speculative_tokens: int = 4):
        self.drafter = make_drafter(speculative)
        self.k = check_num_speculative_tokens(num_speculative_tokens)
        self.totals = RowStats(0, 0, 0)

    def __call__(self, decoder, prompts, rows, max_tokens, eos_id, *, callback=None,
                 return_logprobs: bool = False, cuda_graph: bool = True,
                 backend: str = "auto", on_row: RowCallback | None = None,
                 max_batch_size: int | None = None, **engine_options):
        # The other engine_options (sync_every, stats) do not apply: the host looks at
        # every round, and rounds are not decode steps.
        options = dict(speculative=self.drafter, num_speculative_tokens=self.k,
                       callback=callback, return_logprobs=return_logprobs,
                       cuda_graph=cuda_graph, backend=backend, on_row=on_row,
                       stop_check=engine_options.get("stop_check"))
        if (max_batch_size is not None and len(prompts) > max_batch_size
                and takes_slots(self.drafter)):
            pairs, lps, stats = generate_slots(decoder, prompts, rows, max_tokens, eos_id,
                                               slots=max_batch_size, **options)
        else:
            pairs, lps, stats = generate_ids(decoder, prompts, rows, max_tokens, eos_id,
                                             **options)
        self.totals = RowStats(*(sum(col) for col in zip(self.totals, *stats, strict=True)))
        return (pairs, lps) if return_logprobs else pairs
