"""CUDA graphs: capture a step, or fall back to running it eagerly, in one place.

A step is a function of no arguments that reads and writes only tensors that outlive it;
:func:`capture` runs it once for real (the warm-up: Triton compilation and cuBLAS
workspaces must not happen inside a capture), then records it. Whatever breaks a capture,
the caller goes on eagerly with the same tokens: :func:`capture` returns the cause instead
of raising.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


def _capture_autocast():
    """Autocast as the caller set it, minus its cast cache, which must not outlive a capture
    (PyTorch's CUDA graph notes)."""
    if torch.is_autocast_enabled("cuda"):
        return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                              cache_enabled=False)
    return contextlib.nullcontext()


class GraphPool:
    """The memory pool and side stream that a family of graphs shares: one cuBLAS
    workspace, allocated while warming up, not inside a capture. Made on first use."""

    def __init__(self) -> None:
        self.pool = self.stream = None

    def ensure(self) -> None:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
            self.stream = torch.cuda.Stream()


class CudaGraph:
    """One captured step on CUDA, sharing ``pool``'s memory and stream."""

    def __init__(self, pool: GraphPool):
        pool.ensure()
        self.pool, self.stream = pool.pool, pool.stream
        self.graph = torch.cuda.CUDAGraph()

    def warm(self, fn: Callable[[], None]) -> None:
        # PyTorch asks for the first run of a shape on a side stream.
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


def graph_backend(device: torch.device):
    """The class that captures steps on ``device``, or None where there are no graphs."""
    return CudaGraph if device.type == "cuda" else None


def capture(graph_cls, pool: GraphPool, fn: Callable[[], None]) -> tuple[object, str | None]:
    """Run ``fn`` once (a real step), then capture it as a graph of ``graph_cls``.

    Returns ``(graph, None)``, or ``(None, cause)`` where the capture raised: the warm-up
    already did this step's work, so the caller runs later steps eagerly.
    """
    graph = graph_cls(pool)
    graph.warm(fn)
    try:
        graph.capture(fn)
    except Exception as exc:  # whatever broke the capture, an eager step still works
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return graph, None
