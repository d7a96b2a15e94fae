"""Running a job's rows through a decoder: continuous batching through slots where the
decoder takes them (else static batches of similar prompt length), each result written as
one JSON line the moment its row finishes. :mod:`lmgen_fast.jobs` is the command around it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lmgen_fast.api.generate import GenerationError, generate_ids
from lmgen_fast.api.requests import Samples
from lmgen_fast.api.stops import StopStrings, finish_row
from lmgen_fast.api.structured import row_grammars
from lmgen_fast.core.progress import Progress
from lmgen_fast.engine import DecodeStats, supports_slots
from lmgen_fast.jobs.inputs import JobError, JobFailed, JobRow, plan_batches
from lmgen_fast.jobs.jsonl import ResultWriter


@dataclass
class RunStats:
    """What one process did: rows and tokens generated, rows found done, time spent, and
    the device's work: decode steps and slot-steps (rows times steps)."""

    rows: int = 0
    tokens: int = 0
    already_done: int = 0
    seconds: float = 0.0
    steps: int = 0
    slot_steps: int = 0

    @property
    def slot_utilization(self) -> float:
        """Kept tokens over slot-steps, in percent (0 when nothing ran)."""
        return 100.0 * self.tokens / self.slot_steps if self.slot_steps else 0.0


# Seconds between fsyncs while rows finish one by one: a power loss costs at most this much.
SYNC_SECONDS = 1.0


def _batches(rows: Sequence[JobRow], prompt_ids: Sequence[Sequence[int]], batch_size: int,
             limit: int | None, slots: bool) -> list[list[int]]:
    """The row indices of each call of the generator: with slots, one pass for the rows
    that ask for log-probabilities and one for the others; else :func:`plan_batches`."""
    if slots:
        # Log-probabilities cost work on every step: only for the pass of rows that ask.
        asking = [i for i, r in enumerate(rows) if r.params.logprobs > 0]
        others = [i for i, r in enumerate(rows) if r.params.logprobs <= 0]
        return [b for b in (others, asking) if b]
    return plan_batches(rows, prompt_ids, batch_size, limit)


def _result(row: JobRow, adapter, stops: StopStrings | None, k: int, pair, lp) -> dict:
    """One sample's fields: text, token_ids, finish_reason, num_tokens, stop_reason where a
    stop fired, and log-probabilities when the row asked (``lp``: the engine's, or None).
    ``k`` is the sample's row in the engine call, whose stop strings ``stops`` checks."""
    ids, text, reason, stop_reason = finish_row(stops, adapter.decode, k, pair)
    record = {"text": text, "token_ids": ids, "finish_reason": reason,
              "stop_reason": stop_reason, "num_tokens": len(ids)}
    if row.params.logprobs > 0 and lp is not None:
        record["logprobs"] = lp.logprobs[: len(ids)]
        record["top_logprobs"] = lp.top_logprobs[: len(ids)]
        record["logprobs_mode"] = row.params.logprobs_mode
    return record


def _record(row: JobRow, results: list[dict]) -> dict:
    """The result line of one row: its id, then its one result's fields (``stop_reason``
    only where a stop fired, as lines were before stops), or ``"samples"``, every sample's
    fields in sample order, for a row that asked for ``n``."""
    if row.samples:
        return {"id": row.id, "samples": results}
    one = results[0]
    return {"id": row.id, **{k: v for k, v in one.items()
                             if k != "stop_reason" or one["finish_reason"] == "stop"}}


class _Lines:
    """One batch of rows as the generator's rows: each row's ``n`` samples, adjacent (the
    decoder prefills their shared prompt once, see
    :class:`lmgen_fast.api.requests.Samples`), and each row's results until all its
    samples are in."""

    def __init__(self, rows: Sequence[JobRow], prompt_ids: Sequence[Sequence[int]],
                 batch: list[int], adapter):
        self.rows, self.batch, self.adapter = rows, batch, adapter
        self.samples = Samples([list(prompt_ids[i]) for i in batch],
                               [rows[i].params for i in batch],
                               [rows[i].max_tokens for i in batch])
        self.stops = (StopStrings(adapter.decode, self.samples.rows)
                      if any(r.stop for r in self.samples.rows) else None)
        self.got: dict[int, dict[int, dict]] = {}

    def has(self, k: int) -> bool:
        """Whether generator row ``k``'s result is in."""
        i = self.batch[self.samples.prompt_index[k]]
        return self.samples.sample_index[k] in self.got.get(i, {})

    def add(self, k: int, pair, lp) -> tuple[int, list[dict]] | None:
        """Take generator row ``k``'s result; once its row has all its samples, return the
        row's index and their results in sample order (a row is written whole: a resumed
        run sees all its samples or none)."""
        i = self.batch[self.samples.prompt_index[k]]
        mine = self.got.setdefault(i, {})
        mine[self.samples.sample_index[k]] = _result(self.rows[i], self.adapter, self.stops,
                                                     k, pair, lp)
        if len(mine) < self.rows[i].params.n:
            return None
        return i, [mine[j] for j in range(self.rows[i].params.n)]


def run_rows(
    decoder,
    adapter,
    rows: Sequence[JobRow],
    prompt_ids: Sequence[Sequence[int]],
    writer: ResultWriter,
    *,
    batch_size: int,
    backend: str = "auto",
    limit: int | None = None,
    progress: Progress | None = None,
    generate: Callable | None = None,
    cuda_graph: bool = True,
    sync_every: int | None = None,
    static: bool = False,
    end_ids: Sequence[int] | None = None,
) -> RunStats:
    """Generate ``rows`` and append one result line per row to ``writer`` as it finishes.

    Parameters
    ----------
    decoder
        From :func:`lmgen_fast.wrap`; reused for every batch.
    adapter
        The tokenizer adapter (:func:`lmgen_fast.api.tokenization.adapt_tokenizer`).
    rows, prompt_ids
        The rows to generate and their prompt ids.
    writer : ResultWriter
        Where results go; synced after every batch, and every second or so in between.
    batch_size : int
        Rows decoded at once (samples: a row counts its ``n``): the slots of continuous
        batching, or the rows of a batch.
    backend : str
        The sampling backend.
    limit : int, optional
        The model's position limit (see :func:`plan_batches`).
    progress : Progress, optional
        Told of every token and every finished row.
    generate : callable, optional
        Replaces :func:`lmgen_fast.generate.generate_ids` (speculative decoding, tests).
    cuda_graph, sync_every
        Passed to :func:`lmgen_fast.generate.generate_ids`.
    static : bool
        Batches of similar prompt length, each run to its longest row. Otherwise, where the
        decoder :func:`supports_slots`, ``batch_size`` slots: one pass for the rows that ask
        for log-probabilities, one for the others.
    end_ids : sequence of int, optional
        The ids that end every row (default: the tokenizer's end token alone; see
        :func:`lmgen_fast.api.requests.end_ids`).

    A row with ``n`` samples goes to the generator as ``n`` adjacent rows (sample ``j``
    seeded ``s + j``, see :class:`lmgen_fast.api.requests.Samples`) and is written as one
    line once all of them are done.

    Returns
    -------
    RunStats
    """
    generate = generate or generate_ids
    stats = RunStats()
    counts = DecodeStats()
    start = last_sync = time.perf_counter()
    callback = progress.on_token if progress is not None else None
    written: set[int] = set()
    slots = not static and supports_slots(decoder)
    ends = (adapter.eos_id,) if end_ids is None else tuple(end_ids)
    eos = ends[0] if len(ends) == 1 else ends  # one end id: as every generator takes it
    for batch in _batches(rows, prompt_ids, batch_size, limit, slots):
        lines = _Lines(rows, prompt_ids, batch, adapter)
        extra: dict = ({"return_logprobs": True}
                       if any(rows[i].params.logprobs > 0 for i in batch) else {})
        extra.update({"max_batch_size": batch_size} if slots else {})
        try:
            grammars = row_grammars(decoder, adapter, lines.samples.rows, ends,
                                    speculative=generate is not generate_ids)
        except ValueError as err:  # grammar rows with --speculative
            raise JobError(str(err)) from None
        extra.update({"grammars": grammars} if grammars is not None else {})
        extra.update({"stop_check": lines.stops} if lines.stops is not None else {})

        def finished(k: int, pair, lp, lines=lines) -> None:
            nonlocal last_sync
            done = lines.add(k, pair, lp)
            if done is None:
                return
            i, results = done
            writer.write(_record(rows[i], results))
            written.add(i)
            stats.rows += 1
            stats.tokens += sum(r["num_tokens"] for r in results)
            if progress is not None:
                progress.add_rows(1)
            if time.perf_counter() - last_sync >= SYNC_SECONDS:
                writer.sync()
                last_sync = time.perf_counter()

        try:
            got = generate(
                decoder, lines.samples.ids, lines.samples.rows, lines.samples.caps, eos,
                backend=backend, callback=callback, cuda_graph=cuda_graph,
                sync_every=sync_every, on_row=finished, stats=counts, **extra,
            )
        except GenerationError as err:
            pending = [i for i in batch if i not in written]
            ids = ", ".join(rows[i].key for i in pending[:5])
            more = f" and {len(pending) - 5} more" if len(pending) > 5 else ""
            raise JobFailed(f"generation failed for ids {ids}{more}: {err}; the rows "
                            f"finished before ({stats.rows} in this run) are in the output, "
                            "and a rerun resumes there") from None
        finally:
            writer.sync()
            last_sync = time.perf_counter()
        pairs, lps = got if extra.get("return_logprobs") else (got, [None] * len(got))
        for k in range(len(pairs)):
            if not lines.has(k):
                finished(k, pairs[k], lps[k])  # a stand-in for generate_ids without on_row
        writer.sync()
    stats.steps, stats.slot_steps = counts.steps, counts.slot_steps
    stats.seconds = time.perf_counter() - start
    return stats
