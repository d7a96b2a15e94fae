"""Helpers shared by the benchmark scripts: timing, machine name, JSON output."""

from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

# The module, not the package: lmgen_fast.cli's `main` is the command's function.
from lmgen_fast.cli import options as cli

RESULTS = Path(__file__).parent / "results"


def device_name(device: str = "cpu") -> str:
    """The CLI's name for ``device``; for the CPU with the torch thread count, which the
    numbers depend on."""
    name = cli.device_name(torch.device(device))
    return name if device.startswith("cuda") else f"{name} ({torch.get_num_threads()} threads)"


def sync(device: str) -> None:
    """Wait for the GPU when ``device`` is a CUDA device (wall times then cover its work)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(fn, repeats: int, warmup: int = 1,
                   device: str = "cpu") -> tuple[float, list[float]]:
    """Median wall time of ``fn()`` over ``repeats`` runs, after ``warmup`` runs; on a CUDA
    ``device`` each run ends when the GPU is done."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def write_json(name: str, payload: dict) -> Path:
    """Write ``payload`` to ``results/{name}.json``, or to ``name`` itself if it is a path
    ending in ``.json``. Atomic (a temporary file renamed over it): the scripts rewrite
    their file after every row, and a timeout's kill mid-write must not leave half a file."""
    path = Path(name) if name.endswith(".json") else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
    return path


def run_info(device: str) -> dict:
    """What a result file says about its run: device name, torch and triton versions, the
    date and the command (render_results.py heads its sections with these)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    script = Path(sys.argv[0])
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": shlex.join(["python", f"benchmarks/{script.name}", *sys.argv[1:]]),
    }


def cuda_median_us(fn, n_bufs: int, iters: int, warmup: int = 3,
                   flush: torch.Tensor | None = None) -> float:
    """Median of per-call CUDA-event times in microseconds; call i runs ``fn(i % n_bufs)``
    (rotating input buffers keeps them out of L2). With ``flush`` (a buffer larger than L2),
    it is overwritten before every call, outside the timed span, so that each call reads
    its inputs from memory whatever their size."""
    for i in range(warmup):
        fn(i % n_bufs)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        if flush is not None:
            flush.zero_()
        starts[i].record()
        fn(i % n_bufs)
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1000.0 for s, e in zip(starts, ends, strict=True))


def copy_bandwidth_gbs() -> float:
    """Device copy bandwidth: (read + write bytes) / time of a 1 GiB copy."""
    src = torch.empty(2**28, device="cuda")
    dst = torch.empty_like(src)
    us = cuda_median_us(lambda i: dst.copy_(src), 1, 20)
    return 2 * src.numel() * 4 / (us * 1e-6) / 1e9
