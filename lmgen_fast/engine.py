"""The decode loop, resident on the device: prefill, then one step per token.

A step is the model's forward for one token per row (writing the KV cache), the sampler,
and the bookkeeping: each row's history for the penalties, its count of kept tokens, EOT,
its length cap, and a flag for a row that had nothing to sample (with the Triton sampler,
one launch of :mod:`lmgen_fast.bookkeeping`; eager torch ops on the reference path, bit for
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch

from . import bookkeeping, kernel_sampler, reference
from .decoder import fingerprint
from .kernel_sampler import on_device
from .params import PackedParams, SamplingParams
from .reference import EmptyRowError, SampleLogprobs
from .sampling import resolve_backend

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


class GenerationError(ValueError):
    """Generation stopped on bad model output; ``partial`` holds each row's ids so far."""

    def __init__(self, message: str, partial: list[list[int]]):
        super().__init__(message)
        self.partial = partial


class DecodeOutOfMemory(RuntimeError):
    """Even one row does not fit in the device's memory; the message says what would."""


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
        self.layout = lay
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
        self.lp = torch.zeros(b, 3, **f32) if lay.logprobs and lay.kernel else None
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
            tokens, status, token_lp = reference.sample_on_device(
                logits, self.packed, window, self.step,
                draw_seeds=False, return_logprobs=lay.logprobs and not lay.top_n)
            if lay.logprobs:
                slp = (reference.raw_logprobs(logits, tokens, lay.top_n) if lay.top_n else
                       SampleLogprobs(token_lp, None, None))
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
            slp = kernel_sampler.logprobs_from_launch(logits, self.lp, lay.top_n)
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


class _Run:
    """One call of :func:`generate_ids` on one batch."""

    def __init__(self, decoder, prompts, rows, max_tokens, eos_id, backend, callback,
                 return_logprobs, cuda_graph, sync_every):
        self.decoder, self.rows, self.max_tokens = decoder, rows, max_tokens
        self.callback = callback
        self.total = max(max_tokens)
        batch = len(prompts)
        logits = decoder.prefill(prompts, self.total)
        self.first_logits = logits
        device = logits.device
        kernel = resolve_backend(backend, device) == "triton"
        if kernel:
            kernel_sampler.check_device(logits)
            # After a failure of the kernels, the reference samples (generate_ids warned).
            kernel = kernel_sampler.kernel_failure() is None
        if hasattr(decoder, "supports_fused"):  # the fused Triton decode step, with the kernels
            decoder.fused = kernel and decoder.supports_fused()
        if sync_every is None:
            sync_every = SYNC_EVERY_CUDA if device.type == "cuda" else 1
        self.sync_every = sync_every
        self.base = [len(p) if r.penalty_scope == "all" else 0
                     for p, r in zip(prompts, rows, strict=True)]
        self.penalized = any(r.repetition_penalty != 1.0 or r.frequency_penalty != 0.0
                             or r.presence_penalty != 0.0 for r in rows)
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
            max_top_k, draw, nucleus_rows = kernel_sampler.host_hints(rows, packed, batch)
            nucleus = kernel_sampler.NUCLEUS_CANDIDATES if nucleus_rows else 0
            if draw:
                # Unseeded rows draw their seed once; the step number keys fresh noise per
                # step, so each draw is independent as with a new seed per step.
                drawn = torch.randint(0, 2**62, (batch,), device=device)
                packed = replace(packed, seed=torch.where(packed.seeded, packed.seed, drawn))
        lay = _Layout(batch, cols, hist, width, max_top_k, nucleus, top_n, return_logprobs,
                      eos_id, kernel, device)
        state = decoder.engine_state
        if state is None or state.layout != lay:
            decoder.engine_state = None  # free the old buffers and graphs first
            state = _State(lay, packed, logits.shape[1])
            decoder.engine_state = state
        model = getattr(decoder, "model", None)
        owner = (getattr(decoder, "cache_version", None),
                 fingerprint(model) if isinstance(model, torch.nn.Module) else None,
                 getattr(decoder, "fused", False))  # a graph of one path never replays the other
        if state.owner != owner:
            state.graphs.clear()  # captured on another cache or other weights
            state.owner = owner
        hist0 = torch.full((batch, max(self.base)), -1, dtype=torch.int64)
        for i, p in enumerate(prompts):
            if self.base[i]:
                hist0[i, : self.base[i]] = torch.as_tensor(p, dtype=torch.int64)
        state.load(packed, hist0.to(device), [r.repetition_penalty_range for r in rows],
                   list(max_tokens), self.base)
        self.state = state
        self.delivered = [0] * batch

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
        if st.layout.resident:
            bad = st.bad_step.tolist()
            if max(bad) >= 0:
                first = min(b for b in bad if b >= 0)
                rows = [r for r, b in enumerate(bad) if b == first]
                bits = st.bad_bits.tolist()
                if any(bits[r] & kernel_sampler.STATUS_EMPTY for r in rows):
                    exc: Exception = EmptyRowError(rows)
                else:
                    exc = RuntimeError(f"internal error of the Triton sampler on rows {rows}")
                raise GenerationError(f"at step {first}: {exc}", self.partial()) from exc
        return bool(st.done.all())

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

    def results(self, return_logprobs: bool):
        st = self.state
        ids = self.partial()
        pairs = [(o, "eot" if len(o) < m else "length")
                 for o, m in zip(ids, self.max_tokens, strict=True)]
        if not return_logprobs:
            return pairs
        width = max(len(o) for o in ids)
        token_lp = st.token_lp[:, :width].tolist()
        top = None
        if st.top_ids is not None:
            top = (st.top_ids[:, :width].tolist(), st.top_lp[:, :width].tolist())
        lps = []
        for r, (o, row) in enumerate(zip(ids, self.rows, strict=True)):
            n = len(o)
            alts = None
            if row.logprobs > 0:
                k = row.logprobs
                alts = [list(zip(i[:k], v[:k], strict=True))
                        for i, v in zip(top[0][r][:n], top[1][r][:n], strict=True)]
            lps.append(RowLogprobs(token_lp[r][:n], alts))
        return pairs, lps


def _decode(decoder, prompts, rows, max_tokens, eos_id, backend, callback, return_logprobs,
            cuda_graph, sync_every):
    batch = len(prompts)
    if max(max_tokens, default=0) == 0:
        pairs = [([], "length")] * batch
        lps = [RowLogprobs([], [] if r.logprobs > 0 else None) for r in rows]
        return (pairs, lps) if return_logprobs else pairs
    if decoder.busy:
        # Its cache and buffers belong to the run in progress (a callback called back in).
        raise RuntimeError("this decoder is already generating; use another one (wrap(model)) "
                           "for a nested call")
    decoder.busy = True
    try:
        run = _Run(decoder, prompts, rows, max_tokens, eos_id, backend, callback,
                   return_logprobs, cuda_graph, sync_every)
        run.loop()
        return run.results(return_logprobs)
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
) -> list[tuple[list[int], str]] | tuple[list[tuple[list[int], str]], list[RowLogprobs]]:
    """Sample up to ``max_tokens[r]`` tokens for each prompt (lists of ids) on ``decoder``.

    Parameters
    ----------
    decoder
        From :func:`lmgen_fast.wrap` (or :func:`lmgen_fast.decoder.decoder_for`).
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

    Returns
    -------
    list of (token_ids, finish_reason)
        Per row, ``finish_reason`` "eot" or "length"; with ``return_logprobs`` also the list
        of :class:`RowLogprobs`.

    Raises
    ------
    GenerationError
        A row had nothing to sample; ``partial`` holds what every row had so far.
    DecodeOutOfMemory
        A single row does not fit. A larger batch that does not fit is split in halves
        (with a warning), which for seeded rows gives the same tokens.

    Notes
    -----
    Degrade, never fail: where capturing a step as a CUDA graph raises, a ``RuntimeWarning``
    names the cause and the decoder runs its steps eagerly from then on; where the Triton
    kernels fail to compile or launch, a ``RuntimeWarning`` names the cause and the call
    (and the rest of the process) samples with the reference on the same device. Seeded
    rows get the same tokens either way.
    """
    check_sync_every(sync_every)
    delivered = [False]

    def counted(row: int, token: int) -> None:
        delivered[0] = True
        callback(row, token)

    try:
        # Triton, graphs and streams act on the current CUDA device: make it the model's.
        with on_device(getattr(decoder, "device", None)):
            return _decode(decoder, prompts, rows, max_tokens, eos_id, backend,
                           None if callback is None else counted, return_logprobs,
                           cuda_graph, sync_every)
    except torch.OutOfMemoryError as exc:
        _free(decoder)
        if delivered[0]:
            raise DecodeOutOfMemory(
                f"out of device memory after tokens were streamed to the callback; run "
                f"fewer than {len(prompts)} rows at a time ({str(exc).splitlines()[0]})"
            ) from exc
        if len(prompts) == 1:
            raise DecodeOutOfMemory(
                _one_row_message(decoder, prompts[0], max_tokens[0], exc)) from exc
    except kernel_sampler.KernelUnavailable as exc:
        kernel_sampler.note_failure(exc)
        if delivered[0]:
            raise  # tokens were streamed: a rerun would hand them out twice
        # Nothing was handed out yet: the whole call again, sampled by the reference.
        return generate_ids(decoder, prompts, rows, max_tokens, eos_id, backend="reference",
                            callback=callback, return_logprobs=return_logprobs,
                            cuda_graph=cuda_graph, sync_every=sync_every)
    half = (len(prompts) + 1) // 2
    warnings.warn(f"a batch of {len(prompts)} rows did not fit in device memory; generating "
                  f"it as batches of at most {half}", RuntimeWarning, stacklevel=3)
    parts = []
    for lo in range(0, len(prompts), half):
        hi = lo + half

        def shifted(row: int, token: int, lo: int = lo) -> None:
            callback(row + lo, token)

        parts.append(generate_ids(
            decoder, prompts[lo:hi], rows[lo:hi], max_tokens[lo:hi], eos_id,
            backend=backend, callback=None if callback is None else shifted,
            return_logprobs=return_logprobs, cuda_graph=cuda_graph, sync_every=sync_every))
    if not return_logprobs:
        return [pair for part in parts for pair in part]
    return ([p for part in parts for p in part[0]], [lp for part in parts for lp in part[1]])
