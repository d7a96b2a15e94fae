"""The reference sampler: SPEC sections 2 to 4 in plain, vectorized PyTorch.

It is the CPU path of ``lmgen_fast.sample`` and the oracle every kernel is tested against.
One step for row ``r`` (logits ``l``, window ``w``):

0. SPEC section 7 (:func:`~lmgen_fast.sampling.penalties.apply_bias`,
   :func:`~lmgen_fast.sampling.penalties.apply_masks`): ``l[t] + b`` for each ``(t, b)`` of
   ``logit_bias``, then ``-inf`` for tokens outside ``allowed_token_ids``, tokens the
   step's ``token_bitmask`` forbids and, while ``step < min_tokens``, the row's stop ids.
1. ``z = l / T`` in float32 (``T == 0``: ``z = l``, the row is greedy); NaN becomes ``-inf``.
2. Every token ``t`` that occurs ``c`` times in ``w`` (``c = 1`` in "once" mode):
   ``z[t] / p**c`` if ``z[t] > 0`` else ``z[t] * p**c``. Then the OpenAI penalties, with
   ``c_t`` the raw count whatever the mode: ``adj = frequency_penalty * c_t +
   presence_penalty * (c_t > 0)`` (float32: two products, then one add) and
   ``z[t] = z[t] - adj / T``. The issue orders every penalty before the temperature;
   subtracting ``adj / T`` after dividing by ``T`` is the same math, and leaves the article's
   bit-exact ``l / T`` untouched when these penalties are 0.
3. Top-k (``0 < k < V``): values below the k-th largest become ``-inf`` (ties survive).
4. Top-p (``top_p < 1``): over the survivors sorted by ``z`` descending, ``e = exp(z - z_max)``,
   ``q = e / sum(e)`` (the sum accumulated in float64, rounded to float32) and ``m_i`` the
   exclusive prefix sum of ``q`` in float64; every member of a group of equal ``z`` takes
   the ``m`` of the group's first member, so ``m_i`` is the mass of the tokens strictly more
   probable than ``i``. Keep ``i`` iff ``m_i < top_p``, compared in float64 with the user's
   ``top_p`` (never rounded to float32): ties are kept or dropped together and the most
   probable tokens always stay.
5. Min-p (``min_p > 0``): keep ``i`` iff ``z_i - z_max >= t`` in float32, ``t`` the smallest
   float32 at or above ``log(min_p)`` (:func:`lmgen_fast.core.params.min_p_threshold`, once per
   row): exactly ``exp(z_i - z_max) >= min_p``, with no ``exp`` whose rounding could differ
   between devices (``z_max`` is the row's largest survivor, which step 4 never removes).
   Steps 4 and 5 skip greedy rows and rows with a ``+inf`` survivor.
6. Draw: greedy rows take the first argmax of step 2. If ``+inf`` values remain, they alone
   share the probability equally. Seeded rows run the exponential race ``argmax(z_i + g_i)``,
   ``g_i`` Gumbel noise from :mod:`lmgen_fast.core.philox` keyed on (seed, step, token); an exact
   key tie goes to the lower token id. Unseeded rows: a batch of one calls
   ``torch.multinomial`` on ``softmax(z)`` as the article does; otherwise each row races with a
   seed drawn from torch's generator.

Log-probabilities (:func:`step_logprobs`) follow each row's ``logprobs_mode``: "raw" those of
the raw logits, before any of the steps, step 0 included (:func:`raw_logprobs`); "processed"
those of the final ``z`` of step 5 that the draw uses (:func:`processed_table`:
``log_softmax``, ``-inf`` for removed tokens, a share ``-log(count)`` for ``+inf`` survivors,
0 for a greedy row's token).

Two paths compute this. The CPU path works on the rows each step applies to, found on the
host (``bool(t.any())``, ``nonzero``, ``k.max()``): cheap on the CPU, a wait for the device
each time elsewhere. The device path (:func:`sample_on_device`, :func:`raw_logprobs_on_device`;
:func:`sample` takes it for tensors off the CPU) uses fixed shapes only: every row goes
through every step on the fully sorted row and masks select, so nothing waits for the device
and a CUDA graph can capture it; ``check=False`` leaves a status per row instead of raising.
Both share the rules (:func:`process_logits`, :func:`kth_value`, :func:`top_p_keep`,
:func:`min_p_removes`, the race's helpers and :mod:`lmgen_fast.core.philox`) and give the same
tokens, except for an unseeded batch of one (see :func:`sample`).

Where each part lives: steps 0 to 2 in :mod:`lmgen_fast.sampling.penalties`, 3 to 5 in
:mod:`lmgen_fast.sampling.filters`, 6 in :mod:`lmgen_fast.sampling.race`, the
log-probabilities in :mod:`lmgen_fast.sampling.logprobs` and the device path in
:mod:`lmgen_fast.sampling.fixed`. This module holds the entry point (:func:`sample`), the
input checks and the parameter packing, and re-exports the names its callers use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from lmgen_fast.core.bitmask import bitmask_words, check_bitmask
from lmgen_fast.core.errors import STATUS_EMPTY, EmptyRowError
from lmgen_fast.core.params import PackedParams, SamplingParams, as_row_params
from lmgen_fast.sampling.filters import (
    apply_filters,
    kth_value,
    min_p_removes,
    p_filter,
    top_k_threshold,
    top_p_keep,
)
from lmgen_fast.sampling.fixed import (
    SampleResult,
    sample_fixed,
    sample_on_device,
    sample_on_device_logprobs,
)
from lmgen_fast.sampling.logprobs import (
    SampleLogprobs,
    processed_table,
    raw_logprobs,
    raw_logprobs_on_device,
    raw_table,
    step_logprobs,
    top_logprobs,
)
from lmgen_fast.sampling.penalties import (
    NEG_INF,
    POS_INF,
    apply_penalty,
    check_window_values,
    process_logits,
)
from lmgen_fast.sampling.race import draw, row_topk

ParamsLike = SamplingParams | Sequence[SamplingParams] | PackedParams

# The reference sampler's public names, wherever they live (lmgen_fast.reference and the
# callers of the layers above import them from here).
__all__ = [
    "NEG_INF", "POS_INF", "STATUS_EMPTY", "EmptyRowError", "ParamsLike", "SampleLogprobs",
    "SampleResult", "apply_penalty", "check_inputs", "check_window_values", "filtered_logits",
    "kth_value", "min_p_removes", "p_filter", "pack", "process_logits", "processed_table",
    "raw_logprobs", "raw_logprobs_on_device", "raw_table", "row_topk", "sample",
    "sample_on_device", "sample_on_device_logprobs", "step_logprobs", "top_k_threshold",
    "top_logprobs", "top_p_keep",
]


def pack(params: ParamsLike, batch: int, device: torch.device,
         vocab: int | None = None) -> PackedParams:
    """Per-row parameters as tensors on ``device`` (a PackedParams is checked and moved).

    ``vocab`` (the logits' width) checks the rows' token ids and sizes the bitmask of
    their ``allowed_token_ids``, or checks a PackedParams' bitmask against it.
    """
    if isinstance(params, PackedParams):
        if params.temperature.shape != (batch,):
            raise ValueError(
                f"packed params have {params.temperature.shape[0]} rows for a batch of {batch}"
            )
        allowed = params.allowed
        if vocab is not None and allowed is not None \
                and allowed.shape[1] != bitmask_words(vocab):
            raise ValueError(f"packed params' allowed bitmask has {allowed.shape[1]} words "
                             f"per row for a vocabulary of {vocab}")
        if params.temperature.device != device:
            params = params.to(device)
        return params
    return PackedParams.from_rows(as_row_params(params, batch), device, vocab_size=vocab)


def check_inputs(
    logits: torch.Tensor, window: torch.Tensor | None, step: int | torch.Tensor
) -> torch.Tensor:
    """Validate shapes and dtypes; return the step as an int64 ``[B]`` tensor."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a [B, V] tensor, got {shape}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits must have a float dtype, got {logits.dtype}")
    batch, vocab = logits.shape
    if window is not None:
        if window.dim() != 2 or window.shape[0] != batch or window.dtype != torch.int64:
            raise ValueError(
                f"window must be an int64 [B={batch}, W] tensor, got {window.dtype} "
                f"{tuple(window.shape)}"
            )
    if isinstance(step, torch.Tensor):
        if step.dim() == 0:
            step = step.expand(batch)
        if step.shape != (batch,):
            raise ValueError(
                f"step must be an int or a [B={batch}] tensor, got {tuple(step.shape)}"
            )
        step = step.to(device=logits.device, dtype=torch.int64)
    else:
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2**32:
            raise ValueError(f"step must be an int in [0, 2**32), got {step!r}")
        step = torch.full((batch,), step, dtype=torch.int64, device=logits.device)
    return step


def filtered_logits(
    logits: torch.Tensor,
    params: ParamsLike,
    window: torch.Tensor | None = None,
    *,
    step: int | torch.Tensor = 0,
    token_bitmask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Steps 0 to 5 of one sampling step, float32 ``[B, V]`` (removed tokens are ``-inf``).

    For a sampled (non-greedy) row, ``softmax`` of its output row is the exact distribution
    of the next token, up to the ``+inf`` rule (those tokens share all the mass). Greedy rows
    get top-k but not top-p or min-p (their token is the argmax of step 2 anyway). ``step``
    and ``token_bitmask`` as for :func:`sample`.
    """
    steps = check_inputs(logits, window, step)
    packed = pack(params, logits.shape[0], logits.device, logits.shape[1])
    if token_bitmask is not None:
        check_bitmask(token_bitmask, *logits.shape, logits.device)
    return apply_filters(process_logits(logits, packed, window, steps=steps,
                                        token_bitmask=token_bitmask), packed)


def sample(
    logits: torch.Tensor,
    params: ParamsLike,
    window: torch.Tensor | None = None,
    *,
    step: int | torch.Tensor = 0,
    backend: str = "reference",
    return_logprobs: bool = False,
    check: bool = True,
    on_device: bool | None = None,
    token_bitmask: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, SampleLogprobs] | SampleResult:
    """Draw one token per row, exactly as SPEC sections 2 to 4 and 7 define it.

    Parameters
    ----------
    logits : Tensor
        ``[B, V]``, any float dtype (computed in float32). Not modified.
    params : SamplingParams, sequence of SamplingParams, or PackedParams
        One for every row, or one per row (own values and seed).
    window : LongTensor, optional
        ``[B, W]`` int64: the tokens the penalties apply to, one entry per occurrence, ``-1``
        for an empty slot. The caller cuts it to the range and scope.
    step : int or LongTensor
        Decode step (``[B]`` or scalar) that keys the noise of seeded rows, in ``[0, 2**32)``;
        also the count of tokens a row has, which ``min_tokens`` compares.
    backend : str
        Accepted for signature parity with :func:`lmgen_fast.sample`; must be "reference"
        or "auto".
    return_logprobs : bool
        Also return the log-probabilities, each row in its ``logprobs_mode``
        (:func:`step_logprobs`: raw as :func:`raw_logprobs`, or processed), with as many top
        alternatives as the largest ``logprobs`` of the rows.
    check : bool
        Validate the window's ids and raise :class:`EmptyRowError` (both wait for the
        device). ``False`` skips both and returns a :class:`SampleResult`, with a status per
        row instead: on the device path nothing then waits for the device.
    on_device : bool, optional
        Run :func:`sample_on_device`'s fixed-shape path (True) or the CPU path (False).
        Default: the device path for tensors off the CPU. Both give the same tokens and
        log-probabilities, except for unseeded rows in a batch of one: the CPU path draws
        them with ``torch.multinomial`` as the article does, the device path by the race
        with a seed from torch's generator (the same distribution, as on the Triton sampler).
    token_bitmask : IntTensor, optional
        int32 ``[B, ceil(V / 32)]`` on the logits' device, contiguous: bit ``t % 32`` of
        word ``t // 32`` set where token ``t`` is allowed this step (a grammar's mask, in
        xgrammar's layout); the others are ``-inf`` before the temperature, as
        ``allowed_token_ids`` are (SPEC section 7).

    Returns
    -------
    LongTensor or (LongTensor, SampleLogprobs) or SampleResult
        ``[B]`` token ids on ``logits.device``; with ``return_logprobs``, also their
        :class:`SampleLogprobs`; with ``check=False``, a :class:`SampleResult`.

    Raises
    ------
    ValueError
        Bad shapes, dtypes or (with ``check``) window ids; :class:`EmptyRowError` (a
        ValueError) names the rows with nothing left to sample (with ``check``).

    Examples
    --------
    >>> logits = torch.randn(2, 100)
    >>> sample(logits, SamplingParams(top_k=5, seed=7)).shape
    torch.Size([2])
    >>> tokens, lp = sample(logits, SamplingParams(top_p=0.9, logprobs=3, seed=7),
    ...                     return_logprobs=True)
    >>> lp.top_ids.shape
    torch.Size([2, 3])
    >>> sample(logits, SamplingParams(seed=7), check=False, on_device=True).status
    tensor([0, 0], dtype=torch.int32)
    """
    if backend not in ("reference", "auto"):
        raise ValueError(f"reference.sample runs backend 'reference', got backend={backend!r}")
    steps = check_inputs(logits, window, step)
    batch, vocab = logits.shape
    packed = pack(params, batch, logits.device, vocab)
    if token_bitmask is not None:
        check_bitmask(token_bitmask, batch, vocab, logits.device)
    if check and window is not None:
        check_window_values(window, vocab)
    if on_device is None:
        on_device = logits.device.type != "cpu"
    logprobs = None
    if on_device:
        tokens, status, filtered = sample_fixed(logits, packed, window, steps,
                                                 _draws_seeds(params, packed), token_bitmask)
        if return_logprobs:
            logprobs = step_logprobs(logits, filtered, tokens, packed, packed.logprobs,
                                     on_device=True)
        if check:
            empty = status != 0
            if bool(empty.any()):
                raise EmptyRowError(empty.nonzero().flatten().tolist())
    else:
        z = process_logits(logits, packed, window, steps=steps, token_bitmask=token_bitmask)
        filtered, draw_params = None, packed
        if return_logprobs and bool(packed.processed.any()):
            # Processed log-probabilities describe the z the draw uses: filter once, then
            # race over the survivors with the filters off (the same tokens: every filter
            # is a threshold on z, and the race's keys and tie rule do not change).
            filtered = apply_filters(z, packed).clone()
            draw_params = _filters_off(packed)
        if not check:
            # Empty rows get a harmless row to draw from, then token 0 and their status.
            empty = z.amax(dim=1) == NEG_INF
            z.masked_fill_(empty.unsqueeze(1), 0.0)
        tokens = draw(z, draw_params, steps)
        if not check:
            tokens = tokens.masked_fill(empty, 0)
            status = torch.where(empty, STATUS_EMPTY, 0).to(torch.int32)
        if filtered is not None:
            logprobs = step_logprobs(logits, filtered, tokens, packed, packed.logprobs,
                                     on_device=False)
        elif return_logprobs:
            logprobs = raw_logprobs(logits, tokens, packed.logprobs)
    if not check:
        return SampleResult(tokens, status, logprobs)
    return (tokens, logprobs) if return_logprobs else tokens


def _filters_off(packed: PackedParams) -> PackedParams:
    """``packed`` with top-k, top-p and min-p off: for a ``z`` already filtered."""
    return replace(packed, top_k=torch.zeros_like(packed.top_k),
                   top_p=torch.ones_like(packed.top_p), min_p=torch.zeros_like(packed.min_p),
                   min_p_log=torch.full_like(packed.min_p_log, NEG_INF))


def _draws_seeds(params: ParamsLike, packed: PackedParams) -> bool:
    """Whether some row races with a drawn seed, decided on the host without a sync: always
    for packed parameters (their values live on the device)."""
    if isinstance(params, PackedParams):
        return True
    rows = as_row_params(params, packed.temperature.shape[0])
    return any(p.seed is None and p.temperature != 0 for p in rows)
