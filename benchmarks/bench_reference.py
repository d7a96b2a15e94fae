"""The reference sampler against the article's per-row steps applied row by row (CPU).

    python benchmarks/bench_reference.py [--batch 64] [--vocab 32000] [--top-k 50]

Both sides get the same logits and a window of 10 tokens per row, temperature 0.8,
repetition penalty 1.2. The article's steps run once per row (host loop, multinomial);
lmgen-fast's reference runs the batch at once with seeded rows. Medians, side by side.
"""

from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from lmgen_fast import SamplingParams  # noqa: E402
from lmgen_fast.api.baseline import article_sample_row  # noqa: E402
from lmgen_fast.sampling import reference

from _common import device_name, median_seconds, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    b, v, k = args.batch, args.vocab, args.top_k
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(b, v, generator=gen) * 4
    window = torch.randint(0, v, (b, 10), generator=gen)
    history = window.tolist()
    seeded = [SamplingParams(temperature=0.8, top_k=k, repetition_penalty=1.2, seed=i)
              for i in range(b)]
    unseeded = SamplingParams(temperature=0.8, top_k=k, repetition_penalty=1.2)

    def article():
        for r in range(b):
            article_sample_row(logits[r], history[r], 0.8, 1.2, 10, k)

    cases = [
        ("article steps, row by row", article),
        ("reference, seeded rows", lambda: reference.sample(logits, seeded, window, step=3)),
        ("reference, unseeded rows", lambda: reference.sample(logits, unseeded, window)),
        ("reference, seeded, top-k off",
         lambda: reference.sample(logits, [SamplingParams(top_k=0, seed=i) for i in range(b)],
                                  window)),
    ]
    results = {}
    for name, fn in cases:
        results[name] = median_seconds(fn, args.repeats, warmup=2)[0]
    base = results["article steps, row by row"]
    print(f"device: {device_name()}  torch {torch.__version__}  B={b} V={v} k={k}")
    print(f"{'sampler':<32}{'median ms':>12}{'speed-up':>10}")
    for name, t in results.items():
        print(f"{name:<32}{t * 1e3:>12.2f}{base / t:>9.1f}x")
    write_json("bench_reference", {"device": device_name(), "torch": torch.__version__,
                                   "batch": b, "vocab": v, "top_k": k,
                                   "median_s": results})


if __name__ == "__main__":
    main()
