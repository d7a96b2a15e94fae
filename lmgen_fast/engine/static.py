"""A static batch: every row prefilled at once, then one step per token until the longest
row is done; the host looks every ``sync_every`` steps."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmgen_fast.core.errors import EmptyRowError, GenerationError
from lmgen_fast.core.params import SamplingParams
from lmgen_fast.core.rows import prompt_base, prompt_history, window_width
from lmgen_fast.engine.delivery import Handover, StopWatch, Streamer, raise_bad_rows
from lmgen_fast.engine.grammar import check_rows, open_rows
from lmgen_fast.engine.plan import RunOptions
from lmgen_fast.engine.prepare import prepare
from lmgen_fast.engine.results import RowLogprobs, RowPair
from lmgen_fast.engine.state import load
from lmgen_fast.engine.stepper import Stepper


class StaticRun:
    """One batch of :func:`lmgen_fast.engine.generate_ids`: the decoder's state
    (:attr:`state`), a :class:`Stepper` that advances it, a :class:`Streamer` and a
    :class:`Handover` that deliver tokens and rows. The prefill happens here; the first
    token is sampled from its logits by :meth:`loop`."""

    def __init__(self, decoder, prompts: Sequence[Sequence[int]],
                 rows: Sequence[SamplingParams], max_tokens: Sequence[int],
                 options: RunOptions, capture_failed: bool = False):
        batch = len(prompts)
        logits = decoder.prefill(prompts, max(max_tokens))
        self.first_logits: torch.Tensor | None = logits
        self.rows, self.max_tokens, self.total = rows, max_tokens, max(max_tokens)
        self.base = prompt_base(prompts, rows)
        got = prepare(decoder, rows, max_tokens, self.base, options, logits.device, batch,
                      logits.shape[1], capture_failed)
        self.plan, self.state = got.plan, got.state
        self.grammar = open_rows(options.grammars, batch, logits.shape[1], logits.device,
                                 admit=True)
        self.stepper = Stepper(decoder, got.plan.graph_cls, self.grammar and self.grammar.prepare)
        self.streamer = Streamer(options.callback, batch)
        self.handover = Handover(rows, max_tokens, options.on_row, options.return_logprobs,
                                 options.end_ids)
        self.stops = StopWatch(options.stop_check, rows, self.handover)
        self.identity = list(range(batch))
        hist0 = prompt_history(prompts, self.base)
        load(self.state, got.packed, hist0.to(self.state.layout.device),
             [r.repetition_penalty_range for r in rows], list(max_tokens), self.base)
        self.steps = self.slot_steps = 0

    def width(self, step: int) -> int:
        """The eager step's window: as wide as the longest window at ``step``, no wider."""
        if not self.plan.penalized:
            return 0
        return window_width([r.repetition_penalty_range for r in self.rows],
                            [b + step for b in self.base])

    def advance(self, step: int) -> None:
        """Run decode step ``step`` (the model on the last tokens, then sampling)."""
        self.stepper.advance(self.state, lambda: self.width(step))

    def check(self) -> bool:
        """Wait for the device: end rows on their stop strings, hand new tokens to the
        callback, raise for bad rows, end rows their grammar completes; True when all done."""
        st = self.state
        count = st.count.tolist()
        self.stops.cut(st, count, self.identity)
        self.streamer.stream(st, count, self.identity)
        raise_bad_rows(st, lambda rows: rows, self.partial)
        check_rows(self.grammar, st, count, self.handover.stopped, self.identity)
        return bool(st.done.all())

    def partial(self) -> list[list[int]]:
        """Every row's tokens so far."""
        count = self.state.count.tolist()
        out = self.state.out[:, : max(count, default=0)].tolist()
        return [o[:c] for o, c in zip(out, count, strict=True)]

    def loop(self) -> None:
        """Sample the first token from the prefill's logits, then step until every row is
        done (or the longest row's cap), looking every ``sync_every`` steps."""
        step, sync_every = 0, self.plan.sync_every
        try:
            self.stepper.sample(self.state, self.first_logits, self.width(0))
            self.first_logits = None
            step = 1
            while True:
                if step >= self.total or step % sync_every == 0:
                    if self.check() or step >= self.total:
                        return
                self.advance(step)
                step += 1
        except EmptyRowError as exc:  # the reference sampler raises at the step
            self.check()
            raise GenerationError(f"at step {step}: {exc}", self.partial()) from exc
        finally:
            self.steps = step
            self.slot_steps = step * self.state.layout.batch

    def results(self) -> tuple[list[RowPair], list[RowLogprobs | None]]:
        """Every row handed over (``on_row``) and returned, in the caller's order."""
        self.handover.harvest(self.state, self.identity, self.state.count.tolist(),
                              self.identity)
        return self.handover.results()
