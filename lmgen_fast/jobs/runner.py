"""Running a job's rows through a decoder: continuous batching through slots where the
decoder takes them (else static batches of similar prompt length), each result written as
one JSON line the moment its row finishes. :mod:`lmgen_fast.jobs` is the command around it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lmgen_fast.api.generate import GenerationError, generate_ids
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


def _record(row: JobRow, text: str, token_ids: list[int], reason: str, lp) -> dict:
    """The result line of one row; ``lp`` (its log-probabilities) only for a row that asked
    for them, else None."""
    record = {
        "id": row.id, "text": text, "token_ids": token_ids,
        "finish_reason": reason, "num_tokens": len(token_ids),
    }
    if lp is not None:
        record["logprobs"] = lp.logprobs
        record["top_logprobs"] = lp.top_logprobs
        record["logprobs_mode"] = row.params.logprobs_mode
    return record


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
        Rows decoded at once: the slots of continuous batching, or the rows of a batch.
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
    for batch in _batches(rows, prompt_ids, batch_size, limit, slots):
        want = [rows[i].params.logprobs > 0 for i in batch]
        extra: dict = {"return_logprobs": True} if any(want) else {}
        extra.update({"max_batch_size": batch_size} if slots else {})
        try:
            grammars = row_grammars(decoder, adapter, [rows[i].params for i in batch],
                                    speculative=generate is not generate_ids)
        except ValueError as err:  # grammar rows with --speculative
            raise JobError(str(err)) from None
        extra.update({"grammars": grammars} if grammars is not None else {})

        def finished(j: int, pair: tuple[list[int], str], lp, batch=batch, want=want) -> None:
            nonlocal last_sync
            token_ids, reason = pair
            i = batch[j]
            writer.write(_record(rows[i], adapter.decode(token_ids), token_ids, reason,
                                 lp if want[j] else None))
            written.add(i)
            stats.tokens, stats.rows = stats.tokens + len(token_ids), stats.rows + 1
            if progress is not None:
                progress.add_rows(1)
            if time.perf_counter() - last_sync >= SYNC_SECONDS:
                writer.sync()
                last_sync = time.perf_counter()

        try:
            got = generate(
                decoder, [prompt_ids[i] for i in batch], [rows[i].params for i in batch],
                [rows[i].max_tokens for i in batch], adapter.eos_id, backend=backend,
                callback=callback, cuda_graph=cuda_graph, sync_every=sync_every,
                on_row=finished, stats=counts, **extra,
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
        pairs, lps = got if extra.get("return_logprobs") else (got, [None] * len(batch))
        for j, i in enumerate(batch):
            if i not in written:  # a stand-in for generate_ids that does not call on_row
                finished(j, pairs[j], lps[j])
        writer.sync()
    stats.steps, stats.slot_steps = counts.steps, counts.slot_steps
    stats.seconds = time.perf_counter() - start
    return stats
