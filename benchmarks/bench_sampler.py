"""Benchmark of one sampling step (issue 3, item 5). GPU only.

For B in {1, 8, 64, 256} x V in {32000, 128256} x dtype in {float32, bfloat16} x
filter in {k=50, k=1024} (issue 3) plus {k=50 + top-p 0.9, top-p 0.9, min-p 0.05}
(issue 8): median microseconds of the fused Triton sampler (``kernel_sampler.launch``
replayed from a CUDA graph, so no Python overhead), the achieved GB/s for one read of the
logits and its share of the copy bandwidth measured in the same run, against the eager
reference, ``torch.compile`` of the reference and a Hugging-Face-style chain (top-p by a
full sort and cumsum, min-p by a mask). Input buffers rotate so that L2 does not serve the
logits. Rows whose top-p/min-p nucleus is not among the chunk candidates re-read their
logits (the kernel's multi-pass path): ``slow_rows`` counts them for the first buffer.
Prints a table (last) and writes JSON under ``benchmarks/results/``.

    python benchmarks/bench_sampler.py [--quick] [--no-compile] [--budget-s 200]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import copy_bandwidth_gbs, cuda_median_us  # noqa: E402

L2_FLUSH_BYTES = 256 * 2**20  # rotate through at least this much input per config


# (label, top_k, top_p, min_p) of the benchmarked filters.
FILTERS = [
    ("k=50", 50, 1.0, 0.0),
    ("k=1024", 1024, 1.0, 0.0),
    ("k=50,p=.9", 50, 0.9, 0.0),
    ("p=.9", 0, 0.9, 0.0),
    ("minp=.05", 0, 1.0, 0.05),
]


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


def bench_config(B, V, dtype, filt, args, compiled, results_ok):
    from lmgen_fast import SamplingParams, kernel_sampler, reference

    label, k, top_p, min_p = filt
    nucleus = kernel_sampler.NUCLEUS_CANDIDATES if (top_p < 1 or min_p > 0) else 0

    nbytes = B * V * torch.finfo(dtype).bits // 8
    n_bufs = max(2, min(64, math.ceil(L2_FLUSH_BYTES / nbytes)))
    bufs = [torch.randn(B, V, device="cuda").mul_(3).to(dtype) for _ in range(n_bufs)]
    window = torch.randint(0, V, (B, 10), device="cuda")
    params = [SamplingParams(temperature=0.8, top_k=k, repetition_penalty=1.2, top_p=top_p,
                             min_p=min_p, seed=i)
              for i in range(B)]
    packed = reference.pack(params, B, torch.device("cuda"))
    steps = torch.zeros(B, dtype=torch.int64, device="cuda")

    # Kernel: one CUDA graph per input buffer, replayed in rotation.
    graphs = []
    kw = dict(max_top_k=k, nucleus_candidates=nucleus)
    _tok, status = kernel_sampler.launch(bufs[0], packed, window, steps, **kw)  # compile
    slow = int(((status & kernel_sampler.STATUS_SLOW) != 0).sum())
    torch.cuda.synchronize()
    for b in bufs:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            kernel_sampler.launch(b, packed, window, steps, **kw)
        graphs.append(g)
    row = {"B": B, "V": V, "dtype": str(dtype).replace("torch.", ""), "k": k,
           "filter": label, "top_p": top_p, "min_p": min_p, "slow_rows": slow}
    row["kernel_us"] = cuda_median_us(lambda i: graphs[i].replay(), n_bufs, args.iters)
    row["kernel_gbs"] = nbytes / (row["kernel_us"] * 1e-6) / 1e9
    # Eager launch including Python overhead, for reference.
    row["kernel_eager_us"] = cuda_median_us(
        lambda i: kernel_sampler.launch(bufs[i], packed, window, steps, **kw),
        n_bufs, args.iters)
    graphs.clear()  # free the graphs' memory pools before the baselines

    def ref(i):
        return reference.sample(bufs[i], params, window, step=0)

    row["eager_us"] = cuda_median_us(ref, n_bufs, max(5, args.iters // 4))
    row["hf_us"] = cuda_median_us(
        lambda i: hf_chain(bufs[i], window, 0.8, 1.2, k, top_p, min_p), n_bufs,
        max(5, args.iters // 2))
    row["compile_us"] = None
    if compiled is not None and results_ok():
        try:
            row["compile_us"] = cuda_median_us(
                lambda i: compiled(bufs[i], params, window, step=0), n_bufs,
                max(5, args.iters // 4))
        except Exception as exc:  # a compile failure must not lose the other numbers
            row["compile_error"] = f"{type(exc).__name__}: {exc}"[:200]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="B in {8, 64} and V = 128256 only")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile baseline")
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--budget-s", type=float, default=200.0,
                    help="stop adding torch.compile numbers after this many seconds")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_sampler.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "nothing was measured.", file=sys.stderr)
        return 2
    from lmgen_fast import reference

    t0 = time.time()
    copy_gbs = copy_bandwidth_gbs()
    compiled = None if args.no_compile else torch.compile(reference.sample, dynamic=True)
    Bs = [8, 64] if args.quick else [1, 8, 64, 256]
    Vs = [128256] if args.quick else [32000, 128256]
    rows = []
    for V in Vs:
        for B in Bs:
            for dtype in (torch.float32, torch.bfloat16):
                for filt in FILTERS:
                    r = bench_config(B, V, dtype, filt, args, compiled,
                                     lambda: time.time() - t0 < args.budget_s)
                    r["copy_share"] = r["kernel_gbs"] / copy_gbs
                    rows.append(r)
                    print(f"done B={B} V={V} {r['dtype']} {filt[0]}", file=sys.stderr,
                          flush=True)
    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "copy_gbs": copy_gbs,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"sampler_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(info, indent=1))

    def f(v, fmt="{:9.1f}"):
        return fmt.format(v) if v is not None else "      n/a"

    print(f"\n{info['device']}  torch {info['torch']}  triton {info['triton']}  "
          f"copy bandwidth {copy_gbs:.0f} GB/s (read+write)   JSON: {path}")
    print(f"{'B':>4} {'V':>7} {'dtype':>9} {'filter':>10} | {'kernel us':>9} {'GB/s':>7} "
          f"{'%copy':>6} {'slow':>4} "
          f"| {'eager us':>9} {'compile':>9} {'hf us':>9} | {'x eager':>7} {'x comp':>7}")
    for r in rows:
        xe = r["eager_us"] / r["kernel_us"]
        xc = r["compile_us"] / r["kernel_us"] if r["compile_us"] else None
        print(f"{r['B']:>4} {r['V']:>7} {r['dtype']:>9} {r['filter']:>10} | "
              f"{r['kernel_us']:9.1f} {r['kernel_gbs']:7.0f} {100 * r['copy_share']:5.0f}% "
              f"{r['slow_rows']:>4} | {r['eager_us']:9.1f} "
              f"{f(r['compile_us'])} {r['hf_us']:9.1f} | {xe:7.1f} {f(xc, '{:7.1f}')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
