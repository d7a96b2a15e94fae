"""Continuous batching: a fixed set of slots, refilled at host checks as rows finish.

Every slot is a row of the decoder's cache and of the engine's state. At each host check
the rows that finished are harvested and their slots take the next waiting prompts: one
batched prefill of the newcomers into their own cache rows (``decoder.refill``), their
state rows reset (:func:`~lmgen_fast.engine.state.admit`), while the other rows go on.
The step keeps its shape (its CUDA graphs are reused), and a row's noise and output
column follow its own step counter, so a seeded row's tokens do not depend on its slot or
on when it entered. Prompts are admitted longest ``max_tokens`` first, so that the run
ends on short rows. A prompt whose keys and values a slot still holds (another sample of
it, running or just finished) is copied there, not prefilled again. Once the queue is
empty, the batch halves whenever the live rows fit in half of it
(:meth:`Seating.compact`): the tail's long rows do not keep computing empty slots, and the
step takes at most one shape per halving.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch

from lmgen_fast.core.errors import EmptyRowError, GenerationError
from lmgen_fast.core.params import PackedParams, SamplingParams
from lmgen_fast.core.rows import positions_needed, prompt_base, prompt_history, window_width
from lmgen_fast.engine.delivery import Handover, StopWatch, Streamer, raise_bad_rows
from lmgen_fast.engine.grammar import GrammarRows, check_rows, open_rows
from lmgen_fast.engine.plan import Plan, RunOptions
from lmgen_fast.engine.prepare import prepare
from lmgen_fast.engine.results import RowLogprobs, RowPair, empty_logprobs
from lmgen_fast.engine.state import DeviceState, admit, load, owner_of, park
from lmgen_fast.engine.stepper import Stepper


def supports_slots(decoder) -> bool:
    """Whether ``decoder`` takes new prompts into rows of a running batch (continuous
    batching): our cached Llama does; recomputing decoders and transformers' own caches run
    static batches."""
    return callable(getattr(decoder, "refill", None))


class Seating:
    """Rows into slots and out of them: the slot table and the queue of waiting rows.

    Slot ``s`` holds the caller's row ``occupant[s]`` (None: free), which entered at run
    step ``entered[s]``; its next cache position is ``origin[s] + run step``. Admitting
    rows writes their cache rows (``decoder.refill``) and state rows; a :class:`Streamer`
    follows the slots' rows (``streamer``), and so do the grammar matchers (``grammar``,
    None where no row has a grammar; ``grammars`` holds each input row's).

    Length: every refill, park and compaction moves the slot table, the prompts' cache
    holders and the grammar matchers together, in one place.
    """

    def __init__(self, decoder, prompts: Sequence[Sequence[int]],
                 rows: Sequence[SamplingParams], max_tokens: Sequence[int], base: list[int],
                 packed: PackedParams, slots: int, streamer: Streamer):
        self.decoder, self.prompts, self.rows, self.max_tokens = decoder, prompts, rows, max_tokens
        self.base, self.packed, self.streamer = base, packed, streamer
        self.queue = deque(sorted((i for i, m in enumerate(max_tokens) if m > 0),
                                  key=lambda i: -max_tokens[i]))
        self.occupant: list[int | None] = [None] * slots
        self.entered = [0] * slots
        self.origin = [0] * slots
        self.grammar: GrammarRows | None = None
        self.grammars: Sequence | None = None
        # Prompt -> a slot whose cache holds its keys and values (the last row admitted
        # with it, running or just finished, until the slot is parked or taken).
        self.held: dict[tuple[int, ...], int] = {}

    def live(self) -> list[int]:
        """The slots that hold a row."""
        return [s for s, i in enumerate(self.occupant) if i is not None]

    def refill(self, st: DeviceState, free: list[int], step: int) -> None:
        """Give free slots the next waiting prompts (one prefill); park the rest."""
        take = [self.queue.popleft() for _ in range(min(len(free), len(self.queue)))]
        slots, idle = free[: len(take)], free[len(take):]
        for s, i in zip(slots, take, strict=True):
            self.occupant[s], self.entered[s] = i, step
            self.origin[s] = len(self.prompts[i]) - 1 - step
        self.streamer.restart(slots)
        for s in idle:
            self.origin[s] = -step
        bound = max(self.origin) + step  # the largest next position over every slot
        dev = st.layout.device
        if take:
            base = [self.base[i] for i in take]
            admit(st, torch.tensor(slots, device=dev),
                  self.packed.take(torch.tensor(take, device=dev)),
                  prompt_history([self.prompts[i] for i in take], base),
                  [self.rows[i].repetition_penalty_range for i in take],
                  [self.max_tokens[i] for i in take], base, [self.prompts[i][-1] for i in take])
            holders = [self.held.get(tuple(self.prompts[i])) for i in take]
            shared = {"copy_from": holders} if any(h is not None for h in holders) else {}
            self.decoder.refill(slots, [self.prompts[i] for i in take], bound, **shared)
            if self.grammar is not None:
                self.grammar.admit(slots, [self.grammars[i] for i in take])
        self.hold(slots, take, idle)
        if idle:
            # Re-parked at every check: their positions, history and columns restart at 0.
            park(st, torch.tensor(idle, device=dev))
            self.decoder.park(idle)
            if self.grammar is not None:
                self.grammar.park(idle)
        self.decoder.kv_len = bound

    def hold(self, slots: list[int], take: list[int], idle: list[int]) -> None:
        """Follow which slot holds which prompt's keys and values: ``slots`` took the rows
        ``take``, ``idle`` were parked (their cache is written from position 0 on)."""
        gone = set(slots) | set(idle)
        self.held = {p: s for p, s in self.held.items() if s not in gone}
        for s, i in zip(slots, take, strict=True):
            self.held[tuple(self.prompts[i])] = s

    def compact(self, st: DeviceState) -> DeviceState:
        """``st`` halved while the live rows fit in half of it: their cache rows, state rows
        and slots move to a smaller layout (the freed slots are parked); ``st`` itself where
        they do not fit."""
        live = self.live()
        size = batch = st.layout.batch
        while size > 1 and (size + 1) // 2 >= len(live):
            size = (size + 1) // 2
        if size == batch:
            return st
        keep = live + [s for s, i in enumerate(self.occupant) if i is None][: size - len(live)]
        self.decoder.compact(keep)
        small = st.compact(torch.tensor(keep, device=st.layout.device))
        small.owner = owner_of(self.decoder)
        self.streamer.keep(keep)
        if self.grammar is not None:
            self.grammar.keep(keep)
        for name in ("occupant", "entered", "origin"):
            setattr(self, name, [getattr(self, name)[s] for s in keep])
        where = {s: j for j, s in enumerate(keep)}
        self.held = {p: where[s] for p, s in self.held.items() if s in where}
        return small


class SlotRun:
    """One call of :func:`lmgen_fast.engine.generate_ids` through slots (made by
    :func:`open_slots`): the decoder's state (:attr:`state`, replaced by a smaller one when
    the tail compacts), a :class:`Stepper` that advances it, the :class:`Seating` of rows in
    slots, and a :class:`Streamer` and a :class:`Handover` that deliver tokens and finished
    rows."""

    def __init__(self, plan: Plan, state: DeviceState, stepper: Stepper, seating: Seating,
                 handover: Handover, stops: StopWatch):
        self.plan, self.state, self.stepper, self.seating = plan, state, stepper, seating
        self.streamer, self.handover, self.stops = seating.streamer, handover, stops
        self.rows, self.max_tokens, self.base = seating.rows, seating.max_tokens, seating.base
        self.steps = self.slot_steps = 0

    def width(self, step: int) -> int:
        """The eager step's window at run step ``step``: as wide as the live rows' widest."""
        if not self.plan.penalized:
            return 0
        seat = self.seating
        live = [(s, seat.occupant[s]) for s in seat.live()]
        return window_width([self.rows[i].repetition_penalty_range for _, i in live],
                            [self.base[i] + step - seat.entered[s] for s, i in live])

    def advance(self, step: int) -> None:
        """Run decode step ``step`` of the run over every slot."""
        self.stepper.advance(self.state, lambda: self.width(step))

    def check(self, step: int) -> bool:
        """Wait for the device at run step ``step``: end rows on their stop strings, stream
        new tokens, raise for bad rows, end rows their grammar completes, harvest finished
        rows and refill their slots. Returns True when all is done."""
        st, seat = self.state, self.seating
        count = st.count.tolist()
        self.stops.cut(st, count, seat.occupant)
        self.streamer.stream(st, count, seat.occupant)
        raise_bad_rows(st, lambda rows: [seat.occupant[r] for r in rows], self.partial)
        check_rows(seat.grammar, st, count, self.handover.stopped, seat.occupant)
        done = st.done.tolist()
        ended = [s for s in seat.live() if done[s]]
        if ended:
            self.handover.harvest(st, ended, count, [seat.occupant[s] for s in ended])
            for s in ended:
                seat.occupant[s] = None
        if not seat.queue and not seat.live():
            return True
        if not seat.queue:
            # The decoder keeps the full state, for the next run's graphs.
            self.state = seat.compact(self.state)
        seat.refill(self.state, [s for s, i in enumerate(seat.occupant) if i is None], step)
        return False

    def partial(self) -> list[list[int]]:
        """Every input row's tokens so far (finished rows' and running rows')."""
        count = self.state.count.tolist()
        ids = {i: pair[0] for i, (pair, _) in self.handover.finished.items()}
        for s, i in enumerate(self.seating.occupant):
            if i is not None:
                ids[i] = self.state.out[s, : count[s]].tolist()
        return [ids.get(i, []) for i in range(len(self.rows))]

    def loop(self) -> None:
        """Step through every slot until every row is done, looking at the host checks:
        every ``sync_every`` steps, or sooner where a row reaches its ``max_tokens`` (its
        slot is free then, and it must not step past its columns)."""
        step, due, seat = 0, 0, self.seating
        try:
            while True:
                if step >= due:
                    if self.check(step):
                        return
                    due = min([step + self.plan.sync_every,
                               *(seat.entered[s] + self.max_tokens[seat.occupant[s]]
                                 for s in seat.live())])
                self.advance(step)
                step += 1
                self.steps = step
                self.slot_steps += self.state.layout.batch
        except EmptyRowError as exc:  # the reference sampler raises at the step
            rows = [seat.occupant[r] for r in exc.rows if seat.occupant[r] is not None]
            raise GenerationError(f"at step {step}: {EmptyRowError(rows)}",
                                  self.partial()) from exc

    def results(self) -> tuple[list[RowPair], list[RowLogprobs | None]]:
        """Every row's result, in the caller's order (each was handed over when it ended)."""
        return self.handover.results()


def open_slots(decoder, prompts: Sequence[Sequence[int]], rows: Sequence[SamplingParams],
               max_tokens: Sequence[int], options: RunOptions, slots: int,
               capture_failed: bool = False) -> SlotRun:
    """A :class:`SlotRun` of ``prompts`` through ``min(slots, len(prompts))`` slots: the
    decoder's cache reserved for them and every part set up, no row admitted yet (the
    run's first check admits them). Rows with ``max_tokens`` 0 are handed over now."""
    n = len(prompts)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} has no tokens")
    slots = min(slots, n)
    base = prompt_base(prompts, rows)
    # A parked slot never gets further than the longest row still running.
    longest = max(range(n), key=lambda i: positions_needed(len(prompts[i]), max_tokens[i]))
    decoder.reserve(slots, len(prompts[longest]), max_tokens[longest])
    device = torch.device(decoder.device)
    got = prepare(decoder, rows, max_tokens, base, options, device, slots,
                  decoder.model.config.vocab_size, capture_failed)
    load(got.state, got.packed.take(torch.arange(slots, device=device)),
         torch.empty(slots, 0, dtype=torch.int64, device=device),
         [0] * slots, [0] * slots, [0] * slots)
    seating = Seating(decoder, prompts, rows, max_tokens, base, got.packed, slots,
                      Streamer(options.callback, slots))
    seating.grammar = grammar = open_rows(options.grammars, slots,
                                          decoder.model.config.vocab_size, device)
    seating.grammars = options.grammars
    handover = Handover(rows, max_tokens, options.on_row, options.return_logprobs,
                        options.end_ids)
    for i, m in enumerate(max_tokens):
        if m == 0:
            handover.finish(i, [], empty_logprobs(rows[i].logprobs))
    return SlotRun(got.plan, got.state,
                   Stepper(decoder, got.plan.graph_cls, grammar and grammar.prepare), seating,
                   handover, StopWatch(options.stop_check, rows, handover))
