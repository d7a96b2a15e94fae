"""One decode step on a state: the model on every row's last token, then the sampler and
the bookkeeping. Eagerly, or, for a graphable decoder with a sync-free sampler on CUDA,
as a CUDA graph captured once per KV length and replayed after."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from lmgen_fast.engine.state import DeviceState
from lmgen_fast.runtime import graphs


class Stepper:
    """Advances a state one step on ``decoder``, capturing steps with ``graph_cls`` (None:
    eagerly).

    Where a capture fails, the step it warmed up already ran, the later steps run eagerly
    (same tokens, they read the same buffers) and :attr:`capture_failure` holds the cause,
    for the caller to remember (see :mod:`lmgen_fast.engine.generate`).

    ``prepare(state, logits)``, where given, runs between an eager step's forward and its
    sampler and returns the logits to sample from (the grammar masks are filled there,
    while the forward runs on the device); a run with one is planned without graphs.
    """

    def __init__(self, decoder, graph_cls: type | None,
                 prepare: Callable[[DeviceState, torch.Tensor], torch.Tensor] | None = None):
        self.decoder, self.graph_cls, self.prepare = decoder, graph_cls, prepare
        self.capture_failure: str | None = None

    def sample(self, st: DeviceState, logits: torch.Tensor, width: int) -> None:
        """Sample ``st``'s rows from ``logits`` (``[B, V]``), after :attr:`prepare`."""
        st.sample(logits if self.prepare is None else self.prepare(st, logits), width)

    def advance(self, st: DeviceState, width: Callable[[], int]) -> None:
        """Run one decode step on ``st``; ``width()`` is the penalty window of an eager
        step (asked only for one: a graph step reads the layout's)."""
        dec = self.decoder
        if self.graph_cls is None:
            self.sample(st, dec.decode(st.tokens), width())
            return
        kv = dec.advance()
        graph = st.graphs.get(kv)
        if graph is not None:
            graph.replay()
            return
        full = st.layout.width

        # Only tensors that outlive this call are touched: the graph is replayed by
        # later calls that reuse this state and decoder.
        def fn() -> None:
            st.sample(dec.step(st.tokens, kv), full)

        graph, cause = graphs.capture(self.graph_cls, st.pool, fn)
        if graph is None:
            self.capture_failure, self.graph_cls = cause, None
            warnings.warn(f"capturing a decode step as a CUDA graph failed ({cause}); this "
                          "decoder runs its steps eagerly from now on (same tokens, more "
                          "launch overhead)", RuntimeWarning, stacklevel=3)
            return
        st.graphs[kv] = graph
