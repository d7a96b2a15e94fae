"""Set a run up: find out the facts its plan needs (:func:`read_facts`), make the plan
(:func:`lmgen_fast.engine.plan.plan_run`) and apply it (:func:`prepare`): the decoder's
step path, its kept state, the rows' packed parameters with the seeds of unseeded rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple

import torch

from lmgen_fast.core.params import PackedParams, SamplingParams
from lmgen_fast.core.rows import fill_unseeded
from lmgen_fast.engine.plan import Facts, Plan, RunOptions, plan_run
from lmgen_fast.engine.state import DeviceState, take_state
from lmgen_fast.runtime import graphs, kernel_failure
from lmgen_fast.sampling import kernel as kernel_sampler
from lmgen_fast.sampling.dispatch import resolve_backend


class Prepared(NamedTuple):
    """A run, set up: its plan, the packed parameters of every row (``[n]`` tensors on the
    device, seeds drawn where the plan says) and the state it runs on."""

    plan: Plan
    packed: PackedParams
    state: DeviceState


def read_facts(decoder, backend: str, device: torch.device, capture_failed: bool) -> Facts:
    """What :func:`plan_run` needs to know about ``decoder`` and ``device``.

    Raises where the Triton sampler is asked for explicitly on a device it cannot run on
    (``check_device``); after a recorded failure of the kernels the reference samples.
    """
    kernel = resolve_backend(backend, device) == "triton"
    if kernel:
        kernel_sampler.check_device(torch.empty(0, device=device))
        kernel = kernel_failure() is None
    fused = None
    if hasattr(decoder, "supports_fused"):  # the fused Triton decode step, with the kernels
        fused = kernel and decoder.supports_fused()
    # Looked up on the module: tests stand a CPU graph class in for it.
    return Facts(kernel, graphs.graph_backend(device), bool(decoder.graphable), fused,
                 capture_failed)


def prepare(decoder, rows: Sequence[SamplingParams], max_tokens: Sequence[int],
            base: Sequence[int], options: RunOptions, device: torch.device, batch: int,
            vocab: int, capture_failed: bool = False) -> Prepared:
    """Plan a run of ``rows`` through ``batch`` rows of state and apply the plan: set the
    decoder's step path, take (or make) its state and pack the rows' parameters.

    Parameters
    ----------
    decoder
        The run's decoder; its ``fused`` path and ``engine_state`` are set here.
    rows, max_tokens, base : sequences of length ``n``
        Each row's parameters, cap and count of prompt tokens starting its history.
    options : RunOptions
        The call's options.
    device : torch.device
        Where the state lives (the logits' device).
    batch : int
        Rows of state (``n`` for a static batch, the slots otherwise).
    vocab : int
        The logits' width.
    capture_failed : bool
        A capture failed on this decoder before: its steps run eagerly.
    """
    facts = read_facts(decoder, options.backend, device, capture_failed)
    plan = plan_run(rows, max_tokens, base, options, facts, device, batch)
    if plan.fused is not None:
        decoder.fused = plan.fused
    packed = PackedParams.from_rows(rows, device, end_ids=options.end_ids, vocab_size=vocab)
    if plan.draw_seeds:
        packed = replace(packed, seed=fill_unseeded(packed.seed, packed.seeded))
    return Prepared(plan, packed, take_state(decoder, plan.layout, packed, vocab))
