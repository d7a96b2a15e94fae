"""The device tensors of one decode (:class:`DeviceState`) and what a captured step bakes
in besides their addresses (:class:`Layout`).

Every step reads and writes the same tensors, and the host decides nothing from their
values, so a step can be replayed as a CUDA graph. A state is kept with its decoder
(``decoder.engine_state``): the next decode with the same layout reuses the buffers and
the graphs captured on them (:func:`take_state`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from lmgen_fast.core.bitmask import bitmask_words
from lmgen_fast.core.params import PackedParams
from lmgen_fast.core.rows import history_window
from lmgen_fast.engine import bookkeeping
from lmgen_fast.models.decoder import fingerprint
from lmgen_fast.runtime import guarded
from lmgen_fast.runtime.graphs import GraphPool
from lmgen_fast.sampling import kernel as kernel_sampler
from lmgen_fast.sampling import reference
from lmgen_fast.sampling.reference import SampleLogprobs


@dataclass(frozen=True)
class Layout:
    """Everything a captured step bakes in besides tensor addresses."""

    batch: int
    cols: int  # steps the token buffers hold
    hist: int  # history slots per row
    width: int  # penalty window of a graph step (0: no row uses penalties)
    max_top_k: int
    nucleus: int
    top_n: int  # top alternatives kept per token (0: none)
    logprobs: bool
    stops: int  # width of the packed stop ids (the end ids, then each row's stop ids)
    kernel: bool
    device: torch.device
    bitmask: bool = False  # the state holds a per-step token bitmask (a grammar row runs)

    @property
    def resident(self) -> bool:
        """The step never waits for the host: the kernels, or the reference's device path
        off the CPU. Such a step reports bad rows in status bits and can be captured."""
        return resident(self.kernel, self.device)


def resident(kernel: bool, device: torch.device) -> bool:
    """Whether a step with these choices samples without host round trips."""
    return kernel or device.type != "cpu"


class DeviceState:
    """The device tensors of one decode; the next decode with the same layout reuses them.

    Row ``r`` keeps its tokens in ``out[r, :count[r]]`` (int64 ``[B, cols]``), its penalty
    history in ``hist[r, :hlen[r]]`` (int64 ``[B, hist]``) and its own step counter in
    ``step[r]``, which keys its noise and is the column its next token goes to; the other
    per-row tensors are ``[B]`` (see :class:`~lmgen_fast.engine.bookkeeping.Ledger`).

    ``bitmask`` (where ``Layout.bitmask``; else None): int32 ``[B, ceil(V / 32)]``, the
    token bitmask every step samples under (bit ``t % 32`` of word ``t // 32`` set =
    token ``t`` allowed, xgrammar's layout). Whoever runs the grammars writes a row's
    words before each step, in place (graphs read this very tensor); a new or restarted
    row starts with every bit set.
    """

    # The per-row tensors (the ledger's and the sampler's), carried over by compact().
    ROWS = ("tokens", "out", "hist", "hlen", "ranges", "max_tokens", "count", "done",
            "bad_step", "bad_bits", "step", "lp", "token_lp", "top_ids", "top_lp", "pow",
            "bitmask")

    def __init__(self, lay: Layout, packed: PackedParams, vocab: int):
        dev, b = lay.device, lay.batch
        i64 = dict(dtype=torch.int64, device=dev)
        f32 = dict(dtype=torch.float32, device=dev)
        self.layout, self.vocab = lay, vocab
        self.tokens = torch.zeros(b, **i64)
        self.out = torch.zeros(b, lay.cols, **i64)  # the token of every step
        self.hist = torch.full((b, lay.hist), -1, **i64)
        self.hlen = torch.zeros(b, **i64)
        self.ranges = torch.zeros(b, **i64)
        self.max_tokens = torch.zeros(b, **i64)
        self.count = torch.zeros(b, **i64)  # tokens kept: row r's are out[r, :count[r]]
        self.done = torch.zeros(b, dtype=torch.bool, device=dev)
        self.bad_step = torch.full((b,), -1, **i64)
        self.bad_bits = torch.zeros(b, dtype=torch.int32, device=dev)
        # Each row's own step: it keys the row's noise and is the column its token goes to,
        # so a row's draws never depend on when it started or on its batch mates.
        self.step = torch.zeros(b, **i64)
        self.rows = torch.arange(b, device=dev)
        self.packed = PackedParams(**{k: v.clone() if isinstance(v, torch.Tensor) else v
                                      for k, v in vars(packed).items()})
        self.lp = (torch.zeros(b, kernel_sampler.LOGPROB_COLUMNS, **f32)
                   if lay.logprobs and lay.kernel else None)
        self.token_lp = torch.zeros(b, lay.cols, **f32) if lay.logprobs else None
        n = min(lay.top_n, vocab)
        self.top_ids = torch.zeros(b, lay.cols, n, **i64) if n else None
        self.top_lp = torch.zeros(b, lay.cols, n, **f32) if n else None
        # The penalty powers of the kernels' window, fixed for a decode (see load()).
        self.pow = torch.ones(b, lay.width + 1, **f32) if lay.kernel and lay.width else None
        self.bitmask = (torch.full((b, bitmask_words(vocab)), -1, dtype=torch.int32, device=dev)
                        if lay.bitmask else None)
        self.ledger = bookkeeping.Ledger(
            self.out, self.token_lp, self.top_ids, self.top_lp, self.hist, self.hlen,
            self.tokens, self.step, self.count, self.max_tokens, self.done, self.bad_step,
            self.bad_bits)
        self.graphs: dict[int, object] = {}  # kv_len -> captured step
        self.pool = GraphPool()  # the memory pool and stream its graphs share
        # What the graphs were captured on: the decoder's cache version and the addresses
        # of the model's tensors. Replaying them on anything else would read freed memory.
        self.owner: tuple | None = None

    def compact(self, keep: torch.Tensor) -> DeviceState:
        """A new state of ``len(keep)`` rows: row ``j`` is this state's row ``keep[j]``
        (int64 ``[n]``), every per-row tensor copied (the ledger is built on the new ones).
        Captured graphs stay behind: they bake in this state's batch and addresses."""
        new = DeviceState(replace(self.layout, batch=keep.numel()), self.packed.take(keep),
                          self.vocab)
        for name in self.ROWS:
            old = getattr(self, name)
            if old is not None:
                getattr(new, name).copy_(old.index_select(0, keep))
        return new

    def sample(self, logits: torch.Tensor, width: int) -> None:
        """Sample every row from ``logits`` ``[B, V]`` and book the tokens (device only).

        The noise of row ``r`` is keyed on ``self.step[r]``; ``width`` is the penalty window
        of the eager path (the kernels read the layout's, see :func:`sample_kernels`).
        """
        if self.layout.kernel:
            sample_kernels(self, logits)
        else:
            sample_reference(self, logits, width)


def owner_of(decoder) -> tuple:
    """What a state's graphs are captured on: the decoder's cache version, the addresses
    of its model's tensors and its step path (a graph of one path never replays the other)."""
    model = getattr(decoder, "model", None)
    return (getattr(decoder, "cache_version", None),
            fingerprint(model) if isinstance(model, torch.nn.Module) else None,
            getattr(decoder, "fused", False))


def take_state(decoder, lay: Layout, packed: PackedParams, vocab: int) -> DeviceState:
    """The decoder's kept state where its layout is ``lay``, else a new one (kept on the
    decoder for the next call); graphs captured on another cache or other weights are
    dropped. ``packed`` gives the new state its parameter tensors' shapes."""
    state = decoder.engine_state
    # Equal layouts with other per-row widths (bias lists, stop ids) cannot share buffers.
    if state is None or state.layout != lay or state.packed.shapes() != packed.shapes():
        decoder.engine_state = None  # free the old buffers and graphs first
        index = torch.arange(lay.batch, device=lay.device)
        state = DeviceState(lay, packed.take(index), vocab)
        decoder.engine_state = state
    owner = owner_of(decoder)
    if state.owner != owner:
        state.graphs.clear()  # captured on another cache or other weights
        state.owner = owner
    return state


def load(st: DeviceState, packed: PackedParams, hist: torch.Tensor, ranges: list[int],
         max_tokens: list[int], base: list[int]) -> None:
    """Reset every buffer of ``st`` for a new decode, in place (captured graphs keep their
    addresses). ``packed`` holds every row's parameters (``[B]`` each), ``hist`` int64
    ``[B, w]`` the penalty histories (``base[r]`` valid entries each)."""
    for f in fields(PackedParams):
        value = getattr(packed, f.name)
        if isinstance(value, torch.Tensor):
            getattr(st.packed, f.name).copy_(value)
    dev = st.layout.device
    st.hist.fill_(-1)
    st.hist[:, : hist.shape[1]].copy_(hist)
    st.hlen.copy_(torch.tensor(base, device=dev))
    st.ranges.copy_(torch.tensor(ranges, device=dev))
    st.max_tokens.copy_(torch.tensor(max_tokens, device=dev))
    st.count.zero_()
    st.done.copy_(st.max_tokens == 0)
    st.bad_step.fill_(-1)
    st.bad_bits.zero_()
    st.step.zero_()
    if st.bitmask is not None:
        st.bitmask.fill_(-1)
    if st.pow is not None:
        st.pow.copy_(kernel_sampler.penalty_powers(st.packed.penalty, st.layout.width))


def admit(st: DeviceState, slots: torch.Tensor, packed: PackedParams, hist: torch.Tensor,
          ranges: list[int], max_tokens: list[int], base: list[int],
          tokens: list[int]) -> None:
    """Reset rows ``slots`` (int64 ``[n]``) of ``st`` for new prompts; other rows are
    untouched.

    ``packed`` holds the newcomers' parameters (``[n]`` each), ``hist`` ``[n, w]`` their
    penalty histories (``base[i]`` valid entries), ``tokens`` the token each is fed next.
    """
    for f in fields(PackedParams):
        value = getattr(packed, f.name)
        if isinstance(value, torch.Tensor):
            getattr(st.packed, f.name).index_copy_(0, slots, value)
    dev = st.layout.device

    def ints(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=dev)

    rows = torch.full((len(base), st.layout.hist), -1, dtype=torch.int64)
    rows[:, : hist.shape[1]] = hist
    st.hist.index_copy_(0, slots, rows.to(dev))
    st.hlen.index_copy_(0, slots, ints(base))
    st.ranges.index_copy_(0, slots, ints(ranges))
    caps = ints(max_tokens)
    st.max_tokens.index_copy_(0, slots, caps)
    st.done.index_copy_(0, slots, caps == 0)
    st.tokens.index_copy_(0, slots, ints(tokens))
    if st.pow is not None:  # the newcomers' penalties, as load() computes them
        st.pow.index_copy_(0, slots, kernel_sampler.penalty_powers(
            st.packed.penalty[slots], st.layout.width))
    restart(st, slots)


def park(st: DeviceState, slots: torch.Tensor) -> None:
    """Mark rows ``slots`` of ``st`` done with nothing to keep (free slots with no prompt
    to take)."""
    st.max_tokens.index_fill_(0, slots, 0)
    st.done.index_fill_(0, slots, True)
    st.hlen.index_fill_(0, slots, 0)
    restart(st, slots)


def restart(st: DeviceState, slots: torch.Tensor) -> None:
    """Put rows ``slots`` at their step 0: their noise and output columns start over."""
    for t in (st.count, st.step, st.bad_step, st.bad_bits):
        t.index_fill_(0, slots, -1 if t is st.bad_step else 0)
    if st.bitmask is not None:
        st.bitmask.index_fill_(0, slots, -1)


def sample_reference(st: DeviceState, logits: torch.Tensor, width: int) -> None:
    """The reference path of :meth:`DeviceState.sample`: the reference sampler (its device
    path off the CPU: fixed shapes, no host wait), then the bookkeeping in torch ops."""
    lay = st.layout
    window = history_window(st.hist, st.hlen, st.ranges, width) if width > 0 else None
    slp: SampleLogprobs | None = None
    status = None
    if lay.resident:
        if lay.logprobs:
            tokens, status, slp = reference.sample_on_device_logprobs(
                logits, st.packed, window, st.step, lay.top_n, draw_seeds=False,
                token_bitmask=st.bitmask)
        else:
            tokens, status, _ = reference.sample_on_device(
                logits, st.packed, window, st.step, draw_seeds=False, token_bitmask=st.bitmask)
    else:
        got = reference.sample(logits, st.packed, window, step=st.step,
                               return_logprobs=lay.logprobs, token_bitmask=st.bitmask)
        tokens, slp = got if lay.logprobs else (got, None)
    bookkeeping.book_eager(st.ledger, tokens, status, st.packed.stop_ids,
                           *((slp.token_logprob, slp.top_ids, slp.top_logprobs)
                             if slp is not None else ()), rows=st.rows)


def sample_kernels(st: DeviceState, logits: torch.Tensor) -> None:
    """The Triton path of :meth:`DeviceState.sample`: set-up, chunk and merge kernels, then
    one bookkeeping launch.

    The window is always the layout's widest, read from the history by the set-up
    kernel: the slots a narrower window would drop are empty (-1) anyway, and the
    penalty powers for that width were computed once, by :func:`load`.
    """
    lay = st.layout
    window = None
    if lay.width:
        window = kernel_sampler.HistoryWindow(st.hist, st.hlen, st.ranges, lay.width)
    tokens, status = kernel_sampler.guarded_launch(
        logits, st.packed, window, st.step,
        max_top_k=lay.max_top_k, draw_seeds=False, nucleus_candidates=lay.nucleus,
        logprob_out=st.lp, pow_table=st.pow, token_bitmask=st.bitmask,
    )
    top: tuple = ()
    if lay.logprobs:
        # Top alternatives (never captured: ranking them waits for the host) rank
        # processed rows by their z, which needs the window as a tensor.
        plain = (history_window(st.hist, st.hlen, st.ranges, lay.width)
                 if lay.top_n and lay.width else None)
        slp = kernel_sampler.logprobs_from_launch(logits, st.lp, lay.top_n, st.packed, plain,
                                                  tokens, steps=st.step,
                                                  token_bitmask=st.bitmask)
        top = (slp.token_logprob,) + ((slp.top_ids, slp.top_logprobs)
                                      if st.top_ids is not None else ())
    # A bookkeeping kernel that fails to build falls back as the sampler's would.
    guarded(bookkeeping.book, st.ledger, tokens, status, st.packed.stop_ids, *top)
