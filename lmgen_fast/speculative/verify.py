"""The verify step of a round (the target's forward over ``T`` positions of every row, then
the sampler) replayed as a CUDA graph: one graph per (positions, attention length), kept for
the call, sharing one :class:`~lmgen_fast.runtime.graphs.GraphPool`."""

from __future__ import annotations

import warnings

import torch

from lmgen_fast.models.decoder import CachedLlamaDecoder
from lmgen_fast.runtime import graphs
from lmgen_fast.sampling import reference
from lmgen_fast.speculative.cache import attention_len
from lmgen_fast.speculative.rows import Rows, sample_positions


class _Verify:
    """One verify step: the target's forward over ``T`` positions of every row at
    attention length ``kv_len``, then the sampler, reading and writing only these buffers
    (and the decoder's cache), so that a graph can replay it."""

    def __init__(self, decoder: CachedLlamaDecoder, state: Rows, t: int, kv_len: int,
                 logprobs: bool):
        dev, b = state.device, state.batch
        i64 = dict(dtype=torch.int64, device=dev)
        self.ids = torch.zeros(b, t, **i64)
        self.positions = torch.zeros(b, t, **i64)
        self.drafts = torch.full((b, t - 1), -1, **i64)
        self.steps = torch.zeros(b, **i64)
        self.hlen = torch.zeros(b, **i64)
        self.tokens = torch.zeros(b * t, **i64)
        self.status = torch.zeros(b * t, dtype=torch.int32, device=dev)
        self.token_lp = torch.zeros(b * t, dtype=torch.float32, device=dev)
        self.logprobs = logprobs
        self.graph = None  # set once captured
        # Every window as wide as the history plus the drafts: -1 padded, same penalties.
        width = (state.hist.shape[1] + t - 1) if state.hist is not None else 1

        def fn() -> None:
            logits = decoder.forward_positions(self.ids, self.positions, kv_len)
            # The parameters are read at every replay: slots take new rows between rounds.
            got = sample_positions(logits, state.flat_params(t), state.hist, self.hlen,
                                   state.ranges, self.steps, self.drafts, 0, width, True,
                                   logprobs, state.kernel)
            self.tokens.copy_(got.tokens)
            self.status.copy_(got.status)
            if logprobs:
                self.token_lp.copy_(got.logprobs.token_logprob)

        self.fn = fn

    def result(self) -> reference.SampleResult:
        lp = None
        if self.logprobs:
            empty = self.tokens.new_zeros(self.tokens.shape[0], 0)
            lp = reference.SampleLogprobs(self.token_lp, empty, empty.float())
        return reference.SampleResult(self.tokens, self.status, lp)


class VerifyGraphs:
    """The rounds' verify steps as graphs of ``graph_cls``: a round is then copies into
    fixed buffers and one replay. Capture failing warns once and leaves the rest of the call
    eager (same tokens): :attr:`broken` is then True.

    Parameters
    ----------
    graph_cls
        The graph class (:func:`lmgen_fast.runtime.graphs.graph_backend`), made as
        ``graph_cls(pool)``.
    decoder : CachedLlamaDecoder
        The target, after its prefill.
    state : Rows
        The batch; a step reads its parameters, penalty history, steps and history lengths.
    logprobs : bool
        Also each sampled token's log-probability (no top alternatives: they need the host).
    """

    def __init__(self, graph_cls, decoder: CachedLlamaDecoder, state: Rows, logprobs: bool):
        self.graph_cls, self.decoder, self.state = graph_cls, decoder, state
        self.logprobs = logprobs
        self.pool = graphs.GraphPool()
        self.steps: dict[tuple[int, int], _Verify] = {}
        self.broken = False

    def run(self, ids: torch.Tensor, positions: torch.Tensor, drafts: torch.Tensor,
            top: int) -> reference.SampleResult:
        """One round's verify step: the target at ``ids`` and ``positions`` (``[B, T]``
        int64, highest ``top``), then the sampler with ``drafts`` (``[B, T - 1]`` int64)
        in the penalty windows. Returns ``tokens`` and ``status`` ``[B * T]``, views of the
        step's buffers (read them before the next round)."""
        st = self.state
        t = ids.shape[1]
        kv_len = attention_len(self.decoder, top)
        step = self.steps.get((t, kv_len))
        fresh = step is None
        if fresh:
            step = _Verify(self.decoder, st, t, kv_len, self.logprobs)
        step.ids.copy_(ids)
        step.positions.copy_(positions)
        step.drafts.copy_(drafts)
        step.steps.copy_(torch.tensor(st.steps, device=st.device))
        step.hlen.copy_(torch.tensor(st.hlen, device=st.device))
        if not fresh:
            step.graph.replay()
            return step.result()
        # The capture's warm-up is a real step: this round's.
        step.graph, cause = graphs.capture(self.graph_cls, self.pool, step.fn)
        if step.graph is None:
            self.broken = True
            warnings.warn(f"capturing a speculative verify step as a CUDA graph failed "
                          f"({cause}); the rest of this call runs eagerly (same tokens)",
                          RuntimeWarning, stacklevel=6)  # generate_ids' caller
        else:
            self.steps[(t, kv_len)] = step
        return step.result()
