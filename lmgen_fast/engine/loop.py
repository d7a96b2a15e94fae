"""The decode loop, resident on the device: prefill, then one step per token.

A step is the model's forward for one token per row (writing the KV cache), the sampler,
and the bookkeeping: each row's history for the penalties, its count of kept tokens, EOT,
its length cap, and a flag for a row that had nothing to sample (with the Triton sampler,
one launch of :mod:`lmgen_fast.engine.bookkeeping`; eager torch ops on the reference path, bit for
bit as before). Every step reads and writes the same tensors (:class:`_State`, kept with
the decoder), and the host decides nothing from their values. So on CUDA, with a
graph-capable decoder (our Llama, modules built like the article's, transformers Llama) and
the Triton sampler, each step is one CUDA graph replay:
the host only looks every ``sync_every`` steps, to hand new tokens to the callback, stop
when every row is done and raise for a bad row. Elsewhere the same step runs eagerly.

On a GPU where something breaks, the engine degrades instead of failing: a step that cannot
be captured runs eagerly, and kernels that cannot be compiled or launched leave the
sampling to the reference sampler on the same device (each with one warning).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch

from lmgen_fast.core.errors import DecodeOutOfMemory, EmptyRowError, GenerationError
from lmgen_fast.core.params import PackedParams, SamplingParams
from lmgen_fast.engine import bookkeeping
from lmgen_fast.models.decoder import fingerprint
from lmgen_fast.sampling import kernel as kernel_sampler
from lmgen_fast.sampling import reference
from lmgen_fast.sampling.dispatch import resolve_backend
from lmgen_fast.sampling.kernel import on_device
from lmgen_fast.sampling.reference import SampleLogprobs

TokenCallback = Callable[[int, int], None]
TopLogprobs = list[list[tuple[int, float]]]

# Host checks per step on CUDA by default: a check waits for the GPU, so rarely; a row that
# stops early costs at most this many wasted steps.
SYNC_EVERY_CUDA = 16
# Buffers are sized in multiples of this many steps, so that calls of similar lengths reuse
# them (and their CUDA graphs).
_ROUND = 64


class RowLogprobs(NamedTuple):
    """One row's log-probabilities from :func:`generate_ids` (see ``Generation``)."""

    logprobs: list[float]
    top_logprobs: TopLogprobs | None


def _window(hist: torch.Tensor, hlen: torch.Tensor, ranges: torch.Tensor, width: int):
    """The last ``range`` (0: all) entries of each row's history, right-aligned, -1 padded."""
    start = torch.where(ranges > 0, (hlen - ranges).clamp_min(0), 0)
    first = (hlen - width).unsqueeze(1)
    idx = first + torch.arange(width, device=hist.device)
    valid = idx >= start.unsqueeze(1)
    taken = hist.gather(1, idx.clamp(0, hist.shape[1] - 1))
    return torch.where(valid, taken, -1)


@dataclass(frozen=True)
class _Layout:
    """Everything a captured step bakes in besides tensor addresses."""

    batch: int
    cols: int  # steps the token buffers hold
    hist: int  # history slots per row
    width: int  # penalty window of a graph step (0: no row uses penalties)
    max_top_k: int
    nucleus: int
    top_n: int  # top alternatives kept per token (0: none)
    logprobs: bool
    eos: int
    kernel: bool
    device: torch.device

    @property
    def resident(self) -> bool:
        """The step never waits for the host: the kernels, or the reference's device path
        off the CPU. Such a step reports bad rows in status bits and can be captured."""
        return resident(self.kernel, self.device)


def resident(kernel: bool, device: torch.device) -> bool:
    """Whether a step with these choices samples without host round trips."""
    return kernel or device.type != "cpu"


class _State:
    """The device tensors of one decode; the next decode with the same layout reuses them."""

    def __init__(self, lay: _Layout, packed: PackedParams, vocab: int):
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
        self.ledger = bookkeeping.Ledger(
            self.out, self.token_lp, self.top_ids, self.top_lp, self.hist, self.hlen,
            self.tokens, self.step, self.count, self.max_tokens, self.done, self.bad_step,
            self.bad_bits)
        self.graphs: dict[int, object] = {}  # kv_len -> captured step
        self.pool = self.stream = None
        # What the graphs were captured on: the decoder's cache version and the addresses
        # of the model's tensors. Replaying them on anything else would read freed memory.
        self.owner: tuple | None = None

    # The per-row tensors (the ledger's and the sampler's), carried over by compact().
    _ROWS = ("tokens", "out", "hist", "hlen", "ranges", "max_tokens", "count", "done",
             "bad_step", "bad_bits", "step", "lp", "token_lp", "top_ids", "top_lp", "pow")

    def compact(self, keep: torch.Tensor) -> _State:
        """A new state of ``len(keep)`` rows: row ``j`` is this state's row ``keep[j]``
        (int64 ``[n]``), every per-row tensor copied (the ledger is built on the new ones).
        Captured graphs stay behind: they bake in this state's batch and addresses."""
        new = _State(replace(self.layout, batch=keep.numel()), self.packed.take(keep),
                     self.vocab)
        for name in self._ROWS:
            old = getattr(self, name)
            if old is not None:
                getattr(new, name).copy_(old.index_select(0, keep))
        return new

    def load(self, packed: PackedParams, hist: torch.Tensor, ranges: list[int],
             max_tokens: list[int], base: list[int]) -> None:
        """Reset every buffer for a new decode, in place (captured graphs keep addresses)."""
        for f in fields(PackedParams):
            value = getattr(packed, f.name)
            if isinstance(value, torch.Tensor):
                getattr(self.packed, f.name).copy_(value)
        dev = self.layout.device
        self.hist.fill_(-1)
        self.hist[:, : hist.shape[1]].copy_(hist)
        self.hlen.copy_(torch.tensor(base, device=dev))
        self.ranges.copy_(torch.tensor(ranges, device=dev))
        self.max_tokens.copy_(torch.tensor(max_tokens, device=dev))
        self.count.zero_()
        self.done.copy_(self.max_tokens == 0)
        self.bad_step.fill_(-1)
        self.bad_bits.zero_()
        self.step.zero_()
        if self.pow is not None:
            self.pow.copy_(kernel_sampler.penalty_powers(self.packed.penalty, self.layout.width))

    def admit(self, slots: torch.Tensor, packed: PackedParams, hist: torch.Tensor,
              ranges: list[int], max_tokens: list[int], base: list[int],
              tokens: list[int]) -> None:
        """Reset rows ``slots`` (int64 ``[n]``) for new prompts; other rows are untouched.

        ``packed`` holds the newcomers' parameters (``[n]`` each), ``hist`` ``[n, w]`` their
        penalty histories (``base[i]`` valid entries), ``tokens`` the token each is fed next.
        """
        for f in fields(PackedParams):
            value = getattr(packed, f.name)
            if isinstance(value, torch.Tensor):
                getattr(self.packed, f.name).index_copy_(0, slots, value)
        dev = self.layout.device

        def ints(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=dev)

        rows = torch.full((len(base), self.layout.hist), -1, dtype=torch.int64)
        rows[:, : hist.shape[1]] = hist
        self.hist.index_copy_(0, slots, rows.to(dev))
        self.hlen.index_copy_(0, slots, ints(base))
        self.ranges.index_copy_(0, slots, ints(ranges))
        caps = ints(max_tokens)
        self.max_tokens.index_copy_(0, slots, caps)
        self.done.index_copy_(0, slots, caps == 0)
        self.tokens.index_copy_(0, slots, ints(tokens))
        if self.pow is not None:  # the newcomers' penalties, as load() computes them
            self.pow.index_copy_(0, slots, kernel_sampler.penalty_powers(
                self.packed.penalty[slots], self.layout.width))
        self._restart(slots)

    def park(self, slots: torch.Tensor) -> None:
        """Mark rows ``slots`` done with nothing to keep (free slots with no prompt to take)."""
        self.max_tokens.index_fill_(0, slots, 0)
        self.done.index_fill_(0, slots, True)
        self.hlen.index_fill_(0, slots, 0)
        self._restart(slots)

    def _restart(self, slots: torch.Tensor) -> None:
        # Step 0 again: the row's noise and its output columns start over.
        for t in (self.count, self.step, self.bad_step, self.bad_bits):
            t.index_fill_(0, slots, -1 if t is self.bad_step else 0)

    def sample(self, logits: torch.Tensor, width: int) -> None:
        """Sample every row from ``logits`` ``[B, V]`` and book the tokens (device only).

        The noise of row ``r`` is keyed on ``self.step[r]``; ``width`` is the penalty window
        of the eager path (the kernels read the layout's, see :meth:`_sample_kernels`).
        """
        lay = self.layout
        if lay.kernel:
            self._sample_kernels(logits)
            return
        window = _window(self.hist, self.hlen, self.ranges, width) if width > 0 else None
        slp: SampleLogprobs | None = None
        status = None
        if lay.resident:
            # The reference off the CPU (the GPU fallback): fixed shapes, no host wait.
            if lay.logprobs:
                tokens, status, slp = reference.sample_on_device_logprobs(
                    logits, self.packed, window, self.step, lay.top_n, draw_seeds=False)
            else:
                tokens, status, _ = reference.sample_on_device(
                    logits, self.packed, window, self.step, draw_seeds=False)
        else:
            got = reference.sample(logits, self.packed, window, step=self.step,
                                   return_logprobs=lay.logprobs)
            tokens, slp = got if lay.logprobs else (got, None)
        bookkeeping.book_eager(self.ledger, tokens, status, lay.eos,
                               *((slp.token_logprob, slp.top_ids, slp.top_logprobs)
                                 if slp is not None else ()), rows=self.rows)

    def _sample_kernels(self, logits: torch.Tensor) -> None:
        """The Triton path: set-up, chunk and merge kernels, then one bookkeeping launch.

        The window is always the layout's widest, read from the history by the set-up
        kernel: the slots a narrower window would drop are empty (-1) anyway, and the
        penalty powers for that width were computed once, by :meth:`load`.
        """
        lay = self.layout
        window = None
        if lay.width:
            window = kernel_sampler.HistoryWindow(self.hist, self.hlen, self.ranges, lay.width)
        tokens, status = kernel_sampler.guarded_launch(
            logits, self.packed, window, self.step,
            max_top_k=lay.max_top_k, draw_seeds=False, nucleus_candidates=lay.nucleus,
            logprob_out=self.lp, pow_table=self.pow,
        )
        top: tuple = ()
        if lay.logprobs:
            # Top alternatives (never captured: they wait for the host) rank processed rows
            # by their z, which needs the window as a tensor.
            plain = (_window(self.hist, self.hlen, self.ranges, lay.width)
                     if lay.top_n and lay.width else None)
            slp = kernel_sampler.logprobs_from_launch(logits, self.lp, lay.top_n,
                                                      self.packed, plain, tokens)
            top = (slp.token_logprob,) + ((slp.top_ids, slp.top_logprobs)
                                          if self.top_ids is not None else ())
        # A bookkeeping kernel that fails to build falls back as the sampler's would.
        kernel_sampler.guarded(bookkeeping.book, self.ledger, tokens, status, lay.eos, *top)


def _capture_autocast():
    """Autocast as the caller set it, minus its cast cache, which must not outlive a capture
    (PyTorch's CUDA graph notes)."""
    if torch.is_autocast_enabled("cuda"):
        return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                              cache_enabled=False)
    return contextlib.nullcontext()


class _CudaGraph:
    """One captured decode step. The graphs of a state share its memory pool and its side
    stream, which both warms steps up and captures them (one cuBLAS workspace, allocated
    while warming, not inside a capture)."""

    def __init__(self, state: _State):
        if state.pool is None:
            state.pool = torch.cuda.graph_pool_handle()
            state.stream = torch.cuda.Stream()
        self.pool, self.stream = state.pool, state.stream
        self.graph = torch.cuda.CUDAGraph()

    def warm(self, fn: Callable[[], None]) -> None:
        # The first run of a shape (Triton compilation, cuBLAS workspaces) must not happen
        # inside a capture; PyTorch asks for it on a side stream.
        main = torch.cuda.current_stream()
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream), _capture_autocast():
            fn()
        main.wait_stream(self.stream)

    def capture(self, fn: Callable[[], None]) -> None:
        with _capture_autocast(), torch.cuda.graph(
            self.graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"
        ):
            fn()

    def replay(self) -> None:
        self.graph.replay()


# Decoders whose step failed to capture, with the cause: they run eagerly from then on.
_eager_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _graph_backend(device: torch.device):
    """The class that captures steps on ``device``, or None where there are no graphs."""
    return _CudaGraph if device.type == "cuda" else None


def check_sync_every(sync_every: int | None) -> None:
    """Raise ValueError unless ``sync_every`` is None or a positive int."""
    if sync_every is None:
        return
    if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
        raise ValueError(f"sync_every must be a positive int, got {sync_every!r}")


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def prompt_base(prompts: Sequence[Sequence[int]], rows: Sequence[SamplingParams]) -> list[int]:
    """How many prompt tokens start each row's penalty history: all of them with
    ``penalty_scope="all"``, none otherwise."""
    return [len(p) if r.penalty_scope == "all" else 0 for p, r in zip(prompts, rows, strict=True)]


def _prompt_history(prompts: Sequence[Sequence[int]], base: list[int]) -> torch.Tensor:
    """int64 ``[n, max(base)]`` on the CPU: the first ``base[i]`` ids of prompt ``i`` (the
    history a penalty over the prompt starts from), -1 after."""
    hist = torch.full((len(prompts), max(base)), -1, dtype=torch.int64)
    for i, (p, b) in enumerate(zip(prompts, base, strict=True)):
        if b:
            hist[i, :b] = torch.as_tensor(p[:b], dtype=torch.int64)
    return hist


class _Run:
    """One call of :func:`generate_ids` on one batch."""

    def __init__(self, decoder, prompts, rows, max_tokens, eos_id, backend, callback,
                 return_logprobs, cuda_graph, sync_every):
        batch = len(prompts)
        logits = decoder.prefill(prompts, max(max_tokens))
        self.first_logits = logits
        self.base = prompt_base(prompts, rows)
        packed = self.setup(decoder, rows, max_tokens, eos_id, backend, callback,
                            return_logprobs, cuda_graph, sync_every, logits.device,
                            logits.shape[1], batch)
        hist0 = _prompt_history(prompts, self.base)
        self.state.load(packed, hist0.to(self.state.layout.device),
                        [r.repetition_penalty_range for r in rows], list(max_tokens), self.base)
        self.delivered = [0] * batch

    def setup(self, decoder, rows, max_tokens, eos_id, backend, callback, return_logprobs,
              cuda_graph, sync_every, device: torch.device, vocab: int,
              batch: int) -> PackedParams:
        """Choose the step's path and layout for ``rows`` through ``batch`` rows of state,
        and take (or make) the decoder's state; return the packed parameters of ``rows``
        (unseeded rows' seeds drawn where the step samples on the device)."""
        self.decoder, self.rows, self.max_tokens = decoder, rows, max_tokens
        self.callback = callback
        self.total = max(max_tokens)
        kernel = resolve_backend(backend, device) == "triton"
        if kernel:
            kernel_sampler.check_device(torch.empty(0, device=device))
            # After a failure of the kernels, the reference samples (generate_ids warned).
            kernel = kernel_sampler.kernel_failure() is None
        if hasattr(decoder, "supports_fused"):  # the fused Triton decode step, with the kernels
            decoder.fused = kernel and decoder.supports_fused()
        if sync_every is None:
            sync_every = SYNC_EVERY_CUDA if device.type == "cuda" else 1
        self.sync_every = sync_every
        self.penalized = any(r.penalized for r in rows)
        top_n = max(r.logprobs for r in rows) if return_logprobs else 0
        # The reference off the CPU is capturable too (reference.sample_on_device).
        sync_free = resident(kernel, device)
        graphs = _graph_backend(device) if cuda_graph and sync_free else None
        # Top alternatives need a host decision per step (reference._top_logprobs).
        self.graph_cls = graphs if decoder.graphable and not top_n else None
        if decoder in _eager_decoders:
            self.graph_cls = None  # a capture failed on this decoder: eager steps
        cols = _round_up(self.total, _ROUND)
        hist = _round_up(max(self.base) + self.total, _ROUND)
        width = 0
        if self.penalized:
            width = min(hist, max(r.repetition_penalty_range or hist for r in rows))
        packed = PackedParams.from_rows(rows, device)
        max_top_k, nucleus = 0, 0
        if sync_free:
            max_top_k, draw, nucleus_rows = kernel_sampler.host_hints(rows, packed, len(rows))
            nucleus = kernel_sampler.NUCLEUS_CANDIDATES if nucleus_rows else 0
            if draw:
                # Unseeded rows draw their seed once; the step number keys fresh noise per
                # step, so each draw is independent as with a new seed per step.
                drawn = torch.randint(0, 2**62, (len(rows),), device=device)
                packed = replace(packed, seed=torch.where(packed.seeded, packed.seed, drawn))
        lay = _Layout(batch, cols, hist, width, max_top_k, nucleus, top_n, return_logprobs,
                      eos_id, kernel, device)
        state = decoder.engine_state
        if state is None or state.layout != lay:
            decoder.engine_state = None  # free the old buffers and graphs first
            state = _State(lay, packed.take(torch.arange(batch, device=device)), vocab)
            decoder.engine_state = state
        owner = _owner(decoder)
        if state.owner != owner:
            state.graphs.clear()  # captured on another cache or other weights
            state.owner = owner
        self.state = state
        return packed

    def width(self, step: int) -> int:
        """The eager step's window: as wide as the longest window at ``step``, no wider."""
        if not self.penalized:
            return 0
        return max(min(r.repetition_penalty_range or b + step, b + step)
                   for r, b in zip(self.rows, self.base, strict=True))

    def advance(self, step: int) -> None:
        """Run decode step ``step`` (the model on the last tokens, then sampling)."""
        st, dec = self.state, self.decoder
        if self.graph_cls is None:
            st.sample(dec.decode(st.tokens), self.width(step))
            return
        kv = dec.advance()
        graph = st.graphs.get(kv)
        if graph is not None:
            graph.replay()
            return
        width = st.layout.width

        # Only tensors that outlive this call are touched: the graph is replayed by
        # later calls that reuse this state and decoder.
        def fn() -> None:
            st.sample(dec.step(st.tokens, kv), width)

        graph = self.graph_cls(st)
        graph.warm(fn)  # a real step: this one
        try:
            graph.capture(fn)
        except Exception as exc:  # whatever broke the capture, an eager step still works
            # The warm-up already made this step; later steps run eagerly, with the same
            # tokens (they read the same buffers).
            _eager_decoders[dec] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            self.graph_cls = None
            warnings.warn(f"capturing a decode step as a CUDA graph failed "
                          f"({_eager_decoders[dec]}); this decoder runs its steps eagerly "
                          "from now on (same tokens, more launch overhead)", RuntimeWarning,
                          stacklevel=2)
            return
        st.graphs[kv] = graph

    def check(self) -> bool:
        """Wait for the device: hand new tokens to the callback, raise for bad rows.

        Returns True when every row is done.
        """
        st = self.state
        count = st.count.tolist()
        if self.callback is not None:
            lo, hi = min(self.delivered), max(count)
            if hi > lo:
                block = st.out[:, lo:hi].tolist()
                for r, (start, end) in enumerate(zip(self.delivered, count, strict=True)):
                    for t in block[r][start - lo:end - lo]:
                        self.callback(r, t)
        self.delivered = count
        self.raise_bad(lambda rows: rows)
        return bool(st.done.all())

    def raise_bad(self, input_rows: Callable[[list[int]], list[int]]) -> None:
        """Raise GenerationError where the step flagged a row (``input_rows`` maps state rows
        to the caller's rows)."""
        st = self.state
        if not st.layout.resident:
            return  # the reference on the CPU raises at the step itself
        bad = st.bad_step.tolist()
        if max(bad) < 0:
            return
        first = min(b for b in bad if b >= 0)
        rows = [r for r, b in enumerate(bad) if b == first]
        bits = st.bad_bits.tolist()
        if any(bits[r] & kernel_sampler.STATUS_EMPTY for r in rows):
            exc: Exception = EmptyRowError(input_rows(rows))
        else:
            exc = RuntimeError(f"internal error of the Triton sampler on rows "
                               f"{input_rows(rows)}")
        raise GenerationError(f"at step {first}: {exc}", self.partial()) from exc

    def partial(self) -> list[list[int]]:
        count = self.state.count.tolist()
        out = self.state.out[:, : max(count, default=0)].tolist()
        return [o[:c] for o, c in zip(out, count, strict=True)]

    def loop(self) -> None:
        step = 0
        try:
            self.state.sample(self.first_logits, self.width(0))
            self.first_logits = None
            step = 1
            while True:
                if step >= self.total or step % self.sync_every == 0:
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

    def results(self, return_logprobs: bool):
        st = self.state
        ids = self.partial()
        pairs = [(o, "eot" if len(o) < m else "length")
                 for o, m in zip(ids, self.max_tokens, strict=True)]
        if not return_logprobs:
            return pairs
        lps = _row_logprobs(st, list(range(len(ids))), [len(o) for o in ids], self.rows)
        return pairs, lps


def _owner(decoder) -> tuple:
    """What a state's graphs are captured on: the decoder's cache version, the addresses
    of its model's tensors and its step path (a graph of one path never replays the other)."""
    model = getattr(decoder, "model", None)
    return (getattr(decoder, "cache_version", None),
            fingerprint(model) if isinstance(model, torch.nn.Module) else None,
            getattr(decoder, "fused", False))


def _row_logprobs(st: _State, slots: list[int], counts: list[int],
                  rows: Sequence[SamplingParams]) -> list[RowLogprobs]:
    """The log-probabilities of state rows ``slots``: ``counts[i]`` tokens each, the top
    alternatives ``rows[i].logprobs`` deep."""
    index = torch.tensor(slots, device=st.layout.device)
    width = max(counts, default=0)
    token_lp = st.token_lp[index, :width].tolist()
    top = None
    if st.top_ids is not None:
        top = (st.top_ids[index, :width].tolist(), st.top_lp[index, :width].tolist())
    lps = []
    for j, (n, row) in enumerate(zip(counts, rows, strict=True)):
        alts = None
        if row.logprobs > 0:
            k = row.logprobs
            # A processed row lists its surviving tokens only (id -1 pads the rest).
            alts = [[(t, x) for t, x in zip(i[:k], v[:k], strict=True) if t >= 0]
                    for i, v in zip(top[0][j][:n], top[1][j][:n], strict=True)]
        lps.append(RowLogprobs(token_lp[j][:n], alts))
    return lps


def supports_slots(decoder) -> bool:
    """Whether ``decoder`` takes new prompts into rows of a running batch (continuous
    batching): our cached Llama does; recomputing decoders and transformers' own caches run
    static batches."""
    return callable(getattr(decoder, "refill", None))


RowCallback = Callable[[int, tuple[list[int], str], "RowLogprobs | None"], None]


class _SlotRun(_Run):
    """One call of :func:`generate_ids` through a fixed set of slots (continuous batching).

    Every slot is a row of the decoder's cache and of the engine's state. At each host check
    the rows that finished are harvested and their slots take the next waiting prompts: one
    batched prefill of the newcomers into their own cache rows (:meth:`refill`), their state
    rows reset (:meth:`_State.admit`), while the other rows go on. The step keeps its shape
    (its CUDA graphs are reused), and a row's noise and output column follow its own step
    counter, so a seeded row's tokens do not depend on its slot or on when it entered.
    Prompts are admitted longest ``max_tokens`` first, so that the run ends on short rows.
    Once the queue is empty, the batch halves whenever the live rows fit in half of it
    (:meth:`compact`): the tail's long rows do not keep computing empty slots, and the step
    takes at most one shape per halving.
    """

    def __init__(self, decoder, prompts, rows, max_tokens, eos_id, backend, callback,
                 return_logprobs, cuda_graph, sync_every, slots, on_row):
        n = len(prompts)
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} has no tokens")
        slots = min(slots, n)
        self.prompts, self.on_row, self.return_logprobs = prompts, on_row, return_logprobs
        self.base = prompt_base(prompts, rows)
        # The last sampled token is never fed back: a row spans len + max_tokens - 1
        # positions; a parked slot never gets further than the longest row still running.
        longest = max(range(n), key=lambda i: len(prompts[i]) + max(max_tokens[i] - 1, 0))
        decoder.reserve(slots, len(prompts[longest]), max_tokens[longest])
        device = torch.device(decoder.device)
        self.packed_all = self.setup(decoder, rows, max_tokens, eos_id, backend, callback,
                                     return_logprobs, cuda_graph, sync_every, device,
                                     decoder.model.config.vocab_size, slots)
        every = torch.arange(slots, device=device)
        self.state.load(self.packed_all.take(every), torch.empty(slots, 0, dtype=torch.int64,
                                                                 device=device),
                        [0] * slots, [0] * slots, [0] * slots)
        self.finished: dict[int, tuple] = {}
        for i, m in enumerate(max_tokens):
            if m == 0:
                self.finish(i, [], RowLogprobs([], [] if rows[i].logprobs > 0 else None))
        self.queue = deque(sorted((i for i in range(n) if max_tokens[i] > 0),
                                  key=lambda i: -max_tokens[i]))
        self.occupant: list[int | None] = [None] * slots
        self.entered = [0] * slots  # the run step at which the slot's row entered
        self.origin = [0] * slots  # the slot's next position is origin + run step
        self.delivered = [0] * slots
        self.steps = self.slot_steps = 0

    def finish(self, i: int, ids: list[int], lp: RowLogprobs | None) -> None:
        pair = (ids, "eot" if len(ids) < self.max_tokens[i] else "length")
        self.finished[i] = (pair, lp)
        if self.on_row is not None:
            self.on_row(i, pair, lp if self.return_logprobs else None)

    def width(self, step: int) -> int:
        if not self.penalized:
            return 0
        widths = [0]
        for s, i in enumerate(self.occupant):
            if i is not None:
                seen = self.base[i] + step - self.entered[s]
                widths.append(min(self.rows[i].repetition_penalty_range or seen, seen))
        return max(widths)

    def check(self, step: int) -> bool:
        """Wait for the device at run step ``step``: stream new tokens, raise for bad rows,
        harvest finished rows and refill their slots. Returns True when all is done."""
        st = self.state
        live = [s for s, i in enumerate(self.occupant) if i is not None]
        count = st.count.tolist()
        if self.callback is not None and live:
            new = max(count[s] - self.delivered[s] for s in live)
            if new > 0:
                at = torch.tensor(self.delivered, device=st.out.device).unsqueeze(1)
                cols = (at + torch.arange(new, device=at.device)).clamp_max(st.out.shape[1] - 1)
                block = st.out.gather(1, cols).tolist()
                for s in live:
                    for t in block[s][: count[s] - self.delivered[s]]:
                        self.callback(self.occupant[s], t)
        for s in live:
            self.delivered[s] = count[s]
        self.raise_bad(lambda rows: [self.occupant[r] for r in rows])
        done = st.done.tolist()
        ended = [s for s in live if done[s]]
        if ended:
            self.harvest(ended, count)
        if not self.queue and all(i is None for i in self.occupant):
            return True
        if not self.queue:
            self.compact()
        self.refill([s for s, i in enumerate(self.occupant) if i is None], step)
        return False

    def harvest(self, slots: list[int], count: list[int]) -> None:
        """Hand out the rows in ``slots`` (done), freeing their slots."""
        st = self.state
        counts = [count[s] for s in slots]
        index = torch.tensor(slots, device=st.out.device)
        ids = st.out[index, : max(counts)].tolist()
        lps: list[RowLogprobs | None] = [None] * len(slots)
        if self.return_logprobs:
            lps = _row_logprobs(st, slots, counts, [self.rows[self.occupant[s]] for s in slots])
        for j, s in enumerate(slots):
            self.finish(self.occupant[s], ids[j][: counts[j]], lps[j])
            self.occupant[s] = None

    def compact(self) -> None:
        """Halve the batch while the live rows fit in half of it: their cache rows, state
        rows and slot bookkeeping move to a smaller layout (the freed slots are parked)."""
        live = [s for s, i in enumerate(self.occupant) if i is not None]
        size = batch = self.state.layout.batch
        while size > 1 and (size + 1) // 2 >= len(live):
            size = (size + 1) // 2
        if size == batch:
            return
        keep = live + [s for s, i in enumerate(self.occupant) if i is None][: size - len(live)]
        self.decoder.compact(keep)
        state = self.state.compact(torch.tensor(keep, device=self.state.layout.device))
        state.owner = _owner(self.decoder)
        self.state = state  # the decoder keeps the full one, for the next run's graphs
        for name in ("occupant", "entered", "origin", "delivered"):
            setattr(self, name, [getattr(self, name)[s] for s in keep])

    def refill(self, free: list[int], step: int) -> None:
        """Give free slots the next waiting prompts (one prefill); park the rest."""
        take = [self.queue.popleft() for _ in range(min(len(free), len(self.queue)))]
        slots, idle = free[: len(take)], free[len(take):]
        for s, i in zip(slots, take, strict=True):
            self.occupant[s], self.entered[s], self.delivered[s] = i, step, 0
            self.origin[s] = len(self.prompts[i]) - 1 - step
        for s in idle:
            self.origin[s] = -step
        bound = max(self.origin) + step  # the largest next position over every slot
        st, dev = self.state, self.state.layout.device
        if take:
            base = [self.base[i] for i in take]
            hist = _prompt_history([self.prompts[i] for i in take], base)
            index = torch.tensor(slots, device=dev)
            st.admit(index, self.packed_all.take(torch.tensor(take, device=dev)), hist,
                     [self.rows[i].repetition_penalty_range for i in take],
                     [self.max_tokens[i] for i in take], base,
                     [self.prompts[i][-1] for i in take])
            self.decoder.refill(slots, [self.prompts[i] for i in take], bound)
        if idle:
            # Re-parked at every check: their positions, history and columns restart at 0.
            index = torch.tensor(idle, device=dev)
            st.park(index)
            self.decoder.park(idle)
        self.decoder.kv_len = bound

    def next_check(self, step: int) -> int:
        """The next run step to look at: ``sync_every`` on, or sooner where a row reaches its
        ``max_tokens`` (its slot is free then, and it must not step past its columns)."""
        ends = [self.entered[s] + self.max_tokens[i]
                for s, i in enumerate(self.occupant) if i is not None]
        return min([step + self.sync_every, *ends])

    def partial(self) -> list[list[int]]:
        count = self.state.count.tolist()
        ids = {i: pair[0] for i, (pair, _) in self.finished.items()}
        for s, i in enumerate(self.occupant):
            if i is not None:
                ids[i] = self.state.out[s, : count[s]].tolist()
        return [ids.get(i, []) for i in range(len(self.prompts))]

    def loop(self) -> None:
        step, due = 0, 0
        try:
            while True:
                if step >= due:
                    if self.check(step):
                        return
                    due = self.next_check(step)
                self.advance(step)
                step += 1
                self.steps = step
                self.slot_steps += self.state.layout.batch
        except EmptyRowError as exc:  # the reference sampler raises at the step
            rows = [self.occupant[r] for r in exc.rows if self.occupant[r] is not None]
            raise GenerationError(f"at step {step}: {EmptyRowError(rows)}",
                                  self.partial()) from exc

    def results(self, return_logprobs: bool):
        got = [self.finished[i] for i in range(len(self.prompts))]
        pairs = [pair for pair, _ in got]
        return (pairs, [lp for _, lp in got]) if return_logprobs else pairs


@dataclass
class DecodeStats:
    """Work of :func:`generate_ids` calls, added up: decode ``steps`` and ``slot_steps``
    (rows times steps: what the device computed, kept or not)."""

    steps: int = 0
    slot_steps: int = 0


def _decode(decoder, prompts, rows, max_tokens, eos_id, backend, callback, return_logprobs,
            cuda_graph, sync_every, slots=None, on_row=None, stats=None):
    batch = len(prompts)
    if max(max_tokens, default=0) == 0:
        pairs = [([], "length")] * batch
        lps = [RowLogprobs([], [] if r.logprobs > 0 else None) for r in rows]
        if on_row is not None:
            for i in range(batch):
                on_row(i, pairs[i], lps[i] if return_logprobs else None)
        return (pairs, lps) if return_logprobs else pairs
    if decoder.busy:
        # Its cache and buffers belong to the run in progress (a callback called back in).
        raise RuntimeError("this decoder is already generating; use another one (wrap(model)) "
                           "for a nested call")
    decoder.busy = True
    try:
        if slots is not None:
            run = _SlotRun(decoder, prompts, rows, max_tokens, eos_id, backend, callback,
                           return_logprobs, cuda_graph, sync_every, slots, on_row)
        else:
            run = _Run(decoder, prompts, rows, max_tokens, eos_id, backend, callback,
                       return_logprobs, cuda_graph, sync_every)
        try:
            run.loop()
        finally:
            if stats is not None:
                stats.steps += run.steps
                stats.slot_steps += run.slot_steps
        got = run.results(return_logprobs)
        if slots is None and on_row is not None:
            pairs, lps = got if return_logprobs else (got, [None] * batch)
            for i in range(batch):
                on_row(i, pairs[i], lps[i])
        return got
    finally:
        decoder.busy = False


def _free(decoder) -> None:
    """Drop everything the decoder holds on the device after an out-of-memory error."""
    decoder.engine_state = None
    if hasattr(decoder, "release"):
        decoder.release()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _kv_bytes_per_position(model) -> int | None:
    """KV-cache bytes per row and position of ``model``, from its config where it has no
    ``kv_bytes_per_position`` (a transformers model); None where the config does not say."""
    if hasattr(model, "kv_bytes_per_position"):
        return model.kv_bytes_per_position()
    c = model.config
    layers = getattr(c, "num_hidden_layers", None)
    heads = getattr(c, "num_attention_heads", None)
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None)
    if head_dim is None and heads and getattr(c, "hidden_size", None):
        head_dim = c.hidden_size // heads
    param = next(iter(model.parameters()), None)
    if not (layers and kv_heads and head_dim) or param is None:
        return None
    return 2 * layers * kv_heads * head_dim * param.element_size()


def _one_row_message(decoder, prompt: Sequence[int], max_tokens: int, exc: Exception) -> str:
    need = len(prompt) + max(max_tokens - 1, 0)
    msg = (f"out of device memory for a single row of {len(prompt)} prompt tokens and "
           f"max_tokens={max_tokens} ({need} positions)")
    model = getattr(decoder, "model", None)
    config = getattr(model, "config", None)
    device = getattr(decoder, "device", None)
    per_position = _kv_bytes_per_position(model) if config is not None else None
    if per_position and device is not None and torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        msg += (f"; {free / 2**20:.0f} MiB are free, and the KV cache alone takes "
                f"{per_position / 2**10:.1f} KiB per position: at most about "
                f"{free // per_position} positions fit for one row")
    return f"{msg} ({str(exc).splitlines()[0]})"


@torch.inference_mode()
def generate_ids(
    decoder,
    prompts: Sequence[Sequence[int]],
    rows: Sequence[SamplingParams],
    max_tokens: Sequence[int],
    eos_id: int,
    *,
    backend: str = "auto",
    callback: TokenCallback | None = None,
    return_logprobs: bool = False,
    cuda_graph: bool = True,
    sync_every: int | None = None,
    max_batch_size: int | None = None,
    on_row: RowCallback | None = None,
    stats: DecodeStats | None = None,
) -> list[tuple[list[int], str]] | tuple[list[tuple[list[int], str]], list[RowLogprobs]]:
    """Sample up to ``max_tokens[r]`` tokens for each prompt (lists of ids) on ``decoder``.

    Parameters
    ----------
    decoder
        From :func:`lmgen_fast.wrap` (or :func:`lmgen_fast.models.decoder.decoder_for`).
    prompts : sequence of sequences of int
        Token ids, any lengths.
    rows : sequence of SamplingParams
        One per prompt.
    max_tokens : sequence of int
        Per-row caps (already validated, ``>= 0``).
    eos_id : int
        The token that ends a row (not returned).
    backend : str
        "auto", "reference" or "triton" (see :func:`lmgen_fast.sample`).
    callback : callable, optional
        ``callback(row, token_id)`` once for every token, in each row's order, at the host
        checks (every step on the CPU, every ``sync_every`` steps on CUDA).
    return_logprobs : bool
        Also return a :class:`RowLogprobs` per row (the extra work is done only then).
    cuda_graph : bool
        Replay each decode step as a CUDA graph where possible (CUDA tensors, the Triton
        sampler, a graph-capable decoder, no top alternatives asked).
    sync_every : int, optional
        Steps between host checks; default 16 on CUDA and 1 elsewhere.
    max_batch_size : int, optional
        Rows decoded at once. With more prompts than that, a decoder that
        :func:`supports_slots` runs continuous batching through ``max_batch_size`` slots (a
        finished row's slot takes the next prompt at the next host check); other decoders
        run static batches of that size in turn. None: every prompt in one batch.
    on_row : callable, optional
        ``on_row(row, (token_ids, finish_reason), row_logprobs)`` once per row as soon as it
        is finished (``row_logprobs`` None without ``return_logprobs``).
    stats : DecodeStats, optional
        Steps and slot-steps of the call are added to it.

    Returns
    -------
    list of (token_ids, finish_reason)
        Per row, in the order of ``prompts``, ``finish_reason`` "eot" or "length"; with
        ``return_logprobs`` also the list of :class:`RowLogprobs`.

    Raises
    ------
    GenerationError
        A row had nothing to sample; ``partial`` holds what every row had so far.
    DecodeOutOfMemory
        A single row does not fit. A larger batch that does not fit is split in halves
        (continuous batching: run with half the slots), with a warning, which for seeded
        rows gives the same tokens.

    Notes
    -----
    Degrade, never fail: where capturing a step as a CUDA graph raises, a ``RuntimeWarning``
    names the cause and the decoder runs its steps eagerly from then on; where the Triton
    kernels fail to compile or launch, a ``RuntimeWarning`` names the cause and the call
    (and the rest of the process) samples with the reference on the same device. Seeded
    rows get the same tokens either way.
    """
    check_sync_every(sync_every)
    check_max_batch_size(max_batch_size)
    slots = None
    if max_batch_size is not None and len(prompts) > max_batch_size:
        if not supports_slots(decoder):
            return _in_turn(decoder, prompts, rows, max_tokens, eos_id, max_batch_size,
                            dict(backend=backend, callback=callback,
                                 return_logprobs=return_logprobs, cuda_graph=cuda_graph,
                                 sync_every=sync_every, on_row=on_row, stats=stats))
        slots = max_batch_size
    delivered = [False]

    def counted(row: int, token: int) -> None:
        delivered[0] = True
        callback(row, token)

    def handed(row: int, pair, lp) -> None:
        delivered[0] = True
        on_row(row, pair, lp)

    options = dict(backend=backend, callback=callback, return_logprobs=return_logprobs,
                   cuda_graph=cuda_graph, sync_every=sync_every, on_row=on_row, stats=stats)
    try:
        # Triton, graphs and streams act on the current CUDA device: make it the model's.
        with on_device(getattr(decoder, "device", None)):
            return _decode(decoder, prompts, rows, max_tokens, eos_id, backend,
                           None if callback is None else counted, return_logprobs,
                           cuda_graph, sync_every, slots, None if on_row is None else handed,
                           stats)
    except torch.OutOfMemoryError as exc:
        _free(decoder)
        if delivered[0]:
            raise DecodeOutOfMemory(
                f"out of device memory after tokens were streamed (or rows handed to "
                f"on_row); run fewer than "
                f"{slots or len(prompts)} rows at a time ({str(exc).splitlines()[0]})"
            ) from exc
        if slots == 1 or len(prompts) == 1:
            longest = max(range(len(prompts)),
                          key=lambda i: len(prompts[i]) + max_tokens[i])
            raise DecodeOutOfMemory(_one_row_message(
                decoder, prompts[longest], max_tokens[longest], exc)) from exc
    except kernel_sampler.KernelUnavailable as exc:
        kernel_sampler.note_failure(exc)
        if delivered[0]:
            raise  # tokens were streamed: a rerun would hand them out twice
        # Nothing was handed out yet: the whole call again, sampled by the reference.
        return generate_ids(decoder, prompts, rows, max_tokens, eos_id,
                            max_batch_size=max_batch_size,
                            **{**options, "backend": "reference"})
    if slots is not None:
        half = (slots + 1) // 2
        warnings.warn(f"{slots} slots did not fit in device memory; generating through "
                      f"{half} slots", RuntimeWarning, stacklevel=3)
        return generate_ids(decoder, prompts, rows, max_tokens, eos_id, max_batch_size=half,
                            **options)
    half = (len(prompts) + 1) // 2
    warnings.warn(f"a batch of {len(prompts)} rows did not fit in device memory; generating "
                  f"it as batches of at most {half}", RuntimeWarning, stacklevel=3)
    return _in_turn(decoder, prompts, rows, max_tokens, eos_id, half, options)


def _in_turn(decoder, prompts, rows, max_tokens, eos_id, size: int, options: dict):
    """:func:`generate_ids` on batches of ``size`` rows in turn (rows keep their numbers)."""
    callback, on_row = options["callback"], options["on_row"]
    parts = []
    for lo in range(0, len(prompts), size):
        hi = lo + size

        def shifted(row: int, token: int, lo: int = lo) -> None:
            callback(row + lo, token)

        def shifted_row(row: int, pair, lp, lo: int = lo) -> None:
            on_row(row + lo, pair, lp)

        parts.append(generate_ids(
            decoder, prompts[lo:hi], rows[lo:hi], max_tokens[lo:hi], eos_id,
            **{**options, "callback": None if callback is None else shifted,
               "on_row": None if on_row is None else shifted_row}))
    if not options["return_logprobs"]:
        return [pair for part in parts for pair in part]
    return ([p for part in parts for p in part[0]], [lp for part in parts for lp in part[1]])


# Prompts that generate_batch runs in one batch by default; beyond, through this many slots.
DEFAULT_SLOTS = 64


def default_slots(decoder, prompts: Sequence[Sequence[int]], max_tokens: Sequence[int]) -> int:
    """The default ``max_batch_size`` of :func:`lmgen_fast.generate_batch`.

    All prompts in one batch when there are at most :data:`DEFAULT_SLOTS` of them (the
    behaviour before continuous batching); more go through ``DEFAULT_SLOTS`` slots, fewer
    on a GPU where their KV cache (sized by the longest row) would take more than half of
    the free memory.
    """
    if len(prompts) <= DEFAULT_SLOTS:
        return max(len(prompts), 1)
    slots = DEFAULT_SLOTS
    model = getattr(decoder, "model", None)
    device = torch.device(getattr(decoder, "device", "cpu"))
    if device.type == "cuda" and isinstance(model, torch.nn.Module):
        per_position = _kv_bytes_per_position(model)
        positions = max(len(p) + max(m - 1, 0) for p, m in zip(prompts, max_tokens,
                                                                 strict=True))
        if per_position:
            free, _ = torch.cuda.mem_get_info(device)
            slots = max(1, min(slots, free // 2 // (per_position * positions)))
    return slots


def check_max_batch_size(max_batch_size: int | None) -> None:
    """Raise ValueError unless ``max_batch_size`` is None or a positive int."""
    if max_batch_size is None:
        return
    if (isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int)
            or max_batch_size < 1):
        raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
