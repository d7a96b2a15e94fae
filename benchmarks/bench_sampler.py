"""Benchmark of one sampling step (issue 3, item 5; issue 8), and the chunk kernel's launch
tuning. GPU only, except ``--list`` and the interpreter smoke run ``--smoke``.

Modes (each a grid of configurations, run in the order listed by ``--list``):

* full (default): B in {1, 8, 64, 256} x V in {32000, 128256} x dtype in {float32,
  bfloat16} x filter in {k=50, k=1024} (issue 3) plus {k=50 + top-p 0.9, top-p 0.9,
  min-p 0.05} (issue 8): 80 configurations, with a ``torch.compile`` baseline;
* ``--quick`` (the device check): B in {1, 64} x V in {128256, 32000}, bfloat16, filters
  k=50, p=.9 and min-p .05: 12 configurations, no ``torch.compile``;
* ``--tune``: the chunk kernel's launch, (chunk, warps) in TUNE_LAUNCHES at B in {1, 64},
  V = 128256, bfloat16, k=50: kernel time only, and whether each launch draws the same
  tokens as the first one (the race is keyed on token ids, so the chunking must not
  change them).

Per configuration: median microseconds of the fused Triton sampler (``kernel_launch.launch``
replayed from a CUDA graph: no Python overhead), the achieved GB/s for one read of the
logits and its share of the copy bandwidth measured in the same run; the same launch eager
(Python overhead included); against the eager reference, ``torch.compile`` of it and a
Hugging-Face-style chain (top-p by a full sort and cumsum, min-p by a mask). A buffer of
4x the L2 size is overwritten before every timed call (outside the timed span), so every
call reads its logits from memory at every size, with one input buffer and one graph
capture per configuration. Rows whose top-p/min-p nucleus is not among the chunk candidates
re-read their logits (the kernel's multi-pass path): ``slow_rows`` counts them.

The JSON under ``benchmarks/results/`` is rewritten after every configuration, so a run cut
short keeps what it measured (``complete`` says whether every configuration ran);
``--budget-s`` starts no configuration after that many seconds. Prints the markdown of
``render_results.py`` (last).

    python benchmarks/bench_sampler.py [--quick | --tune] [--budget-s S] [--list] [--smoke]
                                       [--limit N] [--iters N] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

# --budget-s counts from here: the device check's time limit covers importing torch too.
T0 = time.perf_counter()

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import render_results  # noqa: E402

from _common import (  # noqa: E402
    RESULTS,
    copy_bandwidth_gbs,
    cuda_median_us,
    run_info,
    write_json,
)

# The flush buffer: 4x L2 (64 MiB assumed when torch does not say), at most this much.
MAX_FLUSH_BYTES = 512 * 2**20
TEMPERATURE, PENALTY, WINDOW = 0.8, 1.2, 10


@dataclass(frozen=True)
class Filter:
    label: str
    top_k: int
    top_p: float = 1.0
    min_p: float = 0.0

    @property
    def nucleus(self) -> bool:
        return self.top_p < 1.0 or self.min_p > 0.0


FILTERS = {f.label: f for f in (
    Filter("k=50", 50),
    Filter("k=1024", 1024),
    Filter("k=50,p=.9", 50, top_p=0.9),
    Filter("p=.9", 0, top_p=0.9),
    Filter("minp=.05", 0, min_p=0.05),
)}
QUICK_FILTERS = ("k=50", "p=.9", "minp=.05")
# (chunk, chunk_warps) of the chunk kernel timed by --tune; plan_launch's default for k=50
# on CUDA (4096, 8) is among them.
TUNE_LAUNCHES = ((2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16))


@dataclass(frozen=True)
class Config:
    """One measured configuration; ``chunk``/``chunk_warps`` None: the launch's defaults."""

    B: int
    V: int
    dtype: str
    filter: str
    chunk: int | None = None
    chunk_warps: int | None = None

    def describe(self) -> str:
        launch = "" if self.chunk is None else f" chunk={self.chunk} warps={self.chunk_warps}"
        return f"B={self.B} V={self.V} {self.dtype} {self.filter}{launch}"


def grid(mode: str, smoke: bool = False) -> list[Config]:
    """The configurations of ``mode`` ("full", "quick" or "tune") in the order they run:
    the most wanted first, so that a run cut short by its budget keeps those. ``smoke``:
    the same shapes of grid at interpreter sizes (V = 2048, B <= 2)."""
    if mode == "tune":
        batches, vocab = ((1, 2), 2048) if smoke else ((1, 64), 128256)
        launches = ((1024, 4), (2048, 4)) if smoke else TUNE_LAUNCHES
        # Launch outer, batch inner: a cut-short run still compares B = 1 with B = 64.
        return [Config(b, vocab, "bfloat16", "k=50", c, w) for c, w in launches for b in batches]
    if mode == "quick":
        batches, vocabs = ((1, 2), (2048,)) if smoke else ((1, 64), (128256, 32000))
        return [Config(b, v, "bfloat16", f) for v in vocabs for f in QUICK_FILTERS
                for b in batches]
    if mode == "full":
        batches, vocabs = ((1, 2), (2048,)) if smoke else ((1, 8, 64, 256), (32000, 128256))
        return [Config(b, v, d, f) for v in vocabs for b in batches
                for d in ("float32", "bfloat16") for f in FILTERS]
    raise ValueError(f"unknown mode {mode!r}")


def hf_chain(logits, window, temperature: float, penalty: float, k: int,
             top_p: float = 1.0, min_p: float = 0.0):
    """Transformers-style: gather/scatter penalty, topk mask, top-p by sort and cumsum,
    min-p mask, softmax, multinomial."""
    z = logits.float() / temperature
    score = torch.gather(z, 1, window)
    score = torch.where(score < 0, score * penalty, score / penalty)
    z = z.scatter(1, window, score)
    if k > 0:
        kth = torch.topk(z, k)[0][..., -1, None]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        vals, order = torch.sort(z, descending=False)
        cum = vals.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1 - top_p
        drop[..., -1:] = False
        z = z.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = torch.softmax(z, dim=-1)
    if min_p > 0.0:
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    return torch.multinomial(probs, 1).squeeze(1)


class Clock:
    """Median per-call times: CUDA events after an L2 flush on a GPU, wall time on the CPU
    (the interpreter smoke run, whose numbers mean nothing)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.flush: torch.Tensor | None = None
        if self.cuda:
            props = torch.cuda.get_device_properties(device)
            l2 = getattr(props, "L2_cache_size", 0) or 64 * 2**20
            n = min(4 * l2, MAX_FLUSH_BYTES) // 4
            self.flush = torch.empty(n, dtype=torch.int32, device=device)

    def us(self, fn: Callable[[], object], iters: int, *, cold: bool = True) -> float:
        """``cold``: flush L2 before each call; otherwise back to back (for the launch's
        Python overhead, which only shows when the GPU waits for the host)."""
        if self.cuda:
            return cuda_median_us(lambda _i: fn(), 1, iters,
                                  flush=self.flush if cold else None)
        fn()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6


def make_row(cfg: Config, *, chunk: int, chunk_warps: int, kernel_us: float,
             copy_gbs: float | None, **extra: object) -> dict:
    """One row of the JSON: the configuration, the launch it ran, the kernel's time, its
    bandwidth for one read of the logits and its share of the copy bandwidth, and
    ``extra`` (baselines, slow_rows, tokens_match)."""
    filt = FILTERS[cfg.filter]
    nbytes = cfg.B * cfg.V * torch.finfo(getattr(torch, cfg.dtype)).bits // 8
    gbs = nbytes / (kernel_us * 1e-6) / 1e9
    return {**asdict(cfg), "chunk": chunk, "chunk_warps": chunk_warps, "k": filt.top_k,
            "top_p": filt.top_p, "min_p": filt.min_p, "kernel_us": kernel_us,
            "kernel_gbs": gbs, "copy_share": gbs / copy_gbs if copy_gbs else None, **extra}


def make_payload(mode: str, info: dict, copy_gbs: float | None, configs: Sequence[Config],
                 ran: Sequence[Config], rows: list[dict], notes: list[str],
                 default_launch: dict | None = None) -> dict:
    """The JSON document; rewritten after every configuration (``ran``: those tried so far,
    failed ones included; their errors are in ``notes``). ``default_launch``: for --tune,
    the (chunk, chunk_warps) that ``launch`` picks by itself for the grid's filter."""
    kind = "sampler_tune" if mode == "tune" else "bench_sampler"
    missing = [c.describe() for c in configs if c not in set(ran)]
    return {"kind": kind, "mode": mode, **info, "copy_gbs": copy_gbs,
            "configs": len(configs), "complete": not missing, "not_run": missing,
            "notes": notes, **({"default_launch": default_launch} if default_launch else {}),
            "rows": rows}


def bench_config(cfg: Config, device: torch.device, clock: Clock, iters: int,
                 copy_gbs: float | None, baselines: bool, compiled, reference_tokens=None
                 ) -> tuple[dict, torch.Tensor]:
    """Measure one configuration; returns its row and the tokens of its first launch."""
    from lmgen_fast import SamplingParams
    from lmgen_fast.core.errors import STATUS_SLOW
    from lmgen_fast.sampling import kernel_launch, launch_plan, reference

    filt = FILTERS[cfg.filter]
    dtype = getattr(torch, cfg.dtype)
    gen = torch.Generator(device="cpu").manual_seed(cfg.B * 7919 + cfg.V)
    logits = (torch.randn(cfg.B, cfg.V, generator=gen) * 3).to(device, dtype)
    window = torch.randint(0, cfg.V, (cfg.B, WINDOW), generator=gen).to(device)
    params = [SamplingParams(temperature=TEMPERATURE, top_k=filt.top_k,
                             repetition_penalty=PENALTY, top_p=filt.top_p, min_p=filt.min_p,
                             seed=i) for i in range(cfg.B)]
    packed = reference.pack(params, cfg.B, device)
    steps = torch.zeros(cfg.B, dtype=torch.int64, device=device)
    # As kernel_sampler.sample sizes them: candidates whenever a row uses top-p or min-p.
    nucleus = launch_plan.NUCLEUS_CANDIDATES if filt.nucleus else 0
    # Every row is seeded, so no seeds are drawn: the two sampler kernels alone, as the
    # engine launches them for such a batch.
    kw = dict(max_top_k=filt.top_k, nucleus_candidates=nucleus, draw_seeds=False,
              chunk=cfg.chunk, chunk_warps=cfg.chunk_warps)
    plan = launch_plan.plan_launch(cfg.V, filt.top_k, cuda=clock.cuda, chunk=cfg.chunk,
                                   nucleus_candidates=nucleus, chunk_warps=cfg.chunk_warps)

    def launch() -> tuple[torch.Tensor, torch.Tensor]:
        return kernel_launch.launch(logits, packed, window, steps, **kw)

    tokens, status = launch()  # compiles
    extra: dict = {"slow_rows": int(((status & STATUS_SLOW) != 0).sum())}
    # Any other status bit means the row's token is not meaningful: the timing is then of
    # a wrong launch, which the table must say.
    bad = int(((status & ~STATUS_SLOW) != 0).sum())
    if bad:
        extra["bad_rows"] = bad
    if reference_tokens is not None:
        extra["tokens_match"] = bool(torch.equal(tokens, reference_tokens))
    if clock.cuda:
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            launch()
        kernel_us = clock.us(graph.replay, iters)
        del graph  # its memory pool, before the baselines
    else:
        kernel_us = clock.us(launch, iters)
    if baselines:
        extra["kernel_eager_us"] = clock.us(launch, iters, cold=False)
        extra["eager_us"] = clock.us(
            lambda: reference.sample(logits, params, window, step=0), max(5, iters // 4))
        extra["hf_us"] = clock.us(
            lambda: hf_chain(logits, window, TEMPERATURE, PENALTY, filt.top_k, filt.top_p,
                             filt.min_p), max(5, iters // 2))
        extra["compile_us"] = None
        if compiled is not None:
            try:
                extra["compile_us"] = clock.us(
                    lambda: compiled(logits, params, window, step=0), max(5, iters // 4))
            except Exception as exc:  # noqa: BLE001 - a compile failure keeps the other numbers
                extra["compile_error"] = f"{type(exc).__name__}: {exc}"[:200]
    row = make_row(cfg, chunk=plan.chunk, chunk_warps=plan.chunk_warps, kernel_us=kernel_us,
                   copy_gbs=copy_gbs, **extra)
    return row, tokens


def default_json(mode: str, smoke: bool) -> Path:
    suffix = {"full": "", "quick": "_quick", "tune": "_tune"}[mode]
    return RESULTS / f"bench_sampler{suffix}{'_smoke' if smoke else ''}.json"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="12 configurations: B in {1, 64}, V in {128256, 32000}, bfloat16, "
                      "k=50 / p=.9 / minp=.05; no torch.compile baseline")
    mode.add_argument("--tune", action="store_true",
                      help="time the chunk kernel's (chunk, warps) launches at B in {1, 64}, "
                      "V = 128256, bfloat16, k=50")
    ap.add_argument("--list", action="store_true",
                    help="print the configurations of the mode and exit (no GPU needed)")
    ap.add_argument("--smoke", action="store_true",
                    help="interpreter sizes on the CPU (TRITON_INTERPRET): checks the script, "
                    "measures nothing")
    ap.add_argument("--limit", type=int, default=None,
                    help="only the first N configurations of the mode (in --list order)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile baseline")
    ap.add_argument("--iters", type=int, default=None,
                    help="timed calls per number (default 40; 20 with --quick/--tune; 2 smoke)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no configuration after this many seconds")
    ap.add_argument("--json", default=None, help="where to write the JSON (default: "
                    "benchmarks/results/bench_sampler[_quick|_tune][_smoke].json)")
    args = ap.parse_args(argv)
    mode_name = "tune" if args.tune else "quick" if args.quick else "full"
    configs = grid(mode_name, args.smoke)[:args.limit]
    if args.list:
        print(f"{mode_name}{' (smoke)' if args.smoke else ''}: {len(configs)} configurations")
        for cfg in configs:
            print(" ", cfg.describe())
        return 0
    if args.smoke:
        # Before lmgen_fast.kernels is imported: the kernels are defined for the interpreter.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("bench_sampler.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "nothing was measured (--smoke runs on the CPU).", file=sys.stderr)
        return 2
    iters = args.iters or (2 if args.smoke else 20 if mode_name != "full" else 40)
    # In-process callers (the tests) import once and run many times: from the call then.
    start = T0 if __name__ == "__main__" else time.perf_counter()
    clock = Clock(device)
    copy_gbs = copy_bandwidth_gbs() if clock.cuda else None
    compiled = None
    if mode_name == "full" and clock.cuda and not args.no_compile:
        from lmgen_fast.sampling import reference

        compiled = torch.compile(reference.sample, dynamic=True)
    info = run_info(str(device))
    path = Path(args.json) if args.json else default_json(mode_name, args.smoke)
    default_launch = None
    if mode_name == "tune":
        from lmgen_fast.sampling import launch_plan

        lp = launch_plan.plan_launch(configs[0].V, FILTERS[configs[0].filter].top_k,
                                     cuda=clock.cuda)
        default_launch = {"chunk": lp.chunk, "chunk_warps": lp.chunk_warps}
    rows: list[dict] = []
    ran: list[Config] = []
    notes: list[str] = []

    def save() -> dict:
        payload = make_payload(mode_name, info, copy_gbs, configs, ran, rows, notes,
                               default_launch)
        write_json(str(path), payload)
        return payload

    save()  # a file from the start: a run killed in its first compile still says so
    first_tokens: dict[int, torch.Tensor] = {}  # per B, for --tune's tokens_match
    for i, cfg in enumerate(configs):
        elapsed = time.perf_counter() - start
        if args.budget_s is not None and elapsed > args.budget_s:
            notes.append(f"budget of {args.budget_s:.0f} s spent after {len(rows)} of "
                         f"{len(configs)} configurations")
            break
        ran.append(cfg)
        try:
            row, tokens = bench_config(
                cfg, device, clock, iters, copy_gbs, baselines=mode_name != "tune",
                compiled=compiled, reference_tokens=first_tokens.get(cfg.B))
        except Exception as exc:  # noqa: BLE001 - one failing launch must not lose the others
            notes.append(f"{cfg.describe()}: {type(exc).__name__}: {exc}"[:300])
            print(f"failed {cfg.describe()}: {exc!r}", file=sys.stderr, flush=True)
            save()
            continue
        if mode_name == "tune":
            first_tokens.setdefault(cfg.B, tokens)
        rows.append(row)
        save()
        share = f" ({100 * row['copy_share']:.0f}% copy)" if row["copy_share"] else ""
        print(f"[{time.perf_counter() - start:.0f} s] {i + 1}/{len(configs)} {cfg.describe()}:"
              f" kernel {row['kernel_us']:.1f} us{share}", file=sys.stderr, flush=True)
    payload = save()
    print(render_results.render_payload(payload, path))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
